"""The examples, run end to end in their reduced (`--quick`) mode.

They run in the JAX suite (the main job's quick run is in the TensorFlow
suite, tests/test_cli.py): each trains, merges and exports, a minute or two
on 2 CPUs, so once per CI run. Their pieces (apply_lora, merge, export)
are tested on every backend in their own modules.
"""

import importlib.util
import json
import os

import keras
import pytest
from numerics import assert_diff_within

EXAMPLES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"
)

pytestmark = pytest.mark.slow


def _load(name):
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", os.path.join(EXAMPLES, f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _jax_suite_only():
    if keras.backend.backend() != "jax":
        pytest.skip(
            "the examples' quick runs are covered once, in the JAX suite"
        )


def test_digits_conv_quick(tmp_path):
    example = _load("digits_conv")
    assert example.main(["--quick", "--output", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["base_accuracy_0_4"] > 0.9
    assert s["accuracy_5_9_before"] < 0.4
    assert s["accuracy_5_9_after"] > 0.85
    assert s["trainable_params"] < 0.2 * s["total_params"]
    # A small CNN, merged kernels against unmerged branches.
    assert_diff_within(s["merge_max_abs_diff"], s["output_max_abs"], ulps=256)
    assert_diff_within(
        s["saved_model_max_abs_diff"],
        s["saved_model_output_max_abs"],
        ulps=256,
    )
    assert (tmp_path / "saved_model" / "saved_model.pb").exists()


def test_gemma_causal_lm_quick(tmp_path):
    example = _load("gemma_causal_lm")
    assert example.main(["--quick", "--output", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["loss_after"] < 0.8 * s["loss_before"]
    assert s["generate_lora"] == s["generate_merged"]
    assert s["generate_lora"].startswith(example.PROMPT)
    # A whole decoder, merged kernels against unmerged branches.
    assert_diff_within(
        s["merge_logits_max_abs_diff"], s["logits_max_abs"], ulps=256
    )
    assert_diff_within(
        s["saved_model_max_abs_diff"],
        s["saved_model_output_max_abs"],
        ulps=256,
    )


def test_zen_tokenizer_has_gemma_special_tokens():
    example = _load("gemma_causal_lm")
    import keras_hub

    lines = example.zen_of_python()
    assert lines[0] == "Beautiful is better than ugly."
    assert len(lines) == 19
    tokenizer = keras_hub.models.GemmaTokenizer(
        proto=example.train_tokenizer_proto(lines)
    )
    assert tokenizer.pad_token_id == 0
    assert tokenizer.start_token_id == 1 and tokenizer.end_token_id == 2
    ids = tokenizer(lines[0])
    assert tokenizer.detokenize(ids) == lines[0]


def test_finetune_minilm_is_the_cli():
    example = _load("finetune_minilm")
    from keras_lora_finetune import cli

    assert example.main is cli.main
