"""Several named adapters on one model, and mixed-adapter batches.

Each keras_lora layer keeps computing with its own `lora_a` / `lora_b`
variables: they always hold the *active* adapter, so training, merging,
saving and the single-adapter forward pass are exactly as without this
module (same speed: nothing extra runs). The other adapters live in an
`AdapterBank` attached to each layer (`layer.adapter_bank`), as float32
NumPy arrays keyed by adapter name.

- `add_adapter(model, name, weights=None)`: a new adapter (fresh, or from a
  `save_adapters` file or tensors), not active until `set_active_adapter`.
- `set_active_adapter(model, name)`: swaps the values into the variables.
- `delete_adapter`, `list_adapters`, `active_adapter`.
- `disable_adapters(model)`: context manager in which the model computes as
  its base model (every B is zero inside, restored bit for bit after).
- `combine_adapters(model, {"a": 0.6, "b": 0.4}, name)`: PEFT's "linear"
  weighted combination of equal-rank adapters.
- `mixed_batch(model, adapter_ids)`: context manager in which example `i`
  of every call uses adapter `list_adapters(model)[adapter_ids[i]]`;
  `mixed_batch_call` is the function form (use it under `jax.jit` or
  `tf.function`), `export_mixed_saved_model` writes one TF SavedModel that
  serves every adapter, with the adapter index as an input.

Mixed batches follow the "gather per example" scheme of multi-LoRA serving
(S-LoRA, Sheng et al. 2023, arXiv:2311.03285; Punica, Chen et al. 2023,
arXiv:2310.18547): the banks are stacked as A (n, d_in, r) and
B (n, r, d_out) with each adapter's scaling folded into B, gathered by index
and applied with batched einsums:
`y_i = x_i @ W + (x_i @ A[k_i]) @ (s_k_i * B[k_i])`. On DoRA layers each
example's output is then rescaled by its own adapter's magnitude over the
norm of its adapted weight.
"""

import contextlib
import numbers
import os

import keras
import numpy as np
from keras import ops

from keras_lora.adapters import adapter_state
from keras_lora.adapters import check_adapter_state
from keras_lora.adapters import read_adapters
from keras_lora.adapters import rekey_to_model
from keras_lora.adapters import split_adapters
from keras_lora.banks import DEFAULT_ADAPTER
from keras_lora.banks import MIXED
from keras_lora.banks import AdapterBank  # noqa: F401
from keras_lora.banks import banks_of
from keras_lora.banks import check_only_adapters_train
from keras_lora.banks import model_banks
from keras_lora.banks import named_layers
from keras_lora.banks import restore_adapters
from keras_lora.banks import snapshot_adapters
from keras_lora.banks import zero_b
from keras_lora.layers.config import lora_scaling
from keras_lora.layers.config import magnitude_name
from keras_lora.walk import lora_layers
from keras_lora.walk import reset_compiled_functions
from keras_lora.walk import to_numpy
from keras_lora.walk import traced_state


def list_adapters(model):
    """Names of the model's adapters, in index order (for mixed batches).

    A model that never had `add_adapter` called has one: `"default"`.
    """
    banks = model_banks(model)
    if banks is None:
        return [DEFAULT_ADAPTER]
    return list(banks[0].adapters)


def active_adapter(model):
    """The name of the adapter the model computes with."""
    banks = model_banks(model)
    return DEFAULT_ADAPTER if banks is None else banks[0].active


def _check_name(name, argument="name"):
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"`{argument}` must be a non-empty str. Received: "
            f"{argument}={name!r}"
        )


def _require(model, name, argument="name"):
    names = list_adapters(model)
    if name not in names:
        raise ValueError(
            f"No adapter named {name!r}. Received: {argument}={name!r}; "
            f"the model has {names}."
        )


def add_adapter(model, name, weights=None):
    """Adds a named adapter to every LoRA layer of `model` (not activated).

    Args:
        model: a model with keras_lora layers (all built).
        name: str, a new adapter name.
        weights: `None` (default) for a fresh adapter (A from the layer's
            `lora_a_initializer`, B from `lora_b_initializer`: zeros, so it
            starts as the base model; a DoRA layer's magnitude starts at
            the adapted weight's norm); or a path to a `save_adapters` file
            (its alpha and rsLoRA flag come along); or `{key: array}` with
            keys `"<layer path>.lora_a"` etc. as `save_adapters` writes.
            A file holding several adapters gives the one named `name`.

    Raises:
        ValueError: `name` empty or already used; `weights` keys or shapes
            do not match the model (listed, nothing added); a layer trains
            its bias.

    Examples:
        >>> kl.multi.add_adapter(
        ...     model, "fr", "fr.safetensors")  # doctest: +SKIP
        >>> kl.multi.set_active_adapter(model, "fr")  # doctest: +SKIP
    """
    _check_name(name)
    layers = named_layers(model, create=True)
    if name in list_adapters(model):
        raise ValueError(
            f"An adapter named {name!r} already exists. Received: "
            f"name={name!r}; delete it first."
        )
    configs = {}
    if weights is None:
        tensors = {}
        for path, layer in layers.items():
            for a_name, b_name, a_shape, b_shape in layer.lora_shapes():
                a = to_numpy(layer.lora_a_initializer(a_shape, "float32"))
                b = to_numpy(layer.lora_b_initializer(b_shape, "float32"))
                tensors[f"{path}.{a_name}"] = a
                tensors[f"{path}.{b_name}"] = b
                if layer.use_dora:
                    # DoRA: the magnitude starts at the adapted weight's
                    # norm, so the new adapter's output is unchanged.
                    norms = layer.adapter_norms(
                        (a_name, b_name), a, b * np.float32(layer.scaling)
                    )
                    tensors[f"{path}.{magnitude_name(a_name)}"] = np.reshape(
                        to_numpy(norms, "float32"), b_shape[1:]
                    )
    elif isinstance(weights, dict):
        tensors = {k: np.array(v, "float32") for k, v in weights.items()}
    else:
        tensors, config = read_adapters(weights)
        entries, _ = split_adapters(tensors, config, os.fspath(weights))
        if len(entries) > 1 and name not in entries:
            raise ValueError(
                f"{os.fspath(weights)!r} holds the adapters {list(entries)};"
                f" `add_adapter` takes the one named as `name`. Received: "
                f"name={name!r}. To load several, use "
                "`keras_lora.load_adapters(model, path, adapters=[...])`."
            )
        tensors, config = (
            entries[name] if len(entries) > 1 else next(iter(entries.values()))
        )
        # Re-keyed by stable path for a model whose names Keras renumbered.
        tensors, configs = rekey_to_model(model, layers, tensors, config)
    check_adapter_state(layers, tensors)
    for path, layer in layers.items():
        config = configs.get(path, {})
        if config and config.get("rank") != layer.adapter_rank:
            raise ValueError(
                f"Layer '{path}': the adapter has rank {config.get('rank')}, "
                f"the layer {layer.adapter_rank}."
            )
        if config and config.get("use_dora", False) != layer.use_dora:
            raise ValueError(
                f"Layer '{path}': the adapter has use_dora="
                f"{config.get('use_dora', False)}, the layer "
                f"use_dora={layer.use_dora}; named adapters of a layer are "
                "all DoRA or all plain LoRA."
            )
    for path, layer in layers.items():
        config = configs.get(path, {})
        layer.adapter_bank.adapters[name] = {
            "values": {
                n: tensors[f"{path}.{n}"] for n in layer.adapter_weights()
            },
            "alpha": float(config.get("alpha", layer.adapter_alpha)),
            "use_rslora": bool(config.get("use_rslora", layer.use_rslora)),
        }


def set_active_adapter(model, name):
    """Makes `name` the adapter the model computes and trains with.

    The current adapter's values (trained or not) are kept in its bank
    entry; `name`'s values are assigned to the layers' variables and its
    alpha set on the layers. Compiled `predict`/`fit`/`generate` functions
    keep running (they read the variables at every call, no retrace); they
    are reset only where the new adapter's scaling differs.

    Raises:
        ValueError: no adapter named `name`.
    """
    _check_name(name)
    _require(model, name)
    layers = named_layers(model)
    banks = banks_of(layers)
    if banks is None:
        return
    merged = sorted(p for p, layer in layers.items() if layer.merged)
    if merged:
        raise ValueError(
            f"Layers {merged} are merged in place; call "
            "`keras_lora.unmerge_adapters(model)` before switching adapters."
        )
    check_only_adapters_train(model, layers)
    before = traced_state(layers)
    swap_optimizer_state(model, banks, name)
    for bank in banks:
        bank.activate(name)
    if traced_state(layers) != before:
        # Only a different alpha (or rsLoRA flag) is traced; A and B are
        # variables, read at every call.
        reset_compiled_functions(model, layers)


def _built_optimizer(model):
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not getattr(optimizer, "built", False):
        return None
    return optimizer


def _optimizer_values(optimizer):
    return [ops.copy(v.value) for v in optimizer.variables]


def _assign_optimizer_values(optimizer, values):
    for variable, value in zip(optimizer.variables, values, strict=True):
        variable.assign(value)


def swap_optimizer_state(model, banks, name):
    """Keeps the optimizer's state (step count, momentum, Adam's moments)
    per adapter: A and B are the same variables for every adapter, so their
    optimizer slots are saved for the adapter left and restored (or made
    fresh, as a new optimizer of the same config has them) for `name`."""
    optimizer = _built_optimizer(model)
    if optimizer is None:
        return
    states = banks[0].optimizer_states
    active = banks[0].active
    states[(id(optimizer), active)] = _optimizer_values(optimizer)
    values = states.pop((id(optimizer), name), None)
    if values is None:
        fresh = optimizer.__class__.from_config(optimizer.get_config())
        fresh.build(model.trainable_variables)
        if [tuple(v.shape) for v in fresh.variables] != [
            tuple(v.shape) for v in optimizer.variables
        ]:
            raise ValueError(
                "The model's optimizer was built for other variables than "
                "the adapters it trains now; compile the model again before "
                f"switching adapters. Received: name={name!r}"
            )
        values = _optimizer_values(fresh)
    _assign_optimizer_values(optimizer, values)


def delete_adapter(model, name):
    """Removes a non-active adapter from every layer.

    Raises:
        ValueError: no adapter named `name`, or it is the active one.
    """
    _check_name(name)
    _require(model, name)
    if name == active_adapter(model):
        raise ValueError(
            f"Cannot delete the active adapter. Received: name={name!r}; "
            "activate another one first (`set_active_adapter`)."
        )
    banks = model_banks(model)
    for bank in banks:
        del bank.adapters[name]
    for key in [k for k in banks[0].optimizer_states if k[1] == name]:
        del banks[0].optimizer_states[key]


def adapter_tensors(model, name):
    """`{"<path>.<var>": np.ndarray}` of a named adapter (a copy)."""
    _require(model, name)
    layers = lora_layers(model)
    banks = model_banks(model)
    if banks is None or name == active_adapter(model):
        return adapter_state(model)[0]
    return {
        f"{path}.{var}": value.copy()
        for path, layer in layers.items()
        for var, value in layer.adapter_bank.adapters[name]["values"].items()
    }


@contextlib.contextmanager
def disable_adapters(model):
    """Context manager in which `model` computes as its base model.

    Every B factor is zero inside (a DoRA magnitude equals the base
    weight's norm), so compiled functions (`predict`, `jax.jit`) see the
    change without a retrace. Adapters switched to inside
    stay disabled. On exit, however the block ends (an exception, nested
    blocks), the adapter state is restored exactly as it was found: the same
    adapters with the same values and alphas, the same one active; what was
    done to adapters inside (training, switching, adding, deleting) is
    undone. A trained bias (`train_bias=True`) is not an adapter and keeps
    what it learned.

    Raises:
        ValueError: a layer is merged in place.

    Examples:
        >>> with kl.multi.disable_adapters(model):  # doctest: +SKIP
        ...     base_outputs = model(x)
    """
    layers = named_layers(model)
    for layer in layers.values():
        if layer.merged:
            raise ValueError(
                f"Layer '{layer.name}' is merged in place; unmerge it first."
            )
    saved = [(layer, snapshot_adapters(layer)) for layer in layers.values()]
    optimizer = _built_optimizer(model)
    optimizer_values = optimizer and _optimizer_values(optimizer)
    banks = banks_of(layers)
    optimizer_states = banks and dict(banks[0].optimizer_states)
    for layer in layers.values():
        layer.adapters_disabled += 1
        zero_b(layer)
    try:
        yield model
    finally:
        before = traced_state(layers)
        for layer, snapshot in saved:
            layer.adapters_disabled -= 1
            restore_adapters(layer, snapshot)
        if optimizer is not None and optimizer.built:
            _assign_optimizer_values(optimizer, optimizer_values)
        if banks:
            banks[0].optimizer_states = optimizer_states
        if traced_state(layers) != before:
            # An adapter of another alpha was switched to inside.
            reset_compiled_functions(model, layers)


def combine_adapters(model, weights, name):
    """Adds the weighted combination of equal-rank adapters as `name`.

    PEFT's `add_weighted_adapter(combination_type="linear")`: for each
    layer, `A = sum_k sqrt(w_k * s_k) * A_k` and `B = sum_k sqrt(w_k * s_k)
    * B_k`, with alpha = rank (scaling 1). For one adapter with weight 1 this
    reproduces it exactly; for several, `A @ B` includes cross terms
    `sqrt(w_j s_j w_k s_k) A_j B_k` (as in PEFT).

    Args:
        model: a model with named adapters.
        weights: `{adapter_name: float >= 0}`, at least one entry.
        name: str, the new adapter's name (not activated).

    Raises:
        ValueError: empty `weights`, unknown names, negative weights,
            adapters of different ranks, or DoRA layers.
    """
    _check_name(name)
    if not isinstance(weights, dict) or not weights:
        raise ValueError(
            "`weights` must be a non-empty dict {adapter_name: weight}. "
            f"Received: weights={weights!r}"
        )
    for key, w in weights.items():
        _require(model, key, "weights")
        if (
            not isinstance(w, numbers.Real)
            or isinstance(w, bool)
            or not np.isfinite(w)
            or w < 0
        ):
            raise ValueError(
                f"Weights must be non-negative numbers. Received: "
                f"weights[{key!r}]={w!r}"
            )
    layers = named_layers(model, create=True)
    if name in list_adapters(model):
        raise ValueError(f"An adapter named {name!r} already exists.")
    dora = sorted(p for p, layer in layers.items() if layer.use_dora)
    if dora:
        raise ValueError(
            f"Layers {dora} are DoRA layers (`use_dora=True`): a weighted "
            "sum of DoRA adapters has no single magnitude, so they cannot be "
            "combined."
        )
    for bank in model_banks(model):
        bank.sync()
    tensors = {}
    for path, layer in layers.items():
        for var in layer.adapter_weights():
            total = 0.0
            for key, w in weights.items():
                entry = layer.adapter_bank.adapters[key]
                s = lora_scaling(
                    layer.adapter_rank, entry["alpha"], entry["use_rslora"]
                )
                total = total + np.sqrt(w * s) * entry["values"][var]
            tensors[f"{path}.{var}"] = np.asarray(total, "float32")
    add_adapter(model, name, tensors)
    for layer in layers.values():
        entry = layer.adapter_bank.adapters[name]
        entry["alpha"] = float(layer.adapter_rank)
        entry["use_rslora"] = False


# -- Mixed batches ------------------------------------------------------------


@contextlib.contextmanager
def mixed_batch(model, adapter_ids):
    """Context manager: example `i` uses adapter `adapter_ids[i]`.

    `adapter_ids` indexes `list_adapters(model)`; it is an int tensor or
    array of shape (batch,). Works in eager calls and while tracing a
    compiled function (`jax.jit`, `tf.function`): the context must be
    entered inside the traced function, as `mixed_batch_call` does.

    Raises:
        ValueError: the model has no named adapters (call `add_adapter`),
            `adapter_ids` is not a rank-1 integer tensor, or (given as a
            NumPy array or list) an id is out of range.
    """
    layers = named_layers(model, create=True)
    if any(layer.adapters_disabled for layer in layers.values()):
        raise ValueError(
            "Cannot run a mixed batch inside `disable_adapters`: the "
            "disabled model has no adapter to choose."
        )
    ids = ops.convert_to_tensor(adapter_ids)
    if len(ids.shape) != 1 or "int" not in str(ids.dtype):
        raise ValueError(
            "`adapter_ids` must be a rank-1 integer tensor (one adapter "
            f"index per example). Received: shape={tuple(ids.shape)}, "
            f"dtype={ids.dtype}"
        )
    if isinstance(adapter_ids, list | tuple | np.ndarray | int):
        # Concrete ids (traced ones cannot be read): out-of-range indices
        # would gather garbage silently on some backends.
        values = np.asarray(adapter_ids)
        names = list_adapters(model)
        count = len(names)
        if values.size and (values.min() < 0 or values.max() >= count):
            raise ValueError(
                f"`adapter_ids` must index the model's {count} adapters "
                f"{names} (0 to {count - 1}). Received: "
                f"adapter_ids={values.tolist()}"
            )
    token = MIXED.set(
        (frozenset(map(id, layers.values())), ops.cast(ids, "int32"))
    )
    # `predict`, `fit` or `generate` traced inside the block would keep the
    # ids, and traced before it would ignore them: both are re-traced.
    reset_compiled_functions(model, layers)
    try:
        yield model
    finally:
        MIXED.reset(token)
        reset_compiled_functions(model, layers)


def mixed_batch_call(model, inputs, adapter_ids, **kwargs):
    """`model(inputs, **kwargs)` with adapter `adapter_ids[i]` for example i.

    Args:
        model: a model with named adapters (`add_adapter`).
        inputs: the model's inputs, batch first.
        adapter_ids: int tensor `(batch,)`, indices into
            `list_adapters(model)`.
        **kwargs: passed to the model's call.

    Returns:
        The model's outputs, example i computed with adapter
        `adapter_ids[i]`. Under `jax.jit` (or `tf.function`) one compiled
        function serves every mix of adapters.

    Examples:
        >>> import keras, numpy as np, keras_lora
        >>> inputs = keras.Input((3,))
        >>> model = keras.Model(inputs, keras_lora.LoRADense(2, rank=1)(inputs))
        >>> a, b = (
        ...     np.ones(v.shape, "float32") for v in model.trainable_weights)
        >>> path = keras_lora.lora_layers(model).popitem()[0]
        >>> keras_lora.multi.add_adapter(
        ...     model, "ones", {f"{path}.lora_a": a, f"{path}.lora_b": b})
        >>> x = np.ones((2, 3), "float32")
        >>> out = keras_lora.multi.mixed_batch_call(model, x, np.array([0, 1]))
        >>> out = keras.ops.convert_to_numpy(out)
        >>> (out[1] - out[0]).round(4).tolist()  # s * (x @ A) @ B = 3
        [3.0, 3.0]
    """
    with mixed_batch(model, adapter_ids):
        return model(inputs, **kwargs)


def export_mixed_saved_model(model, path, input_signature):
    """Writes one TF SavedModel serving every named adapter.

    The `serve` endpoint takes the model's inputs plus `adapter_ids`
    (int32, shape (batch,), indexing `list_adapters(model)`). The non-active
    adapters are stored as constants in the graph, the base weights and the
    active adapter as variables. Needs the TensorFlow backend (Keras's
    export of JAX models needs jax2tf; of torch models it is unsupported).

    Args:
        model: a model with named adapters.
        path: str, the SavedModel directory.
        input_signature: list of `tf.TensorSpec` (or nested structures) for
            the model's inputs, as `keras.export.ExportArchive` takes.

    Raises:
        RuntimeError: the backend is not TensorFlow.
    """
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "export_mixed_saved_model needs KERAS_BACKEND=tensorflow. "
            f"Received: backend {keras.backend.backend()!r}. Save the "
            "adapters (`save_adapters`) and export from a TensorFlow process."
        )
    import tensorflow as tf

    named_layers(model, create=True)
    for bank in model_banks(model):
        bank.sync()
    ids_spec = tf.TensorSpec([None], tf.int32, name="adapter_ids")

    def serve(inputs, adapter_ids):
        return mixed_batch_call(model, inputs, adapter_ids, training=False)

    archive = keras.export.ExportArchive()
    archive.track(model)
    signature = list(input_signature)
    inner = signature[0] if len(signature) == 1 else signature
    archive.add_endpoint(
        "serve",
        lambda inputs, adapter_ids: serve(inputs, adapter_ids),
        input_signature=[inner, ids_spec],
    )
    archive.write_out(path, verbose=False)
    return path


__all__ = [
    "AdapterBank",
    "DEFAULT_ADAPTER",
    "active_adapter",
    "adapter_tensors",
    "add_adapter",
    "combine_adapters",
    "delete_adapter",
    "disable_adapters",
    "export_mixed_saved_model",
    "list_adapters",
    "mixed_batch",
    "mixed_batch_call",
    "set_active_adapter",
]
