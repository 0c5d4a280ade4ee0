"""`targets="all-conv"`: every convolution layer, on keras-hub's audio
backbones (Whisper's and Moonshine's Conv1D front ends) and a Keras model
with 1-D, 2-D, 3-D, transposed and depthwise convolutions."""

import warnings

import keras
import numpy as np
import pytest
from conftest import to_numpy
from hub_zoo import all_cases
from numerics import assert_close
from numerics import assert_exact
from numerics import close

import keras_lora as kl

CONV = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)


@pytest.mark.parametrize(
    "name, count", [("WhisperBackbone", 2), ("MoonshineBackbone", 3)]
)
def test_keras_hub_audio_front_ends(rng, name, count):
    """Every Conv1D of the backbone is adapted and nothing else; the
    output starts at the base's and, with non-zero adapters, merged ==
    unmerged."""
    case = all_cases()[name]
    model, x = case.build(), case.inputs()
    expected = keras.tree.map_structure(to_numpy, model(x))
    oracle = sorted(
        p for p, lay in kl.iter_layers(model) if isinstance(lay, CONV)
    )
    assert len(oracle) == count
    assert sorted(kl.select_targets(model, "all-conv")) == oracle
    lora = kl.apply_lora(model, rank=2, targets="all-conv")
    layers = kl.lora_layers(lora)
    assert sorted(layers) == oracle
    assert all(isinstance(lay, kl.LoRAConv1D) for lay in layers.values())
    got = keras.tree.map_structure(to_numpy, lora(x))
    keras.tree.map_structure(assert_exact, got, expected)
    for layer in layers.values():
        for w in layer.adapter_weights().values():
            w.assign(rng.normal(size=w.shape).astype("float32") * 0.1)
    adapted = keras.tree.map_structure(to_numpy, lora(x))
    flat = keras.tree.flatten(adapted)
    assert not all(
        close(a, b)
        for a, b in zip(flat, keras.tree.flatten(expected), strict=True)
    )
    merged = keras.tree.map_structure(to_numpy, kl.merge(lora)(x))
    for a, b in zip(keras.tree.flatten(merged), flat, strict=True):
        assert_close(a, b, scale=float(np.abs(b).max()))


def _conv_model():
    seq = keras.Input((8, 3))
    img = keras.Input((6, 6, 2))
    vol = keras.Input((4, 4, 4, 2))
    s = keras.layers.Conv1D(4, 3, padding="causal", name="c1")(seq)
    i = keras.layers.Conv2D(4, 3, name="c2")(img)
    i = keras.layers.Conv2DTranspose(2, 3, name="up")(i)
    i = keras.layers.DepthwiseConv2D(3, name="dw")(i)
    v = keras.layers.Conv3D(4, 2, name="c3")(vol)
    out = keras.layers.Dense(2, name="head")(keras.layers.Flatten()(v))
    return keras.Model([seq, img, vol], [s, i, out])


def test_all_conv_adapts_every_convolution_and_exclude():
    """`all-conv` selects every convolution, the transposed and depthwise
    ones included; `exclude=` leaves one out; combined with a Dense name;
    a kind keras_lora cannot adapt named in `targets` is a TypeError naming
    it and the supported kinds, with the model unchanged."""
    model = _conv_model()
    lora = kl.apply_lora(model, rank=2, targets="all-conv")
    layers = kl.lora_layers(lora)
    assert sorted(layers) == ["c1", "c2", "c3", "dw", "up"]
    assert isinstance(layers["up"], kl.LoRAConv2DTranspose)
    assert isinstance(layers["dw"], kl.LoRADepthwiseConv2D)
    lora = kl.apply_lora(
        model, rank=2, targets=["all-conv", "head"], exclude=["dw"]
    )
    assert sorted(kl.lora_layers(lora)) == ["c1", "c2", "c3", "head", "up"]
    with pytest.raises(ValueError, match="No layer left to adapt"):
        kl.select_targets(model, "all-conv", exclude="all-conv")
    norm_model = keras.Sequential(
        [keras.Input((4,)), keras.layers.LayerNormalization(name="norm")]
    )
    with pytest.raises(TypeError, match=r"norm \(LayerNormalization\)") as info:
        kl.apply_lora(norm_model, rank=2, targets=["norm"])
    assert "DepthwiseConv2D, SeparableConv1D" in str(info.value)
    assert not kl.lora_layers(norm_model)


def test_all_conv_selecting_nothing_is_an_error():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no convolution layer") as info:
        kl.apply_lora(model, rank=2, targets="all-conv")
    assert "targets='all-conv'" in str(info.value)


def test_default_targets_adapt_every_convolution_without_a_warning():
    """With no attention, the default targets every Dense and convolution
    (the depthwise one included) and warns about nothing."""
    model = _conv_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora = kl.apply_lora(model, rank=2)
    assert sorted(kl.lora_layers(lora)) == [
        "c1",
        "c2",
        "c3",
        "dw",
        "head",
        "up",
    ]
