"""keras_lora: LoRA (low-rank adaptation) for Keras 3 on TensorFlow, JAX and PyTorch."""

from keras_lora.layers import LoRAConv2D
from keras_lora.layers import LoRADense
from keras_lora.layers import LoRAEinsumDense
from keras_lora.layers import LoRAEmbedding
from keras_lora.layers import LoRALayer
from keras_lora.layers import LoRAReversibleEmbedding

__version__ = "0.1.0"

__all__ = [
    "LoRAConv2D",
    "LoRADense",
    "LoRAEinsumDense",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRAReversibleEmbedding",
    "__version__",
]
