"""Adapter checkpoints: only the LoRA variables, keyed by stable layer path.

`save_adapters(model, path)` writes one safetensors file holding the adapter
variables (`lora_a`, `lora_b`, the DoRA magnitude `lora_magnitude` of
`use_dora` layers, and the bias of layers built with `train_bias=True`)
and, in the file's metadata, a JSON config: each adapted layer's path,
class, rank, alpha, rsLoRA and DoRA flags, dropout and variable shapes,
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
import warnings

import keras
import numpy as np

from keras_lora.apply import apply_lora
from keras_lora.banks import DEFAULT_ADAPTER
from keras_lora.banks import banks_of
from keras_lora.banks import named_layers
from keras_lora.banks import zero_b
from keras_lora.layers import LoRALayer
from keras_lora.processes import is_main_process
from keras_lora.processes import wait_for_writer
from keras_lora.saving import base_class_of
from keras_lora.walk import is_weighted_leaf
from keras_lora.walk import iter_layers
from keras_lora.walk import lora_layers
from keras_lora.walk import require_lora_layers
from keras_lora.walk import reset_compiled_functions
from keras_lora.walk import stable_path_of
from keras_lora.walk import to_numpy
from keras_lora.walk import traced_state

#: Name of the safetensors metadata entry that holds the JSON config.
CONFIG_KEY = "keras_lora_config"
FORMAT_NAME = "keras_lora.adapters"
#: Files with one adapter are version 1; version 2 holds several.
FORMAT_VERSION = 2


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


def _layer_config(layer, shapes, stable_path):
    return {
        "stable_path": stable_path,
        "class": type(layer).__name__,
        "base_class": type(layer).base_class.__name__,
        "rank": int(layer.adapter_rank),
        "alpha": float(layer.adapter_alpha),
        "use_rslora": bool(layer.use_rslora),
        "dropout": float(layer.adapter_dropout),
        "train_bias": bool(layer.train_bias),
        "use_dora": bool(layer.use_dora),
        "shapes": {n: list(shape) for n, shape in shapes.items()},
    }


def adapter_state(model, name=None):
    """Returns `(tensors, config)`: one adapter of the model as NumPy arrays.

    Args:
        model: a model (or layer) holding keras_lora layers.
        name: `None` (default) for the active adapter (the one the layers'
            variables hold), or the name of one of the model's named
            adapters (`keras_lora.multi`).

    Returns:
        `tensors`: `{"<path>.<name>": float32 np.ndarray}`; `config`: the
        JSON-serializable dict `save_adapters` writes.

    Raises:
        ValueError: if the model has no keras_lora layer, or a layer is
            merged in place (its base weights hold the adapter; unmerge
            first) or not built.
    """
    layers = require_lora_layers(model, "save adapters")
    disabled = sorted(p for p, lay in layers.items() if lay.adapters_disabled)
    if disabled:
        raise ValueError(
            "Cannot save adapters inside `keras_lora.multi.disable_adapters` "
            f"(B is zero there in {disabled}); save after the block."
        )
    banks = banks_of(layers)
    if banks is not None and name is not None and name != banks[0].active:
        return _bank_state(model, layers, name)
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
        values = {n: to_numpy(v) for n, v in variables.items()}
        if "bias" in values and layer.merged:
            values["bias"] = to_numpy(layer.original_value("bias"))
        if layer.has_residual:
            # PiSSA / OLoRA: the update of the original weights, rank 2r.
            plain, rank, alpha = layer.plain_lora_state()
            values.update(plain)
        for var, value in values.items():
            tensors[f"{path}.{var}"] = np.ascontiguousarray(value)
        config = _layer_config(
            layer,
            {n: v.shape for n, v in values.items()},
            stable.get(id(layer)),
        )
        if layer.has_residual:
            config.update(rank=rank, alpha=float(alpha))
            config["converted_from"] = layer.lora_init
        layer_configs[path] = config
    return tensors, _file_config(model, layer_configs)


def _bank_state(model, layers, name):
    """`adapter_state` of a named adapter that is not active."""
    tensors = {}
    layer_configs = {}
    stable = stable_path_of(model)
    for path, layer in layers.items():
        entry = layer.adapter_bank.entry(name)
        for var, value in entry["values"].items():
            tensors[f"{path}.{var}"] = np.ascontiguousarray(value)
        config = _layer_config(
            layer,
            {n: v.shape for n, v in entry["values"].items()},
            stable.get(id(layer)),
        )
        config["alpha"] = float(entry["alpha"])
        config["use_rslora"] = bool(entry["use_rslora"])
        layer_configs[path] = config
    return tensors, _file_config(model, layer_configs)


def _file_config(model, layer_configs):
    from keras_lora import __version__

    ranks = {c["rank"] for c in layer_configs.values()}
    alphas = {c["alpha"] for c in layer_configs.values()}
    return {
        "format": FORMAT_NAME,
        "format_version": 1,
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


def _select(available, adapters, where):
    """The adapter names `adapters` selects from `available` (a list)."""
    if adapters is None:
        return list(available)
    selected = [adapters] if isinstance(adapters, str) else adapters
    if (
        not isinstance(selected, list | tuple)
        or not selected
        or not all(isinstance(n, str) for n in selected)
        or len(set(selected)) != len(selected)
    ):
        raise ValueError(
            "`adapters` must be None (all), an adapter name or a list of "
            f"distinct names. Received: adapters={adapters!r}"
        )
    unknown = [n for n in selected if n not in available]
    if unknown:
        raise ValueError(
            f"No adapter named {unknown} in {where}. Received: "
            f"adapters={adapters!r}; {where} has {list(available)}."
        )
    return list(selected)


# -- Files --------------------------------------------------------------------


def save_adapters(
    model: keras.Model,
    path: str | os.PathLike,
    adapters: str | list[str] | None = None,
) -> dict:
    """Writes the model's adapters (only) to a safetensors file.

    A model with named adapters (`keras_lora.multi.add_adapter`) has all of
    them written by default, with their alpha and rsLoRA flags and which one
    is active; `load_adapters` restores them under their own names.

    In a multi-process run (`keras_lora.processes.process_count() > 1`:
    JAX after `keras.distribution.initialize`, TensorFlow workers with
    `TF_CONFIG`, a torch process group) call it on every process with the
    same `path`: adapters sharded across processes are gathered (JAX), only
    process 0 writes the file, and on JAX and PyTorch every process returns
    once it is written.

    Args:
        model: a model holding keras_lora layers (from `apply_lora`, or
            built with LoRA layers).
        path: str or path-like, the file to write (conventionally ending in
            `.safetensors`); its directory must exist. Overwritten if present.
        adapters: `None` (default) for every adapter of the model (a model
            without named adapters has one, `"default"`), or an adapter name,
            or a list of names: only those.

    Returns:
        The JSON config written into the file's metadata (a dict).

    Warns:
        UserWarning: the model trains weights besides the adapters (e.g.
            a new head from `apply_lora(..., trainable_layers=...)`): they
            are not in the file, and the warning names their layers.

    Raises:
        ValueError: no LoRA layers, an unbuilt layer, a bad `path`, or
            `adapters` names an adapter the model does not have.

    Examples:
        >>> kl.save_adapters(model, "adapters.safetensors")  # doctest: +SKIP
        >>> kl.save_adapters(model, "legal.safetensors", adapters="legal")
        ... # doctest: +SKIP
    """
    from safetensors.numpy import save_file

    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(
            f"`path` must be a file, not a directory. Received: path={path!r}"
        )
    layers = require_lora_layers(model, "save adapters")
    banks = banks_of(layers)
    active = DEFAULT_ADAPTER if banks is None else banks[0].active
    names = adapter_names(layers, adapters)
    states = [(n, *adapter_state(model, n)) for n in names]
    if len(states) == 1:
        name, tensors, config = states[0]
        config["adapter_name"] = name
        config["active_adapter"] = name if name == active else None
    else:
        tensors = {}
        for index, (_, adapter_tensors, _) in enumerate(states):
            for key, value in adapter_tensors.items():
                tensors[f"{index}:{key}"] = value
        config = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "active_adapter": active if active in names else None,
            "adapters": [{"name": n, "config": c} for n, _, c in states],
        }
    if not is_main_process():
        # Multi-process run: every process gathered the arrays above (a
        # collective where they span processes); process 0 writes.
        wait_for_writer("keras_lora.save_adapters")
        return config
    save_file(tensors, path, metadata={CONFIG_KEY: json.dumps(config)})
    wait_for_writer("keras_lora.save_adapters")
    trained_elsewhere = [
        p
        for p, lay in iter_layers(model)
        if not isinstance(lay, LoRALayer)
        and is_weighted_leaf(lay)
        and any(v.trainable for v in lay.weights)
    ]
    if trained_elsewhere:
        warnings.warn(
            f"save_adapters wrote the adapters only: the trainable weights of "
            f"{trained_elsewhere} (e.g. `trainable_layers` of apply_lora) are "
            f"not in {path!r}. Save them too (`model.save_weights`, or the "
            "layer's weights), or a fresh model loading this file keeps its "
            "own values there.",
            stacklevel=2,
        )
    return config


def split_adapters(tensors, config, path="the file"):
    """The adapters a file holds: `({name: (tensors, config)}, active)`.

    A one-adapter file (version 1) gives its `adapter_name` (files written
    before names were stored: `"default"`); `active` is the name of the
    adapter that was active when it was saved, or `None`.
    """
    if config.get("format_version", 1) < 2:
        name = config.get("adapter_name", DEFAULT_ADAPTER)
        return {name: (tensors, config)}, config.get("active_adapter", name)
    entries = {}
    for index, item in enumerate(config.get("adapters", [])):
        prefix = f"{index}:"
        entries[item["name"]] = (
            {
                k[len(prefix) :]: v
                for k, v in tensors.items()
                if k.startswith(prefix)
            },
            item["config"],
        )
    if not entries:
        raise ValueError(f"{path!r} holds no adapter.")
    return entries, config.get("active_adapter")


def adapter_names(layers, adapters=None):
    """The names `adapters` selects among the layers' adapters (all of
    them for `None`; a model without named adapters has `"default"`)."""
    banks = banks_of(layers)
    available = [DEFAULT_ADAPTER] if banks is None else list(banks[0].adapters)
    return _select(available, adapters, "the model")


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
    dora = {bool(c.get("use_dora", False)) for c in layers.values()}
    if len(dora) > 1:
        raise ValueError(
            "The file mixes DoRA and plain LoRA layers; `load_adapters` "
            "adapts a plain model with one `use_dora` for every layer. "
            "Adapt the model yourself (`keras_lora.apply_lora` with "
            "`use_dora=True` for the DoRA layers), then load the file."
        )
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
        use_dora=dora.pop(),
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


def validated_values(layers, tensors):
    """`{key: (layer, variable name, np.ndarray)}` for checkpoint tensors
    that fit the layers; raises before anything is changed.

    Raises:
        AdapterMismatchError: see `check_adapter_state`.
        ValueError: a layer is merged in place, or a value is not finite.
    """
    residual = sorted(p for p, layer in layers.items() if layer.has_residual)
    if residual:
        init = layers[residual[0]].lora_init
        raise ValueError(
            f"Layers {residual} start from their base weights "
            f"(init={init!r}) and compute with the residual; adapter files "
            "hold plain LoRA updates of the original weights. Load them into "
            "`keras_lora.apply_lora(original_model, ...)` (or into the "
            "original model, which `load_adapters` adapts); to resume "
            f"training an init={init!r} model, save and load it as `.keras`."
        )
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
        values[key] = (layer, name, value.astype(variable.dtype))
    return values


def check_dora(layers, layer_configs):
    """Refuses a checkpoint whose layers disagree with the model's on DoRA
    (`use_dora` in the file's layer configs; absent means plain LoRA).

    Raises:
        ValueError: naming the layers and both settings.
    """
    differ = {
        path: bool(config.get("use_dora", False))
        for path, config in (layer_configs or {}).items()
        if path in layers
        and bool(config.get("use_dora", False)) != layers[path].use_dora
    }
    if differ:
        raise ValueError(
            f"The checkpoint's adapters of layers {sorted(differ)} have "
            f"use_dora={sorted(set(differ.values()))}, the model's layers "
            "the other setting. Load it into `apply_lora(original_model, "
            "use_dora=...)` as the file says, or into the plain model, which "
            "`load_adapters` adapts. Nothing was loaded."
        )


def assign_adapter_state(layers, tensors, layer_configs=None):
    """Validates, then assigns; the model is unchanged if validation fails.

    Args:
        layers: `{path: lora_layer}`.
        tensors: `{"<path>.<name>": array}`.
        layer_configs: optional `{path: {"alpha", "use_rslora", "dropout"}}`
            applied to the layers so their scaling matches the checkpoint.

    Raises:
        AdapterMismatchError: see `check_adapter_state`.
        ValueError: if a layer is merged in place (unmerge first), or the
            checkpoint's `use_dora` differs from a layer's.
    """
    check_dora(layers, layer_configs)
    values = validated_values(layers, tensors)
    for layer, name, value in values.values():
        _layer_variables(layer)[name].assign(value)
    for path, config in (layer_configs or {}).items():
        layer = layers[path]
        layer.adapter_alpha = config.get("alpha", layer.adapter_alpha)
        layer.use_rslora = config.get("use_rslora", layer.use_rslora)
    for layer in layers.values():
        if layer.adapters_disabled:
            # Loaded inside `disable_adapters`: stays disabled there.
            zero_b(layer)


def load_adapters(
    model: keras.Model,
    path: str | os.PathLike,
    adapters: str | list[str] | None = None,
) -> keras.Model:
    """Loads adapters saved by `save_adapters`, matched by layer path, or by
    stable path where the model's layer names are numbered differently.

    If `model` has no keras_lora layers, LoRA is first applied with the
    stored config (`keras_lora.apply_lora(model, targets=<stored paths>,
    rank_pattern=..., alpha_pattern=...)`), which returns a new model; the
    model given keeps its outputs (its base variables, shared with the new
    model, are marked non-trainable; a failed load restores the flags).
    Every key, shape and value is checked
    before anything is assigned: a failed load leaves the model unchanged.
    Each layer's alpha and rsLoRA flag are set from the file.

    Adapters load under their own names. A model with one adapter (no
    `keras_lora.multi.add_adapter` called) gets exactly the adapters
    loaded: a file saved from such a model replaces its adapter,
    `"default"`. A model with named adapters gets each loaded adapter
    added, or replaced where it has one of that name, and keeps its others.
    The adapter that was active when the file was saved is active again if
    it is loaded; otherwise a model with one adapter activates the first
    loaded and a model with named adapters keeps its active one.

    Args:
        model: a `keras.Model`, adapted or plain, built.
        path: str or path-like, a file written by `save_adapters`.
        adapters: `None` (default) for every adapter in the file, or a
            name, or a list of names: only those.

    Returns:
        The model holding the loaded adapters: `model` itself when it
        already had keras_lora layers, else the adapted clone.

    Raises:
        AdapterMismatchError (a ValueError): missing, unexpected or
            mis-shaped keys, all listed.
        FileNotFoundError: no file at `path`.
        ValueError: not a keras_lora adapter file; a layer merged in place;
            `adapters` names an adapter the file does not hold; several
            adapters into a model that trains more than A and B.

    Examples:
        >>> model = kl.load_adapters(model, "a.safetensors")  # doctest: +SKIP
    """
    tensors, config = read_adapters(path)
    entries, file_active = split_adapters(tensors, config, os.fspath(path))
    names = _select(list(entries), adapters, repr(os.fspath(path)))
    layers = lora_layers(model)
    flags = None
    if not layers:
        # apply_lora freezes the variables the clone shares with `model`;
        # a failed load gives `model` its flags back.
        flags = [(v, v.trainable) for v in model.weights]
        first = file_active if file_active in names else names[0]
        model = _apply_stored_config(model, entries[first][1])
        layers = lora_layers(model)
    try:
        _load_into(model, layers, entries, names, file_active)
    except Exception:
        for variable, trainable in flags or ():
            variable.trainable = trainable
        raise
    return model


def _load_into(model, layers, entries, names, file_active):
    """The second half of `load_adapters`: into an adapted model."""
    before = traced_state(layers)
    banks = banks_of(layers)
    if banks is None and names == [DEFAULT_ADAPTER]:
        adapter_tensors, adapter_config = entries[names[0]]
        adapter_tensors, layer_configs = rekey_to_model(
            model, layers, adapter_tensors, adapter_config
        )
        assign_adapter_state(layers, adapter_tensors, layer_configs)
    else:
        _load_named(model, layers, entries, names, file_active)
    if traced_state(layers) != before:
        # A changed alpha is traced into compiled functions; new A and B
        # values are read at every call.
        reset_compiled_functions(model, layers)


def _load_named(model, layers, entries, names, file_active):
    """Loads `names` of a file's adapters as named adapters of `model`."""
    per_layer = {path: {} for path in layers}
    for name in names:
        adapter_tensors, adapter_config = entries[name]
        adapter_tensors, layer_configs = rekey_to_model(
            model, layers, adapter_tensors, adapter_config
        )
        check_dora(layers, layer_configs)
        values = validated_values(layers, adapter_tensors)
        for path, layer in layers.items():
            config = layer_configs.get(path, {})
            per_layer[path][name] = {
                "values": {
                    var: values[f"{path}.{var}"][2]
                    for var in layer.adapter_weights()
                },
                "alpha": float(config.get("alpha", layer.adapter_alpha)),
                "use_rslora": bool(config.get("use_rslora", layer.use_rslora)),
            }
    had_banks = banks_of(layers) is not None
    if not had_banks:
        named_layers(model, create=True)
    active = file_active if file_active in names else None
    for path, layer in layers.items():
        bank = layer.adapter_bank
        if not had_banks:
            bank.replace_all(per_layer[path], active or names[0])
            continue
        for name, entry in per_layer[path].items():
            bank.store(name, entry)
        if active is not None and bank.active != active:
            bank.activate(active)
