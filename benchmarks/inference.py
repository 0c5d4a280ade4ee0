"""Inference latency: merged and unmerged keras_lora models vs the base model.

For each model: the plain base model, the keras_lora model (adapters on
query and value with non-zero B, not merged), `keras_lora.merge` of it (a
plain model of the same class) and, for reference, Keras's built-in LoRA
(not merged). `predict_on_batch` on one fixed batch, interleaved round by
round. Targets: merged / base = 1.00 within noise (no added latency, as the
LoRA paper promises), unmerged / base <= 1.05.

    KERAS_BACKEND=torch python -m benchmarks.inference --quick
"""

import numpy as np

from benchmarks import common

SIZES = {
    "smoke": dict(models=[("bert_smoke", 2, 8)], rank=4, warmup=1, steps=3),
    "quick": dict(
        models=[
            ("minilm", 16, 128),
            ("gemma_tiny", 8, 128),
            ("gemma_mid", 4, 128),
        ],
        rank=8,
        warmup=2,
        steps=9,
    ),
    "full": dict(
        models=[
            ("minilm", 16, 128),
            ("gemma_tiny", 8, 128),
            ("gemma_mid", 8, 128),
        ],
        rank=8,
        warmup=3,
        steps=15,
    ),
}

TARGET_MERGED = 1.0
TARGET_UNMERGED = 1.05


def bench_model(name, batch_size, seq_len, rank, warmup, steps):
    import keras_lora

    base_backbone = common.build_backbone(name)
    lora_backbone = keras_lora.apply_lora(
        base_backbone, rank=rank, targets=common.TARGETS
    )
    common.randomize_adapters(lora_backbone)
    merged_backbone = keras_lora.merge(lora_backbone)
    builtin_backbone = common.adapt(
        common.build_backbone(name), "builtin", rank
    )
    models = {
        "base": common.task_model(name, base_backbone),
        "keras_lora": common.task_model(name, lora_backbone),
        "merged": common.task_model(name, merged_backbone),
        "builtin": common.task_model(name, builtin_backbone),
    }
    x, _ = common.make_batch(name, base_backbone, batch_size, seq_len)
    unmerged_out = np.asarray(models["keras_lora"].predict_on_batch(x))
    merged_out = np.asarray(models["merged"].predict_on_batch(x))
    functions = {
        variant: (lambda m=model: m.predict_on_batch(x))
        for variant, model in models.items()
    }
    times = common.interleaved_times(functions, warmup, steps)
    return {
        "model": name,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "rank": rank,
        "warmup": warmup,
        "steps": steps,
        "merged_vs_unmerged_max_abs_diff": float(
            np.max(np.abs(unmerged_out - merged_out))
        ),
        "unmerged_max_abs": float(np.max(np.abs(unmerged_out))),
        "variants": {
            v: {**common.time_stats(t), "times_s": t} for v, t in times.items()
        },
        "ratios": {
            f"{v}/base": common.ratio_stats(times[v], times["base"])
            for v in ("merged", "keras_lora", "builtin")
        },
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
        "benchmark": "inference",
        "size": size,
        "machine": common.machine_info(device),
        "results": rows,
    }


def print_result(result):
    machine = result["machine"]
    print(f"\nInference, backend {machine['backend']} on {machine['device']}")
    header = [
        "model",
        "batch x seq",
        "base s",
        "merged/base",
        "unmerged/base",
        "builtin/base",
        "max|merged-unmerged|",
    ]
    rows = []
    for row in result["results"]:
        r = row["ratios"]
        rows.append(
            [
                row["model"],
                f"{row['batch_size']}x{row['seq_len']}",
                f"{row['variants']['base']['median_s']:.4f}",
                f"{r['merged/base']['median']:.3f}",
                f"{r['keras_lora/base']['median']:.3f}",
                f"{r['builtin/base']['median']:.3f}",
                f"{row['merged_vs_unmerged_max_abs_diff']:.2e}",
            ]
        )
    common.print_table(header, rows)


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="*", help="subset of the size's models"
    )
    args = parser.parse_args(argv)
    common.setup_device(args.device)
    result = run(args.size, args.device, args.models)
    print_result(result)
    print(f"wrote {common.write_json(result, args.out, 'inference')}")
    return result


if __name__ == "__main__":
    main()
