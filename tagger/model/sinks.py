"""Where predictions go: one small interface (:class:`Sink`) and one loop (:func:`score_batches`), as clip-retrieval's
runner composes a reader, a mapper and a writer: batches of rows from a source (:class:`tagger.data.reader.ImageRows`
through a DataLoader: decoded pixels, or a typed error per row) -> :class:`tagger.model.scorer.Scorer` (the
Predictor, the NaN guard) -> a sink.

The sinks, one per place predictions go:

- :class:`OutputArrays` (evaluate): per input, its probabilities, top index and score, or its error;
- :class:`GalleryInput` (predict's sheet and gallery): the same, and each decoded image's thumbnail;
- :class:`LabelledArrays` (retrain's val/test scoring): the probabilities and targets of the decoded rows;
- :class:`tagger.tag.rows.ShardSink` (the tag job's local engine): rows into the open shard's parts.

A sink sees each row of each batch once: decoded rows with their predictions (``scored`` is None when none of a
batch's images decoded), the others as the batch's error rows. ``close()`` returns what the sink made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..data.reader import Batch
from .scorer import Scored, Scorer


class Sink(Protocol):
    def write(self, batch: Batch, scored: Scored | None) -> None:
        """A batch's rows: ``batch.rows`` scored by ``scored`` (None: no image of the batch decoded), and its errors."""

    def close(self) -> Any:
        """After the last batch: what the sink made."""


def score_batches(batches: Iterable[Batch], scorer: Scorer, sink: Sink, *,
                  on_batch: Callable[[Batch], None] | None = None) -> Any:
    """Every batch through ``scorer`` into ``sink``; returns ``sink.close()``. ``on_batch``: after each batch
    (progress). A failure propagates with the sink left unclosed: its owner decides what an aborted sink leaves."""
    for batch in batches:
        sink.write(batch, scorer(batch.images, batch.rows) if batch.images is not None else None)
        if on_batch is not None:
            on_batch(batch)
    return sink.close()


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


class OutputArrays:
    """``n`` inputs of a bundle with ``attributes`` -> :class:`ModelOutputs`, nothing dropped: a failed image is an
    entry of ``errors``. Needs the scorer's probabilities."""

    def __init__(self, attributes: Sequence[Any], n: int):
        self.outputs = ModelOutputs(
            probs={a.name: np.full((n, len(a.labels)), np.nan, dtype=np.float32) for a in attributes},
            top_index={a.name: np.full(n, -1, dtype=np.int64) for a in attributes},
            top_score={a.name: np.full(n, np.nan, dtype=np.float32) for a in attributes},
            ok=np.zeros(n, dtype=bool),
        )

    def write(self, batch: Batch, scored: Scored | None) -> None:
        outputs = self.outputs
        for row, error_type, message in zip(batch.error_rows.tolist(), batch.error_types, batch.error_messages):
            outputs.errors[row] = (error_type, message)
        if scored is None:
            return
        rows, predictions = batch.rows, scored.predictions
        for attr in outputs.probs:
            outputs.probs[attr][rows] = predictions.probabilities[attr]
            outputs.top_index[attr][rows] = predictions.indices[attr]
            outputs.top_score[attr][rows] = predictions.scores[attr]
        outputs.ok[rows] = True

    def close(self) -> ModelOutputs:
        return self.outputs


class GalleryInput(OutputArrays):
    """:class:`OutputArrays` and each decoded image's thumbnail (the source's preview; a picture Pillow could not
    draw has none), for predict's sheet and gallery."""

    def write(self, batch: Batch, scored: Scored | None) -> None:
        super().write(batch, scored)
        for row, thumb in zip(batch.rows.tolist(), batch.previews or []):
            if thumb is not None:
                self.outputs.thumbs[row] = thumb


class LabelledArrays:
    """Labelled batches (``batch.targets``) -> softmax probabilities per attribute ``{attr: (n, n_labels) float32}``
    and the targets ``(n, n_attr)`` of the decoded rows, in order."""

    def __init__(self) -> None:
        self.probs: dict[str, list[np.ndarray]] = {}
        self.targets: list[np.ndarray] = []

    def write(self, batch: Batch, scored: Scored | None) -> None:
        if scored is None:
            return
        for attr, values in scored.predictions.probabilities.items():
            self.probs.setdefault(attr, []).append(values)
        self.targets.append(batch.targets)

    def close(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        if not self.targets:
            raise ValueError("no image of this split could be decoded; nothing to evaluate")
        return {attr: np.concatenate(v) for attr, v in self.probs.items()}, np.concatenate(self.targets)
