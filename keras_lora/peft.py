"""PEFT interoperability for keras-hub models converted from Hugging Face.

`save_peft_adapter(model, directory)` writes a PEFT LoRA adapter directory
(`adapter_config.json` + `adapter_model.safetensors`) that PEFT's
`PeftModel.from_pretrained(hf_model, directory)` reads for the matching
`transformers` model; `load_peft_adapter(model, directory)` reads one into a
keras-hub model.

The format (PEFT 0.17: `peft/tuners/lora/layer.py`,
`peft/utils/save_and_load.py`):
a LoRA `nn.Linear` of weight W (d_out, d_in) computes `x W^T + s x A^T B^T`
with `lora_A.weight` A (r, d_in), `lora_B.weight` B (d_out, r) and
`s = lora_alpha / r` (`/ sqrt(r)` with `use_rslora`), i.e.
`W' = W + s B A`. Keys are `base_model.model.<module path>.lora_A.weight`.

The mapping (keras-hub 0.32's Hugging Face converters,
`keras_hub/src/utils/transformers/convert_{bert,gemma,llama3}.py`): every
supported projection's Keras kernel, read as keras_lora reads it (all
contracted axes) x (all output axes), is exactly `W^T` (the converters
transpose, then reshape the output axis into (heads, head_dim) or the input
axis of the output projection into (heads, head_dim), both in row-major
order). So keras_lora's `lora_a` (d_in, r) is `A^T` and `lora_b` (r, d_out)
is `B^T`, with the same `s`: `(W + s B A)^T = W^T + s A^T B^T`.
"""

import json
import os
import re

import numpy as np

from keras_lora.adapters import adapter_names
from keras_lora.adapters import adapter_state
from keras_lora.adapters import assign_adapter_state
from keras_lora.adapters import lora_layers
from keras_lora.apply import apply_lora
from keras_lora.banks import DEFAULT_ADAPTER
from keras_lora.walk import iter_layers
from keras_lora.walk import require_lora_layers
from keras_lora.walk import reset_compiled_functions

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# (keras-hub layer path suffix, Hugging Face module path), {i} = block index.
_MODULES = {
    "bert": (
        (
            "transformer_layer_{i}/self_attention_layer/query",
            "encoder.layer.{i}.attention.self.query",
        ),
        (
            "transformer_layer_{i}/self_attention_layer/key",
            "encoder.layer.{i}.attention.self.key",
        ),
        (
            "transformer_layer_{i}/self_attention_layer/value",
            "encoder.layer.{i}.attention.self.value",
        ),
        (
            "transformer_layer_{i}/self_attention_layer/attention_output",
            "encoder.layer.{i}.attention.output.dense",
        ),
        (
            "transformer_layer_{i}/feedforward_intermediate_dense",
            "encoder.layer.{i}.intermediate.dense",
        ),
        (
            "transformer_layer_{i}/feedforward_output_dense",
            "encoder.layer.{i}.output.dense",
        ),
        ("pooled_dense", "pooler.dense"),
    ),
    "gemma": (
        ("decoder_block_{i}/attention/query", "layers.{i}.self_attn.q_proj"),
        ("decoder_block_{i}/attention/key", "layers.{i}.self_attn.k_proj"),
        ("decoder_block_{i}/attention/value", "layers.{i}.self_attn.v_proj"),
        (
            "decoder_block_{i}/attention/attention_output",
            "layers.{i}.self_attn.o_proj",
        ),
        ("decoder_block_{i}/ffw_gating", "layers.{i}.mlp.gate_proj"),
        ("decoder_block_{i}/ffw_gating_2", "layers.{i}.mlp.up_proj"),
        ("decoder_block_{i}/ffw_linear", "layers.{i}.mlp.down_proj"),
    ),
    "llama": (
        (
            "transformer_layer_{i}/self_attention/query",
            "layers.{i}.self_attn.q_proj",
        ),
        (
            "transformer_layer_{i}/self_attention/key",
            "layers.{i}.self_attn.k_proj",
        ),
        (
            "transformer_layer_{i}/self_attention/value",
            "layers.{i}.self_attn.v_proj",
        ),
        (
            "transformer_layer_{i}/self_attention/attention_output",
            "layers.{i}.self_attn.o_proj",
        ),
        (
            "transformer_layer_{i}/feedforward_gate_dense",
            "layers.{i}.mlp.gate_proj",
        ),
        (
            "transformer_layer_{i}/feedforward_intermediate_dense",
            "layers.{i}.mlp.up_proj",
        ),
        (
            "transformer_layer_{i}/feedforward_output_dense",
            "layers.{i}.mlp.down_proj",
        ),
    ),
}

# keras-hub backbone class name -> architecture.
_BACKBONES = {
    "BertBackbone": "bert",
    "GemmaBackbone": "gemma",
    "Llama3Backbone": "llama",
    "LlamaBackbone": "llama",
}

# The prefix PEFT writes for the usual Hugging Face class of each
# architecture: BertModel (sentence embedders), *ForCausalLM (decoders).
DEFAULT_PREFIX = {
    "bert": "base_model.model.",
    "gemma": "base_model.model.model.",
    "llama": "base_model.model.model.",
}

_TASK_TYPE = {
    "bert": "FEATURE_EXTRACTION",
    "gemma": "CAUSAL_LM",
    "llama": "CAUSAL_LM",
}


def _compile(template):
    escaped = re.escape(template).replace(r"\{i\}", "{i}")
    return escaped.replace("{i}", r"(\d+)")


def _fill(template, match):
    return (
        template.replace("{i}", match.group(1)) if match.groups() else template
    )


def detect_architecture(model):
    """'bert', 'gemma' or 'llama' from the keras-hub backbone in `model`.

    Raises:
        ValueError: if no supported keras-hub backbone is found.
    """
    candidates = [model] + [layer for _, layer in iter_layers(model)]
    for layer in candidates:
        for cls in type(layer).__mro__:
            if cls.__name__ in _BACKBONES:
                return _BACKBONES[cls.__name__]
    raise ValueError(
        "Cannot tell which Hugging Face architecture `model` comes from; "
        f"supported keras-hub backbones: {sorted(_BACKBONES)}. Received: "
        f"model of type {type(model).__name__}. Pass `architecture=` "
        f"(one of {sorted(_MODULES)})."
    )


def _check_architecture(architecture):
    if architecture not in _MODULES:
        raise ValueError(
            f"`architecture` must be one of {sorted(_MODULES)}. Received: "
            f"architecture={architecture!r}"
        )


def keras_path_to_hf(path, architecture):
    """Hugging Face module path (no PEFT prefix) of a keras-hub layer path.

    Returns `None` when the layer has no Hugging Face counterpart here.
    """
    for keras_t, hf_t in _MODULES[architecture]:
        match = re.search("(?:^|/)" + _compile(keras_t) + "$", path)
        if match:
            return _fill(hf_t, match)
    return None


def hf_to_keras_suffix(module, architecture):
    """keras-hub layer path suffix of a Hugging Face module path."""
    for keras_t, hf_t in _MODULES[architecture]:
        match = re.search(r"(?:^|\.)" + _compile(hf_t) + "$", module)
        if match:
            return _fill(keras_t, match)
    return None


def _most_common(values):
    values = list(values)
    return max(set(values), key=values.count)


def save_peft_adapter(
    model,
    directory,
    architecture=None,
    prefix=None,
    base_model_name_or_path=None,
    adapters=None,
):
    """Writes the model's adapters as PEFT LoRA adapter directories.

    As PEFT's `save_pretrained`: the adapter `"default"` goes into
    `directory` itself, every other named adapter (`keras_lora.multi`) into
    `directory/<name>/`; PEFT loads each with `PeftModel.from_pretrained`
    (or `load_adapter`) and `load_peft_adapter` reads any one of them.

    Args:
        model: a keras-hub model (backbone or task) converted from a Hugging
            Face checkpoint, with keras_lora layers on supported projections.
        directory: str, created if missing; `adapter_config.json` and
            `adapter_model.safetensors` are written into it.
        architecture: `"bert"`, `"gemma"`, `"llama"` or `None` (default:
            detected from the keras-hub backbone class).
        prefix: str key prefix, default `DEFAULT_PREFIX[architecture]`
            (`"base_model.model.model."` for causal LMs, whose HF modules live
            under `model.`; `"base_model.model."` for BertModel).
        base_model_name_or_path: str written into the config, or `None`.
        adapters: `None` (default) for every adapter of the model, or a
            name or list of names (as `keras_lora.save_adapters`).

    Returns:
        The config dict written for the first adapter written (the only
        one for a model without named adapters).

    Raises:
        ValueError: no LoRA layers; a LoRA layer with no PEFT counterpart
            (all listed); mixed dropout or rsLoRA settings; a trained bias;
            an adapter name the model lacks, or one that is not a plain
            directory name.
    """
    layers = require_lora_layers(model, "export PEFT adapters")
    architecture = architecture or detect_architecture(model)
    _check_architecture(architecture)
    prefix = DEFAULT_PREFIX[architecture] if prefix is None else prefix
    modules = {p: keras_path_to_hf(p, architecture) for p in layers}
    unmapped = sorted(p for p, m in modules.items() if m is None)
    if unmapped:
        raise ValueError(
            f"These LoRA layers have no {architecture} PEFT module: "
            f"{unmapped}. Supported layer paths: "
            f"{[k for k, _ in _MODULES[architecture]]}."
        )
    for path, layer in layers.items():
        if layer.train_bias:
            raise ValueError(
                f"Layer '{path}' trains its bias; PEFT export supports "
                "bias='none' only."
            )
        if layer.merged:
            raise ValueError(f"Layer '{path}' is merged; unmerge it first.")
    names = adapter_names(layers, adapters)
    bad = [
        n
        for n in names
        if n != DEFAULT_ADAPTER
        and (n in (".", "..") or os.sep in n or (os.altsep or os.sep) in n)
    ]
    if bad:
        raise ValueError(
            f"PEFT stores adapter {bad[0]!r} in a sub-directory of that "
            "name; it must be a plain directory name. Received: "
            f"adapters={adapters!r}"
        )
    # Everything checked and computed before anything is written.
    outputs = []
    for name in names:
        tensors, state = adapter_state(model, name)
        outputs.append(
            (
                name,
                *_peft_files(
                    state["layers"], tensors, modules, prefix, architecture
                ),
            )
        )
    from safetensors.numpy import save_file

    first = None
    for name, tensors, config in outputs:
        config["base_model_name_or_path"] = base_model_name_or_path
        target = (
            directory
            if name == DEFAULT_ADAPTER
            else os.path.join(directory, name)
        )
        os.makedirs(target, exist_ok=True)
        save_file(
            tensors,
            os.path.join(target, WEIGHTS_FILE),
            metadata={"format": "pt"},
        )
        with open(os.path.join(target, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        first = first or config
    return first


def _peft_files(layer_configs, tensors, modules, prefix, architecture):
    """`(tensors, config)` of one adapter in PEFT's layout."""
    dropouts = {c["dropout"] for c in layer_configs.values()}
    rslora = {c["use_rslora"] for c in layer_configs.values()}
    dora = {c.get("use_dora", False) for c in layer_configs.values()}
    if len(dropouts) > 1 or len(rslora) > 1 or len(dora) > 1:
        raise ValueError(
            "PEFT has one `lora_dropout`, one `use_rslora` and one "
            f"`use_dora` per adapter. Received: dropouts {sorted(dropouts)}, "
            f"use_rslora {sorted(rslora)}, use_dora {sorted(dora)}."
        )
    out = {}
    for path in layer_configs:
        key = prefix + modules[path]
        a = tensors[f"{path}.lora_a"]
        b = tensors[f"{path}.lora_b"]
        out[f"{key}.lora_A.weight"] = np.ascontiguousarray(a.T)
        out[f"{key}.lora_B.weight"] = np.ascontiguousarray(b.T)
        magnitude = tensors.get(f"{path}.lora_magnitude")
        if magnitude is not None:
            # One number per output feature, in W's (d_out, d_in) row
            # order: the order of B's flattened output axes.
            out[f"{key}.lora_magnitude_vector"] = np.ascontiguousarray(
                magnitude.reshape(-1)
            )
    rank = _most_common(c["rank"] for c in layer_configs.values())
    alpha = _most_common(c["alpha"] for c in layer_configs.values())
    # PEFT matches pattern keys as `(.*\.)?<key>$` against module names.
    rank_pattern = {
        modules[p]: c["rank"]
        for p, c in layer_configs.items()
        if c["rank"] != rank
    }
    alpha_pattern = {
        modules[p]: c["alpha"]
        for p, c in layer_configs.items()
        if c["alpha"] != alpha
    }
    config = {
        "peft_type": "LORA",
        "task_type": _TASK_TYPE[architecture],
        "base_model_name_or_path": None,
        "r": int(rank),
        "lora_alpha": float(alpha),
        "lora_dropout": float(dropouts.pop()),
        "use_rslora": bool(rslora.pop()),
        # Full module paths: PEFT matches an entry `t` to a module `k` when
        # `k == t` or `k.endswith("." + t)`, so each selects one module.
        "target_modules": sorted(set(modules.values())),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": bool(dora.pop()),
        "revision": None,
    }
    return out, config


def _pattern_value(patterns, module, default):
    """PEFT's rule: first pattern key with `(.*\\.)?key$` matching."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_peft_adapter(directory):
    """Reads `adapter_config.json` and `adapter_model.safetensors`.

    Returns:
        `(config, {module: (A (r, d_in), B (d_out, r), alpha, magnitude)})`
        with module names as in the keys, less the `.lora_A.weight` suffix;
        `magnitude` is DoRA's `(d_out,)` `lora_magnitude_vector`, or `None`
        when the config's `use_dora` is false.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: not a LoRA adapter, a trained bias, embedding adapters,
            an A without its B, or DoRA magnitudes that do not match
            `use_dora` or B's `d_out`.
    """
    from safetensors.numpy import load_file

    config_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"Not a PEFT adapter directory: {p!r} is missing. Received: "
                f"directory={directory!r}"
            )
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(
            f"Only LoRA adapters can be read. Received: peft_type="
            f"{config.get('peft_type')!r} in {config_path!r}"
        )
    for key, ok in (("bias", "none"),):
        if config.get(key, ok) != ok:
            raise ValueError(
                f"Unsupported PEFT option in {config_path!r}: "
                f"{key}={config[key]!r} (supported: {ok!r})."
            )
    if config.get("fan_in_fan_out"):
        raise ValueError("fan_in_fan_out=True (GPT-2 Conv1D) is unsupported.")
    tensors = load_file(weights_path)
    use_dora = bool(config.get("use_dora", False))
    pairs = {}
    magnitudes = {}
    for key in tensors:
        if key.endswith(".lora_magnitude_vector"):
            magnitudes[key.removesuffix(".lora_magnitude_vector")] = tensors[
                key
            ]
            continue
        match = re.fullmatch(r"(.*)\.lora_([AB])\.weight", key)
        if match is None:
            raise ValueError(
                f"Unsupported tensor {key!r} in {weights_path!r}: only "
                "`*.lora_A.weight` / `*.lora_B.weight` of Linear layers are "
                "supported."
            )
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensors[key]
    modules = {}
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(
                f"{weights_path!r}: module {module!r} has only lora_"
                f"{sorted(pair)[0]}."
            )
        a, b = pair["A"], pair["B"]
        r = a.shape[0]
        if b.shape[1] != r:
            raise ValueError(
                f"{module!r}: lora_A {a.shape} and lora_B {b.shape} disagree "
                "on the rank."
            )
        bare = module.removeprefix("base_model.model.")
        expected_r = _pattern_value(config.get("rank_pattern"), bare, rank)
        if expected_r != r:
            raise ValueError(
                f"{module!r}: rank {r} in the weights, {expected_r} in the "
                "config."
            )
        magnitude = magnitudes.pop(module, None)
        if use_dora != (magnitude is not None) or (
            magnitude is not None and magnitude.shape != (b.shape[0],)
        ):
            raise ValueError(
                f"{module!r}: use_dora={use_dora} in {config_path!r}, and "
                f"the weights hold "
                + (
                    "no lora_magnitude_vector"
                    if magnitude is None
                    else f"a lora_magnitude_vector of shape {magnitude.shape}"
                )
                + f" (lora_B {b.shape})."
            )
        modules[module] = (
            a.astype("float32"),
            b.astype("float32"),
            float(_pattern_value(config.get("alpha_pattern"), bare, alpha)),
            None if magnitude is None else magnitude.astype("float32"),
        )
    if magnitudes:
        raise ValueError(
            f"{weights_path!r}: lora_magnitude_vector without lora_A / "
            f"lora_B for modules {sorted(magnitudes)}."
        )
    return config, modules


def load_peft_adapter(model, directory, architecture=None):
    """Loads a PEFT LoRA adapter directory into a keras-hub model.

    If `model` has no keras_lora layers, LoRA is applied first to exactly the
    adapter's modules, with their ranks and alphas (`apply_lora` returns a
    new model; `model` is left as it was). Otherwise the model's LoRA layers
    must be exactly the adapter's modules. Everything is checked before any
    variable is assigned.

    Args:
        model: a keras-hub backbone or task converted from the Hugging Face
            checkpoint the adapter was trained on.
        directory: str, a PEFT adapter directory.
        architecture: `"bert"`, `"gemma"`, `"llama"` or `None` (detected).

    Returns:
        The model holding the adapter.

    Raises:
        ValueError: unsupported PEFT options or tensors; modules with no
            keras-hub layer (listed); shapes that do not fit (listed).
    """
    config, modules = read_peft_adapter(directory)
    architecture = architecture or detect_architecture(model)
    _check_architecture(architecture)
    all_paths = [p for p, _ in iter_layers(model)]
    by_path = {}
    unmatched = []
    for module, (a, b, alpha, magnitude) in modules.items():
        suffix = hf_to_keras_suffix(module, architecture)
        found = [
            p
            for p in all_paths
            if suffix is not None and (p == suffix or p.endswith("/" + suffix))
        ]
        if len(found) != 1:
            unmatched.append(module)
            continue
        by_path[found[0]] = (a, b, alpha, magnitude)
    if unmatched:
        raise ValueError(
            f"These PEFT modules have no single keras-hub layer in the "
            f"{architecture} model: {sorted(unmatched)}. Nothing was loaded."
        )
    use_rslora = bool(config.get("use_rslora", False))
    if not lora_layers(model):
        exact = {p: re.compile(re.escape(p)) for p in by_path}
        model = apply_lora(
            model,
            rank=int(config.get("r", 8)),
            alpha=float(config.get("lora_alpha", 8)),
            targets=list(exact.values()),
            dropout=float(config.get("lora_dropout", 0.0)),
            use_rslora=use_rslora,
            rank_pattern={exact[p]: v[0].shape[0] for p, v in by_path.items()},
            alpha_pattern={exact[p]: v[2] for p, v in by_path.items()},
            use_dora=bool(config.get("use_dora", False)),
        )
    layers = lora_layers(model)
    tensors = {}
    layer_configs = {}
    use_dora = bool(config.get("use_dora", False))
    for path, (a, b, alpha, magnitude) in by_path.items():
        tensors[f"{path}.lora_a"] = np.ascontiguousarray(a.T)
        tensors[f"{path}.lora_b"] = np.ascontiguousarray(b.T)
        if magnitude is not None and path in layers and layers[path].use_dora:
            shape = tuple(layers[path].lora_magnitude.shape)
            tensors[f"{path}.lora_magnitude"] = magnitude.reshape(shape)
        layer_configs[path] = {
            "alpha": alpha,
            "use_rslora": use_rslora,
            "use_dora": use_dora,
        }
    assign_adapter_state(layers, tensors, layer_configs)
    reset_compiled_functions(model)
    return model
