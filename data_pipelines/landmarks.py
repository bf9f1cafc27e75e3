"""68-point landmarks of face crops (face-api's FaceLandmark68Net, in JAX) and face-region masks.

The net expects a face crop (it was trained on detector boxes); our datasets hold aligned
crops, so it runs on whole images. Batches are padded to a fixed size so one compiled program
serves every call.
"""

import cv2
import jax
import numpy as np

from dfrec_jax.pretrained import attributes

NUM_LANDMARKS = 68


class LandmarkDetector:
    """uint8 or float images [N,S,S,3] -> float32 [N,68,2] (x, y) in pixels of the image."""

    def __init__(self, face_api_dir: str | None = None, batch_size: int = 64):
        self.net = attributes.AttributeNet.load(face_api_dir, heads=("landmarks",))
        self.batch_size = batch_size

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 255.0
        n, size = len(images), images.shape[1]
        out = np.zeros((n, NUM_LANDMARKS, 2), np.float32)
        for start in range(0, n, self.batch_size):
            chunk = images[start : start + self.batch_size]
            padded = np.zeros((self.batch_size,) + images.shape[1:], np.float32)
            padded[: len(chunk)] = chunk
            points = self.net.predict(jax.numpy.asarray(padded))["landmarks"]
            out[start : start + len(chunk)] = np.asarray(points)[: len(chunk)] * size
        return out


def hull_mask(landmarks: np.ndarray, size: int) -> np.ndarray:
    """uint8 [size,size,1]: 255 inside the convex hull of the (x, y) pixel landmarks."""
    mask = np.zeros((size, size), np.uint8)
    hull = cv2.convexHull(np.round(landmarks).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, 255)
    return mask[..., None]
