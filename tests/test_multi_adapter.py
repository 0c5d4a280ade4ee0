"""Several named adapters and mixed-adapter batches (keras_lora.multi)."""

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
from keras_lora import multi

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, DIM, SEQ = 20, 8, 3


def lm_model():
    """A tiny causal-LM-shaped model: every kind of layer mixed batches
    support (reversible embedding both ways, EinsumDense, Dense)."""
    ids = keras.Input((SEQ,), dtype="int32")
    embedding = keras_lora.LoRAReversibleEmbedding(
        VOCAB, DIM, rank=2, alpha=4.0, name="embed"
    )
    x = embedding(ids)
    x = keras_lora.LoRAEinsumDense(
        "btd,dnh->btnh", (SEQ, 2, 4), rank=2, name="query"
    )(x)
    x = keras.layers.Reshape((SEQ, DIM))(x)
    x = keras_lora.LoRADense(DIM, rank=2, alpha=8.0, name="dense")(x)
    logits = embedding(x, reverse=True)
    return keras.Model(ids, logits, name="tiny_lm")


def random_adapter(model, seed):
    rng = np.random.default_rng(seed)
    tensors, _ = keras_lora.adapters.adapter_state(model)
    return {
        k: rng.normal(scale=0.3, size=v.shape).astype("float32")
        for k, v in tensors.items()
    }


def assign(model, tensors):
    for path, layer in keras_lora.adapters.lora_layers(model).items():
        for name, variable in layer.adapter_weights().items():
            variable.assign(tensors[f"{path}.{name}"])


@pytest.fixture
def lm():
    model = lm_model()
    assign(model, random_adapter(model, 0))
    multi.add_adapter(model, "b", random_adapter(model, 1))
    multi.add_adapter(model, "c", random_adapter(model, 2))
    ids = np.random.default_rng(3).integers(0, VOCAB, (4, SEQ))
    return model, ids.astype("int32")


def per_example_reference(model, ids, adapter_ids):
    """Each example run alone with its adapter active (single-adapter path)."""
    names = multi.list_adapters(model)
    active = multi.active_adapter(model)
    rows = []
    for row, k in zip(ids, adapter_ids, strict=True):
        multi.set_active_adapter(model, names[k])
        rows.append(to_numpy(model(row[None]))[0])
    multi.set_active_adapter(model, active)
    return np.stack(rows)


def test_add_activate_delete(lm):
    model, ids = lm
    assert multi.list_adapters(model) == ["default", "b", "c"]
    assert multi.active_adapter(model) == "default"
    out_default = to_numpy(model(ids))
    multi.set_active_adapter(model, "b")
    out_b = to_numpy(model(ids))
    assert not close(out_b, out_default)
    dense = model.get_layer("dense")
    assert_exact(
        to_numpy(dense.lora_a),
        multi.adapter_tensors(model, "b")["dense.lora_a"],
    )
    # Switching back restores "default" exactly.
    multi.set_active_adapter(model, "default")
    assert_exact(to_numpy(model(ids)), out_default)
    with pytest.raises(ValueError, match="Cannot delete the active"):
        multi.delete_adapter(model, "default")
    multi.delete_adapter(model, "c")
    assert multi.list_adapters(model) == ["default", "b"]
    with pytest.raises(ValueError, match=r"name='c'"):
        multi.set_active_adapter(model, "c")
    with pytest.raises(ValueError, match="already exists"):
        multi.add_adapter(model, "b")
    with pytest.raises(ValueError, match="`name` must be"):
        multi.add_adapter(model, "")


def test_trained_active_adapter_is_kept_when_switching(lm):
    model, ids = lm
    dense = model.get_layer("dense")
    dense.lora_b.assign(np.full((2, DIM), 0.5, "float32"))
    multi.set_active_adapter(model, "b")
    multi.set_active_adapter(model, "default")
    assert_exact(to_numpy(dense.lora_b), np.full((2, DIM), 0.5, "float32"))


def test_fresh_adapter_is_the_base_model_and_disable(lm):
    model, ids = lm
    with multi.disable_adapters(model):
        base = to_numpy(model(ids))
    multi.add_adapter(model, "fresh")
    multi.set_active_adapter(model, "fresh")
    assert_close(to_numpy(model(ids)), base)
    multi.set_active_adapter(model, "b")
    with_b = to_numpy(model(ids))
    with multi.disable_adapters(model):
        assert_exact(to_numpy(model(ids)), base)
    assert_exact(to_numpy(model(ids)), with_b)


def test_disable_matches_numpy_base_model():
    """Dense-only model: inside disable_adapters, outputs equal x @ W + b."""
    inputs = keras.Input((4,))
    layer = keras_lora.LoRADense(3, rank=2, name="d")
    model = keras.Model(inputs, layer(inputs))
    layer.lora_b.assign(np.ones((2, 3), "float32"))
    x = np.random.default_rng(0).normal(size=(2, 4)).astype("float32")
    expected = x @ to_numpy(layer.kernel) + to_numpy(layer.bias)
    with multi.disable_adapters(model):
        assert_close(to_numpy(model(x)), expected)
    assert not close(to_numpy(model(x)), expected)


def test_combine_is_peft_linear(lm):
    """A = sum sqrt(w s) A_k, B = sum sqrt(w s) B_k, alpha = rank (PEFT)."""
    model, ids = lm
    weights = {"default": 0.7, "b": 0.3}
    multi.combine_adapters(model, weights, "mix")
    multi.set_active_adapter(model, "mix")
    for layer in keras_lora.adapters.lora_layers(model).values():
        assert layer.adapter_alpha == layer.adapter_rank
        for var in ("lora_a", "lora_b"):
            expected = 0.0
            for name, w in weights.items():
                entry = layer.adapter_bank.adapters[name]
                s = entry["alpha"] / layer.adapter_rank
                expected = expected + np.sqrt(w * s) * entry["values"][var]
            # A sum of two products: a few roundings.
            assert_close(to_numpy(getattr(layer, var)), expected, ulps=8)
    # One adapter with weight 1 reproduces it.
    multi.set_active_adapter(model, "b")
    out_b = to_numpy(model(ids))
    multi.combine_adapters(model, {"b": 1.0}, "b_again")
    multi.set_active_adapter(model, "b_again")
    assert_close(to_numpy(model(ids)), out_b)
    with pytest.raises(ValueError, match=r"weights\['b'\]=-1"):
        multi.combine_adapters(model, {"b": -1}, "neg")
    with pytest.raises(ValueError, match="No adapter named 'zz'"):
        multi.combine_adapters(model, {"zz": 1.0}, "bad")


def test_mixed_batch_eager_equals_per_example(lm):
    model, ids = lm
    adapter_ids = np.array([2, 0, 1, 2], "int32")
    expected = per_example_reference(model, ids, adapter_ids)
    out = to_numpy(multi.mixed_batch_call(model, ids, adapter_ids))
    assert_close(out, expected)
    # Outside the context the model is the single-adapter model again.
    assert_close(
        to_numpy(model(ids)), per_example_reference(model, ids, [0, 0, 0, 0])
    )
    with pytest.raises(ValueError, match="rank-1 integer"):
        multi.mixed_batch_call(model, ids, np.zeros((4, 1), "int32"))


def test_mixed_batch_dense_numpy_oracle():
    """y_i = x_i W + b + s_k (x_i A_k) B_k, with s_k from each adapter."""
    inputs = keras.Input((4,))
    layer = keras_lora.LoRADense(3, rank=2, alpha=4.0, name="d")
    model = keras.Model(inputs, layer(inputs))
    rng = np.random.default_rng(0)
    a0, b0 = rng.normal(size=(4, 2)), rng.normal(size=(2, 3))
    a1, b1 = rng.normal(size=(4, 2)), rng.normal(size=(2, 3))
    layer.lora_a.assign(a0.astype("float32"))
    layer.lora_b.assign(b0.astype("float32"))
    multi.add_adapter(model, "one", {"d.lora_a": a1, "d.lora_b": b1})
    # Give "one" its own alpha (as a file from another run would).
    layer.adapter_bank.adapters["one"]["alpha"] = 1.0
    x = rng.normal(size=(3, 4)).astype("float32")
    k = np.array([1, 0, 1], "int32")
    w, bias = to_numpy(layer.kernel), to_numpy(layer.bias)
    factors = [(a0, b0, 4.0 / 2), (a1, b1, 1.0 / 2)]
    expected = np.stack(
        [
            x[i] @ w
            + bias
            + factors[k[i]][2] * (x[i] @ factors[k[i]][0]) @ factors[k[i]][1]
            for i in range(3)
        ]
    )
    out = to_numpy(multi.mixed_batch_call(model, x, k))
    assert_close(out, expected)


def _jit(fn):
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    import torch

    return torch.compile(fn, backend="eager", fullgraph=False)


def dense_model():
    inputs = keras.Input((DIM,))
    x = keras_lora.LoRADense(DIM, rank=2, alpha=4.0, name="d1")(inputs)
    outputs = keras_lora.LoRADense(3, rank=2, name="d2")(x)
    model = keras.Model(inputs, outputs)
    assign(model, random_adapter(model, 0))
    multi.add_adapter(model, "b", random_adapter(model, 1))
    multi.add_adapter(model, "c", random_adapter(model, 2))
    return model


@pytest.mark.slow
def test_mixed_batch_compiled_equals_per_example(lm):
    """Mixed batches under jax.jit / tf.function(jit_compile=True) on the
    tiny LM; under torch.compile on a two-Dense model (dynamo tracing the
    whole LM takes minutes on CPU)."""
    model, ids = lm
    if keras.backend.backend() == "torch":
        model = dense_model()
        ids = np.random.default_rng(3).normal(size=(4, DIM))
        ids = ids.astype("float32")
    adapter_ids = np.array([1, 2, 0, 1], "int32")
    expected = per_example_reference(model, ids, adapter_ids)
    fn = _jit(lambda x, k: multi.mixed_batch_call(model, x, k))
    out = to_numpy(fn(ids, adapter_ids))
    assert_close(out, expected)
    # Another assignment of adapters, same compiled function.
    adapter_ids = np.array([0, 0, 2, 2], "int32")
    out = to_numpy(fn(ids, adapter_ids))
    assert_close(out, per_example_reference(model, ids, adapter_ids))


@pytest.mark.skipif(
    keras.backend.backend() != "torch",
    reason="torch.compile's guards; jax.jit and tf.function keep none",
)
def test_mixed_batch_compiles_while_other_models_are_collected(monkeypatch):
    """Models dropped by the user while `torch.compile` builds its guards
    (the garbage collector runs whenever it likes) must not break the
    compiled mixed-batch call: keras_lora's registry of models is kept out
    of the traced code."""
    import gc

    from torch._dynamo import guards

    dropped = []
    for _ in range(4):
        batch = []
        for _ in range(15):
            inputs = keras.Input((4,))
            m = keras.Model(inputs, keras_lora.LoRADense(3, rank=2)(inputs))
            keras_lora.lora_layers(m)
            batch.append(m)
        dropped.append(batch)
    build_guards = guards.CheckFunctionManager.__init__

    def collect_then_build(self, *args, **kwargs):
        if dropped:
            dropped.pop(0)
            gc.collect()
        return build_guards(self, *args, **kwargs)

    monkeypatch.setattr(
        guards.CheckFunctionManager, "__init__", collect_then_build
    )
    model = dense_model()
    x = np.random.default_rng(3).normal(size=(4, DIM)).astype("float32")
    adapter_ids = np.array([1, 2, 0, 1], "int32")
    fn = _jit(lambda x, k: multi.mixed_batch_call(model, x, k))
    out = to_numpy(fn(x, adapter_ids))
    assert len(dropped) < 4  # guards were built while models were dropped
    assert_close(out, per_example_reference(model, x, adapter_ids))


def test_single_adapter_path_untouched_without_banks():
    """No bank: the layer's own call path (no mixed hook) computes."""
    inputs = keras.Input((4,))
    layer = keras_lora.LoRADense(3, rank=2, name="d")
    model = keras.Model(inputs, layer(inputs))
    assert layer.adapter_bank is None
    assert multi.list_adapters(model) == ["default"]
    x = np.ones((1, 4), "float32")
    assert layer.mixed_adapter_delta(x) is None
    assert model(x).shape == (1, 3)


_SAVED_MODEL = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf
    import keras
    sys.path.insert(0, {tests!r})
    from keras_lora import multi
    from numerics import assert_close
    from test_multi_adapter import lm_model, random_adapter, assign
    from test_multi_adapter import per_example_reference, SEQ, VOCAB
    keras.utils.set_random_seed(0)
    model = lm_model()
    assign(model, random_adapter(model, 0))
    multi.add_adapter(model, "b", random_adapter(model, 1))
    multi.add_adapter(model, "c", random_adapter(model, 2))
    ids = np.random.default_rng(3).integers(0, VOCAB, (5, SEQ))
    ids = ids.astype("int32")
    k = np.array([2, 1, 0, 1, 2], "int32")
    expected = per_example_reference(model, ids, k)
    multi.export_mixed_saved_model(
        model, {path!r}, [tf.TensorSpec([None, SEQ], tf.int32, name="ids")]
    )
    del model
    keras.backend.clear_session()
    loaded = tf.saved_model.load({path!r})
    out = loaded.serve(tf.constant(ids), tf.constant(k)).numpy()
    print("max_abs_diff", float(np.max(np.abs(out - expected))))
    assert_close(out, expected)
    fn = loaded.signatures["serve"]
    print("signature", sorted(fn.structured_input_signature[1]))
    """
)


@pytest.mark.slow
def test_one_saved_model_serves_every_adapter(tmp_path):
    """One SavedModel, adapter index as input; tf.saved_model.load + serve
    equals each example run alone with its adapter (exported with the TF
    backend in a subprocess, so this runs under every backend)."""
    script = _SAVED_MODEL.format(
        tests=os.path.join(REPO, "tests"), path=str(tmp_path / "sm")
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=dict(os.environ, KERAS_BACKEND="tensorflow"),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "max_abs_diff" in result.stdout
    assert "adapter_ids" in result.stdout


def test_export_refuses_other_backends(lm, tmp_path):
    model, _ = lm
    if keras.backend.backend() == "tensorflow":
        return
    with pytest.raises(RuntimeError, match="KERAS_BACKEND=tensorflow"):
        multi.export_mixed_saved_model(model, str(tmp_path), [])


def test_named_adapters_belong_to_the_layers_not_a_model_object(lm):
    """A model wrapping the adapted one (as a keras-hub task wraps its
    backbone) sees and drives the same named adapters; a sub-model holding
    only some of the layers cannot add adapters that the others lack."""
    model, ids = lm
    inputs = keras.Input((SEQ,), dtype="int32")
    outer = keras.Model(inputs, model(inputs))
    assert multi.list_adapters(outer) == ["default", "b", "c"]
    multi.add_adapter(outer, "x")
    assert multi.list_adapters(model) == ["default", "b", "c", "x"]
    multi.set_active_adapter(outer, "b")
    assert multi.active_adapter(model) == "b"
    adapter_ids = np.array([1, 2, 0, 1], "int32")
    assert_close(
        to_numpy(multi.mixed_batch_call(outer, ids, adapter_ids)),
        per_example_reference(model, ids, adapter_ids),
    )
    # A bank on one layer only: refused, naming the cause.
    dense = model.get_layer("dense")
    bank = dense.adapter_bank
    dense.adapter_bank = None
    with pytest.raises(ValueError, match="holding only some of them"):
        multi.list_adapters(model)
    dense.adapter_bank = bank


_CONV_CASES = [
    (keras_lora.LoRAConv1D, (6,), {"padding": "causal"}),
    (keras_lora.LoRAConv2D, (6, 6), {}),
    (keras_lora.LoRAConv3D, (4, 4, 4), {"strides": 2}),
]
# Kinds without groups: (class, spatial shape, positional args, kwargs).
_OTHER_CONV_CASES = [
    (keras_lora.LoRAConv2DTranspose, (4, 4), (4, 3), {"strides": 2}),
    (keras_lora.LoRADepthwiseConv1D, (6,), (3,), {"depth_multiplier": 2}),
    (keras_lora.LoRADepthwiseConv2D, (5, 5), (3,), {"padding": "same"}),
    (keras_lora.LoRASeparableConv1D, (6,), (4, 3), {"depth_multiplier": 2}),
    (keras_lora.LoRASeparableConv2D, (5, 5), (4, 3), {"strides": 2}),
]


@pytest.mark.parametrize(
    "cls, spatial, args, kwargs",
    [
        (c, s, (4, 3 if len(s) < 3 else 2), dict(kw, groups=g))
        for c, s, kw in _CONV_CASES
        for g in (1, 2)
    ]
    + _OTHER_CONV_CASES,
    ids=[f"{c.__name__}-groups{g}" for c, _, _ in _CONV_CASES for g in (1, 2)]
    + [c.__name__ for c, _, _, _ in _OTHER_CONV_CASES],
)
def test_c22_conv_mixed_batch_gives_each_example_its_adapter(
    cls, spatial, args, kwargs
):
    """C22: Conv2D(4, 3), rank 2, "default" and "b" with different B, a
    mixed batch of 2 images assigned "default" and "b": each image gets
    its own adapter's output (the same as running it alone with that
    adapter active), and the two differ. The same for Conv1D (causal),
    Conv3D, Conv2DTranspose and the depthwise and separable convolutions
    (both of a separable one's adapter pairs per example)."""
    inputs = keras.Input(spatial + (2,))
    layer = cls(*args, rank=2, name="conv", **kwargs)
    model = keras.Model(inputs, layer(inputs))
    assign(model, random_adapter(model, 0))
    multi.add_adapter(model, "b", random_adapter(model, 1))
    b_tensors = multi.adapter_tensors(model, "b")
    assert not close(b_tensors["conv.lora_b"], to_numpy(layer.lora_b))
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2,) + spatial + (2,)).astype("float32")
    adapter_ids = np.array([0, 1], "int32")
    expected = per_example_reference(model, x, adapter_ids)
    out = to_numpy(multi.mixed_batch_call(model, x, adapter_ids))
    assert_close(out, expected)
    assert not close(out[0], per_example_reference(model, x, [1, 1])[0])
    assert not close(out[1], per_example_reference(model, x, [0, 0])[1])


def test_every_lora_layer_kind_computes_a_branch():
    """Each keras_lora layer class defines `branch` (the path every call,
    mixed batches included, goes through); the base class raises for a
    kind that does not, so no layer can silently use one adapter for a
    whole mixed batch."""
    from keras_lora.convert import LORA_CLASSES
    from keras_lora.layers.base import LoRALayer

    for cls in LORA_CLASSES:
        assert cls.branch is not LoRALayer.branch, cls.__name__

    class NoBranch(keras_lora.LoRADense):
        branch = LoRALayer.branch

    layer = NoBranch(2, rank=1)
    with pytest.raises(NotImplementedError, match="NoBranch"):
        layer(np.ones((1, 3), "float32"))


def test_adapter_file_adds_to_a_rebuilt_model_and_bad_ids_are_refused(
    tmp_path,
):
    """An adapter file saved from one build adds as a named adapter to the
    same architecture built again (Keras renumbers `dense` to `dense_N`:
    matched by stable path, as `load_adapters` does); concrete adapter
    ids out of range are an error, not a silent gather."""

    def build():
        inputs = keras.Input((4,))
        h = keras.layers.Dense(4)(inputs)
        return keras_lora.apply_lora(
            keras.Model(inputs, keras.layers.Dense(2)(h)),
            rank=2,
            targets=keras.layers.Dense,
        )

    first = build()
    assign(first, random_adapter(first, 5))
    path = str(tmp_path / "a.safetensors")
    keras_lora.save_adapters(first, path)
    second = build()
    assert set(keras_lora.lora_layers(first)).isdisjoint(
        keras_lora.lora_layers(second)
    )
    multi.add_adapter(second, "from_file", path)
    multi.set_active_adapter(second, "from_file")
    # Layer by layer (same structural position), the file's values.
    for (p1, a), (p2, b) in zip(
        keras_lora.lora_layers(first).items(),
        keras_lora.lora_layers(second).items(),
        strict=True,
    ):
        assert p1 != p2
        for name in ("lora_a", "lora_b"):
            assert_exact(to_numpy(getattr(b, name)), to_numpy(getattr(a, name)))
    x = np.random.default_rng(6).normal(size=(3, 4)).astype("float32")
    with pytest.raises(ValueError, match=r"`adapter_ids`.*Received.*\[0, 2\]"):
        multi.mixed_batch_call(second, x[:2], np.array([0, 2]))


def _c18_model(seed=0):
    """C18's base: Dense(8 -> 4), same base weights for every seed."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8,))
    return keras.Model(inputs, keras.layers.Dense(4, name="dense")(inputs))


def _c18_adapted(tmp_path):
    """Rank 2, adapters "default", "legal", "medical" (different B and
    alpha), "legal" active."""
    model = keras_lora.apply_lora(_c18_model(), rank=2, targets=["dense"])
    rng = np.random.default_rng(0)
    layer = keras_lora.lora_layers(model)["dense"]
    layer.lora_b.assign(rng.normal(size=(2, 4)).astype("float32"))
    for name, alpha in (("legal", 4.0), ("medical", 1.0)):
        other = keras_lora.apply_lora(
            _c18_model(), rank=2, alpha=alpha, targets=["dense"]
        )
        for variable in (
            keras_lora.lora_layers(other)["dense"].adapter_weights().values()
        ):
            variable.assign(rng.normal(size=variable.shape).astype("float32"))
        keras_lora.save_adapters(other, tmp_path / f"{name}.safetensors")
        multi.add_adapter(model, name, tmp_path / f"{name}.safetensors")
    multi.set_active_adapter(model, "legal")
    return model


def _outputs_per_adapter(model, x):
    active = multi.active_adapter(model)
    outputs = {}
    for name in multi.list_adapters(model):
        multi.set_active_adapter(model, name)
        outputs[name] = to_numpy(model(x))
    multi.set_active_adapter(model, active)
    return outputs


def test_c18_every_named_adapter_saves_and_reloads_under_its_name(tmp_path):
    """C18: save_adapters writes every named adapter (values, alpha, which
    is active); load_adapters into a fresh base restores all of them under
    their names, "legal" active, each giving the original's outputs."""
    model = _c18_adapted(tmp_path)
    x = np.random.default_rng(1).normal(size=(3, 8)).astype("float32")
    expected = _outputs_per_adapter(model, x)
    assert len({v.tobytes() for v in expected.values()}) == 3
    config = keras_lora.save_adapters(model, tmp_path / "all.safetensors")
    assert [a["name"] for a in config["adapters"]] == [
        "default",
        "legal",
        "medical",
    ]
    loaded = keras_lora.load_adapters(
        _c18_model(), tmp_path / "all.safetensors"
    )
    assert multi.list_adapters(loaded) == ["default", "legal", "medical"]
    assert multi.active_adapter(loaded) == "legal"
    assert_exact(to_numpy(loaded(x)), expected["legal"])
    layer = keras_lora.lora_layers(loaded)["dense"]
    alphas = {}
    for name, output in _outputs_per_adapter(loaded, x).items():
        assert_exact(output, expected[name])
        multi.set_active_adapter(loaded, name)
        alphas[name] = layer.adapter_alpha
    assert alphas == {"default": 2.0, "legal": 4.0, "medical": 1.0}
    for name in expected:
        for key, value in multi.adapter_tensors(model, name).items():
            assert_exact(multi.adapter_tensors(loaded, name)[key], value)


def test_c18_one_adapter_by_name(tmp_path):
    """C18: one named adapter saved alone (or picked from a file of all)
    reloads under its own name; a model with named adapters keeps its
    others and its active one."""
    model = _c18_adapted(tmp_path)
    x = np.random.default_rng(1).normal(size=(3, 8)).astype("float32")
    expected = _outputs_per_adapter(model, x)
    keras_lora.save_adapters(model, tmp_path / "med.safetensors", "medical")
    keras_lora.save_adapters(model, tmp_path / "all.safetensors")
    for path, kwargs in (
        ("med.safetensors", {}),
        ("all.safetensors", {"adapters": "medical"}),
    ):
        fresh = keras_lora.load_adapters(
            _c18_model(), tmp_path / path, **kwargs
        )
        assert multi.list_adapters(fresh) == ["medical"]
        assert multi.active_adapter(fresh) == "medical"
        assert_exact(to_numpy(fresh(x)), expected["medical"])
    # Into a model with named adapters: "medical" replaced, others kept.
    target = _c18_adapted(tmp_path)
    multi.add_adapter(target, "extra")
    layer = keras_lora.lora_layers(target)["dense"]
    before = to_numpy(layer.lora_b)
    keras_lora.load_adapters(
        target, tmp_path / "all.safetensors", adapters=["medical", "default"]
    )
    assert multi.list_adapters(target) == [
        "default",
        "legal",
        "medical",
        "extra",
    ]
    assert multi.active_adapter(target) == "legal"
    assert_exact(to_numpy(layer.lora_b), before)
    # add_adapter takes the adapter of its own name from a file of several.
    multi.add_adapter(target, "medical_2", tmp_path / "med.safetensors")
    with pytest.raises(ValueError, match=r"holds the adapters .*name='x'"):
        multi.add_adapter(target, "x", tmp_path / "all.safetensors")
    multi.delete_adapter(target, "medical")
    multi.add_adapter(target, "medical", tmp_path / "all.safetensors")
    for name in ("medical", "medical_2"):
        multi.set_active_adapter(target, name)
        assert_exact(to_numpy(target(x)), expected["medical"])


def test_c18_bad_adapter_names_are_refused_before_anything(tmp_path):
    """C18: naming an adapter the model (or file) lacks is a ValueError
    naming `adapters`; no file is written, the model is unchanged."""
    model = _c18_adapted(tmp_path)
    with pytest.raises(ValueError, match=r"adapters='nope'.*'legal'"):
        keras_lora.save_adapters(model, tmp_path / "x.safetensors", "nope")
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(ValueError, match=r"adapters=\[\]"):
        keras_lora.save_adapters(model, tmp_path / "x.safetensors", [])
    keras_lora.save_adapters(model, tmp_path / "all.safetensors")
    target = _c18_adapted(tmp_path)
    before = {n: multi.adapter_tensors(target, n) for n in ("legal", "medical")}
    with pytest.raises(ValueError, match=r"adapters=\['legal', 'nope'\]"):
        keras_lora.load_adapters(
            target, tmp_path / "all.safetensors", adapters=["legal", "nope"]
        )
    for name, tensors in before.items():
        for key, value in tensors.items():
            assert_exact(multi.adapter_tensors(target, name)[key], value)


def test_c18_named_adapters_refuse_other_trainable_state(tmp_path):
    """Several adapters into a model that trains a head: refused, naming the
    shared variables (every adapter would train the same head)."""
    inputs = keras.Input((8,))
    x = keras.layers.Dense(4, name="dense")(inputs)
    plain = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    model = keras_lora.apply_lora(
        plain, rank=2, targets=["dense"], trainable_layers=["head"]
    )
    with pytest.raises(ValueError, match=r"also trains \['head/kernel'"):
        multi.add_adapter(model, "b")
    assert multi.list_adapters(model) == ["default"]
    assert model.get_layer("dense").adapter_bank is None


def test_c18_keras_file_keeps_every_named_adapter(tmp_path):
    """C18's kind, for `.keras` files: `model.save` holds every named
    adapter (values, alpha, order, the active one), and the reloaded model
    switches between them with the original's outputs; pickling too."""
    import pickle

    model = _c18_adapted(tmp_path)
    x = np.random.default_rng(1).normal(size=(3, 8)).astype("float32")
    expected = _outputs_per_adapter(model, x)
    model.save(tmp_path / "m.keras")
    for loaded in (
        keras.saving.load_model(tmp_path / "m.keras"),
        pickle.loads(pickle.dumps(model)),
    ):
        assert multi.list_adapters(loaded) == ["default", "legal", "medical"]
        assert multi.active_adapter(loaded) == "legal"
        assert_exact(to_numpy(loaded(x)), expected["legal"])
        for name, output in _outputs_per_adapter(loaded, x).items():
            assert_exact(output, expected[name])
        out = multi.mixed_batch_call(loaded, x, np.array([2, 0, 1], "int32"))
        assert_close(to_numpy(out)[0], expected["medical"][0])
        assert_close(to_numpy(out)[2], expected["legal"][2])
