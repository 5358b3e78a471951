"""Issue 12: corrupt JPEGs that libjpeg only warns about, and formats Pillow must never decode."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from tagger.data.decode import ALLOWED_FORMATS, ImageError, decode_image


def photo(size=(200, 300), progressive=False) -> bytes:
    """A noisy JPEG: every block carries data, so a damaged stretch cannot hide in flat colour."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
        buffer, "JPEG", quality=90, progressive=progressive)
    return buffer.getvalue()


def claims_9000x9000() -> bytes:
    """A 64x64 JPEG whose frame header says 9000x9000: libjpeg 'decodes' it as 64x64 of data over grey."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 120, 30)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = (9000).to_bytes(2, "big") + (9000).to_bytes(2, "big")
    return bytes(data)


def corrupted(kind: str) -> bytes:
    data = photo(progressive=kind == "progressive_truncated")
    middle = len(data) // 2
    return {
        # Cut short, then closed with an EOI marker as a resumed download or a careless tool does:
        # libjpeg warns "premature end of data segment" and fills the rest with grey.
        "truncated_with_eoi": data[:middle] + b"\xff\xd9",
        "progressive_truncated": data[:middle],
        "garbage_in_the_middle": data[:middle] + bytes(np.random.default_rng(1).integers(0, 255, 400, dtype=np.uint8))
        + data[middle + 400:],
        "zeros_in_the_middle": data[:middle] + bytes(400) + data[middle + 400:],
        "extraneous_bytes_before_eoi": data[:-2] + b"\x12\x34\x56" + data[-2:],
        "header_claims_9000x9000": claims_9000x9000(),
    }[kind]


@pytest.mark.parametrize("kind", ["truncated_with_eoi", "progressive_truncated", "garbage_in_the_middle",
                                  "zeros_in_the_middle", "extraneous_bytes_before_eoi", "header_claims_9000x9000"])
@pytest.mark.parametrize("draft", [True, False])
def test_a_jpeg_libjpeg_only_warns_about_is_a_decode_error(kind, draft):
    with pytest.raises(ImageError) as caught:
        decode_image(corrupted(kind), 64, source="x.jpg", draft=draft)
    assert caught.value.error_type == "decode"
    assert "x.jpg: corrupt or truncated JPEG data" in caught.value.message


def test_intact_jpegs_still_decode():
    for data in (photo(), photo(progressive=True), photo((1800, 2400))):
        assert decode_image(data, 64).shape == (64, 64, 3)
    cmyk = io.BytesIO()
    Image.new("CMYK", (40, 30), (0, 200, 200, 0)).save(cmyk, "JPEG")
    assert decode_image(cmyk.getvalue(), 32).shape == (32, 32, 3)


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n"


def test_eps_content_is_a_decode_error_and_ghostscript_never_runs(monkeypatch, tmp_path):
    from PIL import EpsImagePlugin

    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a) or None)
    # A "gs" on the PATH that leaves proof of being run: nothing may start it.
    marker = tmp_path / "ghostscript-ran"
    fake = tmp_path / "bin" / "gs"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{shutil.os.environ['PATH']}")
    for name in ("product.eps", "product.jpg"):
        with pytest.raises(ImageError) as caught:
            decode_image(EPS, 64, source=name)
        assert caught.value.error_type == "decode" and "not a recognised image format" in caught.value.message
        assert "accepted: " + ", ".join(ALLOWED_FORMATS) in caught.value.message
    assert not calls and not marker.exists(), "Pillow handed the EPS to Ghostscript"


@pytest.mark.parametrize("fmt", ["PSD", "ICO", "PPM", "TGA"])
def test_formats_outside_the_allow_list_are_refused(fmt):
    buffer = io.BytesIO()
    image = Image.new("RGB", (16, 16), (1, 2, 3))
    if fmt == "PSD":  # Pillow cannot write PSD: a minimal valid header is enough to be recognised
        buffer.write(b"8BPS\x00\x01" + bytes(6) + b"\x00\x03" + (16).to_bytes(4, "big") * 2 + b"\x00\x08\x00\x03" + bytes(12))
    else:
        image.save(buffer, fmt)
    with pytest.raises(ImageError, match="not a recognised image format"):
        decode_image(buffer.getvalue(), 16)
