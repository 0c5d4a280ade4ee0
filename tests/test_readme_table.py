"""The claims the README's comparison table makes about Keras's built-in
LoRA, checked against the installed Keras (the keras_lora column's claims
are tested where the feature is; the table's last column names those tests,
and `test_every_row_names_tests_that_exist` checks that they exist)."""

import inspect
import pathlib
import re

import keras
import numpy as np
from conftest import to_numpy
from numerics import assert_close
from numerics import assert_exact


def test_keras_enable_lora_has_no_dropout_rslora_or_per_layer_rank():
    """Row "dropout, rsLoRA, per-layer rank": Keras's `enable_lora` takes
    only a rank, an alpha and the initializers."""
    parameters = set(
        inspect.signature(keras.layers.Dense.enable_lora).parameters
    )
    assert parameters == {
        "self",
        "rank",
        "lora_alpha",
        "a_initializer",
        "b_initializer",
    }


def test_keras_lora_alpha_is_reset_to_the_rank_in_build():
    """Row "alpha kept as given": Keras's Dense built with lora_rank=2,
    lora_alpha=8 ends up with alpha 2."""
    dense = keras.layers.Dense(4, lora_rank=2, lora_alpha=8)
    dense.build((None, 3))
    assert dense.lora_alpha == 2


def test_keras_lora_keras_reload_re_zeroes_the_adapter(tmp_path):
    """Row "`.keras` reload keeps adapters": Keras folds A·B into the kernel
    when saving and reloads B as zeros, so training cannot resume."""
    inputs = keras.Input((3,))
    dense = keras.layers.Dense(4)
    model = keras.Model(inputs, dense(inputs))
    dense.enable_lora(2)
    dense.lora_kernel_b.assign(np.ones((2, 4), "float32"))
    x = np.random.default_rng(0).normal(size=(2, 3)).astype("float32")
    expected = to_numpy(model(x))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras").layers[-1]
    assert loaded.lora_enabled
    assert_exact(to_numpy(loaded.lora_kernel_b), np.zeros((2, 4), "float32"))
    # The update lives on only folded into the kernel.
    assert_close(to_numpy(loaded(x)), expected)


ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_row_names_tests_that_exist():
    """Each row of the comparison table names, in its "shown by" column,
    tests (`tests/file.py::test_name`) or files that show its keras_lora
    claim, and every one of them exists."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## What it does that the alternatives don't")[1]
    lines = section.split("\n## ")[0].splitlines()
    header, _, *rows = [line for line in lines if line.startswith("|")]
    assert header.rstrip(" |").endswith("shown by"), header
    assert len(rows) >= 10, rows
    for row in rows:
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        assert cells[4], f"no keras_lora claim: {row}"
        references = re.findall(r"`([\w./-]+)(?:::(\w+))?`", cells[-1])
        assert references, f"the row names no test: {row}"
        for path, test in references:
            source = ROOT / path
            assert source.is_file(), f"{cells[0]}: no file {path}"
            if test:
                assert f"def {test}(" in source.read_text(encoding="utf-8"), (
                    f"{cells[0]}: no {test} in {path}"
                )
