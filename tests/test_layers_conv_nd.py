"""LoRAConv1D and LoRAConv3D: every stride / dilation / padding / groups /
data format Keras takes, against a NumPy oracle for any number of spatial
axes (`reference.conv_nd`); LoRAConv2D has its own file."""

import itertools

import keras
import numpy as np
import pytest
import reference as ref
from conv_checks import check_outputs
from conv_checks import plain_output
from numerics import assert_close
from numerics import assert_exact
from numerics import close

import keras_lora as kl

CLASSES = {1: kl.LoRAConv1D, 3: kl.LoRAConv3D}


def np_(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _combos():
    combos = []
    for k, strides, dilation, padding, groups, data_format in itertools.product(
        [1, 3],
        [1, 2],
        [1, 2],
        ["valid", "same", "causal"],
        [1, 2],
        ["channels_last", "channels_first"],
    ):
        # Keras refuses strides > 1 with dilation > 1; causal is Conv1D's.
        if strides != 1 and dilation != 1 or (padding == "causal" and k != 1):
            continue
        combos.append((k, strides, dilation, padding, groups, data_format))
    return combos


@pytest.mark.parametrize(
    "k,strides,dilation,padding,groups,data_format", _combos()
)
def test_conv_nd_combination_matches_oracle(
    rng, backend_quirk, k, strides, dilation, padding, groups, data_format
):
    """Init output == the plain layer; with non-zero adapters the output
    equals the NumPy LoRA oracle (conv into r channels, then 1x1), which
    equals the oracle on the merged kernel; the merged layer is the plain
    Keras class with the base kernel's shape and the same output.

    Where the plain Keras layer raises on this backend (TensorFlow's CPU
    kernels lack some channels_first / grouped convolutions), the LoRA
    layer raises the same and the merge math is still checked."""
    cls = CLASSES[k]
    layer = cls(
        6,
        3,
        strides=strides,
        dilation_rate=dilation,
        padding=padding,
        groups=groups,
        data_format=data_format,
        bias_initializer="random_normal",
        rank=2,
        alpha=3,
    )
    spatial = (7,) * k
    shape = (
        (2, *spatial, 4) if data_format == "channels_last" else (2, 4, *spatial)
    )
    x = rng.normal(size=shape).astype("float32")
    layer.build(x.shape)
    assert tuple(layer.lora_a.shape) == (3,) * k + (4 // groups, 2)
    assert tuple(layer.lora_b.shape) == (2, 6)
    plain_out = plain_output(layer, x, backend_quirk)
    for w in layer.adapter_weights().values():
        w.assign(rng.normal(size=w.shape).astype("float32") * 0.5)
    a, b = np_(layer.lora_a), np_(layer.lora_b)
    kernel, bias = np_(layer.kernel), np_(layer.bias)
    delta = ref.conv_delta(a, b, 1.5)
    assert tuple(layer.weight_deltas()["kernel"].shape) == kernel.shape
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
        groups=groups,
        data_format=data_format,
    )
    # Where the plain layer itself disagrees with the oracle (a backend
    # bug), the LoRA layer is held to merged == unmerged only.
    base_ref = ref.conv_nd(x, kernel, bias, **kwargs)
    unmerged = ref.lora_conv_nd(x, kernel, bias, a, b, 1.5, **kwargs)
    assert_close(
        unmerged,
        ref.conv_nd(x, kernel + delta, bias, **kwargs),
        dtype="float64",
    )
    check_outputs(
        layer, merged, x, plain_out, base_ref, unmerged, backend_quirk
    )


@pytest.mark.parametrize("k", [1, 3])
def test_conv_nd_from_layer_starts_at_the_base_output(rng, k):
    """`from_layer` on a built plain Conv1D / Conv3D shares its variables
    and, with B = 0, returns exactly the plain layer's output."""
    base = CLASSES[k].base_class(5, 2, padding="same" if k == 3 else "causal")
    x = rng.normal(size=(2,) + (5,) * k + (3,)).astype("float32")
    expected = np_(base(x))
    layer = CLASSES[k].from_layer(base, rank=2)
    assert layer.kernel is base.kernel
    assert_exact(np_(layer(x)), expected)


def test_causal_conv1d_output_ignores_the_future(rng):
    """Causal padding holds for the adapter too: changing the last step
    changes no earlier output step."""
    layer = kl.LoRAConv1D(4, 3, padding="causal", dilation_rate=2, rank=2)
    x = rng.normal(size=(1, 9, 3)).astype("float32")
    layer(x)
    for w in layer.adapter_weights().values():
        w.assign(rng.normal(size=w.shape).astype("float32"))
    y = x.copy()
    y[:, -1] += 10.0
    out_x, out_y = np_(layer(x)), np_(layer(y))
    assert_exact(out_y[:, :-1], out_x[:, :-1])
    assert not close(out_y[:, -1], out_x[:, -1])


def test_apply_lora_adapts_conv1d_conv3d_and_separable_by_default(rng):
    """With no attention layers the default targets every Conv1D, Conv3D,
    separable convolution and Dense; the adapted model starts at the
    plain model's outputs, bit for bit."""
    seq = keras.Input((8, 3))
    vol = keras.Input((4, 4, 4, 2))
    h = keras.layers.Conv1D(4, 3, padding="causal", name="c1")(seq)
    h = keras.layers.SeparableConv1D(4, 3, name="t1")(h)
    v = keras.layers.Conv3D(4, 2, name="c3")(vol)
    out = keras.layers.Dense(2, name="head")(keras.layers.Flatten()(v))
    model = keras.Model([seq, vol], [h, out])
    x = [
        rng.normal(size=(2, 8, 3)).astype("float32"),
        rng.normal(size=(2, 4, 4, 4, 2)).astype("float32"),
    ]
    expected = [np_(o) for o in model(x)]
    lora = kl.apply_lora(model, rank=2)
    kinds = {
        p: type(layer).__name__ for p, layer in kl.lora_layers(lora).items()
    }
    assert kinds == {
        "c1": "LoRAConv1D",
        "t1": "LoRASeparableConv1D",
        "c3": "LoRAConv3D",
        "head": "LoRADense",
    }
    for got, want in zip(lora(x), expected, strict=True):
        assert_exact(np_(got), want)


TRANSPOSED = {
    1: kl.LoRAConv1DTranspose,
    2: kl.LoRAConv2DTranspose,
    3: kl.LoRAConv3DTranspose,
}


def _transpose_combos():
    combos = []
    for (
        k,
        strides,
        dilation,
        padding,
        output_padding,
        data_format,
    ) in itertools.product(
        [1, 2, 3],
        [1, 2],
        [1, 2],
        ["valid", "same"],
        [None, 1],
        ["channels_last", "channels_first"],
    ):
        # Keras: no strides > 1 with dilation > 1; output_padding < strides.
        if strides != 1 and dilation != 1:
            continue
        if output_padding is not None and output_padding >= strides:
            continue
        combos.append(
            (k, strides, dilation, padding, output_padding, data_format)
        )
    return combos


@pytest.mark.parametrize(
    "k,strides,dilation,padding,output_padding,data_format",
    _transpose_combos(),
)
def test_conv_transpose_combination_matches_oracle(
    rng,
    backend_quirk,
    k,
    strides,
    dilation,
    padding,
    output_padding,
    data_format,
):
    """Transposed convolutions: init output == the plain layer; with
    non-zero adapters the output equals the NumPy LoRA oracle (the adjoint
    of the loop convolution, never forming the merged kernel), which equals
    the oracle on the merged kernel; A is `kernel_size + (in_channels, r)`
    and the update has the kernel's `kernel_size + (filters, in_channels)`
    shape; merge gives the plain class with the same output."""
    cls = TRANSPOSED[k]
    layer = cls(
        5,
        3,
        strides=strides,
        dilation_rate=dilation,
        padding=padding,
        output_padding=output_padding,
        data_format=data_format,
        bias_initializer="random_normal",
        rank=2,
        alpha=3,
    )
    spatial = (4,) * k
    shape = (
        (2, *spatial, 3) if data_format == "channels_last" else (2, 3, *spatial)
    )
    x = rng.normal(size=shape).astype("float32")
    layer.build(x.shape)
    assert tuple(layer.kernel.shape) == (3,) * k + (5, 3)
    assert tuple(layer.lora_a.shape) == (3,) * k + (3, 2)
    assert tuple(layer.lora_b.shape) == (2, 5)
    plain_out = plain_output(layer, x, backend_quirk)
    for w in layer.adapter_weights().values():
        w.assign(rng.normal(size=w.shape).astype("float32") * 0.5)
    a, b = np_(layer.lora_a), np_(layer.lora_b)
    kernel, bias = np_(layer.kernel), np_(layer.bias)
    delta = np.swapaxes(ref.conv_delta(a, b, 1.5), -1, -2)
    assert tuple(layer.weight_deltas()["kernel"].shape) == kernel.shape
    assert_close(np_(layer.weight_deltas()["kernel"]), delta)
    merged = layer.merge()
    assert type(merged) is cls.base_class
    assert_close(np_(merged.kernel), kernel + delta)
    if plain_out is None:
        return
    channels_last = data_format == "channels_last"
    out_spatial = (
        plain_out.shape[1:-1] if channels_last else plain_out.shape[2:]
    )
    kwargs = dict(
        strides=strides,
        padding=padding,
        dilation_rate=dilation,
        data_format=data_format,
    )
    base_ref = ref.conv_transpose_nd(x, kernel, bias, out_spatial, **kwargs)
    unmerged = ref.lora_conv_transpose_nd(
        x, kernel, bias, a, b, 1.5, out_spatial, **kwargs
    )
    assert_close(
        unmerged,
        ref.conv_transpose_nd(x, kernel + delta, bias, out_spatial, **kwargs),
        dtype="float64",
    )
    check_outputs(
        layer, merged, x, plain_out, base_ref, unmerged, backend_quirk
    )
