"""Tests of the main job's pieces: data loading and split, option checks,
bad data files, tokenization, and one quick end-to-end run of
`keras-lora-finetune` in a subprocess."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from numerics import assert_close
from numerics import assert_diff_within

from keras_lora.finetune import cli
from keras_lora.finetune import data as kl_data
from keras_lora.finetune.data import DataError

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
        (["--learning-rate", "2"], "--learning-rate must be below 1.0"),
        (["--data", "/nonexistent/x.csv"], "file not found"),
        (["--preset", "/nonexistent/model"], "folder not found"),
        (["--min-gain", "-1"], "--min-gain must be >= 0"),
        (["--output", ""], "must not be empty"),
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
    a_file = tmp_path / "f"
    a_file.write_text("x")
    assert "not a folder" in cli.check_output_dir(str(a_file))
    earlier = tmp_path / "run"
    earlier.mkdir()
    (earlier / cli.SUMMARY_FILE).write_text("{}")
    assert cli.check_output_dir(str(earlier)) is None
    assert cli.check_output_dir(str(tmp_path / "new" / "deeper")) is None


def test_targets_option_splits_names():
    args = cli.parse_args(["--targets", "query, value", "--output", "x"])
    assert args.targets == ["query", "value"]
    assert args.rank == 8 and args.alpha is None


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

    vocab = os.path.join(cli.default_preset(), "vocab.txt")
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocab, lowercase=True)
    ids, mask = cli.tokenize(tokenizer, ["Good", "very very very bad"], 5)
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
    model = cli.build_model(backbone, "regression", 0, 1.5, 2.0)
    ids = np.array([[1, 2, 3, 0, 0, 0], [4, 5, 0, 0, 0, 0]], "int32")
    mask = (ids > 0).astype("int32")
    x = cli.model_inputs(backbone, ids, mask)
    assert set(x) == {"token_ids", "padding_mask", "segment_ids"}
    out = keras.ops.convert_to_numpy(model(x))
    # Output = std * head(mean of unpadded tokens) + mean (NumPy oracle).
    seq = keras.ops.convert_to_numpy(backbone(x)["sequence_output"])
    pooled = (seq * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    head = model.get_layer("head")
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in head.weights)
    assert_close(out, 2.0 * (pooled @ kernel + bias) + 1.5)
    scores, pred = cli.evaluate(
        model, x, np.array([1.0, 2.0], "float32"), "regression"
    )
    assert set(scores) == {"score", "pearson_r", "mae"}
    assert abs(scores["pearson_r"]) == pytest.approx(1.0)  # two points
    assert pred.shape == (2,)


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
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "keras_lora.finetune.cli",
            "--quick",
            "--backend",
            "tensorflow",
            "--output",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
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
