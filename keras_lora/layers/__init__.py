"""LoRA layers: Keras layers with a frozen weight and a low-rank adapter."""

from keras_lora.layers.base import LoRALayer
from keras_lora.layers.conv import LoRAConv1D
from keras_lora.layers.conv import LoRAConv1DTranspose
from keras_lora.layers.conv import LoRAConv2D
from keras_lora.layers.conv import LoRAConv2DTranspose
from keras_lora.layers.conv import LoRAConv3D
from keras_lora.layers.conv import LoRAConv3DTranspose
from keras_lora.layers.dense import LoRADense
from keras_lora.layers.depthwise import LoRADepthwiseConv1D
from keras_lora.layers.depthwise import LoRADepthwiseConv2D
from keras_lora.layers.depthwise import LoRASeparableConv1D
from keras_lora.layers.depthwise import LoRASeparableConv2D
from keras_lora.layers.einsum_dense import LoRAEinsumDense
from keras_lora.layers.embedding import LoRAEmbedding
from keras_lora.layers.embedding import LoRAReversibleEmbedding

__all__ = [
    "LoRAConv1D",
    "LoRAConv1DTranspose",
    "LoRAConv2DTranspose",
    "LoRAConv3DTranspose",
    "LoRAConv2D",
    "LoRAConv3D",
    "LoRADense",
    "LoRADepthwiseConv1D",
    "LoRADepthwiseConv2D",
    "LoRASeparableConv1D",
    "LoRASeparableConv2D",
    "LoRAEinsumDense",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRAReversibleEmbedding",
]
