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
        self._prepared: Any = None  # the Predictor prepare() built and tried, handed to load()

    def prepare(self, bundle: ModelBundle) -> None:
        """The model made ready to run, before the partition is touched: the Predictor built (for ONNX
        Runtime/OpenVINO: the export made, or the cached file checked) and one trial batch through it. A cache
        that cannot be written (exit 2) or a runtime that cannot run this network then fails the run
        with the previous partition untouched, instead of after the start-over wiped it."""
        from ..model.predictor import Predictor

        predictor = Predictor(bundle, self.device, runtime=self.runtime, **self.precision)
        with self.cpu_threads():  # the threads the tag loop runs with: the session is made once
            trial_batch(predictor, bundle.input_size)
        self._prepared = predictor

    def load(self, bundle: ModelBundle, manifest: Manifest) -> BatchModel:
        from ..model.predictor import Predictor

        predictor, self._prepared = self._prepared, None
        if predictor is None or predictor.bundle is not bundle:
            predictor = Predictor(bundle, self.device, runtime=self.runtime, **self.precision)
        return BatchModel(predictor, manifest, probabilities=manifest.separator is not None)

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


def trial_batch(predictor: Any, input_size: int) -> None:
    """Two generated images through ``predictor``: what a runtime fails on (a session it cannot make, an
    operator it lacks) fails here, before the run changes anything."""
    from ..model.runtimes import trial_images

    predictor(trial_images(input_size, 2))


class BatchModel:
    """A batch -> predictions and label strings (None, None when none of its images decoded)."""

    def __init__(self, predictor: Any, manifest: Manifest, *, probabilities: bool = False):
        self.predictor, self.manifest = predictor, manifest
        self.probabilities = probabilities  # several photos per product: their mean makes the tags (tag/photos.py)
        self.device = str(predictor.device)
        self.runtime = {"name": predictor.runtime.name, "precision": predictor.precision_name,
                        "reason": predictor.runtime.reason}
        if predictor.runtime.measured:  # --runtime auto measured the candidates: what an image cost each
            self.runtime["measured_cpu_ms_per_image"] = predictor.runtime.measured

    def __call__(self, batch: Batch) -> tuple[Any, dict[str, np.ndarray] | None]:
        if batch.images is None:
            return None, None
        predictions = self.predictor(batch.images, probabilities=self.probabilities)
        refuse_non_finite(predictions, batch, self.manifest)
        return predictions, self.predictor.labels(predictions)


def refuse_non_finite(predictions: Any, batch: Batch, manifest: Manifest) -> None:
    """A score is never NaN: a model that yields one fails the run loudly instead of writing it."""
    from ..model.scope import non_finite

    bad = non_finite(predictions)  # a null tag (out of its attribute's scope) has no score, on purpose
    if bad.any():
        rows = batch.rows[bad]
        ids = manifest.table.column("product_id").take(pa.array(rows[:5])).to_pylist()
        raise NonFiniteScores(
            f"the model produced NaN or infinite scores for {int(bad.sum())} image(s) of a batch (manifest rows "
            f"{', '.join(str(r + 1) for r in rows[:5])}: product ids {ids}); nothing of the open shard was written. "
            "Try --precision fp32; if it persists, the model bundle is broken: retrain or re-export it."
        )
