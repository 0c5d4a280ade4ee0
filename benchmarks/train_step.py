"""Train-step time: keras_lora vs Keras's built-in LoRA vs full fine-tuning.

For each model, three fresh copies of the same weights are built: one adapted
by `keras_lora.apply_lora` (query and value, rank r), one by keras-hub's
`backbone.enable_lora(r)` (the same layers), one fully trainable. All three
are compiled with Adam and the same loss, and `train_on_batch` runs on the
same fixed batch, interleaved step by step (the order rotating each round).
Reported: the median step time of each variant and the paired per-round
ratios keras_lora / full and keras_lora / built-in (targets: <= 0.65 and
<= 0.95).

Usage (one backend per process; `benchmarks.run_all` loops the backends):

    KERAS_BACKEND=jax python -m benchmarks.train_step --quick
"""

from benchmarks import common

#: Per size: the models as (name, batch, sequence length, target set), rank,
#: warm-up steps and timed rounds. Target sets (`common.TARGET_SETS`): `qv`
#: = attention query + value (keras-hub's default), `all_linear` = every
#: projection of the blocks.
SIZES = {
    "smoke": dict(
        models=[
            ("gemma_smoke", 2, 8, "qv"),
            ("bert_smoke", 2, 8, "all_linear"),
        ],
        rank=4,
        warmup=1,
        steps=2,
    ),
    "quick": dict(
        models=[
            ("minilm", 16, 128, "qv"),
            ("minilm", 16, 128, "all_linear"),
            ("gemma_tiny", 8, 128, "qv"),
            ("gemma_mid", 4, 128, "qv"),
            ("gemma_mid", 4, 128, "all_linear"),
        ],
        rank=8,
        warmup=1,
        steps=5,
    ),
    "full": dict(
        models=[
            ("minilm", 16, 128, "qv"),
            ("minilm", 16, 128, "all_linear"),
            ("gemma_tiny", 8, 128, "qv"),
            ("gemma_mid", 8, 128, "qv"),
            ("gemma_mid", 8, 128, "all_linear"),
        ],
        rank=8,
        warmup=2,
        steps=9,
    ),
}

TARGET_VS_FULL = 0.65
TARGET_VS_BUILTIN = 0.95


def bench_model(
    name,
    batch_size,
    seq_len,
    rank,
    warmup,
    steps,
    targets="qv",
    jit_compile="auto",
):
    """Times the variants of one model; returns its result dict."""
    models, facts = {}, {}
    backbone = None
    for variant in common.VARIANTS:
        models[variant], backbone, facts[variant] = common.build_variant(
            name, variant, rank, targets=targets, jit_compile=jit_compile
        )
    x, y = common.make_batch(name, backbone, batch_size, seq_len)
    functions = {
        variant: (lambda m=model: m.train_on_batch(x, y))
        for variant, model in models.items()
    }
    # The forward pass alone (inference), for the cost model F : step.
    functions["forward"] = lambda: models["full"].predict_on_batch(x)
    times = common.interleaved_times(functions, warmup, steps)
    return {
        "model": name,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "rank": rank,
        "targets": targets,
        "target_layers": common.target_names(name, targets),
        "warmup": warmup,
        "steps": steps,
        "jit_compile": {v: m.jit_compile for v, m in models.items()},
        "variants": {
            v: {**facts[v], **common.time_stats(times[v]), "times_s": times[v]}
            for v in models
        },
        "forward": {
            **common.time_stats(times["forward"]),
            "times_s": times["forward"],
        },
        "ratios": {
            "keras_lora/full": common.ratio_stats(
                times["keras_lora"], times["full"]
            ),
            "keras_lora/builtin": common.ratio_stats(
                times["keras_lora"], times["builtin"]
            ),
            "builtin/full": common.ratio_stats(times["builtin"], times["full"]),
            "floor/full": common.ratio_stats(times["floor"], times["full"]),
            "forward/full": common.ratio_stats(times["forward"], times["full"]),
            "keras_lora/floor": common.ratio_stats(
                times["keras_lora"], times["floor"]
            ),
        },
    }


def run(size="full", device="cpu", models=None, jit_compile="auto"):
    """Runs the benchmark in this process; returns the result dict."""
    common.check_device(device)
    spec = SIZES[size]
    common.check_models(models, size, [m[0] for m in spec["models"]])
    rows = []
    for name, batch_size, seq_len, targets in spec["models"]:
        if models and name not in models:
            continue
        rows.append(
            bench_model(
                name,
                batch_size,
                seq_len,
                spec["rank"],
                spec["warmup"],
                spec["steps"],
                targets,
                jit_compile,
            )
        )
    for row in rows:
        ratios = row["ratios"]
        row["meets_targets"] = {
            "keras_lora/full<=0.65": ratios["keras_lora/full"]["median"]
            <= TARGET_VS_FULL,
            "keras_lora/builtin<=0.95": ratios["keras_lora/builtin"]["median"]
            <= TARGET_VS_BUILTIN,
        }
    return {
        "benchmark": "train_step",
        "size": size,
        "jit_compile_option": jit_compile,
        "machine": common.machine_info(device),
        "results": rows,
    }


def print_result(result):
    machine = result["machine"]
    print(
        f"\nTrain step, backend {machine['backend']} on {machine['device']} "
        f"({machine['cpu_model']}, {machine['usable_cpus']} cpus)"
    )
    header = [
        "model",
        "targets",
        "batch x seq",
        "r",
        "full s",
        "builtin s",
        "keras_lora s",
        "lora/full",
        "lora/builtin",
        "builtin/full",
        "floor/full",
        "fwd/full",
    ]
    rows = []
    for row in result["results"]:
        v, r = row["variants"], row["ratios"]
        rows.append(
            [
                row["model"],
                row["targets"],
                f"{row['batch_size']}x{row['seq_len']}",
                row["rank"],
                f"{v['full']['median_s']:.4f}",
                f"{v['builtin']['median_s']:.4f}",
                f"{v['keras_lora']['median_s']:.4f}",
                f"{r['keras_lora/full']['median']:.3f}",
                f"{r['keras_lora/builtin']['median']:.3f}",
                f"{r['builtin/full']['median']:.3f}",
                f"{r['floor/full']['median']:.3f}",
                f"{r['forward/full']['median']:.3f}",
            ]
        )
    common.print_table(header, rows)


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="*", help="subset of the size's models"
    )
    # Anything but auto writes train_step_jit-<value>_<backend>_<device>.json.
    common.add_jit_compile_argument(parser)
    args = parser.parse_args(argv)
    common.setup_device(args.device)
    result = run(
        args.size,
        args.device,
        args.models,
        common.jit_compile_value(args.jit_compile),
    )
    print_result(result)
    script = "train_step"
    if args.jit_compile != "auto":
        script += f"_jit-{args.jit_compile}"
    path = common.write_json(result, args.out, script)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
