"""Training memory: peak memory of one training step and of a 20-step `fit`.

For full fine-tuning, Keras's built-in LoRA (`backbone.enable_lora(rank)`)
and keras_lora (rank 8, query + value), on the real all-MiniLM-L6-v2 weights
(batch 16 x 128) and the keras-hub `gemma_mid` config (batch 4 x 128), each
variant in a fresh process (`--child`): the resident set size (VmRSS) after
the imports and after building the compiled model, and its peak (VmHWM,
reset through /proc/self/clear_refs) during the first `train_on_batch`
(tracing, optimizer state), during one more step, and during a 20-step
`fit` on the same batch. glibc's `malloc` returns every freed block of
1 MiB or more to the system (`common.release_freed_memory`), so RSS follows
the memory in use. The CPU backends keep no allocator statistics; with
`--device gpu` the backend's own peak is recorded too. The measure is the
peak above the imports (weights, optimizer state, gradients, activations);
target: keras_lora's <= 0.40 of full fine-tuning's and below the built-in's.

    KERAS_BACKEND=jax python -m benchmarks.train_memory --quick
    python -m benchmarks.train_memory --table   # Markdown from the JSON
"""

import gc
import json

from benchmarks import common

SIZES = {
    "smoke": dict(models=[("gemma_smoke", 2, 8)], rank=4, fit_steps=2),
    "quick": dict(
        models=[("minilm", 16, 128), ("gemma_mid", 4, 128)],
        rank=8,
        fit_steps=20,
    ),
}
SIZES["full"] = SIZES["quick"]

VARIANTS = ("full", "builtin", "keras_lora")
TARGET_VS_FULL = 0.40


def _allocator_peak(device):
    """The backend allocator's peak bytes on a GPU, else None (the CPU
    backends keep none)."""
    if device != "gpu":
        return None
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")
    if backend == "torch":
        import torch

        return torch.cuda.max_memory_allocated()
    import tensorflow as tf

    return tf.config.experimental.get_memory_info("GPU:0")["peak"]


def measure(name, variant, batch_size, seq_len, rank, fit_steps, device):
    """Memory of training `variant` of `name` in this process (start it
    fresh: `--child`); bytes."""
    import keras_hub  # noqa: F401  (imports before the first reading)

    import keras_lora  # noqa: F401

    gc.collect()
    imports = common.rss_bytes()
    model, backbone, facts = common.build_variant(name, variant, rank)
    x, y = common.make_batch(name, backbone, batch_size, seq_len)
    common.materialize(model.weights)
    gc.collect()
    built = common.rss_bytes()
    resets = [common.reset_peak_rss()]
    model.train_on_batch(x, y)
    first_step_peak = common.peak_rss_bytes()
    gc.collect()
    before_step = common.rss_bytes()
    resets.append(common.reset_peak_rss())
    model.train_on_batch(x, y)
    step_peak = common.peak_rss_bytes()
    resets.append(common.reset_peak_rss())
    model.fit(x, y, batch_size=batch_size, epochs=fit_steps, verbose=0)
    fit_peak = common.peak_rss_bytes()
    return {
        **facts,
        "weights_bytes": common.variables_bytes(model.weights),
        "trainable_bytes": common.variables_bytes(model.trainable_weights),
        "rss_imports": imports,
        "rss_model": built,
        "first_step_peak": first_step_peak,
        "rss_before_step": before_step,
        "step_peak": step_peak,
        "fit_peak": fit_peak,
        "allocator_peak": _allocator_peak(device),
        "peak_reset_worked": all(resets),
    }


def _batch_shape(size, name):
    """`(batch_size, seq_len)` of model `name` at `size`."""
    return next((b, s) for n, b, s in SIZES[size]["models"] if n == name)


def _child(name, variant, size, device):
    batch_size, seq_len = _batch_shape(size, name)
    spec = SIZES[size]
    common.log(f"{name} / {variant}: training memory (own process)")
    row = common.run_child(
        "benchmarks.train_memory",
        ["--size", size, "--device", device, "--child", name, variant],
        f"memory measurement of {name} / {variant}",
    )
    row.update(batch_size=batch_size, seq_len=seq_len, rank=spec["rank"])
    return row


def run(size="quick", device="cpu", models=None):
    common.check_device(device)
    spec = SIZES[size]
    common.check_models(models, size, [m[0] for m in spec["models"]])
    rows = []
    for name, _, _ in spec["models"]:
        if models and name not in models:
            continue
        variants = {v: _child(name, v, size, device) for v in VARIANTS}
        for r in variants.values():
            for key in ("first_step_peak", "step_peak", "fit_peak"):
                r[f"{key}_above_imports"] = r[key] - r["rss_imports"]
        full, builtin = variants["full"], variants["builtin"]
        ours = variants["keras_lora"]
        ratios = {
            f"keras_lora_vs_{other}_{key}": ours[f"{key}_above_imports"]
            / variants[other][f"{key}_above_imports"]
            for other in ("full", "builtin")
            for key in ("first_step_peak", "step_peak", "fit_peak")
        }

        def peak(r):
            return max(r["step_peak"], r["fit_peak"]) - r["rss_imports"]

        rows.append(
            {
                "model": name,
                "variants": variants,
                **ratios,
                "meets_target": peak(ours) <= TARGET_VS_FULL * peak(full)
                and peak(ours) < peak(builtin),
            }
        )
    return {
        "benchmark": "train_memory",
        "size": size,
        "targets": common.TARGETS,
        "target_vs_full": TARGET_VS_FULL,
        "malloc_mmap_threshold_bytes": common.mmap_threshold(),
        "machine": common.machine_info(device),
        "results": rows,
    }


def _cells(row):
    mib = 2**20
    cells = []
    for variant in VARIANTS:
        r = row["variants"][variant]
        cells.append(
            f"{r['step_peak_above_imports'] / mib:.0f} / "
            f"{r['fit_peak_above_imports'] / mib:.0f}"
        )
    return cells


def print_result(result):
    machine = result["machine"]
    print(
        f"\nTraining memory, backend {machine['backend']} on "
        f"{machine['device']} (MiB above the imports: step / fit)"
    )
    header = ["model", *VARIANTS, "lora / full", "lora / built-in"]
    rows = [
        [
            row["model"],
            *_cells(row),
            f"{row['keras_lora_vs_full_fit_peak']:.2f}",
            f"{row['keras_lora_vs_builtin_fit_peak']:.2f}",
        ]
        for row in result["results"]
    ]
    common.print_table(header, rows)


def table(out_dir="benchmarks/results", device="cpu"):
    """The Markdown table of `train_memory_<backend>_<device>.json`."""
    lines = [
        "| backend | model | weights MiB | full: step / fit peak MiB "
        "| built-in: step / fit | keras_lora: step / fit "
        "| **keras_lora / full** (step / fit) "
        "| **keras_lora / built-in** (step / fit) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    results = common.results_by_backend(out_dir, "train_memory", device)
    for backend, result in results.items():
        for row in result["results"]:
            weights = row["variants"]["full"]["weights_bytes"] / 2**20
            cells = [
                backend,
                row["model"],
                f"{weights:.0f}",
                *_cells(row),
                f"**{row['keras_lora_vs_full_step_peak']:.2f} / "
                f"{row['keras_lora_vs_full_fit_peak']:.2f}**",
                f"**{row['keras_lora_vs_builtin_step_peak']:.2f} / "
                f"{row['keras_lora_vs_builtin_fit_peak']:.2f}**",
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
    parser.add_argument(
        "--models", nargs="+", help="only these models of the size"
    )
    parser.add_argument(
        "--child",
        nargs=2,
        metavar=("MODEL", "VARIANT"),
        help="(internal) measure one variant in this process, print JSON",
    )
    args = parser.parse_args(argv)
    if args.table:
        text = table(args.out, args.device)
        print(text, end="")
        return text
    if args.child:
        common.setup_device(args.device)
        spec = SIZES[args.size]
        name, variant = args.child
        batch_size, seq_len = _batch_shape(args.size, name)
        result = measure(
            name,
            variant,
            batch_size,
            seq_len,
            spec["rank"],
            spec["fit_steps"],
            args.device,
        )
        print(json.dumps(result))
        return result
    common.setup_device(args.device)
    result = run(args.size, args.device, args.models)
    print_result(result)
    common.write_json(result, args.out, "train_memory")
    return result


if __name__ == "__main__":
    # RSS then follows the memory in use (freed temporaries leave it).
    common.release_freed_memory()
    main()
