"""keras_lora.launch: local processes, their environment, failure and
timeout handling (plain Python child processes: no backend needed)."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from keras_lora.launch import launch
from keras_lora.launch import process_environments

# Bounded in time: scripts/test.sh runs these alone, after the rest.
pytestmark = pytest.mark.processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_environments_join_every_backend():
    envs = process_environments(2, port=29400, devices_per_process=4)
    assert [e["KERAS_DISTRIBUTION_PROCESS_ID"] for e in envs] == ["0", "1"]
    assert {e["KERAS_DISTRIBUTION_JOB_ADDRESSES"] for e in envs} == {
        "127.0.0.1:29400"
    }
    tf_config = [json.loads(e["TF_CONFIG"]) for e in envs]
    assert tf_config[1]["task"] == {"type": "worker", "index": 1}
    assert tf_config[0]["cluster"]["worker"] == [
        "127.0.0.1:29401",
        "127.0.0.1:29402",
    ]
    assert [e["RANK"] for e in envs] == ["0", "1"]
    assert envs[0]["XLA_FLAGS"].endswith(
        "--xla_force_host_platform_device_count=4"
    )


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"num_processes": 0}, "num_processes"),
        ({"num_processes": 2, "port": 70000}, "port"),
        ({"num_processes": 2, "devices_per_process": 0}, "devices_per_process"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`.*Received"):
        process_environments(**kwargs)


def test_prefixed_output_and_success():
    out, err = io.StringIO(), io.StringIO()
    code = launch(
        [sys.executable, "-c", "import os; print('rank', os.environ['RANK'])"],
        2,
        stdout=out,
        stderr=err,
    )
    assert code == 0
    assert sorted(out.getvalue().splitlines()) == ["[0] rank 0", "[1] rank 1"]


def test_a_failing_process_stops_the_others():
    script = (
        "import os, sys, time\n"
        "if os.environ['RANK'] == '1': sys.exit(3)\n"
        "time.sleep(120)\n"
    )
    err = io.StringIO()
    start = time.monotonic()
    code = launch([sys.executable, "-c", script], 2, stderr=err)
    assert code == 3
    assert time.monotonic() - start < 60
    assert "process 1 exited with code 3" in err.getvalue()


def test_a_process_killed_by_a_signal_is_named_with_the_signal():
    script = (
        "import os, signal, time\n"
        "if os.environ['RANK'] == '0': os.kill(os.getpid(), signal.SIGABRT)\n"
        "time.sleep(120)\n"
    )
    err = io.StringIO()
    code = launch([sys.executable, "-c", script], 2, stderr=err)
    assert code == 128 + 6  # SIGABRT, as a shell reports it
    assert "process 0 was killed by SIGABRT" in err.getvalue()


def test_timeout_stops_every_process():
    err = io.StringIO()
    code = launch(
        [sys.executable, "-c", "import time; time.sleep(120)"],
        2,
        timeout=1,
        stderr=err,
    )
    assert code == 124
    assert "timed out after 1 s" in err.getvalue()


def test_real_time_signal_bad_bytes_and_no_final_newline(tmp_path):
    """A process killed by a signal Python has no name for is reported by
    number; output that is not UTF-8 or lacks a final newline is relayed
    (bytes replaced, line ended), never stopping the relay."""
    script = (
        "import os, sys\n"
        "sys.stdout.buffer.write(b'\\xff\\xfe bytes\\n')\n"
        "sys.stdout.write('no newline'); sys.stdout.flush()\n"
        "if os.environ['RANK'] == '0': os.kill(os.getpid(), 40)\n"
    )
    out, err = io.StringIO(), io.StringIO()
    code = launch([sys.executable, "-c", script], 2, stdout=out, stderr=err)
    assert code == 128 + 40
    assert "process 0 was killed by signal 40" in err.getvalue()
    lines = out.getvalue().splitlines()
    assert "[0] \ufffd\ufffd bytes" in lines
    assert "[0] no newline" in lines


def test_command_checks_and_double_dash():
    with pytest.raises(ValueError, match="no_such_program_here"):
        launch(["no_such_program_here"], 2)
    out = io.StringIO()
    code = launch(["--", sys.executable, "-c", "print('ok')"], 1, stdout=out)
    assert code == 0
    assert out.getvalue() == "[0] ok\n"


def _alive(pid):
    """Whether `pid` runs (a zombie, waiting for init to reap it, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_programs_a_process_started_are_stopped_too(tmp_path):
    """A process that started another program and failed: that program is
    stopped with it (its process group), and the launcher returns at once."""
    pids = tmp_path / "pids"
    script = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        f"open({str(pids)!r} + os.environ['RANK'], 'w').write(str(child.pid))\n"
        "time.sleep(1)\n"
        "if os.environ['RANK'] == '1': sys.exit(4)\n"
        "time.sleep(300)\n"
    )
    start = time.monotonic()
    code = launch([sys.executable, "-c", script], 2, stderr=io.StringIO())
    assert code == 4
    assert time.monotonic() - start < 15
    for rank in (0, 1):
        pid = int((tmp_path / f"pids{rank}").read_text())
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid)


def test_sigterm_to_the_launcher_stops_every_process(tmp_path):
    pids = tmp_path / "pids"
    script = (
        "import os, time\n"
        f"path = {str(pids)!r} + os.environ['RANK']\n"
        "open(path, 'w').write(str(os.getpid()))\n"
        "time.sleep(300)\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keras_lora.launch",
            "--num-processes",
            "2",
            "--",
            sys.executable,
            "-c",
            script,
        ],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    deadline = time.monotonic() + 60
    while sum(p.read_text() != "" for p in tmp_path.glob("pids*")) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    for rank in (0, 1):
        assert not _alive(int((tmp_path / f"pids{rank}").read_text()))


@pytest.mark.parametrize(
    "config, expected",
    [
        (None, None),
        (
            {
                "cluster": {"worker": ["a:1", "b:1"]},
                "task": {"type": "worker", "index": 1},
            },
            (1, 2),
        ),
        (
            {
                "cluster": {"chief": ["a:1"], "worker": ["b:1"]},
                "task": {"type": "worker", "index": 0},
            },
            (1, 2),
        ),
        (
            {
                "cluster": {"chief": ["a:1"], "worker": ["b:1"]},
                "task": {"type": "chief", "index": 0},
            },
            (0, 2),
        ),
        (
            {"cluster": {"ps": ["a:1"]}, "task": {"type": "ps", "index": 0}},
            None,
        ),
    ],
)
def test_tf_config_tasks(monkeypatch, config, expected):
    from keras_lora.processes import _tf_config_task

    if config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    assert _tf_config_task() == expected


@pytest.mark.parametrize(
    "raw, problem",
    [
        ("not json", "not valid JSON"),
        ("[]", "not a JSON object"),
        ('{"task": {"type": "worker", "index": 1}}', "does not list"),
        (
            '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", '
            '"index": 5}}',
            "does not list",
        ),
        (
            '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", '
            '"index": -1}}',
            "does not list",
        ),
        (
            '{"cluster": {"worker": "a:1"}, "task": {"type": "worker"}}',
            "non-list",
        ),
        (
            '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", '
            '"index": "abc"}}',
            "not an integer",
        ),
    ],
)
def test_bad_tf_config_is_an_error_naming_it(monkeypatch, raw, problem):
    from keras_lora.processes import _tf_config_task

    monkeypatch.setenv("TF_CONFIG", raw)
    with pytest.raises(ValueError, match=problem) as info:
        _tf_config_task()
    assert f"TF_CONFIG={raw!r}" in str(info.value)
