"""Why remat saves little on JAX's CPU backend: XLA's buffer assignment.

JAX only. For the model of `benchmarks.remat` (gemma_mid, batch 1, keras_lora
rank 8 on query + value) with and without rematerialized decoder blocks,
each variant in a fresh process with XLA's dump switched on, the gradient of
the training loss with respect to the trainable variables (what Keras's JAX
train step differentiates) is jit-compiled, not run, and read back:

- `temp_bytes`: the compiled program's temporary memory
  (`compiled.memory_analysis().temp_size_in_bytes`, one preallocated block on
  the CPU backend);
- `attention_buffers` / `attention_slots`: how many buffers of one block's
  attention scores or probabilities (float32 arrays whose last two axes are
  the sequence, query heads x seq x seq numbers) the buffer assignment
  places in that block, and at how many distinct offsets: the slots
  reserved for them at once;
- `barriers_before` / `barriers_after`: `opt-barrier` instructions (what
  `jax.checkpoint` emits around each rematerialized block) in the program
  before and after XLA's optimizations.

    KERAS_BACKEND=jax python -m benchmarks.xla_memory --quick
    python -m benchmarks.xla_memory --table
"""

import glob
import json
import math
import os
import re
import tempfile

from benchmarks import common
from benchmarks import remat

SIZES = {
    # 12 tokens: no other array of gemma_smoke ends in (12, 12).
    "smoke": dict(model="gemma_smoke", seq_lens=(12,), rank=4),
    "quick": dict(model="gemma_mid", seq_lens=(256, 1024, 4096), rank=8),
}
SIZES["full"] = SIZES["quick"]


def _check_backend():
    common.require_backend(
        "jax", "xla_memory", "reads XLA's buffer assignment of a JAX program"
    )


def _is_attention_shape(dims, heads, seq_len):
    """A float32 array of one block's attention scores or probabilities:
    its last two axes are the sequence, and it holds `heads` of them (as
    `(batch, heads, seq, seq)` or any reshape that keeps the last two)."""
    return dims[-2:] == [seq_len, seq_len] and math.prod(dims) == (
        heads * seq_len * seq_len
    )


def _read_dump(dump_dir, heads, seq_len):
    """Counts from the dump of the `jit_loss_gradient` module."""
    (assignment,) = glob.glob(
        os.path.join(
            dump_dir,
            "*jit_loss_gradient.cpu_after_optimizations-buffer-assignment.txt",
        )
    )
    with open(assignment) as f:
        text = f.read()
    temp = text[text.index("preallocated-temp") :]
    temp = (
        temp[: temp.find("\nallocation ")] if "\nallocation " in temp else temp
    )
    offsets = [
        offset
        for offset, dims in re.findall(
            r"\(size=\d+,offset=(\d+)\): f32\[([\d,]+)\]", temp
        )
        if _is_attention_shape(
            [int(d) for d in dims.split(",")], heads, seq_len
        )
    ]
    counts = {}
    for stage in ("before_optimizations", "cpu_after_optimizations"):
        (path,) = glob.glob(
            os.path.join(dump_dir, f"*jit_loss_gradient.{stage}.txt")
        )
        with open(path) as f:
            counts[stage] = len(re.findall(r"\bopt-barrier\(", f.read()))
    return {
        "attention_buffers": len(offsets),
        "attention_slots": len(set(offsets)),
        "barriers_before": counts["before_optimizations"],
        "barriers_after": counts["cpu_after_optimizations"],
    }


def measure(name, seq_len, rank, variant, dump_dir):
    """Compiles the loss gradient of one variant in this process (started
    with XLA's dump into `dump_dir`: `--child SEQ_LEN VARIANT DIR`)."""
    import jax
    import keras

    _check_backend()
    model, backbone, remat_set = remat._build(
        name, rank, remat.VARIANTS[variant]
    )
    x, y = common.make_batch(name, backbone, 1, seq_len)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]

    def loss_gradient(trainable, frozen, x, y):
        def value(trainable):
            logits, _ = model.stateless_call(
                trainable, frozen, x, training=True
            )
            return loss(y, logits)

        return jax.grad(value)(trainable)

    compiled = jax.jit(loss_gradient).lower(trainable, frozen, x, y).compile()
    analysis = compiled.memory_analysis()
    heads = common.GEMMA_CONFIGS[name]["num_query_heads"]
    attention_bytes = heads * seq_len * seq_len * 4
    return {
        "remat_mode_on_every_block": remat_set,
        "temp_bytes": analysis.temp_size_in_bytes,
        "attention_buffer_bytes": attention_bytes,
        **_read_dump(dump_dir, heads, seq_len),
    }


def _child(size, device, seq_len, variant):
    common.log(f"sequence length {seq_len}, {variant} (own process)")
    with tempfile.TemporaryDirectory() as dump_dir:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_dump_to={dump_dir}".strip()
        try:
            return common.run_child(
                "benchmarks.xla_memory",
                [
                    "--size",
                    size,
                    "--device",
                    device,
                    "--child",
                    str(seq_len),
                    variant,
                    dump_dir,
                ],
                f"XLA memory analysis ({variant}) at sequence length {seq_len}",
            )
        finally:
            if flags:
                os.environ["XLA_FLAGS"] = flags
            else:
                del os.environ["XLA_FLAGS"]


def run(size="quick", device="cpu"):
    common.check_device(device)
    _check_backend()
    spec = SIZES[size]
    rows = []
    for seq_len in spec["seq_lens"]:
        variants = {v: _child(size, device, seq_len, v) for v in remat.VARIANTS}
        rows.append(
            {
                "seq_len": seq_len,
                "variants": variants,
                "temp_ratio": variants["remat"]["temp_bytes"]
                / variants["no_remat"]["temp_bytes"],
            }
        )
    return {
        "benchmark": "xla_memory",
        "size": size,
        "model": spec["model"],
        "rank": spec["rank"],
        "batch_size": 1,
        "machine": common.machine_info(device),
        "results": rows,
    }


def table(out_dir="benchmarks/results", device="cpu"):
    """The Markdown table of `xla_memory_jax_<device>.json` in `out_dir`."""
    result = common.results_by_backend(out_dir, "xla_memory", device)["jax"]
    mib = 2**20
    lines = [
        "| seq len | temp MiB | temp MiB, remat | remat / none | attention "
        "matrix MiB | attention-size slots (buffers) | slots (buffers), remat "
        "| opt-barriers before / after XLA's passes, remat |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["results"]:
        no, re_ = row["variants"]["no_remat"], row["variants"]["remat"]
        lines.append(
            f"| {row['seq_len']} | {no['temp_bytes'] / mib:.0f} | "
            f"{re_['temp_bytes'] / mib:.0f} | {row['temp_ratio']:.2f} | "
            f"{no['attention_buffer_bytes'] / mib:.0f} | "
            f"{no['attention_slots']} ({no['attention_buffers']}) | "
            f"{re_['attention_slots']} ({re_['attention_buffers']}) | "
            f"{re_['barriers_before']} / {re_['barriers_after']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--table",
        action="store_true",
        help="print the Markdown table of the JSON result in --out and exit",
    )
    parser.add_argument(
        "--child",
        nargs=3,
        metavar=("SEQ_LEN", "VARIANT", "DUMP_DIR"),
        help="(internal) compile one variant in this process",
    )
    args = parser.parse_args(argv)
    if args.table:
        text = table(args.out, args.device)
        print(text, end="")
        return text
    common.setup_device(args.device)
    spec = SIZES[args.size]
    if args.child:
        seq_len, variant, dump_dir = args.child
        result = measure(
            spec["model"], int(seq_len), spec["rank"], variant, dump_dir
        )
        print(json.dumps(result))
        return result
    result = run(args.size, args.device)
    common.write_json(result, args.out, "xla_memory")
    print(table(args.out, args.device), end="")
    return result


if __name__ == "__main__":
    main()
