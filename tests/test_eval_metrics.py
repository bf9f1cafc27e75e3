"""Evaluation metrics, head pose and classical baselines against independent references."""

import cv2
import dm_pix as pix
import numpy as np
import pytest

from dfrec_jax.eval import baselines, identity, metrics, pose
from tests import lfw

# --- image metrics ------------------------------------------------------------------------


def _gaussian_window(size=11, sigma=1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    w = np.outer(g, g)
    return w / w.sum()


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2004 in float64: 11x11 Gaussian (sigma 1.5) over the valid region,
    C1 = 0.01^2, C2 = 0.03^2, map averaged over pixels and channels. One image [H,W,C]."""
    w = _gaussian_window()
    c1, c2 = 0.01**2, 0.03**2

    def blur(x):  # valid correlation of [H,W] with w
        return np.einsum("hwij,ij->hw", np.lib.stride_tricks.sliding_window_view(x, w.shape), w)

    maps = []
    for c in range(a.shape[-1]):
        x, y = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        mx, my = blur(x), blur(y)
        sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
        num = (2 * mx * my + c1) * (2 * sxy + c2)
        den = (mx**2 + my**2 + c1) * (sxx + syy + c2)
        maps.append(num / den)
    return float(np.mean(maps))


def _image_pairs() -> tuple[np.ndarray, np.ndarray]:
    """[4,32,32,3] float32 pairs: random vs noisy copy, unrelated random, structured vs
    shifted/blurred, and a flat image vs a ramp (low-variance regions stress C1, C2)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32] / 31.0
    checker = ((np.mgrid[:32, :32] // 4).sum(0) % 2).astype(np.float64)
    structured = np.stack([checker, xx, 0.5 * (xx + yy)], -1)
    noise = rng.uniform(size=(32, 32, 3))
    a = np.stack([noise, rng.uniform(size=(32, 32, 3)), structured, np.full((32, 32, 3), 0.3)], 0)
    b = np.stack(
        [
            np.clip(noise + rng.normal(0, 0.1, noise.shape), 0, 1),
            rng.uniform(size=(32, 32, 3)),
            cv2.GaussianBlur(np.roll(structured, 2, axis=1), (5, 5), 1.0),
            np.stack([yy] * 3, -1),
        ],
        0,
    )
    return a.astype(np.float32), b.astype(np.float32)


def test_ssim_matches_numpy_reference():
    a, b = _image_pairs()
    got = np.asarray(metrics.ssim(a, b))
    want = [_ssim_reference(x, y) for x, y in zip(a, b)]
    assert got.shape == (4,)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert len(set(np.round(want, 3))) == 4  # the cases really differ


def test_ssim_equals_dm_pix_with_its_own_window():
    """metrics.ssim applies dm_pix's Gaussian window as two banded matmuls (faster on CPU):
    the same values as dm_pix's default filter, non-square images included."""
    rng = np.random.default_rng(3)
    a = rng.uniform(0, 1, (3, 40, 27, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(metrics.ssim(a, b)), np.asarray(pix.ssim(a, b)), rtol=0, atol=2e-6
    )


def test_psnr_matches_numpy_and_identical_images():
    a, b = _image_pairs()
    want = [10 * np.log10(1.0 / np.mean((x.astype(np.float64) - y) ** 2)) for x, y in zip(a, b)]
    np.testing.assert_allclose(np.asarray(metrics.psnr(a, b)), want, rtol=1e-5)
    assert np.all(np.isposinf(np.asarray(metrics.psnr(a, a))))
    np.testing.assert_allclose(np.asarray(metrics.ssim(a, a)), 1.0, atol=1e-6)


def test_uint8_images_are_scaled_to_unit_range():
    a, b = _image_pairs()
    a8, b8 = (np.round(x * 255).astype(np.uint8) for x in (a, b))
    np.testing.assert_allclose(
        np.asarray(metrics.psnr(a8, b8)), np.asarray(metrics.psnr(a8 / 255.0, b8 / 255.0)), 1e-5
    )
    with pytest.raises(ValueError, match=r"\[B,H,W,C\]"):
        metrics.psnr(a[0], b[0])


# --- masks --------------------------------------------------------------------------------


def test_mask_iou_hand_computed():
    pred = np.zeros((3, 4, 4), np.float32)
    true = np.zeros((3, 4, 4), np.uint8)
    pred[0, :2, :2] = 0.9  # 4 predicted pixels
    true[0, :2, :3] = 255  # 6 true pixels, 4 shared -> 4/6
    pred[1, 0, 0] = 0.5  # exactly 0.5 is outside; true has 1 pixel -> 0/1
    true[1, 3, 3] = 255
    true[1, 0, 0] = 127  # uint8 127 is outside
    # row 2: both empty -> nan
    iou = metrics.mask_iou(pred, true[..., None])
    np.testing.assert_allclose(iou[:2], [4 / 6, 0.0])
    assert np.isnan(iou[2])
    as_bool = metrics.mask_iou(pred > 0.5, true > 127)
    np.testing.assert_array_equal(np.isnan(as_bool), np.isnan(iou))
    np.testing.assert_allclose(as_bool[:2], iou[:2])
    np.testing.assert_allclose(metrics.mask_iou(true / 255.0, true)[:2], [1.0, 1.0])


def test_mask_iou_rejects_bad_inputs():
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.mask_iou(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 5), bool))
    with pytest.raises(TypeError, match="int32"):
        metrics.mask_iou(np.zeros((1, 4, 4), np.int32), np.zeros((1, 4, 4), bool))


# --- detection and recovery accuracy ------------------------------------------------------


def _auc_pairwise(scores, labels) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def test_roc_auc_matches_pairwise_count():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    scores = rng.integers(0, 6, 200) + labels  # many ties, informative
    got = metrics.roc_auc(scores.astype(np.float32), labels)
    assert got == pytest.approx(_auc_pairwise(scores, labels), abs=1e-12)
    assert 0.6 < got < 1.0


def test_roc_auc_known_cases():
    labels = np.array([0, 0, 1, 1])
    assert metrics.roc_auc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert metrics.roc_auc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    assert metrics.roc_auc([0.5] * 4, labels) == 0.5
    assert np.isnan(metrics.roc_auc([0.1, 0.9], [1, 1]))
    with pytest.raises(ValueError, match="non-finite"):
        metrics.roc_auc([0.1, np.nan, 0.3, 0.4], labels)
    with pytest.raises(ValueError, match="labels must be 0"):
        metrics.roc_auc([0.1, 0.2], [0, 2])


def test_recovery_accuracy_rule_and_boundary():
    similarity = np.array([0.95, 0.9, 0.3, 0.91, 0.89])
    # predicted: pristine, forgery (exactly 0.9), forgery, pristine, forgery
    labels = np.array([0, 1, 1, 1, 0])
    assert metrics.recovery_accuracy(similarity, labels) == pytest.approx(3 / 5)
    assert metrics.recovery_accuracy(similarity, 1 - labels) == pytest.approx(2 / 5)
    assert metrics.recovery_accuracy([0.5], [0], threshold=0.4) == 1.0
    assert np.isnan(metrics.recovery_accuracy([], []))


def test_finite_mean_and_summary_skip_undefined_values():
    values = np.array([1.0, np.nan, 3.0, np.inf])
    assert metrics.finite_mean(values) == 2.0
    assert metrics.summary(values) == {"mean": 2.0, "std": 1.0, "n": 2}
    assert np.isnan(metrics.finite_mean([np.nan, np.inf]))
    empty = metrics.summary([])
    assert empty["n"] == 0 and np.isnan(empty["mean"]) and np.isnan(empty["std"])


def test_fid_cases():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(10, 4))
    assert abs(metrics.fid(a, a)) < 1e-6
    shift = np.array([1.0, -2.0, 0.5, 0.0])
    assert metrics.fid(a, a + shift) == pytest.approx(shift @ shift, abs=1e-6)
    assert np.isnan(metrics.fid(a[:1], a))
    assert np.isnan(metrics.fid(a, a[:0]))


# --- head pose ----------------------------------------------------------------------------

SIZE = 256


def _rotation(yaw, pitch, roll) -> np.ndarray:
    """Rz(roll) Ry(yaw) Rx(pitch), written out independently of pose.euler_angles."""
    y, p, r = np.radians([yaw, pitch, roll])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _landmarks(yaw, pitch, roll, seed=0) -> np.ndarray:
    """[68,2]: the model points projected under a known pose; the other 62 points random."""
    rvec = cv2.Rodrigues(_rotation(yaw, pitch, roll))[0]
    tvec = np.array([6.0, -4.0, 600.0])
    camera = pose.camera_matrix(SIZE)
    projected, _ = cv2.projectPoints(pose.MODEL_POINTS_MM, rvec, tvec, camera, None)
    points = np.random.default_rng(seed).uniform(0, SIZE, (68, 2))
    points[list(pose.MODEL_INDICES)] = projected[:, 0]
    return points


def _mirror(points: np.ndarray) -> np.ndarray:
    """The landmarks of the left-right flipped image: x -> S-1-x and left/right points swap."""
    out = points.copy()
    out[:, 0] = SIZE - 1 - out[:, 0]
    for i, j in ((pose.EYE_OUTER_LEFT, pose.EYE_OUTER_RIGHT), (pose.MOUTH_LEFT, pose.MOUTH_RIGHT)):
        out[[i, j]] = out[[j, i]]
    return out


def test_head_pose_recovers_known_rotations():
    angles = np.array([[20.0, -10.0, 5.0], [-30.0, 15.0, -12.0], [0.0, 0.0, 0.0]])
    lms = np.stack([_landmarks(*a, seed=i) for i, a in enumerate(angles)])
    got = pose.head_pose(lms, SIZE)
    assert got.shape == (3, 3) and got.dtype == np.float64
    np.testing.assert_allclose(got, angles, atol=0.5)


def _nose_offset(points: np.ndarray) -> np.ndarray:
    """Nose tip minus the midpoint of the outer eye corners, (x, y) pixels."""
    eyes = (points[pose.EYE_OUTER_LEFT] + points[pose.EYE_OUTER_RIGHT]) / 2
    return points[pose.NOSE_TIP] - eyes


def test_head_pose_sign_conventions():
    frontal = _nose_offset(_landmarks(0.0, 0.0, 0.0))
    assert _nose_offset(_landmarks(20.0, 0.0, 0.0))[0] < frontal[0] - 2  # yaw > 0: image left
    assert _nose_offset(_landmarks(0.0, 20.0, 0.0))[1] > frontal[1] + 2  # pitch > 0: down
    rolled = _landmarks(0.0, 0.0, 20.0)
    assert rolled[pose.EYE_OUTER_RIGHT, 1] > rolled[pose.EYE_OUTER_LEFT, 1] + 5  # clockwise
    mirrored = pose.head_pose(np.stack([_mirror(_landmarks(20.0, -10.0, 5.0))]), SIZE)[0]
    np.testing.assert_allclose(mirrored, [-20.0, -10.0, -5.0], atol=0.5)


def test_head_pose_non_finite_rows_are_nan():
    lms = np.stack([_landmarks(10.0, 0.0, 0.0), _landmarks(10.0, 0.0, 0.0)])
    lms[1, pose.CHIN] = np.nan
    got = pose.head_pose(lms, SIZE)
    assert np.isfinite(got[0]).all() and np.isnan(got[1]).all()


def test_angle_error_wraps():
    a = np.array([[179.0, 0.0, 10.0], [0.0, 0.0, 0.0]])
    b = np.array([[-179.0, 3.0, -20.0], [np.nan, 0.0, 0.0]])
    got = pose.angle_error(a, b)
    assert got[0] == pytest.approx((2.0 + 3.0 + 30.0) / 3)
    assert np.isnan(got[1])
    assert pose.angle_error([[90.0, -180.0, 0.0]], [[-90.0, 180.0, 360.0]])[0] == pytest.approx(60)


# --- classical baselines ------------------------------------------------------------------


def _images_and_masks():
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    masks = np.zeros((2, 32, 32), bool)
    masks[0, 8:20, 10:22] = True
    masks[1, 4:12, 4:28] = True
    return images, masks


@pytest.mark.parametrize("method", ["telea", "ns"])
def test_inpaint_fills_only_the_mask(method):
    images, masks = _images_and_masks()
    out = baselines.inpaint(images, masks, method, radius=3)
    assert out.dtype == np.uint8 and out.shape == images.shape
    np.testing.assert_array_equal(out[~masks], images[~masks])
    assert np.mean(np.any(out[masks] != images[masks], axis=-1)) > 0.9
    # Channel order does not matter: inpainting BGR and flipping back gives the same image.
    bgr = baselines.inpaint(images[..., ::-1], masks, method, radius=3)[..., ::-1]
    np.testing.assert_array_equal(bgr, out)
    # A flat image stays flat: exactly with NS; OpenCV's Telea is off by a grey level or two.
    constant = np.full_like(images, 77)
    error = baselines.inpaint(constant, masks, method).astype(int) - constant
    assert np.abs(error).max() <= (0 if method == "ns" else 2)


def test_inpaint_rejects_unknown_method():
    images, masks = _images_and_masks()
    with pytest.raises(ValueError, match="one of"):
        baselines.inpaint(images, masks, "patchmatch")


def test_fixed_region_is_a_face_ellipse():
    for size in (32, 112):
        region = baselines.fixed_region(size)
        assert region.shape == (size, size) and region.dtype == bool
        assert 0.2 < region.mean() < 0.6
        ys, xs = np.nonzero(region)
        keypoints = baselines.alignment.template(size)
        # covers both eyes and both mouth corners, and is centred horizontally
        for x, y in keypoints:
            assert region[int(round(y)), int(round(x))]
        assert abs(xs.mean() - (size - 1) / 2) < 0.05 * size
        assert ys.min() > 0.2 * size  # below the forehead


def test_landmark_region_hull_dilation_and_fallback():
    square = np.array([[8, 8], [24, 8], [24, 24], [8, 24]], np.float64)
    lms = np.stack([np.resize(square, (68, 2)), np.full((68, 2), np.nan)])
    regions = baselines.landmark_region(lms, 32)
    assert regions.shape == (2, 32, 32) and regions.dtype == bool
    expected = np.zeros((32, 32), bool)
    expected[8:25, 8:25] = True  # the filled hull includes its boundary pixels
    np.testing.assert_array_equal(regions[0], expected)
    np.testing.assert_array_equal(regions[1], baselines.fixed_region(32))
    grown = baselines.landmark_region(lms, 32, dilate=2)
    assert grown[0].sum() > regions[0].sum() and (grown[0] >= regions[0]).all()
    assert grown[0, 6, 16] and not grown[0, 5, 16]
    np.testing.assert_array_equal(grown[1], baselines.fixed_region(32))


def test_identity_cosine_against_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 16)), rng.normal(size=(5, 16))
    expected = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    np.testing.assert_allclose(identity.cosine(a, b), expected, rtol=1e-5)
    np.testing.assert_allclose(identity.cosine(a, 3.0 * a), 1.0, rtol=1e-6)  # scale-free
    np.testing.assert_allclose(identity.cosine(a, -a), -1.0, rtol=1e-6)


def test_idsim_with_the_real_nets_is_symmetric_and_one_for_identical_faces():
    """IDSim as eval / recover compute it (identity.load: FaceNet and dlib) on real LFW faces."""
    from configs import default

    faces = lfw.real_faces(4)
    nets = identity.load(default.eval_config())
    for name, embedding in nets.embed(faces).items():
        e = np.asarray(embedding)
        same = np.asarray(identity.cosine(e, e))
        np.testing.assert_allclose(same, 1.0, atol=1e-5, err_msg=name)
        forward = np.asarray(identity.cosine(e[:2], e[2:]))
        backward = np.asarray(identity.cosine(e[2:], e[:2]))
        np.testing.assert_allclose(forward, backward, atol=1e-6, err_msg=name)
        assert (forward < 0.999).all(), (name, forward)  # different people are not identical
    # Embedding the same face again (another batch position) gives IDSim 1 too.
    again = np.asarray(nets.facenet(faces[::-1]))[::-1]
    np.testing.assert_allclose(
        identity.cosine(again, np.asarray(nets.facenet(faces))), 1.0, atol=1e-5
    )
