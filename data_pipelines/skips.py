"""Bad inputs are skipped and counted, never crash a build and never vanish silently."""

import collections
import logging
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)


class SkipCounter:
    """Counts skipped inputs by reason and logs one line per skip."""

    def __init__(self, name: str = "data"):
        self.name = name
        self.by_reason = collections.Counter()

    def skip(self, item: str, reason: str) -> None:
        self.by_reason[reason] += 1
        log.warning("%s: skipped %s: %s", self.name, item, reason)

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def summary(self) -> dict[str, int]:
        return dict(sorted(self.by_reason.items()))

    def __str__(self) -> str:
        detail = ", ".join(f"{r}: {n}" for r, n in self.summary().items())
        return f"{self.total} skipped" + (f" ({detail})" if detail else "")


class BadImage(ValueError):
    """Why an image file cannot be used, as a short reason (the counter's key)."""


def _png_bit_depth(path: str) -> int:
    with open(path, "rb") as f:
        header = f.read(25)
    return header[24]  # IHDR bit depth: 8-byte signature, 8-byte chunk header, 8 bytes of size


def read_rgb8(path: str) -> np.ndarray:
    """uint8 [H,W,3] of an 8-bit RGB image file; BadImage(reason) for anything else.

    Strict on purpose: grayscale, CMYK, palette, alpha and 16-bit files are not silently
    converted (their colours would not match the rest of the data); they are counted instead.
    """
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise BadImage("empty file")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode != "RGB":
                raise BadImage(f"not 8-bit RGB (mode {mode})")
            if im.format == "PNG" and _png_bit_depth(path) != 8:
                # Pillow opens 16-bit RGB PNGs as mode "RGB", silently dropping the low byte.
                raise BadImage(f"not 8-bit RGB ({_png_bit_depth(path)}-bit PNG)")
            array = np.asarray(im, np.uint8)
    except FileNotFoundError:
        raise BadImage("missing file") from None
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except (OSError, ValueError, SyntaxError) as e:
        if isinstance(e, BadImage):
            raise
        raise BadImage(f"corrupt or truncated ({e.__class__.__name__})") from None
    if array.ndim != 3 or array.shape[-1] != 3 or min(array.shape[:2]) == 0:
        raise BadImage(f"unexpected shape {array.shape}")
    return array


def try_read_rgb8(path: str, counter: SkipCounter) -> np.ndarray | None:
    """`read_rgb8`, or None after counting the skip."""
    try:
        return read_rgb8(path)
    except BadImage as e:
        counter.skip(path, str(e))
        return None
