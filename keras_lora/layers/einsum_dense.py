"""LoRAEinsumDense: `keras.layers.EinsumDense` with a low-rank adapter."""

import math
import string
import typing

import keras
from keras import ops

from keras_lora.layers.base import LoRALayer
from keras_lora.layers.base import low_rank_matmul
from keras_lora.layers.config import layer_config


class FactoredEquation(typing.NamedTuple):
    """An `EinsumDense` equation and the two einsums of its LoRA branch."""

    in_axes: tuple
    out_axes: tuple
    equation_a: str
    equation_b: str
    inputs: str
    kernel: str
    outputs: str
    hidden: str
    free: str
    as_matmul: bool


def factor_equation(equation):
    """Splits an EinsumDense equation into the two LoRA einsums.

    The kernel is factored as a matrix of (all its input axes) x (all its
    output axes), as PEFT does for a `q_proj` weight: for Gemma's query
    `"btd,ndh->btnh"`, A is (d, r) and B is (r, n*h). This is the one place
    keras_lora parses an einsum equation.

    Args:
        equation: str, an `EinsumDense` equation `"inputs,kernel->outputs"`.

    Returns:
        A `FactoredEquation`: the kernel's contracted axes and output axes
        (each in kernel order), the einsum computing `x @ A` and the one
        computing `(x @ A) @ B`, the equation's input, kernel and output
        specs, the spec of `x @ A` and its rank letter, and whether the
        branch is `x.reshape(..., d_in) @ A @ B` (the inputs end with the
        contracted axes in kernel order and the outputs are the other input
        axes followed by the output axes, e.g. `"btd,ndh->btnh"`).

    Raises:
        ValueError: if the kernel has an axis that is both contracted and
            kept in the output (a batched kernel), or lacks input or output
            axes, so it cannot be written as one d_in x d_out matrix.
    """
    try:
        lhs, outputs = equation.replace(" ", "").split("->")
        inputs, kernel = lhs.split(",")
    except ValueError:
        raise ValueError(
            "`equation` must have the form 'inputs,kernel->outputs'. "
            f"Received: equation={equation!r}"
        ) from None
    in_axes = tuple(c for c in kernel if c in inputs and c not in outputs)
    out_axes = tuple(c for c in kernel if c in outputs and c not in inputs)
    others = [c for c in kernel if c not in in_axes and c not in out_axes]
    if others or not in_axes or not out_axes:
        raise ValueError(
            "LoRA needs an EinsumDense kernel that splits into (input axes) "
            "x (output axes); kernel axes "
            f"{others or 'on one side only'} prevent that. "
            f"Received: equation={equation!r}"
        )
    free = next(c for c in string.ascii_letters if c not in equation)
    hidden = "".join(c for c in inputs if c not in in_axes) + free
    contracted = "".join(in_axes)
    lead = inputs[: len(inputs) - len(contracted)]
    return FactoredEquation(
        in_axes=in_axes,
        out_axes=out_axes,
        equation_a=f"{inputs},{contracted}{free}->{hidden}",
        equation_b=f"{hidden},{free}{''.join(out_axes)}->{outputs}",
        inputs=inputs,
        kernel=kernel,
        outputs=outputs,
        hidden=hidden,
        free=free,
        as_matmul=inputs.endswith(contracted)
        and outputs == lead + "".join(out_axes),
    )


def _kernel_shape(layer):
    """The kernel's shape (an int4 kernel is stored flattened and packed;
    Keras keeps its shape as `original_kernel_shape`)."""
    if getattr(layer, "quantization_mode", None) == "int4":
        return tuple(layer.original_kernel_shape)
    (kernel,) = [w for w in layer.weights if w.name == "kernel"]
    return tuple(kernel.shape)


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAEinsumDense(LoRALayer, keras.layers.EinsumDense):
    """An `EinsumDense` layer whose frozen kernel is adapted by LoRA.

    The kernel is viewed as a matrix (product of its contracted axes) x
    (product of its output axes), the orientation PEFT uses for attention
    projections. With A (d_in, rank) and B (rank, d_out), the layer computes
    `einsum(x, W) + s * (dropout(x) @ A) @ B`, then bias and activation as
    `EinsumDense` does (Hu et al. 2021, arXiv:2106.09685, eq. 3). For
    Gemma's query projection `"btd,ndh->btnh"`, A is (d, rank) and B is
    (rank, n*h) in the kernel's (n, h) order. When the equation contracts
    the input's trailing axes and appends the output axes (every keras-hub
    projection), the branch is two 2-D matmuls on the input viewed as
    `(tokens, d_in)`; other layouts use two einsums. `A @ B` is never
    formed.

    `output_shape`, `activation`, `bias_axes`, `kernel_initializer`,
    `bias_initializer`, `kernel_regularizer`, `bias_regularizer`,
    `activity_regularizer`, `kernel_constraint` and `bias_constraint` are
    as in `keras.layers.EinsumDense`; the LoRA arguments (`rank`, `alpha`,
    `dropout`, `use_rslora`, `lora_a_initializer`, `lora_b_initializer`,
    `train_bias`, `init`, `use_dora`) are as in `keras_lora.LoRADense`.

    Args:
        equation: str, as in `keras.layers.EinsumDense`. Kernels with an axis
            both contracted and kept (batched kernels) are refused.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape / output shape:
        As given by `equation` and `output_shape`, in the compute dtype.

    Raises:
        ValueError: a LoRA argument is invalid (see `LoRADense`) or the
            `equation` cannot be factored; raised by the constructor.

    Examples:
        >>> import numpy as np
        >>> import keras_lora
        >>> layer = keras_lora.LoRAEinsumDense(
        ...     "btd,ndh->btnh", output_shape=(None, 2, 4), rank=2)
        >>> tuple(layer(np.ones((1, 3, 8), "float32")).shape)
        (1, 3, 2, 4)
    """

    base_class = keras.layers.EinsumDense

    def __init__(
        self,
        equation,
        output_shape,
        activation=None,
        bias_axes=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        *,
        rank=8,
        alpha=None,
        dropout=0.0,
        use_rslora=False,
        lora_a_initializer=None,
        lora_b_initializer="zeros",
        train_bias=False,
        init="default",
        use_dora=False,
        **kwargs,
    ):
        lora = layer_config(locals())
        factor_equation(equation)  # refuse bad equations before anything
        super().__init__(
            equation,
            output_shape,
            activation=activation,
            bias_axes=bias_axes,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            **kwargs,
        )
        self.init_lora(lora)

    def build(self, input_shape):
        super().build(input_shape)
        self.build_lora()

    def build_lora(self):
        self.factored = factor_equation(self.equation)
        self.in_axes = self.factored.in_axes
        self.out_axes = self.factored.out_axes
        self.equation_a = self.factored.equation_a
        self.equation_b = self.factored.equation_b
        self.lora_as_matmul = self.factored.as_matmul
        kernel_spec = self.factored.kernel
        kernel_shape = _kernel_shape(self)
        shape = dict(zip(kernel_spec, kernel_shape, strict=True))
        self.in_dims = tuple(shape[c] for c in self.in_axes)
        self.out_dims = tuple(shape[c] for c in self.out_axes)
        order = self.in_axes + self.out_axes
        self.kernel_permutation = tuple(order.index(c) for c in kernel_spec)
        super().build_lora()

    @classmethod
    def adapted_dims(cls, layer):
        f = factor_equation(layer.equation)
        shape = dict(zip(f.kernel, _kernel_shape(layer), strict=True))
        return [
            (
                math.prod(shape[c] for c in f.in_axes),
                math.prod(shape[c] for c in f.out_axes),
            )
        ]

    def adapter_axis_groups(self, base_shape, a_ndim):
        """A covers the kernel's contracted axes, B its output axes (each
        flattened in kernel order); see `LoRALayer.adapter_axis_groups`."""
        kernel = self.factored.kernel
        return (
            [[kernel.index(c) for c in self.in_axes]],
            [[kernel.index(c) for c in self.out_axes]],
        )

    def lora_shapes(self):
        r = self.adapter_rank
        return [
            (
                "lora_a",
                "lora_b",
                (math.prod(self.in_dims), r),
                (r, math.prod(self.out_dims)),
            )
        ]

    def call(self, inputs, training=None):
        x = self.base_product(
            inputs, lambda: ops.einsum(self.equation, inputs, self.kernel)
        )
        x = self.apply_adapter(x, inputs, training)
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def branch(self, inputs, a, b, training=None, adapter_ids=None):
        """`(dropout(x) @ A) @ sB`, shaped as the layer's output.

        When the contracted axes are the input's trailing axes and the
        output is the remaining input axes followed by the kernel's output
        axes (every keras-hub attention and MLP projection), the branch is
        two plain matmuls on the input viewed as `(..., d_in)`; otherwise
        two einsums. Either way `A @ B` is never formed. Mixed-adapter
        batches (`adapter_ids`) need a named batch axis first in the
        inputs and kept in the output.
        """
        x = self.lora_dropout(inputs, training)
        r = self.adapter_rank
        if adapter_ids is None:
            if self.lora_as_matmul:
                return low_rank_matmul(
                    x, a, b, self.out_dims, len(self.in_dims)
                )
            a = ops.reshape(a, self.in_dims + (r,))
            b = ops.reshape(b, (r,) + self.out_dims)
            h = ops.einsum(self.equation_a, x, a)
            return ops.einsum(self.equation_b, h, b)
        f = self.factored
        batch = f.inputs[0]
        if (
            f.inputs.startswith(".")
            or batch not in f.outputs
            or (batch in f.kernel)
        ):
            raise NotImplementedError(
                "Mixed-adapter batches need an EinsumDense equation whose "
                "first input axis is a named batch axis kept in the output. "
                f"Received: equation={self.equation!r} in layer "
                f"'{self.name}'."
            )
        a = ops.take(a, adapter_ids, axis=0)
        b = ops.take(b, adapter_ids, axis=0)
        a = ops.reshape(a, (-1,) + self.in_dims + (r,))
        b = ops.reshape(b, (-1, r) + self.out_dims)
        in_axes, out_axes = "".join(f.in_axes), "".join(f.out_axes)
        x = ops.cast(x, a.dtype)
        h = ops.einsum(f"{f.inputs},{batch}{in_axes}{f.free}->{f.hidden}", x, a)
        return ops.einsum(
            f"{f.hidden},{batch}{f.free}{out_axes}->{f.outputs}", h, b
        )

    def scale_units(self, outputs, scale, per_example=False, pair=None):
        """DoRA's factor per output unit (the kernel's output axes, which
        the equation places anywhere in the output), by one einsum."""
        f = self.factored
        out_axes = "".join(f.out_axes)
        scale = ops.cast(scale, outputs.dtype)
        if per_example:
            batch = f.inputs[0]
            scale = ops.reshape(scale, (-1,) + self.out_dims)
            spec = f"{f.outputs},{batch}{out_axes}->{f.outputs}"
        else:
            scale = ops.reshape(scale, self.out_dims)
            spec = f"{f.outputs},{out_axes}->{f.outputs}"
        return ops.einsum(spec, outputs, scale)

    def weight_deltas(self):
        delta = ops.matmul(self.lora_a, self.lora_b)
        delta = ops.reshape(delta, self.in_dims + self.out_dims)
        delta = ops.transpose(delta, self.kernel_permutation)
        return {"kernel": ops.multiply(delta, self.scaling)}
