"""Where a LoRA layer's adapters live: layouts derived from the base weight.

An adapter's layout is never read from a `LayoutMap`: it is derived from
the layout of the base weight it adapts (`adapter_layout`), and
`adapter_layout_scope` creates the adapter with it (JAX
`keras.distribution`) or in the base weight's `tf.distribute` strategy
(TensorFlow). The rule and its reasons are in `keras_lora.distribution`.
"""

import contextlib
import math

import keras

from keras_lora import _keras_private
from keras_lora.layers.config import magnitude_name

__all__ = [
    "adapted_weight",
    "adapter_layout",
    "adapter_layout_scope",
    "derive_adapter_axes",
]


def _active_distribution():
    """The active `keras.distribution` on JAX, else `None`."""
    if keras.backend.backend() != "jax":
        return None
    return keras.distribution.distribution()


def adapted_weight(layer, adapter_name):
    """The base variable (`kernel`, `pointwise_kernel`, `depthwise_kernel`,
    `embeddings`, `reverse_embeddings`) an adapter of `layer` adapts, or
    `None`."""
    base = layer.base_weights()
    if adapter_name.startswith("reverse_"):
        return base.get("reverse_embeddings")
    if adapter_name.startswith("depthwise_"):
        return base.get("depthwise_kernel")
    for name in ("kernel", "pointwise_kernel", "embeddings"):
        if name in base:
            return base[name]
    return None


def _checked_groups(layer, base_shape, a_shape, b_shape):
    """The layer's `adapter_axis_groups`, or `None` where the adapter's
    shapes do not factor the base weight (then it is replicated)."""
    a_groups, b_groups = layer.adapter_axis_groups(base_shape, len(a_shape))
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
    layout = _keras_private.variable_layout(variable)
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
        adapter_name: str, one of the layer's adapter names (`"lora_a"`,
            `"lora_b"`, `"reverse_lora_a"`, `"depthwise_lora_b"`, ...).
        base_layout: optional `keras.distribution.TensorLayout` (or jax
            `NamedSharding`) of the base weight. Defaults to the layout the
            base variable was created with, or, if it has none, the active
            distribution's layout for it.

    Returns:
        A `TensorLayout` on the base layout's mesh (a `NamedSharding` if the
        base layout is one): A is sharded like the base weight's input axes,
        B (and a DoRA magnitude) like its output axes, the rank axis and
        any axis whose size does not divide the mesh axis size are
        replicated. `None` if the name is not one of the layer's adapters or
        no base layout is known.

    Examples:
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
        # A DoRA magnitude: B's output axes, without the rank axis.
        shapes[magnitude_name(a_name)] = (a_name, a_shape, b_shape, None)
    if adapter_name not in shapes:
        return None
    a_name, a_shape, b_shape, is_a = shapes[adapter_name]
    base = adapted_weight(layer, a_name)
    if base is None:
        return None
    if base_layout is None:
        base_layout = _base_layout(base)
    if base_layout is None:
        return None
    base_shape = tuple(base.shape)
    own_shape = tuple(a_shape if is_a else b_shape)
    sizes = _mesh_axis_sizes(base_layout)
    base_axes = _layout_axes(base_layout, len(base_shape))
    groups = _checked_groups(layer, base_shape, a_shape, b_shape)
    if is_a is None:
        axes = (None,) * (len(own_shape) - 1)
        if sizes is not None and base_axes is not None and groups:
            axes = tuple(
                derive_adapter_axes(
                    base_axes, base_shape, groups[1], own_shape[1:], sizes
                )
            )
        return _make_layout(base_layout, axes)
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
    names = {n for pair in layer.lora_shapes() for n in pair[:2]}
    names |= {magnitude_name(pair[0]) for pair in layer.lora_shapes()}
    if name not in names:
        return None
    base = adapted_weight(layer, name)
    if base is None:
        return None
    value = getattr(base, "value", None)
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
