"""The one place where keras_lora touches Keras's private API.

Each name here is a Keras internal with no public equivalent in Keras 3.15;
if a Keras release moves one, only this module changes.
"""

# Attaches a mask to an eager tensor or KerasTensor, as Keras's own
# ReversibleEmbedding does in `call` (its `compute_mask` returns None).
import contextlib
import inspect

from keras.src.backend import set_keras_mask  # noqa: F401

# The name-scope path Keras gives a variable created now (`Variable.path`).
from keras.src.backend.common.name_scope import current_path  # noqa: F401


@contextlib.contextmanager
def unlocked(layer):
    """Lets a built layer track new variables (as Keras's `enable_lora`)."""
    tracker = layer._tracker
    was_locked = tracker.locked
    tracker.unlock()
    try:
        yield
    finally:
        if was_locked:
            tracker.lock()


def refresh_call_signature(layer):
    """Recomputes what `Layer.__init__` caches about `call`'s signature.

    Needed after `layer.__class__` is changed to a keras_lora class whose
    `call` takes `training` where the base class's did not.
    """
    layer._call_signature = inspect.signature(layer.call)
    layer.call_signature_parameters = [
        p.name for p in layer._call_signature.parameters.values()
    ]
    layer._call_has_training_arg = "training" in layer.call_signature_parameters
    layer._call_has_mask_arg = "mask" in layer.call_signature_parameters
    layer._call_has_context_arg = {
        arg: (arg in layer.call_signature_parameters)
        for arg in layer._call_context_args
    }


def sublayers(layer):
    """The layers `layer` tracks directly (Keras's `_layers`), in order."""
    return list(getattr(layer, "_layers", []))


def refresh_torch_params(layer):
    """On torch, re-registers a layer's variables as module parameters."""
    if hasattr(layer, "_torch_params"):
        layer._track_variables()


def track_variable(layer, variable):
    """Registers an existing variable as one of `layer`'s own."""
    layer._track_variable(variable)
