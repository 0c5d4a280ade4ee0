"""LoRAEinsumDense: the equations keras-hub uses, against the NumPy oracle."""

import math

import keras
import numpy as np
import pytest
import reference as ref
from numerics import assert_close
from numerics import assert_exact

import keras_lora as kl
from keras_lora.layers.einsum_dense import factor_equation


def np_(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def set_adapters(layer, rng, scale=0.5):
    for w in layer.adapter_weights().values():
        w.assign(rng.normal(size=w.shape).astype("float32") * scale)


# (id, equation, output_shape, bias_axes, input shape, A shape, B shape)
EQUATIONS = [
    # Gemma attention (keras_hub CachedGemmaAttention).
    (
        "gemma_query",
        "btd,ndh->btnh",
        (None, 2, 4),
        None,
        (2, 3, 8),
        (8, 2),
        (2, 8),
    ),
    (
        "gemma_output",
        "btnh,nhd->btd",
        (None, 8),
        None,
        (2, 3, 2, 4),
        (8, 2),
        (2, 8),
    ),
    # Gemma feed-forward (GemmaDecoderBlock gating / linear).
    (
        "gemma_ffw_gating",
        "btd,df->btf",
        (None, 16),
        None,
        (2, 3, 8),
        (8, 2),
        (2, 16),
    ),
    (
        "gemma_ffw_linear",
        "btf,fd->btd",
        (None, 8),
        None,
        (2, 3, 16),
        (16, 2),
        (2, 8),
    ),
    # Llama attention (keras_hub LlamaAttention).
    (
        "llama_query",
        "bqm,muh->bquh",
        (None, 2, 4),
        None,
        (2, 3, 8),
        (8, 2),
        (2, 8),
    ),
    (
        "llama_key",
        "bkm,mvh->bkvh",
        (None, 1, 4),
        None,
        (2, 3, 8),
        (8, 2),
        (2, 4),
    ),
    (
        "llama_output",
        "bquh,uhm->bqm",
        (None, 8),
        None,
        (2, 3, 2, 4),
        (8, 2),
        (2, 8),
    ),
    # BERT attention (keras MultiHeadAttention inside TransformerEncoder).
    (
        "bert_qkv",
        "abc,cde->abde",
        (None, 2, 4),
        "de",
        (2, 3, 8),
        (8, 2),
        (2, 8),
    ),
    (
        "bert_output",
        "abcd,cde->abe",
        (None, 8),
        "e",
        (2, 3, 2, 4),
        (8, 2),
        (2, 8),
    ),
    # Ellipsis equations.
    ("ellipsis", "...b,bc->...c", (6,), "c", (2, 3, 4), (4, 2), (2, 6)),
    (
        "ellipsis_2d",
        "...ab,bc->...ac",
        (None, 6),
        None,
        (2, 3, 4),
        (4, 2),
        (2, 6),
    ),
    ("matrix", "ab,bc->ac", (6,), "c", (2, 4), (4, 2), (2, 6)),
    # Layouts that are not `x.reshape(..., d_in) @ A @ B` (einsum branch):
    # output axes moved before the sequence axis, contracted axis not last,
    # contracted axes in the kernel in another order than in the input.
    (
        "heads_first",
        "btd,ndh->bnth",
        (2, None, 4),
        None,
        (2, 3, 8),
        (8, 2),
        (2, 8),
    ),
    (
        "contract_middle",
        "bdt,dh->bth",
        (None, 6),
        "h",
        (2, 8, 3),
        (8, 2),
        (2, 6),
    ),
    (
        "kernel_axes_swapped",
        "btnh,hnd->btd",
        (None, 8),
        None,
        (2, 3, 2, 4),
        (8, 2),
        (2, 8),
    ),
]

#: The cases whose LoRA branch is two einsums instead of two 2-D matmuls.
EINSUM_BRANCH = {"heads_first", "contract_middle", "kernel_axes_swapped"}


@pytest.mark.parametrize("case", EQUATIONS, ids=[c[0] for c in EQUATIONS])
def test_einsum_matches_oracle(rng, case):
    _, equation, output_shape, bias_axes, x_shape, a_shape, b_shape = case
    # Half of the cases also check the activation path.
    activation = "relu" if EQUATIONS.index(case) % 2 else None
    layer = kl.LoRAEinsumDense(
        equation,
        output_shape,
        bias_axes=bias_axes,
        activation=activation,
        bias_initializer="random_normal",
        rank=2,
        alpha=3,
    )
    x = rng.normal(size=x_shape).astype("float32")
    base_out = np_(layer(x))
    assert layer.lora_as_matmul == (case[0] not in EINSUM_BRANCH)
    assert tuple(layer.lora_a.shape) == a_shape
    assert tuple(layer.lora_b.shape) == b_shape
    bias = np_(layer.bias) if bias_axes else None
    # Fresh adapter: exactly the base computation.
    assert_close(
        base_out,
        ref.einsum_dense(
            equation,
            x,
            np_(layer.kernel),
            bias,
            None,
            None,
            activation=activation,
        ),
    )
    set_adapters(layer, rng)
    expected = ref.einsum_dense(
        equation,
        x,
        np_(layer.kernel),
        bias,
        np_(layer.lora_a),
        np_(layer.lora_b),
        1.5,
        activation,
    )
    assert_close(np_(layer(x)), expected)
    merged = layer.merge()
    assert type(merged) is keras.layers.EinsumDense
    assert tuple(merged.kernel.shape) == tuple(layer.kernel.shape)
    assert_close(np_(merged(x)), expected)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_einsum_scaling_and_deltas(rng, use_rslora):
    layer = kl.LoRAEinsumDense(
        "btd,ndh->btnh", (None, 4, 3), rank=4, alpha=2, use_rslora=use_rslora
    )
    layer(rng.normal(size=(1, 2, 6)).astype("float32"))
    set_adapters(layer, rng)
    s = ref.scaling(4, 2, use_rslora)
    assert layer.scaling == pytest.approx(s)
    delta = np_(layer.weight_deltas()["kernel"])
    assert delta.shape == (4, 6, 3)
    assert_close(
        delta,
        ref.einsum_delta(
            "btd,ndh->btnh", (4, 6, 3), np_(layer.lora_a), np_(layer.lora_b), s
        ),
    )


def test_gemma_query_parameter_count():
    """PEFT's factorization (all input axes x all output axes): for a
    Gemma2-2B-shaped query (d=2304, 8 heads x 256), rank 4 gives
    4 * (2304 + 2048) adapter numbers, not Keras's last-axis split."""
    in_axes, out_axes, eq_a, eq_b = factor_equation("btd,ndh->btnh")[:4]
    assert in_axes == ("d",) and out_axes == ("n", "h")
    layer = kl.LoRAEinsumDense("btd,ndh->btnh", (None, 8, 256), rank=4)
    layer.build((None, None, 2304))
    counts = [math.prod(w.shape) for w in layer.trainable_weights]
    assert sum(counts) == 4 * (2304 + 8 * 256)


@pytest.mark.parametrize(
    "equation",
    [
        "ab,abc->ac",  # batched kernel: 'a' contracted and kept
        "ab,b->a",  # no output axis in the kernel
        "abc,cd",  # no '->'
        "abc->abd",  # no kernel
    ],
)
def test_refused_equations_name_the_equation(equation):
    with pytest.raises(ValueError, match="equation") as info:
        kl.LoRAEinsumDense(equation, (4,), rank=2)
    assert repr(equation) in str(info.value)


def test_bert_from_layer_matches_oracle(rng):
    """A real keras-hub BERT projection (built EinsumDense) wrapped by
    from_layer: merged == unmerged == oracle."""
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=30,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=6,
    )
    attention = backbone.get_layer("transformer_layer_0")._self_attention_layer
    query = attention._query_dense
    assert query.equation == "abc,cde->abde"
    lora = kl.LoRAEinsumDense.from_layer(query, rank=2, alpha=4)
    assert lora.kernel is query.kernel
    x = rng.normal(size=(2, 6, 8)).astype("float32")
    assert_exact(np_(lora(x)), np_(query(x)))
    set_adapters(lora, rng)
    expected = ref.einsum_dense(
        "abc,cde->abde",
        x,
        np_(query.kernel),
        np_(query.bias),
        np_(lora.lora_a),
        np_(lora.lora_b),
        2.0,
    )
    assert_close(np_(lora(x)), expected)
    assert_close(np_(lora.merge()(x)), expected)


def test_matmul_branch_with_unknown_batch_and_sequence(rng):
    """The 2-D matmul branch reshapes with the input's run-time leading
    shape: a compiled Functional attention projection pair with unknown
    batch and sequence axes gives the oracle's values for two different
    input shapes (one traced graph per shape on every backend)."""
    inputs = keras.Input(shape=(None, 8))
    query = kl.LoRAEinsumDense("btd,ndh->btnh", (None, 2, 4), rank=2)
    output = kl.LoRAEinsumDense("btnh,nhd->btd", (None, 8), rank=3)
    model = keras.Model(inputs, output(query(inputs)))
    for layer in (query, output):
        set_adapters(layer, rng)
        assert layer.lora_as_matmul
    model.compile(jit_compile="auto")
    for shape in [(2, 3, 8), (5, 7, 8)]:
        x = rng.normal(size=shape).astype("float32")
        h = ref.einsum_dense(
            "btd,ndh->btnh",
            x,
            np_(query.kernel),
            None,
            np_(query.lora_a),
            np_(query.lora_b),
            query.scaling,
        )
        expected = ref.einsum_dense(
            "btnh,nhd->btd",
            h,
            np_(output.kernel),
            None,
            np_(output.lora_a),
            np_(output.lora_b),
            output.scaling,
        )
        assert_close(model.predict_on_batch(x), expected)
