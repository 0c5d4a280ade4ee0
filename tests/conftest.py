"""Test configuration: backend header, `gpu` / `slow` markers, `--check-gpu`."""

import os

import keras
import numpy as np
import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--check-gpu",
        action="store_true",
        help="fail (instead of skip) the gpu tests when no GPU is visible",
    )


def gpu_available():
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def pytest_report_header(config):
    return (
        f"keras {keras.__version__}, backend {keras.backend.backend()}, "
        f"KERAS_BACKEND={os.environ.get('KERAS_BACKEND')}"
    )


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    if config.getoption("--check-gpu"):
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.usefixtures("_fail_without_gpu"))
        return
    skip = pytest.mark.skip(reason="no GPU visible (use --check-gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def _fail_without_gpu():
    pytest.fail("--check-gpu: this gpu test found no GPU")


@pytest.fixture(autouse=True)
def _reset_keras_state():
    """Each test starts from float32 and a fixed seed."""
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


# Backend quirks seen in this run: configurations where a plain Keras layer
# itself disagrees with a NumPy oracle or cannot run. Tests hold the LoRA
# layer to the plain layer there and record what they saw; the list is
# printed at the end of the run (docs/layers.md says what was seen where).
_BACKEND_QUIRKS = []


@pytest.fixture
def backend_quirk(request, record_property):
    def record(kind, config, detail):
        keys = (
            "strides",
            "dilation_rate",
            "padding",
            "groups",
            "data_format",
            "kernel_size",
        )
        shown = {k: config[k] for k in keys if k in config}
        entry = (
            f"{keras.backend.backend()}: {kind}: {request.node.name} "
            f"{shown} ({detail})"
        )
        _BACKEND_QUIRKS.append(entry)
        record_property("backend_quirk", entry)

    return record


def pytest_terminal_summary(terminalreporter):
    if not _BACKEND_QUIRKS:
        return
    terminalreporter.section("backend quirks (LoRA held to the plain layer)")
    for entry in _BACKEND_QUIRKS:
        terminalreporter.write_line(entry)
