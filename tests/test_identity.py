"""Identity that survives a rebuild: stable paths, adapter files, `.keras`.

Keras numbers the names of layers created without one (`dense_40`) and of
a model built a second time (`gemma_backbone_1`). keras_lora identifies
layers by where Keras's saving library stores them instead
(`keras_lora.walk`), so a model rebuilt in the same process or another
clones, loads adapter files and reloads `.keras` files alike.
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import to_numpy
from models import causal_lm_batch
from models import randomize_adapters
from models import tiny_gemma_causal_lm
from numerics import assert_close
from numerics import assert_exact

import keras_lora as kl
from keras_lora._keras_private import remat_mode
from keras_lora.walk import stable_layer_paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@keras.saving.register_keras_serializable(package="keras_lora_tests")
class Block(keras.layers.Layer):
    """A block whose sub-layers get Keras's auto-numbered names."""

    def build(self, input_shape):
        self.query = keras.layers.Dense(8)
        self.value = keras.layers.Dense(8)
        self.query.build(input_shape)
        self.value.build(input_shape)

    def call(self, x):
        return self.query(x) + self.value(x)


def _block_model():
    inputs = keras.Input((8,))
    outputs = keras.layers.Dense(4, name="head")(Block(name="block")(inputs))
    return keras.Model(inputs, outputs, name="blocks")


def test_stable_paths_ignore_auto_numbered_names():
    first, second = _block_model(), _block_model()

    def names(model):
        block = model.get_layer("block")
        return [block.query.name, block.value.name]

    assert names(first) != names(second)
    assert list(stable_layer_paths(first)) == list(stable_layer_paths(second))
    assert "layers/block/query" in stable_layer_paths(first)


def test_walk_caches_keras_attribute_skipset_without_changing_paths():
    """Keras 3.15 looks the saving walk's attribute skip-set up under
    another key than it stores it, so each visited layer rebuilt it; the
    walk stores it where the lookup finds it. Same paths with a cold and a
    warm cache, and the cached set is Keras's own."""
    from keras.src.backend.common import global_state
    from keras.src.saving import saving_lib

    keras.backend.clear_session()
    expected = saving_lib.get_attr_skipset("Layer")  # computed afresh
    assert "_self_unconditional_dependency_names" in expected
    cold = list(stable_layer_paths(_block_model()))
    cached = global_state.get_global_attribute("saving_attr_skiplist_Layer")
    assert cached == expected
    assert list(stable_layer_paths(_block_model())) == cold


def test_clone_with_auto_numbered_sublayers_shares_every_variable(rng):
    """The clone rebuilds `Block` with new numbers; it still shares every
    base variable (matched by structure, never by name) and merge works."""
    model = _block_model()
    x = rng.normal(size=(3, 8)).astype("float32")
    before = to_numpy(model(x))
    lora = kl.apply_lora(model, rank=2, targets=[keras.layers.Dense])
    assert sorted(kl.lora_layers(lora))[0].startswith("block/")
    base_ids = {id(v) for v in model.weights}
    lora_base = [v for v in lora.weights if "lora" not in v.path]
    assert {id(v) for v in lora_base} == base_ids
    assert_exact(to_numpy(lora(x)), before)
    randomize_adapters(lora)
    out = to_numpy(lora(x))
    merged = kl.merge(lora)
    assert_close(to_numpy(merged(x)), out)
    assert_exact(to_numpy(model(x)), before)


def test_clone_given_the_original_paths_is_the_clone_of_a_fresh_walk():
    """apply_lora hands the clone the stable paths it already walked; the
    clone is the same as when the clone walks the model itself: the same
    layer paths, each sharing the same variables of the model."""
    from keras_lora.clone import clone_with_layer_paths

    model = tiny_gemma_causal_lm()
    walked, walked_paths = clone_with_layer_paths(model)
    given, given_paths = clone_with_layer_paths(
        model, originals=stable_layer_paths(model)
    )
    assert list(given_paths) == list(walked_paths)
    assert list(given_paths) == list(stable_layer_paths(given))
    for path, layer in given_paths.items():
        assert [id(v) for v in layer.weights] == [
            id(v) for v in walked_paths[path].weights
        ], path
    assert {id(v) for v in given.weights} == {id(v) for v in model.weights}


def test_adapter_file_loads_into_the_same_model_built_again(tmp_path):
    """The same architecture built twice in one process: the second gets
    `gemma_backbone_1/...` layer paths, and loads the first's file."""
    x, _, _ = causal_lm_batch()
    first = tiny_gemma_causal_lm()
    lora = kl.apply_lora(first, rank=2)
    randomize_adapters(lora, seed=3)
    expected = to_numpy(lora(x))
    kl.save_adapters(lora, tmp_path / "a.safetensors")

    second = tiny_gemma_causal_lm()
    second.set_weights(first.get_weights())
    assert second.backbone.name != first.backbone.name
    loaded = kl.load_adapters(second, tmp_path / "a.safetensors")
    assert sorted(kl.lora_layers(loaded)) != sorted(kl.lora_layers(lora))
    assert_exact(to_numpy(loaded(x)), expected)
    # Into an adapted model too (the file's paths are re-keyed).
    adapted = kl.apply_lora(second, rank=2)
    kl.load_adapters(adapted, tmp_path / "a.safetensors")
    assert_exact(to_numpy(adapted(x)), expected)


def test_adapter_file_loads_into_auto_numbered_sublayers(tmp_path, rng):
    model = _block_model()
    lora = kl.apply_lora(model, rank=2, targets=[keras.layers.Dense])
    randomize_adapters(lora, seed=1)
    x = rng.normal(size=(2, 8)).astype("float32")
    expected = to_numpy(lora(x))
    kl.save_adapters(lora, tmp_path / "b.safetensors")
    rebuilt = _block_model()
    rebuilt.set_weights(model.get_weights())
    loaded = kl.load_adapters(rebuilt, tmp_path / "b.safetensors")
    assert_exact(to_numpy(loaded(x)), expected)


_RESUME = textwrap.dedent(
    """
    import sys
    import numpy as np
    import keras
    import keras_lora
    sys.path.insert(0, {tests!r})
    from models import causal_lm_batch
    data = np.load({data!r})
    model = keras.saving.load_model({path!r})
    assert keras_lora.lora_layers(model), "no adapters after reload"
    x, y, w = causal_lm_batch()
    out = keras.ops.convert_to_numpy(model(x))
    print("max_diff", float(np.max(np.abs(out - data["out"]))))
    paths = sorted(v.path for v in model.trainable_variables)
    assert paths == sorted(data["trainable"].tolist()), paths
    # keras-hub tasks have a custom compile(), which Keras does not re-run
    # on load: compile again, as without LoRA.
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(x, y, sample_weight=w, epochs=1, verbose=0)
    np.savez({result!r}, loss=history.history["loss"][-1], out=keras.ops.
             convert_to_numpy(model(x)))
    """
)


@pytest.mark.slow
def test_gemma_causal_lm_keras_file_resumes_training_in_a_new_process(
    tmp_path,
):
    """A LoRA `GemmaCausalLM` trained two steps, saved as one `.keras` file,
    loaded in a new process (keras_lora imported): same outputs, same
    trainable variables, and one more SGD step there equals one more step
    here (Keras does not restore a keras-hub task's compile(), so the
    optimizer is stateless SGD; `test_functional_keras_file_restores_the_
    optimizer_state` covers Adam's state)."""
    x, y, w = causal_lm_batch()
    lora = kl.apply_lora(tiny_gemma_causal_lm(), rank=2)
    lora.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    lora.fit(x, y, sample_weight=w, epochs=2, verbose=0)
    path = tmp_path / "lm.keras"
    lora.save(path)
    out = to_numpy(lora(x))
    np.savez(
        tmp_path / "data.npz",
        out=out,
        trainable=np.array(sorted(v.path for v in lora.trainable_variables)),
    )
    script = tmp_path / "resume.py"
    script.write_text(
        _RESUME.format(
            tests=os.path.join(REPO, "tests"),
            data=str(tmp_path / "data.npz"),
            path=str(path),
            result=str(tmp_path / "result.npz"),
        )
    )
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max_diff 0.0" in proc.stdout, proc.stdout
    history = lora.fit(x, y, sample_weight=w, epochs=1, verbose=0)
    result = np.load(tmp_path / "result.npz")
    # The same training step on the same backend, in two processes.
    assert_close(result["loss"], history.history["loss"][-1], ulps=128)
    assert_close(result["out"], to_numpy(lora(x)), ulps=128)


def test_functional_keras_file_restores_the_optimizer_state(tmp_path, rng):
    """A model whose adapted layers are built inside a subclassed layer
    (not in the config): `.keras` round trip keeps adapters, frozen base
    and Adam's state, so one more step after reload equals one more step
    without it."""
    model = _block_model()
    lora = kl.apply_lora(model, rank=2, targets=[keras.layers.Dense])
    randomize_adapters(lora, seed=2)
    x = rng.normal(size=(4, 8)).astype("float32")
    y = rng.normal(size=(4, 4)).astype("float32")
    lora.compile(keras.optimizers.Adam(1e-2), "mse")
    lora.fit(x, y, epochs=2, verbose=0)
    lora.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    assert_exact(to_numpy(reloaded(x)), to_numpy(lora(x)))
    assert int(reloaded.optimizer.iterations) == 2
    # Variable paths hold auto-numbered names; compare names and shapes.
    assert [(v.name, v.shape) for v in reloaded.trainable_variables] == [
        (v.name, v.shape) for v in lora.trainable_variables
    ]
    lora.fit(x, y, epochs=1, verbose=0)
    reloaded.fit(x, y, epochs=1, verbose=0)
    assert_close(to_numpy(reloaded(x)), to_numpy(lora(x)), ulps=8)
    # A reloaded model saves with its plan again (load, save, load), and
    # the class's own from_config rebuilds it.
    reloaded.save(tmp_path / "again.keras")
    again = keras.saving.load_model(tmp_path / "again.keras")
    assert_exact(to_numpy(again(x)), to_numpy(reloaded(x)))
    twin = type(reloaded).from_config(reloaded.get_config())
    assert len(kl.lora_layers(twin)) == len(kl.lora_layers(reloaded))
    base = model.get_layer("block").query.kernel
    assert not base.trainable


@pytest.mark.slow
def test_keras_file_without_keras_lora_names_it(tmp_path):
    lora = kl.apply_lora(tiny_gemma_causal_lm(), rank=2)
    lora.save(tmp_path / "lm.keras")
    code = (
        "import keras, keras_hub\n"
        f"keras.saving.load_model({str(tmp_path / 'lm.keras')!r})\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    assert "keras_lora" in proc.stderr


def test_model_checkpoint_full_and_weights_only(tmp_path):
    """`keras.callbacks.ModelCheckpoint` during a LoRA fit of a keras-hub
    task: the full-model file reloads with the adapters, and the
    weights-only file loads into a model adapted the same way."""
    x, y, w = causal_lm_batch()
    lora = kl.apply_lora(tiny_gemma_causal_lm(), rank=2)
    lora.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    full = str(tmp_path / "full.keras")
    weights = str(tmp_path / "w.weights.h5")
    lora.fit(
        x,
        y,
        sample_weight=w,
        epochs=2,
        verbose=0,
        callbacks=[
            keras.callbacks.ModelCheckpoint(full),
            keras.callbacks.ModelCheckpoint(weights, save_weights_only=True),
        ],
    )
    expected = to_numpy(lora(x))
    assert_exact(to_numpy(keras.saving.load_model(full)(x)), expected)
    twin = kl.apply_lora(tiny_gemma_causal_lm(), rank=2)
    twin.load_weights(weights)
    assert_exact(to_numpy(twin(x)), expected)


def _remat_model():
    inputs = keras.Input((16,))
    x = keras.layers.Dense(16, name="query")(inputs)
    x = keras.layers.Dense(16, name="value")(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="out")(x))


def _train_three_sgd_steps(model, x, y):
    # Keras 3.15's remat on TensorFlow works only eagerly (in a tf.function
    # its custom_gradient rejects keyword arguments, without LoRA too).
    eager = keras.backend.backend() == "tensorflow"
    model.compile(
        keras.optimizers.SGD(0.1),
        "mse",
        jit_compile="auto",
        run_eagerly=eager,
    )
    return model.fit(x, y, epochs=3, batch_size=4, verbose=0).history["loss"]


def test_c23_remat_mode_survives_apply_and_merge(rng):
    """C23: Dense(16) "query" -> Dense(16) "value" -> Dense(2) built inside
    keras.RematScope(mode="full"), rank 2, 3 SGD steps: apply_lora and
    merge keep each layer's remat mode; losses and trained B equal the run
    without remat."""
    x = rng.normal(size=(4, 16)).astype("float32")
    y = rng.normal(size=(4, 2)).astype("float32")
    keras.utils.set_random_seed(7)
    with keras.RematScope(mode="full"):
        remat = _remat_model()
    keras.utils.set_random_seed(7)
    plain = _remat_model()
    plain.set_weights(remat.get_weights())
    runs = {}
    for label, model in (("remat", remat), ("plain", plain)):
        keras.utils.set_random_seed(11)
        lora = kl.apply_lora(model, rank=2)
        for path, layer in kl.lora_layers(lora).items():
            expected = remat_mode(model.get_layer(path))
            assert remat_mode(layer) == expected, path
        randomize_adapters(lora, seed=5)
        runs[label] = (_train_three_sgd_steps(lora, x, y), lora)
    assert remat_mode(remat.get_layer("query")).mode == "full"
    assert_close(runs["remat"][0], runs["plain"][0])
    for name in ("query", "value"):
        assert_close(
            to_numpy(runs["remat"][1].get_layer(name).lora_b),
            to_numpy(runs["plain"][1].get_layer(name).lora_b),
        )
    merged = kl.merge(runs["remat"][1])
    for name in ("query", "value", "out"):
        assert remat_mode(merged.get_layer(name)).mode == "full"


def _adapted_gemma():
    keras.utils.set_random_seed(0)
    lora = kl.apply_lora(tiny_gemma_causal_lm(), rank=2)
    randomize_adapters(lora, seed=3)
    return lora


def _stable_lora_paths(model):
    return sorted(
        path
        for path, layer in stable_layer_paths(model).items()
        if isinstance(layer, kl.LoRALayer)
    )


def test_backbone_of_an_adapted_task_saves_and_reloads_alone(tmp_path):
    """`lora.backbone.save()` writes the backbone with its adapters: it
    reloads as the backbone class, adapters at the same places, same
    outputs, only the adapters trainable."""
    lora = _adapted_gemma()
    x, _, _ = causal_lm_batch()
    want = to_numpy(lora.backbone(x))
    path = tmp_path / "backbone.keras"
    lora.backbone.save(path)
    reloaded = keras.saving.load_model(path)
    assert type(reloaded).__name__ == "GemmaBackbone"
    assert isinstance(reloaded, type(lora.backbone).keras_lora_base_class)
    assert _stable_lora_paths(reloaded) == _stable_lora_paths(lora.backbone)
    assert len(kl.lora_layers(reloaded)) == 4  # 2 blocks x (query, value)
    assert all("lora_" in v.path for v in reloaded.trainable_variables)
    assert_exact(to_numpy(reloaded(x)), want)


def test_adapted_models_pickle(rng):
    """Keras pickles models through their `.keras` bytes; adapted models
    (whose class is made at run time) pickle and unpickle alike."""
    import pickle

    lora = _adapted_gemma()
    x, _, _ = causal_lm_batch()
    for model in (lora, lora.backbone):
        again = pickle.loads(pickle.dumps(model))
        assert type(again).__name__ == type(model).__name__
        assert _stable_lora_paths(again) == _stable_lora_paths(model)
        assert_exact(to_numpy(again(x)), to_numpy(model(x)))


def test_save_to_preset_of_an_adapted_model_is_refused(tmp_path):
    """keras-hub's `from_preset` cannot load a LoRA model's preset: saving
    one raises, names the directory and the ways that work, writes
    nothing; the merged model saves a preset that loads."""
    keras_hub = pytest.importorskip("keras_hub")
    lora = _adapted_gemma()
    for model in (lora, lora.backbone):
        target = tmp_path / f"preset_{model.name}"
        with pytest.raises(ValueError, match=r"(?s)save_to_preset.*merge"):
            model.save_to_preset(str(target))
        assert not target.exists()
    merged = kl.merge(lora)
    merged.backbone.save_to_preset(str(tmp_path / "merged"))
    loaded = keras_hub.models.GemmaBackbone.from_preset(
        str(tmp_path / "merged")
    )
    x, _, _ = causal_lm_batch()
    assert_exact(to_numpy(loaded(x)), to_numpy(merged.backbone(x)))


class _Holder(keras.layers.Layer):
    """Holds its variables in the containers custom layers use."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(2,), name="w")
        self.pair = (self.add_weight(shape=(3,), name="p0"), 1.0)
        self.table = {"inner": [self.add_weight(shape=(4,), name="t0")]}

    def call(self, x):
        return x


def test_replace_variables_reaches_tuples_and_nested_containers():
    from keras_lora._keras_private import replace_variables

    holder = _Holder()
    holder.build((1,))
    old = [holder.w, holder.pair[0], holder.table["inner"][0]]
    new = [keras.Variable(np.full(v.shape, 7.0, "float32")) for v in old]
    mapping = {id(o): n for o, n in zip(old, new, strict=True)}
    assert replace_variables(holder, mapping)
    assert holder.w is new[0]
    assert holder.pair[0] is new[1] and holder.pair[1] == 1.0
    assert holder.table["inner"][0] is new[2]
