"""Accelerator checks: bfloat16 and float16 LoRA layers on the GPU.

Every test here is marked `gpu`: skipped on machines without one, a failure
with `--check-gpu`. Run per backend, as the rest of the suite:
`KERAS_BACKEND=jax pytest tests/test_gpu.py --check-gpu`.
"""

import math

import keras
import numpy as np
import pytest
from keras import ops

import keras_lora as kl

pytestmark = pytest.mark.gpu

# Relative Frobenius bound for merged vs unmerged (see docs/layers.md):
# 2**-5 for bfloat16 (8 mantissa bits), 2**-8 for float16 (11 bits).
BOUNDS = {"bfloat16": 2.0**-5, "float16": 2.0**-8}


def np_(x):
    return np.asarray(ops.convert_to_numpy(ops.cast(x, "float32")))


def on_gpu(tensor):
    backend = keras.backend.backend()
    if backend == "jax":
        return all(d.platform == "gpu" for d in tensor.devices())
    if backend == "torch":
        return tensor.device.type == "cuda"
    return "GPU" in tensor.device


def _layer(name, policy):
    if name == "dense":
        layer = kl.LoRADense(64, rank=4, alpha=8, dtype=policy)
        x = np.random.default_rng(0).normal(size=(8, 32))
    elif name == "einsum_dense":
        layer = kl.LoRAEinsumDense(
            "btd,ndh->btnh", (6, 4, 16), rank=4, dtype=policy
        )
        x = np.random.default_rng(0).normal(size=(4, 6, 32))
    elif name == "conv2d":
        layer = kl.LoRAConv2D(16, 3, rank=4, padding="same", dtype=policy)
        x = np.random.default_rng(0).normal(size=(2, 8, 8, 8))
    else:
        layer = kl.LoRAEmbedding(100, 32, rank=4, dtype=policy)
        return layer, np.random.default_rng(0).integers(0, 100, (4, 6))
    return layer, x.astype("float32")


@pytest.mark.parametrize(
    "policy", ["bfloat16", "mixed_bfloat16", "float16", "mixed_float16"]
)
@pytest.mark.parametrize(
    "name", ["dense", "einsum_dense", "conv2d", "embedding"]
)
def test_gpu_low_precision(policy, name):
    """On the accelerator: float32 adapters, finite outputs in the compute
    dtype, merged within the documented bound of unmerged, and Adam moving
    the adapters every step (B from step 1, A once B is non-zero)."""
    layer, x = _layer(name, policy)
    out = layer(x)
    assert on_gpu(out)
    assert layer.lora_a.dtype == layer.lora_b.dtype == "float32"
    compute = keras.mixed_precision.Policy(policy).compute_dtype
    assert keras.backend.standardize_dtype(out.dtype) == compute
    rng = np.random.default_rng(1)
    for w in layer.adapter_weights().values():
        w.assign((rng.normal(size=w.shape) * 0.1).astype("float32"))
    out = np_(layer(x)).astype("float64")
    merged = np_(layer.merge()(x)).astype("float64")
    assert np.all(np.isfinite(out))
    err = np.linalg.norm(merged - out) / np.linalg.norm(out)
    assert err <= BOUNDS[compute], err
    fresh, x = _layer(name, policy)
    inputs = keras.Input(x.shape[1:], dtype=str(x.dtype))
    h = keras.layers.Flatten()(fresh(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, dtype=policy)(h))
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    y = np.ones((x.shape[0], 1), "float32")
    before = [np_(w).copy() for w in (fresh.lora_a, fresh.lora_b)]
    for step in range(3):
        loss = float(model.train_on_batch(x, y))
        assert math.isfinite(loss)
        now = [np_(w).copy() for w in (fresh.lora_a, fresh.lora_b)]
        assert (not np.array_equal(now[0], before[0])) == (step > 0)
        assert not np.array_equal(now[1], before[1])
        before = now
