"""Scoring a trained net on a split: per-attribute metrics, the majority baseline, review thresholds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from ..model import TaggerNet

DEFAULT_TARGET_PRECISION = 0.9


@torch.no_grad()
def predict(net: TaggerNet, loader: DataLoader, device: str | torch.device = "cpu") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Softmax probabilities per attribute ``{attr: (n, n_labels) float32}`` and the targets ``(n, n_attr)``."""
    was_training = net.training
    net.eval().to(device)
    probs: dict[str, list[np.ndarray]] = {}
    targets: list[np.ndarray] = []
    try:
        for images, batch_targets in loader:
            if images.shape[0] == 0:
                continue
            logits = net(images.to(device, non_blocking=True))
            for attr, value in logits.items():
                probs.setdefault(attr, []).append(value.float().softmax(dim=1).cpu().numpy())
            targets.append(batch_targets.numpy())
    finally:
        net.train(was_training)
    if not targets:
        raise ValueError("no image of this split could be decoded; nothing to evaluate")
    return {attr: np.concatenate(v) for attr, v in probs.items()}, np.concatenate(targets)


def attribute_metrics(probs: Mapping[str, np.ndarray], targets: np.ndarray) -> dict[str, dict[str, float | int]]:
    """``{attr: {accuracy, macro_f1, n}}`` over the rows whose value is known; the same definitions as
    the module's torchmetrics (micro accuracy, macro-F1 over the classes that occur)."""
    out: dict[str, dict[str, float | int]] = {}
    for j, (attr, p) in enumerate(probs.items()):
        preds = torch.from_numpy(p.argmax(axis=1))
        target = torch.from_numpy(targets[:, j])
        classes = max(2, p.shape[1])
        known = int((target >= 0).sum())
        out[attr] = {
            "accuracy": float(multiclass_accuracy(preds, target, classes, average="micro", ignore_index=-1)) if known else float("nan"),
            "macro_f1": float(multiclass_f1_score(preds, target, classes, average="macro", ignore_index=-1)) if known else float("nan"),
            "n": known,
        }
    return out


def majority_baseline(
    train_targets: np.ndarray, eval_targets: np.ndarray, labels: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, float | str]]:
    """Accuracy of always answering the most frequent training label: the floor a model must beat."""
    out: dict[str, dict[str, float | str]] = {}
    for j, (attr, names) in enumerate(labels.items()):
        train = train_targets[:, j][train_targets[:, j] >= 0]
        evaluated = eval_targets[:, j][eval_targets[:, j] >= 0]
        if len(train) == 0 or len(evaluated) == 0:
            out[attr] = {"label": "", "accuracy": float("nan")}
            continue
        majority = int(np.bincount(train, minlength=len(names)).argmax())
        out[attr] = {"label": names[majority], "accuracy": float((evaluated == majority).mean())}
    return out


def calibrate_threshold(top_scores: np.ndarray, correct: np.ndarray, target_precision: float = DEFAULT_TARGET_PRECISION) -> float:
    """The review threshold for one attribute, from validation predictions.

    Rule: sort predictions by top-label score, highest first; take the largest set "score >= t" whose
    precision (share of correct top labels) is still at least ``target_precision``; return its
    lowest score ``t``. Tags scoring under ``t`` go to human review.

    - Precision is measured on the whole accepted set, not per score bin, so a noisy dip inside it is fine.
    - ``t`` is never below the lowest validation score: under it there is no evidence at all.
    - If not even the single most confident prediction set reaches the target, ``t`` is 1.0 (review all).
    - Ties: a cut never separates predictions with the same score, since ``t`` accepts all of them.
    """
    if len(top_scores) == 0:
        return 1.0
    order = np.argsort(-top_scores, kind="stable")
    scores = top_scores[order].astype(np.float64)
    hits = correct[order].astype(np.float64)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    end_of_tie = np.r_[scores[1:] != scores[:-1], True]
    ok = np.nonzero((precision >= target_precision) & end_of_tie)[0]
    if len(ok) == 0:
        return 1.0
    return float(np.clip(scores[ok[-1]], 0.0, 1.0))


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
