"""Face detection (MTCNN) and 5-point similarity alignment, with the inverse paste-back.

Alignment maps the five MTCNN keypoints onto the ArcFace 112x112 template (scaled to the crop
size) by a least-squares similarity (rotation, uniform scale, translation; never a reflection).
This is the alignment of our LFW faces (../shared/data/lfw112), so crops made here from video
frames or photos in the wild look like the LFW demo data.

Conventions: images are uint8 RGB [H,W,3] (host side, like the rest of data_pipelines); points
are (x, y) in pixels with pixel centres at integer coordinates (OpenCV's convention). A crop
`matrix` is float64 [2,3] mapping image coordinates to crop coordinates, so `matrix @ [x,y,1]`
is where image point (x, y) lands in the crop. Crops are sampled bilinearly with reflected
borders (cv2.BORDER_REFLECT_101): a face near the frame edge gets mirrored image content rather
than black or smeared bands.
"""

import dataclasses
import os

import cv2
import numpy as np

KEYPOINT_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")  # image-left first

# ArcFace (insightface) 5-point template for 112x112 crops, in KEYPOINT_NAMES order.
_ARCFACE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    np.float32,
)

BORDER_MODE = cv2.BORDER_REFLECT_101


def template(size: int) -> np.ndarray:
    """float32 [5,2]: the ArcFace 112x112 template scaled by size/112 (LFW112's alignment)."""
    return _ARCFACE_112 * np.float32(size / 112.0)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: array fields; compare by identity
class Face:
    box: np.ndarray  # float32 [4]: x0, y0, x1, y1 in pixels
    score: float  # detector confidence in [0, 1]
    keypoints: np.ndarray  # float32 [5,2] (x, y) pixels in KEYPOINT_NAMES order


def _check_rgb8(image, what: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(
            f"{what} must be uint8 RGB [H,W,3], got dtype {image.dtype}; convert float [0,1] "
            "images with (x * 255).round().astype(np.uint8)"
        )
    if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 1):
        raise ValueError(f"{what} is grayscale {image.shape}; expected RGB [H,W,3]")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{what} has shape {image.shape}; expected RGB [H,W,3]")
    return image


class FaceDetector:
    """MTCNN (PyPI mtcnn==1.0.0, TensorFlow on CPU) faces with 5 keypoints each.

    The model (and TensorFlow) load on the first `detect` call, once per detector; construct
    one detector per process and reuse it.
    """

    def __init__(self, min_confidence: float = 0.9, min_face_size: int = 20):
        self.min_confidence = float(min_confidence)
        self.min_face_size = int(min_face_size)
        self._mtcnn = None

    def _model(self):
        if self._mtcnn is None:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            from mtcnn import MTCNN  # lazy: importing TensorFlow costs seconds

            self._mtcnn = MTCNN(device="CPU:0")
        return self._mtcnn

    def __getstate__(self):  # picklable for worker processes: the model reloads lazily
        return {**self.__dict__, "_mtcnn": None}

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in a uint8 RGB [H,W,3] image, best first (box area * score); [] if none."""
        image = _check_rgb8(image)
        if min(image.shape[:2]) < self.min_face_size:
            return []  # the image pyramid would be empty
        rows = self._model().detect_faces(
            np.ascontiguousarray(image),
            box_format="xyxy",
            output_type="numpy",  # the json output rounds keypoints to whole pixels
            min_face_size=self.min_face_size,
            # Filtering in ONet gives the same faces as filtering afterwards: NMS only lets a
            # box be suppressed by a higher-scoring one.
            threshold_onet=self.min_confidence,
        )
        # rows: [image_id, x0, y0, x1, y1, score, 5 x-coordinates, 5 y-coordinates], points in
        # KEYPOINT_NAMES order (mtcnn.utils.landmarks.parse_landmarks; to_json's docstring says
        # interleaved x, y, which is wrong).
        faces = [
            Face(
                box=np.asarray(r[1:5], np.float32),
                score=float(r[5]),
                keypoints=np.stack([r[6:11], r[11:16]], axis=1).astype(np.float32),
            )
            for r in np.asarray(rows, np.float64).reshape(-1, 16)
            if r[5] >= self.min_confidence
        ]

        def rank(face):
            x0, y0, x1, y1 = face.box
            return max(x1 - x0, 0) * max(y1 - y0, 0) * face.score

        return sorted(faces, key=rank, reverse=True)

    def largest(self, image: np.ndarray) -> Face | None:
        """The best face (see `detect`), or None."""
        faces = self.detect(image)
        return faces[0] if faces else None


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """float64 [2,3] similarity A minimising sum |A @ [src,1] - dst|^2 (Umeyama 1991).

    Rotation, uniform scale and translation only: never a reflection, even where one fits better.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"expected two [N,2] point sets with N >= 2, got {src.shape}, {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 0:
        raise ValueError("source points coincide; no similarity transform is defined")
    u, s, vt = np.linalg.svd(dst_c.T @ src_c / len(src))
    d = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = (u * d) @ vt  # u @ diag(d) @ vt: the closest proper rotation
    scale = (s * d).sum() / src_var
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def align(image: np.ndarray, keypoints: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [size,size,3] crop, float64 [2,3] image->crop matrix) aligning `keypoints` [5,2]."""
    image = _check_rgb8(image)
    keypoints = np.asarray(keypoints, np.float64)
    if keypoints.shape != (5, 2):
        raise ValueError(
            f"keypoints must be [5,2] in {KEYPOINT_NAMES} order, got {keypoints.shape}"
        )
    matrix = similarity_transform(keypoints, template(size))
    return warp_like(image, matrix, size), matrix


def warp_like(
    image: np.ndarray, matrix: np.ndarray, size: int, interpolation=cv2.INTER_LINEAR
) -> np.ndarray:
    """Applies a crop `matrix` (from `align`) to another image of the same frame.

    `image` is uint8 or float32 [H,W], [H,W,C] (C <= 4); the result keeps its dtype and channel
    layout ([H,W,1] stays [size,size,1]). Use INTER_NEAREST for label masks (or bilinear and a
    threshold), bilinear for pictures.
    """
    image = np.asarray(image)
    if image.dtype not in (np.uint8, np.float32):
        raise TypeError(f"image must be uint8 or float32, got dtype {image.dtype}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and not 1 <= image.shape[-1] <= 4):
        raise ValueError(f"image must be [H,W] or [H,W,C<=4], got shape {image.shape}")
    out = cv2.warpAffine(
        np.ascontiguousarray(image),
        np.asarray(matrix, np.float64),
        (size, size),
        flags=interpolation,
        borderMode=BORDER_MODE,
    )
    return out.reshape((size, size) + image.shape[2:])


def _square_weight(size: int, feather: float) -> np.ndarray:
    """float32 [size,size]: 1 inside, ramping linearly to 0 at the square's edge."""
    # Distance of each pixel centre to the nearest edge of the square [-0.5, size-0.5].
    edge = np.minimum(np.arange(size) + 0.5, size - 0.5 - np.arange(size))
    ramp = feather * size
    w = np.ones(size, np.float32) if ramp <= 0 else np.clip(edge / ramp, 0, 1).astype(np.float32)
    return np.minimum(w[:, None], w[None, :])


def paste_back(
    original: np.ndarray, crop: np.ndarray, matrix: np.ndarray, feather: float = 0.1
) -> np.ndarray:
    """`crop` (uint8 [S,S,3]) warped back into `original` (uint8 [H,W,3]) by `matrix`'s inverse.

    The blend weight is 1 inside the crop square and ramps to 0 over its outer `feather * S`
    pixels; pixels outside the warped square keep their original values bit-exactly.
    """
    original = _check_rgb8(original, "original")
    crop = _check_rgb8(crop, "crop")
    if crop.shape[0] != crop.shape[1]:
        raise ValueError(f"crop must be square, got {crop.shape}")
    if not 0 <= feather <= 0.5:
        raise ValueError(f"feather must be in [0, 0.5], got {feather}")
    height, width = original.shape[:2]
    matrix = np.asarray(matrix, np.float64)
    # WARP_INVERSE_MAP: `matrix` maps output (original) pixels to input (crop) pixels.
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpAffine(crop, matrix, (width, height), flags=flags, borderMode=BORDER_MODE)
    weight = cv2.warpAffine(
        _square_weight(crop.shape[0], feather),
        matrix,
        (width, height),
        flags=flags,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )[..., None]
    blend = original * (1.0 - weight) + warped * weight
    blend = np.clip(np.round(blend), 0, 255).astype(np.uint8)
    return np.where(weight > 0, blend, original)
