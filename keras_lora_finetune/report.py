"""Progress display, the loss plot and the markdown summary of a run."""

import contextlib
import os
import time

#: Held-out examples shown with their predictions in summary.md.
EXAMPLES_SHOWN = 8


class Steps:
    """Numbered steps, each with a progress bar (rich) and its wall time.

    `with steps("fit", total=n) as bar:` shows a bar of `n` units;
    `bar(k, info=s)` advances it by `k` and shows `s` next to it; the
    step's wall time is kept in `times[key or title]`. A long
    step without a count (`total=None`, `bar=True`) shows a pulsing bar and
    the elapsed time on a terminal; `bar=False` shows none. On a terminal
    the bar updates live; in a log file only counted bars are printed,
    once, in their final state.
    """

    def __init__(self, total):
        from rich.console import Console

        self.total = total
        self.n = 0
        self.times = {}
        self.console = Console(highlight=False)

    @contextlib.contextmanager
    def __call__(self, title, total=None, bar=True, key=None):
        from rich.progress import BarColumn
        from rich.progress import MofNCompleteColumn
        from rich.progress import Progress
        from rich.progress import SpinnerColumn
        from rich.progress import TextColumn
        from rich.progress import TimeElapsedColumn

        self.n += 1
        self.console.print(f"[{self.n}/{self.total}] {title}", markup=False)
        columns = [SpinnerColumn(finished_text=" "), BarColumn()]
        if total is not None:
            columns.append(MofNCompleteColumn())
        columns += [TimeElapsedColumn(), TextColumn("{task.fields[info]}")]
        start = time.perf_counter()
        show = bar and (total is not None or self.console.is_terminal)
        with Progress(
            *columns, console=self.console, disable=not show
        ) as progress:
            task = progress.add_task(title, total=total, info="")

            def advance(units=1, info=None):
                fields = {} if info is None else {"info": info}
                progress.update(task, advance=units, **fields)

            yield advance
            if total is None:
                progress.update(task, total=1, completed=1)
        seconds = time.perf_counter() - start
        self.times[key or title] = round(seconds, 2)
        self.console.print(f"      done in {seconds:.1f} s", markup=False)

    def say(self, text):
        """Prints a detail line under the current step."""
        self.console.print(f"      {text}", markup=False, soft_wrap=True)


def _names(value):
    return value if isinstance(value, str) else ", ".join(value)


def human_bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024.0
    return f"{n:.1f} GB"


def folder_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(root, name))
    return total


def plot_loss(step_losses, held_out, epoch_ends, path, title, score_name):
    """Writes loss.png: the training loss of every step (and its moving
    mean), and on a second axis the held-out score before training (step 0)
    and after each epoch.

    Args:
        step_losses: the loss of each training step (list of float).
        held_out: `[(step, score), ...]`, step 0 first (before training).
        epoch_ends: the step count at the end of each epoch.
        path: the PNG file to write.
        title: the plot title.
        score_name: what `held_out` measures (axis label).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=100)
    steps = np.arange(1, len(step_losses) + 1)
    ax.plot(steps, step_losses, lw=0.6, alpha=0.45, label="loss per step")
    window = max(1, min(25, len(step_losses) // 10))
    if window > 1:
        kernel = np.ones(window) / window
        smooth = np.convolve(step_losses, kernel, mode="valid")
        ax.plot(
            steps[window - 1 :],
            smooth,
            lw=1.4,
            label=f"moving mean ({window} steps)",
        )
    for step in epoch_ends[:-1]:
        ax.axvline(step, color="gray", lw=0.5, ls="--")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss")
    right = ax.twinx()
    xs = [s for s, _ in held_out]
    ys = [v for _, v in held_out]
    right.plot(xs, ys, "o-", color="tab:red", label=f"held-out {score_name}")
    right.annotate(
        f"before {ys[0]:.3f}",
        (xs[0], ys[0]),
        textcoords="offset points",
        xytext=(6, -12),
        fontsize=8,
        color="tab:red",
    )
    right.annotate(
        f"after {ys[-1]:.3f}",
        (xs[-1], ys[-1]),
        textcoords="offset points",
        xytext=(-70, -14),
        fontsize=8,
        color="tab:red",
    )
    right.set_ylabel(f"held-out {score_name}")
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(
        lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper center"
    )
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _quantized_lines(s):
    """The QLoRA line of summary.md (none for a float32 base)."""
    if not s.get("quantize"):
        return []
    before, after = s["backbone_weight_bytes"]
    return [
        f"- base: backbone quantized to {s['quantize']} (weights "
        f"{human_bytes(before)} -> {human_bytes(after)}; predictions before "
        f"training differ from the float32 base by up to "
        f"{s['quantization_gap']:.2e}); adapters float32; merged into float "
        "kernels (W_deq + s*A*B)"
    ]


def _merged_scores(s):
    if not s.get("merged_held_out"):
        return ""
    return f"; merged model held-out {_score_text(s['merged_held_out'])}"


def _score_text(scores):
    return ", ".join(
        f"{key} {value:.4f}" for key, value in scores.items() if key != "score"
    )


def write_markdown(summary, path):
    """Writes summary.md from the run's summary dict."""
    s = summary
    before, after = s["held_out_before"], s["held_out_after"]
    lines = [
        "# keras-lora-finetune run",
        "",
        f"- model: `{s['preset_name']}` ({s['total_params']:,} parameters)",
        f"- data: {s['data']} ({s['train_examples']} train / "
        f"{s['held_out_examples']} held-out, seed {s['seed']}), task "
        f"{s['task']}",
        f"- backend: {s['backend']}; machine: {s['machine']}",
        f"- LoRA: rank {s['rank']}, alpha {s['alpha']}, targets "
        f"{_names(s['targets'])}"
        + (f", exclude {_names(s['exclude'])}" if s.get("exclude") else "")
        + f" ({s['lora_layers']} layers)",
        *_quantized_lines(s),
        f"- trainable parameters: {s['trainable_params']:,} of "
        f"{s['total_params']:,} ({s['trainable_percent']:.3f} %)",
        f"- training: {s['epochs']} epoch(s), batch {s['batch_size']}, "
        f"lr {s['learning_rate']}, seq len {s['seq_len']}, "
        f"{s['times_s'].get('fit', 0):.0f} s",
        "",
        "| held-out | before | after |",
        "|---|---|---|",
    ]
    for key in before:
        if key != "score":
            lines.append(f"| {key} | {before[key]:.4f} | {after[key]:.4f} |")
    lines += ["", "Held-out score after each epoch:", ""]
    lines += ["| epoch | step | " + s["score_name"] + " |", "|---|---|---|"]
    lines.append(f"| 0 (before) | 0 | {before['score']:.4f} |")
    for epoch, (step, score) in enumerate(s["held_out_curve"][1:], 1):
        lines.append(f"| {epoch} | {step} | {score:.4f} |")
    lines += [
        "",
        "Example held-out predictions (first "
        f"{len(s['examples'])} of the held-out split):",
        "",
        "| text | label | before | after |",
        "|---|---|---|---|",
    ]
    for ex in s["examples"]:
        text = ex["text"].replace("|", "\\|")
        lines.append(
            f"| {text} | {ex['label']} | {ex['before']} | {ex['after']} |"
        )
    lines += [
        "",
        f"- merged vs LoRA model: max abs diff {s['merge_max_abs_diff']:.2e}"
        + _merged_scores(s),
        f"- SavedModel (`saved_model/`): serve outputs vs "
        f"{'float merged' if s.get('quantize') else 'LoRA'} model max abs "
        f"diff {s['saved_model_max_abs_diff']:.2e}; no adapter variables",
        f"- adapters (`adapters.safetensors`): "
        f"{human_bytes(s['adapter_file_bytes'])} vs full model variables "
        f"{human_bytes(s['full_model_bytes'])}",
        f"- total wall time: {s['total_seconds']:.0f} s",
        "",
        "Run the fine-tuned model on new text:",
        "",
        "```bash",
        f"keras-lora-finetune predict --adapters {s['output']}/"
        'adapters.safetensors "what a lovely day"',
        "```",
        "",
        "![training loss and held-out score](loss.png)",
        "",
    ]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
