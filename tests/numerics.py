"""How the tests compare numbers: one tolerance rule, written once.

Floating-point results that come from different but equivalent computations
(a merged kernel against the unmerged branch, a backend against a NumPy
oracle, one thread count against another) differ by rounding. Rounding error
is relative: it scales with the dtype's machine epsilon and with the size of
the numbers involved, not with a fixed absolute amount. So every comparison
here allows

    |actual - expected| <= ulps * eps(dtype) * (|expected| + scale)

elementwise, where ``scale`` is the largest magnitude of the expected values
(the rounding error of a sum or a product of arrays is bounded relative to
the terms' magnitude, and cancellation can leave a small element carrying
the error of a large one). ``ulps`` says how many units of rounding the
operation may accumulate: the default fits the matmuls, convolutions and
einsums of the sizes these tests use; tests that chain many operations (a
whole transformer, a training step) pass a larger count and say why.

Exact equality (``assert_exact``) is for operations that are exact: copies,
reloads, merge then unmerge, the same kernel on the same input.

The rule is a norm-wise bound: an element much smaller than the largest one
is allowed the largest one's rounding. `ulps * eps(dtype)` is capped at 1/16
so that no call can allow errors near the values themselves.
"""

import numpy as np

# Machine epsilon (the spacing of numbers just above 1.0) per dtype name.
# bfloat16 is not a NumPy dtype, so the table is written out.
EPS = {
    "float16": 2.0**-10,
    "bfloat16": 2.0**-7,
    "float32": 2.0**-23,
    "float64": 2.0**-52,
}

# Rounding units a result of one matmul / conv / einsum of the sizes used in
# these tests may carry, relative to the magnitudes involved.
DEFAULT_ULPS = 64


def _as_array(x):
    x = np.asarray(_as_array_keep_dtype(x))
    if np.iscomplexobj(x):
        raise TypeError("complex values are not compared here")
    return x.astype("float64")


def eps(dtype):
    """Machine epsilon of a dtype given by name or NumPy dtype."""
    name = getattr(dtype, "name", None) or str(dtype)
    name = name.replace("mixed_", "")
    if name not in EPS:
        raise ValueError(
            f"`dtype` must be one of {sorted(EPS)}. Received: dtype={dtype}"
        )
    return EPS[name]


def _relative_bound(dtype, ulps):
    ulps = DEFAULT_ULPS if ulps is None else ulps
    k = ulps * eps(dtype)
    # A bound near 1 would pass nearly anything: refuse it.
    if not 0 < k <= 1 / 16:
        raise ValueError(
            f"ulps * eps({dtype}) = {k:.3g} must be in (0, 1/16]: that "
            f"many ulps allow errors near the values themselves. Received: "
            f"ulps={ulps}"
        )
    return k


def tolerance(expected, *, dtype="float32", ulps=None, scale=None):
    """The elementwise bound used by `assert_close`, as an array."""
    expected = _as_array(expected)
    k = _relative_bound(dtype, ulps)
    if scale is None:
        scale = np.max(np.abs(expected), initial=0.0)
    return k * (np.abs(expected) + scale)


def close(actual, expected, *, dtype="float32", ulps=None, scale=None):
    """True where `assert_close` would pass (the same rule, as a bool)."""
    try:
        assert_close(actual, expected, dtype=dtype, ulps=ulps, scale=scale)
    except AssertionError:
        return False
    return True


def assert_close(
    actual, expected, *, dtype="float32", ulps=None, scale=None, err_msg=""
):
    """Asserts equal shapes and values within rounding of `dtype`.

    Args:
        actual: array-like (NumPy, a backend tensor, a Keras variable).
        expected: array-like of the same shape.
        dtype: the dtype the compared computation ran in ("float32" by
            default; "float16", "bfloat16", "float64", or a dtype policy
            name such as "mixed_bfloat16").
        ulps: rounding units allowed (default `DEFAULT_ULPS`);
            `ulps * eps(dtype)` may be at most 1/16.
        scale: the magnitude the error is relative to (default: the largest
            magnitude in `expected`). Pass it where the compared values are
            much smaller than the terms that produced them, e.g. a
            difference of two large outputs.
        err_msg: text added to the failure message.
    """
    a, e = _as_array(actual), _as_array(expected)
    assert a.shape == e.shape, (
        f"shape {a.shape} != expected {e.shape}. {err_msg}"
    )
    finite = np.isfinite(e)
    assert np.array_equal(a[~finite], e[~finite], equal_nan=True) and (
        np.all(np.isfinite(a[finite]))
    ), f"non-finite values differ. {err_msg}"
    if scale is None:
        scale = np.max(np.abs(e[finite]), initial=0.0)
    bound = tolerance(e[finite], dtype=dtype, ulps=ulps, scale=scale)
    a, e = a[finite], e[finite]
    err = np.abs(a - e)
    if np.all(err <= bound):
        return
    worst = int(np.argmax(err - bound))
    raise AssertionError(
        f"not equal within {ulps or DEFAULT_ULPS} ulps of {dtype}: "
        f"{int(np.sum(err > bound))} of {err.size} elements differ; worst "
        f"|actual - expected| = {err.flat[worst]:.3g} at expected value "
        f"{e.flat[worst]:.6g} (allowed {bound.flat[worst]:.3g}; largest "
        f"difference {err.max():.3g}, scale {scale:.3g}). {err_msg}"
    )


def assert_diff_within(max_abs_diff, scale, *, dtype="float32", ulps=None):
    """For reports that give only the largest difference of two outputs and
    the outputs' largest magnitude: the same bound as `assert_close` at its
    loosest element, `2 * ulps * eps(dtype) * scale`."""
    assert max_abs_diff is not None and scale is not None
    k = _relative_bound(dtype, ulps)
    assert 0 <= max_abs_diff <= 2 * k * scale, (
        f"max abs diff {max_abs_diff:.3g} > {2 * k * scale:.3g} "
        f"({ulps or DEFAULT_ULPS} ulps of {dtype} at magnitude {scale:.3g})"
    )


def assert_exact(actual, expected, err_msg=""):
    """Equality of every value (same shape, no broadcasting; NaN == NaN)."""
    a = np.asarray(_as_array_keep_dtype(actual))
    e = np.asarray(_as_array_keep_dtype(expected))
    assert a.shape == e.shape, f"shape {a.shape} != {e.shape}. {err_msg}"
    np.testing.assert_array_equal(a, e, err_msg=err_msg)


def _as_array_keep_dtype(x):
    if isinstance(x, np.ndarray | np.generic | float | int | list | tuple):
        return np.asarray(x)
    import keras

    return keras.ops.convert_to_numpy(x)
