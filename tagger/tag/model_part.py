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
from ..model.scorer import NonFiniteScores, Scorer
from ..model.scorer import refuse_non_finite as refuse_rows

__all__ = ["BatchModel", "NonFiniteScores", "inference_spec", "refuse_non_finite"]

if TYPE_CHECKING:
    from ..model.inference import InferenceSpec


def inference_spec(config: TagConfig, *, threads: int | None = None) -> InferenceSpec:
    """The tag job's ``--device``, ``--runtime``, ``--precision`` and ``--threads`` (``threads``: the Ray
    engine's per-actor count instead)."""
    from ..model.inference import InferenceSpec

    return InferenceSpec(config.device, config.runtime, config.precision, config.threads if threads is None else threads)


class BatchModel:
    """The run's :class:`~tagger.model.scorer.Scorer` (refused rows named with their product ids) and the facts of
    what computes (device, runtime, precision, why) for the summary."""

    def __init__(self, predictor: Any, manifest: Manifest, *, probabilities: bool = False):
        self.predictor, self.manifest = predictor, manifest
        self.probabilities = probabilities  # several photos per product: their mean makes the tags (tag/photos.py)
        self.device = str(predictor.device)
        self.runtime = {"name": predictor.runtime.name, "precision": predictor.precision_name,
                        "reason": predictor.runtime.reason}
        if predictor.runtime.measured:  # --runtime auto measured the candidates: what an image cost each
            self.runtime["measured_cpu_ms_per_image"] = predictor.runtime.measured

        self.scorer = Scorer(predictor, probabilities=probabilities, ids=lambda rows: product_ids(manifest, rows))


def product_ids(manifest: Manifest, rows: np.ndarray) -> list[Any]:
    return manifest.table.column("product_id").take(pa.array(rows)).to_pylist()


def refuse_non_finite(predictions: Any, batch: Batch, manifest: Manifest) -> None:
    """:func:`tagger.model.scorer.refuse_non_finite` for a local batch: its rows named with their product ids."""
    refuse_rows(predictions, batch.rows, ids=lambda rows: product_ids(manifest, rows))
