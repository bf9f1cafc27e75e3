"""Grid over the mask ratio and the identity loss weight (3 x 2 = 6 runs).

    python -m dfrec_jax sweep --config configs/demo.py \
        --sweep configs/sweeps/mask_ratio_and_weights.py --workdir runs/sweep [--dry_run]

The SIRM's identity rows follow the mask ratio by themselves (`model.sirm.identity_tokens=0`,
derived when the model is built: one per visible patch, as the TIRM's channel fusion needs).
"""

MASK_RATIOS = (0.25, 0.5, 0.75)
IDENTITY_WEIGHTS = (0.5, 1.0)


def get_sweep(arg=None):
    del arg  # no variants
    return [
        {"model.mask_ratio": ratio, "loss.weights.identity": weight}
        for ratio in MASK_RATIOS
        for weight in IDENTITY_WEIGHTS
    ]
