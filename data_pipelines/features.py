"""The one feature dict every DFREC dataset produces, and helpers to fill it.

Keys (all builders, all splits):
- `image`   uint8 [S,S,3]: the network input (a forgery, or a pristine face).
- `source`  uint8 [S,S,3]: the true source face (whose identity was pasted in).
- `target`  uint8 [S,S,3]: the true target face (the person really filmed).
- `mask`    uint8 [S,S,1]: 255 where the pixel carries the source (the blend region), 0 else.
- `face_mask` uint8 [S,S,1]: 255 inside the convex hull of `image`'s 68 landmarks (the face
  region the on-the-fly blended forgeries paste into); extends the issue's dict.
- `landmarks` float32 [68,2]: (x, y) pixels of the target's 68 landmarks (face-api net);
  extends the issue's dict (pose consistency in evaluation).
- `label`   0 pristine / 1 forgery; `method` string ("pristine" or the swap method);
  `source_id`, `target_id` strings (identities; equal for pristine faces).

Pristine examples have mask == 0 and source == target == image. Images are stored as PNG:
lossless, so "image equals target outside the mask" holds bit for bit after decoding.
"""

import numpy as np
import tensorflow_datasets as tfds

NUM_LANDMARKS = 68
LABELS = ("pristine", "forgery")
PRISTINE = "pristine"


def features_dict(image_size: int) -> tfds.features.FeaturesDict:
    rgb = (image_size, image_size, 3)
    gray = (image_size, image_size, 1)
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=rgb, encoding_format="png"),
            "source": tfds.features.Image(shape=rgb, encoding_format="png"),
            "target": tfds.features.Image(shape=rgb, encoding_format="png"),
            "mask": tfds.features.Image(shape=gray, encoding_format="png"),
            "face_mask": tfds.features.Image(shape=gray, encoding_format="png"),
            "landmarks": tfds.features.Tensor(shape=(NUM_LANDMARKS, 2), dtype=np.float32),
            "label": tfds.features.ClassLabel(names=LABELS),
            "method": tfds.features.Text(),
            "source_id": tfds.features.Text(),
            "target_id": tfds.features.Text(),
        }
    )


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [0,1] or uint8 -> uint8, rounding (not truncating) floats."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return np.clip(np.rint(image.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)


def _gray(mask: np.ndarray) -> np.ndarray:
    mask = to_uint8(mask)
    return mask if mask.ndim == 3 else mask[..., None]


def pristine_example(
    image: np.ndarray, face_mask: np.ndarray, landmarks: np.ndarray, identity: str
) -> dict:
    """A real face: it is its own source and target; nothing was pasted (mask all 0)."""
    image = to_uint8(image)
    return {
        "image": image,
        "source": image,
        "target": image,
        "mask": np.zeros(image.shape[:2] + (1,), np.uint8),
        "face_mask": _gray(face_mask),
        "landmarks": np.asarray(landmarks, np.float32),
        "label": 0,
        "method": PRISTINE,
        "source_id": identity,
        "target_id": identity,
    }


def forgery_example(
    image: np.ndarray,
    source: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray,
    face_mask: np.ndarray,
    landmarks: np.ndarray,
    method: str,
    source_id: str,
    target_id: str,
) -> dict:
    """A face swap: `source`'s identity pasted into `target` inside `mask` (255 = source)."""
    mask = _gray(mask)
    if not mask.any():
        raise ValueError(f"forgery {source_id} -> {target_id} ({method}) has an empty mask")
    return {
        "image": to_uint8(image),
        "source": to_uint8(source),
        "target": to_uint8(target),
        "mask": mask,
        "face_mask": _gray(face_mask),
        "landmarks": np.asarray(landmarks, np.float32),
        "label": 1,
        "method": method,
        "source_id": source_id,
        "target_id": target_id,
    }
