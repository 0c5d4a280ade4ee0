"""TensorFlow SavedModel export of a LoRA model, from any Keras backend.

`export_saved_model` merges the adapters into the base weights
(`keras_lora.merge`), so the SavedModel holds plain Keras layers and no
`lora_a` / `lora_b` variables, then writes it with Keras's own
`model.export(format="tf_saved_model")` under TensorFlow:

- on the TensorFlow backend, in this process;
- on the JAX and PyTorch backends, in a subprocess with
  `KERAS_BACKEND=tensorflow` that loads the merged model from a temporary
  `.keras` file. Keras 3.15's own export fails on PyTorch even without
  LoRA, and the round trip through TensorFlow gives the same SavedModel
  (same `serve` endpoint and `serving_default` signature) whatever backend
  trained the model.

The result is written to a temporary folder next to `path` and moved into
place only when complete, so a failed export leaves nothing half-written.
"""

import dataclasses
import importlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np

from keras_lora.layers import LoRALayer
from keras_lora.layers import quantized
from keras_lora.merge import merge
from keras_lora.processes import process_count
from keras_lora.processes import process_index
from keras_lora.walk import iter_layers
from keras_lora.walk import stable_layer_paths
from keras_lora.walk import to_numpy

#: Names of the adapter variables; none may reach a SavedModel.
ADAPTER_VARIABLE_NAMES = ("lora_a", "lora_b", "lora_magnitude")


class ExportError(RuntimeError):
    """The SavedModel could not be written or does not match the model."""


@dataclasses.dataclass
class SavedModelExport:
    """What `export_saved_model` wrote.

    Attributes:
        path: str, the SavedModel folder.
        signatures: list of str, its signature keys (`serve`,
            `serving_default`).
        variables: list of str, the names of the SavedModel's variables.
        max_abs_diff: float or None, the largest absolute difference between
            the LoRA model's outputs and the reloaded SavedModel's `serve`
            outputs on `check_inputs` (None when no check was asked for).
        output_max_abs: float or None, the largest magnitude of the LoRA
            model's outputs on `check_inputs`: `max_abs_diff` relative to
            it is the check's relative error.
        seconds: float, wall time of the export.
        method: `"in-process"` (TensorFlow backend) or `"subprocess"`.
    """

    path: str
    signatures: list
    variables: list
    max_abs_diff: float = None
    output_max_abs: float = None
    seconds: float = 0.0
    method: str = ""


def _check_path(path, overwrite):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            "`path` must be a str or path-like folder name. "
            f"Received: path={path!r} of type {type(path).__name__}"
        )
    path = os.fspath(path)
    if not path.strip():
        raise ValueError(f"`path` must not be empty. Received: path={path!r}")
    if not isinstance(overwrite, bool):
        raise TypeError(
            f"`overwrite` must be a bool. Received: overwrite={overwrite!r}"
        )
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(
                "`path` exists and is not a folder; a SavedModel is a "
                f"folder. Received: path={path!r}"
            )
        if os.listdir(path) and not overwrite:
            raise FileExistsError(
                f"`path` is a non-empty folder. Received: path={path!r}. "
                "Pass overwrite=True to replace it."
            )
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"Cannot create the parent folder of `path` ({e.strerror}). "
            f"Received: path={path!r}"
        ) from None
    if not os.access(parent, os.W_OK):
        raise ValueError(
            f"The parent folder of `path` is not writable. Received: "
            f"path={path!r}"
        )
    return path


def _all_layers(model):
    return [layer for _, layer in iter_layers(model)]


def _merged_model(model, dequantize=False):
    """The model with every keras_lora layer merged (`model` if none)."""
    if not any(isinstance(layer, LoRALayer) for layer in _all_layers(model)):
        return model
    merged = merge(model, dequantize=dequantize)
    left = [
        layer.name
        for layer in _all_layers(merged)
        if isinstance(layer, LoRALayer)
    ]
    if left:
        raise ExportError(f"Layers still hold adapters after merge: {left}")
    return merged


def _spec_tree(input_signature):
    """Input signature as nested `{"shape", "dtype"}` dicts (picklable)."""

    def to_spec(x):
        if isinstance(x, keras.InputSpec):
            shape, dtype = x.shape, x.dtype
        elif hasattr(x, "shape") and hasattr(x, "dtype"):
            shape = (None,) + tuple(x.shape)[1:]
            dtype = keras.backend.standardize_dtype(x.dtype)
        else:
            raise TypeError(
                "`input_signature` entries must be keras.InputSpec, "
                f"KerasTensor or arrays. Received: {x!r}"
            )
        if shape is None or dtype is None:
            raise ValueError(
                "`input_signature` entries need a shape and a dtype. "
                f"Received: {x!r}"
            )
        return {"shape": list(shape), "dtype": str(dtype)}

    return keras.tree.map_structure(to_spec, input_signature)


def _spec_tree_to_keras(spec_tree):
    def is_leaf(x):
        return isinstance(x, dict) and set(x) == {"shape", "dtype"}

    def convert(x):
        if is_leaf(x):
            return keras.InputSpec(shape=tuple(x["shape"]), dtype=x["dtype"])
        if isinstance(x, dict):
            return {k: convert(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(convert(v) for v in x)
        return x

    return convert(spec_tree)


def _class_modules(model):
    """Top-level packages defining the model's layer classes (to import in
    the export subprocess), or raises for classes only `__main__` knows."""
    modules = set()
    for layer in [model] + _all_layers(model):
        module = type(layer).__module__
        if module == "__main__":
            raise ExportError(
                f"Layer {layer.name!r} has class {type(layer).__name__} "
                "defined in __main__; the TensorFlow export subprocess "
                "cannot import it. Move the class into an importable module "
                "(registered with keras.saving.register_keras_serializable) "
                "or export under KERAS_BACKEND=tensorflow."
            )
        top = module.split(".")[0]
        if top != "keras":
            modules.add(top)
    return sorted(modules)


def _serve_outputs(saved_model_path, inputs):
    """Loads a SavedModel with `tf.saved_model.load` and calls `serve`.

    Inputs are cast to the dtypes of the `serve` signature.
    """
    import tensorflow as tf

    loaded = tf.saved_model.load(saved_model_path)
    serve = loaded.serve
    spec = None
    concrete = getattr(serve, "concrete_functions", None)
    if concrete:
        spec = concrete[0].structured_input_signature[0]
    if spec is not None and len(spec) == 1:
        spec = spec[0]

        def cast(x, s):
            return tf.constant(np.asarray(x), dtype=s.dtype)

        try:
            args = tf.nest.map_structure(cast, inputs, spec)
        except (TypeError, ValueError):
            args = tf.nest.map_structure(tf.constant, inputs)
    else:
        args = tf.nest.map_structure(tf.constant, inputs)
    outputs = serve(args)
    return tf.nest.map_structure(lambda t: np.asarray(t.numpy()), outputs)


def saved_model_report(saved_model_path, inputs=None):
    """Reloads a SavedModel with TensorFlow and describes it.

    Args:
        saved_model_path: str, a SavedModel folder.
        inputs: optional structure of arrays matching the model's inputs;
            when given, the `serve` endpoint is called on them.

    Returns:
        A dict with `signatures` (list of str), `variables` (the variable
        names) and `outputs` (the `serve` outputs as NumPy arrays, or None).
        Imports TensorFlow in this process (it works under every Keras
        backend when TensorFlow is installed).
    """
    import tensorflow as tf

    loaded = tf.saved_model.load(saved_model_path)
    report = {
        "signatures": sorted(loaded.signatures.keys()),
        "variables": sorted(v.name for v in loaded.variables),
        "outputs": None,
    }
    if inputs is not None:
        report["outputs"] = _serve_outputs(saved_model_path, inputs)
    return report


def _export_in_process(merged, out, spec_tree, check_inputs):
    signature = None if spec_tree is None else _spec_tree_to_keras(spec_tree)
    merged.export(
        out,
        format="tf_saved_model",
        verbose=False,
        input_signature=signature,
    )
    return saved_model_report(out, check_inputs)


def _worker_main(argv=None):
    """Entry of the export subprocess (`KERAS_BACKEND=tensorflow`)."""
    job_path = (argv or sys.argv)[1]
    with open(job_path, "rb") as f:
        job = pickle.load(f)
    for module in job["modules"]:
        importlib.import_module(module)
    model = keras.saving.load_model(
        job["model_file"], compile=False, safe_mode=job["safe_mode"]
    )
    _restore_input_quantizers(model, job.get("input_quantizers", {}))
    report = _export_in_process(
        model, job["out"], job["spec_tree"], job["check_inputs"]
    )
    with open(job["report_file"], "wb") as f:
        pickle.dump(report, f)


def _input_quantizers(model):
    """`{stable path: serialized input quantizer or None}` of the model's
    quantized layers. A `.keras` file does not keep them for the layers of
    a keras-hub model (Keras 3.15 rebuilds an int4 `ReversibleEmbedding`
    with an input quantizer its original lacks), so the export subprocess
    sets them back after loading."""
    quantizers = {}
    for path, layer in stable_layer_paths(model).items():
        if getattr(layer, "quantization_mode", None) is None:
            continue
        if not hasattr(layer, "inputs_quantizer"):
            continue
        quantizer = layer.inputs_quantizer
        quantizers[path] = (
            None if quantizer is None else keras.quantizers.serialize(quantizer)
        )
    return quantizers


def _restore_input_quantizers(model, quantizers):
    layers = stable_layer_paths(model)
    for path, serialized in quantizers.items():
        layer = layers.get(path)
        if layer is None:
            continue
        quantizer = (
            None
            if serialized is None
            else keras.quantizers.deserialize(serialized)
        )
        object.__setattr__(layer, "inputs_quantizer", quantizer)


def _export_subprocess(merged, out, spec_tree, check_inputs, workdir, opts):
    model_file = os.path.join(workdir, "merged.keras")
    merged.save(model_file)
    job = {
        "input_quantizers": _input_quantizers(merged),
        "model_file": model_file,
        "out": out,
        "spec_tree": spec_tree,
        "check_inputs": check_inputs,
        "modules": _class_modules(merged),
        "safe_mode": opts["safe_mode"],
        "report_file": os.path.join(workdir, "report.pkl"),
    }
    job_file = os.path.join(workdir, "job.pkl")
    with open(job_file, "wb") as f:
        pickle.dump(job, f)
    env = dict(os.environ)
    env["KERAS_BACKEND"] = "tensorflow"
    # Export on the CPU: the SavedModel is device independent, and the
    # parent process may hold the accelerator.
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    command = [
        sys.executable,
        "-c",
        "import sys; from keras_lora.export import _worker_main; "
        "_worker_main(sys.argv)",
        job_file,
    ]
    try:
        result = subprocess.run(
            command,
            env=env,
            capture_output=True,
            text=True,
            timeout=opts["timeout"],
        )
    except subprocess.TimeoutExpired:
        raise ExportError(
            f"The TensorFlow export subprocess took longer than "
            f"timeout={opts['timeout']} s."
        ) from None
    if result.returncode != 0:
        raise ExportError(
            "The TensorFlow export subprocess failed (exit code "
            f"{result.returncode}). Its stderr ends with:\n"
            + result.stderr[-4000:]
        )
    with open(job["report_file"], "rb") as f:
        return pickle.load(f)


def _compare(expected, actual, atol, rtol):
    expected_leaves = keras.tree.flatten(expected)
    actual_leaves = keras.tree.flatten(actual)
    if len(expected_leaves) != len(actual_leaves):
        raise ExportError(
            f"The SavedModel returns {len(actual_leaves)} outputs; the model "
            f"returns {len(expected_leaves)}."
        )
    worst = 0.0
    largest = 0.0
    for e, a in zip(expected_leaves, actual_leaves, strict=True):
        e = np.asarray(e, dtype="float64")
        a = np.asarray(a, dtype="float64")
        if e.shape != a.shape:
            raise ExportError(
                f"SavedModel output shape {a.shape} differs from the model's "
                f"{e.shape}."
            )
        diff = np.abs(e - a)
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
        # Rounding differences scale with the output's magnitude, so rtol
        # is relative to the output's largest magnitude.
        scale = float(np.abs(e).max()) if e.size else 0.0
        largest = max(largest, scale)
        if not np.all(diff <= atol + rtol * scale):
            raise ExportError(
                "The reloaded SavedModel's `serve` outputs differ from the "
                f"model's: max abs diff {float(diff.max()):.3g} > atol={atol}"
                f" + rtol={rtol} * max |output| ({scale:.3g})."
            )
    return worst, largest


def _has_quantized_layers(model):
    return any(
        quantized.quantization_mode(layer) is not None
        for _, layer in iter_layers(model)
    )


def export_saved_model(
    model: keras.Model,
    path: str | os.PathLike,
    overwrite: bool = False,
    check_inputs=None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    input_signature=None,
    safe_mode: bool = True,
    timeout: float = 900,
    method: str = "auto",
    dequantize: bool = False,
) -> SavedModelExport:
    """Merges the adapters and writes a TensorFlow SavedModel for serving.

    Works from the TensorFlow, JAX and PyTorch backends alike. The
    SavedModel has a `serve` endpoint (and the `serving_default` signature
    TF Serving uses) that computes the merged model's forward pass, with
    the LoRA updates folded into the base kernels (`W + s * A @ B`, Hu et
    al. 2021, arXiv:2106.09685, sec. 4.1): no adapter variables and no
    extra matmuls at serving time. `model` itself is not changed.

    On the JAX and PyTorch backends the merged model is saved to a
    temporary `.keras` file and exported by a subprocess running Keras on
    TensorFlow; its layer classes must therefore be importable there (Keras
    and keras-hub classes are; classes defined in `__main__` are refused
    with a clear error).

    Args:
        model: a built `keras.Model`, with or without keras_lora layers
            (functional, sequential, keras-hub backbones and tasks).
        path: str or path-like, the SavedModel folder to write. Parent
            folders are created.
        overwrite: bool, default `False`: replace a non-empty folder at
            `path` (only once the new export is complete).
        check_inputs: optional structure of arrays in the model's input
            structure (e.g. a dict `{"token_ids": ..., "padding_mask": ...}`
            of shape `(batch, seq_len)`). When given, the SavedModel is
            reloaded with `tf.saved_model.load`, `serve` is called on them
            and its outputs must equal `model`'s (the LoRA model's) within
            `atol + rtol * max(|output|)` for each output, else
            `ExportError` is raised and nothing is written at `path`. A
            model with quantized layers is checked against its merged model
            (`keras_lora.merge(model, dequantize=dequantize)`), which differs
            from the LoRA model by the re-quantized update (or, dequantized,
            by the activation rounding of int8 layers): see
            `keras_lora.merge`.
        atol: float, the absolute tolerance of that check. Defaults to
            `1e-4`.
        rtol: float, the relative tolerance of that check, relative to
            each output's largest magnitude: merged kernels round
            differently from the unmerged branches, by an amount that
            scales with the output. Defaults to `1e-4`.
        input_signature: optional structure of `keras.InputSpec` (or
            KerasTensors / arrays, whose batch axis is made dynamic), for
            models without functional inputs. Defaults to Keras's inference
            from `model.inputs`.
        safe_mode: bool, passed to `keras.saving.load_model` in the
            subprocess (set `False` for models with `Lambda` layers).
        timeout: float, seconds the export subprocess may take; default 900.
        method: `"auto"` (default: in this process on the TensorFlow
            backend, else in a TensorFlow subprocess), `"subprocess"`
            (always a subprocess, on any backend) or `"in-process"`
            (TensorFlow backend only).
        dequantize: bool, for a quantized base (QLoRA): `False` (default)
            exports the merged model in the base's quantization mode (the
            update re-quantized, see `keras_lora.merge`), `True` a float
            model with the exact `W_deq + s * A @ B`.

    Returns:
        A `SavedModelExport` (path, signature keys, variable names,
        `max_abs_diff` of the check, seconds, method).

    Raises:
        TypeError: `model` is not a `keras.Model`, or `path` / `overwrite`
            have the wrong type.
        ValueError: `model` is not built; this is a multi-process run
            (`keras_lora.processes.process_count() > 1`); `path` is empty,
            is a file, or its parent cannot be created or written;
            `method` is unknown, or `"in-process"` on a backend other than
            TensorFlow.
        FileExistsError: `path` is a non-empty folder and `overwrite=False`.
        ExportError: merging left adapters, the subprocess failed (its
            stderr is in the message) or timed out, the SavedModel holds
            adapter variables, or the `check_inputs` outputs differ.

    Examples:
        >>> lora_model = keras_lora.apply_lora(model, rank=4)  # doctest: +SKIP
        >>> lora_model.fit(x, y)  # doctest: +SKIP
        >>> keras_lora.export_saved_model(lora_model, "serving/1",
        ...                               check_inputs=x[:8])  # doctest: +SKIP
        >>> import tensorflow as tf  # doctest: +SKIP
        >>> tf.saved_model.load("serving/1").serve(x[:8])  # doctest: +SKIP
    """
    start = time.perf_counter()
    if not isinstance(model, keras.Model):
        raise TypeError(
            "`model` must be a keras.Model. Received: model of type "
            f"{type(model).__module__}.{type(model).__name__}"
        )
    if not model.built:
        raise ValueError(
            f"`model` must be built before export. Received: unbuilt model "
            f"{model.name!r}; call it on a batch first."
        )
    if method not in ("auto", "subprocess", "in-process"):
        raise ValueError(
            "`method` must be 'auto', 'subprocess' or 'in-process'. "
            f"Received: method={method!r}"
        )
    if process_count() > 1:
        raise ValueError(
            f"export_saved_model runs in one process; this is process "
            f"{process_index()} of {process_count()}. Save the adapters with "
            "`keras_lora.save_adapters` (on every process), then in one "
            "process rebuild the base model, `keras_lora.load_adapters` and "
            "export. Received: model "
            f"{model.name!r}"
        )
    on_tf = keras.backend.backend() == "tensorflow"
    if method == "in-process" and not on_tf:
        raise ValueError(
            "method='in-process' needs the TensorFlow backend; this is "
            f"{keras.backend.backend()!r}. Received: method={method!r}"
        )
    in_process = on_tf and method != "subprocess"
    path = _check_path(path, overwrite)
    spec_tree = None if input_signature is None else _spec_tree(input_signature)
    expected = None
    if check_inputs is not None:
        check_inputs = to_numpy(check_inputs)
        expected = to_numpy(model(check_inputs, training=False))
    merged = _merged_model(model, dequantize)
    if expected is not None and _has_quantized_layers(model):
        # Re-quantizing the update (or, dequantized, the float computation
        # of an int8 base) changes the outputs by design: the SavedModel is
        # checked against the merged model it serves.
        expected = to_numpy(merged(check_inputs, training=False))

    parent = os.path.dirname(path)
    staging = tempfile.mkdtemp(
        prefix=f".{os.path.basename(path)}.export-", dir=parent
    )
    out = os.path.join(staging, "saved_model")
    try:
        if in_process:
            report = _export_in_process(merged, out, spec_tree, check_inputs)
        else:
            report = _export_subprocess(
                merged,
                out,
                spec_tree,
                check_inputs,
                staging,
                {"safe_mode": safe_mode, "timeout": timeout},
            )
        leaked = [
            name
            for name in report["variables"]
            if any(n in name for n in ADAPTER_VARIABLE_NAMES)
        ]
        if leaked:
            raise ExportError(
                f"The SavedModel holds adapter variables: {leaked}"
            )
        max_abs_diff = output_max_abs = None
        if expected is not None:
            max_abs_diff, output_max_abs = _compare(
                expected, report["outputs"], atol, rtol
            )
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(out, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return SavedModelExport(
        path=path,
        signatures=report["signatures"],
        variables=report["variables"],
        max_abs_diff=max_abs_diff,
        output_max_abs=output_max_abs,
        seconds=time.perf_counter() - start,
        method="in-process" if in_process else "subprocess",
    )


def saved_model_cli_show(path, timeout=300):
    """Runs `saved_model_cli show --dir PATH --all` and returns its stdout.

    Args:
        path: str, a SavedModel folder.
        timeout: float, seconds; default 300.

    Raises:
        ExportError: if the command fails.
    """
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [
        sys.executable,
        "-m",
        "tensorflow.python.tools.saved_model_cli",
        "show",
        "--dir",
        os.fspath(path),
        "--all",
    ]
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise ExportError(
            f"saved_model_cli failed (exit code {result.returncode}):\n"
            + result.stderr[-4000:]
        )
    return result.stdout


__all__ = [
    "ExportError",
    "SavedModelExport",
    "export_saved_model",
    "saved_model_cli_show",
    "saved_model_report",
]
