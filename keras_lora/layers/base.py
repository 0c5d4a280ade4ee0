"""Adapter logic shared by every keras_lora layer.

A LoRA layer keeps the frozen base weight `W` of the Keras layer it subclasses
and adds two trainable float32 factors, `lora_a` (d_in x r) and `lora_b`
(r x d_out), so that the layer computes with `W + s * A @ B`
(Hu et al. 2021, arXiv:2106.09685, eq. 3, in Keras's `y = x @ W`
orientation). The scaling `s` is `alpha / rank`, or `alpha / sqrt(rank)`
with rsLoRA (Kalajdzievski 2023, arXiv:2312.03732).
"""

import math
import warnings

import keras
import numpy as np
from keras import ops

from keras_lora import _keras_private
from keras_lora.layers import dora
from keras_lora.layers import inits
from keras_lora.layers import quantized
from keras_lora.layers.config import RESIDUAL_INITS
from keras_lora.layers.config import lora_scaling
from keras_lora.layers.config import magnitude_name
from keras_lora.layers.layout import adapted_weight
from keras_lora.layers.layout import adapter_layout_scope

# Names of the frozen weights of the Keras layers we adapt, in Keras's order.
BASE_WEIGHT_NAMES = (
    "kernel",
    "depthwise_kernel",
    "pointwise_kernel",
    "bias",
    "embeddings",
    "reverse_embeddings",
    # What Keras's int8 / int4 quantization keeps next to them.
    "kernel_scale",
    "kernel_zero",
    "g_idx",
    "embeddings_scale",
    "embeddings_zero",
    "reverse_embeddings_scale",
    "reverse_embeddings_zero",
)

#: The adapter pair of a layer's main adapted weight.
MAIN_PAIR = ("lora_a", "lora_b")

# The constructor arguments a LoRA layer adds to its Keras base layer.
LORA_CONFIG_KEYS = (
    "rank",
    "alpha",
    "dropout",
    "use_rslora",
    "lora_a_initializer",
    "lora_b_initializer",
    "train_bias",
    "init",
    "use_dora",
)

#: Prefix of the frozen copies of a PiSSA/OLoRA adapter's initial factors
#: (`initial_lora_a`, ...), kept to undo the residual exactly as trained.
INITIAL_PREFIX = "initial_"


#: The Keras layer kinds `model.quantize` quantizes (ReversibleEmbedding is
#: an Embedding).
QUANTIZABLE = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Embedding,
)


def format_docstring(**parts):
    """Fills the `{name}` placeholders of a docstring with shared parts
    (as keras-rs does), so text common to several layers is written once.
    Only the given names are replaced; other braces are left alone."""

    def decorate(obj):
        doc = obj.__doc__
        for name, text in parts.items():
            doc = doc.replace("{" + name + "}", text)
        obj.__doc__ = doc
        return obj

    return decorate


def low_rank_matmul(x, a, b, out_dims=None, in_ndim=1):
    """`(x @ a) @ b` over the trailing axes of `x`, as two 2-D matmuls.

    `x` is viewed as `(tokens, d_in)` first, its leading axes flattened and
    its last `in_ndim` axes merged into `d_in`: on all three backends a
    2-D `(tokens, d_in) @ (d_in, r)` matmul (and its gradient) is faster
    than the batched 3-D form or an einsum (benchmarks/profile_step.py).
    `a @ b` is never formed.

    Args:
        x: tensor of shape `(...,) + in_dims` with `prod(in_dims) = d_in`.
        a: tensor of shape `(d_in, r)`.
        b: tensor of shape `(r, d_out)`.
        out_dims: tuple of ints whose product is `d_out`, the trailing
            output shape; defaults to `(d_out,)`.
        in_ndim: int, how many trailing axes of `x` are contracted.
            Defaults to `1`.

    Returns:
        A tensor of shape `(...,) + out_dims`.
    """
    out_dims = tuple(out_dims or (b.shape[-1],))
    if len(x.shape) == 2 and in_ndim == 1 and len(out_dims) == 1:
        return ops.matmul(ops.matmul(x, a), b)
    lead = tuple(ops.shape(x)[:-in_ndim])
    y = ops.matmul(ops.matmul(ops.reshape(x, (-1, a.shape[0])), a), b)
    return ops.reshape(y, lead + out_dims)


def _sharing(layer, variables):
    """A scope in which `layer`'s base weights are the given variables
    (`{name: variable}`, popped as they are used) instead of new ones."""

    def provide(owner, create, args, kwargs):
        variable = None
        if owner is layer:
            variable = variables.pop(kwargs.get("name"), None)
        if variable is None:
            return create(owner, *args, **kwargs)
        # Keras tracks the variable when the base build assigns it.
        variable.trainable = kwargs.get("trainable", True)
        return variable

    return _keras_private.providing_weights(provide)


def scale_axis(x, scale, axis, per_example=False):
    """`x` times a float32 factor per position of its axis `axis` (`-1` or
    `1`): `scale` `(d,)`, or `(batch, d)` with `per_example` (one factor
    per example and position), cast to `x`'s dtype. A `tf.RaggedTensor`
    (a ragged embedding lookup) is scaled on its flat values."""
    if hasattr(x, "flat_values"):
        if per_example:
            raise NotImplementedError(
                "DoRA in a mixed-adapter batch needs dense inputs; received "
                "a ragged tensor."
            )
        return x.with_flat_values(scale_axis(x.flat_values, scale, axis))
    scale = ops.cast(scale, x.dtype)
    ndim = len(x.shape)
    if axis == -1 or axis == ndim - 1:
        if per_example:
            scale = ops.reshape(
                scale, (-1,) + (1,) * (ndim - 2) + (x.shape[-1],)
            )
        return ops.multiply(x, scale)
    d = x.shape[axis]
    shape = (1,) * axis + (d,) + (1,) * (ndim - axis - 1)
    if per_example:
        shape = (-1,) + shape[1:]
    return ops.multiply(x, ops.reshape(scale, shape))


def is_plain_subclass(layer_class, base_class):
    """True when `layer_class` computes exactly like `base_class`."""
    return (
        all(
            getattr(layer_class, method) is getattr(base_class, method)
            for method in ("call", "build", "get_config", "__init__")
            if hasattr(base_class, method)
        )
        or layer_class is base_class
    )


class LoRALayer:
    """Mixin that turns a Keras layer into a LoRA layer.

    Subclasses put it first in their bases (`class LoRADense(LoRALayer,
    keras.layers.Dense)`), set `base_class`, and implement `lora_shapes()`
    (the shapes of each adapter pair) and `weight_deltas()` (the float32
    update `s * A @ B` of each adapted weight, in that weight's shape).
    """

    #: The Keras layer class this LoRA layer adapts.
    base_class = None

    #: The initializer of A when the config names none (PEFT's defaults).
    default_lora_a_initializer = "he_uniform"

    def init_lora(self, config):
        """Sets the adapter's arguments from a validated `LoRAConfig`
        (constructors, and `keras_lora.convert` on a converted layer)."""
        self.adapter_rank = config.rank
        self.adapter_alpha = config.resolved_alpha
        self.adapter_dropout = config.dropout
        self.use_rslora = config.use_rslora
        self.train_bias = config.train_bias
        self.lora_init = config.init
        self.use_dora = config.use_dora
        a_init = config.lora_a_initializer
        if config.init == "gaussian":
            # PEFT's `init_lora_weights="gaussian"`: A ~ N(0, 1 / rank).
            a_init = keras.initializers.RandomNormal(stddev=1 / config.rank)
        elif a_init is None:
            a_init = self.default_lora_a_initializer
        self.lora_a_initializer = keras.initializers.get(a_init)
        self.lora_b_initializer = keras.initializers.get(
            config.lora_b_initializer
        )
        self.merge_class = self.base_class
        self.merged = False
        self._unmerged_values = None
        self.dropout_seed = (
            keras.random.SeedGenerator() if config.dropout > 0 else None
        )

    @property
    def trainable(self):
        """Settable bool, as in Keras; base weights stay frozen when set."""
        return keras.layers.Layer.trainable.fget(self)

    @trainable.setter
    def trainable(self, value):
        keras.layers.Layer.trainable.fset(self, value)
        if getattr(self, "built", False):
            self.freeze_base_weights()

    def freeze_base_weights(self):
        """Sets the base weights non-trainable (the bias trainable only with
        `train_bias=True` on a trainable layer)."""
        for name, variable in self.base_weights().items():
            variable.trainable = (
                name == "bias" and self.train_bias and self.trainable
            )

    @property
    def weights(self):
        """The base weights first, in Keras's order (`kernel`, `bias`, ...),
        then the adapters: `get_weights()[0]` is the kernel however the
        layer was made (constructor, `from_layer`, `apply_lora`)."""
        weights = keras.layers.Layer.weights.fget(self)
        rank = {name: i for i, name in enumerate(BASE_WEIGHT_NAMES)}
        return sorted(
            weights, key=lambda w: rank.get(w.name, len(BASE_WEIGHT_NAMES))
        )

    @property
    def scaling(self):
        """The factor `s` in `W + s * A @ B`."""
        return lora_scaling(
            self.adapter_rank, self.adapter_alpha, self.use_rslora
        )

    # -- Building -----------------------------------------------------------

    def add_weight(self, *args, **kwargs):
        """Creates (or, in `from_layer`, reuses) a weight; base ones frozen."""
        name = kwargs.get("name")
        if name not in BASE_WEIGHT_NAMES:
            # Under keras.distribution (JAX), an adapter takes a layout
            # derived from its base weight's, never the layout map's regex.
            with adapter_layout_scope(self, name):
                return super().add_weight(*args, **kwargs)
        kwargs["trainable"] = name == "bias" and self.train_bias
        return super().add_weight(*args, **kwargs)

    def build_lora(self):
        """Sets up the adapter on a built base layer: derived shapes (where a
        layer has any) and the adapter variables. Called by `build`, and by
        `apply_lora` on layers it converts in place."""
        mode = quantized.quantization_mode(self)
        if mode is not None:
            quantized.check_supported(self, f"Layer '{self.name}'")
            if self.use_dora or self.has_residual:
                option = (
                    "use_dora=True"
                    if self.use_dora
                    else (f"init={self.lora_init!r}")
                )
                raise ValueError(
                    f"Layer '{self.name}' is quantized (quantization_mode="
                    f"{mode!r}); {option} needs the float base weight. Apply "
                    "LoRA with it before quantizing, or use plain LoRA "
                    "(QLoRA) on the quantized base."
                )
        self.build_adapters()
        if self.has_residual:
            self.init_from_base()
        if self.use_dora:
            self.build_magnitudes()

    def build_magnitudes(self):
        """Creates each adapter pair's DoRA magnitude (float32, trainable,
        one number per output unit: B's shape without the rank axis) at
        `||W + s * A @ B||`, the adapted weight's norm, so the output is
        unchanged (`W`'s norm when B starts at zero)."""
        for a_name, b_name, _, b_shape in self.lora_shapes():
            name = magnitude_name(a_name)
            variable = self.add_weight(
                name=name,
                shape=tuple(b_shape[1:]),
                initializer="zeros",
                dtype="float32",
                trainable=True,
            )
            setattr(self, name, variable)
            variable.assign(
                ops.reshape(self.adapter_norms((a_name, b_name)), b_shape[1:])
            )

    def _base_matrix(self, a_name):
        """The base weight adapter `a_name` adapts, as its `(d_in, d_out)`
        matrix view, with the axis groups that give it."""
        a_shape = next(s[2] for s in self.lora_shapes() if s[0] == a_name)
        base = adapted_weight(self, a_name)
        shape = tuple(base.shape)
        groups = self.adapter_axis_groups(shape, len(a_shape))
        value = _keras_private.raw_value(base)
        return dora.matrix_view(value, *groups), shape, groups

    def adapter_norms(self, pair=None, a=None, b=None):
        """`||W + s * A @ B||` per output unit of adapter `pair` (default
        the main pair), float32 `(d_out,)`, from the layer's variables or
        the given A and `s * B` (float32, any shapes of their sizes)."""
        a_name, b_name = pair or MAIN_PAIR
        with _keras_private.no_autocast():
            if a is None:
                a = _keras_private.raw_value(getattr(self, a_name))
                b = _keras_private.raw_value(getattr(self, b_name))
                b = ops.multiply(b, self.scaling)
            matrix, _, _ = self._base_matrix(a_name)
            r = self.adapter_rank
            return dora.adapted_norms(
                matrix, ops.reshape(a, (-1, r)), ops.reshape(b, (r, -1))
            )

    def dora_scale(self, pair, a, b, magnitude):
        """DoRA's per-unit factor `m / stop_gradient(||W + A @ sB||)`,
        float32 `(d_out,)`, for given A, `s * B` and magnitude (variables
        are read at their float32 precision, not the compute dtype)."""
        with _keras_private.no_autocast():
            a, b, magnitude = (
                _keras_private.raw_value(t)
                if isinstance(t, keras.Variable)
                else t
                for t in (a, b, magnitude)
            )
            matrix, _, _ = self._base_matrix(pair[0])
            r = self.adapter_rank
            return dora.unit_scale(
                matrix,
                ops.reshape(a, (-1, r)),
                ops.reshape(b, (r, -1)),
                magnitude,
            )

    @property
    def has_residual(self):
        """True for PiSSA/OLoRA adapters: the base weights hold the
        residual `W - s * A0 @ B0` (`init_from_base`)."""
        return getattr(self, "lora_init", "default") in RESIDUAL_INITS

    def init_from_base(self):
        """Starts each adapter pair from its base weight (PiSSA or OLoRA,
        `keras_lora.layers.inits`) and gives the layer the residual.

        The residual is a new variable (same name, dtype and layout path as
        the base weight, frozen) that replaces the base weight in this layer
        only: a shared base variable (`from_layer`, `apply_lora`'s clone)
        keeps its value, so the given model is not changed. It costs one
        copy of each adapted base weight. The initial factors are kept as
        frozen float32 `initial_<name>` variables, so `unload` gives back
        `residual + s * A0 @ B0` and adapter files hold the plain LoRA update
        against the original weights (`plain_lora_state`).
        """
        for a_name, b_name, a_shape, b_shape in self.lora_shapes():
            base = adapted_weight(self, a_name)
            shape = tuple(base.shape)
            groups = self.adapter_axis_groups(shape, len(a_shape))
            matrix = inits.matrix_view(
                ops.convert_to_numpy(base.value), *groups
            )
            a0, b0, residual = inits.factor_matrix(
                self.lora_init, matrix, self.adapter_rank, self.scaling
            )
            for name, factor_shape, value in (
                (a_name, a_shape, a0),
                (b_name, b_shape, b0),
            ):
                value = np.reshape(value, factor_shape)
                getattr(self, name).assign(value)
                initial = self.add_weight(
                    name=INITIAL_PREFIX + name,
                    shape=factor_shape,
                    initializer="zeros",
                    dtype="float32",
                    trainable=False,
                )
                initial.assign(value)
                setattr(self, INITIAL_PREFIX + name, initial)
            new = keras.Variable(
                initializer=ops.cast(
                    inits.from_matrix(residual, shape, *groups), base.dtype
                ),
                dtype=base.dtype,
                trainable=False,
                aggregation=base.aggregation,
                synchronization=base.synchronization,
                name=base.name,
            )
            _keras_private.replace_variables(self, {id(base): new})

    def initial_weights(self):
        """The frozen initial factors of a PiSSA/OLoRA adapter by name
        (`initial_lora_a`, ...); empty for other inits."""
        if not self.has_residual:
            return {}
        return {
            INITIAL_PREFIX + n: getattr(self, INITIAL_PREFIX + n)
            for n in self.pair_names()
        }

    def build_adapters(self):
        """Creates the float32 adapter pairs; call at the end of `build`."""
        for a_name, b_name, a_shape, b_shape in self.lora_shapes():
            d_in = math.prod(a_shape[:-1])
            d_out = math.prod(b_shape[1:])
            if self.adapter_rank > min(d_in, d_out) and not self.has_residual:
                # (PiSSA / OLoRA refuse it in `init_from_base`.)
                warnings.warn(
                    f"Layer '{self.name}': rank={self.adapter_rank} is larger "
                    f"than min(d_in={d_in}, d_out={d_out}); the adapter has "
                    "more parameters than a full update and gives no "
                    "compression.",
                    stacklevel=3,
                )
            for name, shape, initializer in (
                (a_name, a_shape, self.lora_a_initializer),
                (b_name, b_shape, self.lora_b_initializer),
            ):
                variable = self.add_weight(
                    name=name,
                    shape=shape,
                    initializer=initializer,
                    dtype="float32",
                    trainable=True,
                )
                setattr(self, name, variable)

    def lora_shapes(self):
        """Returns `[(a_name, b_name, a_shape, b_shape), ...]`."""
        raise NotImplementedError

    @classmethod
    def adapted_dims(cls, layer):
        """`[(d_in, d_out), ...]`: the matrix each adapter pair of `cls`
        factors, in `lora_shapes` order, read off a built plain layer
        `layer` (before it is converted; `apply_lora` checks PiSSA/OLoRA
        ranks with it). By default the kernel's last axis is `d_out`."""
        shape = tuple(layer.kernel.shape)
        return [(math.prod(shape[:-1]), shape[-1])]

    def weight_deltas(self):
        """Returns `{base_weight_name: float32 s * A @ B in its shape}`."""
        raise NotImplementedError

    def adapter_axis_groups(self, base_shape, a_ndim):
        """Which axes of the adapted base weight A's and B's axes cover.

        Args:
            base_shape: the base weight's shape.
            a_ndim: the number of axes of A (its last is the rank axis).

        Returns:
            `(a_groups, b_groups)`: one list of base-weight axis indices per
            non-rank axis of A and of B, in flattening order. By default A's
            axes are the base weight's leading axes and B's the rest (Dense,
            Conv2D, Embedding); `LoRAEinsumDense` maps its kernel's axes.
        """
        split = a_ndim - 1
        return (
            [[i] for i in range(split)],
            [[i] for i in range(split, len(base_shape))],
        )

    # -- Forward helpers ----------------------------------------------------

    def adapter_factors(self, a_name="lora_a", b_name="lora_b"):
        """A and `s * B` in the compute dtype (both are stored as float32).

        The scaling is folded into the small (r, d_out) factor, in float32
        before the cast, rather than applied to the (tokens, r) activations;
        with s = 1 and a float32 compute dtype no extra op is added at all.
        """
        a = getattr(self, a_name)
        b = getattr(self, b_name)
        if self.scaling != 1:
            b = ops.multiply(b, self.scaling)
        if self.compute_dtype != "float32":
            a = ops.cast(a, self.compute_dtype)
            b = ops.cast(b, self.compute_dtype)
        return a, b

    def lora_dropout(self, inputs, training=None, noise_shape=None):
        """Dropout on the LoRA branch input; identity unless training."""
        if self.dropout_seed is None or not training:
            return inputs
        if getattr(inputs, "sparse", False) or type(inputs).__name__ in (
            "SparseTensor",
            "BCOO",
        ):
            # Dropout needs a dense tensor (TensorFlow and JAX refuse a
            # sparse one); the branch then multiplies a dense input.
            inputs = ops.convert_to_tensor(inputs, sparse=False)
        return keras.random.dropout(
            inputs,
            self.adapter_dropout,
            noise_shape=noise_shape,
            seed=self.dropout_seed,
        )

    def lora_active(self):
        return not self.merged

    #: Set by `keras_lora.multi`: the layer's bank of named adapters.
    adapter_bank = None

    #: How many `keras_lora.multi.disable_adapters` blocks are open on the
    #: layer (B is zero while any is, whichever adapter is active).
    adapters_disabled = 0

    #: Set by `apply_lora` on the layers of a clone: the base variables are
    #: also the given model's, so they are never written.
    base_shared = False

    def mixed_adapter_delta(
        self, inputs, training=None, pair=MAIN_PAIR, branch=None
    ):
        """The per-example update of adapter `pair` (computed by `branch`,
        default `self.branch`) inside `keras_lora.multi.mixed_batch`, else
        `None` (then `call` takes the single-adapter path unchanged)."""
        if self.adapter_bank is None:
            return None
        return self.adapter_bank.mixed_delta(
            self, inputs, training, pair, branch or self.branch
        )

    def branch(self, inputs, a, b, training=None, adapter_ids=None):
        """The LoRA branch `(dropout(x) @ A) @ sB` from given factors.

        The one place a layer computes its adapter update: the active
        adapter (`adapter_delta`), mixed-adapter batches and merging checks
        all call it.

        Args:
            inputs: the layer's input.
            a: A in the compute dtype, shaped as `lora_shapes()` says; with
                `adapter_ids`, a stack `(n, ...)` of n adapters' A.
            b: `s * B` likewise (the scaling already applied).
            training: bool or `None`, for dropout.
            adapter_ids: `None`, or an int tensor `(batch,)` choosing, per
                example, which of the stacked adapters applies.

        Returns:
            The update, shaped as the layer's output before bias.

        Raises:
            NotImplementedError: for a layer kind without a branch.
        """
        raise NotImplementedError(
            f"{type(self).__name__} computes no LoRA branch; a keras_lora "
            "layer class must define `branch`."
        )

    def quantized_call(self, *args, **kwargs):
        """A quantized base (int8 / int4, Keras's `model.quantize`) runs
        `call` too: `base_product` computes the quantized product, the
        adapter adds `s * (x @ A) @ B` in float (QLoRA)."""
        return self.call(*args, **kwargs)

    def base_product(self, inputs, float_product, **kwargs):
        """The base layer's product before bias and activation:
        `float_product()` for a float layer, else Keras's own quantized
        computation of the layer (`_int8_call` / `_int4_call`, run without
        bias, activation and logit soft cap, which `call` applies after the
        adapter). `kwargs` go to the quantized call (`reverse`)."""
        mode = quantized.quantization_mode(self)
        if mode is None:
            return float_product()
        quantized.check_supported(self, f"Layer '{self.name}'")
        with _keras_private.base_product_only(self):
            return getattr(self, f"_{mode}_call")(inputs, **kwargs)

    def apply_adapter(
        self, outputs, inputs, training=None, pair=MAIN_PAIR, branch=None
    ):
        """The adapted output: `outputs` (the base product, before bias)
        plus the update of adapter `pair` (`adapter_delta`), rescaled per
        output unit by DoRA's `m / ||W + s * A @ B||` on a `use_dora`
        layer; `outputs` itself while merged in place."""
        branch = branch or self.branch
        if self.dora_active(pair):
            factors, scale = self.dora_factors(pair)
            outputs = ops.add(outputs, branch(inputs, *factors, training))
            return self.scale_units(outputs, scale, pair=pair)
        delta = self.adapter_delta(inputs, training, pair, branch)
        if delta is None:
            return outputs
        outputs = ops.add(outputs, delta)
        scale = self.dora_output_scale(pair)
        if scale is None:
            return outputs
        return self.scale_units(outputs, *scale, pair=pair)

    def dora_active(self, pair=MAIN_PAIR):
        """Whether `call` applies the active DoRA adapter `pair` (a
        `use_dora` layer, not merged, outside a mixed batch)."""
        return (
            self.use_dora
            and self.lora_active()
            and (
                self.adapter_bank is None
                or not self.adapter_bank.in_mixed_batch(self)
            )
        )

    def dora_factors(self, pair=MAIN_PAIR):
        """`((A, s * B), g)` of the active DoRA adapter `pair`: the factors
        in the compute dtype for the branch, and the float32 factor
        `g = m / stop_gradient(||W + s A B||)` per output unit, from one
        float32 read of each variable. (Reading A and B once for both keeps
        a compiled TensorFlow train step from computing the norm with
        values the optimizer already updated.)"""
        a_name, b_name = pair
        read = _keras_private.raw_value
        a = read(getattr(self, a_name))
        b = ops.multiply(read(getattr(self, b_name)), self.scaling)
        magnitude = read(getattr(self, magnitude_name(a_name)))
        with _keras_private.no_autocast():
            scale = self.dora_scale(pair, a, b, magnitude)
        dtype = self.compute_dtype
        return (ops.cast(a, dtype), ops.cast(b, dtype)), scale

    def dora_output_scale(self, pair=MAIN_PAIR):
        """`(scale, per_example)` of DoRA's factor for adapter `pair`:
        `(d_out,)` for the active adapter, `(batch, d_out)` in a mixed
        batch (`per_example=True`); `None` without DoRA or while merged."""
        if not self.use_dora:
            return None
        if self.adapter_bank is not None:
            mixed = self.adapter_bank.mixed_scale(self, pair)
            if mixed is not None:
                return mixed, True
        if not self.lora_active():
            return None
        return self.dora_factors(pair)[1], False

    def unit_axis(self, pair=MAIN_PAIR):
        """The output axis that holds adapter `pair`'s output units: `-1`
        (a convolution in channels_first overrides it with `1`)."""
        return -1

    def scale_units(self, outputs, scale, per_example=False, pair=MAIN_PAIR):
        """`outputs` times a float32 factor per output unit of adapter
        `pair`: `scale` `(d_out,)`, or `(batch, d_out)` with
        `per_example`. The units lie along `unit_axis(pair)`."""
        return scale_axis(outputs, scale, self.unit_axis(pair), per_example)

    def adapter_delta(self, inputs, training=None, pair=MAIN_PAIR, branch=None):
        """What `call` adds to the base output for adapter `pair` (its A and
        B names; `branch` computes it, default `self.branch`): the
        per-example update in a mixed batch, else the active adapter's,
        else (merged) `None`."""
        branch = branch or self.branch
        mixed = self.mixed_adapter_delta(inputs, training, pair, branch)
        if mixed is not None:
            return mixed
        if self.lora_active():
            return branch(inputs, *self.adapter_factors(*pair), training)
        return None

    # -- Merging ------------------------------------------------------------

    def base_weights(self):
        """The frozen base variables by name, in Keras's order."""
        by_name = {w.name: w for w in self.weights}
        return {n: by_name[n] for n in BASE_WEIGHT_NAMES if n in by_name}

    def pair_names(self):
        """The names of the adapter factors, A then B of each pair."""
        return [n for pair in self.lora_shapes() for n in pair[:2]]

    def adapter_weights(self):
        """The adapter variables by name (`lora_a`, `lora_b`, ..., then the
        DoRA magnitudes `lora_magnitude`, ... of a `use_dora` layer)."""
        names = self.pair_names()
        if getattr(self, "use_dora", False):
            names += [magnitude_name(s[0]) for s in self.lora_shapes()]
        return {n: getattr(self, n) for n in names}

    def merged_values(self):
        """`{name: W + s * A @ B}`, computed in float32, cast once to W's
        dtype, for every adapted base weight (others are left out)."""
        if quantized.quantization_mode(self) is not None:
            return self.requantized_merge()[0]
        base = self.base_weights()
        values = {}
        for name, delta in self.weight_deltas().items():
            original = self.original_value(name)
            merged = ops.add(ops.cast(original, "float32"), delta)
            if self.use_dora:
                merged = self._dora_merged(name, merged)
            values[name] = ops.cast(merged, base[name].dtype)
            if not bool(ops.all(ops.isfinite(values[name]))):
                # PEFT's safe_merge, always on: a non-finite weight (a float16
                # overflow, a NaN adapter) is never what merging should give.
                raise ValueError(
                    f"Merging the adapter of layer '{self.name}' gives a "
                    f"non-finite `{name}` (inf or NaN in {base[name].dtype}; "
                    "an overflow of the weight's dtype or a non-finite "
                    "adapter). Nothing was changed."
                )
        return values

    def requantized_merge(self, dequantize=False):
        """Merges into a quantized base: dequantize (the original values),
        add `s * A @ B` in float32, quantize again with Keras's quantizer.

        Returns:
            `(values, report)`: `values` `{variable name: value}` for the
            adapted weights and their scales / zero points (with
            `dequantize`, `{weight name: float32 W_deq + s A B}` instead);
            `report` `{weight name: {"max_abs_weight_error": float,
            "update_relative_error": float}}`: how far the re-quantized
            weight is from `W_deq + s A B`, and that difference relative to
            the update `s A B` (Frobenius norms).
        """
        base = self.base_weights()
        originals = {n: self.original_value(n) for n in base}
        values, report = {}, {}
        for name, delta in self.weight_deltas().items():
            weight = quantized.dequantized(self, name, originals)
            merged = ops.add(weight, delta)
            if not bool(ops.all(ops.isfinite(merged))):
                raise ValueError(
                    f"Merging the adapter of layer '{self.name}' gives a "
                    f"non-finite `{name}`. Nothing was changed."
                )
            if dequantize:
                values[name] = merged
                continue
            if not bool(ops.any(ops.not_equal(delta, 0))):
                # No update: the quantized weight stays exactly as it is.
                report[name] = {
                    "max_abs_weight_error": 0.0,
                    "update_relative_error": 0.0,
                }
                continue
            q = quantized.requantized(self, name, merged)
            values.update(q)
            back = ops.convert_to_numpy(quantized.dequantized(self, name, q))
            merged = ops.convert_to_numpy(merged)
            delta = ops.convert_to_numpy(delta)
            got = back - ops.convert_to_numpy(weight)
            update = float(np.linalg.norm(delta))
            report[name] = {
                "max_abs_weight_error": float(np.max(np.abs(back - merged))),
                "update_relative_error": float(
                    np.linalg.norm(got - delta) / update if update else 0.0
                ),
            }
        return values, report

    def requantization_report(self):
        """What merging would keep of the update on a quantized base:
        `{weight name: {"max_abs_weight_error", "update_relative_error"}}`
        (see `requantized_merge`); `{}` for a float layer."""
        if quantized.quantization_mode(self) is None:
            return {}
        return self.requantized_merge()[1]

    def _dora_merged(self, name, adapted):
        """`m * V / ||V||` per output unit of the float32 adapted weight
        `V = W + s * A @ B` of base weight `name`, in its shape."""
        for a_name, *_ in self.lora_shapes():
            if adapted_weight(self, a_name).name != name:
                continue
            _, shape, groups = self._base_matrix(a_name)
            matrix = dora.merged_matrix(
                dora.matrix_view(adapted, *groups),
                getattr(self, magnitude_name(a_name)),
            )
            return dora.from_matrix(matrix, shape, *groups)
        return adapted

    def original_value(self, name):
        """The base weight `name` without any adapter merged into it."""
        # Only adapted weights are kept by merge_adapter(); others (bias)
        # are unchanged and read from the variable.
        if self._unmerged_values is not None and name in self._unmerged_values:
            return self._unmerged_values[name]
        return self.base_weights()[name]

    def source_value(self, name):
        """The base weight `name` as the layer was given it: the original
        value, or for PiSSA/OLoRA `residual + s * A0 @ B0` (computed in
        float32, cast once to the weight's dtype; equal to the given weight
        up to float32 rounding)."""
        value = self.original_value(name)
        if not self.has_residual:
            return value
        for a_name, b_name, a_shape, _ in self.lora_shapes():
            base = adapted_weight(self, a_name)
            if base.name != name:
                continue
            shape = tuple(base.shape)
            a0 = ops.convert_to_numpy(getattr(self, INITIAL_PREFIX + a_name))
            b0 = ops.convert_to_numpy(getattr(self, INITIAL_PREFIX + b_name))
            rank = self.adapter_rank
            delta = inits.from_matrix(
                self.scaling * (a0.reshape(-1, rank) @ b0.reshape(rank, -1)),
                shape,
                *self.adapter_axis_groups(shape, len(a_shape)),
            )
            value = ops.cast(
                ops.add(ops.cast(value, "float32"), delta), base.dtype
            )
        return value

    def plain_lora_state(self):
        """The adapter as a plain LoRA update of the given base weights.

        For PiSSA/OLoRA the trained `(A, B)` changed the original weight by
        `s * (A @ B - A0 @ B0)`: returned as rank-2r factors `[A, A0]`,
        `[B; -B0]` with alpha doubled (sqrt(2) x under rsLoRA), so the
        scaling is the same (PEFT's conversion). Other inits: the adapter
        as it is.

        Returns:
            `({variable name: float32 np.ndarray}, rank, alpha)`.
        """
        values = {
            n: ops.convert_to_numpy(v)
            for n, v in self.adapter_weights().items()
        }
        if not self.has_residual:
            return values, self.adapter_rank, self.adapter_alpha
        for a_name, b_name, *_ in self.lora_shapes():
            initial = self.initial_weights()
            values[a_name], values[b_name] = inits.plain_lora_factors(
                values[a_name],
                values[b_name],
                ops.convert_to_numpy(initial[INITIAL_PREFIX + a_name]),
                ops.convert_to_numpy(initial[INITIAL_PREFIX + b_name]),
            )
        return (
            values,
            2 * self.adapter_rank,
            inits.plain_lora_alpha(self.adapter_alpha, self.use_rslora),
        )

    def base_config(self):
        """The config of the plain Keras layer (no LoRA arguments)."""
        return super().get_config()

    def _new_plain_layer(self):
        config = self.base_config()
        # A layer alone has no path in its model's DTypePolicyMap.
        config["dtype"] = quantized.resolved_policy(self)
        layer = self.merge_class.from_config(config)
        build_config = self.get_build_config()
        if build_config:
            layer.build_from_config(build_config)
        else:
            layer.build()
        return layer

    def merge(self, dequantize=False):
        """Returns a new plain Keras layer with `W + s * A @ B` folded in.

        The LoRA layer itself is not changed and can keep training. The
        merged weights are computed in float32 and cast once to the base
        weight's dtype. On a quantized base (int8 / int4) the merged weight
        is quantized again with Keras's quantizer (`requantized_merge`), or
        with `dequantize=True` the layer is a float layer holding exactly
        `W_deq + s * A @ B`.

        Args:
            dequantize: bool, for a quantized base only: return a float
                layer instead of one in the base's quantization mode.
                Defaults to `False`.

        Returns:
            A built layer of the base Keras class (e.g. `keras.layers.Dense`)
            with the same config, name and dtype policy (the float policy
            with `dequantize=True`), whose variables are new (trainable, as
            in any plain layer).

        Raises:
            ValueError: if the layer is not built.
        """
        self._check_built("merge")
        originals = {n: self.original_value(n) for n in self.base_weights()}
        if dequantize and quantized.quantization_mode(self) is not None:
            layer = self.merge_class.from_config(quantized.float_config(self))
            build_config = self.get_build_config()
            if build_config:
                layer.build_from_config(build_config)
            else:
                layer.build()
            values = self.requantized_merge(dequantize=True)[0]
            for weight in layer.weights:
                if weight.name not in values:
                    values[weight.name] = (
                        quantized.dequantized(self, weight.name, originals)
                        if weight.name in quantized.QUANTIZATION_VARIABLES
                        else (originals[weight.name])
                    )
        else:
            layer = self._new_plain_layer()
            values = self.merged_values()
        for weight in layer.weights:
            value = values.get(weight.name, originals.get(weight.name))
            weight.assign(ops.cast(value, weight.dtype))
        return layer

    def unload(self):
        """Returns a new plain Keras layer with the base weights, no adapter."""
        self._check_built("unload")
        layer = self._new_plain_layer()
        for weight in layer.weights:
            weight.assign(self.source_value(weight.name))
        return layer

    def merge_adapter(self):
        """Folds the adapter into the base weights in place (as PEFT does).

        The original base values are kept, so `unmerge_adapter()` restores
        them bit for bit. While merged, `call` skips the LoRA branch.
        Compiled functions of the models keras_lora knows hold the layer
        are reset (`keras_lora.merge_adapters(model)` resets `model`'s).

        On a quantized base (int8 / int4) the merged weight is quantized
        again in the base's mode and a `keras_lora.QuantizedMergeWarning`
        says how much of the update the rounding lost.

        Raises:
            ValueError: already merged; or the layer is in a model that
                `apply_lora` cloned (its base weights are the given model's
                too, which must keep its outputs: use `keras_lora.merge`,
                or `apply_lora(..., inplace=True)`).
        """
        self._check_built("merge_adapter")
        if self.merged:
            raise ValueError(f"Layer '{self.name}' is already merged.")
        if quantized.quantization_mode(self) is None:
            self.assign_merged(self.merged_values())
            return
        values, report = self.requantized_merge()
        self.assign_merged(values)
        if any(r["update_relative_error"] for r in report.values()):
            quantized.warn_requantization({self.name: report})

    def assign_merged(self, values):
        """Writes precomputed `merged_values()` into the base weights, keeping
        the originals (the second half of `merge_adapter`)."""
        if self.base_shared and not self.has_residual:
            # (A PiSSA / OLoRA layer's adapted weights are its own residual
            # variables; only those are written.)
            raise ValueError(
                f"Layer '{self.name}' shares its base weights with the model "
                "given to `apply_lora`; merging in place would change that "
                "model's outputs. Use `keras_lora.merge(model)` (a new merged "
                "model) or `apply_lora(..., inplace=True)`."
            )
        base = self.base_weights()
        self._unmerged_values = {n: ops.copy(base[n].value) for n in values}
        for name, value in values.items():
            base[name].assign(value)
        self.merged = True
        self.traced_state_changed()

    def unmerge_adapter(self):
        """Restores the base weights kept by `merge_adapter()`, bit for bit."""
        if not self.merged:
            raise ValueError(f"Layer '{self.name}' is not merged.")
        base = self.base_weights()
        for name, value in self._unmerged_values.items():
            base[name].assign(value)
        self._unmerged_values = None
        self.merged = False
        self.traced_state_changed()

    #: Called with the layer when its merged flag changes (set by
    #: `keras_lora.walk`: resets the compiled functions of the models known
    #: to hold the layer).
    traced_state_hook = None

    def traced_state_changed(self):
        """Tells `traced_state_hook` that Python state compiled functions
        capture (the merged flag) changed."""
        if LoRALayer.traced_state_hook is not None:
            LoRALayer.traced_state_hook(self)

    def _check_built(self, what):
        if not self.built:
            raise ValueError(
                f"Cannot {what} layer '{self.name}': it is not built yet. "
                "Call it on an input (or `build(input_shape)`) first."
            )

    # -- Serialization ------------------------------------------------------

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "rank": self.adapter_rank,
                "alpha": self.adapter_alpha,
                "dropout": self.adapter_dropout,
                "use_rslora": self.use_rslora,
                "lora_a_initializer": keras.initializers.serialize(
                    self.lora_a_initializer
                ),
                "lora_b_initializer": keras.initializers.serialize(
                    self.lora_b_initializer
                ),
                "train_bias": self.train_bias,
                "init": self.lora_init,
                "use_dora": self.use_dora,
            }
        )
        if self.lora_init != "default":
            # The init sets A itself (and B for PiSSA / OLoRA).
            config["lora_a_initializer"] = None
        return config

    def save_own_variables(self, store):
        """Saves base weights (unmerged values) and adapters by name."""
        if not self.built:
            return
        if self.adapters_disabled:
            raise ValueError(
                f"Layer '{self.name}': cannot save inside "
                "`keras_lora.multi.disable_adapters` (B is zero there, not "
                "the adapter's); save after the block."
            )
        for name in self.base_weights():
            store[name] = self.original_value(name)
        for name, variable in self.adapter_weights().items():
            store[name] = variable
        for name, variable in self.initial_weights().items():
            store[name] = variable
        bank = self.adapter_bank
        if bank is not None:
            # Every named adapter, not only the active one the variables
            # hold: `bank.<i>.name` (UTF-8 bytes), `bank.<i>.<variable>`,
            # `bank.<i>.alpha`, `bank.<i>.use_rslora`; `bank.active` is the
            # index of the active adapter (its values are the variables).
            names = list(bank.adapters)
            store["bank.active"] = np.array([names.index(bank.active)])
            for i, name in enumerate(names):
                store[f"bank.{i}.name"] = np.frombuffer(
                    name.encode("utf-8"), "uint8"
                )
                if name == bank.active:
                    continue
                entry = bank.adapters[name]
                for var, value in entry["values"].items():
                    store[f"bank.{i}.{var}"] = value
                store[f"bank.{i}.alpha"] = np.array([entry["alpha"]], "float64")
                store[f"bank.{i}.use_rslora"] = np.array(
                    [entry["use_rslora"]], "int8"
                )

    #: The class of `adapter_bank` (set by `keras_lora.banks`), used to
    #: restore the named adapters a `.keras` file holds.
    bank_class = None

    def load_own_variables(self, store):
        """Loads what `save_own_variables` wrote; refuses any mismatch."""
        if not self.built:
            return
        expected = {
            **self.base_weights(),
            **self.adapter_weights(),
            **self.initial_weights(),
        }
        keys = set(store.keys())
        received = {k for k in keys if not k.startswith("bank.")}
        bank_keys = keys - received
        if received != set(expected):
            raise ValueError(
                f"Layer '{self.name}' ({type(self).__name__}) expected "
                f"variables {sorted(expected)}; the checkpoint has "
                f"{sorted(received)}. Missing: "
                f"{sorted(set(expected) - received)}; unexpected: "
                f"{sorted(received - set(expected))}."
            )
        for name, variable in expected.items():
            value = store[name]
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"Layer '{self.name}': variable '{name}' has shape "
                    f"{tuple(variable.shape)}; the checkpoint has "
                    f"{tuple(value.shape)}."
                )
        entries, active = self._stored_bank(store, bank_keys)
        for name, variable in expected.items():
            variable.assign(store[name])
        self._unmerged_values = None
        self.merged = False
        self.adapter_bank = None
        if entries is not None:
            self.adapter_bank = self.bank_class.restored(self, entries, active)

    def _stored_bank(self, store, keys):
        """`({name: entry or None}, active name)` from the `bank.*` keys
        (`None, None` without them); checked before anything is loaded."""
        if not keys:
            return None, None
        count = sum(1 for k in keys if k.endswith(".name"))
        active = int(np.asarray(store["bank.active"]).reshape(-1)[0])
        entries = {}
        active_name = None
        for i in range(count):
            raw = np.asarray(store[f"bank.{i}.name"], "uint8")
            name = raw.tobytes().decode("utf-8")
            if i == active:
                entries[name] = None
                active_name = name
                continue
            values = {}
            for var, variable in self.adapter_weights().items():
                value = np.asarray(store[f"bank.{i}.{var}"], "float32")
                if tuple(value.shape) != tuple(variable.shape):
                    raise ValueError(
                        f"Layer '{self.name}': adapter {name!r} variable "
                        f"'{var}' has shape {tuple(value.shape)}; the layer "
                        f"{tuple(variable.shape)}."
                    )
                values[var] = value
            alpha = np.asarray(store[f"bank.{i}.alpha"]).reshape(-1)[0]
            rslora = np.asarray(store[f"bank.{i}.use_rslora"]).reshape(-1)
            entries[name] = {
                "values": values,
                "alpha": float(alpha),
                "use_rslora": bool(rslora[0]),
            }
        return entries, active_name

    # -- Construction from an existing layer --------------------------------

    @classmethod
    def from_layer(
        cls,
        layer,
        rank=8,
        alpha=None,
        dropout=0.0,
        use_rslora=False,
        lora_a_initializer=None,
        lora_b_initializer=None,
        train_bias=False,
        init="default",
        use_dora=False,
    ):
        """Wraps a built Keras layer, sharing (not copying) its variables.

        The base layer's variables become the LoRA layer's frozen base
        weights: they are the same objects, so the wrap costs only the
        adapters' memory, and they are set non-trainable in both layers.

        Args:
            layer: a built layer of `cls.base_class` (or a subclass that
                does not change its computation).
            rank: as in the constructor.
            alpha: as in the constructor.
            dropout: as in the constructor.
            use_rslora: as in the constructor.
            lora_a_initializer: as in the constructor; `None` takes the
                constructor's default.
            lora_b_initializer: as in the constructor; `None` takes the
                constructor's default.
            train_bias: as in the constructor.
            init: as in the constructor. With `"pissa"` / `"olora"` the
                LoRA layer computes with a new residual variable; `layer`'s
                own weights keep their values.
            use_dora: as in the constructor.

        Returns:
            A built LoRA layer with the same config, name and dtype policy.

        Raises:
            TypeError: if `layer` is not of the adapted class.
            ValueError: if `layer` is not built, is quantized, already has
                an adapter (keras_lora or Keras's `enable_lora`), or the LoRA
                arguments are invalid.
        """
        base = cls.base_class
        if isinstance(layer, LoRALayer):
            raise ValueError(
                f"`layer` is already a keras_lora layer. Received: "
                f"layer={layer.name!r} of type {type(layer).__name__}"
            )
        if not isinstance(layer, base) or not is_plain_subclass(
            type(layer), base
        ):
            raise TypeError(
                f"{cls.__name__}.from_layer() expects a "
                f"keras.layers.{base.__name__}. Received: layer of type "
                f"{type(layer).__module__}.{type(layer).__name__}"
            )
        if not layer.built:
            raise ValueError(
                f"`layer` must be built before it is wrapped. Received: "
                f"unbuilt layer={layer.name!r}; call it on an input first."
            )
        quantized.check_supported(layer, f"`layer` {layer.name!r}")
        if getattr(layer, "lora_enabled", False):
            raise ValueError(
                f"`layer` {layer.name!r} has Keras's built-in LoRA enabled; "
                "keras_lora cannot wrap it."
            )
        config = layer.get_config()
        config.pop("lora_rank", None)
        config.pop("lora_alpha", None)
        if "quantization_config" in config:
            # The object itself, not its serialized form (Keras's
            # `from_config` would deserialize it).
            config["quantization_config"] = layer.quantization_config
        initializers = {
            "lora_a_initializer": lora_a_initializer,
            "lora_b_initializer": lora_b_initializer,
        }
        new = cls(
            **config,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            use_rslora=use_rslora,
            train_bias=train_bias,
            init=init,
            use_dora=use_dora,
            **{k: v for k, v in initializers.items() if v is not None},
        )
        new.merge_class = type(layer)
        variables = {w.name: w for w in layer.weights}
        trainable = {name: w.trainable for name, w in variables.items()}
        build_config = layer.get_build_config()
        try:
            with _sharing(new, variables):
                if build_config:
                    new.build_from_config(build_config)
                else:
                    new.build()
        except Exception:
            for w in layer.weights:
                w.trainable = trainable[w.name]
            raise
        if variables:
            raise ValueError(
                f"{cls.__name__}.from_layer(): layer {layer.name!r} has "
                f"variables the LoRA layer does not use: {sorted(variables)}"
            )
        return new

    # -- Refused Keras features ----------------------------------------------

    def enable_lora(self, *args, **kwargs):
        raise ValueError(
            f"Layer '{self.name}' is a keras_lora layer; Keras's built-in "
            "`enable_lora` cannot be combined with it."
        )

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantizes the frozen base weights in place (Keras's quantizer, as
        `model.quantize(mode)` does for a plain layer) and keeps the
        adapters, which stay float32 and trainable: QLoRA on an adapted
        model. The variables `apply_lora`'s model shares are not changed
        (the layer gets new quantized variables).

        Raises:
            ValueError: a mode other than int8 / int4, a layer kind Keras
                does not quantize, DoRA, a PiSSA / OLoRA residual, a layer
                merged in place or already quantized; nothing is changed.
        """
        del type_check
        problem = None
        if mode not in quantized.SUPPORTED_MODES:
            problem = (
                f"mode {mode!r}: keras_lora keeps adapters over "
                f"{list(quantized.SUPPORTED_MODES)} bases only"
            )
        elif not isinstance(
            self,
            keras.layers.Dense
            | keras.layers.EinsumDense
            | keras.layers.Embedding,
        ):
            problem = f"Keras does not quantize {self.base_class.__name__}"
        elif self.use_dora or self.has_residual:
            problem = "DoRA and PiSSA / OLoRA adapters need a float base"
        elif self.merged:
            problem = "it is merged in place (unmerge it first)"
        elif quantized.quantization_mode(self) is not None:
            problem = "it is already quantized"
        if problem is not None:
            raise ValueError(
                f"Cannot quantize layer '{self.name}' "
                f"({type(self).__name__}): {problem}. Quantize the merged "
                "model instead (`keras_lora.merge(model)`), or quantize "
                "before `apply_lora`."
            )
        self.base_class.quantize(self, mode, type_check=False, config=config)
        self.freeze_base_weights()
