"""Quantized base layers (QLoRA): what keras_lora reads of Keras's
quantized `Dense`, `EinsumDense`, `Embedding` and `ReversibleEmbedding`.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized
LLMs", arXiv:2305.14314) trains float adapters over a frozen quantized base:
`y = base_q(x) + s * (x @ A) @ B`, where `base_q` is the layer's own quantized
computation (Keras's `quantized_call`), never a dequantized copy of the
kernel kept in memory. Keras 3.15's `model.quantize(mode)` gives the bases:
`"int8"` (per output unit scales) and `"int4"` (packed, per output unit or
per group of `block_size` inputs with zero points) are supported here.

Merging needs the base weight in float: `dequantized` reads it from the
quantized variables (the inverse of Keras's quantizer, as Keras's own
LoRA merge computes it), and `requantized` quantizes a float weight again
with Keras's own `layer.quantize` on a temporary float layer of the same
config, so a merged layer has exactly the base layer's variables.
"""

import warnings

import keras
import numpy as np
from keras import ops

from keras_lora import _keras_private

__all__ = [
    "QUANTIZATION_VARIABLES",
    "SUPPORTED_MODES",
    "check_supported",
    "dequantized",
    "float_config",
    "quantization_mode",
    "requantized",
    "resolved_policy",
]

#: The quantization modes whose layers keras_lora adapts.
SUPPORTED_MODES = ("int8", "int4")

#: Per adapted weight, the variables Keras's int8 / int4 quantization keeps
#: for it (those a layer has).
QUANTIZATION_VARIABLES = {
    "kernel": ("kernel", "kernel_scale", "kernel_zero", "g_idx"),
    "embeddings": (
        "embeddings",
        "embeddings_scale",
        "embeddings_zero",
        "g_idx",
    ),
    "reverse_embeddings": (
        "reverse_embeddings",
        "reverse_embeddings_scale",
        "reverse_embeddings_zero",
    ),
}

_WHY = {
    "gptq": "GPTQ layers compute with a calibrated kernel whose float form "
    "Keras does not keep",
    "awq": "AWQ layers compute with a calibrated kernel whose float form "
    "Keras does not keep",
    "float8": "float8 is a training-time mode whose scales are updated by "
    "the optimizer",
}


def quantization_mode(layer):
    """The layer's Keras quantization mode, or `None` for a float layer."""
    return getattr(layer, "quantization_mode", None)


def check_supported(layer, where):
    """Raises a `ValueError` naming `where` and the mode unless `layer` is
    a float layer or quantized to one of `SUPPORTED_MODES`."""
    mode = quantization_mode(layer)
    if mode is None or mode in SUPPORTED_MODES:
        return
    why = _WHY.get(mode, "keras_lora does not know this mode")
    raise ValueError(
        f"{where} is quantized with quantization_mode={mode!r}: {why}. "
        f"keras_lora adapts float layers and layers quantized to "
        f"{list(SUPPORTED_MODES)} (`model.quantize('int8')` or "
        "`'int4'`); apply LoRA before this quantization, or quantize to "
        "int8 / int4."
    )


def _block_size(layer):
    return _keras_private.int4_block_size(layer)


def dequantized(layer, name, values=None):
    """The float32 value of the quantized base weight `name` (`"kernel"`,
    `"embeddings"` or `"reverse_embeddings"`) in its float shape.

    Args:
        layer: a built layer quantized to int8 or int4 (a keras_lora layer
            or a plain Keras one).
        name: str, the weight.
        values: optional `{variable name: value}` overriding the layer's
            variables (a keras_lora layer merged in place passes its kept
            originals).

    Returns:
        A float32 tensor: what the layer's quantized computation multiplies
        by (kernel / scale, unpacked, zero points subtracted per group).
    """
    by_name = {w.name: w for w in layer.weights}
    by_name.update(values or {})

    def get(n):
        return ops.convert_to_tensor(by_name[n])

    mode = quantization_mode(layer)
    block = _block_size(layer)
    if name == "kernel" and isinstance(layer, keras.layers.EinsumDense):
        if mode == "int8":
            scale = _keras_private.einsum_dequant_scale(
                layer, get("kernel_scale")
            )
            return ops.divide(ops.cast(get("kernel"), "float32"), scale)
        unpacked = keras.quantizers.unpack_int4(
            get("kernel"), _keras_private.int4_column_size(layer), axis=-1
        )
        flat = _dequantize_int4(
            layer, unpacked, get("kernel_scale"), "kernel_zero", get, 0
        )
        return ops.reshape(flat, layer.original_kernel_shape)
    if name == "kernel":
        if mode == "int8":
            return ops.divide(
                ops.cast(get("kernel"), "float32"), get("kernel_scale")
            )
        unpacked = keras.quantizers.unpack_int4(
            get("kernel"), layer.units, axis=-1
        )
        return _dequantize_int4(
            layer, unpacked, get("kernel_scale"), "kernel_zero", get, 0
        )
    if name == "embeddings":
        if mode == "int8":
            scale = ops.expand_dims(get("embeddings_scale"), -1)
            return ops.divide(ops.cast(get("embeddings"), "float32"), scale)
        unpacked = keras.quantizers.unpack_int4(
            get("embeddings"), layer.output_dim, axis=-1
        )
        scale = get("embeddings_scale")
        if block is None:
            scale = ops.expand_dims(scale, -1)
        return _dequantize_int4(
            layer, unpacked, scale, "embeddings_zero", get, -1
        )
    if name == "reverse_embeddings":
        if mode == "int8":
            return ops.divide(
                ops.cast(get("reverse_embeddings"), "float32"),
                get("reverse_embeddings_scale"),
            )
        unpacked = keras.quantizers.unpack_int4(
            get("reverse_embeddings"), layer.output_dim, axis=0
        )
        return _dequantize_int4(
            layer,
            unpacked,
            get("reverse_embeddings_scale"),
            "reverse_embeddings_zero",
            get,
            0,
        )
    raise ValueError(f"No quantized weight {name!r} in layer {layer.name!r}.")


def _dequantize_int4(layer, unpacked, scale, zero_name, get, group_axis):
    """Per-channel `q / scale`, or per group `(q - zero) * scale`-style
    dequantization with Keras's own grouped formula."""
    unpacked = ops.cast(unpacked, "float32")
    if _block_size(layer) is None:
        return ops.divide(unpacked, scale)
    return _keras_private.dequantize_grouped(
        unpacked, scale, get(zero_name), get("g_idx"), group_axis
    )


def resolved_policy(layer):
    """The layer's own dtype policy: its entry in a `DTypePolicyMap` (as a
    keras-hub backbone gives its layers) or the policy itself."""
    policy = layer.dtype_policy
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        policy = policy[layer.path]
    return policy


def float_config(layer):
    """The config of `layer`'s base Keras layer in float: its quantized dtype
    policy replaced by the policy it was quantized from."""
    config = dict(
        layer.base_config()
        if hasattr(layer, "base_config")
        else layer.get_config()
    )
    policy = resolved_policy(layer)
    config["dtype"] = keras.dtype_policies.get(
        _keras_private.source_policy_name(policy)
    )
    config.pop("quantization_config", None)
    return config


def _quantization_config(layer):
    config = getattr(layer, "quantization_config", None)
    if config is not None:
        return config
    if quantization_mode(layer) == "int4":
        return keras.quantizers.Int4QuantizationConfig(
            block_size=_block_size(layer) or -1
        )
    return None


def requantized(layer, name, value):
    """Quantizes a float weight as `layer`'s base weight `name` is, with
    Keras's own quantizer (`layer.quantize` on a temporary float layer of
    the same config and mode).

    Args:
        layer: a built quantized layer (int8 / int4).
        name: str, the adapted weight (`"kernel"`, `"embeddings"`,
            `"reverse_embeddings"`).
        value: the float weight in its float shape.

    Returns:
        `{variable name: np.ndarray}` for the weight and its scales (and
        zero points), shaped and typed as `layer`'s variables.
    """
    base_class = getattr(layer, "merge_class", type(layer))
    temp = base_class.from_config(float_config(layer))
    build_config = layer.get_build_config()
    if build_config:
        temp.build_from_config(build_config)
    else:
        temp.build()
    float_weights = {w.name: w for w in temp.weights}
    float_weights[name].assign(ops.cast(value, float_weights[name].dtype))
    temp.quantize(
        quantization_mode(layer),
        type_check=False,
        config=_quantization_config(layer),
    )
    out = {w.name: w for w in temp.weights}
    own = {w.name: w for w in layer.weights}
    values = {}
    for var in QUANTIZATION_VARIABLES[name]:
        if var in own and var in out:
            array = np.asarray(ops.convert_to_numpy(out[var]))
            if array.shape != tuple(own[var].shape):
                raise ValueError(
                    f"Re-quantizing {name!r} of layer {layer.name!r} gave "
                    f"{var!r} of shape {array.shape}, the layer holds "
                    f"{tuple(own[var].shape)}."
                )
            values[var] = array.astype(own[var].dtype)
    return values


class QuantizedMergeWarning(UserWarning):
    """`merge` re-quantized an update into a quantized base: part of it is
    lost to rounding. The message gives the numbers
    (`LoRALayer.requantization_report`)."""


def warn_requantization(reports):
    """Warns with a `QuantizedMergeWarning` listing, per adapted weight of
    `reports` (`{path: requantization_report}`), what the re-quantization
    lost; the caller of the caller is named as the source."""
    rows = [
        (path, name, r)
        for path, report in reports.items()
        for name, r in report.items()
    ]
    worst = max(rows, key=lambda row: row[2]["update_relative_error"])
    listed = "; ".join(
        f"{p} {n}: max |error| {r['max_abs_weight_error']:.3g}, "
        f"{r['update_relative_error']:.1%} of the update"
        for p, n, r in rows[:8]
    )
    warnings.warn(
        QuantizedMergeWarning(
            f"Merged {len(rows)} adapted weight(s) into their quantized "
            f"base and quantized them again; the rounding changes the update "
            f"by up to {worst[2]['update_relative_error']:.1%} of its norm "
            f"({worst[0]} {worst[1]}). {listed}"
            + (" ..." if len(rows) > 8 else "")
            + ". For the exact W_deq + s A B, merge with dequantize=True "
            "(a float model)."
        ),
        stacklevel=3,
    )
