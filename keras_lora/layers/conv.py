"""LoRA for Keras's convolutions: `LoRAConv1D`, `LoRAConv2D`, `LoRAConv3D`
and the transposed `LoRAConv1DTranspose`, `LoRAConv2DTranspose`,
`LoRAConv3DTranspose`.

One body (`LoRAConvMixin`, and `LoRAConvTransposeMixin` over it) serves
them all, written for any number of spatial axes (Keras's `self.rank`: 1, 2
or 3; the adapter's rank is `adapter_rank`).
"""

import math

import keras
from keras import ops

from keras_lora.layers.base import LoRALayer
from keras_lora.layers.config import layer_config


def bias_and_activation(layer, outputs):
    """The end of a Keras convolution's `call` (every keras_lora
    convolution shares it): bias over the channel axis, then the
    activation."""
    if layer.use_bias:
        if layer.data_format == "channels_last":
            bias_shape = (1,) * (layer.rank + 1) + (-1,)
        else:
            bias_shape = (1, -1) + (1,) * layer.rank
        outputs = ops.add(outputs, ops.reshape(layer.bias, bias_shape))
    if layer.activation is not None:
        return layer.activation(outputs)
    return outputs


class LoRAConvMixin(LoRALayer):
    """The LoRA body shared by `LoRAConv1D`, `LoRAConv2D` and `LoRAConv3D`
    (mixed in before the Keras convolution class)."""

    def build(self, input_shape):
        super().build(input_shape)
        self.build_lora()

    def lora_shapes(self):
        kernel_shape = tuple(self.base_weights()["kernel"].shape)
        r = self.adapter_rank
        return [
            ("lora_a", "lora_b", kernel_shape[:-1] + (r,), (r, self.filters))
        ]

    def _causal_padded(self, inputs):
        """Conv1D's `padding="causal"`: `dilation * (kernel_size - 1)` zeros
        before the steps, none after, as `Conv1D` pads."""
        if self.padding != "causal":
            return inputs
        left = self.dilation_rate[0] * (self.kernel_size[0] - 1)
        steps = [[left, 0]]
        if self.data_format == "channels_last":
            return ops.pad(inputs, [[0, 0], *steps, [0, 0]])
        return ops.pad(inputs, [[0, 0], [0, 0], *steps])

    def _conv(self, inputs, kernel):
        """The base layer's convolution (strides, padding, dilation) of
        already causal-padded `inputs` with `kernel`."""
        return ops.conv(
            inputs,
            kernel,
            strides=list(self.strides),
            padding="valid" if self.padding == "causal" else self.padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )

    def _adapter_conv(self, inputs, a):
        """The branch's first product: the base convolution with `a`
        (A's layout: `kernel_size + (in_channels // groups, channels)`)."""
        return self._conv(inputs, a)

    def call(self, inputs, training=None):
        inputs = self._causal_padded(inputs)
        outputs = self._conv(inputs, self.kernel)
        outputs = self.apply_adapter(outputs, inputs, training)
        return bias_and_activation(self, outputs)

    def unit_axis(self, pair=None):
        """The channel axis: DoRA's output units are the filters."""
        return 1 if self.data_format == "channels_first" else -1

    def branch(self, inputs, a, b, training=None, adapter_ids=None):
        """`conv(dropout(x), A)` then `sB` as a (grouped) 1x1 convolution.

        `inputs` are already causal-padded. With `adapter_ids`, the n
        stacked A kernels run as one convolution with n * rank filters per
        group, each example keeps its own adapter's rank channels, and its
        own B maps them to the filters.
        """
        x = self.lora_dropout(inputs, training)
        g, r, k = self.groups, self.adapter_rank, self.rank
        if adapter_ids is None:
            if g > 1:
                # One copy of A per group: a grouped conv into groups * rank.
                a = ops.tile(a, (1,) * (k + 1) + (g,))
            h = self._adapter_conv(x, a)
            if g == 1 and self.data_format == "channels_last":
                return ops.matmul(h, b)
            # B as a (grouped) 1x1 convolution.
            b = ops.reshape(b, (1,) * k + (r, self.filters))
            return ops.conv(
                h, b, strides=1, padding="valid", data_format=self.data_format
            )
        n = a.shape[0]
        spatial, cin = tuple(a.shape[1 : k + 1]), a.shape[k + 1]
        # (n, *kernel, cin/g, r) -> (*kernel, cin/g, g * n * r), per group.
        a = ops.transpose(a, tuple(range(1, k + 2)) + (0, k + 2))
        a = ops.tile(
            ops.reshape(a, spatial + (cin, n * r)), (1,) * (k + 1) + (g,)
        )
        h = self._adapter_conv(x, a)
        if self.data_format == "channels_first":
            h = ops.moveaxis(h, 1, -1)
        lead = tuple(ops.shape(h)[:-1])
        h = ops.reshape(h, lead + (g, n, r))
        pick = ops.one_hot(ops.cast(adapter_ids, "int32"), n, dtype=h.dtype)
        h = ops.einsum("b...gnr,bn->b...gr", h, pick)
        b = ops.take(b, adapter_ids, axis=0)
        b = ops.reshape(b, (-1, r, g, self.filters // g))
        out = ops.einsum("b...gr,brgf->b...gf", h, b)
        out = ops.reshape(out, lead + (self.filters,))
        if self.data_format == "channels_first":
            out = ops.moveaxis(out, -1, 1)
        return out

    def weight_deltas(self):
        delta = ops.tensordot(self.lora_a, self.lora_b, axes=1)
        return {"kernel": ops.multiply(delta, self.scaling)}


class LoRAConvTransposeMixin(LoRAConvMixin):
    """The LoRA body of the transposed convolutions: Keras's kernel is
    `kernel_size + (filters, in_channels)`; A is stored as
    `kernel_size + (in_channels, rank)` and B as `(rank, filters)`, so the
    update `swapaxes(tensordot(A, B), -1, -2)` has the kernel's shape."""

    #: Keras's transposed convolutions have no groups.
    groups = 1

    def lora_shapes(self):
        kernel_shape = tuple(self.base_weights()["kernel"].shape)
        r = self.adapter_rank
        a_shape = kernel_shape[:-2] + (kernel_shape[-1], r)
        return [("lora_a", "lora_b", a_shape, (r, self.filters))]

    @classmethod
    def adapted_dims(cls, layer):
        shape = tuple(layer.kernel.shape)  # kernel_size + (filters, c)
        return [(math.prod(shape) // shape[-2], shape[-2])]

    def adapter_axis_groups(self, base_shape, a_ndim):
        """A covers the kernel's spatial and input-channel axes, B its
        filters axis; see `LoRALayer.adapter_axis_groups`."""
        k = self.rank
        return [[i] for i in range(k)] + [[k + 1]], [[k]]

    def _conv(self, inputs, kernel):
        """The base layer's transposed convolution (strides, padding,
        output padding, dilation) with `kernel` in Keras's layout."""
        return ops.conv_transpose(
            inputs,
            kernel,
            strides=list(self.strides),
            padding=self.padding,
            output_padding=self.output_padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )

    def _adapter_conv(self, inputs, a):
        # A's (..., in_channels, channels) as a (..., channels, in_channels)
        # transposed-convolution kernel.
        return self._conv(inputs, ops.swapaxes(a, -1, -2))

    def weight_deltas(self):
        delta = ops.tensordot(self.lora_a, self.lora_b, axes=1)
        return {
            "kernel": ops.multiply(ops.swapaxes(delta, -1, -2), self.scaling)
        }


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAConv1D(LoRAConvMixin, keras.layers.Conv1D):
    """A `Conv1D` layer whose frozen kernel is adapted by LoRA.

    As in PEFT's `Conv1d` / `Conv2d` / `Conv3d` LoRA: A is a convolution
    with the base layer's kernel size, strides, padding, dilation and groups
    into `rank` channels (per group), and B is a 1x1 convolution from `rank`
    to `filters` channels. The layer computes
    `conv(x, W) + s * conv1x1(conv(dropout(x), A), B)`, then bias and
    activation as the base layer does. `lora_a` has shape
    `kernel_size + (in_channels // groups, rank)` and `lora_b`
    `(rank, filters)`; the merged kernel `W + s * tensordot(A, B)` has
    exactly the base kernel's shape `kernel_size + (in_channels // groups,
    filters)` for both data formats (Hu et al. 2021, arXiv:2106.09685,
    eq. 3, with the kernel read as a
    `(prod(kernel_size) * in_channels // groups) x filters` matrix).
    `padding="causal"` works as in `Conv1D`: the inputs are left-padded
    once, for the base and the adapter branch.

    `filters`, `kernel_size`, `strides`, `padding`, `data_format`,
    `dilation_rate`, `groups`, `activation`, `use_bias`,
    `kernel_initializer`, `bias_initializer`, `kernel_regularizer`,
    `bias_regularizer`, `activity_regularizer`, `kernel_constraint` and
    `bias_constraint` are as in `keras.layers.Conv1D`; the LoRA arguments
    (`rank`, `alpha`, `dropout`, `use_rslora`, `lora_a_initializer`,
    `lora_b_initializer`, `train_bias`, `init`, `use_dora`) are as in
    `keras_lora.LoRADense`.

    Args:
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        3D tensor `(batch, steps, channels)` (channels_last) or
        `(batch, channels, steps)` (channels_first).

    Output shape:
        As `keras.layers.Conv1D`, in the compute dtype.

    Raises:
        ValueError: a LoRA argument is invalid (see `LoRADense`).

    Examples:
        >>> import numpy as np
        >>> import keras_lora
        >>> layer = keras_lora.LoRAConv1D(5, 3, rank=2)
        >>> tuple(layer(np.ones((1, 7, 4), "float32")).shape)
        (1, 5, 5)
    """

    base_class = keras.layers.Conv1D

    def __init__(
        self,
        filters,
        kernel_size,
        strides=1,
        padding="valid",
        data_format=None,
        dilation_rate=1,
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
        self.init_lora(lora)


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAConv2D(LoRAConvMixin, keras.layers.Conv2D):
    """A `Conv2D` layer whose frozen kernel is adapted by LoRA.

    As in PEFT's `Conv1d` / `Conv2d` / `Conv3d` LoRA: A is a convolution
    with the base layer's kernel size, strides, padding, dilation and groups
    into `rank` channels (per group), and B is a 1x1 convolution from `rank`
    to `filters` channels. The layer computes
    `conv(x, W) + s * conv1x1(conv(dropout(x), A), B)`, then bias and
    activation as the base layer does. `lora_a` has shape
    `kernel_size + (in_channels // groups, rank)` and `lora_b`
    `(rank, filters)`; the merged kernel `W + s * tensordot(A, B)` has
    exactly the base kernel's shape `kernel_size + (in_channels // groups,
    filters)` for both data formats (Hu et al. 2021, arXiv:2106.09685,
    eq. 3, with the kernel read as a
    `(prod(kernel_size) * in_channels // groups) x filters` matrix).

    `filters`, `kernel_size`, `strides`, `padding`, `data_format`,
    `dilation_rate`, `groups`, `activation`, `use_bias`,
    `kernel_initializer`, `bias_initializer`, `kernel_regularizer`,
    `bias_regularizer`, `activity_regularizer`, `kernel_constraint` and
    `bias_constraint` are as in `keras.layers.Conv2D`; the LoRA arguments
    (`rank`, `alpha`, `dropout`, `use_rslora`, `lora_a_initializer`,
    `lora_b_initializer`, `train_bias`, `init`, `use_dora`) are as in
    `keras_lora.LoRADense`.

    Args:
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        4D tensor `(batch, rows, cols, channels)` (channels_last) or
        `(batch, channels, rows, cols)` (channels_first).

    Output shape:
        As `keras.layers.Conv2D`, in the compute dtype.

    Raises:
        ValueError: a LoRA argument is invalid (see `LoRADense`).

    Examples:
        >>> import numpy as np
        >>> import keras_lora
        >>> layer = keras_lora.LoRAConv2D(5, 3, rank=2)
        >>> tuple(layer(np.ones((1, 7, 7, 4), "float32")).shape)
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
        self.init_lora(lora)


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAConv3D(LoRAConvMixin, keras.layers.Conv3D):
    """A `Conv3D` layer whose frozen kernel is adapted by LoRA.

    As in PEFT's `Conv1d` / `Conv2d` / `Conv3d` LoRA: A is a convolution
    with the base layer's kernel size, strides, padding, dilation and groups
    into `rank` channels (per group), and B is a 1x1 convolution from `rank`
    to `filters` channels. The layer computes
    `conv(x, W) + s * conv1x1(conv(dropout(x), A), B)`, then bias and
    activation as the base layer does. `lora_a` has shape
    `kernel_size + (in_channels // groups, rank)` and `lora_b`
    `(rank, filters)`; the merged kernel `W + s * tensordot(A, B)` has
    exactly the base kernel's shape `kernel_size + (in_channels // groups,
    filters)` for both data formats (Hu et al. 2021, arXiv:2106.09685,
    eq. 3, with the kernel read as a
    `(prod(kernel_size) * in_channels // groups) x filters` matrix).

    `filters`, `kernel_size`, `strides`, `padding`, `data_format`,
    `dilation_rate`, `groups`, `activation`, `use_bias`,
    `kernel_initializer`, `bias_initializer`, `kernel_regularizer`,
    `bias_regularizer`, `activity_regularizer`, `kernel_constraint` and
    `bias_constraint` are as in `keras.layers.Conv3D`; the LoRA arguments
    (`rank`, `alpha`, `dropout`, `use_rslora`, `lora_a_initializer`,
    `lora_b_initializer`, `train_bias`, `init`, `use_dora`) are as in
    `keras_lora.LoRADense`.

    Args:
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        5D tensor `(batch, dim1, dim2, dim3, channels)`
        (channels_last) or `(batch, channels, dim1, dim2, dim3)`
        (channels_first).

    Output shape:
        As `keras.layers.Conv3D`, in the compute dtype.

    Raises:
        ValueError: a LoRA argument is invalid (see `LoRADense`).

    Examples:
        >>> import numpy as np
        >>> import keras_lora
        >>> layer = keras_lora.LoRAConv3D(5, 3, rank=2)
        >>> tuple(layer(np.ones((1, 5, 5, 5, 4), "float32")).shape)
        (1, 3, 3, 3, 5)
    """

    base_class = keras.layers.Conv3D

    def __init__(
        self,
        filters,
        kernel_size,
        strides=(1, 1, 1),
        padding="valid",
        data_format=None,
        dilation_rate=(1, 1, 1),
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
        self.init_lora(lora)


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAConv1DTranspose(LoRAConvTransposeMixin, keras.layers.Conv1DTranspose):
    """A `Conv1DTranspose` layer whose frozen kernel is adapted by LoRA.

    A transposed convolution is linear in its kernel, which Keras stores as
    `kernel_size + (filters, in_channels)`; read as a
    `(prod(kernel_size) * in_channels) x filters` matrix it is adapted as
    `W + s * A @ B` (Hu et al. 2021, arXiv:2106.09685, eq. 3). A is stored
    as `kernel_size + (in_channels, rank)` and runs as a transposed
    convolution with the base layer's strides, padding, output padding and
    dilation into `rank` channels; B, `(rank, filters)`, is a 1x1
    convolution from `rank` to `filters`. The layer computes
    `conv_transpose(x, W) + s * conv1x1(conv_transpose(dropout(x), A), B)`,
    then bias and activation as the base layer does; the merged kernel
    `W + s * swapaxes(tensordot(A, B), -1, -2)` has exactly the base
    kernel's shape for both data formats. PEFT has no transposed
    convolution LoRA; this is the same construction as its `Conv2d` one.

    `filters`, `kernel_size`, `strides`, `padding`, `output_padding`,
    `data_format`, `dilation_rate`, `activation`, `use_bias`,
    `kernel_initializer`, `bias_initializer`, `kernel_regularizer`,
    `bias_regularizer`, `activity_regularizer`, `kernel_constraint` and
    `bias_constraint` are as in `keras.layers.Conv1DTranspose`; the LoRA
    arguments (`rank`, `alpha`, `dropout`, `use_rslora`,
    `lora_a_initializer`, `lora_b_initializer`, `train_bias`, `init`,
    `use_dora`) are as in `keras_lora.LoRADense`.

    Args:
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        3D tensor `(batch, steps, channels)` (channels_last) or
        `(batch, channels, steps)` (channels_first).

    Output shape:
        As `keras.layers.Conv1DTranspose`, in the compute dtype.

    Raises:
        ValueError: a LoRA argument is invalid (see `LoRADense`).

    Examples:
        >>> import numpy as np
        >>> import keras_lora
        >>> layer = keras_lora.LoRAConv1DTranspose(5, 3, rank=2)
        >>> tuple(layer(np.ones((1, 7, 4), "float32")).shape)
        (1, 9, 5)
    """

    base_class = keras.layers.Conv1DTranspose

    def __init__(
        self,
        filters,
        kernel_size,
        strides=1,
        padding="valid",
        output_padding=None,
        data_format=None,
        dilation_rate=1,
        activation=None,
        use_bias=True,
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
        super().__init__(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            output_padding=output_padding,
            data_format=data_format,
            dilation_rate=dilation_rate,
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
        self.init_lora(lora)


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAConv2DTranspose(LoRAConvTransposeMixin, keras.layers.Conv2DTranspose):
    """A `Conv2DTranspose` layer whose frozen kernel is adapted by LoRA.

    A transposed convolution is linear in its kernel, which Keras stores as
    `kernel_size + (filters, in_channels)`; read as a
    `(prod(kernel_size) * in_channels) x filters` matrix it is adapted as
    `W + s * A @ B` (Hu et al. 2021, arXiv:2106.09685, eq. 3). A is stored
    as `kernel_size + (in_channels, rank)` and runs as a transposed
    convolution with the base layer's strides, padding, output padding and
    dilation into `rank` channels; B, `(rank, filters)`, is a 1x1
    convolution from `rank` to `filters`. The layer computes
    `conv_transpose(x, W) + s * conv1x1(conv_transpose(dropout(x), A), B)`,
    then bias and activation as the base layer does; the merged kernel
    `W + s * swapaxes(tensordot(A, B), -1, -2)` has exactly the base
    kernel's shape for both data formats. PEFT has no transposed
    convolution LoRA; this is the same construction as its `Conv2d` one.

    `filters`, `kernel_size`, `strides`, `padding`, `output_padding`,
    `data_format`, `dilation_rate`, `activation`, `use_bias`,
    `kernel_initializer`, `bias_initializer`, `kernel_regularizer`,
    `bias_regularizer`, `activity_regularizer`, `kernel_constraint` and
    `bias_constraint` are as in `keras.layers.Conv2DTranspose`; the LoRA
    arguments (`rank`, `alpha`, `dropout`, `use_rslora`,
    `lora_a_initializer`, `lora_b_initializer`, `train_bias`, `init`,
    `use_dora`) are as in `keras_lora.LoRADense`.

    Args:
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        4D tensor `(batch, rows, cols, channels)` (channels_last) or
        `(batch, channels, rows, cols)` (channels_first).

    Output shape:
        As `keras.layers.Conv2DTranspose`, in the compute dtype.

    Raises:
        ValueError: a LoRA argument is invalid (see `LoRADense`).

    Examples:
        >>> import numpy as np
        >>> import keras_lora
        >>> layer = keras_lora.LoRAConv2DTranspose(5, 3, rank=2)
        >>> tuple(layer(np.ones((1, 7, 7, 4), "float32")).shape)
        (1, 9, 9, 5)
    """

    base_class = keras.layers.Conv2DTranspose

    def __init__(
        self,
        filters,
        kernel_size,
        strides=(1, 1),
        padding="valid",
        output_padding=None,
        data_format=None,
        dilation_rate=(1, 1),
        activation=None,
        use_bias=True,
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
        super().__init__(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            output_padding=output_padding,
            data_format=data_format,
            dilation_rate=dilation_rate,
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
        self.init_lora(lora)


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAConv3DTranspose(LoRAConvTransposeMixin, keras.layers.Conv3DTranspose):
    """A `Conv3DTranspose` layer whose frozen kernel is adapted by LoRA.

    A transposed convolution is linear in its kernel, which Keras stores as
    `kernel_size + (filters, in_channels)`; read as a
    `(prod(kernel_size) * in_channels) x filters` matrix it is adapted as
    `W + s * A @ B` (Hu et al. 2021, arXiv:2106.09685, eq. 3). A is stored
    as `kernel_size + (in_channels, rank)` and runs as a transposed
    convolution with the base layer's strides, padding, output padding and
    dilation into `rank` channels; B, `(rank, filters)`, is a 1x1
    convolution from `rank` to `filters`. The layer computes
    `conv_transpose(x, W) + s * conv1x1(conv_transpose(dropout(x), A), B)`,
    then bias and activation as the base layer does; the merged kernel
    `W + s * swapaxes(tensordot(A, B), -1, -2)` has exactly the base
    kernel's shape for both data formats. PEFT has no transposed
    convolution LoRA; this is the same construction as its `Conv2d` one.

    `filters`, `kernel_size`, `strides`, `padding`, `output_padding`,
    `data_format`, `dilation_rate`, `activation`, `use_bias`,
    `kernel_initializer`, `bias_initializer`, `kernel_regularizer`,
    `bias_regularizer`, `activity_regularizer`, `kernel_constraint` and
    `bias_constraint` are as in `keras.layers.Conv3DTranspose`; the LoRA
    arguments (`rank`, `alpha`, `dropout`, `use_rslora`,
    `lora_a_initializer`, `lora_b_initializer`, `train_bias`, `init`,
    `use_dora`) are as in `keras_lora.LoRADense`.

    Args:
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        5D tensor `(batch, dim1, dim2, dim3, channels)`
        (channels_last) or `(batch, channels, dim1, dim2, dim3)`
        (channels_first).

    Output shape:
        As `keras.layers.Conv3DTranspose`, in the compute dtype.

    Raises:
        ValueError: a LoRA argument is invalid (see `LoRADense`).

    Examples:
        >>> import numpy as np
        >>> import keras_lora
        >>> layer = keras_lora.LoRAConv3DTranspose(5, 3, rank=2)
        >>> tuple(layer(np.ones((1, 5, 5, 5, 4), "float32")).shape)
        (1, 7, 7, 7, 5)
    """

    base_class = keras.layers.Conv3DTranspose

    def __init__(
        self,
        filters,
        kernel_size,
        strides=(1, 1, 1),
        padding="valid",
        output_padding=None,
        data_format=None,
        dilation_rate=(1, 1, 1),
        activation=None,
        use_bias=True,
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
        super().__init__(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            output_padding=output_padding,
            data_format=data_format,
            dilation_rate=dilation_rate,
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
        self.init_lora(lora)
