"""Per-sample metrics of the evaluation tables and the rules that aggregate them.

Image metrics (`psnr`, `ssim`) run on device under `jax.jit`; the rest are host-side NumPy on
per-sample vectors the runner has already gathered. Undefined values are NaN, never an
exception, so one odd sample cannot abort a long evaluation; `finite_mean` / `summary` then
average only the finite values and report how many there were.
"""

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from dfrec_jax.pretrained import inception_fid


def _unit_images(x, what: str) -> jax.Array:
    """float32 [B,H,W,C] in [0,1] (uint8 is divided by 255; floats are taken as they are)."""
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"{what} must be images [B,H,W,C], got shape {x.shape}")
    if x.dtype == jnp.uint8:
        return x.astype(jnp.float32) / 255.0
    return x.astype(jnp.float32)


@jax.jit
def psnr(a, b) -> jax.Array:
    """[B] PSNR in dB of images [B,H,W,3] in [0,1] (or uint8), peak value 1.

    Identical images give +inf (dm_pix computes -10 log10(0)); it is kept, not clipped, so the
    table can say such samples exist: `finite_mean` / `summary` leave them out of the mean.
    """
    return pix.psnr(_unit_images(a, "psnr a"), _unit_images(b, "psnr b"))


@jax.jit
def ssim(a, b) -> jax.Array:
    """[B] mean SSIM (Wang et al. 2004) of images [B,H,W,3] in [0,1] (or uint8).

    dm_pix defaults: 11x11 Gaussian window with sigma 1.5 over the valid region, K1 = 0.01,
    K2 = 0.03, max_val 1, the map averaged over pixels and channels. Images need H, W >= 11.
    The window is dm_pix's, applied by `_gaussian_window` (same values up to float rounding).
    """
    a, b = _unit_images(a, "ssim a"), _unit_images(b, "ssim b")
    return pix.ssim(a, b, filter_fn=_gaussian_window)


SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # dm_pix's defaults


def _gaussian_window(z: jax.Array) -> jax.Array:
    """dm_pix's SSIM window on [B,H,W,C]: the normalised 11-tap Gaussian (sigma 1.5) along
    each spatial axis over the valid region (dm_pix filters W then H; here H then W, the same
    up to float rounding), each pass one matmul with a banded [out, in] matrix. dm_pix's own
    filter runs one 1-D convolution per image row (vmapped `jnp.convolve`), slow on XLA:CPU:
    SSIM of an eval batch's 64 pairs at 112 px took 303 ms, 58 ms this way."""
    taps = np.arange(SSIM_WINDOW) - SSIM_WINDOW // 2
    weights = np.exp(-0.5 * (taps / SSIM_SIGMA) ** 2)
    weights /= weights.sum()  # symmetric: convolution and correlation agree

    def banded(n_in: int) -> np.ndarray:
        n_out = n_in - SSIM_WINDOW + 1
        matrix = np.zeros((n_out, n_in), np.float32)
        for i in range(n_out):
            matrix[i, i : i + SSIM_WINDOW] = weights
        return matrix

    z = jnp.einsum("oh,bhwc->bowc", banded(z.shape[1]), z, precision="highest")
    return jnp.einsum("ow,bhwc->bhoc", banded(z.shape[2]), z, precision="highest")


def _binary_mask(mask, what: str) -> np.ndarray:
    """bool [B,H,W] from [B,H,W] or [B,H,W,1]: bool as is, uint8 > 127, floating > 0.5."""
    mask = np.asarray(mask)
    if mask.ndim == 4 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 3:
        raise ValueError(f"{what} must be masks [B,H,W] or [B,H,W,1], got shape {mask.shape}")
    if mask.dtype == np.bool_:
        return mask
    if mask.dtype == np.uint8:
        return mask > 127
    if np.issubdtype(mask.dtype, np.floating):
        return mask > 0.5
    raise TypeError(f"{what} must be bool, uint8 (0/255) or float in [0,1], got {mask.dtype}")


def mask_iou(pred, true) -> np.ndarray:
    """float64 [B] intersection over union of binary masks; NaN where the union is empty.

    Either mask may be bool (as is), uint8 0/255 (> 127 is inside) or float in [0,1] such as
    predicted probabilities (> 0.5 is inside), shaped [B,H,W] or [B,H,W,1]. An empty union
    (no manipulated pixels and none predicted) makes IoU undefined, hence NaN, excluded by
    `finite_mean`, rather than a 1.0 that would inflate the score on pristine images.
    """
    p, t = _binary_mask(pred, "mask_iou pred"), _binary_mask(true, "mask_iou true")
    if p.shape != t.shape:
        raise ValueError(f"mask_iou: pred {p.shape} and true {t.shape} masks differ in shape")
    inter = np.sum(p & t, axis=(1, 2), dtype=np.float64)
    union = np.sum(p | t, axis=(1, 2), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


def _binary_labels(labels, n: int, what: str) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1)
    if labels.shape != (n,):
        raise ValueError(f"{what}: {labels.size} labels for {n} scores")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{what}: labels must be 0 (pristine) or 1 (forgery)")
    return labels.astype(np.int64)


def _finite_vector(values, what: str) -> np.ndarray:
    values = np.asarray(values, np.float64).reshape(-1)
    if not np.isfinite(values).all():
        raise ValueError(f"{what}: {np.sum(~np.isfinite(values))} non-finite values")
    return values


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve of scores (higher = forgery) against labels (1 = forgery).

    The Mann-Whitney statistic: the fraction of (forgery, pristine) pairs the scores order
    correctly, ties counting 1/2 (the same number as sklearn's roc_auc_score), from average
    ranks in O(n log n). NaN when only one class is present; non-finite scores raise
    ValueError because their rank would be arbitrary.
    """
    scores = _finite_vector(scores, "roc_auc scores")
    labels = _binary_labels(labels, scores.size, "roc_auc")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = scipy.stats.rankdata(scores)[labels == 1].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def recovery_accuracy(similarity, labels, threshold: float = 0.9) -> float:
    """The paper's recovery accuracy: the fraction of inputs classified correctly by the rule
    IDSim(input, recovered target) > threshold => pristine (0), else forgery (1).

    A similarity exactly at the threshold counts as forgery (strict >, as in the paper). NaN
    for no samples; non-finite similarities raise ValueError.
    """
    similarity = _finite_vector(similarity, "recovery_accuracy similarity")
    labels = _binary_labels(labels, similarity.size, "recovery_accuracy")
    if similarity.size == 0:
        return float("nan")
    predicted = np.where(similarity > threshold, 0, 1)
    return float(np.mean(predicted == labels))


def finite_mean(values) -> float:
    """Mean over the finite entries (NaN = undefined, inf = e.g. PSNR of identical images);
    NaN when there are none."""
    values = np.asarray(values, np.float64).reshape(-1)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def summary(values) -> dict:
    """{"mean", "std", "n"} over the finite entries; std is the population std (ddof=0); n is
    the finite count, so n below the sample count tells the reader values were undefined."""
    values = np.asarray(values, np.float64).reshape(-1)
    finite = values[np.isfinite(values)]
    if not finite.size:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "n": int(finite.size)}


def fid(features_a, features_b) -> float:
    """FID between Inception feature sets [N1,2048] and [N2,2048]
    (`inception_fid.fid_from_features`); NaN when either set has fewer than 2 samples (no
    covariance), e.g. a method with a single example in a small split."""
    a, b = np.asarray(features_a), np.asarray(features_b)
    if a.shape[0] < 2 or b.shape[0] < 2:
        return float("nan")
    return inception_fid.fid_from_features(a, b)
