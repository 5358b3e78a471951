"""Label strings from styles.csv -> the bundle's class indices, the way retrain turned them into targets.

Retrain (``tagger.training.labels``) folds labels rarer than ``min_label_count`` into ``Other``, or,
when all of them together would still be too rare, masks them (unknown); the bundle's training facts
record which labels went where (``training.data.folded`` / ``folded_into``). Evaluation mirrors that,
so the bundle's own test split is scored on exactly the targets it was trained and tested with:

- a label in the vocabulary -> its class;
- a label retrain folded into ``Other`` -> ``Other``; one it masked -> excluded (counted as ``masked``);
- an empty cell -> excluded (``missing``), as in training;
- a label the bundle has never heard of (external data) -> excluded and counted as ``unknown_label``,
  or, with ``unknown_labels="other"`` and an ``Other`` class in the vocabulary, scored as ``Other``
  (what the model is meant to answer for "none of the labels I know").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

OTHER = "Other"  # the spelling tagger.training.labels uses; kept here so this module stays import-light
UNKNOWN_LABEL_POLICIES: tuple[str, ...] = ("exclude", "other")


@dataclass
class LabelMapping:
    """How one attribute's cells became targets."""

    attribute: str
    known: int = 0  # cells scored on a class of the vocabulary (folded ones included)
    missing: int = 0  # empty cells: unknown, excluded
    folded: Counter = field(default_factory=Counter)  # rare label -> rows scored as Other (retrain folded it)
    masked: Counter = field(default_factory=Counter)  # rare label -> rows excluded (retrain masked it)
    unknown: Counter = field(default_factory=Counter)  # label not in the bundle -> rows
    unknown_as_other: bool = False  # whether the unknown rows were scored as Other (else excluded)

    @property
    def n_folded(self) -> int:
        return sum(self.folded.values())

    @property
    def n_masked(self) -> int:
        return sum(self.masked.values())

    @property
    def n_unknown(self) -> int:
        return sum(self.unknown.values())


def folding_facts(training: Mapping[str, Any]) -> tuple[dict[str, set[str]], dict[str, str]]:
    """``(folded labels per attribute, "Other" | "unknown" per attribute)`` from a bundle's training facts."""
    data = training.get("data") if isinstance(training, Mapping) else None
    if not isinstance(data, Mapping):
        return {}, {}
    folded = data.get("folded") or {}
    into = data.get("folded_into") or {}
    return (
        {str(a): set(map(str, labels)) for a, labels in folded.items() if isinstance(labels, (Mapping, list))},
        {str(a): str(v) for a, v in into.items()},
    )


def encode_labels(
    columns: Mapping[str, Sequence[str | None]],
    vocab: Mapping[str, Sequence[str]],
    training: Mapping[str, Any] | None = None,
    unknown_labels: str = "exclude",
) -> tuple[np.ndarray, dict[str, LabelMapping]]:
    """``(targets (n, n_attr) int64 with -1 = excluded, {attr: LabelMapping})`` for ``vocab``'s attributes."""
    if unknown_labels not in UNKNOWN_LABEL_POLICIES:
        raise ValueError(f"unknown_labels must be one of {', '.join(UNKNOWN_LABEL_POLICIES)}, got {unknown_labels!r}")
    folded, folded_into = folding_facts(training or {})
    n = len(next(iter(columns.values()))) if columns else 0
    targets = np.full((n, len(vocab)), -1, dtype=np.int64)
    mappings: dict[str, LabelMapping] = {}
    for j, (attr, labels) in enumerate(vocab.items()):
        index = {label: i for i, label in enumerate(labels)}
        other = index.get(OTHER)
        rare = folded.get(attr, set())
        rare_to_other = folded_into.get(attr) == OTHER and other is not None
        mapping = LabelMapping(attr, unknown_as_other=unknown_labels == "other" and other is not None)
        values = columns.get(attr)
        if values is None:
            mapping.missing = n
            mappings[attr] = mapping
            continue
        for row, value in enumerate(values):
            if value is None or value == "":
                mapping.missing += 1
            elif value in index:
                targets[row, j] = index[value]
            elif value in rare:
                if rare_to_other:
                    targets[row, j] = other
                    mapping.folded[value] += 1
                else:
                    mapping.masked[value] += 1
            else:
                mapping.unknown[value] += 1
                if mapping.unknown_as_other:
                    targets[row, j] = other
        mapping.known = int((targets[:, j] >= 0).sum())
        mappings[attr] = mapping
    return targets, mappings
