"""Adapter checkpoints: save_adapters / load_adapters (keras_lora.adapters)."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import to_numpy
from numerics import assert_close
from numerics import assert_exact
from numerics import close

import keras_lora
from keras_lora import adapters as kla

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def two_dense_model(names=("first", "second"), rank=4, alpha=8.0):
    """Functional model with two same-shaped LoRADense(8) layers."""
    inputs = keras.Input((8,))
    layers = {
        name: keras_lora.LoRADense(8, rank=rank, alpha=alpha, name=name)
        for name in names
    }
    x = layers["first"](inputs)
    outputs = layers["second"](x)
    return keras.Model(inputs, outputs, name="two_dense")


def set_values(model, seed):
    """Deterministic non-zero base weights and adapters."""
    rng = np.random.default_rng(seed)
    for layer in model.layers[1:]:
        for w in layer.weights:
            w.assign(rng.normal(size=w.shape).astype("float32"))


def test_c01_rebuild_from_scratch_matches_by_path(tmp_path):
    """C01: two same-shaped Dense(8), rank 4, non-zero adapters; save, rebuild
    the model from scratch (layers created in the opposite order), load:
    outputs identical, each adapter on the layer with its own path."""
    x = np.random.default_rng(1).normal(size=(2, 8)).astype("float32")
    model = two_dense_model()
    set_values(model, seed=0)
    expected = to_numpy(model(x))
    path = tmp_path / "adapters.safetensors"
    config = keras_lora.save_adapters(model, path)
    assert sorted(config["targets"]) == ["first", "second"]

    # Rebuild: create "second" before "first", so positions differ.
    keras.backend.clear_session()
    inputs = keras.Input((8,))
    second = keras_lora.LoRADense(8, rank=4, alpha=8.0, name="second")
    first = keras_lora.LoRADense(8, rank=4, alpha=8.0, name="first")
    rebuilt = keras.Model(inputs, second(first(inputs)))
    for name in ("first", "second"):
        old, new = model.get_layer(name), rebuilt.get_layer(name)
        new.kernel.assign(old.kernel)
        new.bias.assign(old.bias)
    assert not close(to_numpy(rebuilt(x)), expected)
    loaded = keras_lora.load_adapters(rebuilt, path)
    assert loaded is rebuilt
    assert_exact(to_numpy(rebuilt(x)), expected)
    for name in ("first", "second"):
        assert_exact(
            to_numpy(rebuilt.get_layer(name).lora_b),
            to_numpy(model.get_layer(name).lora_b),
        )


def test_c01_missing_and_misshaped_keys_raise_and_load_nothing(tmp_path):
    """C01: a missing or mis-shaped key raises, listing the differences, and
    the model is unchanged (nothing half-loaded)."""
    model = two_dense_model()
    set_values(model, seed=0)
    path = tmp_path / "adapters.safetensors"
    keras_lora.save_adapters(model, path)

    # Different layer names: every key missing and unexpected.
    inputs = keras.Input((8,))
    renamed = keras.Model(
        inputs,
        keras_lora.LoRADense(8, rank=4, name="other")(
            keras_lora.LoRADense(8, rank=4, name="first")(inputs)
        ),
    )
    before = [to_numpy(w) for w in renamed.weights]
    with pytest.raises(kla.AdapterMismatchError) as info:
        keras_lora.load_adapters(renamed, path)
    message = str(info.value)
    assert "second.lora_a" in message and "other.lora_a" in message
    assert info.value.missing == ["other.lora_a", "other.lora_b"]
    assert info.value.unexpected == ["second.lora_a", "second.lora_b"]
    # "first" matched, but was not loaded either.
    for w, b in zip(renamed.weights, before, strict=True):
        assert_exact(to_numpy(w), b)

    # Same names, other rank: mis-shaped keys.
    inputs = keras.Input((8,))
    rank2 = keras.Model(
        inputs,
        keras_lora.LoRADense(8, rank=2, name="second")(
            keras_lora.LoRADense(8, rank=4, name="first")(inputs)
        ),
    )
    before = [to_numpy(w) for w in rank2.weights]
    with pytest.raises(ValueError, match=r"shape of 'second.lora_a'"):
        keras_lora.load_adapters(rank2, path)
    assert info.type is kla.AdapterMismatchError
    for w, b in zip(rank2.weights, before, strict=True):
        assert_exact(to_numpy(w), b)


def test_c01_load_onto_plain_rebuilt_model_applies_lora(tmp_path):
    """C01: rebuild the plain model from scratch; load_adapters applies LoRA
    with the stored config (paths, rank, alpha) and loads: outputs
    identical. The plain model given is left unchanged."""
    x = np.random.default_rng(1).normal(size=(2, 8)).astype("float32")

    def plain():
        inputs = keras.Input((8,))
        first = keras.layers.Dense(8, name="first")
        second = keras.layers.Dense(8, name="second")
        return keras.Model(inputs, second(first(inputs)))

    base = plain()
    set_values(base, seed=0)
    model = keras_lora.apply_lora(
        base,
        rank=4,
        alpha=8.0,
        targets=["first", "second"],
        rank_pattern={"second": 2},
    )
    rng = np.random.default_rng(9)
    for layer in kla.lora_layers(model).values():
        for w in layer.adapter_weights().values():
            w.assign(rng.normal(size=w.shape).astype("float32"))
    expected = to_numpy(model(x))
    path = tmp_path / "a.safetensors"
    keras_lora.save_adapters(model, path)

    rebuilt = plain()
    for name in ("first", "second"):
        for w, v in zip(
            rebuilt.get_layer(name).weights,
            base.get_layer(name).weights,
            strict=True,
        ):
            w.assign(v)
    plain_out = to_numpy(rebuilt(x))
    loaded = keras_lora.load_adapters(rebuilt, path)
    assert loaded is not rebuilt
    assert loaded.get_layer("second").adapter_rank == 2
    assert_exact(to_numpy(loaded(x)), expected)
    assert_exact(to_numpy(rebuilt(x)), plain_out)


def test_file_holds_only_adapters_and_config(tmp_path):
    model = two_dense_model(alpha=16.0)
    set_values(model, seed=3)
    path = tmp_path / "a.safetensors"
    keras_lora.save_adapters(model, path)
    tensors, config = kla.read_adapters(path)
    assert sorted(tensors) == [
        "first.lora_a",
        "first.lora_b",
        "second.lora_a",
        "second.lora_b",
    ]
    assert tensors["first.lora_a"].shape == (8, 4)
    assert tensors["first.lora_b"].shape == (4, 8)
    assert all(t.dtype == np.float32 for t in tensors.values())
    layer = config["layers"]["first"]
    assert layer["rank"] == 4 and layer["alpha"] == 16.0
    assert layer["use_rslora"] is False and layer["class"] == "LoRADense"
    assert layer["shapes"] == {"lora_a": [8, 4], "lora_b": [4, 8]}
    assert config["keras_version"] == keras.__version__
    assert config["keras_lora_version"] == keras_lora.__version__
    assert config["base_model_class"].endswith("Functional")
    assert config["backend"] == keras.backend.backend()
    json.dumps(config)
    # Frozen base weights are not in the file.
    assert os.path.getsize(path) < 4 * (4 * 8 * 4) + 4096


def test_load_sets_alpha_and_trained_bias(tmp_path):
    """alpha/rsLoRA come from the file; a trained bias travels with it."""
    x = np.random.default_rng(2).normal(size=(3, 8)).astype("float32")
    inputs = keras.Input((8,))
    layer = keras_lora.LoRADense(
        8, rank=4, alpha=2.0, use_rslora=True, train_bias=True, name="first"
    )
    model = keras.Model(inputs, layer(inputs))
    set_values(model, seed=5)
    expected = to_numpy(model(x))
    path = tmp_path / "a.safetensors"
    keras_lora.save_adapters(model, path)
    assert "first.bias" in kla.read_adapters(path)[0]

    inputs = keras.Input((8,))
    new_layer = keras_lora.LoRADense(8, rank=4, train_bias=True, name="first")
    new = keras.Model(inputs, new_layer(inputs))
    new_layer.kernel.assign(layer.kernel)
    keras_lora.load_adapters(new, path)
    assert new_layer.adapter_alpha == 2.0 and new_layer.use_rslora
    assert_close(to_numpy(new(x)), expected)


def test_errors_name_the_argument(tmp_path):
    inputs = keras.Input((8,))
    plain = keras.Model(inputs, keras.layers.Dense(8)(inputs))
    with pytest.raises(ValueError, match="no keras_lora layers"):
        keras_lora.save_adapters(plain, tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="path="):
        keras_lora.load_adapters(plain, tmp_path / "missing.safetensors")
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2, "float32")}, str(tmp_path / "peft.st"))
    model = two_dense_model()
    with pytest.raises(ValueError, match="not a keras_lora adapter file"):
        keras_lora.load_adapters(model, tmp_path / "peft.st")


_OTHER_BACKEND = textwrap.dedent(
    """
    import sys
    import numpy as np
    import keras
    import keras_lora
    sys.path.insert(0, {tests!r})
    from test_adapters import two_dense_model
    data = np.load({npz!r})
    model = two_dense_model(alpha=8.0)
    for name in ("first", "second"):
        layer = model.get_layer(name)
        layer.kernel.assign(data[name + "_kernel"])
        layer.bias.assign(data[name + "_bias"])
    keras_lora.load_adapters(model, {path!r})
    out = keras.ops.convert_to_numpy(model(data["x"]))
    np.save({out!r}, out)
    print(keras.backend.backend())
    """
)


@pytest.mark.slow
def test_file_from_one_backend_loads_on_the_others(tmp_path):
    """Written on this backend, loaded on the two others: equal outputs."""
    x = np.random.default_rng(4).normal(size=(2, 8)).astype("float32")
    model = two_dense_model(alpha=8.0)
    set_values(model, seed=7)
    expected = to_numpy(model(x))
    path = str(tmp_path / "a.safetensors")
    keras_lora.save_adapters(model, path)
    npz = str(tmp_path / "base.npz")
    arrays = {"x": x}
    for name in ("first", "second"):
        arrays[name + "_kernel"] = to_numpy(model.get_layer(name).kernel)
        arrays[name + "_bias"] = to_numpy(model.get_layer(name).bias)
    np.savez(npz, **arrays)
    this = keras.backend.backend()
    for backend in ("tensorflow", "jax", "torch"):
        if backend == this:
            continue
        out = str(tmp_path / f"{backend}.npy")
        script = _OTHER_BACKEND.format(
            tests=os.path.join(REPO, "tests"), npz=npz, path=path, out=out
        )
        env = dict(os.environ, KERAS_BACKEND=backend)
        result = subprocess.run(
            [sys.executable, "-c", script],
            env=env,
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.strip().endswith(backend)
        assert_close(np.load(out), expected)


def test_saving_warns_when_other_weights_train(tmp_path):
    """A new head trained with the adapters (`trainable_layers`) is not in
    the adapter file: save_adapters says so, naming the layer; a model that
    trains only adapters saves without a warning."""
    import warnings

    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(4, name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
    with_head = keras_lora.apply_lora(
        model, rank=2, targets=["hidden"], trainable_layers=["head"]
    )
    with pytest.warns(UserWarning, match=r"\['head'\].*not in"):
        keras_lora.save_adapters(with_head, str(tmp_path / "a.safetensors"))
    only = keras_lora.apply_lora(model, rank=2, targets=["hidden"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keras_lora.save_adapters(only, str(tmp_path / "b.safetensors"))
    assert not [w for w in caught if "save_adapters" in str(w.message)]
