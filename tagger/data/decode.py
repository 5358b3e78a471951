"""Bytes -> a square RGB uint8 array the model can take, or an :class:`ImageError` that says why not.

Every product photo, whatever its mode, orientation or size, goes through :func:`decode_image`, in
training, evaluation and tagging alike, so that the model always sees pixels prepared the same way:
upright (EXIF), RGB composited over white, the whole product letterboxed into a white square.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Set deliberately rather than inherited from Pillow's default: 100 MP is well beyond the 1800x2400
# Kaggle originals (4.3 MP) and far below what would exhaust a worker's memory. Pillow's own check
# only warns below 2x its limit; we refuse from the header, before any pixel is decoded.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
# Image files larger than this are too_large errors, refused from their size (stat, S3 HEAD) before they
# are read: a product photo is a few MB, so 50 MB leaves room for any honest image while a mislabelled
# video or disk image cannot make a worker hold gigabytes. The byte twin of DEFAULT_MAX_IMAGE_PIXELS.
DEFAULT_MAX_IMAGE_BYTES = 50_000_000
Image.MAX_IMAGE_PIXELS = None  # our check below is the guard; Pillow's would only warn
# A truncated image must fail, not be padded with grey (whatever another library in the process set).
ImageFile.LOAD_TRUNCATED_IMAGES = False

BACKGROUND = (255, 255, 255)

# The only formats Pillow may decode here. Product photos come as these; anything else named in a
# manifest (EPS/PostScript, which Pillow hands to Ghostscript, PSD, ICO, exotic scientific formats) is a
# `decode` error row without any of its bytes reaching a plugin that was not chosen on purpose.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# libjpeg's warnings that mean the pixel data itself is missing or damaged: it "recovers" by filling the
# rest of the picture with grey or by skipping garbage, and Pillow reports nothing. Other warnings (an
# unusual but complete file) leave the pixels intact and are not refused.
_CORRUPT_JPEG_WARNINGS = ("Premature end of JPEG file", "Corrupt JPEG data")


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
    within a few grey levels (see tests/test_decode_equivalence.py for the tolerance).
    """
    if not data:
        raise ImageError("empty_file", f"{source}: the file is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise ImageError(
            "decode", f"{source}: not a recognised image format ({len(data)} bytes; accepted: {', '.join(ALLOWED_FORMATS)})"
        ) from None
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
    region = None
    decoded = _decode_jpeg(data, image, size, draft, source) if image.format == "JPEG" and image.mode in ("L", "RGB") else None
    if decoded is not None:
        # One pass: libjpeg has entropy-decoded the data strictly and produced the pixels; Pillow, which only
        # read the header, still gives the EXIF orientation.
        pixels, region = decoded
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data": the pixels are what matter
                orientation = image.getexif().get(_ORIENTATION, 1)
        except Exception as exc:
            raise ImageError("decode", f"{source}: corrupt or truncated image data: {exc}") from None
        image = Image.fromarray(pixels, "RGB")
        if region is not None:
            region = _transposed_region(region, image.size, orientation)
        transpose = _TRANSPOSE.get(orientation if isinstance(orientation, int) else 1)
        if transpose is not None:
            image = image.transpose(transpose)
    else:
        region = _pillow_decode_prepare(data, image, size, draft, source)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data": the pixels are what matter
                image.load()
                if region is not None:
                    region = _transposed_region(region, image.size, image.getexif().get(_ORIENTATION, 1))
                image = ImageOps.exif_transpose(image)
        except Exception as exc:
            raise ImageError("decode", f"{source}: corrupt or truncated image data: {exc}") from None

    try:
        rgb = to_rgb(image)
        # Recomputed after the EXIF rotation, which may have swapped width and height.
        picture = (region[2] - region[0], region[3] - region[1]) if region is not None else rgb.size
        scale = size / max(picture)
        box = (max(1, round(picture[0] * scale)), max(1, round(picture[1] * scale)))
        if rgb.size != box or region is not None:
            rgb = rgb.resize(box, Image.Resampling.BILINEAR, box=region, reducing_gap=None)
    except Exception as exc:  # an exotic mode Pillow cannot convert: one error row, never a crashed worker
        raise ImageError("decode", f"{source}: cannot convert the {image.mode} image to RGB: {exc}") from None
    canvas = Image.new("RGB", (size, size), BACKGROUND)
    canvas.paste(rgb, ((size - box[0]) // 2, (size - box[1]) // 2))
    return np.asarray(canvas)


def _pillow_scale(width: int, height: int, size: int, draft: bool) -> int:
    """The DCT scale denominator (1, 2, 4 or 8) Pillow's ``draft`` picks for a ``size`` target: the
    smallest picture no smaller than the target. Both decode paths use it, so they give the same pixels."""
    if not draft:
        return 1
    scale = size / max(width, height)
    wanted = (max(1, round(width * scale)), max(1, round(height * scale)))
    factor = min(width // wanted[0], height // wanted[1])
    return next((s for s in (8, 4, 2) if factor >= s), 1)


def _decode_jpeg(data: bytes, image: Image.Image, size: int, draft: bool, source: str):
    """A baseline or progressive RGB/grey JPEG, decoded once: strict (see :func:`check_jpeg_data`), straight to
    RGB, at the DCT scale Pillow's draft would choose. -> (pixels, region) where ``region`` is the part of
    the pixels that is picture (draft rounds up to whole blocks) or None; None where simplejpeg cannot
    decode this JPEG for a reason other than damaged data, so that Pillow decodes it as before."""
    import simplejpeg

    width, height = image.size
    scale = _pillow_scale(width, height, size, draft)
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-height // scale),
                                        min_width=-(-width // scale), min_factor=scale, strict=True)
    except ValueError as exc:
        _refuse_corrupt(exc, source)
        return None
    if pixels.shape[:2] != (-(-height // scale), -(-width // scale)):
        return None  # a header Pillow and libjpeg read differently: let Pillow's own decode judge it
    region = None if width % scale == 0 and height % scale == 0 else (0, 0, width / scale, height / scale)
    return pixels, region


def _pillow_decode_prepare(data: bytes, image: Image.Image, size: int, draft: bool, source: str):
    """The other formats, and the JPEGs simplejpeg does not decode to RGB (CMYK, MPO): the strict check
    first, then Pillow decodes (at the draft scale for a JPEG). -> the picture region, as :func:`_decode_jpeg`."""
    if image.format in ("JPEG", "MPO"):
        check_jpeg_data(data, image.mode, source)
    # Draft decoding rounds the reduced size up to whole DCT blocks: a 225-px-wide JPEG read at 1/8 is
    # 29 px wide, of which only 225/8 = 28.125 are picture. ``region`` is that part, resized below.
    if draft and image.format == "JPEG":
        width, height = image.size
        scale = size / max(width, height)
        drafted = image.draft("RGB", (max(1, round(width * scale)), max(1, round(height * scale))))
        if drafted is not None and tuple(drafted[1][2:]) != image.size:
            return drafted[1]
    return None


def check_jpeg_data(data: bytes, mode: str, source: str) -> None:
    """Refuse a JPEG whose entropy-coded data is cut short, padded or damaged, which Pillow would decode.

    libjpeg only *warns* about such data (premature end of a data segment, N extraneous bytes before a
    marker, a header promising 9000x9000 over 64x64 worth of data), fills in what is missing and carries
    on; Pillow never shows those warnings. simplejpeg runs the same libjpeg-turbo with the warnings turned
    into errors. For RGB and grey JPEGs :func:`_decode_jpeg` does this in the same pass that makes the
    pixels; here, for the rest, it decodes at 1/8 scale in grey (CMYK as CMYK: the one conversion libjpeg
    cannot do): every coefficient is still entropy-decoded, which is where the damage shows.
    """
    import simplejpeg

    try:
        simplejpeg.decode_jpeg(data, colorspace="CMYK" if mode == "CMYK" else "GRAY", min_height=1, min_width=1,
                               min_factor=8, strict=True)
    except ValueError as exc:
        _refuse_corrupt(exc, source)
        # Anything else (a colour conversion simplejpeg does not offer, say) is not about the data being
        # intact; Pillow's own decode below stays the judge of those.


def _refuse_corrupt(exc: ValueError, source: str) -> None:
    text = str(exc)
    if text.startswith(_CORRUPT_JPEG_WARNINGS):
        raise ImageError("decode", f"{source}: corrupt or truncated JPEG data: {text}") from None


_ORIENTATION = 0x0112  # the EXIF tag ImageOps.exif_transpose acts on
# What ImageOps.exif_transpose does for each orientation, for pixels that did not come from Pillow's decoder.
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def _transposed_region(region, size: tuple[int, int], orientation) -> tuple[float, float, float, float]:
    """Where the top-left ``region`` of an image of ``size`` lands once ``exif_transpose`` has turned it."""
    (width, height), (w, h) = size, (region[2], region[3])
    return {
        2: (width - w, 0, width, h),  # mirrored left-right
        3: (width - w, height - h, width, height),  # rotated 180
        4: (0, height - h, w, height),  # mirrored top-bottom
        5: (0, 0, h, w),  # transposed
        6: (height - h, 0, height, w),  # rotated 90 clockwise
        7: (height - h, width - w, height, width),  # transversed
        8: (0, width - w, h, width),  # rotated 90 counter-clockwise
    }.get(orientation if isinstance(orientation, int) else 1, (0, 0, w, h))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, transparency composited over the white product background."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit greyscale: Pillow's convert("L") clips at 255, turning most of a 16-bit image white.
        array = np.asarray(image)
        if array.dtype.kind == "f":
            peak = 1.0 if float(array.max(initial=0)) <= 1.0 else 255.0
            grey = np.clip(array / peak * 255.0, 0, 255).astype(np.uint8)
        else:
            # A 16-bit mode is 16-bit whatever its content: a dark 16-bit image (every value <= 255) must
            # stay dark, not be stretched as if it were 8-bit. Only 32-bit "I" leaves the range to guess.
            peak = 65535 if mode.startswith("I;16") or int(array.max(initial=0)) > 255 else 255
            grey = (np.clip(array, 0, peak).astype(np.uint32) * 255 // peak).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ("P", "L", "RGB") and "transparency" in image.info:
        # A palette entry or a colour key (PNG tRNS) marked transparent: composite it like an alpha channel.
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
