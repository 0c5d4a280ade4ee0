"""Keras callbacks for LoRA training: adapter checkpoints."""

import os

import keras

from keras_lora.adapters import save_adapters


class AdapterCheckpoint(keras.callbacks.Callback):
    """Writes the model's adapters to a safetensors file after every epoch.

    The file is what `keras_lora.save_adapters` writes (adapters only, a few
    MB for a large model), so a run can restart from the last one:
    rebuild the model, `keras_lora.load_adapters(model, path)`, then
    `model.fit(..., initial_epoch=<epochs done>)`. The optimizer's state is
    not in the file: a restart is exact for optimizers without state (SGD
    without momentum); with Adam the moments start again from zero (save
    `model.save` checkpoints too where that matters).

    In a multi-process run every process must have this callback (the
    adapters are gathered across processes); process 0 writes the file.

    Args:
        filepath: str or path-like, the file to write; may contain
            `{epoch}` (1-based, as in `keras.callbacks.ModelCheckpoint`),
            e.g. `"ckpt/adapters-{epoch:02d}.safetensors"`. Its folder must
            exist.

    Raises:
        ValueError: `filepath` is empty or names a directory.

    Examples:
        >>> from keras_lora import AdapterCheckpoint
        >>> AdapterCheckpoint("ckpt-{epoch:02d}.safetensors").filepath
        'ckpt-{epoch:02d}.safetensors'
        >>> # model.fit(x, y, epochs=4, callbacks=[AdapterCheckpoint(...)])
    """

    def __init__(self, filepath):
        super().__init__()
        filepath = os.fspath(filepath)
        if not filepath or os.path.isdir(filepath):
            raise ValueError(
                "`filepath` must name a file (it may contain '{epoch}'). "
                f"Received: filepath={filepath!r}"
            )
        self.filepath = filepath
        self.last_path = None

    def on_epoch_end(self, epoch, logs=None):
        path = self.filepath.format(epoch=epoch + 1)
        save_adapters(self.model, path)
        self.last_path = path
