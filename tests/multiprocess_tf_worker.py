"""One TensorFlow worker of tests/test_multiprocess.py (MultiWorkerMirrored
when started by keras_lora.launch with TF_CONFIG, else one worker).

argv: OUT [crash]; with "crash", worker 1 dies (exit code 3) at step 3.
Writes the adapters and the `.keras` model to OUT (worker 0 only).
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"
import keras
import numpy as np
import tensorflow as tf

import keras_lora
from keras_lora.processes import process_count
from keras_lora.processes import process_index

n = process_count()
i = process_index()
strategy = (
    tf.distribute.MultiWorkerMirroredStrategy()
    if n > 1
    else tf.distribute.MirroredStrategy(["/cpu:0"])
)
rng = np.random.default_rng(0)
x = rng.normal(size=(32, 8)).astype("float32")
y = x.sum(1, keepdims=True).astype("float32")
with strategy.scope():
    keras.utils.set_random_seed(0)
    base = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name="h"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model = keras_lora.apply_lora(base, rank=2, targets=["h", "out"])
    opt = keras.optimizers.Adam(1e-2)
    opt.build(model.trainable_variables)
GB = 8
lo, hi = i * GB // n, (i + 1) * GB // n


@tf.function
def step(xb, yb):
    def fn(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(xb, training=True) - yb)) / GB
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    per = strategy.run(fn, args=(xb, yb))
    return strategy.reduce("SUM", per, axis=None)


crash = sys.argv[2:] == ["crash"]
losses = []
for _epoch in range(2):
    for s in range(0, 32, GB):
        if crash and i == 1 and len(losses) == 2:
            os._exit(3)  # dies between collectives
        xb = x[s : s + GB][lo:hi]
        yb = y[s : s + GB][lo:hi]
        losses.append(float(step(tf.constant(xb), tf.constant(yb))))
out = sys.argv[1]
keras_lora.save_adapters(model, os.path.join(out, f"tf-{n}.safetensors"))
# Every worker saves; worker 0 writes the one file.
model.save(os.path.join(out, f"tf-{n}.keras"))
print("RESULT", json.dumps({"i": i, "n": n, "losses": losses}))
