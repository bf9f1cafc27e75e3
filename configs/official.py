"""The authors' released model (botianzhe/DFREC, checkpoint splitidentity_ftm.pth).

Differences from the paper (DFREC_FACTS.md): torchvision ViT-L/16 encoder with learned
position embeddings; a 1-block fusion decoder of width 512 / 16 heads whose input is the
encoder width + 196 identity features; SIRM gates x * (psi + q); masking by patch sums with
the all-random fallback. Masking indices are applied to patch tokens, not shifted by the
class token (the released code's off-by-one is not reproduced; README explains).
"""

from configs import default
from dfrec_jax import configlib


def get_config(arg=None):
    """Args as in default.py: `dtype=`, `dataset=`, `method=`."""
    arg = configlib.parse_arg(arg, dtype="float32", dataset="lfw_swap", method="")
    config = default.get_config(f"dtype={arg.dtype},dataset={arg.dataset},method={arg.method}")
    model = config.model
    model.masking_variant = "official"
    model.sirm.gate = "official"
    model.tirm.update(
        encoder_width=1024,
        encoder_depth=24,
        encoder_heads=16,
        encoder_mlp_dim=4096,
        decoder_width=512,
        decoder_depth=1,
        decoder_heads=16,
        decoder_mlp_dim=2048,
        pos_embed="learned",
        decoder_pos_embed="learned",
        fusion="channel",
    )
    config.lock()  # a typo'd key in an override is an error, not a new key
    return config
