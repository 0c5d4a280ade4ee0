"""LoRAEmbedding and LoRAReversibleEmbedding against the NumPy oracle."""

import keras
import numpy as np
import pytest
import reference as ref
from numerics import assert_close
from numerics import assert_exact
from numerics import close

import keras_lora as kl


def np_(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def set_adapters(layer, rng, scale=0.5):
    for w in layer.adapter_weights().values():
        w.assign(rng.normal(size=w.shape).astype("float32") * scale)


IDS = np.array([[1, 2, 0, 49], [7, 0, 0, 3]], "int32")


@pytest.mark.parametrize(
    "rank,alpha,use_rslora", [(2, None, False), (4, 8, False), (4, 8, True)]
)
def test_embedding_matches_oracle(rng, rank, alpha, use_rslora):
    layer = kl.LoRAEmbedding(
        50, 8, rank=rank, alpha=alpha, use_rslora=use_rslora
    )
    base_out = np_(layer(IDS))
    assert_exact(base_out, np_(layer.embeddings)[IDS])
    set_adapters(layer, rng)
    s = ref.scaling(rank, alpha, use_rslora)
    expected = ref.embedding(
        IDS, np_(layer.embeddings), np_(layer.lora_a), np_(layer.lora_b), s
    )
    assert_close(np_(layer(IDS)), expected)
    merged = layer.merge()
    assert type(merged) is keras.layers.Embedding
    assert_close(np_(merged(IDS)), expected)
    # Float ids are cast as the base layer does.
    assert_close(np_(layer(IDS.astype("float32"))), expected)


def test_c06_mask_zero_mask_identical_to_base(rng):
    """C06 (mask_zero=True): LoRAEmbedding(50, 8), rank 2, B non-zero: the
    mask is exactly the base layer's, in a model too."""
    base = keras.layers.Embedding(50, 8, mask_zero=True)
    base(IDS)
    layer = kl.LoRAEmbedding.from_layer(base, rank=2)
    assert layer.mask_zero
    set_adapters(layer, rng)
    assert_exact(np_(layer.compute_mask(IDS)), np_(base.compute_mask(IDS)))
    assert_exact(np_(layer.compute_mask(IDS)), IDS != 0)
    # The mask reaches a downstream layer (masked average pooling).
    inputs = keras.Input((4,), dtype="int32")
    pooled = keras.layers.GlobalAveragePooling1D()(layer(inputs))
    model = keras.Model(inputs, pooled)
    table = ref.embedding(
        IDS, np_(layer.embeddings), np_(layer.lora_a), np_(layer.lora_b), 1.0
    )
    mask = (IDS != 0)[..., None]
    expected = (table * mask).sum(1) / mask.sum(1)
    assert_close(np_(model(IDS)), expected)


@pytest.mark.parametrize("tie_weights", [True, False])
@pytest.mark.parametrize("logit_soft_cap", [None, 5.0])
def test_c06_reversible_embedding_logits(rng, tie_weights, logit_soft_cap):
    """C06: LoRAReversibleEmbedding(50, 8), rank 2, B non-zero: the reverse
    projection (logits) includes the adapter, tied or untied; merged logits
    equal unmerged ones."""
    layer = kl.LoRAReversibleEmbedding(
        50,
        8,
        rank=2,
        alpha=4,
        tie_weights=tie_weights,
        logit_soft_cap=logit_soft_cap,
    )
    layer(IDS)
    names = sorted(layer.adapter_weights())
    if tie_weights:
        assert names == ["lora_a", "lora_b"]
    else:
        assert names == ["lora_a", "lora_b", "reverse_lora_a", "reverse_lora_b"]
        assert tuple(layer.reverse_lora_a.shape) == (8, 2)
        assert tuple(layer.reverse_lora_b.shape) == (2, 50)
    h = rng.normal(size=(2, 4, 8)).astype("float32")
    base_logits = np_(layer(h, reverse=True))
    set_adapters(layer, rng)
    kw = {"logit_soft_cap": logit_soft_cap}
    a, b = np_(layer.lora_a), np_(layer.lora_b)
    table = np_(layer.embeddings)
    if tie_weights:
        expected = ref.reverse_embedding(h, table, a, b, 2.0, **kw)
    else:
        expected = ref.reverse_embedding(
            h,
            reverse_table=np_(layer.reverse_embeddings),
            reverse_a=np_(layer.reverse_lora_a),
            reverse_b=np_(layer.reverse_lora_b),
            s=2.0,
            **kw,
        )
    logits = np_(layer(h, reverse=True))
    assert not close(logits, base_logits)
    assert_close(logits, expected)
    merged = layer.merge()
    assert type(merged) is keras.layers.ReversibleEmbedding
    assert_close(np_(merged(h, reverse=True)), logits)
    assert_close(np_(merged(IDS)), ref.embedding(IDS, table, a, b, 2.0))
    layer.merge_adapter()
    assert_close(np_(layer(h, reverse=True)), logits)
    layer.unmerge_adapter()
    assert_exact(np_(layer(h, reverse=True)), logits)


@pytest.mark.parametrize("tie_weights", [True, False])
def test_c06_keras_hub_reversible_embedding_from_layer(rng, tie_weights):
    """C06 with keras_hub.layers.ReversibleEmbedding (the token embedding of
    Gemma/Llama) wrapped by from_layer: variables shared, logits include the
    adapter, merge gives back the keras-hub class, mask_zero kept."""
    import keras_hub

    base = keras_hub.layers.ReversibleEmbedding(
        50, 8, tie_weights=tie_weights, mask_zero=True
    )
    base(IDS)
    h = rng.normal(size=(2, 8)).astype("float32")
    base_logits = np_(base(h, reverse=True))
    layer = kl.LoRAReversibleEmbedding.from_layer(base, rank=2)
    assert layer.embeddings is base.embeddings
    assert not base.embeddings.trainable
    assert_exact(np_(layer(h, reverse=True)), base_logits)
    assert_exact(np_(layer(IDS)), np_(base(IDS)))
    set_adapters(layer, rng)
    logits = np_(layer(h, reverse=True))
    if tie_weights:
        expected = ref.reverse_embedding(
            h, np_(base.embeddings), np_(layer.lora_a), np_(layer.lora_b)
        )
    else:
        expected = ref.reverse_embedding(
            h,
            reverse_table=np_(base.reverse_embeddings),
            reverse_a=np_(layer.reverse_lora_a),
            reverse_b=np_(layer.reverse_lora_b),
        )
    assert_close(logits, expected)
    out = layer(keras.ops.convert_to_tensor(IDS))
    assert_exact(np_(keras.ops.convert_to_tensor(out._keras_mask)), IDS != 0)
    merged = layer.merge()
    assert type(merged) is keras_hub.layers.ReversibleEmbedding
    assert_close(np_(merged(h, reverse=True)), logits)


def test_gemma_token_embedding_logits(rng):
    """A tiny real GemmaBackbone: wrapping its tied token embedding changes
    the logits by exactly the oracle's adapter term."""
    import keras_hub

    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=32,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
        head_dim=4,
    )
    token = backbone.token_embedding
    layer = kl.LoRAReversibleEmbedding.from_layer(token, rank=2, alpha=2)
    set_adapters(layer, rng)
    h = rng.normal(size=(1, 3, 8)).astype("float32")
    expected = ref.reverse_embedding(
        h, np_(token.embeddings), np_(layer.lora_a), np_(layer.lora_b), 1.0
    )
    assert_close(np_(layer(h, reverse=True)), expected)
