#!/usr/bin/env bash
# Packaging check: builds the sdist and the wheel (`python -m build`, which
# builds the wheel from the sdist) and fails on any warning in its output;
# checks what the wheel holds; installs it into a clean virtual environment
# and imports it there on the tensorflow, jax and torch backends.
#
# The clean environment gets keras_lora from the wheel only. Its pinned
# dependencies (TensorFlow, JAX, torch, Keras, ...) are not downloaded again:
# a folder of links to every entry of .venv's site-packages except keras_lora's
# own (its editable install and metadata) is put on its path by a .pth file.
#
# Usage: bash scripts/check_wheel.sh [DIST_DIR]   (default: a temporary folder,
# removed at the end; give one to keep the sdist and the wheel)
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
bash scripts/setup_env.sh
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
dist="${1:-$tmp/dist}"
mkdir -p "$dist"
dist="$(cd "$dist" && pwd)"

echo "--- python -m build"
# --no-isolation: build with the setuptools pinned in requirements-lock.txt
# (and in pyproject's build-system requires, which build checks), offline.
# PYTHONDONTWRITEBYTECODE would make setuptools warn that it skips
# byte-compiling (of its build folder, not of anything shipped).
env -u PYTHONDONTWRITEBYTECODE .venv/bin/python -m build --no-isolation \
  --outdir "$dist" . > "$tmp/build.log" 2>&1 || {
  cat "$tmp/build.log"
  echo "check_wheel: python -m build failed" >&2
  exit 1
}
# Any line that says "warning", except the listings of files being copied
# (a module could be called warnings.py).
files='^(adding|copying|creating|removing) |^keras_lora-[^ ]*/[^ ]*$'
if grep -iv -E "$files" "$tmp/build.log" | grep -qi "warning"; then
  grep -iv -E "$files" "$tmp/build.log" | grep -i -B2 -A2 "warning"
  echo "check_wheel: python -m build printed warnings (above)" >&2
  exit 1
fi
tail -1 "$tmp/build.log"
shopt -s nullglob
wheels=("$dist"/keras_lora-*.whl)
sdists=("$dist"/keras_lora-*.tar.gz)
shopt -u nullglob
if [ "${#wheels[@]}" -ne 1 ] || [ "${#sdists[@]}" -ne 1 ]; then
  echo "check_wheel: expected one wheel and one sdist in $dist" >&2
  exit 1
fi
wheel="${wheels[0]}"

echo "--- contents of $(basename "$wheel") and $(basename "${sdists[0]}")"
.venv/bin/python - "$wheel" "${sdists[0]}" <<'EOF'
import ast
import configparser
import pathlib
import sys
import tarfile
import zipfile

wheel, sdist = sys.argv[1:]
# The one place the version is written (pyproject reads it from there too).
init = ast.parse(pathlib.Path("keras_lora/__init__.py").read_text())
__version__ = next(
    node.value.value
    for node in init.body
    if isinstance(node, ast.Assign)
    and [t.id for t in node.targets if isinstance(t, ast.Name)]
    == ["__version__"]
)
names = zipfile.ZipFile(wheel).namelist()
info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/WHEEL"))
problems = []
version = info.removesuffix(".dist-info").split("-")[-1]
if version != __version__:
    problems.append(f"wheel version {version} != {__version__}")
tests = [n for n in names if "tests" in n.split("/")[:-1]
         or n.rsplit("/", 1)[-1].startswith("test_")]
if tests:
    problems.append(f"tests in the wheel: {tests}")
if f"{info}/licenses/LICENSE" not in names:
    problems.append("no LICENSE in the wheel's metadata")
# Every module of each shipped top-level package, as in the source tree.
zf = zipfile.ZipFile(wheel)
top = zf.read(f"{info}/top_level.txt").decode().split()
entry = configparser.ConfigParser()
entry.read_string(zf.read(f"{info}/entry_points.txt").decode())
scripts = dict(entry["console_scripts"])
if "keras-lora-finetune" not in scripts:
    problems.append(f"no keras-lora-finetune console script: {scripts}")
for script, target in scripts.items():
    module = target.split(":")[0]
    if module.split(".")[0] not in top:
        problems.append(f"{script}: {module} is not in the wheel")
if "keras_lora" not in top:
    problems.append(f"keras_lora is not in the wheel: {top}")
for package in top:
    source = {
        p.as_posix()
        for p in pathlib.Path(package).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    shipped = {n for n in names if n.startswith(package + "/")}
    if not source or source - shipped:
        problems.append(f"missing from the wheel: {sorted(source - shipped)}")
members = tarfile.open(sdist).getnames()
for wanted in ("LICENSE", "README.md", "pyproject.toml"):
    if not any(m.endswith("/" + wanted) for m in members):
        problems.append(f"no {wanted} in the sdist")
if problems:
    sys.exit("check_wheel: " + "\n".join(problems))
print(f"ok: {len(names)} files, packages {top}, scripts {sorted(scripts)}")
EOF

echo "--- install into a clean venv"
venv="$tmp/venv"
# The interpreter .venv was made from: its compiled packages fit it.
base_python="$(.venv/bin/python -c 'import sys; print(sys._base_executable)')"
"$base_python" -m venv --without-pip "$venv"
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
deps_site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir "$tmp/deps"
for entry in "$deps_site"/*; do
  case "$(basename "$entry")" in
    keras_lora* | __editable__* | *.pth) continue ;;
  esac
  ln -s "$entry" "$tmp/deps/"
done
echo "$tmp/deps" > "$site/_keras_lora_deps.pth"
# Before the wheel: the dependencies import, keras_lora does not.
(cd "$tmp" && "$venv/bin/python" -c '
import importlib.util
assert importlib.util.find_spec("keras") is not None
assert importlib.util.find_spec("keras_lora") is None, "keras_lora visible"
')
PIP_DISABLE_PIP_VERSION_CHECK=1 .venv/bin/python -m pip --python "$venv/bin/python" \
  install -q --no-deps --no-index "$wheel"
if [ ! -x "$venv/bin/keras-lora-finetune" ]; then
  echo "check_wheel: no keras-lora-finetune console script in the venv" >&2
  exit 1
fi
# Away from the repo, so that the working tree is not on sys.path.
cd "$tmp"
"$venv/bin/keras-lora-finetune" --help > /dev/null
for backend in tensorflow jax torch; do
  if ! KERAS_BACKEND=$backend TF_CPP_MIN_LOG_LEVEL=3 \
    "$venv/bin/python" - "$venv" > "$tmp/$backend.log" 2>&1 <<'EOF'; then
import importlib.metadata
import os
import sys

import keras
import numpy as np

import keras_lora

venv = sys.argv[1]
want = os.environ["KERAS_BACKEND"]
assert keras_lora.__file__.startswith(venv + "/"), keras_lora.__file__
assert keras.backend.backend() == want, keras.backend.backend()
dist = importlib.metadata.distribution("keras-lora")
assert str(dist.locate_file("")).startswith(venv + "/"), dist.locate_file("")
assert dist.version == keras_lora.__version__, dist.version
layer = keras_lora.LoRADense(3, rank=2)
y = keras.ops.convert_to_numpy(layer(np.ones((2, 4), "float32")))
assert y.shape == (2, 3), y.shape
assert [w.name for w in layer.trainable_weights] == ["lora_a", "lora_b"]
print(f"{want}: keras_lora {keras_lora.__version__} from the wheel, LoRADense ok")
EOF
    cat "$tmp/$backend.log"
    echo "check_wheel: the wheel failed on $backend" >&2
    exit 1
  fi
  tail -1 "$tmp/$backend.log"
done
cd "$repo"
echo "check_wheel: ok"
