"""QLoRA: adapters over Keras's int8 / int4 quantized layers.

Oracles, independent of keras_lora's code: the plain quantized Keras layer
computes the base (its own quantized computation) and NumPy the adapter
`s * (x @ A) @ B`; the dequantized weight `W_deq` is read off the plain
quantized layer itself (an identity probe through its forward pass, or the
lookup of every id); Keras's `layer.quantize` on a float layer holding
`W_deq + s A B` gives the re-quantized variables a merge must produce.
"""

import warnings

import keras
import keras_hub
import numpy as np
import pytest
from keras import ops
from numerics import assert_close
from numerics import assert_exact
from numerics import close

import keras_lora as kl
from keras_lora import walk

# mode name -> (Keras mode, config)
MODES = {
    "int8": ("int8", None),
    "int4": ("int4", None),  # Keras's default: groups of 128 inputs
    "int4-channel": ("int4", {"block_size": -1}),
    "int4-block4": ("int4", {"block_size": 4}),
}


def np_(x):
    return np.asarray(ops.convert_to_numpy(x))


def quantize(layer, mode):
    keras_mode, config = MODES[mode]
    if config is not None:
        config = keras.quantizers.Int4QuantizationConfig(**config)
    layer.quantize(keras_mode, config=config)


# kind -> (plain factory, input factory, identity probe of W_deq)
def _dense():
    return keras.layers.Dense(6, use_bias=False)


def _einsum():
    return keras.layers.EinsumDense("btd,ndh->btnh", (8, 2, 3))


KINDS = {
    "dense": (
        _dense,
        lambda rng: rng.normal(size=(3, 8)).astype("float32"),
        # I @ W_deq is W_deq (int8 quantizes the rows of I exactly).
        lambda layer: np_(layer(np.eye(8, dtype="float32"))),
    ),
    "einsum_dense": (
        _einsum,
        lambda rng: rng.normal(size=(2, 8, 8)).astype("float32"),
        # x[0, t] = e_t gives out[0, t, n, h] = W[n, t, h].
        lambda layer: (
            np_(layer(np.eye(8, dtype="float32")[None]))[0]
            .transpose(1, 0, 2)
            .reshape(2, 8, 3)
        ),
    ),
    "embedding": (
        lambda: keras.layers.Embedding(20, 8),
        lambda rng: rng.integers(0, 20, size=(2, 5)).astype("int32"),
        lambda layer: np_(layer(np.arange(20, dtype="int32"))),
    ),
    "reversible_embedding": (
        lambda: keras.layers.ReversibleEmbedding(20, 8, tie_weights=False),
        lambda rng: rng.integers(0, 20, size=(2, 5)).astype("int32"),
        lambda layer: np_(layer(np.arange(20, dtype="int32"))),
    ),
}
LORA = {
    "dense": kl.LoRADense,
    "einsum_dense": kl.LoRAEinsumDense,
    "embedding": kl.LoRAEmbedding,
    "reversible_embedding": kl.LoRAReversibleEmbedding,
}
WEIGHT = {
    "dense": "kernel",
    "einsum_dense": "kernel",
    "embedding": "embeddings",
    "reversible_embedding": "embeddings",
}


def _quantized_layer(kind, mode, rng, seed_layer=None):
    factory, make_inputs, _ = KINDS[kind]
    layer = factory()
    x = make_inputs(rng)
    layer(x)
    for w in layer.weights:
        w.assign(rng.normal(scale=0.5, size=w.shape).astype("float32"))
    quantize(layer, mode)
    return layer, x


def _random_adapters(layer, rng, scale=0.3):
    for w in layer.adapter_weights().values():
        w.assign(rng.normal(scale=scale, size=w.shape).astype("float32"))


def _numpy_delta(layer, name):
    """`s * A @ B` in the weight's shape (kernel axes for EinsumDense)."""
    a, b = np_(layer.lora_a), np_(layer.lora_b)
    if name == "reverse_embeddings":
        a, b = np_(layer.reverse_lora_a), np_(layer.reverse_lora_b)
    delta = layer.scaling * (a.astype("float64") @ b)
    if isinstance(layer, keras.layers.EinsumDense):  # "btd,ndh": A (d, r)
        n, h = 2, 3
        delta = delta.reshape(8, n, h).transpose(1, 0, 2)
    return delta


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", list(KINDS))
def test_forward_is_the_quantized_base_plus_the_adapter(rng, kind, mode):
    """The LoRA layer computes the plain quantized layer's own output plus
    `s * (x @ A) @ B` (NumPy); at init exactly the base's."""
    base, x = _quantized_layer(kind, mode, rng)
    expected = np_(base(x))
    variables = {w.name: np_(w) for w in base.weights}
    layer = LORA[kind].from_layer(base, rank=2, alpha=4)
    assert_exact(np_(layer(x)), expected)
    assert [w.name for w in layer.trainable_weights] == list(
        layer.adapter_weights()
    )
    _random_adapters(layer, rng)
    a, b = np_(layer.lora_a), np_(layer.lora_b)
    if kind in ("embedding", "reversible_embedding"):
        branch = a[x] @ b
    elif kind == "einsum_dense":
        branch = (x @ a @ b).reshape(2, 8, 2, 3)
    else:
        branch = x @ a @ b
    out = np_(layer(x))
    assert_close(out, expected + layer.scaling * branch)
    if kind == "reversible_embedding":
        h = rng.normal(size=(3, 8)).astype("float32")
        ra, rb = np_(layer.reverse_lora_a), np_(layer.reverse_lora_b)
        assert_close(
            np_(layer(h, reverse=True)),
            np_(base(h, reverse=True)) + layer.scaling * (h @ ra @ rb),
        )
    # The quantized variables are the given layer's, unchanged.
    for w in base.weights:
        assert_exact(np_(w), variables[w.name])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", list(KINDS))
def test_merges_keep_the_mode_or_give_the_exact_float_weight(rng, kind, mode):
    """Keeping the mode: the merged layer holds what Keras's quantizer makes
    of `W_deq + s A B` (a float layer quantized by Keras: the same
    variables, and weights within one quantization step, since the two
    float sums round differently), and the report's numbers are NumPy's.
    Dequantized: `W_deq + s A B`."""
    base, x = _quantized_layer(kind, mode, rng)
    probe = KINDS[kind][2]
    w_deq = probe(base).astype("float64")
    layer = LORA[kind].from_layer(base, rank=2, alpha=4)
    _random_adapters(layer, rng)
    name = WEIGHT[kind]
    target = w_deq + _numpy_delta(layer, name)

    # The reference: Keras quantizes a float layer holding the target.
    factory = KINDS[kind][0]
    reference = factory()
    reference(x)
    by_name = {w.name: w for w in reference.weights}
    by_name[name].assign(target.astype("float32"))
    if kind == "reversible_embedding":
        by_name["reverse_embeddings"].assign(
            np_(layer.merge(dequantize=True).reverse_embeddings)
        )
    quantize(reference, mode)
    merged = layer.merge()
    expected = {w.name: w for w in reference.weights}
    assert sorted(expected) == sorted(w.name for w in merged.weights)
    for w in merged.weights:
        assert (w.dtype, w.shape) == (expected[w.name].dtype, w.shape)
    back = probe(merged).astype("float64")
    levels = 127 if mode == "int8" else 7
    step = np.abs(target).max() / levels
    assert np.abs(back - probe(reference)).max() <= 1.01 * step

    report = layer.requantization_report()[name]
    max_error = np.abs(back - target).max()
    assert_close(report["max_abs_weight_error"], max_error, ulps=256)
    delta = target - w_deq
    relative = np.linalg.norm(back - w_deq - delta) / np.linalg.norm(delta)
    assert_close(report["update_relative_error"], relative, ulps=4096)

    plain = layer.merge(dequantize=True)
    assert quantized_mode(plain) is None
    assert_close(np_(getattr(plain, name)), target)


def quantized_mode(layer):
    return getattr(layer, "quantization_mode", None)


def test_training_moves_only_the_adapters(rng):
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16, activation="relu", name="d1")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4, name="d2")(hidden))
    model.quantize("int4")
    x = rng.normal(size=(16, 8)).astype("float32")
    y = rng.normal(size=(16, 4)).astype("float32")
    base = np_(model(x))
    lora = kl.apply_lora(model, rank=2, targets=["d1", "d2"])
    assert_exact(np_(lora(x)), base)
    before = {v.path: np_(v) for v in lora.weights}
    lora.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    lora.fit(x, y, epochs=3, batch_size=8, verbose=0)
    changed = sorted(
        v.path
        for v in lora.weights
        if not np.array_equal(before[v.path], np_(v))
    )
    assert changed == ["d1/lora_a", "d1/lora_b", "d2/lora_a", "d2/lora_b"]
    assert not close(np_(lora(x)), base)


def test_c1705_int8_keras_round_trip(rng, tmp_path):
    """keras-hub #1705 / #1537: Dense(16), int8, rank 4, non-zero B: save
    `.keras`, reload, the same outputs (no broadcasting error)."""
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(16, name="d")(inputs))
    model.quantize("int8")
    lora = kl.apply_lora(model, rank=4, targets="d")
    _random_adapters(lora.get_layer("d"), rng)
    x = rng.normal(size=(4, 8)).astype("float32")
    out = np_(lora(x))
    path = str(tmp_path / "m.keras")
    lora.save(path)
    loaded = keras.saving.load_model(path)
    assert_exact(np_(loaded(x)), out)
    layer = loaded.get_layer("d")
    assert layer.quantization_mode == "int8"
    assert layer.kernel.dtype == "int8"
    assert_exact(np_(layer.lora_b), np_(lora.get_layer("d").lora_b))


def test_adapter_files_move_between_quantized_and_float_bases(rng, tmp_path):
    """QLoRA deployment: adapters trained on the int8 base load onto the
    float base (and back); the outputs differ by the base's quantization
    only."""

    def build():
        inputs = keras.Input((8,))
        out = keras.layers.Dense(4, name="d")(inputs)
        return keras.Model(inputs, out)

    float_model = build()
    weights = [
        rng.normal(size=w.shape).astype("float32") for w in float_model.weights
    ]
    float_model.set_weights(weights)
    q_model = build()
    q_model.set_weights(weights)
    q_model.quantize("int8")
    lora = kl.apply_lora(q_model, rank=2, targets="d")
    _random_adapters(lora.get_layer("d"), rng)
    path = str(tmp_path / "a.safetensors")
    kl.save_adapters(lora, path)
    on_float = kl.load_adapters(float_model, path)
    x = rng.normal(size=(4, 8)).astype("float32")
    layer = lora.get_layer("d")
    branch = layer.scaling * (x @ np_(layer.lora_a) @ np_(layer.lora_b))
    assert_close(np_(on_float(x)), np_(float_model(x)) + branch)
    back = kl.load_adapters(build_quantized(build, weights), path)
    assert_exact(np_(back(x)), np_(lora(x)))


def build_quantized(build, weights):
    model = build()
    model.set_weights(weights)
    model.quantize("int8")
    return model


def test_quantize_after_apply_lora_keeps_the_adapters(rng):
    """`model.quantize` on an adapted model quantizes each base weight with
    Keras's quantizer and keeps the float32 adapters; the given model keeps
    its float weights. Modes without adapters are refused."""
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(6, name="d")(inputs))
    x = rng.normal(size=(3, 8)).astype("float32")
    lora = kl.apply_lora(model, rank=2, targets="d")
    layer = lora.get_layer("d")
    _random_adapters(layer, rng)
    a, b = np_(layer.lora_a), np_(layer.lora_b)
    kernel = np_(model.get_layer("d").kernel)
    with pytest.raises(ValueError, match="mode 'float8'"):
        layer.quantize("float8")
    lora.quantize("int8")
    assert layer.quantization_mode == "int8"
    assert_exact(np_(layer.lora_a), a)
    assert_exact(np_(model.get_layer("d").kernel), kernel)
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    reference.quantize("int8")
    expected = np_(reference(x)) + layer.scaling * (x @ a @ b)
    assert_close(np_(lora(x)), expected)
    dora = kl.apply_lora(model, rank=2, targets="d", use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        dora.get_layer("d").quantize("int8")


def test_unsupported_quantization_is_refused_by_name(rng):
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(16, name="d")(inputs))
    model(rng.normal(size=(2, 8)).astype("float32"))
    model.quantize("float8")
    with pytest.raises(ValueError, match=r"'d'.*quantization_mode='float8'"):
        kl.apply_lora(model, rank=2, targets="d")
    with pytest.raises(ValueError, match=r"'d'.*quantization_mode='float8'"):
        kl.LoRADense.from_layer(model.get_layer("d"), rank=2)
    q = keras.Model(inputs, keras.layers.Dense(16, name="q")(inputs))
    q.quantize("int8")
    flags = [(w.path, w.trainable) for w in q.weights]
    with pytest.raises(ValueError, match=r"use_dora=True.*\['q'\]"):
        kl.apply_lora(q, rank=2, targets="q", use_dora=True)
    with pytest.raises(ValueError, match=r"init='pissa'.*\['q'\]"):
        kl.apply_lora(q, rank=2, targets="q", init="pissa")
    assert [(w.path, w.trainable) for w in q.weights] == flags
    assert type(q.get_layer("q")) is keras.layers.Dense


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_in_place_merge_re_quantizes_and_warns(rng, mode):
    """`merge_adapters` and `layer.merge_adapter()` on a quantized base
    re-quantize as `merge` does, with the same warning; unmerging gives
    the LoRA model back bit for bit."""
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(16, name="d")(inputs))
    model.quantize(mode)
    lora = kl.apply_lora(model, rank=2, targets="d", inplace=True)
    layer = lora.get_layer("d")
    _random_adapters(layer, rng)
    x = rng.normal(size=(4, 8)).astype("float32")
    out = np_(lora(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kl.QuantizedMergeWarning)
        expected = np_(kl.merge(lora)(x))
    lost = layer.requantization_report()["kernel"]["update_relative_error"]
    assert lost > 0
    with pytest.warns(kl.QuantizedMergeWarning, match=f"{lost:.1%}"):
        kl.merge_adapters(lora)
    assert_exact(np_(lora(x)), expected)
    kl.unmerge_adapters(lora)
    assert_exact(np_(lora(x)), out)
    with pytest.warns(kl.QuantizedMergeWarning, match="'?d'? kernel"):
        layer.merge_adapter()
    assert_exact(np_(lora(x)), expected)
    layer.unmerge_adapter()
    assert_exact(np_(lora(x)), out)


def test_dequantized_merge_names_a_layer_it_cannot_convert(rng):
    """`merge(model, dequantize=True)` with a float8 layer that has no
    adapter: an error naming that layer and the way out; `merge(model)`
    leaves the layer as it is."""
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(8, name="a")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4, name="c")(hidden))
    model(rng.normal(size=(2, 8)).astype("float32"))
    model.get_layer("c").quantize("float8")
    lora = kl.apply_lora(model, rank=2, targets=["a"])
    with pytest.raises(
        ValueError, match=r"'c' \(no adapter, quantization_mode='float8'\)"
    ):
        kl.merge(lora, dequantize=True)
    assert kl.merge(lora).get_layer("c").quantization_mode == "float8"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_gemma_causal_lm_qlora(rng, tmp_path, mode):
    """A tiny GemmaCausalLM quantized by Keras, LoRA on query + value: fit
    two steps, generate, merge both ways, export a SavedModel."""
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
    model.quantize(mode)
    ids = rng.integers(1, 64, size=(4, 9)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((4, 8), "int32")}
    base = np_(model(x))
    lora = kl.apply_lora(model, rank=2, alpha=4)
    assert_exact(np_(lora(x)), base)
    lora.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    lora.fit(x, ids[:, 1:], batch_size=2, epochs=1, verbose=0)
    trained = np_(lora(x))
    assert not close(trained, base)
    for layer in walk.lora_layers(lora).values():
        assert layer.quantization_mode == mode
    mask = np.zeros((1, 9), "bool")
    mask[:, :4] = True
    prompt = {"token_ids": ids[:1] * mask, "padding_mask": mask}
    assert lora.generate(prompt, stop_token_ids=None)["token_ids"].shape == (
        1,
        9,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = kl.merge(lora)
    assert any(issubclass(w.category, kl.QuantizedMergeWarning) for w in caught)
    assert all(
        getattr(layer, "quantization_mode", None) in (None, mode)
        for layer in merged.backbone.layers
    )
    plain = kl.merge(lora, dequantize=True)
    assert not [
        layer
        for _, layer in walk.iter_layers(plain)
        if getattr(layer, "quantization_mode", None)
    ]
    if mode == "int4":
        # int4 bases are weight-only: the float model (W_deq + s A B) is
        # the LoRA model.
        assert_close(np_(plain(x)), trained, ulps=1024)
    else:
        # The int8 base also quantizes its inputs (W8A8); the float model
        # does not: a difference of the activations' rounding.
        assert_close(np_(plain(x)), trained, ulps=2**18)
    import tensorflow as tf

    # The float export is the float merge, W_deq + s A B.
    # check_inputs checks it against that merged model (for int8 not the
    # LoRA model, by the activations' rounding).
    folder = str(tmp_path / "float")
    export = kl.export_saved_model(
        lora, folder, dequantize=True, check_inputs=x
    )
    assert export.max_abs_diff <= 1e-4 * export.output_max_abs
    loaded = tf.saved_model.load(folder)
    assert_close(np_(loaded.serve(x)), np_(plain(x)), ulps=1024)
    # The quantized export is the re-quantized merge (not the LoRA model:
    # re-quantizing rounds part of the update away, as the warning says).
    folder = str(tmp_path / "quantized")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kl.QuantizedMergeWarning)
        kl.export_saved_model(lora, folder, check_inputs=x)
    loaded = tf.saved_model.load(folder)
    served = np_(loaded.serve(x))
    assert_close(served, np_(merged(x)), ulps=1024)
