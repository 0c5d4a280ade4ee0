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

import collections.abc
import weakref

import keras

from keras_lora import _keras_private
from keras_lora.layers import LoRALayer
from keras_lora.processes import host_array


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


def iter_layers(
    model: keras.layers.Layer,
) -> collections.abc.Iterator[tuple[str, keras.layers.Layer]]:
    """Yields `(path, layer)` for every layer under `model`, at any depth.

    A layer's path is the chain of layer names from `model` down to it
    (`model` itself not included): `decoder_block_0/attention/query` in a
    keras-hub `GemmaBackbone`, `gemma_backbone/decoder_block_0/attention/query`
    in a `GemmaCausalLM`, `inner_model/dense` for a model nested in a model.
    It depends only on the model's structure, so it is the same in a rebuilt
    model. Sub-layers that subclassed layers hold as attributes or in lists
    are included; a layer used at several places is yielded once.

    Args:
        model: a `keras.Model` or `keras.layers.Layer`.

    Yields:
        `(str, keras.layers.Layer)` pairs, parents before children.
    """
    seen = set()

    def walk(layer, prefix):
        for sub in _keras_private.sublayers(layer):
            if id(sub) in seen or isinstance(sub, keras.layers.InputLayer):
                continue
            seen.add(id(sub))
            path = f"{prefix}/{sub.name}" if prefix else sub.name
            yield path, sub
            yield from walk(sub, path)

    yield from walk(model, "")


def lora_layers(model: keras.layers.Layer) -> dict[str, LoRALayer]:
    """Returns `{path: layer}` for every keras_lora layer in `model`."""
    layers = {
        p: lay for p, lay in iter_layers(model) if isinstance(lay, LoRALayer)
    }
    remember_models(model, layers)
    return layers


def require_lora_layers(model, what, include_self=False):
    """`lora_layers(model)`, or a ValueError saying `what` needs them.

    Args:
        model: a model or layer.
        what: str, what the caller cannot do without adapters, e.g.
            `"merge"` (the message reads "Cannot merge: ...").
        include_self: bool, whether `model` itself counts when it is a
            keras_lora layer (under the path `""`).
    """
    layers = lora_layers(model)
    if include_self and isinstance(model, LoRALayer):
        layers = {"": model, **layers}
    if not layers:
        raise ValueError(
            f"Cannot {what}: `model` has no keras_lora layers (apply LoRA "
            "first with `keras_lora.apply_lora`; or was it already merged "
            f"or unloaded?). Received: model={getattr(model, 'name', model)!r}"
            f" of type {type(model).__name__}"
        )
    return layers


def _host_side(fn):
    """`fn`, run as plain Python when a `torch.compile`d function calls it.

    The registry below is bookkeeping, not computation: traced by
    `torch.compile`, its weak dictionary's keys become guards that the
    garbage collector can invalidate while they are being built.
    """
    if keras.backend.backend() == "torch":
        import torch

        return torch.compiler.disable(fn)
    return fn


# For each keras_lora layer, the models keras_lora was given or returned
# that hold it (a keras-hub task and its backbone, say): a change made
# through one of them must reset the compiled functions of all of them.
_MODELS = weakref.WeakKeyDictionary()


@_host_side
def remember_models(model, layers):
    """Records that `model` holds `layers` (`{path: lora_layer}`)."""
    if not isinstance(model, keras.Model):
        return
    for layer in layers.values():
        _MODELS.setdefault(layer, weakref.WeakSet()).add(model)


def traced_state(layers):
    """The Python state of `layers` that compiled functions capture:
    each layer's scaling and merged flag (values held in variables, such as
    A and B, are read at every call and need no retrace)."""
    return tuple((layer.scaling, layer.merged) for layer in layers.values())


@_host_side
def reset_compiled_functions(model, layers=None):
    """Drops the compiled `fit`/`evaluate`/`predict` functions and a
    keras-hub task's `generate_function` of `model`, of every model nested
    in it, and of every model known to hold its keras_lora layers.

    A layer's scaling and merged state are Python values traced into those
    functions; after they change the functions must be traced again.

    Args:
        model: the model (or layer) a change was made through.
        layers: `{path: lora_layer}` changed; default: all of `model`'s.
    """
    if layers is None:
        layers = lora_layers(model)
    models = {id(model): model}
    for _, sub in iter_layers(model):
        if isinstance(sub, keras.Model):
            models[id(sub)] = sub
    for layer in layers.values():
        for owner in list(_MODELS.get(layer, ())):
            models[id(owner)] = owner
    for target in models.values():
        for attribute in (
            "train_function",
            "test_function",
            "predict_function",
            "generate_function",
        ):
            if getattr(target, attribute, None) is not None:
                setattr(target, attribute, None)


def to_numpy(structure, dtype=None):
    """A tensor, variable or nested structure of them as NumPy arrays.

    On JAX, a value sharded over several processes' devices is gathered
    (`keras_lora.processes.host_array`: every process must call this).
    """
    return keras.tree.map_structure(
        lambda x: host_array(x, dtype=dtype), structure
    )


@_host_side
def _reset_models_holding(layer):
    models = list(_MODELS.get(layer, ()))
    if models:
        reset_compiled_functions(models[0], {"": layer})


# A layer's own merge_adapter() / unmerge_adapter() reset the functions of
# every model known to hold it.
LoRALayer.traced_state_hook = staticmethod(_reset_models_holding)
