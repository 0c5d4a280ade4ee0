#!/usr/bin/env bash
# The main job: LoRA fine-tune of the real all-MiniLM-L6-v2 on the VADER
# lexicon, merge, TF SavedModel export and check, offline. Options go to
# `keras-lora-finetune` (see `--help`), e.g. `--backend torch`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/keras-lora-finetune "$@"
