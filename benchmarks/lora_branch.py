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

The step is compiled the way Keras compiles a train step on the backend
(`jax.jit`, `tf.function`, eager PyTorch). Interleaved rounds, median.

    KERAS_BACKEND=tensorflow python -m benchmarks.lora_branch
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
    steps = {name: compiled_step(fn, x, a, b) for name, fn in forms.items()}
    reference = None
    for step in steps.values():
        grads = [np.asarray(g) for g in step()]
        if reference is None:
            reference = grads
        for g, r in zip(grads, reference, strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-2)
    calls = spec["calls"]

    def timed(step):
        def batch():
            for _ in range(calls):
                step()

        return batch

    times = common.interleaved_times(
        {n: timed(s) for n, s in steps.items()}, 1, spec["rounds"]
    )
    ms = {n: statistics.median(t) / calls * 1e3 for n, t in times.items()}
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
    }


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
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
    path = common.write_json(result, args.out, "lora_branch")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
