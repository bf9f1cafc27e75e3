"""DFREC as the paper describes it: 224x224, patch 16, mask ratio 0.5, ViT-B/16 MAE.

Where the paper is silent (UNet widths, decoder depth) we take the released code's widths
and the standard MAE decoder (8 blocks, width 512, 16 heads); see README "Design choices".
Arg: `dtype=bfloat16` for bf16 compute with fp32 params.
"""

import ml_collections

from dfrec_jax import configlib


def model_config(image_size=224, patch_size=16, mask_ratio=0.5, dtype="float32"):
    num_patches = (image_size // patch_size) ** 2
    visible = num_patches - int(num_patches * mask_ratio)
    return ml_collections.ConfigDict(
        dict(
            image_size=image_size,
            patch_size=patch_size,
            mask_ratio=mask_ratio,
            masking_variant="paper",
            dtype=dtype,
            ism=dict(
                atrous_rates=(12, 24, 36),
                decoder_channels=256,
                low_level_channels=48,
                stochastic_depth_rate=0.2,
                dropout_rate=0.5,
            ),
            sirm=dict(
                channels=(32, 64, 128, 256, 1024),
                source_channels=512,
                identity_tokens=visible,
                gate="paper",
            ),
            tirm=dict(
                encoder_width=768,
                encoder_depth=12,
                encoder_heads=12,
                encoder_mlp_dim=3072,
                decoder_width=512,
                decoder_depth=8,
                decoder_heads=16,
                decoder_mlp_dim=2048,
                pos_embed="sincos",
                decoder_pos_embed="sincos",
                fusion="channel",
            ),
        )
    )


def get_config(arg=None):
    arg = configlib.parse_arg(arg, dtype="float32")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = model_config(dtype=arg.dtype)
    config.data = dict(lfw_dir=configlib.lfw_dir())
    return config
