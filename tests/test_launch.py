"""keras_lora.launch: local processes, their environment, failure and
timeout handling (plain Python child processes: no backend needed)."""

import io
import json
import sys
import time

import pytest

from keras_lora.launch import launch
from keras_lora.launch import process_environments


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
