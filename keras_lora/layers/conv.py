"""LoRAConv2D: `keras.layers.Conv2D` with a low-rank adapter."""

import keras
from keras import ops

from keras_lora.layers.base import LoRALayer
from keras_lora.layers.base import validate_lora_args


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAConv2D(LoRALayer, keras.layers.Conv2D):
    """A `Conv2D` layer whose frozen kernel is adapted by LoRA.

    As in PEFT's `Conv2d` LoRA: A is a convolution with the base layer's
    kernel size, strides, padding, dilation and groups into `rank` channels
    (per group), and B is a 1x1 convolution from `rank` to `filters`
    channels. The layer computes
    `conv(x, W) + s * conv1x1(conv(dropout(x), A), B)`, then bias and
    activation as `Conv2D` does. `lora_a` has shape
    (kh, kw, in_channels // groups, rank) and `lora_b` (rank, filters); the
    merged kernel `W + s * tensordot(A, B)` has exactly the base kernel's
    shape (kh, kw, in_channels // groups, filters) for both data formats
    (Hu et al. 2021, arXiv:2106.09685, eq. 3, with the kernel read as a
    (kh * kw * in_channels // groups) x filters matrix).

    Args:
        filters, kernel_size, strides, padding, data_format, dilation_rate,
            groups, activation, use_bias, kernel_initializer,
            bias_initializer, kernel_regularizer, bias_regularizer,
            activity_regularizer, kernel_constraint, bias_constraint: as in
            `keras.layers.Conv2D`.
        rank, alpha, dropout, use_rslora, lora_a_initializer,
            lora_b_initializer, train_bias: as in `keras_lora.LoRADense`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        4D tensor `(batch, rows, cols, channels)` (channels_last) or
        `(batch, channels, rows, cols)` (channels_first).

    Output shape:
        As `keras.layers.Conv2D`, in the compute dtype.

    Raises:
        ValueError: a LoRA argument is invalid (see `LoRADense`).

    Example:

    >>> import numpy as np
    >>> import keras_lora
    >>> layer = keras_lora.LoRAConv2D(5, 3, rank=2)
    >>> layer(np.ones((1, 7, 7, 4), "float32")).shape
    (1, 5, 5, 5)
    """

    base_class = keras.layers.Conv2D

    def __init__(
        self,
        filters,
        kernel_size,
        strides=(1, 1),
        padding="valid",
        data_format=None,
        dilation_rate=(1, 1),
        groups=1,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        rank=8,
        alpha=None,
        dropout=0.0,
        use_rslora=False,
        lora_a_initializer="he_uniform",
        lora_b_initializer="zeros",
        train_bias=False,
        **kwargs,
    ):
        lora = validate_lora_args(
            rank,
            alpha,
            dropout,
            use_rslora,
            train_bias,
            lora_rank=kwargs.pop("lora_rank", None),
            lora_alpha=kwargs.pop("lora_alpha", None),
        )
        super().__init__(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            data_format=data_format,
            dilation_rate=dilation_rate,
            groups=groups,
            activation=activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            **kwargs,
        )
        self._init_lora(
            *lora[:4], lora_a_initializer, lora_b_initializer, lora[4]
        )

    def build(self, input_shape):
        super().build(input_shape)
        self.build_lora()

    def lora_shapes(self):
        kernel_shape = tuple(self.base_weights()["kernel"].shape)
        r = self.adapter_rank
        return [
            ("lora_a", "lora_b", kernel_shape[:-1] + (r,), (r, self.filters))
        ]

    def call(self, inputs, training=None):
        outputs = self.convolution_op(inputs, self.kernel)
        if self.lora_active():
            outputs = ops.add(outputs, self._lora_branch(inputs, training))
        if self.use_bias:
            if self.data_format == "channels_last":
                bias_shape = (1, 1, 1, self.filters)
            else:
                bias_shape = (1, self.filters, 1, 1)
            outputs = ops.add(outputs, ops.reshape(self.bias, bias_shape))
        if self.activation is not None:
            return self.activation(outputs)
        return outputs

    def _lora_branch(self, inputs, training):
        a, b = self.adapter_factors()
        if self.groups > 1:
            # One copy of A per group: a grouped conv into groups * rank.
            a = ops.tile(a, (1, 1, 1, self.groups))
        h = self.convolution_op(self.lora_dropout(inputs, training), a)
        if self.groups == 1 and self.data_format == "channels_last":
            return ops.matmul(h, b)
        # B as a (grouped) 1x1 convolution.
        b = ops.reshape(b, (1, 1, self.adapter_rank, self.filters))
        return ops.conv(
            h, b, strides=1, padding="valid", data_format=self.data_format
        )

    def weight_deltas(self):
        delta = ops.tensordot(self.lora_a, self.lora_b, axes=1)
        return {"kernel": ops.multiply(delta, self.scaling)}
