"""Bad and unusual product images: each one tagged correctly, or exactly one error row saying why.

First at the level of :func:`tagger.data.decode.decode_image` (pixels checked), then end to end through
``tagger tag``: every kind of image in one catalog, checked against a clean run of the good products.
"""

from __future__ import annotations

import csv
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from PIL import Image

from jobs.cli import cli
from tagger.attributes import ATTRIBUTES
from tagger.data.decode import ImageError, decode_image
from tagger.tag.writers import read_complete_partition

from .faults import S3FaultProxy

SIZE = 32
DATE = "2026-03-04"


# -- image makers ----------------------------------------------------------------------------------
def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG (grey for a 2-D array, RGB for H x W x 3), written by hand: Pillow cannot write 16-bit RGB."""
    height, width = values.shape[:2]
    colour_type = 0 if values.ndim == 2 else 2
    rows = values.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    return _png(width, height, 16, colour_type, raw)


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, in a few dozen bytes (no pixel data)."""
    return _png(width, height, 8, 2, b"")


def quadrants(width: int = 48, height: int = 64) -> Image.Image:
    """Upright test card: red top-left, green top-right, blue bottom-left, yellow bottom-right."""
    array = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    array[:h, :w] = (220, 20, 20)
    array[:h, w:] = (20, 200, 20)
    array[h:, :w] = (20, 20, 220)
    array[h:, w:] = (230, 230, 20)
    return Image.fromarray(array)


def with_orientation(upright: Image.Image, orientation: int) -> bytes:
    """A JPEG that is displayed as ``upright`` once its EXIF orientation (6 or 8) is applied."""
    stored = upright.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=95, exif=exif)


def decode(data: bytes, **kwargs) -> np.ndarray:
    return decode_image(data, SIZE, source="test.img", **kwargs)


def error_of(data: bytes, **kwargs) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode(data, **kwargs)
    return info.value


def close(pixel, expected, tolerance: int = 12) -> bool:
    return bool(np.all(np.abs(np.asarray(pixel, int) - np.asarray(expected, int)) <= tolerance))


RED = Image.new("RGB", (40, 40), (220, 20, 20))


# -- decode_image ----------------------------------------------------------------------------------
def test_truncated_jpeg_is_a_decode_error():
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    data = encode(noisy, "JPEG", quality=90)
    for cut in (len(data) // 2, 300, 40):
        error = error_of(data[:cut])
        assert error.error_type == "decode" and "test.img" in error.message
    assert "truncated" in error_of(data[: len(data) // 2]).message


def test_zero_byte_file_is_empty_file():
    error = error_of(b"")
    assert error.error_type == "empty_file" and "0 bytes" in error.message


def test_text_named_jpg_is_a_decode_error():
    error = error_of(b"<html><body>404 Not Found</body></html>\n")
    assert error.error_type == "decode" and "not a recognised image format" in error.message


def test_png_alpha_is_composited_on_white():
    array = np.zeros((40, 40, 4), np.uint8)
    array[:, :20] = (0, 0, 255, 0)  # fully transparent blue: must become white
    array[:, 20:] = (0, 0, 255, 255)  # opaque blue
    pixels = decode(encode(Image.fromarray(array, "RGBA"), "PNG"))
    assert close(pixels[16, 2], (255, 255, 255), 2)
    assert close(pixels[16, SIZE - 3], (0, 0, 255), 2)
    half = np.full((40, 40, 4), (0, 0, 0, 128), np.uint8)  # half-transparent black: mid grey on white
    assert close(decode(encode(Image.fromarray(half, "RGBA"), "PNG"))[16, 16], (127, 127, 127), 3)


def test_palette_gif_and_its_transparency():
    opaque = RED.convert("P", palette=Image.Palette.ADAPTIVE)
    assert close(decode(encode(opaque, "GIF"))[16, 16], (220, 20, 20), 10)

    image = Image.new("P", (40, 40), 0)
    image.putpalette([0, 0, 0, 10, 160, 10] + [0] * 762)
    image.paste(1, (20, 0, 40, 40))  # right half colour 1 (green), left half colour 0 (transparent)
    pixels = decode(encode(image, "GIF", transparency=0))
    assert close(pixels[16, 2], (255, 255, 255), 0), "the transparent palette entry must be white, not black"
    assert close(pixels[16, SIZE - 3], (10, 160, 10), 2)


def test_colour_key_transparency_of_rgb_and_grey_png():
    assert close(decode(encode(Image.new("RGB", (40, 40), (10, 200, 10)), "PNG", transparency=(10, 200, 10)))[16, 16], (255, 255, 255), 0)
    assert close(decode(encode(Image.new("L", (40, 40), 7), "PNG", transparency=7))[16, 16], (255, 255, 255), 0)


def test_cmyk_jpeg_keeps_its_colours():
    cmyk = Image.new("CMYK", (40, 40), (0, 255, 255, 0))  # pure red in CMYK
    image = Image.open(io.BytesIO(encode(cmyk, "JPEG", quality=95)))
    assert image.mode == "CMYK"
    assert close(decode(encode(cmyk, "JPEG", quality=95))[16, 16], (255, 0, 0), 12)


def test_16_bit_png_is_scaled_not_clipped():
    grey = np.full((40, 40), 32768, np.uint16)
    assert Image.open(io.BytesIO(png16(grey))).mode.startswith("I;16")
    assert close(decode(png16(grey))[16, 16], (127, 127, 127), 1), "mid-grey 16-bit must stay mid-grey, not clip to white"
    # A dark 16-bit image (every value <= 255) stays dark: it is not taken for an 8-bit one.
    assert close(decode(png16(np.full((40, 40), 200, np.uint16)))[16, 16], (0, 0, 0), 1)
    ramp = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (40, 1))
    row = decode(png16(ramp))[16, :, 0].astype(int)
    assert row[0] < 15 and row[-1] > 240 and np.all(np.diff(row) >= 0)
    rgb = np.zeros((40, 40, 3), np.uint16)
    rgb[..., 0], rgb[..., 2] = 65535, 32768
    assert close(decode(png16(rgb))[16, 16], (255, 0, 128), 2)


def test_grayscale_and_webp():
    assert close(decode(encode(Image.new("L", (40, 40), 128), "JPEG"))[16, 16], (128, 128, 128), 2)
    assert close(decode(encode(RED, "WEBP", lossless=True))[16, 16], (220, 20, 20), 0)
    alpha = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    assert close(decode(encode(alpha, "WEBP", lossless=True))[16, 16], (255, 255, 255), 0)


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(orientation):
    upright = decode(encode(quadrants(), "JPEG", quality=95))
    rotated = decode(with_orientation(quadrants(), orientation))
    assert np.abs(upright.astype(int) - rotated.astype(int)).mean() < 6
    # The four quadrant centres, in a 32x32 letterbox of a 48x64 card (24 px wide, centred).
    for (y, x), colour in {(8, 10): (220, 20, 20), (8, 21): (20, 200, 20), (24, 10): (20, 20, 220), (24, 21): (230, 230, 20)}.items():
        assert close(rotated[y, x], colour, 20), (orientation, y, x, rotated[y, x])
    # Without its EXIF tag the same pixels would be sideways: the tag is what makes the difference.
    sideways = Image.open(io.BytesIO(with_orientation(quadrants(), orientation)))
    assert sideways.size == (64, 48)


def test_a_jpeg_is_entropy_decoded_once(monkeypatch):
    """The strict check and the pixels come from one libjpeg pass: Pillow only reads the header."""
    import simplejpeg
    from PIL import ImageFile

    calls = []
    real = simplejpeg.decode_jpeg
    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(k) or real(*a, **k))

    def no_pillow_decode(self, *args, **kwargs):
        raise AssertionError("Pillow decoded the JPEG's pixels a second time")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_pillow_decode)
    for image in (quadrants(), quadrants().convert("L")):
        assert decode(encode(image, "JPEG", quality=95)).shape == (SIZE, SIZE, 3)
    assert len(calls) == 2 and all(k["strict"] and k["colorspace"] == "RGB" for k in calls)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_one_pass_jpeg_gives_pillows_pixels(monkeypatch, orientation):
    """The one-pass decode is Pillow's decode (same libjpeg scale, region, EXIF turn), pixel for pixel."""
    from tagger.data import decode as module
    from tests.test_decode_equivalence import photo_like

    cases = [(photo_like(orientation, (227, 301), orientation=orientation), size, draft)
             for size in (300, 64, 24) for draft in (True, False)]
    one_pass = [decode_image(data, size, draft=draft) for data, size, draft in cases]
    monkeypatch.setattr(module, "_decode_jpeg", lambda *args: None)  # Pillow decodes, as before the one pass
    for (data, size, draft), pixels in zip(cases, one_pass):
        assert np.array_equal(pixels, decode_image(data, size, draft=draft)), (size, draft)


def test_decompression_bomb_is_refused_from_the_header(monkeypatch):
    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    ordinary = encode(RED, "JPEG")
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(Image.Image, "draft", no_decoding)
    data = png_bomb()
    assert len(data) < 100
    error = error_of(data)
    assert error.error_type == "too_large" and "50000x50000" in error.message and "--max-image-pixels" in error.message
    # An ordinary image over a deliberately low limit: also refused before decoding.
    assert error_of(ordinary, max_pixels=1000).error_type == "too_large"


def test_draft_decoding_matches_a_full_decode():
    from tagger.demo.drawn import CLASSES, render_product

    labels = {name: values[0] for name, values in CLASSES.items()}
    data = encode(render_product(labels, (600, 800), seed=(0, 1)), "JPEG", quality=90)
    fast = decode_image(data, 64, draft=True).astype(int)
    full = decode_image(data, 64, draft=False).astype(int)
    difference = np.abs(fast - full)
    assert difference.mean() < 3 and np.percentile(difference, 99) < 40


# -- end to end --------------------------------------------------------------------------------------
def tag(*args: str):
    return CliRunner().invoke(cli, ["tag", "--workers", "0", "--progress", "none", *args], catch_exceptions=False)


def write_manifest(path: Path, rows) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("product_id", "image"))
        writer.writerows(rows)
    return path


def good_rows(demo, n: int = 6) -> list[tuple[str, str]]:
    with open(demo.catalog, newline="") as handle:
        rows = [(r["product_id"], str(Path(demo.root, r["image"]))) for r in csv.DictReader(handle)]
    return rows[:n]


def read(out: Path, table: str) -> pl.DataFrame:
    return pl.from_arrow(read_complete_partition(f"{out}/{table}/run_date={DATE}"))


def assert_same_tags(clean: pl.DataFrame, mixed: pl.DataFrame) -> None:
    ids = clean["product_id"].to_list()
    mixed = mixed.filter(pl.col("product_id").is_in(ids)).sort("product_id")
    clean = clean.sort("product_id")
    assert mixed["product_id"].to_list() == clean["product_id"].to_list()
    for name in ATTRIBUTES:
        assert mixed[name].to_list() == clean[name].to_list(), name
        assert np.allclose(mixed[f"{name}_score"].to_numpy(), clean[f"{name}_score"].to_numpy(), atol=1e-5), name
    if "image_version" in clean.columns:
        assert mixed["image_version"].to_list() == clean["image_version"].to_list()


@pytest.fixture(scope="module")
def clean_run(demo, tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    out = root / "out"
    result = tag("--catalog", str(write_manifest(root / "clean.csv", good_rows(demo))), "--model", tiny_bundle,
                 "--out", str(out), "--run-date", DATE)
    assert result.exit_code == 0, result.output
    return read(out, "tags")


def test_every_kind_of_image_end_to_end(demo, tiny_bundle, clean_run, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    jpeg = Path(good_rows(demo, 1)[0][1]).read_bytes()
    grey = np.full((40, 40), 32768, np.uint16)
    transparent_gif = Image.new("P", (40, 40), 0)
    transparent_gif.putpalette([0, 0, 0, 10, 160, 10] + [0] * 762)
    transparent_gif.paste(1, (20, 0, 40, 40))
    files = {
        # valid: tagged
        "alpha.png": encode(Image.new("RGBA", (40, 40), (0, 0, 255, 128)), "PNG"),
        "palette.gif": encode(RED.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"),
        "transparent.gif": encode(transparent_gif, "GIF", transparency=0),
        "cmyk.jpg": encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG"),
        "grey16.png": png16(grey),
        "grey.jpg": encode(Image.new("L", (40, 40), 128), "JPEG"),
        "photo.webp": encode(RED, "WEBP"),
        "exif6.jpg": with_orientation(quadrants(), 6),
        "exif8.jpg": with_orientation(quadrants(), 8),
        # invalid: one error row each
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "empty.jpg": b"",
        "text.jpg": b"this is not an image\n",
        "bomb.png": png_bomb(),
    }
    for name, data in files.items():
        (images / name).write_bytes(data)
    (images / "folder.jpg").mkdir()
    expected_errors = {
        "truncated.jpg": "decode",
        "empty.jpg": "empty_file",
        "text.jpg": "decode",
        "bomb.png": "too_large",
        "missing.jpg": "missing",
        "folder.jpg": "not_a_file",
        "http": "invalid_location",
        "long": "invalid_location",
        "through-a-file": "invalid_location",
    }
    special = {
        "http": "http://127.0.0.1:9/latest/meta-data/x.jpg",
        "long": str(images / ("a" * 4000 + ".jpg")),
        "through-a-file": str(images / "grey.jpg" / "x.jpg"),
    }
    good = good_rows(demo)
    # The bad rows sit between good ones, inside the same batches.
    odd = [(f"odd-{name}", special.get(name, str(images / name))) for name in [*files, "missing.jpg", "folder.jpg", *special]]
    rows = [row for pair in zip(odd, good + [None] * len(odd)) for row in pair if row is not None]
    out = tmp_path / "out"
    result = tag("--catalog", str(write_manifest(tmp_path / "mixed.csv", rows)), "--model", tiny_bundle, "--out", str(out),
                 "--run-date", DATE, "--batch-size", "4", "--shard-size", "7", "--max-error-rate", "0.9", "--max-image-pixels", "1000000")
    assert result.exit_code == 0, result.output

    tags, errors = read(out, "tags"), read(out, "errors")
    assert tags.height + errors.height == len(rows)
    assert sorted(tags["product_id"].to_list() + errors["product_id"].to_list()) == sorted(r[0] for r in rows)
    got = {pid.removeprefix("odd-"): kind for pid, kind in errors.select("product_id", "error_type").iter_rows()}
    assert got == expected_errors
    for pid, message in errors.select("product_id", "message").iter_rows():
        name = pid.removeprefix("odd-")
        assert special.get(name, name)[:40] in message, (pid, message)
    valid = {f"odd-{name}" for name in files} - {f"odd-{name}" for name in expected_errors}
    assert valid <= set(tags["product_id"].to_list())
    assert_same_tags(clean_run, tags)


def test_missing_and_forbidden_s3_images(demo, tiny_bundle, clean_run, s3_endpoint, s3_bucket, tmp_path):
    bucket, fs = s3_bucket
    good = good_rows(demo)
    for pid, path in good:
        fs.put_file(path, f"{bucket}/img/{pid}.jpg")
    fs.put_file(good[0][1], f"{bucket}/img/secret.jpg")
    rows = [(pid, f"s3://{bucket}/img/{pid}.jpg") for pid, _ in good]
    rows.insert(2, ("ghost", f"s3://{bucket}/img/ghost.jpg"))
    rows.insert(4, ("locked", f"s3://{bucket}/img/secret.jpg"))
    with S3FaultProxy(s3_endpoint) as proxy:
        proxy.deny(f"/{bucket}/img/secret.jpg")
        out = tmp_path / "out"
        result = tag("--catalog", str(write_manifest(tmp_path / "m.csv", rows)), "--model", tiny_bundle, "--out", str(out),
                     "--run-date", DATE, "--max-error-rate", "0.5", "--storage-option", f"endpoint_url={proxy.url}")
        assert result.exit_code == 0, result.output
        assert proxy.requests(path="/img/secret.jpg")[0][2] == 403
    errors = read(out, "errors").sort("product_id")
    assert errors.select("product_id", "error_type").rows() == [("ghost", "missing"), ("locked", "forbidden")]
    assert "access denied" in errors["message"][1] and f"s3://{bucket}/img/secret.jpg" in errors["message"][1]
    tags = read(out, "tags")
    assert tags.height == len(good)
    # The same images from S3: the same tags (image_version differs: an ETag instead of size + mtime).
    assert_same_tags(clean_run.drop("image_version"), tags.drop("image_version"))
