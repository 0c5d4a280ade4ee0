"""merge / unload / merge_adapters at model level."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import to_numpy
from models import bert_batch
from models import causal_lm_batch
from models import randomize_adapters
from models import tiny_bert_classifier
from models import tiny_gemma_causal_lm
from models import tiny_llama3_causal_lm
from models import weights_snapshot
from numerics import assert_close
from numerics import assert_exact

import keras_lora as kl


def _merged_kernel_oracle(layer):
    """NumPy W + s * A @ B in the kernel's own layout (einsum kernels too)."""
    a = to_numpy(layer.lora_a).astype("float64")
    b = to_numpy(layer.lora_b).astype("float64")
    delta = layer.scaling * (a @ b)
    if isinstance(layer, kl.LoRAEinsumDense):
        delta = delta.reshape(layer.in_dims + layer.out_dims)
        delta = delta.transpose(layer.kernel_permutation)
    return to_numpy(layer.kernel) + delta


@pytest.mark.parametrize(
    "factory, targets",
    [
        (
            tiny_gemma_causal_lm,
            ["query", "value", "token_embedding", "ffw_linear"],
        ),
        (tiny_llama3_causal_lm, ["query", "value", "token_embedding"]),
    ],
)
def test_causal_lm_merge_equals_unmerged_and_generates_same_tokens(
    factory, targets, tmp_path
):
    model = factory()
    x, _, _ = causal_lm_batch()
    lora = kl.apply_lora(model, rank=4, targets=targets)
    randomize_adapters(lora)
    lora_snapshot = weights_snapshot(lora)
    merged = kl.merge(lora)
    assert type(merged) is type(model)
    assert not kl.lora_layers(merged)
    assert not any("lora" in v.path for v in merged.weights)
    assert_close(
        to_numpy(merged.predict(x, verbose=0)),
        to_numpy(lora.predict(x, verbose=0)),
    )
    # Merged kernels match an independent NumPy oracle.
    merged_layers = dict(kl.iter_layers(merged))
    for path, layer in kl.lora_layers(lora).items():
        plain = merged_layers[path]
        assert type(plain) is layer.merge_class
        if isinstance(layer, kl.LoRAEinsumDense):
            assert_close(to_numpy(plain.kernel), _merged_kernel_oracle(layer))
    # The LoRA model is untouched by merging.
    for key, (_, value) in lora_snapshot.items():
        variable = next(v for v in lora.weights if id(v) == key)
        assert_exact(to_numpy(variable), value)
    prompt = {
        "token_ids": x["token_ids"][:1],
        "padding_mask": x["padding_mask"][:1],
    }
    lora.compile(sampler="greedy")
    merged.compile(sampler="greedy")
    a = lora.generate(prompt, max_length=6, stop_token_ids=None)
    b = merged.generate(prompt, max_length=6, stop_token_ids=None)
    assert_exact(a["token_ids"], b["token_ids"])


def test_reversible_embedding_untied_has_reverse_adapter():
    """Llama3 unties its logits table: the reverse projection is adapted."""
    lora = kl.apply_lora(
        tiny_llama3_causal_lm(), rank=2, targets=["token_embedding"]
    )
    (layer,) = kl.lora_layers(lora).values()
    assert isinstance(layer, kl.LoRAReversibleEmbedding)
    assert not layer.tie_weights
    assert set(layer.adapter_weights()) == {
        "lora_a",
        "lora_b",
        "reverse_lora_a",
        "reverse_lora_b",
    }


def test_merge_twice_is_refused_and_unload_gives_the_base():
    model = tiny_bert_classifier()
    x, _ = bert_batch()
    base_out = to_numpy(model.predict(x, verbose=0))
    lora = kl.apply_lora(model, rank=2)
    randomize_adapters(lora)
    merged = kl.merge(lora)
    with pytest.raises(ValueError, match="no keras_lora layers"):
        kl.merge(merged)
    unloaded = kl.unload(lora)
    assert type(unloaded) is type(model)
    assert_close(to_numpy(unloaded.predict(x, verbose=0)), base_out)
    assert_close(
        to_numpy(merged.predict(x, verbose=0)),
        to_numpy(lora.predict(x, verbose=0)),
    )


def test_merge_adapters_in_place_round_trip_is_bit_exact(rng):
    """C10 at model level: merge then unmerge restores the kernel exactly."""
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(16)])
    model.layers[0].kernel.assign(rng.normal(size=(16, 16)) * 1e4)
    lora = kl.apply_lora(model, rank=4, inplace=True)
    randomize_adapters(lora, scale=3.0)
    layer = lora.layers[0]
    original = to_numpy(layer.kernel).copy()
    x = rng.normal(size=(3, 16)).astype("float32")
    unmerged_out = to_numpy(lora.predict(x, verbose=0))
    kl.merge_adapters(lora)
    assert layer.merged
    assert_close(to_numpy(lora.predict(x, verbose=0)), unmerged_out)
    with pytest.raises(ValueError, match="already merged"):
        kl.merge_adapters(lora)
    # merge() of an in-place merged model does not add the update twice.
    assert_close(to_numpy(kl.merge(lora).predict(x, verbose=0)), unmerged_out)
    kl.unmerge_adapters(lora)
    assert_exact(to_numpy(layer.kernel), original)
    assert_exact(to_numpy(lora.predict(x, verbose=0)), unmerged_out)


def test_head_survives_merge_save_and_load(tmp_path, rng):
    """C11: frozen base + LoRA + new trainable head, 2 steps, merge, save,
    reload: reloaded merged model equals the unmerged model."""
    inputs = keras.Input((6,))
    features = keras.layers.Dense(8, activation="relu", name="base")(inputs)
    base = keras.Model(inputs, features)
    head = keras.layers.Dense(3, name="head")(base.output)
    model = keras.Model(base.input, head)
    lora = kl.apply_lora(
        model, rank=2, targets=["base"], trainable_layers=["head"]
    )
    assert sorted(
        w.path.split("/")[-2] + "/" + w.name for w in lora.trainable_weights
    ) == ["base/lora_a", "base/lora_b", "head/bias", "head/kernel"]
    head_before = to_numpy(lora.get_layer("head").kernel).copy()
    lora.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    x = rng.normal(size=(8, 6)).astype("float32")
    y = rng.normal(size=(8, 3)).astype("float32")
    lora.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert not np.array_equal(
        to_numpy(lora.get_layer("head").kernel), head_before
    )
    merged = kl.merge(lora)
    path = str(tmp_path / "merged.keras")
    merged.save(path)
    reloaded = keras.saving.load_model(path)
    assert_close(to_numpy(reloaded(x)), to_numpy(lora(x)))


def test_merged_model_loads_without_keras_lora(tmp_path, rng):
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(5), keras.layers.Dense(2)]
    )
    lora = kl.apply_lora(model, rank=2)
    randomize_adapters(lora)
    x = rng.normal(size=(3, 4)).astype("float32")
    expected = to_numpy(lora(x))
    path = tmp_path / "plain.keras"
    kl.merge(lora).save(path)
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["keras_lora"] = None  # any import of keras_lora fails
        import numpy as np, keras
        model = keras.saving.load_model({str(path)!r})
        assert type(model) is keras.Sequential
        x = np.load({str(tmp_path / "x.npy")!r})
        y = keras.ops.convert_to_numpy(model(x))
        np.save({str(tmp_path / "y.npy")!r}, y)
        """
    )
    subprocess.run(
        [sys.executable, "-c", script],
        check=True,
        env=dict(os.environ),
        capture_output=True,
    )
    assert_close(np.load(tmp_path / "y.npy"), expected)
