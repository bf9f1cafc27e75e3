"""Tests for dfrec_jax.masking: semantic-guided masking with static shapes."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfrec_jax.masking import (
    MaskingResult,
    num_masked,
    patch_weights,
    patchify,
    scatter_tokens,
    semantic_guided_masking,
    take_tokens,
    unpatchify,
)

VARIANTS = ("paper", "official")


def _fn(variant, patch_size, mask_ratio):
    return functools.partial(
        semantic_guided_masking, patch_size=patch_size, mask_ratio=mask_ratio, variant=variant
    )


def _to_np(res):
    return np.asarray(res.mask_idx), np.asarray(res.keep_idx), np.asarray(res.mask)


# ----------------------------------------------------------------------------
# Straightforward NumPy references (loops on purpose).
# ----------------------------------------------------------------------------
def ref_patch_weights(seg, p, reduce):
    seg = np.asarray(seg, np.float64).reshape(seg.shape[0], seg.shape[1], seg.shape[2])
    b, h, w = seg.shape
    out = np.zeros((b, (h // p) * (w // p)))
    for bi in range(b):
        i = 0
        for r in range(h // p):
            for c in range(w // p):
                block = seg[bi, r * p : (r + 1) * p, c * p : (c + 1) * p]
                out[bi, i] = block.mean() if reduce == "mean" else block.sum()
                i += 1
    return out


def ref_paper(seg, noise, p, k):
    """Algorithm 1: mean, < 0.5 -> noise, sort descending, mask the top K; all noise when the
    image's mean weight is >= 250/256 (uniform-map fallback)."""
    w = ref_patch_weights(seg, p, "mean")
    masks, keeps = [], []
    for b in range(w.shape[0]):
        n = w.shape[1]
        uniform = w[b].mean() >= 250.0 / 256.0
        wp = [float(noise[b, i]) if uniform or w[b, i] < 0.5 else w[b, i] for i in range(n)]
        order = sorted(range(n), key=lambda i: -wp[i])  # Python sort is stable.
        masks.append(order[:k])
        keeps.append(order[k:])
    return np.array(masks), np.array(keeps)


def ref_official(seg, noise, p, k):
    """Released code: sum, all-random if mean sum >= 250, sum <= 50 -> noise, ascending."""
    s = ref_patch_weights(seg, p, "sum")
    scale = p * p / 256.0
    masks, keeps = [], []
    for b in range(s.shape[0]):
        n = s.shape[1]
        if s[b].mean() >= 250.0 * scale:
            wp = [float(noise[b, i]) for i in range(n)]
        else:
            wp = [float(noise[b, i]) if s[b, i] <= 50.0 * scale else s[b, i] for i in range(n)]
        order = sorted(range(n), key=lambda i: wp[i])
        keeps.append(order[: n - k])
        masks.append(order[n - k :])
    return np.array(masks), np.array(keeps)


def module_noise(variant, rng, b, n):
    """The exact noise the module draws for this rng."""
    if variant == "paper":
        return np.asarray(jax.random.uniform(rng, (b, n), minval=0.0, maxval=0.1))
    return np.asarray(jax.random.uniform(rng, (b, n)))


def make_map(np_rng, kind, b, h, w, p):
    """Maps quantised to multiples of 1/64, so patch means/sums are exact in float32."""
    gh, gw = h // p, w // p
    ones = np.ones((p, p))

    def blobs():
        u = np_rng.random((b, gh, gw))
        base = np.stack([np.kron(u[i], ones) for i in range(b)])
        return base + np_rng.integers(-8, 9, (b, h, w)) / 64.0

    if kind == "random":
        x = np_rng.integers(0, 65, (b, h, w)) / 64.0
    elif kind == "blobs":
        x = blobs()
    elif kind == "binary":
        u = (np_rng.random((b, gh, gw)) < 0.3).astype(float)
        x = np.stack([np.kron(u[i], ones) for i in range(b)])
    elif kind == "zeros":
        x = np.zeros((b, h, w))
    elif kind == "ones":
        x = np.ones((b, h, w))
    elif kind == "mixed":  # image 0 near-all-ones (official fallback), others blobs
        x = blobs()
        x[0] = 1.0
        x[0, :p, :p] = 248 / 256
    else:
        raise AssertionError(kind)
    return np.round(np.clip(x, 0.0, 1.0) * 64.0).astype(np.float32) / 64.0


# ----------------------------------------------------------------------------
# Exact agreement with the references.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size,p", [(224, 16), (112, 8)])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("kind", ["random", "blobs", "binary", "zeros", "ones", "mixed"])
def test_matches_numpy_reference(variant, size, p, ratio, kind):
    b = 2
    seed = zlib.crc32(f"{variant}-{size}-{ratio}-{kind}".encode())
    seg = make_map(np.random.default_rng(seed), kind, b, size, size, p)
    rng = jax.random.key(seed)
    n = (size // p) ** 2
    k = num_masked(n, ratio)
    noise = module_noise(variant, rng, b, n)
    ref = ref_paper if variant == "paper" else ref_official
    want_mask, want_keep = ref(seg, noise, p, k)

    got_mask, got_keep, _ = _to_np(_fn(variant, p, ratio)(jnp.asarray(seg), rng))
    np.testing.assert_array_equal(got_mask, want_mask)
    np.testing.assert_array_equal(got_keep, want_keep)


def test_default_variant_is_paper():
    seg = make_map(np.random.default_rng(0), "blobs", 2, 224, 224, 16)
    rng = jax.random.key(1)
    default = semantic_guided_masking(jnp.asarray(seg), rng, patch_size=16, mask_ratio=0.5)
    paper = _fn("paper", 16, 0.5)(jnp.asarray(seg), rng)
    official = _fn("official", 16, 0.5)(jnp.asarray(seg), rng)
    np.testing.assert_array_equal(default.mask_idx, paper.mask_idx)
    assert not np.array_equal(np.asarray(default.mask_idx), np.asarray(official.mask_idx))


# ----------------------------------------------------------------------------
# Structural invariants on realistic shapes.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 224, 224), (2, 112, 112, 1)])
@pytest.mark.parametrize("p", [16, 8])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("variant", VARIANTS)
def test_invariants(shape, p, ratio, variant):
    seg = np.random.default_rng(p).random(shape).astype(np.float32)
    b = shape[0]
    n = (shape[1] // p) * (shape[2] // p)
    k = int(n * ratio)
    res = _fn(variant, p, ratio)(jnp.asarray(seg), jax.random.PRNGKey(3))  # raw key works too
    assert isinstance(res, MaskingResult)
    assert res.mask_idx.shape == (b, k) and res.mask_idx.dtype == jnp.int32
    assert res.keep_idx.shape == (b, n - k) and res.keep_idx.dtype == jnp.int32
    assert res.mask.shape == (b, n) and res.mask.dtype == jnp.bool_

    mask_idx, keep_idx, mask = _to_np(res)
    for i in range(b):
        assert len(set(mask_idx[i])) == k  # exactly K distinct masked patches
        assert not set(mask_idx[i]) & set(keep_idx[i])
        np.testing.assert_array_equal(
            np.sort(np.concatenate([mask_idx[i], keep_idx[i]])), np.arange(n)
        )
        assert mask[i].sum() == k
        assert mask[i, mask_idx[i]].all() and not mask[i, keep_idx[i]].any()


# ----------------------------------------------------------------------------
# Paper variant semantics.
# ----------------------------------------------------------------------------
def _marked_map(np_rng, marked, gh, p):
    """One image whose patches in `marked` have means >= 0.5 (ties allowed), others < 0.5."""
    vals = np_rng.integers(0, 32, gh * gh) / 64.0  # < 0.5
    vals[marked] = np_rng.integers(32, 65, len(marked)) / 64.0  # >= 0.5
    if len(marked):
        vals[marked[0]] = 0.5  # exactly 0.5 counts as marked
    seg = np.kron(vals.reshape(gh, gh), np.ones((p, p))).astype(np.float32)
    return seg, vals


@pytest.mark.parametrize("m", [98, 99, 150, 196])
def test_paper_masks_only_marked_when_enough(m):
    p, gh, ratio = 16, 14, 0.5
    n, k = gh * gh, num_masked(gh * gh, ratio)
    np_rng = np.random.default_rng(m)
    marked = np_rng.choice(n, m, replace=False)
    seg, vals = _marked_map(np_rng, marked, gh, p)
    for seed in range(3):
        mask_idx, _, _ = _to_np(
            _fn("paper", p, ratio)(jnp.asarray(seg[None]), jax.random.key(seed))
        )
        assert set(mask_idx[0]) <= set(marked)
        # Masked ones are the K highest-weighted marked patches (ties in index order).
        want = sorted(marked, key=lambda i: (-vals[i], i))[:k]
        np.testing.assert_array_equal(mask_idx[0], want)


@pytest.mark.parametrize("m", [0, 1, 40, 97])
def test_paper_masks_all_marked_when_few(m):
    p, gh, ratio = 16, 14, 0.5
    n, k = gh * gh, num_masked(gh * gh, ratio)
    np_rng = np.random.default_rng(100 + m)
    marked = np_rng.choice(n, m, replace=False)
    seg, vals = _marked_map(np_rng, marked, gh, p)
    rng = jax.random.key(m)
    mask_idx, _, _ = _to_np(_fn("paper", p, ratio)(jnp.asarray(seg[None]), rng))
    assert set(marked) <= set(mask_idx[0])
    # The marked ones come first (highest weight); the other K - M are the
    # unmarked patches with the largest noise.
    np.testing.assert_array_equal(np.sort(mask_idx[0, :m]), np.sort(marked))
    noise = module_noise("paper", rng, 1, n)[0]
    others = [i for i in range(n) if i not in set(marked)]
    want_rest = sorted(others, key=lambda i: -noise[i])[: k - m]
    np.testing.assert_array_equal(mask_idx[0, m:], want_rest)


# ----------------------------------------------------------------------------
# Randomness, jit and vmap.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_deterministic_per_rng_and_varies_across_rngs(variant):
    seg = jnp.zeros((2, 112, 112))  # every patch gets noise: the choice is random
    fn = _fn(variant, 8, 0.5)
    a = _to_np(fn(seg, jax.random.key(0)))
    a2 = _to_np(fn(seg, jax.random.key(0)))
    b = _to_np(fn(seg, jax.random.key(1)))
    for x, y in zip(a, a2):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[2], b[2])
    # Different images of the batch also get different noise.
    assert not np.array_equal(a[2][0], a[2][1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_jit_matches_eager(variant):
    seg = jnp.asarray(make_map(np.random.default_rng(7), "mixed", 2, 224, 224, 16))
    rng = jax.random.key(11)
    eager = _fn(variant, 16, 0.5)(seg, rng)
    jitted = jax.jit(
        semantic_guided_masking, static_argnames=("patch_size", "mask_ratio", "variant")
    )(seg, rng, patch_size=16, mask_ratio=0.5, variant=variant)
    for x, y in zip(_to_np(eager), _to_np(jitted)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("variant", VARIANTS)
def test_vmap_matches_loop(variant):
    v, b = 3, 2
    segs = np.stack([make_map(np.random.default_rng(i), "blobs", b, 112, 112, 8) for i in range(v)])
    rngs = jax.random.split(jax.random.key(5), v)
    fn = _fn(variant, 8, 0.75)
    batched = _to_np(jax.vmap(fn)(jnp.asarray(segs), rngs))
    looped = [_to_np(fn(jnp.asarray(segs[i]), rngs[i])) for i in range(v)]
    for field in range(3):
        np.testing.assert_array_equal(batched[field], np.stack([r[field] for r in looped]))


def test_gradient_flows_through_kept_tokens_only():
    # The map both drives the masking and is the "image": gradients of a loss on
    # the visible tokens must reach exactly the pixels of the kept patches.
    seg = jnp.asarray(make_map(np.random.default_rng(0), "blobs", 2, 112, 112, 8))
    fn = _fn("paper", 8, 0.75)

    def loss(s):
        res = fn(s, jax.random.key(0))
        return jnp.sum(take_tokens(patchify(s[..., None], 8), res.keep_idx))

    g = np.asarray(jax.grad(loss)(seg))
    keep = np.asarray(fn(seg, jax.random.key(0)).keep_idx)
    want = np.zeros((2, 196, 64), np.float32)
    want[np.arange(2)[:, None], keep] = 1.0
    np.testing.assert_array_equal(g, np.asarray(unpatchify(want, 8, 112, 112))[..., 0])


# ----------------------------------------------------------------------------
# Official variant: all-random fallback and low threshold.
# ----------------------------------------------------------------------------
def _noise_order(rng, b, n):
    return np.argsort(module_noise("official", rng, b, n), axis=-1, kind="stable")


@pytest.mark.parametrize("p,size", [(16, 224), (8, 112)])
@pytest.mark.parametrize("level", [250, 256])
def test_official_constant_at_or_above_threshold_is_pure_noise(p, size, level):
    # Constant level/256 gives patch sums level*p*p/256 >= the scaled 250 threshold.
    seg = jnp.full((2, size, size), level / 256.0, jnp.float32)
    n, k = (size // p) ** 2, num_masked((size // p) ** 2, 0.5)
    rng = jax.random.key(level + p)
    mask_idx, keep_idx, _ = _to_np(_fn("official", p, 0.5)(seg, rng))
    order = _noise_order(rng, 2, n)
    np.testing.assert_array_equal(keep_idx, order[:, : n - k])
    np.testing.assert_array_equal(mask_idx, order[:, n - k :])


@pytest.mark.parametrize("p,size", [(16, 224), (8, 112)])
def test_official_constant_below_threshold_sorts_by_sum(p, size):
    # 249/256 per pixel: below the fallback, above the low threshold, all sums tie,
    # so the stable ascending sort keeps the first N-K patches whatever the rng.
    seg = jnp.full((2, size, size), 249 / 256.0, jnp.float32)
    n, k = (size // p) ** 2, num_masked((size // p) ** 2, 0.5)
    for seed in range(2):
        mask_idx, keep_idx, _ = _to_np(_fn("official", p, 0.5)(seg, jax.random.key(seed)))
        np.testing.assert_array_equal(keep_idx, np.tile(np.arange(n - k), (2, 1)))
        np.testing.assert_array_equal(mask_idx, np.tile(np.arange(n - k, n), (2, 1)))


def _half_high_map(np_rng, low_sum, p=16, gh=14):
    """Half the patches sum to 256 (all ones), the other half to `low_sum`."""
    n = gh * gh
    high = np_rng.choice(n, n // 2, replace=False)
    vals = np.full(n, low_sum / 256.0)
    vals[high] = 1.0
    seg = np.kron(vals.reshape(gh, gh), np.ones((p, p))).astype(np.float32)
    return seg, np.sort(high)


def test_official_structured_map_just_below_threshold_masks_high_patches():
    # Mean patch sum (256 + 243) / 2 = 249.5 < 250: no fallback, high patches masked.
    for seed in range(3):
        seg, high = _half_high_map(np.random.default_rng(seed), low_sum=243)
        assert (seg.reshape(14, 16, 14, 16).sum(axis=(1, 3)).mean()) == 249.5
        mask_idx, keep_idx, _ = _to_np(
            _fn("official", 16, 0.5)(jnp.asarray(seg[None]), jax.random.key(seed))
        )
        np.testing.assert_array_equal(mask_idx[0], high)  # ties keep index order
        np.testing.assert_array_equal(np.sort(keep_idx[0]), np.setdiff1d(np.arange(196), high))


def test_official_structured_map_at_threshold_is_pure_noise():
    # Mean patch sum (256 + 244) / 2 = 250 exactly: the fallback triggers.
    for seed in range(3):
        seg, high = _half_high_map(np.random.default_rng(seed), low_sum=244)
        assert (seg.reshape(14, 16, 14, 16).sum(axis=(1, 3)).mean()) == 250.0
        rng = jax.random.key(seed)
        mask_idx, keep_idx, _ = _to_np(_fn("official", 16, 0.5)(jnp.asarray(seg[None]), rng))
        order = _noise_order(rng, 1, 196)
        np.testing.assert_array_equal(keep_idx, order[:, :98])
        np.testing.assert_array_equal(mask_idx, order[:, 98:])
        assert not np.array_equal(np.sort(mask_idx[0]), high)


def test_official_fallback_is_per_image():
    below, high = _half_high_map(np.random.default_rng(0), low_sum=243)
    at, _ = _half_high_map(np.random.default_rng(1), low_sum=244)
    rng = jax.random.key(9)
    mask_idx, keep_idx, _ = _to_np(
        _fn("official", 16, 0.5)(jnp.asarray(np.stack([below, at])), rng)
    )
    np.testing.assert_array_equal(mask_idx[0], high)
    np.testing.assert_array_equal(mask_idx[1], _noise_order(rng, 2, 196)[1, 98:])


def test_official_low_sum_patches_get_noise():
    # Patch sums 50 (<= 50: noise in [0,1)), 51 and 256 (kept as sums).
    p, gh, n = 16, 14, 196
    np_rng = np.random.default_rng(4)
    level = np_rng.choice([50, 51, 256], n)
    seg = np.kron((level / 256.0).reshape(gh, gh), np.ones((p, p))).astype(np.float32)
    rng = jax.random.key(4)
    mask_idx, keep_idx, _ = _to_np(_fn("official", p, 0.5)(jnp.asarray(seg[None]), rng))
    noise = module_noise("official", rng, 1, n)[0]
    low = [i for i in range(n) if level[i] == 50]
    want = (
        sorted(low, key=lambda i: noise[i])
        + [i for i in range(n) if level[i] == 51]
        + [i for i in range(n) if level[i] == 256]
    )
    np.testing.assert_array_equal(np.concatenate([keep_idx[0], mask_idx[0]]), want)
    # The noise really decides the order among the low patches.
    assert sorted(low, key=lambda i: noise[i]) != sorted(low)


# ----------------------------------------------------------------------------
# Pristine faces: the map is ~1 everywhere; both variants mask at random.
# ----------------------------------------------------------------------------
def _paper_noise_order(rng, b, n):
    return np.argsort(-module_noise("paper", rng, b, n), axis=-1, kind="stable")


@pytest.mark.parametrize("level", [250, 256])
def test_paper_uniform_map_is_pure_noise(level):
    # A pristine face's map (>= 250/256 on average): the top-rows tie of Algorithm 1 is
    # replaced by fully random masking.
    seg = jnp.full((2, 112, 112), level / 256.0, jnp.float32)
    rng = jax.random.key(level)
    mask_idx, keep_idx, _ = _to_np(_fn("paper", 8, 0.5)(seg, rng))
    order = _paper_noise_order(rng, 2, 196)
    np.testing.assert_array_equal(mask_idx, order[:, :98])
    np.testing.assert_array_equal(keep_idx, order[:, 98:])
    assert not np.array_equal(np.sort(mask_idx[0]), np.arange(98))  # not the top rows


def test_paper_structured_map_below_uniform_masks_high_patches():
    # Mean (1 + 243/256) / 2 < 250/256: no fallback, the all-ones half is masked.
    seg, high = _half_high_map(np.random.default_rng(3), low_sum=243)
    mask_idx, _, _ = _to_np(_fn("paper", 16, 0.5)(jnp.asarray(seg[None]), jax.random.key(0)))
    np.testing.assert_array_equal(np.sort(mask_idx[0]), high)


@pytest.mark.parametrize("variant", VARIANTS)
def test_uniform_fallback_is_per_image_and_varies_with_rng(variant):
    np_rng = np.random.default_rng(5)
    forged, high = _half_high_map(np_rng, low_sum=0)  # face region 1, rest 0
    pristine = np.ones_like(forged)
    seg = jnp.asarray(np.stack([forged, pristine]))
    masks = [_to_np(_fn(variant, 16, 0.5)(seg, jax.random.key(s)))[0] for s in range(3)]
    for m in masks:  # the forgery's masked patches are its source region, whatever the rng
        np.testing.assert_array_equal(np.sort(m[0]), high)
    # the pristine face's masked patches change with the rng (fully random masking)
    assert len({tuple(np.sort(m[1])) for m in masks}) == 3


# ----------------------------------------------------------------------------
# Patch and token helpers.
# ----------------------------------------------------------------------------
def test_patchify_ordering_on_tiny_example():
    # 4x4 image, 2 channels: channel 0 = pixel index, channel 1 = 100 + pixel index.
    pix = np.arange(16, dtype=np.float32).reshape(4, 4)
    img = np.stack([pix, 100 + pix], axis=-1)[None]
    got = np.asarray(patchify(jnp.asarray(img), 2))
    assert got.shape == (1, 4, 8)
    want_pixels = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    want = np.array([[v for q in pp for v in (q, 100 + q)] for pp in want_pixels], np.float32)
    np.testing.assert_array_equal(got[0], want)


@pytest.mark.parametrize(
    "shape,p", [((2, 32, 48, 3), 8), ((1, 224, 224, 3), 16), ((3, 16, 16, 1), 4)]
)
def test_patchify_unpatchify_roundtrip(shape, p):
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    patches = patchify(jnp.asarray(x), p)
    assert patches.shape == (shape[0], (shape[1] // p) * (shape[2] // p), p * p * shape[3])
    np.testing.assert_array_equal(np.asarray(unpatchify(patches, p, shape[1], shape[2])), x)
    y = np.random.default_rng(1).random(patches.shape).astype(np.float32)
    np.testing.assert_array_equal(
        np.asarray(patchify(unpatchify(jnp.asarray(y), p, shape[1], shape[2]), p)), y
    )


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_patch_weights(reduce):
    seg = np.random.default_rng(2).random((2, 32, 48)).astype(np.float32)
    want = ref_patch_weights(seg, 8, reduce)
    for s in (seg, seg[..., None]):
        got = patch_weights(jnp.asarray(s), 8, reduce)
        assert got.shape == (2, 24) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_take_and_scatter_tokens_match_numpy():
    np_rng = np.random.default_rng(3)
    b, n, d, m = 3, 10, 4, 6
    x = np_rng.random((b, n, d)).astype(np.float32)
    idx = np.stack([np_rng.permutation(n)[:m] for _ in range(b)]).astype(np.int32)
    rows = np.arange(b)[:, None]
    np.testing.assert_array_equal(
        np.asarray(take_tokens(jnp.asarray(x), jnp.asarray(idx))), x[rows, idx]
    )
    values = np_rng.random((b, m, d)).astype(np.float32)
    want = x.copy()
    want[rows, idx] = values
    got = scatter_tokens(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(values))
    np.testing.assert_array_equal(np.asarray(got), want)
    # Taking the scattered rows back returns the values.
    np.testing.assert_array_equal(np.asarray(take_tokens(got, jnp.asarray(idx))), values)


def test_scatter_tokens_gradients():
    np_rng = np.random.default_rng(4)
    b, n, d, m = 2, 8, 3, 5
    base = jnp.asarray(np_rng.random((b, n, d)), jnp.float32)
    values = jnp.asarray(np_rng.random((b, m, d)), jnp.float32)
    idx = jnp.asarray(np.stack([np_rng.permutation(n)[:m] for _ in range(b)]), jnp.int32)
    coeff = np_rng.random((b, n, d)).astype(np.float32) + 1.0  # nonzero everywhere

    def f(base, values):
        return jnp.sum(scatter_tokens(base, idx, values) * coeff)

    g_base, g_values = jax.jit(jax.grad(f, argnums=(0, 1)))(base, values)
    rows = np.arange(b)[:, None]
    idx_np = np.asarray(idx)
    np.testing.assert_allclose(np.asarray(g_values), coeff[rows, idx_np])
    want_base = coeff.copy()
    want_base[rows, idx_np] = 0.0  # overwritten rows get no gradient from the output
    np.testing.assert_allclose(np.asarray(g_base), want_base)


def test_masking_result_is_a_pytree():
    res = _fn("paper", 8, 0.5)(jnp.zeros((2, 112, 112)), jax.random.key(0))
    leaves = jax.tree.leaves(res)
    assert len(leaves) == 3
    mapped = jax.tree.map(lambda a: a, res)
    assert isinstance(mapped, MaskingResult)


# ----------------------------------------------------------------------------
# Invalid inputs.
# ----------------------------------------------------------------------------
def test_num_masked():
    assert num_masked(196, 0.5) == 98
    assert num_masked(196, 0.75) == 147
    for ratio in (0.0, 0.004, 1.0, 1.5, -0.5):  # K = 0, 0, N, > N, < 0
        with pytest.raises(ValueError, match="mask_ratio"):
            num_masked(196, ratio)


@pytest.mark.parametrize("ratio", [0.0, 0.001, 1.0])
def test_masking_rejects_degenerate_ratio(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        semantic_guided_masking(
            jnp.zeros((1, 64, 64)), jax.random.key(0), patch_size=16, mask_ratio=ratio
        )


def test_rejects_indivisible_size():
    with pytest.raises(ValueError, match="divisible"):
        semantic_guided_masking(
            jnp.zeros((1, 40, 64)), jax.random.key(0), patch_size=16, mask_ratio=0.5
        )
    with pytest.raises(ValueError, match="divisible"):
        semantic_guided_masking(
            jnp.zeros((1, 64, 40, 1)),
            jax.random.key(0),
            patch_size=16,
            mask_ratio=0.5,
            variant="official",
        )
    with pytest.raises(ValueError, match="divisible"):
        patchify(jnp.zeros((1, 30, 32, 3)), 16)
    with pytest.raises(ValueError, match="divisible"):
        unpatchify(jnp.zeros((1, 4, 768)), 16, 30, 32)


def test_rejects_unknown_variant_and_reduce():
    with pytest.raises(ValueError, match="variant"):
        semantic_guided_masking(
            jnp.zeros((1, 64, 64)),
            jax.random.key(0),
            patch_size=16,
            mask_ratio=0.5,
            variant="Paper",
        )
    with pytest.raises(ValueError, match="reduce"):
        patch_weights(jnp.zeros((1, 16, 16)), 8, "max")
    with pytest.raises(ValueError, match="seg must be"):
        semantic_guided_masking(
            jnp.zeros((1, 16, 16, 3)), jax.random.key(0), patch_size=8, mask_ratio=0.5
        )
