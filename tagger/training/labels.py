"""Label vocabularies: folding rare labels, and turning label strings into class indices.

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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from .kaggle import DataError

OTHER = "Other"
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
    out = np.full((table.height, len(vocab)), -1, dtype=np.int64)
    for j, (attr, labels) in enumerate(vocab.items()):
        index = {label: i for i, label in enumerate(labels)}
        out[:, j] = table[attr].replace_strict(index, default=-1, return_dtype=pl.Int64).fill_null(-1).to_numpy()
    return out
