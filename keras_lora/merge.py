"""Model-level merge, unload and in-place merge of LoRA adapters."""

import keras

from keras_lora import _keras_private
from keras_lora.clone import clone_model_sharing_variables
from keras_lora.layers import quantized
from keras_lora.layers.base import LORA_CONFIG_KEYS
from keras_lora.layers.base import QUANTIZABLE
from keras_lora.saving import GRAPH_CLASSES
from keras_lora.saving import REGISTERED_NAME
from keras_lora.walk import iter_layers
from keras_lora.walk import require_lora_layers
from keras_lora.walk import reset_compiled_functions

_IN_PLACE_HINT = (
    "Use `keras_lora.merge_adapters(model)` to fold the adapters into the "
    "model in place instead."
)
_UNLOAD_HINT = (
    "The model `apply_lora` was given shares the base weights (use it), or "
    "undo in-place merges with `keras_lora.unmerge_adapters(model)`."
)


def _plain_configs(serialized):
    """Rewrites every serialized keras_lora layer as its base Keras layer."""
    if isinstance(serialized, list):
        return [_plain_configs(item) for item in serialized]
    if not isinstance(serialized, dict):
        return serialized
    registered = serialized.get("registered_name") or ""
    if registered == REGISTERED_NAME:
        # An adapted model: its base model's own serialization, whose
        # keras_lora layers are rewritten too.
        base = serialized["config"]["base"]
        return _plain_configs(
            {
                **serialized,
                **{k: base[k] for k in ("module", "class_name", "config")},
                "registered_name": base["registered_name"],
            }
        )
    graph_bases = {
        keras.saving.get_registered_name(cls): base
        for base, cls in GRAPH_CLASSES.items()
    }
    if registered in graph_bases:
        # keras_lora's Sequential / functional class: Keras's own again.
        fields = _keras_private.public_class_fields(graph_bases[registered])
        return {
            **{k: _plain_configs(v) for k, v in serialized.items()},
            **fields,
        }
    if registered.startswith("keras_lora>"):
        lora_class = keras.saving.get_registered_object(registered)
        base = lora_class.base_class
        config = {
            k: v
            for k, v in serialized["config"].items()
            if k not in LORA_CONFIG_KEYS
        }
        plain = keras.saving.serialize_keras_object(base.from_config(config))
        # Keep what a functional config adds (name, inbound_nodes, ...).
        return {
            **serialized,
            **{
                key: plain[key]
                for key in ("module", "class_name", "config", "registered_name")
            },
        }
    return {key: _plain_configs(value) for key, value in serialized.items()}


def _merged_values(path, layer):
    try:
        return layer.merged_values()
    except ValueError as e:
        raise ValueError(f"Cannot merge layer {path!r}: {e}") from None


# Keras's quantized dtype policies, serialized.
_QUANTIZED_POLICIES = {
    "QuantizedDTypePolicy",
    "QuantizedFloat8DTypePolicy",
    "Int4DTypePolicy",
    "GPTQDTypePolicy",
    "AWQDTypePolicy",
}


def _is_quantized_policy(item):
    return (
        isinstance(item, dict)
        and item.get("class_name") in _QUANTIZED_POLICIES
        and str(item.get("module", "")).startswith("keras")
    )


def _float_configs(serialized):
    """Rewrites every quantized dtype policy in a serialized model as the
    float policy it was quantized from (a `DTypePolicyMap` entry without one
    is dropped, so the map's default applies), and drops the layers'
    `quantization_config`."""
    if isinstance(serialized, list):
        return [_float_configs(item) for item in serialized]
    if not isinstance(serialized, dict):
        return serialized
    if _is_quantized_policy(serialized):
        return serialized["config"].get("source_name")
    out = {}
    for key, value in serialized.items():
        if key == "quantization_config":
            continue
        if key == "policy_map" and isinstance(value, dict):
            out[key] = {
                k: _float_configs(v)
                for k, v in value.items()
                if not _is_quantized_policy(v)
                or v["config"].get("source_name") is not None
            }
            continue
        out[key] = _float_configs(value)
    return out


def _dequantized_layers(model, layers):
    """`{id(layer): {weight name: float32 value}}` for every quantized layer
    of `model`: `W_deq + s A B` for the adapted weights of keras_lora layers
    (`layers`, by path), `W_deq` for the others."""
    lora_ids = {id(layer): path for path, layer in layers.items()}
    rebuilt = {}
    for path, layer in iter_layers(model):
        mode = quantized.quantization_mode(layer)
        if mode is None or not isinstance(layer, QUANTIZABLE):
            continue
        if id(layer) not in lora_ids and mode not in quantized.SUPPORTED_MODES:
            raise ValueError(
                f"merge(model, dequantize=True) turns every quantized layer "
                f"into a float layer, and layer {path!r} (no adapter, "
                f"quantization_mode={mode!r}) has no dequantized form "
                f"keras_lora can compute (it does for "
                f"{list(quantized.SUPPORTED_MODES)}). Use merge(model), "
                "which leaves that layer as it is. Nothing was changed."
            )
        quantized.check_supported(layer, f"Layer {path!r}")
        names = [
            n
            for n in quantized.QUANTIZATION_VARIABLES
            if n in {w.name for w in layer.weights}
        ]
        values = {}
        if id(layer) in lora_ids:
            try:
                values = dict(layer.requantized_merge(dequantize=True)[0])
            except ValueError as e:
                raise ValueError(f"Cannot merge layer {path!r}: {e}") from None
        for name in names:
            if name not in values:
                values[name] = quantized.dequantized(layer, name)
        rebuilt[id(layer)] = values
    return rebuilt


def merge(model: keras.Model, dequantize: bool = False) -> keras.Model:
    """Returns a plain Keras model with every adapter folded into its weights.

    Each keras_lora layer becomes its base Keras layer with
    `W' = W + s * A @ B` (Hu et al. 2021, arXiv:2106.09685, sec. 4.1: "no
    additional inference latency"), computed in float32 and cast once to W's
    dtype. The result has the same class and call signature as `model` (a
    keras-hub `GemmaCausalLM` keeps `generate()`), holds no keras_lora layer
    or variable, and saves to a `.keras` file that loads with
    `keras.saving.load_model` without keras_lora. The merged weights are new
    variables; all other weights are shared with `model` (not copied).
    `model` itself is not changed and can keep training.

    On a quantized base (QLoRA: int8 / int4 layers from Keras's
    `model.quantize`), `dequantize=False` keeps each layer's quantization:
    the base weight is dequantized, `s * A @ B` added in float32 and the sum
    quantized again with Keras's own quantizer, which rounds part of the
    update away; a `QuantizedMergeWarning` says how much (the largest
    absolute weight error and the error relative to the update, per layer:
    `layer.requantization_report()`). `dequantize=True` returns a float
    model instead: every quantized layer (adapted or not) becomes its float
    layer, with exactly `W_deq + s * A @ B` where adapted.

    Args:
        model: a model returned by `apply_lora` (adapters may have been
            merged in place with `merge_adapters`: the kept originals are
            used, so nothing is added twice).
        dequantize: bool, for quantized bases: `False` (default) keeps the
            quantization mode, `True` gives a float model. No effect on a
            float model.

    Returns:
        The merged plain model. Its outputs equal `model`'s (float32
        rounding).

    Warns:
        QuantizedMergeWarning: an update was re-quantized into a quantized
            base (`dequantize=False`), with the error it took.

    Raises:
        ValueError: if `model` has no keras_lora layers (e.g. it is already
            merged): merging twice is refused rather than silently repeated;
            or a merged weight would not be finite (inf or NaN, e.g. a
            float16 overflow; PEFT's `safe_merge`, always on), naming the
            layer path; nothing is changed.
        TypeError: `dequantize` is not a bool.

    Examples:
        >>> import keras, keras_lora
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
        >>> plain = keras_lora.merge(keras_lora.apply_lora(model, rank=2))
        >>> type(plain.layers[0]).__name__
        'Dense'
    """
    if not isinstance(dequantize, bool):
        raise TypeError(
            f"`dequantize` must be a bool. Received: dequantize={dequantize!r}"
        )
    layers = require_lora_layers(model, "merge")
    rebuilt = _dequantized_layers(model, layers) if dequantize else {}
    values = {}
    reports = {}
    for path, layer in layers.items():
        if id(layer) in rebuilt:
            continue
        base = layer.base_weights()
        if quantized.quantization_mode(layer) is not None:
            try:
                merged, report = layer.requantized_merge()
            except ValueError as e:
                raise ValueError(f"Cannot merge layer {path!r}: {e}") from None
            if any(r["update_relative_error"] for r in report.values()):
                reports[path] = report
        else:
            merged = _merged_values(path, layer)
        for name, value in merged.items():
            values[id(base[name])] = value
    transform = _plain_configs
    if rebuilt:

        def transform(serialized):
            return _float_configs(_plain_configs(serialized))

    merged_model = clone_model_sharing_variables(
        model,
        values=values,
        config_transform=transform,
        hint=_IN_PLACE_HINT,
        rebuilt=rebuilt,
    )
    if reports:
        quantized.warn_requantization(reports)
    return merged_model


def unload(model: keras.Model) -> keras.Model:
    """Returns the base model: every keras_lora layer back to its base layer,
    with the original (unmerged) weights, shared with `model`.

    A layer initialized with `init="pissa"` / `"olora"` gets new variables
    holding `residual + s * A0 @ B0`: the weights it was given, up to
    float32 rounding.

    Raises:
        ValueError: if `model` has no keras_lora layers.
    """
    layers = require_lora_layers(model, "unload")
    values = {}
    for layer in layers.values():
        if layer.merged or layer.has_residual:
            for name, variable in layer.base_weights().items():
                values[id(variable)] = layer.source_value(name)
    return clone_model_sharing_variables(
        model, values=values, config_transform=_plain_configs, hint=_UNLOAD_HINT
    )


def merge_adapters(model: keras.Model) -> keras.Model:
    """Folds every adapter into its base weights in place (PEFT's
    `merge_adapter`): inference then runs at the base model's speed. The
    original weights are kept, so `unmerge_adapters` restores them bit for
    bit. Compiled functions are reset so the next call retraces.

    On a quantized base (int8 / int4) the merged weight is quantized again
    in the base's mode, as `merge(model)` does, with the same
    `QuantizedMergeWarning` of what the rounding lost.

    Raises:
        ValueError: if `model` has no keras_lora layers or is already merged,
            or a merged weight would not be finite (as in `merge`); then no
            layer is changed.
    """
    layers = require_lora_layers(model, "merge adapters")
    merged = [p for p, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"Adapters already merged in place at {merged}.")
    # Every layer's merged weights first, so a refused one changes nothing.
    values, reports = {}, {}
    for path, layer in layers.items():
        if quantized.quantization_mode(layer) is None:
            values[path] = _merged_values(path, layer)
            continue
        try:
            values[path], report = layer.requantized_merge()
        except ValueError as e:
            raise ValueError(f"Cannot merge layer {path!r}: {e}") from None
        if any(r["update_relative_error"] for r in report.values()):
            reports[path] = report
    for path, layer in layers.items():
        layer.assign_merged(values[path])
    reset_compiled_functions(model)
    if reports:
        quantized.warn_requantization(reports)
    return model


def unmerge_adapters(model: keras.Model) -> keras.Model:
    """Undoes `merge_adapters`: restores the kept base weights bit for bit.

    Raises:
        ValueError: if `model` has no keras_lora layers or none is merged.
    """
    layers = require_lora_layers(model, "unmerge adapters")
    merged = [layer for layer in layers.values() if layer.merged]
    if not merged:
        raise ValueError("No adapter is merged in place; nothing to unmerge.")
    for layer in merged:
        layer.unmerge_adapter()
    reset_compiled_functions(model)
    return model
