"""Tests of `keras_lora.export_saved_model` (TF SavedModel from any backend).

Every test runs under each backend (`KERAS_BACKEND=tensorflow|jax|torch`);
the SavedModel is reloaded with `tf.saved_model.load` in this process
(TensorFlow is installed for every backend) and its `serve` outputs are
compared with the LoRA model's, computed by the backend under test.
"""

import os

import keras
import keras_hub
import numpy as np
import pytest
from numerics import assert_close
from numerics import assert_diff_within
from numerics import close

import keras_lora
from keras_lora.export import ExportError
from keras_lora.export import export_saved_model
from keras_lora.export import saved_model_cli_show
from keras_lora.export import saved_model_report


def _randomize_adapters(model, seed=0):
    """Gives every adapter non-zero values (B = 0 would hide merge bugs)."""
    rng = np.random.default_rng(seed)
    layers = keras_lora.lora_layers(model)
    assert layers, "the model has no LoRA layers"
    for layer in layers.values():
        for weight in layer.adapter_weights().values():
            weight.assign(
                rng.normal(0, 0.2, size=tuple(weight.shape)).astype("float32")
            )
    return layers


def _serve(path, inputs):
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    return loaded, loaded.serve(
        tf.nest.map_structure(lambda x: tf.constant(x), inputs)
    )


def _assert_no_adapters(loaded):
    names = [v.name for v in loaded.variables]
    assert names, "the SavedModel has no variables"
    assert not [n for n in names if "lora" in n], names


def _conv_dense_model():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(5, name="dense")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def conv_export(tmp_path_factory):
    """A functional Conv2D + Dense model with trained-looking adapters,
    exported once (module scope: an export from JAX/torch is a TF
    subprocess, ~10-30 s)."""
    keras.utils.set_random_seed(7)
    model = _conv_dense_model()
    lora_model = keras_lora.apply_lora(model, rank=2, alpha=4)
    _randomize_adapters(lora_model)
    x = np.random.default_rng(1).normal(size=(3, 8, 8, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(lora_model(x))
    path = str(tmp_path_factory.mktemp("conv") / "saved_model")
    result = export_saved_model(lora_model, path, check_inputs=x)
    return lora_model, x, expected, result


def test_functional_conv_dense_export_reproduces_lora_outputs(conv_export):
    lora_model, x, expected, result = conv_export
    assert result.path.endswith("saved_model") and os.path.isdir(result.path)
    assert {"serve", "serving_default"} <= set(result.signatures)
    assert_diff_within(result.max_abs_diff, result.output_max_abs)
    assert result.output_max_abs == np.abs(expected).max()
    loaded, actual = _serve(result.path, x)
    assert_close(np.asarray(actual), expected)
    _assert_no_adapters(loaded)
    # The merged kernels are W + s A B (C09), not the base kernels: the
    # LoRA model's output differs from the base model's here.
    base = keras_lora.unload(lora_model)
    assert not close(keras.ops.convert_to_numpy(base(x)), expected, ulps=8192)
    # The LoRA model is unchanged by the export: still LoRA layers.
    assert len(keras_lora.lora_layers(lora_model)) == 2
    expected_method = (
        "in-process"
        if keras.backend.backend() == "tensorflow"
        else "subprocess"
    )
    assert result.method == expected_method


def test_saved_model_cli_lists_serve_signature(conv_export):
    _, _, _, result = conv_export
    text = saved_model_cli_show(result.path)
    assert "signature_def['serve']" in text
    assert "signature_def['serving_default']" in text
    assert "(-1, 8, 8, 3)" in text


def test_sequential_export_overwrite_and_no_half_written_dir(tmp_path):
    """C14: merge then export gives a plain model (no adapter variables)."""
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8), keras.layers.Dense(2)]
    )
    lora_model = keras_lora.apply_lora(model, rank=2)
    _randomize_adapters(lora_model, seed=3)
    x = np.random.default_rng(2).normal(size=(4, 6)).astype("float32")
    path = tmp_path / "export"
    path.mkdir()
    (path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_saved_model(lora_model, path, check_inputs=x)
    assert (path / "keep.txt").read_text() == "user data"
    result = export_saved_model(
        lora_model, path, check_inputs=x, overwrite=True
    )
    assert not (path / "keep.txt").exists()
    assert_diff_within(result.max_abs_diff, result.output_max_abs)
    # No staging folder is left next to the export.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    report = saved_model_report(str(path), x)
    assert_close(report["outputs"], keras.ops.convert_to_numpy(lora_model(x)))
    assert not [v for v in report["variables"] if "lora" in v]


def _tiny_bert_classifier():
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=12,
    )
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=3, preprocessor=None
    )


@pytest.mark.slow
def test_keras_hub_bert_text_classifier_export(tmp_path):
    keras.utils.set_random_seed(11)
    model = _tiny_bert_classifier()
    lora_model = keras_lora.apply_lora(model, rank=2)
    layers = _randomize_adapters(lora_model)
    assert any(p.endswith("self_attention_layer/query") for p in layers)
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(1, 50, size=(2, 12)).astype("int32"),
        "padding_mask": np.ones((2, 12), dtype="int32"),
        "segment_ids": np.zeros((2, 12), dtype="int32"),
    }
    result = export_saved_model(lora_model, tmp_path / "bert", check_inputs=x)
    assert_diff_within(result.max_abs_diff, result.output_max_abs, ulps=256)
    loaded, logits = _serve(result.path, x)
    # A whole model, merged kernels against unmerged branches through
    # attention, softmax and layer norms: rounding of many chained ops.
    assert_close(
        np.asarray(logits), keras.ops.convert_to_numpy(lora_model(x)), ulps=256
    )
    _assert_no_adapters(loaded)


@pytest.mark.slow
def test_keras_hub_gemma_backbone_export(tmp_path):
    keras.utils.set_random_seed(5)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=64,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
    )
    lora_model = keras_lora.apply_lora(backbone, rank=2)
    layers = _randomize_adapters(lora_model)
    assert "decoder_block_0/attention/query" in layers
    rng = np.random.default_rng(4)
    x = {
        "token_ids": rng.integers(1, 64, size=(2, 7)).astype("int32"),
        "padding_mask": np.array([[1] * 7, [1] * 5 + [0] * 2], "int32"),
    }
    result = export_saved_model(lora_model, tmp_path / "gemma", check_inputs=x)
    assert_diff_within(result.max_abs_diff, result.output_max_abs, ulps=256)
    loaded, hidden = _serve(result.path, x)
    # A whole model (see above): rounding of many chained ops.
    assert_close(
        np.asarray(hidden), keras.ops.convert_to_numpy(lora_model(x)), ulps=256
    )
    _assert_no_adapters(loaded)


# -- Errors --------------------------------------------------------------------


def _small_lora_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    return keras_lora.apply_lora(model, rank=1)


def test_bad_path_type_and_empty_path():
    model = _small_lora_model()
    with pytest.raises(TypeError, match="path=123"):
        export_saved_model(model, 123)
    with pytest.raises(ValueError, match="must not be empty"):
        export_saved_model(model, "  ")


def test_path_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "model.pb"
    target.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        export_saved_model(_small_lora_model(), target)
    assert target.read_text() == "x"


def test_parent_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="parent folder"):
        export_saved_model(_small_lora_model(), tmp_path / "file" / "sm")


def test_bad_model_and_arguments(tmp_path):
    with pytest.raises(TypeError, match="keras.Model"):
        export_saved_model(keras.layers.Dense(2), tmp_path / "a")
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="built"):
        export_saved_model(unbuilt, tmp_path / "b")
    model = _small_lora_model()
    with pytest.raises(TypeError, match="overwrite='yes'"):
        export_saved_model(model, tmp_path / "c", overwrite="yes")
    with pytest.raises(ValueError, match="method='fast'"):
        export_saved_model(model, tmp_path / "d", method="fast")
    if keras.backend.backend() != "tensorflow":
        with pytest.raises(ValueError, match="TensorFlow backend"):
            export_saved_model(model, tmp_path / "e", method="in-process")
    assert not any(tmp_path.iterdir())


class _Doubler(keras.layers.Layer):
    def call(self, x):
        return 2.0 * x


_Doubler.__module__ = "__main__"  # as if defined in the user's script


def test_main_module_class_is_refused_for_subprocess_export(tmp_path):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, _Doubler()(keras.layers.Dense(2)(inputs)))
    with pytest.raises(ExportError, match="__main__"):
        export_saved_model(model, tmp_path / "sm", method="subprocess")
    assert not any(tmp_path.iterdir())


@keras.saving.register_keras_serializable(package="keras_lora_tests")
class BrokenOnLoad(keras.layers.Layer):
    """Loads in no process: its `from_config` raises."""

    def call(self, x):
        return x

    @classmethod
    def from_config(cls, config):
        raise RuntimeError("BrokenOnLoad cannot be deserialized")


@pytest.mark.slow
def test_subprocess_failure_reports_its_stderr(tmp_path):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, BrokenOnLoad()(inputs))
    with pytest.raises(ExportError, match="BrokenOnLoad cannot be"):
        export_saved_model(model, tmp_path / "sm", method="subprocess")
    assert not any(tmp_path.iterdir())
