"""The LoRA branch alone: which way of writing `(x @ A) @ B` is fastest.

Times forward + backward (gradients for x, A and B) of the adapter branch of
one MiniLM query projection (`"abc,cde->abde"`, x of 16 x 128 x 384, rank 8,
output 12 heads x 32) written three ways, per backend:

- `einsum`: `einsum("abc,cr->abr")` then `einsum("abr,rde->abde")`, the
  EinsumDense equations split in two;
- `matmul_3d`: `matmul` of the 3-D input by A, then by B, then a reshape;
- `matmul_2d`: the input viewed as `(tokens, d_in)`, two 2-D matmuls, one
  reshape back: `keras_lora.layers.base.low_rank_matmul` itself, the form
  the layers use.

and the three branches of the query, key and value projections, which read
the same input (all-linear targets), written three ways:

- `separate`: three `low_rank_matmul` calls, what three adapted layers do;
- `fused_a`: one `x @ [A_q | A_k | A_v]` product (rank 3r), split, and three
  `(tokens, r) @ B` products;
- `transposed`: each first product as `A^T @ x^T` (rank x tokens), then
  `B^T @ (A^T x^T)` transposed back: the other memory layout.

On PyTorch, `compiled` is `separate` under `torch.compile` (Inductor).
The step is compiled the way Keras compiles a train step on the backend
(`jax.jit`, `tf.function`, eager PyTorch). Interleaved rounds, median.

    KERAS_BACKEND=tensorflow python -m benchmarks.lora_branch --quick
    python -m benchmarks.lora_branch --table
"""

import statistics

from benchmarks import common

SIZES = {
    "smoke": dict(shape=(2, 8, 16), rank=2, heads=(2, 8), rounds=2, calls=2),
    "quick": dict(
        shape=(16, 128, 384), rank=8, heads=(12, 32), rounds=15, calls=10
    ),
    "full": dict(
        shape=(16, 128, 384), rank=8, heads=(12, 32), rounds=40, calls=10
    ),
}


def branches(rank, heads):
    from keras import ops

    from keras_lora.layers.base import low_rank_matmul

    def einsum(x, a, b):
        h = ops.einsum("abc,cr->abr", x, a)
        return ops.einsum("abr,rde->abde", h, ops.reshape(b, (rank, *heads)))

    def matmul_3d(x, a, b):
        y = ops.matmul(ops.matmul(x, a), b)
        return ops.reshape(y, tuple(ops.shape(y)[:-1]) + heads)

    def matmul_2d(x, a, b):
        return low_rank_matmul(x, a, b, heads)

    return {"einsum": einsum, "matmul_3d": matmul_3d, "matmul_2d": matmul_2d}


def qkv_branches(rank, heads, compile_torch=True):
    """Forms of the query, key and value branches on one input; each takes
    `(x, a, b)` with `a` of shape `(d_in, 3 r)` (the three A side by side)
    and `b` of shape `(3, r, d_out)`, and returns the three outputs
    concatenated on the last axis. `compile_torch`: add `compiled` on
    PyTorch (Inductor compiles for tens of seconds; off at smoke size)."""
    import keras
    from keras import ops

    from keras_lora.layers.base import low_rank_matmul

    def separate(x, a, b):
        return ops.concatenate(
            [
                low_rank_matmul(x, a[:, i * rank : (i + 1) * rank], b[i], heads)
                for i in range(3)
            ],
            axis=-1,
        )

    def fused_a(x, a, b):
        tokens = ops.reshape(x, (-1, ops.shape(x)[-1]))
        h = ops.matmul(tokens, a)
        outputs = [
            ops.matmul(h[:, i * rank : (i + 1) * rank], b[i]) for i in range(3)
        ]
        shape = tuple(ops.shape(x)[:-1]) + heads
        return ops.concatenate(
            [ops.reshape(y, shape) for y in outputs], axis=-1
        )

    def transposed(x, a, b):
        tokens_t = ops.transpose(ops.reshape(x, (-1, ops.shape(x)[-1])))
        shape = tuple(ops.shape(x)[:-1]) + heads
        outputs = []
        for i in range(3):
            h_t = ops.matmul(
                ops.transpose(a[:, i * rank : (i + 1) * rank]), tokens_t
            )
            y = ops.transpose(ops.matmul(ops.transpose(b[i]), h_t))
            outputs.append(ops.reshape(y, shape))
        return ops.concatenate(outputs, axis=-1)

    forms = {"separate": separate, "fused_a": fused_a, "transposed": transposed}
    if compile_torch and keras.backend.backend() == "torch":
        import torch

        forms["compiled"] = torch.compile(separate)
    return forms


def compiled_step(fn, x, a, b):
    """A callable running forward + backward of `fn` once, blocking."""
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        x, a, b = (torch.tensor(v, requires_grad=True) for v in (x, a, b))

        def step():
            return torch.autograd.grad(fn(x, a, b).sum(), [x, a, b])

        return step
    if backend == "tensorflow":
        import tensorflow as tf

        x, a, b = (tf.Variable(v) for v in (x, a, b))

        @tf.function
        def graph_step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(fn(x, a, b))
            return tape.gradient(loss, [x, a, b])

        return lambda: [g.numpy() for g in graph_step()]
    import jax

    grad = jax.jit(
        jax.grad(lambda x, a, b: fn(x, a, b).sum(), argnums=(0, 1, 2))
    )
    x, a, b = (jax.numpy.asarray(v) for v in (x, a, b))
    return lambda: jax.block_until_ready(grad(x, a, b))


def _time_forms(forms, x, a, b, rounds, calls):
    """Checks every form's gradients against the first's, then times
    forward + backward; returns `(ms per call, per-round times)`."""
    import numpy as np

    steps = {name: compiled_step(fn, x, a, b) for name, fn in forms.items()}
    reference = None
    for step in steps.values():
        grads = [np.asarray(g) for g in step()]
        if reference is None:
            reference = grads
        for g, r in zip(grads, reference, strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-2)

    def timed(step):
        def batch():
            for _ in range(calls):
                step()

        return batch

    times = common.interleaved_times(
        {n: timed(s) for n, s in steps.items()}, 1, rounds
    )
    ms = {n: statistics.median(t) / calls * 1e3 for n, t in times.items()}
    return ms, times


def run(size="quick", device="cpu"):
    import numpy as np

    common.check_device(device)
    spec = SIZES[size]
    rng = np.random.default_rng(0)
    d_in, rank = spec["shape"][-1], spec["rank"]
    d_out = int(np.prod(spec["heads"]))
    x = rng.normal(size=spec["shape"]).astype("float32")
    a = rng.normal(size=(d_in, rank)).astype("float32")
    b = rng.normal(size=(rank, d_out)).astype("float32")
    ms, times = _time_forms(
        branches(rank, spec["heads"]), x, a, b, spec["rounds"], spec["calls"]
    )
    a3 = rng.normal(size=(d_in, 3 * rank)).astype("float32")
    b3 = rng.normal(size=(3, rank, d_out)).astype("float32")
    qkv_ms, qkv_times = _time_forms(
        qkv_branches(rank, spec["heads"], compile_torch=size != "smoke"),
        x,
        a3,
        b3,
        spec["rounds"],
        spec["calls"],
    )
    return {
        "benchmark": "lora_branch",
        "size": size,
        "machine": common.machine_info(device),
        "x_shape": list(spec["shape"]),
        "rank": rank,
        "out_dims": list(spec["heads"]),
        "ms_forward_backward": ms,
        "vs_einsum": {n: ms[n] / ms["einsum"] for n in ms},
        "times_s": times,
        "qkv_ms_forward_backward": qkv_ms,
        "qkv_vs_separate": {n: qkv_ms[n] / qkv_ms["separate"] for n in qkv_ms},
        "qkv_times_s": qkv_times,
    }


def table(out_dir="benchmarks/results", device="cpu"):
    """docs/performance.md's two tables from the JSON results: the forms of
    one branch, and the forms of the query, key and value branches."""
    results = common.results_by_backend(out_dir, "lora_branch", device)
    lines = [
        "| backend | two einsums ms | two 3-D matmuls ms | two 2-D matmuls ms "
        "(used) | 2-D / einsum |",
        "|---|---|---|---|---|",
    ]
    for backend in ("jax", "torch", "tensorflow"):
        if backend not in results:
            continue
        ms = results[backend]["ms_forward_backward"]
        lines.append(
            f"| {backend} | {ms['einsum']:.2f} | {ms['matmul_3d']:.2f} | "
            f"{ms['matmul_2d']:.2f} | "
            f"{results[backend]['vs_einsum']['matmul_2d']:.2f} |"
        )
    lines += [
        "",
        "| backend | separate ms (used) | fused A ms | transposed ms | "
        "compiled ms | fused / separate | transposed / separate | "
        "compiled / separate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for backend in ("jax", "torch", "tensorflow"):
        if backend not in results:
            continue
        ms = results[backend]["qkv_ms_forward_backward"]
        ratio = results[backend]["qkv_vs_separate"]
        forms = ("separate", "fused_a", "transposed", "compiled")
        cells = [f"{ms[f]:.2f}" if f in ms else "-" for f in forms]
        cells += [f"{ratio[f]:.2f}" if f in ratio else "-" for f in forms[1:]]
        lines.append(f"| {backend} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--table",
        action="store_true",
        help="print docs/performance.md's tables from the JSON in --out",
    )
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.out, args.device), end="")
        return None
    common.setup_device(args.device)
    result = run(args.size, args.device)
    print(
        f"\nLoRA branch forward + backward, x {tuple(result['x_shape'])}, "
        f"rank {result['rank']}, backend {result['machine']['backend']}"
    )
    common.print_table(
        ["form", "ms", "vs einsum"],
        [
            [n, f"{t:.3f}", f"{result['vs_einsum'][n]:.2f}"]
            for n, t in result["ms_forward_backward"].items()
        ],
    )
    print("\nQuery, key and value branches on one input")
    common.print_table(
        ["form", "ms", "vs separate"],
        [
            [n, f"{t:.3f}", f"{result['qkv_vs_separate'][n]:.2f}"]
            for n, t in result["qkv_ms_forward_backward"].items()
        ],
    )
    path = common.write_json(result, args.out, "lora_branch")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
