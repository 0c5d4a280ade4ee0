"""LoRAEmbedding and LoRAReversibleEmbedding."""

import keras
from keras import ops

from keras_lora._keras_private import set_keras_mask
from keras_lora.layers.base import LoRALayer
from keras_lora.layers.base import format_docstring
from keras_lora.layers.base import low_rank_matmul
from keras_lora.layers.config import layer_config


class _EmbeddingLoRA(LoRALayer):
    """Constructor and lookup shared by the two embedding layers."""

    # He init over a large vocabulary gives B almost no gradient.
    default_lora_a_initializer = "normal"

    def __init__(
        self,
        input_dim,
        output_dim,
        *args,
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
        # Keras builds the layer in its constructor when given `weights`;
        # the adapter must exist first, so the base weights are set here.
        weights = kwargs.pop("weights", None)
        super().__init__(input_dim, output_dim, *args, **kwargs)
        self.init_lora(lora)
        if weights is not None:
            self.build()
            self.set_base_weights(weights)

    def set_base_weights(self, weights):
        """Sets the base table(s) as Keras's `weights=` argument does: one
        array, or a list with one array per base weight (`embeddings`, then
        `reverse_embeddings` if untied). The adapters are left as they are.
        """
        base = list(self.base_weights().values())
        shapes = [tuple(v.shape) for v in base]
        if not isinstance(weights, list | tuple):
            weights = [weights]
        given = [tuple(getattr(w, "shape", ())) for w in weights]
        if len(weights) != len(base):
            raise ValueError(
                f"`weights` must hold {len(base)} array(s), the base weights "
                f"of layer '{self.name}' of shapes {shapes}. Received: "
                f"{len(weights)} arrays of shapes {given}"
            )
        if given != shapes:
            raise ValueError(
                f"`weights` must hold arrays of shapes {shapes} (the base "
                f"weights of layer '{self.name}'). Received: shapes {given}"
            )
        for variable, value in zip(base, weights, strict=True):
            variable.assign(value)

    def build(self, input_shape=None):
        if self.built:
            return
        super().build(input_shape)
        self.build_lora()

    def lora_shapes(self):
        r = self.adapter_rank
        return [("lora_a", "lora_b", (self.input_dim, r), (r, self.output_dim))]

    @classmethod
    def adapted_dims(cls, layer):
        dims = [(layer.input_dim, layer.output_dim)]
        if not getattr(layer, "tie_weights", True):
            dims.append((layer.output_dim, layer.input_dim))
        return dims

    def embed(self, inputs, training):
        if inputs.dtype != "int32" and inputs.dtype != "int64":
            inputs = ops.cast(inputs, "int32")
        outputs = self.base_product(
            inputs,
            lambda: ops.cast(
                ops.take(self.embeddings, inputs, axis=0), self.compute_dtype
            ),
        )
        return self.apply_adapter(outputs, inputs, training)

    def branch(self, inputs, a, b, training=None, adapter_ids=None):
        """`A[ids] @ sB`: the adapter's rows for the looked-up tokens.

        Dropout on the branch input (a one-hot token) drops whole tokens,
        so the mask has one value per token (noise shape `(..., 1)`). With
        `adapter_ids`, each example's rows come from its own adapter's A
        (one lookup in the stacked tables, never a per-example copy).
        """
        tokens = ops.cast(inputs, "int32")
        if adapter_ids is None:
            rows = ops.take(a, tokens, axis=0)
            if hasattr(rows, "flat_values"):
                # A tf.RaggedTensor of ids (Keras's Embedding returns one):
                # the per-token math runs on its flat values.
                flat = self._dropped_tokens(rows.flat_values, training)
                return rows.with_flat_values(ops.matmul(flat, b))
            return ops.matmul(self._dropped_tokens(rows, training), b)
        n, vocab, r = a.shape
        offsets = ops.reshape(
            ops.multiply(ops.cast(adapter_ids, "int32"), vocab),
            (-1,) + (1,) * (len(tokens.shape) - 1),
        )
        rows = ops.take(
            ops.reshape(a, (n * vocab, r)), ops.add(tokens, offsets), axis=0
        )
        rows = self._dropped_tokens(rows, training)
        b = ops.take(b, adapter_ids, axis=0)
        return ops.einsum("b...r,bro->b...o", rows, b)

    def _dropped_tokens(self, rows, training):
        """Branch dropout of whole tokens (noise shape `(..., 1)`)."""
        noise_shape = tuple(ops.shape(rows)[:-1]) + (1,)
        return self.lora_dropout(rows, training, noise_shape=noise_shape)

    def weight_deltas(self):
        delta = ops.matmul(self.lora_a, self.lora_b)
        return {"embeddings": ops.multiply(delta, self.scaling)}


_EMBEDDING_DOC = """

    Follows PEFT's `Embedding` LoRA: the table E (input_dim, output_dim) is
    adapted as `E + s * A @ B` with `lora_a` = A (input_dim, rank) and
    `lora_b` = B (rank, output_dim), float32. The lookup computes
    `E[ids] + s * A[ids] @ B`, never `A @ B` (Hu et al. 2021,
    arXiv:2106.09685, eq. 3, with the input a one-hot row). B starts at
    zero, so a new adapter leaves the output unchanged; A starts from
    `"normal"` (stddev 0.05), since `"he_uniform"` over a large vocabulary
    gives B almost no gradient. Dropout, when set, drops whole
    tokens of the branch in training.

    Args:
        input_dim, output_dim, embeddings_initializer, embeddings_regularizer,
            embeddings_constraint, mask_zero: as in the Keras base layer.
        rank, alpha, dropout, use_rslora, train_bias, init, use_dora: as
            in
            `keras_lora.LoRADense`.
        lora_a_initializer: Initializer for A, or `None` (default) for the
            class's `default_lora_a_initializer`, `"normal"`.
        lora_b_initializer: Initializer for B. Defaults to `"zeros"`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        Integer tensor `(batch_size, ...)` of token ids.

    Output shape:
        `(batch_size, ..., output_dim)` in the compute dtype. With
        `mask_zero=True` the mask is exactly the base layer's.

    Raises:
        ValueError: a LoRA argument is invalid (see `LoRADense`).
"""


@keras.saving.register_keras_serializable(package="keras_lora")
@format_docstring(embedding=_EMBEDDING_DOC)
class LoRAEmbedding(_EmbeddingLoRA, keras.layers.Embedding):
    """An `Embedding` layer whose frozen table is adapted by LoRA.
    {embedding}
    Examples:
        >>> import numpy as np
        >>> import keras_lora
        >>> layer = keras_lora.LoRAEmbedding(50, 8, rank=2, mask_zero=True)
        >>> tuple(layer(np.array([[1, 2, 0]])).shape)
        (1, 3, 8)
    """

    base_class = keras.layers.Embedding

    def call(self, inputs, training=None):
        return self.embed(inputs, training)


@keras.saving.register_keras_serializable(package="keras_lora")
@format_docstring(embedding=_EMBEDDING_DOC)
class LoRAReversibleEmbedding(_EmbeddingLoRA, keras.layers.ReversibleEmbedding):
    """A `ReversibleEmbedding` (keras-hub's token embedding) with LoRA.
    {embedding}
    The reverse projection (`reverse=True`, the logits of a causal LM)
    includes the adapter: with tied weights it computes
    `x @ E.T + s * (x @ B.T) @ A.T`, so merged and unmerged logits agree;
    with untied weights the reverse table R (output_dim, input_dim) gets its
    own pair `reverse_lora_a` (output_dim, rank) and `reverse_lora_b`
    (rank, input_dim): `x @ R + s * (x @ A_r) @ B_r`. `reverse_dtype` and
    `logit_soft_cap` apply as in the base layer.

    Examples:
        >>> import numpy as np
        >>> import keras_lora
        >>> layer = keras_lora.LoRAReversibleEmbedding(50, 8, rank=2)
        >>> tuple(layer(np.ones((1, 8), "float32"), reverse=True).shape)
        (1, 50)
    """

    base_class = keras.layers.ReversibleEmbedding

    def lora_shapes(self):
        shapes = super().lora_shapes()
        if not self.tie_weights:
            r = self.adapter_rank
            shapes.append(
                (
                    "reverse_lora_a",
                    "reverse_lora_b",
                    (self.output_dim, r),
                    (r, self.input_dim),
                )
            )
        return shapes

    def call(self, inputs, reverse=False, training=None):
        if not reverse:
            result = self.embed(inputs, training)
            mask = keras.layers.Embedding.compute_mask(self, inputs)
            if mask is not None:
                set_keras_mask(result, mask)
            return result
        x = inputs

        def reverse_product():
            kernel = (
                ops.transpose(self.embeddings)
                if self.tie_weights
                else self.reverse_embeddings
            )
            if self.reverse_dtype is not None:
                kernel = ops.cast(kernel, self.reverse_dtype)
            return ops.matmul(x, kernel)

        if self.reverse_dtype is not None:
            x = ops.cast(x, self.reverse_dtype)
        if self.tie_weights and self.dora_active():
            # DoRA scales the table's columns, the reverse projection's
            # input features: logits = (x * g) @ (E + s * A @ B)^T.
            factors, scale = self.dora_factors()
            x = self.scale_units(x, scale)
            logits = self.base_product(x, reverse_product, reverse=True)
            delta = self.reverse_branch(x, *factors, training)
            logits = ops.add(logits, delta)
        elif self.tie_weights:
            scale = self.dora_output_scale()  # in a mixed batch
            if scale is not None:
                x = self.scale_units(x, *scale)
            logits = self.base_product(x, reverse_product, reverse=True)
            delta = self.adapter_delta(
                x, training, self.reverse_pair(), self.reverse_branch
            )
            if delta is not None:
                logits = ops.add(logits, delta)
        else:
            logits = self.apply_adapter(
                self.base_product(x, reverse_product, reverse=True),
                x,
                training,
                self.reverse_pair(),
                self.reverse_branch,
            )
        if self.logit_soft_cap is not None:
            cap = self.logit_soft_cap
            logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
        return logits

    def reverse_pair(self):
        """The adapter pair of the reverse projection: the tied table's
        (`lora_a`, `lora_b`) or the untied one's own."""
        if self.tie_weights:
            return "lora_a", "lora_b"
        return "reverse_lora_a", "reverse_lora_b"

    def reverse_branch(self, x, a, b, training=None, adapter_ids=None):
        """The reverse projection's update from given factors (`branch`'s
        arguments, for `reverse_pair()`): `(x @ sB.T) @ A.T` with tied
        weights, else `(x @ A_r) @ sB_r`."""
        x = self.lora_dropout(x, training)
        if adapter_ids is not None:
            a = ops.take(a, adapter_ids, axis=0)
            b = ops.take(b, adapter_ids, axis=0)
        a, b = ops.cast(a, x.dtype), ops.cast(b, x.dtype)
        if adapter_ids is None:
            if self.tie_weights:
                a, b = ops.transpose(b), ops.transpose(a)
            return low_rank_matmul(x, a, b)
        if self.tie_weights:
            h = ops.einsum("b...d,brd->b...r", x, b)
            return ops.einsum("b...r,bvr->b...v", h, a)
        h = ops.einsum("b...d,bdr->b...r", x, a)
        return ops.einsum("b...r,brv->b...v", h, b)

    def weight_deltas(self):
        deltas = super().weight_deltas()
        if not self.tie_weights:
            delta = ops.matmul(self.reverse_lora_a, self.reverse_lora_b)
            deltas["reverse_embeddings"] = ops.multiply(delta, self.scaling)
        return deltas
