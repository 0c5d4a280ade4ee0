"""Behaviour shared by every keras_lora layer.

Validation (C03, C04), from_layer, merge / unmerge, dtype policies (C02, C13),
training (C12), dropout, `.keras` saving (C14), config round trips, the
rank-r forward path and cross-backend loading.
"""

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import reference as ref
from keras import ops
from numerics import assert_close
from numerics import assert_exact
from numerics import close

import keras_lora as kl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = keras.backend.backend()


def np_(x):
    return np.asarray(ops.convert_to_numpy(x))


def set_adapters(layer, rng, scale=0.5):
    for w in layer.adapter_weights().values():
        w.assign(rng.normal(size=w.shape).astype("float32") * scale)


# name -> (LoRA class, base factory, LoRA kwargs, input factory)
def _ids(rng, shape=(2, 5)):
    return rng.integers(1, 20, size=shape).astype("int32")


LAYERS = {
    "dense": (
        kl.LoRADense,
        lambda **kw: keras.layers.Dense(6, **kw),
        lambda **kw: kl.LoRADense(6, **kw),
        lambda rng: rng.normal(size=(3, 8)).astype("float32"),
    ),
    "einsum_dense": (
        kl.LoRAEinsumDense,
        lambda **kw: keras.layers.EinsumDense(
            "btd,ndh->btnh", (3, 2, 3), bias_axes="nh", **kw
        ),
        lambda **kw: kl.LoRAEinsumDense(
            "btd,ndh->btnh", (3, 2, 3), bias_axes="nh", **kw
        ),
        lambda rng: rng.normal(size=(2, 3, 8)).astype("float32"),
    ),
    "conv2d": (
        kl.LoRAConv2D,
        lambda **kw: keras.layers.Conv2D(4, 3, **kw),
        lambda **kw: kl.LoRAConv2D(4, 3, **kw),
        lambda rng: rng.normal(size=(2, 6, 6, 3)).astype("float32"),
    ),
    "conv1d": (
        kl.LoRAConv1D,
        lambda **kw: keras.layers.Conv1D(4, 3, padding="causal", **kw),
        lambda **kw: kl.LoRAConv1D(4, 3, padding="causal", **kw),
        lambda rng: rng.normal(size=(2, 6, 3)).astype("float32"),
    ),
    "conv3d": (
        kl.LoRAConv3D,
        lambda **kw: keras.layers.Conv3D(4, 2, **kw),
        lambda **kw: kl.LoRAConv3D(4, 2, **kw),
        lambda rng: rng.normal(size=(2, 4, 4, 4, 3)).astype("float32"),
    ),
    "conv2d_transpose": (
        kl.LoRAConv2DTranspose,
        lambda **kw: keras.layers.Conv2DTranspose(4, 3, strides=2, **kw),
        lambda **kw: kl.LoRAConv2DTranspose(4, 3, strides=2, **kw),
        lambda rng: rng.normal(size=(2, 4, 4, 3)).astype("float32"),
    ),
    "depthwise_conv2d": (
        kl.LoRADepthwiseConv2D,
        lambda **kw: keras.layers.DepthwiseConv2D(3, **kw),
        lambda **kw: kl.LoRADepthwiseConv2D(3, **kw),
        lambda rng: rng.normal(size=(2, 6, 6, 3)).astype("float32"),
    ),
    "separable_conv1d": (
        kl.LoRASeparableConv1D,
        lambda **kw: keras.layers.SeparableConv1D(4, 3, **kw),
        lambda **kw: kl.LoRASeparableConv1D(4, 3, **kw),
        lambda rng: rng.normal(size=(2, 6, 3)).astype("float32"),
    ),
    "embedding": (
        kl.LoRAEmbedding,
        lambda **kw: keras.layers.Embedding(20, 8, **kw),
        lambda **kw: kl.LoRAEmbedding(20, 8, **kw),
        _ids,
    ),
    "reversible_embedding": (
        kl.LoRAReversibleEmbedding,
        lambda **kw: keras.layers.ReversibleEmbedding(
            20, 8, tie_weights=False, **kw
        ),
        lambda **kw: kl.LoRAReversibleEmbedding(20, 8, tie_weights=False, **kw),
        _ids,
    ),
}
NAMES = list(LAYERS)


def make(name, rng, **kwargs):
    """A built LoRA layer of kind `name` and an input for it."""
    _, _, factory, inputs = LAYERS[name]
    layer = factory(**kwargs)
    x = inputs(rng)
    layer(x)
    return layer, x


# -- Validation (C03, C04) ----------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rank", [0, -1, 2.5, True, "4", None])
def test_c03_bad_rank_is_a_value_error_naming_it(name, rank):
    """C03: rank True, 0, -1, 2.5, "4" (and None): ValueError naming `rank`
    and the value, for every layer and for from_layer; bool is not an int."""
    cls, _, factory, _ = LAYERS[name]
    with pytest.raises(ValueError, match="rank") as info:
        factory(rank=rank)
    assert f"rank={rank!r}" in str(info.value)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf"), "2"])
def test_bad_alpha(rng, alpha):
    for name in NAMES:
        with pytest.raises(ValueError, match="alpha") as info:
            LAYERS[name][2](rank=2, alpha=alpha)
        assert f"alpha={alpha!r}" in str(info.value)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, "0.1", True])
def test_bad_dropout(dropout):
    for name in NAMES:
        with pytest.raises(ValueError, match="dropout") as info:
            LAYERS[name][2](rank=2, dropout=dropout)
        assert f"dropout={dropout!r}" in str(info.value)


def test_bad_flags_and_keras_lora_args():
    for name in NAMES:
        factory = LAYERS[name][2]
        with pytest.raises(TypeError, match="use_rslora='yes'"):
            factory(rank=2, use_rslora="yes")
        with pytest.raises(TypeError, match="train_bias=1"):
            factory(rank=2, train_bias=1)
        with pytest.raises(ValueError, match="lora_rank=4"):
            factory(rank=2, lora_rank=4)


@pytest.mark.parametrize("name", NAMES)
def test_from_layer_rejects_bad_bases(rng, name):
    """Unbuilt base, wrong class, an existing LoRA layer, Keras's own LoRA,
    bad rank: each raises and leaves the base layer unchanged."""
    cls, base_factory, _, inputs = LAYERS[name]
    unbuilt = base_factory()
    with pytest.raises(ValueError, match="must be built"):
        cls.from_layer(unbuilt, rank=2)
    other = (
        keras.layers.Dense(3) if name != "dense" else keras.layers.Conv1D(3, 1)
    )
    other.build((None, 4, 4))
    with pytest.raises(TypeError, match=type(other).__name__):
        cls.from_layer(other, rank=2)
    base = base_factory()
    base(inputs(rng))
    before = {w.name: (w.trainable, np_(w).copy()) for w in base.weights}
    for bad in (0, True, "4"):
        with pytest.raises(ValueError, match=f"rank={bad!r}"):
            cls.from_layer(base, rank=bad)
    with pytest.raises(ValueError, match="dropout"):
        cls.from_layer(base, rank=2, dropout=1.0)
    after = {w.name: (w.trainable, np_(w)) for w in base.weights}
    for w_name, (trainable, value) in before.items():
        assert after[w_name][0] == trainable
        assert_exact(after[w_name][1], value)
    lora = cls.from_layer(base, rank=2)
    with pytest.raises(ValueError, match="already a keras_lora layer"):
        cls.from_layer(lora, rank=2)
    keras_lora_base = base_factory()
    keras_lora_base(inputs(rng))
    if hasattr(keras_lora_base, "enable_lora"):  # not on transposed convs
        keras_lora_base.enable_lora(2)
        with pytest.raises(ValueError, match="built-in LoRA"):
            cls.from_layer(keras_lora_base, rank=2)


def test_from_layer_rejects_computing_subclass(rng):
    """A Dense subclass that changes `call` is not silently wrapped."""

    class Doubled(keras.layers.Dense):
        def call(self, x):
            return super().call(x) * 2

    layer = Doubled(3)
    layer.build((None, 4))
    with pytest.raises(TypeError, match="Doubled"):
        kl.LoRADense.from_layer(layer, rank=2)


@pytest.mark.parametrize(
    "name,factory,x_shape",
    [
        ("dense", lambda: kl.LoRADense(4, rank=8), (2, 3)),
        ("conv2d", lambda: kl.LoRAConv2D(2, 3, rank=16), (1, 5, 5, 1)),
        (
            "einsum_dense",
            lambda: kl.LoRAEinsumDense("ab,bc->ac", (4,), rank=5),
            (2, 3),
        ),
        ("embedding", lambda: kl.LoRAEmbedding(6, 3, rank=4), None),
    ],
)
def test_c04_rank_above_min_dims_warns_and_merge_exact(
    rng, name, factory, x_shape
):
    """C04: Dense(4) on (2,3) with rank 8, Conv2D(2, 3) with rank 16 (and
    the other layers): allowed, warns that it gives no compression, forward
    and merge stay exact (no shape error later)."""
    layer = factory()
    if x_shape is None:
        x = rng.integers(0, 6, size=(2, 3)).astype("int32")
    else:
        x = rng.normal(size=x_shape).astype("float32")
    with pytest.warns(UserWarning, match="no compression"):
        layer(x)
    set_adapters(layer, rng)
    out = np_(layer(x))
    assert_close(np_(layer.merge()(x)), out)
    layer.merge_adapter()
    assert_close(np_(layer(x)), out)
    layer.unmerge_adapter()
    assert_exact(np_(layer(x)), out)


def test_rank_at_min_dims_does_not_warn(rng):
    layer = kl.LoRADense(4, rank=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(rng.normal(size=(2, 3)).astype("float32"))


# -- from_layer, merge, unmerge ----------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_from_layer_shares_variables(rng, name):
    cls, base_factory, _, inputs = LAYERS[name]
    base = base_factory(name="the_base", dtype="mixed_bfloat16")
    x = inputs(rng)
    base_out = np_(base(x))
    lora = cls.from_layer(base, rank=2, alpha=3.0)
    assert lora.name == "the_base"
    assert lora.dtype_policy.name == "mixed_bfloat16"
    assert lora.built
    for w_name, variable in lora.base_weights().items():
        assert variable is getattr(base, "_" + w_name, None) or any(
            variable is w for w in base.weights
        )
        assert not variable.trainable
    assert len(base.weights) == len(lora.base_weights())
    assert sorted(w.name for w in lora.trainable_weights) == sorted(
        lora.adapter_weights()
    )
    assert_exact(np_(lora(x)), base_out)
    base_config = base.get_config()
    lora_base_config = lora.base_config()
    for key in ("lora_rank", "lora_alpha"):
        base_config.pop(key, None)
        lora_base_config.pop(key, None)
    assert lora_base_config == base_config


@pytest.mark.parametrize("name", NAMES)
def test_merge_unload_and_in_place_round_trip(rng, name):
    """merge() leaves the LoRA layer untouched; merge_adapter/unmerge_adapter
    restore bit for bit (C10 for every layer); unload() is the base."""
    layer, x = make(name, rng, rank=2, alpha=4)
    base_values = {n: np_(w).copy() for n, w in layer.base_weights().items()}
    base_out = np_(layer(x))
    set_adapters(layer, rng)
    adapters = {n: np_(w).copy() for n, w in layer.adapter_weights().items()}
    out = np_(layer(x))
    merged = layer.merge()
    assert type(merged) is layer.base_class
    assert merged.name == layer.name
    assert all(w.trainable for w in merged.weights)
    assert_close(np_(merged(x)), out)
    for n, w in layer.adapter_weights().items():
        assert_exact(np_(w), adapters[n])
    for n, w in layer.base_weights().items():
        assert_exact(np_(w), base_values[n])
    assert_exact(np_(layer.unload()(x)), base_out)
    layer.merge_adapter()
    with pytest.raises(ValueError, match="already merged"):
        layer.merge_adapter()
    assert_close(np_(layer(x)), out)
    # merge() while merged in place still folds into the original weights.
    assert_close(np_(layer.merge()(x)), out)
    assert_exact(np_(layer.unload()(x)), base_out)
    layer.unmerge_adapter()
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge_adapter()
    for n, w in layer.base_weights().items():
        assert np_(w).tobytes() == base_values[n].tobytes()
    assert_exact(np_(layer(x)), out)


def test_merge_before_build_raises():
    layer = kl.LoRADense(3, rank=2)
    for method in (layer.merge, layer.unload, layer.merge_adapter):
        with pytest.raises(ValueError, match="not built"):
            method()


# -- dtype policies (C02, C13) -------------------------------------------------

POLICIES = ["float32", "mixed_float16", "mixed_bfloat16", "bfloat16"]


def _train_steps(layer, x, steps=3):
    """Adam(1e-3) on a model around `layer`; returns losses and, per step,
    whether A and B changed."""
    policy = layer.dtype_policy
    inputs = keras.Input(x.shape[1:], dtype=str(x.dtype))
    h = layer(inputs)
    h = keras.layers.Flatten()(h)
    out = keras.layers.Dense(1, dtype=policy, trainable=False)(h)
    model = keras.Model(inputs, out)
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    y = np.ones((x.shape[0], 1), "float32")
    losses, moved = [], []
    a0, b0 = np_(layer.lora_a).copy(), np_(layer.lora_b).copy()
    for _ in range(steps):
        losses.append(float(model.train_on_batch(x, y)))
        a1, b1 = np_(layer.lora_a).copy(), np_(layer.lora_b).copy()
        moved.append((not np.array_equal(a0, a1), not np.array_equal(b0, b1)))
        a0, b0 = a1, b1
    return losses, moved


@pytest.mark.parametrize("policy", POLICIES)
def test_c02_dtype_policies_train_adapters(rng, policy):
    """C02 for every layer (one model holding all ten) and policy: adapters
    float32, outputs finite and in the compute dtype, Adam moves the
    adapters every step.

    With the default B = 0, A's gradient is exactly zero on the first step
    (dL/dA = x^T (dL/dy) B^T), so B moves on every step and A on every step
    once B is non-zero (steps 2 and 3).
    """
    keras.config.set_dtype_policy(policy)
    model, inputs = _all_layers_model(rng, nonzero=False)
    layers = [x for x in model.layers if isinstance(x, kl.LoRALayer)]
    assert len(layers) == 10
    for layer in layers:
        assert layer.dtype_policy.name == policy
        for w in layer.adapter_weights().values():
            assert w.dtype == "float32"
    compute = keras.mixed_precision.Policy(policy).compute_dtype
    outs = model(inputs)
    # Eager calls of the reverse projection give the compute dtype (as the
    # plain layer does); inside a Functional model Keras hands it back as
    # float32 under mixed policies, so both are accepted for that output.
    expected_dtypes = [{compute}] * 4 + [{compute, "float32"}] + [{compute}] * 4
    for out, dtypes in zip(outs, expected_dtypes, strict=True):
        assert keras.backend.standardize_dtype(out.dtype) in dtypes
        assert np.all(np.isfinite(np_(ops.cast(out, "float32"))))
    h = model.get_layer("dense")(inputs[0])
    rev = model.get_layer("rev")
    assert rev(h, reverse=True).dtype == rev.unload()(h, reverse=True).dtype
    model.compile(keras.optimizers.Adam(1e-3), ["mse"] * len(outs))
    targets = [np.ones(tuple(o.shape), "float32") for o in outs]
    before = {
        (layer.name, n): np_(w).copy()
        for layer in layers
        for n, w in layer.adapter_weights().items()
    }
    for step in range(3):
        loss = model.train_on_batch(inputs, targets)
        assert np.all(np.isfinite(loss))
        for layer in layers:
            for n, w in layer.adapter_weights().items():
                value = np_(w).copy()
                moved = not np.array_equal(value, before[(layer.name, n)])
                expected = step > 0 or n.endswith("_b")
                assert moved == expected, (layer.name, n, step)
                before[(layer.name, n)] = value
                assert w.dtype == "float32"


@pytest.mark.parametrize("policy", ["bfloat16", "mixed_bfloat16"])
def test_c02_dense16_bf16(rng, policy):
    """C02 exactly: Dense(16), policy bfloat16 / mixed_bfloat16, inputs
    (4, 8), rank 4, Adam lr 1e-3, 3 steps: float32 adapters that change
    every step (B from step 1, A once B is non-zero), finite loss."""
    layer = kl.LoRADense(16, rank=4, dtype=policy)
    x = rng.normal(size=(4, 8)).astype("float32")
    layer(x)
    losses, moved = _train_steps(layer, x)
    assert all(math.isfinite(v) for v in losses)
    assert moved == [(False, True), (True, True), (True, True)]
    assert layer.lora_a.dtype == layer.lora_b.dtype == "float32"


# Documented bound for merged vs unmerged under bfloat16 (docs/layers.md):
# relative Frobenius error at most 2**-5 (bf16 keeps 8 mantissa bits,
# eps = 2**-8; the merged kernel is rounded once, the unmerged path rounds
# each of its three products).
BF16_REL_BOUND = 2.0**-5


@pytest.mark.parametrize("policy", ["bfloat16", "mixed_bfloat16"])
@pytest.mark.parametrize("name", NAMES)
def test_bf16_merged_vs_unmerged_bound(rng, policy, name):
    layer, x = make(name, rng, rank=2, dtype=policy)
    set_adapters(layer, rng)
    out = np_(ops.cast(layer(x), "float32")).astype("float64")
    merged = np_(ops.cast(layer.merge()(x), "float32")).astype("float64")
    err = np.linalg.norm(merged - out) / np.linalg.norm(out)
    assert err <= BF16_REL_BOUND, err
    if name == "reversible_embedding":
        h = rng.normal(size=(2, 8)).astype("float32")
        out = np_(ops.cast(layer(h, reverse=True), "float32"))
        merged = np_(ops.cast(layer.merge()(h, reverse=True), "float32"))
        err = np.linalg.norm(merged - out) / np.linalg.norm(out)
        assert err <= BF16_REL_BOUND, err


@pytest.mark.parametrize("alpha", [1, 32])
@pytest.mark.parametrize("policy", ["float16", "mixed_float16"])
def test_c13_scaling_float16(rng, alpha, policy):
    """C13: Dense(16), rank 16, alpha 1 and 32, float16 policy, inputs
    (2,16): s = alpha/rank in call and merge alike, A and B stored
    unscaled, alpha and rank round-trip through get_config, no NaN."""
    layer = kl.LoRADense(16, rank=16, alpha=alpha, dtype=policy)
    x = rng.normal(size=(2, 16)).astype("float32")
    layer(x)
    a = (rng.normal(size=(16, 16)) * 0.2).astype("float32")
    b = (rng.normal(size=(16, 16)) * 0.2).astype("float32")
    layer.lora_a.assign(a)
    layer.lora_b.assign(b)
    assert layer.scaling == alpha / 16
    assert_exact(np_(layer.lora_a), a)
    assert_exact(np_(layer.lora_b), b)
    expected = ref.dense(
        x,
        np_(layer.kernel).astype("float32"),
        np_(layer.bias),
        a,
        b,
        alpha / 16,
    )
    out = np_(layer(x)).astype("float64")
    merged = np_(layer.merge()(x)).astype("float64")
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(merged))
    # Inputs, kernel and products are rounded to float16 (11 mantissa
    # bits) along a 16-term contraction.
    assert_close(out, expected, dtype="float16", ulps=16)
    assert_close(merged, expected, dtype="float16", ulps=16)
    assert_exact(np_(layer.lora_a), a)
    config = layer.get_config()
    assert config["rank"] == 16 and config["alpha"] == alpha
    clone = kl.LoRADense.from_config(config)
    assert clone.scaling == alpha / 16


# -- Training (C12) ----------------------------------------------------------


@pytest.mark.parametrize("train_bias", [False, True])
def test_c12_fit_changes_only_adapters(rng, train_bias):
    """C12: Dense(8) with bias, rank 2, fit 2 steps: trainable weights are
    exactly A and B (plus the bias only if asked); base kernel (and the bias
    unless trained) bit-identical after fit; parameter counts right."""
    inputs = keras.Input((5,))
    layer = kl.LoRADense(8, rank=2, train_bias=train_bias)
    model = keras.Model(inputs, layer(inputs))
    expected = ["lora_a", "lora_b"] + (["bias"] if train_bias else [])
    assert sorted(w.name for w in model.trainable_weights) == sorted(expected)
    n_trainable = 5 * 2 + 2 * 8 + (8 if train_bias else 0)
    assert sum(math.prod(w.shape) for w in model.trainable_weights) == (
        n_trainable
    )
    assert model.count_params() == 5 * 8 + 8 + 5 * 2 + 2 * 8
    kernel = np_(layer.kernel).copy()
    bias = np_(layer.bias).copy()
    a, b = np_(layer.lora_a).copy(), np_(layer.lora_b).copy()
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    x = rng.normal(size=(16, 5)).astype("float32")
    y = rng.normal(size=(16, 8)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np_(layer.kernel).tobytes() == kernel.tobytes()
    assert not np.array_equal(np_(layer.lora_a), a)
    assert not np.array_equal(np_(layer.lora_b), b)
    if train_bias:
        assert not np.array_equal(np_(layer.bias), bias)
    else:
        assert np_(layer.bias).tobytes() == bias.tobytes()


@pytest.mark.parametrize(
    "name",
    [
        "einsum_dense",
        "conv1d",
        "conv2d",
        "conv3d",
        "conv2d_transpose",
        "embedding",
        "reversible_embedding",
    ],
)
def test_fit_keeps_base_bit_identical(rng, name):
    layer, x = make(name, rng, rank=2)
    base = {n: np_(w).copy() for n, w in layer.base_weights().items()}
    _train_steps(layer, x, steps=2)
    for n, w in layer.base_weights().items():
        assert np_(w).tobytes() == base[n].tobytes(), n


# -- Dropout -----------------------------------------------------------------


def test_dropout_only_in_training_and_only_on_the_branch(rng):
    """With A = B = I and s = 1 the LoRA branch is dropout(x) itself: in
    training its entries are 0 or x / (1 - p); in inference it is x."""
    layer = kl.LoRADense(4, rank=4, dropout=0.5, use_bias=False)
    x = rng.normal(size=(64, 4)).astype("float32") + 3.0
    layer(x)
    layer.lora_a.assign(np.eye(4, dtype="float32"))
    layer.lora_b.assign(np.eye(4, dtype="float32"))
    base = x @ np_(layer.kernel)
    assert_close(np_(layer(x)) - base, x)
    assert_close(np_(layer(x, training=False)) - base, x)
    out = np_(layer(x, training=True))
    branch = out - base
    kept = np.abs(branch) > 1e-3
    # A difference of two outputs: its rounding is relative to theirs.
    scale = max(np.abs(out).max(), np.abs(base).max())
    assert_close(branch[kept], 2.0 * x[kept], scale=scale)
    assert 0.3 < kept.mean() < 0.7
    # The merged layer has no dropout (inference only).
    assert_close(np_(layer.merge()(x, training=True)) - base, x)


@pytest.mark.parametrize("name", NAMES)
def test_dropout_zero_creates_no_seed_generator(rng, name):
    layer, x = make(name, rng, rank=2)
    assert layer.dropout_seed is None
    assert not any("seed" in v.path for v in layer.variables)
    assert_exact(np_(layer(x, training=True)), np_(layer(x, training=False)))
    with_dropout, x = make(name, rng, rank=2, dropout=0.3)
    assert isinstance(with_dropout.dropout_seed, keras.random.SeedGenerator)
    set_adapters(with_dropout, rng)
    assert not close(np_(with_dropout(x, training=True)), np_(with_dropout(x)))


# -- Config and serialization ------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trips_every_argument(rng, name):
    cls = LAYERS[name][0]
    layer = LAYERS[name][2](
        rank=3,
        alpha=5.5,
        dropout=0.25,
        use_rslora=True,
        lora_a_initializer=keras.initializers.Orthogonal(gain=2.0, seed=3),
        lora_b_initializer="ones",
        train_bias=True,
        name="configured",
        dtype="mixed_bfloat16",
    )
    config = layer.get_config()
    for key, value in {
        "rank": 3,
        "alpha": 5.5,
        "dropout": 0.25,
        "use_rslora": True,
        "train_bias": True,
    }.items():
        assert config[key] == value
    json.dumps(keras.saving.serialize_keras_object(layer))
    clone = cls.from_config(config)
    assert clone.get_config() == config
    assert clone.adapter_rank == 3 and clone.adapter_alpha == 5.5
    assert clone.adapter_dropout == 0.25 and clone.use_rslora
    assert clone.scaling == pytest.approx(5.5 / math.sqrt(3))
    assert isinstance(clone.lora_a_initializer, keras.initializers.Orthogonal)
    assert clone.lora_a_initializer.gain == 2.0
    # Through the registry, by registered name.
    registered = keras.saving.get_registered_name(cls)
    assert registered == f"keras_lora>{cls.__name__}"
    assert keras.saving.get_registered_object(registered) is cls
    revived = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(revived) is cls and revived.get_config() == config


def test_alpha_default_is_rank_and_survives_build(rng):
    """Keras's built-in LoRA resets alpha to rank in build(); ours doesn't."""
    layer = kl.LoRADense(4, rank=4, alpha=16)
    layer(rng.normal(size=(2, 3)).astype("float32"))
    assert layer.adapter_alpha == 16 and layer.scaling == 4.0
    default = kl.LoRADense(4, rank=4)
    assert default.adapter_alpha == 4 and default.scaling == 1.0


def _all_layers_model(rng, nonzero=True):
    """A functional model holding every LoRA layer, with non-zero adapters."""
    x_in = keras.Input((3, 8), name="x")
    img_in = keras.Input((6, 6, 3), name="img")
    ids_in = keras.Input((5,), dtype="int32", name="ids")
    seq_in = keras.Input((6, 3), name="seq")
    vol_in = keras.Input((4, 4, 4, 2), name="vol")
    dense = kl.LoRADense(8, rank=2, alpha=4, name="dense")
    einsum = kl.LoRAEinsumDense(
        "btd,ndh->btnh", (3, 2, 3), bias_axes="nh", rank=2, name="einsum"
    )
    conv = kl.LoRAConv2D(4, 3, rank=2, use_rslora=True, name="conv")
    conv1 = kl.LoRAConv1D(
        6, 3, padding="causal", groups=3, rank=2, alpha=3, name="conv1"
    )
    conv3 = kl.LoRAConv3D(4, 2, strides=2, rank=2, name="conv3")
    emb = kl.LoRAEmbedding(20, 8, rank=2, mask_zero=True, name="emb")
    rev = kl.LoRAReversibleEmbedding(
        20, 8, rank=2, tie_weights=False, name="rev"
    )
    up = kl.LoRAConv2DTranspose(3, 2, strides=2, rank=2, name="up")
    dw = kl.LoRADepthwiseConv2D(3, depth_multiplier=2, rank=2, name="dw")
    sep = kl.LoRASeparableConv1D(4, 3, rank=2, alpha=3, name="sep")
    h = dense(x_in)
    outputs = [
        einsum(h),
        conv(img_in),
        emb(ids_in),
        rev(ids_in),
        rev(h, reverse=True),
        conv1(seq_in),
        conv3(vol_in),
        dw(up(img_in)),
        sep(seq_in),
    ]
    model = keras.Model([x_in, img_in, ids_in, seq_in, vol_in], outputs)
    if nonzero:
        for layer in (dense, einsum, conv, emb, rev, conv1, conv3, up, dw, sep):
            set_adapters(layer, rng)
    inputs = [
        rng.normal(size=(2, 3, 8)).astype("float32"),
        rng.normal(size=(2, 6, 6, 3)).astype("float32"),
        rng.integers(0, 20, size=(2, 5)).astype("int32"),
        rng.normal(size=(2, 6, 3)).astype("float32"),
        rng.normal(size=(2, 4, 4, 4, 2)).astype("float32"),
    ]
    return model, inputs


def test_c14_keras_save_load_resumes_training(rng, tmp_path):
    """C14: B non-zero, save .keras and reload: same adapters and outputs;
    the optimizer state comes back, so one more step on both models gives
    the same adapters; merge then gives plain layers."""
    model, inputs = _all_layers_model(rng)
    model.compile(keras.optimizers.Adam(1e-2), ["mse"] * 5)
    targets = [np.ones_like(np_(o), "float32") for o in model(inputs)]
    model.train_on_batch(inputs, targets)
    outs = [np_(o) for o in model(inputs)]
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    for got, want in zip(loaded(inputs), outs, strict=True):
        assert_exact(np_(got), want)
    for layer in loaded.layers:
        if isinstance(layer, kl.LoRALayer):
            twin = model.get_layer(layer.name)
            assert type(layer) is type(twin)
            assert layer.get_config() == twin.get_config()
            for n, w in layer.adapter_weights().items():
                assert_exact(np_(w), np_(getattr(twin, n)))
                assert w.trainable
            for w in layer.base_weights().values():
                assert not w.trainable
    model.train_on_batch(inputs, targets)
    loaded.train_on_batch(inputs, targets)
    for layer in loaded.layers:
        if isinstance(layer, kl.LoRALayer):
            twin = model.get_layer(layer.name)
            for n, w in layer.adapter_weights().items():
                assert_close(np_(w), np_(getattr(twin, n)))
            plain = layer.merge()
            assert not isinstance(plain, kl.LoRALayer)


def test_save_while_merged_stores_unmerged_base(rng, tmp_path):
    """A layer merged in place saves its original base weights and its
    adapters; the reloaded layer is unmerged and computes the same."""
    inputs = keras.Input((4,))
    layer = kl.LoRADense(3, rank=2)
    model = keras.Model(inputs, layer(inputs))
    set_adapters(layer, rng)
    x = rng.normal(size=(2, 4)).astype("float32")
    out = np_(model(x))
    kernel = np_(layer.kernel).copy()
    layer.merge_adapter()
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    twin = loaded.layers[-1]
    assert not twin.merged
    assert np_(twin.kernel).tobytes() == kernel.tobytes()
    assert_close(np_(loaded(x)), out)


def test_load_own_variables_refuses_mismatch(rng):
    layer, _ = make("dense", rng, rank=2)
    store = {n: np_(w) for n, w in layer.base_weights().items()}
    store["lora_a"] = np.zeros((8, 2), "float32")
    with pytest.raises(ValueError, match="Missing: \\['lora_b'\\]"):
        layer.load_own_variables(store)
    store["lora_b"] = np.zeros((3, 6), "float32")
    with pytest.raises(ValueError, match="lora_b.*\\(2, 6\\).*\\(3, 6\\)"):
        layer.load_own_variables(store)
    store["extra"] = np.zeros(1)
    with pytest.raises(ValueError, match="unexpected: \\['extra'\\]"):
        layer.load_own_variables(store)


# -- The forward pass is rank-r ----------------------------------------------


def _adapted_sizes(layer):
    """Sizes of the adapted base weights (the d_in x d_out matrices)."""
    return {
        math.prod(w.shape)
        for n, w in layer.base_weights().items()
        if n
        in (
            "kernel",
            "depthwise_kernel",
            "pointwise_kernel",
            "embeddings",
            "reverse_embeddings",
        )
    }


@pytest.mark.parametrize("name", NAMES)
def test_forward_never_forms_a_times_b(rng, name, monkeypatch):
    """Records every matmul / einsum / tensordot / conv / take result of a
    forward pass: none has the kernel's (d_in x d_out) size; merge() does."""
    layer, x = make(name, rng, rank=2)
    set_adapters(layer, rng)
    shapes = []

    def recording(fn):
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            shapes.append(tuple(result.shape))
            return result

        return wrapper

    for op in ("matmul", "einsum", "tensordot", "conv", "take"):
        monkeypatch.setattr(ops, op, recording(getattr(ops, op)))
    full = _adapted_sizes(layer)
    layer(x)
    if name == "reversible_embedding":
        layer(rng.normal(size=(2, 8)).astype("float32"), reverse=True)
    assert shapes
    assert not [s for s in shapes if math.prod(s) in full], shapes
    shapes.clear()
    layer.merged_values()
    assert [s for s in shapes if math.prod(s) in full]


@pytest.mark.skipif(BACKEND != "jax", reason="jaxpr inspection is JAX-only")
@pytest.mark.parametrize("name", NAMES)
def test_jaxpr_has_no_full_size_intermediate(rng, name):
    """The traced forward pass (jax.make_jaxpr) has no more equations whose
    output has the base weight's size than the plain layer's own forward
    pass (none, except the flipped kernel JAX's transposed convolution
    makes of W): only rank-r intermediates."""
    import jax

    layer, x = make(name, rng, rank=2)
    full = _adapted_sizes(layer)

    def full_size_outputs(lay):
        trainable = [v.value for v in lay.trainable_variables]
        non_trainable = [v.value for v in lay.non_trainable_variables]

        def forward(t, nt, x):
            return lay.stateless_call(t, nt, x)[0]

        jaxpr = jax.make_jaxpr(forward)(trainable, non_trainable, x)
        # A reshape only relabels a tensor (here the (2, 3, 8) input viewed
        # as (6, 8), which happens to have the kernel's 48 elements); any
        # A @ B would show up as the dot_general that formed it.
        sizes = [
            math.prod(v.aval.shape)
            for eqn in jaxpr.jaxpr.eqns
            if eqn.primitive.name != "reshape"
            for v in eqn.outvars
        ]
        assert sizes
        return [s for s in sizes if s in full]

    plain = full_size_outputs(layer.unload())
    assert len(full_size_outputs(layer)) == len(plain)
    if name != "conv2d_transpose":
        assert plain == []


# -- Cross-backend -------------------------------------------------------------

_LOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import keras
    import keras_lora as kl

    path, inputs_path, out_path = sys.argv[1:4]
    model = keras.saving.load_model(path)
    kinds = sorted(type(l).__name__ for l in model.layers
                   if isinstance(l, kl.LoRALayer))
    assert kinds == ["LoRAConv1D", "LoRAConv2D", "LoRAConv2DTranspose",
                     "LoRAConv3D", "LoRADense", "LoRADepthwiseConv2D",
                     "LoRAEinsumDense", "LoRAEmbedding",
                     "LoRAReversibleEmbedding", "LoRASeparableConv1D"], kinds
    data = np.load(inputs_path)
    outs = model([data[k] for k in ("x", "img", "ids", "seq", "vol")])
    np.savez(out_path, *[keras.ops.convert_to_numpy(o) for o in outs])
    """
)


@pytest.mark.slow
def test_same_weights_same_outputs_on_every_backend(rng, tmp_path):
    """A .keras file saved here loads under the two other backends (each in
    a subprocess) and gives the same outputs (within float32 rounding)."""
    model, inputs = _all_layers_model(rng)
    outs = [np_(o) for o in model(inputs)]
    path = tmp_path / "all.keras"
    model.save(path)
    np.savez(
        tmp_path / "inputs.npz",
        **dict(zip(("x", "img", "ids", "seq", "vol"), inputs, strict=True)),
    )
    script = tmp_path / "load.py"
    script.write_text(_LOAD_SCRIPT)
    for backend in sorted({"tensorflow", "jax", "torch"} - {BACKEND}):
        out_path = tmp_path / f"out_{backend}.npz"
        env = dict(
            os.environ,
            KERAS_BACKEND=backend,
            PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        proc = subprocess.run(
            [
                sys.executable,
                str(script),
                str(path),
                str(tmp_path / "inputs.npz"),
                str(out_path),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = np.load(out_path)
        for i, want in enumerate(outs):
            assert_close(
                got[f"arr_{i}"],
                want,
                err_msg=f"{BACKEND} -> {backend}, output {i}",
            )
