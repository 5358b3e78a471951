"""Images -> softmax probabilities per attribute, one result or one error per image, nothing dropped.

Pixels go through :func:`tagger.images.decode_image` at the bundle's input size, exactly as in the tag
job and in training, and the network runs like the tag job's :class:`tagger.inference.Predictor`
(eval mode, channels-last, autocast on CUDA), so evaluation measures what the catalog gets. Unlike the
Predictor it keeps the whole probability vector (top-k, confusion, thresholds need more than the top label).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import storage
from ..bundle import ModelBundle
from ..images import ImageError, decode_image

log = logging.getLogger(__name__)


def read_image(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The file's bytes; :class:`ImageError` ``missing`` / ``read`` when it cannot be had."""
    try:
        if storage.is_remote(url):
            return storage.read_bytes(url, storage_options)
        with open(url.removeprefix("file://"), "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise ImageError("missing", f"{url}: no such file") from None
    except IsADirectoryError:
        raise ImageError("read", f"{url}: is a folder, not an image") from None
    except OSError as exc:
        raise ImageError("read", f"{url}: could not be read: {exc}") from None


def thumbnail(data: bytes, size: int) -> np.ndarray:
    """The original picture (upright, RGB over white, aspect kept) fitted into ``size`` x ``size``; for display only."""
    import warnings

    from PIL import Image, ImageOps

    from ..images import to_rgb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (size, size))
        image = to_rgb(ImageOps.exif_transpose(image))
        # Fit the box either way: a 60 px product shot is scaled up to be seen, a 2400 px one down.
        scale = size / max(image.size)
        if scale != 1:
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS)
    return np.asarray(image)


class ImageFiles:
    """A map-style dataset over image URLs: ``(index, pixels | None, thumb | None, error | None)``."""

    def __init__(
        self,
        urls: Sequence[str],
        size: int,
        *,
        storage_options: Mapping[str, Any] | None = None,
        thumb_size: int | None = None,
    ):
        # numpy strings, not a list of Python objects: workers share them copy-on-write.
        self.urls = np.asarray(list(urls), dtype=np.str_)
        self.size = size
        self.storage_options = dict(storage_options or {})
        self.thumb_size = thumb_size

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, index: int):
        url = str(self.urls[index])
        try:
            data = read_image(url, self.storage_options)
            pixels = decode_image(data, self.size, source=url)
        except ImageError as exc:
            return index, None, None, (exc.error_type, exc.message)
        thumb = None
        if self.thumb_size:
            try:
                thumb = thumbnail(data, self.thumb_size)
            except Exception:  # the model could read it; a missing preview is not worth an error row
                thumb = None
        return index, pixels, thumb, None


def collate(items):
    import torch

    ok = [item for item in items if item[1] is not None]
    images = torch.from_numpy(np.stack([item[1] for item in ok])).permute(0, 3, 1, 2) if ok else None
    return (
        [item[0] for item in ok],
        images,
        {item[0]: item[2] for item in ok if item[2] is not None},
        {item[0]: item[3] for item in items if item[3] is not None},
    )


@dataclass
class ModelOutputs:
    """Per input image, in input order. ``probs[attr]`` rows of failed images are NaN."""

    probs: dict[str, np.ndarray]
    ok: np.ndarray  # (n,) bool: decoded and predicted
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)  # index -> (error_type, message)
    thumbs: dict[int, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0

    def top(self, attr: str) -> tuple[np.ndarray, np.ndarray]:
        """Top class index (-1 for failed images) and its score (NaN for failed images)."""
        p = self.probs[attr]
        index = np.full(len(p), -1, dtype=np.int64)
        score = np.full(len(p), np.nan, dtype=np.float32)
        if self.ok.any():
            index[self.ok] = p[self.ok].argmax(axis=1)
            score[self.ok] = p[self.ok].max(axis=1)
        return index, score


def run_model(
    bundle: ModelBundle,
    urls: Sequence[str],
    *,
    device: Any,
    batch_size: int = 64,
    workers: int = 0,
    storage_options: Mapping[str, Any] | None = None,
    thumb_size: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> ModelOutputs:
    """Decode and predict every URL; a failed image becomes an entry in ``errors``, never a gap."""
    import torch
    from torch.utils.data import DataLoader

    started = time.monotonic()
    device = torch.device(device)
    n = len(urls)
    probs = {a.name: np.full((n, len(a.labels)), np.nan, dtype=np.float32) for a in bundle.attributes}
    outputs = ModelOutputs(probs, np.zeros(n, dtype=bool))
    if n == 0:
        return outputs
    net = bundle.build_net().to(device).to(memory_format=torch.channels_last)
    dataset = ImageFiles(urls, bundle.input_size, storage_options=storage_options, thumb_size=thumb_size)
    loader = DataLoader(
        dataset,
        batch_size=max(1, min(batch_size, n)),
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    amp = device.type == "cuda"
    done = 0
    with torch.inference_mode():
        for indices, images, thumbs, errors in loader:
            outputs.errors.update(errors)
            outputs.thumbs.update(thumbs)
            if images is not None:
                images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    logits = net(images)
                rows = np.asarray(indices)
                for attr, values in logits.items():
                    probs[attr][rows] = values.float().softmax(dim=1).cpu().numpy()
                outputs.ok[rows] = True
            done += len(indices) + len(errors)
            if on_batch is not None:
                on_batch(done, n)
    outputs.seconds = time.monotonic() - started
    return outputs


def progress_logger(what: str, every_s: float = 15.0) -> Callable[[int, int], None]:
    """A batch callback that logs ``done/total`` at most every ``every_s`` seconds, and at the end."""
    started = time.monotonic()
    last = [started]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - last[0] >= every_s:
            last[0] = now
            rate = done / max(now - started, 1e-9)
            log.info("%s: %d/%d images (%.0f/s)", what, done, total, rate)

    return report
