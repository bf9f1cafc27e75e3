"""Face detection (MTCNN) and 5-point alignment on real LFW faces placed by known transforms."""

import cv2
import numpy as np
import pytest

from data_pipelines import alignment
from tests.lfw import real_faces

CANVAS = 320
CENTRAL = slice(16, 96)  # the face region of a 112 crop, away from the crop border


def _apply(matrix, points):
    return np.asarray(points, np.float64) @ matrix[:2, :2].T + matrix[:2, 2]


def _placement(angle, scale, center, size=112):
    """Image->canvas similarity putting a size x size face at `center`, rotated and scaled."""
    middle = ((size - 1) / 2, (size - 1) / 2)
    matrix = cv2.getRotationMatrix2D(middle, angle, scale)
    matrix[:, 2] += np.asarray(center) - np.asarray(middle)
    return matrix


def _background(shape, seed):
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(128, 20, shape), 0, 255).astype(np.uint8)


def _place(face, matrix, canvas):
    height, width = canvas.shape[:2]
    return cv2.warpAffine(
        face,
        matrix,
        (width, height),
        dst=canvas.copy(),
        flags=cv2.INTER_CUBIC,
        borderMode=cv2.BORDER_TRANSPARENT,
    )


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


def _lstsq_similarity(src, dst):
    """Reference: x' = a x - b y + tx, y' = b x + a y + ty is linear in (a, b, tx, ty)."""
    rows = []
    for x, y in src:
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.asarray(rows), np.asarray(dst).reshape(-1), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


@pytest.fixture(scope="module")
def detector():
    return alignment.FaceDetector()


@pytest.fixture(scope="module")
def faces():
    return (real_faces(3) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def placed(detector, faces):
    """Per face: (face, its keypoints, placement matrix, canvas, Face found in the canvas)."""
    out = []
    for i, face in enumerate(faces):
        placement = _placement(15 if i % 2 == 0 else -15, 1.7, (160 + 4 * i, 155 - 3 * i))
        canvas = _place(face, placement, _background((CANVAS, CANVAS, 3), i))
        own = detector.largest(face)
        found = detector.detect(canvas)
        assert own is not None and len(found) == 1, f"face {i}: {own}, {len(found)} in canvas"
        out.append((face, own.keypoints, placement, canvas, found[0]))
    return out


def test_template():
    t = alignment.template(112)
    assert t.dtype == np.float32 and t.shape == (5, 2)
    expected = [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ]
    np.testing.assert_array_equal(t, np.float32(expected))
    np.testing.assert_allclose(alignment.template(224), 2 * t, rtol=1e-7)
    assert alignment.KEYPOINT_NAMES[0] == "left_eye" and t[0, 0] < t[1, 0]  # image-left eye


@pytest.mark.parametrize("seed", range(3))
def test_similarity_recovers_exact_transform(seed):
    rng = np.random.default_rng(seed)
    angle, scale = rng.uniform(-np.pi, np.pi), rng.uniform(0.3, 3.0)
    c, s = np.cos(angle), np.sin(angle)
    true = np.array([[scale * c, -scale * s, rng.normal(0, 50)], [scale * s, scale * c, 0.0]])
    true[1, 2] = rng.normal(0, 50)
    src = rng.uniform(0, 200, (5, 2))
    got = alignment.similarity_transform(src, _apply(true, src))
    assert got.dtype == np.float64 and got.shape == (2, 3)
    np.testing.assert_allclose(got, true, rtol=0, atol=1e-9)


@pytest.mark.parametrize("mirror", [False, True])
def test_similarity_is_least_squares_without_reflection(mirror):
    rng = np.random.default_rng(7)
    src = rng.uniform(0, 100, (5, 2))
    dst = src @ np.array([[0.9, 0.3], [-0.3, 0.9]]) + 5 + rng.normal(0, 3, (5, 2))
    if mirror:  # the best fit would be a reflection; a similarity must not reflect
        dst[:, 0] = -dst[:, 0]
    got = alignment.similarity_transform(src, dst)
    np.testing.assert_allclose(got, _lstsq_similarity(src, dst), rtol=0, atol=1e-9)
    assert np.linalg.det(got[:, :2]) > 0
    np.testing.assert_allclose(got[0, 0], got[1, 1], atol=1e-12)  # rotation + uniform scale
    np.testing.assert_allclose(got[0, 1], -got[1, 0], atol=1e-12)
    with pytest.raises(ValueError, match="coincide"):
        alignment.similarity_transform(np.ones((5, 2)), dst)


def test_align_template_points_is_identity(faces):
    crop, matrix = alignment.align(faces[0], alignment.template(112), 112)
    np.testing.assert_allclose(matrix, [[1, 0, 0], [0, 1, 0]], atol=1e-9)
    np.testing.assert_array_equal(crop, faces[0])


def test_detected_keypoints_follow_the_placement(placed):
    for face, own, placement, canvas, found in placed:
        assert found.box.dtype == np.float32 and found.box.shape == (4,)
        assert found.keypoints.dtype == np.float32 and found.keypoints.shape == (5, 2)
        assert found.score >= 0.9
        x0, y0, x1, y1 = found.box
        assert np.all((found.keypoints >= [x0, y0]) & (found.keypoints <= [x1, y1]))
        # MTCNN jitters by a few pixels; at 1.7x scale we measured at most 5.0 px (8 faces).
        error = np.linalg.norm(_apply(placement, own) - found.keypoints, axis=1)
        assert error.max() < 7.0 and error.mean() < 3.5, error


def test_align_undoes_the_placement(placed):
    for face, own, placement, canvas, found in placed:
        crop, matrix = alignment.align(canvas, found.keypoints, 112)
        assert crop.dtype == np.uint8 and crop.shape == (112, 112, 3)
        assert matrix.dtype == np.float64 and matrix.shape == (2, 3)
        # LFW112 is ArcFace-aligned, so the crop is the original face again. Measured on 8 faces:
        # central PSNR 21-31 dB, correlation 0.87-0.99; a crop 15 degrees off gives ~12 dB, 0.3.
        a, b = crop[CENTRAL, CENTRAL], face[CENTRAL, CENTRAL]
        assert _psnr(a, b) > 20.0
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9
        # Exact equivariance: aligning the placed keypoints = aligning the originals after
        # undoing the placement.
        _, placed_matrix = alignment.align(canvas, _apply(placement, own), 112)
        _, own_matrix = alignment.align(face, own, 112)
        undo = np.vstack([cv2.invertAffineTransform(placement), [0, 0, 1]])
        np.testing.assert_allclose(placed_matrix, own_matrix @ undo, atol=1e-9)
        # warp_like applies the same transform; masks keep their values and channel axis.
        np.testing.assert_array_equal(alignment.warp_like(canvas, matrix, 112), crop)
        full = np.full((112, 112), 255, np.uint8)
        region = _place(full, placement, np.zeros(canvas.shape[:2], np.uint8))[..., None]
        region = np.where(region > 127, 255, 0).astype(np.uint8)  # a label mask of the face
        mask = alignment.warp_like(region, matrix, 112, cv2.INTER_NEAREST)
        assert mask.shape == (112, 112, 1) and set(np.unique(mask)) <= {0, 255}
        assert mask[CENTRAL, CENTRAL].min() == 255


def test_paste_back_round_trip(placed):
    for face, own, placement, canvas, found in placed:
        crop, matrix = alignment.align(canvas, found.keypoints, 112)
        back = alignment.paste_back(canvas, crop, matrix)
        assert back.dtype == np.uint8 and back.shape == canvas.shape
        ys, xs = np.mgrid[:CANVAS, :CANVAS]
        u, v = np.moveaxis(_apply(matrix, np.stack([xs, ys], -1).reshape(-1, 2)), -1, 0)
        u, v = u.reshape(CANVAS, CANVAS), v.reshape(CANVAS, CANVAS)
        edge = np.minimum.reduce([u + 0.5, 111.5 - u, v + 0.5, 111.5 - v])  # to the square
        outside, inside = edge < -1, edge > 12  # feather 0.1: full weight from 11.2 px in
        np.testing.assert_array_equal(back[outside], canvas[outside])
        # 1.7x down and up again; measured 42-48 dB inside on 8 faces.
        assert _psnr(back[inside], canvas[inside]) > 35.0
        # A black crop shows the blend weights: 1 in the middle, ramping to 0 at the edge.
        black = alignment.paste_back(canvas, np.zeros_like(crop), matrix, feather=0.25)
        np.testing.assert_array_equal(black[edge > 30], 0)
        np.testing.assert_array_equal(black[outside], canvas[outside])
        ring = (edge > 1) & (edge < 10)
        assert np.all(black[ring] <= canvas[ring])
        assert 0.3 * canvas[ring].mean() < black[ring].mean() < 0.9 * canvas[ring].mean()


def test_detect_order_bigger_face_first(detector, faces):
    canvas = _background((480, 640, 3), 5)
    canvas = _place(faces[0], _placement(0, 1.0, (150, 240)), canvas)
    canvas = _place(faces[1], _placement(0, 2.2, (430, 240)), canvas)
    found = detector.detect(canvas)
    assert len(found) == 2
    centers = [(f.box[:2] + f.box[2:]) / 2 for f in found]
    assert (
        np.linalg.norm(centers[0] - [430, 240]) < 30
        and np.linalg.norm(centers[1] - [150, 240]) < 20
    )
    assert detector.largest(canvas).box.tolist() == found[0].box.tolist()


def test_no_face_and_bad_input(detector):
    assert detector.detect(np.full((200, 200, 3), 128, np.uint8)) == []
    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    assert detector.detect(noise) == [] and detector.largest(noise) is None
    assert detector.detect(np.zeros((12, 40, 3), np.uint8)) == []  # below min_face_size
    with pytest.raises(TypeError, match="uint8"):
        detector.detect(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="grayscale"):
        detector.detect(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="grayscale"):
        alignment.align(np.zeros((64, 64, 1), np.uint8), alignment.template(64), 64)
    with pytest.raises(TypeError, match="uint8"):
        alignment.paste_back(np.zeros((64, 64, 3)), np.zeros((8, 8, 3), np.uint8), np.eye(2, 3))
