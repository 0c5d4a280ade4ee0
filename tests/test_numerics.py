"""The tests' one tolerance rule (tests/numerics.py) and its use everywhere."""

import ast
import pathlib

import numpy as np
import pytest
from numerics import EPS
from numerics import assert_close
from numerics import assert_exact
from numerics import close
from numerics import eps

TESTS = pathlib.Path(__file__).parent


def test_float32_rounding_passes_at_any_magnitude():
    """The issue-11 case: outputs of magnitude ~156 that differ by 3.05e-5
    (8.6e-7 relative, a few float32 ulps) are equal within rounding; the
    same relative error passes at magnitudes 1e-3 and 1e6 too."""
    rng = np.random.default_rng(0)
    for magnitude in (1e-3, 1.0, 156.0, 1e6):
        expected = rng.normal(size=(4, 16)) * magnitude
        noisy = expected * (1 + 8.6e-7 * rng.choice([-1, 1], expected.shape))
        assert_close(noisy.astype("float32"), expected)


def test_real_differences_fail_at_any_magnitude():
    rng = np.random.default_rng(1)
    for magnitude in (1e-3, 1.0, 156.0, 1e6):
        expected = rng.normal(size=(4, 16)) * magnitude
        wrong = expected.copy()
        wrong[1, 3] += 1e-3 * magnitude  # one element off by 0.1 %
        assert not close(wrong, expected)
        with pytest.raises(AssertionError, match="1 of 64 elements differ"):
            assert_close(wrong, expected)


def test_bound_follows_dtype_and_scale():
    assert eps("float32") == 2.0**-23 and eps("mixed_bfloat16") == 2.0**-7
    # One bfloat16 ulp of error passes for bfloat16, fails for float32.
    expected = np.array([1.0, 2.0, 3.0])
    actual = expected * (1 + EPS["bfloat16"])
    assert close(actual, expected, dtype="bfloat16", ulps=4)
    assert not close(actual, expected, dtype="float32")
    # A small value next to large ones may carry the large ones' rounding;
    # `scale` widens the bound for differences of large outputs.
    assert close(np.array([1e-7, 100.0]), np.array([0.0, 100.0]))
    assert not close(np.array([1e-3]), np.array([0.0]))
    assert close(np.array([1e-3]), np.array([0.0]), scale=1e3)
    with pytest.raises(ValueError, match="dtype"):
        eps("int8")
    # A wrong value cannot widen its own bound, and no call may allow
    # errors near the values themselves (ulps * eps capped at 1/16).
    assert not close(3 * expected, expected, dtype="bfloat16", ulps=8)
    with pytest.raises(ValueError, match="ulps"):
        close(expected, expected, dtype="bfloat16", ulps=64)


def test_report_bound_is_relative():
    """`assert_diff_within` (for reports that give only a max abs diff):
    the same diff passes at a large magnitude and fails at a small one."""
    from numerics import assert_diff_within

    assert_diff_within(3.05e-5, 156.0)
    with pytest.raises(AssertionError, match="max abs diff"):
        assert_diff_within(3.05e-5, 1.0)


def test_shapes_and_non_finite_values_must_match():
    with pytest.raises(AssertionError, match="shape"):
        assert_close(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(np.array([np.nan, 1.0]), np.array([0.0, 1.0]))
    assert_close(np.array([np.inf, 1.0]), np.array([np.inf, 1.0]))
    assert_exact(np.array([np.nan, 1.0]), np.array([np.nan, 1.0]))
    assert_close(
        np.array([np.nan, np.inf, 2.0]), np.array([np.nan, np.inf, 2.0])
    )
    assert not close(np.array([np.inf, 5.0]), np.array([1.0, 1.0]))
    with pytest.raises(AssertionError, match="shape"):
        assert_exact(np.zeros((3, 4)), 0.0)
    with pytest.raises(AssertionError):
        assert_exact(np.float32(1.0), np.float32(1.0) + np.float32(2**-23))


def _float_comparisons(path):
    """Calls in a test file that compare floats with a tolerance of their
    own: numpy's allclose / isclose / assert_allclose (any tolerance
    keywords), or atol= / rtol= given to anything."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        if name.split(".")[-1] in (
            "allclose",
            "isclose",
            "assert_allclose",
            "assert_array_almost_equal",
            "assert_almost_equal",
        ):
            found.append(f"{path.name}:{node.lineno} {name}")
        for keyword in node.keywords:
            if keyword.arg in ("atol", "rtol", "abs", "rel"):
                found.append(f"{path.name}:{node.lineno} {keyword.arg}=")
    return found


def test_every_float_comparison_uses_the_one_rule():
    """No test compares floats with a tolerance of its own (a fixed atol is
    wrong for outputs of arbitrary magnitude): every comparison goes
    through tests/numerics.py."""
    found = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name != "numerics.py":
            found += _float_comparisons(path)
    assert not found, found
