"""Face-swap synthesis on real LFW faces: exactness outside the mask, determinism, every
method, colour transfer, alignment and seamless-clone placement."""

import os

import cv2
import numpy as np
import pytest

from data_pipelines import landmarks, skips, splits, swap
from dfrec_jax import configlib

NUM_FACES = 6


@pytest.fixture(scope="module")
def faces():
    """uint8 [6,112,112,3] faces of 6 people and their float32 [6,68,2] landmarks."""
    root = configlib.lfw_dir()
    assert os.path.isdir(root), f"real LFW faces needed at {root} (or set DFREC_LFW_DIR)"
    people = splits.scan_lfw(root)
    names = sorted(people)[:: len(people) // NUM_FACES][:NUM_FACES]
    images = np.stack([skips.read_rgb8(people[name][0]) for name in names])
    points = landmarks.LandmarkDetector(batch_size=NUM_FACES)(images)
    return images, points


def _pairs():
    return [(t, (t + 1 + t % 3) % NUM_FACES) for t in range(NUM_FACES)]


@pytest.mark.parametrize("method", swap.METHODS)
def test_exact_outside_mask_and_changed_inside(faces, method):
    images, points = faces
    for seed, (t, s) in enumerate(_pairs()):
        result = swap.swap_faces(
            images[t], images[s], points[t], points[s], method, np.random.default_rng(seed)
        )
        assert result.image.dtype == np.uint8 and result.image.shape == (112, 112, 3)
        assert result.mask.dtype == np.uint8 and result.mask.shape == (112, 112, 1)
        outside = result.mask[..., 0] == 0
        assert outside.any() and (~outside).sum() > 500  # a face-sized region, not a speck
        np.testing.assert_array_equal(result.image[outside], images[t][outside])
        inside = result.mask[..., 0] >= 128
        diff = np.abs(result.image.astype(int) - images[t].astype(int))[inside].mean()
        assert diff > 4.0, f"{method}: the pasted region barely changed ({diff:.2f})"
        # The region lies on the target's face: most of it inside the (dilated) landmark hull.
        hull = cv2.dilate(landmarks.hull_mask(points[t], 112)[..., 0], np.ones((15, 15)))
        assert (hull[inside] > 0).mean() > 0.9


@pytest.mark.parametrize("method", swap.METHODS)
def test_deterministic_for_a_seed(faces, method):
    images, points = faces
    args = (images[0], images[3], points[0], points[3], method)
    a = swap.swap_faces(*args, np.random.default_rng([7, 1]))
    b = swap.swap_faces(*args, np.random.default_rng([7, 1]))
    assert a.image.tobytes() == b.image.tobytes() and a.mask.tobytes() == b.mask.tobytes()
    others = [swap.swap_faces(*args, np.random.default_rng([8, k])) for k in range(3)]
    assert any(o.mask.tobytes() != a.mask.tobytes() for o in others)


def test_compose_is_exact_where_the_mask_is_saturated():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    pasted = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = rng.choice(np.array([0, 1, 77, 128, 254, 255], np.uint8), (64, 64, 1))
    out = swap.compose(target, pasted, mask)
    m = mask[..., 0]
    np.testing.assert_array_equal(out[m == 0], target[m == 0])
    np.testing.assert_array_equal(out[m == 255], pasted[m == 255])
    a = mask.astype(np.float64) / 255
    expected = np.rint(target * (1 - a) + pasted * a)
    assert np.abs(out - expected).max() <= 1  # float32 vs float64 rounding at .5 only


def _least_squares_similarity(src, dst):
    """Reference: the closed-form least-squares similarity (Umeyama, no reflection)."""
    src, dst = src.astype(np.float64), dst.astype(np.float64)
    a, b = src - src.mean(0), dst - dst.mean(0)
    u, sv, vt = np.linalg.svd(b.T @ a)
    d = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ d @ vt
    scale = (sv * np.diag(d)).sum() / (a**2).sum()
    return np.c_[scale * rotation, dst.mean(0) - scale * rotation @ src.mean(0)]


def _apply(matrix, points):
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_alignment_recovers_a_known_similarity(faces):
    _, points = faces
    angle, scale = np.deg2rad(17.0), 1.3
    truth = np.array(
        [[scale * np.cos(angle), -scale * np.sin(angle), 12.5],
         [scale * np.sin(angle), scale * np.cos(angle), -7.25]]
    )  # fmt: skip
    moved = _apply(truth, points[2]).astype(np.float32)
    np.testing.assert_allclose(swap.similarity(points[2], moved), truth, atol=1e-3)


def test_alignment_fits_real_pairs_like_least_squares(faces):
    _, points = faces
    for t, s in _pairs():
        matrix = swap.similarity(points[s], points[t])
        # A rotation + uniform scale (similarity), not a general affine map.
        np.testing.assert_allclose(matrix[0, 0], matrix[1, 1], atol=1e-6)
        np.testing.assert_allclose(matrix[0, 1], -matrix[1, 0], atol=1e-6)
        ours = np.linalg.norm(_apply(matrix, points[s]) - points[t], axis=1)
        best = np.linalg.norm(
            _apply(_least_squares_similarity(points[s], points[t]), points[s]) - points[t], axis=1
        )
        # LMEDS is robust rather than least squares: close to the optimum, never far off.
        assert np.sqrt((ours**2).mean()) <= 1.2 * np.sqrt((best**2).mean())
        assert np.median(ours) <= np.median(best) + 0.5


def test_colour_transfer_moves_lab_stats_to_the_target(faces):
    images, points = faces
    region = swap.hull_region(points[0], 112)
    # Tint the source strongly so there is a colour gap to close.
    source = np.clip(images[2].astype(int) * [1.3, 0.8, 0.6], 0, 255).astype(np.uint8)
    target_mean, target_std = swap.lab_stats(images[0], region)
    before_mean, _ = swap.lab_stats(source, region)
    moved = swap.reinhard_transfer(source, images[0], region)
    after_mean, after_std = swap.lab_stats(moved, region)
    gap_before = np.abs(before_mean - target_mean).max()
    assert gap_before > 5.0
    assert np.abs(after_mean - target_mean).max() < 0.2 * gap_before
    np.testing.assert_allclose(after_std, target_std, rtol=0.15, atol=1.0)


def test_swap_region_colour_is_closer_to_the_target(faces):
    images, points = faces
    source = np.clip(images[2].astype(int) * [0.6, 0.8, 1.3], 0, 255).astype(np.uint8)
    result = swap.swap_faces(
        images[0], source, points[0], points[2], "hull_blend", np.random.default_rng(0)
    )
    core = (result.mask[..., 0] == 255).astype(np.uint8)
    warped, _ = swap.warp(source, swap.similarity(points[2], points[0]), 112)
    target_mean, _ = swap.lab_stats(images[0], core)
    raw_gap = np.abs(swap.lab_stats(warped, core)[0] - target_mean).max()
    swap_gap = np.abs(swap.lab_stats(result.image, core)[0] - target_mean).max()
    assert swap_gap < 0.5 * raw_gap


@pytest.mark.parametrize("mixed", [False, True])
def test_seamless_clone_keeps_the_source_in_place(faces, mixed):
    images, points = faces
    source, target = images[1], images[5]
    region = np.zeros((112, 112), np.uint8)
    region[30:101, 21:90] = 1  # odd and even sides: the placement rounds both ways
    out = swap.poisson_paste(source, target, region, mixed).astype(float)
    residual = {}
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            shifted = np.roll(source.astype(float), (dy, dx), (0, 1))
            d = (out - shifted)[36:95, 27:84]
            residual[dy, dx] = np.abs(np.diff(d, axis=0)).mean() + np.abs(np.diff(d, axis=1)).mean()
    assert min(residual, key=residual.get) == (0, 0)
    np.testing.assert_array_equal(out[:25], target[:25])  # far outside: untouched


def test_empty_mask_raises_a_counted_error(faces):
    images, points = faces
    centre = points[0].mean(0)
    tiny = (points[0] - centre) * 0.01 + centre  # a face about 1 px wide
    reasons = []
    for seed in range(12):
        try:
            swap.swap_faces(
                images[0], images[1], tiny, points[1], "hull_blend", np.random.default_rng(seed)
            )
        except swap.SwapError as e:
            assert isinstance(e, ValueError)
            reasons.append(e.reason)
    assert reasons and set(reasons) == {"empty mask"}


def test_each_method_at_224(faces):
    images, points = faces
    big = [cv2.resize(images[i], (224, 224), interpolation=cv2.INTER_CUBIC) for i in (0, 3)]
    for k, method in enumerate(swap.METHODS):
        r = swap.swap_faces(big[0], big[1], points[0] * 2, points[3] * 2, method,
                            np.random.default_rng(k))  # fmt: skip
        assert r.image.shape == (224, 224, 3) and r.mask.shape == (224, 224, 1)
        outside = r.mask[..., 0] == 0
        np.testing.assert_array_equal(r.image[outside], big[0][outside])
        assert (~outside).sum() > 4 * 500


def test_bad_arguments_are_refused(faces):
    images, points = faces
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown swap method"):
        swap.swap_faces(images[0], images[1], points[0], points[1], "nope", rng)
    with pytest.raises(ValueError, match="equal squares"):
        swap.swap_faces(images[0], images[1][:, :100], points[0], points[1], "hull_blend", rng)
    with pytest.raises(ValueError, match="uint8"):
        swap.swap_faces(images[0] / 255.0, images[1], points[0], points[1], "hull_blend", rng)


# ----------------------------------------------------------------------------- morphs


def test_alpha_per_kind(faces):
    images, points = faces
    args = (images[1], images[4], points[1], points[4])
    for method in swap.SPLICE_METHODS:
        assert swap.swap_faces(*args, method, np.random.default_rng(0)).alpha == 1.0
    drawn = [swap.swap_faces(*args, "morph_blend", np.random.default_rng(k)).alpha
             for k in range(8)]  # fmt: skip
    lo, hi = swap.MORPH_ALPHA
    assert all(lo <= a <= hi for a in drawn) and len(set(drawn)) == 8
    fixed = swap.swap_faces(*args, "morph_blend", np.random.default_rng(0), morph_alpha=(0.3, 0.3))
    assert fixed.alpha == 0.3
    with pytest.raises(ValueError, match="morph_alpha"):
        swap.swap_faces(*args, "morph_blend", np.random.default_rng(0), morph_alpha=(0.8, 0.2))


def test_morph_mask_is_the_region_and_alpha_only_scales_the_texture(faces):
    """Same rng: the same feathered region for any alpha (mask independent of alpha), and the
    forgery is target + alpha * (full-texture morph - target) up to rounding."""
    images, points = faces
    args = (images[2], images[5], points[2], points[5], "morph_blend")
    full = swap.swap_faces(*args, np.random.default_rng(3), morph_alpha=(1.0, 1.0))
    for alpha in (0.25, 0.7):
        part = swap.swap_faces(*args, np.random.default_rng(3), morph_alpha=(alpha, alpha))
        assert part.mask.tobytes() == full.mask.tobytes()
        target = images[2].astype(np.float64)
        expected = target + alpha * (full.image.astype(np.float64) - target)
        assert np.abs(part.image - expected).max() <= 1.5  # two uint8 roundings


def test_morph_is_closer_to_the_target_than_a_splice(faces):
    """hull_blend and morph_blend draw the same region and blur from the same rng (they can
    differ only where a warp reads outside the source), so the difference is the warp and
    the texture mix."""
    images, points = faces
    morph_gap, splice_gap = [], []
    for seed, (t, s) in enumerate(_pairs()):
        args = (images[t], images[s], points[t], points[s])
        morph = swap.swap_faces(*args, "morph_blend", np.random.default_rng(seed))
        splice = swap.swap_faces(*args, "hull_blend", np.random.default_rng(seed))
        inside = (morph.mask[..., 0] >= 128) & (splice.mask[..., 0] >= 128)
        assert inside.sum() > 0.9 * (morph.mask[..., 0] >= 128).sum()
        for out, gaps in ((morph, morph_gap), (splice, splice_gap)):
            gaps.append(np.abs(out.image.astype(int) - images[t].astype(int))[inside].mean())
    assert np.mean(morph_gap) < 0.85 * np.mean(splice_gap), (morph_gap, splice_gap)
    assert min(morph_gap) > 2.0  # still visibly another face


def test_piecewise_affine_warp_puts_source_landmarks_on_the_target_landmarks(faces):
    """Warp an image of its own pixel coordinates: at each target landmark the warped image
    reads the matching source landmark's position (the target's pose and expression)."""
    _, points = faces
    size = 112
    grid = np.mgrid[:size, :size].astype(np.float32)
    coords = np.stack([grid[1], grid[0]], -1)  # (x, y) of every source pixel
    for t, s in _pairs()[:3]:
        matrix = swap.similarity(points[s], points[t])
        warped, inside = swap.piecewise_affine_warp(coords, points[s], points[t], matrix, size)
        assert warped.shape == (size, size, 2) and inside.dtype == np.uint8
        pixel = np.clip(np.round(points[t]).astype(int), 0, size - 1)
        read = warped[pixel[:, 1], pixel[:, 0]]
        # The nearest pixel centre is up to 0.71 px from the landmark; the local affine map
        # scales that offset (faces of similar size after alignment).
        error = np.linalg.norm(read - points[s], axis=1)
        assert np.median(error) < 1.0 and np.percentile(error, 90) < 2.0, error
        # Piecewise affine and continuous: no tears between neighbouring pixels (where both
        # read inside the source; outside it the reflected border folds the coordinates).
        ok = inside.astype(bool)
        for axis in (0, 1):
            step = np.linalg.norm(np.diff(warped, axis=axis), axis=-1)
            both = ok[1:, :] & ok[:-1, :] if axis == 0 else ok[:, 1:] & ok[:, :-1]
            assert both.mean() > 0.5 and step[both].max() < 8.0  # local stretch only
            assert np.median(step[both]) < 1.5
