"""One step from a batch of decoded images to predictions, for every command: the Predictor, then the NaN guard
(a score is never NaN or infinite where a tag is made: a model that yields one fails the command loudly instead of
writing it), then the label strings.

The tag job's two engines (the local loop, :func:`tagger.model.sinks.score_batches`, and the Ray engine's model
actors, :class:`tagger.tag.ray.stages.ModelActor`), evaluate and predict (:func:`tagger.model.scoring.run_model`)
and retrain's val/test scoring (:func:`tagger.model.scoring.predict_batches`) all call :class:`Scorer`; they
differ only in how they name the rows of a refused batch (``ids``, ``where``) and in what a refusal leaves
(``kept``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .scope import non_finite


FIX = "Try --precision fp32; if it persists, the model bundle is broken: retrain or re-export it."


class NonFiniteScores(RuntimeError):
    """The model produced a NaN or infinite score: the run fails (exit 1) and nothing of it is committed."""


@dataclass(frozen=True)
class Scored:
    """A batch's predictions (per attribute: top index, score, probabilities when asked) and label strings."""

    predictions: Any
    labels: dict[str, np.ndarray] | None  # None: not asked for (evaluate, predict and retrain use the indices)


def refuse_non_finite(predictions: Any, rows: np.ndarray, *, ids: Callable[[np.ndarray], Sequence[Any]] | None = None,
                      kept: str = "nothing of the open shard was written",
                      where: Callable[[np.ndarray], str] | None = None, fix: str = FIX) -> None:
    """Raise :class:`NonFiniteScores` naming the manifest rows (and, with ``ids``, their product ids) of the images
    whose score is NaN or infinite; a null tag (out of its attribute's scope) has no score, on purpose. ``where``:
    another way to name the (first five) rows, for rows that are not a manifest's (evaluate's images, retrain's);
    ``fix``: what to do about it, in the command's own options."""
    bad = non_finite(predictions)
    if not bad.any():
        return
    shown = np.asarray(rows)[bad][:5]
    if where is not None:
        named = where(shown)
    else:
        named = "manifest rows " + ", ".join(str(int(r) + 1) for r in shown)
        if ids is not None:
            named += f": product ids {list(ids(shown))}"
    raise NonFiniteScores(
        f"the model produced NaN or infinite scores for {int(bad.sum())} image(s) of a batch ({named}); "
        f"{kept}. {fix}"
    )


class Scorer:
    """``predictor`` (a :class:`tagger.model.predictor.Predictor` built by :meth:`tagger.model.inference.Inference.predictor`)
    on a batch -> :class:`Scored`. ``probabilities``: keep every class's probability (several photos per product:
    their mean makes the tags; evaluate, predict and retrain read them). ``labels``: make the label strings (a
    bare network being trained has no vocabularies). ``ids``, ``kept``, ``where``, ``fix``: see :func:`refuse_non_finite`."""

    def __init__(self, predictor: Any, *, probabilities: bool = False, labels: bool = True,
                 ids: Callable[[np.ndarray], Sequence[Any]] | None = None, kept: str = "nothing of the open shard was written",
                 where: Callable[[np.ndarray], str] | None = None, fix: str = FIX):
        self.predictor, self.probabilities, self.labels = predictor, probabilities, labels
        self._refusal = {"ids": ids, "kept": kept, "where": where, "fix": fix}

    def __call__(self, images: Any, rows: np.ndarray) -> Scored:
        predictions = self.predictor(images, probabilities=self.probabilities)
        refuse_non_finite(predictions, rows, **self._refusal)
        return Scored(predictions, self.predictor.labels(predictions) if self.labels else None)
