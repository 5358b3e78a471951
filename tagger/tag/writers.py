"""The output tables, with explicit schemas, and the files that say a partition is complete.

Layout under ``--out`` (local or ``s3://``)::

    tags/run_date=YYYY-MM-DD/part-00000.parquet ...  _SUCCESS
    errors/run_date=YYYY-MM-DD/part-00000.parquet ... _SUCCESS
    _runs/run_date=YYYY-MM-DD/plan.json, shards/00000.json ..., summary.json [, committed/plan.json, summary.json]

Commit protocol (S3 has no atomic rename): every part file is written whole or not at all
(:class:`tagger.storage.CommittedFile`); a shard's stats JSON is written after both of its parts, and is
the shard's done marker; ``_SUCCESS`` is written last, after every shard of the partition is done, and
lists the part files and their row counts. A partition without ``_SUCCESS`` is partial: readers must skip
it (or read only the files its ``_SUCCESS`` lists, see :func:`read_complete_partition`).

A run that replaces a complete partition (a re-run under other settings) leaves it readable until it commits:
its parts are named ``part-00000-<suffix>.parquet`` beside the committed ones, the committed run's plan and
summary are kept under ``_runs/run_date=.../committed/``, and the old parts are deleted only after the new
``_SUCCESS`` and index (:class:`tagger.tag.partition.Partition`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..attributes import (CONFLICT_COLUMN, IMAGES_USED_COLUMN, INPUTS_COLUMN, LEADING_COLUMNS, REVIEW_COLUMN, TEXT_VERSION_COLUMN,
                          TRAILING_COLUMNS)

SUCCESS_FILE = "_SUCCESS"

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("image", pa.string(), nullable=False),
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)


# REVIEW_COLUMN: the attributes whose score is under the bundle's review threshold (empty list: none), so that
# the review queue is one filter on the table rather than a join with model.json. IMAGES_USED_COLUMN: how many
# of the product's photos its tags come from (1 for a one-photo catalog). image_version: where the image stood
# when it was tagged (size + mtime, or ETag), which lets tomorrow's run reuse today's tags for an unchanged
# image under the same model_version.
_FIXED_TYPES = {
    "product_id": pa.string(), "image": pa.string(), REVIEW_COLUMN: pa.list_(pa.string()), IMAGES_USED_COLUMN: pa.int32(),
    "image_version": pa.string(), "model_version": pa.string(), "run_id": pa.string(),
    "tagged_at": pa.timestamp("us", tz="UTC"),
}


# With --text-column only: INPUTS_COLUMN, which inputs a row's tags came from (photos, text or both), and
# CONFLICT_COLUMN, the attributes where photos and text were each confident and disagreed, with what each said
# (they are in needs_review too), and TEXT_VERSION_COLUMN, a digest of the row's text columns (names and values), so
# that --since reuses a row only when its text is tonight's too. A run without text columns writes exactly the schema it always wrote.
CONFLICT_TYPE = pa.list_(pa.struct([
    pa.field("attribute", pa.string(), nullable=False), pa.field("photos", pa.string(), nullable=False),
    pa.field("photos_score", pa.float32(), nullable=False), pa.field("text", pa.string(), nullable=False),
    pa.field("text_score", pa.float32(), nullable=False),
]))


def tags_schema(attributes: Sequence[str], *, review: bool = True, nullable: Sequence[str] = (), text: bool = False) -> pa.Schema:
    """``review=False``: without :data:`REVIEW_COLUMN`, the columns a ``--since`` run carries over (the
    column is recomputed from the scores, so partitions written before it existed are reused too).
    ``nullable``: attributes with a scope (the bundle's ``applies_when``), null where they do not apply.
    The fixed columns are :data:`tagger.attributes.LEADING_COLUMNS` and ``TRAILING_COLUMNS``, which attribute
    names may not take."""
    fields = [pa.field(name, _FIXED_TYPES[name], nullable=False) for name in LEADING_COLUMNS]
    for name in attributes:
        fields.append(pa.field(name, pa.string(), nullable=name in nullable))
        fields.append(pa.field(f"{name}_score", pa.float32(), nullable=name in nullable))
    for name in TRAILING_COLUMNS:
        if review or name != REVIEW_COLUMN:
            fields.append(pa.field(name, _FIXED_TYPES[name], nullable=False))
        if text and name == REVIEW_COLUMN:
            fields += [pa.field(INPUTS_COLUMN, pa.string(), nullable=False), pa.field(CONFLICT_COLUMN, CONFLICT_TYPE, nullable=False),
                       pa.field(TEXT_VERSION_COLUMN, pa.string(), nullable=False)]
    return pa.schema(fields)


def partition_url(out: str, table: str, run_date: str) -> str:
    return storage.join(out, table, f"run_date={run_date}")


def part_name(shard: int, suffix: str | None = None) -> str:
    """``part-00000.parquet``; a run that replaces a complete partition names its parts ``part-00000-<suffix>.parquet``
    (:attr:`tagger.tag.plan.Plan.part_suffix`), so that they never overwrite the parts its ``_SUCCESS`` still lists."""
    return f"part-{shard:05d}.parquet" if not suffix else f"part-{shard:05d}-{suffix}.parquet"


def is_part(name: str) -> bool:
    """A part file's name (not a hidden temporary, not ``_SUCCESS`` or the index)."""
    return name.startswith("part-") and name.endswith(".parquet")


class PartWriter:
    """One shard's Parquet file, appended a row group per batch, visible only once committed.

    Rows never pile up in memory: each batch goes out as it comes (a row group per ``row_group_rows``).
    """

    def __init__(self, url: str, schema: pa.Schema, options: Mapping[str, Any] | None = None, row_group_rows: int = 8192):
        self.url = url
        self.schema = schema
        self.rows = 0
        self.bytes = 0  # the committed file's size: the shard's done marker records it, resume and finalize check it
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._row_group_rows = row_group_rows
        self._sink = storage.CommittedFile(url, options)
        self._writer = pq.ParquetWriter(self._sink, schema, compression="zstd")

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if batch.num_rows == 0:
            return
        if batch.schema != self.schema:
            batch = batch.cast(self.schema)
        batches = batch.to_batches() if isinstance(batch, pa.Table) else [batch]
        self._pending.extend(batches)
        self._pending_rows += batch.num_rows
        self.rows += batch.num_rows
        if self._pending_rows >= self._row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.Table.from_batches(self._pending, self.schema))
            self._pending, self._pending_rows = [], 0

    def commit(self) -> None:
        self._flush()
        self._writer.close()  # the footer; the sink stays open (pyarrow closes only files it opened itself)
        self.bytes = int(self._sink.tell())
        self._sink.commit()

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self._sink.abort()


def write_success(partition: str, parts: Mapping[str, int], extra: Mapping[str, Any], options: Mapping[str, Any] | None = None) -> None:
    body = {"parts": dict(sorted(parts.items())), "rows": sum(parts.values()), **extra}
    storage.write_bytes(storage.join(partition, SUCCESS_FILE), json.dumps(body, indent=2).encode(), options)


def read_success(partition: str, options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(storage.join(partition, SUCCESS_FILE), options))
    except FileNotFoundError:
        return None


# Beside each table's partitions: which are complete, their files, and the latest, for readers that have no
# Python from us (polars, DuckDB, pandas, Spark: docs/tables.md). A leading underscore, like
# _SUCCESS, keeps Arrow datasets, Spark and `*.parquet` globs from taking it for data.
INDEX_FILE = "_partitions.json"
INDEX_FORMAT = 1


def write_partitions_index(table: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Rebuild ``TABLE/_partitions.json`` from the ``_SUCCESS`` files under ``table`` and write it atomically.

    Rebuilt from the partitions themselves rather than edited: two dates committed at once each write an index
    that holds at least their own date, and the next commit (or wipe) puts back whatever one of them missed.
    File paths are relative to the table folder, so the output root can be moved or mounted elsewhere.
    """
    from concurrent.futures import ThreadPoolExecutor
    from datetime import datetime, timezone

    names = storage.list_files(table, options)
    dates = sorted(n.split("=", 1)[1] for n in names if n.startswith("run_date="))
    if not dates and INDEX_FILE not in names:
        return {}  # a first run's wipe: no table yet, nothing to say
    with ThreadPoolExecutor(max_workers=8) as pool:  # one small GET each on S3
        successes = list(pool.map(lambda d: read_success(partition_url_in(table, d), options), dates))
    partitions = []
    for date, success in zip(dates, successes):
        if success is None:
            continue
        partitions.append({
            "run_date": date,
            "files": [f"run_date={date}/{name}" for name in success.get("parts", {})],
            "rows": success.get("rows"),
            "run_id": success.get("run_id"),
            "model_version": success.get("model_version"),
            "committed_at": success.get("committed_at"),
        })
    body = {
        "format": INDEX_FORMAT,
        "table": table.rstrip("/").rsplit("/", 1)[-1],
        "latest": partitions[-1]["run_date"] if partitions else None,
        "run_dates": [p["run_date"] for p in partitions],
        "files": [f for p in partitions for f in p["files"]],
        "partitions": partitions,
        "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    storage.write_bytes(storage.join(table, INDEX_FILE), json.dumps(body, indent=2).encode(), options)
    return body


def partition_url_in(table: str, run_date: str) -> str:
    return storage.join(table, f"run_date={run_date}")


def read_complete_partition(partition: str, options: Mapping[str, Any] | None = None) -> pa.Table:
    """The rows of a committed partition: exactly the part files its ``_SUCCESS`` lists.

    Given a table root (``OUT/tags``) instead, the rows of every complete partition, with a ``run_date``
    column (:func:`read_complete_table`). Raises ``FileNotFoundError`` for a partition that is still being
    written or whose run failed, saying what was found.
    """
    if not partition.rstrip("/").rsplit("/", 1)[-1].startswith("run_date="):
        return read_complete_table(partition, options)
    success = read_success(partition, options)
    if success is None:
        raise FileNotFoundError(f"{partition}: no {SUCCESS_FILE}; the partition is incomplete (a run is in progress or failed)")
    tables = []
    for name in success["parts"]:
        fs, path = storage.filesystem(storage.join(partition, name), options)
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle))
    if not tables:
        raise FileNotFoundError(f"{partition}: {SUCCESS_FILE} lists no part files")
    return pa.concat_tables(tables)


def read_complete_table(table: str, options: Mapping[str, Any] | None = None, *, run_dates: Sequence[str] | None = None,
                        latest: bool = False) -> pa.Table:
    """Every complete partition of a table (``OUT/tags`` or ``OUT/errors``), or those of ``run_dates``, or only
    the ``latest``, as one table with a ``run_date`` column; incomplete partitions are skipped, and logged.

    Columns added in a later night (``needs_review``) are null in the older ones.
    """
    import logging

    log = logging.getLogger(__name__)
    names = storage.list_files(table, options)
    found = sorted(n.split("=", 1)[1] for n in names if n.startswith("run_date="))
    if not found:
        tables_here = [n for n in names if n in ("tags", "errors")]
        hint = (f"; it looks like an output root: name a table, {storage.join(table, tables_here[0])}" if tables_here
                else "; give a table folder (OUT/tags, OUT/errors) or one partition (OUT/tags/run_date=YYYY-MM-DD)")
        raise FileNotFoundError(f"{table}: no run_date= partitions{hint}")
    complete = {d: s for d in found if (s := read_success(partition_url_in(table, d), options)) is not None}
    wanted = list(complete) if run_dates is None else [d for d in run_dates if d in complete]
    if latest and wanted:
        wanted = wanted[-1:]
    skipped = [d for d in found if d not in complete]
    log.info("%s: %d complete partition(s)%s%s; reading %s", table, len(complete),
             f" ({min(complete)} .. {max(complete)})" if complete else "",
             f", {len(skipped)} incomplete skipped ({', '.join(skipped[:5])})" if skipped else "",
             ", ".join(wanted[:5]) + (" ..." if len(wanted) > 5 else "") if wanted else "none")
    if not wanted:
        missing = f" (none of {', '.join(run_dates)})" if run_dates is not None else ""
        raise FileNotFoundError(f"{table}: no complete partition{missing}; found {', '.join(found)}, "
                                f"{len(skipped)} without {SUCCESS_FILE} (being written, or their run failed)")
    tables = []
    for date in wanted:
        part = read_complete_partition(partition_url_in(table, date), options)
        tables.append(part.append_column("run_date", pa.array([date] * part.num_rows, pa.string())))
    return pa.concat_tables(tables, promote_options="default")
