"""Seeded train/val/test split, stratified on every attribute at once, saved with the bundle.

Stratifying on one attribute (say articleType) leaves the others to chance, and with rare colours or
seasons a 10 % test split can end up with none of them. Iterative stratification (Sechidis et al.,
2011, via ``iterstrat``) balances the one-hot matrix of *all* attributes jointly.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from .kaggle import DataError

SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_FILE = "split.parquet"


def one_hot(targets: np.ndarray, label_counts: Sequence[int]) -> np.ndarray:
    """(n, sum(label_counts)) bool matrix; an unknown value (-1) sets no column of its attribute."""
    n = targets.shape[0]
    out = np.zeros((n, int(sum(label_counts))), dtype=bool)
    offset = 0
    for j, count in enumerate(label_counts):
        known = targets[:, j] >= 0
        out[np.nonzero(known)[0], offset + targets[known, j]] = True
        offset += count
    return out


def stratified_split(
    targets: np.ndarray,
    label_counts: Sequence[int],
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """Index into :data:`SPLITS` (0 train, 1 val, 2 test) for every row of ``targets``.

    Two seeded passes: test off the whole, then val off the rest, each stratified on all attributes.
    The same targets, fractions and seed always give the same assignment.
    """
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    n = targets.shape[0]
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction and test_fraction must be in (0, 1) with a sum under 1, got {val_fraction}, {test_fraction}")
    n_test = round(n * test_fraction)
    n_val = round(n * val_fraction)
    if min(n_test, n_val, n - n_test - n_val) < 1:
        raise DataError(
            f"{n} usable rows are too few for a {1 - val_fraction - test_fraction:.0%}/{val_fraction:.0%}/"
            f"{test_fraction:.0%} split; every split needs at least one row"
        )
    y = one_hot(targets, label_counts)
    assignment = np.zeros(n, dtype=np.int8)
    rest, test = next(MultilabelStratifiedShuffleSplit(n_splits=1, test_size=n_test, random_state=seed).split(np.zeros(n), y))
    assignment[test] = 2
    _, val = next(
        MultilabelStratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=seed + 1).split(np.zeros(len(rest)), y[rest])
    )
    assignment[rest[val]] = 1
    return assignment


def split_table(ids: Sequence[str] | np.ndarray, assignment: np.ndarray) -> pa.Table:
    names = pa.array(np.asarray(SPLITS)[assignment].tolist(), pa.string())
    return pa.table({"id": pa.array([str(i) for i in ids], pa.string()), "split": names})


def write_split(url: str, ids: Sequence[str] | np.ndarray, assignment: np.ndarray, storage_options: Mapping[str, Any] | None = None) -> None:
    """``id -> split`` as Parquet, committed whole (a reader never sees half a file)."""
    buffer = io.BytesIO()
    pq.write_table(split_table(ids, assignment), buffer)
    storage.write_bytes(url, buffer.getvalue(), storage_options)


def read_split(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """``{id: "train" | "val" | "test"}`` from a bundle's split.parquet."""
    table = pq.read_table(io.BytesIO(storage.read_bytes(url, storage_options)))
    return dict(zip(table.column("id").to_pylist(), table.column("split").to_pylist()))
