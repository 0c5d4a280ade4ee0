"""Every LoRA layer against its plain Keras layer: one training step each.

For each layer kind (Dense, EinsumDense, Conv1D, Conv2D, Conv3D,
Conv2DTranspose, DepthwiseConv2D, SeparableConv2D, Embedding)
a one-layer model is trained with `train_on_batch` (SGD, MSE), compiled as
Keras compiles it on the backend, in two variants built from the same
weights: `plain` (the Keras layer, every weight trained: full fine-tuning),
`lora` (keras_lora's layer, rank 8, only A and B trained) and `dora` (the
same with `use_dora=True`: A, B and the magnitude trained). Interleaved
rounds, median of the per-round ratios.

    KERAS_BACKEND=jax python -m benchmarks.layers --quick
    python -m benchmarks.layers --table   # Markdown from the JSON results
"""

import statistics

from benchmarks import common

SIZES = {
    "smoke": dict(scale=1, rank=2, rounds=2, warmup=1),
    "quick": dict(scale=8, rank=8, rounds=15, warmup=3),
    "full": dict(scale=8, rank=8, rounds=40, warmup=3),
}


def layer_cases(scale):
    """`{kind: (plain layer factory, LoRA class, input shape, int input)}`;
    `scale` multiplies the channel sizes."""
    import keras

    import keras_lora as kl

    c = 8 * scale
    return {
        "Dense": (
            lambda: keras.layers.Dense(4 * c),
            kl.LoRADense,
            (16, 32, 4 * c),
            False,
        ),
        "EinsumDense": (
            lambda: keras.layers.EinsumDense("btd,dnh->btnh", (None, 4, c)),
            kl.LoRAEinsumDense,
            (16, 32, 4 * c),
            False,
        ),
        "Conv1D": (
            lambda: keras.layers.Conv1D(c, 3, padding="causal"),
            kl.LoRAConv1D,
            (16, 64, c),
            False,
        ),
        "Conv2D": (
            lambda: keras.layers.Conv2D(c, 3, padding="same"),
            kl.LoRAConv2D,
            (8, 16, 16, c),
            False,
        ),
        "Conv3D": (
            lambda: keras.layers.Conv3D(c, 3, padding="same"),
            kl.LoRAConv3D,
            (2, 8, 8, 8, c),
            False,
        ),
        "Conv2DTranspose": (
            lambda: keras.layers.Conv2DTranspose(
                c, 3, strides=2, padding="same"
            ),
            kl.LoRAConv2DTranspose,
            (8, 8, 8, c),
            False,
        ),
        "DepthwiseConv2D": (
            lambda: keras.layers.DepthwiseConv2D(3, padding="same"),
            kl.LoRADepthwiseConv2D,
            (8, 16, 16, c),
            False,
        ),
        "SeparableConv2D": (
            lambda: keras.layers.SeparableConv2D(c, 3, padding="same"),
            kl.LoRASeparableConv2D,
            (8, 16, 16, c),
            False,
        ),
        "Embedding": (
            lambda: keras.layers.Embedding(256 * scale, 4 * c),
            kl.LoRAEmbedding,
            (16, 32),
            True,
        ),
    }


def _train_step(layer, x, y):
    import keras

    model = keras.Sequential([keras.Input(x.shape[1:], dtype=x.dtype), layer])
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    return lambda: model.train_on_batch(x, y)


def run(size="quick", device="cpu"):
    import numpy as np
    from keras import ops

    common.check_device(device)
    spec = SIZES[size]
    rng = np.random.default_rng(0)
    rows = {}
    for kind, (plain_factory, lora_class, shape, ints) in layer_cases(
        spec["scale"]
    ).items():
        common.log(f"{kind}: building")
        if ints:
            x = rng.integers(0, 256 * spec["scale"], size=shape).astype("int32")
        else:
            x = rng.normal(size=shape).astype("float32")
        plain = plain_factory()
        y = np.zeros(ops.convert_to_numpy(plain(x)).shape, "float32")
        twins = []
        for _ in range(2):
            twin = plain_factory()
            twin.build(x.shape)
            twin.set_weights(plain.get_weights())
            twins.append(twin)
        lora = lora_class.from_layer(twins[0], rank=spec["rank"])
        dora = lora_class.from_layer(twins[1], rank=spec["rank"], use_dora=True)
        steps = {
            "plain": _train_step(plain, x, y),
            "lora": _train_step(lora, x, y),
            "dora": _train_step(dora, x, y),
        }
        times = common.interleaved_times(steps, spec["warmup"], spec["rounds"])
        kernels = [list(w.shape) for w in plain.weights if w.name != "bias"]
        rows[kind] = {
            "input_shape": list(shape),
            # Every adapted kernel (a separable conv's depthwise, then
            # pointwise one); `kernel_shape` is the first.
            "kernel_shape": kernels[0],
            "kernel_shapes": kernels,
            "trainable_params": {
                "plain": common.count_params(plain.trainable_weights),
                "lora": common.count_params(lora.trainable_weights),
                "dora": common.count_params(dora.trainable_weights),
            },
            "ms": {n: statistics.median(t) * 1e3 for n, t in times.items()},
            "lora/plain": common.ratio_stats(times["lora"], times["plain"]),
            "dora/plain": common.ratio_stats(times["dora"], times["plain"]),
            "dora/lora": common.ratio_stats(times["dora"], times["lora"]),
            "times_s": times,
        }
    return {
        "benchmark": "layers",
        "size": size,
        "machine": common.machine_info(device),
        "rank": spec["rank"],
        "results": rows,
    }


def table(out_dir="benchmarks/results", device="cpu"):
    """The Markdown table of `layers_<backend>_<device>.json` in `out_dir`:
    one row per layer kind, the LoRA / plain step ratio per backend."""
    results = common.results_by_backend(out_dir, "layers", device)
    first = next(iter(results.values()))
    header = ["layer", "kernel", "input", "trainable LoRA / plain"] + [
        f"{b} lora / plain (plain ms)" for b in results
    ]
    dora = all(
        "dora/plain" in r
        for res in results.values()
        for r in res["results"].values()
    )
    if dora:
        header += [f"{b} dora / plain" for b in results]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kind, row in first["results"].items():
        params = row["trainable_params"]
        cells = [
            kind,
            " + ".join(
                " x ".join(str(d) for d in shape)
                for shape in row.get("kernel_shapes", [row["kernel_shape"]])
            ),
            " x ".join(str(d) for d in row["input_shape"]),
            f"{params['lora']:,} / {params['plain']:,}",
        ]
        for result in results.values():
            r = result["results"][kind]
            cells.append(
                f"{r['lora/plain']['median']:.2f} ({r['ms']['plain']:.2f})"
            )
        if dora:
            cells += [
                f"{result['results'][kind]['dora/plain']['median']:.2f}"
                for result in results.values()
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--table",
        action="store_true",
        help="print the Markdown table of the JSON results in --out and exit",
    )
    args = parser.parse_args(argv)
    if args.table:
        text = table(args.out, args.device)
        print(text, end="")
        return text
    common.setup_device(args.device)
    result = run(args.size, args.device)
    print(
        f"\nOne train step, LoRA rank {result['rank']} vs the plain layer "
        f"(full fine-tuning), backend {result['machine']['backend']}"
    )
    common.print_table(
        ["layer", "kernel", "plain ms", "lora ms", "lora/plain", "dora/plain"],
        [
            [
                kind,
                "x".join(str(d) for d in row["kernel_shape"]),
                f"{row['ms']['plain']:.3f}",
                f"{row['ms']['lora']:.3f}",
                f"{row['lora/plain']['median']:.2f}",
                f"{row['dora/plain']['median']:.2f}",
            ]
            for kind, row in result["results"].items()
        ],
    )
    path = common.write_json(result, args.out, "layers")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
