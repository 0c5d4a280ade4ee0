"""Compiled functions follow every adapter change (case C19).

A and B are variables, read by compiled `predict`/`fit`/`generate` at every
call; a layer's scaling and merged flag are Python values traced into them.
Switching between adapters of equal scaling must therefore not retrace
anything, and every change of a traced value must reset the functions that
captured it, a keras-hub task's `generate` included, whichever model object
(task or backbone) the change was made through.
"""

import keras
import numpy as np
import pytest
from conftest import to_numpy
from models import causal_lm_batch
from models import tiny_gemma_causal_lm
from numerics import assert_close
from numerics import assert_exact
from numerics import close

import keras_lora as kl
from keras_lora import multi

COMPILED = keras.backend.backend() != "torch"


class CountCalls(keras.layers.Layer):
    """Identity; counts how often its `call` runs in Python (once per trace
    under `jax.jit` / `tf.function`, once per call in eager PyTorch)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.count = 0

    def call(self, x):
        self.count += 1
        return x


def dense_with_two_adapters(rng, alpha_b=None, tmp_path=None):
    """C19's model: Dense(8 -> 4), rank 2, adapters "default" and "b"."""
    inputs = keras.Input((8,))
    counter = CountCalls()
    outputs = counter(kl.LoRADense(4, rank=2, name="dense")(inputs))
    model = keras.Model(inputs, outputs)
    layer = kl.lora_layers(model)["dense"]
    layer.lora_b.assign(rng.normal(size=(2, 4)).astype("float32"))
    b = {
        "dense.lora_a": rng.normal(size=(8, 2)).astype("float32"),
        "dense.lora_b": rng.normal(size=(2, 4)).astype("float32"),
    }
    if alpha_b is None:
        multi.add_adapter(model, "b", b)
    else:
        # An adapter of another alpha, as a file trained elsewhere gives.
        other = keras.Model(
            inputs := keras.Input((8,)),
            kl.LoRADense(4, rank=2, alpha=alpha_b, name="dense")(inputs),
        )
        for name, variable in (
            kl.lora_layers(other)["dense"].adapter_weights().items()
        ):
            variable.assign(b[f"dense.{name}"])
        kl.save_adapters(other, tmp_path / "b.safetensors")
        multi.add_adapter(model, "b", tmp_path / "b.safetensors")
    model.compile(optimizer="sgd", loss="mse", jit_compile=COMPILED)
    return model, counter


def eager(model, x):
    """The model's output computed outside any compiled function."""
    return to_numpy(model(x, training=False))


def test_c19_switching_adapters_never_retraces(rng):
    """C19: predict after each of 5 switches follows the active adapter,
    with one trace of predict and of fit for the whole sequence."""
    model, counter = dense_with_two_adapters(rng)
    x = rng.normal(size=(4, 8)).astype("float32")
    y = rng.normal(size=(4, 4)).astype("float32")
    model.predict(x, verbose=0)
    model.fit(x, y, epochs=1, verbose=0)
    predict_function = model.predict_function
    train_function = model.train_function
    outputs = {}
    for name in ("b", "default", "b", "default", "b"):
        multi.set_active_adapter(model, name)
        before = counter.count
        predicted = model.predict(x, verbose=0)
        traced = counter.count - before
        # Compiled: no trace at all. Eager PyTorch: the one call itself.
        assert traced == (0 if COMPILED else 1), name
        expected = eager(model, x)
        assert_close(predicted, expected)
        outputs.setdefault(name, predicted)
        assert_exact(predicted, outputs[name])
    assert not close(outputs["b"], outputs["default"])
    before = counter.count
    model.fit(x, y, epochs=1, verbose=0)
    assert counter.count - before == (0 if COMPILED else 1)
    assert model.predict_function is predict_function
    assert model.train_function is train_function


def test_switching_to_another_alpha_retraces_and_follows(rng, tmp_path):
    """An adapter of another alpha changes the traced scaling: the compiled
    functions are reset and predict follows it."""
    model, counter = dense_with_two_adapters(
        rng, alpha_b=8.0, tmp_path=tmp_path
    )
    x = rng.normal(size=(4, 8)).astype("float32")
    model.predict(x, verbose=0)
    layer = kl.lora_layers(model)["dense"]
    for name, scaling in (("b", 4.0), ("default", 1.0), ("b", 4.0)):
        multi.set_active_adapter(model, name)
        assert layer.scaling == scaling
        assert_close(model.predict(x, verbose=0), eager(model, x))


def test_disable_adapters_under_a_compiled_predict(rng):
    """disable_adapters changes only variables: the compiled predict gives
    the base output inside and the adapter's after, without a retrace."""
    model, counter = dense_with_two_adapters(rng)
    x = rng.normal(size=(4, 8)).astype("float32")
    with_adapter = model.predict(x, verbose=0)
    layer = kl.lora_layers(model)["dense"]
    base = to_numpy(
        keras.ops.add(keras.ops.matmul(x, layer.kernel), layer.bias)
    )
    before = counter.count
    with multi.disable_adapters(model):
        assert_close(model.predict(x, verbose=0), base)
    assert_exact(model.predict(x, verbose=0), with_adapter)
    assert counter.count - before == (0 if COMPILED else 2)


# -- keras-hub generate ------------------------------------------------------


def _prompt():
    """Three prompt tokens, nine to generate."""
    x, _, _ = causal_lm_batch(batch=1, length=12)
    mask = np.zeros((1, 12), "int32")
    mask[:, :3] = 1
    return {"token_ids": x["token_ids"] * mask, "padding_mask": mask}


def _generate(model):
    out = model.generate(_prompt(), stop_token_ids=None)
    return np.asarray(out["token_ids"])


def _retraced(model):
    """`generate` traced afresh for the model's current state."""
    model.generate_function = None
    return _generate(model)


def _random_state(model, seed, scale=2.0):
    rng = np.random.default_rng(seed)
    tensors, _ = kl.adapters.adapter_state(model)
    return {
        k: (rng.normal(size=v.shape) * scale).astype("float32")
        for k, v in tensors.items()
    }


def _assign(model, tensors):
    for path, layer in kl.lora_layers(model).items():
        for name, variable in layer.adapter_weights().items():
            variable.assign(tensors[f"{path}.{name}"])


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory):
    """A tiny GemmaCausalLM, its LoRA clone with two named adapters, and an
    adapter file of another alpha."""
    keras.utils.set_random_seed(0)
    base = tiny_gemma_causal_lm(vocabulary_size=64)
    base.compile(sampler="greedy")
    lora = kl.apply_lora(base, rank=2, alpha=2.0)
    lora.compile(sampler="greedy")
    _assign(lora, _random_state(lora, 1))
    multi.add_adapter(lora, "b", _random_state(lora, 2))
    # A file with the values of "default" but alpha 64 (scaling 32): only the
    # traced scaling tells them apart.
    other = kl.apply_lora(base, rank=2, alpha=64.0)
    _assign(other, _random_state(other, 1))
    directory = tmp_path_factory.mktemp("gen")
    kl.save_adapters(other, directory / "task.safetensors")
    kl.save_adapters(other.backbone, directory / "backbone.safetensors")
    return base, lora, directory


def test_generate_follows_every_adapter_change(causal_lm):
    """keras-hub generate, compiled once, follows set_active_adapter,
    disable_adapters and load_adapters (through the task and through its
    backbone): each result equals generate traced afresh, and differs from
    the one before (so the change is visible in the tokens)."""
    base, lora, directory = causal_lm
    base_tokens = _generate(base)
    seen = [_generate(lora)]
    assert lora.generate_function is not None

    def check(tokens):
        assert_exact(tokens, _retraced(lora))
        return tokens

    multi.set_active_adapter(lora, "b")
    seen.append(check(_generate(lora)))
    with multi.disable_adapters(lora):
        tokens = check(_generate(lora))
        assert_exact(tokens, base_tokens)
    seen.append(check(_generate(lora)))
    assert_exact(seen[-1], seen[1])
    multi.set_active_adapter(lora, "default")
    seen.append(check(_generate(lora)))
    assert_exact(seen[-1], seen[0])
    # The file's adapter, "default" with another alpha, loaded through the
    # backbone: the task's generate follows.
    kl.load_adapters(
        lora.backbone, directory / "backbone.safetensors", adapters="default"
    )
    assert {layer.scaling for layer in kl.lora_layers(lora).values()} == {32.0}
    assert lora.generate_function is None
    seen.append(check(_generate(lora)))
    assert not close(seen[-1], seen[0])
    multi.set_active_adapter(lora, "b")
    kl.load_adapters(lora, directory / "task.safetensors")
    assert multi.active_adapter(lora) == "default"
    assert_exact(check(_generate(lora)), seen[-1])
    assert len({t.tobytes() for t in [base_tokens, *seen[:2], seen[-1]]}) == 4
