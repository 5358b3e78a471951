"""The draft JPEG path (libjpeg DCT scaling, ``draft=True``, the default) against the plain one (full
decode, then resize), on generated photo-like JPEGs at the Kaggle originals' 1800x2400 and the sample's
225x300.

Tolerance, stated once and tested here:

* pixels: for every image, the mean absolute difference of the model's input is under ``MEAN_GREY``
  = 3 grey levels (of 255), whatever the size, the target and the EXIF orientation; where draft mode
  does not apply (the picture is already no larger than twice the target) the two paths are identical;
* predictions (the tests' tiny model with image-driven heads, see :func:`image_driven`): the top label
  agrees for at least ``AGREE_LARGE`` = 95% of the decisions on 1800x2400 originals and ``AGREE_SMALL``
  = 90% on 225x300 ones read at 32 px (a 9x reduction, the hardest case), and every disagreement is a
  near-tie: the plain path's two best labels were within ``TIE_MARGIN`` = 0.05 of probability;
* bf16 autocast (``--precision auto`` on a CPU with native bfloat16, or ``bf16``) against fp32, same
  model and images: the same label rule, and every score within ``BF16_SCORE`` = 0.05.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from tagger.model.bundle import load_bundle
from tagger.data.decode import decode_image
from tagger.model.predictor import Predictor

MEAN_GREY = 3.0
AGREE_LARGE = 0.95
AGREE_SMALL = 0.90
TIE_MARGIN = 0.05
BF16_SCORE = 0.05
N_IMAGES = 32


def photo_like(seed: int, size: tuple[int, int], *, orientation: int = 1) -> bytes:
    """A product shot: a shaded, textured garment with a logo on white, camera grain, JPEG quality 90.

    ``size`` is (width, height) of the stored pixels; with an EXIF ``orientation`` other than 1 the stored
    pixels are turned so that a viewer applying the tag sees the upright product.
    """
    rng = np.random.default_rng(seed)
    width, height = 450, 600
    base = rng.integers(20, 235, 3)
    picture = Image.new("RGB", (width, height), (255, 255, 255))
    outline = [
        (width * rng.uniform(0.15, 0.3), height * 0.1), (width * rng.uniform(0.7, 0.85), height * 0.1),
        (width * 0.9, height * rng.uniform(0.35, 0.6)), (width * 0.75, height * 0.92),
        (width * 0.25, height * 0.92), (width * 0.1, height * rng.uniform(0.35, 0.6)),
    ]
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).polygon(outline, fill=255)
    yy, xx = np.mgrid[0:height, 0:width]
    shade = 0.75 + 0.25 * np.sin(xx / width * np.pi) * np.cos((yy / height - rng.uniform(0.2, 0.6)) * 1.5)
    period = rng.integers(6, 30)
    texture = 12 * np.sin(2 * np.pi * (xx + rng.uniform(-1, 1) * yy) / period)
    fabric = np.clip(base[None, None, :] * shade[..., None] + texture[..., None], 0, 255).astype(np.uint8)
    picture.paste(Image.fromarray(fabric), (0, 0), mask.filter(ImageFilter.GaussianBlur(1.5)))
    logo = tuple(int(255 - c) for c in base)
    x, y = width * rng.uniform(0.35, 0.5), height * rng.uniform(0.3, 0.5)
    ImageDraw.Draw(picture).ellipse((x, y, x + 40, y + 25), outline=logo, width=3)
    picture = picture.resize(size, Image.Resampling.LANCZOS)
    grain = rng.normal(0, 2.0, (size[1], size[0], 1)).astype(np.float32)
    picture = Image.fromarray(np.clip(np.asarray(picture, dtype=np.float32) + grain, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    if orientation != 1:
        # Store the pixels as a camera would have, so that applying the orientation gives them back.
        undo = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_270}[orientation]
        picture = picture.transpose(undo)
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def originals() -> list[bytes]:
    return [photo_like(seed, (1800, 2400)) for seed in range(N_IMAGES)]


@pytest.fixture(scope="module")
def sample_sized() -> list[bytes]:
    return [photo_like(seed, (225, 300)) for seed in range(N_IMAGES)]


def both(data: bytes, size: int) -> tuple[np.ndarray, np.ndarray]:
    return decode_image(data, size, draft=True), decode_image(data, size, draft=False)


def mean_grey(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize("target", [300, 32])
def test_originals_1800x2400_within_tolerance(originals, target):
    differences = [mean_grey(*both(data, target)) for data in originals[:8]]
    assert max(differences) < MEAN_GREY, differences
    assert np.mean(differences) < MEAN_GREY / 3


def test_sample_sized_225x300(sample_sized):
    for data in sample_sized[:8]:
        fast, plain = both(data, 300)
        assert np.array_equal(fast, plain)  # nothing to reduce: draft mode leaves the decode as it is
        assert mean_grey(*both(data, 32)) < MEAN_GREY


@pytest.mark.parametrize("size", [(1001, 1333), (227, 301), (640, 480)])
def test_sizes_that_are_not_whole_dct_blocks(size):
    # libjpeg rounds a reduced decode up to whole blocks; the padding must not shift or stretch the product.
    for seed in range(3):
        data = photo_like(seed, size)
        for target in (300, 96, 32):
            fast, plain = both(data, target)
            assert fast.shape == plain.shape == (target, target, 3)
            assert mean_grey(fast, plain) < MEAN_GREY, (size, target)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation(orientation):
    upright = decode_image(photo_like(7, (227, 301)), 32, draft=False)
    data = photo_like(7, (227, 301), orientation=orientation)
    fast, plain = both(data, 32)
    assert mean_grey(fast, plain) < MEAN_GREY
    assert mean_grey(plain, upright) < MEAN_GREY  # the tag was applied: the product stands upright


def image_driven(bundle_path: str, calibration: torch.Tensor) -> Predictor:
    """The tiny test model with heads that read the image.

    A randomly initialised network's logits barely depend on its input (features near zero, the bias
    decides), so label agreement would hold trivially. Standardising the pooled features over a
    calibration batch (weights / std, bias = -weights . mean) keeps the random projection but makes the
    labels image-driven: all classes occur, the margins are those of the image content.
    """
    predictor = Predictor(load_bundle(bundle_path), torch.device("cpu"))
    net = predictor.net
    with torch.inference_mode():
        features = net.backbone(net.normalise(calibration.contiguous(memory_format=torch.channels_last)))
        mean, std = features.mean(0), features.std(0) + 1e-12
        for head in net.heads.values():
            weight = head.weight / std
            head.weight.copy_(weight)
            head.bias.copy_(-(weight * mean).sum(1))
    return predictor


def batch(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("which, agree_at_least", [("originals", AGREE_LARGE), ("sample_sized", AGREE_SMALL)])
def test_top_labels_agree_except_near_ties(tiny_bundle, request, which, agree_at_least):
    images = request.getfixturevalue(which)
    size = load_bundle(tiny_bundle).input_size
    fast = batch([decode_image(d, size, draft=True) for d in images])
    plain = batch([decode_image(d, size, draft=False) for d in images])
    predictor = image_driven(tiny_bundle, plain)
    with torch.inference_mode():
        logits = predictor.net(plain.contiguous(memory_format=torch.channels_last))
    got, expected = predictor(fast), predictor(plain)

    decisions = agreements = 0
    for name, values in logits.items():
        assert len(set(expected.indices[name])) > 1, name  # the labels do depend on the image
        top2 = values.float().softmax(dim=1).topk(2, dim=1).values
        margin = (top2[:, 0] - top2[:, 1]).numpy()
        same = got.indices[name] == expected.indices[name]
        assert (margin[~same] < TIE_MARGIN).all(), (name, margin[~same])
        decisions += len(same)
        agreements += int(same.sum())
    assert agreements / decisions >= agree_at_least, agreements / decisions


def test_bf16_autocast_agrees_with_fp32_except_near_ties(tiny_bundle, originals):
    """bf16 autocast (the CPU default where bfloat16 is native): the same tolerance as draft decoding, on
    the same model and images, plus scores within ``BF16_SCORE`` = 0.05 of fp32's."""
    size = load_bundle(tiny_bundle).input_size
    images = batch([decode_image(d, size) for d in originals])
    exact = image_driven(tiny_bundle, images)
    fast = Predictor(exact.bundle, torch.device("cpu"), amp=True, amp_dtype=torch.bfloat16)
    fast.net = exact.net
    with torch.inference_mode():
        logits = exact.net(images.contiguous(memory_format=torch.channels_last))
    got, expected = fast(images), exact(images)
    decisions = agreements = 0
    for name, values in logits.items():
        top2 = values.float().softmax(dim=1).topk(2, dim=1).values
        margin = (top2[:, 0] - top2[:, 1]).numpy()
        same = got.indices[name] == expected.indices[name]
        assert (margin[~same] < TIE_MARGIN).all(), (name, margin[~same])
        assert np.abs(got.scores[name] - expected.scores[name]).max() < BF16_SCORE
        decisions += len(same)
        agreements += int(same.sum())
    assert agreements / decisions >= AGREE_SMALL, agreements / decisions
