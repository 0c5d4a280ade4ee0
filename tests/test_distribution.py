"""Multi-device LoRA: keras.distribution (JAX), tf.distribute, torch DDP.

The multi-device runs need their devices configured before the framework
initialises (`XLA_FLAGS=--xla_force_host_platform_device_count=8` for JAX,
logical CPU devices for TensorFlow, a gloo process group for PyTorch), so
each runs as one subprocess that prints a JSON report; the tests assert on
it. Each backend's run executes its own engine: JAX runs the
`keras.distribution` scripts, TensorFlow runs `MirroredStrategy`, PyTorch
runs DistributedDataParallel. The layout derivation itself is tested
in-process on every backend.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from numerics import assert_close
from numerics import assert_diff_within

import keras_lora
from keras_lora.distribution import adapter_layout
from keras_lora.distribution import adapter_layout_scope
from keras_lora.distribution import derive_adapter_axes
from keras_lora.distribution import lora_layout_map

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = keras.backend.backend()


def _run_script(script, backend, env=None, timeout=900):
    """Runs `script` with `python -c` under `backend`; returns its JSON."""
    full_env = dict(os.environ)
    full_env["KERAS_BACKEND"] = backend
    full_env["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + [p for p in full_env.get("PYTHONPATH", "").split(":") if p]
    )
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=full_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"subprocess failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, f"no RESULT line in:\n{proc.stdout[-3000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def _mesh(shape, names):
    """A DeviceMesh over placeholder device names (no backend mesh needed:
    layouts are only derived here, never placed)."""
    n = int(np.prod(shape))
    return keras.distribution.DeviceMesh(
        shape, names, devices=[f"cpu:{i}" for i in range(n)]
    )


def _layout(axes, mesh):
    return keras.distribution.TensorLayout(axes, mesh)


# -- Layout derivation (every backend) ----------------------------------------


def test_derive_adapter_axes_replicates_what_does_not_divide():
    sizes = {"batch": 2, "model": 4}
    # Dense kernel (8, 12) sharded (None, "model"): A axis 8 is unsharded.
    assert derive_adapter_axes(
        (None, "model"), (8, 12), [[0]], (8,), sizes
    ) == [None]
    assert derive_adapter_axes(
        (None, "model"), (8, 12), [[1]], (12,), sizes
    ) == ["model"]
    # 6 does not divide by 4: replicated.
    assert derive_adapter_axes((None, "model"), (8, 6), [[1]], (6,), sizes) == [
        None
    ]
    # Flattened (n=4, h=8) with n on "model": the flat axis takes "model".
    assert derive_adapter_axes(
        ("model", "batch", None), (4, 16, 8), [[0, 2]], (32,), sizes
    ) == ["model"]
    # Flattened (n, h) where only h (inner, size 8) is sharded on "batch".
    assert derive_adapter_axes(
        (None, None, "batch"), (1, 16, 8), [[0, 2]], (8,), sizes
    ) == ["batch"]


def test_dense_rank_that_does_not_divide_gets_a_fitting_layout():
    """C15: mesh (1, 2), layout map `.*dense.*kernel` -> (None, "model"),
    Dense(8), rank 3: A (d_in, 3) is not handed the kernel's layout."""
    mesh = _mesh((1, 2), ("batch", "model"))
    layer = keras_lora.LoRADense(8, rank=3, name="dense")
    layer.build((2, 4))
    kernel_layout = _layout((None, "model"), mesh)
    a = adapter_layout(layer, "lora_a", base_layout=kernel_layout)
    b = adapter_layout(layer, "lora_b", base_layout=kernel_layout)
    assert a.axes == (None, None)
    assert b.axes == (None, "model")
    assert a.device_mesh is mesh and b.device_mesh is mesh
    # Row-parallel kernel: A follows the input axis, B is replicated.
    row = _layout(("model", None), mesh)
    assert adapter_layout(layer, "lora_a", base_layout=row).axes == (
        "model",
        None,
    )
    assert adapter_layout(layer, "lora_b", base_layout=row).axes == (
        None,
        None,
    )
    assert adapter_layout(layer, "kernel", base_layout=row) is None


def test_einsum_conv_embedding_layouts_follow_their_base_axes():
    mesh = _mesh((2, 4), ("batch", "model"))
    # Gemma's query: kernel (n=4, d=16, h=8), layout (model, batch, None).
    query = keras_lora.LoRAEinsumDense(
        "btd,ndh->btnh", output_shape=(None, 4, 8), rank=3, name="query"
    )
    query.build((1, 5, 16))
    layout = _layout(("model", "batch", None), mesh)
    assert adapter_layout(query, "lora_a", layout).axes == ("batch", None)
    assert adapter_layout(query, "lora_b", layout).axes == (None, "model")
    # Gemma's attention_output: kernel (n, h, d), layout (model, None, batch).
    out = keras_lora.LoRAEinsumDense(
        "btnh,nhd->btd", output_shape=(None, 16), rank=3, name="out"
    )
    out.build((1, 5, 4, 8))
    layout = _layout(("model", None, "batch"), mesh)
    assert adapter_layout(out, "lora_a", layout).axes == ("model", None)
    assert adapter_layout(out, "lora_b", layout).axes == (None, "batch")
    # Conv2D kernel (3, 3, 4, 8): A (3, 3, 4, r) and B (r, 8).
    conv = keras_lora.LoRAConv2D(8, 3, rank=2)
    conv.build((1, 6, 6, 4))
    layout = _layout((None, None, "batch", "model"), mesh)
    assert adapter_layout(conv, "lora_a", layout).axes == (
        None,
        None,
        "batch",
        None,
    )
    assert adapter_layout(conv, "lora_b", layout).axes == (None, "model")
    # Conv2DTranspose kernel (3, 3, filters 8, in 4): A (3, 3, 4, r) takes
    # the input-channel axis's layout, B (r, 8) the filters axis's.
    up = keras_lora.LoRAConv2DTranspose(8, 3, rank=2)
    up.build((1, 6, 6, 4))
    layout = _layout((None, None, "model", "batch"), mesh)
    assert adapter_layout(up, "lora_a", layout).axes == (
        None,
        None,
        "batch",
        None,
    )
    assert adapter_layout(up, "lora_b", layout).axes == (None, "model")
    # Untied ReversibleEmbedding: the reverse pair follows (d, vocab).
    emb = keras_lora.LoRAReversibleEmbedding(64, 16, tie_weights=False, rank=3)
    emb.build()
    table = _layout(("model", "batch"), mesh)
    reverse = _layout(("batch", "model"), mesh)
    assert adapter_layout(emb, "lora_a", table).axes == ("model", None)
    assert adapter_layout(emb, "lora_b", table).axes == (None, "batch")
    assert adapter_layout(emb, "reverse_lora_a", reverse).axes == (
        "batch",
        None,
    )
    assert adapter_layout(emb, "reverse_lora_b", reverse).axes == (
        None,
        "model",
    )


def test_no_distribution_means_no_layout_and_plain_adapters(rng):
    layer = keras_lora.LoRADense(8, rank=3)
    layer.build((2, 4))
    assert keras.distribution.distribution() is None
    assert adapter_layout(layer, "lora_a") is None
    with adapter_layout_scope(layer, "lora_a"):
        assert keras.distribution.distribution() is None
    x = rng.normal(size=(2, 4)).astype("float32")
    assert_close(
        keras.ops.convert_to_numpy(layer(x)),
        x @ keras.ops.convert_to_numpy(layer.kernel)
        + keras.ops.convert_to_numpy(layer.bias),
    )


def _two_dense_lora_model():
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, use_bias=False, name="dense")(inputs)
    outputs = keras.layers.Dense(4, name="head")(h)
    model = keras.Model(inputs, outputs)
    return keras_lora.apply_lora(model, rank=3, targets=["dense", "head"])


def test_lora_layout_map_adds_exact_adapter_keys_over_clashing_regexes():
    """C15: a user's regexes that also match the adapter paths (here two of
    them, which makes LayoutMap raise) never reach the adapters."""
    mesh = _mesh((1, 2), ("batch", "model"))
    user = keras.distribution.LayoutMap(mesh)
    user[".*dense.*"] = (None, "model")
    user[".*lora_a"] = ("model", None)
    model = _two_dense_lora_model()
    with pytest.raises(ValueError, match="matches multiple layout"):
        user["dense/lora_a"]
    full = lora_layout_map(user, model)
    assert list(user) == [".*dense.*", ".*lora_a"]  # the user's map unchanged
    assert list(full)[:2] == [".*dense.*", ".*lora_a"]
    assert full["dense/lora_a"].axes == (None, None)
    assert full["dense/lora_b"].axes == (None, "model")
    assert full["dense/kernel"].axes == (None, "model")
    # `head` has no kernel key: its adapters are replicated.
    assert full["head/lora_a"].axes == (None, None)
    assert full["head/lora_b"].axes == (None, None)
    assert full.device_mesh is mesh


def test_lora_layout_map_errors_name_the_argument():
    mesh = _mesh((1, 2), ("batch", "model"))
    with pytest.raises(TypeError, match="layout_map"):
        lora_layout_map({".*": (None,)}, _two_dense_lora_model())
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no keras_lora layer"):
        lora_layout_map(keras.distribution.LayoutMap(mesh), plain)


def test_lora_layout_map_on_keras_hub_gemma_preset():
    keras_hub = pytest.importorskip("keras_hub")
    mesh = _mesh((2, 4), ("batch", "model"))
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=64,
        num_layers=1,
        num_query_heads=4,
        num_key_value_heads=4,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
    )
    model = keras_lora.apply_lora(
        backbone, rank=3, targets=["query", "value", "ffw_linear"]
    )
    preset = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    full = lora_layout_map(preset, model)
    prefix = "decoder_block_0"
    assert full[f"{prefix}/attention/query/lora_a"].axes == ("batch", None)
    assert full[f"{prefix}/attention/query/lora_b"].axes == (None, "model")
    assert full[f"{prefix}/attention/value/lora_b"].axes == (None, "model")
    assert full[f"{prefix}/ffw_linear/lora_a"].axes == ("model", None)
    assert full[f"{prefix}/ffw_linear/lora_b"].axes == (None, "batch")
    assert full[f"{prefix}/attention/query/kernel"].axes == (
        "model",
        "batch",
        None,
    )


# -- JAX: keras.distribution on 8 simulated CPU devices -----------------------

JAX_SCRIPT = r"""
import json, os, tempfile, time
T0 = time.perf_counter()
seconds = {}
import numpy as np
import keras, keras_hub
import keras_lora
from keras_lora.distribution import lora_layout_map, variable_layouts
from keras_lora.export import export_saved_model
from keras_lora.merge import merge

D = keras.distribution
out = {"seconds": seconds}
seconds["import"] = time.perf_counter() - T0
devices = D.list_devices()
out["n_devices"] = len(devices)
rng = np.random.default_rng(0)
tolist = lambda a: np.asarray(a, dtype="float64").tolist()

# C15: mesh (1, 2), `.*dense.*kernel` -> (None, "model"), Dense(8), rank 3.
mesh = D.DeviceMesh((1, 2), ("batch", "model"), devices=devices[:2])
lm = D.LayoutMap(mesh)
lm[".*dense.*kernel"] = (None, "model")
x = rng.normal(size=(2, 4)).astype("float32")
with D.ModelParallel(layout_map=lm, batch_dim_name="batch").scope():
    inputs = keras.Input((4,))
    base = keras.Model(inputs, keras.layers.Dense(8, name="dense")(inputs))
    model = keras_lora.apply_lora(base, rank=3, targets="dense")
    layer = model.get_layer("dense")
    layer.lora_b.assign(rng.normal(size=(3, 8)).astype("float32"))
    y = model.predict(x, verbose=0)
    other = keras.layers.Dense(8, name="dense_2")
    other.build((2, 4))
    wrapped = keras_lora.LoRADense.from_layer(other, rank=3)
    out["c15"] = {
        "layouts": variable_layouts(model),
        "from_layer": {
            w.name: list(w.value.sharding.spec) for w in wrapped.weights
        },
        "x": tolist(x), "y": tolist(y), "scaling": layer.scaling,
        "kernel": tolist(layer.kernel), "bias": tolist(layer.bias),
        "a": tolist(layer.lora_a), "b": tolist(layer.lora_b),
    }

seconds["c15"] = time.perf_counter() - T0
# User regexes that match the adapter paths too (two keys: LayoutMap raises).
lm = D.LayoutMap(mesh)
lm[".*dense.*"] = (None, "model")
lm[".*lora_a"] = ("model", None)
try:
    lm["dense/lora_a"]
    clash = None
except ValueError as e:
    clash = str(e)
with D.ModelParallel(layout_map=lm, batch_dim_name="batch").scope():
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(8, use_bias=False, name="dense")
    base = keras.Model(inputs, dense(inputs))
    model = keras_lora.apply_lora(base, rank=3, targets="dense")
    y = model.predict(x, verbose=0)
    out["clash"] = {"error": clash, "layouts": variable_layouts(model),
                    "finite": bool(np.isfinite(y).all())}

seconds["clash"] = time.perf_counter() - T0
# The same architecture of unnamed layers built twice under one map: Keras
# numbers the layers anew (dense_N); the adapters' layouts come from the
# base weights they adapt, so both builds are placed alike.
pair = D.DeviceMesh((1, 2), ("batch", "model"), devices=devices[:2])
lm = D.LayoutMap(pair)
lm[".*dense.*kernel"] = (None, "model")
out["rebuilt"] = []
with D.ModelParallel(layout_map=lm, batch_dim_name="batch").scope():
    for _ in range(2):
        inputs = keras.Input((4,))
        h = keras.layers.Dense(8, use_bias=False)(inputs)
        base = keras.Model(inputs, keras.layers.Dense(6)(h))
        model = keras_lora.apply_lora(base, rank=2,
                                      targets=keras.layers.Dense)
        out["rebuilt"].append(list(variable_layouts(model).items()))
# A tiny GemmaCausalLM: ModelParallel (mesh 2x4, keras-hub's preset map),
# DataParallel (8 devices) and one device, from the same weights.
def lora_gemma():
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=64, num_layers=1, num_query_heads=4,
        num_key_value_heads=4, hidden_dim=16, intermediate_dim=32,
        head_dim=8)
    lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    return keras_lora.apply_lora(
        lm, rank=3, alpha=6,
        targets=["query", "value", "ffw_gating", "token_embedding"])

ids = rng.integers(1, 64, size=(8, 12)).astype("int32")
data = {"token_ids": ids, "padding_mask": np.ones_like(ids, dtype=bool)}
labels = np.roll(ids, -1, axis=1)

def train(model, weights=None):
    if weights is not None:
        model.set_weights(weights)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(data, labels, batch_size=8, epochs=2, verbose=0,
                        shuffle=False)
    adapters = {v.path: np.asarray(v) for v in model.trainable_variables}
    return history.history["loss"], adapters

mesh = D.DeviceMesh((2, 4), ("batch", "model"), devices=devices)
preset = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
with D.ModelParallel(layout_map=preset, batch_dim_name="batch").scope():
    mp = lora_gemma()
    w0 = [np.asarray(w) for w in mp.get_weights()]
    mp_layouts = variable_layouts(mp)
    mp_loss, mp_adapters = train(mp)
    small = {k: v[:2] for k, v in data.items()}
    logits = np.asarray(mp.predict(small, verbose=0))
    seconds["mp_train"] = time.perf_counter() - T0
    merged = merge(mp)
    merged_logits = np.asarray(merged.predict(small, verbose=0))
    seconds["mp_merge"] = time.perf_counter() - T0
    full = lora_layout_map(preset, mp)
    with tempfile.TemporaryDirectory() as tmp:
        report = export_saved_model(mp, os.path.join(tmp, "sm"),
                                    check_inputs=small)
seconds["mp_export"] = time.perf_counter() - T0
out["mp"] = {
    "layouts": mp_layouts, "loss": mp_loss,
    "merged_layouts": variable_layouts(merged),
    "merged_vs_lora": float(np.max(np.abs(merged_logits - logits))),
    "logits_max_abs": float(np.max(np.abs(logits))),
    "merged_has_adapters": any("lora" in v.path for v in merged.variables),
    "export_diff": report.max_abs_diff,
    "export_scale": report.output_max_abs,
    "export_variables": list(report.variables),
    "full_map": {k: list(full[k].axes) for k in full},
}

single = lora_gemma()
single_loss, single_adapters = train(single, w0)
seconds["single"] = time.perf_counter() - T0
out["single"] = {"loss": single_loss}
out["mp_vs_single_adapters"] = max(
    float(np.max(np.abs(mp_adapters[k] - single_adapters[k])))
    for k in single_adapters)
out["adapters_max_abs"] = max(
    float(np.max(np.abs(v))) for v in single_adapters.values())

with D.DataParallel(devices=devices).scope():
    dp = lora_gemma()
    dp_loss, dp_adapters = train(dp, w0)
    out["dp"] = {"layouts": variable_layouts(dp), "loss": dp_loss,
                 "n_model_replicas": D.distribution().num_model_replicas}
seconds["dp"] = time.perf_counter() - T0
out["dp_vs_single_adapters"] = max(
    float(np.max(np.abs(dp_adapters[k] - single_adapters[k])))
    for k in single_adapters)
out["trainable"] = sorted(single_adapters)
print("RESULT " + json.dumps(out, default=str))
"""

needs_jax = pytest.mark.skipif(
    BACKEND != "jax",
    reason="keras.distribution places variables on JAX only; this backend "
    "runs its own engine's test (tf.distribute / torch DDP) below",
)


@pytest.fixture(scope="module")
def jax_report():
    return _run_script(
        JAX_SCRIPT,
        "jax",
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )


def _spec(axes):
    return [None if a is None else a for a in axes]


@needs_jax
@pytest.mark.slow
def test_jax_c15_rank_3_on_mesh_1x2(jax_report):
    """C15: JAX, 2 devices, mesh (1,2), `.*dense.*kernel` -> (None,"model"),
    Dense(8), rank 3 (does not divide 2): apply and forward pass work, the
    adapters get layouts that fit, the output matches the NumPy oracle."""
    assert jax_report["n_devices"] == 8
    c15 = jax_report["c15"]
    layouts = c15["layouts"]
    assert _spec(layouts["dense/kernel"]) == [None, "model"]
    assert _spec(layouts["dense/lora_a"]) == [None, None]
    assert _spec(layouts["dense/lora_b"]) == [None, "model"]
    assert c15["from_layer"]["lora_a"] == [None, None]
    assert c15["from_layer"]["lora_b"] == [None, "model"]
    x, w, bias = (np.array(c15[k]) for k in ("x", "kernel", "bias"))
    a, b = np.array(c15["a"]), np.array(c15["b"])
    assert np.abs(b).max() > 0.1
    expected = x @ w + c15["scaling"] * (x @ a) @ b + bias
    assert_close(np.array(c15["y"]), expected)


@needs_jax
@pytest.mark.slow
def test_jax_layout_map_regex_clash_never_reaches_adapters(jax_report):
    """C15 (regex kind): a user map whose regexes match `dense/lora_a` twice
    makes LayoutMap raise; the adapters ignore the map and still fit."""
    clash = jax_report["clash"]
    assert "matches multiple layout" in clash["error"]
    assert _spec(clash["layouts"]["dense/lora_a"]) == [None, None]
    assert _spec(clash["layouts"]["dense/lora_b"]) == [None, "model"]
    assert clash["finite"]


@needs_jax
@pytest.mark.slow
def test_jax_adapter_layouts_survive_renumbered_rebuild(jax_report):
    """Identity: a second build of the same unnamed-layer architecture
    (Keras renumbers `dense` to `dense_2`, ...) places every adapter like
    the first build, at the same structural position."""
    first, second = jax_report["rebuilt"]
    assert len(first) == len(second) == 7  # 2 kernels, 1 bias, 4 adapters
    assert {p for p, _ in first}.isdisjoint(p for p, _ in second)
    assert [s for _, s in first] == [s for _, s in second]
    by_name = {p.rsplit("/", 1)[1]: [] for p, _ in second}
    for path, spec in second:
        by_name[path.rsplit("/", 1)[1]].append(_spec(spec))
    assert by_name["kernel"] == [[None, "model"]] * 2
    assert by_name["lora_a"] == [[None, None]] * 2
    assert by_name["lora_b"] == [[None, "model"]] * 2


@needs_jax
@pytest.mark.slow
def test_jax_gemma_model_parallel_shardings(jax_report):
    layouts = jax_report["mp"]["layouts"]
    q = "gemma_backbone/decoder_block_0/attention/query/"
    q = q if q + "kernel" in layouts else q.split("/", 1)[1]
    prefix = q.rsplit("/attention/query/", 1)[0]
    assert _spec(layouts[q + "kernel"]) == ["model", "batch", None]
    assert _spec(layouts[q + "lora_a"]) == ["batch", None]
    assert _spec(layouts[q + "lora_b"]) == [None, "model"]
    gating = f"{prefix}/ffw_gating/"
    assert _spec(layouts[gating + "kernel"]) == ["batch", "model"]
    assert _spec(layouts[gating + "lora_a"]) == ["batch", None]
    assert _spec(layouts[gating + "lora_b"]) == [None, "model"]
    emb = [k for k in layouts if k.endswith("token_embedding/embeddings")][0]
    emb = emb.rsplit("/", 1)[0]
    assert _spec(layouts[emb + "/embeddings"]) == ["model", "batch"]
    assert _spec(layouts[emb + "/lora_a"]) == ["model", None]
    assert _spec(layouts[emb + "/lora_b"]) == [None, "batch"]
    # Exact adapter keys from lora_layout_map agree with what was placed.
    full = jax_report["mp"]["full_map"]
    for path, axes in full.items():
        if "lora_" in path:
            assert _spec(layouts[path]) == axes, path


@needs_jax
@pytest.mark.slow
def test_jax_gemma_training_loss_matches_one_device(jax_report):
    single = jax_report["single"]["loss"]
    assert len(single) == 2 and single[1] < single[0]
    # Losses after training steps through a whole model, with reductions
    # split across devices: rounding of many chained ops.
    assert_close(jax_report["mp"]["loss"], single, ulps=128)
    assert_close(jax_report["dp"]["loss"], single, ulps=128)
    # Adapters after training steps, reductions split across devices.
    for key in ("mp_vs_single_adapters", "dp_vs_single_adapters"):
        assert_diff_within(
            jax_report[key], jax_report["adapters_max_abs"], ulps=256
        )
    assert all("lora_" in p for p in jax_report["trainable"])
    assert len(jax_report["trainable"]) == 8  # 4 layers x (A, B)


@needs_jax
@pytest.mark.slow
def test_jax_gemma_data_parallel_replicates_everything(jax_report):
    dp = jax_report["dp"]
    assert dp["n_model_replicas"] == 8
    for path, spec in dp["layouts"].items():
        assert all(a is None for a in spec), (path, spec)


@needs_jax
@pytest.mark.slow
def test_jax_merge_and_export_from_model_parallel(jax_report):
    mp = jax_report["mp"]
    # A whole decoder, merged against unmerged.
    assert_diff_within(mp["merged_vs_lora"], mp["logits_max_abs"], ulps=256)
    assert not mp["merged_has_adapters"]
    merged = mp["merged_layouts"]
    kernel = [k for k in merged if k.endswith("attention/query/kernel")][0]
    assert _spec(merged[kernel]) == ["model", "batch", None]
    assert_diff_within(mp["export_diff"], mp["export_scale"], ulps=256)
    assert not any("lora" in v for v in mp["export_variables"])


# -- TensorFlow: MirroredStrategy on 2 logical CPU devices --------------------

TF_SCRIPT = r"""
import json, os, tempfile
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np
import keras
import keras_lora
from keras_lora.export import export_saved_model
from keras_lora.merge import merge

out = {"devices": [d.name for d in tf.config.list_logical_devices("CPU")]}
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
out["replicas"] = strategy.num_replicas_in_sync
rng = np.random.default_rng(0)
x = rng.normal(size=(16, 6)).astype("float32")
y = rng.normal(size=(16, 4)).astype("float32")

def base_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu", name="d1")(inputs)
    return keras.Model(inputs, keras.layers.Dense(4, name="d2")(h))

def lora_of(base):
    model = keras_lora.apply_lora(base, rank=2, alpha=4, targets=["d1", "d2"])
    for name in ("d1", "d2"):
        b = model.get_layer(name).lora_b
        b.assign(np.linspace(-0.2, 0.2, b.shape[0] * b.shape[1])
                 .reshape(b.shape).astype("float32"))
    return model

def fit(model):
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    h = model.fit(x, y, batch_size=16, epochs=3, verbose=0, shuffle=False)
    return h.history["loss"]

mirrored = lambda v: isinstance(v.value, tf.distribute.DistributedValues)
with strategy.scope():
    base = base_model()
w0 = [np.asarray(w) for w in base.get_weights()]
# apply_lora outside the scope: adapters follow their base weights.
model = lora_of(base)
out["mirrored"] = {v.path: mirrored(v) for v in model.weights}
adapters0 = {v.path: np.asarray(v) for v in model.trainable_variables}
with strategy.scope():
    loss = fit(model)
out["loss"] = loss
out["base_unchanged"] = all(
    np.array_equal(np.asarray(a), b) for a, b in zip(base.get_weights(), w0))
adapters = {v.path: np.asarray(v) for v in model.trainable_variables}
out["trainable"] = sorted(adapters)
with strategy.scope():
    merged = merge(model)
out["merged_vs_lora"] = float(np.max(np.abs(
    np.asarray(merged.predict(x, verbose=0))
    - np.asarray(model.predict(x, verbose=0)))))
out["outputs_max_abs"] = float(np.max(np.abs(
    np.asarray(model.predict(x, verbose=0)))))
with tempfile.TemporaryDirectory() as tmp:
    report = export_saved_model(model, os.path.join(tmp, "sm"),
                                check_inputs=x[:4])
    loaded = tf.saved_model.load(os.path.join(tmp, "sm"))
    served = loaded.serve(x[:4])
out["export_diff"] = report.max_abs_diff
out["export_scale"] = report.output_max_abs
out["served_vs_lora"] = float(np.max(np.abs(
    np.asarray(served) - np.asarray(model.predict(x[:4], verbose=0)))))
out["export_variables"] = list(report.variables)

# The same run on one device, from the same weights.
single_base = base_model()
single_base.set_weights(w0)
single = lora_of(single_base)
for v in single.trainable_variables:
    v.assign(adapters0[v.path])
out["single_loss"] = fit(single)
single_adapters = {v.path: np.asarray(v) for v in single.trainable_variables}
out["adapters_diff"] = max(
    float(np.max(np.abs(adapters[k] - single_adapters[k])))
    for k in single_adapters)
out["adapters_max_abs"] = max(
    float(np.max(np.abs(v))) for v in single_adapters.values())

# A LoRA layer built inside the scope trains too.
with strategy.scope():
    inputs = keras.Input((6,))
    layer = keras_lora.LoRADense(4, rank=2, name="inside")
    inside = keras.Model(inputs, layer(inputs))
    before = np.asarray(layer.lora_b)
    inside_loss = fit(inside)
out["inside"] = {"mirrored": {v.name: mirrored(v) for v in layer.weights},
                 "b_moved": float(np.max(np.abs(np.asarray(layer.lora_b)
                                                - before))),
                 "loss": inside_loss}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="tf.distribute runs under KERAS_BACKEND=tensorflow; this backend "
    "runs its own engine's multi-device test",
)
@pytest.mark.slow
def test_tf_mirrored_strategy_fit_merge_export():
    report = _run_script(TF_SCRIPT, "tensorflow")
    assert report["replicas"] == 2 and len(report["devices"]) == 2
    # Every variable, adapters included, is mirrored on both devices.
    assert report["mirrored"] and all(report["mirrored"].values())
    assert report["trainable"] == [
        "d1/lora_a",
        "d1/lora_b",
        "d2/lora_a",
        "d2/lora_b",
    ]
    assert report["base_unchanged"]
    # Training losses with reductions split across replicas.
    assert_close(report["loss"], report["single_loss"], ulps=128)
    assert report["loss"][2] < report["loss"][0]
    # Adapters after training steps, reductions split across replicas.
    assert_diff_within(
        report["adapters_diff"], report["adapters_max_abs"], ulps=256
    )
    scale = report["outputs_max_abs"]
    assert_diff_within(report["merged_vs_lora"], scale)
    assert_diff_within(report["export_diff"], report["export_scale"])
    assert_diff_within(report["served_vs_lora"], scale)
    assert not any("lora" in v for v in report["export_variables"])
    inside = report["inside"]
    assert all(inside["mirrored"].values())
    assert inside["b_moved"] > 0


# -- PyTorch: DistributedDataParallel through the user's own launcher ----------

TORCH_SCRIPT = r"""
import json, os, socket, tempfile
import numpy as np
from safetensors.numpy import load_file
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import keras
import keras_lora

def make():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu", name="d1")(inputs)
    base = keras.Model(inputs, keras.layers.Dense(4, name="d2")(h))
    model = keras_lora.apply_lora(base, rank=2, alpha=4, targets=["d1", "d2"])
    for name in ("d1", "d2"):
        b = model.get_layer(name).lora_b
        b.assign(np.linspace(-0.2, 0.2, b.shape[0] * b.shape[1])
                 .reshape(b.shape).astype("float32"))
    return model

rng = np.random.default_rng(0)
X = rng.normal(size=(16, 6)).astype("float32")
Y = rng.normal(size=(16, 4)).astype("float32")

def train(model, x, y, net=None):
    net = net or model
    params = [v.value for v in model.trainable_variables]
    opt = torch.optim.SGD(params, lr=0.1)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = torch.mean((net(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses

def state(model):
    return {v.path: np.asarray(v.value.detach()).tolist()
            for v in model.weights}

def worker(rank, world, port, queue):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = make()
    n = len(X) // world
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    losses = train(model, X[rank * n:(rank + 1) * n],
                   Y[rank * n:(rank + 1) * n], ddp)
    # Every rank calls save_adapters; rank 0 writes, all return after.
    path = os.path.join(OUT, "ddp.safetensors")
    keras_lora.save_adapters(model, path)
    assert os.path.exists(path)
    queue.put((rank, losses, state(model)))
    dist.destroy_process_group()

OUT = tempfile.mkdtemp()
single = make()
base0 = state(single)
single_loss = train(single, X, Y)
single_state = state(single)
sock = socket.socket(); sock.bind(("127.0.0.1", 0))
port = sock.getsockname()[1]; sock.close()
ctx = mp.get_context("fork")
queue = ctx.Queue()
procs = [ctx.Process(target=worker, args=(r, 2, port, queue)) for r in range(2)]
for p in procs:
    p.start()
results = sorted(queue.get(timeout=600) for _ in procs)
for p in procs:
    p.join(timeout=60)
out = {"single_loss": single_loss,
       "exitcodes": [p.exitcode for p in procs],
       "rank_losses": [r[1] for r in results],
       "trainable": sorted(v.path for v in single.trainable_variables)}
out["files"] = os.listdir(OUT)
written = load_file(os.path.join(OUT, "ddp.safetensors"))
out["file_keys"] = sorted(written)
out["file_diff_vs_single"] = max(
    float(np.max(np.abs(v - np.array(single_state[k.replace(".", "/")]))))
    for k, v in written.items())
out["max_diff_vs_single"] = max(
    float(np.max(np.abs(np.array(r[2][k]) - np.array(single_state[k]))))
    for r in results for k in single_state)
out["state_max_abs"] = max(
    float(np.max(np.abs(np.array(v)))) for v in single_state.values())
out["base_moved"] = max(
    float(np.max(np.abs(np.array(r[2][k]) - np.array(base0[k]))))
    for r in results for k in base0 if "lora" not in k)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.skipif(
    BACKEND != "torch",
    reason="DDP runs under KERAS_BACKEND=torch; this backend runs its own "
    "engine's multi-device test",
)
@pytest.mark.slow
def test_torch_ddp_two_processes_match_one_process():
    """What docs/distribution.md claims for PyTorch: a LoRA model wrapped in
    DistributedDataParallel (gloo, 2 CPU processes, half the batch each)
    with a torch training loop ends with the same weights as one process on
    the whole batch; only the adapters move."""
    report = _run_script(TORCH_SCRIPT, "torch")
    assert report["exitcodes"] == [0, 0]
    assert report["trainable"] == [
        "d1/lora_a",
        "d1/lora_b",
        "d2/lora_a",
        "d2/lora_b",
    ]
    # Mean of the two ranks' half-batch losses = the full-batch loss.
    rank_mean = np.mean(report["rank_losses"], axis=0)
    # Training losses with reductions split across processes.
    assert_close(rank_mean, report["single_loss"], ulps=128)
    assert report["single_loss"][2] < report["single_loss"][0]
    assert_diff_within(report["max_diff_vs_single"], report["state_max_abs"])
    assert report["base_moved"] == 0.0
    # save_adapters on both ranks: one file (rank 0's), the trained adapters.
    assert report["files"] == ["ddp.safetensors"]
    assert report["file_keys"] == [
        "d1.lora_a",
        "d1.lora_b",
        "d2.lora_a",
        "d2.lora_b",
    ]
    assert_diff_within(report["file_diff_vs_single"], report["state_max_abs"])
