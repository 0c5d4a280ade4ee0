#!/usr/bin/env bash
# Runs the whole test suite once per Keras backend: tensorflow, jax, torch.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k dense`).
#
# First the backends run side by side in two lanes (jax; tensorflow then
# torch), each backend's output shown once it ends; then the tests marked
# `processes` (they start several processes and bound how long those take)
# run alone, one backend after another.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh || exit 1
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT

run() {  # run BACKEND MARKER [pytest args]: pytest's status (5, none selected, is 0)
  local backend=$1 marker=$2
  shift 2
  KERAS_BACKEND=$backend .venv/bin/python -m pytest -q -p no:cacheprovider \
    -m "$marker" "$@"
  local code=$?
  [ "$code" -eq 5 ] && code=0
  return "$code"
}

lane() {  # lane BACKEND...: each backend's suite, its output shown when it ends
  local status=0 backend
  for backend in "$@"; do
    run "$backend" "not processes" "${args[@]}" >"$logs/$backend.log" 2>&1
    local code=$?
    echo "=== KERAS_BACKEND=$backend ==="
    cat "$logs/$backend.log"
    [ "$code" -eq 0 ] || status=1
  done
  return $status
}

args=("$@")
echo "Running the tensorflow, jax and torch suites (two at a time)..."
lane jax &
jax_lane=$!
lane tensorflow torch
status=$?
wait "$jax_lane" || status=1
for backend in tensorflow jax torch; do
  echo "=== KERAS_BACKEND=$backend, tests that start processes ==="
  run "$backend" processes "$@" || status=1
done
exit $status
