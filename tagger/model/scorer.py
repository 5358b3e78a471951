"""One step from a batch of decoded images to predictions, for both engines of the tag job: the Predictor, then
the NaN guard (a score is never NaN or infinite where a tag is made: a model that yields one fails the run loudly
instead of writing it), then the label strings.

The local engine (:class:`tagger.tag.model_part.BatchModel`) and the Ray engine's model actors
(:class:`tagger.tag.ray.stages.ModelActor`) both call :class:`Scorer`; they differ only in how they name the
rows of a refused batch (the local engine knows the product ids; an actor knows manifest rows) and in what a
refusal leaves (``kept``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .scope import non_finite


class NonFiniteScores(RuntimeError):
    """The model produced a NaN or infinite score: the run fails (exit 1) and nothing of it is committed."""


@dataclass(frozen=True)
class Scored:
    """A batch's predictions (per attribute: top index, score, probabilities when asked) and label strings."""

    predictions: Any
    labels: dict[str, np.ndarray]


def refuse_non_finite(predictions: Any, rows: np.ndarray, *, ids: Callable[[np.ndarray], Sequence[Any]] | None = None,
                      kept: str = "nothing of the open shard was written") -> None:
    """Raise :class:`NonFiniteScores` naming the manifest rows (and, with ``ids``, their product ids) of the images
    whose score is NaN or infinite; a null tag (out of its attribute's scope) has no score, on purpose."""
    bad = non_finite(predictions)
    if not bad.any():
        return
    shown = np.asarray(rows)[bad][:5]
    where = ", ".join(str(int(r) + 1) for r in shown)
    if ids is not None:
        where += f": product ids {list(ids(shown))}"
    raise NonFiniteScores(
        f"the model produced NaN or infinite scores for {int(bad.sum())} image(s) of a batch (manifest rows {where}); "
        f"{kept}. Try --precision fp32; if it persists, the model bundle is broken: retrain or re-export it."
    )


class Scorer:
    """``predictor`` (a :class:`tagger.model.predictor.Predictor` built by :meth:`tagger.model.inference.Inference.predictor`)
    on a batch -> :class:`Scored`. ``probabilities``: keep every class's probability (several photos per product:
    their mean makes the tags)."""

    def __init__(self, predictor: Any, *, probabilities: bool = False,
                 ids: Callable[[np.ndarray], Sequence[Any]] | None = None, kept: str = "nothing of the open shard was written"):
        self.predictor, self.probabilities = predictor, probabilities
        self._ids, self._kept = ids, kept

    def __call__(self, images: Any, rows: np.ndarray) -> Scored:
        predictions = self.predictor(images, probabilities=self.probabilities)
        refuse_non_finite(predictions, rows, ids=self._ids, kept=self._kept)
        return Scored(predictions, self.predictor.labels(predictions))
