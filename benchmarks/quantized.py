"""QLoRA: LoRA over a float32, int8 and int4 base (Keras's `model.quantize`).

For each base (the real all-MiniLM-L6-v2 weights, and a keras-hub Gemma
config): the model's weight memory, one LoRA training step's time as a
ratio to the float32 base's (interleaved rounds, median), and, after a few
training steps (Adam 1e-3, rank 8, query + value, fixed batch), what a merge
keeps of the update: `requantization_report` of every adapted layer (the
largest absolute weight error and the error relative to the update `s A B`)
and the largest output difference from the LoRA model for `merge(model)`
(re-quantized) and `merge(model, dequantize=True)` (float `W_deq + s A B`).

Training memory, each base in a fresh process (`--memory-child`): the
resident set size (VmRSS) after the imports and after building the model,
and its peak (VmHWM, reset through /proc/self/clear_refs) during the first
training step (tracing, optimizer state) and during three more. The CPU
backends keep no allocator statistics of their own, so RSS is the measure.

    KERAS_BACKEND=jax python -m benchmarks.quantized --quick
    python -m benchmarks.quantized --table   # Markdown from the JSON results
"""

import gc
import json
import os
import statistics
import warnings

from benchmarks import common

SIZES = {
    "smoke": dict(
        models=("gemma_smoke",),
        memory_models=("gemma_smoke",),
        batch=2,
        seq=8,
        steps=2,
        rounds=2,
        warmup=1,
    ),
    "quick": dict(
        models=("minilm", "gemma_tiny"),
        memory_models=("minilm", "gemma_mid"),
        batch=8,
        seq=64,
        steps=10,
        rounds=10,
        warmup=2,
    ),
    "full": dict(
        models=("minilm", "gemma_mid"),
        memory_models=("minilm", "gemma_mid"),
        batch=16,
        seq=128,
        steps=20,
        rounds=20,
        warmup=3,
    ),
}
MODES = ("float32", "int8", "int4")


def _quantized_model(name, mode, spec):
    """The task model around a backbone with LoRA (rank 8, query + value)
    over a float32 or quantized base, its batch and the backbone's weight
    bytes."""
    import keras_lora

    backbone = common.build_backbone(name)
    x, y = common.make_batch(name, backbone, spec["batch"], spec["seq"])
    if mode != "float32":
        # The backbone itself: its config records the quantized layers (a
        # model that only wraps it would be rebuilt in float).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # layers Keras does not quantize
            backbone.quantize(mode)
    weights = common.variables_bytes(backbone.weights)
    lora_backbone = keras_lora.apply_lora(backbone, rank=8, alpha=16)
    lora = common.task_model(name, lora_backbone, learning_rate=1e-3)
    return lora, x, y, weights


def _merge_errors(lora, x):
    import numpy as np
    from keras import ops

    import keras_lora

    out = np.asarray(ops.convert_to_numpy(lora(x)), "float64")
    scale = float(np.abs(out).max())
    rows = []
    for layer in keras_lora.lora_layers(lora).values():
        rows.extend(layer.requantization_report().values())
    result = {}
    if rows:
        relative = [r["update_relative_error"] for r in rows]
        result.update(
            layers=len(rows),
            max_abs_weight_error=max(r["max_abs_weight_error"] for r in rows),
            update_relative_error_median=statistics.median(relative),
            update_relative_error_max=max(relative),
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", keras_lora.QuantizedMergeWarning)
        for key, dequantize in (("merged", False), ("dequantized", True)):
            merged = keras_lora.merge(lora, dequantize=dequantize)
            diff = np.asarray(ops.convert_to_numpy(merged(x))) - out
            result[f"{key}_vs_lora_relative"] = float(np.abs(diff).max()) / (
                scale
            )
    return result


def training_memory(name, mode, size):
    """RSS of LoRA training over a `mode` base of `name`, measured in this
    process (start it fresh: `--memory-child NAME MODE`); bytes."""
    import keras_hub  # noqa: F401  (imports before the first reading)

    import keras_lora  # noqa: F401

    spec = SIZES[size]
    gc.collect()
    imports = common.rss_bytes()
    lora, x, y, weights = _quantized_model(name, mode, spec)
    gc.collect()
    model = common.rss_bytes()
    reset_first = common.reset_peak_rss()
    lora.train_on_batch(x, y)
    first_step = common.peak_rss_bytes()
    lora.train_on_batch(x, y)
    gc.collect()
    before_steps = common.rss_bytes()
    reset_steps = common.reset_peak_rss()
    for _ in range(3):
        lora.train_on_batch(x, y)
    return {
        "weights_bytes": weights,
        "rss_imports": imports,
        "rss_model": model,
        "first_step_peak": first_step,
        "rss_before_steps": before_steps,
        "step_peak": common.peak_rss_bytes(),
        "peak_reset_worked": reset_first and reset_steps,
    }


def _memory_rows(name, size):
    """`training_memory` of each base of `name`, each in a new process,
    with each peak above the imports as a ratio to the float32 base's."""
    rows = {}
    for mode in MODES:
        common.log(f"{name} {mode}: training memory (own process)")
        rows[mode] = common.run_child(
            "benchmarks.quantized",
            ["--size", size, "--memory-child", name, mode],
            f"memory measurement of {name} {mode}",
        )
    base = rows["float32"]
    for r in rows.values():
        above = r["step_peak"] - r["rss_imports"]
        r["step_peak_above_imports"] = above
        r["step_peak_vs_float32"] = above / (
            base["step_peak"] - base["rss_imports"]
        )
        r["peak_saving_bytes"] = base["step_peak"] - r["step_peak"]
        r["weight_saving_bytes"] = base["weights_bytes"] - r["weights_bytes"]
    return rows


def run(size="quick", device="cpu"):
    common.check_device(device)
    spec = SIZES[size]
    rows = {}
    for name in spec["models"]:
        models = {}
        for mode in MODES:
            common.log(f"{name} {mode}: building")
            models[mode] = _quantized_model(name, mode, spec)
        steps = {
            mode: (lambda m=m: m[0].train_on_batch(m[1], m[2]))
            for mode, m in models.items()
        }
        times = common.interleaved_times(steps, spec["warmup"], spec["rounds"])
        for _ in range(spec["steps"]):
            for step in steps.values():
                step()
        row = {}
        for mode, (lora, x, _, weights) in models.items():
            row[mode] = {
                "weights_bytes": weights,
                "weights_vs_float32": weights / models["float32"][3],
                "step_ms": statistics.median(times[mode]) * 1e3,
                "step_vs_float32": common.ratio_stats(
                    times[mode], times["float32"]
                ),
                "merge": _merge_errors(lora, x),
            }
        rows[name] = row
    memory = {name: _memory_rows(name, size) for name in spec["memory_models"]}
    return {
        "benchmark": "quantized",
        "size": size,
        "machine": common.machine_info(device),
        "rank": 8,
        "training_steps": spec["steps"] + spec["warmup"] + spec["rounds"],
        "results": rows,
        "memory": memory,
    }


BACKENDS = ("jax", "tensorflow", "torch")


def _result_path(out_dir, backend, device):
    return os.path.join(out_dir, f"quantized_{backend}_{device}.json")


def _results(out_dir, device):
    """`(backend, result)` of each `quantized_<backend>_<device>.json` in
    `out_dir`, in `BACKENDS` order."""
    for backend in BACKENDS:
        path = _result_path(out_dir, backend, device)
        if os.path.exists(path):
            with open(path) as f:
                yield backend, json.load(f)


def table(out_dir="benchmarks/results", device="cpu"):
    """The Markdown table of `quantized_<backend>_<device>.json`: one row
    per backend, model and base."""
    lines = [
        "| backend | model | base | weights (MiB, x float32) | step "
        "x float32 | merge: max abs weight error | update lost "
        "(median / max) | merged vs LoRA | float merge vs LoRA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    found = False
    for backend, result in _results(out_dir, device):
        found = True
        for name, row in result["results"].items():
            for mode in [m for m in MODES if m in row]:
                r = row[mode]
                merge = r["merge"]
                lost = (
                    f"{merge['update_relative_error_median']:.1%} / "
                    f"{merge['update_relative_error_max']:.1%}"
                    if "layers" in merge
                    else "-"
                )
                weight_error = (
                    f"{merge['max_abs_weight_error']:.2g}"
                    if "layers" in merge
                    else "-"
                )
                lines.append(
                    f"| {backend} | {name} | {mode} | "
                    f"{r['weights_bytes'] / 2**20:.1f} "
                    f"({r['weights_vs_float32']:.2f}) | "
                    f"{r['step_vs_float32']['median']:.2f} | "
                    f"{weight_error} | {lost} | "
                    f"{merge['merged_vs_lora_relative']:.1e} | "
                    f"{merge['dequantized_vs_lora_relative']:.1e} |"
                )
    if not found:
        raise ValueError(
            f"No quantized_<backend>_{device}.json in {out_dir!r}: run "
            "`python -m benchmarks.quantized` first. Received: "
            f"out_dir={out_dir!r}, device={device!r}"
        )
    return "\n".join(lines) + "\n"


def memory_table(out_dir="benchmarks/results", device="cpu"):
    """The Markdown table of the training-memory part of
    `quantized_<backend>_<device>.json`: one row per backend, model and
    base."""
    mib = 2**20
    lines = [
        "| backend | model | base | weights (MiB) | RSS with model (MiB) "
        "| training step peak (MiB) | the step's own growth (MiB) "
        "| peak above imports (x float32) | peak saved vs float32 (MiB) "
        "| weights saved (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for backend, result in _results(out_dir, device):
        for name, row in result.get("memory", {}).items():
            for mode in [m for m in MODES if m in row]:
                r = row[mode]
                lines.append(
                    f"| {backend} | {name} | {mode} | "
                    f"{r['weights_bytes'] / mib:.1f} | "
                    f"{r['rss_model'] / mib:.0f} | "
                    f"{r['step_peak'] / mib:.0f} | "
                    f"{(r['step_peak'] - r['rss_before_steps']) / mib:.0f} | "
                    f"{r['step_peak_above_imports'] / mib:.0f} "
                    f"({r['step_peak_vs_float32']:.2f}) | "
                    f"{r['peak_saving_bytes'] / mib:.0f} | "
                    f"{r['weight_saving_bytes'] / mib:.0f} |"
                )
    return "\n".join(lines) + "\n"


def performance_table(out_dir="benchmarks/results", device="cpu"):
    """docs/performance.md's QLoRA rows: per backend and model, the step
    time and the training peak above the imports of an int8 and an int4
    base as ratios to the float32 base's ("-": not measured on that model,
    the step and memory parts use different Gemma sizes)."""
    quantized_modes = [m for m in MODES if m != "float32"]
    lines = [
        "| backend | model | step x float32 (int8 / int4) | training peak x "
        "float32 (int8 / int4) | weights x float32 (int8 / int4) |",
        "|---|---|---|---|---|",
    ]
    for backend, result in _results(out_dir, device):
        steps, memory = result["results"], result.get("memory", {})
        for name in sorted({*steps, *memory}):
            cells = []
            for part, key in (
                (steps, lambda r, m: r[m]["step_vs_float32"]["median"]),
                (memory, lambda r, m: r[m]["step_peak_vs_float32"]),
                (
                    {**memory, **steps},
                    lambda r, m: (
                        r[m]["weights_bytes"] / r["float32"]["weights_bytes"]
                    ),
                ),
            ):
                row = part.get(name)
                cells.append(
                    " / ".join(f"{key(row, m):.2f}" for m in quantized_modes)
                    if row
                    else "-"
                )
            lines.append(f"| {backend} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _memory_only(args):
    import keras

    common.setup_device(args.device)
    path = _result_path(args.out, keras.backend.backend(), args.device)
    if not os.path.exists(path):
        raise ValueError(
            f"--memory-only replaces the memory part of {path!r}, which does "
            "not exist: run `python -m benchmarks.quantized` first. "
            f"Received: out={args.out!r}"
        )
    with open(path) as f:
        result = json.load(f)
    if result["size"] != args.size:
        raise ValueError(
            f"{path!r} holds a {result['size']!r} run; measure its memory "
            f"with the same --size. Received: size={args.size!r}"
        )
    result["memory"] = {
        name: _memory_rows(name, args.size)
        for name in SIZES[args.size]["memory_models"]
    }
    with open(path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    print(memory_table(args.out, args.device), end="")
    return result


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--table",
        action="store_true",
        help="print the Markdown table of the JSON results in --out and exit",
    )
    parser.add_argument(
        "--performance-table",
        action="store_true",
        help="print docs/performance.md's QLoRA rows from the JSON results "
        "in --out and exit",
    )
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="measure only the training memory and replace it in this "
        "backend's existing JSON result",
    )
    parser.add_argument(
        "--memory-child",
        nargs=2,
        metavar=("MODEL", "BASE"),
        help="(internal) measure the training memory of one base in this "
        "process and print it as JSON",
    )
    args = parser.parse_args(argv)
    if args.table:
        text = (
            table(args.out, args.device)
            + "\n"
            + memory_table(args.out, args.device)
        )
        print(text, end="")
        return text
    if args.performance_table:
        text = performance_table(args.out, args.device)
        print(text, end="")
        return text
    if args.memory_child:
        common.setup_device(args.device)
        result = training_memory(*args.memory_child, args.size)
        print(json.dumps(result))
        return result
    if args.memory_only:
        return _memory_only(args)
    common.setup_device(args.device)
    result = run(args.size, args.device)
    path = common.write_json(result, args.out, "quantized")
    print(table(args.out, args.device), end="")
    print(memory_table(args.out, args.device), end="")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
