"""Multi-process LoRA with real processes on this machine.

JAX: two processes of 4 CPU devices each, talking over 127.0.0.1 (JAX's CPU
collectives), joined with `keras.distribution.initialize`; the same program
in one process with 8 CPU devices is the reference. TensorFlow: two
MultiWorkerMirroredStrategy workers against one. Also: adapter and `.keras`
checkpoints, a process that dies or never joins. Each run is a subprocess
with a timeout; keras_lora.launch stops what is left of a failed run.
"""

import json
import os
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from numerics import assert_close
from safetensors.numpy import load_file

import keras_lora  # noqa: F401 - loads the .keras files

# Bounded in time: scripts/test.sh runs these alone, after the rest.
pytestmark = pytest.mark.processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TF_WORKER = os.path.join(ROOT, "tests", "multiprocess_tf_worker.py")
RESTART = os.path.join(ROOT, "tests", "multiprocess_jax_restart.py")
JOIN = os.path.join(ROOT, "tests", "multiprocess_jax_join.py")

WORKER = r"""
import json, os, sys
pid, nproc = int(sys.argv[1]), int(sys.argv[2])
port, out = sys.argv[3], sys.argv[4]
import keras
if nproc > 1:
    keras.distribution.initialize(
        job_addresses=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
import jax, keras_hub, numpy as np, tensorflow as tf
import keras_lora
from keras_lora.processes import host_array, process_count, process_index
D = keras.distribution
assert process_count() == nproc and process_index() == pid
ids = np.random.default_rng(0).integers(1, 64, size=(16, 9)).astype("int32")
x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((16, 8), "int32")}
y = ids[:, 1:]

def run(dist, tag):
    with dist.scope():
        keras.utils.set_random_seed(0)
        backbone = keras_hub.models.GemmaBackbone(
            vocabulary_size=64, num_layers=1, num_query_heads=4,
            num_key_value_heads=4, hidden_dim=16, intermediate_dim=32,
            head_dim=8)
        model = keras_hub.models.GemmaCausalLM(backbone=backbone,
                                               preprocessor=None)
        model = keras_lora.apply_lora(model, rank=4, targets=["query", "value"])
        model.compile(optimizer=keras.optimizers.Adam(1e-2),
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True))
        # Each process feeds its own share of every global batch of 16.
        lo, hi = pid * 16 // nproc, (pid + 1) * 16 // nproc
        ds = tf.data.Dataset.from_tensor_slices(
            ({k: v[lo:hi] for k, v in x.items()}, y[lo:hi])).batch(hi - lo)
        history = model.fit(ds, epochs=3, verbose=0)
        # Merge on the mesh: the merged kernels keep their layouts.
        merged = keras_lora.merge(model)
        np.savez(os.path.join(os.path.dirname(out), f"{tag}-{nproc}-{pid}"),
                 logits=host_array(model(x)), merged=host_array(merged(x)))
        report[tag + "_merged_layout"] = str(merged.backbone.get_layer(
            "decoder_block_0").attention.query_dense.kernel.value.sharding.spec)
        path = os.path.join(out, f"{tag}-{nproc}.safetensors")
        keras_lora.save_adapters(model, path)
        # Every process returns once process 0 has written the file.
        assert os.path.exists(path)
        if nproc > 1:
            try:
                keras_lora.export_saved_model(model, os.path.join(out, "x"))
            except ValueError as e:
                report[tag + "_export"] = str(e)
    return history.history["loss"]

devices = D.list_devices()
report = {"devices": len(devices), "local": len(jax.local_devices())}
report["dp"] = run(D.DataParallel(devices=devices, auto_shard_dataset=False),
                   "dp")
mesh = D.DeviceMesh((2, 4), ("batch", "model"), devices=devices)
layout_map = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
mp = D.ModelParallel(layout_map=layout_map, batch_dim_name="batch",
                     auto_shard_dataset=False)
report["mp"] = run(mp, "mp")
print("RESULT " + json.dumps(report))
"""

needs_jax = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="multi-process keras.distribution runs on the JAX backend",
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(backend, devices=None):
    """The environment of a test process: `backend`, this checkout on the
    path, and `devices` CPU devices for JAX (else XLA's default)."""
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    env.pop("XLA_FLAGS", None)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _launcher(timeout, *args):
    """`python -m keras_lora.launch --num-processes 2 --timeout T ARGS`."""
    return [
        sys.executable,
        "-m",
        "keras_lora.launch",
        "--num-processes",
        "2",
        "--timeout",
        str(timeout),
        *args,
    ]


def _run(command, backend, timeout=300):
    return subprocess.run(
        command,
        env=_env(backend),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _start(pid, nproc, devices, port, out):
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(pid), str(nproc), str(port), out],
        env=_env("jax", devices),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _results(procs, timeout=300):
    reports = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, stderr[-4000:]
            line = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
            reports.append(json.loads(line[-1][len("RESULT ") :]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return reports


@needs_jax
@pytest.mark.slow
def test_two_processes_match_one_process_with_8_devices(tmp_path):
    """DataParallel over 2 x 4 devices and a 2x4 ModelParallel mesh that
    spans both processes train to the one-process 8-device losses and
    adapters (absolute 1e-5: 84 float32 ulps at scale 1); the adapter
    file is written once, by process 0, with the adapters sharded across
    processes gathered; merge works on the mesh (same logits, kernels keep
    their layout)."""
    single = str(tmp_path / "single")
    multi = str(tmp_path / "multi")
    os.makedirs(single)
    os.makedirs(multi)
    port = _free_port()
    procs = [_start(i, 2, 4, port, multi) for i in range(2)]
    procs.append(_start(0, 1, 8, 0, single))
    two_0, two_1, one = _results(procs)
    assert (two_0["devices"], two_0["local"]) == (8, 4)
    assert (one["devices"], one["local"]) == (8, 8)
    for kind in ("dp", "mp"):
        assert two_0[kind] == two_1[kind]
        assert_close(
            np.array(two_0[kind]), np.array(one[kind]), ulps=84, scale=1.0
        )
        assert one[kind][-1] < one[kind][0]
        multi_file = load_file(os.path.join(multi, f"{kind}-2.safetensors"))
        single_file = load_file(os.path.join(single, f"{kind}-1.safetensors"))
        assert sorted(multi_file) == sorted(single_file)
        for key, value in single_file.items():
            assert np.abs(value).max() > 0
            assert_close(multi_file[key], value, ulps=84, scale=1.0)
        for pid in (0, 1):
            run = np.load(str(tmp_path / f"{kind}-2-{pid}.npz"))
            assert_close(
                run["merged"],
                run["logits"],
                ulps=64,
                scale=float(np.abs(run["logits"]).max()),
            )
        # Export is refused, naming what to do, with nothing written.
        assert "runs in one process" in two_1[kind + "_export"]
        assert "load_adapters" in two_0[kind + "_export"]
    assert two_0["mp_merged_layout"] == "P('model', 'batch', None)"
    assert two_0["dp_merged_layout"] == "P(None, None, None)"
    # Written once: only the two files of process 0.
    assert sorted(os.listdir(multi)) == ["dp-2.safetensors", "mp-2.safetensors"]


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="MultiWorkerMirroredStrategy runs on the TensorFlow backend",
)
@pytest.mark.slow
def test_tf_two_workers_match_one_worker(tmp_path):
    """Two MultiWorkerMirroredStrategy workers started by keras_lora.launch
    (TF_CONFIG on 127.0.0.1), half of every batch each, a strategy.run
    loop: the same losses and adapters as one worker (1e-5); one adapter
    file and one `.keras` file, which loads in one process."""
    multi, single = tmp_path / "multi", tmp_path / "single"
    multi.mkdir()
    single.mkdir()
    runs = [
        _launcher(240, TF_WORKER, str(multi)),
        [sys.executable, TF_WORKER, str(single)],
    ]
    outputs = []
    for command in runs:
        proc = _run(command, "tensorflow")
        assert proc.returncode == 0, proc.stderr[-4000:]
        outputs.append(
            [
                json.loads(line.split("RESULT ", 1)[1])
                for line in proc.stdout.splitlines()
                if "RESULT " in line
            ]
        )
    two, (one,) = outputs
    assert sorted(r["i"] for r in two) == [0, 1]
    for report in two:
        assert report["n"] == 2
        assert_close(
            np.array(report["losses"]),
            np.array(one["losses"]),
            ulps=84,
            scale=1.0,
        )
    assert sorted(os.listdir(multi)) == ["tf-2.keras", "tf-2.safetensors"]
    multi_file = load_file(str(multi / "tf-2.safetensors"))
    single_file = load_file(str(single / "tf-1.safetensors"))
    assert sorted(multi_file) == sorted(single_file)
    for key, value in single_file.items():
        assert_close(multi_file[key], value, ulps=84, scale=1.0)
    # The `.keras` file worker 0 wrote loads here, with the same weights.
    loaded = keras.saving.load_model(str(multi / "tf-2.keras"))
    expected = keras.saving.load_model(str(single / "tf-1.keras"))
    assert [w.path for w in loaded.weights] == [
        w.path for w in expected.weights
    ]
    for got, want in zip(loaded.weights, expected.weights, strict=True):
        assert_close(
            keras.ops.convert_to_numpy(got),
            keras.ops.convert_to_numpy(want),
            ulps=84,
            scale=1.0,
        )


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="MultiWorkerMirroredStrategy runs on the TensorFlow backend",
)
@pytest.mark.slow
def test_tf_dead_worker_stops_the_run(tmp_path):
    """Worker 1 dies at step 3: the launcher stops worker 0 (waiting in the
    next all-reduce) and exits with code 3, naming worker 1; no adapter
    file is written."""
    start = time.monotonic()
    proc = _run(_launcher(240, TF_WORKER, str(tmp_path), "crash"), "tensorflow")
    assert proc.returncode == 3, proc.stderr[-4000:]
    assert "process 1 exited with code 3" in proc.stderr
    assert time.monotonic() - start < 120
    assert os.listdir(tmp_path) == []


def _launch(args, out, processes=2):
    """Runs the restart worker: on 2 processes x 4 CPU devices through
    keras_lora.launch, or (`processes=1`) as one process on one device."""
    command = [sys.executable, RESTART, *args[:2], out, *args[2:]]
    if processes > 1:
        command = _launcher(180, "--devices-per-process", "4", *command[1:])
    return _run(command, "jax", timeout=240)


@needs_jax
@pytest.mark.slow
def test_jax_dead_worker_stops_the_run_and_a_restart_matches(tmp_path):
    """Process 1 dies when epoch 3 begins: the launcher stops process 0
    (blocked in a collective) and exits with code 3, naming process 1; a
    restart from the epoch-2 adapter checkpoint ends with the adapters of
    an uninterrupted run (SGD: no optimizer state to lose)."""
    full, crash = tmp_path / "full", tmp_path / "crash"
    full.mkdir()
    crash.mkdir()
    proc = _launch(["full", "dp"], str(full))
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = _launch(["crash", "dp"], str(crash))
    assert proc.returncode == 3, proc.stderr[-4000:]
    assert "process 1 exited with code 3" in proc.stderr
    assert sorted(os.listdir(crash)) == [
        "ckpt-1.safetensors",
        "ckpt-2.safetensors",
    ]
    proc = _launch(["resume", "dp"], str(crash))
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = load_file(str(full / "ckpt-4.safetensors"))
    resumed = load_file(str(crash / "ckpt-4.safetensors"))
    assert sorted(resumed) == sorted(expected)
    start = load_file(str(full / "ckpt-2.safetensors"))
    for key, value in expected.items():
        assert np.abs(value - start[key]).max() > 0
        assert_close(resumed[key], value, ulps=84, scale=1.0)


@needs_jax
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gemma", "sequential", "functional"])
def test_jax_keras_checkpoint_from_a_mesh_resumes_in_one_process(
    tmp_path, kind
):
    """Keras's ModelCheckpoint on a 2x4 ModelParallel mesh that spans both
    processes writes one `.keras` file per epoch (process 0, the sharded
    variables gathered); one process on one device loads the epoch-2 file
    and trains epochs 3-4 to the adapters of the uninterrupted 2-process
    run (1e-5, SGD). Keras's own `save` of a Sequential or functional model
    fails there (it cannot read a kernel sharded across processes) and
    every process writes the file: an adapted one saves like the keras-hub
    model."""
    proc = _launch(["full", "mp", kind], str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(
        [f"ckpt-{i}.safetensors" for i in range(1, 5)]
        + [f"model-{i}.keras" for i in range(1, 5)]
    )
    proc = _launch(["resume-keras", "mp", kind], str(tmp_path), processes=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = load_file(str(tmp_path / "ckpt-4.safetensors"))
    resumed = load_file(str(tmp_path / "resumed-ckpt-4.safetensors"))
    start = load_file(str(tmp_path / "ckpt-2.safetensors"))
    assert sorted(resumed) == sorted(expected)
    for key, value in expected.items():
        assert np.abs(value - start[key]).max() > 0
        assert_close(resumed[key], value, ulps=84, scale=1.0)


@needs_jax
@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, limit, code, message",
    [
        # JAX's own bound: initialize() fails after initialization_timeout.
        ("jax", 100, 128 + 6, "DEADLINE_EXCEEDED"),
        # keras.distribution.initialize() waits JAX's default 300 s; the
        # launcher's --timeout stops the run first.
        ("keras", 15, 124, "timed out after 15 s"),
    ],
)
def test_jax_process_that_never_joins_fails_in_bounded_time(
    mode, limit, code, message
):
    """Process 1 never joins: the run ends, every process stopped, within
    the bound (not the 120 s process 1 sleeps), with the reason named."""
    start = time.monotonic()
    proc = _run(_launcher(limit, JOIN, mode), "jax", timeout=200)
    elapsed = time.monotonic() - start
    assert proc.returncode == code, proc.stderr[-4000:]
    assert message in proc.stderr
    assert "RESULT joined" not in proc.stdout
    assert elapsed < 60
