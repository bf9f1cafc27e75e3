"""Reading and writing face images as float32 [H,W,3] arrays in [0,1]."""

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageError(ValueError):
    """An input image that cannot be used; the message is one line naming the file."""


def load_rgb(path: str, size: int) -> np.ndarray:
    """Reads `path` as RGB float32 [size,size,3] in [0,1], resizing square inputs if needed."""
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"{path}: unreadable image ({e.__class__.__name__}: {e})") from None
    if rgb.size != (size, size):
        if rgb.size[0] != rgb.size[1]:
            raise ImageError(
                f"{path}: {rgb.size[0]}x{rgb.size[1]} is not square; align the face first"
            )
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, np.float32) / 255.0


def save_rgb(path: str, image: np.ndarray) -> None:
    """Writes a float [H,W,C] image in [0,1] (C = 1 or 3) as PNG."""
    array = np.clip(np.rint(np.asarray(image, np.float32) * 255.0), 0, 255).astype(np.uint8)
    if array.shape[-1] == 1:
        array = array[..., 0]
    Image.fromarray(array).save(path)


def list_images(root: str) -> list[str]:
    """All image files below `root`, sorted, so runs see the same order everywhere."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    found = []
    for folder, _, files in os.walk(root):
        found += [os.path.join(folder, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)
