"""LoRA on a keras-hub GemmaCausalLM: fit, generate, merge, generate, export.

By default the model is a tiny randomly initialised Gemma (the real
`GemmaCausalLM` class: `GemmaBackbone` + `GemmaTokenizer` +
`GemmaCausalLMPreprocessor`), whose SentencePiece tokenizer is trained here,
offline, on the text it learns: the Zen of Python (PEP 20, shipped with
every Python as the `this` module). `--preset` loads real weights instead
(a keras-hub preset name or a local preset folder, e.g. a downloaded
`gemma_2b_en`); nothing is downloaded unless the preset you name needs it.

1. `apply_lora` (default targets: the attention query and value
   projections); the adapted model is still a `GemmaCausalLM` with
   `generate()` and its preprocessor.
2. `fit` on the text (next-token loss), reporting the loss before/after.
3. `generate()` greedily with the LoRA model, then with the merged model
   (`keras_lora.merge`): the same tokens.
4. Export a TF SavedModel (`keras_lora.export_saved_model`), checked by
   reloading it with `tf.saved_model.load`.

    python examples/gemma_causal_lm.py [--backend torch] [--quick]
"""

import argparse
import codecs
import io
import json
import os
import sys
import time

PROMPT = "Beautiful is better"

#: Targets for the tiny random model (`--preset` uses the default targets).
TINY_TARGETS = [
    "token_embedding",
    "query",
    "key",
    "value",
    "attention_output",
    "ffw_gating",
    "ffw_gating_2",
    "ffw_linear",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("tensorflow", "jax", "torch"))
    p.add_argument(
        "--preset",
        default=None,
        help="keras-hub Gemma preset or folder (default: tiny random Gemma)",
    )
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--output", default=os.path.join("runs", "gemma"))
    p.add_argument("--quick", action="store_true", help="short run for CI")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.rank <= 0:
        p.error(f"--rank must be a positive integer, got {args.rank}")
    if args.epochs is not None and args.epochs <= 0:
        p.error(f"--epochs must be a positive integer, got {args.epochs}")
    return args


def zen_of_python():
    """The 19 aphorisms of PEP 20, from the standard library's `this`."""
    import contextlib

    with contextlib.redirect_stdout(io.StringIO()):
        import this
    text = codecs.decode(this.s, "rot13")
    return [line for line in text.splitlines()[2:] if line.strip()]


def train_tokenizer_proto(lines, vocab_size=200):
    """A SentencePiece model trained offline on `lines`, with the special
    tokens GemmaTokenizer needs (<pad>=0, <bos>=1, <eos>=2, <unk>=3)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        bos_piece="<bos>",
        eos_piece="<eos>",
        unk_piece="<unk>",
        character_coverage=1.0,
        minloglevel=2,
    )
    return model.getvalue()


def tiny_gemma(lines, seq_len):
    import keras_hub

    tokenizer = keras_hub.models.GemmaTokenizer(
        proto=train_tokenizer_proto(lines)
    )
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=1,
        hidden_dim=64,
        intermediate_dim=128,
        head_dim=16,
    )
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(
        tokenizer, sequence_length=seq_len
    )
    return keras_hub.models.GemmaCausalLM(backbone, preprocessor)


def main(argv=None):
    args = parse_args(argv)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    import keras
    import keras_hub
    import numpy as np

    import keras_lora

    keras.utils.set_random_seed(args.seed)
    lines = zen_of_python()
    seq_len = 24
    if args.preset:
        model = keras_hub.models.GemmaCausalLM.from_preset(args.preset)
        model.preprocessor.sequence_length = seq_len
        epochs = args.epochs or 1
    else:
        model = tiny_gemma(lines, seq_len)
        epochs = args.epochs or (15 if args.quick else 60)
    print(
        f"backend {keras.backend.backend()}; {type(model).__name__} "
        f"with {model.count_params():,} parameters; {len(lines)} lines"
    )

    # A random base model learns little through query/value adapters alone:
    # adapt every projection and the (tied) token embedding, whose LoRA
    # update also reaches the logits (LoRAReversibleEmbedding).
    targets = None if args.preset else TINY_TARGETS
    lora_model = keras_lora.apply_lora(model, rank=args.rank, targets=targets)
    adapted = keras_lora.lora_layers(lora_model)
    trainable = int(sum(np.prod(w.shape) for w in lora_model.trainable_weights))
    print(
        f"[1/4] apply_lora: {len(adapted)} layers; "
        f"trainable {trainable:,}; still has generate(): "
        f"{hasattr(lora_model, 'generate')}"
    )

    lora_model.compile(
        optimizer=keras.optimizers.Adam(1e-2 if not args.preset else 1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
        sampler="greedy",
    )
    loss_before = float(lora_model.evaluate(lines, batch_size=8, verbose=0))
    t = time.perf_counter()
    lora_model.fit(lines, batch_size=8, epochs=epochs, verbose=0)
    loss_after = float(lora_model.evaluate(lines, batch_size=8, verbose=0))
    print(
        f"[2/4] fit {epochs} epochs in {time.perf_counter() - t:.1f} s: "
        f"loss {loss_before:.3f} -> {loss_after:.3f}"
    )
    if not loss_after < 0.8 * loss_before:
        print("FAILED: the loss did not drop by 20 %", file=sys.stderr)
        return 1

    lora_text = lora_model.generate(PROMPT, max_length=seq_len)
    merged = keras_lora.merge(lora_model)
    merged.compile(sampler="greedy")
    merged_text = merged.generate(PROMPT, max_length=seq_len)
    x = merged.preprocessor.generate_preprocess(
        [PROMPT], sequence_length=seq_len
    )
    x = {k: keras.ops.convert_to_numpy(v) for k, v in x.items()}
    lora_logits = keras.ops.convert_to_numpy(lora_model(x))
    same_logits = float(
        np.max(np.abs(keras.ops.convert_to_numpy(merged(x)) - lora_logits))
    )
    logits_max_abs = float(np.max(np.abs(lora_logits)))
    print(
        f"[3/4] generate({PROMPT!r}):\n      LoRA:   {lora_text!r}\n"
        f"      merged: {merged_text!r}\n      logits max abs diff "
        f"{same_logits:.2e}"
    )
    if lora_text != merged_text:
        print("FAILED: merged generate() differs", file=sys.stderr)
        return 1

    x["padding_mask"] = x["padding_mask"].astype("int32")
    export = keras_lora.export_saved_model(
        lora_model,
        os.path.join(args.output, "saved_model"),
        overwrite=True,
        check_inputs=x,
    )
    print(
        f"[4/4] SavedModel at {export.path} ({export.signatures}); serve "
        f"vs LoRA logits max abs diff {export.max_abs_diff:.2e}"
    )
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump(
            {
                "backend": keras.backend.backend(),
                "preset": args.preset or "tiny random GemmaCausalLM",
                "epochs": epochs,
                "loss_before": loss_before,
                "loss_after": loss_after,
                "generate_lora": lora_text,
                "generate_merged": merged_text,
                "merge_logits_max_abs_diff": same_logits,
                "logits_max_abs": logits_max_abs,
                "saved_model_max_abs_diff": export.max_abs_diff,
                "saved_model_output_max_abs": export.output_max_abs,
            },
            f,
            indent=2,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
