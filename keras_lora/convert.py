"""Layer surgery: which keras_lora class adapts a layer, converting a built
layer in place, and freezing everything but the adapters."""

import keras

from keras_lora import _keras_private
from keras_lora.layers import LoRAConv1D
from keras_lora.layers import LoRAConv1DTranspose
from keras_lora.layers import LoRAConv2D
from keras_lora.layers import LoRAConv2DTranspose
from keras_lora.layers import LoRAConv3D
from keras_lora.layers import LoRAConv3DTranspose
from keras_lora.layers import LoRADense
from keras_lora.layers import LoRADepthwiseConv1D
from keras_lora.layers import LoRADepthwiseConv2D
from keras_lora.layers import LoRAEinsumDense
from keras_lora.layers import LoRAEmbedding
from keras_lora.layers import LoRALayer
from keras_lora.layers import LoRAReversibleEmbedding
from keras_lora.layers import LoRASeparableConv1D
from keras_lora.layers import LoRASeparableConv2D
from keras_lora.layers.base import is_plain_subclass
from keras_lora.walk import is_weighted_leaf
from keras_lora.walk import iter_layers

# Most specific first: ReversibleEmbedding is an Embedding.
LORA_CLASSES = (
    LoRAReversibleEmbedding,
    LoRAEmbedding,
    LoRAEinsumDense,
    LoRAConv1D,
    LoRAConv1DTranspose,
    LoRAConv2DTranspose,
    LoRAConv3DTranspose,
    LoRAConv2D,
    LoRAConv3D,
    LoRADepthwiseConv1D,
    LoRADepthwiseConv2D,
    LoRASeparableConv1D,
    LoRASeparableConv2D,
    LoRADense,
)


def lora_class_for(layer):
    """The keras_lora class that adapts `layer`, or None."""
    for cls in LORA_CLASSES:
        if isinstance(layer, cls.base_class) and is_plain_subclass(
            type(layer), cls.base_class
        ):
            return cls
    return None


def convert_layer(layer, lora_class, config):
    """Turns a built Keras layer into a keras_lora layer in place.

    The object stays the same (so every reference to it, functional graph
    nodes and parent attributes included, now sees the LoRA layer and a
    layer shared by several call sites gets one adapter); its variables are
    kept, frozen, and the adapter variables are created under the layer's
    own name-scope path.

    Args:
        layer: a built Keras layer that `lora_class` adapts.
        lora_class: the keras_lora class (`lora_class_for(layer)`).
        config: the adapter's validated `LoRAConfig`.
    """
    original_class = type(layer)
    parent = layer.path.rpartition("/")[0] or None
    layer.__class__ = lora_class
    try:
        with _keras_private.unlocked(layer):
            layer.init_lora(config)
            layer.merge_class = original_class
            _keras_private.refresh_call_signature(layer)
            _keras_private.rewrap_quantize(layer)
            with keras.name_scope(
                layer.name, caller=layer, override_parent=parent
            ):
                layer.build_lora()
        layer.freeze_base_weights()
    except Exception:
        layer.__class__ = original_class
        _keras_private.rewrap_quantize(layer)
        raise
    return layer


def freeze_base(model, kept_layers=(), layers=None):
    """Freezes every variable of `model` except the adapters, the biases of
    LoRA layers built with `train_bias=True`, and the weights of the layers
    whose ids are in `kept_layers` (`apply_lora`'s `trainable_layers`).

    `layers`: the layers under `model` (`iter_layers`'s), if the caller
    has walked it already; the model is walked once either way.
    """
    layers = (
        [lay for _, lay in iter_layers(model)] if layers is None else layers
    )
    adapters = set()
    kept = set()
    for layer in layers:
        if isinstance(layer, LoRALayer):
            adapters.update(id(v) for v in layer.adapter_weights().values())
        if id(layer) in kept_layers:
            # Its trainable weights only: BatchNormalization's moving
            # statistics stay non-trainable (Keras updates them in `fit`).
            kept.update(id(v) for v in layer.weights if v.trainable)
        elif isinstance(layer, LoRALayer) and layer.train_bias:
            bias = layer.base_weights().get("bias")
            if bias is not None:
                kept.add(id(bias))
    for variable in model.weights:
        variable.trainable = id(variable) in adapters or id(variable) in kept
    for layer in layers:
        # A frozen leaf layer gets `trainable=False` itself, not only its
        # variables: the flag is saved in `.keras` configs (reload keeps the
        # base frozen), and BatchNormalization then runs in inference mode
        # (Keras's transfer-learning rule) instead of updating the moving
        # statistics it shares with `model` during `fit`.
        if (
            is_weighted_leaf(layer)
            and not isinstance(layer, LoRALayer)
            and not any(id(v) in kept for v in layer.weights)
        ):
            layer.trainable = False
