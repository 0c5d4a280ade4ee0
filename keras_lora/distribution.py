"""Multi-device LoRA on `keras.distribution` (JAX backend).

A LoRA layer's adapters never take their layout from a user's `LayoutMap`
regexes: their layout is *derived* from the layout of the base weight they
adapt, so a layout map written for the base model keeps working.

For a base kernel `W` (d_in, d_out) with layout `(in_axis, out_axis)`:

- `lora_a` (d_in, r) gets `(in_axis, None)`: sharded like W's input axes;
- `lora_b` (r, d_out) gets `(None, out_axis)`: sharded like W's output axes;
- the rank axis is always replicated, and any axis whose size does not
  divide the mesh axis size (or that W does not shard) is replicated.

Then `x @ A @ B` needs exactly the collectives `x @ W` already needs (an
all-reduce for a row-sharded W, none for a column-sharded one), and the
optimizer's slots (Adam's m, v) follow the adapters' layout. For
`LoRAEinsumDense`, whose A and B flatten several kernel axes into one
(for Gemma's query kernel (n, d, h), B is (r, n*h)), the flattened axis is
sharded on the mesh axis of its outermost sharded kernel axis, which for
`(model, ...)` layouts is exactly the kernel's block structure.

How it works: `LoRALayer.add_weight` creates each adapter inside
`adapter_layout_scope(layer, name)`, which pins the derived layout on the
variable as it is created, whatever the active distribution's layout map
says (no regex is consulted, so a path that matches several keys cannot
raise either). `lora_layout_map(layout_map, model)` writes the same layouts
into a copy of a `LayoutMap` as exact-path keys, for code that reads the map
itself. On the TensorFlow and PyTorch backends `keras.distribution` does
not place variables; there these functions are no-ops (see
`docs/distribution.md` for `tf.distribute` and PyTorch DDP).
"""

import re

import keras

from keras_lora import _keras_private
from keras_lora.layers.layout import adapted_weight
from keras_lora.layers.layout import adapter_layout
from keras_lora.layers.layout import adapter_layout_scope
from keras_lora.layers.layout import derive_adapter_axes
from keras_lora.walk import require_lora_layers

__all__ = [
    "adapter_layout",
    "adapter_layout_scope",
    "derive_adapter_axes",
    "lora_layout_map",
    "variable_layouts",
]


def lora_layout_map(
    layout_map: keras.distribution.LayoutMap, model: keras.layers.Layer
) -> keras.distribution.LayoutMap:
    """Returns a copy of `layout_map` with exact keys for every adapter.

    The user's keys are kept in order; for each adapter variable of each
    keras_lora layer in `model` the variable's path is added with the
    layout `adapter_layout` derives from the base weight's layout *in this
    map* (the base variable's own layout if the map has no key for it).
    An exact key wins over the map's regexes, so a regex such as
    `".*query.*"` that also matches `.../query/lora_a` can neither hand
    the adapter the kernel's layout nor raise "matches multiple layout
    specification keys".

    The keys are `model`'s own variable paths, the paths Keras looks
    layouts up by; a model of unnamed layers built again is numbered anew
    (`dense_2/lora_a`), so call this again with the rebuilt model. The
    adapters' own placement never depends on these keys (see the module
    docstring).

    Use it where something reads the layout map by path: recreating or
    reloading the LoRA model under `ModelParallel(layout_map=...)`, or
    inspecting the plan. Adapters created by keras_lora under a
    distribution already get these layouts without it.

    Args:
        layout_map: a `keras.distribution.LayoutMap` written for the base
            model (e.g. `keras_hub.models.GemmaBackbone.get_layout_map`).
        model: a model (or layer) containing keras_lora layers, e.g. the
            output of `keras_lora.apply_lora`.

    Returns:
        A new `LayoutMap` on the same device mesh; `layout_map` is not
        changed.

    Raises:
        TypeError: if `layout_map` is not a `keras.distribution.LayoutMap`.
        ValueError: if `model` contains no keras_lora layer, or the map
            already has a key equal to an adapter path with another layout.

    Examples:
        ```python
        mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"))
        base_map = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
        full_map = keras_lora.distribution.lora_layout_map(base_map, lora_model)
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(layout_map=full_map))
        ```
    """
    if not isinstance(layout_map, keras.distribution.LayoutMap):
        raise TypeError(
            "`layout_map` must be a keras.distribution.LayoutMap. "
            f"Received: layout_map of type {type(layout_map).__name__}"
        )
    layers = list(
        require_lora_layers(
            model, "build a layout map", include_self=True
        ).values()
    )
    mesh = layout_map.device_mesh
    new = keras.distribution.LayoutMap(mesh)
    for key in layout_map:
        new[key] = layout_map[key]
    for layer in layers:
        if not layer.built:
            continue
        for name, variable in layer.adapter_weights().items():
            base = adapted_weight(layer, name)
            base_layout = None
            if base is not None:
                base_layout = layout_map[base.path]
                if base_layout is None:
                    base_layout = _keras_private.variable_layout(base)
            if base_layout is None:
                base_layout = keras.distribution.TensorLayout(
                    (None,) * (len(base.shape) if base is not None else 0),
                    mesh,
                )
            layout = adapter_layout(layer, name, base_layout=base_layout)
            if layout is None or not isinstance(
                layout, keras.distribution.TensorLayout
            ):
                layout = keras.distribution.TensorLayout(
                    (None,) * len(variable.shape), mesh
                )
            elif layout.device_mesh is not mesh:
                layout = keras.distribution.TensorLayout(layout.axes, mesh)
            key = variable.path
            if re.escape(key) != key:
                key = re.escape(key)
            # `key in layout_map` would regex-match (and never be False).
            if key in list(new):
                if tuple(new[key].axes) != tuple(layout.axes):
                    raise ValueError(
                        f"`layout_map` already has key {key!r} with axes "
                        f"{new[key].axes}; the adapter needs {layout.axes}."
                    )
                continue
            new[key] = layout
    return new


def variable_layouts(model: keras.layers.Layer) -> dict[str, tuple]:
    """`{variable.path: sharding spec}` of a model's variables (JAX).

    The spec is the tuple of mesh axes per array axis of the variable's
    current value (`None` where replicated), read from the JAX array's
    sharding; on other backends, or for unplaced arrays, every axis is
    `None`. Handy to check a plan: `variable_layouts(model)[".../lora_b"]`.
    """
    result = {}
    for variable in model.variables:
        ndim = len(variable.shape)
        spec = (None,) * ndim
        if keras.backend.backend() == "jax":
            sharding = getattr(variable.value, "sharding", None)
            if hasattr(sharding, "spec"):
                spec = tuple(sharding.spec) + (None,) * (
                    ndim - len(sharding.spec)
                )
        result[variable.path] = spec
    return result
