"""Label vocabularies: folding rare labels, and turning label strings into class indices, for retrain and evaluate.

Rare labels go into an explicit ``Other`` bucket rather than being masked out (unknown):

* The tag job must say *something* for every product. A model that never saw "Free Items" as a
  possibility would put such a product into a frequent class, often confidently; with ``Other`` it
  can say "none of the labels I know", which is honest and goes to review.
* Evaluation then covers the whole population: masking the rare rows would silently drop them from
  val/test and make the metrics look better than what the catalog will get.
* Masking keeps the rest of the row (the other attributes still train), but so does ``Other``.

The exception: when everything folded for an attribute adds up to fewer than ``min_count`` rows, an
``Other`` class would itself be too rare to learn (it would only add a near-zero F1 to the macro
average), so those values are masked out (unknown) instead. The report says which happened.

If the data already has a label spelled ``Other``, the rare labels join it.

:func:`encode_labels` is the one way from label strings to targets. Retrain calls it on its folded
table (:func:`encode_targets`); evaluate calls it on raw ``styles.csv`` cells with the bundle's training
facts (``training.data.folded`` / ``folded_into``), so that the bundle's own test split is scored on
exactly the targets it was trained and tested with:

- a label in the vocabulary -> its class;
- a label retrain folded into ``Other`` -> ``Other``; one it masked -> excluded (counted as ``masked``);
- an empty cell -> excluded (``missing``), as in training;
- a label the bundle has never heard of (external data) -> excluded and counted as ``unknown_label``,
  or, with ``unknown_labels="other"`` and an ``Other`` class in the vocabulary, scored as ``Other``
  (what the model is meant to answer for "none of the labels I know").
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from .kaggle import DataError

OTHER = "Other"
UNKNOWN_LABEL_POLICIES: tuple[str, ...] = ("exclude", "other")
# The full Kaggle data has 44,424 usable rows; 500 there keeps ~25 articleTypes and folds the long tail
# (143 types, many with a handful of images) that the model could not learn and macro-F1 would punish.
FULL_DATA_ROWS = 44_424
FULL_DATA_MIN_COUNT = 500
# Below ~5 examples a label cannot appear in all three splits and has no usable validation signal.
MIN_COUNT_FLOOR = 5


def resolve_min_label_count(spec: int | str, n_rows: int) -> int:
    """``auto`` -> 500 scaled by ``n_rows / 44,424`` (the full data set), at least 5; an int as given.

    Scaling keeps the *share* a label needs constant (~1.1 % of rows), so a subsample folds roughly
    the same labels as the full data instead of folding nearly everything.
    """
    if isinstance(spec, str):
        if spec.strip().lower() != "auto":
            raise ValueError(f"min_label_count must be 'auto' or a positive integer, got {spec!r}")
        return max(MIN_COUNT_FLOOR, math.ceil(FULL_DATA_MIN_COUNT * n_rows / FULL_DATA_ROWS))
    if isinstance(spec, bool) or not isinstance(spec, int) or spec < 1:
        raise ValueError(f"min_label_count must be 'auto' or a positive integer, got {spec!r}")
    return spec


@dataclass(frozen=True)
class FoldResult:
    table: pl.DataFrame
    folded: dict[str, dict[str, int]]  # attr -> {rare label: rows}; only attributes that folded anything
    folded_into: dict[str, str]  # attr -> "Other" or "unknown"


def fold_rare_labels(table: pl.DataFrame, attributes: Sequence[str], min_count: int) -> FoldResult:
    """Replace labels with fewer than ``min_count`` rows by ``Other`` (or null; see the module doc)."""
    folded: dict[str, dict[str, int]] = {}
    folded_into: dict[str, str] = {}
    replacements = []
    for attr in attributes:
        counts = _value_counts(table[attr])
        rare = {label: n for label, n in counts.items() if n < min_count and label != OTHER}
        if not rare:
            continue
        total = sum(rare.values()) + counts.get(OTHER, 0)
        target = OTHER if total >= min_count else None
        folded[attr] = dict(sorted(rare.items(), key=lambda kv: (-kv[1], kv[0])))
        folded_into[attr] = OTHER if target else "unknown"
        is_rare = pl.col(attr).is_in(list(rare))
        replacements.append(pl.when(is_rare).then(pl.lit(target, dtype=pl.Utf8)).otherwise(pl.col(attr)).alias(attr))
    if replacements:
        table = table.with_columns(replacements)
    return FoldResult(table, folded, folded_into)


def _value_counts(column: pl.Series) -> dict[str, int]:
    counts = column.drop_nulls().value_counts()
    return dict(zip(counts[column.name].to_list(), counts["count"].to_list()))


def label_counts(table: pl.DataFrame, attributes: Sequence[str]) -> dict[str, dict[str, int]]:
    """``{attr: {label: rows}}``, most frequent first: what retrain logs and records in the bundle."""
    return {attr: dict(sorted(_value_counts(table[attr]).items(), key=lambda kv: (-kv[1], kv[0]))) for attr in attributes}


def check_label_counts(counts: Mapping[str, Mapping[str, int]], n_rows: int, min_count: int,
                       sources: Sequence[Mapping[str, Any]] = ()) -> None:
    """Refuse an attribute with fewer than ``min_count`` labelled rows: its head could not learn and its
    validation numbers would be noise. The message names the attribute, its count and what to do."""
    for attr, labels in counts.items():
        labelled = sum(labels.values())
        if labelled >= max(1, min_count):
            continue
        without = [str(s.get("source")) for s in sources if attr not in (s.get("labelled") or {}) or not s["labelled"][attr]]
        where = f"; no labels for it in {', '.join(without)}" if without else ""
        raise DataError(
            f"attribute {attr!r} has {labelled} labelled row(s) of {n_rows} (at least {max(1, min_count)} needed, "
            f"--min-label-count){where}. Label more rows, lower --min-label-count, or leave out --attribute {attr}"
        )


def check_label_variety(counts: Mapping[str, Mapping[str, int]]) -> None:
    """Refuse an attribute whose labelled rows hold one class only (one label, or every label folded into
    ``Other``): a head cannot learn to tell one class from nothing, and the stratified split and the metrics
    fail on it after minutes of work."""
    for attr, labels in counts.items():
        present = [label for label, rows in labels.items() if rows > 0]
        if len(present) == 1:
            how = (" (every rarer label was folded into it: fewer than --min-label-count rows each)" if present[0] == OTHER
                   else "")
            raise DataError(
                f"attribute {attr!r} has one class only, {present[0]!r}{how}: there is nothing to tell apart. Label rows "
                f"with other values, lower --min-label-count, or leave out --attribute {attr}"
            )


def build_vocabularies(table: pl.DataFrame, attributes: Sequence[str]) -> dict[str, list[str]]:
    """Labels per attribute, sorted (deterministic class indices for the same data), ``Other`` last.
    Every attribute needs at least one label: a head with no class cannot be built."""
    vocab: dict[str, list[str]] = {}
    for attr in attributes:
        present = set(table[attr].drop_nulls().to_list())
        labels = sorted(present - {OTHER}) + ([OTHER] if OTHER in present else [])
        if not labels:
            raise DataError(
                f"attribute {attr!r} has no known value in any usable row of styles.csv; "
                "fill the column or check that the file is the Kaggle styles.csv"
            )
        vocab[attr] = labels
    return vocab


def encode_targets(table: pl.DataFrame, vocab: Mapping[str, Sequence[str]]) -> np.ndarray:
    """(n_rows, n_attributes) int64 class indices; -1 where the value is unknown or not in ``vocab``."""
    columns = {attr: table[attr].to_list() for attr in vocab if attr in table.columns}
    return encode_labels(columns, vocab, n_rows=table.height)[0]


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
    *,
    n_rows: int | None = None,
) -> tuple[np.ndarray, dict[str, LabelMapping]]:
    """``(targets (n, n_attr) int64 with -1 = excluded, {attr: LabelMapping})`` for ``vocab``'s attributes.

    ``training``: a bundle's training facts, to fold labels as retrain folded them (none: no folding).
    An attribute missing from ``columns`` is all ``missing``; ``n_rows`` sizes the result when no
    column is given.
    """
    if unknown_labels not in UNKNOWN_LABEL_POLICIES:
        raise ValueError(f"unknown_labels must be one of {', '.join(UNKNOWN_LABEL_POLICIES)}, got {unknown_labels!r}")
    folded, folded_into = folding_facts(training or {})
    n = n_rows if n_rows is not None else len(next(iter(columns.values()))) if columns else 0
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
