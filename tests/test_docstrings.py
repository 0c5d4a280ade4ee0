"""Every example in keras_lora's docstrings runs as written, on this backend."""

import doctest
import importlib
import pkgutil

import pytest

import keras_lora

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(keras_lora.__path__, "keras_lora.")
)


def test_the_public_api_has_examples():
    """The front door's functions and layers each show a runnable example."""
    finder = doctest.DocTestFinder()
    for name in ("apply_lora", "merge", "LoRADense", "LoRAEinsumDense"):
        tests = finder.find(getattr(keras_lora, name))
        assert any(t.examples for t in tests), name


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module):
    result = doctest.testmod(
        importlib.import_module(module),
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        report=True,
    )
    assert result.failed == 0, f"{result.failed} docstring examples failed"
