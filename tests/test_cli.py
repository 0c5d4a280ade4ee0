"""Tests of the main job's pieces: data loading and split, option checks
(before any backend import), output folders, bad data files,
tokenization, per-step losses, `--targets` errors, quiet start-up, and one
quick end-to-end run of `keras-lora-finetune` and its `predict` command in
subprocesses."""

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
from numerics import assert_close
from numerics import assert_diff_within

from keras_lora_finetune import cli
from keras_lora_finetune import data as kl_data
from keras_lora_finetune import job
from keras_lora_finetune.data import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -- VADER lexicon and split ------------------------------------------------


def test_vader_lexicon_is_the_real_human_rated_set():
    data = kl_data.load_vader_lexicon()
    assert data.task == "regression"
    assert 7000 < len(data) < 8000
    assert data.labels.dtype == np.float32
    assert data.labels.min() >= -4 and data.labels.max() <= 4
    ratings = dict(zip(data.texts, data.labels.tolist(), strict=True))
    assert ratings["good"] == pytest.approx(1.9)
    assert ratings["bad"] == pytest.approx(-2.5)
    assert ratings[":)"] == pytest.approx(2.0)


def test_split_is_fixed_by_seed_disjoint_and_complete():
    data = kl_data.load_vader_lexicon()
    train, test = kl_data.split_dataset(data, test_fraction=0.2, seed=0)
    train2, test2 = kl_data.split_dataset(data, test_fraction=0.2, seed=0)
    _, test3 = kl_data.split_dataset(data, test_fraction=0.2, seed=1)
    assert train.texts == train2.texts and test.texts == test2.texts
    assert test.texts != test3.texts
    assert len(test) == round(0.2 * len(data))
    assert len(train) + len(test) == len(data)
    # The lexicon has unique entries, so disjoint texts = disjoint examples.
    assert not set(train.texts) & set(test.texts)
    # Entries equal up to case were merged (the model is uncased).
    lowered = [t.lower() for t in data.texts]
    assert len(set(lowered)) == len(lowered)
    lookup = dict(zip(data.texts, data.labels.tolist(), strict=True))
    assert [lookup[t] for t in test.texts] == test.labels.tolist()
    small, _ = kl_data.split_dataset(data, seed=0, max_train=50)
    assert small.texts == train.texts[:50]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"test_fraction": 0}, "test_fraction"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"test_fraction": True}, "test_fraction"),
        ({"max_train": 0}, "max_train"),
        ({"max_train": 2.5}, "max_train"),
    ],
)
def test_split_rejects_bad_arguments(kwargs, match):
    data = kl_data.load_vader_lexicon()
    with pytest.raises(DataError, match=match):
        kl_data.split_dataset(data, **kwargs)


# -- User data files -----------------------------------------------------------


def _write(path, text, mode="w"):
    with open(path, mode) as f:
        f.write(text)
    return str(path)


def test_csv_regression_and_classification(tmp_path):
    rows = "\n".join(f'"text, {i}",{i * 0.5}' for i in range(30))
    reg = kl_data.load_text_label_file(
        _write(tmp_path / "r.csv", "text,label\n" + rows + "\n")
    )
    assert reg.task == "regression" and len(reg) == 30
    assert reg.texts[3] == "text, 3" and reg.labels[3] == pytest.approx(1.5)
    rows = "\n".join(
        f"id{i},{'pos' if i % 2 else 'neg'},sample {i}" for i in range(12)
    )
    cls = kl_data.load_text_label_file(
        _write(tmp_path / "c.csv", "id,label,text\n" + rows)
    )
    assert cls.task == "classification"
    assert cls.class_names == ["neg", "pos"]
    assert cls.labels[:4].tolist() == [0, 1, 0, 1]


def test_jsonl_integer_labels_are_classes(tmp_path):
    lines = "\n".join(
        json.dumps({"text": f"t{i}", "label": i % 3}) for i in range(15)
    )
    ds = kl_data.load_text_label_file(_write(tmp_path / "d.jsonl", lines))
    assert ds.task == "classification"
    assert ds.class_names == ["0", "1", "2"]
    assert ds.labels[:4].tolist() == [0, 1, 2, 0]


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("a.txt", "text,label\nx,1\n", r"must end in \.csv or \.jsonl"),
        ("a.csv", "", "empty"),
        ("a.csv", "sentence,score\nx,1\n", "'text' and 'label'"),
        ("a.csv", "text,label\n" + "x,1\n" * 12 + "y\n", "line 14"),
        ("a.csv", "text,label\n" + "x,1\n" * 12 + ",1\n", "text is empty"),
        ("a.csv", "text,label\n" + "x,\n" * 12, "label is empty"),
        ("a.csv", "text,label\nx,1\ny,2\n", "at least 10"),
        ("a.csv", "text,label\n" + "x,a\n" * 12, "two classes"),
        ("a.jsonl", '{"text": "x", "label": 1}\n{bad\n', "line 2: not valid"),
        ("a.jsonl", '{"text": "x"}\n', 'with "text" and "label"'),
        ("a.jsonl", '{"text": "x", "label": [1]}\n', "string or a number"),
    ],
)
def test_bad_data_files_name_file_line_and_reason(
    tmp_path, name, content, match
):
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError, match=match) as info:
        kl_data.load_text_label_file(path)
    assert name in str(info.value)


def test_missing_and_non_utf8_data_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        kl_data.load_text_label_file(str(tmp_path / "none.csv"))
    path = _write(tmp_path / "latin.csv", b"text,label\n\xe9t\xe9,1\n", "wb")
    with pytest.raises(DataError, match="not UTF-8"):
        kl_data.load_text_label_file(path)


def test_infer_task():
    assert kl_data.infer_task([0.1, 2, 3]) == "regression"
    assert kl_data.infer_task(["1", "0", "1"]) == "classification"
    assert kl_data.infer_task(list(range(50))) == "regression"
    assert kl_data.infer_task(["pos", 1]) == "classification"


# -- Options -------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--rank", "0"], "--rank must be a positive integer, got '0'"),
        (["--rank", "abc"], "--rank must be a positive integer"),
        (["--alpha", "-1"], "--alpha must be a positive number"),
        (["--alpha", "nan"], "--alpha must be a positive number"),
        (["--epochs", "0"], "--epochs must be a positive integer"),
        (["--targets", ","], "--targets must be a comma-separated list"),
        (["--backend", "numpy"], "invalid choice: 'numpy'"),
        (["--learning-rate", "2"], "--learning-rate must be below 1, got"),
        (["--data", "/nonexistent/x.csv"], "file not found"),
        (["--preset", "/nonexistent/model"], "folder not found"),
        (["--min-gain", "-1"], "--min-gain must be a number >= 0"),
        (["--min-gain", "5"], "--min-gain must be below 2"),
        (["--rank", "5000"], "--rank must be at most 4096"),
        (["--seed", "-1"], "--seed must be an integer from 0 to"),
        (["--seq-len", "1"], "--seq-len must be an integer from 2"),
        (["--max-train", "1"], "--max-train must be an integer >= 2, got"),
        (["--exclude", "a,,b"], "--exclude must be a comma-separated list"),
        (["--quantize", "int2"], "--quantize: invalid choice: 'int2'"),
        (["--output", ""], "must not be empty"),
        (["predict", "--adapters", "/nonexistent.safetensors", "x"], "file"),
        (["predict", "x"], "the following arguments are required"),
    ],
)
def test_bad_options_exit_2_with_one_clear_line(capsys, argv, match):
    with pytest.raises(SystemExit) as info:
        cli.parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert match in err
    assert "Traceback" not in err


def test_output_folder_safety(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert "not an earlier" in cli.check_output_dir(str(foreign))
    assert "not an earlier" in cli.check_output_dir(str(foreign), True)
    a_file = tmp_path / "f"
    a_file.write_text("x")
    assert "not a folder" in cli.check_output_dir(str(a_file))
    # A summary.json this command did not write does not make a run folder.
    lookalike = tmp_path / "lookalike"
    lookalike.mkdir()
    (lookalike / cli.SUMMARY_FILE).write_text("{}")
    (lookalike / "important.txt").write_text("keep")
    assert "not an earlier" in cli.check_output_dir(str(lookalike), True)
    earlier = tmp_path / "run"
    earlier.mkdir()
    (earlier / cli.SUMMARY_FILE).write_text(json.dumps({"tool": cli.PROG}))
    assert "pass --overwrite" in cli.check_output_dir(str(earlier))
    assert cli.check_output_dir(str(earlier), overwrite=True) is None
    assert cli.check_output_dir(str(tmp_path / "new" / "deeper")) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.check_output_dir(str(empty)) is None


def test_existing_output_needs_overwrite(tmp_path, capsys):
    earlier = tmp_path / "run"
    earlier.mkdir()
    (earlier / cli.SUMMARY_FILE).write_text(json.dumps({"tool": cli.PROG}))
    with pytest.raises(SystemExit):
        cli.parse_args(["--output", str(earlier)])
    assert "--output:" in capsys.readouterr().err
    args = cli.parse_args(["--output", str(earlier), "--overwrite"])
    assert args.output == str(earlier) and args.overwrite


def test_default_output_is_per_backend_and_time(tmp_path, monkeypatch):
    import datetime

    monkeypatch.chdir(tmp_path)
    now = datetime.datetime(2026, 12, 2, 7, 5, 9)
    first = cli.default_output("jax", now)
    assert first == os.path.join("runs", "finetune", "jax-20261202-070509")
    os.makedirs(first)
    # The same second again: a new folder, never the earlier run's.
    assert cli.default_output("jax", now) == first + "-2"
    assert cli.default_output("torch", now).endswith("torch-20261202-070509")
    args = cli.parse_args(["--backend", "torch"])
    assert args.output.startswith(os.path.join("runs", "finetune", "torch-"))
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert cli.parse_args([]).output.startswith(
        os.path.join("runs", "finetune", "jax-")
    )


def test_options_and_help_import_no_backend():
    """`--help`, a bad option and a full parse finish before Keras or a
    backend is imported (the command answers at once)."""
    code = (
        "import sys\n"
        "from keras_lora_finetune import cli\n"
        "cli.parse_args(['--rank', '4', '--targets', 'query', '--output', "
        "'o'])\n"
        "for argv in (['--help'], ['--rank', '0'], ['predict', '--help']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('keras', 'tensorflow', 'jax', 'torch', "
        "'keras_hub', 'keras_lora', 'numpy') if m in sys.modules]\n"
        "print('IMPORTED', heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "IMPORTED []" in result.stdout, result.stdout[-500:]
    assert "usage: keras-lora-finetune predict" in result.stdout
    assert "--rank must be a positive integer" in result.stderr


def test_all_linear_targets_every_projection_but_the_head():
    """`--targets all-linear` on the command's own model (backbone, mean
    pooling, `head`, rescaling): every Dense / EinsumDense of the backbone,
    not the head, which trains whole."""
    import keras_hub

    import keras_lora

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=30,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=6,
    )
    model = job.build_model(backbone, "regression", 0, 0.5, 2.0)
    args = cli.parse_args(["--targets", "all-linear", "--output", "x"])
    selected = keras_lora.select_targets(model, args.targets)
    linear = [
        path
        for path, layer in keras_lora.iter_layers(model)
        if isinstance(layer, keras.layers.Dense | keras.layers.EinsumDense)
    ]
    assert "head" in linear
    assert sorted(selected) == sorted(p for p in linear if p != "head")


def test_all_conv_targets_on_a_model_without_convolutions_is_refused():
    """`--targets all-conv` on the command's BERT model (no convolution):
    a ValueError naming the option value."""
    import keras_hub

    import keras_lora

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=30,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=6,
    )
    model = job.build_model(backbone, "regression", 0, 0.5, 2.0)
    args = cli.parse_args(["--targets", "all-conv", "--output", "x"])
    assert args.targets == ["all-conv"]
    with pytest.raises(ValueError, match="no convolution layer") as info:
        keras_lora.select_targets(model, args.targets)
    assert "targets='all-conv'" in str(info.value)


def test_targets_option_splits_names():
    args = cli.parse_args(
        ["--targets", "query, value", "--exclude", "layer_0", "--output", "x"]
    )
    assert args.targets == ["query", "value"]
    assert args.exclude == ["layer_0"]
    assert args.rank == 8 and args.alpha is None


def test_unmatched_targets_error_lists_layers_one_per_line():
    import keras_hub

    import keras_lora

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=30,
        num_layers=3,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=6,
    )
    with pytest.raises(ValueError) as info:
        keras_lora.select_targets(backbone, ["nope"])
    message = job.targets_error(info.value)
    lines = message.splitlines()
    assert lines[0].startswith("--targets: These `targets` match no layer")
    assert "'nope'" in lines[0] and "[" not in lines[0]
    paths = [path for path, _ in keras_lora.iter_layers(backbone)]
    assert lines[1].strip().endswith("layers can be adapted:")
    listed = [ln.strip() for ln in lines[2:14]]
    assert len(listed) == 12 and all(p in paths for p in listed)
    assert "... and" in message and "more" in message
    assert max(len(ln) for ln in lines) < 120


def test_step_losses_recover_each_batch_loss():
    """Per-step losses from Keras's running mean equal each batch's own
    loss (NumPy oracle: learning rate 0, so the weights never change;
    7 examples in batches of 3 leave a short last batch)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3)).astype("float32")
    y = rng.normal(size=(7, 1)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in model.weights)
    losses, ends = [], []
    epochs_seen = []
    track = job.track_training(
        7, 3, losses, ends, on_epoch=lambda e, m: epochs_seen.append(e)
    )
    model.fit(
        x,
        y,
        batch_size=3,
        epochs=2,
        shuffle=False,
        callbacks=[track],
        verbose=0,
    )
    oracle = [
        float(np.mean((x[i : i + 3] @ kernel + bias - y[i : i + 3]) ** 2))
        for i in (0, 3, 6)
    ]
    assert_close(np.array(losses), np.array(oracle * 2))
    assert ends == [3, 6] and epochs_seen == [0, 1]


def test_bad_data_file_fails_before_loading_and_writes_nothing(
    tmp_path, capsys
):
    bad = _write(tmp_path / "bad.jsonl", '{"text": "a", "label": 1}\nnope\n')
    out = tmp_path / "out"
    code = cli.main(["--data", bad, "--output", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "--data:" in err and "line 2: not valid JSON" in err
    assert "Traceback" not in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_tokenize_packs_cls_sep_and_truncates():
    import keras_hub

    vocab = os.path.join(job.default_preset(), "vocab.txt")
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocab, lowercase=True)
    ids, mask = job.tokenize(tokenizer, ["Good", "very very very bad"], 5)
    good = tokenizer.token_to_id("good")
    very = tokenizer.token_to_id("very")
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert ids[0].tolist() == [101, good, 102, 0, 0]
    assert mask[0].tolist() == [1, 1, 1, 0, 0]
    assert ids[1].tolist() == [101, very, very, very, 102]
    assert mask[1].tolist() == [1] * 5


def test_model_head_and_scores_on_a_tiny_bert():
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=30,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=6,
    )
    model = job.build_model(backbone, "regression", 0, 1.5, 2.0)
    ids = np.array([[1, 2, 3, 0, 0, 0], [4, 5, 0, 0, 0, 0]], "int32")
    mask = (ids > 0).astype("int32")
    x = job.model_inputs(backbone, ids, mask)
    assert set(x) == {"token_ids", "padding_mask", "segment_ids"}
    out = keras.ops.convert_to_numpy(model(x))
    # Output = std * head(mean of unpadded tokens) + mean (NumPy oracle).
    seq = keras.ops.convert_to_numpy(backbone(x)["sequence_output"])
    pooled = (seq * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    head = model.get_layer("head")
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in head.weights)
    assert_close(out, 2.0 * (pooled @ kernel + bias) + 1.5)
    scores, pred = job.evaluate(
        model, x, np.array([1.0, 2.0], "float32"), "regression"
    )
    assert set(scores) == {"score", "pearson_r", "mae"}
    assert abs(scores["pearson_r"]) == pytest.approx(1.0)  # two points
    assert pred.shape == (2,)


def _noise(stderr):
    """Start-up and runtime log lines a user would read as errors."""
    needles = (
        "absl::InitializeLog",
        "cuda",
        "cuInit",
        "oneDNN",
        "cpu_feature_guard",
        "retracing",
        "xla_bridge",
        "I0000",
        "E0000",
        "W0000",
    )
    return [ln for ln in stderr.splitlines() if any(n in ln for n in needles)]


def test_backend_start_up_is_quiet():
    """Importing the backend, training and merging print nothing to stderr
    on this backend (with `--verbose` the backend's own lines return)."""
    code = (
        "from keras_lora_finetune import cli\n"
        "cli.quiet_environment()\n"
        "cli.import_backend(verbose=False)\n"
        "import keras, numpy as np, keras_lora\n"
        "m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, "
        "name='d')])\n"
        "m = keras_lora.apply_lora(m, rank=2, targets=['d'])\n"
        "m.compile(optimizer='adam', loss='mse')\n"
        "m.fit(np.ones((8, 4)), np.ones((8, 4)), verbose=0)\n"
        "keras_lora.merge(m).predict(np.ones((2, 4)), verbose=0)\n"
        "print('OK')\n"
    )
    env = dict(os.environ)
    for name in ("TF_CPP_MIN_LOG_LEVEL", "ABSL_MIN_LOG_LEVEL"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout
    assert result.stderr == "", result.stderr[-3000:]


def _cli(*argv, env=None, timeout=300):
    """Runs `python -m keras_lora_finetune ARGV` from the repo root."""
    return subprocess.run(
        [sys.executable, "-m", "keras_lora_finetune", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_quick_run_end_to_end_in_a_subprocess(tmp_path):
    """The main job in `--quick` mode on real MiniLM weights and VADER data:
    learns, merges, exports, reloads the SavedModel and saves adapters.
    Run once (TensorFlow backend, chosen by `--backend` from a process
    started with KERAS_BACKEND=jax, which exercises the backend switch)."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the quick CLI run is covered once, in the TF suite")
    out = tmp_path / "run"
    env = dict(os.environ, KERAS_BACKEND="jax")
    result = _cli(
        "--quick",
        "--backend",
        "tensorflow",
        "--output",
        str(out),
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "tensorflow"
    assert summary["gain"] >= 0.1
    assert summary["held_out_after"]["mae"] < summary["held_out_before"]["mae"]
    # Whole BERT models, merged kernels against unmerged branches.
    assert_diff_within(
        summary["saved_model_max_abs_diff"],
        summary["saved_model_output_max_abs"],
        ulps=256,
    )
    assert_diff_within(
        summary["merge_max_abs_diff"], summary["output_max_abs"], ulps=256
    )
    assert summary["adapter_file_bytes"] * 50 < summary["full_model_bytes"]
    assert summary["lora_layers"] == 12
    for name in (
        "saved_model",
        "adapters.safetensors",
        "loss.png",
        "summary.md",
    ):
        assert (out / name).exists(), name
    assert "[12/12]" in result.stdout
    assert _noise(result.stderr) == [], result.stderr[-3000:]
    # Per-step losses, and the held-out score before and after each epoch.
    assert len(summary["loss_history"]) == summary["epochs"] * 12
    assert summary["held_out_curve"][0] == [
        0,
        summary["held_out_before"]["score"],
    ]
    assert summary["held_out_curve"][-1] == [
        12,
        summary["held_out_after"]["score"],
    ]
    markdown = (out / "summary.md").read_text()
    assert "| 0 (before) | 0 |" in markdown
    examples = summary["examples"]
    assert len(examples) == 8
    assert all(f"| {e['text']} | {e['label']} |" in markdown for e in examples)
    # `predict` rebuilds the model from the base and the adapter file and
    # gives the trained model's predictions for the same texts.
    predicted = _cli(
        "predict",
        "--backend",
        "tensorflow",
        "--adapters",
        str(out / "adapters.safetensors"),
        *[e["text"] for e in examples],
        env=env,
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert predicted.stderr == "", predicted.stderr[-3000:]
    assert predicted.stdout.splitlines() == [
        f"{e['after']}\t{e['text']}" for e in examples
    ]
    assert summary["times_s"]["fit"] > 0
    assert f"{summary['times_s']['fit']:.0f} s" in markdown
    # An adapter file that is not the run's own is refused.
    other = tmp_path / "other"
    shutil.copytree(out, other)
    with open(other / "adapters.safetensors", "ab") as f:
        f.write(b" ")
    mixed = _cli(
        "predict",
        "--adapters",
        str(other / "adapters.safetensors"),
        "good",
        env=env,
    )
    assert mixed.returncode == 2
    assert "is not the adapter file of the run" in mixed.stderr
    # A second run into the same folder is refused without --overwrite.
    again = _cli("--output", str(out), timeout=60)
    assert again.returncode == 2 and "--overwrite" in again.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quick_qlora_run_end_to_end(tmp_path, mode):
    """`--quantize int8|int4`: the real MiniLM backbone quantized by Keras,
    float32 adapters learn, the float merge (W_deq + s*A*B) is checked and
    exported, and `predict` quantizes the base again to reproduce the run.
    Run once (torch suite)."""
    if keras.backend.backend() != "torch":
        pytest.skip("the QLoRA CLI runs are covered once, in the torch suite")
    out = tmp_path / "run"
    result = _cli(
        "--quick", "--quantize", mode, "--output", str(out), timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quantize"] == mode
    assert summary["gain"] >= 0.1
    float_bytes, quantized_bytes = summary["backbone_weight_bytes"]
    # Keras packs int4 two to a byte; scales and the float norms remain.
    assert quantized_bytes < {"int8": 0.30, "int4": 0.17}[mode] * float_bytes
    gap, diff = summary["quantization_gap"], summary["merge_max_abs_diff"]
    assert gap > 0
    if mode == "int4":
        # Weight-only: the float merge is the QLoRA model up to rounding.
        assert_diff_within(diff, summary["output_max_abs"], ulps=256)
    else:
        # int8 layers also quantize their inputs; the float merge does not.
        assert diff <= 1e-3 * summary["output_max_abs"] + 2 * gap
    merged = summary["merged_held_out"]["score"]
    assert merged - summary["held_out_before"]["score"] >= 0.1
    assert_diff_within(
        summary["saved_model_max_abs_diff"],
        summary["saved_model_output_max_abs"],
        ulps=256,
    )
    markdown = (out / "summary.md").read_text()
    assert f"backbone quantized to {mode}" in markdown
    examples = summary["examples"]
    predicted = _cli(
        "predict",
        "--adapters",
        str(out / "adapters.safetensors"),
        *[e["text"] for e in examples],
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert predicted.stdout.splitlines() == [
        f"{e['after']}\t{e['text']}" for e in examples
    ]
