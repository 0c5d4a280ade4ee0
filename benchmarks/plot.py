"""Plots step time and peak memory against sequence length and rank.

Reads the JSON of `benchmarks.remat` (gemma_mid, batch 1, keras_lora with and
without rematerialized decoder blocks, sequence length 256 -> 4096) and
`benchmarks.scaling` (gemma_mid, batch 2 x 128, rank 1 -> 64) for every
backend found in `--out`, and draws four panels into one PNG:

- step time against sequence length (remat and none);
- peak memory of training against sequence length (remat and none);
- step time against rank;
- memory against rank: the step's peak growth and the adapters' Adam state.

Usage:

    python -m benchmarks.plot            # writes docs/images/performance.png
    python -m benchmarks.plot --output /tmp/performance.png
"""

import argparse

from benchmarks import common

MIB = 2**20
BACKEND_COLORS = {
    "jax": "tab:blue",
    "tensorflow": "tab:orange",
    "torch": "tab:green",
}


def series(out_dir="benchmarks/results", device="cpu"):
    """The plotted numbers, read from the JSON results.

    Returns:
        dict with `sequence` (per backend: `seq_len`, `step_s` and
        `peak_mib` of `no_remat` and `remat`, where measured: where Keras's
        remat failed, as on TensorFlow, there is no `remat` and no step
        time) and `rank` (per
        backend: `rank`, `step_s`, `step_peak_growth_mib`, `adam_state_mib`).
    """
    sequence = {}
    for backend, result in common.results_by_backend(
        out_dir, "remat", device
    ).items():
        rows = result["results"]
        entry = {"seq_len": [row["seq_len"] for row in rows]}
        for variant in ("no_remat", "remat"):
            numbers = {}
            if all(variant in row.get("step_time", {}) for row in rows):
                numbers["step_s"] = [
                    row["step_time"][variant]["median_s"] for row in rows
                ]
            if all(
                "training_peak_bytes" in row["variants"][variant]
                for row in rows
            ):
                numbers["peak_mib"] = [
                    row["variants"][variant]["training_peak_bytes"] / MIB
                    for row in rows
                ]
            if numbers:
                entry[variant] = numbers
        sequence[backend] = entry
    rank = {}
    for backend, result in common.results_by_backend(
        out_dir, "scaling", device
    ).items():
        rows = result["rank_sweep"]["rows"]
        rank[backend] = {
            "rank": [row["rank"] for row in rows],
            "step_s": [row["median_s"] for row in rows],
            "step_peak_growth_mib": [
                row["step_peak_growth_bytes"] / MIB for row in rows
            ],
            "adam_state_mib": [
                row["training_state_bytes"] / MIB for row in rows
            ],
        }
    return {"sequence": sequence, "rank": rank}


def plot(output, out_dir="benchmarks/results", device="cpu"):
    """Draws the four panels into `output` (PNG); returns `series(...)`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = series(out_dir, device)
    figure, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    time_ax, memory_ax = axes[0]
    for backend, entry in data["sequence"].items():
        color = BACKEND_COLORS[backend]
        for variant, style in (("no_remat", "-"), ("remat", "--")):
            if variant not in entry:
                continue
            label = f"{backend}, {variant.replace('_', ' ')}"
            for ax, key in ((time_ax, "step_s"), (memory_ax, "peak_mib")):
                if key in entry[variant]:
                    ax.plot(
                        entry["seq_len"],
                        entry[variant][key],
                        style,
                        color=color,
                        marker="o",
                        label=label,
                    )
    for ax, ylabel in (
        (time_ax, "step time (s)"),
        (memory_ax, "peak MiB above the imports"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (gemma_mid, batch 1, rank 8)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    time_ax.set_title("Train step time vs sequence length")
    memory_ax.set_title("Peak memory of training vs sequence length")
    rank_time_ax, rank_memory_ax = axes[1]
    for backend, entry in data["rank"].items():
        color = BACKEND_COLORS[backend]
        rank_time_ax.plot(
            entry["rank"],
            entry["step_s"],
            "-",
            color=color,
            marker="o",
            label=backend,
        )
        rank_memory_ax.plot(
            entry["rank"],
            entry["step_peak_growth_mib"],
            "-",
            color=color,
            marker="o",
            label=f"{backend}, growth of RSS in a step",
        )
    # The adapters' Adam state is the same numbers on every backend: one
    # line (it would hide under itself three times).
    entry = next(iter(data["rank"].values()), None)
    if entry is not None:
        rank_memory_ax.plot(
            entry["rank"],
            entry["adam_state_mib"],
            ":",
            color="black",
            marker="s",
            label="adapters' Adam state (every backend)",
        )
    for ax, ylabel in (
        (rank_time_ax, "step time (s)"),
        (rank_memory_ax, "MiB"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank (gemma_mid, batch 2 x 128)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    rank_time_ax.set_ylim(bottom=0)
    rank_time_ax.set_title("Train step time vs rank")
    rank_memory_ax.set_yscale("log")
    rank_memory_ax.set_title("Memory vs rank")
    figure.savefig(output, dpi=90)
    plt.close(figure)
    return data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        default="benchmarks/results",
        help="directory of the JSON results",
    )
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument(
        "--output",
        default="docs/images/performance.png",
        help="the PNG to write",
    )
    args = parser.parse_args(argv)
    plot(args.output, args.out, args.device)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
