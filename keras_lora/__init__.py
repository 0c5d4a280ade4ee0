"""keras_lora: LoRA (low-rank adaptation) for Keras 3 on every backend."""

from keras_lora.adapters import load_adapters
from keras_lora.adapters import save_adapters
from keras_lora.apply import apply_lora
from keras_lora.apply import select_targets
from keras_lora.callbacks import AdapterCheckpoint
from keras_lora.distribution import lora_layout_map
from keras_lora.distribution import variable_layouts
from keras_lora.export import export_saved_model
from keras_lora.layers import LoRAConv1D
from keras_lora.layers import LoRAConv1DTranspose
from keras_lora.layers import LoRAConv2D
from keras_lora.layers import LoRAConv2DTranspose
from keras_lora.layers import LoRAConv3D
from keras_lora.layers import LoRAConv3DTranspose
from keras_lora.layers import LoRADense
from keras_lora.layers import LoRADepthwiseConv1D
from keras_lora.layers import LoRADepthwiseConv2D
from keras_lora.layers import LoRAEinsumDense
from keras_lora.layers import LoRAEmbedding
from keras_lora.layers import LoRALayer
from keras_lora.layers import LoRAReversibleEmbedding
from keras_lora.layers import LoRASeparableConv1D
from keras_lora.layers import LoRASeparableConv2D
from keras_lora.layers.quantized import QuantizedMergeWarning
from keras_lora.merge import merge
from keras_lora.merge import merge_adapters
from keras_lora.merge import unload
from keras_lora.merge import unmerge_adapters
from keras_lora.summary import lora_report
from keras_lora.summary import lora_summary
from keras_lora.walk import iter_layers
from keras_lora.walk import lora_layers

__version__ = "0.1.0"

__all__ = [
    "AdapterCheckpoint",
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
    "QuantizedMergeWarning",
    "__version__",
    "apply_lora",
    "export_saved_model",
    "iter_layers",
    "load_adapters",
    "lora_layers",
    "lora_layout_map",
    "lora_report",
    "lora_summary",
    "merge",
    "merge_adapters",
    "save_adapters",
    "select_targets",
    "unload",
    "unmerge_adapters",
    "variable_layouts",
]
