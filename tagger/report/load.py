"""What the report reads: committed partitions as streamed Arrow batches, and the facts beside them.

Only partitions with ``_SUCCESS`` count, and only the part files it lists (as
:func:`tagger.tag.writers.read_complete_partition`); each part is read a batch at a time and only the
columns asked for, so a night of any size costs the memory of one batch.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..tag import writers
from ..tag.partition import Partition
from . import ReportError

log = logging.getLogger("tagger.report")


@dataclass(frozen=True)
class Night:
    """One complete run date: its ``_SUCCESS`` bodies, the run's plan and summary (None when absent)."""

    out: str
    run_date: str
    tags_success: dict[str, Any]
    errors_success: dict[str, Any] | None
    plan: dict[str, Any] | None
    summary: dict[str, Any] | None
    options: Mapping[str, Any]

    @property
    def tags(self) -> str:
        return writers.partition_url(self.out, "tags", self.run_date)

    @property
    def errors(self) -> str:
        return writers.partition_url(self.out, "errors", self.run_date)

    @property
    def run_id(self) -> str | None:
        return self.tags_success.get("run_id") or (self.plan or {}).get("run_id")

    @property
    def model_version(self) -> str | None:
        return self.tags_success.get("model_version") or (self.plan or {}).get("model_version")

    @property
    def computed(self) -> str | None:
        """What ran the model, in what arithmetic ("openvino bf16"), as the run summary recorded it: the shards'
        markers counted ("mixed: ..." where fan-out tasks on different CPUs computed differently), else the
        summarising process's runtime; None if not recorded."""
        counts = (self.summary or {}).get("computed")
        if isinstance(counts, Mapping) and counts:
            if len(counts) == 1:
                return str(next(iter(counts)))
            total = sum(counts.values()) or 1
            return "mixed: " + ", ".join(f"{name} ({n / total:.0%} of tagged rows)" for name, n in counts.items())
        runtime = ((self.summary or {}).get("this_process") or {}).get("runtime")
        if isinstance(runtime, Mapping) and runtime.get("name") and runtime.get("precision"):
            return f"{runtime['name']} {runtime['precision']}"
        return None

    @property
    def tag_rows(self) -> int:
        return int(self.tags_success.get("rows", 0))

    @property
    def error_rows(self) -> int:
        return int((self.errors_success or {}).get("rows", 0))

    def tags_schema(self) -> pa.Schema | None:
        for name in self.tags_success.get("parts", {}):
            fs, path = storage.filesystem(storage.join(self.tags, name), self.options)
            with fs.open(path, "rb") as handle:
                return pq.ParquetFile(handle).schema_arrow
        return None

    def attributes(self) -> list[str]:
        """The bundle's attributes, as the run's plan recorded them; without a plan, the tags columns that have a
        ``_score`` beside them (never a constant list: a bundle may tag any attribute set)."""
        if self.plan and self.plan.get("attributes"):
            return list(self.plan["attributes"])
        schema = self.tags_schema()
        names = schema.names if schema is not None else []
        return [n for n in names if f"{n}_score" in names]

    def iter_tags(self, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        yield from _iter_parts(self.tags, self.tags_success, columns, batch_rows, self.options)

    def error_types(self, batch_rows: int) -> Counter:
        counts: Counter = Counter()
        if self.errors_success is None:
            return counts
        for batch in _iter_parts(self.errors, self.errors_success, ["error_type"], batch_rows, self.options):
            counts.update(_value_counts(batch.column(0)))
        return counts


def _iter_parts(partition: str, success: Mapping[str, Any], columns: list[str], batch_rows: int,
                options: Mapping[str, Any]) -> Iterator[pa.RecordBatch]:
    for name in success.get("parts", {}):
        fs, path = storage.filesystem(storage.join(partition, name), options)
        with fs.open(path, "rb") as handle:
            part = pq.ParquetFile(handle)
            present = [c for c in columns if c in part.schema_arrow.names]
            yield from part.iter_batches(batch_size=batch_rows, columns=present)


def _value_counts(array: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    import pyarrow.compute as pc

    counted = pc.value_counts(array)
    # A null is no label: a scoped attribute's tag out of its scope (applies_when).
    return {value: int(count) for value, count in zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist())
            if value is not None}


def _read_json(url: str, options: Mapping[str, Any]) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(url, options))
    except FileNotFoundError:
        return None


def load_night(out: str, run_date: str, options: Mapping[str, Any]) -> Night | None:
    """The run date's complete partition, or None when its tags have no ``_SUCCESS``."""
    tags_success = writers.read_success(writers.partition_url(out, "tags", run_date), options)
    if tags_success is None:
        return None
    # The committed run's plan and summary: while a re-run replaces the date, the state folder's are that run's.
    partition = Partition(out, run_date, options)
    return Night(
        out=out, run_date=run_date, tags_success=tags_success,
        errors_success=writers.read_success(writers.partition_url(out, "errors", run_date), options),
        plan=partition.committed_state("plan.json", tags_success),
        summary=partition.committed_state("summary.json", tags_success),
        options=options,
    )


def run_dates(out: str, options: Mapping[str, Any]) -> list[str]:
    """Every run date that has a tags partition folder (complete or not), oldest first."""
    names = storage.list_files(storage.join(out, "tags"), options)
    return sorted(n.split("=", 1)[1] for n in names if n.startswith("run_date="))


def tonight(out: str, run_date: str, options: Mapping[str, Any]) -> Night:
    night = load_night(out, run_date, options)
    if night is None:
        dates = run_dates(out, options)
        if run_date in dates:
            raise ReportError(f"{writers.partition_url(out, 'tags', run_date)}: no {writers.SUCCESS_FILE}; the partition is "
                              "incomplete (a run is in progress or failed): report on it once `tagger tag` (or `tagger "
                              "finalize` after a fan-out) has succeeded")
        known = ", ".join(dates[-5:]) or "none"
        raise ReportError(f"{storage.join(out, 'tags')}: no partition run_date={run_date} (latest dates: {known}); "
                          "check --out and --run-date")
    return night


def previous_night(out: str, run_date: str, options: Mapping[str, Any], previous: str | None = None) -> Night | None:
    """The night to compare with: ``previous`` when named (it must be complete), else the latest complete run
    date before ``run_date``; None on the first night. Incomplete dates are skipped, as a reader must."""
    if previous is not None:
        night = load_night(out, previous, options)
        if night is None:
            raise ReportError(f"--previous {previous}: {writers.partition_url(out, 'tags', previous)} has no complete "
                              "partition; name a run date that succeeded, or leave --previous out")
        return night
    for date in reversed([d for d in run_dates(out, options) if d < run_date]):
        night = load_night(out, date, options)
        if night is not None:
            return night
        log.info("run_date=%s has no %s: skipped as the night before", date, writers.SUCCESS_FILE)
    return None


def report_of(out: str, run_date: str, options: Mapping[str, Any]) -> dict[str, Any] | None:
    """The report.json written for ``run_date``, None when there is none (or it cannot be read: the report goes
    on without the night before's agreement)."""
    from .config import REPORTS

    try:
        return _read_json(storage.join(out, REPORTS, f"run_date={run_date}", "report.json"), options)
    except (ValueError, OSError) as exc:
        log.info("the report of run_date=%s is not compared: %s", run_date, exc)
        return None
