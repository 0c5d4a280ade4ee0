"""Tiny configurations of real keras-hub model classes, for fast tests."""

import keras
import keras_hub
import numpy as np


def tiny_gemma_causal_lm(num_layers=2, vocabulary_size=64):
    """A random-initialised keras-hub `GemmaCausalLM`, no preprocessor."""
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=vocabulary_size,
        num_layers=num_layers,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
    )
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def tiny_llama3_causal_lm(num_layers=2, vocabulary_size=64):
    """A random-initialised `keras_hub.models.Llama3CausalLM` (untied head)."""
    backbone = keras_hub.models.Llama3Backbone(
        vocabulary_size=vocabulary_size,
        num_layers=num_layers,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
    )
    return keras_hub.models.Llama3CausalLM(backbone=backbone, preprocessor=None)


def tiny_bert_classifier(num_classes=3, vocabulary_size=40):
    """A random-initialised `keras_hub.models.BertTextClassifier`."""
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=vocabulary_size,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
    )
    return keras_hub.models.BertTextClassifier(
        backbone=backbone,
        num_classes=num_classes,
        preprocessor=None,
        dropout=0.0,
    )


def causal_lm_batch(batch=2, length=6, vocabulary_size=64, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocabulary_size, size=(batch, length)).astype("int32")
    mask = np.ones((batch, length), "int32")
    mask[:, -2:] = 0
    ids = ids * mask
    x = {"token_ids": ids, "padding_mask": mask}
    y = np.roll(ids, -1, axis=1)
    return x, y, mask.astype("float32")


def bert_batch(batch=4, length=8, vocabulary_size=40, num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocabulary_size, size=(batch, length)).astype("int32")
    x = {
        "token_ids": ids,
        "segment_ids": np.zeros_like(ids),
        "padding_mask": np.ones_like(ids),
    }
    y = rng.integers(0, num_classes, size=(batch,))
    return x, y


def randomize_adapters(model, seed=0, scale=0.1):
    """Gives every adapter factor non-zero values (B = 0 hides bugs)."""
    from keras_lora import lora_layers

    rng = np.random.default_rng(seed)
    for layer in lora_layers(model).values():
        for variable in layer.adapter_weights().values():
            value = rng.normal(size=variable.shape) * scale
            variable.assign(value.astype("float32"))


def weights_snapshot(model):
    """`{id(variable): (path, numpy copy)}` of all of a model's weights."""
    return {
        id(v): (v.path, np.array(keras.ops.convert_to_numpy(v)))
        for v in model.weights
    }
