"""images.to_rgb8 / decode_rgb8: every pixel mode is converted by a stated rule or refused."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dfrec_jax import images


def _encode(im: Image.Image, fmt="PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = pixels.shape

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))  # fmt: skip


RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (6, 4, 3), dtype=np.uint8)


def test_rgb_is_untouched_and_grey_modes_replicate():
    rgb, notes = images.decode_rgb8(_encode(Image.fromarray(RGB)))
    np.testing.assert_array_equal(rgb, RGB)
    assert notes == []
    grey = RGB[..., 0]
    rgb, notes = images.decode_rgb8(_encode(Image.fromarray(grey)))
    np.testing.assert_array_equal(rgb, np.repeat(grey[..., None], 3, -1))
    assert notes == ["greyscale replicated to RGB"]
    rgb, notes = images.decode_rgb8(_encode(Image.fromarray(grey > 127)))
    np.testing.assert_array_equal(rgb[..., 0], np.where(grey > 127, 255, 0))
    assert notes == ["bilevel replicated to RGB"]


def test_16_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 128, 257, 32767], [32896, 65279, 65535, 1000]], np.uint16)
    rgb, notes = images.decode_rgb8(_encode(Image.fromarray(values)))
    want = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(rgb[..., 0], want)
    np.testing.assert_array_equal(rgb[..., 2], want)
    assert notes == ["16-bit greyscale (I;16) scaled to 8 bits and replicated to RGB"]


def test_16_bit_colour_png_says_it_was_reduced():
    pixels = RGB.astype(np.uint16) * 257 + 3  # high byte = RGB
    rgb, notes = images.decode_rgb8(_png16_rgb(pixels))
    np.testing.assert_array_equal(rgb, RGB)
    assert notes == ["16 bits per channel reduced to 8 (high byte)"]


def test_palette_alpha_exif_and_frames():
    palette = Image.fromarray(RGB).quantize(8)
    rgb, notes = images.decode_rgb8(_encode(palette))
    np.testing.assert_array_equal(rgb, np.asarray(palette.convert("RGB")))
    assert notes == ["palette colours expanded to RGB"]
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    with pytest.raises(images.ImageError, match="transparent pixels"):
        images.decode_rgb8(_encode(transparent, transparency=0))
    rgba = np.concatenate([RGB, np.full((6, 4, 1), 255, np.uint8)], -1)
    rgb, notes = images.decode_rgb8(_encode(Image.fromarray(rgba)))
    np.testing.assert_array_equal(rgb, RGB)
    assert notes == ["fully opaque alpha channel dropped (RGBA)"]
    rgba[2, 1, 3] = 10
    with pytest.raises(images.ImageError, match="^1 transparent pixels"):
        images.decode_rgb8(_encode(Image.fromarray(rgba)))
    keyed = tuple(int(v) for v in RGB[0, 0])  # an RGB PNG whose tRNS key makes a pixel clear
    with pytest.raises(images.ImageError, match="transparent pixels"):
        images.decode_rgb8(_encode(Image.fromarray(RGB), transparency=keyed))
    unused = (1, 2, 3) if not (RGB == (1, 2, 3)).all(-1).any() else (0, 0, 1)
    rgb, notes = images.decode_rgb8(_encode(Image.fromarray(RGB), transparency=unused))
    np.testing.assert_array_equal(rgb, RGB)
    assert notes == ["fully opaque alpha channel dropped (RGB with a transparent colour)"]

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise on display
    rgb, notes = images.decode_rgb8(_encode(Image.fromarray(RGB), "JPEG", exif=exif, quality=100))
    assert rgb.shape == (4, 6, 3) and notes == ["EXIF orientation 6 applied"]

    frames = [Image.fromarray(RGB), Image.fromarray(255 - RGB)]
    gif = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    rgb, notes = images.decode_rgb8(gif)
    assert rgb.shape == (6, 4, 3) and notes[0] == "first of 2 frames"


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "^empty file$"),
        (b"hello", "not an image"),
        (_encode(Image.fromarray(RGB).convert("CMYK"), "JPEG"), "CMYK colour"),
        (_encode(Image.fromarray(np.zeros((4, 4), np.float32)), "TIFF"), "32-bit float"),
        (_encode(Image.fromarray(np.full((4, 4), 200, np.int32)), "TIFF"), "32-bit integer"),
        (_encode(Image.fromarray(RGB))[:60], "corrupt image"),
    ],
    ids=["empty", "text", "cmyk", "float", "int32", "truncated"],
)
def test_refused_with_the_reason(data, message):
    with pytest.raises(images.ImageError, match=message) as info:
        images.decode_rgb8(data)
    assert "\n" not in str(info.value)


def test_load_rgb_names_the_file(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"")
    with pytest.raises(images.ImageError, match=f"^{path}: empty file$"):
        images.load_rgb(str(path), 4)
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(path)
    np.testing.assert_array_equal(images.load_rgb(str(path), 8), np.ones((8, 8, 3)))
