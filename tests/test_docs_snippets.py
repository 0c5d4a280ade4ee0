"""Every ```python block of README.md and docs/*.md runs as written.

Each block runs alone in a fresh Python process (its own temporary working
folder, KERAS_BACKEND set to the suite's backend, a timeout), so no block
relies on another; two run at a time. A block that cannot run offline
starts with a marker naming why,

    # docs: skip-run (downloads the gemma_2b_en weights)

and the next python block of the same file is its runnable twin: it runs
and calls every keras_lora function the skipped block shows. A block that
sets `os.environ["KERAS_BACKEND"]` itself runs in that backend's suite.

Budget: a fresh process costs 12-15 s on a 2-core CPU before a block does
anything (Keras, its backend, and TensorFlow, which Keras imports on the
first `get_config` whenever it is installed). So each block that works on
every backend runs in one suite, the three suites taking turns in file
order (`HOME`); `KERAS_LORA_DOCS_ALL=1` runs every such block on every
backend. docs/index.md and docs/api/ (the API reference site) hold no
guide examples and are not collected.
"""

import concurrent.futures
import io
import os
import pathlib
import re
import subprocess
import sys
import time
import tokenize

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_S = 300
# Blocks run this many at a time (each in its own process): most of a
# block's time is importing Keras and its backend.
JOBS = max(1, min(2, os.cpu_count() or 1))
BACKENDS = ("tensorflow", "jax", "torch")
RUN_ALL = os.environ.get("KERAS_LORA_DOCS_ALL") == "1"

SKIP_RUN = re.compile(r"#\s*docs:\s*skip-run\b\s*(.*)")
REASON = re.compile(r"\(\s*(\S.*?)\s*\)\s*$")
PINNED = re.compile(
    r"""^os\.environ\[["']KERAS_BACKEND["']\]\s*=\s*["'](\w+)["']""", re.M
)
# keras_lora names a block calls: keras_lora.x, kl.x, and the submodules'.
API_CALL = re.compile(
    r"\b(?:keras_lora|kl)\.((?:\w+\.)*\w+)\s*\(|\b(multi|peft)\.(\w+)\s*\("
)
# A preset name or URL (a local folder would start with / or .) downloads.
DOWNLOAD = re.compile(r"""from_preset\s*\(\s*["'](?![/.])|hf://|kaggle://""")


def doc_files():
    files = [ROOT / "README.md"]
    files += sorted(
        p for p in (ROOT / "docs").glob("*.md") if p.name != "index.md"
    )
    return files


def python_blocks(path):
    """`[(line, code)]`: each ```python block of `path`, `line` the 1-based
    line of its opening fence, the code dedented by the fence's indent."""
    blocks = []
    lines = path.read_text(encoding="utf-8").splitlines()
    start = indent = None
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if start is None:
            if stripped == "```python":
                start, indent, body = number, line.index("`"), []
        elif stripped == "```":
            blocks.append((start, "\n".join(body) + "\n"))
            start = None
        else:
            body.append(line[indent:] if line[:indent].isspace() else line)
    assert start is None, f"{path.name}:{start}: unclosed ```python block"
    return blocks


def skip_reason(code):
    """The reason of a block's skip-run marker, or None when it runs."""
    first = code.lstrip("\n").splitlines()[0] if code.strip() else ""
    match = SKIP_RUN.search(first)
    if match is None:
        return None
    reason = REASON.search(match.group(1))
    return reason.group(1) if reason else ""


def without_comments(code):
    """The code with its comments removed (a comment names no download)."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, SyntaxError):
        return code
    return tokenize.untokenize(
        (t.type, "" if t.type == tokenize.COMMENT else t.string) for t in tokens
    )


def downloads(code):
    return DOWNLOAD.search(without_comments(code)) is not None


def api_calls(code):
    return {
        m.group(1) or f"{m.group(2)}.{m.group(3)}"
        for m in API_CALL.finditer(code)
    }


BLOCKS = {
    f"{path.relative_to(ROOT)}:{line}": (path, line, code)
    for path in doc_files()
    for line, code in python_blocks(path)
}
ORDER = sorted(BLOCKS, key=lambda i: BLOCKS[i][:2])


def pinned_backend(code):
    match = PINNED.search(code)
    return match.group(1) if match else None


def _runnable(code):
    return skip_reason(code) is None and not downloads(code)


# The suite each runnable block runs in: its own backend if it sets one;
# tensorflow for one that exports (in process there, a TensorFlow
# subprocess elsewhere); else the suite with the least work so far, a
# block that imports keras_hub counting double (ties: torch, then jax,
# the shorter suites).
def _cost(block_id):
    return 2 if "keras_hub" in BLOCKS[block_id][2] else 1


HOME = {}
for _id in ORDER:
    _code = BLOCKS[_id][2]
    if _runnable(_code) and pinned_backend(_code):
        HOME[_id] = pinned_backend(_code)
    elif _runnable(_code) and "export_saved_model" in api_calls(_code):
        HOME[_id] = "tensorflow"
_LOAD = {b: sum(_cost(i) for i in HOME if HOME[i] == b) for b in BACKENDS}
for _id in ORDER:
    if _runnable(BLOCKS[_id][2]) and _id not in HOME:
        HOME[_id] = min(("torch", "jax", "tensorflow"), key=_LOAD.get)
        _LOAD[HOME[_id]] += _cost(_id)


def _runs_here(block_id):
    if block_id not in HOME:
        return False
    here = keras.backend.backend()
    pinned = pinned_backend(BLOCKS[block_id][2])
    return HOME[block_id] == here or (RUN_ALL and pinned in (None, here))


def test_blocks_are_collected():
    files = {path.name for path, _, _ in BLOCKS.values()}
    assert "README.md" in files and "export.md" in files, sorted(files)
    for path, line, code in BLOCKS.values():
        markers = [
            n for n, t in enumerate(code.splitlines()) if SKIP_RUN.search(t)
        ]
        assert markers in ([], [0]), (
            f"{path.name}:{line}: a skip-run marker must be the first line"
        )
        assert pinned_backend(code) in (None, *BACKENDS), (
            f"{path.name}:{line}: unknown backend {pinned_backend(code)!r}"
        )


def _run(block_id, path, line, code, folder, live):
    """Runs one block in a fresh process: `(returncode, stdout, stderr,
    seconds)`, returncode None when it ran over TIMEOUT_S."""
    # Leading blank lines: the traceback's line numbers are the doc's.
    script = folder / f"{path.stem}_{line}.py"
    script.write_text("\n" * line + code, encoding="utf-8")
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    env.pop("PYTHONPATH", None)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    live.add(proc)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        returncode = None
    finally:
        live.discard(proc)
    return returncode, out, err, time.perf_counter() - start


@pytest.fixture(scope="module")
def block_results(request, tmp_path_factory):
    """`{block_id: Future}`: the selected runnable blocks, started at once
    on JOBS worker threads, each in its own process and folder."""
    selected = [
        item.callspec.params["block_id"]
        for item in request.session.items
        if item.path == pathlib.Path(__file__)
        and hasattr(item, "callspec")
        and "block_id" in item.callspec.params
    ]
    live = set()
    pool = concurrent.futures.ThreadPoolExecutor(JOBS)
    futures = {}
    for block_id in selected:
        path, line, code = BLOCKS[block_id]
        if _runs_here(block_id):
            folder = tmp_path_factory.mktemp(f"{path.stem}_{line}")
            futures[block_id] = pool.submit(
                _run, block_id, path, line, code, folder, live
            )
    yield futures
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in list(live):
        proc.kill()


@pytest.mark.parametrize("block_id", ORDER)
def test_doc_block_runs(block_id, block_results):
    path, line, code = BLOCKS[block_id]
    reason = skip_reason(code)
    if reason is not None:
        assert reason, (
            f"{block_id}: the skip-run marker needs a reason in parentheses"
        )
        later = [(n, c) for n, c in python_blocks(path) if n > line]
        assert later, f"{block_id} is not run and has no runnable twin after it"
        twin_line, twin = later[0]
        assert skip_reason(twin) is None, (
            f"{block_id}: its twin, {path.name}:{twin_line}, is not run either"
        )
        missing = api_calls(code) - api_calls(twin)
        assert not missing, (
            f"{block_id}: its runnable twin ({path.name}:{twin_line}) "
            f"does not call {sorted(missing)}"
        )
        return
    assert not downloads(code), (
        f"{block_id} would download a preset: mark it "
        "`# docs: skip-run (reason)` and add a runnable twin after it"
    )
    if not _runs_here(block_id):
        home = HOME[block_id]
        if pinned_backend(code):
            pytest.skip(f"sets KERAS_BACKEND={home}: runs in the {home} suite")
        pytest.skip(
            f"works on every backend: runs in the {home} suite "
            "(KERAS_LORA_DOCS_ALL=1 runs it in every suite)"
        )
    returncode, out, err, seconds = block_results[block_id].result()
    assert returncode is not None, (
        f"{block_id} ran over {TIMEOUT_S} s:\n{err[-6000:]}"
    )
    assert returncode == 0, (
        f"{block_id} failed (exit {returncode}, {seconds:.0f} s):\n"
        f"--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-6000:]}"
    )
