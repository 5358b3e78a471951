"""The model part of the tag run: the options resolved by :func:`tagger.model.inference.resolve` before the
partition is touched (a bad choice is exit 2 with nothing changed), then the Predictor that labels each batch,
with a NaN or infinite score refused loudly instead of written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from .config import TagConfig
from ..data.manifest import Manifest
from ..data.reader import Batch

if TYPE_CHECKING:
    from ..model.inference import InferenceSpec


class NonFiniteScores(RuntimeError):
    pass


def inference_spec(config: TagConfig, *, threads: int | None = None) -> InferenceSpec:
    """The tag job's ``--device``, ``--runtime``, ``--precision`` and ``--threads`` (``threads``: the Ray
    engine's per-actor count instead)."""
    from ..model.inference import InferenceSpec

    return InferenceSpec(config.device, config.runtime, config.precision, config.threads if threads is None else threads)


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
