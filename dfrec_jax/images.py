"""Reading and writing face images as float32 [H,W,3] arrays in [0,1]."""

import io
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageError(ValueError):
    """An input image that cannot be used; the message is one line naming the file."""


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Modes whose conversion to 8-bit RGB is exact or a fixed, documented rule.
_HIGH_DEPTH_GREY = ("I;16", "I;16L", "I;16B", "I;16N")
_REFUSED_MODES = {
    "CMYK": "CMYK colour: convert it to RGB with its colour profile first",
    "F": "32-bit float pixels have no defined range: convert to 8 or 16 bits first",
    "I": "32-bit integer pixels have no defined range: convert to 8 or 16 bits first",
    "LAB": "Lab colour: convert it to RGB first",
    "HSV": "HSV colour: convert it to RGB first",
    "YCbCr": "raw YCbCr pixels: convert it to RGB first",
}


def to_rgb8(im: Image.Image) -> tuple[np.ndarray, list[str]]:
    """A decoded Pillow image as uint8 RGB [H,W,3] plus what was done to get there, in words
    (empty for an 8-bit RGB image): EXIF orientation applied; grey, bilevel and palette
    expanded exactly; 16-bit grey scaled to 8 bits (v * 255 / 65535, rounded); a fully opaque
    alpha channel (or an unused transparent colour) dropped; the first frame of a multi-frame
    file taken. Refused with ImageError (the reason, without the path): transparent pixels
    (the model would see whatever they are composited on), CMYK, 32-bit integer or float
    pixels, other colour spaces."""
    notes = []
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        notes.append(f"first of {frames} frames")
    orientation = im.getexif().get(0x0112, 1)  # EXIF Orientation
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        im = ImageOps.exif_transpose(im)
        notes.append(f"EXIF orientation {orientation} applied")
    mode = im.mode
    if mode in _REFUSED_MODES:
        raise ImageError(_REFUSED_MODES[mode])
    if mode in _HIGH_DEPTH_GREY:
        if "transparency" in im.info:
            raise ImageError("transparent pixels (a tRNS colour key): flatten the image first")
        grey = np.asarray(im).astype(np.int64)
        grey8 = ((grey * 255 + 32767) // 65535).astype(np.uint8)  # round half up
        notes.append(f"16-bit greyscale ({mode}) scaled to 8 bits and replicated to RGB")
        return np.repeat(grey8[..., None], 3, axis=-1), notes
    if mode in ("P", "RGB", "L") and "transparency" in im.info:  # palette index or tRNS key
        im, mode = im.convert("RGBA"), f"{mode} with a transparent colour"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or mode.endswith("transparent colour"):
        alpha = np.asarray(im.getchannel("A"))
        if alpha.min() < 255:
            raise ImageError(
                f"{int((alpha < 255).sum())} transparent pixels (alpha): flatten the image "
                "onto the background you mean first"
            )
        notes.append(f"fully opaque alpha channel dropped ({mode})")
    elif mode in ("L", "1"):
        notes.append(f"{'greyscale' if mode == 'L' else 'bilevel'} replicated to RGB")
    elif mode == "P":
        notes.append("palette colours expanded to RGB")
    elif mode == "RGBX":
        notes.append("padding channel dropped (RGBX)")
    elif mode != "RGB":
        raise ImageError(f"unsupported pixel mode {mode}")
    return np.asarray(im.convert("RGB")), notes


def decode_rgb8(data: bytes) -> tuple[np.ndarray, list[str]]:
    """Decodes image file bytes with `to_rgb8`; ImageError (without the path) otherwise."""
    if not data:
        raise ImageError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb, notes = to_rgb8(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (no known image format)") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure on untrusted bytes
        raise ImageError(f"corrupt image ({type(e).__name__}: {e})") from None
    if data[:8] == _PNG_SIGNATURE and len(data) > 25 and data[24] == 16 and data[25] in (2, 6):
        # Pillow opens 16-bit-per-channel colour PNGs as 8-bit modes (it keeps the high byte).
        notes.append("16 bits per channel reduced to 8 (high byte)")
    return rgb, notes


def read_rgb8(path: str) -> tuple[bytes, np.ndarray, list[str]]:
    """(file bytes, uint8 RGB [H,W,3] decoded from exactly those bytes, the conversions
    applied: `to_rgb8`); raises ImageError with a one-line reason (without the path)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except OSError as e:
        raise ImageError(f"cannot read file ({e.strerror or e})") from None
    rgb, notes = decode_rgb8(data)
    return data, rgb, notes


def load_rgb(path: str, size: int) -> np.ndarray:
    """Reads `path` as RGB float32 [size,size,3] in [0,1] (decoded by `to_rgb8`), resizing
    square inputs if needed."""
    try:
        rgb = Image.fromarray(read_rgb8(path)[1])
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None
    if rgb.size != (size, size):
        if rgb.size[0] != rgb.size[1]:
            raise ImageError(
                f"{path}: {rgb.size[0]}x{rgb.size[1]} is not square; align the face first"
            )
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, np.float32) / 255.0


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [0,1] (clipped; NaN -> 0, +inf -> 1) or uint8 (as it is) -> uint8, rounding
    half to even as the PNGs of every command store them."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    image = np.nan_to_num(image.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _uint8_image(image: np.ndarray) -> Image.Image:
    array = to_uint8(image)
    if array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def save_rgb(path: str, image: np.ndarray) -> None:
    """Writes an [H,W,C] image, float in [0,1] or uint8 (C = 1 or 3), as PNG."""
    _uint8_image(image).save(path)


def png_bytes(image: np.ndarray) -> bytes:
    """A float [H,W,C] image in [0,1] (C = 1 or 3) as PNG file bytes (for remote folders)."""
    buffer = io.BytesIO()
    _uint8_image(image).save(buffer, format="PNG")
    return buffer.getvalue()


def list_images(root: str) -> list[str]:
    """All image files below `root`, sorted, so runs see the same order everywhere."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    found = []
    for folder, _, files in os.walk(root):
        found += [os.path.join(folder, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)
