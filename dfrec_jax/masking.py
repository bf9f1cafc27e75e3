"""Semantic-guided masking for the TIRM's masked autoencoder, with static shapes.

The identity segmentation map ``seg`` (probability that a pixel carries source
information) decides which patches the MAE masks. Every output has a shape fixed
by ``patch_size`` and ``mask_ratio`` alone, so the function works under
``jax.jit`` (with those two and ``variant`` static) and ``jax.vmap``.

Two variants, selected by ``variant``:

``"paper"`` -- Algorithm 1 of the paper. Each patch's weight is the mean of the
    map over its pixels; weights below 0.5 are replaced by U[0, 0.1) noise; the
    patches are sorted by weight in descending order and the first
    ``K = int(N * mask_ratio)`` are masked. With a noisy, untrained map the
    masking is random; with a good map it masks the source-related patches
    (they always outrank the noise, since their weight is >= 0.5).
    Uniform-map fallback (not in Algorithm 1, taken from the released rule):
    if an image's mean patch weight reaches ``UNIFORM_MAP_MEAN`` (250/256,
    the released threshold as a per-pixel mean), every patch gets U[0, 0.1)
    noise and the masking is fully random. Without it a map that is ~1
    everywhere (a pristine face, see below) would tie and mask the top rows.

``"official"`` -- the rule of the authors' released inference code. Each
    patch's weight is the SUM of the map over its pixels (0..p*p). If an
    image's mean patch sum reaches ``all_random_thr`` every patch gets U[0, 1)
    noise (fully random masking); otherwise patches whose sum is at most
    ``low_thr`` get U[0, 1) noise. Patches are sorted ascending, the lowest
    ``N - K`` are kept and the highest ``K`` masked. The released code uses
    ``all_random_thr = 250`` and ``low_thr = 50`` for 16x16 patches (256
    pixels); here both scale with the patch area (``thr * p*p / 256``) so that
    the same fraction of a patch triggers them at other patch sizes, and they
    equal the released values exactly at ``p = 16``.

Pristine convention (shared with the data and the ISM): the map is the
probability that a pixel carries the SOURCE identity, and a pristine face is its
own source, so its true map is 1 everywhere (the data write mask 255 for
pristine faces). The SIRM then sees the whole face (``image * seg``) and both
variants fall back to fully random masking, so the TIRM reconstructs random
patches of the real face from the visible ones and the identity features.

Index convention: the released code applies the kept indices to a token
sequence that starts with a class token, without a +1 offset, so it actually
keeps the class token plus patches shifted by one (a likely off-by-one). This
project applies ``keep_idx`` / ``mask_idx`` to the patch tokens only; the
encoder handles the class token separately. The off-by-one is reproduced only
where asked, by the TIRM's ``token_indexing="released"`` (configs/official.py
``exact=released``); the indices chosen here are the same either way.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

VARIANTS = ("paper", "official")

# Released-code thresholds, defined for 16x16 = 256-pixel patches.
_OFFICIAL_ALL_RANDOM_THR = 250.0
_OFFICIAL_LOW_THR = 50.0
_OFFICIAL_PATCH_AREA = 256.0
# Both variants: an image whose mean map value reaches this is "uniform" -> fully random masking.
UNIFORM_MAP_MEAN = _OFFICIAL_ALL_RANDOM_THR / _OFFICIAL_PATCH_AREA


@flax.struct.dataclass
class MaskingResult:
    """Which patches are masked. A pytree, so it passes through jit/vmap."""

    mask_idx: jax.Array  # int32 [B, K]: masked patches.
    keep_idx: jax.Array  # int32 [B, N-K]: visible patches.
    mask: jax.Array  # bool [B, N]: True = masked.


def num_masked(num_patches: int, mask_ratio: float) -> int:
    """Number of masked patches K = int(N * mask_ratio); needs 0 < K < N."""
    k = int(num_patches * mask_ratio)
    if not 0 < k < num_patches:
        raise ValueError(
            f"mask_ratio={mask_ratio} masks {k} of {num_patches} patches; "
            f"it must mask at least one patch and keep at least one."
        )
    return k


def _check_divisible(height: int, width: int, patch_size: int) -> None:
    if patch_size <= 0 or height % patch_size or width % patch_size:
        raise ValueError(
            f"image size {height}x{width} is not divisible by patch_size={patch_size}."
        )


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """[B, H, W, C] -> [B, N, p*p*C]; patches row-major, pixels in (py, px, c) order."""
    images = jnp.asarray(images)
    b, h, w, c = images.shape
    p = patch_size
    _check_divisible(h, w, p)
    x = images.reshape(b, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, h, w, py, px, C]
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, height: int, width: int) -> jax.Array:
    """Inverse of `patchify`: [B, N, p*p*C] -> [B, H, W, C]."""
    patches = jnp.asarray(patches)
    b, n, d = patches.shape
    p = patch_size
    _check_divisible(height, width, p)
    gh, gw = height // p, width // p
    if n != gh * gw or d % (p * p):
        raise ValueError(
            f"patches of shape {patches.shape} do not tile a {height}x{width} image "
            f"with patch_size={p}."
        )
    c = d // (p * p)
    x = patches.reshape(b, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


def _as_bhw1(seg: jax.Array) -> jax.Array:
    """Accepts [B, H, W] or [B, H, W, 1]; returns float32 [B, H, W, 1]."""
    seg = jnp.asarray(seg)
    if seg.ndim == 3:
        seg = seg[..., None]
    if seg.ndim != 4 or seg.shape[-1] != 1:
        raise ValueError(f"seg must be [B, H, W] or [B, H, W, 1], got shape {seg.shape}.")
    return seg.astype(jnp.float32)


def patch_weights(seg: jax.Array, patch_size: int, reduce: str) -> jax.Array:
    """Per-patch mean or sum of a 1-channel map: float32 [B, N]."""
    pixels = patchify(_as_bhw1(seg), patch_size)  # [B, N, p*p]
    if reduce == "mean":
        return jnp.mean(pixels, axis=-1)
    if reduce == "sum":
        return jnp.sum(pixels, axis=-1)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}.")


def take_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, N, D], idx [B, M] -> x[b, idx[b, m]] as [B, M, D]."""
    return jnp.take_along_axis(x, idx[..., None], axis=1)


def scatter_tokens(base: jax.Array, idx: jax.Array, values: jax.Array) -> jax.Array:
    """Replaces rows idx[b, m] of base [B, N, D] by values [B, M, D] (differentiable).

    One scatter per example under vmap: the batch axis stays a batch dimension of the
    scatter, so a data-parallel step keeps it sharded. An explicit batch index
    (`base.at[arange(B)[:, None], idx]`) hides it from XLA's partitioner, which then
    all-gathers the global batch's tokens on every device (and all-reduces them backward).
    """
    values = values.astype(base.dtype)
    return jax.vmap(lambda row, i, v: row.at[i].set(v))(base, idx, values)


def _paper_order(seg: jax.Array, rng: jax.Array, patch_size: int) -> jax.Array:
    """Patch order, most-to-be-masked first (Algorithm 1 + the uniform-map fallback)."""
    w = patch_weights(seg, patch_size, "mean")
    noise = jax.random.uniform(rng, w.shape, minval=0.0, maxval=0.1)
    uniform = jnp.mean(w, axis=-1, keepdims=True) >= UNIFORM_MAP_MEAN
    w = jnp.where(uniform | (w < 0.5), noise, w)
    return jnp.argsort(-w, axis=-1, stable=True)


def _official_order(
    seg: jax.Array, rng: jax.Array, patch_size: int, all_random_thr: jax.Array | None = None
) -> jax.Array:
    """Patch order, most-to-be-kept first (released code, thresholds per patch area)."""
    s = patch_weights(seg, patch_size, "sum")
    scale = patch_size * patch_size / _OFFICIAL_PATCH_AREA
    noise = jax.random.uniform(rng, s.shape)
    if all_random_thr is None:
        all_random_thr = _OFFICIAL_ALL_RANDOM_THR * scale
    all_random = jnp.mean(s, axis=-1, keepdims=True) >= all_random_thr
    w = jnp.where(all_random | (s <= _OFFICIAL_LOW_THR * scale), noise, s)
    return jnp.argsort(w, axis=-1, stable=True)


def learned_all_random_threshold(raw: jax.Array, patch_size: int) -> jax.Array:
    """The release's MAE(para=True) threshold: sigmoid(raw) * 256 for 16x16 patches (here
    sigmoid(raw) * p*p, the patch area, as the fixed thresholds scale). `raw` is initialised
    to 250 there, i.e. ~ the whole patch area: all-random only for a map that is 1 everywhere."""
    return jax.nn.sigmoid(jnp.asarray(raw, jnp.float32)) * float(patch_size * patch_size)


def semantic_guided_masking(
    seg: jax.Array,
    rng: jax.Array,
    *,
    patch_size: int,
    mask_ratio: float,
    variant: str = "paper",
    all_random_threshold: jax.Array | None = None,
) -> MaskingResult:
    """Chooses K = int(N * mask_ratio) patches to mask from the segmentation map.

    Args:
      seg: float [B, H, W] or [B, H, W, 1] in [0, 1]; H, W divisible by patch_size.
        No gradient flows through the masking decision.
      rng: PRNG key for the noise given to low-weight patches (all patches in the
        official all-random case). Equal weights are ordered by patch index.
      patch_size, mask_ratio, variant: static; variant is "paper" or "official".
      all_random_threshold: official variant only, a (traced) mean-patch-sum threshold in
        place of the fixed 250 * p*p / 256 (`learned_all_random_threshold`).

    Returns:
      MaskingResult with int32 mask_idx [B, K], keep_idx [B, N-K] and bool mask [B, N].
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown masking variant {variant!r}; expected one of {VARIANTS}.")
    if all_random_threshold is not None and variant != "official":
        raise ValueError("all_random_threshold is a rule of the official masking variant only")
    seg = jax.lax.stop_gradient(_as_bhw1(seg))
    b, h, w, _ = seg.shape
    _check_divisible(h, w, patch_size)
    n = (h // patch_size) * (w // patch_size)
    k = num_masked(n, mask_ratio)

    if variant == "paper":
        order = _paper_order(seg, rng, patch_size).astype(jnp.int32)
        mask_idx, keep_idx = order[:, :k], order[:, k:]
    else:
        threshold = all_random_threshold
        if threshold is not None:
            threshold = jax.lax.stop_gradient(jnp.asarray(threshold, jnp.float32))
        order = _official_order(seg, rng, patch_size, threshold).astype(jnp.int32)
        keep_idx, mask_idx = order[:, : n - k], order[:, n - k :]

    mask = scatter_tokens(jnp.zeros((b, n, 1), bool), mask_idx, jnp.ones((b, k, 1), bool))[..., 0]
    return MaskingResult(mask_idx=mask_idx, keep_idx=keep_idx, mask=mask)
