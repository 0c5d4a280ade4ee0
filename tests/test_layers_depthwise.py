"""LoRADepthwiseConv1D/2D and LoRASeparableConv1D/2D: every stride,
dilation, padding, depth multiplier and data format Keras takes, against
NumPy oracles (`reference.depthwise_conv_nd`, `separable_conv_nd`) that
convolve each channel alone and never form the merged kernels."""

import itertools

import keras
import numpy as np
import pytest
import reference as ref
from conv_checks import check_outputs
from conv_checks import plain_output
from numerics import assert_close
from numerics import assert_exact

import keras_lora as kl

DEPTHWISE = {1: kl.LoRADepthwiseConv1D, 2: kl.LoRADepthwiseConv2D}
SEPARABLE = {1: kl.LoRASeparableConv1D, 2: kl.LoRASeparableConv2D}


def np_(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _combos():
    combos = []
    for (
        k,
        strides,
        dilation,
        padding,
        multiplier,
        data_format,
    ) in itertools.product(
        [1, 2],
        [1, 2],
        [1, 2],
        ["valid", "same"],
        [1, 2],
        ["channels_last", "channels_first"],
    ):
        # Keras refuses strides > 1 with dilation > 1.
        if strides != 1 and dilation != 1:
            continue
        combos.append((k, strides, dilation, padding, multiplier, data_format))
    return combos


COMBO_NAMES = "k,strides,dilation,padding,multiplier,data_format"


def _input(rng, k, data_format, channels=3):
    spatial = (7,) * k
    shape = (
        (2, *spatial, channels)
        if data_format == "channels_last"
        else (2, channels, *spatial)
    )
    return rng.normal(size=shape).astype("float32")


def _randomize_adapters(layer, rng):
    for w in layer.adapter_weights().values():
        w.assign(rng.normal(size=w.shape).astype("float32") * 0.5)
    return {n: np_(w) for n, w in layer.adapter_weights().items()}


@pytest.mark.parametrize(COMBO_NAMES, _combos())
def test_depthwise_combination_matches_oracle(
    rng, backend_quirk, k, strides, dilation, padding, multiplier, data_format
):
    """Init output == the plain layer; A is `kernel_size + (r,)`, B
    `(r, channels, depth_multiplier)`, the update has the kernel's shape;
    with non-zero adapters the output equals the per-channel NumPy LoRA
    oracle, which equals the oracle on the merged kernel; merge gives the
    plain class with the same output, in-place merge and unmerge too."""
    cls = DEPTHWISE[k]
    layer = cls(
        3,
        strides=strides,
        dilation_rate=dilation,
        padding=padding,
        depth_multiplier=multiplier,
        data_format=data_format,
        bias_initializer="random_normal",
        rank=2,
        alpha=3,
    )
    x = _input(rng, k, data_format)
    layer.build(x.shape)
    assert tuple(layer.kernel.shape) == (3,) * k + (3, multiplier)
    assert tuple(layer.lora_a.shape) == (3,) * k + (2,)
    assert tuple(layer.lora_b.shape) == (2, 3, multiplier)
    plain_out = plain_output(layer, x, backend_quirk)
    adapters = _randomize_adapters(layer, rng)
    a, b = adapters["lora_a"], adapters["lora_b"]
    kernel, bias = np_(layer.kernel), np_(layer.bias)
    delta = ref.conv_delta(a, b, 1.5)
    assert delta.shape == kernel.shape
    assert_close(np_(layer.weight_deltas()["kernel"]), delta)
    merged = layer.merge()
    assert type(merged) is cls.base_class
    assert_close(np_(merged.kernel), kernel + delta)
    if plain_out is None:
        return
    kwargs = dict(
        strides=strides,
        padding=padding,
        dilation_rate=dilation,
        data_format=data_format,
    )
    base_ref = ref.depthwise_conv_nd(x, kernel, bias, **kwargs)
    unmerged = ref.lora_depthwise_conv_nd(x, kernel, bias, a, b, 1.5, **kwargs)
    assert_close(
        unmerged,
        ref.depthwise_conv_nd(x, kernel + delta, bias, **kwargs),
        dtype="float64",
    )
    check_outputs(
        layer, merged, x, plain_out, base_ref, unmerged, backend_quirk
    )


@pytest.mark.parametrize(COMBO_NAMES, _combos())
def test_separable_combination_matches_oracle(
    rng, backend_quirk, k, strides, dilation, padding, multiplier, data_format
):
    """Both kernels adapted: the depthwise pair as in LoRADepthwiseConv,
    the pointwise pair `(1,) * k + (c * m, r)` x `(r, filters)`; each
    update has its kernel's shape; the output equals the NumPy oracle
    (adapted depthwise output, then the adapted pointwise map), which
    equals the separable oracle on the merged kernels; merged == unmerged."""
    cls = SEPARABLE[k]
    layer = cls(
        5,
        3,
        strides=strides,
        dilation_rate=dilation,
        padding=padding,
        depth_multiplier=multiplier,
        data_format=data_format,
        bias_initializer="random_normal",
        rank=2,
        alpha=3,
    )
    x = _input(rng, k, data_format)
    layer.build(x.shape)
    shapes = {n: tuple(w.shape) for n, w in layer.adapter_weights().items()}
    assert shapes == {
        "lora_a": (1,) * k + (3 * multiplier, 2),
        "lora_b": (2, 5),
        "depthwise_lora_a": (3,) * k + (2,),
        "depthwise_lora_b": (2, 3, multiplier),
    }
    plain_out = plain_output(layer, x, backend_quirk)
    adapters = _randomize_adapters(layer, rng)
    depthwise = np_(layer.depthwise_kernel)
    pointwise = np_(layer.pointwise_kernel)
    bias = np_(layer.bias)
    deltas = {
        "depthwise_kernel": ref.conv_delta(
            adapters["depthwise_lora_a"], adapters["depthwise_lora_b"], 1.5
        ),
        "pointwise_kernel": ref.conv_delta(
            adapters["lora_a"], adapters["lora_b"], 1.5
        ),
    }
    got = layer.weight_deltas()
    assert sorted(got) == sorted(deltas)
    for name, delta in deltas.items():
        assert delta.shape == tuple(layer.base_weights()[name].shape)
        assert_close(np_(got[name]), delta)
    merged = layer.merge()
    assert type(merged) is cls.base_class
    assert_close(
        np_(merged.depthwise_kernel), depthwise + deltas["depthwise_kernel"]
    )
    assert_close(
        np_(merged.pointwise_kernel), pointwise + deltas["pointwise_kernel"]
    )
    if plain_out is None:
        return
    kwargs = dict(
        strides=strides,
        padding=padding,
        dilation_rate=dilation,
        data_format=data_format,
    )
    base_ref = ref.separable_conv_nd(x, depthwise, pointwise, bias, **kwargs)
    unmerged = ref.lora_separable_conv_nd(
        x, depthwise, pointwise, bias, adapters, 1.5, **kwargs
    )
    assert_close(
        unmerged,
        ref.separable_conv_nd(
            x,
            depthwise + deltas["depthwise_kernel"],
            pointwise + deltas["pointwise_kernel"],
            bias,
            **kwargs,
        ),
        dtype="float64",
    )
    check_outputs(
        layer, merged, x, plain_out, base_ref, unmerged, backend_quirk
    )


@pytest.mark.parametrize("cls", [*DEPTHWISE.values(), *SEPARABLE.values()])
def test_from_layer_shares_variables_and_starts_at_the_base(rng, cls):
    """`from_layer` on a built plain layer shares its variables (all of a
    separable conv's kernels) and returns exactly its output at B = 0."""
    k = 1 if "1D" in cls.__name__ else 2
    args = (3,) if cls in DEPTHWISE.values() else (4, 3)
    base = cls.base_class(*args, padding="same", depth_multiplier=2)
    x = rng.normal(size=(2,) + (5,) * k + (3,)).astype("float32")
    expected = np_(base(x))
    layer = cls.from_layer(base, rank=2)
    for w in base.weights:
        assert layer.base_weights()[w.name] is w
        assert not w.trainable
    assert_exact(np_(layer(x)), expected)


def test_separable_fit_trains_both_pairs_and_nothing_else(rng):
    """One fit of a separable conv changes its four adapter variables and
    leaves both kernels and the bias bit for bit."""
    layer = kl.LoRASeparableConv2D(
        4, 3, rank=2, lora_b_initializer="random_normal"
    )
    model = keras.Sequential([keras.Input((6, 6, 3)), layer])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    base = {n: np_(w).copy() for n, w in layer.base_weights().items()}
    adapters = {n: np_(w).copy() for n, w in layer.adapter_weights().items()}
    x = rng.normal(size=(4, 6, 6, 3)).astype("float32")
    y = rng.normal(size=(4, 4, 4, 4)).astype("float32")
    model.fit(x, y, epochs=1, verbose=0)
    for name, value in base.items():
        assert np_(layer.base_weights()[name]).tobytes() == value.tobytes()
    for name, value in adapters.items():
        assert not np.array_equal(np_(layer.adapter_weights()[name]), value)


def _cnn():
    images = keras.Input((8, 8, 3))
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(images)
    h = keras.layers.SeparableConv2D(4, 3, padding="same", name="sep")(h)
    h = keras.layers.SeparableConv1D(3, 2, name="sep1")(
        keras.layers.Reshape((36, 4))(h)
    )
    return keras.Model(images, h)


def test_adapter_file_and_keras_file_round_trips(rng, tmp_path):
    """A CNN of depthwise and separable convolutions: `apply_lora` adapts
    them all (init == base); trained-like adapters saved to an adapter
    file load into a model rebuilt from scratch (same outputs, every pair
    restored), the `.keras` file reloads them too, and the merged model
    (plain Keras layers) gives the adapted outputs."""
    keras.utils.set_random_seed(1)
    model = _cnn()
    x = rng.normal(size=(2, 8, 8, 3)).astype("float32")
    base_out = np_(model(x))
    lora = kl.apply_lora(model, rank=2, targets="all-conv")
    layers = kl.lora_layers(lora)
    assert {p: type(v).__name__ for p, v in layers.items()} == {
        "dw": "LoRADepthwiseConv2D",
        "sep": "LoRASeparableConv2D",
        "sep1": "LoRASeparableConv1D",
    }
    assert_exact(np_(lora(x)), base_out)
    for layer in layers.values():
        _randomize_adapters(layer, rng)
    out = np_(lora(x))
    path = tmp_path / "adapter.safetensors"
    kl.save_adapters(lora, path)
    keras.utils.set_random_seed(1)
    twin = kl.apply_lora(_cnn(), rank=2, targets="all-conv")
    kl.load_adapters(twin, path)
    for name, layer in kl.lora_layers(twin).items():
        for var, value in layer.adapter_weights().items():
            assert_exact(np_(value), np_(layers[name].adapter_weights()[var]))
    assert_exact(np_(twin(x)), out)
    lora.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert_exact(np_(loaded(x)), out)
    merged = kl.merge(lora)
    assert not kl.lora_layers(merged)
    assert type(merged.get_layer("sep")) is keras.layers.SeparableConv2D
    assert_close(np_(merged(x)), out, scale=float(np.abs(out).max()))
