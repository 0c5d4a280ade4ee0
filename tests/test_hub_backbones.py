"""apply_lora, merge and `.keras` files on every keras-hub backbone class.

Each class is built from a small configuration of our own (tests/hub_zoo/)
and adapted with the default targets. Checked for each: adapters were
added, the output at init equals the base model's (B = 0) and the original
model is unchanged, non-zero adapters change the output, the merged model
holds no keras_lora layer and equals the LoRA model within rounding, and a
`.keras` save and reload gives the LoRA model's outputs exactly.

Every case runs on the backend named by `FULL_BACKEND`; on the other
backends the cases in `EVERY_BACKEND` run (one per family), so the suite
stays within CI's time. `KERAS_LORA_HUB_ALL=1` runs every case on any
backend.
"""

import importlib.util
import inspect
import os
import pathlib

import keras
import keras_hub
import numpy as np
import pytest
from hub_zoo import NOT_MODELS
from hub_zoo import all_cases
from hub_zoo import default_targets_summary
from hub_zoo import family_of
from numerics import assert_close
from numerics import assert_exact
from numerics import close

import keras_lora as kl
from keras_lora.walk import stable_layer_paths

CASES = all_cases()
BACKEND = keras.backend.backend()
FULL_BACKEND = "tensorflow"
#: One case per family, run on every backend.
EVERY_BACKEND = {
    "BertBackbone",
    "GemmaBackbone",
    "MixtralBackbone",
    "T5Backbone",
    "RWKV7Backbone",
    "ResNetBackbone",
    "DeepLabV3Backbone",
    "ViTBackbone",
    "CLIPBackbone",
    "StableDiffusion3Backbone",
}


def _selected(name):
    return (
        BACKEND == FULL_BACKEND
        or name in EVERY_BACKEND
        or os.environ.get("KERAS_LORA_HUB_ALL") == "1"
    )


def _params():
    params = []
    for name in sorted(set(CASES) - NOT_MODELS):
        marks = [pytest.mark.slow] if CASES[name].slow else []
        if not _selected(name):
            marks.append(
                pytest.mark.skip(
                    reason=f"runs on {FULL_BACKEND} (KERAS_LORA_HUB_ALL=1 "
                    "runs it here)"
                )
            )
        module = CASES[name].needs.get(BACKEND)
        if module and importlib.util.find_spec(module) is None:
            # keras-hub's own dependency for this model on this backend
            # (torchvision's PyPI wheels do not load with the CPU torch).
            marks.append(
                pytest.mark.skip(
                    reason=f"keras-hub runs {name} on {BACKEND} only with "
                    f"{module} installed"
                )
            )
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def _documented_defaults():
    """`{backbone: (family, summary)}` from docs/apply_merge.md's table."""
    doc = pathlib.Path(__file__).parents[1] / "docs" / "apply_merge.md"
    text = doc.read_text()
    table = text.split("<!-- default-targets:start -->")[1]
    table = table.split("<!-- default-targets:end -->")[0]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        family, name, summary = (c.strip() for c in line.strip("|").split("|"))
        rows[name.strip("`")] = (family, summary)
    return rows


def test_default_targets_table_lists_every_backbone():
    assert set(_documented_defaults()) == set(CASES) - NOT_MODELS


def _flat(outputs):
    return [
        np.asarray(keras.ops.convert_to_numpy(t), dtype="float64")
        for t in keras.tree.flatten(outputs)
    ]


def _lora_stable_paths(model):
    return sorted(
        path
        for path, layer in stable_layer_paths(model).items()
        if isinstance(layer, kl.LoRALayer)
    )


def _randomize_adapters(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in kl.lora_layers(model).values():
        for variable in layer.adapter_weights().values():
            variable.assign(
                rng.normal(scale=0.2, size=variable.shape).astype("float32")
            )


def test_every_backbone_class_has_a_case():
    names = {
        name
        for name, obj in vars(keras_hub.models).items()
        if name.endswith("Backbone")
        and inspect.isclass(obj)
        and issubclass(obj, keras_hub.models.Backbone)
        and obj is not keras_hub.models.Backbone
    }
    assert names - NOT_MODELS <= set(CASES), sorted(names - set(CASES))
    for name, case in CASES.items():
        assert case.build.__name__ != "<lambda>" or name


@pytest.mark.parametrize("name", _params())
def test_backbone_apply_merge_save(name, tmp_path):
    case = CASES[name]
    keras.utils.set_random_seed(0)
    model = case.build()
    assert type(model) is getattr(keras_hub.models, name)
    x = case.inputs()

    def run(m):
        # Inference mode: BatchNormalization is frozen with Keras's rule
        # (moving statistics), which some keras-hub models (DeepLabV3,
        # SegFormer) do not use when called with training=None.
        return _flat(m(x, training=False))

    base = run(model)

    lora = kl.apply_lora(model, rank=2)
    adapted_layers = kl.lora_layers(lora)
    assert adapted_layers, "default targets adapted nothing"
    # What docs/apply_merge.md says the default targets give this model.
    assert _documented_defaults()[name] == (
        family_of(name),
        default_targets_summary(lora),
    )
    for got, want in zip(run(lora), base, strict=True):
        assert_exact(got, want)
    for got, want in zip(run(model), base, strict=True):
        assert_exact(got, want)

    _randomize_adapters(lora)
    adapted = run(lora)
    # More than rounding: some models (RWKV's value path through its
    # recurrence) pass the adapters' change on only weakly.
    assert any(
        not close(got, want) for got, want in zip(adapted, base, strict=True)
    ), "non-zero adapters did not change the output"

    trainable = [id(v) for v in lora.trainable_variables]
    merged = kl.merge(lora)
    # Merging leaves the LoRA model as it was, frozen flags included.
    assert [id(v) for v in lora.trainable_variables] == trainable
    assert not kl.lora_layers(merged)
    assert type(merged) is kl.saving.base_class_of(lora)
    for got, want in zip(run(merged), adapted, strict=True):
        # A whole model, merged kernels against unmerged branches.
        assert_close(got, want, ulps=256)

    path = tmp_path / "lora.keras"
    lora.save(path)
    reloaded = keras.saving.load_model(path)
    # Layer names may be numbered differently: compare stable paths.
    assert _lora_stable_paths(reloaded) == _lora_stable_paths(lora)
    assert [(v.name, v.shape) for v in reloaded.trainable_variables] == [
        (v.name, v.shape) for v in lora.trainable_variables
    ]
    for got, want in zip(run(reloaded), adapted, strict=True):
        assert_exact(got, want)


def test_lossy_config_is_refused_and_changes_nothing():
    """keras-hub's `EfficientNetBackbone.get_config` omits `num_features`:
    rebuilt from its config, a model with `num_features=32` gets a
    1280-filter top conv. apply_lora detects the different structure and
    refuses (naming the shapes and `inplace=True`) instead of returning a
    different model; in place it works."""
    config = CASES["EfficientNetBackbone"].build().get_config()
    for key in ("name", "trainable", "dtype"):
        config.pop(key)
    small = keras_hub.models.EfficientNetBackbone(**config, num_features=32)
    x = CASES["EfficientNetBackbone"].inputs()
    before = _flat(small(x, training=False))
    with pytest.raises(ValueError, match=r"(?s)different structure.*inplace"):
        kl.apply_lora(small, rank=2)
    assert not kl.lora_layers(small)
    for got, want in zip(_flat(small(x, training=False)), before, strict=True):
        assert_exact(got, want)
    assert kl.lora_layers(kl.apply_lora(small, rank=2, inplace=True))


def _model_with_an_unbuilt_layer():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="used")(inputs))
    model.spare = keras.layers.Dense(3, name="never_called")
    return model


def test_unbuilt_sub_layers_are_left_alone_and_reported():
    """A sub-layer the model never calls is not built: the default targets
    skip it (no failure) and `lora_report` lists it; targeting only it is
    an error naming it."""
    model = _model_with_an_unbuilt_layer()
    lora = kl.apply_lora(model, rank=2, inplace=True)
    assert sorted(kl.lora_layers(lora)) == ["used"]
    assert kl.lora_report(lora)["unbuilt_layers"] == ["never_called"]
    with pytest.raises(ValueError, match="never_called"):
        kl.apply_lora(_model_with_an_unbuilt_layer(), targets=["never_called"])
    # Also next to a target that is built: that entry would adapt nothing.
    model = _model_with_an_unbuilt_layer()
    with pytest.raises(ValueError, match=r"(?s)only layers.*'never_called'"):
        kl.apply_lora(model, targets=["used", "never_called"])
    assert not kl.lora_layers(model)
    # A pattern that also selects built layers adapts those.
    lora = kl.apply_lora(model, targets=keras.layers.Dense)
    assert sorted(kl.lora_layers(lora)) == ["used"]
