"""Bytes -> a square RGB uint8 array the model can take, or an :class:`ImageError` that says why not.

Every product photo, whatever its mode, orientation or size, goes through :func:`decode_image`, in
training, evaluation and tagging alike, so that the model always sees pixels prepared the same way:
upright (EXIF), RGB composited over white, the whole product letterboxed into a white square.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Set deliberately rather than inherited from Pillow's default: 100 MP is well beyond the 1800x2400
# Kaggle originals (4.3 MP) and far below what would exhaust a worker's memory. Pillow's own check
# only warns below 2x its limit; we refuse from the header, before any pixel is decoded.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = None  # our check below is the guard; Pillow's would only warn

BACKGROUND = (255, 255, 255)


class ImageError(Exception):
    """A product image that cannot be used. ``error_type`` is a stable code for the errors table."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type
        self.message = message


def decode_image(
    data: bytes,
    size: int,
    *,
    source: str = "<bytes>",
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    draft: bool = True,
) -> np.ndarray:
    """Decode ``data`` into a ``(size, size, 3)`` uint8 array, the product centred on white.

    ``draft`` lets libjpeg decode a JPEG directly at a reduced scale (1/2, 1/4, 1/8) no smaller than
    the target: on a 1800x2400 original decoding at 1/8 is several times faster, and the DCT-domain
    downscale is itself a proper low-pass filter, so the result matches a full decode + resize
    within a few grey levels (see tests/test_images.py for the tolerance).
    """
    if not data:
        raise ImageError("empty_file", f"{source}: the file is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("decode", f"{source}: not a recognised image format ({len(data)} bytes)") from None
    except Exception as exc:  # Pillow raises a zoo of types for malformed headers
        raise ImageError("decode", f"{source}: unreadable image header: {exc}") from None

    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError("decode", f"{source}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            "too_large",
            f"{source}: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,} "
            "(decompression-bomb guard; raise --max-image-pixels if such images are expected)",
        )
    if draft and image.format == "JPEG":
        scale = size / max(width, height)
        image.draft("RGB", (max(1, round(width * scale)), max(1, round(height * scale))))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data": the pixels are what matter
            image.load()
            image = ImageOps.exif_transpose(image)
    except Exception as exc:
        raise ImageError("decode", f"{source}: corrupt or truncated image data: {exc}") from None

    rgb = to_rgb(image)
    # Recomputed after the EXIF rotation, which may have swapped width and height.
    scale = size / max(rgb.size)
    box = (max(1, round(rgb.size[0] * scale)), max(1, round(rgb.size[1] * scale)))
    if rgb.size != box:
        rgb = rgb.resize(box, Image.Resampling.BILINEAR, reducing_gap=None)
    canvas = Image.new("RGB", (size, size), BACKGROUND)
    canvas.paste(rgb, ((size - box[0]) // 2, (size - box[1]) // 2))
    return np.asarray(canvas)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, transparency composited over the white product background."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit greyscale: Pillow's convert("L") clips at 255, turning most of a 16-bit image white.
        array = np.asarray(image)
        if array.dtype.kind == "f":
            peak = 1.0 if float(array.max(initial=0)) <= 1.0 else 255.0
            grey = np.clip(array / peak * 255.0, 0, 255).astype(np.uint8)
        else:
            peak = 65535 if int(array.max(initial=0)) > 255 else 255
            grey = (array.astype(np.uint32) * 255 // peak).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
