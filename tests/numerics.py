"""How the tests compare numbers: one tolerance rule, written once.

Floating-point results that come from different but equivalent computations
(a merged kernel against the unmerged branch, a backend against a NumPy
oracle, one thread count against another) differ by rounding. Rounding error
is relative: it scales with the dtype's machine epsilon and with the size of
the numbers involved, not with a fixed absolute amount. So every comparison
here allows

    |actual - expected| <= ulps * eps(dtype) * (|expected| + scale)

elementwise, where ``scale`` is the largest magnitude in the compared arrays
(the rounding error of a sum or a product of arrays is bounded relative to
the terms' magnitude, and cancellation can leave a small element carrying
the error of a large one). ``ulps`` says how many units of rounding the
operation may accumulate: the default fits the matmuls, convolutions and
einsums of the sizes these tests use; tests that chain many operations (a
whole transformer, a training step) pass a larger count and say why.

Exact equality (``assert_exact``) is for operations that are exact: copies,
reloads, merge then unmerge, the same kernel on the same input.
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
    return np.asarray(_as_array_keep_dtype(x), dtype="float64")


def eps(dtype):
    """Machine epsilon of a dtype given by name or NumPy dtype."""
    name = getattr(dtype, "name", None) or str(dtype)
    name = name.replace("mixed_", "")
    if name not in EPS:
        raise ValueError(
            f"`dtype` must be one of {sorted(EPS)}. Received: dtype={dtype}"
        )
    return EPS[name]


def tolerance(expected, actual=None, *, dtype="float32", ulps=None, scale=None):
    """The elementwise bound used by `assert_close`, as an array."""
    expected = _as_array(expected)
    if scale is None:
        scale = np.max(np.abs(expected), initial=0.0)
        if actual is not None:
            scale = max(scale, np.max(np.abs(_as_array(actual)), initial=0.0))
    ulps = DEFAULT_ULPS if ulps is None else ulps
    return ulps * eps(dtype) * (np.abs(expected) + scale)


def close(actual, expected, *, dtype="float32", ulps=None, scale=None):
    """True where `assert_close` would pass (same rule, as a bool)."""
    actual, expected = _as_array(actual), _as_array(expected)
    if actual.shape != expected.shape:
        return False
    bound = tolerance(expected, actual, dtype=dtype, ulps=ulps, scale=scale)
    with np.errstate(invalid="ignore"):
        return bool(np.all(np.abs(actual - expected) <= bound))


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
        ulps: rounding units allowed (default `DEFAULT_ULPS`).
        scale: the magnitude the error is relative to (default: the largest
            magnitude in `actual` and `expected`). Pass it where the
            compared values are much smaller than the terms that produced
            them, e.g. a difference of two large outputs.
        err_msg: text added to the failure message.
    """
    actual_arr, expected_arr = _as_array(actual), _as_array(expected)
    assert actual_arr.shape == expected_arr.shape, (
        f"shape {actual_arr.shape} != expected {expected_arr.shape}. {err_msg}"
    )
    assert np.all(np.isfinite(actual_arr) == np.isfinite(expected_arr)), (
        f"non-finite values differ. {err_msg}"
    )
    finite = np.isfinite(expected_arr)
    assert np.all(actual_arr[~finite] == expected_arr[~finite]) or np.all(
        np.isnan(actual_arr[~finite]) & np.isnan(expected_arr[~finite])
    ), f"non-finite values differ. {err_msg}"
    a, e = actual_arr[finite], expected_arr[finite]
    bound = tolerance(e, a, dtype=dtype, ulps=ulps, scale=scale)
    err = np.abs(a - e)
    if np.all(err <= bound):
        return
    worst = int(np.argmax(err - bound))
    raise AssertionError(
        f"not equal within {ulps or DEFAULT_ULPS} ulps of {dtype}: "
        f"{int(np.sum(err > bound))} of {err.size} elements differ; worst "
        f"|actual - expected| = {err.flat[worst]:.3g} at expected value "
        f"{e.flat[worst]:.6g} (allowed {bound.flat[worst]:.3g}; largest "
        f"difference {err.max():.3g}, largest magnitude "
        f"{max(np.abs(e).max(initial=0), np.abs(a).max(initial=0)):.3g}). "
        f"{err_msg}"
    )


def assert_exact(actual, expected, err_msg=""):
    """Bit-for-bit equality (same shape, same values, NaN == NaN)."""
    np.testing.assert_array_equal(
        np.asarray(_as_array_keep_dtype(actual)),
        np.asarray(_as_array_keep_dtype(expected)),
        err_msg=err_msg,
    )


def _as_array_keep_dtype(x):
    if isinstance(x, np.ndarray | np.generic | float | int | list):
        return np.asarray(x)
    import keras

    return keras.ops.convert_to_numpy(x)
