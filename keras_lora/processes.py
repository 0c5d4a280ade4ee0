"""Which process this is in a multi-process run, and host copies of arrays.

A multi-process (multi-host) run is one program started once per process:

- JAX: joined by `keras.distribution.initialize` (`jax.process_count()`
  processes, each owning its local devices; a variable sharded by
  `ModelParallel` may span devices of several processes);
- TensorFlow: `tf.distribute.MultiWorkerMirroredStrategy`, configured by the
  `TF_CONFIG` environment variable (every worker holds a full copy of each
  mirrored variable);
- PyTorch: a `torch.distributed` process group (DDP).

`process_index()` is 0 on the process that writes files (JAX's process 0,
TensorFlow's chief: the `chief` task, else worker 0; torch's rank 0).
`host_array(x)` returns a NumPy copy of a tensor or variable; on JAX a value
that spans other processes' devices is gathered first, which is a
collective: every process must call it, in the same order.
"""

import json
import os

import keras
import numpy as np


def _tf_config_error(raw, problem):
    return ValueError(
        f"The TF_CONFIG environment variable {problem}; it must be JSON of "
        "the form {'cluster': {'worker': [addresses], ...}, 'task': "
        "{'type': 'worker', 'index': i}} with i in range. Received: "
        f"TF_CONFIG={raw!r}"
    )


def _tf_config_task():
    """`(index, count)` from `TF_CONFIG`'s chief and worker tasks, or None
    when it names no chief or worker task (unset, `ps`, `evaluator`)."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        raise _tf_config_error(raw, "is not valid JSON") from None
    if not isinstance(config, dict):
        raise _tf_config_error(raw, "is not a JSON object")
    cluster, task = config.get("cluster", {}), config.get("task", {})
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise _tf_config_error(
            raw, "has a `cluster` or `task` that is not an object"
        )
    kind = task.get("type")
    if kind not in ("chief", "worker"):
        return None
    jobs = {}
    for job in ("chief", "worker"):
        addresses = cluster.get(job, [])
        if not isinstance(addresses, list):
            raise _tf_config_error(raw, f"lists `{job}` tasks as a non-list")
        jobs[job] = len(addresses)
    index = task.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int):
        raise _tf_config_error(raw, "has a task index that is not an integer")
    if not 0 <= index < jobs[kind]:
        raise _tf_config_error(
            raw, f"names {kind} {index}, which its cluster does not list"
        )
    count = jobs["chief"] + jobs["worker"]
    return (index if kind == "chief" else jobs["chief"] + index), count


def _torch_group():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist
    return None


def _index_and_count():
    """`(process_index, process_count)` of this run on the current backend."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.process_index(), jax.process_count()
    if backend == "tensorflow":
        task = _tf_config_task()
        return (0, 1) if task is None else task
    if backend == "torch":
        group = _torch_group()
        if group is not None:
            return group.get_rank(), group.get_world_size()
    return 0, 1


def process_count() -> int:
    """The number of processes of this run (1 when it is not multi-process).

    Returns:
        int: `jax.process_count()` on JAX, the number of chief and worker
        tasks in `TF_CONFIG` on TensorFlow, the world size of an initialized
        `torch.distributed` process group on PyTorch, else 1.

    Examples:
        >>> from keras_lora.processes import process_count
        >>> process_count()
        1
    """
    return _index_and_count()[1]


def process_index() -> int:
    """This process's index in the run, 0 for the one that writes files.

    Returns:
        int in `[0, process_count())`: `jax.process_index()` on JAX, the
        chief's (or, without a chief task, worker 0's) 0 on TensorFlow, the
        rank on PyTorch; 0 in a single-process run.

    Examples:
        >>> from keras_lora.processes import process_index
        >>> process_index()
        0
    """
    return _index_and_count()[0]


def is_main_process() -> bool:
    """Whether this process writes the run's files (`process_index() == 0`)."""
    return process_index() == 0


def spans_processes(x) -> bool:
    """Whether `x` (a tensor or variable) has shards on other processes'
    devices, so that this process cannot read it alone (JAX only)."""
    if keras.backend.backend() != "jax":
        return False
    value = getattr(x, "value", x)
    return not getattr(value, "is_fully_addressable", True) and not getattr(
        value, "is_fully_replicated", False
    )


def host_array(x, dtype=None) -> np.ndarray:
    """A NumPy copy of a tensor or variable, gathered from every process.

    Args:
        x: a backend tensor or a `keras.Variable`.
        dtype: optional NumPy dtype of the result.

    Returns:
        `np.ndarray` of `x`'s full (global) shape.

    On JAX, a value sharded over devices of several processes is gathered
    with `jax.experimental.multihost_utils.process_allgather`, a collective
    that every process must enter in the same order; any other value is
    copied locally.
    """
    if spans_processes(x):
        from jax.experimental import multihost_utils

        value = multihost_utils.process_allgather(
            getattr(x, "value", x), tiled=True
        )
        return np.asarray(value, dtype=dtype)
    return np.asarray(keras.ops.convert_to_numpy(x), dtype=dtype)


def wait_for_writer(tag):
    """Holds every process of a multi-process JAX or PyTorch run here until
    all have arrived (process 0 after writing a file); else a no-op.

    Args:
        tag: str naming the barrier (the same on every process; JAX).
    """
    if process_count() == 1:
        return
    if keras.backend.backend() == "jax":
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(tag)
    elif keras.backend.backend() == "torch":
        _torch_group().barrier()


def gathered_values(variables):
    """Host copies of those of `variables` that span processes.

    A collective: every process must call it with the same variables in
    the same order.

    Args:
        variables: an iterable of `keras.Variable`.

    Returns:
        A list of `(variable, np.ndarray)` pairs, one per variable sharded
        over several processes' devices (JAX only; else empty).
    """
    return [(v, host_array(v)) for v in variables if spans_processes(v)]
