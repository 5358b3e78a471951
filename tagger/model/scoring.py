"""Images -> softmax probabilities per attribute, through the tag job's own corridor.

- :func:`run_model` (evaluate, predict): locations -> :class:`tagger.data.reader.ImageRows` (the tag job's
  read, deadline, byte and pixel caps, decode, per-row errors) -> :class:`tagger.model.predictor.Predictor`
  (its device, precision, channels-last) -> one result or one error per location, nothing dropped. The
  top label and score are the Predictor's own, so evaluate scores exactly what ``tagger tag`` writes.
- :func:`predict_batches` (retrain's val/test scoring): decoded ``(images, targets)`` batches through
  the same Predictor.
"""

from __future__ import annotations

import functools
import io
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .bundle import ModelBundle
from .inference import Inference
from ..data.reader import ImageSettings

log = logging.getLogger(__name__)


def thumbnail(data: bytes, size: int) -> np.ndarray | None:
    """The original picture (upright, RGB over white, aspect kept) fitted into ``size`` x ``size``; for
    display only. None when Pillow cannot draw it although the model could read it: a missing preview
    is not worth an error row."""
    import warnings

    from PIL import Image, ImageOps

    from ..data.decode import to_rgb

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            image.draft("RGB", (size, size))
            image = to_rgb(ImageOps.exif_transpose(image))
            # Fit the box either way: a 60 px product shot is scaled up to be seen, a 2400 px one down.
            scale = size / max(image.size)
            if scale != 1:
                image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS)
    except Exception as exc:
        log.warning("no preview of a %d-byte image: %s", len(data), exc)
        return None
    return np.asarray(image)


@dataclass
class ModelOutputs:
    """Per input image, in input order. Rows of failed images: probabilities NaN, top index -1, score NaN."""

    probs: dict[str, np.ndarray]
    top_index: dict[str, np.ndarray]
    top_score: dict[str, np.ndarray]
    ok: np.ndarray  # (n,) bool: decoded and predicted
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)  # index -> (error_type, message)
    thumbs: dict[int, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0

    def top(self, attr: str) -> tuple[np.ndarray, np.ndarray]:
        """Top class index (-1 for failed images) and its score (NaN for failed images), as the tag job writes them."""
        return self.top_index[attr], self.top_score[attr]


def run_model(
    bundle: ModelBundle,
    locations: Sequence[str],
    *,
    inference: Inference,
    batch_size: int = 64,
    workers: int = 0,
    images: ImageSettings | None = None,
    thumb_size: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> ModelOutputs:
    """Decode and predict every location; a failed image becomes an entry in ``errors``, never a gap.
    ``inference``: what runs the model (:func:`tagger.model.inference.resolve` against ``bundle``); ``images``:
    how each location is read (:class:`tagger.data.reader.ImageSettings`; default: the default caps, no http).

    Raises :class:`tagger.data.reader.StorageUnavailable` when the store fails (after retries): numbers over
    the images that happened to load would be numbers over an arbitrary subset.
    """
    from torch.utils.data import DataLoader

    from .. import storage
    from ..data.reader import TRANSIENT, ImageRows, StorageUnavailable, collate, worker_context

    started = time.monotonic()
    device = inference.device
    n = len(locations)
    probs = {a.name: np.full((n, len(a.labels)), np.nan, dtype=np.float32) for a in bundle.attributes}
    top_index = {a.name: np.full(n, -1, dtype=np.int64) for a in bundle.attributes}
    top_score = {a.name: np.full(n, np.nan, dtype=np.float32) for a in bundle.attributes}
    outputs = ModelOutputs(probs, top_index, top_score, np.zeros(n, dtype=bool))
    if n == 0:
        return outputs
    predictor = inference.predictor()
    dataset = ImageRows.from_locations(
        locations, bundle.input_size, images, preview=functools.partial(thumbnail, size=thumb_size) if thumb_size else None,
    )
    remote = any(storage.is_remote(location) for location in locations)
    loader = DataLoader(
        dataset,
        batch_size=max(1, min(batch_size, n)),
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        multiprocessing_context=worker_context("auto", remote) if workers else None,
        persistent_workers=False,
    )
    done = 0
    for batch in loader:
        for row, error_type, message in zip(batch.error_rows.tolist(), batch.error_types, batch.error_messages):
            if error_type == TRANSIENT:
                raise StorageUnavailable(f"{message}; run again when the store is back")
            outputs.errors[row] = (error_type, message)
        if batch.images is not None:
            rows = batch.rows
            predictions = predictor(batch.images, probabilities=True)
            for attr in probs:
                probs[attr][rows] = predictions.probabilities[attr]
                top_index[attr][rows] = predictions.indices[attr]
                top_score[attr][rows] = predictions.scores[attr]
            outputs.ok[rows] = True
            for row, thumb in zip(rows.tolist(), batch.previews or []):
                if thumb is not None:
                    outputs.thumbs[row] = thumb
        done += batch.size
        if on_batch is not None:
            on_batch(done, n)
    outputs.seconds = time.monotonic() - started
    return outputs


def predict_batches(
    model: Any, batches: Iterable[tuple[Any, Any]], device: Any, precision: str = "auto"
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Softmax probabilities per attribute ``{attr: (n, n_labels) float32}`` and the targets ``(n, n_attr)``
    of retrain's ``(uint8 images, targets)`` batches, through the tag job's Predictor (the review thresholds
    are calibrated on these scores). ``model``: a :class:`tagger.model.predictor.Predictor` made by the caller
    (retrain: its unsaved bundle on the runtime and precision that tag picks at ``auto``), or a network,
    run by PyTorch at ``precision`` and left in the mode it was in."""
    import torch

    from .predictor import Predictor

    if isinstance(model, Predictor):
        predictor, net, was_training = model, None, False
    else:
        net, was_training = model, model.training  # before the Predictor puts it in eval mode
        predictor = Predictor(net, torch.device(device), precision=precision)
    probs: dict[str, list[np.ndarray]] = {}
    targets: list[np.ndarray] = []
    try:
        for images, batch_targets in batches:
            if images.shape[0] == 0:
                continue
            predictions = predictor(images, probabilities=True)
            for attr, values in predictions.probabilities.items():
                probs.setdefault(attr, []).append(values)
            targets.append(batch_targets.numpy())
    finally:
        if net is not None:
            net.train(was_training)
    if not targets:
        raise ValueError("no image of this split could be decoded; nothing to evaluate")
    return {attr: np.concatenate(v) for attr, v in probs.items()}, np.concatenate(targets)


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
