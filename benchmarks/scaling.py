"""Scaling: train-step time and memory as the rank and the sequence length grow.

Rank sweep: one base model, one keras_lora clone per rank (the clones share
the frozen base weights), step times interleaved across ranks. The adapter of
a (d x k) weight has r * (d + k) numbers, so the extra cost over the frozen
forward and backward pass grows with r * (d + k), never with d * k: the step
time should stay nearly flat from r = 1 to 64.

Sequence sweep: keras_lora (rank 8) and full fine-tuning of the same model,
interleaved, at each sequence length; the ratio keras_lora / full should
stay below about 2/3 as attention's share grows.

Memory per configuration: trainable numbers, the training state they need
(weights, gradients and two Adam moments, float32) and the growth of the
resident set during one extra step (VmHWM after a reset, minus VmRSS before).

    KERAS_BACKEND=jax python -m benchmarks.scaling --quick
"""

from benchmarks import common

SIZES = {
    "smoke": dict(
        rank_model=("gemma_smoke", 2, 8),
        ranks=[1, 4],
        seq_model=("gemma_smoke", 2),
        seq_lens=[8],
        seq_rank=2,
        warmup=1,
        steps=2,
    ),
    "quick": dict(
        rank_model=("gemma_mid", 2, 128),
        ranks=[1, 8, 64],
        seq_model=("gemma_tiny", 2),
        seq_lens=[128, 512, 1024],
        seq_rank=8,
        warmup=1,
        steps=5,
    ),
    "full": dict(
        rank_model=("gemma_mid", 2, 128),
        ranks=[1, 2, 4, 8, 16, 32, 64],
        seq_model=("gemma_tiny", 2),
        seq_lens=[128, 256, 512, 1024],
        seq_rank=8,
        warmup=2,
        steps=7,
    ),
}


def step_peak_growth(model, x, y):
    """Peak RSS growth (bytes) during one `train_on_batch`, or None when
    the peak cannot be reset on this system."""
    if not common.reset_peak_rss():
        return None
    before = common.rss_bytes()
    model.train_on_batch(x, y)
    return common.peak_rss_bytes() - before


def training_state_bytes(model):
    """float32 weights + gradients + 2 Adam moments of the trainable numbers."""
    return 4 * 4 * common.count_params(model.trainable_weights)


def rank_sweep(name, batch_size, seq_len, ranks, warmup, steps):
    import keras_lora

    base = common.build_backbone(name)
    models = {}
    for rank in ranks:
        clone = keras_lora.apply_lora(base, rank=rank, targets=common.TARGETS)
        models[rank] = common.task_model(name, clone)
    x, y = common.make_batch(name, base, batch_size, seq_len)
    times = common.interleaved_times(
        {r: (lambda m=m: m.train_on_batch(x, y)) for r, m in models.items()},
        warmup,
        steps,
    )
    rows = []
    first = ranks[0]
    for rank, model in models.items():
        report = keras_lora.lora_report(model)
        rows.append(
            {
                "rank": rank,
                "adapter_params": report["adapter_params"],
                **common.time_stats(times[rank]),
                "vs_first_rank": common.ratio_stats(times[rank], times[first])[
                    "median"
                ],
                "training_state_bytes": training_state_bytes(model),
                "step_peak_growth_bytes": step_peak_growth(model, x, y),
            }
        )
    return {
        "model": name,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "frozen_params": common.count_params(base.weights),
        "rows": rows,
    }


def seq_sweep(name, batch_size, seq_lens, rank, warmup, steps):
    lora, backbone, _ = common.build_variant(name, "keras_lora", rank)
    full, _, _ = common.build_variant(name, "full", rank)
    rows = []
    for seq_len in seq_lens:
        x, y = common.make_batch(name, backbone, batch_size, seq_len)
        times = common.interleaved_times(
            {
                "keras_lora": lambda x=x, y=y: lora.train_on_batch(x, y),
                "full": lambda x=x, y=y: full.train_on_batch(x, y),
            },
            warmup,
            steps,
        )
        rows.append(
            {
                "seq_len": seq_len,
                "keras_lora": common.time_stats(times["keras_lora"]),
                "full": common.time_stats(times["full"]),
                "keras_lora/full": common.ratio_stats(
                    times["keras_lora"], times["full"]
                ),
                "keras_lora_step_peak_growth_bytes": step_peak_growth(
                    lora, x, y
                ),
                "full_step_peak_growth_bytes": step_peak_growth(full, x, y),
            }
        )
    return {"model": name, "batch_size": batch_size, "rank": rank, "rows": rows}


def run(size="full", device="cpu"):
    common.check_device(device)
    spec = SIZES[size]
    name, batch_size, seq_len = spec["rank_model"]
    by_rank = rank_sweep(
        name, batch_size, seq_len, spec["ranks"], spec["warmup"], spec["steps"]
    )
    name, batch_size = spec["seq_model"]
    by_seq = seq_sweep(
        name,
        batch_size,
        spec["seq_lens"],
        spec["seq_rank"],
        spec["warmup"],
        spec["steps"],
    )
    return {
        "benchmark": "scaling",
        "size": size,
        "machine": common.machine_info(device),
        "rank_sweep": by_rank,
        "seq_sweep": by_seq,
    }


def _mib(value):
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def print_result(result):
    machine = result["machine"]
    sweep = result["rank_sweep"]
    print(
        f"\nScaling with rank, backend {machine['backend']}: {sweep['model']} "
        f"{sweep['batch_size']}x{sweep['seq_len']}"
    )
    common.print_table(
        [
            "rank",
            "adapter params",
            "step s",
            "vs r=first",
            "state MiB",
            "step +MiB",
        ],
        [
            [
                row["rank"],
                f"{row['adapter_params']:,}",
                f"{row['median_s']:.4f}",
                f"{row['vs_first_rank']:.3f}",
                _mib(row["training_state_bytes"]),
                _mib(row["step_peak_growth_bytes"]),
            ]
            for row in sweep["rows"]
        ],
    )
    sweep = result["seq_sweep"]
    print(
        f"\nScaling with sequence length: {sweep['model']}, batch "
        f"{sweep['batch_size']}, rank {sweep['rank']}"
    )
    common.print_table(
        ["seq", "lora s", "full s", "lora/full", "lora +MiB", "full +MiB"],
        [
            [
                row["seq_len"],
                f"{row['keras_lora']['median_s']:.4f}",
                f"{row['full']['median_s']:.4f}",
                f"{row['keras_lora/full']['median']:.3f}",
                _mib(row["keras_lora_step_peak_growth_bytes"]),
                _mib(row["full_step_peak_growth_bytes"]),
            ]
            for row in sweep["rows"]
        ],
    )


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    common.setup_device(args.device)
    result = run(args.size, args.device)
    print_result(result)
    print(f"wrote {common.write_json(result, args.out, 'scaling')}")
    return result


if __name__ == "__main__":
    main()
