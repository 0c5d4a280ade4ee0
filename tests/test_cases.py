"""Failure cases from public reports (../shared/cases, C16-C23).

C22 (mixed batches on every layer kind) is in test_multi_adapter.py and C23
(remat modes) in test_identity.py.
"""

import keras
import numpy as np
import pytest
from conftest import to_numpy
from numerics import assert_close
from numerics import assert_exact

import keras_lora as kl


def _query_value_out():
    inputs = keras.Input((8,))
    h = keras.layers.Dense(8, name="query")(inputs)
    h = keras.layers.Dense(8, name="value")(h)
    return keras.Model(inputs, keras.layers.Dense(4, name="out")(h))


@pytest.mark.parametrize(
    "patterns, key",
    [
        ({"rank_pattern": {"qeury": 16}}, "qeury"),
        ({"rank_pattern": {"^query": 16}}, r"\^query"),
        ({"alpha_pattern": {"valeu": 64}}, "valeu"),
    ],
)
def test_c16_pattern_keys_that_select_nothing_are_errors(patterns, key):
    """C16: a rank_pattern / alpha_pattern key that selects no adapted
    layer is an error naming the key and listing the adapted paths, as an
    unmatched target is; the model is unchanged."""
    model = _query_value_out()
    x = np.random.default_rng(0).normal(size=(2, 8)).astype("float32")
    before = to_numpy(model(x))
    argument = next(iter(patterns))
    with pytest.raises(
        ValueError, match=rf"(?s)`{argument}` keys.*'{key}'.*'query', 'value'"
    ):
        kl.apply_lora(model, rank=2, targets=["query", "value"], **patterns)
    assert not kl.lora_layers(model)
    assert_exact(to_numpy(model(x)), before)
    # A key that does select a layer sets its rank.
    lora = kl.apply_lora(
        model, rank=2, targets=["query", "value"], rank_pattern={"query": 4}
    )
    assert kl.lora_layers(lora)["query"].adapter_rank == 4
    assert kl.lora_layers(lora)["value"].adapter_rank == 2


def _float16_two_layers():
    inputs = keras.Input((8,))
    h = keras.layers.Dense(8, dtype="float16", name="fine")(inputs)
    outputs = keras.layers.Dense(8, dtype="float16", name="d")(h)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("bad", [300.0, np.nan])
def test_c17_merge_refuses_non_finite_weights(bad):
    """C17: float16 Dense(8), rank 2, A = B = 300 (the merged kernel
    overflows float16), then B = NaN: `merge` and `merge_adapters` raise,
    naming the layer path, and change nothing (not even the layer whose
    merge would have been finite)."""
    lora = kl.apply_lora(
        _float16_two_layers(), rank=2, targets=["fine", "d"], inplace=True
    )
    layer = kl.lora_layers(lora)["d"]
    layer.lora_a.assign(np.full(layer.lora_a.shape, 300.0, "float32"))
    layer.lora_b.assign(np.full(layer.lora_b.shape, bad, "float32"))
    kernels = {p: to_numpy(v.kernel) for p, v in kl.lora_layers(lora).items()}
    with pytest.raises(ValueError, match=r"(?s)layer 'd'.*non-finite"):
        kl.merge(lora)
    with pytest.raises(ValueError, match=r"(?s)layer 'd'.*non-finite"):
        kl.merge_adapters(lora)
    for path, layer in kl.lora_layers(lora).items():
        assert not layer.merged, path
        assert_exact(to_numpy(layer.kernel), kernels[path])
    # Finite adapters merge.
    layer.lora_b.assign(np.full(layer.lora_b.shape, 1e-3, "float32"))
    assert not kl.lora_layers(kl.merge(lora))


@pytest.mark.parametrize("tie_weights", [None, True, False])
def test_c20_weights_argument_sets_the_base_weights(tie_weights):
    """C20: LoRAEmbedding(3, 4, rank=2, weights=np.ones((3, 4))) (and the
    reversible embedding, the other base that takes `weights=`) builds with
    the given base weights, adapters at B = 0, outputs equal to the plain
    layer's."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(3, 4)).astype("float32")
    ids = np.array([[0, 2, 1]])
    if tie_weights is None:
        weights = np.ones((3, 4), "float32")
        plain = keras.layers.Embedding(3, 4, weights=weights)
        lora = kl.LoRAEmbedding(3, 4, rank=2, weights=weights)
    else:
        weights = [table] if tie_weights else [table, table.T.copy()]
        kwargs = {"tie_weights": tie_weights}
        plain = keras.layers.ReversibleEmbedding(3, 4, **kwargs)
        plain.build()
        plain.set_weights(weights)
        lora = kl.LoRAReversibleEmbedding(
            3, 4, rank=2, weights=weights, **kwargs
        )
        x = rng.normal(size=(2, 4)).astype("float32")
        assert_exact(
            to_numpy(lora(x, reverse=True)), to_numpy(plain(x, reverse=True))
        )
    assert lora.built
    assert_exact(to_numpy(lora.lora_b), np.zeros(lora.lora_b.shape))
    assert_exact(to_numpy(lora(ids)), to_numpy(plain(ids)))
    with pytest.raises(ValueError, match=r"`weights`.*\(3, 4\)"):
        kl.LoRAEmbedding(3, 4, rank=2, weights=np.ones((4, 4)))


def test_c21_embedding_of_ragged_ids_is_ragged_like_keras():
    """C21: on TensorFlow a tf.RaggedTensor of ids gives a RaggedTensor,
    as Keras's Embedding does, with the plain lookup plus the adapter's
    rows (NumPy oracle); other backends have no ragged tensors, and there
    the same ids, padded, give the plain layer's output plus the adapter."""
    rng = np.random.default_rng(0)
    plain = keras.layers.Embedding(5, 4)
    plain.build()
    lora = kl.LoRAEmbedding.from_layer(plain, rank=2, alpha=4)
    lora.lora_b.assign(rng.normal(size=(2, 4)).astype("float32"))
    table = to_numpy(plain.embeddings)
    a, b = to_numpy(lora.lora_a), to_numpy(lora.lora_b)
    rows = [[1, 2, 4], [0]]
    want = [table[r] + 2.0 * a[r] @ b for r in rows]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        ids = tf.ragged.constant(rows)
        out = lora(ids)
        assert isinstance(out, tf.RaggedTensor)
        assert isinstance(plain(ids), tf.RaggedTensor)
        assert out.row_lengths().numpy().tolist() == [3, 1]
        got = [row.numpy() for row in out]
    else:
        ids = np.array([rows[0], rows[1] + [0, 0]])
        out = to_numpy(lora(ids))
        got = [out[0], out[1][:1]]
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)


def test_c20_weights_of_the_wrong_count_name_the_shapes():
    with pytest.raises(ValueError, match=r"`weights` must hold 1.*\(3, 4\)"):
        kl.LoRAEmbedding(3, 4, rank=2, weights=[np.ones((3, 4))] * 2)
