"""Writes the default-targets table of docs/apply_merge.md.

Builds every keras-hub backbone class from the test suite's small
configurations (tests/hub_zoo), applies LoRA with the default targets and
writes, per backbone, what was adapted between the table markers in
docs/apply_merge.md. tests/test_hub_backbones.py checks the table against
the same models. Run: `.venv/bin/python scripts/default_targets.py`.
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import keras  # noqa: E402
from hub_zoo import NOT_MODELS  # noqa: E402
from hub_zoo import all_cases  # noqa: E402
from hub_zoo import default_targets_summary  # noqa: E402
from hub_zoo import family_of  # noqa: E402

import keras_lora  # noqa: E402

START = "<!-- default-targets:start -->"
END = "<!-- default-targets:end -->"
DOC = ROOT / "docs" / "apply_merge.md"


def main():
    rows = []
    for name, case in sorted(all_cases().items()):
        if name in NOT_MODELS:
            continue
        keras.utils.set_random_seed(0)
        lora = keras_lora.apply_lora(case.build(), rank=2)
        rows.append((family_of(name), name, default_targets_summary(lora)))
        print(rows[-1], flush=True)
    rows.sort()
    table = [
        "| Family | Backbone | Adapted by default |",
        "| --- | --- | --- |",
    ] + [f"| {f} | `{n}` | {s} |" for f, n, s in rows]
    text = DOC.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(head + START + "\n" + "\n".join(table) + "\n" + END + tail)


if __name__ == "__main__":
    main()
