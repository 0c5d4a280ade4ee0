"""Stable identity of the layers of a model.

A layer's stable path is where Keras's saving library stores it in a
`.keras` file: attribute names, and class name plus position inside lists,
e.g. `backbone/transformer_layers/gemma_decoder_block_0/attention/query_dense`
in a keras-hub `GemmaCausalLM`. It never contains Keras's auto-numbered
layer names (`dense_40`, `gemma_backbone_1`), so the same architecture built
twice, in one process or in two, on any backend, gives every layer the same
stable path. keras_lora layers are named by their base class (a `LoRADense`
sits where its `Dense` sat), so a model and its adapted clone agree.
"""

import keras

from keras_lora import _keras_private


def _list_name(obj):
    cls = getattr(obj, "merge_class", None) or type(obj)
    return _keras_private.snake_case(cls.__name__)


def stable_layer_paths(model):
    """Returns `{stable_path: layer}` for `model` and every layer under it.

    Args:
        model: a `keras.Model` or `keras.layers.Layer`.

    Returns:
        dict, in Keras's saving order; `model` itself has the path `""`.
    """
    return {
        path: obj
        for path, obj in _keras_private.saveable_tree(model, _list_name)
        if isinstance(obj, keras.layers.Layer)
    }


def stable_path_of(model):
    """Returns `{id(layer): stable_path}` for the layers under `model`."""
    return {
        id(layer): path for path, layer in stable_layer_paths(model).items()
    }


def is_weighted_leaf(layer):
    """Whether `layer` holds weights and no sub-layers (a frozen base's
    layers that `apply_lora` marks `trainable=False` themselves)."""
    return bool(layer.weights) and not _keras_private.sublayers(layer)
