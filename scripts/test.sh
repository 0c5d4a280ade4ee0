#!/usr/bin/env bash
# Runs the whole test suite once per Keras backend: tensorflow, jax, torch.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k dense`).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh || exit 1
status=0
for backend in tensorflow jax torch; do
  echo "=== KERAS_BACKEND=$backend ==="
  KERAS_BACKEND=$backend .venv/bin/python -m pytest -q "$@" || status=1
done
exit $status
