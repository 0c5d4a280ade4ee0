"""NumPy oracles for the keras_lora layers.

Every function here is written from the math alone (Hu et al. 2021,
"LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685,
eq. 3, in Keras's `y = x @ W` orientation; rsLoRA scaling from Kalajdzievski
2023, arXiv:2312.03732), in float64 NumPy, without Keras. The tests compare
the layers (merged and unmerged) against these.
"""

import math

import numpy as np

ACTIVATIONS = {
    None: lambda x: x,
    "linear": lambda x: x,
    "relu": lambda x: np.maximum(x, 0.0),
    "tanh": np.tanh,
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
}


def scaling(rank, alpha=None, use_rslora=False):
    """`alpha / rank` (or `alpha / sqrt(rank)`, rsLoRA); None alpha = rank."""
    alpha = rank if alpha is None else alpha
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def f64(x):
    return np.asarray(x, dtype=np.float64)


# -- Dense ------------------------------------------------------------------


def dense(x, kernel, bias=None, a=None, b=None, s=1.0, activation=None):
    """`activation(x @ (W + s * A @ B) + bias)`.

    Args:
        x: (..., d_in). kernel: (d_in, d_out). bias: (d_out,) or None.
        a: (d_in, r) or None (no adapter). b: (r, d_out). s: float.
    """
    w = f64(kernel)
    if a is not None:
        w = w + s * f64(a) @ f64(b)
    y = f64(x) @ w
    if bias is not None:
        y = y + f64(bias)
    return ACTIVATIONS[activation](y)


# -- EinsumDense ------------------------------------------------------------


def split_equation(equation):
    """`(inputs, kernel, outputs)` letters of an EinsumDense equation."""
    lhs, outputs = equation.replace(" ", "").split("->")
    inputs, kernel = lhs.split(",")
    return inputs, kernel, outputs


def einsum_delta(equation, kernel_shape, a, b, s):
    """`s * A @ B` folded into the kernel's shape.

    A's rows run over the kernel's contracted axes and B's columns over its
    output axes, each in the kernel's own axis order (PEFT's matrix view of a
    projection weight).
    """
    inputs, kernel, outputs = split_equation(equation)
    dims = dict(zip(kernel, kernel_shape, strict=True))
    in_axes = [c for c in kernel if c in inputs and c not in outputs]
    out_axes = [c for c in kernel if c in outputs and c not in inputs]
    delta = s * f64(a) @ f64(b)
    delta = delta.reshape([dims[c] for c in in_axes + out_axes])
    # np.einsum transposes into the kernel's axis order.
    return np.einsum(f"{''.join(in_axes + out_axes)}->{kernel}", delta)


def einsum_dense(
    equation, x, kernel, bias=None, a=None, b=None, s=1.0, activation=None
):
    """`activation(einsum(equation, x, W + s * A @ B) + bias)`."""
    w = f64(kernel)
    if a is not None:
        w = w + einsum_delta(equation, w.shape, a, b, s)
    y = np.einsum(equation, f64(x), w)
    if bias is not None:
        y = y + f64(bias)
    return ACTIVATIONS[activation](y)


# -- Conv2D -----------------------------------------------------------------


def _pad_amounts(size, k, stride, dilation, padding):
    if padding == "valid":
        return 0, 0
    effective = (k - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def conv2d(
    x,
    kernel,
    bias=None,
    strides=(1, 1),
    padding="valid",
    dilation_rate=(1, 1),
    groups=1,
    data_format="channels_last",
    activation=None,
):
    """Direct (loop) 2-D convolution as Keras/TensorFlow define it.

    Args:
        x: (n, h, w, c) channels_last or (n, c, h, w) channels_first.
        kernel: (kh, kw, c // groups, filters), Keras's layout.
        padding: "valid" or "same" (TensorFlow's split: extra at the end).
    """
    x = f64(x)
    if data_format == "channels_first":
        x = x.transpose(0, 2, 3, 1)
    w = f64(kernel)
    kh, kw, cg, filters = w.shape
    sh, sw = strides
    dh, dw = dilation_rate
    n, h, wd, c = x.shape
    ph = _pad_amounts(h, kh, sh, dh, padding)
    pw = _pad_amounts(wd, kw, sw, dw, padding)
    x = np.pad(x, ((0, 0), ph, pw, (0, 0)))
    oh = (x.shape[1] - ((kh - 1) * dh + 1)) // sh + 1
    ow = (x.shape[2] - ((kw - 1) * dw + 1)) // sw + 1
    fg = filters // groups
    y = np.zeros((n, oh, ow, filters))
    for g in range(groups):
        xg = x[..., g * cg : (g + 1) * cg]
        wg = w[..., g * fg : (g + 1) * fg]
        for i in range(kh):
            for j in range(kw):
                patch = xg[
                    :,
                    i * dh : i * dh + (oh - 1) * sh + 1 : sh,
                    j * dw : j * dw + (ow - 1) * sw + 1 : sw,
                    :,
                ]
                y[..., g * fg : (g + 1) * fg] += patch @ wg[i, j]
    if bias is not None:
        y = y + f64(bias)
    y = ACTIVATIONS[activation](y)
    if data_format == "channels_first":
        y = y.transpose(0, 3, 1, 2)
    return y


def conv_nd(
    x,
    kernel,
    bias=None,
    strides=1,
    padding="valid",
    dilation_rate=1,
    groups=1,
    data_format="channels_last",
):
    """Direct (loop) convolution over any number of spatial axes (1-D,
    2-D, 3-D), as Keras/TensorFlow define it.

    Args:
        x: (n, *spatial, c) channels_last or (n, c, *spatial) channels_first.
        kernel: (*kernel_size, c // groups, filters), Keras's layout.
        strides, dilation_rate: int or one int per spatial axis.
        padding: "valid", "same" (TensorFlow's split: extra at the end) or
            "causal" (1-D: (k - 1) * dilation zeros before, none after).
    """
    k = kernel.ndim - 2
    x = f64(x)
    if data_format == "channels_first":
        x = np.moveaxis(x, 1, -1)
    w = f64(kernel)
    size = w.shape[:k]
    strides = (strides,) * k if isinstance(strides, int) else tuple(strides)
    dilation = (
        (dilation_rate,) * k
        if isinstance(dilation_rate, int)
        else tuple(dilation_rate)
    )
    if padding == "causal":
        pads = [((size[0] - 1) * dilation[0], 0)]
    else:
        pads = [
            _pad_amounts(
                x.shape[1 + i], size[i], strides[i], dilation[i], padding
            )
            for i in range(k)
        ]
    x = np.pad(x, [(0, 0), *pads, (0, 0)])
    out = [
        (x.shape[1 + i] - ((size[i] - 1) * dilation[i] + 1)) // strides[i] + 1
        for i in range(k)
    ]
    cg, filters = w.shape[-2], w.shape[-1]
    fg = filters // groups
    y = np.zeros((x.shape[0], *out, filters))
    for g in range(groups):
        xg = x[..., g * cg : (g + 1) * cg]
        wg = w[..., g * fg : (g + 1) * fg]
        for offset in np.ndindex(*size):
            index = tuple(
                slice(
                    offset[i] * dilation[i],
                    offset[i] * dilation[i] + (out[i] - 1) * strides[i] + 1,
                    strides[i],
                )
                for i in range(k)
            )
            y[..., g * fg : (g + 1) * fg] += (
                xg[(slice(None), *index)] @ wg[offset]
            )
    if bias is not None:
        y = y + f64(bias)
    if data_format == "channels_first":
        y = np.moveaxis(y, -1, 1)
    return y


def conv_transpose_nd(
    x,
    kernel,
    bias,
    out_spatial,
    strides=1,
    padding="valid",
    dilation_rate=1,
    data_format="channels_last",
):
    """Transposed convolution as the adjoint of `conv_nd`, its definition
    in TensorFlow (the gradient of a convolution with respect to its input).

    `kernel` is Keras's `kernel_size + (filters, in_channels)`: as a
    `conv_nd` kernel it maps a `filters`-channel input of spatial shape
    `out_spatial` to an `in_channels` one of `x`'s spatial shape; the
    result is that linear map's transpose applied to `x`, built column by
    column from the basis of the `filters`-channel space.
    """
    x = f64(x)
    if data_format == "channels_first":
        x = np.moveaxis(x, 1, -1)
    w = f64(kernel)
    filters = w.shape[-2]
    size = math.prod(out_spatial) * filters
    basis = np.eye(size).reshape((size, *out_spatial, filters))
    columns = conv_nd(
        basis,
        w,
        strides=strides,
        padding=padding,
        dilation_rate=dilation_rate,
    )
    assert columns.shape[1:] == x.shape[1:], (columns.shape, x.shape)
    y = np.tensordot(x, columns, axes=(range(1, x.ndim), range(1, x.ndim)))
    y = y.reshape((x.shape[0], *out_spatial, filters))
    if bias is not None:
        y = y + f64(bias)
    if data_format == "channels_first":
        y = np.moveaxis(y, -1, 1)
    return y


def lora_conv_transpose_nd(x, kernel, bias, a, b, s, out_spatial, **kwargs):
    """Unmerged LoRA of a transposed convolution with `conv_transpose_nd`:
    the base, plus a transposed convolution with A (as the kernel
    `swapaxes(A, -1, -2)`, into r channels) followed by B per position."""
    data_format = kwargs.get("data_format", "channels_last")
    base = conv_transpose_nd(x, kernel, bias, out_spatial, **kwargs)
    h = conv_transpose_nd(
        x, np.swapaxes(f64(a), -1, -2), None, out_spatial, **kwargs
    )
    if data_format == "channels_first":
        h = np.moveaxis(h, 1, -1)
    up = h @ f64(b)
    if data_format == "channels_first":
        up = np.moveaxis(up, -1, 1)
    return base + s * up


def lora_conv_nd(x, kernel, bias, a, b, s, **conv_kwargs):
    """`lora_conv2d` for any number of spatial axes, with `conv_nd`:
    conv(x, W) + s * conv1x1(conv(x, A), B), never forming W + s A B."""
    groups = conv_kwargs.get("groups", 1)
    data_format = conv_kwargs.get("data_format", "channels_last")
    base = conv_nd(x, kernel, bias, **conv_kwargs)
    a = f64(a)
    k, r = a.ndim - 2, a.shape[-1]
    h = conv_nd(x, np.concatenate([a] * groups, axis=-1), None, **conv_kwargs)
    up = conv_nd(
        h,
        f64(b).reshape((1,) * k + (r, -1)),
        None,
        groups=groups,
        data_format=data_format,
    )
    return base + s * up


def depthwise_conv_nd(
    x,
    kernel,
    bias=None,
    strides=1,
    padding="valid",
    dilation_rate=1,
    data_format="channels_last",
):
    """Depthwise convolution over 1 or 2 spatial axes, as Keras defines it:
    output channel `c * m + j` is input channel `c` alone convolved (with
    `conv_nd`) with `kernel[..., c, j]`.

    Args:
        x: (n, *spatial, c) channels_last or (n, c, *spatial).
        kernel: (*kernel_size, c, m), Keras's layout.
    """
    x = f64(x)
    if data_format == "channels_first":
        x = np.moveaxis(x, 1, -1)
    w = f64(kernel)
    conv = dict(strides=strides, padding=padding, dilation_rate=dilation_rate)
    y = np.concatenate(
        [
            conv_nd(x[..., c : c + 1], w[..., c : c + 1, :], **conv)
            for c in range(w.shape[-2])
        ],
        axis=-1,
    )
    if bias is not None:
        y = y + f64(bias)
    if data_format == "channels_first":
        y = np.moveaxis(y, -1, 1)
    return y


def lora_depthwise_conv_nd(x, kernel, bias, a, b, s, **conv_kwargs):
    """Unmerged LoRA of a depthwise convolution: the base, plus for each
    input channel c its convolution with A's r spatial filters
    (`kernel_size + (r,)`) mapped by `B[:, c, :]` to its m output channels;
    never forms W + s * A B."""
    data_format = conv_kwargs.pop("data_format", "channels_last")
    base = depthwise_conv_nd(
        x, kernel, bias, data_format=data_format, **conv_kwargs
    )
    x = f64(x)
    if data_format == "channels_first":
        x = np.moveaxis(x, 1, -1)
    a, b = f64(a), f64(b)
    up = np.concatenate(
        [
            conv_nd(x[..., c : c + 1], a[..., None, :], **conv_kwargs)
            @ b[:, c, :]
            for c in range(b.shape[1])
        ],
        axis=-1,
    )
    if data_format == "channels_first":
        up = np.moveaxis(up, -1, 1)
    return base + s * up


def separable_conv_nd(x, depthwise, pointwise, bias, **conv_kwargs):
    """Separable convolution: `depthwise_conv_nd`, then the 1x1
    `pointwise` kernel (strides 1, no padding) and the bias."""
    data_format = conv_kwargs.get("data_format", "channels_last")
    h = depthwise_conv_nd(x, depthwise, None, **conv_kwargs)
    return conv_nd(h, pointwise, bias, data_format=data_format)


def lora_separable_conv_nd(
    x, depthwise, pointwise, bias, adapters, s, **conv_kwargs
):
    """Unmerged LoRA of a separable convolution. `adapters` holds the
    depthwise pair (`depthwise_lora_a`, `depthwise_lora_b`) and the
    pointwise one (`lora_a`, `lora_b`, A `(1,) * k + (c * m, r)`): the
    adapted depthwise output `h` (`lora_depthwise_conv_nd`), then
    `h @ W_p + s * (h @ A_p) @ B_p` over the channel axis."""
    data_format = conv_kwargs.get("data_format", "channels_last")
    h = lora_depthwise_conv_nd(
        x,
        depthwise,
        None,
        adapters["depthwise_lora_a"],
        adapters["depthwise_lora_b"],
        s,
        **conv_kwargs,
    )
    base = conv_nd(h, pointwise, bias, data_format=data_format)
    if data_format == "channels_first":
        h = np.moveaxis(h, 1, -1)
    a = f64(adapters["lora_a"])
    up = (h @ a.reshape(a.shape[-2:])) @ f64(adapters["lora_b"])
    if data_format == "channels_first":
        up = np.moveaxis(up, -1, 1)
    return base + s * up


def conv_delta(a, b, s):
    """`s * tensordot(A, B)`: (kh, kw, c/g, r) x (r, filters) -> kernel."""
    return s * np.tensordot(f64(a), f64(b), axes=1)


def lora_conv2d(x, kernel, bias, a, b, s, **conv_kwargs):
    """PEFT's conv LoRA, computed unmerged: conv(x, W) + s*conv1x1(conv(x,A),B).

    A is applied as a convolution (one copy per group) into r channels per
    group, B as a 1x1 (grouped) convolution from r to filters per group; the
    result is computed without ever forming the merged kernel, so it checks
    that merged == unmerged independently of the layer's code.
    """
    groups = conv_kwargs.get("groups", 1)
    data_format = conv_kwargs.get("data_format", "channels_last")
    base = conv2d(x, kernel, bias, **conv_kwargs)
    a = f64(a)
    r = a.shape[-1]
    a_tiled = np.concatenate([a] * groups, axis=-1)
    h = conv2d(x, a_tiled, None, **conv_kwargs)
    b = f64(b).reshape(1, 1, r, -1)
    up = conv2d(h, b, None, groups=groups, data_format=data_format)
    return base + s * up


# -- Embedding --------------------------------------------------------------


def embedding(ids, table, a=None, b=None, s=1.0):
    """`E[ids] + s * A[ids] @ B`."""
    e = f64(table)
    if a is not None:
        e = e + s * f64(a) @ f64(b)
    return e[np.asarray(ids)]


def reverse_embedding(
    x,
    table=None,
    a=None,
    b=None,
    s=1.0,
    reverse_table=None,
    reverse_a=None,
    reverse_b=None,
    logit_soft_cap=None,
):
    """Logits of a reversible embedding with LoRA.

    Tied (`reverse_table` None): `x @ (E + s * A @ B).T`.
    Untied: `x @ (R + s * A_r @ B_r)` with R (output_dim, input_dim).
    """
    if reverse_table is None:
        e = f64(table)
        if a is not None:
            e = e + s * f64(a) @ f64(b)
        kernel = e.T
    else:
        kernel = f64(reverse_table)
        if reverse_a is not None:
            kernel = kernel + s * f64(reverse_a) @ f64(reverse_b)
    logits = f64(x) @ kernel
    if logit_soft_cap is not None:
        logits = np.tanh(logits / logit_soft_cap) * logit_soft_cap
    return logits
