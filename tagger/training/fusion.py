"""Fitting the decision-level fusion (:mod:`tagger.model.fusion`) on validation rows, never test rows.

Per attribute, on the validation rows that have both a photo and text:

1. the weights: ``photo_weight``, ``text_weight`` and ``prior_weight`` on a grid, the combination with the lowest
   mean negative log-likelihood (the grid's corners include each modality alone);
2. the rule: ``fused`` unless one modality alone was strictly more accurate on these rows than the fused tags
   (then that modality: fusing must not cost a catalog with titles what either input alone gets right);
3. the review thresholds per input mode (``text``: the text model's scores alone; ``both``: the fused scores),
   by retrain's own rule (:func:`tagger.metrics.calibrate_threshold`); ``photos`` stays the
   bundle's own threshold;
4. the conflict levels: per modality, the score above which its top label was right at least
   ``conflict_precision`` of the time on validation (1.01, never, when no level gets there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..metrics import calibrate_threshold
from ..model.fusion import AttributeFusion, Fusion

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
PRIOR_WEIGHTS = (0.0, -0.25, -0.5, -0.75, -1.0)
CONFLICT_PRECISION = 0.97
NEVER = 1.01


def label_prior(targets: np.ndarray, n_labels: int) -> tuple[float, ...]:
    """The labels' shares among known targets, smoothed by one count each (no label has share 0)."""
    known = targets[targets >= 0]
    counts = np.bincount(known, minlength=n_labels).astype(np.float64) + 1.0
    return tuple(float(v) for v in counts / counts.sum())


def _nll(probs: np.ndarray, target: np.ndarray) -> float:
    return float(-np.log(np.maximum(probs[np.arange(len(target)), target], 1e-12)).mean())


def fit_attribute(name: str, photo: np.ndarray, text: np.ndarray, target: np.ndarray, prior: Sequence[float],
                  target_precision: float, conflict_precision: float = CONFLICT_PRECISION) -> tuple[AttributeFusion, dict[str, Any]]:
    """One attribute's fusion from validation rows with both inputs (``target`` -1: unknown, not used)."""
    known = target >= 0
    p, t, y = photo[known], text[known], target[known]
    best: tuple[float, AttributeFusion] | None = None
    for a in WEIGHTS:
        for b in WEIGHTS:
            if a == 0 and b == 0:
                continue
            for c in PRIOR_WEIGHTS:
                spec = AttributeFusion(name, "fused", a, b, c, tuple(prior))
                loss = _nll(spec.combine(p, t), y)
                if best is None or loss < best[0] - 1e-9:
                    best = (loss, spec)
    assert best is not None
    fused = best[1]
    accuracy = {"fused": float((fused.combine(p, t).argmax(1) == y).mean()), "text": float((t.argmax(1) == y).mean()),
                "photos": float((p.argmax(1) == y).mean())}
    rule = "fused"
    for single in ("text", "photos"):
        if accuracy[single] > accuracy[rule]:
            rule = single
    chosen = AttributeFusion(name, rule, fused.photo_weight, fused.text_weight, fused.prior_weight, fused.prior)
    both = chosen.combine(p, t)
    thresholds = {
        "text": calibrate_threshold(t.max(1), t.argmax(1) == y, target_precision),
        "both": calibrate_threshold(both.max(1), both.argmax(1) == y, target_precision),
    }
    conflict_photos = _level(p, y, conflict_precision)
    conflict_text = _level(t, y, conflict_precision)
    spec = AttributeFusion(name, rule, fused.photo_weight, fused.text_weight, fused.prior_weight, fused.prior, thresholds,
                           conflict_photos, conflict_text)
    facts = {"val_rows": int(known.sum()), "val_accuracy": {k: round(v, 4) for k, v in accuracy.items()},
             "val_nll_fused": round(best[0], 4)}
    return spec, facts


def _level(probs: np.ndarray, target: np.ndarray, precision: float) -> float:
    level = calibrate_threshold(probs.max(1), probs.argmax(1) == target, precision)
    return NEVER if level >= 1.0 else level


def fit_fusion(photo: Mapping[str, np.ndarray], text: Mapping[str, np.ndarray], targets: np.ndarray,
               priors: Mapping[str, Sequence[float]], target_precision: float = 0.9,
               conflict_precision: float = CONFLICT_PRECISION) -> tuple[Fusion, dict[str, Any]]:
    """The fusion of every attribute (in ``photo``'s order) from validation rows that have both inputs."""
    specs, facts = [], {}
    for j, name in enumerate(photo):
        spec, fact = fit_attribute(name, np.asarray(photo[name]), np.asarray(text[name]), targets[:, j], priors[name],
                                   target_precision, conflict_precision)
        specs.append(spec)
        facts[name] = fact
    return Fusion(tuple(specs)), {"target_precision": target_precision, "conflict_precision": conflict_precision,
                                  "weights_grid": list(WEIGHTS), "prior_weights_grid": list(PRIOR_WEIGHTS), "attributes": facts}


def add_text_part(config: Any, dm: Any, bundle: Any, scores: Any) -> Any:
    """retrain --text-column: the text model fitted on the train rows' text, the fusion on the val rows (whose photo
    probabilities retrain just scored), both written into the bundle beside its untouched image model."""
    import logging

    from ..model.bundle import load_bundle
    from ..model.text import TextFeaturizer, fit_text_model, write_text_part

    log = logging.getLogger(__name__)
    featurizer = TextFeaturizer(tuple(config.text_columns))
    texts = featurizer.rows_text(dm.texts, len(dm.ids))
    attributes = [(a.name, len(a.labels)) for a in bundle.attributes]
    train = dm.rows("train")
    model = fit_text_model([texts[i] for i in train], dm.targets[train], attributes, featurizer, seed=config.seed).stored()
    # The val photos retrain scored: its val rows in loader order, less the photos that failed to decode.
    failed = dm.failed.numpy()
    val = np.asarray([i for i in dm.rows("val") if not failed[i]])
    names = [name for name, _ in attributes]
    if len(val) != len(scores.val_targets) or not np.array_equal(dm.targets[val], scores.val_targets):
        raise RuntimeError("retrain --text-column: the scored val rows do not line up with the data's; no text model written")
    text, present = model.probabilities([texts[i] for i in val])
    priors = {name: label_prior(dm.targets[train, j], k) for j, (name, k) in enumerate(attributes)}
    both = present
    fusion, facts = fit_fusion({a: scores.val_probs[a][both] for a in names}, {a: text[a][both] for a in names},
                               scores.val_targets[both], priors, target_precision=config.target_precision)
    test = np.asarray([i for i in dm.rows("test") if not failed[i]])
    metrics = {}
    if len(test) == len(scores.test_targets):
        test_text, test_present = model.probabilities([texts[i] for i in test])
        fused = fusion.combine(scores.test_probs, np.ones(len(test), bool), test_text, test_present)
        for j, name in enumerate(names):
            known = scores.test_targets[:, j] >= 0
            y = scores.test_targets[known, j]
            metrics[name] = {"n": int(known.sum()), **{k: round(float((p[known].argmax(1) == y).mean()), 4) if len(y) else None
                                                        for k, p in (("photos", scores.test_probs[name]),
                                                                     ("text", np.nan_to_num(test_text[name], nan=-1.0)),
                                                                     ("both", fused.probs[name]))}}
    write_text_part(config.out, model, fusion, config.storage_options, fusion_training=facts, metrics={"test": metrics},
                    made_by="tagger retrain --text-column " + " --text-column ".join(config.text_columns))
    for name, m in metrics.items():
        log.info("test %s: photos %s, text %s, both %s (%d rows)", name, m["photos"], m["text"], m["both"], m["n"])
    return load_bundle(config.out, config.storage_options)
