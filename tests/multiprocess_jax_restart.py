"""A JAX worker of tests/test_multiprocess.py: LoRA with adapter checkpoints
per epoch over 2 processes (keras_lora.launch sets the environment).

argv: MODE OUT, MODE one of "full" (4 epochs), "crash" (process 1 exits
with code 3 when epoch 3 begins), "resume" (load OUT/ckpt-2, epochs 3-4).
"""

import os
import sys

import keras

keras.distribution.initialize()

import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_lora  # noqa: E402
from keras_lora.processes import process_count  # noqa: E402
from keras_lora.processes import process_index  # noqa: E402

mode, out = sys.argv[1], sys.argv[2]
pid, nproc = process_index(), process_count()
ids = np.random.default_rng(0).integers(1, 64, size=(16, 9)).astype("int32")
x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((16, 8), "int32")}
y = ids[:, 1:]


class Crash(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if mode == "crash" and epoch == 2 and pid == 1:
            os._exit(3)  # dies: no clean shutdown of the JAX client


devices = keras.distribution.list_devices()
with keras.distribution.DataParallel(
    devices=devices, auto_shard_dataset=False
).scope():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=64,
        num_layers=1,
        num_query_heads=4,
        num_key_value_heads=4,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
    )
    model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    model = keras_lora.apply_lora(model, rank=4, targets=["query", "value"])
    initial_epoch = 0
    if mode == "resume":
        keras_lora.load_adapters(model, os.path.join(out, "ckpt-2.safetensors"))
        initial_epoch = 2
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    lo, hi = pid * 16 // nproc, (pid + 1) * 16 // nproc
    data = tf.data.Dataset.from_tensor_slices(
        ({k: v[lo:hi] for k, v in x.items()}, y[lo:hi])
    ).batch((hi - lo) // 2)
    checkpoint = keras_lora.AdapterCheckpoint(
        os.path.join(out, "ckpt-{epoch}.safetensors")
    )
    model.fit(
        data,
        epochs=4,
        initial_epoch=initial_epoch,
        callbacks=[Crash(), checkpoint],
        verbose=0,
    )
print("RESULT done", pid)
