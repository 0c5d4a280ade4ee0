"""`targets="all-linear"`: every Dense and EinsumDense except the output
head (PEFT's `target_modules="all-linear"`), on keras-hub tasks and
backbones, Keras functional and sequential models."""

import keras
import numpy as np
import pytest
from conftest import to_numpy
from models import bert_batch
from models import causal_lm_batch
from models import tiny_bert_classifier
from models import tiny_gemma_causal_lm
from numerics import assert_exact

import keras_lora as kl
from keras_lora.apply import output_heads

LINEAR = (keras.layers.Dense, keras.layers.EinsumDense)


def linear_paths(model):
    """The oracle: every Dense / EinsumDense path, by a plain walk."""
    return sorted(
        path
        for path, layer in kl.iter_layers(model)
        if isinstance(layer, LINEAR) and layer.built
    )


def test_classifier_head_is_left_out_everything_else_adapted():
    model = tiny_bert_classifier()
    heads = output_heads(model)
    assert [h.name for h in heads] == ["logits"]
    selected = kl.select_targets(model, "all-linear")
    expected = [p for p in linear_paths(model) if not p.endswith("logits")]
    assert sorted(selected) == expected
    # Attention, feed-forward and the pooler: 2 layers x 6 + pooled_dense.
    assert len(expected) == 13


def test_causal_lm_has_no_linear_head_every_projection_adapted():
    """Gemma's logits come from the tied embedding's reverse projection:
    nothing linear is left out, the embedding is not a target."""
    model = tiny_gemma_causal_lm()
    assert output_heads(model) == []
    selected = kl.select_targets(model, "all-linear")
    assert sorted(selected) == linear_paths(model)
    kinds = {p.rsplit("/", 1)[-1] for p in selected}
    assert {"query", "key", "value", "attention_output"} <= kinds
    assert {"ffw_gating", "ffw_gating_2", "ffw_linear"} <= kinds


def test_backbone_alone_has_no_head():
    model = tiny_bert_classifier().backbone
    assert output_heads(model) == []
    assert sorted(kl.select_targets(model, "all-linear")) == linear_paths(model)


def test_sequential_head_behind_an_activation_and_exclude():
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, name="a"),
            keras.layers.Dense(8, name="b"),
            keras.layers.Dense(3, name="out"),
            keras.layers.Activation("softmax"),
        ]
    )
    assert [h.name for h in output_heads(model)] == ["out"]
    assert sorted(kl.select_targets(model, "all-linear")) == ["a", "b"]
    assert list(kl.select_targets(model, ["all-linear"], exclude="a")) == ["b"]


def test_two_output_heads_both_left_out():
    inputs = keras.Input((4,))
    trunk = keras.layers.Dense(8, name="trunk")(inputs)
    left = keras.layers.Dense(2, name="left")(trunk)
    right = keras.layers.Dense(3, name="right")(
        keras.layers.Dropout(0.1)(trunk)
    )
    model = keras.Model(inputs, {"l": left, "r": right})
    assert sorted(h.name for h in output_heads(model)) == ["left", "right"]
    assert list(kl.select_targets(model, "all-linear")) == ["trunk"]


def test_apply_lora_all_linear_trains_and_starts_at_the_base_output():
    model = tiny_bert_classifier()
    x, y = bert_batch()
    base = to_numpy(model(x))
    lora_model = kl.apply_lora(
        model, rank=2, targets="all-linear", trainable_layers=["logits"]
    )
    assert len(kl.lora_layers(lora_model)) == 13
    assert_exact(to_numpy(lora_model(x)), base)
    lora_model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    lora_model.fit(x, y, epochs=2, verbose=0)
    assert not np.array_equal(to_numpy(lora_model(x)), base)


def test_causal_lm_all_linear_generates_after_merge():
    model = tiny_gemma_causal_lm()
    x, _, _ = causal_lm_batch()
    lora_model = kl.apply_lora(model, rank=2, targets="all-linear")
    assert_exact(to_numpy(lora_model(x)), to_numpy(model(x)))
    merged = kl.merge(lora_model)
    assert not any(
        isinstance(lay, kl.LoRALayer) for _, lay in kl.iter_layers(merged)
    )
    assert_exact(to_numpy(merged(x)), to_numpy(model(x)))


def test_subclassed_model_without_a_graph_is_refused():
    class Two(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(4)
            self.out = keras.layers.Dense(2)

        def call(self, x):
            return self.out(self.hidden(x))

    model = Two()
    model(np.ones((1, 3), "float32"))
    with pytest.raises(ValueError, match="needs a functional model"):
        kl.select_targets(model, "all-linear")
    with pytest.raises(ValueError, match="needs a functional model"):
        kl.apply_lora(model, targets="all-linear")
    assert not any(
        isinstance(lay, kl.LoRALayer) for _, lay in kl.iter_layers(model)
    )


def test_head_behind_keras_ops_calls_is_still_the_head():
    inputs = keras.Input((4,))
    trunk = keras.layers.Dense(3, name="trunk")(inputs)
    head = keras.layers.Dense(2, name="head")(trunk)
    for output in (
        keras.ops.squeeze(head[:, :1], -1),
        keras.ops.softmax(head),
        head * 2.0,
    ):
        model = keras.Model(inputs, output)
        assert [h.name for h in output_heads(model)] == ["head"]
        assert list(kl.select_targets(model, "all-linear")) == ["trunk"]


def test_all_linear_selecting_nothing_and_other_spellings():
    only = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="'all-linear'` selects nothing"):
        kl.select_targets(only, "all-linear")
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, name="a"),
            keras.layers.Dense(8, name="b"),
            keras.layers.Dense(3, name="out"),
        ]
    )
    assert sorted(kl.select_targets(model, {"all-linear"})) == ["a", "b"]
    assert sorted(kl.select_targets(model, ("all-linear", "out"))) == [
        "a",
        "b",
        "out",
    ]
    # `exclude="all-linear"` leaves the head only.
    assert list(kl.select_targets(model, ["out", "a"], "all-linear")) == ["out"]
    with pytest.raises(ValueError, match="`exclude` entries match no layer"):
        kl.select_targets(model, "all-linear", exclude="nope")
    lora_model = kl.apply_lora(
        model, targets=["out", "a"], exclude="all-linear"
    )
    assert sorted(kl.lora_layers(lora_model)) == ["out"]
