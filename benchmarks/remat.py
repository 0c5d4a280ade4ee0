"""Rematerialization with adapters: step memory and time by sequence length.

keras-hub's `gemma_mid` config (batch 1), keras_lora rank 8 on query +
value, trained with and without rematerialization of each decoder block:
the backbone is built inside `keras.RematScope(mode="list_of_layers",
layer_names=[the decoder blocks])` (Keras's own remat: `jax.checkpoint`,
`tf.recompute_grad`, `torch.utils.checkpoint`), then `apply_lora` (which
keeps each layer's remat mode). For each sequence length, memory: each
variant in a fresh process, the peak RSS above the imports while the model
is built and trains two steps (VmHWM reset through /proc/self/clear_refs;
glibc returns freed blocks of 1 MiB or more to the system, so RSS follows
the memory in use): weights, adapters, optimizer state, and the step's
activations and temporaries (with the first step's compilation), and the
peak of a later step alone. Time: both variants in one more process,
interleaved rounds, median of the per-round ratios. Target at the longest
length: the peak with remat <= 0.6 of without, at <= 1.35x the step time.

    KERAS_BACKEND=jax python -m benchmarks.remat --quick
    python -m benchmarks.remat --table   # Markdown from the JSON results
"""

import gc
import json

from benchmarks import common

SIZES = {
    "smoke": dict(model="gemma_smoke", seq_lens=(8,), rank=4, steps=2),
    "quick": dict(
        model="gemma_mid", seq_lens=(256, 1024, 4096), rank=8, steps=3
    ),
}
SIZES["full"] = dict(SIZES["quick"], steps=5)

TARGET_MEMORY = 0.6
TARGET_TIME = 1.35


def _build(name, rank, remat, lora=True):
    """A compiled causal LM of `name` (keras_lora's when `lora`); its
    decoder blocks are rematerialized when `remat`."""
    import keras

    import keras_lora
    from keras_lora._keras_private import remat_mode

    keras.utils.set_random_seed(0)
    config = common.GEMMA_CONFIGS[name]
    blocks = [f"decoder_block_{i}" for i in range(config["num_layers"])]
    if remat:
        with keras.RematScope(mode="list_of_layers", layer_names=blocks):
            backbone = common.build_backbone(name)
    else:
        backbone = common.build_backbone(name)
    if lora:
        backbone = keras_lora.apply_lora(
            backbone, rank=rank, targets=common.TARGETS
        )
    modes = [remat_mode(backbone.get_layer(b)) for b in blocks]
    model = common.task_model(name, backbone)
    return model, backbone, all(m is not None for m in modes)


VARIANTS = {"no_remat": False, "remat": True}


def _error(e):
    lines = [line for line in str(e).splitlines() if line.strip()]
    text = " ".join(lines[:2]).replace("\x1b[1m", "").replace("\x1b[0m", "")
    return f"{type(e).__name__}: {text}"[:400]


def measure_memory(name, seq_len, rank, variant):
    """Peak RSS above the imports while one variant is built and trains two
    steps, in this process (start it fresh: `--child SEQ_LEN VARIANT`). If
    training fails, the error, and whether the same model without
    keras_lora fails too."""
    import keras_hub  # noqa: F401  (imports before the first reading)

    import keras_lora  # noqa: F401

    gc.collect()
    imports = common.rss_bytes()
    reset = common.reset_peak_rss()
    model, backbone, remat_set = _build(name, rank, VARIANTS[variant])
    x, y = common.make_batch(name, backbone, 1, seq_len)
    try:
        model.train_on_batch(x, y)  # compiles, creates the optimizer state
    except Exception as e:  # noqa: BLE001 - recorded, the table says so
        plain, plain_backbone, _ = _build(
            name, rank, VARIANTS[variant], lora=False
        )
        try:
            plain.train_on_batch(
                *common.make_batch(name, plain_backbone, 1, seq_len)
            )
            plain_error = None
        except Exception as plain_e:  # noqa: BLE001
            plain_error = _error(plain_e)
        return {
            "remat_mode_on_every_block": remat_set,
            "error": _error(e),
            "error_without_keras_lora": plain_error,
        }
    gc.collect()
    resting = common.rss_bytes()
    training_peak = common.peak_rss_bytes()
    step_reset = common.reset_peak_rss()
    model.train_on_batch(x, y)
    step_peak = common.peak_rss_bytes()
    return {
        "remat_mode_on_every_block": remat_set,
        "training_peak_bytes": max(training_peak, step_peak) - imports,
        "resting_bytes": resting - imports,
        "step_peak_bytes": step_peak - imports,
        "peak_reset_worked": reset and step_reset,
    }


def measure_time(name, seq_len, rank, steps):
    """Step times of both variants, interleaved, in this process (start it
    fresh: `--child SEQ_LEN time`)."""
    functions = {}
    for variant, remat in VARIANTS.items():
        model, backbone, _ = _build(name, rank, remat)
        x, y = common.make_batch(name, backbone, 1, seq_len)
        functions[variant] = lambda m=model, x=x, y=y: m.train_on_batch(x, y)
    times = common.interleaved_times(functions, warmup=1, steps=steps)
    return {
        "step_time": {v: common.time_stats(t) for v, t in times.items()},
        "time_ratio": common.ratio_stats(times["remat"], times["no_remat"]),
    }


def _child(size, device, seq_len, what):
    common.log(f"sequence length {seq_len}, {what} (own process)")
    return common.run_child(
        "benchmarks.remat",
        ["--size", size, "--device", device, "--child", str(seq_len), what],
        f"remat measurement ({what}) at sequence length {seq_len}",
    )


def run(size="quick", device="cpu"):
    common.check_device(device)
    spec = SIZES[size]
    rows = []
    for seq_len in spec["seq_lens"]:
        memory = {v: _child(size, device, seq_len, v) for v in VARIANTS}
        if any("error" in r for r in memory.values()):
            rows.append({"seq_len": seq_len, "variants": memory})
            continue
        timing = _child(size, device, seq_len, "time")
        rows.append(
            {
                "seq_len": seq_len,
                "variants": memory,
                **timing,
                "training_peak_ratio": memory["remat"]["training_peak_bytes"]
                / memory["no_remat"]["training_peak_bytes"],
                "step_peak_ratio": memory["remat"]["step_peak_bytes"]
                / memory["no_remat"]["step_peak_bytes"],
            }
        )
    longest = rows[-1]
    return {
        "benchmark": "remat",
        "size": size,
        "model": spec["model"],
        "rank": spec["rank"],
        "batch_size": 1,
        "targets": common.TARGETS,
        "malloc_mmap_threshold_bytes": common.mmap_threshold(),
        "machine": common.machine_info(device),
        "results": rows,
        "remat_trains": "error" not in longest["variants"]["remat"],
        "meets_target": "training_peak_ratio" in longest
        and longest["training_peak_ratio"] <= TARGET_MEMORY
        and longest["time_ratio"]["median"] <= TARGET_TIME,
    }


def _cells(row):
    mib = 2**20
    no, re = row["variants"]["no_remat"], row["variants"]["remat"]
    if "training_peak_ratio" not in row:
        failed = "fails" if "error" in re else "-"
        return [
            str(row["seq_len"]),
            f"{no['training_peak_bytes'] / mib:.0f}"
            if "error" not in no
            else "fails",
            failed,
            "-",
            "-",
            "-",
            failed,
            "-",
        ]
    return [
        str(row["seq_len"]),
        f"{no['training_peak_bytes'] / mib:.0f}",
        f"{re['training_peak_bytes'] / mib:.0f}",
        f"{row['training_peak_ratio']:.2f}",
        f"{row['step_peak_ratio']:.2f}",
        f"{row['step_time']['no_remat']['median_s']:.2f}",
        f"{row['step_time']['remat']['median_s']:.2f}",
        f"{row['time_ratio']['median']:.2f}",
    ]


HEADER = [
    "seq len",
    "peak MiB",
    "peak MiB, remat",
    "remat / none: peak",
    "remat / none: peak of a later step",
    "step s",
    "step s, remat",
    "remat / none: time",
]


def print_result(result):
    machine = result["machine"]
    print(
        f"\nRemat, {result['model']}, backend {machine['backend']} on "
        f"{machine['device']}"
    )
    common.print_table(HEADER, [_cells(row) for row in result["results"]])


def table(out_dir="benchmarks/results", device="cpu"):
    """The Markdown table of `remat_<backend>_<device>.json` in `out_dir`."""
    cols = ["backend", *HEADER]
    lines = [
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    results = common.results_by_backend(out_dir, "remat", device)
    for backend, result in results.items():
        for row in result["results"]:
            cells = [backend, *_cells(row)]
            cells[4] = f"**{cells[4]}**"
            cells[8] = f"**{cells[8]}**"
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
        "--child",
        nargs=2,
        metavar=("SEQ_LEN", "WHAT"),
        help="(internal) measure one sequence length in this process: the "
        "memory of one variant (no_remat, remat) or the times of both (time)",
    )
    args = parser.parse_args(argv)
    if args.table:
        text = table(args.out, args.device)
        print(text, end="")
        return text
    common.setup_device(args.device)
    spec = SIZES[args.size]
    if args.child:
        seq_len, what = int(args.child[0]), args.child[1]
        if what == "time":
            result = measure_time(
                spec["model"], seq_len, spec["rank"], spec["steps"]
            )
        else:
            result = measure_memory(spec["model"], seq_len, spec["rank"], what)
        print(json.dumps(result))
        return result
    result = run(args.size, args.device)
    print_result(result)
    common.write_json(result, args.out, "remat")
    return result


if __name__ == "__main__":
    # RSS then follows the memory in use (freed temporaries leave it).
    common.release_freed_memory()
    main()
