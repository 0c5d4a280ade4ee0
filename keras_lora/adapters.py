"""Adapter checkpoints: only the LoRA variables, keyed by stable layer path.

`save_adapters(model, path)` writes one safetensors file holding the adapter
variables (`lora_a`, `lora_b`, and the bias of layers built with
`train_bias=True`) and, in the file's metadata, a JSON config: each adapted
layer's path, class, rank, alpha, rsLoRA flag, dropout and variable shapes,
plus the keras_lora and Keras versions, the backend and the base model's class.
Tensor keys are `<layer path>.<variable name>`, e.g.
`decoder_block_0/attention/query.lora_a`, and the config records each
layer's stable path too (`keras_lora.walk`: where Keras's saving library
stores it, never an auto-numbered name). A model built again gets each
adapter on the layer of the same layer path when every stored path exists in
it; where Keras numbered names differently (the same architecture built
twice in one process gives `gemma_backbone_1/...`, unnamed sub-layers get
new numbers) layers are matched by stable path.

`load_adapters(model, path)` validates everything first (missing, extra and
mis-shaped keys are listed together in one error) and only then assigns, so a
failed load leaves the model unchanged.

The file is backend-neutral (float32 NumPy arrays): a file written on
TensorFlow loads on JAX or PyTorch and gives equal outputs.
"""

import json
import os
import re

import keras
import numpy as np

from keras_lora.apply import apply_lora
from keras_lora.saving import base_class_of
from keras_lora.walk import iter_layers
from keras_lora.walk import lora_layers
from keras_lora.walk import require_lora_layers
from keras_lora.walk import reset_compiled_functions
from keras_lora.walk import stable_path_of
from keras_lora.walk import to_numpy

#: Name of the safetensors metadata entry that holds the JSON config.
CONFIG_KEY = "keras_lora_config"
FORMAT_NAME = "keras_lora.adapters"
FORMAT_VERSION = 1


class AdapterMismatchError(ValueError):
    """Raised when a checkpoint and a model's adapters do not match.

    Attributes:
        missing: keys the model expects that the checkpoint lacks.
        unexpected: keys in the checkpoint that the model lacks.
        mismatched: `{key: (model_shape, checkpoint_shape)}`.
    """

    def __init__(self, message, missing=(), unexpected=(), mismatched=None):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = dict(mismatched or {})


# -- Finding LoRA layers by path ---------------------------------------------


# -- Collecting the adapter state -------------------------------------------


def _layer_variables(layer):
    """`{name: variable}`: the adapter pairs, plus the bias if trained."""
    variables = dict(layer.adapter_weights())
    if getattr(layer, "train_bias", False):
        bias = layer.base_weights().get("bias")
        if bias is not None:
            variables["bias"] = bias
    return variables


def _layer_config(layer, variables, stable_path):
    return {
        "stable_path": stable_path,
        "class": type(layer).__name__,
        "base_class": type(layer).base_class.__name__,
        "rank": int(layer.adapter_rank),
        "alpha": float(layer.adapter_alpha),
        "use_rslora": bool(layer.use_rslora),
        "dropout": float(layer.adapter_dropout),
        "train_bias": bool(layer.train_bias),
        "shapes": {n: list(v.shape) for n, v in variables.items()},
    }


def adapter_state(model):
    """Returns `(tensors, config)`: the model's adapters as NumPy arrays.

    Args:
        model: a model (or layer) holding keras_lora layers.

    Returns:
        `tensors`: `{"<path>.<name>": float32 np.ndarray}`; `config`: the
        JSON-serializable dict `save_adapters` writes.

    Raises:
        ValueError: if the model has no keras_lora layer, or a layer is
            merged in place (its base weights hold the adapter; unmerge
            first) or not built.
    """
    layers = require_lora_layers(model, "save adapters")
    tensors = {}
    layer_configs = {}
    stable = stable_path_of(model)
    for path, layer in layers.items():
        if not layer.built:
            raise ValueError(
                f"Layer '{path}' is not built; call the model once first."
            )
        if layer.merged and getattr(layer, "train_bias", False):
            raise ValueError(
                f"Layer '{path}' is merged in place; call "
                "`unmerge_adapter()` before saving its trained bias."
            )
        variables = _layer_variables(layer)
        for name, variable in variables.items():
            value = to_numpy(variable)
            if name == "bias" and layer.merged:
                value = to_numpy(layer.original_value("bias"))
            tensors[f"{path}.{name}"] = np.ascontiguousarray(value)
        layer_configs[path] = _layer_config(
            layer, variables, stable.get(id(layer))
        )
    from keras_lora import __version__

    ranks = {c["rank"] for c in layer_configs.values()}
    alphas = {c["alpha"] for c in layer_configs.values()}
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "keras_lora_version": __version__,
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
        "base_model_class": f"{base_class_of(model).__module__}."
        f"{base_class_of(model).__qualname__}",
        "rank": ranks.pop() if len(ranks) == 1 else None,
        "alpha": alphas.pop() if len(alphas) == 1 else None,
        "targets": list(layer_configs),
        "layers": layer_configs,
    }
    return tensors, config


# -- Files --------------------------------------------------------------------


def save_adapters(model: keras.Model, path: str | os.PathLike) -> dict:
    """Writes the model's adapters (only) to a safetensors file.

    Args:
        model: a model holding keras_lora layers (from `apply_lora`, or
            built with LoRA layers).
        path: str or path-like, the file to write (conventionally ending in
            `.safetensors`); its directory must exist. Overwritten if present.

    Returns:
        The JSON config written into the file's metadata (a dict).

    Raises:
        ValueError: no LoRA layers, an unbuilt layer, or a bad `path`.

    Example:

    >>> kl.save_adapters(model, "adapters.safetensors")  # doctest: +SKIP
    """
    from safetensors.numpy import save_file

    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(
            f"`path` must be a file, not a directory. Received: path={path!r}"
        )
    tensors, config = adapter_state(model)
    save_file(tensors, path, metadata={CONFIG_KEY: json.dumps(config)})
    return config


def read_adapters(path):
    """Reads a file written by `save_adapters`.

    Args:
        path: str or path-like.

    Returns:
        `(tensors, config)` as in `adapter_state`.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if the file has no keras_lora config (e.g. a PEFT file:
            use `keras_lora.peft.load_peft_adapter`).
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No adapter file at `path`. Received: path={path!r}"
        )
    with safe_open(path, framework="numpy") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if CONFIG_KEY not in metadata:
        raise ValueError(
            f"{path!r} is not a keras_lora adapter file (no "
            f"'{CONFIG_KEY}' metadata). For a PEFT adapter directory use "
            "`keras_lora.peft.load_peft_adapter`."
        )
    config = json.loads(metadata[CONFIG_KEY])
    if config.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path!r}: unknown adapter format {config.get('format')!r}."
        )
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path!r} has format_version={config['format_version']}; this "
            f"keras_lora reads up to {FORMAT_VERSION}. Upgrade keras_lora."
        )
    return tensors, config


def _apply_stored_config(model, config):
    """Applies LoRA to a plain model as described by a stored config."""
    layers = config["layers"]
    first = next(iter(layers.values()))

    # Layer paths as they are, or re-keyed by stable path for a model built
    # again (whose names Keras numbered anew); a regex must fullmatch.
    rename = _stable_rename(model, dict(iter_layers(model)), layers) or {}

    def exact(stored):
        return re.compile(re.escape(rename.get(stored, stored)))

    patterns = {p: exact(p) for p in layers}
    return apply_lora(
        model,
        rank=first["rank"],
        alpha=first["alpha"],
        targets=list(patterns.values()),
        dropout=first["dropout"],
        use_rslora=first["use_rslora"],
        train_bias=first["train_bias"],
        rank_pattern={patterns[p]: c["rank"] for p, c in layers.items()},
        alpha_pattern={patterns[p]: c["alpha"] for p, c in layers.items()},
    )


_NUMBERED = re.compile(r"_\d+$")


def _same_up_to_numbering(stored_path, model_path):
    """Whether two layer paths differ only in Keras's numbering of names
    (`gemma_backbone` / `gemma_backbone_1`, `dense_40` / `dense_85`): a layer
    named differently by the user is a different layer."""
    a, b = stored_path.split("/"), model_path.split("/")
    return len(a) == len(b) and all(
        _NUMBERED.sub("", x) == _NUMBERED.sub("", y)
        for x, y in zip(a, b, strict=True)
    )


def _stable_rename(model, layers, stored):
    """`{stored layer path: model layer path}` by stable path, or `None`.

    `None` when every stored path exists in `model` (`layers`: `{path:
    layer}`), when the file has no stable paths, or when not every stored
    layer has its own counterpart whose path differs only in Keras's
    numbering (then nothing is loaded elsewhere: the mismatch is reported).
    """
    if (
        not stored
        or set(stored) <= set(layers)
        or not all("stable_path" in c for c in stored.values())
    ):
        return None
    stable = stable_path_of(model)
    by_stable = {stable.get(id(layer)): path for path, layer in layers.items()}
    rename = {
        old: by_stable[c["stable_path"]]
        for old, c in stored.items()
        if c["stable_path"] in by_stable
        and _same_up_to_numbering(old, by_stable[c["stable_path"]])
    }
    if len(rename) != len(stored) or len(set(rename.values())) != len(rename):
        return None
    return rename


def rekey_to_model(model, layers, tensors, config):
    """Re-keys a file's tensors and layer configs from the layer paths it
    was saved with to `model`'s layer paths (`_stable_rename`)."""
    stored = config.get("layers") or {}
    rename = _stable_rename(model, layers, stored)
    if rename is None:
        return tensors, stored
    renamed = {}
    for key, value in tensors.items():
        old, _, name = key.rpartition(".")
        renamed[f"{rename.get(old, old)}.{name}"] = value
    return renamed, {rename.get(p, p): c for p, c in stored.items()}


def check_adapter_state(layers, tensors):
    """Compares a model's adapter variables with checkpoint tensors.

    Args:
        layers: `{path: lora_layer}`.
        tensors: `{"<path>.<name>": array}`.

    Returns:
        `{key: (layer, variable_name)}` for every key, when all match.

    Raises:
        AdapterMismatchError: listing every missing, unexpected and
            mis-shaped key at once.
    """
    expected = {}
    shapes = {}
    for path, layer in layers.items():
        for name, variable in _layer_variables(layer).items():
            key = f"{path}.{name}"
            expected[key] = (layer, name)
            shapes[key] = tuple(variable.shape)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = {
        key: (shapes[key], tuple(tensors[key].shape))
        for key in sorted(set(expected) & set(tensors))
        if tuple(tensors[key].shape) != shapes[key]
    }
    if missing or unexpected or mismatched:
        lines = ["The adapter checkpoint does not match the model:"]
        if missing:
            lines.append(f"  missing from the checkpoint: {missing}")
        if unexpected:
            lines.append(f"  not in the model: {unexpected}")
        for key, (model_shape, file_shape) in mismatched.items():
            lines.append(
                f"  shape of {key!r}: model {model_shape}, checkpoint "
                f"{file_shape}"
            )
        lines.append(f"  model layer paths: {sorted(layers)}")
        lines.append("Nothing was loaded.")
        raise AdapterMismatchError(
            "\n".join(lines), missing, unexpected, mismatched
        )
    return expected


def assign_adapter_state(layers, tensors, layer_configs=None):
    """Validates, then assigns; the model is unchanged if validation fails.

    Args:
        layers: `{path: lora_layer}`.
        tensors: `{"<path>.<name>": array}`.
        layer_configs: optional `{path: {"alpha", "use_rslora", "dropout"}}`
            applied to the layers so their scaling matches the checkpoint.

    Raises:
        AdapterMismatchError: see `check_adapter_state`.
        ValueError: if a layer is merged in place (unmerge first).
    """
    expected = check_adapter_state(layers, tensors)
    merged = sorted(p for p, layer in layers.items() if layer.merged)
    if merged:
        raise ValueError(
            f"Layers {merged} are merged in place; call "
            "`keras_lora.unmerge_adapters(model)` before loading adapters."
        )
    values = {}
    for key, (layer, name) in expected.items():
        variable = _layer_variables(layer)[name]
        value = np.asarray(tensors[key])
        if not np.all(np.isfinite(value)):
            raise ValueError(
                f"Checkpoint tensor {key!r} has non-finite values; nothing "
                "was loaded."
            )
        values[key] = (variable, value.astype(variable.dtype))
    for variable, value in values.values():
        variable.assign(value)
    for path, config in (layer_configs or {}).items():
        layer = layers[path]
        layer.adapter_alpha = config.get("alpha", layer.adapter_alpha)
        layer.use_rslora = config.get("use_rslora", layer.use_rslora)


def load_adapters(model: keras.Model, path: str | os.PathLike) -> keras.Model:
    """Loads adapters saved by `save_adapters`, matched by layer path, or by
    stable path where the model's layer names are numbered differently.

    If `model` has no keras_lora layers, LoRA is first applied with the
    stored config (`keras_lora.apply_lora(model, targets=<stored paths>,
    rank_pattern=..., alpha_pattern=...)`), which returns a new model; the
    model given is then left as it was. Every key, shape and value is checked
    before anything is assigned: a failed load leaves the model unchanged.
    Each layer's alpha and rsLoRA flag are set from the file.

    Args:
        model: a `keras.Model`, adapted or plain, built.
        path: str or path-like, a file written by `save_adapters`.

    Returns:
        The model holding the loaded adapters: `model` itself when it
        already had keras_lora layers, else the adapted clone.

    Raises:
        AdapterMismatchError (a ValueError): missing, unexpected or
            mis-shaped keys, all listed.
        FileNotFoundError: no file at `path`.
        ValueError: not a keras_lora adapter file; a layer merged in place.

    Example:

    >>> model = kl.load_adapters(model, "a.safetensors")  # doctest: +SKIP
    """
    tensors, config = read_adapters(path)
    layers = lora_layers(model)
    if not layers:
        model = _apply_stored_config(model, config)
        layers = lora_layers(model)
    tensors, layer_configs = rekey_to_model(model, layers, tensors, config)
    assign_adapter_state(layers, tensors, layer_configs)
    reset_compiled_functions(model)
    return model
