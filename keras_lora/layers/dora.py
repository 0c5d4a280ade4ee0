"""DoRA's weight decomposition, in backend ops.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation",
arXiv:2402.09353, eq. 5) adapts a weight as `m * (W + s * A @ B) /
||W + s * A @ B||`: the norm is taken per output unit over the input axes
(per column of the `(d_in, d_out)` matrix the adapter factors, in Keras's
`y = x @ W` orientation) and `m`, one trainable float32 number per output
unit, starts at `||W||`, so a new adapter leaves the output unchanged.

A layer computes `g * (x @ W + s * (x @ A) @ B)` with
`g = m / stop_gradient(||W + s * A @ B||)`: the norm is a constant in the
backward pass, as the paper's section 4.3 suggests and PEFT does. The
column norms come from `||W||^2 + 2 (A^T W) . sB + sB . (A^T A) sB`, so the
`(d_in, d_out)` product `A @ B` is not formed in a forward pass (except
where the update nearly cancels a column of W, see `adapted_norms`); only
`merge` builds the adapted weight.
"""

import math

from keras import ops

__all__ = [
    "adapted_norms",
    "direct_norms",
    "from_matrix",
    "matrix_view",
    "merged_matrix",
    "unit_scale",
]


def _order(a_groups, b_groups):
    return [i for g in a_groups for i in g] + [i for g in b_groups for i in g]


def matrix_view(value, a_groups, b_groups):
    """`value` as the `(d_in, d_out)` matrix its adapter factors.

    Args:
        value: tensor, the base weight.
        a_groups: lists of `value`'s axes that A's non-rank axes cover, in
            flattening order (`LoRALayer.adapter_axis_groups`).
        b_groups: likewise for B.
    """
    order = _order(a_groups, b_groups)
    if order != list(range(len(order))):
        value = ops.transpose(value, order)
    d_in = math.prod(value.shape[: sum(len(g) for g in a_groups)])
    return ops.reshape(value, (d_in, -1))


def from_matrix(matrix, shape, a_groups, b_groups):
    """The inverse of `matrix_view`: a `(d_in, d_out)` tensor back in the
    base weight's `shape` and axis order."""
    order = _order(a_groups, b_groups)
    value = ops.reshape(matrix, [shape[i] for i in order])
    if order == list(range(len(order))):
        return value
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return ops.transpose(value, inverse)


def _safe_ratio(magnitude, norms):
    """`magnitude / norms`, 0 where a column is all zeros (its output is
    zero whatever the scale)."""
    positive = ops.greater(norms, 0)
    return ops.where(
        positive, ops.divide(magnitude, ops.where(positive, norms, 1)), 0
    )


#: Below this fraction of `||W||^2` the expanded form of `||W + A @ B||^2`
#: would carry more than about `eps / CANCELLATION` relative error.
CANCELLATION = 1e-2


def adapted_norms(weight, a, b):
    """`||W + A @ B||` per column, float32, without forming `A @ B`.

    The squared norm is expanded as `||W||^2 + 2 (A^T W) . B + B . (A^T A) B`
    (rank-r products only). Where a column of `W + A @ B` is much smaller
    than the column of `W` (the update nearly cancels it, below
    `CANCELLATION` of `||W||^2`) the expansion loses precision, so the norms
    are then computed directly from `W + A @ B` (one `(d_in, d_out)`
    product, in that case only).

    Args:
        weight: `(d_in, d_out)` tensor, the base weight's matrix view.
        a: `(d_in, r)` tensor.
        b: `(r, d_out)` tensor, the scaling `s` already applied.

    Returns:
        A float32 `(d_out,)` tensor.

    Examples:
        >>> import numpy as np
        >>> from keras import ops
        >>> w = np.eye(3, 2, dtype="float32")
        >>> a, b = np.ones((3, 1), "float32"), np.ones((1, 2), "float32")
        >>> norms = ops.convert_to_numpy(adapted_norms(w, a, b))
        >>> bool(np.allclose(norms, np.linalg.norm(w + a @ b, axis=0)))
        True
    """
    weight = ops.cast(weight, "float32")
    a, b = ops.cast(a, "float32"), ops.cast(b, "float32")
    squares = ops.sum(ops.square(weight), axis=0)
    a_t = ops.transpose(a)
    cross = ops.sum(ops.multiply(ops.matmul(a_t, weight), b), axis=0)
    quadratic = ops.sum(ops.multiply(b, ops.matmul(ops.matmul(a_t, a), b)), 0)
    total = ops.add(squares, ops.add(ops.multiply(cross, 2.0), quadratic))
    cancels = ops.any(ops.less(total, ops.multiply(squares, CANCELLATION)))
    return ops.cond(
        cancels,
        lambda: direct_norms(weight, a, b),
        lambda: ops.sqrt(ops.maximum(total, 0.0)),
    )


def direct_norms(weight, a, b):
    """`||W + A @ B||` per column from the `(d_in, d_out)` sum itself: the
    fallback of `adapted_norms` where the update nearly cancels W."""
    return ops.sqrt(ops.sum(ops.square(ops.add(weight, ops.matmul(a, b))), 0))


def unit_scale(weight, a, b, magnitude):
    """`g = m / stop_gradient(||W + A @ B||)` per output unit, float32
    `(d_out,)` (`b` scaled; `magnitude` any shape of `d_out` numbers)."""
    norms = ops.stop_gradient(adapted_norms(weight, a, b))
    return _safe_ratio(ops.reshape(magnitude, (-1,)), norms)


def merged_matrix(adapted, magnitude):
    """`m * V / ||V||` per column of the float32 `(d_in, d_out)` matrix
    `V = W + s * A @ B` (the merged weight's matrix view)."""
    norms = ops.sqrt(ops.sum(ops.square(adapted), axis=0))
    return ops.multiply(
        adapted, _safe_ratio(ops.reshape(magnitude, (-1,)), norms)
    )
