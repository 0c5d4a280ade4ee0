"""LoRADense against the NumPy oracle, merge and hand-computed cases."""

import keras
import numpy as np
import pytest
import reference as ref
from numerics import assert_close
from numerics import assert_exact

import keras_lora as kl


def np_(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def set_adapters(layer, rng, scale=0.5):
    for w in layer.adapter_weights().values():
        w.assign(rng.normal(size=w.shape).astype("float32") * scale)


@pytest.mark.parametrize("activation", [None, "relu", "tanh"])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize(
    "rank,alpha,use_rslora", [(2, None, False), (4, 16, False), (4, 3, True)]
)
def test_dense_matches_oracle(
    rng, activation, use_bias, rank, alpha, use_rslora
):
    layer = kl.LoRADense(
        6,
        activation=activation,
        use_bias=use_bias,
        bias_initializer="random_normal",
        rank=rank,
        alpha=alpha,
        use_rslora=use_rslora,
    )
    x = rng.normal(size=(3, 5, 8)).astype("float32")
    layer(x)
    set_adapters(layer, rng)
    s = ref.scaling(rank, alpha, use_rslora)
    assert layer.scaling == pytest.approx(s)
    bias = np_(layer.bias) if use_bias else None
    expected = ref.dense(
        x,
        np_(layer.kernel),
        bias,
        np_(layer.lora_a),
        np_(layer.lora_b),
        s,
        activation,
    )
    assert_close(np_(layer(x)), expected)
    merged = layer.merge()
    assert type(merged) is keras.layers.Dense
    assert_close(np_(merged(x)), expected)
    assert_close(
        np_(merged.kernel),
        np_(layer.kernel)
        + s * ref.f64(np_(layer.lora_a)) @ ref.f64(np_(layer.lora_b)),
    )


def test_fresh_adapter_is_exactly_base(rng):
    """B = 0 at init: the output equals the plain Dense bit for bit."""
    x = rng.normal(size=(4, 8)).astype("float32")
    dense = keras.layers.Dense(5, activation="relu")
    base_out = np_(dense(x))
    lora = kl.LoRADense.from_layer(dense, rank=4, alpha=8)
    assert np.all(np_(lora.lora_b) == 0)
    assert np.any(np_(lora.lora_a) != 0)
    assert_exact(np_(lora(x)), base_out)
    fresh = kl.LoRADense(5, rank=4)
    fresh_out = np_(fresh(x))
    expected = ref.dense(x, np_(fresh.kernel), np_(fresh.bias))
    assert_close(fresh_out, expected)


def test_c09_merge_by_hand():
    """C09: Dense(2) on (2,3), rank 2, A and B set by hand to distinct values.

    The merged kernel equals kernel + s*(A@B) with shape (3, 2), computed
    here by hand, and the merged output equals the unmerged one.
    """
    layer = kl.LoRADense(2, rank=2, alpha=4, use_bias=True)
    x = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]], "float32")
    layer(x)
    kernel = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], "float32")
    layer.kernel.assign(kernel)
    layer.bias.assign(np.array([0.5, -0.5], "float32"))
    layer.lora_a.assign(np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    layer.lora_b.assign(np.array([[0.1, 0.2], [0.3, 0.4]]))
    # A @ B by hand: rows (1*.1+2*.3, 1*.2+2*.4) = (.7, 1.0), (1.5, 2.2),
    # (2.3, 3.4); s = alpha / rank = 2.
    by_hand = kernel + 2.0 * np.array([[0.7, 1.0], [1.5, 2.2], [2.3, 3.4]])
    merged = layer.merge()
    assert tuple(merged.kernel.shape) == (3, 2)
    assert_close(np_(merged.kernel), by_hand)
    out = x @ by_hand + np.array([0.5, -0.5])
    assert_close(np_(layer(x)), out)
    assert_close(np_(merged(x)), out)


def test_c10_merge_unmerge_bit_exact_large_kernel(rng):
    """C10: Dense(16), rank 4, kernel about 1e4; merge then unmerge restores
    the kernel bit for bit (it is kept, not recomputed by subtraction)."""
    layer = kl.LoRADense(16, rank=4)
    x = rng.normal(size=(2, 16)).astype("float32")
    layer(x)
    layer.kernel.assign(
        (rng.normal(size=(16, 16)) * 1e4).astype("float32") + 1e4
    )
    set_adapters(layer, rng, scale=0.37)
    original = np_(layer.kernel).copy()
    unmerged_out = np_(layer(x))
    layer.merge_adapter()
    assert layer.merged
    assert not np.array_equal(np_(layer.kernel), original)
    assert_close(np_(layer(x)), unmerged_out)
    layer.unmerge_adapter()
    assert not layer.merged
    assert np_(layer.kernel).tobytes() == original.tobytes()
    assert_exact(np_(layer(x)), unmerged_out)


def test_train_bias_adds_bias_to_trainables(rng):
    layer = kl.LoRADense(4, rank=2, train_bias=True)
    layer(rng.normal(size=(2, 3)).astype("float32"))
    names = sorted(w.name for w in layer.trainable_weights)
    assert names == ["bias", "lora_a", "lora_b"]
    assert [w.name for w in layer.non_trainable_weights] == ["kernel"]
    plain = kl.LoRADense(4, rank=2)
    plain(rng.normal(size=(2, 3)).astype("float32"))
    assert sorted(w.name for w in plain.trainable_weights) == [
        "lora_a",
        "lora_b",
    ]
    assert sorted(w.name for w in plain.non_trainable_weights) == [
        "bias",
        "kernel",
    ]


def test_higher_rank_inputs_and_lora_shapes(rng):
    layer = kl.LoRADense(7, rank=3)
    x = rng.normal(size=(2, 3, 4, 5)).astype("float32")
    assert layer(x).shape == (2, 3, 4, 7)
    assert layer.lora_shapes() == [("lora_a", "lora_b", (5, 3), (3, 7))]
    assert tuple(layer.lora_a.shape) == (5, 3)
    assert tuple(layer.lora_b.shape) == (3, 7)
    assert layer.lora_a.dtype == "float32"
