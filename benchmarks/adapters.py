"""Serving several adapters: switching the active one, and mixed batches.

Each model (a keras-hub backbone in its task model, adapters on query and
value) gets 4 named adapters with non-zero B. Two measurements, each in
interleaved rounds (median of the per-round ratios):

- switch: `keras_lora.multi.set_active_adapter` to the next adapter, then
  `predict_on_batch`, against `predict_on_batch` alone. Switching assigns
  variable values and never recompiles (the compiled predict function is
  checked to be the same object after every switch). Goal: <= 1.05.
- mixed: one compiled call (`jax.jit`, `tf.function(jit_compile=True)`; on
  PyTorch eager, as `torch.compile` of a whole LM takes minutes on CPU) of
  a batch spread evenly over the 4 adapters (`mixed_batch_call`), against
  the same compiled call of the model with one adapter (goal: <= 1.25) and
  against one compiled call of each adapter's merged model on its share of
  the batch (the 4 calls together). The mixed outputs are checked against
  the merged models'.

    KERAS_BACKEND=jax python -m benchmarks.adapters --quick
    python -m benchmarks.adapters --table   # Markdown from the JSON results
"""

import itertools

import numpy as np

from benchmarks import common

SIZES = {
    "smoke": dict(models=[("bert_smoke", 4, 8)], rank=4, warmup=1, steps=3),
    "quick": dict(
        models=[("minilm", 16, 64), ("gemma_tiny", 16, 64)],
        rank=8,
        warmup=2,
        steps=9,
    ),
    "full": dict(
        models=[("minilm", 16, 128), ("gemma_tiny", 16, 128)],
        rank=8,
        warmup=3,
        steps=15,
    ),
}

ADAPTERS = 4
TARGET_SWITCH = 1.05
TARGET_MIXED = 1.25


def compiled(fn):
    """`fn` compiled as a server would: `jax.jit`, `tf.function` with XLA;
    eager on PyTorch. Returns `(callable, how)`."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(fn), "jax.jit"
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True), "tf.function(jit_compile)"
    return fn, "eager"


def _to_numpy(x):
    import keras

    return np.asarray(keras.ops.convert_to_numpy(x))


def _with_adapters(name, rank):
    """The task model with `ADAPTERS` named adapters (random, non-zero)."""
    import keras_lora
    from keras_lora import multi

    backbone = keras_lora.apply_lora(
        common.build_backbone(name), rank=rank, targets=common.TARGETS
    )
    common.randomize_adapters(backbone)
    model = common.task_model(name, backbone)
    # The current adapter becomes "default" when the first one is added.
    tensors, _ = keras_lora.adapters.adapter_state(model)
    rng = np.random.default_rng(2)
    for k in range(1, ADAPTERS):
        multi.add_adapter(
            model,
            f"adapter_{k}",
            {
                key: rng.normal(
                    0, 0.01 if key.endswith("_b") else 0.3, v.shape
                ).astype("float32")
                for key, v in tensors.items()
            },
        )
    return model, backbone


def bench_switch(model, x, warmup, steps):
    from keras_lora import multi

    names = multi.list_adapters(model)
    cycle = itertools.cycle(names)
    model.predict_on_batch(x)
    predict_function = model.predict_function

    def switch_predict():
        multi.set_active_adapter(model, next(cycle))
        return model.predict_on_batch(x)

    times = common.interleaved_times(
        {
            "predict": lambda: model.predict_on_batch(x),
            "switch_predict": switch_predict,
        },
        warmup,
        steps,
    )
    multi.set_active_adapter(model, names[0])
    return {
        "recompiled": model.predict_function is not predict_function,
        "variants": {
            v: {**common.time_stats(t), "times_s": t} for v, t in times.items()
        },
        "ratios": {
            "switch_predict/predict": common.ratio_stats(
                times["switch_predict"], times["predict"]
            )
        },
    }


def bench_mixed(model, x, warmup, steps):
    import keras_lora
    from keras_lora import multi

    names = multi.list_adapters(model)
    batch = len(next(iter(x.values())))
    share = batch // len(names)
    adapter_ids = np.repeat(np.arange(len(names)), share).astype("int32")
    single, how = compiled(lambda inputs: model(inputs))
    mixed, _ = compiled(
        lambda inputs, ids: multi.mixed_batch_call(model, inputs, ids)
    )
    merged_calls = []
    for k, name in enumerate(names):
        multi.set_active_adapter(model, name)
        merged = keras_lora.merge(model)
        part = {key: v[k * share : (k + 1) * share] for key, v in x.items()}
        fn, _ = compiled(lambda inputs, m=merged: m(inputs))
        merged_calls.append((fn, part))
    multi.set_active_adapter(model, names[0])
    mixed_out = _to_numpy(mixed(x, adapter_ids))
    merged_out = np.concatenate(
        [_to_numpy(fn(part)) for fn, part in merged_calls]
    )

    def merged_each():
        return [_to_numpy(fn(part)) for fn, part in merged_calls]

    times = common.interleaved_times(
        {
            "one_adapter": lambda: _to_numpy(single(x)),
            "mixed": lambda: _to_numpy(mixed(x, adapter_ids)),
            "merged_each": merged_each,
        },
        warmup,
        steps,
    )
    return {
        "compiled": how,
        "adapters": len(names),
        "examples_per_adapter": share,
        "mixed_vs_merged_max_abs_diff": float(
            np.max(np.abs(mixed_out - merged_out))
        ),
        "output_max_abs": float(np.max(np.abs(merged_out))),
        "variants": {
            v: {**common.time_stats(t), "times_s": t} for v, t in times.items()
        },
        "ratios": {
            f"mixed/{v}": common.ratio_stats(times["mixed"], times[v])
            for v in ("one_adapter", "merged_each")
        },
    }


def bench_model(name, batch_size, seq_len, rank, warmup, steps):
    common.log(f"{name}: building with {ADAPTERS} adapters")
    model, backbone = _with_adapters(name, rank)
    x, _ = common.make_batch(name, backbone, batch_size, seq_len)
    return {
        "model": name,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "rank": rank,
        "warmup": warmup,
        "steps": steps,
        "switch": bench_switch(model, x, warmup, steps),
        "mixed": bench_mixed(model, x, warmup, steps),
    }


def run(size="full", device="cpu", models=None):
    common.check_device(device)
    spec = SIZES[size]
    common.check_models(models, size, [m[0] for m in spec["models"]])
    rows = [
        bench_model(name, b, s, spec["rank"], spec["warmup"], spec["steps"])
        for name, b, s in spec["models"]
        if not models or name in models
    ]
    return {
        "benchmark": "adapters",
        "size": size,
        "machine": common.machine_info(device),
        "targets": {
            "switch_predict/predict": TARGET_SWITCH,
            "mixed/one_adapter": TARGET_MIXED,
        },
        "results": rows,
    }


def print_result(result):
    machine = result["machine"]
    print(
        f"\nServing {ADAPTERS} adapters, backend {machine['backend']} on "
        f"{machine['device']}"
    )
    header = [
        "model",
        "batch x seq",
        "predict s",
        "switch+predict / predict",
        "recompiled",
        "mixed / one adapter",
        "mixed / merged each",
        "max|mixed-merged|",
    ]
    rows = []
    for row in result["results"]:
        switch, mixed = row["switch"], row["mixed"]
        rows.append(
            [
                row["model"],
                f"{row['batch_size']}x{row['seq_len']}",
                f"{switch['variants']['predict']['median_s']:.4f}",
                f"{switch['ratios']['switch_predict/predict']['median']:.3f}",
                str(switch["recompiled"]),
                f"{mixed['ratios']['mixed/one_adapter']['median']:.3f}",
                f"{mixed['ratios']['mixed/merged_each']['median']:.3f}",
                f"{mixed['mixed_vs_merged_max_abs_diff']:.2e}",
            ]
        )
    common.print_table(header, rows)


def table(out_dir="benchmarks/results", device="cpu"):
    """The Markdown table of `adapters_<backend>_<device>.json` in
    `out_dir`: one row per backend and model."""
    lines = [
        "| backend | model | batch x seq | switch + predict / predict "
        "| recompiled | mixed / one adapter | mixed / merged each "
        "| compiled as |",
        "|---|---|---|---|---|---|---|---|",
    ]
    results = common.results_by_backend(out_dir, "adapters", device)
    for backend, result in results.items():
        for row in result["results"]:
            switch, mixed = row["switch"], row["mixed"]
            cells = [
                backend,
                row["model"],
                f"{row['batch_size']} x {row['seq_len']}",
                f"{switch['ratios']['switch_predict/predict']['median']:.2f}",
                "yes" if switch["recompiled"] else "no",
                f"{mixed['ratios']['mixed/one_adapter']['median']:.2f}",
                f"{mixed['ratios']['mixed/merged_each']['median']:.2f}",
                mixed["compiled"],
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="*", help="subset of the size's models"
    )
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
    result = run(args.size, args.device, args.models)
    print_result(result)
    print(f"wrote {common.write_json(result, args.out, 'adapters')}")
    return result


if __name__ == "__main__":
    main()
