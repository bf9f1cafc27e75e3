"""The one feature dict every DFREC dataset produces, and helpers to fill it.

Keys (all builders, all splits):
- `image`   uint8 [S,S,3]: the network input (a forgery, or a pristine face).
- `source`  uint8 [S,S,3]: the true source face (whose identity was pasted in).
- `target`  uint8 [S,S,3]: the true target face (the person really filmed).
- `mask`    uint8 [S,S,1]: 255 where the pixel carries source information (a forgery's
  feathered blend region), 0 where it is pure target; 255 everywhere for a pristine face.
- `alpha`   float32 scalar: the share of source texture inside the region: 0.0 pristine,
  1.0 splices (lfw_swap hull/elastic/template methods, blended images), the drawn alpha
  for morphs (lfw_swap `morph_blend`, morphed blended images), -1.0 unknown (datasets of
  learned swappers: faceforensics, celeba_megafs, ffhq_e4s). Extends the issue's dict.
- `face_mask` uint8 [S,S,1]: 255 inside the convex hull of `image`'s 68 landmarks (the face
  region the on-the-fly blended forgeries paste into); extends the issue's dict.
- `landmarks` float32 [68,2]: (x, y) pixels of the target's 68 landmarks (face-api net);
  extends the issue's dict (pose consistency in evaluation).
- `label`   0 pristine / 1 forgery; `method` string ("pristine" or the swap method);
  `source_id`, `target_id` strings (identities; equal for pristine faces).
- `mask_source` string, where `mask` came from: "dataset" (shipped with the data, e.g.
  FF++ mask videos), "derived" (from |forgery - target|, paired_images.derive_mask),
  "generated" (the builder made the forgery, so it knows the region: lfw_swap) or
  "pristine" (the all-255 convention). Extends the issue's dict (provenance per example).

Pristine examples: a real face is its own source, so EVERY pixel carries the source identity:
mask == 255 everywhere, source == target == image, alpha 0 (nothing was mixed in). Forgeries
equal their target wherever mask == 0. Images are stored as PNG: lossless, so "image equals
target outside the mask" holds bit for bit after decoding.
"""

import cv2
import numpy as np
import tensorflow_datasets as tfds

from dfrec_jax import host_tf  # noqa: F401  (TensorFlow kept off the accelerators)
from dfrec_jax.images import to_uint8

NUM_LANDMARKS = 68
LABELS = ("pristine", "forgery")
PRISTINE = "pristine"
ALPHA_PRISTINE = 0.0
ALPHA_SPLICE = 1.0
ALPHA_UNKNOWN = -1.0  # datasets of learned swappers: the share is not known
MASK_SOURCES = ("dataset", "derived", "generated", PRISTINE)  # `mask_source` values


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
            "alpha": tfds.features.Tensor(shape=(), dtype=np.float32),
            "label": tfds.features.ClassLabel(names=LABELS),
            "method": tfds.features.Text(),
            "source_id": tfds.features.Text(),
            "target_id": tfds.features.Text(),
            "mask_source": tfds.features.Text(),
        }
    )


IMAGE_CHANNELS = {"image": 3, "source": 3, "target": 3, "mask": 1, "face_mask": 1}


def encode_pngs(example: dict, size: int) -> dict:
    """`example` with its images as PNG bytes, what the builders yield: OpenCV's encoder is
    ~10x faster than tfds' TensorFlow one (4.6 vs 45.6 ms for one example's five 224 px
    images, measured) and releases the GIL. Lossless, so decoding gives back the arrays bit
    for bit; tfds stores bytes unchecked, hence the shape check here."""
    out = dict(example)
    for key, channels in IMAGE_CHANNELS.items():
        array = example[key]
        if array.dtype != np.uint8 or array.shape != (size, size, channels):
            raise ValueError(f"{key} is {array.dtype}{array.shape}, "
                             f"expected uint8({size}, {size}, {channels})")  # fmt: skip
        if channels == 3:
            array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR
        ok, png = cv2.imencode(".png", array)
        if not ok:
            raise ValueError(f"PNG encoding of {key} failed")
        out[key] = png.tobytes()
    return out


def _gray(mask: np.ndarray) -> np.ndarray:
    mask = to_uint8(mask)
    return mask if mask.ndim == 3 else mask[..., None]


def pristine_example(
    image: np.ndarray, face_mask: np.ndarray, landmarks: np.ndarray, identity: str
) -> dict:
    """A real face: its own source and target, so every pixel carries the source (mask all
    255); nothing was mixed in (alpha 0)."""
    image = to_uint8(image)
    return {
        "image": image,
        "source": image,
        "target": image,
        "mask": np.full(image.shape[:2] + (1,), 255, np.uint8),
        "face_mask": _gray(face_mask),
        "landmarks": np.asarray(landmarks, np.float32),
        "alpha": np.float32(ALPHA_PRISTINE),
        "label": 0,
        "method": PRISTINE,
        "source_id": identity,
        "target_id": identity,
        "mask_source": PRISTINE,
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
    alpha: float,
    mask_source: str,
) -> dict:
    """A face swap: `source`'s identity pasted into `target` inside `mask` (255 = source);
    `alpha`: the share of source texture there (1 splice, (0, 1) morph, -1 unknown);
    `mask_source`: where the mask came from (MASK_SOURCES, not "pristine")."""
    if mask_source not in MASK_SOURCES[:-1]:
        raise ValueError(f"forgery {source_id} -> {target_id} ({method}): mask_source "
                         f"{mask_source!r} not one of {MASK_SOURCES[:-1]}")  # fmt: skip
    mask = _gray(mask)
    if not mask.any():
        raise ValueError(f"forgery {source_id} -> {target_id} ({method}) has an empty mask")
    alpha = float(alpha)
    if not (0.0 < alpha <= 1.0 or alpha == ALPHA_UNKNOWN):
        raise ValueError(f"forgery {source_id} -> {target_id} ({method}): alpha {alpha} is "
                         f"neither in (0, 1] nor {ALPHA_UNKNOWN} (unknown)")  # fmt: skip
    return {
        "image": to_uint8(image),
        "source": to_uint8(source),
        "target": to_uint8(target),
        "mask": mask,
        "face_mask": _gray(face_mask),
        "landmarks": np.asarray(landmarks, np.float32),
        "alpha": np.float32(alpha),
        "label": 1,
        "method": method,
        "source_id": source_id,
        "target_id": target_id,
        "mask_source": mask_source,
    }
