"""Per-attribute and per-class numbers, computed with scikit-learn on class indices.

Definitions (the same as retrain's torchmetrics, so a bundle's own test split reproduces the
``training.metrics.test`` numbers in its model.json):

- ``accuracy``: share of scored rows whose top label is right (micro).
- ``macro_f1``: unweighted mean F1 over the classes that occur in the targets *or* the predictions
  (a class that is neither cannot be measured; one that is only predicted counts with F1 0).
- ``weighted_f1``: F1 averaged with class support as weights.
- ``majority_accuracy``: accuracy of always answering the majority label (the floor to beat).
- ``coverage``: share of decoded images whose top score is at or above the attribute's review threshold
  (tagged without review, as in retrain's ``val_coverage``); ``accuracy_covered``: accuracy among them.
- per class: precision, recall, F1, support; NaN where undefined (precision of a class never
  predicted, recall of a class with no rows), never a silent 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def majority_index(targets: np.ndarray, n_classes: int) -> int | None:
    """The most frequent class among ``targets >= 0`` (lowest index on ties), or None without any."""
    known = targets[targets >= 0]
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
    from sklearn.metrics import accuracy_score, f1_score

    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    n = len(y_true)
    out: dict[str, Any] = {"n": n}
    nan = float("nan")
    if n:
        present = np.union1d(y_true, y_pred)
        out["accuracy"] = float(accuracy_score(y_true, y_pred))
        out["macro_f1"] = float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0))
        out["weighted_f1"] = float(f1_score(y_true, y_pred, labels=np.arange(n_classes), average="weighted", zero_division=0))
        out["majority_accuracy"] = float(np.mean(y_true == majority)) if majority is not None else nan
    else:
        out.update(accuracy=nan, macro_f1=nan, weighted_f1=nan, majority_accuracy=nan)
    out["n_classes"] = int(n_classes)
    out["n_classes_present"] = int(len(np.unique(y_true)))
    out["threshold"] = float(threshold)
    pool = all_scores if all_scores is not None else scores
    out["coverage"] = float(np.mean(pool >= threshold)) if pool is not None and len(pool) else nan
    if scores is not None and n:
        covered = np.asarray(scores) >= threshold
        out["n_covered"] = int(covered.sum())
        out["accuracy_covered"] = float(np.mean(y_true[covered] == y_pred[covered])) if covered.any() else nan
    else:
        out["n_covered"] = 0
        out["accuracy_covered"] = nan
    return out


def per_class(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]) -> list[dict[str, Any]]:
    """One row per vocabulary label: precision, recall, f1, support, predicted (rows predicted as it)."""
    from sklearn.metrics import precision_recall_fscore_support

    classes = np.arange(len(labels))
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if len(y_true):
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=classes, zero_division=np.nan
        )
    else:
        precision = recall = f1 = np.full(len(labels), np.nan)
        support = np.zeros(len(labels), dtype=np.int64)
    predicted = np.bincount(y_pred[y_pred >= 0], minlength=len(labels)) if len(y_pred) else np.zeros(len(labels), int)
    return [
        {
            "label": label,
            "precision": _float(precision[i]),
            "recall": _float(recall[i]),
            "f1": _float(f1[i]),
            "support": int(support[i]),
            "predicted": int(predicted[i]),
        }
        for i, label in enumerate(labels)
    ]


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts, rows = true class, columns = predicted class."""
    from sklearn.metrics import confusion_matrix

    if len(y_true) == 0:
        return np.zeros((n_classes, n_classes), dtype=np.int64)
    return confusion_matrix(y_true, y_pred, labels=np.arange(n_classes)).astype(np.int64)


def _float(value: Any) -> float:
    value = float(value)
    return value if math.isfinite(value) else float("nan")
