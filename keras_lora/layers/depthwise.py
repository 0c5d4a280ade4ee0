"""LoRA for Keras's depthwise and separable convolutions:
`LoRADepthwiseConv1D`, `LoRADepthwiseConv2D`, `LoRASeparableConv1D` and
`LoRASeparableConv2D`.

A depthwise kernel `kernel_size + (channels, depth_multiplier)` is read as
a `prod(kernel_size) x (channels * depth_multiplier)` matrix, the reading
`LoRAConv2D` gives a convolution with `groups = channels` (which is what a
depthwise convolution is): A (`kernel_size + (rank,)`) holds `rank`
spatial filters shared by every channel, B (`(rank, channels,
depth_multiplier)`) mixes them per output channel, and the update
`tensordot(A, B)` has exactly the kernel's shape. A separable convolution
adapts both of its kernels: the depthwise one so, the pointwise one
(a 1x1 convolution, `channels * depth_multiplier` to `filters`) as a Dense
kernel.
"""

import math

import keras
from keras import ops

from keras_lora.layers.base import LoRALayer
from keras_lora.layers.base import format_docstring
from keras_lora.layers.base import low_rank_matmul
from keras_lora.layers.config import layer_config
from keras_lora.layers.conv import bias_and_activation

#: The adapter pair of a separable convolution's depthwise kernel.
DEPTHWISE_PAIR = ("depthwise_lora_a", "depthwise_lora_b")


def _channels_last(x, layer):
    if layer.data_format == "channels_first":
        return ops.moveaxis(x, 1, -1)
    return x


def _layer_format(x, layer):
    if layer.data_format == "channels_first":
        return ops.moveaxis(x, -1, 1)
    return x


def _pointwise_conv(layer, hidden):
    """The pointwise (1x1) stage of `layer`'s separable convolution.

    TensorFlow's CPU kernels have no channels_first convolution on some
    CPUs (Keras's own TensorFlow `separable_conv` transposes there too):
    computed channels_last, then moved back.
    """
    moved = (
        layer.data_format == "channels_first"
        and keras.backend.backend() == "tensorflow"
    )
    outputs = ops.conv(
        _channels_last(hidden, layer) if moved else hidden,
        layer.pointwise_kernel,
        strides=1,
        padding="valid",
        data_format="channels_last" if moved else layer.data_format,
    )
    return _layer_format(outputs, layer) if moved else outputs


def depthwise_update(layer, x, a, b, adapter_ids=None):
    """A's spatial filters on each channel alone, then B per output channel.

    Args:
        layer: the LoRA layer (strides, padding, dilation, data format of
            its depthwise convolution).
        x: the branch input (dropout applied).
        a: `kernel_size + (r,)`, or a stack `(n,) + kernel_size + (r,)`.
        b: `(r, channels, depth_multiplier)` (scaled), or a stack of n.
        adapter_ids: `None`, or an int tensor `(batch,)` choosing, per
            example, which stacked adapter applies.

    Returns:
        The update, shaped as the depthwise convolution's output. The
        channels are folded into the batch (free for channels_first) and A
        runs as a plain convolution from 1 to r channels: the same products
        as a depthwise convolution with multiplier r, without the grouped
        convolution's kernel gradient (on JAX's CPU, 100 times slower). The
        merged kernel is never formed.
    """
    channels, multiplier = b.shape[-2], b.shape[-1]
    r = a.shape[-1]
    if adapter_ids is None:
        n = 1
    else:
        n = a.shape[0]
        # (n, *kernel, r) -> (*kernel, n * r): adapter k's filters together.
        a = ops.reshape(ops.moveaxis(a, 0, -2), tuple(a.shape[1:-1]) + (-1,))
    channels_last = layer.data_format == "channels_last"
    if channels_last:
        x = ops.moveaxis(x, -1, 1)
    # (batch, channels, *spatial) -> (batch * channels, *spatial, 1).
    x = ops.reshape(x, (-1,) + tuple(ops.shape(x)[2:]) + (1,))
    h = ops.conv(
        x,
        ops.expand_dims(a, -2),
        strides=layer.strides,
        padding=layer.padding,
        dilation_rate=layer.dilation_rate,
        data_format="channels_last",
    )
    spatial = tuple(ops.shape(h)[1:-1])
    out = "b...cm" if channels_last else "bcm..."
    if adapter_ids is None:
        h = ops.reshape(h, (-1, channels) + spatial + (r,))
        out = ops.einsum(f"bc...r,rcm->{out}", h, b)
    else:
        h = ops.reshape(h, (-1, channels) + spatial + (n, r))
        pick = ops.one_hot(ops.cast(adapter_ids, "int32"), n, dtype=h.dtype)
        h = ops.einsum("bc...nr,bn->bc...r", h, pick)
        b = ops.take(b, adapter_ids, axis=0)
        out = ops.einsum(f"bc...r,brcm->{out}", h, b)
    if channels_last:
        return ops.reshape(out, (-1,) + spatial + (channels * multiplier,))
    return ops.reshape(out, (-1, channels * multiplier) + spatial)


def _depthwise_dims(kernel_shape):
    """`(d_in, d_out)` of a depthwise kernel `kernel_size + (c, m)`:
    `(prod(kernel_size), c * m)`."""
    shape = tuple(kernel_shape)
    return math.prod(shape[:-2]), shape[-2] * shape[-1]


def _depthwise_shapes(kernel_shape, r):
    """A and B shapes for a depthwise kernel `kernel_size + (c, m)`."""
    return kernel_shape[:-2] + (r,), (r,) + kernel_shape[-2:]


class LoRADepthwiseConvMixin(LoRALayer):
    """The LoRA body of `LoRADepthwiseConv1D` and `LoRADepthwiseConv2D`
    (mixed in before the Keras class)."""

    def build(self, input_shape):
        super().build(input_shape)
        self.build_lora()

    def lora_shapes(self):
        kernel_shape = tuple(self.base_weights()["kernel"].shape)
        a_shape, b_shape = _depthwise_shapes(kernel_shape, self.adapter_rank)
        return [("lora_a", "lora_b", a_shape, b_shape)]

    @classmethod
    def adapted_dims(cls, layer):
        return [_depthwise_dims(layer.kernel.shape)]

    def call(self, inputs, training=None):
        outputs = ops.depthwise_conv(
            inputs,
            self.kernel,
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )
        outputs = self.apply_adapter(outputs, inputs, training)
        return bias_and_activation(self, outputs)

    def unit_axis(self, pair=None):
        """The channel axis: DoRA's output units are the
        `channels * depth_multiplier` output channels."""
        return 1 if self.data_format == "channels_first" else -1

    def branch(self, inputs, a, b, training=None, adapter_ids=None):
        """`depthwise_conv(dropout(x), A)` into `rank` channels per input
        channel, then B per output channel (see `depthwise_update`)."""
        x = self.lora_dropout(inputs, training)
        return depthwise_update(self, x, a, b, adapter_ids)

    def weight_deltas(self):
        delta = ops.tensordot(self.lora_a, self.lora_b, axes=1)
        return {"kernel": ops.multiply(delta, self.scaling)}


class LoRASeparableConvMixin(LoRALayer):
    """The LoRA body of `LoRASeparableConv1D` and `LoRASeparableConv2D`:
    `lora_a` / `lora_b` adapt the pointwise kernel, `depthwise_lora_a` /
    `depthwise_lora_b` the depthwise kernel."""

    def build(self, input_shape):
        super().build(input_shape)
        self.build_lora()

    @classmethod
    def adapted_dims(cls, layer):
        pointwise = tuple(layer.pointwise_kernel.shape)
        return [
            (math.prod(pointwise[:-1]), pointwise[-1]),
            _depthwise_dims(layer.depthwise_kernel.shape),
        ]

    def lora_shapes(self):
        base = self.base_weights()
        depthwise = tuple(base["depthwise_kernel"].shape)
        pointwise = tuple(base["pointwise_kernel"].shape)
        r = self.adapter_rank
        return [
            ("lora_a", "lora_b", pointwise[:-1] + (r,), (r, self.filters)),
            (*DEPTHWISE_PAIR, *_depthwise_shapes(depthwise, r)),
        ]

    def call(self, inputs, training=None):
        mixing = (
            self.adapter_bank is not None
            and self.adapter_bank.in_mixed_batch(self)
        )
        if not self.lora_active() and not mixing:
            # Merged in place: exactly Keras's separable convolution.
            outputs = ops.separable_conv(
                inputs,
                self.depthwise_kernel,
                self.pointwise_kernel,
                strides=self.strides,
                padding=self.padding,
                dilation_rate=self.dilation_rate,
                data_format=self.data_format,
            )
        else:
            # The two stages of `ops.separable_conv`, each adapted; the
            # pointwise adapter sees the adapted depthwise output, as the
            # merged layer's pointwise kernel does.
            hidden = ops.depthwise_conv(
                inputs,
                self.depthwise_kernel,
                strides=self.strides,
                padding=self.padding,
                dilation_rate=self.dilation_rate,
                data_format=self.data_format,
            )
            hidden = self.apply_adapter(
                hidden, inputs, training, DEPTHWISE_PAIR, self.depthwise_branch
            )
            outputs = _pointwise_conv(self, hidden)
            outputs = self.apply_adapter(outputs, hidden, training)
        return bias_and_activation(self, outputs)

    def unit_axis(self, pair=None):
        """The channel axis, for both kernels' DoRA output units."""
        return 1 if self.data_format == "channels_first" else -1

    def depthwise_branch(self, inputs, a, b, training=None, adapter_ids=None):
        """The depthwise kernel's update (`branch`'s arguments, for
        `DEPTHWISE_PAIR`): as `LoRADepthwiseConv2D`'s branch."""
        x = self.lora_dropout(inputs, training)
        return depthwise_update(self, x, a, b, adapter_ids)

    def branch(self, inputs, a, b, training=None, adapter_ids=None):
        """The pointwise kernel's update on the (adapted) depthwise output:
        `(dropout(h) @ A) @ sB` over the channel axis."""
        x = _channels_last(self.lora_dropout(inputs, training), self)
        d, r = a.shape[-2], a.shape[-1]
        if adapter_ids is None:
            out = low_rank_matmul(x, ops.reshape(a, (d, r)), b)
        else:
            n = a.shape[0]
            # (n, ..., d, r) -> (d, n * r): one matmul for every adapter.
            a = ops.reshape(
                ops.moveaxis(ops.reshape(a, (n, d, r)), 0, 1), (d, n * r)
            )
            h = ops.matmul(x, a)
            lead = tuple(ops.shape(h)[:-1])
            h = ops.reshape(h, lead + (n, r))
            pick = ops.one_hot(ops.cast(adapter_ids, "int32"), n, dtype=h.dtype)
            h = ops.einsum("b...nr,bn->b...r", h, pick)
            b = ops.take(b, adapter_ids, axis=0)
            out = ops.einsum("b...r,brf->b...f", h, b)
        return _layer_format(out, self)

    def weight_deltas(self):
        s = self.scaling
        pointwise = ops.tensordot(self.lora_a, self.lora_b, axes=1)
        depthwise = ops.tensordot(
            self.depthwise_lora_a, self.depthwise_lora_b, axes=1
        )
        return {
            "depthwise_kernel": ops.multiply(depthwise, s),
            "pointwise_kernel": ops.multiply(pointwise, s),
        }


_DEPTHWISE_DOC = """
    The depthwise kernel W, `kernel_size + (channels, depth_multiplier)`,
    is read as a `prod(kernel_size) x (channels * depth_multiplier)` matrix
    and adapted as `W + s * A @ B` (Hu et al. 2021, arXiv:2106.09685,
    eq. 3), the reading `LoRAConv2D` gives the grouped convolution with
    `groups = channels` that a depthwise convolution is. `lora_a`,
    `kernel_size + (rank,)`, holds `rank` spatial filters shared by every
    channel; `lora_b`, `(rank, channels, depth_multiplier)`, mixes them for
    each output channel. The layer computes `depthwise_conv(x, W) +
    s * B(depthwise_conv(dropout(x), A))`, A's filters run on every channel
    with the base layer's strides, padding and dilation, then bias and
    activation as the base layer does; the merged kernel
    `W + s * tensordot(A, B)` has exactly the base kernel's shape for both
    data formats. The adapter holds `(prod(kernel_size) + channels *
    depth_multiplier) * rank` numbers, fewer than the kernel's only while
    `rank < prod(kernel_size)` or so: depthwise kernels are small, take a
    small rank (1 to 4, e.g. with `rank_pattern`). PEFT has no depthwise
    LoRA.

    `kernel_size`, `strides`, `padding`, `depth_multiplier`,
    `data_format`, `dilation_rate`, `activation`, `use_bias`,
    `depthwise_initializer`, `bias_initializer`, `depthwise_regularizer`,
    `bias_regularizer`, `activity_regularizer`, `depthwise_constraint` and
    `bias_constraint` are as in `keras.layers.{base}`; the LoRA
    arguments (`rank`, `alpha`, `dropout`, `use_rslora`,
    `lora_a_initializer`, `lora_b_initializer`, `train_bias`, `init`,
    `use_dora`) are as in `keras_lora.LoRADense`.

    Args:
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).
"""

_SEPARABLE_DOC = """
    Both kernels are adapted. The depthwise kernel
    `kernel_size + (channels, depth_multiplier)` as in
    `keras_lora.LoRADepthwiseConv2D` (`depthwise_lora_a`,
    `kernel_size + (rank,)`; `depthwise_lora_b`,
    `(rank, channels, depth_multiplier)`); the pointwise kernel, a 1x1
    convolution read as a `(channels * depth_multiplier) x filters` matrix,
    as a Dense kernel (`lora_a`, `(1,) * k + (channels * depth_multiplier,
    rank)`; `lora_b`, `(rank, filters)`). With the adapted depthwise output
    `h = depthwise_conv(x, W_d) + s * B_d(depthwise_conv(dropout(x), A_d))`
    the layer computes `h @ W_p + s * (dropout(h) @ A_p) @ B_p`, then bias
    and activation as the base layer does: exactly the separable
    convolution with the merged kernels `W_d + s * tensordot(A_d, B_d)`
    and `W_p + s * tensordot(A_p, B_p)`, each of its base kernel's shape
    (Hu et al. 2021, arXiv:2106.09685, eq. 3, for each kernel). Merged in
    place, the layer runs Keras's own separable convolution. PEFT has no
    separable LoRA.

    `filters`, `kernel_size`, `strides`, `padding`, `data_format`,
    `dilation_rate`, `depth_multiplier`, `activation`, `use_bias`,
    `depthwise_initializer`, `pointwise_initializer`, `bias_initializer`,
    `depthwise_regularizer`, `pointwise_regularizer`, `bias_regularizer`,
    `activity_regularizer`, `depthwise_constraint`,
    `pointwise_constraint` and `bias_constraint` are as in
    `keras.layers.{base}`; the LoRA arguments (`rank`, `alpha`,
    `dropout`, `use_rslora`, `lora_a_initializer`, `lora_b_initializer`,
    `train_bias`, `init`, `use_dora`) are as in `keras_lora.LoRADense`;
    `rank` and `alpha` apply to both kernels (and `use_dora`: each kernel
    has its magnitude).

    Args:
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).
"""


@keras.saving.register_keras_serializable(package="keras_lora")
@format_docstring(depthwise=_DEPTHWISE_DOC.replace("{base}", "DepthwiseConv1D"))
class LoRADepthwiseConv1D(LoRADepthwiseConvMixin, keras.layers.DepthwiseConv1D):
    """A `DepthwiseConv1D` layer whose frozen kernel is adapted by LoRA.
    {depthwise}
    Input shape:
        3D tensor `(batch, steps, channels)` (channels_last) or
        `(batch, channels, steps)` (channels_first).

    Output shape:
        As `keras.layers.DepthwiseConv1D`, in the compute dtype.

    Raises:
        ValueError: a LoRA argument is invalid (see `LoRADense`).

    Examples:
        >>> import numpy as np
        >>> import keras_lora
        >>> layer = keras_lora.LoRADepthwiseConv1D(3, rank=2)
        >>> tuple(layer(np.ones((1, 7, 4), "float32")).shape)
        (1, 5, 4)
        >>> tuple(layer.lora_a.shape), tuple(layer.lora_b.shape)
        ((3, 2), (2, 4, 1))
    """

    base_class = keras.layers.DepthwiseConv1D

    def __init__(
        self,
        kernel_size,
        strides=1,
        padding="valid",
        depth_multiplier=1,
        data_format=None,
        dilation_rate=1,
        activation=None,
        use_bias=True,
        depthwise_initializer="glorot_uniform",
        bias_initializer="zeros",
        depthwise_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        depthwise_constraint=None,
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
            kernel_size,
            strides=strides,
            padding=padding,
            depth_multiplier=depth_multiplier,
            data_format=data_format,
            dilation_rate=dilation_rate,
            activation=activation,
            use_bias=use_bias,
            depthwise_initializer=depthwise_initializer,
            bias_initializer=bias_initializer,
            depthwise_regularizer=depthwise_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            depthwise_constraint=depthwise_constraint,
            bias_constraint=bias_constraint,
            **kwargs,
        )
        self.init_lora(lora)


@keras.saving.register_keras_serializable(package="keras_lora")
@format_docstring(depthwise=_DEPTHWISE_DOC.replace("{base}", "DepthwiseConv2D"))
class LoRADepthwiseConv2D(LoRADepthwiseConvMixin, keras.layers.DepthwiseConv2D):
    """A `DepthwiseConv2D` layer whose frozen kernel is adapted by LoRA.
    {depthwise}
    Input shape:
        4D tensor `(batch, rows, cols, channels)` (channels_last) or
        `(batch, channels, rows, cols)` (channels_first).

    Output shape:
        As `keras.layers.DepthwiseConv2D`, in the compute dtype.

    Raises:
        ValueError: a LoRA argument is invalid (see `LoRADense`).

    Examples:
        >>> import numpy as np
        >>> import keras_lora
        >>> layer = keras_lora.LoRADepthwiseConv2D(3, depth_multiplier=2,
        ...                                        rank=2)
        >>> tuple(layer(np.ones((1, 7, 7, 4), "float32")).shape)
        (1, 5, 5, 8)
        >>> tuple(layer.lora_a.shape), tuple(layer.lora_b.shape)
        ((3, 3, 2), (2, 4, 2))
    """

    base_class = keras.layers.DepthwiseConv2D

    def __init__(
        self,
        kernel_size,
        strides=(1, 1),
        padding="valid",
        depth_multiplier=1,
        data_format=None,
        dilation_rate=(1, 1),
        activation=None,
        use_bias=True,
        depthwise_initializer="glorot_uniform",
        bias_initializer="zeros",
        depthwise_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        depthwise_constraint=None,
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
            kernel_size,
            strides=strides,
            padding=padding,
            depth_multiplier=depth_multiplier,
            data_format=data_format,
            dilation_rate=dilation_rate,
            activation=activation,
            use_bias=use_bias,
            depthwise_initializer=depthwise_initializer,
            bias_initializer=bias_initializer,
            depthwise_regularizer=depthwise_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            depthwise_constraint=depthwise_constraint,
            bias_constraint=bias_constraint,
            **kwargs,
        )
        self.init_lora(lora)


@keras.saving.register_keras_serializable(package="keras_lora")
@format_docstring(separable=_SEPARABLE_DOC.replace("{base}", "SeparableConv1D"))
class LoRASeparableConv1D(LoRASeparableConvMixin, keras.layers.SeparableConv1D):
    """A `SeparableConv1D` layer whose frozen kernels are adapted by LoRA.
    {separable}
    Input shape:
        3D tensor `(batch, steps, channels)` (channels_last) or
        `(batch, channels, steps)` (channels_first).

    Output shape:
        As `keras.layers.SeparableConv1D`, in the compute dtype.

    Raises:
        ValueError: a LoRA argument is invalid (see `LoRADense`).

    Examples:
        >>> import numpy as np
        >>> import keras_lora
        >>> layer = keras_lora.LoRASeparableConv1D(6, 3, rank=2)
        >>> tuple(layer(np.ones((1, 7, 4), "float32")).shape)
        (1, 5, 6)
        >>> tuple(layer.lora_a.shape), tuple(layer.depthwise_lora_b.shape)
        ((1, 4, 2), (2, 4, 1))
    """

    base_class = keras.layers.SeparableConv1D

    def __init__(
        self,
        filters,
        kernel_size,
        strides=1,
        padding="valid",
        data_format=None,
        dilation_rate=1,
        depth_multiplier=1,
        activation=None,
        use_bias=True,
        depthwise_initializer="glorot_uniform",
        pointwise_initializer="glorot_uniform",
        bias_initializer="zeros",
        depthwise_regularizer=None,
        pointwise_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        depthwise_constraint=None,
        pointwise_constraint=None,
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
            depth_multiplier=depth_multiplier,
            activation=activation,
            use_bias=use_bias,
            depthwise_initializer=depthwise_initializer,
            pointwise_initializer=pointwise_initializer,
            bias_initializer=bias_initializer,
            depthwise_regularizer=depthwise_regularizer,
            pointwise_regularizer=pointwise_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            depthwise_constraint=depthwise_constraint,
            pointwise_constraint=pointwise_constraint,
            bias_constraint=bias_constraint,
            **kwargs,
        )
        self.init_lora(lora)


@keras.saving.register_keras_serializable(package="keras_lora")
@format_docstring(separable=_SEPARABLE_DOC.replace("{base}", "SeparableConv2D"))
class LoRASeparableConv2D(LoRASeparableConvMixin, keras.layers.SeparableConv2D):
    """A `SeparableConv2D` layer whose frozen kernels are adapted by LoRA.
    {separable}
    Input shape:
        4D tensor `(batch, rows, cols, channels)` (channels_last) or
        `(batch, channels, rows, cols)` (channels_first).

    Output shape:
        As `keras.layers.SeparableConv2D`, in the compute dtype.

    Raises:
        ValueError: a LoRA argument is invalid (see `LoRADense`).

    Examples:
        >>> import numpy as np
        >>> import keras_lora
        >>> layer = keras_lora.LoRASeparableConv2D(6, 3, rank=2)
        >>> tuple(layer(np.ones((1, 7, 7, 4), "float32")).shape)
        (1, 5, 5, 6)
        >>> tuple(layer.lora_a.shape), tuple(layer.depthwise_lora_b.shape)
        ((1, 1, 4, 2), (2, 4, 1))
    """

    base_class = keras.layers.SeparableConv2D

    def __init__(
        self,
        filters,
        kernel_size,
        strides=(1, 1),
        padding="valid",
        data_format=None,
        dilation_rate=(1, 1),
        depth_multiplier=1,
        activation=None,
        use_bias=True,
        depthwise_initializer="glorot_uniform",
        pointwise_initializer="glorot_uniform",
        bias_initializer="zeros",
        depthwise_regularizer=None,
        pointwise_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        depthwise_constraint=None,
        pointwise_constraint=None,
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
            depth_multiplier=depth_multiplier,
            activation=activation,
            use_bias=use_bias,
            depthwise_initializer=depthwise_initializer,
            pointwise_initializer=pointwise_initializer,
            bias_initializer=bias_initializer,
            depthwise_regularizer=depthwise_regularizer,
            pointwise_regularizer=pointwise_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            depthwise_constraint=depthwise_constraint,
            pointwise_constraint=pointwise_constraint,
            bias_constraint=bias_constraint,
            **kwargs,
        )
        self.init_lora(lora)
