"""The LoRA branch alone: which way of writing `(x @ A) @ B` is fastest.

Times forward + backward (gradients for x, A and B) of the adapter branch of
one MiniLM query projection (`"abc,cde->abde"`, x of 16 x 128 x 384, rank 8,
output 12 heads x 32) written four ways, per backend:

- `einsum`: `einsum("abc,cr->abr")` then `einsum("abr,rde->abde")`, the
  EinsumDense equations split in two;
- `matmul_3d`: `matmul` of the 3-D input by A, then by B, then a reshape;
- `matmul_2d`: the input viewed as `(tokens, d_in)`, two 2-D matmuls, one
  reshape back: `keras_lora.layers.base.low_rank_matmul` itself, the form
  the layers use;
- `peft_layout`: the same two 2-D matmuls with the factors stored as PEFT's
  `nn.Linear` weights (`(r, d_in)`, `(d_out, r)`) and used transposed.

and the three branches of the query, key and value projections, which read
the same input (all-linear targets), written three ways:

- `separate`: three `low_rank_matmul` calls, what three adapted layers do;
- `fused_a`: the three A (separate variables, as the layers hold them)
  concatenated, one `x @ [A_q | A_k | A_v]` product (rank 3r), split, and
  three `(tokens, r) @ B` products;
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
    `(x, a_q, a_k, a_v, b_q, b_k, b_v)`, the factors as three adapted layers
    hold them (A: `(d_in, r)`, B: `(r, d_out)`), and returns the three
    outputs. `compile_torch`: add `compiled` on PyTorch (Inductor compiles
    for tens of seconds; off at smoke size)."""
    import keras
    from keras import ops

    from keras_lora.layers.base import low_rank_matmul

    def separate(x, *factors):
        a, b = factors[:3], factors[3:]
        return tuple(low_rank_matmul(x, a[i], b[i], heads) for i in range(3))

    def fused_a(x, *factors):
        # The three A are separate variables: one product needs them side
        # by side, concatenated in every call.
        a, b = ops.concatenate(factors[:3], axis=1), factors[3:]
        h = ops.matmul(ops.reshape(x, (-1, ops.shape(x)[-1])), a)
        shape = tuple(ops.shape(x)[:-1]) + heads
        return tuple(
            ops.reshape(
                ops.matmul(h[:, i * rank : (i + 1) * rank], b[i]), shape
            )
            for i in range(3)
        )

    def transposed(x, *factors):
        a, b = factors[:3], factors[3:]
        tokens_t = ops.transpose(ops.reshape(x, (-1, ops.shape(x)[-1])))
        shape = tuple(ops.shape(x)[:-1]) + heads
        outputs = []
        for i in range(3):
            h_t = ops.matmul(ops.transpose(a[i]), tokens_t)
            y = ops.transpose(ops.matmul(ops.transpose(b[i]), h_t))
            outputs.append(ops.reshape(y, shape))
        return tuple(outputs)

    forms = {"separate": separate, "fused_a": fused_a, "transposed": transposed}
    if compile_torch and keras.backend.backend() == "torch":
        import torch

        forms["compiled"] = torch.compile(separate)
    return forms


def _total(outputs, reduce_sum):
    """The sum of every element of one output or a tuple of outputs."""
    if not isinstance(outputs, tuple):
        outputs = (outputs,)
    total = reduce_sum(outputs[0])
    for output in outputs[1:]:
        total = total + reduce_sum(output)
    return total


def compiled_step(fn, *arrays):
    """A callable running forward + backward of `fn` once (gradients for
    every input), blocking."""
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        inputs = [torch.tensor(v, requires_grad=True) for v in arrays]

        def step():
            loss = _total(fn(*inputs), torch.sum)
            return torch.autograd.grad(loss, inputs)

        return step
    if backend == "tensorflow":
        import tensorflow as tf

        inputs = [tf.Variable(v) for v in arrays]

        @tf.function
        def graph_step():
            with tf.GradientTape() as tape:
                loss = _total(fn(*inputs), tf.reduce_sum)
            return tape.gradient(loss, inputs)

        return lambda: [g.numpy() for g in graph_step()]
    import jax

    grad = jax.jit(
        jax.grad(
            lambda *inputs: _total(fn(*inputs), jax.numpy.sum),
            argnums=tuple(range(len(arrays))),
        )
    )
    inputs = [jax.numpy.asarray(v) for v in arrays]
    return lambda: jax.block_until_ready(grad(*inputs))


def peft_layout(heads):
    """The branch with the factors stored as PEFT stores them (`nn.Linear`
    weights: A as `(r, d_in)`, B as `(d_out, r)`) and multiplied transposed,
    `(x @ A^T) @ B^T`: the other memory layout of the same products. Takes
    `(x, a_t, b_t)`."""
    from keras import ops

    def form(x, a_t, b_t):
        tokens = ops.reshape(x, (-1, ops.shape(x)[-1]))
        y = ops.matmul(
            ops.matmul(tokens, ops.transpose(a_t)), ops.transpose(b_t)
        )
        return ops.reshape(y, tuple(ops.shape(x)[:-1]) + heads)

    return form


def _time_forms(forms, arrays, rounds, calls, own_arrays=None):
    """Checks every form's gradients against the first's, then times
    forward + backward; returns `(ms per call, per-round times)`.

    `own_arrays`: optional `{form: (arrays, to_reference)}` for a form that
    takes other inputs; `to_reference(grads)` maps its gradients to the
    first form's inputs for the check."""
    import numpy as np

    own_arrays = own_arrays or {}
    steps = {
        name: compiled_step(fn, *own_arrays.get(name, (arrays,))[0])
        for name, fn in forms.items()
    }
    reference = None
    for name, step in steps.items():
        grads = [np.asarray(g) for g in step()]
        if name in own_arrays:
            grads = own_arrays[name][1](grads)
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
    forms = branches(rank, spec["heads"])
    forms["peft_layout"] = peft_layout(spec["heads"])
    ms, times = _time_forms(
        forms,
        (x, a, b),
        spec["rounds"],
        spec["calls"],
        own_arrays={
            "peft_layout": (
                (x, np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)),
                lambda g: [g[0], g[1].T, g[2].T],
            )
        },
    )
    factors = [
        rng.normal(size=shape).astype("float32")
        for shape in [(d_in, rank)] * 3 + [(rank, d_out)] * 3
    ]
    qkv_ms, qkv_times = _time_forms(
        qkv_branches(rank, spec["heads"], compile_torch=size != "smoke"),
        (x, *factors),
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
        "(used) | 2-D, PEFT's layout ms | 2-D / einsum | PEFT's layout / 2-D |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend in ("jax", "torch", "tensorflow"):
        if backend not in results:
            continue
        ms = results[backend]["ms_forward_backward"]
        lines.append(
            f"| {backend} | {ms['einsum']:.2f} | {ms['matmul_3d']:.2f} | "
            f"{ms['matmul_2d']:.2f} | {ms['peft_layout']:.2f} | "
            f"{results[backend]['vs_einsum']['matmul_2d']:.2f} | "
            f"{ms['peft_layout'] / ms['matmul_2d']:.2f} |"
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
