"""LoRAConv2D: every stride/dilation/padding/groups/data_format Keras takes."""

import itertools

import keras
import numpy as np
import pytest
import reference as ref
from numerics import assert_close
from numerics import assert_exact
from numerics import close

import keras_lora as kl


def np_(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def set_adapters(layer, rng, scale=0.5):
    for w in layer.adapter_weights().values():
        w.assign(rng.normal(size=w.shape).astype("float32") * scale)


def _combos():
    # Keras refuses strides > 1 together with dilation_rate > 1.
    combos = []
    for strides, dilation, padding, groups, data_format in itertools.product(
        [1, 2, (2, 1)],
        [1, 2, (1, 2)],
        ["valid", "same"],
        [1, 2, 4],
        ["channels_last", "channels_first"],
    ):
        if strides != 1 and dilation != 1:
            continue
        combos.append((strides, dilation, padding, groups, data_format))
    return combos


def _plain_conv_error(layer, x):
    """The exception the plain Keras Conv2D with this layer's config raises
    on `x`, or None if it runs. Some backends cannot run some convolutions
    at all (TensorFlow's CPU kernels and NCHW, depending on the build and
    the processor), so this is detected, never assumed: LoRA is held to
    whatever the base layer can do."""
    config = (
        layer.base_config()
        if isinstance(layer, kl.LoRALayer)
        else layer.get_config()
    )
    plain = keras.layers.Conv2D.from_config(config)
    try:
        plain(x)
    except Exception as error:
        return error
    return None


def _check_where_plain_conv_fails(
    layer, x, rng, error, backend_quirk, expected_scale
):
    """The plain Conv2D fails here: the LoRA layer fails the same way (never
    a different result), and the merge math (which needs no convolution) is
    still checked against the oracle."""
    backend_quirk(
        "plain Conv2D raises",
        layer.get_config(),
        f"{type(error).__name__}: {str(error).splitlines()[0][:160]}",
    )
    with pytest.raises(type(error)):
        layer(x)
    set_adapters(layer, rng)
    delta = np_(layer.weight_deltas()["kernel"])
    assert delta.shape == tuple(layer.kernel.shape)
    assert_close(
        delta,
        ref.conv_delta(np_(layer.lora_a), np_(layer.lora_b), expected_scale),
    )
    assert tuple(layer.merge().kernel.shape) == tuple(layer.kernel.shape)


def _plain_keras_lora(layer, x, a, b, s):
    """The LoRA output built from plain Keras Conv2D layers and NumPy only,
    without the layer's own branch code: the base conv, then per group a
    plain conv of that group's input channels with A into `rank` channels
    and a NumPy product with that group's columns of s * B. The per-group
    convs run channels-last on transposed inputs (an ungrouped NCHW conv is
    what some TensorFlow CPU builds cannot run at all)."""
    config = layer.base_config()
    g = layer.groups
    channels_last = layer.data_format == "channels_last"
    base = keras.layers.Conv2D.from_config(config)
    base.build(x.shape)
    base.set_weights([np_(layer.kernel), np_(layer.bias)])
    out = np_(base(x)).astype("float64")
    cg, fg = a.shape[2], layer.filters // g
    for i in range(g):
        xg = (
            x[..., i * cg : (i + 1) * cg]
            if channels_last
            else x[:, i * cg : (i + 1) * cg]
        )
        conv = keras.layers.Conv2D.from_config(
            {
                **config,
                "filters": a.shape[3],
                "groups": 1,
                "use_bias": False,
                "data_format": "channels_last",
                "name": f"a{i}",
            }
        )
        xg = xg if channels_last else np.transpose(xg, (0, 2, 3, 1))
        conv.build(xg.shape)
        conv.set_weights([a])
        h = np_(conv(xg)).astype("float64")
        h = h if channels_last else np.transpose(h, (0, 3, 1, 2))
        bg = s * b[:, i * fg : (i + 1) * fg].astype("float64")
        if channels_last:
            out[..., i * fg : (i + 1) * fg] += h @ bg
        else:
            out[:, i * fg : (i + 1) * fg] += np.einsum("nrhw,rf->nfhw", h, bg)
    return out


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@pytest.mark.parametrize(
    "strides,dilation,padding,groups,data_format", _combos()
)
def test_conv_combination_matches_oracle(
    rng, backend_quirk, strides, dilation, padding, groups, data_format
):
    """Merged == unmerged == NumPy oracle; merged kernel has the base shape.

    Where the plain Keras Conv2D itself disagrees with the NumPy oracle (a
    backend bug, seen on TensorFlow CPU for some NCHW configurations and
    machines, docs/layers.md), the LoRA layer is held to the plain layer
    instead and the configuration is recorded (`backend_quirk`)."""
    layer = kl.LoRAConv2D(
        8,
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
    shape = (2, 9, 8, 4) if data_format == "channels_last" else (2, 4, 9, 8)
    x = rng.normal(size=shape).astype("float32")
    layer.build(x.shape)
    error = _plain_conv_error(layer, x)
    if error is not None:
        _check_where_plain_conv_fails(layer, x, rng, error, backend_quirk, 1.5)
        return
    base_out = np_(layer(x))
    assert tuple(layer.lora_a.shape) == (3, 3, 4 // groups, 2)
    assert tuple(layer.lora_b.shape) == (2, 8)
    kwargs = dict(
        strides=_pair(strides),
        padding=padding,
        dilation_rate=_pair(dilation),
        groups=groups,
        data_format=data_format,
    )
    kernel, bias = np_(layer.kernel), np_(layer.bias)
    # The plain Keras layer with the same weights computes the same.
    assert_exact(np_(layer.unload()(x)), base_out)
    base_ref = ref.conv2d(x, kernel, bias, **kwargs)
    backend_bug = not close(base_out, base_ref)
    if backend_bug:
        backend_quirk(
            "plain Conv2D differs from the NumPy oracle",
            layer.get_config(),
            f"max abs diff {np.abs(base_out - base_ref).max():.3g}",
        )
    set_adapters(layer, rng)
    a, b = np_(layer.lora_a), np_(layer.lora_b)
    # Unmerged oracle (conv into r channels, then 1x1 conv) ...
    unmerged = ref.lora_conv2d(x, kernel, bias, a, b, 1.5, **kwargs)
    # ... equals the merged-kernel oracle.
    merged_ref = ref.conv2d(
        x, kernel + ref.conv_delta(a, b, 1.5), bias, **kwargs
    )
    assert_close(unmerged, merged_ref, dtype="float64")
    out = np_(layer(x))
    if not backend_bug:
        assert_close(out, unmerged)
    else:
        # Held to the plain layers: the base plus the branch computed with
        # plain Keras convolutions in the same configuration.
        assert_close(out, _plain_keras_lora(layer, x, a, b, 1.5))
    assert layer.scaling == 1.5
    merged = layer.merge()
    assert type(merged) is keras.layers.Conv2D
    assert tuple(merged.kernel.shape) == tuple(layer.kernel.shape)
    # The merged kernel against the oracle (no convolution involved).
    assert_close(np_(merged.kernel), kernel + ref.conv_delta(a, b, 1.5))
    assert_close(np_(merged(x)), out)


def test_c07_kernel_sizes_forward_merge_save(rng, tmp_path):
    """C07: kernel sizes (1,1), (1,3), (3,1), (3,3) on (1,7,7,4), 5 filters,
    rank 2: forward, merge and .keras save all work; merged == unmerged."""
    inputs = keras.Input((7, 7, 4))
    layers = [
        kl.LoRAConv2D(5, k, rank=2, name=f"conv_{k[0]}x{k[1]}")
        for k in [(1, 1), (1, 3), (3, 1), (3, 3)]
    ]
    model = keras.Model(inputs, [layer(inputs) for layer in layers])
    x = rng.normal(size=(1, 7, 7, 4)).astype("float32")
    for layer in layers:
        set_adapters(layer, rng)
    outs = [np_(o) for o in model(x)]
    for layer, out in zip(layers, outs, strict=True):
        kh, kw = layer.kernel_size
        assert out.shape == (1, 8 - kh, 8 - kw, 5)
        merged = layer.merge()
        assert tuple(merged.kernel.shape) == (kh, kw, 4, 5)
        assert_close(np_(merged(x)), out)
        assert_close(
            out,
            ref.lora_conv2d(
                x,
                np_(layer.kernel),
                np_(layer.bias),
                np_(layer.lora_a),
                np_(layer.lora_b),
                1.0,
            ),
        )
    path = tmp_path / "conv.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    for got, want in zip(loaded(x), outs, strict=True):
        assert_exact(np_(got), want)
    for layer in layers:
        twin = loaded.get_layer(layer.name)
        assert isinstance(twin, kl.LoRAConv2D)
        assert_exact(np_(twin.lora_b), np_(layer.lora_b))


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_c08_update_has_kernel_shape(rng, backend_quirk, data_format):
    """C08: Conv2D(5, 3), 4 input channels, channels_last (1,8,8,4) and
    channels_first (1,4,8,8): the update has exactly the kernel's shape
    (3,3,4,5) and merged == unmerged in both formats."""
    conv = keras.layers.Conv2D(5, 3, data_format=data_format)
    shape = (1, 8, 8, 4) if data_format == "channels_last" else (1, 4, 8, 8)
    x = rng.normal(size=shape).astype("float32")
    conv.build(x.shape)
    error = _plain_conv_error(conv, x)
    if error is not None:
        layer = kl.LoRAConv2D(5, 3, data_format=data_format, rank=2, alpha=4)
        layer.build(x.shape)
        _check_where_plain_conv_fails(layer, x, rng, error, backend_quirk, 2.0)
        return
    base_out = np_(conv(x))
    layer = kl.LoRAConv2D.from_layer(conv, rank=2, alpha=4)
    assert_exact(np_(layer(x)), base_out)
    set_adapters(layer, rng)
    delta = layer.weight_deltas()["kernel"]
    assert tuple(delta.shape) == (3, 3, 4, 5) == tuple(conv.kernel.shape)
    assert_close(
        np_(delta), ref.conv_delta(np_(layer.lora_a), np_(layer.lora_b), 2.0)
    )
    out = np_(layer(x))
    assert not close(out, base_out)
    assert_close(np_(layer.merge()(x)), out)
    layer.merge_adapter()
    assert_close(np_(layer(x)), out)
    layer.unmerge_adapter()
    assert_exact(np_(layer(x)), out)
