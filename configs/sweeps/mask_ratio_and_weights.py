"""Grid over the mask ratio and the identity loss weight (3 x 2 = 6 runs).

    python -m dfrec_jax sweep --config configs/demo.py \
        --sweep configs/sweeps/mask_ratio_and_weights.py --workdir runs/sweep [--dry_run]

The TIRM's channel fusion needs one identity token per visible patch, so each point also sets
`model.sirm.identity_tokens` from the config it applies to (image size, patch size, the point's
mask ratio); with fusion "sequence" any token count works and the config's own is kept.
"""

from dfrec_jax import masking

MASK_RATIOS = (0.25, 0.5, 0.75)
IDENTITY_WEIGHTS = (0.5, 1.0)


def identity_tokens(config) -> int:
    """sirm.identity_tokens that matches config.model.mask_ratio (visible patches)."""
    model = config.model
    if model.tirm.fusion != "channel":
        return model.sirm.identity_tokens
    patches = (model.image_size // model.patch_size) ** 2
    return patches - masking.num_masked(patches, model.mask_ratio)


def get_sweep(arg=None):
    del arg  # no variants
    return [
        {
            "model.mask_ratio": ratio,
            "model.sirm.identity_tokens": identity_tokens,
            "loss.weights.identity": weight,
        }
        for ratio in MASK_RATIOS
        for weight in IDENTITY_WEIGHTS
    ]
