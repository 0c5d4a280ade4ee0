"""Small multimodal, segmentation and diffusion backbones from keras-hub.

Every factory builds its own sub-models (vision towers, text encoders,
prompt encoders, VAEs) so no preset or download is needed. Inputs are
NumPy arrays from a seeded generator, batch size 2 unless noted.
"""

import keras_hub
import numpy as np

# The VAE that Stable Diffusion 3 needs is not exported by keras-hub.
from keras_hub.src.models.vae.vae_backbone import VAEBackbone

from hub_zoo import Case

models = keras_hub.models
hub_layers = keras_hub.layers


def _rng(seed):
    return np.random.default_rng(seed)


def _images(rng, *shape):
    return rng.uniform(0.0, 1.0, size=shape).astype("float32")


def _tokens(rng, batch, length, low, high):
    return rng.integers(low, high, size=(batch, length)).astype("int32")


def _mask(batch, length, pad_last=0):
    """Ones, with the last `pad_last` positions of the last row padded."""
    mask = np.ones((batch, length), dtype="int32")
    if pad_last:
        mask[-1, -pad_last:] = 0
    return mask


# --- BLIP-2 ---------------------------------------------------------------


def _blip2():
    vision = models.BLIP2VisionEncoder(
        image_size=32,
        patch_size=8,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        use_patch_bias=True,
        use_class_token=True,
        use_mha_bias=True,
        use_mlp_bias=True,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        initializer_range=0.02,
    )
    # Q-Former width differs from the LM width: the LM projection maps it.
    qformer = models.BLIP2QFormer(
        num_query_tokens=3,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        vision_dim=16,
        cross_attention_frequency=2,
        dropout=0.0,
        layer_norm_epsilon=1e-6,
    )
    # Text positions start after the queries: 3 queries + 6 tokens <= 12.
    language_model = models.BLIP2CustomOPT(
        vocabulary_size=40,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        num_query_tokens=3,
        dropout=0.0,
        max_sequence_length=12,
        qformer_hidden_dim=8,
    )
    return models.BLIP2Backbone(
        vision_encoder=vision, qformer=qformer, language_model=language_model
    )


def _blip2_inputs():
    rng = _rng(101)
    return {
        "images": _images(rng, 2, 32, 32, 3),
        "token_ids": _tokens(rng, 2, 6, 1, 40),
        "padding_mask": _mask(2, 6, pad_last=2),
    }


# --- CLIP-style dual encoders ---------------------------------------------


def _clip_like(vision_cls, text_cls, backbone_cls):
    vision = vision_cls(
        patch_size=8,
        hidden_dim=16,
        num_layers=1,
        num_heads=2,
        intermediate_dim=32,
        image_shape=(32, 32, 3),
        name="vision_encoder",
    )
    text = text_cls(
        vocabulary_size=48,
        embedding_dim=16,
        hidden_dim=16,
        num_layers=1,
        num_heads=2,
        intermediate_dim=32,
        max_sequence_length=10,
        name="text_encoder",
    )
    return backbone_cls(
        vision_encoder=vision, text_encoder=text, projection_dim=12
    )


def _clip():
    return _clip_like(
        models.CLIPVisionEncoder, models.CLIPTextEncoder, models.CLIPBackbone
    )


def _metaclip2():
    return _clip_like(
        models.MetaCLIP2VisionEncoder,
        models.MetaCLIP2TextEncoder,
        models.MetaCLIP2Backbone,
    )


def _clip_inputs(seed):
    def inputs():
        rng = _rng(seed)
        return {
            "images": _images(rng, 2, 32, 32, 3),
            # Shorter than max_sequence_length; pooled at the largest id.
            "token_ids": _tokens(rng, 2, 7, 1, 48),
        }

    return inputs


def _siglip():
    vision = models.SigLIPVisionEncoder(
        patch_size=8,
        hidden_dim=16,
        num_layers=1,
        num_heads=2,
        intermediate_dim=32,
        image_shape=(32, 32, 3),
        name="vision_encoder",
    )
    # The text head projects to the vision width (16) for the logits.
    text = models.SigLIPTextEncoder(
        vocabulary_size=48,
        embedding_dim=12,
        hidden_dim=12,
        num_layers=1,
        num_heads=2,
        intermediate_dim=24,
        max_sequence_length=8,
        projection_dim=16,
        name="text_encoder",
    )
    return models.SigLIPBackbone(vision_encoder=vision, text_encoder=text)


def _siglip_inputs():
    rng = _rng(103)
    return {
        "images": _images(rng, 2, 32, 32, 3),
        # Must be exactly max_sequence_length long (fixed position ids).
        "token_ids": _tokens(rng, 2, 8, 1, 48),
    }


# --- PaliGemma --------------------------------------------------------------


def _pali_gemma():
    return models.PaliGemmaBackbone(
        vocabulary_size=64,
        image_size=32,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
        vit_patch_size=8,
        vit_num_heads=2,
        vit_hidden_dim=16,
        vit_num_layers=1,
        vit_intermediate_dim=32,
    )


def _pali_gemma_inputs():
    rng = _rng(104)
    response = np.zeros((2, 6), dtype="int32")
    response[:, -2:] = 1
    return {
        "images": _images(rng, 2, 32, 32, 3),
        "token_ids": _tokens(rng, 2, 6, 1, 64),
        "padding_mask": _mask(2, 6, pad_last=1),
        "response_mask": response,
    }


# --- Gemma 3n ---------------------------------------------------------------

# Token id layout: text 0..47, vision vocab 48..55, audio vocab 56..63.
_G3N_IMAGE_TOKEN = 49
_G3N_AUDIO_TOKEN = 57
_G3N_SOFT_TOKENS = 4  # 2x2 vision grid; 16 audio frames / 4 = 4 frames


def _gemma3n():
    # Stem /2, two stride-2 stages, then the fusion adapter to a 2x2 grid.
    vision = models.MobileNetV5Backbone(
        stackwise_block_types=[["er"], ["uir"]],
        stackwise_num_blocks=[1, 1],
        stackwise_num_filters=[[16], [16]],
        stackwise_strides=[[2], [2]],
        stackwise_act_layers=[["gelu"], ["gelu"]],
        stackwise_exp_ratios=[[2.0], [2.0]],
        stackwise_se_ratios=[[0.0], [0.0]],
        stackwise_dw_kernel_sizes=[[0], [3]],
        stackwise_dw_start_kernel_sizes=[[0], [3]],
        stackwise_dw_end_kernel_sizes=[[0], [0]],
        stackwise_exp_kernel_sizes=[[3], [0]],
        stackwise_pw_kernel_sizes=[[1], [0]],
        stackwise_num_heads=[[0], [0]],
        stackwise_key_dims=[[0], [0]],
        stackwise_value_dims=[[0], [0]],
        stackwise_kv_strides=[[0], [0]],
        stackwise_use_cpe=[[False], [False]],
        stem_size=8,
        num_features=16,
        use_msfa=True,
        msfa_indices=(-2, -1),
        msfa_output_resolution=2,
        image_shape=(32, 32, 3),
    )
    # The audio encoder is not exported; the backbone builds it from kwargs.
    audio_config = {
        "hidden_size": 8,
        "input_feat_size": 12,
        "sscp_conv_channel_size": [8, 8],
        "sscp_conv_kernel_size": [(3, 3), (3, 3)],
        "sscp_conv_stride_size": [(2, 2), (2, 2)],
        "sscp_conv_group_norm_eps": 1e-5,
        "num_hidden_layers": 1,
        "rms_norm_eps": 1e-6,
        "gradient_clipping": 1e10,
        "residual_weight": 0.5,
        "num_attention_heads": 2,
        "attention_chunk_size": 2,
        "num_attention_context_right": 0,
        "num_attention_context_left": 3,
        "attention_logit_cap": 50.0,
        "conv_kernel_size": 3,
        "reduction_factor": 1,
    }
    return models.Gemma3nBackbone(
        text_vocab_size=64,
        text_hidden_size=16,
        num_hidden_layers=2,
        pad_token_id=0,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=[32, 32],
        hidden_activation="gelu_approximate",
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=4,
        rope_theta=10000.0,
        max_position_embeddings=32,
        vocab_size_per_layer_input=48,
        hidden_size_per_layer_input=8,
        altup_num_inputs=2,
        laurel_rank=4,
        vision_encoder_config=vision.get_config(),
        vision_hidden_size=16,
        vision_vocab_size=8,
        vision_vocab_offset=48,
        vision_soft_tokens_per_image=_G3N_SOFT_TOKENS,
        image_token_id=_G3N_IMAGE_TOKEN,
        audio_encoder_config=audio_config,
        audio_hidden_size=8,
        audio_vocab_size=8,
        audio_vocab_offset=56,
        audio_soft_tokens_per_image=_G3N_SOFT_TOKENS,
        audio_token_id=_G3N_AUDIO_TOKEN,
    )


def _gemma3n_inputs():
    rng = _rng(105)
    # Per sample: text, a vision-vocab token (48) and 4 image slots, an
    # audio-vocab token (56) and 4 audio slots, text: 12 tokens.
    text = _tokens(rng, 2, 2, 1, 48)
    image = np.full((2, _G3N_SOFT_TOKENS), _G3N_IMAGE_TOKEN, dtype="int32")
    audio = np.full((2, _G3N_SOFT_TOKENS), _G3N_AUDIO_TOKEN, dtype="int32")
    begin_image = np.full((2, 1), 48, dtype="int32")
    begin_audio = np.full((2, 1), 56, dtype="int32")
    token_ids = np.concatenate(
        [text[:, :1], begin_image, image, begin_audio, audio, text[:, 1:]], 1
    )
    return {
        "token_ids": token_ids,
        "padding_mask": np.ones(token_ids.shape, dtype=bool),
        "images": _images(rng, 2, 1, 32, 32, 3),
        "input_features": rng.normal(size=(2, 1, 16, 12)).astype("float32"),
        # True marks padded audio frames; none here.
        "input_features_mask": np.zeros((2, 1, 16), dtype=bool),
    }


# --- PARSeq -----------------------------------------------------------------


def _parseq():
    # A wide, short text-line image: patches of 4x8 give a 4x8 grid.
    encoder = models.ViTBackbone(
        image_shape=(16, 64, 3),
        patch_size=(4, 8),
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        use_class_token=False,
        name="image_encoder",
    )
    return models.PARSeqBackbone(
        image_encoder=encoder,
        vocabulary_size=20,
        max_label_length=7,
        decoder_hidden_dim=16,
        num_decoder_layers=1,
        num_decoder_heads=2,
        decoder_mlp_dim=32,
        dropout_rate=0.0,
        attention_dropout=0.0,
    )


def _parseq_inputs():
    rng = _rng(106)
    return {
        "images": _images(rng, 2, 16, 64, 3),
        # <bos> + up to max_label_length characters.
        "token_ids": _tokens(rng, 2, 8, 0, 20),
        "padding_mask": _mask(2, 8, pad_last=3),
    }


# --- SAM --------------------------------------------------------------------


def _sam():
    encoder = models.ViTDetBackbone(
        hidden_size=16,
        num_layers=2,
        intermediate_dim=32,
        num_heads=2,
        global_attention_layer_indices=[1],
        image_shape=(32, 32, 3),
        patch_size=8,
        num_output_channels=8,
        window_size=2,
    )
    # Embedding grid is 32 / 8 = 4; input masks are 4x that size.
    prompt_encoder = hub_layers.SAMPromptEncoder(
        hidden_size=8,
        image_embedding_size=(4, 4),
        input_image_size=(32, 32),
        mask_in_channels=32,
    )
    mask_decoder = hub_layers.SAMMaskDecoder(
        hidden_size=8,
        num_layers=1,
        intermediate_dim=16,
        num_heads=2,
        embedding_dim=8,
        num_multimask_outputs=3,
        iou_head_depth=2,
        iou_head_hidden_dim=8,
    )
    return models.SAMBackbone(
        image_encoder=encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
    )


def _sam_inputs():
    rng = _rng(107)
    return {
        "images": _images(rng, 2, 32, 32, 3),
        "points": rng.uniform(0, 32, size=(2, 2, 2)).astype("float32"),
        "labels": np.array([[1, 0], [1, 1]], dtype="float32"),
        "boxes": np.array(
            [[[[4, 4], [20, 24]]], [[[8, 2], [30, 16]]]], dtype="float32"
        ),
        "masks": _images(rng, 2, 1, 16, 16, 1),
    }


# --- SAM 3 ------------------------------------------------------------------


def _sam3():
    image_shape = (32, 32, 3)
    # 8x8 patch grid; FPN levels 16x16, 8x8 and 4x4 (the last is dropped).
    vision = hub_layers.SAM3VisionEncoder(
        image_shape=image_shape,
        patch_size=4,
        num_layers=2,
        hidden_dim=32,
        intermediate_dim=64,
        num_heads=2,
        fpn_hidden_dim=16,
        fpn_scale_factors=[2.0, 1.0, 0.5],
        pretrain_image_shape=(16, 16, 3),
        window_size=4,
        global_attn_indexes=[1],
    )
    text = hub_layers.SAM3TextEncoder(
        vocabulary_size=64,
        embedding_dim=24,
        hidden_dim=24,
        num_layers=1,
        num_heads=2,
        intermediate_dim=48,
        max_sequence_length=10,
    )
    geometry = hub_layers.SAM3GeometryEncoder(
        num_layers=1,
        hidden_dim=16,
        intermediate_dim=32,
        num_heads=2,
        roi_size=2,
    )
    detr_encoder = hub_layers.SAM3DetrEncoder(
        num_layers=1, hidden_dim=16, intermediate_dim=32, num_heads=2
    )
    detr_decoder = hub_layers.SAM3DetrDecoder(
        image_shape=image_shape,
        patch_size=4,
        num_layers=1,
        hidden_dim=16,
        intermediate_dim=32,
        num_heads=2,
        num_queries=5,
    )
    # One stage: two FPN levels reach the pixel decoder.
    mask_decoder = hub_layers.SAM3MaskDecoder(
        num_upsampling_stages=1, hidden_dim=16, num_heads=2
    )
    return models.SAM3PromptableConceptBackbone(
        vision_encoder=vision,
        text_encoder=text,
        geometry_encoder=geometry,
        detr_encoder=detr_encoder,
        detr_decoder=detr_decoder,
        mask_decoder=mask_decoder,
    )


def _sam3_inputs():
    rng = _rng(108)
    # Batch 1: the geometry encoder hands its (batch, prompts) mask straight
    # to attention, which broadcasts as a key mask only for a batch of one.
    # Boxes are [batch index, cx, cy, w, h], normalised. Labels are all 1:
    # the backbone passes the labels where the encoder expects its mask, so
    # 0 (negative) or -10 (padding) would break the prompt lengths.
    boxes = np.array(
        [[[0, 0.5, 0.5, 0.4, 0.6], [0, 0.25, 0.3, 0.2, 0.2]]], dtype="float32"
    )
    return {
        "pixel_values": _images(rng, 1, 32, 32, 3),
        "token_ids": _tokens(rng, 1, 6, 1, 64),
        "padding_mask": _mask(1, 6, pad_last=2),
        "boxes": boxes,
        "box_labels": np.ones((1, 2), dtype="int32"),
    }


# --- Stable Diffusion 3 -----------------------------------------------------


def _sd3():
    # The VAE's group norms use 32 groups, so 32 filters is the minimum.
    vae = VAEBackbone(
        encoder_num_filters=[32, 32, 32, 32],
        encoder_num_blocks=[1, 1, 1, 1],
        decoder_num_filters=[32, 32, 32, 32],
        decoder_num_blocks=[1, 1, 1, 1],
        sampler_method="mode",
        name="vae",
    )

    def text_encoder(width, name):
        # Two layers; the first one's output is the intermediate output.
        return models.CLIPTextEncoder(
            vocabulary_size=30,
            embedding_dim=width,
            hidden_dim=width,
            num_layers=2,
            num_heads=2,
            intermediate_dim=2 * width,
            intermediate_output_index=0,
            max_sequence_length=6,
            name=name,
        )

    return models.StableDiffusion3Backbone(
        mmdit_patch_size=2,
        mmdit_hidden_dim=16,
        mmdit_num_layers=1,
        mmdit_num_heads=2,
        mmdit_position_size=8,
        mmdit_qk_norm="rms_norm",
        mmdit_dual_attention_indices=None,
        vae=vae,
        clip_l=text_encoder(8, "clip_l"),
        clip_g=text_encoder(16, "clip_g"),
        image_shape=(32, 32, 3),
    )


def _sd3_inputs():
    rng = _rng(109)
    return {
        "images": _images(rng, 2, 32, 32, 3) * 2.0 - 1.0,
        "latents": rng.normal(size=(2, 4, 4, 16)).astype("float32"),
        "clip_l_token_ids": _tokens(rng, 2, 6, 0, 30),
        "clip_l_negative_token_ids": _tokens(rng, 2, 6, 0, 30),
        "clip_g_token_ids": _tokens(rng, 2, 6, 0, 30),
        "clip_g_negative_token_ids": _tokens(rng, 2, 6, 0, 30),
        "num_steps": np.full((2,), 4, dtype="int32"),
        "guidance_scale": np.full((2,), 3.0, dtype="float32"),
    }


# --- Flux -------------------------------------------------------------------


def _flux():
    # Head size 32 / 2 = 16 = sum(axes_dim).
    return models.FluxBackbone(
        input_channels=16,
        hidden_size=32,
        mlp_ratio=2.0,
        num_heads=2,
        depth=1,
        depth_single_blocks=1,
        axes_dim=[4, 6, 6],
        theta=10_000,
        use_bias=True,
        guidance_embed=True,
        image_shape=(16, 16),
        text_shape=(6, 24),
        image_ids_shape=(16, 3),
        text_ids_shape=(6, 3),
        y_shape=(12,),
    )


def _flux_inputs():
    rng = _rng(110)
    # Image ids are (0, row, col) on a 4x4 latent grid; text ids are zero.
    rows, cols = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    grid = np.stack([np.zeros(16), rows.ravel(), cols.ravel()], axis=-1)
    return {
        "image": rng.normal(size=(2, 16, 16)).astype("float32"),
        "image_ids": np.broadcast_to(grid, (2, 16, 3)).astype("float32"),
        "text": rng.normal(size=(2, 6, 24)).astype("float32"),
        "text_ids": np.zeros((2, 6, 3), dtype="float32"),
        "y": rng.normal(size=(2, 12)).astype("float32"),
        "timesteps": np.array([0.25, 0.75], dtype="float32"),
        "guidance": np.array([3.5, 3.5], dtype="float32"),
    }


# --- VideoPrism -------------------------------------------------------------


def _video_prism():
    # Video and text towers; 16x16 frames in 4x4 patches, 3 frames.
    return models.VideoPrismBackbone(
        num_frames=3,
        patch_size=4,
        hidden_dim=16,
        intermediate_dim=32,
        num_heads=2,
        num_spatial_layers=1,
        num_temporal_layers=1,
        num_auxiliary_layers=1,
        vocabulary_size=40,
        num_text_layers=1,
        attention_logit_soft_cap=30.0,
        image_shape=(16, 16, 3),
    )


def _video_prism_inputs():
    rng = _rng(111)
    return {
        "pixel_values": _images(rng, 2, 3, 16, 16, 3),
        "token_ids": _tokens(rng, 2, 5, 1, 40),
        "padding_mask": _mask(2, 5, pad_last=2),
    }


CASES = {
    "BLIP2Backbone": Case(
        build=_blip2,
        inputs=_blip2_inputs,
        note="OPT decoder; output is (batch, queries + tokens, hidden).",
    ),
    "CLIPBackbone": Case(
        build=_clip,
        inputs=_clip_inputs(102),
        note="Returns a dict of (batch, batch) vision and text logits.",
    ),
    "MetaCLIP2Backbone": Case(
        build=_metaclip2,
        inputs=_clip_inputs(112),
        note="Returns a dict of (batch, batch) vision and text logits.",
    ),
    "SigLIPBackbone": Case(
        build=_siglip,
        inputs=_siglip_inputs,
        note="Returns a dict of (batch, batch) logits; token_ids must be "
        "exactly max_sequence_length long.",
    ),
    "PaliGemmaBackbone": Case(
        build=_pali_gemma,
        inputs=_pali_gemma_inputs,
        note="Output covers image tokens then text tokens.",
    ),
    "Gemma3nBackbone": Case(
        build=_gemma3n,
        inputs=_gemma3n_inputs,
        slow=True,
        note="Text + MobileNetV5 vision + conformer audio; placeholder "
        "tokens 49 (image) and 57 (audio) take the encoder features, 48 and "
        "56 use the vision/audio vocab embeddings. Model inputs are a list, "
        "called with a dict by name.",
    ),
    "PARSeqBackbone": Case(
        build=_parseq,
        inputs=_parseq_inputs,
        note="Output is (batch, tokens, vocabulary_size - 2) logits.",
    ),
    "SAMBackbone": Case(
        build=_sam,
        inputs=_sam_inputs,
        note="Returns a dict (image and prompt embeddings); the mask "
        "decoder is held by the backbone but never called.",
    ),
    "SAM3PromptableConceptBackbone": Case(
        build=_sam3,
        inputs=_sam3_inputs,
        slow=True,
        note="Returns a dict (masks, boxes, logits, semantic segs). The "
        "last FPN level (scale 0.5) is computed but dropped, so its convs "
        "do not reach the outputs; the ViT's pretrain position embedding "
        "is only used to initialise the tiled one. Batch size 1, box "
        "labels all 1 (see the inputs). Box prompts use roi_align, which "
        "needs torchvision on the torch backend.",
        needs={"torch": "torchvision"},
    ),
    "StableDiffusion3Backbone": Case(
        build=_sd3,
        inputs=_sd3_inputs,
        slow=True,
        note="Diffusion: 'latents' is the VAE encoding of 'images'; "
        "'images' decodes one guided Euler step (step 0 of num_steps) from "
        "the input latents. No T5, so the context is zero-padded to 4096.",
    ),
    "FluxBackbone": Case(
        build=_flux,
        inputs=_flux_inputs,
        note="Diffusion transformer only (no VAE or text encoders); "
        "predicts the flow for the image tokens, (batch, 16, 16).",
    ),
    "VideoPrismBackbone": Case(
        build=_video_prism,
        inputs=_video_prism_inputs,
        note="Video + text towers; returns a dict of (batch, hidden) "
        "vision and text embeddings.",
    ),
}
