"""LoRADense: `keras.layers.Dense` with a low-rank adapter."""

import keras
from keras import ops

from keras_lora.layers.base import LoRALayer
from keras_lora.layers.base import low_rank_matmul
from keras_lora.layers.config import layer_config


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRADense(LoRALayer, keras.layers.Dense):
    """A `Dense` layer whose frozen kernel is adapted by LoRA.

    Computes `activation(x @ W + s * (dropout(x) @ A) @ B + bias)` with the
    frozen kernel `W` (d_in, units), trainable float32 factors
    `lora_a` = A (d_in, rank) and `lora_b` = B (rank, units), and
    `s = alpha / rank` (`alpha / sqrt(rank)` with `use_rslora=True`).
    This is eq. 3 of Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
    Language Models" (arXiv:2106.09685), in Keras's `x @ W` orientation.
    `A @ B` is never formed in the forward pass. B starts at zero, so a new
    layer computes exactly what the plain `Dense` computes.

    `activation`, `use_bias`, `kernel_initializer`, `bias_initializer`,
    `kernel_regularizer`, `bias_regularizer`, `activity_regularizer`,
    `kernel_constraint` and `bias_constraint` are as in
    `keras.layers.Dense`. The LoRA arguments (`rank`, `alpha`, `dropout`,
    `use_rslora`, `lora_a_initializer`, `lora_b_initializer`,
    `train_bias`, `init`, `use_dora`) are keyword-only, validated together
    as a `keras_lora.layers.config.LoRAConfig`.

    Args:
        units: Positive integer, dimensionality of the output space.
        rank: Positive int, the rank r of the update. Defaults to `8`.
        alpha: Positive float or `None`, the LoRA alpha. `None` (default)
            means `alpha = rank` (scaling 1.0).
        dropout: Float in [0, 1), dropout on the LoRA branch's input, in
            training only. Defaults to `0.0` (skipped).
        use_rslora: Bool, scale by `alpha / sqrt(rank)` (rsLoRA,
            arXiv:2312.03732). Defaults to `False`.
        lora_a_initializer: Initializer for A, or `None` (default) for the
            class's `default_lora_a_initializer`, `"he_uniform"`.
        lora_b_initializer: Initializer for B. Defaults to `"zeros"`.
        train_bias: Bool, keep the bias trainable (PEFT's `bias="all"`).
            Defaults to `False`: only A and B train.
        init: Str, how the adapter starts. `"default"`: A from
            `lora_a_initializer`, B from `lora_b_initializer`.
            `"gaussian"`: A ~ N(0, (1/rank)^2), B = 0 (PEFT's
            `"gaussian"`). `"pissa"` (PiSSA, arXiv:2404.02948: A and B from
            the top-`rank` singular vectors of the kernel) or `"olora"`
            (OLoRA, arXiv:2406.01775: from its QR decomposition): the layer
            then computes with the residual `W - s * A0 @ B0` in a new
            frozen variable (one kernel copy), so its output at init is the
            base output up to float32 rounding
            (`keras_lora.layers.inits`). Defaults to `"default"`.
        use_dora: Bool, DoRA (Liu et al. 2024, arXiv:2402.09353): the
            adapted kernel is `m * (W + s * A @ B) / ||W + s * A @ B||`,
            the norm per output unit over the input axis, with a trainable
            float32 magnitude `lora_magnitude` (`(units,)`) that starts at
            `||W||`. Defaults to `False`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        N-D tensor `(batch_size, ..., input_dim)`, any float dtype.

    Output shape:
        N-D tensor `(batch_size, ..., units)` in the layer's compute dtype.

    Raises:
        ValueError: `rank` not a positive int (bools refused), `alpha` not a
            positive number, `dropout` outside [0, 1), `lora_rank` given,
            `init` unknown or combined with an initializer it replaces, or
            (`"pissa"`/`"olora"`, at build) `rank > min(input_dim, units)`.
        TypeError: `use_rslora`, `train_bias` or `use_dora` not a bool.

    A rank larger than `min(input_dim, units)` is allowed and warns that it
    gives no compression. Adapters are float32 under every dtype policy.

    Examples:
        >>> import numpy as np
        >>> import keras_lora
        >>> layer = keras_lora.LoRADense(4, rank=2, alpha=4)
        >>> tuple(layer(np.ones((2, 3), "float32")).shape)
        (2, 4)
        >>> [w.name for w in layer.trainable_weights]
        ['lora_a', 'lora_b']
    """

    base_class = keras.layers.Dense

    def __init__(
        self,
        units,
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
            units,
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

    def build(self, input_shape):
        super().build(input_shape)
        self.build_lora()

    def lora_shapes(self):
        # (An int4 kernel is stored packed: its second axis is not `units`.)
        d_in, units = self.base_weights()["kernel"].shape[0], self.units
        return [
            (
                "lora_a",
                "lora_b",
                (d_in, self.adapter_rank),
                (self.adapter_rank, units),
            )
        ]

    def call(self, inputs, training=None):
        x = self.base_product(inputs, lambda: ops.matmul(inputs, self.kernel))
        x = self.apply_adapter(x, inputs, training)
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def branch(self, inputs, a, b, training=None, adapter_ids=None):
        x = self.lora_dropout(inputs, training)
        if adapter_ids is None:
            return low_rank_matmul(x, a, b)
        a, b = (
            ops.take(a, adapter_ids, axis=0),
            ops.take(b, adapter_ids, axis=0),
        )
        h = ops.einsum("b...i,bir->b...r", ops.cast(x, a.dtype), a)
        return ops.einsum("b...r,bro->b...o", h, b)

    def weight_deltas(self):
        delta = ops.matmul(self.lora_a, self.lora_b)
        return {"kernel": ops.multiply(delta, self.scaling)}
