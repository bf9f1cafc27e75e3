"""Classical baselines of the recovery table: what recovery gives without learning.

Rows of the table besides DFREC:
  - "None": the forgery itself, scored as if it were the recovered target (the paper's first
    row). It needs no code: the runner passes the input image where a recovery would go.
  - "telea" / "ns": the face region is erased and filled from the surroundings by OpenCV's
    inpainting (Telea's fast marching, or Navier-Stokes), which removes the swapped identity
    but cannot bring back the target's. A learned recovery should beat these on identity.

The region to fill is the convex hull of the input's 68 landmarks (`landmark_region`), or a
fixed ellipse over the inner face of an aligned crop (`fixed_region`) when there are no
landmarks: config.eval.inpaint_mask picks one.
"""

import cv2
import numpy as np

from data_pipelines import alignment
from data_pipelines import landmarks as landmarks_lib

METHODS = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}


def inpaint(images, masks, method: str = "telea", radius: int = 5) -> np.ndarray:
    """uint8 [B,H,W,3]: images uint8 [B,H,W,3] with the pixels where masks [B,H,W] is True
    filled by cv2.inpaint (radius in pixels); pixels outside the mask are returned unchanged.

    Both OpenCV methods fill each channel with the same geometric weights, so the channel order
    does not matter and RGB images go in as they are (tested against a BGR round trip).
    OpenCV's Telea is not exactly constant-preserving: on a flat image its fill is off by up to
    2 grey levels at radius >= 3 (4 at radius 1); NS reproduces it exactly.
    """
    if method not in METHODS:
        raise ValueError(f"inpaint method must be one of {sorted(METHODS)}, got {method!r}")
    images, masks = np.asarray(images), np.asarray(masks)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        got = f"{images.dtype} {images.shape}"
        raise ValueError(f"inpaint: images must be uint8 [B,H,W,3], got {got}")
    if masks.shape != images.shape[:3]:
        raise ValueError(f"inpaint: masks {masks.shape} do not match images {images.shape[:3]}")
    out = np.empty_like(images)
    for i, (image, mask) in enumerate(zip(images, masks)):
        mask_u8 = np.ascontiguousarray(mask, np.uint8) * np.uint8(255)
        out[i] = cv2.inpaint(np.ascontiguousarray(image), mask_u8, radius, METHODS[method])
    return out


def fixed_region(size: int) -> np.ndarray:
    """bool [S,S]: an ellipse over the inner face of an ArcFace-aligned crop of side S.

    From the template's five keypoints: centred halfway between the eye midpoint and the mouth
    midpoint, horizontal semi-axis = the inter-ocular distance, vertical semi-axis = the
    eye-to-mouth distance. In the 112 px template that spans x 21..91 (cheek to cheek at eye
    level) and y 31..112 (eyebrows to chin), the part a face swap replaces.
    """
    left_eye, right_eye, _, mouth_left, mouth_right = alignment.template(size).astype(np.float64)
    eyes, mouth = (left_eye + right_eye) / 2, (mouth_left + mouth_right) / 2
    cx, cy = (eyes + mouth) / 2
    ax = np.linalg.norm(right_eye - left_eye)
    ay = np.linalg.norm(mouth - eyes)
    y, x = np.mgrid[:size, :size].astype(np.float64)
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


def landmark_region(landmarks, size: int, dilate: int = 0) -> np.ndarray:
    """bool [B,S,S]: the filled convex hull of each row's 68 (x, y) pixel landmarks [B,68,2],
    grown by `dilate` pixels (an elliptical structuring element), for images of side S.

    Rows with any non-finite landmark (no face found) get `fixed_region(size)` instead, so
    every image is inpainted over a face-sized region.
    """
    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (68, 2):
        raise ValueError(f"landmark_region: landmarks must be [B,68,2], got {landmarks.shape}")
    kernel = None
    if dilate > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate + 1, 2 * dilate + 1))
    regions = np.empty((len(landmarks), size, size), bool)
    for i, row in enumerate(landmarks):
        if not np.isfinite(row).all():
            regions[i] = fixed_region(size)
            continue
        mask = landmarks_lib.hull_mask(row, size)[..., 0]  # uint8 0/255
        if kernel is not None:
            mask = cv2.dilate(mask, kernel)
        regions[i] = mask > 0
    return regions
