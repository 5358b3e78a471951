"""The model part of the tag run: device, runtime and precision resolved before the partition is touched
(a bad choice is exit 2 with nothing changed), then the :class:`tagger.model.predictor.Predictor` that labels
each batch, with a NaN or infinite score refused loudly instead of written.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa

from ..model.bundle import ModelBundle
from .config import TagConfig
from ..data.manifest import Manifest
from ..data.reader import Batch


class NonFiniteScores(RuntimeError):
    pass


class ModelSettings:
    """``--device``, ``--runtime`` and ``--precision``, resolved and checked against each other."""

    def __init__(self, config: TagConfig, bundle: ModelBundle | None = None):
        from ..model.predictor import precision_settings, resolve_device
        from ..model.runtimes import RuntimeSettingError, choose_runtime

        self.threads = config.threads
        self.device = resolve_device(config.device)
        # --runtime auto on a CPU measures the candidates on ``bundle`` here (once per model_version and CPU,
        # then cached), with the threads the run will use: before anything under --out changes.
        with self.cpu_threads():
            self.runtime = choose_runtime(config.runtime, self.device, config.precision, bundle=bundle)
        try:
            self.precision = precision_settings(self.runtime.precision or config.precision, self.device, self.runtime.name)
        except ValueError as exc:  # a precision this device or runtime does not compute: a bad option (exit 2)
            raise RuntimeSettingError(str(exc)) from None

    def load(self, bundle: ModelBundle, manifest: Manifest) -> BatchModel:
        from ..model.predictor import Predictor

        return BatchModel(Predictor(bundle, self.device, runtime=self.runtime, **self.precision), manifest,
                          probabilities=manifest.separator is not None)

    @contextmanager
    def cpu_threads(self) -> Iterator[None]:
        """``--threads`` for the model on the CPU while tagging; torch's own count again afterwards."""
        import torch

        previous = torch.get_num_threads()
        if self.device.type == "cpu" and self.threads > 0:
            torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)


class BatchModel:
    """A batch -> predictions and label strings (None, None when none of its images decoded)."""

    def __init__(self, predictor: Any, manifest: Manifest, *, probabilities: bool = False):
        self.predictor, self.manifest = predictor, manifest
        self.probabilities = probabilities  # several photos per product: their mean makes the tags (tag/photos.py)
        self.device = str(predictor.device)
        self.runtime = {"name": predictor.runtime.name, "precision": predictor.precision_name,
                        "reason": predictor.runtime.reason}
        if predictor.runtime.measured:  # --runtime auto measured the candidates: their rates, in img/s
            self.runtime["measured_images_per_s"] = predictor.runtime.measured

    def __call__(self, batch: Batch) -> tuple[Any, dict[str, np.ndarray] | None]:
        if batch.images is None:
            return None, None
        predictions = self.predictor(batch.images, probabilities=self.probabilities)
        refuse_non_finite(predictions, batch, self.manifest)
        return predictions, self.predictor.labels(predictions)


def refuse_non_finite(predictions: Any, batch: Batch, manifest: Manifest) -> None:
    """A score is never NaN: a model that yields one fails the run loudly instead of writing it."""
    bad = np.zeros(len(batch.rows), dtype=bool)
    for scores in predictions.scores.values():
        bad |= ~np.isfinite(scores)
    if bad.any():
        rows = batch.rows[bad]
        ids = manifest.table.column("product_id").take(pa.array(rows[:5])).to_pylist()
        raise NonFiniteScores(
            f"the model produced NaN or infinite scores for {int(bad.sum())} image(s) of a batch (manifest rows "
            f"{', '.join(str(r + 1) for r in rows[:5])}: product ids {ids}); nothing of the open shard was written. "
            "Try --precision fp32; if it persists, the model bundle is broken: retrain or re-export it."
        )
