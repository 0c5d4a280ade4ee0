"""Adapter initializations from the base weight: PiSSA, OLoRA, and back.

Both read an adapted base weight `W` as the matrix `M` (d_in, d_out) that its
adapter factors (`LoRALayer.adapter_axis_groups`: A's axes, then B's) and
start the adapter non-zero, with the base weight replaced by the residual
`W - s * A0 @ B0`, so the layer's output at init is the base output:

- PiSSA (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular
  Vectors Adaptation of Large Language Models", arXiv:2404.02948, eq. 2-3):
  with `M = U S V^T`, `A0 = U_r sqrt(S_r / s)` and `B0 = sqrt(S_r / s) V_r^T`,
  so `s * A0 @ B0` is the best rank-r approximation of `M` (PEFT divides the
  singular values by the scaling the same way).
- OLoRA (Buyukakyuz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large
  Language Models", arXiv:2406.01775): with `M^T = Q R` (QR of PEFT's
  (d_out, d_in) weight), `A0 = R_r^T` and `B0 = Q_r^T`: B's rows are
  orthonormal.

An adapter trained from `(A0, B0)` to `(A, B)` changes the original weight by
`s * (A @ B - A0 @ B0)`, a rank-2r LoRA update: `plain_lora_factors` gives its
factors `[A, A0]` and `[B; -B0]` with alpha doubled (times sqrt(2) under
rsLoRA), so the scaling is unchanged, as PEFT's
`path_initial_model_for_weight_conversion` does.
"""

import math

import numpy as np

__all__ = [
    "factor_matrix",
    "from_matrix",
    "matrix_view",
    "olora_factors",
    "pissa_factors",
    "plain_lora_alpha",
    "plain_lora_factors",
]


def _order(a_groups, b_groups):
    return [i for g in a_groups for i in g] + [i for g in b_groups for i in g]


def matrix_view(value, a_groups, b_groups):
    """`value` as the float32 (d_in, d_out) matrix its adapter factors.

    Args:
        value: NumPy array, the base weight.
        a_groups: lists of `value`'s axes that A's non-rank axes cover, in
            flattening order (`LoRALayer.adapter_axis_groups`).
        b_groups: likewise for B.
    """
    moved = np.transpose(
        np.asarray(value, "float32"), _order(a_groups, b_groups)
    )
    d_in = math.prod(moved.shape[: sum(len(g) for g in a_groups)])
    return moved.reshape(d_in, -1)


def from_matrix(matrix, shape, a_groups, b_groups):
    """The inverse of `matrix_view`: a (d_in, d_out) array back in the base
    weight's `shape` and axis order."""
    order = _order(a_groups, b_groups)
    moved = np.reshape(matrix, [shape[i] for i in order])
    return np.transpose(moved, np.argsort(order))


def pissa_factors(matrix, rank, scaling):
    """PiSSA's `(A0, B0)` of a (d_in, d_out) matrix, float32.

    `s * A0 @ B0` is the top-`rank` singular part of `matrix`.
    """
    u, s, vt = np.linalg.svd(np.asarray(matrix, "float32"), full_matrices=False)
    root = np.sqrt(s[:rank] / scaling)
    return (u[:, :rank] * root).astype("float32"), (
        root[:, None] * vt[:rank]
    ).astype("float32")


def olora_factors(matrix, rank, scaling):
    """OLoRA's `(A0, B0)` of a (d_in, d_out) matrix, float32.

    QR of the transposed matrix (PEFT's orientation): `B0 = Q_r^T` has
    orthonormal rows and `A0 = R_r^T`; `scaling` does not enter the
    factors (as in PEFT), only the residual `M - s * A0 @ B0`.
    """
    del scaling
    q, r = np.linalg.qr(np.asarray(matrix, "float32").T)
    return r[:rank].T.astype("float32"), q[:, :rank].T.astype("float32")


_FACTORS = {"pissa": pissa_factors, "olora": olora_factors}


def factor_matrix(init, matrix, rank, scaling):
    """`(A0, B0, residual)` of `matrix` for `init` (`"pissa"`/`"olora"`).

    Raises:
        ValueError: `rank` exceeds `min(d_in, d_out)`, where the
            decomposition has fewer than `rank` components.
    """
    d_in, d_out = matrix.shape
    if rank > min(d_in, d_out):
        raise ValueError(
            f"`init={init!r}` needs rank <= min(d_in, d_out) = "
            f"{min(d_in, d_out)} (the weight is {d_in} x {d_out}). Received: "
            f"rank={rank}"
        )
    a0, b0 = _FACTORS[init](matrix, rank, scaling)
    residual = np.asarray(matrix, "float32") - scaling * (a0 @ b0)
    return a0, b0, residual


def plain_lora_factors(a, b, a0, b0):
    """The rank-2r factors of `s * (A @ B - A0 @ B0)`: `[A, A0]`, `[B; -B0]`.

    Works for any adapter shapes (the rank is A's last and B's first axis).
    """
    return (
        np.concatenate([a, a0], axis=-1),
        np.concatenate([b, -np.asarray(b0)], axis=0),
    )


def plain_lora_alpha(alpha, use_rslora):
    """The alpha that keeps the scaling at rank 2r: `2 * alpha`, or
    `sqrt(2) * alpha` under rsLoRA."""
    return alpha * (math.sqrt(2.0) if use_rslora else 2.0)
