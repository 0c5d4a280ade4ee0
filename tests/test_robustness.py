"""Regression tests for bugs found by attacking apply_lora / merge / unload.

Each test's docstring says what broke before the fix.
"""

import keras
import keras_hub
import numpy as np
import pytest
from conftest import to_numpy
from numerics import assert_close
from numerics import assert_exact

import keras_lora as kl


def _randomize(model, seed=0, scale=0.1):
    rng = np.random.default_rng(seed)
    for layer in kl.lora_layers(model).values():
        for variable in layer.adapter_weights().values():
            variable.assign(
                rng.normal(size=variable.shape, scale=scale).astype("float32")
            )


def _conv_bn_model():
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Dropout(0.5, name="drop")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(2, name="head")(x)
    return keras.Model(inputs, outputs)


def test_fit_does_not_update_frozen_batchnorm_statistics(rng):
    """Broke: apply_lora froze only the variables of a BatchNormalization
    layer, so `fit` ran it in training mode and rewrote its moving mean and
    variance, which are shared with the user's original model (whose
    outputs then changed). Frozen layers now get `trainable=False`, and a
    frozen BatchNormalization runs in inference mode, as in Keras."""
    model = _conv_bn_model()
    x = rng.normal(size=(4, 6, 6, 3)).astype("float32")
    y = rng.normal(size=(4, 2)).astype("float32")
    before_model = to_numpy(model(x))
    stats = [to_numpy(v).copy() for v in model.get_layer("bn").weights]
    lora = kl.apply_lora(model, rank=2, targets=["conv", "head"])
    lora.compile(keras.optimizers.Adam(1e-2), "mse")
    lora.fit(x, y, epochs=2, batch_size=2, verbose=0)
    for before, variable in zip(
        stats, model.get_layer("bn").weights, strict=True
    ):
        assert_exact(to_numpy(variable), before)
    assert_exact(to_numpy(model(x)), before_model)
    assert sorted(v.path for v in lora.trainable_weights) == [
        "conv/lora_a",
        "conv/lora_b",
        "head/lora_a",
        "head/lora_b",
    ]


def test_frozen_layers_stay_frozen_after_keras_reload(tmp_path, rng):
    """Broke: a layer apply_lora did not adapt (here a Conv1D) was frozen by
    variable flags only; after `.keras` save + `load_model` its kernel and
    bias were trainable again, so resumed training updated base weights."""
    inputs = keras.Input((4,))
    x = keras.layers.Dense(8, name="d1")(inputs)
    x = keras.layers.Reshape((8, 1))(x)
    x = keras.layers.Conv1D(3, 1, name="conv1d")(x)
    outputs = keras.layers.Dense(2, name="d2")(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    lora = kl.apply_lora(model, rank=2, targets=["d1", "d2"])
    _randomize(lora)
    x = rng.normal(size=(2, 4)).astype("float32")
    expected = to_numpy(lora(x))
    path = tmp_path / "lora.keras"
    lora.save(path)
    reloaded = keras.saving.load_model(path)
    assert_exact(to_numpy(reloaded(x)), expected)
    trainable = sorted(v.path for v in reloaded.trainable_weights)
    assert trainable == sorted(v.path for v in lora.trainable_weights)
    assert "conv1d/kernel" not in trainable
    kernel = to_numpy(reloaded.get_layer("conv1d").kernel).copy()
    reloaded.compile(keras.optimizers.Adam(1e-2), "mse")
    reloaded.fit(x, np.ones((2, 2), "float32"), verbose=0)
    assert_exact(to_numpy(reloaded.get_layer("conv1d").kernel), kernel)


def test_trainable_layers_head_stays_trainable_after_freezing_fix(rng):
    """Guards the BatchNormalization fix: a layer named in
    `trainable_layers` must not be switched to `trainable=False`."""
    model = _conv_bn_model()
    lora = kl.apply_lora(
        model, rank=2, targets=["conv"], trainable_layers=["head", "bn"]
    )
    assert lora.get_layer("head").trainable
    assert lora.get_layer("bn").trainable
    paths = {v.path for v in lora.trainable_weights}
    assert {"head/kernel", "head/bias", "bn/gamma", "bn/beta"} <= paths


def _tiny_bert_with_preprocessor():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += "the quick brown fox jumps over lazy dog some text".split()
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocab, lowercase=True)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=8
    )
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocab),
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=8,
    )
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=preprocessor, dropout=0.0
    )


def test_keras_hub_lora_model_saves_as_one_keras_file(tmp_path):
    """Broke: `.keras` save of a keras-hub task after apply_lora succeeded,
    but `load_model` failed ("Layer 'query' expected 2 variables, but
    received 0"): the LoRA attention projections are built inside
    TransformerEncoder and are not in the config. The adapted model's config
    now holds the LoRA plan: the file reloads with the adapters, the same
    outputs, the same trainable variables and the same preprocessor (raw
    strings in); the merged model saves and reloads too."""
    classifier = _tiny_bert_with_preprocessor()
    texts = ["some text", "the lazy dog"]
    features = classifier.preprocessor(texts)
    before = to_numpy(classifier(features))
    lora = kl.apply_lora(classifier, rank=2)
    assert lora.preprocessor is classifier.preprocessor
    assert_exact(to_numpy(lora(features)), before)
    _randomize(lora)
    expected = to_numpy(lora(features))
    lora.save(tmp_path / "lora.keras")
    reloaded = keras.saving.load_model(tmp_path / "lora.keras")
    assert isinstance(reloaded, type(classifier))
    assert sorted(kl.lora_layers(reloaded)) == sorted(kl.lora_layers(lora))
    assert_exact(to_numpy(reloaded(features)), expected)
    assert [v.path for v in reloaded.trainable_variables] == [
        v.path for v in lora.trainable_variables
    ]
    assert_close(reloaded.predict(texts, verbose=0), expected)
    merged = kl.merge(lora)
    assert merged.preprocessor is classifier.preprocessor
    assert_close(to_numpy(merged(features)), expected)
    merged.save(tmp_path / "merged.keras")
    reloaded = keras.saving.load_model(tmp_path / "merged.keras")
    assert_close(reloaded.predict(texts, verbose=0), expected)


def _shared_across_nested_models():
    shared = keras.layers.Dense(4, name="shared")
    inner_in = keras.Input((4,))
    first = keras.Model(inner_in, shared(inner_in), name="first")
    second_in = keras.Input((4,))
    second_out = keras.layers.Dense(4, name="d2")(shared(second_in))
    second = keras.Model(second_in, second_out, name="second")
    inputs = keras.Input((4,))
    return keras.Model(inputs, second(first(inputs)), name="outer")


def test_uncloneable_model_errors_name_the_right_remedy(rng):
    """Broke: a layer shared by two nested models cannot be cloned from
    config (the rebuild duplicates it); `merge` then told the user to "Use
    `inplace=True`", an argument `merge` does not have. The message now
    says why and names `merge_adapters`; `apply_lora(inplace=True)` works
    on such a model and in-place merging is exact."""
    model = _shared_across_nested_models()
    x = rng.normal(size=(2, 4)).astype("float32")
    before = to_numpy(model(x))
    with pytest.raises(ValueError, match="inplace=True"):
        kl.apply_lora(model, rank=2)
    assert_exact(to_numpy(model(x)), before)
    lora = kl.apply_lora(model, rank=2, inplace=True)
    _randomize(lora)
    expected = to_numpy(lora(x))
    with pytest.raises(ValueError, match="merge_adapters") as info:
        kl.merge(lora)
    assert "inplace=True" not in str(info.value)
    with pytest.raises(ValueError, match="unmerge_adapters"):
        kl.unload(lora)
    kl.merge_adapters(lora)
    assert_close(to_numpy(lora(x)), expected)


def test_bytes_target_is_reported_whole():
    """Broke: `targets=b"d1"` was iterated byte by byte and the error said
    "Received: targets entry 100"; the bytes object is now named."""
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, name="d1")]
    )
    with pytest.raises(TypeError, match="b'd1'"):
        kl.apply_lora(model, targets=b"d1")


def test_mixed_bfloat16_apply_fit_merge_reload(tmp_path, rng):
    """Checks (no bug found) C02 at model level: under mixed_bfloat16 the
    adapters are float32, fit keeps outputs finite, merge keeps the
    kernel dtype and the .keras reload keeps the policy and outputs."""
    keras.config.set_dtype_policy("mixed_bfloat16")
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16, name="d1")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4, name="d2")(hidden))
    keras.config.set_dtype_policy("float32")
    x = rng.normal(size=(4, 8)).astype("float32")
    lora = kl.apply_lora(model, rank=2)
    for layer in kl.lora_layers(lora).values():
        assert layer.lora_a.dtype == "float32"
        assert layer.dtype_policy.name == "mixed_bfloat16"
    lora.compile(keras.optimizers.Adam(1e-2), "mse")
    lora.fit(x, np.ones((4, 4), "float32"), epochs=2, verbose=0)
    out = to_numpy(lora(x)).astype("float32")
    assert np.isfinite(out).all()
    merged = kl.merge(lora)
    assert merged.get_layer("d1").kernel.dtype == "float32"
    # Computed in bfloat16 (8 mantissa bits) through two layers.
    assert_close(
        to_numpy(merged(x)).astype("float32"), out, dtype="bfloat16", ulps=8
    )
    lora.save(tmp_path / "bf16.keras")
    reloaded = keras.saving.load_model(tmp_path / "bf16.keras")
    assert reloaded.get_layer("d1").dtype_policy.name == "mixed_bfloat16"
    assert_exact(to_numpy(reloaded(x)).astype("float32"), out)


def test_inplace_apply_resets_functions_traced_before(rng):
    """`predict` traced on the base model before `apply_lora(inplace=True)`
    is traced again: it computes with the adapters, as an eager call."""
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="d")(inputs))
    x = rng.normal(size=(2, 4)).astype("float32")
    model.predict(x, verbose=0)
    lora = kl.apply_lora(model, rank=2, targets=["d"], inplace=True)
    layer = kl.lora_layers(lora)["d"]
    layer.lora_b.assign(rng.normal(size=layer.lora_b.shape).astype("float32"))
    assert_close(lora.predict(x, verbose=0), to_numpy(lora(x)))


def test_kept_batchnorm_trains_and_keeps_updating_statistics(rng):
    """`trainable_layers=[<BatchNormalization>]`: gamma and beta train,
    the moving statistics stay non-trainable and `fit` updates them as in
    plain Keras; the model then merges."""
    inputs = keras.Input((4,))
    h = keras.layers.Dense(4, name="d")(inputs)
    outputs = keras.layers.BatchNormalization(name="bn")(h)
    model = keras.Model(inputs, outputs)
    lora = kl.apply_lora(model, rank=2, targets=["d"], trainable_layers=["bn"])
    bn = lora.get_layer("bn")
    assert sorted(v.name for v in bn.trainable_weights) == ["beta", "gamma"]
    assert sorted(v.name for v in bn.non_trainable_weights) == [
        "moving_mean",
        "moving_variance",
    ]
    lora.compile(optimizer="sgd", loss="mse")
    x = rng.normal(loc=3.0, size=(16, 4)).astype("float32")
    lora.fit(x, x, epochs=1, batch_size=8, verbose=0)
    assert np.abs(to_numpy(bn.moving_mean)).max() > 0
    merged = kl.merge(lora)
    assert_close(to_numpy(merged(x)), to_numpy(lora(x)), ulps=256)
