"""Memory and time of `apply_lora` and `merge` on Gemma models of 234 M and
1 B parameters, parameter counts, and adapter file size vs full model file
size.

Runs in its own process (one per backend, as `benchmarks.run_all` starts
it). The resident set size (VmRSS, from /proc/self/status) is read after the
imports, after building a random-init keras-hub `GemmaBackbone` of about 234 M
parameters, and around `keras_lora.apply_lora(backbone, rank, targets=["query",
"value"])`, whose peak is read from VmHWM after resetting it through
/proc/self/clear_refs (run as a script, glibc's malloc returns every freed
block of 1 MiB or more to the system, so RSS follows the memory in use).
Target: the peak growth during `apply_lora` is the
adapters plus less than 5 % of the model's weights (the clone shares the base
variables; nothing is copied), in less than 0.2 of the time it took to build
the model (apply_lora's time: the median of that call and four more on the
same backbone). Then `keras_lora.merge` of the adapted model, peak the same way:
target at most the adapted layers' kernels once (the merged model's new
kernels; every other variable is shared). The 1 B model (`--size full`) is
built from its config, random init, no weights file.

    KERAS_BACKEND=jax python -m benchmarks.memory
"""

import gc
import os
import statistics
import tempfile
import time

from benchmarks import common

SIZES = {
    "smoke": dict(model=("gemma_smoke",), rank=4),
    "quick": dict(model=("gemma_234m",), rank=8),
    "full": dict(model=("gemma_234m", "gemma_1b"), rank=8),
}

TARGET_OVERHEAD_PERCENT = 5.0
#: apply_lora calls timed after the first (whose peak memory is measured).
APPLY_REPEATS = 4


def measure(name, rank, dtype="float32"):
    import keras

    import keras_lora
    from keras_lora.adapters import save_adapters

    mib = 2**20
    gc.collect()
    rss_imports = common.rss_bytes()
    start = time.perf_counter()
    backbone = common.build_backbone(name, dtype=dtype)
    common.materialize(backbone.weights)
    build_s = time.perf_counter() - start
    gc.collect()
    rss_model = common.rss_bytes()
    weights_bytes = common.variables_bytes(backbone.weights)

    peak_reset = common.reset_peak_rss()
    rss_before = common.rss_bytes()
    start = time.perf_counter()
    lora = keras_lora.apply_lora(backbone, rank=rank, targets=common.TARGETS)
    common.materialize(lora.weights)
    apply_s = time.perf_counter() - start
    peak = common.peak_rss_bytes()
    gc.collect()
    rss_after = common.rss_bytes()

    # apply_lora's time: the median of this first call and APPLY_REPEATS
    # more on the same backbone (each a new adapted model, dropped), since
    # one call of under a second varies by tens of percent between runs.
    apply_times = [apply_s]
    for _ in range(APPLY_REPEATS):
        start = time.perf_counter()
        again = keras_lora.apply_lora(
            backbone, rank=rank, targets=common.TARGETS
        )
        common.materialize(again.weights)
        apply_times.append(time.perf_counter() - start)
        del again
        gc.collect()

    report = keras_lora.lora_report(lora)
    adapter_vars = [
        v
        for layer in keras_lora.lora_layers(lora).values()
        for v in layer.adapter_weights().values()
    ]
    adapter_bytes = common.variables_bytes(adapter_vars)
    shared = {id(v) for v in backbone.weights}
    copied = [v for v in lora.weights if id(v) not in shared]
    copied_bytes = common.variables_bytes(copied) - adapter_bytes

    with tempfile.TemporaryDirectory() as tmp:
        adapter_file = os.path.join(tmp, "adapters.safetensors")
        save_adapters(lora, adapter_file)
        model_file = os.path.join(tmp, "model.weights.h5")
        backbone.save_weights(model_file)
        adapter_file_bytes = os.path.getsize(adapter_file)
        model_file_bytes = os.path.getsize(model_file)

    # merge: new kernels for the adapted layers, every other variable shared.
    adapted_kernels = [
        layer.kernel for layer in keras_lora.lora_layers(lora).values()
    ]
    adapted_kernels_bytes = common.variables_bytes(adapted_kernels)
    largest_kernel_bytes = max(
        common.variables_bytes([k]) for k in adapted_kernels
    )
    gc.collect()
    common.reset_peak_rss()
    rss_before_merge = common.rss_bytes()
    start = time.perf_counter()
    merged = keras_lora.merge(lora)
    common.materialize(merged.weights)
    merge_s = time.perf_counter() - start
    merge_peak = common.peak_rss_bytes()
    in_lora = {id(v) for v in lora.weights}
    merged_new_bytes = common.variables_bytes(
        [v for v in merged.weights if id(v) not in in_lora]
    )
    del merged
    gc.collect()

    # Keras's built-in LoRA on the same layers of the original model, for the
    # trainable parameter count (after the files are written).
    backbone.enable_lora(rank)
    builtin_trainable = common.count_params(backbone.trainable_weights)
    del backbone
    keras.backend.clear_session()

    peak_growth = peak - rss_before
    after_growth = rss_after - rss_before
    return {
        "model": name,
        "dtype": dtype,
        "rank": rank,
        "targets": common.TARGETS,
        "total_params": report["total_params"] - report["adapter_params"],
        "weights_bytes": weights_bytes,
        "build_s": build_s,
        "apply_lora_s": statistics.median(apply_times),
        "apply_lora_times_s": apply_times,
        "rss_after_imports_mib": rss_imports / mib,
        "rss_with_model_mib": rss_model / mib,
        "rss_before_apply_mib": rss_before / mib,
        "rss_peak_during_apply_mib": peak / mib,
        "rss_after_apply_mib": rss_after / mib,
        "peak_reset_supported": peak_reset,
        "adapter_bytes": adapter_bytes,
        "non_adapter_variables_created_bytes": copied_bytes,
        "apply_peak_growth_mib": peak_growth / mib,
        "apply_peak_overhead_percent": 100.0
        * (peak_growth - adapter_bytes)
        / weights_bytes,
        "apply_after_overhead_percent": 100.0
        * (after_growth - adapter_bytes)
        / weights_bytes,
        "meets_target": (peak_growth - adapter_bytes)
        < TARGET_OVERHEAD_PERCENT / 100 * weights_bytes,
        "apply_vs_build": statistics.median(apply_times) / build_s,
        "merge_s": merge_s,
        "merge_vs_build": merge_s / build_s,
        "adapted_kernels_bytes": adapted_kernels_bytes,
        "merge_new_variables_bytes": merged_new_bytes,
        "merge_peak_growth_mib": (merge_peak - rss_before_merge) / mib,
        "merge_peak_vs_adapted_kernels": (merge_peak - rss_before_merge)
        / adapted_kernels_bytes,
        "largest_adapted_kernel_bytes": largest_kernel_bytes,
        "merge_excess_vs_largest_kernel": (
            merge_peak - rss_before_merge - adapted_kernels_bytes
        )
        / largest_kernel_bytes,
        "trainable_params": {
            "keras_lora": report["trainable_params"],
            "builtin": builtin_trainable,
            "full": report["total_params"] - report["adapter_params"],
        },
        "adapted_layers": len(report["layers"]),
        "adapter_file_bytes": adapter_file_bytes,
        "model_file_bytes": model_file_bytes,
        "adapter_file_format": "keras_lora save_adapters (safetensors)",
        "model_file_format": "model.save_weights (.weights.h5)",
        "file_ratio": adapter_file_bytes / model_file_bytes,
    }


def run(size="full", device="cpu", dtype="float32"):
    common.check_device(device)
    spec = SIZES[size]
    return {
        "benchmark": "memory",
        "size": size,
        "machine": common.machine_info(device),
        "malloc_mmap_threshold_bytes": common.mmap_threshold(),
        "results": [
            measure(name, spec["rank"], dtype) for name in spec["model"]
        ],
    }


def print_result(result):
    machine = result["machine"]
    print(f"\nMemory, backend {machine['backend']} on {machine['device']}")
    header = [
        "model",
        "params",
        "weights MiB",
        "apply peak +MiB",
        "adapters MiB",
        "overhead %",
        "apply / build time",
        "merge peak / adapted kernels",
        "excess / largest kernel",
        "trainable lora/builtin/full",
        "adapter file / model file",
    ]
    rows = []
    for row in result["results"]:
        t = row["trainable_params"]
        rows.append(
            [
                f"{row['model']} ({row['dtype']})",
                f"{row['total_params']:,}",
                f"{row['weights_bytes'] / 2**20:.1f}",
                f"{row['apply_peak_growth_mib']:.1f}",
                f"{row['adapter_bytes'] / 2**20:.2f}",
                f"{row['apply_peak_overhead_percent']:.2f}",
                f"{row['apply_vs_build']:.3f}",
                f"{row['merge_peak_vs_adapted_kernels']:.2f}",
                f"{row['merge_excess_vs_largest_kernel']:.1f}",
                f"{t['keras_lora']:,} / {t['builtin']:,} / {t['full']:,}",
                f"{row['adapter_file_bytes']:,} / {row['model_file_bytes']:,} "
                f"({100 * row['file_ratio']:.3f} %)",
            ]
        )
    common.print_table(header, rows)


def table(out_dir="benchmarks/results", device="cpu"):
    """The Markdown table of `memory_<backend>_<device>.json` in `out_dir`:
    one row per backend and model."""
    lines = [
        "| backend | model | params | weights MiB | build s | apply_lora s: "
        "median (first call) | **apply / build** | first call / build "
        "| apply peak growth MiB (adapters) "
        "| **overhead % of weights** | merge s | adapted kernels MiB "
        "| merge peak growth MiB | **merge peak / adapted kernels** "
        "| merge excess / largest kernel | adapter file / model file |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    results = common.results_by_backend(out_dir, "memory", device)
    for backend, result in results.items():
        for row in result["results"]:
            cells = [
                backend,
                f"{row['model']} ({row['dtype']})",
                f"{row['total_params']:,}",
                f"{row['weights_bytes'] / 2**20:.0f}",
                f"{row['build_s']:.1f}",
                f"{row['apply_lora_s']:.2f} "
                f"({row['apply_lora_times_s'][0]:.2f})",
                f"**{row['apply_vs_build']:.2f}**",
                f"{row['apply_lora_times_s'][0] / row['build_s']:.2f}",
                f"{row['apply_peak_growth_mib']:.1f} "
                f"({row['adapter_bytes'] / 2**20:.2f})",
                f"**{row['apply_peak_overhead_percent']:.2f}**",
                f"{row['merge_s']:.1f}",
                f"{row['adapted_kernels_bytes'] / 2**20:.0f}",
                f"{row['merge_peak_growth_mib']:.0f}",
                f"**{row['merge_peak_vs_adapted_kernels']:.2f}**",
                f"{row['merge_excess_vs_largest_kernel']:.1f}",
                f"{100 * row['file_ratio']:.3f} %",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32"
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
    result = run(args.size, args.device, args.dtype)
    print_result(result)
    print(f"wrote {common.write_json(result, args.out, 'memory')}")
    return result


if __name__ == "__main__":
    # RSS then follows the memory in use (freed temporaries leave it).
    common.release_freed_memory()
    main()
