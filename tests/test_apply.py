"""apply_lora: target selection, cloning without copies, training, errors."""

import dataclasses
import re

import keras
import numpy as np
import pytest
from conftest import to_numpy
from models import bert_batch
from models import causal_lm_batch
from models import randomize_adapters
from models import tiny_bert_classifier
from models import tiny_gemma_causal_lm
from models import tiny_llama3_causal_lm
from models import weights_snapshot
from numerics import assert_close
from numerics import assert_exact
from numerics import close

import keras_lora as kl
from keras_lora.layers.config import LoRAConfig


def mlp(name="mlp"):
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(4, name="out")(x)
    return keras.Model(inputs, outputs, name=name)


def nested_model():
    """A functional model inside a model inside a model (case C05's shape)."""
    inner_in = keras.Input((8,))
    q = keras.layers.Dense(8, name="query_proj")(inner_in)
    v = keras.layers.Dense(8, name="value_proj")(inner_in)
    inner = keras.Model(inner_in, q + v, name="inner")
    middle_in = keras.Input((8,))
    middle = keras.Model(
        middle_in,
        keras.layers.Dense(8, name="mid")(inner(middle_in)),
        name="middle",
    )
    outer_in = keras.Input((8,))
    out = keras.layers.Dense(2, name="head")(middle(outer_in))
    return keras.Model(outer_in, out, name="outer")


@keras.saving.register_keras_serializable(package="keras_lora_tests")
class Tower(keras.layers.Layer):
    """A subclassed layer holding sub-layers as an attribute and in a list."""

    def __init__(self, width=8, depth=2, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.depth = depth
        self.proj = keras.layers.Dense(width, name="proj")
        self.blocks = [
            keras.layers.Dense(width, activation="tanh", name=f"block_{i}")
            for i in range(depth)
        ]

    def build(self, input_shape):
        self.proj.build(input_shape)
        shape = tuple(input_shape[:-1]) + (self.width,)
        for block in self.blocks:
            block.build(shape)

    def call(self, x):
        x = self.proj(x)
        for block in self.blocks:
            x = block(x)
        return x

    def get_config(self):
        return {
            **super().get_config(),
            "width": self.width,
            "depth": self.depth,
        }


def tower_model():
    inputs = keras.Input((6,))
    return keras.Model(inputs, Tower(name="tower")(inputs), name="tower_model")


def test_sequential_stays_sequential_and_shares_weights(rng):
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)]
    )
    x = rng.normal(size=(5, 3)).astype("float32")
    before = to_numpy(model(x))
    lora = kl.apply_lora(model, rank=2)
    # keras_lora's Sequential (its `save` also works across processes).
    assert isinstance(lora, keras.Sequential)
    assert type(lora).__name__ == "Sequential"
    assert lora.get_config() == keras.Sequential.get_config(lora)
    assert lora is not model
    # The original keeps its own plain layers.
    assert [type(layer) for layer in model.layers] == [keras.layers.Dense] * 2
    assert [type(layer) for layer in lora.layers] == [kl.LoRADense] * 2
    # No copy: the LoRA model's base variables are the original's objects.
    for plain, adapted in zip(model.layers, lora.layers, strict=True):
        assert adapted.kernel is plain.kernel
        assert adapted.bias is plain.bias
    assert_exact(to_numpy(lora(x)), before)
    assert sorted(w.name for w in lora.trainable_weights) == [
        "lora_a",
        "lora_a",
        "lora_b",
        "lora_b",
    ]


def test_functional_default_targets_fall_back_to_dense(rng):
    model = mlp()
    lora = kl.apply_lora(model, rank=2)
    assert set(kl.lora_layers(lora)) == {"hidden", "out"}
    x = rng.normal(size=(3, 8)).astype("float32")
    assert_exact(to_numpy(lora(x)), to_numpy(model(x)))


def test_nested_models_reachable_by_path_and_pattern(rng):
    """C05: nested layers are reached by path or pattern; reported."""
    model = nested_model()
    lora = kl.apply_lora(
        model, rank=2, targets=["middle/inner/query_proj", "value_proj"]
    )
    assert set(kl.lora_layers(lora)) == {
        "middle/inner/query_proj",
        "middle/inner/value_proj",
    }
    report = kl.lora_report(lora)
    assert [row["path"] for row in report["layers"]] == [
        "middle/inner/query_proj",
        "middle/inner/value_proj",
    ]
    assert report["adapter_params"] == 2 * (8 * 2 + 2 * 8)
    x = rng.normal(size=(2, 8)).astype("float32")
    randomize_adapters(lora)
    inner = lora.get_layer("middle").get_layer("inner")
    q = inner.get_layer("query_proj")
    expected = to_numpy(model(x))
    assert not close(to_numpy(lora(x)), expected)
    assert type(q) is kl.LoRADense


def test_pattern_that_matches_nothing_lists_layer_paths():
    """C05: 'query', 'value_dense', 'nomatch' match none of
    query_proj / value_proj: an error names them and lists the paths."""
    model = nested_model()
    with pytest.raises(ValueError) as info:
        kl.apply_lora(model, targets=["query", "value_dense", "nomatch"])
    message = str(info.value)
    for pattern in ("'query'", "'value_dense'", "'nomatch'"):
        assert pattern in message
    assert "middle/inner/query_proj" in message
    assert "middle/inner/value_proj" in message
    # Nothing of the model changed.
    assert not kl.lora_layers(model)


@pytest.mark.parametrize(
    "targets, expected",
    [
        ("*/inner/*", {"middle/inner/query_proj", "middle/inner/value_proj"}),
        (
            re.compile(r".*_proj"),
            {"middle/inner/query_proj", "middle/inner/value_proj"},
        ),
        ("inner/query_proj", {"middle/inner/query_proj"}),
        (
            keras.layers.Dense,
            {
                "middle/inner/query_proj",
                "middle/inner/value_proj",
                "middle/mid",
                "head",
            },
        ),
        (lambda path, layer: layer.name == "mid", {"middle/mid"}),
    ],
)
def test_target_kinds(targets, expected):
    lora = kl.apply_lora(nested_model(), rank=2, targets=targets)
    assert set(kl.lora_layers(lora)) == expected


def test_exclude_and_rank_alpha_patterns():
    lora = kl.apply_lora(
        nested_model(),
        rank=2,
        targets=keras.layers.Dense,
        exclude=["head"],
        rank_pattern={"mid": 4},
        alpha_pattern={"*_proj": 8},
    )
    layers = kl.lora_layers(lora)
    assert set(layers) == {
        "middle/inner/query_proj",
        "middle/inner/value_proj",
        "middle/mid",
    }
    assert layers["middle/mid"].adapter_rank == 4
    assert layers["middle/mid"].adapter_alpha == 4  # alpha None -> rank
    assert layers["middle/inner/query_proj"].adapter_rank == 2
    assert layers["middle/inner/query_proj"].scaling == 8 / 2


@pytest.mark.parametrize(
    "kwargs, error, text",
    [
        (dict(targets=[]), ValueError, "targets"),
        (dict(targets=5), TypeError, "targets"),
        (dict(targets=[None]), TypeError, "targets"),
        (dict(targets=[""]), TypeError, "targets"),
        (dict(targets="nomatch"), ValueError, "'nomatch'"),
        (
            dict(targets=keras.layers.LayerNormalization),
            ValueError,
            "LayerNormalization",
        ),
        (dict(exclude=["hidden", "out"]), ValueError, "No layer left"),
        (dict(rank=0), ValueError, "rank=0"),
        (dict(rank=True), ValueError, "rank=True"),
        (dict(alpha=-1), ValueError, "alpha=-1"),
        (dict(dropout=1.0), ValueError, "dropout=1.0"),
        (dict(rank_pattern={"hidden": 0}), ValueError, "rank=0"),
        (dict(rank_pattern=[("hidden", 2)]), TypeError, "rank_pattern"),
        (dict(inplace="yes"), TypeError, "inplace"),
        (dict(trainable_layers=["nohead"]), ValueError, "'nohead'"),
    ],
)
def test_bad_arguments_raise_early_and_change_nothing(kwargs, error, text, rng):
    model = mlp()
    x = rng.normal(size=(2, 8)).astype("float32")
    before = to_numpy(model(x))
    flags = [w.trainable for w in model.weights]
    with pytest.raises(error) as info:
        kl.apply_lora(model, **kwargs)
    assert text in str(info.value)
    assert [w.trainable for w in model.weights] == flags
    assert not kl.lora_layers(model)
    assert_exact(to_numpy(model(x)), before)


def test_unsupported_layer_selected_is_a_type_error():
    inputs = keras.Input((4,))
    x = keras.layers.LayerNormalization(name="norm")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="d")(x))
    with pytest.raises(TypeError, match="norm"):
        kl.apply_lora(model, targets=["norm", "d"])


def test_already_adapted_model_is_refused():
    lora = kl.apply_lora(mlp(), rank=2)
    with pytest.raises(ValueError, match="already has keras_lora layers"):
        kl.apply_lora(lora)


def test_shared_layer_gets_one_adapter_used_at_every_site(rng):
    shared = keras.layers.Dense(8, name="shared")
    a, b = keras.Input((8,)), keras.Input((8,))
    model = keras.Model([a, b], shared(a) - shared(b))
    lora = kl.apply_lora(model, rank=2)
    assert list(kl.lora_layers(lora)) == ["shared"]
    randomize_adapters(lora)
    layer = kl.lora_layers(lora)["shared"]
    xa = rng.normal(size=(3, 8)).astype("float32")
    xb = rng.normal(size=(3, 8)).astype("float32")
    w = to_numpy(layer.kernel) + layer.scaling * to_numpy(
        layer.lora_a
    ) @ to_numpy(layer.lora_b)
    expected = (xa @ w) - (xb @ w)  # biases cancel
    assert_close(to_numpy(lora([xa, xb])), expected)


@pytest.mark.parametrize("inplace", [False, True])
def test_subclassed_layer_with_attribute_and_list_sublayers(inplace, rng):
    model = tower_model()
    x = rng.normal(size=(2, 6)).astype("float32")
    before = to_numpy(model(x))
    lora = kl.apply_lora(model, rank=2, inplace=inplace)
    assert (lora is model) == inplace
    assert set(kl.lora_layers(lora)) == {
        "tower/proj",
        "tower/block_0",
        "tower/block_1",
    }
    assert_exact(to_numpy(lora(x)), before)
    tower = lora.get_layer("tower")
    assert isinstance(tower.blocks[1], kl.LoRADense)
    assert tower.proj is kl.lora_layers(lora)["tower/proj"]
    if not inplace:
        assert type(model.get_layer("tower").proj) is keras.layers.Dense


def _trained_paths(model, fit):
    before = weights_snapshot(model)
    fit()
    return sorted(
        path
        for key, (path, value) in before.items()
        if not np.array_equal(
            value, to_numpy(next(v for v in model.weights if id(v) == key))
        )
    )


@pytest.mark.parametrize(
    "factory", [tiny_gemma_causal_lm, tiny_llama3_causal_lm]
)
def test_keras_hub_causal_lm_default_targets_fit_generate(factory):
    model = factory()
    x, y, w = causal_lm_batch()
    before = to_numpy(model.predict(x, verbose=0))
    lora = kl.apply_lora(model, rank=4)
    # The adapted model's class is a subclass of the model's own whose
    # config also holds the LoRA plan (keras_lora.saving).
    assert isinstance(lora, type(model))
    assert kl.saving.base_class_of(lora) is type(model)
    assert type(lora).__name__ == type(model).__name__
    assert hasattr(lora, "generate")
    paths = sorted(kl.lora_layers(lora))
    assert paths == sorted(
        f"{model.backbone.name}/{block}/{proj}"
        for block in ("decoder_block_0", "decoder_block_1")
        if factory is tiny_gemma_causal_lm
        for proj in ("attention/query", "attention/value")
    ) or paths == sorted(
        f"{model.backbone.name}/transformer_layer_{i}/self_attention/{proj}"
        for i in range(2)
        for proj in ("query", "value")
    )
    assert_exact(to_numpy(lora.predict(x, verbose=0)), before)
    lora.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    changed = _trained_paths(
        lora, lambda: lora.fit(x, y, sample_weight=w, epochs=2, verbose=0)
    )
    adapters = sorted(
        v.path
        for layer in kl.lora_layers(lora).values()
        for v in layer.adapter_weights().values()
    )
    assert changed == adapters
    assert np.isfinite(lora.evaluate(x, y, sample_weight=w, verbose=0))
    prompt = {
        "token_ids": x["token_ids"][:1],
        "padding_mask": x["padding_mask"][:1],
    }
    out = lora.generate(prompt, max_length=6, stop_token_ids=None)
    assert out["token_ids"].shape == (1, 6)


def test_bert_classifier_with_trainable_head():
    model = tiny_bert_classifier()
    x, y = bert_batch()
    before = to_numpy(model.predict(x, verbose=0))
    lora = kl.apply_lora(model, rank=2, trainable_layers=["logits"])
    assert_exact(to_numpy(lora.predict(x, verbose=0)), before)
    layers = kl.lora_layers(lora)
    assert len(layers) == 4 and all(
        p.endswith(("self_attention_layer/query", "self_attention_layer/value"))
        for p in layers
    )
    lora.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    changed = _trained_paths(lora, lambda: lora.fit(x, y, epochs=2, verbose=0))
    head = sorted(v.path for v in lora.get_layer("logits").weights)
    adapters = sorted(
        v.path
        for layer in layers.values()
        for v in layer.adapter_weights().values()
    )
    assert changed == sorted(adapters + head)


def test_training_arg_reaches_converted_layers(rng):
    """Conv2D.call has no `training`; the converted layer's does (dropout)."""
    inputs = keras.Input((6, 6, 2))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 3, name="conv")(inputs))
    lora = kl.apply_lora(model, rank=2, dropout=0.5)
    randomize_adapters(lora, scale=1.0)
    x = rng.normal(size=(2, 6, 6, 2)).astype("float32")
    assert_exact(
        to_numpy(lora(x, training=False)), to_numpy(lora(x, training=False))
    )
    assert not close(
        to_numpy(lora(x, training=True)), to_numpy(lora(x, training=False))
    )


@pytest.mark.slow
def test_jit_compiled_fit_moves_only_adapters(rng):
    """jit_compile=True: XLA on TensorFlow and JAX, torch.compile on torch."""
    model = mlp()
    lora = kl.apply_lora(model, rank=2)
    lora.compile(optimizer="adam", loss="mse", jit_compile=True)
    x = rng.normal(size=(16, 8)).astype("float32")
    y = rng.normal(size=(16, 4)).astype("float32")
    changed = _trained_paths(lora, lambda: lora.fit(x, y, epochs=2, verbose=0))
    assert all(p.endswith(("lora_a", "lora_b")) for p in changed)
    assert len(changed) == 4


def test_inplace_returns_the_model_itself(rng):
    model = mlp()
    x = rng.normal(size=(2, 8)).astype("float32")
    before = to_numpy(model(x))
    same = kl.apply_lora(model, rank=2, inplace=True)
    assert same is model
    assert isinstance(model.get_layer("hidden"), kl.LoRADense)
    assert_exact(to_numpy(model(x)), before)


def test_summary_counts(capsys):
    """C12: the summary counts adapters, trainable and total right."""
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, name="d")]
    )
    lora = kl.apply_lora(model, rank=2)
    report = kl.lora_summary(lora)
    printed = capsys.readouterr().out
    assert "d" in printed and "LoRADense" in printed
    assert report["adapter_params"] == 4 * 2 + 2 * 8
    assert report["trainable_params"] == 24
    assert report["total_params"] == 4 * 8 + 8 + 24
    assert report["trainable_percent"] == pytest.approx(100 * 24 / 64)


def test_converted_layers_use_their_constructors_default_initializers():
    """apply_lora builds adapters with the same default initializers as the
    layer constructors (it once gave ReversibleEmbedding he_uniform for A)."""
    lora = kl.apply_lora(
        tiny_gemma_causal_lm(), rank=2, targets=["token_embedding", "query"]
    )
    for layer in kl.lora_layers(lora).values():
        a_default = type(layer).default_lora_a_initializer
        b_default = LoRAConfig().lora_b_initializer
        config = layer.get_config()
        assert config["lora_a_initializer"] == keras.initializers.serialize(
            keras.initializers.get(a_default)
        )
        assert config["lora_b_initializer"] == keras.initializers.serialize(
            keras.initializers.get(b_default)
        )
    kinds = {type(layer) for layer in kl.lora_layers(lora).values()}
    assert kinds == {kl.LoRAReversibleEmbedding, kl.LoRAEinsumDense}


def test_lora_config_validates_once_and_layers_take_it_keyword_only():
    """One validated config: the same messages from the object, the layer
    constructors and apply_lora; LoRA arguments are keyword-only."""
    assert LoRAConfig(rank=4).resolved_alpha == 4
    assert LoRAConfig(rank=4).scaling == 1
    # alpha=None stays "alpha = rank" through replace.
    assert LoRAConfig().replace(rank=4).scaling == 1.0
    assert LoRAConfig(rank=4, alpha=2, use_rslora=True).scaling == 1.0
    with pytest.raises(ValueError, match=r"`rank`.*Received: rank=0"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match=r"`alpha`.*Received: alpha=-1"):
        kl.LoRADense(2, rank=2, alpha=-1)
    with pytest.raises(ValueError, match=r"`dropout`.*Received: dropout=1"):
        kl.apply_lora(
            keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]),
            dropout=1,
        )
    with pytest.raises(TypeError, match=r"`train_bias`"):
        LoRAConfig(train_bias="yes")
    with pytest.raises(TypeError):
        # units, activation, use_bias, ... then keyword-only LoRA arguments
        kl.LoRADense(
            2,
            None,
            True,
            "glorot_uniform",
            "zeros",
            None,
            None,
            None,
            None,
            None,
            4,
        )
    config = LoRAConfig(rank=2).replace(alpha=8)
    assert (config.rank, config.alpha, config.scaling) == (2, 8, 4.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rank = 3
