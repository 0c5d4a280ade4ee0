"""The documentation site (mkdocs.yml) covers the public API and every page.

`bash scripts/docs.sh` (in CI) builds the site with --strict, which catches
broken links and docstrings griffe cannot parse; these checks catch what a
build cannot see: a name added to `keras_lora.__all__` without a place in
the API reference, a guide left out of the navigation.
"""

import pathlib
import re

import yaml

import keras_lora

ROOT = pathlib.Path(__file__).resolve().parent.parent


def nav_pages(node):
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        node = list(node.values())
    return [page for child in node for page in nav_pages(child)]


def test_every_public_name_is_in_the_api_reference():
    page = (ROOT / "docs" / "api" / "index.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: keras_lora\.(\w+)$", page, re.M))
    # `keras_lora.merge` is also a submodule's name, so the reference shows
    # the function where it is defined.
    if "::: keras_lora.merge.merge" in page:
        documented.add("merge")
    public = set(keras_lora.__all__) - {"__version__"}
    assert sorted(public - documented) == []
    assert sorted(documented - public) == []


def test_every_docs_page_is_in_the_nav():
    config = yaml.load(
        (ROOT / "mkdocs.yml").read_text(encoding="utf-8"),
        Loader=yaml.BaseLoader,
    )
    docs = ROOT / config.get("docs_dir", "docs")
    pages = sorted(p.relative_to(docs).as_posix() for p in docs.rglob("*.md"))
    assert sorted(nav_pages(config["nav"])) == pages
