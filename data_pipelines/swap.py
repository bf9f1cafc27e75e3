"""Deterministic landmark-based face swaps (host side, numpy + OpenCV).

`swap_faces(target, source, target_landmarks, source_landmarks, method, rng, morph_alpha)`
pastes the source's face into the target image and returns the forgery, its blend mask and
its alpha (the share of source texture inside the region). Two kinds of forgery:
- SPLICES (`hull_*`, `elastic_*`, `template_*`; alpha 1): pure source pixels over the target
  inside the region, as Face X-ray's blended images. Little of the target's identity is
  left inside the face (Poisson cloning keeps some of its gradients: numbers below), so
  splices hardly teach target recovery (the paper's Section V).
- MORPHS (`morph_blend`; alpha < 1): the source warped piecewise-affinely onto the target's
  landmarks (pose, expression and face shape stay the target's) and its texture mixed with
  the target's, alpha * source + (1 - alpha) * target: part of the target's identity stays,
  as with the learned swappers (FaceShifter, MegaFS, E4S) DFREC recovers targets from.
Every method runs the same steps; they differ in the warp (step 1), how the blend region is
made (step 2) and how the source is pasted (step 5). `S` is the image side and `r = S / 112`
scales every pixel size, so a 224 swap looks like a 112 swap at twice the resolution.

1. Alignment. A similarity transform (rotation, uniform scale, translation) mapping the
   source's 68 landmarks onto the target's is estimated with `cv2.estimateAffinePartial2D`
   (LMEDS: robust to a few badly placed points such as an occluded jaw line; OpenCV seeds its
   LMEDS sampler with a constant, so the estimate is deterministic; default Levenberg-Marquardt
   refinement). Splices: the source is warped with it (`cv2.warpAffine`, bilinear).
   Morphs: piecewise-affine warp (`piecewise_affine_warp`). Control points, built the same
   way on both faces: the 68 landmarks; an outline ring, the 27 jaw and brow points pushed
   out from the landmark centroid by OUTLINE_SCALE = 1.5 (carries the warp smoothly past the
   face edge); 8 frame points (corners and edge midpoints of a square S/2 outside the image)
   that follow the similarity, so far from the face the warp is the similarity. Delaunay
   triangulation of the TARGET's control points (scipy/Qhull); for each triangle the affine
   map from the target triangle to the source triangle (solved exactly from its 3 vertex
   pairs); a label image of the triangles (`cv2.fillConvexPoly`, 4 fractional bits, drawn in
   Qhull's order) gives every target pixel its triangle's map, and the source is resampled
   once (`cv2.remap`, bilinear, BORDER_REFLECT). Either way, pixels the warp fills from
   outside the source image are excluded from the region.
2. Region (binary), by method:
   - `hull_*` and `morph_*`: the convex hull of the target's 68 landmarks, then dilated or
     eroded (probability 1/2 each) with an elliptical kernel of odd side k in
     {3, 5, ..., 2*round(4r)+1}.
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
   (255 = the pixel carries source information, 0 = pure target). For a morph the mask is
   this feathered REGION, independent of alpha (a morph pixel with mask 255 carries the
   source's texture at share alpha and the source's warped features).
5. Paste, by method:
   - splices `*_blend`: the colour-transferred warped source is the pasted image.
   - `*_poisson`: `cv2.seamlessClone` of the colour-transferred source into the target over
     the region (NORMAL_CLONE or MIXED_CLONE, probability 1/2 each) is the pasted image.
   - `morph_blend`: alpha ~ U[morph_alpha] (default MORPH_ALPHA), and the pasted image is the
     texture mix `round(alpha * source_ct + (1 - alpha) * target)` (uint8).
6. Composition from the quantised mask, with a = mask / 255 in float32:
   `image = round(target * (1 - a) + pasted * a)`. Where mask == 0 this is exactly `target`
   (bit for bit), where mask == 255 exactly `pasted`.

An empty mask (e.g. an erosion of a tiny region) raises `SwapError(reason="empty mask")`; a
failed alignment raises `SwapError(reason="no similarity transform")`; callers count both as
skips. Randomness comes only from `rng`, drawn in a fixed order (region deformation, blur
sigma, clone flag for `*_poisson`, alpha for morphs), so the same inputs and the same rng
state give the same bytes.

METHODS (SPLICE_METHODS + MORPH_METHODS)
- `hull_blend`: landmark hull, dilate/erode, colour transfer, blurred alpha blend
  (Face X-ray's blended images).
- `hull_poisson`: as `hull_blend`, pasted with Poisson (seamless) cloning before the blend.
- `elastic_blend`: landmark hull deformed by a smooth random displacement field, alpha blend.
- `template_blend`: 5-keypoint-aligned elliptical template region, dilate/erode, alpha blend.
- `morph_blend`: piecewise-affine warp onto the target's landmarks, landmark hull,
  dilate/erode, colour transfer, texture mix with alpha ~ U[morph_alpha], blurred blend.

How much identity each kind keeps (`python -m data_pipelines.measure_morph`: 50 pairs of
different LFW people at 112 px, FaceNet 128-D cosine, mean over pairs): two different people
0.0479; IDSim(forgery, target) / IDSim(forgery, source): hull_blend 0.1514 / 0.7359,
elastic_blend 0.1561 / 0.7312, template_blend 0.2424 / 0.5953, hull_poisson 0.4985 / 0.3720;
morph_blend at a fixed alpha of 0.6 / 0.7 / 0.8 / 1.0: 0.4897 / 0.3722 / 0.2813 / 0.1747 to
the target. With MORPH_ALPHA = (0.6, 0.8) morph_blend gives 0.3890 to the target and 0.4016
to the source: inside the paper's "None" range (FF++ 0.35-0.43, CelebaMegaFS 0.23-0.32,
FFHQ-E4S 0.28) and clearly above the alpha-blend splices (0.15-0.24). There is no
`morph_poisson`: Poisson cloning
itself keeps much of the target (even the hull_poisson splice keeps 0.4985), and a prototype
Poisson morph with alpha in (0.6, 0.8) kept 0.695 to the target and only 0.208 to the source.
"""

import dataclasses

import cv2
import numpy as np
from scipy.spatial import Delaunay  # Qhull: deterministic for the same points

SPLICE_METHODS: tuple[str, ...] = ("hull_blend", "hull_poisson", "elastic_blend", "template_blend")
MORPH_METHODS: tuple[str, ...] = ("morph_blend",)
METHODS: tuple[str, ...] = SPLICE_METHODS + MORPH_METHODS
# Share of source texture inside a morph's region, drawn per example from this range
# (config.data.morph_alpha; chosen by measurement, README "Data").
MORPH_ALPHA: tuple[float, float] = (0.6, 0.8)
OUTLINE = tuple(range(27))  # jaw line 0-16 and brows 17-26: the face's outer contour
OUTLINE_SCALE = 1.5  # morph control ring: the outline pushed out from the landmark centroid
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
    alpha: float = 1.0  # share of source texture inside the region (1 = splice, < 1 = morph)


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


def _control_points(landmarks: np.ndarray) -> np.ndarray:
    """float64 [68 + 27, 2]: the landmarks and their outline pushed out by OUTLINE_SCALE."""
    lm = np.asarray(landmarks, np.float64)
    centre = lm.mean(0)
    return np.concatenate([lm, centre + OUTLINE_SCALE * (lm[list(OUTLINE)] - centre)])


def _frame_points(size: int) -> np.ndarray:
    """float64 [8, 2]: corners and edge midpoints of a square S/2 outside the image."""
    lo, hi = -0.5 * size, 1.5 * size - 1
    mid = (lo + hi) / 2
    return np.array([[lo, lo], [mid, lo], [hi, lo], [hi, mid], [hi, hi], [mid, hi], [lo, hi],
                     [lo, mid]], np.float64)  # fmt: skip


def _affine_of(dst: np.ndarray, src: np.ndarray) -> np.ndarray | None:
    """float64 [2,3] mapping the 3 points `dst` onto `src`; None for a degenerate triangle."""
    a = np.c_[dst, np.ones(3)]
    if abs(np.linalg.det(a)) < 1e-6:
        return None
    return np.linalg.solve(a, src).T


def piecewise_affine_warp(
    source: np.ndarray,
    source_landmarks: np.ndarray,
    target_landmarks: np.ndarray,
    matrix: np.ndarray,
    size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(source warped onto the target's landmarks piecewise-affinely, uint8 0/1 inside map).

    Control points (the same construction on both faces): the 68 landmarks, the outline
    ring (`_control_points`) and 8 frame points outside the image that follow the global
    similarity `matrix` (source -> target), so far from the face the warp is that similarity.
    Delaunay triangulation of the TARGET's points; each target pixel (OpenCV centres at
    integer coordinates) takes the affine map of the triangle it falls in (triangles
    rasterised with `cv2.fillConvexPoly`, 4 fractional bits, in a fixed order) back to the
    source, and the source is resampled once (`cv2.remap`, bilinear, BORDER_REFLECT).
    Pixels no triangle covers, or whose triangle is degenerate, use the similarity.
    """
    inverse = cv2.invertAffineTransform(matrix.astype(np.float64))
    frame = _frame_points(size)
    dst = np.concatenate([_control_points(target_landmarks), frame])
    src = np.concatenate(
        [_control_points(source_landmarks), frame @ inverse[:, :2].T + inverse[:, 2]]
    )
    triangles = Delaunay(dst).simplices
    affines = [inverse]  # label 0: the similarity
    labels = np.zeros((size, size), np.int32)
    for tri in triangles:
        affine = _affine_of(dst[tri], src[tri])
        if affine is None:
            continue
        affines.append(affine)
        corners = np.round(dst[tri] * 16).astype(np.int32)
        cv2.fillConvexPoly(labels, corners, len(affines) - 1, lineType=cv2.LINE_8, shift=4)
    affines = np.stack(affines)[labels]  # [S,S,2,3]
    grid = np.arange(size, dtype=np.float64)
    x, y = grid[None, :], grid[:, None]
    map_x, map_y = (
        (affines[..., row, 0] * x + affines[..., row, 1] * y + affines[..., row, 2]).astype(
            np.float32
        )
        for row in (0, 1)
    )
    warped = cv2.remap(source, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    inside = cv2.remap(np.ones(source.shape[:2], np.uint8), map_x, map_y, cv2.INTER_NEAREST,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)  # fmt: skip
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


def mix(pasted: np.ndarray, target: np.ndarray, alpha: float) -> np.ndarray:
    """uint8 round(alpha * pasted + (1 - alpha) * target): a morph's texture."""
    out = alpha * pasted.astype(np.float32) + (1.0 - alpha) * target.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def compose(target: np.ndarray, pasted: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """round(target * (1 - a) + pasted * a), a = mask / 255: exactly `target` where mask == 0."""
    a = mask.astype(np.float32) / 255.0
    out = target.astype(np.float32) * (1.0 - a) + pasted.astype(np.float32) * a
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def check_alpha_range(morph_alpha) -> tuple[float, float]:
    """(lo, hi) floats with 0 < lo <= hi <= 1, or ValueError."""
    try:
        lo, hi = (float(v) for v in morph_alpha)
    except (TypeError, ValueError):
        raise ValueError(f"morph_alpha must be a pair (lo, hi), got {morph_alpha!r}") from None
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"morph_alpha must satisfy 0 < lo <= hi <= 1, got {morph_alpha!r}")
    return lo, hi


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
    morph_alpha: tuple[float, float] = MORPH_ALPHA,
) -> SwapResult:
    """`source`'s face pasted into `target` by `method` (algorithm in the module docstring).

    morph_alpha: the range of a morph's source-texture share (morph_* methods only).
    """
    target, source = np.asarray(target), np.asarray(source)
    target_landmarks = np.asarray(target_landmarks, np.float32)
    source_landmarks = np.asarray(source_landmarks, np.float32)
    _check_inputs(target, source, target_landmarks, source_landmarks, method)
    alpha_lo, alpha_hi = check_alpha_range(morph_alpha)
    size = target.shape[0]
    scale = size / REFERENCE_SIZE
    kind, paste = method.split("_")

    matrix = similarity(source_landmarks, target_landmarks)
    if kind == "morph":
        warped, inside = piecewise_affine_warp(
            source, source_landmarks, target_landmarks, matrix, size
        )
    else:
        warped, inside = warp(source, matrix, size)
    if kind in ("hull", "morph"):
        region = morph_region(hull_region(target_landmarks, size), rng, scale)
    elif kind == "elastic":
        region = elastic_region(hull_region(target_landmarks, size), rng)
    else:
        region = morph_region(template_region(target_landmarks, size), rng, scale)
    region &= inside
    sigma = rng.uniform(1.0, 4.0) * scale
    mixed = paste == "poisson" and rng.random() < 0.5
    alpha = float(rng.uniform(alpha_lo, alpha_hi)) if kind == "morph" else 1.0
    if not region.any():
        raise SwapError("empty mask", f"{method} region vanished")

    pasted = reinhard_transfer(warped, target, region)
    if kind == "morph":
        pasted = mix(pasted, target, alpha)
    if paste == "poisson":
        pasted = poisson_paste(pasted, target, region, mixed)
    mask = blend_mask(region, sigma)
    if not mask.any():
        raise SwapError("empty mask", f"{method} blend weight rounds to 0 everywhere")
    return SwapResult(image=compose(target, pasted, mask), mask=mask, alpha=alpha)
