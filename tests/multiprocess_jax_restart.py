"""A JAX worker of tests/test_multiprocess.py: LoRA with adapter checkpoints
(and Keras's ModelCheckpoint `.keras` files) after every epoch, over the
processes keras_lora.launch starts, or in one process.

argv: MODE MESH OUT [MODEL]. MODE is "full" (4 epochs), "crash" (process 1 exits
with code 3 when epoch 3 begins), "resume" (load OUT/ckpt-2.safetensors,
epochs 3-4) or "resume-keras" (one process: load OUT/model-2.keras, epochs
3-4). MESH is "dp" (DataParallel over every device) or "mp" (a 2x4
ModelParallel mesh with keras-hub's Gemma layout map, spanning processes).
MODEL is "gemma" (a tiny keras-hub GemmaCausalLM, the default),
"sequential" or "functional" (two Dense layers; on the "mp" mesh the first
kernel is sharded over both mesh axes, so across processes). Every global
step sees the same 8 examples in every mode.
"""

import os
import sys

import keras

if "KERAS_DISTRIBUTION_JOB_ADDRESSES" in os.environ:
    keras.distribution.initialize()

import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_lora  # noqa: E402
from keras_lora.processes import process_count  # noqa: E402
from keras_lora.processes import process_index  # noqa: E402
from keras_lora.processes import spans_processes  # noqa: E402

mode, mesh, out = sys.argv[1:4]
kind = sys.argv[4] if len(sys.argv) > 4 else "gemma"
pid, nproc = process_index(), process_count()
if kind == "gemma":
    ids = np.random.default_rng(0).integers(1, 64, size=(16, 9)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((16, 8), "int32")}
    y = ids[:, 1:]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
else:
    x = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
    y = np.tanh(x[:, :4] - x[:, 4:])
    loss = "mse"


class Crash(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if mode == "crash" and epoch == 2 and pid == 1:
            os._exit(3)  # dies: no clean shutdown of the JAX client


def distribution():
    devices = keras.distribution.list_devices()
    if mesh == "dp" or nproc == 1:
        return keras.distribution.DataParallel(
            devices=devices, auto_shard_dataset=False
        )
    device_mesh = keras.distribution.DeviceMesh(
        (2, 4), ("batch", "model"), devices=devices
    )
    if kind == "gemma":
        layout_map = keras_hub.models.GemmaBackbone.get_layout_map(device_mesh)
    else:
        layout_map = keras.distribution.LayoutMap(device_mesh)
        layout_map[".*hidden/kernel"] = ("batch", "model")
        layout_map[".*out/kernel"] = ("model", None)
    return keras.distribution.ModelParallel(
        layout_map=layout_map,
        batch_dim_name="batch",
        auto_shard_dataset=False,
    )


def build():
    keras.utils.set_random_seed(0)
    if kind == "sequential":
        model = keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(16, activation="tanh", name="hidden"),
                keras.layers.Dense(4, name="out"),
            ]
        )
        return keras_lora.apply_lora(model, rank=4)
    if kind == "functional":
        inputs = keras.Input((8,))
        hidden = keras.layers.Dense(16, activation="tanh", name="hidden")
        outputs = keras.layers.Dense(4, name="out")(hidden(inputs))
        return keras_lora.apply_lora(keras.Model(inputs, outputs), rank=4)
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
    return keras_lora.apply_lora(model, rank=4, targets=["query", "value"])


# Process p feeds rows [8p, 8p + 8) in batches of 4, so global step k
# holds rows 4k..4k+3 of both halves; one process feeds the same rows.
if nproc == 1:
    rows = np.array([0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15])
else:
    rows = np.arange(pid * 16 // nproc, (pid + 1) * 16 // nproc)
features = {k: v[rows] for k, v in x.items()} if kind == "gemma" else x[rows]
data = tf.data.Dataset.from_tensor_slices((features, y[rows])).batch(
    len(rows) // 2
)

with distribution().scope():
    initial_epoch = 0
    if mode == "resume-keras":
        # Keras's loading does not restore a keras-hub task's compile()
        # (its compile is custom): compile again (SGD has no state).
        model = keras.saving.load_model(os.path.join(out, "model-2.keras"))
        initial_epoch = 2
        # A loaded model saves from several processes again.
        assert type(model).__module__ == "keras_lora.saving", type(model)
    else:
        model = build()
    if mode == "resume":
        keras_lora.load_adapters(model, os.path.join(out, "ckpt-2.safetensors"))
        initial_epoch = 2
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=loss,
    )
    tag = "resumed-" if mode == "resume-keras" else ""
    callbacks = [
        Crash(),
        keras_lora.AdapterCheckpoint(
            os.path.join(out, tag + "ckpt-{epoch}.safetensors")
        ),
    ]
    if mesh == "mp" and nproc > 1 and kind != "gemma":
        # The mesh shards this kernel across the processes.
        kernel = model.get_layer("hidden").kernel
        assert spans_processes(kernel.value), kernel.value.sharding
    if mode == "full":
        # Keras's own callback: model.save on every process, once written.
        callbacks.append(
            keras.callbacks.ModelCheckpoint(
                os.path.join(out, "model-{epoch}.keras")
            )
        )
    model.fit(
        data,
        epochs=4,
        initial_epoch=initial_epoch,
        callbacks=callbacks,
        verbose=0,
    )
print("RESULT done", pid)
