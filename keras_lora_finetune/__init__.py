"""`keras-lora-finetune`: the main job, an application of keras_lora.

`keras-lora-finetune` (`keras_lora_finetune.cli.main`) fine-tunes the real
all-MiniLM-L6-v2 on the VADER sentiment lexicon by default, or a model and
data set of your own, then merges, exports and checks a TF SavedModel;
`keras-lora-finetune predict` runs a saved adapter on new text.

It lives outside the `keras_lora` package so that its options are parsed
and checked before Keras and a backend are imported: `--help` and a bad
option answer at once. Modules: `cli` (options, entry point), `job` (the
fine-tune), `predict`, `report` (progress, plot, summary), `data`.
"""
