"""Smoke runs of the benchmark scripts (benchmarks/) at tiny sizes.

The scripts run their real code paths (real keras-hub Gemma and BERT classes,
random-init tiny configs) on the current backend and write JSON; these tests
check the JSON's structure, the parameter counts against r * (d + k), and that
every ratio is a positive finite number. No timing is asserted: the machine
is shared and timings are noise at these sizes.
"""

import json
import math
import os
import sys

import keras
import pytest
from numerics import assert_diff_within

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import adapters  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks import inference  # noqa: E402
from benchmarks import layers  # noqa: E402
from benchmarks import lora_branch  # noqa: E402
from benchmarks import memory  # noqa: E402
from benchmarks import peft_compare  # noqa: E402
from benchmarks import plot  # noqa: E402
from benchmarks import profile_step  # noqa: E402
from benchmarks import quantized  # noqa: E402
from benchmarks import remat  # noqa: E402
from benchmarks import run_all  # noqa: E402
from benchmarks import scaling  # noqa: E402
from benchmarks import train_memory  # noqa: E402
from benchmarks import train_step  # noqa: E402
from benchmarks import xla_memory  # noqa: E402

pytestmark = pytest.mark.slow

# In this process Keras is already imported, so the scripts cannot hide a
# GPU: on a machine with one, the smoke run uses `--device gpu`.
DEVICE = "gpu" if common.accelerator_name() else "cpu"
SMOKE = ["--size", "smoke", "--device", DEVICE]


RESULTS = os.path.join(ROOT, "benchmarks", "results")


def _performance_page(dedent=False):
    """docs/performance.md's text; `dedent`: every line stripped (tables
    inside list items are indented)."""
    with open(os.path.join(ROOT, "docs", "performance.md")) as f:
        text = f.read()
    if dedent:
        return "\n".join(line.strip() for line in text.splitlines())
    return text


def _adapter_params(config, rank):
    """keras_lora's adapter size on Gemma query + value: r * (d + k) each."""
    d = config["hidden_dim"]
    k_query = config["num_query_heads"] * config["head_dim"]
    k_value = config["num_key_value_heads"] * config["head_dim"]
    return config["num_layers"] * rank * ((d + k_query) + (d + k_value))


def _positive_finite(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Runs the four benchmarks once, in-process, into one directory."""
    out = str(tmp_path_factory.mktemp("bench"))
    returned = {
        "train_step": train_step.main(SMOKE + ["--out", out]),
        "inference": inference.main(SMOKE + ["--out", out]),
        "memory": memory.main(SMOKE + ["--out", out]),
        "scaling": scaling.main(SMOKE + ["--out", out]),
    }
    backend = keras.backend.backend()
    on_disk = {}
    for name in returned:
        with open(os.path.join(out, f"{name}_{backend}_{DEVICE}.json")) as f:
            on_disk[name] = json.load(f)
    return out, returned, on_disk


def test_json_has_machine_and_matches_returned(results):
    _, returned, on_disk = results
    for name, result in on_disk.items():
        assert result["benchmark"] == name
        assert result["size"] == "smoke"
        machine = result["machine"]
        assert machine["backend"] == keras.backend.backend()
        assert machine["device"] == DEVICE
        assert (machine["accelerator"] is None) == (DEVICE == "cpu")
        assert machine["cpu_model"]
        assert machine["usable_cpus"] >= 1
        assert machine["keras"] == keras.__version__
        assert json.loads(json.dumps(returned[name], sort_keys=True)) == result


def test_train_step_structure_and_counts(results):
    _, _, on_disk = results
    rows = on_disk["train_step"]["results"]
    assert [(r["model"], r["targets"]) for r in rows] == [
        ("gemma_smoke", "qv"),
        ("bert_smoke", "all_linear"),
    ]
    for row in rows:
        assert row["target_layers"] == common.target_names(
            row["model"], row["targets"]
        )
        variants = row["variants"]
        assert set(variants) == set(common.VARIANTS)
        for stats in variants.values():
            assert stats["n"] == row["steps"] == len(stats["times_s"])
            assert all(_positive_finite(t) for t in stats["times_s"])
            assert stats["min_s"] <= stats["median_s"] <= stats["max_s"]
        # Same layers adapted by keras_lora and the built-in LoRA.
        assert variants["keras_lora"]["adapted_layers"] > 0
        assert (
            variants["keras_lora"]["adapted_layers"]
            == variants["builtin"]["adapted_layers"]
        )
        # keras_lora's (d_in x r, r x d_out) factors are smaller than Keras's
        # last-axis factorization, and both far smaller than the model.
        lora = variants["keras_lora"]["trainable_params"]
        assert 0 < lora < variants["builtin"]["trainable_params"]
        assert (
            variants["builtin"]["trainable_params"]
            < (variants["full"]["trainable_params"])
        )
        assert (
            variants["full"]["trainable_params"]
            == (variants["full"]["total_params"])
        )
        for stats in row["ratios"].values():
            for key in ("median", "of_medians", "min", "max"):
                assert _positive_finite(stats[key])
        assert set(row["meets_targets"]) == {
            "keras_lora/full<=0.65",
            "keras_lora/builtin<=0.95",
        }
    gemma = rows[0]["variants"]
    config = common.GEMMA_CONFIGS["gemma_smoke"]
    expected = _adapter_params(config, rows[0]["rank"])
    assert gemma["keras_lora"]["trainable_params"] == expected
    # The floor trains only the RMSNorm scales: 2 per block + the final one.
    hidden = config["hidden_dim"]
    floor = gemma["floor"]["trainable_params"]
    assert floor == hidden * (2 * config["num_layers"] + 1)
    # all_linear on BERT: the 6 projections of every block, each with
    # r * (d_in + d_out) adapter numbers.
    bert = rows[1]["variants"]
    config = common.BERT_CONFIGS["bert_smoke"]
    d, f = config["hidden_dim"], config["intermediate_dim"]
    assert bert["keras_lora"]["adapted_layers"] == 6 * config["num_layers"]
    per_block = 4 * (d + d) + (d + f) + (f + d)
    assert bert["keras_lora"]["trainable_params"] == (
        rows[1]["rank"] * per_block * config["num_layers"]
    )


def test_inference_merged_equals_unmerged(results):
    """On the BERT code path (the one the real MiniLM weights take)."""
    _, _, on_disk = results
    (row,) = on_disk["inference"]["results"]
    assert row["model"] == "bert_smoke"
    assert set(row["variants"]) == {"base", "keras_lora", "merged", "builtin"}
    assert set(row["ratios"]) == {
        "merged/base",
        "keras_lora/base",
        "builtin/base",
    }
    for stats in row["ratios"].values():
        assert _positive_finite(stats["median"])
    # The adapters are non-zero, so this checks merge against the LoRA path.
    assert_diff_within(
        row["merged_vs_unmerged_max_abs_diff"], row["unmerged_max_abs"]
    )


def test_memory_shares_base_weights(results):
    _, _, on_disk = results
    (row,) = on_disk["memory"]["results"]
    config = common.GEMMA_CONFIGS["gemma_smoke"]
    adapter_params = _adapter_params(config, row["rank"])
    assert row["adapter_bytes"] == 4 * adapter_params
    # apply_lora's clone creates no variable but the adapters.
    assert row["non_adapter_variables_created_bytes"] == 0
    assert row["weights_bytes"] == 4 * row["total_params"]
    assert row["trainable_params"]["keras_lora"] == adapter_params
    assert (
        adapter_params
        < row["trainable_params"]["builtin"]
        < row["trainable_params"]["full"]
    )
    assert row["adapted_layers"] == 2 * config["num_layers"]
    assert row["adapter_file_bytes"] > row["adapter_bytes"]
    # merge creates the adapted layers' kernels and shares everything else.
    assert row["merge_new_variables_bytes"] == row["adapted_kernels_bytes"]
    q = config["hidden_dim"] * config["num_query_heads"] * config["head_dim"]
    kv = (
        config["hidden_dim"]
        * config["num_key_value_heads"]
        * config["head_dim"]
    )
    assert row["adapted_kernels_bytes"] == 4 * config["num_layers"] * (q + kv)
    assert row["largest_adapted_kernel_bytes"] == 4 * max(q, kv)
    assert math.isfinite(row["merge_excess_vs_largest_kernel"])
    for key in ("apply_vs_build", "merge_vs_build", "merge_s"):
        assert _positive_finite(row[key])
    assert row["model_file_bytes"] > row["weights_bytes"]
    assert _positive_finite(row["file_ratio"])
    assert row["rss_peak_during_apply_mib"] >= row["rss_before_apply_mib"] > 0
    assert isinstance(row["meets_target"], bool)


def test_scaling_counts_grow_with_rank(results):
    _, _, on_disk = results
    sweep = on_disk["scaling"]["rank_sweep"]
    config = common.GEMMA_CONFIGS[sweep["model"]]
    ranks = [row["rank"] for row in sweep["rows"]]
    assert ranks == scaling.SIZES["smoke"]["ranks"]
    for row in sweep["rows"]:
        assert row["adapter_params"] == _adapter_params(config, row["rank"])
        assert row["training_state_bytes"] == 16 * row["adapter_params"]
        assert _positive_finite(row["median_s"])
        assert _positive_finite(row["vs_first_rank"])
    assert sweep["rows"][0]["vs_first_rank"] == 1.0
    seq = on_disk["scaling"]["seq_sweep"]
    assert [r["seq_len"] for r in seq["rows"]] == scaling.SIZES["smoke"][
        "seq_lens"
    ]
    for row in seq["rows"]:
        assert _positive_finite(row["keras_lora/full"]["median"])
        assert _positive_finite(row["keras_lora"]["median_s"])


def test_run_all_summarises_the_json(results, tmp_path):
    out, _, _ = results
    backend = keras.backend.backend()
    table = tmp_path / "table.md"
    code = run_all.main(
        ["--summary-only", "--out", out, "--backends", backend]
        + ["--device", DEVICE]
        + ["--markdown", str(table)]
    )
    assert code == 0
    lines = table.read_text().splitlines()
    assert lines[0].startswith("| backend | model |")
    # The two train-step rows and the memory row.
    assert len(lines) == 2 + 3
    assert all(line.startswith(f"| {backend} |") for line in lines[2:])


def test_models_outside_the_size_are_refused(tmp_path):
    """A `--models` name the size does not have is an error, not an empty
    result file."""
    with pytest.raises(ValueError, match="minilm"):
        inference.main(SMOKE + ["--models", "minilm", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="gemma_mid"):
        train_step.main(
            SMOKE + ["--models", "gemma_mid", "--out", str(tmp_path)]
        )
    assert not list(tmp_path.iterdir())


def test_unknown_model_and_device_are_refused():
    with pytest.raises(ValueError, match="gemma_huge"):
        common.model_family("gemma_huge")
    with pytest.raises(ValueError, match="tpu"):
        common.setup_device("tpu")


def test_profile_step_reports_the_adapter_ops(tmp_path):
    """The backend profiler's trace is read back into per-op times; the
    keras_lora step runs more matmul-type ops than the floor (the two
    adapter matmuls per adapted layer, forward and backward)."""
    result = profile_step.main(
        SMOKE + ["--variants", "keras_lora", "floor", "--out", str(tmp_path)]
    )
    assert (result["model"], result["batch_size"], result["seq_len"]) == (
        "gemma_smoke",
        2,
        8,
    )
    backend = keras.backend.backend()
    path = tmp_path / f"profile_step_qv_{backend}_{DEVICE}.json"
    assert json.loads(path.read_text())["variants"].keys() == {
        "keras_lora",
        "floor",
    }
    for stats in result["variants"].values():
        assert stats["ops"]
        assert _positive_finite(stats["wall_s_per_step"])
        assert _positive_finite(stats["op_s_per_step"])
        assert all(o["calls_per_step"] > 0 for o in stats["ops"].values())

    def matmul_calls(variant):
        ops = result["variants"][variant]["ops"]
        return sum(
            o["calls_per_step"]
            for name, o in ops.items()
            if any(k in name.lower() for k in ("mm", "matmul", "dot", "ynn"))
        )

    assert matmul_calls("keras_lora") > matmul_calls("floor") > 0


def test_lora_branch_forms_agree(tmp_path):
    """The ways of writing the branch (and PEFT's layout of the factors)
    give the same gradients (checked inside `run`) and all get a time."""
    result = lora_branch.main(
        ["--size", "smoke", "--device", DEVICE, "--out", str(tmp_path)]
    )
    assert set(result["ms_forward_backward"]) == {
        "einsum",
        "matmul_3d",
        "matmul_2d",
        "peft_layout",
    }
    assert all(
        _positive_finite(v) for v in result["ms_forward_backward"].values()
    )
    assert result["vs_einsum"]["einsum"] == 1.0
    # Query, key and value branches: separate, one fused A product, and the
    # transposed layout (same gradients, checked inside `run`).
    assert set(result["qkv_ms_forward_backward"]) == {
        "separate",
        "fused_a",
        "transposed",
    }
    assert result["qkv_vs_separate"]["separate"] == 1.0


def test_layer_table_has_every_lora_layer_kind(tmp_path):
    """One row per LoRA layer kind, the LoRA variant training r * (d + k)
    numbers (A and B only) and the plain layer all of its weights."""
    result = layers.main(
        ["--size", "smoke", "--device", DEVICE, "--out", str(tmp_path)]
    )
    rows = result["results"]
    assert list(rows) == [
        "Dense",
        "EinsumDense",
        "Conv1D",
        "Conv2D",
        "Conv3D",
        "Conv2DTranspose",
        "DepthwiseConv2D",
        "SeparableConv2D",
        "Embedding",
    ]
    r = result["rank"]
    for kind, row in rows.items():
        kernel = row["kernel_shape"]
        params = row["trainable_params"]
        if kind == "EinsumDense":
            dims = [(kernel[0], kernel[1] * kernel[2])]
        elif kind == "Embedding":
            dims = [tuple(kernel)]
        elif kind == "Conv2DTranspose":  # (kh, kw, filters, in_channels)
            dims = [(math.prod(kernel[:-2]) * kernel[-1], kernel[-2])]
        elif kind == "DepthwiseConv2D":  # (kh, kw, c, m): spatial x c * m
            dims = [(math.prod(kernel[:-2]), math.prod(kernel[-2:]))]
        elif kind == "SeparableConv2D":  # depthwise, then (1, 1, c * m, f)
            pointwise = row["kernel_shapes"][1]
            dims = [
                (math.prod(kernel[:-2]), math.prod(kernel[-2:])),
                (math.prod(pointwise[:-1]), pointwise[-1]),
            ]
        else:
            dims = [(math.prod(kernel[:-1]), kernel[-1])]
        assert params["lora"] == sum(r * (i + o) for i, o in dims), kind
        assert params["plain"] >= sum(
            math.prod(k) for k in row["kernel_shapes"]
        ), kind
        assert all(_positive_finite(v) for v in row["ms"].values())
        assert _positive_finite(row["lora/plain"]["median"])
    assert os.path.exists(
        tmp_path / f"layers_{keras.backend.backend()}_{DEVICE}.json"
    )


def test_performance_page_layer_table_is_the_scripts():
    """docs/performance.md shows exactly `benchmarks.layers.table()` of the
    JSON in benchmarks/results (every number from the script)."""
    page = _performance_page()
    assert layers.table(RESULTS) in page


def test_adapter_serving_never_recompiles_and_mixed_equals_merged(tmp_path):
    """Switching adapters keeps the compiled predict function; the mixed
    batch's outputs are each adapter's merged model's (float32 rounding of
    the largest output); every ratio is positive and finite."""
    result = adapters.main(SMOKE + ["--out", str(tmp_path)])
    (row,) = result["results"]
    assert row["switch"]["recompiled"] is False
    mixed = row["mixed"]
    assert mixed["adapters"] == adapters.ADAPTERS
    assert (
        mixed["examples_per_adapter"] * mixed["adapters"] == row["batch_size"]
    )
    assert_diff_within(
        mixed["mixed_vs_merged_max_abs_diff"], mixed["output_max_abs"], ulps=64
    )
    ratios = [*row["switch"]["ratios"].values(), *mixed["ratios"].values()]
    assert len(ratios) == 3
    assert all(_positive_finite(r["median"]) for r in ratios)
    assert os.path.exists(
        tmp_path / f"adapters_{keras.backend.backend()}_{DEVICE}.json"
    )


def test_performance_page_memory_table_is_the_scripts():
    """docs/performance.md shows exactly `benchmarks.memory.table()` of the
    JSON in benchmarks/results."""
    page = _performance_page()
    assert memory.table(RESULTS) in page


def test_performance_page_adapter_table_is_the_scripts():
    """docs/performance.md shows exactly `benchmarks.adapters.table()` of
    the JSON in benchmarks/results."""
    page = _performance_page()
    assert adapters.table(RESULTS) in page


def test_quantized_bases_shrink_the_weights_and_report_the_merge(tmp_path):
    """int8 / int4 bases hold fewer weight bytes than float32; the float
    merge reproduces the LoRA model (W_deq + s A B); a re-quantizing merge
    reports what it kept of each adapted layer's update."""
    quantized.main([*SMOKE, "--out", str(tmp_path)])
    path = tmp_path / f"quantized_{keras.backend.backend()}_{DEVICE}.json"
    with open(path) as f:
        result = json.load(f)
    (row,) = result["results"].values()
    assert row["float32"]["weights_vs_float32"] == 1.0
    assert row["int4"]["weights_bytes"] < row["int8"]["weights_bytes"]
    assert row["int8"]["weights_bytes"] < row["float32"]["weights_bytes"]
    for mode in ("int8", "int4"):
        merge = row[mode]["merge"]
        assert merge["layers"] > 0
        assert _positive_finite(merge["max_abs_weight_error"])
        assert _positive_finite(row[mode]["step_vs_float32"]["median"])
    assert "layers" not in row["float32"]["merge"]
    # int4 bases are weight-only: the float merge is the LoRA model.
    assert row["int4"]["merge"]["dequantized_vs_lora_relative"] < 1e-4
    assert quantized.table(str(tmp_path)).count("\n") == 2 + 3
    # Training memory, each base measured in its own process.
    (memory,) = result["memory"].values()
    for mode in ("float32", "int8", "int4"):
        r = memory[mode]
        assert r["rss_imports"] < r["rss_model"] <= r["first_step_peak"]
        assert r["rss_model"] < r["step_peak"]
        assert _positive_finite(r["step_peak_vs_float32"])
    assert memory["float32"]["step_peak_vs_float32"] == 1.0
    assert memory["int4"]["weights_bytes"] == row["int4"]["weights_bytes"]
    assert quantized.memory_table(str(tmp_path)).count("\n") == 2 + 3


def test_train_memory_measures_each_variant_in_its_own_process(tmp_path):
    """Full fine-tuning, the built-in LoRA and keras_lora, each in a fresh
    process: keras_lora trains the fewest bytes, every peak is above the
    built model, and the ratios and the table come from those numbers."""
    result = train_memory.main([*SMOKE, "--out", str(tmp_path)])
    path = tmp_path / f"train_memory_{keras.backend.backend()}_{DEVICE}.json"
    with open(path) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    (row,) = result["results"]
    runs = row["variants"]
    assert set(runs) == {"full", "builtin", "keras_lora"}
    trainable = {v: runs[v]["trainable_bytes"] for v in runs}
    assert trainable["keras_lora"] < trainable["builtin"] < trainable["full"]
    for r in runs.values():
        assert r["rss_imports"] < r["rss_model"] <= r["first_step_peak"]
        assert r["rss_model"] < r["step_peak"]
        assert r["rss_model"] < r["fit_peak"]
        assert r["allocator_peak"] is None or r["allocator_peak"] > 0
    ours, full = runs["keras_lora"], runs["full"]
    assert row["keras_lora_vs_full_fit_peak"] == (
        (ours["fit_peak"] - ours["rss_imports"])
        / (full["fit_peak"] - full["rss_imports"])
    )
    assert isinstance(row["meets_target"], bool)
    assert train_memory.table(str(tmp_path)).count("\n") == 2 + 1


def test_performance_page_train_memory_table_is_the_scripts():
    """docs/performance.md shows exactly `benchmarks.train_memory.table()`
    of the JSON in benchmarks/results."""
    page = _performance_page()
    assert train_memory.table(RESULTS) in page


def test_remat_measures_both_variants_at_each_length(tmp_path):
    """The remat variant's decoder blocks keep their remat mode through
    apply_lora (the other's have none); each length has both peaks, both
    step times and their ratios. On TensorFlow, Keras's remat of a layer
    called with keyword arguments fails inside `tf.function`, with or
    without keras_lora: the result says so."""
    result = remat.main([*SMOKE, "--out", str(tmp_path)])
    assert [row["seq_len"] for row in result["results"]] == [8]
    (row,) = result["results"]
    runs = row["variants"]
    assert runs["remat"]["remat_mode_on_every_block"] is True
    assert runs["no_remat"]["remat_mode_on_every_block"] is False
    assert runs["no_remat"]["training_peak_bytes"] > 0
    assert isinstance(result["meets_target"], bool)
    assert remat.table(str(tmp_path)).count("\n") == 2 + 1
    if keras.backend.backend() == "tensorflow":
        error = runs["remat"]["error"]
        assert "custom_gradient" in error
        assert runs["remat"]["error_without_keras_lora"] == error
        assert result["remat_trains"] is False
        assert "fails" in remat.table(str(tmp_path))
        return
    assert result["remat_trains"] is True
    for r in runs.values():
        assert r["training_peak_bytes"] >= r["resting_bytes"] > 0
    assert row["training_peak_ratio"] == (
        runs["remat"]["training_peak_bytes"]
        / runs["no_remat"]["training_peak_bytes"]
    )
    assert _positive_finite(row["step_peak_ratio"])
    assert _positive_finite(row["time_ratio"]["median"])
    assert set(row["step_time"]) == {"remat", "no_remat"}


def test_performance_page_remat_table_is_the_scripts():
    """docs/performance.md shows exactly `benchmarks.remat.table()` of the
    JSON in benchmarks/results."""
    page = _performance_page()
    assert remat.table(RESULTS) in page


def test_quantization_page_table_is_the_scripts():
    """docs/quantization.md shows exactly `benchmarks.quantized.table()` of
    the JSON in benchmarks/results."""
    with open(os.path.join(ROOT, "docs", "quantization.md")) as f:
        page = f.read()
    assert quantized.table(RESULTS) in page
    assert quantized.memory_table(RESULTS) in page


def test_quantized_rows_of_the_performance_page_come_from_the_json(tmp_path):
    """The QLoRA rows: the int8 / int4 step and peak ratios and weight
    fractions of the quantized benchmark's JSON, and they are the rows of
    docs/performance.md."""
    result = quantized.main([*SMOKE, "--out", str(tmp_path)])
    rows = quantized.performance_table(str(tmp_path)).splitlines()[2:]
    (row,) = rows
    step = result["results"]["gemma_smoke"]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:2] == [keras.backend.backend(), "gemma_smoke"]
    assert cells[2] == (
        f"{step['int8']['step_vs_float32']['median']:.2f} / "
        f"{step['int4']['step_vs_float32']['median']:.2f}"
    )
    memory_row = result["memory"]["gemma_smoke"]
    assert cells[3] == (
        f"{memory_row['int8']['step_peak_vs_float32']:.2f} / "
        f"{memory_row['int4']['step_peak_vs_float32']:.2f}"
    )
    fractions = [float(c) for c in cells[4].split(" / ")]
    assert 0 < fractions[1] < fractions[0] < 1
    page = _performance_page()
    assert quantized.performance_table(RESULTS) in page


def test_peft_compare_trains_the_same_weights_in_both_frameworks(tmp_path):
    """On PyTorch: the same MiniLM weights in keras-hub and Hugging Face
    compute the same function; PEFT adapts the same layers with the same
    number of parameters as keras_lora; the floors train the same layer
    norms. On the other backends the script refuses, naming the backend."""
    if keras.backend.backend() != "torch":
        with pytest.raises(RuntimeError, match="KERAS_BACKEND=torch"):
            peft_compare.main([*SMOKE, "--out", str(tmp_path)])
        return
    result = peft_compare.main([*SMOKE, "--out", str(tmp_path)])
    rows = {row["targets"]: row for row in result["results"]}
    assert set(rows) == {"qv", "all_linear"}
    layers = {"qv": 2, "all_linear": 6}  # per block; MiniLM has 6 blocks
    for targets, row in rows.items():
        # The plain models and, with the same non-zero adapters exported by
        # keras_lora and loaded by PEFT, the adapted ones.
        assert row["forward_max_abs_difference"] < 1e-4
        assert row["adapted_forward_max_abs_difference"] < 1e-4
        v = row["variants"]
        assert v["peft"]["adapted_layers"] == 6 * layers[targets]
        assert v["keras_lora"]["adapted_layers"] == 6 * layers[targets]
        assert (
            v["peft"]["trainable_params"] == v["keras_lora"]["trainable_params"]
        )
        assert (
            v["hf_floor"]["trainable_params"] == v["floor"]["trainable_params"]
        )
        assert v["hf_full"]["trainable_params"] == v["hf_full"]["total_params"]
        assert all(
            _positive_finite(r["median"]) for r in row["ratios"].values()
        )
    assert peft_compare.table(str(tmp_path)).count("\n") == 2 + 2


def test_performance_page_peft_table_is_the_scripts():
    """docs/performance.md shows exactly `benchmarks.peft_compare.table()`
    of the JSON in benchmarks/results."""
    page = _performance_page()
    assert peft_compare.table(RESULTS) in page


def test_plot_draws_the_json_numbers(tmp_path):
    """The plot's series are the remat and scaling JSON's numbers, and the
    PNG is written."""
    output = tmp_path / "performance.png"
    data = plot.plot(str(output), RESULTS)
    with open(output, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(RESULTS, "remat_torch_cpu.json")) as f:
        remat_torch = json.load(f)
    torch_sequence = data["sequence"]["torch"]
    assert torch_sequence["seq_len"] == [
        row["seq_len"] for row in remat_torch["results"]
    ]
    assert torch_sequence["remat"]["peak_mib"] == [
        row["variants"]["remat"]["training_peak_bytes"] / 2**20
        for row in remat_torch["results"]
    ]
    # TensorFlow's remat fails in tf.function: only its no-remat peaks.
    assert set(data["sequence"]["tensorflow"]) == {"seq_len", "no_remat"}
    with open(os.path.join(RESULTS, "scaling_jax_cpu.json")) as f:
        rows = json.load(f)["rank_sweep"]["rows"]
    assert data["rank"]["jax"]["rank"] == [row["rank"] for row in rows]
    assert data["rank"]["jax"]["step_s"] == [row["median_s"] for row in rows]


def test_readme_performance_table_is_the_scripts():
    """README.md's performance table is `benchmarks.run_all.readme_table()`
    of the JSON in benchmarks/results, with a row per backend and target
    set."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    text = run_all.readme_table(RESULTS)
    assert text.count("\n") == 2 + 6
    assert text in readme


def test_performance_page_lora_branch_tables_are_the_scripts():
    """docs/performance.md shows exactly `benchmarks.lora_branch.table()` of
    the JSON in benchmarks/results (inside a list item, indented)."""
    page = _performance_page(dedent=True)
    first, second = lora_branch.table(RESULTS).split("\n\n")
    assert first in page
    assert second in page


def test_xla_memory_reads_the_compiled_programs_buffer_assignment(tmp_path):
    """On JAX: both variants compile; the rematerialized one has one
    `opt-barrier` per decoder block before XLA's passes and more buffers of
    the attention matrix's size (the recomputation); the ratio and table come
    from the numbers. Other backends are refused, naming the backend."""
    if keras.backend.backend() != "jax":
        with pytest.raises(RuntimeError, match="KERAS_BACKEND=jax"):
            xla_memory.main([*SMOKE, "--out", str(tmp_path)])
        return
    result = xla_memory.main([*SMOKE, "--out", str(tmp_path)])
    (row,) = result["results"]
    no, re_ = row["variants"]["no_remat"], row["variants"]["remat"]
    layers = common.GEMMA_CONFIGS["gemma_smoke"]["num_layers"]
    assert re_["barriers_before"] == layers
    assert no["barriers_before"] == 0
    assert re_["remat_mode_on_every_block"] is True
    # Buffers of the attention scores / probabilities: the remat program
    # recomputes them, so it has more of them.
    assert re_["attention_buffers"] > no["attention_buffers"] > 0
    assert no["attention_slots"] <= no["attention_buffers"]
    assert row["temp_ratio"] == re_["temp_bytes"] / no["temp_bytes"]
    assert xla_memory.table(str(tmp_path)).count("\n") == 2 + 1


def test_performance_page_xla_memory_table_is_the_scripts():
    """docs/performance.md shows exactly `benchmarks.xla_memory.table()` of
    the JSON in benchmarks/results (inside a list item, indented)."""
    page = _performance_page(dedent=True)
    assert xla_memory.table(RESULTS) in page
