"""Named adapters of keras_lora layers: the per-layer bank and the model's
set of adapters, shared by `keras_lora.multi` (switching, mixed batches) and
`keras_lora.adapters` (files holding several adapters)."""

import contextvars

import numpy as np
from keras import ops

from keras_lora._keras_private import raw_value
from keras_lora.layers import LoRALayer
from keras_lora.layers.base import INITIAL_PREFIX
from keras_lora.layers.config import lora_scaling
from keras_lora.layers.config import magnitude_name
from keras_lora.walk import require_lora_layers
from keras_lora.walk import to_numpy

#: The name given to the adapter a model already holds when a second one is
#: added (PEFT's name for it, too).
DEFAULT_ADAPTER = "default"

# (ids of the LoRA layers, adapter ids tensor) while a mixed batch runs.
MIXED = contextvars.ContextVar("keras_lora_mixed_batch", default=None)


class AdapterBank:
    """The named adapters of one keras_lora layer.

    Attributes:
        layer: the LoRA layer.
        adapters: `{name: {"values": {var: np.ndarray}, "alpha": float,
            "use_rslora": bool}}`, in insertion order (the index order of
            mixed batches). The active adapter's values are read from the
            layer's variables, not from here.
        active: the name of the adapter the variables hold.
    """

    def __init__(self, layer):
        self.layer = layer
        # `{(id(optimizer), adapter name): [values]}` of the adapters not
        # active (kept on the first layer's bank; `multi`).
        self.optimizer_states = {}
        self.active = DEFAULT_ADAPTER
        self.adapters = {DEFAULT_ADAPTER: self._snapshot()}

    @classmethod
    def restored(cls, layer, entries, active):
        """A bank read back from a `.keras` file (`LoRALayer.
        load_own_variables`): `entries` `{name: entry}` in order, `None` for
        the active adapter, whose values the layer's variables hold."""
        bank = cls.__new__(cls)
        bank.layer = layer
        bank.optimizer_states = {}
        bank.active = active
        bank.adapters = {
            name: bank._snapshot() if entry is None else entry
            for name, entry in entries.items()
        }
        return bank

    def _snapshot(self):
        layer = self.layer
        return {
            "values": {
                n: to_numpy(v, "float32")
                for n, v in layer.adapter_weights().items()
            },
            "alpha": float(layer.adapter_alpha),
            "use_rslora": bool(layer.use_rslora),
        }

    def sync(self):
        """Copies the active adapter's current values into the bank."""
        self.adapters[self.active] = self._snapshot()

    def activate(self, name, sync=True):
        if sync:
            self.sync()
        entry = self.adapters[name]
        for var_name, variable in self.layer.adapter_weights().items():
            variable.assign(entry["values"][var_name])
        self.layer.adapter_alpha = entry["alpha"]
        self.layer.use_rslora = entry["use_rslora"]
        self.active = name
        if self.layer.adapters_disabled:
            zero_b(self.layer)

    def entry(self, name):
        """`{"values", "alpha", "use_rslora"}` of adapter `name` (the active
        adapter's read from the layer's variables)."""
        if name == self.active:
            return self._snapshot()
        return self.adapters[name]

    def store(self, name, entry):
        """Sets adapter `name` (added at the end if new); the variables take
        the values when `name` is the active adapter."""
        self.adapters[name] = entry
        if name == self.active:
            self.activate(name, sync=False)

    def replace_all(self, entries, active):
        """Makes `entries` (`{name: entry}`, in order) the layer's adapters,
        with `active` in the variables."""
        self.adapters = dict(entries)
        self.activate(active, sync=False)

    # -- Mixed batches --------------------------------------------------------

    def _stacked(self, a_name, b_name):
        """A (n, *a_shape) and s_k * B (n, *b_shape) in the compute dtype."""
        layer = self.layer
        dtype = layer.compute_dtype
        stacks_a, stacks_b = [], []
        for name, entry in self.adapters.items():
            if name == self.active:
                a = getattr(layer, a_name)
                b = ops.multiply(getattr(layer, b_name), layer.scaling)
            else:
                s = lora_scaling(
                    layer.adapter_rank, entry["alpha"], entry["use_rslora"]
                )
                a = entry["values"][a_name]
                b = entry["values"][b_name] * np.float32(s)
            stacks_a.append(ops.cast(a, dtype))
            stacks_b.append(ops.cast(b, dtype))
        return ops.stack(stacks_a), ops.stack(stacks_b)

    def in_mixed_batch(self, layer):
        """Whether `layer` is running a mixed batch now."""
        state = MIXED.get()
        return state is not None and id(layer) in state[0]

    def mixed_scale(self, layer, pair):
        """DoRA's per-example factor `(batch, d_out)` (float32) of adapter
        `pair` inside `mixed_batch`: each adapter's `m / ||W + s A B||`,
        taken per example; `None` outside a mixed batch."""
        state = MIXED.get()
        if state is None or id(layer) not in state[0]:
            return None
        a_name, b_name = pair
        m_name = magnitude_name(a_name)
        scales = []
        for name, entry in self.adapters.items():
            if name == self.active:
                # The float32 variables, not their compute-dtype casts.
                a = raw_value(getattr(layer, a_name))
                b = ops.multiply(
                    raw_value(getattr(layer, b_name)), layer.scaling
                )
                m = raw_value(getattr(layer, m_name))
            else:
                s = lora_scaling(
                    layer.adapter_rank, entry["alpha"], entry["use_rslora"]
                )
                a = entry["values"][a_name]
                b = entry["values"][b_name] * np.float32(s)
                m = entry["values"][m_name]
            scales.append(layer.dora_scale(pair, a, b, m))
        return ops.take(ops.stack(scales), state[1], axis=0)

    def mixed_delta(self, layer, inputs, training, pair, branch):
        """Per-example update of the adapter `pair` (A and B names), from
        `branch` (the layer's `branch` or the like), inside `mixed_batch`;
        `None` outside it."""
        state = MIXED.get()
        if state is None or id(layer) not in state[0]:
            return None
        if layer.adapters_disabled:
            raise ValueError(
                "Cannot run a mixed batch inside `disable_adapters`: the "
                "disabled model has no adapter to choose."
            )
        if layer.merged:
            raise ValueError(
                f"Layer '{layer.name}' is merged in place; unmerge it before "
                "running a mixed batch."
            )
        ids = state[1]
        a, b = self._stacked(*pair)
        return branch(inputs, a, b, training, adapter_ids=ids)


# -- Disabling ----------------------------------------------------------------


def zero_b(layer):
    """Makes `layer`'s output the base layer's: every B factor zero, or for
    a PiSSA/OLoRA adapter (whose base weights hold the residual) A and B
    back to their initial values; a DoRA magnitude then takes the adapted
    weight's norm (its factor is 1)."""
    initial = layer.initial_weights()
    if initial:
        for name in layer.pair_names():
            getattr(layer, name).assign(initial[INITIAL_PREFIX + name])
    else:
        for _, b_name, _, _ in layer.lora_shapes():
            variable = getattr(layer, b_name)
            variable.assign(ops.zeros(variable.shape, variable.dtype))
    if layer.use_dora:
        for a_name, b_name, _, b_shape in layer.lora_shapes():
            norms = layer.adapter_norms((a_name, b_name))
            getattr(layer, magnitude_name(a_name)).assign(
                ops.reshape(norms, b_shape[1:])
            )


def snapshot_adapters(layer):
    """Everything about `layer`'s adapters, for `restore_adapters`: the
    variables' values, alpha, rsLoRA flag and the bank (or its absence)."""
    bank = layer.adapter_bank
    return {
        "values": {
            n: ops.copy(v.value) for n, v in layer.adapter_weights().items()
        },
        "alpha": layer.adapter_alpha,
        "use_rslora": layer.use_rslora,
        "bank": bank,
        "adapters": None
        if bank is None
        else {
            name: {**entry, "values": dict(entry["values"])}
            for name, entry in bank.adapters.items()
        },
        "active": None if bank is None else bank.active,
    }


def restore_adapters(layer, snapshot):
    """Puts back what `snapshot_adapters` recorded, bit for bit."""
    for name, variable in layer.adapter_weights().items():
        variable.assign(snapshot["values"][name])
    layer.adapter_alpha = snapshot["alpha"]
    layer.use_rslora = snapshot["use_rslora"]
    layer.adapter_bank = snapshot["bank"]
    if snapshot["bank"] is not None:
        snapshot["bank"].adapters = snapshot["adapters"]
        snapshot["bank"].active = snapshot["active"]


# -- Model-level API ----------------------------------------------------------


def named_layers(model, create=False):
    """`{path: lora_layer}` of `model`, checked to be usable with named
    adapters; with `create`, gives every layer an `AdapterBank` (holding
    the current adapter as `"default"`) if it has none."""
    layers = require_lora_layers(model, "use named adapters")
    banks = [layer.adapter_bank for layer in layers.values()]
    present = [b for b in banks if b is not None]
    if present and (
        len(present) != len(banks)
        or any(
            list(b.adapters) != list(present[0].adapters)
            or b.active != present[0].active
            for b in present
        )
    ):
        raise ValueError(
            "The named adapters of these layers were added through a model "
            "holding only some of them (a sub-model); use that model, or "
            "add adapters through the model holding all of them. Received: "
            f"model={getattr(model, 'name', model)!r}"
        )
    if not create:
        return layers
    missing = not present
    if missing:
        for path, layer in layers.items():
            if layer.has_residual:
                raise ValueError(
                    f"Layer '{path}' was initialized with "
                    f"init={layer.lora_init!r}: its base weights hold that "
                    "adapter's residual, so other adapters cannot share "
                    "them. Save it with `save_adapters` (a plain LoRA "
                    "update of the original weights) and load it into "
                    "`apply_lora(original_model, ...)` as a named adapter."
                )
            if getattr(layer, "train_bias", False):
                raise ValueError(
                    f"Layer '{path}' trains its bias (`train_bias=True`); "
                    "named adapters share the base weights, so only A and "
                    "B can differ between adapters."
                )
            if not layer.built:
                raise ValueError(
                    f"Layer '{path}' is not built; call the model once."
                )
    check_only_adapters_train(model, layers)
    if missing:
        for layer in layers.values():
            layer.adapter_bank = AdapterBank(layer)
    return layers


def check_only_adapters_train(model, layers):
    """Refuses a model that trains anything but its adapters' A and B.

    Named adapters swap only A and B; a trainable head, a layer left
    trainable or a trained bias would be shared by every adapter, so
    training one adapter would change the others.

    Raises:
        ValueError: naming the trainable variables that are not A or B.
    """
    own = {
        id(v)
        for layer in layers.values()
        for v in layer.adapter_weights().values()
    }
    others = [v.path for v in model.trainable_variables if id(v) not in own]
    if others:
        raise ValueError(
            "Named adapters hold only the LoRA factors A and B, but the "
            f"model also trains {others}; every adapter would share them. "
            "Freeze them (`layer.trainable = False`, or `apply_lora` "
            "without `trainable_layers`) before adding adapters. Received: "
            f"model={getattr(model, 'name', model)!r}"
        )


def banks_of(layers):
    """The layers' `AdapterBank`s, or `None` when they have one adapter."""
    banks = [layer.adapter_bank for layer in layers.values()]
    return None if any(b is None for b in banks) else banks


def model_banks(model):
    """The layers' banks, or `None` while the model has one adapter."""
    return banks_of(named_layers(model))


# `.keras` files hold every named adapter; the layers restore their banks
# with this class (keras_lora.layers does not import this module).
LoRALayer.bank_class = AdapterBank
