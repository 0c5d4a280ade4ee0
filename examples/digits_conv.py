"""LoRAConv2D on real handwritten digits: adapt a CNN from 0-4 to 5-9.

Data: scikit-learn's bundled `load_digits` (1,797 8x8 handwritten digits
from the UCI "Optical Recognition of Handwritten Digits" set), offline.

1. Train a small CNN on digits 0-4 (5 classes).
2. Freeze it and add LoRA adapters (`keras_lora.apply_lora`, default
   targets: every Conv2D and Dense when a model has no attention layers).
3. Fine-tune the adapters only on digits 5-9, relabelled 0-4 (a new task
   for the same 5-way head); report accuracy before/after and the
   parameter counts.
4. Merge (`keras_lora.merge`), check merged == LoRA outputs, and export a
   TF SavedModel (`keras_lora.export_saved_model`) checked by reloading it.

    python examples/digits_conv.py [--backend jax] [--rank 4] [--quick]
"""

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("tensorflow", "jax", "torch"))
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--output", default=os.path.join("runs", "digits"))
    p.add_argument("--quick", action="store_true", help="short run for CI")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.rank <= 0:
        p.error(f"--rank must be a positive integer, got {args.rank}")
    if args.epochs is not None and args.epochs <= 0:
        p.error(f"--epochs must be a positive integer, got {args.epochs}")
    return args


def load_split(seed):
    """Digits 0-4 and 5-9 (relabelled 0-4), each split 75/25 by `seed`."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]  # (n, 8, 8, 1)
    y = digits.target.astype("int32")
    rng = np.random.default_rng(seed)
    parts = {}
    for name, low in (("old", 0), ("new", 5)):
        idx = np.flatnonzero((y >= low) & (y < low + 5))
        idx = rng.permutation(idx)
        cut = int(0.75 * len(idx))
        parts[name] = (
            (x[idx[:cut]], y[idx[:cut]] - low),
            (x[idx[cut:]], y[idx[cut:]] - low),
        )
    return parts


def build_cnn():
    import keras

    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(
                32, 3, padding="same", activation="relu", name="conv1"
            ),
            keras.layers.Conv2D(64, 3, activation="relu", name="conv2"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu", name="hidden"),
            keras.layers.Dense(5, name="logits"),
        ],
        name="digits_cnn",
    )


def accuracy(model, x, y):
    import numpy as np

    pred = model.predict(x, batch_size=512, verbose=0)
    return float(np.mean(np.argmax(pred, axis=-1) == y))


def count(weights):
    import numpy as np

    return int(sum(np.prod(w.shape) for w in weights))


def main(argv=None):
    args = parse_args(argv)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    import keras
    import numpy as np

    import keras_lora

    keras.utils.set_random_seed(args.seed)
    epochs = args.epochs or (3 if args.quick else 12)
    parts = load_split(args.seed)
    (x_old, y_old), (xt_old, yt_old) = parts["old"]
    (x_new, y_new), (xt_new, yt_new) = parts["new"]
    print(
        f"backend {keras.backend.backend()}; digits 0-4: {len(x_old)} "
        f"train / {len(xt_old)} test; 5-9: {len(x_new)} / {len(xt_new)}"
    )

    def sparse_ce():
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    t = time.perf_counter()
    model = build_cnn()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=sparse_ce())
    model.fit(x_old, y_old, batch_size=32, epochs=epochs, verbose=2)
    base_acc = accuracy(model, xt_old, yt_old)
    print(
        f"[1/4] base CNN on 0-4: test accuracy {base_acc:.3f} "
        f"({time.perf_counter() - t:.1f} s)"
    )

    lora_model = keras_lora.apply_lora(model, rank=args.rank)
    before = accuracy(lora_model, xt_new, yt_new)
    trainable = count(lora_model.trainable_weights)
    total = count(lora_model.weights)
    print(
        f"[2/4] apply_lora rank {args.rank}: "
        f"{sorted(keras_lora.lora_layers(lora_model))}; trainable "
        f"{trainable:,} of {total:,} ({100 * trainable / total:.1f} %), "
        f"full fine-tune would train {count(model.weights):,}"
    )

    t = time.perf_counter()
    lora_model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=sparse_ce())
    lora_model.fit(x_new, y_new, batch_size=32, epochs=epochs, verbose=2)
    after = accuracy(lora_model, xt_new, yt_new)
    old_after = accuracy(lora_model, xt_old, yt_old)
    print(
        f"[3/4] LoRA on 5-9: test accuracy {before:.3f} -> {after:.3f} "
        f"({time.perf_counter() - t:.1f} s); the base model is unchanged "
        f"(0-4 accuracy {accuracy(model, xt_old, yt_old):.3f}; the "
        f"adapted model scores {old_after:.3f} on 0-4)"
    )
    if after < before + 0.2:
        print(
            f"FAILED: accuracy on 5-9 went {before:.3f} -> {after:.3f}",
            file=sys.stderr,
        )
        return 1

    merged = keras_lora.merge(lora_model)
    lora_out = lora_model.predict(xt_new, verbose=0)
    diff = float(np.max(np.abs(merged.predict(xt_new, verbose=0) - lora_out)))
    export = keras_lora.export_saved_model(
        lora_model,
        os.path.join(args.output, "saved_model"),
        overwrite=True,
        check_inputs=xt_new[:32],
    )
    print(
        f"[4/4] merged vs LoRA max abs diff {diff:.2e}; SavedModel at "
        f"{export.path} ({export.signatures}), serve vs LoRA max abs diff "
        f"{export.max_abs_diff:.2e}"
    )
    summary = {
        "backend": keras.backend.backend(),
        "rank": args.rank,
        "epochs": epochs,
        "base_accuracy_0_4": base_acc,
        "accuracy_5_9_before": before,
        "accuracy_5_9_after": after,
        "trainable_params": trainable,
        "total_params": total,
        "merge_max_abs_diff": diff,
        "output_max_abs": float(np.max(np.abs(lora_out))),
        "saved_model_max_abs_diff": export.max_abs_diff,
        "saved_model_output_max_abs": export.output_max_abs,
    }
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
