"""``tagger evaluate --baseline BUNDLE``: two models on the same rows, attribute by attribute.

Per attribute both bundles have, over the rows both decoded and both have a label for: each model's accuracy with its
standard error, the difference, its paired standard error (:func:`tagger.metrics.paired_difference`: the
rows are the same, so only the rows that changed move the difference), and how many rows each got right that the other
did not. Each model is scored against its own encoding of the labels (its folded labels, its Other), as its own
report scores it; a null tag (out of an attribute's scope) is not right. The changed rows are listed one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..metrics import accuracy_se, paired_difference

COMPARISON_SCHEMA = pa.schema([
    ("attribute", pa.string()),
    ("n", pa.int64()),  # rows both models decoded and both have a label for
    ("accuracy", pa.float64()),  # this model's
    ("accuracy_se", pa.float64()),
    ("baseline_accuracy", pa.float64()),
    ("baseline_accuracy_se", pa.float64()),
    ("difference", pa.float64()),  # accuracy - baseline_accuracy
    ("paired_se", pa.float64()),  # its paired standard error
    ("fixed", pa.int64()),  # rows only this model got right
    ("broken", pa.int64()),  # rows only the baseline got right
    ("changed", pa.int64()),  # rows whose tag differs between the two
])
CHANGED_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("attribute", pa.string()),
    ("target", pa.string()),
    ("prediction", pa.string()),
    ("baseline_prediction", pa.string()),
    ("change", pa.string()),  # fixed | broken | both wrong | both right (another label for the same folded target)
])


@dataclass
class Comparison:
    baseline: str  # the baseline bundle's path
    baseline_version: str
    table: pa.Table  # COMPARISON_SCHEMA
    changed: pa.Table  # CHANGED_SCHEMA
    notes: list[str]


def _per_row(evaluation) -> dict[str, dict[str, Any]]:
    """attribute -> {id: (target label, predicted label or None)} over the decoded rows with a label."""
    out = {}
    for j, attr in enumerate(evaluation.attributes):
        index, target = evaluation.top_index[attr.name], evaluation.targets[:, j]
        rows = {}
        for i, row_id in enumerate(evaluation.ids):
            if evaluation.ok[i] and target[i] >= 0:
                rows[row_id] = (attr.labels[target[i]], attr.labels[index[i]] if index[i] >= 0 else None)
        out[attr.name] = rows
    return out


def compare(evaluation, baseline) -> Comparison:
    """``evaluation`` against ``baseline``: two :class:`tagger.evaluation.evaluate.Evaluation` of the same rows."""
    ours, theirs = _per_row(evaluation), _per_row(baseline)
    notes = []
    shared = [a for a in ours if a in theirs]
    only = sorted(set(ours) ^ set(theirs))
    if only:
        notes.append(f"attributes in one bundle only, not compared: {', '.join(only)}")
    rows, changed = [], []
    for attr in shared:
        ids = [i for i in ours[attr] if i in theirs[attr]]
        right = np.array([ours[attr][i][1] == ours[attr][i][0] for i in ids], dtype=bool)
        base_right = np.array([theirs[attr][i][1] == theirs[attr][i][0] for i in ids], dtype=bool)
        paired = paired_difference(base_right, right)
        n_changed = 0
        for k, row_id in enumerate(ids):
            target, prediction = ours[attr][row_id]
            base_prediction = theirs[attr][row_id][1]
            if prediction == base_prediction:
                continue
            n_changed += 1
            change = ("fixed" if right[k] and not base_right[k] else "broken" if base_right[k] and not right[k]
                      else "both right" if right[k] else "both wrong")
            changed.append({"id": row_id, "attribute": attr, "target": target, "prediction": prediction,
                            "baseline_prediction": base_prediction, "change": change})
        rows.append({
            "attribute": attr, "n": paired["n"],
            "accuracy": paired["accuracy_second"], "accuracy_se": accuracy_se(paired["accuracy_second"], paired["n"]),
            "baseline_accuracy": paired["accuracy_first"], "baseline_accuracy_se": accuracy_se(paired["accuracy_first"], paired["n"]),
            "difference": paired["difference"], "paired_se": paired["paired_se"],
            "fixed": paired["fixed"], "broken": paired["broken"], "changed": n_changed,
        })
    return Comparison(
        baseline=baseline.config.model, baseline_version=baseline.bundle.model_version,
        table=pa.Table.from_pylist(rows, schema=COMPARISON_SCHEMA),
        changed=pa.Table.from_pylist(changed, schema=CHANGED_SCHEMA), notes=notes,
    )


def comparison_rows(comparison: Comparison) -> list[list[str]]:
    def pct(value: float, se: float | None = None) -> str:
        if value is None or value != value:
            return "–"
        return f"{100 * value:.1f}%" + (f" ±{100 * se:.1f}" if se is not None and se == se else "")

    out = []
    for r in comparison.table.to_pylist():
        diff = "–" if r["difference"] != r["difference"] else f"{100 * r['difference']:+.1f} ±{100 * r['paired_se']:.1f}"
        out.append([r["attribute"], str(r["n"]), pct(r["accuracy"], r["accuracy_se"]), pct(r["baseline_accuracy"], r["baseline_accuracy_se"]),
                    diff, str(r["fixed"]), str(r["broken"]), str(r["changed"])])
    return out


COMPARISON_HEADER = ["attribute", "n", "accuracy ±SE", "baseline ±SE", "difference ±paired SE", "fixed", "broken", "changed"]
COMPARISON_LEGEND = ("difference: this model's accuracy minus the baseline's, in points, ± its paired standard error "
                     "sqrt(b + c - (b - c)^2 / n) / n over the same rows (b: broken, right only in the baseline; c: fixed, "
                     "right only in this model); a difference within about two paired SEs may be noise. changed: rows "
                     "whose tag differs (changed_rows.parquet lists them).")
