"""The main job: a LoRA fine-tune, merge and SavedModel export, offline.

`keras-lora-finetune` (`keras_lora.finetune.cli.main`) fine-tunes the real
all-MiniLM-L6-v2 on the VADER sentiment lexicon by default, or a model and
data set of your own; `keras_lora.finetune.data` loads and splits the data.
An application of the library, not part of its API.
"""
