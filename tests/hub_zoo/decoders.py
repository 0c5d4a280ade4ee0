"""Small decoder-only (and T5Gemma encoder-decoder) language backbones.

Every factory builds a fresh, randomly initialised keras-hub backbone with
1-2 layers, hidden sizes of 16 or 32 and a vocabulary of a few dozen tokens.
Inputs are batches of two sequences of at most 8 tokens; the second row is
right-padded, so the padding mask has zeros in it.
"""

import keras_hub
import numpy as np

from hub_zoo import Case

_BATCH = 2
_LENGTH = 8


def _tokens(seed, vocab, length=_LENGTH, pad=3):
    """Token ids and a padding mask; row 1 ends in `pad` padded slots."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(_BATCH, length)).astype("int32")
    mask = np.ones((_BATCH, length), dtype="int32")
    if pad:
        mask[1, -pad:] = 0
        ids[1, -pad:] = 0
    return ids, mask


def _lm_inputs(seed, vocab, length=_LENGTH, pad=3):
    """`{"token_ids", "padding_mask"}`, the usual decoder inputs."""

    def inputs():
        ids, mask = _tokens(seed, vocab, length, pad)
        return {"token_ids": ids, "padding_mask": mask}

    return inputs


# --- Classic decoders (learned or ALiBi positions) -------------------------


def _bloom():
    # ALiBi positions, so no position table.
    return keras_hub.models.BloomBackbone(
        vocabulary_size=48,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=40,
    )


def _falcon():
    return keras_hub.models.FalconBackbone(
        vocabulary_size=40,
        num_layers=2,
        num_attention_heads=2,
        hidden_dim=16,
        intermediate_dim=48,
    )


def _gpt2():
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=52,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=24,
        dropout=0.0,
        max_sequence_length=12,
    )


def _gpt_neo_x():
    # Rotary on half of each 8-wide head.
    return keras_hub.models.GPTNeoXBackbone(
        vocabulary_size=44,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        rotary_percentage=0.5,
        max_sequence_length=12,
    )


def _opt():
    return keras_hub.models.OPTBackbone(
        vocabulary_size=36,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=40,
        dropout=0.0,
        max_sequence_length=10,
    )


# --- Gemma family -----------------------------------------------------------


def _gemma():
    return keras_hub.models.GemmaBackbone(
        vocabulary_size=56,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=24,
        head_dim=8,
    )


def _gemma3():
    # Text only; `image_size` is required but unused without an encoder.
    return keras_hub.models.Gemma3Backbone(
        vocabulary_size=60,
        image_size=16,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        use_sliding_window_attention=True,
        sliding_window_size=4,
    )


def _gemma4():
    # Text only: one local and one global layer.
    return keras_hub.models.Gemma4Backbone(
        vocabulary_size=64,
        image_size=16,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window_size=4,
    )


def _gemma4_inputs():
    ids, mask = _tokens(seed=7, vocab=64)
    positions = np.tile(np.arange(_LENGTH, dtype="int32"), (_BATCH, 1))
    return {"token_ids": ids, "padding_mask": mask, "position_ids": positions}


# --- Llama-style decoders (RoPE, grouped-query attention) --------------------


def _llama():
    return keras_hub.models.LlamaBackbone(
        vocabulary_size=40,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=32,
        intermediate_dim=48,
    )


def _llama3():
    # Llama 3.1-style rescaled rotary frequencies.
    return keras_hub.models.Llama3Backbone(
        vocabulary_size=48,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=40,
        rope_frequency_adjustment_factor=8.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_pretraining_sequence_length=16,
    )


def _mistral():
    return keras_hub.models.MistralBackbone(
        vocabulary_size=44,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        sliding_window=4,
    )


def _mixtral():
    return keras_hub.models.MixtralBackbone(
        vocabulary_size=44,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=24,
        num_experts=4,
        top_k=2,
        sliding_window=4,
    )


def _gpt_oss():
    return keras_hub.models.GptOssBackbone(
        vocabulary_size=36,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=16,
        num_experts=4,
        top_k=2,
        sliding_window=4,
    )


def _phi3():
    # "su" rotary scaling: one factor per rotary frequency (head_dim / 2).
    return keras_hub.models.Phi3Backbone(
        vocabulary_size=40,
        num_layers=2,
        hidden_dim=16,
        intermediate_dim=32,
        num_query_heads=2,
        num_key_value_heads=1,
        max_sequence_length=16,
        pretraining_sequence_length=8,
        rope_scaling_type="su",
        rope_scaling_short_factor=[1.0, 1.1, 1.2, 1.3],
        rope_scaling_long_factor=[1.0, 0.9, 0.8, 0.7],
    )


def _smollm3(heads, kv_heads, hidden):
    # Second layer skips RoPE (SmolLM3's "NoPE" layers).
    def build():
        return keras_hub.models.SmolLM3Backbone(
            vocabulary_size=50,
            hidden_dim=hidden,
            intermediate_dim=2 * hidden,
            num_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            attention_bias=False,
            attention_dropout=0.0,
            rope_layer_enabled_list=[True, False],
            layer_types=["attention", "attention"],
            mlp_bias=False,
            layer_norm_epsilon=1e-5,
            max_position_embeddings=32,
            rope_theta=10000.0,
            partial_rotary_factor=1.0,
        )

    return build


# --- Qwen family ------------------------------------------------------------


def _qwen(tie, sliding):
    def build():
        return keras_hub.models.QwenBackbone(
            vocabulary_size=48,
            num_layers=2,
            num_query_heads=2,
            num_key_value_heads=1,
            hidden_dim=16,
            intermediate_dim=32,
            tie_word_embeddings=tie,
            use_sliding_window_attention=sliding,
            sliding_window_size=4,
        )

    return build


def _qwen3():
    # Explicit head_dim, with query/key norms inside attention.
    return keras_hub.models.Qwen3Backbone(
        vocabulary_size=52,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        hidden_dim=16,
        intermediate_dim=24,
    )


def _qwen_moe():
    return keras_hub.models.QwenMoeBackbone(
        vocabulary_size=40,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        moe_intermediate_dim=8,
        shared_expert_intermediate_dim=16,
        num_experts=4,
        top_k=2,
        norm_top_k_prob=True,
        dtype="float32",
    )


def _qwen3_moe():
    return keras_hub.models.Qwen3MoeBackbone(
        vocabulary_size=40,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        hidden_dim=16,
        intermediate_dim=32,
        moe_intermediate_dim=8,
        num_experts=4,
        top_k=2,
        norm_top_k_prob=True,
        dtype="float32",
    )


# Qwen3.5: one gated delta-net (linear attention) layer, one full attention.
_QWEN3_5_HYBRID = dict(
    layer_types=["linear_attention", "full_attention"],
    partial_rotary_factor=0.5,
    linear_num_key_heads=2,
    linear_num_value_heads=2,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_conv_kernel_dim=3,
)


def _qwen3_5():
    return keras_hub.models.Qwen3_5Backbone(
        vocabulary_size=48,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        hidden_dim=16,
        intermediate_dim=32,
        **_QWEN3_5_HYBRID,
    )


def _qwen3_5_moe():
    return keras_hub.models.Qwen3_5MoeBackbone(
        vocabulary_size=48,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        hidden_dim=16,
        moe_intermediate_dim=8,
        shared_expert_intermediate_size=16,
        num_experts=4,
        top_k=2,
        dtype="float32",
        **_QWEN3_5_HYBRID,
    )


# --- Recurrent --------------------------------------------------------------


def _rwkv7():
    # Two 8-wide heads; the *_lora sizes are RWKV's own low-rank mixes.
    return keras_hub.models.RWKV7Backbone(
        hidden_size=16,
        head_size=8,
        num_layers=2,
        vocabulary_size=40,
        intermediate_dim=48,
        gate_lora=8,
        mv_lora=8,
        aaa_lora=8,
        decay_lora=8,
    )


# --- Encoder-decoder (T5Gemma) ----------------------------------------------


def _t5gemma_kwargs():
    kwargs = dict(vocabulary_size=56, sliding_window=4)
    for side in ("encoder", "decoder"):
        kwargs.update(
            {
                f"{side}_hidden_dim": 16,
                f"{side}_intermediate_dim": 32,
                f"{side}_num_layers": 2,
                f"{side}_num_attention_heads": 2,
                f"{side}_num_key_value_heads": 1,
                f"{side}_head_dim": 8,
                f"{side}_layer_types": [
                    "sliding_attention",
                    "full_attention",
                ],
            }
        )
    kwargs["cross_attention_hidden_size"] = 16
    return kwargs


def _t5gemma():
    return keras_hub.models.T5GemmaBackbone(
        attn_logit_softcapping=30.0, **_t5gemma_kwargs()
    )


def _t5gemma2():
    # Text only (no vision encoder).
    return keras_hub.models.T5Gemma2Backbone(**_t5gemma_kwargs())


def _seq2seq_inputs(seed, vocab):
    def inputs():
        enc_ids, enc_mask = _tokens(seed, vocab, length=8, pad=2)
        dec_ids, dec_mask = _tokens(seed + 1, vocab, length=6, pad=3)
        return {
            "encoder_token_ids": enc_ids,
            "encoder_padding_mask": enc_mask,
            "decoder_token_ids": dec_ids,
            "decoder_padding_mask": dec_mask,
        }

    return inputs


_MOE = "mixture of experts: 4 experts, top-2 routing"
_DELTA_NET = (
    "the delta-net unrolls a fixed 64-step Python loop, so the first "
    "eager call compiles many small ops"
)
_T5 = "encoder-decoder: encoder_/decoder_ token ids and padding masks"

CASES = {
    "BloomBackbone": Case(_bloom, _lm_inputs(1, 48), note="ALiBi positions"),
    "FalconBackbone": Case(_falcon, _lm_inputs(2, 40)),
    "GPT2Backbone": Case(_gpt2, _lm_inputs(3, 52)),
    "GPTNeoXBackbone": Case(_gpt_neo_x, _lm_inputs(4, 44)),
    "OPTBackbone": Case(_opt, _lm_inputs(5, 36)),
    "GemmaBackbone": Case(_gemma, _lm_inputs(6, 56)),
    "Gemma3Backbone": Case(
        _gemma3, _lm_inputs(8, 60), note="text only (no vision encoder)"
    ),
    "Gemma4Backbone": Case(
        _gemma4,
        _gemma4_inputs,
        note="text only (no vision/audio encoder); takes position_ids",
    ),
    "LlamaBackbone": Case(_llama, _lm_inputs(9, 40)),
    "Llama3Backbone": Case(_llama3, _lm_inputs(10, 48)),
    "MistralBackbone": Case(_mistral, _lm_inputs(11, 44)),
    "MixtralBackbone": Case(_mixtral, _lm_inputs(12, 44), note=_MOE),
    "GptOssBackbone": Case(_gpt_oss, _lm_inputs(13, 36), note=_MOE),
    "Phi3Backbone": Case(_phi3, _lm_inputs(14, 40)),
    "SmolLM3Backbone": Case(_smollm3(2, 1, 16), _lm_inputs(15, 50)),
    "SmolLMBackbone": Case(
        _smollm3(4, 2, 32),
        _lm_inputs(16, 50),
        note="alias of SmolLM3Backbone",
    ),
    "QwenBackbone": Case(_qwen(tie=True, sliding=False), _lm_inputs(17, 48)),
    "Qwen2Backbone": Case(
        _qwen(tie=False, sliding=True),
        _lm_inputs(18, 48),
        note="alias of QwenBackbone; untied embeddings, sliding window",
    ),
    "Qwen3Backbone": Case(_qwen3, _lm_inputs(19, 52)),
    "QwenMoeBackbone": Case(
        _qwen_moe, _lm_inputs(20, 40), note=_MOE + ", plus a shared expert"
    ),
    "Qwen3MoeBackbone": Case(_qwen3_moe, _lm_inputs(21, 40), note=_MOE),
    "Qwen3_5Backbone": Case(
        _qwen3_5,
        _lm_inputs(22, 48),
        slow=True,
        note="hybrid: one linear-attention (gated delta-net) layer; "
        + _DELTA_NET,
    ),
    "Qwen3_5MoeBackbone": Case(
        _qwen3_5_moe,
        _lm_inputs(23, 48),
        slow=True,
        note="hybrid linear/full attention; "
        + _MOE
        + ", shared expert; "
        + _DELTA_NET,
    ),
    "RWKV7Backbone": Case(
        _rwkv7,
        _lm_inputs(24, 40),
        note="recurrent (RWKV-7), no attention; outputs vocabulary logits; "
        "its built-in low-rank mixes (gate_lora, ...) are raw weights, "
        "not Dense layers",
    ),
    "T5GemmaBackbone": Case(_t5gemma, _seq2seq_inputs(25, 56), note=_T5),
    "T5Gemma2Backbone": Case(
        _t5gemma2, _seq2seq_inputs(27, 56), note=_T5 + "; text only"
    ),
}
