"""Small text encoders, seq2seq and audio-to-text backbones from keras-hub.

Every factory builds a fresh, randomly initialised model of the real
`keras_hub.models` class, sized so that each layer still does real work
(hidden sizes of 8 or more, 1-2 layers, vocabularies under 64, sequences of
at most 8 steps). Inputs are a batch of 2, drawn from a fixed seed; where the
model sees padding, the second row ends in padding (token id 0, mask 0).
"""

import keras_hub
import numpy as np

from hub_zoo import Case

BATCH = 2


def _tokens(seed, vocab, length, valid=None, with_mask=True, mask_dtype=None):
    """Token ids in `[1, vocab)` and a padding mask for them.

    Row 1 keeps only its first `valid` positions (default: `length - 2`);
    the rest are id 0 with mask 0. Returns `(ids, mask)`, or `ids` alone
    when `with_mask` is False.
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(BATCH, length)).astype("int32")
    valid = length - 2 if valid is None else valid
    mask = np.ones((BATCH, length), dtype=mask_dtype or "int32")
    mask[1, valid:] = 0
    ids[1, valid:] = 0
    return (ids, mask) if with_mask else ids


def _segments(length, split):
    """Segment ids: 0 for the first `split` positions, 1 afterwards."""
    seg = np.zeros((BATCH, length), dtype="int32")
    seg[:, split:] = 1
    return seg


def _encoder_inputs(seed, vocab, length, segments=True):
    """`token_ids`, `padding_mask` and optionally `segment_ids`."""
    ids, mask = _tokens(seed, vocab, length)
    inputs = {"token_ids": ids, "padding_mask": mask}
    if segments:
        inputs["segment_ids"] = _segments(length, length // 2)
    return inputs


def _seq2seq_inputs(seed, vocab, enc_len, dec_len, mask_dtype="int32"):
    """Encoder and decoder ids with padding masks (second row padded)."""
    enc_ids, enc_mask = _tokens(seed, vocab, enc_len, mask_dtype=mask_dtype)
    dec_ids, dec_mask = _tokens(
        seed + 1, vocab, dec_len, valid=dec_len - 1, mask_dtype=mask_dtype
    )
    return {
        "encoder_token_ids": enc_ids,
        "encoder_padding_mask": enc_mask,
        "decoder_token_ids": dec_ids,
        "decoder_padding_mask": dec_mask,
    }


# --- Encoder-only text models ------------------------------------------


def _albert():
    # Two groups so the two layers do not share weights; the factorised
    # embedding (8) is smaller than the hidden size (16).
    return keras_hub.models.AlbertBackbone(
        vocabulary_size=40,
        num_layers=2,
        num_heads=2,
        num_groups=2,
        num_inner_repetitions=1,
        embedding_dim=8,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=8,
    )


def _bert():
    return keras_hub.models.BertBackbone(
        vocabulary_size=64,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=24,
        max_sequence_length=12,
    )


def _deberta_v3():
    # A small bucket count keeps the relative-position table tiny.
    return keras_hub.models.DebertaV3Backbone(
        vocabulary_size=32,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=8,
        bucket_size=4,
    )


def _distil_bert():
    return keras_hub.models.DistilBertBackbone(
        vocabulary_size=36,
        num_layers=2,
        num_heads=4,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=8,
    )


def _electra():
    # Note the argument is `vocab_size` here, not `vocabulary_size`.
    return keras_hub.models.ElectraBackbone(
        vocab_size=44,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        embedding_dim=8,
        intermediate_dim=32,
        max_sequence_length=8,
    )


def _esm():
    # ESM-1 style: learned absolute positions and an embedding layer norm.
    # 33 is the size of the real ESM amino-acid vocabulary.
    return keras_hub.models.ESMBackbone(
        vocabulary_size=33,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
        position_embedding_type="absolute",
        use_pre_layer_norm=True,
    )


def _esm2():
    # ESM-2 style: rotary positions, no embedding layer norm.
    return keras_hub.models.ESM2Backbone(
        vocabulary_size=33,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        position_embedding_type="rotary",
    )


def _esm_inputs():
    # No padding-mask input: the model masks token id 0 (`pad_token_id`).
    return {"token_ids": _tokens(5, 33, 8, with_mask=False)}


def _f_net():
    return keras_hub.models.FNetBackbone(
        vocabulary_size=40,
        num_layers=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=8,
        num_segments=4,
    )


def _f_net_inputs():
    ids = _tokens(6, 40, 8, with_mask=False)
    seg = _segments(8, 3)
    seg[:, 6:] = 2  # use a third segment type too
    return {"token_ids": ids, "segment_ids": seg}


def _roberta():
    return keras_hub.models.RobertaBackbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=8,
    )


def _roformer_v2():
    return keras_hub.models.RoformerV2Backbone(
        vocabulary_size=40,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        head_size=8,
    )


def _roformer_v2_inputs():
    # Masking comes from token id 0; there is no padding-mask input.
    ids = _tokens(8, 40, 8, with_mask=False)
    return {"token_ids": ids, "segment_ids": _segments(8, 4)}


def _xlm_roberta():
    # One layer and four heads, to differ from the RoBERTa case.
    return keras_hub.models.XLMRobertaBackbone(
        vocabulary_size=60,
        num_layers=1,
        num_heads=4,
        hidden_dim=16,
        intermediate_dim=24,
        max_sequence_length=8,
    )


def _xlnet():
    return keras_hub.models.XLNetBackbone(
        vocabulary_size=40,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
    )


# --- Encoder-decoder text models ---------------------------------------


def _bart():
    return keras_hub.models.BartBackbone(
        vocabulary_size=50,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=8,
    )


def _t5():
    # Per-head key/value size set explicitly (equals 16 // 2 here).
    return keras_hub.models.T5Backbone(
        vocabulary_size=48,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        key_value_dim=8,
    )


def _edrec():
    return keras_hub.models.EdRecBackbone(
        vocab_size=40,
        num_layers_enc=1,
        num_layers_dec=1,
        hidden_dim=16,
        intermediate_dim=32,
        num_heads=2,
    )


# --- Audio-to-text models -----------------------------------------------


def _whisper():
    # 16 mel bins instead of 80; the encoder halves the frame count.
    return keras_hub.models.WhisperBackbone(
        vocabulary_size=52,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        num_mels=16,
        max_encoder_sequence_length=16,
        max_decoder_sequence_length=8,
    )


def _whisper_inputs():
    rng = np.random.default_rng(11)
    features = rng.standard_normal((BATCH, 8, 16)).astype("float32")
    ids, mask = _tokens(12, 52, 6)
    return {
        "encoder_features": features,
        "decoder_token_ids": ids,
        "decoder_padding_mask": mask,
    }


def _moonshine():
    # head_dim 8 -> rotary dim int(8 * 0.62) rounded to even = 4.
    return keras_hub.models.MoonshineBackbone(
        vocabulary_size=48,
        filter_dim=16,
        encoder_num_layers=1,
        decoder_num_layers=1,
        hidden_dim=16,
        intermediate_dim=16,
        encoder_num_heads=2,
        decoder_num_heads=2,
        feedforward_expansion_factor=2,
        max_position_embeddings=32,
    )


def _moonshine_inputs():
    # 3200 raw samples -> 7 encoder frames after the three strided convs
    # (kernel 127 / stride 64, 7 / 3, 3 / 2); row 1 has 2400 real samples,
    # i.e. 4 frames.
    rng = np.random.default_rng(13)
    audio = rng.uniform(-1.0, 1.0, (BATCH, 3200, 1)).astype("float32")
    audio_mask = np.ones((BATCH, 3200), dtype=bool)
    audio_mask[1, 2400:] = False
    audio[1, 2400:] = 0.0
    ids, mask = _tokens(14, 48, 6, mask_dtype=bool)
    return {
        "encoder_input_values": audio,
        "encoder_padding_mask": audio_mask,
        "decoder_token_ids": ids,
        "decoder_padding_mask": mask,
    }


_SEQ2SEQ = "encoder-decoder; returns a dict of encoder/decoder outputs"
_POOLED = "returns a dict: sequence_output and pooled_output"

CASES = {
    "AlbertBackbone": Case(
        build=_albert,
        inputs=lambda: _encoder_inputs(1, 40, 8),
        note=_POOLED + "; factorised embedding, 2 layer groups",
    ),
    "BartBackbone": Case(
        build=_bart,
        inputs=lambda: _seq2seq_inputs(2, 50, 7, 5),
        note=_SEQ2SEQ,
    ),
    "BertBackbone": Case(
        build=_bert,
        inputs=lambda: _encoder_inputs(3, 64, 8),
        note=_POOLED,
    ),
    "DebertaV3Backbone": Case(
        build=_deberta_v3,
        inputs=lambda: _encoder_inputs(4, 32, 8, segments=False),
        note="disentangled relative-position attention",
    ),
    "DistilBertBackbone": Case(
        build=_distil_bert,
        inputs=lambda: _encoder_inputs(15, 36, 8, segments=False),
    ),
    "ElectraBackbone": Case(
        build=_electra,
        inputs=lambda: _encoder_inputs(16, 44, 8),
        note=_POOLED + "; embedding projected from 8 to 16",
    ),
    "ESMBackbone": Case(
        build=_esm,
        inputs=_esm_inputs,
        note="absolute positions; padding taken from token id 0",
    ),
    "ESM2Backbone": Case(
        build=_esm2,
        inputs=_esm_inputs,
        note="alias of ESMBackbone; rotary positions; pad = token id 0",
    ),
    "FNetBackbone": Case(
        build=_f_net,
        inputs=_f_net_inputs,
        note=_POOLED + "; no attention (Fourier mixing), no padding mask",
    ),
    "RobertaBackbone": Case(
        build=_roberta,
        inputs=lambda: _encoder_inputs(7, 50, 8, segments=False),
    ),
    "RoformerV2Backbone": Case(
        build=_roformer_v2,
        inputs=_roformer_v2_inputs,
        note="rotary attention; padding taken from token id 0",
    ),
    "XLMRobertaBackbone": Case(
        build=_xlm_roberta,
        inputs=lambda: _encoder_inputs(9, 60, 8, segments=False),
        note="subclass of RobertaBackbone",
    ),
    "XLNetBackbone": Case(
        build=_xlnet,
        inputs=lambda: _encoder_inputs(10, 40, 8),
        # keras-hub's XLNetAttentionMaskLayer reshapes (batch, len) to
        # (len, batch) instead of transposing, so with batch 2 the padding
        # mask is scrambled across rows; outputs are still deterministic.
        note="two-stream relative attention; padding mask is applied "
        "scrambled across the batch (keras-hub reshape, not transpose)",
    ),
    "T5Backbone": Case(
        build=_t5,
        inputs=lambda: _seq2seq_inputs(17, 48, 7, 5),
        note=_SEQ2SEQ + "; gated FFN, tied embeddings",
    ),
    "EdRecBackbone": Case(
        build=_edrec,
        inputs=lambda: _seq2seq_inputs(18, 40, 6, 5, mask_dtype=bool),
        note=_SEQ2SEQ + "; boolean padding masks",
    ),
    "WhisperBackbone": Case(
        build=_whisper,
        inputs=_whisper_inputs,
        note=_SEQ2SEQ + "; float32 mel features in, no encoder mask",
    ),
    "MoonshineBackbone": Case(
        build=_moonshine,
        inputs=_moonshine_inputs,
        note=_SEQ2SEQ + " (plus encoder_attention_mask); raw audio in",
    ),
}
