"""The one definition of the numbers retrain and evaluate report: metrics, majority baseline, review thresholds.

Every metric comes from a confusion matrix (rows = true class, columns = predicted class) through
:func:`confusion_scores`: retrain's running validation metric (``TaggerModule``, accumulated by torchmetrics'
``MulticlassConfusionMatrix``), retrain's final val/test numbers in ``model.json`` and ``tagger evaluate``
therefore cannot drift apart.

- ``accuracy``: share of scored rows whose top label is right (micro).
- ``macro_f1``: unweighted mean F1 over the classes that occur in the targets *or* the predictions
  (a class that is neither cannot be measured; one that is only predicted counts with F1 0).
- ``weighted_f1``: F1 averaged with class support as weights.
- ``majority_accuracy``: accuracy of always answering the majority label (the floor to beat).
- ``coverage``: share of decoded images whose top score is at or above the attribute's review threshold
  (tagged without review, as in retrain's ``val_coverage``); ``accuracy_covered``: accuracy among them.
- per class: precision, recall, F1, support; NaN where undefined (precision of a class never
  predicted, recall of a class with no rows), never a silent 0.

Rows with target -1 (unknown) are never scored. Pure numpy: cheap to import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import math

import numpy as np

DEFAULT_TARGET_PRECISION = 0.9
# Where a threshold has no lower validation score to sit halfway to: this far under the lowest one, so
# that the float jitter of another batch composition or precision does not move that row across it.
THRESHOLD_MARGIN = 1e-3


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 counts over the rows with ``y_true >= 0``; rows true, columns predicted."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    known = y_true >= 0
    flat = y_true[known] * n_classes + y_pred[known]
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes).astype(np.int64)


def confusion_scores(matrix: np.ndarray) -> dict[str, Any]:
    """``accuracy``, ``macro_f1``, ``weighted_f1`` (NaN without rows) and per class ``precision``,
    ``recall``, ``f1``, ``support``, ``predicted`` arrays, from a confusion matrix."""
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    total = support.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, np.nan)
        recall = np.where(support > 0, tp / support, np.nan)
        denominator = support + predicted  # 2tp + fp + fn
        f1 = np.where(denominator > 0, 2 * tp / denominator, np.nan)
    present = denominator > 0
    nan = float("nan")
    return {
        "accuracy": float(tp.sum() / total) if total else nan,
        "macro_f1": float(f1[present].mean()) if present.any() else nan,
        "weighted_f1": float((np.nan_to_num(f1) * support).sum() / total) if total else nan,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support.astype(np.int64),
        "predicted": predicted.astype(np.int64),
    }


def accuracy_se(accuracy: float, n: int) -> float:
    """The standard error of an accuracy over ``n`` rows, sqrt(p(1-p)/n) (NaN without rows)."""
    if not n or accuracy is None or math.isnan(accuracy):
        return float("nan")
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n)


def paired_difference(first: np.ndarray, second: np.ndarray) -> dict[str, float | int]:
    """Two models' correctness on the same rows (bool arrays): ``difference`` (second - first accuracy) and its
    paired standard error sqrt(b + c - (b - c)^2 / n) / n, with b the rows only the first got right (``broken``)
    and c the rows only the second got right (``fixed``). The rows are the same, so what both got right or both
    got wrong does not move the difference: the paired error is much smaller than two independent ones."""
    first, second = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    n = len(first)
    broken, fixed = int((first & ~second).sum()), int((~first & second).sum())
    nan = float("nan")
    if not n:
        return {"n": 0, "accuracy_first": nan, "accuracy_second": nan, "difference": nan, "paired_se": nan, "fixed": 0, "broken": 0}
    return {
        "n": n,
        "accuracy_first": float(first.mean()),
        "accuracy_second": float(second.mean()),
        "difference": float(second.mean() - first.mean()),
        "paired_se": math.sqrt(max(broken + fixed - (broken - fixed) ** 2 / n, 0.0)) / n,
        "fixed": fixed,
        "broken": broken,
    }


def majority_index(targets: np.ndarray, n_classes: int) -> int | None:
    """The most frequent class among ``targets >= 0`` (lowest index on ties), or None without any."""
    known = np.asarray(targets)[np.asarray(targets) >= 0]
    if len(known) == 0:
        return None
    return int(np.bincount(known, minlength=n_classes).argmax())


def attribute_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    n_classes: int,
    *,
    scores: np.ndarray | None = None,
    all_scores: np.ndarray | None = None,
    threshold: float = 0.0,
    majority: int | None = None,
) -> dict[str, Any]:
    """Numbers for one attribute over the scored rows (``y_true >= 0``, aligned ``y_pred``/``scores``).

    ``all_scores``: top scores of every decoded image (known target or not), for ``coverage``.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    known = y_true >= 0
    top_scores = None if scores is None else np.asarray(scores)[known]
    y_true, y_pred = y_true[known], y_pred[known]
    n = len(y_true)
    numbers = confusion_scores(confusion(y_true, y_pred, n_classes))
    nan = float("nan")
    out: dict[str, Any] = {"n": n, **{k: numbers[k] for k in ("accuracy", "macro_f1", "weighted_f1")}}
    out["majority_accuracy"] = float(np.mean(y_true == majority)) if majority is not None and n else nan
    out["n_classes"] = int(n_classes)
    out["n_classes_present"] = int(len(np.unique(y_true)))
    out["threshold"] = float(threshold)
    pool = all_scores if all_scores is not None else top_scores
    out["coverage"] = float(np.mean(np.asarray(pool) >= threshold)) if pool is not None and len(pool) else nan
    if top_scores is not None and n:
        covered = top_scores >= threshold
        out["n_covered"] = int(covered.sum())
        out["accuracy_covered"] = float(np.mean(y_true[covered] == y_pred[covered])) if covered.any() else nan
    else:
        out["n_covered"] = 0
        out["accuracy_covered"] = nan
    return out


def per_class(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]) -> list[dict[str, Any]]:
    """One row per vocabulary label: precision, recall, f1, support, predicted (rows predicted as it)."""
    numbers = confusion_scores(confusion(y_true, y_pred, len(labels)))
    return [
        {
            "label": label,
            "precision": float(numbers["precision"][i]),
            "recall": float(numbers["recall"][i]),
            # A class with no row and no prediction has no F1; one seen on either side and never right has 0.
            "f1": float(numbers["f1"][i]),
            "support": int(numbers["support"][i]),
            "predicted": int(numbers["predicted"][i]),
        }
        for i, label in enumerate(labels)
    ]


def split_metrics(probs: Mapping[str, np.ndarray], targets: np.ndarray) -> dict[str, dict[str, float | int]]:
    """Retrain's summary of a split: ``{attr: {accuracy, macro_f1, n}}`` over the rows whose value is
    known, from the probabilities ``{attr: (n, n_labels)}`` and targets ``(n, n_attr)``."""
    out: dict[str, dict[str, float | int]] = {}
    for j, (attr, p) in enumerate(probs.items()):
        m = attribute_metrics(targets[:, j], p.argmax(axis=1), p.shape[1])
        out[attr] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "n": m["n"]}
    return out


def majority_baseline(
    train_targets: np.ndarray, eval_targets: np.ndarray, labels: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, float | str]]:
    """Accuracy of always answering the most frequent training label: the floor a model must beat."""
    out: dict[str, dict[str, float | str]] = {}
    for j, (attr, names) in enumerate(labels.items()):
        majority = majority_index(train_targets[:, j], len(names))
        evaluated = eval_targets[:, j][eval_targets[:, j] >= 0]
        if majority is None or len(evaluated) == 0:
            out[attr] = {"label": "", "accuracy": float("nan")}
            continue
        out[attr] = {"label": names[majority], "accuracy": float((evaluated == majority).mean())}
    return out


def calibrate_threshold(top_scores: np.ndarray, correct: np.ndarray, target_precision: float = DEFAULT_TARGET_PRECISION) -> float:
    """The review threshold for one attribute, from validation predictions.

    Rule: sort predictions by top-label score, highest first; take the largest set "score >= t" whose
    precision (share of correct top labels) is still at least ``target_precision``; ``t`` lies strictly
    between that set's lowest score and the next lower validation score (halfway), or
    :data:`THRESHOLD_MARGIN` under the lowest validation score when the whole set is accepted. Tags
    scoring under ``t`` go to human review.

    - Strictly between, not on a score: a row that sat exactly on ``t`` would flip across it with the
      last-bit jitter of another batch size or precision; halfway is as far from both rows as it gets.
    - Precision is measured on the whole accepted set, not per score bin, so a noisy dip inside it is fine.
    - If not even the single most confident prediction set reaches the target, ``t`` is 1.0 (review all).
    - Ties: a cut never separates predictions with the same score, since ``t`` accepts all of them.
    """
    if len(top_scores) == 0:
        return 1.0
    order = np.argsort(-top_scores, kind="stable")
    ranked = top_scores[order].astype(np.float64)
    hits = correct[order].astype(np.float64)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    end_of_tie = np.r_[ranked[1:] != ranked[:-1], True]
    ok = np.nonzero((precision >= target_precision) & end_of_tie)[0]
    if len(ok) == 0:
        return 1.0
    last = ok[-1]
    if last + 1 < len(ranked):
        threshold = (ranked[last] + ranked[last + 1]) / 2
    else:
        threshold = ranked[last] - THRESHOLD_MARGIN
    return float(np.clip(threshold, 0.0, 1.0))


def calibrate_thresholds(
    probs: Mapping[str, np.ndarray], targets: np.ndarray, target_precision: float = DEFAULT_TARGET_PRECISION
) -> dict[str, float]:
    out: dict[str, float] = {}
    for j, (attr, p) in enumerate(probs.items()):
        known = targets[:, j] >= 0
        out[attr] = calibrate_threshold(p[known].max(axis=1), p[known].argmax(axis=1) == targets[known, j], target_precision)
    return out


def coverage(probs: Mapping[str, np.ndarray], thresholds: Mapping[str, float]) -> dict[str, float]:
    """Share of predictions at or above each attribute's threshold (tagged without review)."""
    return {attr: float((p.max(axis=1) >= thresholds[attr]).mean()) if len(p) else 0.0 for attr, p in probs.items()}
