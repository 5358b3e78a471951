"""Images -> softmax probabilities per attribute, through the tag job's own corridor: a source, the
:class:`tagger.model.scorer.Scorer` and a sink, run by :func:`tagger.model.sinks.score_batches`.

- :func:`run_model` (evaluate, predict): locations -> :class:`tagger.data.reader.ImageRows` (the tag job's
  read, deadline, byte and pixel caps, decode, per-row errors) -> the Scorer (the Predictor's device, precision,
  channels-last; the NaN guard) -> :class:`~tagger.model.sinks.OutputArrays` (or, with thumbnails, predict's
  :class:`~tagger.model.sinks.GalleryInput`): one result or one error per location, nothing dropped. The
  top label and score are the Predictor's own, so evaluate scores exactly what ``tagger tag`` writes.
- :func:`predict_batches` (retrain's val/test scoring): decoded ``(images, targets)`` batches through
  the same Scorer into :class:`~tagger.model.sinks.LabelledArrays`.
"""

from __future__ import annotations

import functools
import io
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from .bundle import ModelBundle
from .inference import Inference
from .scorer import Scorer
from .sinks import GalleryInput, LabelledArrays, ModelOutputs, OutputArrays, score_batches
from ..data.reader import Batch, ImageSettings

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
    how each location is read (:class:`tagger.data.reader.ImageSettings`; default: the default caps, no http);
    ``thumb_size``: also each image's thumbnail (predict's gallery).

    Raises :class:`tagger.data.reader.StorageUnavailable` when the store fails (after retries): numbers over
    the images that happened to load would be numbers over an arbitrary subset. Raises
    :class:`tagger.model.scorer.NonFiniteScores`, naming the images, when the model scores one NaN or infinite.
    """
    from torch.utils.data import DataLoader

    from .. import storage
    from ..data.reader import ImageRows, collate, worker_context

    started = time.monotonic()
    n = len(locations)
    sink = GalleryInput(bundle.attributes, n) if thumb_size else OutputArrays(bundle.attributes, n)
    if n == 0:
        return sink.close()
    scorer = Scorer(inference.predictor(), probabilities=True, labels=False, kept="nothing was written",
                    where=lambda rows: "images " + ", ".join(locations[int(r)] for r in rows))
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
        pin_memory=inference.device.type == "cuda",
        multiprocessing_context=worker_context("auto", remote) if workers else None,
        persistent_workers=False,
    )
    done = 0

    def count(batch: Batch) -> None:
        nonlocal done
        done += batch.size
        if on_batch is not None:
            on_batch(done, n)

    outputs = score_batches(_stored(loader), scorer, sink, on_batch=count)
    outputs.seconds = time.monotonic() - started
    return outputs


def _stored(batches: Iterable[Batch]) -> Iterator[Batch]:
    """Batches whose reads the store answered: a read that failed for a reason retrying later may fix stops the command."""
    from ..data.reader import TRANSIENT, StorageUnavailable

    for batch in batches:
        for error_type, message in zip(batch.error_types, batch.error_messages):
            if error_type == TRANSIENT:
                raise StorageUnavailable(f"{message}; run again when the store is back")
        yield batch


def predict_batches(
    model: Any, batches: Iterable[tuple[Any, Any]], device: Any, precision: str = "auto"
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Softmax probabilities per attribute ``{attr: (n, n_labels) float32}`` and the targets ``(n, n_attr)``
    of retrain's ``(uint8 images, targets)`` batches, through the tag job's Predictor and NaN guard (the review
    thresholds are calibrated on these scores). ``model``: a :class:`tagger.model.predictor.Predictor` made by the
    caller (retrain: its unsaved bundle on the runtime and precision that tag picks at ``auto``), or a network,
    run by PyTorch at ``precision`` and left in the mode it was in."""
    import torch

    from .predictor import Predictor

    if isinstance(model, Predictor):
        predictor, net, was_training = model, None, False
    else:
        net, was_training = model, model.training  # before the Predictor puts it in eval mode
        predictor = Predictor(net, torch.device(device), precision=precision)
    scorer = Scorer(predictor, probabilities=True, labels=False, kept="no bundle was written",
                    where=lambda rows: "decoded images " + ", ".join(str(int(r) + 1) for r in rows) + " of the split",
                    fix="The trained weights diverged, or overflow in the precision tag computes: retrain with a lower --lr or a --grad-clip.")
    try:
        return score_batches(_labelled(batches), scorer, LabelledArrays())
    finally:
        if net is not None:
            net.train(was_training)


def _labelled(batches: Iterable[tuple[Any, Any]]) -> Iterator[Batch]:
    """Retrain's ``(images, targets)`` batches (its collate leaves out what did not decode) as :class:`Batch`\ es,
    their rows numbered in the split's order of decoded images."""
    start = 0
    for images, targets in batches:
        n = int(images.shape[0])
        yield Batch(rows=np.arange(start, start + n, dtype=np.int64), versions=[], images=images if n else None,
                    error_rows=np.empty(0, np.int64), error_types=[], error_messages=[], size=n, targets=targets.numpy())
        start += n


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
