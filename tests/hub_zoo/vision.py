"""Small image backbones from keras-hub (CNNs, ViTs, detectors, segmenters).

Every `build()` makes a fresh, randomly initialised model of the real
`keras_hub.models` class; composite models (RetinaNet, BASNet, DeepLabV3,
SegFormer, DepthAnything, D-FINE) build their own small image encoder
inside. Inputs are float32 images in [0, 1), batch size 2, from a fixed
NumPy seed. Drop-path and dropout rates are set to zero where the class
exposes them (MiT's and SegFormer's Mix-FFN dropout is fixed at 0.1).
"""

import keras
import keras_hub
import numpy as np

from hub_zoo import Case

_BATCH = 2


def _images(size, seed):
    """A `(2, size, size, 3)` float32 batch in [0, 1)."""
    rng = np.random.default_rng(seed)
    return rng.random((_BATCH, size, size, 3), dtype=np.float32)


def _resnet(filters, blocks, strides, block_type="basic_block", stem=(64,)):
    """A small ResNet; keras-hub requires 64 filters in its first stack."""
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=list(stem),
        input_conv_kernel_sizes=[3] * len(stem),
        stackwise_num_filters=filters,
        stackwise_num_blocks=blocks,
        stackwise_num_strides=strides,
        block_type=block_type,
    )


def _mit(image_size):
    """A two-level Mix Transformer (SegFormer's encoder)."""
    return keras_hub.models.MiTBackbone(
        layerwise_depths=[1, 1],
        num_layers=2,
        layerwise_num_heads=[1, 2],
        layerwise_sr_ratios=[4, 2],
        max_drop_path_rate=0.0,
        layerwise_patch_sizes=[7, 3],
        layerwise_strides=[4, 2],
        image_shape=(image_size, image_size, 3),
        hidden_dims=[8, 16],
    )


def _dinov2(image_size, **kwargs):
    """A two-layer DINOv2 with 4x4 patches and no position interpolation."""
    return keras_hub.models.DINOV2Backbone(
        patch_size=4,
        num_layers=2,
        hidden_dim=16,
        num_heads=2,
        intermediate_dim=32,
        image_shape=(image_size, image_size, 3),
        position_embedding_shape=(image_size, image_size, 3),
        **kwargs,
    )


def _hgnetv2(**kwargs):
    """A two-stage HGNetV2 returning a dict of feature maps."""
    return keras_hub.models.HGNetV2Backbone(
        depths=[1, 1],
        embedding_size=16,
        hidden_sizes=[16, 24],
        stem_channels=[3, 8, 16],
        hidden_act="relu",
        use_learnable_affine_block=True,
        stackwise_stage_filters=[
            (16, 8, 16, 1, 2, 3),
            (16, 8, 24, 1, 1, 3),
        ],
        apply_downsample=[False, True],
        use_lightweight_conv_block=[False, True],
        **kwargs,
    )


# --- Plain convolutional classifiers ---------------------------------------


def _build_resnet():
    return _resnet(
        filters=[64, 16], blocks=[1, 1], strides=[1, 2], stem=(16, 64)
    )


def _build_cspnet():
    return keras_hub.models.CSPNetBackbone(
        stem_filters=16,
        stem_kernel_size=3,
        stem_strides=2,
        stackwise_depth=[1, 1],
        stackwise_strides=2,
        stackwise_num_filters=[16, 32],
        block_type="bottleneck_block",
        stage_type="csp",
        # The split half of the expanded features feeds the blocks, so
        # block_ratio must be expand_ratio / 2.
        expand_ratio=2.0,
        block_ratio=1.0,
        bottle_ratio=0.5,
        stem_padding="same",
    )


def _build_densenet():
    return keras_hub.models.DenseNetBackbone(
        stackwise_num_repeats=[1, 2],
        growth_rate=8,
        image_shape=(32, 32, 3),
    )


def _build_efficientnet():
    # One fused-MBConv stack, then one MBConv stack with squeeze-excite.
    return keras_hub.models.EfficientNetBackbone(
        stackwise_width_coefficients=[1.0, 1.0],
        stackwise_depth_coefficients=[1.0, 1.0],
        stackwise_kernel_sizes=[3, 3],
        stackwise_num_repeats=[1, 2],
        stackwise_input_filters=[8, 16],
        stackwise_output_filters=[16, 24],
        stackwise_expansion_ratios=[1, 4],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.25],
        stackwise_strides=[1, 2],
        stackwise_block_types=["fused", "unfused"],
        stackwise_force_input_filters=[0, 0],
        stackwise_nores_option=[False, False],
        dropout=0.0,
        # keras-hub's get_config leaves num_features out, so only the
        # default (1280) survives a rebuild from the config.
        num_features=1280,
    )


def _build_mobilenet():
    return keras_hub.models.MobileNetBackbone(
        stackwise_expansion=[[32], [48, 48]],
        stackwise_num_blocks=[1, 2],
        stackwise_num_filters=[[16], [24, 24]],
        stackwise_kernel_size=[[3], [5, 5]],
        stackwise_num_strides=[[2], [1, 1]],
        stackwise_se_ratio=[[None], [0.25, 0.25]],
        stackwise_activation=[["relu"], ["hard_swish", "hard_swish"]],
        stackwise_padding=[[1], [2, 2]],
        output_num_filters=64,
        depthwise_filters=16,
        depthwise_stride=1,
        depthwise_residual=True,
        last_layer_filter=48,
        squeeze_and_excite=0.5,
        image_shape=(32, 32, 3),
        input_num_filters=16,
    )


def _build_mobilenetv5():
    # An edge-residual stage, then a universal-inverted-residual block and
    # a multi-query attention block, fused by the multi-scale adapter.
    return keras_hub.models.MobileNetV5Backbone(
        stackwise_block_types=[["er"], ["uir", "mqa"]],
        stackwise_num_blocks=[1, 2],
        stackwise_num_filters=[[16], [32, 32]],
        stackwise_strides=[[2], [2, 1]],
        stackwise_act_layers=[["relu"], ["gelu", "gelu"]],
        stackwise_exp_ratios=[[3.0], [4.0, 0.0]],
        stackwise_se_ratios=[[0.0], [0.0, 0.0]],
        stackwise_dw_kernel_sizes=[[0], [3, 0]],
        stackwise_dw_start_kernel_sizes=[[0], [3, 0]],
        stackwise_dw_end_kernel_sizes=[[0], [0, 0]],
        stackwise_exp_kernel_sizes=[[3], [0, 0]],
        stackwise_pw_kernel_sizes=[[1], [0, 0]],
        stackwise_num_heads=[[0], [0, 2]],
        stackwise_key_dims=[[0], [0, 8]],
        stackwise_value_dims=[[0], [0, 8]],
        stackwise_kv_strides=[[0], [0, 2]],
        stackwise_use_cpe=[[False], [False, False]],
        stem_size=16,
        num_features=32,
        use_msfa=True,
        msfa_indices=(-2, -1),
        msfa_output_resolution=4,
        image_shape=(32, 32, 3),
    )


def _build_vgg():
    return keras_hub.models.VGGBackbone(
        stackwise_num_repeats=[1, 2],
        stackwise_num_filters=[8, 16],
        image_shape=(32, 32, 3),
    )


def _build_xception():
    # Entry conv block, one residual separable block, one exit block.
    return keras_hub.models.XceptionBackbone(
        stackwise_conv_filters=[[8, 16], [24, 24], [32]],
        stackwise_pooling=[False, True, False],
    )


def _build_hgnetv2():
    return _hgnetv2(image_shape=(32, 32, 3))


# --- Vision transformers ----------------------------------------------------


def _build_vit():
    return keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
    )


def _build_deit():
    return keras_hub.models.DeiTBackbone(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
    )


def _build_dinov2():
    # Register tokens and the SwiGLU feed-forward; no (unused) mask token.
    return _dinov2(
        32, num_register_tokens=2, use_swiglu_ffn=True, use_mask_token=False
    )


def _build_dinov3():
    return keras_hub.models.DINOV3Backbone(
        patch_size=8,
        num_layers=2,
        hidden_dim=16,
        num_heads=2,
        intermediate_dim=32,
        num_register_tokens=2,
        use_mask_token=False,
        use_gated_mlp=True,
        image_shape=(32, 32, 3),
    )


def _build_swin():
    return keras_hub.models.SwinTransformerBackbone(
        image_shape=(32, 32, 3),
        embed_dim=16,
        depths=(2, 2),
        num_heads=(2, 4),
        window_size=4,
        patch_size=2,
        mlp_ratio=2.0,
        drop_path=0.0,
    )


def _build_vitdet():
    # Layer 0 uses windowed attention, layer 1 global attention.
    return keras_hub.models.ViTDetBackbone(
        hidden_size=16,
        num_layers=2,
        intermediate_dim=32,
        num_heads=2,
        global_attention_layer_indices=[1],
        image_shape=(32, 32, 3),
        patch_size=4,
        num_output_channels=8,
        window_size=4,
    )


def _build_mit():
    return _mit(32)


# --- Dense prediction and detection -----------------------------------------


def _build_retinanet():
    encoder = _resnet(
        filters=[64, 16, 16, 16], blocks=[1, 1, 1, 1], strides=[1, 2, 2, 2]
    )
    # FPN levels P3..P6; P6 is computed from the raw P5 features.
    return keras_hub.models.RetinaNetBackbone(
        image_encoder=encoder, min_level=3, max_level=6, use_p5=True
    )


def _build_basnet():
    # basic_block_vd gives the first ResNet stack a projection shortcut,
    # so the stem (and BASNet's projection) can be 8 filters wide instead
    # of 64. BASNet needs all four ResNet stacks.
    encoder = _resnet(
        filters=[64, 16, 16, 16],
        blocks=[1, 1, 1, 1],
        strides=[1, 2, 2, 2],
        block_type="basic_block_vd",
        stem=(8,),
    )
    return keras_hub.models.BASNetBackbone(
        image_encoder=encoder,
        num_classes=2,
        image_shape=(32, 32, 3),
        projection_filters=8,
    )


def _build_deeplabv3():
    encoder = _resnet(filters=[64, 16, 16], blocks=[1, 1, 1], strides=[1, 2, 2])
    return keras_hub.models.DeepLabV3Backbone(
        image_encoder=encoder,
        spatial_pyramid_pooling_key="P4",
        upsampling_size=2,
        dilation_rates=[1, 2],
        low_level_feature_key="P3",
        projection_filters=16,
        image_shape=(32, 32, 3),
    )


def _build_segformer():
    return keras_hub.models.SegFormerBackbone(
        image_encoder=_mit(32), projection_filters=16
    )


def _build_depth_anything():
    encoder = _dinov2(32, apply_layernorm=True, use_mask_token=False)
    # Two DINOv2 layers reassembled at 2x and 1x of the 8x8 patch grid.
    return keras_hub.models.DepthAnythingBackbone(
        image_encoder=encoder,
        reassemble_factors=[2, 1],
        neck_hidden_dims=[8, 16],
        fusion_hidden_dim=16,
        head_hidden_dim=8,
        head_in_index=-1,
        feature_keys=["stage1", "stage2"],
    )


def _build_dfine():
    encoder = _hgnetv2(out_features=["stage1", "stage2"])
    return keras_hub.models.DFineBackbone(
        backbone=encoder,
        decoder_in_channels=[16, 16],
        encoder_hidden_dim=16,
        num_labels=3,
        num_denoising=0,
        learn_initial_query=False,
        num_queries=6,
        anchor_image_size=(32, 32),
        feat_strides=[4, 8],
        num_feature_levels=2,
        hidden_dim=16,
        encoder_in_channels=[16, 24],
        encode_proj_layers=[1],
        num_attention_heads=2,
        encoder_ffn_dim=32,
        num_encoder_layers=1,
        hidden_expansion=0.5,
        depth_multiplier=0.5,
        eval_idx=-1,
        num_decoder_layers=2,
        decoder_attention_heads=2,
        decoder_ffn_dim=32,
        decoder_n_points=[2, 2],
        lqe_hidden_dim=8,
        num_lqe_layers=2,
        out_features=["stage1", "stage2"],
        seed=0,
    )


def _build_feature_pyramid():
    # The base class has no architecture of its own; it is built here
    # through the functional constructor it inherits from `keras.Model`.
    images = keras.Input((None, None, 3), name="images")
    p1 = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="p1")(images)
    p1 = keras.layers.Activation("relu")(p1)
    p2 = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="p2")(p1)
    model = keras_hub.models.FeaturePyramidBackbone(
        inputs=images, outputs=p2, name="feature_pyramid"
    )
    model.pyramid_outputs = {"P1": p1, "P2": p2}
    return model


def _case(build, size, seed, key=None, **kwargs):
    """A `Case` whose inputs are a `size`x`size` image batch."""

    def inputs():
        images = _images(size, seed)
        return images if key is None else {key: images}

    return Case(build=build, inputs=inputs, **kwargs)


_BN = "uses BatchNormalization"
_MIX_FFN = (
    "the Mix-FFN blocks hold a fixed Dropout(0.1), so training=True "
    "calls are random"
)

CASES = {
    "BASNetBackbone": _case(
        _build_basnet,
        32,
        1,
        slow=True,
        note=_BN + "; returns a dict of 8 sigmoid maps (refine_out, "
        "predict_out_1..7); the ResNet's stem (conv1_conv, conv1_bn) is "
        "never called: BASNet re-enters the ResNet graph at stack0",
    ),
    "CSPNetBackbone": _case(_build_cspnet, 32, 2, note=_BN),
    "DFineBackbone": _case(
        _build_dfine,
        32,
        3,
        slow=True,
        note=_BN + " (HGNetV2 encoder and input projections); returns a "
        "nested dict of decoder/encoder outputs; no denoising "
        "(labels=None); the box heads' last Dense layers start at zero, so "
        "the layers before them (enc_bbox_head, decoder bbox_embed_*, "
        "lqe reg_conf) have no effect on the output at init",
    ),
    "DINOV2Backbone": _case(_build_dinov2, 32, 4, key="images"),
    "DINOV3Backbone": _case(_build_dinov3, 32, 5, key="pixel_values"),
    "DeepLabV3Backbone": _case(
        _build_deeplabv3,
        32,
        6,
        note=_BN,
    ),
    "DeiTBackbone": _case(_build_deit, 32, 7),
    "DenseNetBackbone": _case(_build_densenet, 32, 8, note=_BN),
    "DepthAnythingBackbone": _case(
        _build_depth_anything,
        32,
        9,
        note="the first fusion stage's residual_layer1 is never called",
    ),
    "EfficientNetBackbone": _case(_build_efficientnet, 32, 10, note=_BN),
    "HGNetV2Backbone": _case(
        _build_hgnetv2, 32, 11, note=_BN + "; returns a dict of feature maps"
    ),
    "MiTBackbone": _case(_build_mit, 32, 12, note=_MIX_FFN),
    "MobileNetBackbone": _case(_build_mobilenet, 32, 13, note=_BN),
    "MobileNetV5Backbone": _case(_build_mobilenetv5, 32, 14),
    "ResNetBackbone": _case(_build_resnet, 32, 15, note=_BN),
    "RetinaNetBackbone": _case(
        _build_retinanet,
        64,
        16,
        note=_BN + " (ResNet encoder); returns a dict P3..P6 of 256-channel "
        "maps (the FPN width is fixed)",
    ),
    "SegFormerBackbone": _case(
        _build_segformer, 32, 17, note=_BN + " (fuse head); " + _MIX_FFN
    ),
    "SwinTransformerBackbone": _case(
        _build_swin,
        32,
        18,
        note="Keras warns once that WindowAttention drops a mask: the "
        "shifted-window attention mask goes in as `mask=`; harmless",
    ),
    "VGGBackbone": _case(_build_vgg, 32, 19),
    "ViTBackbone": _case(_build_vit, 32, 20),
    "ViTDetBackbone": _case(_build_vitdet, 32, 21),
    "XceptionBackbone": _case(_build_xception, 32, 22, note=_BN),
    "FeaturePyramidBackbone": _case(
        _build_feature_pyramid,
        32,
        23,
        note="base class built with the functional constructor (two "
        "convs); get_config() holds no architecture, so from_config() "
        "cannot rebuild it",
    ),
}
