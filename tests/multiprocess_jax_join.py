"""A JAX worker of tests/test_multiprocess.py whose process 1 never joins.

argv: MODE. Process 1 sleeps without joining. Process 0 joins with
`jax.distributed.initialize(..., initialization_timeout=10)` (MODE "jax")
or with `keras.distribution.initialize()` (MODE "keras": JAX's default of
300 s), from the environment keras_lora.launch sets.
"""

import os
import sys
import time

mode = sys.argv[1]
if os.environ["KERAS_DISTRIBUTION_PROCESS_ID"] == "1":
    time.sleep(120)
    sys.exit(0)
if mode == "jax":
    import jax

    jax.distributed.initialize(
        coordinator_address=os.environ["KERAS_DISTRIBUTION_JOB_ADDRESSES"],
        num_processes=int(os.environ["KERAS_DISTRIBUTION_NUM_PROCESSES"]),
        process_id=0,
        initialization_timeout=10,
    )
else:
    import keras

    keras.distribution.initialize()
print("RESULT joined")
