"""Op-level profile of one train step: where keras_lora's time goes.

Builds the same variants as `benchmarks.train_step` (keras_lora, built-in
LoRA, full fine-tuning and the `floor`, in which only normalization scales
train), warms each up, then records `--steps` calls of `train_on_batch` per
variant with the backend's own profiler:

- PyTorch: `torch.profiler` (CPU activities), grouped by aten op name.
- TensorFlow: `tf.profiler.experimental` trace, its host plane read back
  from the `.xplane.pb` and grouped by TF op type.
- JAX: `jax.profiler` trace, read back the same way and grouped by the
  XLA op name.

It prints, per variant, the profiled op time per step and the ops whose
time differs most between two variants (default keras_lora vs floor: what
the LoRA layers cost on top of the cheapest possible frozen step), and
writes JSON. Op times are self times (children excluded) summed over all
threads, so they can exceed the wall time on several cores.

Writes `profile_step_<targets>_<backend>_<device>.json`. `--size` sets the
defaults (smoke: gemma_smoke 2 x 8, one step; quick and full: MiniLM
16 x 128, 3 and 5 steps); explicit flags win.

Usage:

    KERAS_BACKEND=torch python -m benchmarks.profile_step --model minilm
"""

import collections
import glob
import os
import tempfile
import time

from benchmarks import common


def _ops_torch(step, steps):
    import torch.profiler

    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    totals = collections.defaultdict(lambda: [0.0, 0])
    for event in prof.key_averages():
        totals[event.key][0] += event.self_cpu_time_total / 1e6
        totals[event.key][1] += event.count
    return totals


def _xplane_ops(logdir, group):
    """Sums event durations of a profiler trace's host plane by op group."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    (path,) = glob.glob(
        os.path.join(logdir, "**", "*.xplane.pb"), recursive=True
    )
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    totals = collections.defaultdict(lambda: [0.0, 0])
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                key = group(name)
                if key is None:
                    continue
                totals[key][0] += event.duration_ps / 1e12
                totals[key][1] += 1
    return totals


def _tf_op_type(name):
    # Executor events are "scope/op_name:OpType"; everything else (Python
    # frames, the enclosing function call and runtime bookkeeping, which
    # contain the ops) is left out.
    if ":" not in name or name.startswith(("$", "<")):
        return None
    op_type = name.rsplit(":", 1)[1].strip()
    if op_type in ("Process", "Run") or "__inference" in name:
        return None
    return op_type


def _ops_tensorflow(step, steps):
    import tensorflow as tf

    logdir = tempfile.mkdtemp(prefix="keras_lora_tf_profile_")
    tf.profiler.experimental.start(logdir)
    for _ in range(steps):
        step()
    tf.profiler.experimental.stop()
    return _xplane_ops(logdir, _tf_op_type)


def _xla_op(name):
    # XLA:CPU thunks are named after the HLO instruction ("fusion.12",
    # "dot.3", ...); keep the kind, drop the number.
    if name.startswith(("$", "<", "Thunk")) or " " in name:
        return None
    return name.split(".")[0]


def _ops_jax(step, steps):
    import jax

    logdir = tempfile.mkdtemp(prefix="keras_lora_jax_profile_")
    with jax.profiler.trace(logdir):
        for _ in range(steps):
            step()
    return _xplane_ops(logdir, _xla_op)


def profile_ops(step, steps):
    """`{op: [seconds, count]}` summed over `steps` calls of `step`."""
    import keras

    backend = keras.backend.backend()
    profiler = {
        "torch": _ops_torch,
        "tensorflow": _ops_tensorflow,
        "jax": _ops_jax,
    }[backend]
    return profiler(step, steps)


def run(
    model,
    batch_size,
    seq_len,
    rank,
    variants,
    steps,
    jit_compile="auto",
    targets="qv",
    device="cpu",
):
    import keras

    common.check_device(device)
    models = {}
    backbone = None
    for variant in variants:
        models[variant], backbone, _ = common.build_variant(
            model, variant, rank, targets=targets, jit_compile=jit_compile
        )
    x, y = common.make_batch(model, backbone, batch_size, seq_len)
    result = {
        "benchmark": "profile_step",
        "machine": common.machine_info(device),
        "model": model,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "rank": rank,
        "targets": targets,
        "steps": steps,
        "backend": keras.backend.backend(),
        "jit_compile": {v: m.jit_compile for v, m in models.items()},
        "variants": {},
    }
    for variant, m in models.items():
        common.log(f"warm-up {variant}")
        for _ in range(2):
            m.train_on_batch(x, y)
        start = time.perf_counter()
        for _ in range(steps):
            m.train_on_batch(x, y)
        wall = (time.perf_counter() - start) / steps
        common.log(f"profiling {variant} ({steps} steps)")
        ops = profile_ops(lambda m=m: m.train_on_batch(x, y), steps)
        result["variants"][variant] = {
            "wall_s_per_step": wall,
            "op_s_per_step": sum(t for t, _ in ops.values()) / steps,
            "ops": {
                name: {"s_per_step": t / steps, "calls_per_step": n / steps}
                for name, (t, n) in sorted(
                    ops.items(), key=lambda item: -item[1][0]
                )
            },
        }
    return result


def print_result(result, compare, top):
    print(
        f"\nProfile of train_on_batch, {result['model']} "
        f"{result['batch_size']}x{result['seq_len']}, rank {result['rank']}, "
        f"backend {result['backend']}, jit_compile {result['jit_compile']}"
    )
    common.print_table(
        ["variant", "wall ms/step", "op ms/step (all threads)"],
        [
            [
                v,
                f"{r['wall_s_per_step'] * 1e3:.1f}",
                f"{r['op_s_per_step'] * 1e3:.1f}",
            ]
            for v, r in result["variants"].items()
        ],
    )
    for v in result["variants"]:
        ops = result["variants"][v]["ops"]
        print(f"\nTop {top} ops of {v} (ms/step, calls/step):")
        common.print_table(
            ["op", "ms", "calls"],
            [
                [
                    name,
                    f"{o['s_per_step'] * 1e3:.1f}",
                    f"{o['calls_per_step']:.0f}",
                ]
                for name, o in list(ops.items())[:top]
            ],
        )
    a, b = compare
    if a in result["variants"] and b in result["variants"]:
        ops_a = result["variants"][a]["ops"]
        ops_b = result["variants"][b]["ops"]
        names = set(ops_a) | set(ops_b)
        zero = {"s_per_step": 0.0, "calls_per_step": 0.0}

        def diff(name):
            return (
                ops_a.get(name, zero)["s_per_step"]
                - ops_b.get(name, zero)["s_per_step"]
            )

        rows = []
        for name in sorted(names, key=lambda n: -abs(diff(n)))[:top]:
            oa, ob = ops_a.get(name, zero), ops_b.get(name, zero)
            rows.append(
                [
                    name,
                    f"{oa['s_per_step'] * 1e3:.1f}",
                    f"{ob['s_per_step'] * 1e3:.1f}",
                    f"{diff(name) * 1e3:+.1f}",
                    f"{oa['calls_per_step']:.0f}",
                    f"{ob['calls_per_step']:.0f}",
                ]
            )
        print(f"\nOps that differ most, {a} - {b} (ms/step):")
        common.print_table(
            ["op", f"{a} ms", f"{b} ms", "diff ms", f"{a} calls", f"{b} calls"],
            rows,
        )


#: Per `--size`: the defaults of --model, --batch-size, --seq-len, --rank
#: and --steps (each flag given on the command line wins).
SIZES = {
    "smoke": dict(
        model="gemma_smoke", batch_size=2, seq_len=8, rank=4, steps=1
    ),
    "quick": dict(model="minilm", batch_size=16, seq_len=128, rank=8, steps=3),
    "full": dict(model="minilm", batch_size=16, seq_len=128, rank=8, steps=5),
}


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument(
        "--variants", nargs="*", default=["keras_lora", "floor", "builtin"]
    )
    parser.add_argument("--compare", nargs=2, default=["keras_lora", "floor"])
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument(
        "--targets", choices=sorted(common.TARGET_SETS), default="qv"
    )
    common.add_jit_compile_argument(parser)
    args = parser.parse_args(argv)
    for key, value in SIZES[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    common.setup_device(args.device)
    result = run(
        args.model,
        args.batch_size,
        args.seq_len,
        args.rank,
        args.variants,
        args.steps,
        common.jit_compile_value(args.jit_compile),
        args.targets,
        args.device,
    )
    print_result(result, args.compare, args.top)
    path = common.write_json(result, args.out, f"profile_step_{args.targets}")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
