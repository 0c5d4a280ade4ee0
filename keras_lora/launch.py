"""Starts a multi-process run on this machine: `python -m keras_lora.launch`.

    python -m keras_lora.launch --num-processes 2 train.py [ARGS...]

runs `train.py ARGS...` once per process, with the environment each backend
reads to join the others over 127.0.0.1:

- JAX: `KERAS_DISTRIBUTION_JOB_ADDRESSES`, `KERAS_DISTRIBUTION_NUM_PROCESSES`
  and `KERAS_DISTRIBUTION_PROCESS_ID` (read by
  `keras.distribution.initialize()`), and with `--devices-per-process N` on
  the CPU, `XLA_FLAGS=--xla_force_host_platform_device_count=N`;
- TensorFlow: `TF_CONFIG` with one worker per process
  (`tf.distribute.MultiWorkerMirroredStrategy`);
- PyTorch: `MASTER_ADDR`, `MASTER_PORT`, `RANK`, `LOCAL_RANK` and
  `WORLD_SIZE`, as `torchrun` sets them.

Each output line is prefixed with its process index. When a process exits
with an error, the others are stopped and the launcher exits with that
process's code, naming it; after `--timeout` seconds every process is
stopped and the launcher exits with code 124. Nothing is left running:
each process runs in its own process group, which is stopped as a whole
(programs it started included), also when the launcher itself gets SIGTERM
or SIGHUP.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

TIMED_OUT = 124


def _free_ports(count):
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def process_environments(num_processes, port=None, devices_per_process=None):
    """The environment variables of each local process of a run.

    Args:
        num_processes: int >= 1, the number of processes.
        port: optional int, the coordinator's port (JAX, PyTorch); the
            TensorFlow workers use the ports after it. Defaults to free
            ports chosen now.
        devices_per_process: optional int >= 1, CPU devices per JAX process
            (`--xla_force_host_platform_device_count`).

    Returns:
        A list of `num_processes` dicts of environment variables.

    Raises:
        ValueError: an argument is out of range.
    """
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(
            "`num_processes` must be an integer >= 1. Received: "
            f"num_processes={num_processes!r}"
        )
    if devices_per_process is not None and (
        not isinstance(devices_per_process, int) or devices_per_process < 1
    ):
        raise ValueError(
            "`devices_per_process` must be an integer >= 1. Received: "
            f"devices_per_process={devices_per_process!r}"
        )
    if port is None:
        ports = _free_ports(num_processes + 1)
    else:
        if not isinstance(port, int) or not 0 < port < 65536 - num_processes:
            raise ValueError(
                f"`port` must be an integer in [1, {65535 - num_processes}]. "
                f"Received: port={port!r}"
            )
        ports = [port + i for i in range(num_processes + 1)]
    coordinator = f"127.0.0.1:{ports[0]}"
    workers = [f"127.0.0.1:{p}" for p in ports[1:]]
    environments = []
    for index in range(num_processes):
        env = {
            "KERAS_DISTRIBUTION_JOB_ADDRESSES": coordinator,
            "KERAS_DISTRIBUTION_NUM_PROCESSES": str(num_processes),
            "KERAS_DISTRIBUTION_PROCESS_ID": str(index),
            "TF_CONFIG": json.dumps(
                {
                    "cluster": {"worker": workers},
                    "task": {"type": "worker", "index": index},
                }
            ),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(ports[0]),
            "RANK": str(index),
            "LOCAL_RANK": str(index),
            "WORLD_SIZE": str(num_processes),
        }
        if devices_per_process is not None:
            flags = os.environ.get("XLA_FLAGS", "")
            env["XLA_FLAGS"] = (
                f"{flags} --xla_force_host_platform_device_count="
                f"{devices_per_process}"
            ).strip()
        environments.append(env)
    return environments


def _relay(stream, index, out, lock):
    for line in iter(stream.readline, ""):
        if not line.endswith("\n"):
            line += "\n"
        with lock:
            out.write(f"[{index}] {line}")
            out.flush()
    stream.close()


def _signal_group(proc, signum):
    """Sends `signum` to the process group of `proc` (each process is
    started in its own session), so the programs it started get it too."""
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(procs, grace=10.0):
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        if proc.poll() is None:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # Whatever of the group is left (the process or what it started).
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


def _signal_name(signum):
    try:
        return signal.Signals(signum).name
    except ValueError:  # e.g. a real-time signal
        return f"signal {signum}"


def _stop_on_signal(signum, frame):
    """SIGTERM / SIGHUP to the launcher: leave through `launch`'s cleanup
    (every process stopped), exiting 128 + the signal number."""
    raise SystemExit(128 + signum)


def launch(
    command,
    num_processes,
    port=None,
    devices_per_process=None,
    timeout=None,
    stdout=None,
    stderr=None,
):
    """Runs `command` once per process and waits for all of them.

    Args:
        command: list of str, the program and its arguments (a Python
            script path is run with this interpreter).
        num_processes: int >= 1.
        port: optional int, see `process_environments`.
        devices_per_process: optional int, see `process_environments`.
        timeout: optional float, seconds before every process is stopped.
        stdout: text stream for the processes' prefixed stdout lines;
            defaults to `sys.stdout`.
        stderr: the same for stderr and the launcher's own messages;
            defaults to `sys.stderr`.

    Returns:
        int: 0 when every process exited with 0; else the exit code of the
        first process that failed (128 + the signal number for a process
        killed by a signal, as a shell reports it), or 124 after `timeout`.

    Raises:
        ValueError: `command` is empty, or an argument is out of range.
    """
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise ValueError("`command` must name a program. Received: []")
    if timeout is not None and not timeout > 0:
        raise ValueError(
            "`timeout` must be a positive number. Received: "
            f"timeout={timeout!r}"
        )
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    if command[0].endswith(".py"):
        command = [sys.executable, *command]
    elif shutil.which(command[0]) is None:
        raise ValueError(
            "`command` must start with a program on the PATH or a `.py` "
            f"script. Received: command={command!r}"
        )
    environments = process_environments(
        num_processes, port=port, devices_per_process=devices_per_process
    )
    lock = threading.Lock()
    procs, relays = [], []
    try:
        for index, extra in enumerate(environments):
            proc = subprocess.Popen(
                command,
                env={**os.environ, **extra},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
                start_new_session=True,
            )
            procs.append(proc)
            for stream, out in ((proc.stdout, stdout), (proc.stderr, stderr)):
                relay = threading.Thread(
                    target=_relay, args=(stream, index, out, lock), daemon=True
                )
                relay.start()
                relays.append(relay)
        start = time.monotonic()
        while True:
            codes = [proc.poll() for proc in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                index, code = failed[0]
                if code < 0:
                    # Killed by a signal (e.g. JAX aborts a process whose
                    # peers never joined): the shell's 128 + signal number.
                    how = f"was killed by {_signal_name(-code)}"
                    code = 128 - code
                else:
                    how = f"exited with code {code}"
                with lock:
                    stderr.write(
                        f"keras_lora.launch: process {index} {how}; stopping "
                        "the other processes.\n"
                    )
                return code
            if all(c == 0 for c in codes):
                return 0
            if timeout is not None and time.monotonic() - start > timeout:
                running = [i for i, c in enumerate(codes) if c is None]
                with lock:
                    stderr.write(
                        f"keras_lora.launch: timed out after {timeout:g} s; "
                        f"stopping processes {running}, which were still "
                        "running (one may never have joined the run).\n"
                    )
                return TIMED_OUT
            time.sleep(0.2)
    finally:
        _stop(procs)
        for relay in relays:
            relay.join(timeout=5)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m keras_lora.launch",
        description="Run a script once per process on this machine, joined "
        "over 127.0.0.1 (JAX keras.distribution, TF MultiWorkerMirrored, "
        "torch.distributed).",
    )
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--devices-per-process", type=int, default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop_on_signal)
    try:
        return launch(
            args.command,
            args.num_processes,
            port=args.port,
            devices_per_process=args.devices_per_process,
            timeout=args.timeout,
        )
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
