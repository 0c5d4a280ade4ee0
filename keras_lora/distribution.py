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

import contextlib
import math
import re

import keras

__all__ = [
    "adapter_layout",
    "adapter_layout_scope",
    "lora_layout_map",
    "variable_layouts",
]


def _active_distribution():
    """The active `keras.distribution` on JAX, else `None`."""
    if keras.backend.backend() != "jax":
        return None
    return keras.distribution.distribution()


def _adapter_base_name(layer, adapter_name):
    """The base weight (`kernel`, `embeddings`, ...) an adapter adapts."""
    base = layer.base_weights()
    if adapter_name.startswith("reverse_"):
        return "reverse_embeddings" if "reverse_embeddings" in base else None
    for name in ("kernel", "embeddings"):
        if name in base:
            return name
    return None


def _axis_groups(layer, base_shape, a_shape, b_shape):
    """Which base-weight axes each non-rank axis of A and of B covers.

    Returns `(a_groups, b_groups)`: one list of base axis indices per
    non-rank axis of A (resp. B), in flattening order, or `None` when the
    adapter's shapes do not factor the base weight (then it is replicated).
    """
    equation = getattr(layer, "equation", None)
    in_axes = getattr(layer, "in_axes", None)
    out_axes = getattr(layer, "out_axes", None)
    if equation is not None and in_axes is not None and out_axes is not None:
        kernel_spec = equation.replace(" ", "").split("->")[0].split(",")[1]
        a_groups = [[kernel_spec.index(c) for c in in_axes]]
        b_groups = [[kernel_spec.index(c) for c in out_axes]]
    else:
        split = len(a_shape) - 1
        a_groups = [[i] for i in range(split)]
        b_groups = [[i] for i in range(split, len(base_shape))]
    a_dims = [math.prod(base_shape[i] for i in g) for g in a_groups]
    b_dims = [math.prod(base_shape[i] for i in g) for g in b_groups]
    if tuple(a_dims) != tuple(a_shape[:-1]) or tuple(b_dims) != tuple(
        b_shape[1:]
    ):
        return None
    return a_groups, b_groups


def _mesh_axis_sizes(layout):
    """`{mesh axis name: size}` of a TensorLayout or a jax NamedSharding."""
    mesh = getattr(layout, "device_mesh", None)
    if mesh is not None:
        return dict(zip(mesh.axis_names, mesh.shape, strict=True))
    mesh = getattr(layout, "mesh", None)
    if mesh is not None:
        return dict(mesh.shape)
    return None


def _layout_axes(layout, ndim):
    """The per-axis mesh axes of a layout, padded with `None` to `ndim`."""
    if isinstance(layout, keras.distribution.TensorLayout):
        axes = tuple(layout.axes)
    elif hasattr(layout, "spec"):
        axes = tuple(layout.spec)
    else:
        return None
    return axes + (None,) * (ndim - len(axes))


def _entry_size(entry, sizes):
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(sizes[n] for n in names)


def derive_adapter_axes(base_axes, base_shape, groups, dims, mesh_sizes):
    """Layout axes for the non-rank axes of an adapter factor.

    Args:
        base_axes: tuple, the base weight's mesh axis per axis (`None`,
            a mesh axis name, or a tuple of names).
        base_shape: tuple of ints, the base weight's shape.
        groups: list of lists of base axis indices, one per adapter axis;
            the adapter axis is the (row-major) flattening of those axes.
        dims: the adapter axes' sizes.
        mesh_sizes: dict, mesh axis name -> number of devices.

    Returns:
        A list with one entry per adapter axis: the mesh axis of the
        group's outermost sharded base axis, or `None` when no axis of the
        group is sharded, or the size does not divide the mesh axis size.
    """
    out = []
    for group, dim in zip(groups, dims, strict=True):
        entry = None
        for i in group:
            if base_axes[i] is not None and base_shape[i] > 1:
                entry = base_axes[i]
                break
        if entry is not None and dim % _entry_size(entry, mesh_sizes):
            entry = None
        out.append(entry)
    return out


def _base_layout(variable):
    """The layout a base variable was created with (`None` if unplaced)."""
    layout = getattr(variable, "_layout", None)
    if layout is not None:
        return layout
    distribution = _active_distribution()
    if distribution is None:
        return None
    return distribution.get_variable_layout(variable)


def adapter_layout(layer, adapter_name, base_layout=None):
    """The layout an adapter variable gets, derived from its base weight's.

    Args:
        layer: a built (or building: base weights created) keras_lora layer.
        adapter_name: str, `"lora_a"`, `"lora_b"`, `"reverse_lora_a"` or
            `"reverse_lora_b"`.
        base_layout: optional `keras.distribution.TensorLayout` (or jax
            `NamedSharding`) of the base weight. Defaults to the layout the
            base variable was created with, or, if it has none, the active
            distribution's layout for it.

    Returns:
        A `TensorLayout` on the base layout's mesh (a `NamedSharding` if the
        base layout is one): A is sharded like the base weight's input axes,
        B like its output axes, the rank axis and any axis whose size does
        not divide the mesh axis size are replicated. `None` if the name is
        not one of the layer's adapters or no base layout is known.

    Example:

    ```python
    mesh = keras.distribution.DeviceMesh((1, 2), ("batch", "model"))
    kernel = keras.distribution.TensorLayout((None, "model"), mesh)
    layer = keras_lora.LoRADense(8, rank=3)
    layer.build((2, 4))
    adapter_layout(layer, "lora_a", kernel).axes  # (None, None)
    adapter_layout(layer, "lora_b", kernel).axes  # (None, "model")
    ```
    """
    shapes = {}
    for a_name, b_name, a_shape, b_shape in layer.lora_shapes():
        shapes[a_name] = (a_name, a_shape, b_shape, True)
        shapes[b_name] = (a_name, a_shape, b_shape, False)
    if adapter_name not in shapes:
        return None
    a_name, a_shape, b_shape, is_a = shapes[adapter_name]
    base_name = _adapter_base_name(layer, a_name)
    if base_name is None:
        return None
    base = layer.base_weights()[base_name]
    if base_layout is None:
        base_layout = _base_layout(base)
    if base_layout is None:
        return None
    base_shape = tuple(base.shape)
    own_shape = tuple(a_shape if is_a else b_shape)
    sizes = _mesh_axis_sizes(base_layout)
    base_axes = _layout_axes(base_layout, len(base_shape))
    groups = _axis_groups(layer, base_shape, a_shape, b_shape)
    if sizes is None or base_axes is None or groups is None:
        axes = (None,) * len(own_shape)
    elif is_a:
        axes = tuple(
            derive_adapter_axes(
                base_axes, base_shape, groups[0], own_shape[:-1], sizes
            )
        ) + (None,)
    else:
        axes = (None,) + tuple(
            derive_adapter_axes(
                base_axes, base_shape, groups[1], own_shape[1:], sizes
            )
        )
    return _make_layout(base_layout, axes)


def _make_layout(like, axes):
    if isinstance(like, keras.distribution.TensorLayout):
        return keras.distribution.TensorLayout(axes, like.device_mesh)
    import jax

    return jax.sharding.NamedSharding(
        like.mesh, jax.sharding.PartitionSpec(*axes)
    )


class _PinnedLayout:
    """The active distribution, except for one adapter it pins a layout."""

    def __init__(self, distribution, name, layout):
        self._distribution = distribution
        self._name = name
        self._layout = layout

    def get_variable_layout(self, variable):
        if variable.name == self._name:
            return self._layout
        return self._distribution.get_variable_layout(variable)

    def __getattr__(self, attr):
        return getattr(self._distribution, attr)


def _base_strategy(layer, name):
    """The `tf.distribute` strategy of the adapted base weight, if it was
    created under one and no strategy scope is active now."""
    import tensorflow as tf

    if tf.distribute.has_strategy():
        return None
    if name not in {n for pair in layer.lora_shapes() for n in pair[:2]}:
        return None
    base_name = _adapter_base_name(layer, name)
    if base_name is None:
        return None
    value = getattr(layer.base_weights()[base_name], "value", None)
    if isinstance(value, tf.distribute.DistributedValues):
        return getattr(value, "distribute_strategy", None)
    return None


@contextlib.contextmanager
def adapter_layout_scope(layer, name):
    """Creates the adapter variable `name` with its derived layout.

    Used by `LoRALayer.add_weight`. On JAX with an active
    `keras.distribution`, the distribution answers
    `adapter_layout(layer, name)` for the variable called `name` instead of
    consulting its layout map. On TensorFlow, when the base weight is a
    `tf.distribute` variable (e.g. mirrored) and no strategy scope is
    active, the adapter is created in the base weight's strategy scope, so
    `apply_lora` called outside `strategy.scope()` still gives mirrored
    adapters. Otherwise (PyTorch, no distribution) a no-op.
    """
    if keras.backend.backend() == "tensorflow":
        strategy = _base_strategy(layer, name)
        if strategy is None:
            yield
        else:
            with strategy.scope():
                yield
        return
    distribution = _active_distribution()
    layout = None
    if distribution is not None:
        layout = adapter_layout(layer, name)
    if layout is None:
        yield
        return
    keras.distribution.set_distribution(
        _PinnedLayout(distribution, name, layout)
    )
    try:
        yield
    finally:
        keras.distribution.set_distribution(distribution)


def _lora_layers(model):
    from keras_lora.apply import lora_layers
    from keras_lora.layers.base import LoRALayer

    layers = list(lora_layers(model).values())
    if isinstance(model, LoRALayer):
        layers.insert(0, model)
    return layers


def lora_layout_map(layout_map, model):
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

    Example:

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
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(
            "`model` has no keras_lora layer; apply LoRA first. Received: "
            f"model={getattr(model, 'name', model)!r}"
        )
    mesh = layout_map.device_mesh
    new = keras.distribution.LayoutMap(mesh)
    for key in layout_map:
        new[key] = layout_map[key]
    for layer in layers:
        if not layer.built:
            continue
        for name, variable in layer.adapter_weights().items():
            base_name = _adapter_base_name(layer, name)
            base = layer.base_weights()[base_name] if base_name else None
            base_layout = None
            if base is not None:
                base_layout = layout_map[base.path]
                if base_layout is None:
                    base_layout = getattr(base, "_layout", None)
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


def variable_layouts(model):
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
