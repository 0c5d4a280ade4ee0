"""Offline data for the examples: the VADER lexicon and user text files.

Nothing here downloads: the default data set is the VADER sentiment lexicon
that ships inside the `vaderSentiment` package (Hutto & Gilbert 2014, "VADER:
A Parsimonious Rule-based Model for Sentiment Analysis of Social Media
Text", ICWSM). Each of its ~7,500 entries (words, slang, emoticons) carries
the mean of ten human ratings on a -4 (most negative) .. +4 (most positive)
scale.

User data comes as CSV (a header with `text` and `label` columns) or JSONL
(one `{"text": ..., "label": ...}` object per line). Every problem with such a
file raises `DataError` naming the file, the line and what is wrong.
"""

import csv
import json
import math
import os
from dataclasses import dataclass
from dataclasses import field

import numpy as np

#: Largest number of distinct integer labels still read as classes (see
#: `infer_task`).
MAX_INTEGER_CLASSES = 20


class DataError(ValueError):
    """A data file or data argument that cannot be used, with the reason."""


@dataclass
class TextDataset:
    """Texts with regression targets or class labels.

    Attributes:
        texts: list of str.
        labels: float32 array of shape `(n,)`: the targets (regression) or
            the class indices (classification, values in
            `range(len(class_names))`).
        task: `"regression"` or `"classification"`.
        class_names: the class names in index order (classification), else
            an empty list.
        source: where the data came from (a path or a package name).
    """

    texts: list
    labels: np.ndarray
    task: str
    class_names: list = field(default_factory=list)
    source: str = ""

    def __len__(self):
        return len(self.texts)

    def subset(self, indices):
        """Returns the examples at `indices` (a sequence of ints)."""
        indices = np.asarray(indices, dtype="int64")
        return TextDataset(
            texts=[self.texts[i] for i in indices],
            labels=self.labels[indices],
            task=self.task,
            class_names=list(self.class_names),
            source=self.source,
        )


def vader_lexicon_path():
    """Path of `vader_lexicon.txt` inside the installed `vaderSentiment`.

    Raises:
        DataError: if `vaderSentiment` is not installed or lacks the file.
    """
    try:
        import vaderSentiment
    except ImportError:
        raise DataError(
            "The default data set is the VADER lexicon from the "
            "`vaderSentiment` package; install it (`pip install "
            "vaderSentiment`) or pass your own file with `--data`."
        ) from None
    path = os.path.join(
        os.path.dirname(vaderSentiment.__file__), "vader_lexicon.txt"
    )
    if not os.path.isfile(path):
        raise DataError(f"vaderSentiment has no lexicon file at {path!r}.")
    return path


def load_vader_lexicon(path=None):
    """Loads the VADER lexicon: each entry's text and mean human rating.

    Args:
        path: str or None (default). A file in the lexicon's format (tab
            separated: token, mean rating, standard deviation, the ten raw
            ratings); `None` reads the copy inside `vaderSentiment`.

    Returns:
        A regression `TextDataset` whose labels are the mean ratings
        (float32, in [-4, 4]), in file order; about 7,500 entries. Entries
        equal up to case are merged into one (the first spelling, the mean
        of their ratings).

    Raises:
        DataError: if the file is missing or a line is malformed.

    Example:
        >>> data = load_vader_lexicon()
        >>> data.texts[:2], data.labels[:2]  # doctest: +SKIP
        (['$:', '%)'], array([-1.5, -0.4], dtype=float32))
    """
    path = path or vader_lexicon_path()
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            try:
                rating = float(parts[1])
            except (IndexError, ValueError):
                raise DataError(
                    f"{path}, line {line_no}: expected 'token<TAB>mean "
                    f"rating<TAB>...'. Received: {line[:80]!r}"
                ) from None
            texts.append(parts[0])
            labels.append(rating)
    if not texts:
        raise DataError(f"{path}: the lexicon is empty.")
    # A few entries repeat up to case (e.g. "LOL" and "lol"); an uncased
    # model cannot tell them apart, and a split must not put one in train and
    # the other in held-out: keep one entry with their mean rating.
    merged = {}
    for text, rating in zip(texts, labels, strict=True):
        merged.setdefault(text.lower(), [text, []])[1].append(rating)
    texts = [text for text, _ in merged.values()]
    labels = [float(np.mean(ratings)) for _, ratings in merged.values()]
    return TextDataset(
        texts=texts,
        labels=np.asarray(labels, dtype="float32"),
        task="regression",
        source="vaderSentiment/vader_lexicon.txt",
    )


def split_dataset(data, test_fraction=0.2, seed=0, max_train=None):
    """Splits `data` into train and held-out parts by a fixed seed.

    The permutation comes from `numpy.random.default_rng(seed)`, so the same
    seed gives the same split on every machine and backend.

    Args:
        data: a `TextDataset`.
        test_fraction: float in (0, 1), default 0.2: the held-out share.
        seed: int, default 0.
        max_train: int or None (default): keep at most this many training
            examples (the first ones of the shuffled order).

    Returns:
        `(train, held_out)`, two disjoint `TextDataset`s.

    Raises:
        DataError: if `test_fraction` is not in (0, 1), `max_train` is not
            a positive int, or either part would be empty.
    """
    if isinstance(test_fraction, bool) or not (
        isinstance(test_fraction, (int, float)) and 0 < test_fraction < 1
    ):
        raise DataError(
            "`test_fraction` must be a float in (0, 1). "
            f"Received: test_fraction={test_fraction!r}"
        )
    if max_train is not None and (
        isinstance(max_train, bool)
        or not isinstance(max_train, int)
        or max_train <= 0
    ):
        raise DataError(
            "`max_train` must be a positive int or None. "
            f"Received: max_train={max_train!r}"
        )
    n = len(data)
    n_test = int(round(n * test_fraction))
    if n_test < 1 or n - n_test < 1:
        raise DataError(
            f"{data.source or 'the data'} has {n} examples; a "
            f"test_fraction={test_fraction} split leaves one part empty. "
            "Provide more examples."
        )
    order = np.random.default_rng(seed).permutation(n)
    test_idx, train_idx = order[:n_test], order[n_test:]
    if max_train is not None:
        train_idx = train_idx[:max_train]
    return data.subset(train_idx), data.subset(test_idx)


def _parse_float(value):
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def infer_task(raw_labels):
    """Decides regression vs classification from the labels of a file.

    Labels that are all numbers, not all integers or with more than
    `MAX_INTEGER_CLASSES` distinct values, make a regression task. Integer
    labels with few distinct values (e.g. 0/1) and non-numeric labels (e.g.
    "pos"/"neg") make a classification task.

    Args:
        raw_labels: list of the labels as read (str, int or float).

    Returns:
        `"regression"` or `"classification"`.
    """
    numbers = [
        None if isinstance(v, bool) else _parse_float(v) for v in raw_labels
    ]
    if any(x is None for x in numbers):
        return "classification"
    integral = all(float(x).is_integer() for x in numbers)
    if integral and len(set(numbers)) <= MAX_INTEGER_CLASSES:
        return "classification"
    return "regression"


def _read_csv(path):
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: the file is empty.") from None
        columns = [h.strip().lower() for h in header]
        if "text" not in columns or "label" not in columns:
            raise DataError(
                f"{path}, line 1: a CSV needs a header with 'text' and "
                f"'label' columns. Received header: {header!r}"
            )
        i_text, i_label = columns.index("text"), columns.index("label")
        for row in reader:
            line_no = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}, line {line_no}: expected {len(header)} fields "
                    f"({', '.join(header)}), got {len(row)}: {row!r}"
                )
            rows.append((line_no, row[i_text], row[i_label].strip()))
    return rows


def _read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}, line {line_no}: not valid JSON ({e.msg})."
                ) from None
            if not isinstance(record, dict) or not {"text", "label"} <= set(
                record
            ):
                raise DataError(
                    f"{path}, line {line_no}: each line must be an object "
                    f'with "text" and "label". Received: {line.strip()[:80]}'
                )
            label = record["label"]
            if not isinstance(label, (str, int, float)) or isinstance(
                label, bool
            ):
                raise DataError(
                    f'{path}, line {line_no}: "label" must be a string or '
                    f"a number. Received: {label!r}"
                )
            rows.append((line_no, record["text"], label))
    return rows


def load_text_label_file(path, min_examples=10):
    """Reads a user's CSV or JSONL file of `text,label` examples.

    Args:
        path: str, a `.csv`, `.jsonl` or `.json` (JSON Lines) file. CSV files
            need a header naming the `text` and `label` columns (other
            columns are ignored); JSONL files hold one object per line with
            `"text"` and `"label"` keys.
        min_examples: int, default 10: fewer examples is an error (a
            train/held-out split needs some of each).

    Returns:
        A `TextDataset`; the task follows `infer_task`. Class names are the
        distinct labels as strings, sorted (numerically for numbers).

    Raises:
        DataError: if the file is missing, has another extension, cannot be
            decoded as UTF-8, has a malformed line, an empty text, a
            missing/non-finite label, fewer than `min_examples` examples, or
            a single class.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise DataError(
            f"`data` must be a path to a CSV or JSONL file. Received: {path!r}"
        )
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"Data file not found: {path!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".jsonl", ".json"):
        raise DataError(
            "The data file must end in .csv or .jsonl (JSON Lines). "
            f"Received: {path!r}"
        )
    try:
        rows = _read_csv(path) if ext == ".csv" else _read_jsonl(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}).") from None
    texts, raw_labels = [], []
    for line_no, text, label in rows:
        if not isinstance(text, str) or not text.strip():
            raise DataError(
                f"{path}, line {line_no}: the text is empty or not a "
                f"string. Received: {text!r}"
            )
        if isinstance(label, str) and not label.strip():
            raise DataError(f"{path}, line {line_no}: the label is empty.")
        if isinstance(label, float) and not math.isfinite(label):
            raise DataError(
                f"{path}, line {line_no}: the label must be finite. "
                f"Received: {label!r}"
            )
        texts.append(text)
        raw_labels.append(label)
    if len(texts) < min_examples:
        raise DataError(
            f"{path}: found {len(texts)} examples; at least {min_examples} "
            "are needed for a train / held-out split."
        )
    task = infer_task(raw_labels)
    if task == "regression":
        labels = np.asarray([float(v) for v in raw_labels], dtype="float32")
        if not np.all(np.isfinite(labels)):
            bad = int(np.argmin(np.isfinite(labels)))
            raise DataError(
                f"{path}, line {rows[bad][0]}: the label must be finite. "
                f"Received: {raw_labels[bad]!r}"
            )
        return TextDataset(texts, labels, "regression", source=path)
    keys = [_class_key(v) for v in raw_labels]
    names = sorted(set(keys), key=_sort_key)
    if len(names) < 2:
        raise DataError(
            f"{path}: all labels are {names[0]!r}; classification needs at "
            "least two classes."
        )
    index = {name: i for i, name in enumerate(names)}
    labels = np.asarray([index[k] for k in keys], dtype="float32")
    return TextDataset(texts, labels, "classification", names, source=path)


def _class_key(value):
    number = None if isinstance(value, str) else _parse_float(value)
    if number is None and isinstance(value, str):
        number = _parse_float(value)
    if number is not None and float(number).is_integer():
        return str(int(number))
    return str(value).strip()


def _sort_key(name):
    number = _parse_float(name)
    return (0, number, "") if number is not None else (1, 0.0, name)
