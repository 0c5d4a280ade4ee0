"""`keras-lora-finetune predict`: a run's adapter on new text.

Rebuilds the run's model from its base (the preset recorded in the run's
`summary.json`), loads the trained head (`head.safetensors`) and the adapter
file with `keras_lora.load_adapters`, and prints one line per text: the
prediction (the score on the label scale, or the class and its
probability), a tab, the text.
"""

import json
import os
import sys

from keras_lora_finetune.cli import HEAD_FILE
from keras_lora_finetune.cli import SUMMARY_FILE
from keras_lora_finetune.cli import UsageError


def predict(args):
    """Prints predictions for `args.texts`; returns them as strings."""
    import keras_lora
    from keras_lora_finetune.job import build_model
    from keras_lora_finetune.job import default_preset
    from keras_lora_finetune.job import file_sha256
    from keras_lora_finetune.job import format_prediction
    from keras_lora_finetune.job import load_backbone
    from keras_lora_finetune.job import load_head
    from keras_lora_finetune.job import model_inputs
    from keras_lora_finetune.job import quantize_backbone
    from keras_lora_finetune.job import token_lengths
    from keras_lora_finetune.job import tokenize

    folder = os.path.dirname(os.path.abspath(args.adapters))
    with open(os.path.join(folder, SUMMARY_FILE), encoding="utf-8") as f:
        run = json.load(f)
    # The packaged default model is found again (it may be installed
    # elsewhere now); any other preset is the one the run recorded.
    preset = default_preset() if run.get("default_preset") else run["preset"]
    backbone, tokenizer = load_backbone(preset)
    model = build_model(
        backbone,
        run["task"],
        len(run["class_names"]),
        run["label_mean"],
        run["label_std"],
    )
    # The adapters were trained on this base: quantized as in the run.
    quantize_backbone(model, backbone, None, run.get("quantize"))
    recorded = run.get("adapter_file_sha256")
    if recorded is not None and file_sha256(args.adapters) != recorded:
        raise UsageError(
            f"--adapters: {args.adapters!r} is not the adapter file of the run "
            f"in {folder!r} (its {SUMMARY_FILE} records another file); keep a "
            "run's files together"
        )
    load_head(model, os.path.join(folder, HEAD_FILE))
    try:
        model = keras_lora.load_adapters(model, args.adapters)
    except ValueError as e:
        raise UsageError(f"--adapters: {e}") from None
    seq_len = run["seq_len"]
    x = model_inputs(backbone, *tokenize(tokenizer, args.texts, seq_len))
    longer = sum(
        n > seq_len for n in token_lengths(tokenizer, args.texts, special=True)
    )
    if longer:
        print(
            f"note: {longer} of {len(args.texts)} texts are longer than the "
            f"run's {seq_len} tokens and are scored on their first {seq_len} "
            "(as in training)",
            file=sys.stderr,
        )
    out = model.predict(x, batch_size=args.batch_size, verbose=0)
    lines = [
        format_prediction(value, run["task"], run["class_names"])
        for value in out
    ]
    for line, text in zip(lines, args.texts, strict=True):
        print(f"{line}\t{text}", flush=True)
    return lines
