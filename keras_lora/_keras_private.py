"""The one place where keras_lora touches Keras's private API.

Each name here is a Keras internal with no public equivalent in Keras 3.15;
if a Keras release moves one, only this module changes.
"""

# Attaches a mask to an eager tensor or KerasTensor, as Keras's own
# ReversibleEmbedding does in `call` (its `compute_mask` returns None).
import contextlib
import contextvars
import inspect
import threading

from keras.src.backend import set_keras_mask  # noqa: F401

# The name-scope path Keras gives a variable created now (`Variable.path`).
from keras.src.backend.common.name_scope import current_path  # noqa: F401


@contextlib.contextmanager
def base_product_only(layer):
    """Runs a quantized layer's own `_int8_call` / `_int4_call` without its
    bias, activation and logit soft cap (set aside without Keras's variable
    tracking seeing it), so the caller adds the adapter before them."""
    saved = {}
    for name in ("bias", "activation", "logit_soft_cap"):
        if name in layer.__dict__:
            saved[name] = layer.__dict__[name]
            object.__setattr__(layer, name, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            object.__setattr__(layer, name, value)


def int4_block_size(layer):
    """An int4 layer's group size (`None` for one scale per output unit)."""
    size = getattr(layer, "_int4_block_size", None)
    return None if size is None or size == -1 else size


def int4_column_size(layer):
    """The unpacked column count of an int4 `EinsumDense` kernel."""
    return layer._int4_unpacked_column_size


def source_policy_name(policy):
    """The float policy a quantized dtype policy was made from. (Keras
    3.15's `DTypePolicyMap.get_config` sets `_source_name` to `None` on
    the live policies it serializes; their dtypes still say it.)"""
    if policy._source_name is not None:
        return policy._source_name
    compute, variable = policy.compute_dtype, policy.variable_dtype
    return variable if compute == variable else f"mixed_{compute}"


def einsum_dequant_scale(layer, scale):
    """An int8 `EinsumDense` kernel scale laid out to divide the kernel
    (Keras's `_adjust_scale_for_dequant`)."""
    return layer._adjust_scale_for_dequant(scale)


def dequantize_grouped(values, scale, zero, g_idx, group_axis):
    """Keras's grouped int4 dequantization with zero points."""
    from keras.src.quantizers.quantizers import dequantize_with_sz_map

    return dequantize_with_sz_map(values, scale, zero, g_idx, group_axis)


def pin_quantized_policies(layers):
    """Gives each quantized layer that reads its policy from a
    `DTypePolicyMap` (a keras-hub model rebuilt from its config) that policy
    as its own, as `model.quantize` left it.

    Keras 3.15's `Embedding._get_embeddings_with_merged_lora` (and the
    kernel twins) read `layer.dtype_policy.quantization_mode`, which for a
    map is the map's default (float), while `save_own_variables` reads the
    layer's mode by path (int8): saving such a model stores `None` scales
    and fails ("Invalid dtype: object"), in plain Keras too.
    """
    from keras.src.dtype_policies.dtype_policy_map import DTypePolicyMap

    for layer in layers:
        policy = getattr(layer, "_dtype_policy", None)
        if not isinstance(policy, DTypePolicyMap) or not layer.path:
            continue
        own = policy[layer.path]
        if getattr(own, "quantization_mode", None) is not None:
            layer._dtype_policy = own


def raw_value(variable):
    """A variable's value as a backend tensor in the variable's own dtype
    (not autocast to a layer's compute dtype). On TensorFlow, Keras's
    `variable.value` is the `tf.Variable` itself; it is read here, so the
    result is a tensor."""
    with no_autocast():
        value = variable.value
    if type(value).__module__.startswith("tensorflow"):
        import tensorflow as tf

        return tf.convert_to_tensor(value)
    return value


def no_autocast():
    """A scope in which float variables read as their own dtype, not the
    layer's compute dtype (Keras's `AutocastScope(None)`): DoRA reads its
    float32 magnitude and the base weight for the norm at full precision
    under mixed policies."""
    from keras.src.backend.common.variables import AutocastScope

    return AutocastScope(None)


@contextlib.contextmanager
def unlocked(layer):
    """Lets a built layer track new variables (as Keras's `enable_lora`)."""
    tracker = layer._tracker
    was_locked = tracker.locked
    tracker.unlock()
    try:
        yield
    finally:
        if was_locked:
            tracker.lock()


def rewrap_quantize(layer):
    """Re-binds `layer.quantize` to its (new) class's method inside Keras's
    `quantize_wrapper` (config resolution, argument checks, tracker
    unlocked), which `Layer.__new__` bound to the class the layer was
    created with: needed after `layer.__class__` is changed."""
    import functools

    from keras.src.quantizers.quantization_config import (
        validate_and_resolve_config,
    )

    method = type(layer).quantize.__get__(layer)

    @functools.wraps(method)
    def quantize_wrapper(mode=None, config=None, **kwargs):
        config = validate_and_resolve_config(mode, config)
        mode = config.mode
        layer._check_quantize_args(mode, layer.compute_dtype)
        layer._tracker.unlock()
        try:
            method(mode=mode, config=config, **kwargs)
        finally:
            layer._tracker.lock()

    object.__setattr__(layer, "quantize", quantize_wrapper)


def refresh_call_signature(layer):
    """Recomputes what `Layer.__init__` caches about `call`'s signature.

    Needed after `layer.__class__` is changed to a keras_lora class whose
    `call` takes `training` where the base class's did not.
    """
    layer._call_signature = inspect.signature(layer.call)
    layer.call_signature_parameters = [
        p.name for p in layer._call_signature.parameters.values()
    ]
    layer._call_has_training_arg = "training" in layer.call_signature_parameters
    layer._call_has_mask_arg = "mask" in layer.call_signature_parameters
    layer._call_has_context_arg = {
        arg: (arg in layer.call_signature_parameters)
        for arg in layer._call_context_args
    }


def sublayers(layer):
    """The layers `layer` tracks directly (Keras's `_layers`), in order."""
    return list(getattr(layer, "_layers", []))


def refresh_torch_params(layer):
    """On torch, re-registers a layer's variables as module parameters."""
    if hasattr(layer, "_torch_params"):
        layer._track_variables()


def track_variable(layer, variable):
    """Registers an existing variable as one of `layer`'s own."""
    layer._track_variable(variable)


def _cache_attr_skipset(obj_type):
    """Keras 3.15's `saving_lib.get_attr_skipset` stores the attribute
    skip-set it computes under the key `saving_attr_skipset_<type>` but
    looks it up under `saving_attr_skiplist_<type>`, so every call builds a
    reference `Layer` and lists its attributes again (most of a model walk's
    time). Stores it where the lookup finds it; a Keras that caches it
    itself is left alone."""
    from keras.src.backend.common import global_state
    from keras.src.saving import saving_lib

    key = f"saving_attr_skiplist_{obj_type}"
    if global_state.get_global_attribute(key, None) is None:
        skipset = saving_lib.get_attr_skipset(obj_type)
        if global_state.get_global_attribute(key, None) is None:
            global_state.set_global_attribute(key, skipset)


def saveable_tree(root, list_name):
    """Yields `(path, obj)` for every Keras saveable under `root`.

    The paths are the ones Keras's saving library gives objects in `.keras`
    and `.weights.h5` files: attribute names, and for an element of a list,
    tuple or dict the name `list_name(obj)` (Keras uses the snake-case class
    name) with a counter for repeats, e.g.
    `backbone/transformer_layers/gemma_decoder_block_1/attention/query_dense`.
    They never contain Keras's auto-generated layer names, so a model built
    twice, in one process or two, gives the same paths. An object reachable
    at several paths is yielded once, at the first (Keras's visiting order).
    """
    from keras.src.saving import saving_lib
    from keras.src.saving.keras_saveable import KerasSaveable

    visited = set()
    skipsets = set()

    def join(path, name):
        return f"{path}/{name}" if path else name

    def unique(name, used):
        if name in used:
            used[name] += 1
            return f"{name}_{used[name]}"
        used[name] = 0
        return name

    def visit(obj, path):
        if id(obj) in visited:
            return
        visited.add(id(obj))
        yield path, obj
        obj_type = obj._obj_type()
        if obj_type not in skipsets:
            _cache_attr_skipset(obj_type)
            skipsets.add(obj_type)
        for attr, child in saving_lib._walk_saveable(obj):
            if isinstance(child, KerasSaveable):
                yield from visit(child, join(path, attr))
            elif isinstance(child, (list, dict, tuple)):
                yield from container(child, join(path, attr), set())

    def container(items, path, seen):
        if id(items) in seen:
            return
        seen.add(id(items))
        used = {}
        if isinstance(items, dict):
            items = list(items.values())
        for item in items:
            if isinstance(item, KerasSaveable):
                yield from visit(
                    item, join(path, unique(list_name(item), used))
                )
            elif isinstance(item, (list, dict, tuple)):
                name = unique("container", used)
                yield from container(item, join(path, name), seen)

    yield from visit(root, "")


def snake_case(name):
    """Keras's snake-casing of a class name (as in its saved files)."""
    from keras.src.utils import naming

    return naming.to_snake_case(name)


def own_variables(layer):
    """A layer's own variables in the order Keras saves them."""
    return list(layer._trainable_variables) + list(
        layer._non_trainable_variables
    )


def _replaced(value, mapping, depth):
    """`value` with the variables of `mapping` swapped, and whether any was.

    Lists and dicts are changed in place (Keras's tracked containers would
    track a new item again, and refuse to on a built layer, so items are set
    as a plain list or dict does); tuples are rebuilt. Containers nest up to
    `depth` levels.
    """
    if id(value) in mapping:
        return mapping[id(value)], True
    if depth == 0:
        return value, False
    if isinstance(value, list):
        replaced = False
        for i, item in enumerate(value):
            new, hit = _replaced(item, mapping, depth - 1)
            if hit and new is not item:
                list.__setitem__(value, i, new)
            replaced = replaced or hit
        return value, replaced
    if isinstance(value, dict):
        replaced = False
        for key, item in list(value.items()):
            new, hit = _replaced(item, mapping, depth - 1)
            if hit and new is not item:
                dict.__setitem__(value, key, new)
            replaced = replaced or hit
        return value, replaced
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        items = [_replaced(item, mapping, depth - 1) for item in value]
        if any(hit for _, hit in items):
            # A plain tuple (TensorFlow wraps tracked tuples in a proxy).
            return tuple(new for new, _ in items), True
    return value, False


def replace_variables(layer, mapping):
    """Makes `layer` hold `mapping[id(old)]` wherever it held a variable
    `old` of `mapping`: its attributes (e.g. `_kernel`), lists, tuples and
    dicts in them (Keras's tracked variable lists) up to three levels deep,
    and its tracker's bookkeeping. TensorFlow's own checkpoint graph
    (`tf.train.Checkpoint(layer)`) is not updated; Keras's saving does not
    use it. Returns whether anything was replaced."""
    replaced = False
    for key, value in list(vars(layer).items()):
        new, hit = _replaced(value, mapping, depth=3)
        if not hit:
            continue
        replaced = True
        if new is not value:
            layer.__dict__[key] = new
    tracker = getattr(layer, "_tracker", None)
    for ids in getattr(tracker, "stored_ids", {}).values():
        for old in [i for i in ids if i in mapping]:
            ids.discard(old)
            ids.add(id(mapping[old]))
    if replaced:
        refresh_torch_params(layer)
    return replaced


def functional_class():
    """Keras's class of functional models (`keras.Model(inputs, outputs)`)."""
    from keras.src.models.functional import Functional

    return Functional


def public_class_fields(cls):
    """`module`, `class_name` and `registered_name` as Keras serializes an
    instance of its own class `cls` (e.g. `keras.Sequential`)."""
    from keras.src.saving import serialization_lib

    fields = serialization_lib.serialize_with_public_class(cls)
    if fields is None:
        fields = {
            "module": cls.__module__,
            "class_name": cls.__name__,
            "registered_name": cls.__name__,
        }
    return {
        key: fields[key] for key in ("module", "class_name", "registered_name")
    }


def register_serializable_name(cls, registered_name):
    """Makes Keras serialize instances of `cls` under `registered_name`
    (without registering `cls` as what that name deserializes to)."""
    from keras.src.saving import object_registration

    object_registration.GLOBAL_CUSTOM_NAMES[cls] = registered_name


def remat_mode(layer):
    """The rematerialization mode a layer was created with (inside a
    `keras.RematScope`), or None; Keras keeps it out of the config."""
    return getattr(layer, "_remat_mode", None)


def set_remat_mode(layer, mode):
    layer._remat_mode = mode


def variable_layout(variable):
    """The distribution layout a variable was created with, or None."""
    return getattr(variable, "_layout", None)


def unpickle_model(buffer):
    """What Keras's `Model.__reduce__` unpickles a model's bytes with."""
    import keras

    return keras.Model._unpickle_model(buffer)


# -- Variable creation hook -------------------------------------------------

_PROVIDER = contextvars.ContextVar("keras_lora_weight_provider", default=None)
_HOOK_LOCK = threading.Lock()
_HOOK = {}


def _install_weight_hook():
    """Wraps `keras.layers.Layer.add_weight` once, so it asks the provider
    of the current context (if any) for each new variable."""
    import keras

    with _HOOK_LOCK:
        if _HOOK:
            return
        create = keras.layers.Layer.add_weight

        def add_weight(self, *args, **kwargs):
            provider = _PROVIDER.get()
            if provider is None:
                return create(self, *args, **kwargs)
            return provider(self, create, args, kwargs)

        add_weight.__doc__ = create.__doc__
        add_weight.__wrapped__ = create
        keras.layers.Layer.add_weight = add_weight
        _HOOK["create"] = create


@contextlib.contextmanager
def providing_weights(provider):
    """Routes every `Layer.add_weight` call made in this context to
    `provider(layer, create, args, kwargs)`, which returns the variable:
    `create(layer, *args, **kwargs)` (Keras's own `add_weight`) or an
    existing one. The context is the current thread or asyncio task (a
    `contextvars.ContextVar`), so layers built elsewhere meanwhile are not
    affected. Scopes nest: the innermost provider is asked first, and its
    `create` asks the enclosing scope's provider."""
    _install_weight_hook()
    outer = _PROVIDER.get()
    if outer is not None:
        inner = provider

        def provider(layer, create, args, kwargs):
            def create_outside(owner, *a, **k):
                return outer(owner, create, a, k)

            return inner(layer, create_outside, args, kwargs)

    token = _PROVIDER.set(provider)
    try:
        yield
    finally:
        _PROVIDER.reset(token)


def producer(tensor):
    """`(layer, input_tensors)` of the functional-graph node that made
    `tensor` (a symbolic `KerasTensor`), or `(None, [])` if none did."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None, []
    operation, node_index, _ = history
    nodes = getattr(operation, "_inbound_nodes", [])
    if node_index >= len(nodes):
        return operation, []
    return operation, list(nodes[node_index].input_tensors)


@contextlib.contextmanager
def host_values(pairs):
    """Lets each `(variable, array)` of `pairs` read as `array` (Keras's
    `Variable._value`), e.g. while Keras's saving writes gathered copies of
    variables sharded across processes; restored on exit."""
    kept = [(variable, variable._value) for variable, _ in pairs]
    try:
        for variable, array in pairs:
            variable._value = array
        yield
    finally:
        for variable, value in kept:
            variable._value = value
