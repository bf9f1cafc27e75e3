"""Deterministic landmark-based face swaps (host side, numpy + OpenCV).

`swap_faces(target, source, target_landmarks, source_landmarks, method, rng)` pastes the
source's face into the target image and returns the forgery and its blend mask. Every method
runs the same steps; they differ only in how the blend region is made (step 2) and how the
source is pasted (step 5). `S` is the image side and `r = S / 112` scales every pixel size, so
a 224 swap looks like a 112 swap at twice the resolution.

1. Alignment. A similarity transform (rotation, uniform scale, translation) mapping the
   source's 68 landmarks onto the target's is estimated with `cv2.estimateAffinePartial2D`
   (LMEDS: robust to a few badly placed points such as an occluded jaw line; OpenCV seeds its
   LMEDS sampler with a constant, so the estimate is deterministic; default Levenberg-Marquardt
   refinement). The source is warped with it (`cv2.warpAffine`, bilinear). Pixels the warp
   fills from outside the source image are excluded from the region.
2. Region (binary), by method:
   - `hull_*`: the convex hull of the target's 68 landmarks, then dilated or eroded
     (probability 1/2 each) with an elliptical kernel of odd side k in {3, 5, ..., 2*round(4r)+1}.
   - `elastic_*`: the same hull, deformed by a smooth random displacement field: uniform noise
     in [-1, 1] on a 6x6 grid per axis, upsampled bicubically to S x S, scaled so its largest
     displacement is A ~ U[0.03, 0.08] * S pixels, applied to the hull with `cv2.remap`
     (bilinear, re-thresholded at 1/2).
   - `template_*`: a fixed template region, not the landmark hull: the ellipse centred at
     (56, 70) with semi-axes (33, 38) in the 112x112 ArcFace alignment frame (it covers brows,
     eyes, nose, mouth and upper chin). It is aligned to the target by the similarity from the
     ArcFace 5-point template to the target's 5 keypoints (eye centres = means of landmarks
     36-41 and 42-47, nose tip 30, mouth corners 48 and 54; estimated as in step 1),
     then dilated or eroded as for `hull_*`.
3. Colour transfer (Reinhard et al. 2001): in CIE LAB (OpenCV float conversion), each channel
   of the warped source is shifted and scaled so that its mean and standard deviation over the
   region equal the target's over the same region; applied to the whole warped source.
4. Blend weight: the region (0/1) blurred by a Gaussian of sigma ~ U[1, 4] * r pixels, then
   QUANTISED to uint8: `mask = round(255 * blur)`. This uint8 is the returned mask
   (255 = the pixel carries the source, 0 = pure target).
5. Paste, by method suffix:
   - `*_blend`: the colour-transferred warped source is the pasted image.
   - `*_poisson`: `cv2.seamlessClone` of the colour-transferred source into the target over
     the region (NORMAL_CLONE or MIXED_CLONE, probability 1/2 each) is the pasted image.
6. Composition from the quantised mask, with a = mask / 255 in float32:
   `image = round(target * (1 - a) + pasted * a)`. Where mask == 0 this is exactly `target`
   (bit for bit), where mask == 255 exactly `pasted`.

An empty mask (e.g. an erosion of a tiny region) raises `SwapError(reason="empty mask")`; a
failed alignment raises `SwapError(reason="no similarity transform")`; callers count both as
skips. Randomness comes only from `rng`, drawn in a fixed order (region deformation, blur
sigma, clone flag), so the same inputs and the same rng state give the same bytes.

METHODS
- `hull_blend`: landmark hull, dilate/erode, colour transfer, blurred alpha blend
  (Face X-ray's blended images).
- `hull_poisson`: as `hull_blend`, pasted with Poisson (seamless) cloning before the blend.
- `elastic_blend`: landmark hull deformed by a smooth random displacement field, alpha blend.
- `template_blend`: 5-keypoint-aligned elliptical template region, dilate/erode, alpha blend.
"""

import dataclasses

import cv2
import numpy as np

METHODS: tuple[str, ...] = ("hull_blend", "hull_poisson", "elastic_blend", "template_blend")
NUM_LANDMARKS = 68
REFERENCE_SIZE = 112

# ArcFace's 112x112 alignment template (left eye, right eye, nose tip, mouth corners), and
# the template region (an ellipse) in that frame.
ARCFACE_5 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
     [70.7299, 92.2041]],
    np.float32,
)  # fmt: skip
TEMPLATE_CENTER = (56.0, 70.0)
TEMPLATE_AXES = (33.0, 38.0)
ELASTIC_GRID = 6


class SwapError(ValueError):
    """A swap that cannot be made from these inputs; `reason` is a short skip-counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class SwapResult:
    image: np.ndarray  # uint8 [S,S,3]: the forgery
    mask: np.ndarray  # uint8 [S,S,1]: blend weight * 255 (255 = source, 0 = pure target)


def five_keypoints(landmarks: np.ndarray) -> np.ndarray:
    """float32 [5,2] eye centres, nose tip, mouth corners of 68-point (x, y) landmarks."""
    lm = np.asarray(landmarks, np.float32)
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]]).astype(
        np.float32
    )


def similarity(src_points: np.ndarray, dst_points: np.ndarray) -> np.ndarray:
    """float64 [2,3] similarity mapping src_points onto dst_points (LMEDS, see step 1)."""
    matrix, _ = cv2.estimateAffinePartial2D(
        np.asarray(src_points, np.float32), np.asarray(dst_points, np.float32), method=cv2.LMEDS
    )
    if matrix is None or not np.all(np.isfinite(matrix)):
        raise SwapError("no similarity transform")
    return matrix


def warp(image: np.ndarray, matrix: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(warped image, uint8 0/1 map of pixels the warp filled from inside the image)."""
    warped = cv2.warpAffine(
        image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    inside = np.ones(image.shape[:2], np.uint8)
    inside = cv2.warpAffine(inside, matrix, (size, size), flags=cv2.INTER_NEAREST)
    return warped, cv2.erode(inside, np.ones((3, 3), np.uint8))


def _polygon_mask(points: np.ndarray, size: int) -> np.ndarray:
    """uint8 0/1 [S,S]: the convex hull of float (x, y) points (sub-pixel: 4 fractional bits)."""
    mask = np.zeros((size, size), np.uint8)
    hull = cv2.convexHull(np.round(np.asarray(points, np.float64) * 16).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, 1, lineType=cv2.LINE_8, shift=4)
    return mask


def hull_region(landmarks: np.ndarray, size: int) -> np.ndarray:
    """uint8 0/1 [S,S]: the convex hull of the 68 landmarks."""
    return _polygon_mask(landmarks, size)


def template_region(landmarks: np.ndarray, size: int) -> np.ndarray:
    """uint8 0/1 [S,S]: the template ellipse aligned to the landmarks' 5 keypoints."""
    angles = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
    ellipse = np.stack(
        [
            TEMPLATE_CENTER[0] + TEMPLATE_AXES[0] * np.cos(angles),
            TEMPLATE_CENTER[1] + TEMPLATE_AXES[1] * np.sin(angles),
        ],
        axis=1,
    )
    matrix = similarity(ARCFACE_5, five_keypoints(landmarks))
    points = ellipse @ matrix[:, :2].T + matrix[:, 2]
    return _polygon_mask(points, size)


def morph_region(region: np.ndarray, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Dilate or erode (1/2 each) with an elliptical kernel of random odd side."""
    dilate = rng.random() < 0.5
    side = 2 * int(rng.integers(1, max(1, round(4 * scale)) + 1)) + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
    return (cv2.dilate if dilate else cv2.erode)(region, kernel)


def elastic_region(region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`region` moved by a smooth random displacement field (see step 2, elastic_*)."""
    size = region.shape[0]
    amplitude = rng.uniform(0.03, 0.08) * size
    noise = rng.uniform(-1.0, 1.0, (2, ELASTIC_GRID, ELASTIC_GRID)).astype(np.float32)
    grid = np.arange(size, dtype=np.float32)
    maps = []
    for axis, offset in enumerate((grid[None, :], grid[:, None])):
        field = cv2.resize(noise[axis], (size, size), interpolation=cv2.INTER_CUBIC)
        field *= amplitude / max(float(np.abs(field).max()), 1e-6)
        maps.append((offset + field).astype(np.float32))
    moved = cv2.remap(
        region.astype(np.float32), maps[0], maps[1], cv2.INTER_LINEAR, borderValue=0.0
    )
    return (moved > 0.5).astype(np.uint8)


def lab_stats(image: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel LAB mean and std of uint8 RGB `image` over the 0/1 `region`."""
    lab = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    pixels = lab[region.astype(bool)]
    return pixels.mean(0), pixels.std(0)


def reinhard_transfer(source: np.ndarray, target: np.ndarray, region: np.ndarray) -> np.ndarray:
    """uint8 `source` recoloured so its LAB mean/std over `region` match `target`'s there."""
    src_mean, src_std = lab_stats(source, region)
    dst_mean, dst_std = lab_stats(target, region)
    lab = cv2.cvtColor(source.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    lab = (lab - src_mean) * (dst_std / np.maximum(src_std, 1e-3)) + dst_mean
    rgb = cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def blend_mask(region: np.ndarray, sigma: float) -> np.ndarray:
    """uint8 [S,S,1]: round(255 * Gaussian-blurred 0/1 region); the exact blend weight."""
    soft = cv2.GaussianBlur(region.astype(np.float32), (0, 0), sigmaX=sigma, sigmaY=sigma)
    return np.clip(np.rint(soft * 255.0), 0, 255).astype(np.uint8)[..., None]


def poisson_paste(
    pasted: np.ndarray, target: np.ndarray, region: np.ndarray, mixed: bool
) -> np.ndarray:
    """`cv2.seamlessClone` of `pasted` into `target` over `region`, without any shift."""
    region = region.copy()
    region[:2], region[-2:], region[:, :2], region[:, -2:] = 0, 0, 0, 0  # clone needs a frame
    if not region.any():
        return pasted
    x, y, w, h = cv2.boundingRect(region)
    # OpenCV places the mask's bounding box at center - (w//2, h//2): this centre keeps the
    # source exactly where it is (checked by tests on the clone's gradients).
    center = (x + w // 2, y + h // 2)
    flag = cv2.MIXED_CLONE if mixed else cv2.NORMAL_CLONE
    return cv2.seamlessClone(pasted, target, region * 255, center, flag)


def compose(target: np.ndarray, pasted: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """round(target * (1 - a) + pasted * a), a = mask / 255: exactly `target` where mask == 0."""
    a = mask.astype(np.float32) / 255.0
    out = target.astype(np.float32) * (1.0 - a) + pasted.astype(np.float32) * a
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _check_inputs(target, source, target_landmarks, source_landmarks, method):
    if method not in METHODS:
        raise ValueError(f"unknown swap method {method!r}; known: {', '.join(METHODS)}")
    for name, image in (("target", target), ("source", source)):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{name} must be uint8 [S,S,3], got {image.dtype} {image.shape}")
    if target.shape != source.shape or target.shape[0] != target.shape[1]:
        raise ValueError(f"target {target.shape} and source {source.shape} must be equal squares")
    for name, lm in (("target", target_landmarks), ("source", source_landmarks)):
        if lm.shape != (NUM_LANDMARKS, 2) or not np.all(np.isfinite(lm)):
            raise ValueError(f"{name}_landmarks must be finite [68,2], got {lm.shape}")


def swap_faces(
    target: np.ndarray,
    source: np.ndarray,
    target_landmarks: np.ndarray,
    source_landmarks: np.ndarray,
    method: str,
    rng: np.random.Generator,
) -> SwapResult:
    """`source`'s face pasted into `target` by `method` (algorithm in the module docstring)."""
    target, source = np.asarray(target), np.asarray(source)
    target_landmarks = np.asarray(target_landmarks, np.float32)
    source_landmarks = np.asarray(source_landmarks, np.float32)
    _check_inputs(target, source, target_landmarks, source_landmarks, method)
    size = target.shape[0]
    scale = size / REFERENCE_SIZE
    kind, paste = method.split("_")

    warped, inside = warp(source, similarity(source_landmarks, target_landmarks), size)
    if kind == "hull":
        region = morph_region(hull_region(target_landmarks, size), rng, scale)
    elif kind == "elastic":
        region = elastic_region(hull_region(target_landmarks, size), rng)
    else:
        region = morph_region(template_region(target_landmarks, size), rng, scale)
    region &= inside
    sigma = rng.uniform(1.0, 4.0) * scale
    mixed = paste == "poisson" and rng.random() < 0.5
    if not region.any():
        raise SwapError("empty mask", f"{method} region vanished")

    pasted = reinhard_transfer(warped, target, region)
    if paste == "poisson":
        pasted = poisson_paste(pasted, target, region, mixed)
    mask = blend_mask(region, sigma)
    if not mask.any():
        raise SwapError("empty mask", f"{method} blend weight rounds to 0 everywhere")
    return SwapResult(image=compose(target, pasted, mask), mask=mask)
