"""The one place where keras_lora touches Keras's private API.

Each name here is a Keras internal with no public equivalent in Keras 3.15;
if a Keras release moves one, only this module changes.
"""

# Attaches a mask to an eager tensor or KerasTensor, as Keras's own
# ReversibleEmbedding does in `call` (its `compute_mask` returns None).
from keras.src.backend import set_keras_mask  # noqa: F401
