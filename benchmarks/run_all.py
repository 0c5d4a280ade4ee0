"""Runs every benchmark on every backend (one process each) and summarises.

Each (backend, benchmark) pair runs in a fresh subprocess with
`KERAS_BACKEND` set, writing `<out>/<benchmark>_<backend>_<device>.json`; the
summary table compares the ratios with the targets and can be written as
Markdown for docs/performance.md.

    python -m benchmarks.run_all --quick                  # CPU, ~10 min/backend
    python -m benchmarks.run_all --device gpu --backends jax torch
    python -m benchmarks.run_all --summary-only --markdown table.md
"""

import json
import os
import subprocess
import sys
import time

from benchmarks import common

BENCHMARKS = ("train_step", "inference", "memory", "scaling")
BACKENDS = ("tensorflow", "jax", "torch")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(backend, benchmark, size, device, out, timeout):
    """Runs one benchmark in a subprocess; returns (returncode, seconds)."""
    env = dict(os.environ, KERAS_BACKEND=backend)
    command = [
        sys.executable,
        "-m",
        f"benchmarks.{benchmark}",
        "--size",
        size,
        "--device",
        device,
        "--out",
        os.path.abspath(out),
    ]
    print(f"\n=== KERAS_BACKEND={backend} {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    try:
        code = subprocess.run(
            command, env=env, cwd=ROOT, timeout=timeout
        ).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    return code, time.perf_counter() - start


def load(out, benchmark, backend, device):
    path = os.path.join(out, f"{benchmark}_{backend}_{device}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def summary_rows(out, backends, device):
    """One row per (backend, model) with every ratio that has a target."""
    rows = []
    for backend in backends:
        train = load(out, "train_step", backend, device)
        infer = load(out, "inference", backend, device)
        memory = load(out, "memory", backend, device)
        infer_by_model = {
            r["model"]: r for r in (infer or {}).get("results", [])
        }
        for row in (train or {}).get("results", []):
            ratios = row["ratios"]
            inf = (
                infer_by_model.get(row["model"])
                if row.get("targets", "qv") == "qv"
                else None
            )
            rows.append(
                [
                    backend,
                    f"{row['model']} ({row.get('targets', 'qv')})",
                    f"{row['batch_size']}x{row['seq_len']}",
                    f"{row['variants']['full']['median_s']:.3f}",
                    f"{row['variants']['builtin']['median_s']:.3f}",
                    f"{row['variants']['keras_lora']['median_s']:.3f}",
                    f"{ratios['keras_lora/full']['median']:.2f}",
                    f"{ratios['keras_lora/builtin']['median']:.2f}",
                    f"{ratios['builtin/full']['median']:.2f}",
                    f"{ratios['floor/full']['median']:.2f}",
                    f"{inf['ratios']['merged/base']['median']:.2f}"
                    if inf
                    else "",
                    f"{inf['ratios']['keras_lora/base']['median']:.2f}"
                    if inf
                    else "",
                ]
            )
        for row in (memory or {}).get("results", []):
            rows.append(
                [
                    backend,
                    f"memory: {row['model']}",
                    f"{row['total_params'] / 1e6:.0f} M params",
                    f"apply_lora peak +{row['apply_peak_growth_mib']:.0f} MiB",
                    f"adapters {row['adapter_bytes'] / 2**20:.1f} MiB",
                    f"overhead {row['apply_peak_overhead_percent']:.2f} %",
                    f"file {100 * row['file_ratio']:.3f} %",
                    "",
                    "",
                    "",
                    "",
                    "",
                ]
            )
    return rows


HEADER = [
    "backend",
    "model",
    "batch x seq",
    "full s",
    "builtin s",
    "keras_lora s",
    "lora/full (<=0.65)",
    "lora/builtin (<=0.95)",
    "builtin/full",
    "floor/full",
    "merged/base (1.00)",
    "unmerged/base (<=1.05)",
]


def markdown(rows):
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


README_TARGETS = {"qv": "query + value", "all_linear": "all linear"}
README_RATIOS = (
    "keras_lora/full",
    "keras_lora/builtin",
    "floor/full",
    "keras_lora/floor",
)


def readme_table(out="benchmarks/results", device="cpu"):
    """The README's performance table: MiniLM's train-step ratios from
    `train_step_<backend>_<device>.json`, one row per target set and
    backend (jax, torch, tensorflow)."""
    lines = [
        "| backend | targets | keras_lora / full fine-tune | keras_lora / "
        "Keras built-in LoRA | floor / full | keras_lora / floor |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    results = {
        backend: load(out, "train_step", backend, device)
        for backend in ("jax", "torch", "tensorflow")
    }
    for targets, label in README_TARGETS.items():
        for backend, result in results.items():
            if result is None:
                continue
            for row in result["results"]:
                if row["model"] != "minilm" or row["targets"] != targets:
                    continue
                cells = [
                    f"{row['ratios'][key]['median']:.2f}"
                    for key in README_RATIOS
                ]
                lines.append(
                    f"| {backend} | {label} | " + " | ".join(cells) + " |"
                )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS))
    parser.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS))
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds per subprocess"
    )
    parser.add_argument("--markdown", help="also write the summary table here")
    parser.add_argument(
        "--readme-table",
        action="store_true",
        help="print the README's performance table from the JSON in --out",
    )
    parser.add_argument(
        "--summary-only",
        action="store_true",
        help="only summarise the JSON already in --out",
    )
    args = parser.parse_args(argv)
    if args.readme_table:
        print(readme_table(args.out, args.device), end="")
        return 0
    for name in args.benchmarks:
        if name not in BENCHMARKS:
            parser.error(f"unknown benchmark {name!r}; known: {BENCHMARKS}")
    status = {}
    if not args.summary_only:
        for backend in args.backends:
            for name in args.benchmarks:
                status[(backend, name)] = run_one(
                    backend,
                    name,
                    args.size,
                    args.device,
                    args.out,
                    args.timeout,
                )
    rows = summary_rows(args.out, args.backends, args.device)
    print("\n=== Summary (median of paired per-round ratios)")
    common.print_table(HEADER, rows)
    for (backend, name), (code, seconds) in status.items():
        print(f"{backend:10s} {name:11s} exit {code} in {seconds:.0f} s")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows))
    failed = [key for key, (code, _) in status.items() if code != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
