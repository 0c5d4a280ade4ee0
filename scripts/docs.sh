#!/usr/bin/env bash
# Builds the documentation site into site/ (open site/index.html): the guides
# in docs/ and the API reference generated from keras_lora's docstrings, as
# mkdocs.yml lays them out. --strict makes every warning an error: a broken
# link or anchor between pages, a docstring that griffe cannot parse.
# Extra arguments go to `mkdocs build`. To preview while editing:
# .venv/bin/mkdocs serve
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# Material for MkDocs prints a banner about MkDocs 2.0 on every build; it says
# nothing about this site.
export NO_MKDOCS_2_WARNING=1
.venv/bin/mkdocs build --strict --site-dir site "$@"
