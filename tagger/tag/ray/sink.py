"""The Ray engine's Datasink: workers write fragments, only the driver publishes shards.

Ray's ``write_parquet`` is not enough for the job's promises: new file names on every attempt, an overwrite
that is not atomic, no done markers, no ``_SUCCESS``. Here:

- **workers** (:meth:`ShardSink.write`, one call per write task) write each shard's rows of their blocks to
  a *fragment*, ``_runs/run_date=D/ray/<attempt>/<shard>-<random>.parquet``, named per write attempt and
  made visible whole or not at all (:class:`tagger.storage.CommittedFile`). They never touch ``tags/``,
  ``errors/`` or a done marker;
- **the driver** (:class:`FragmentCommitter`, a thread of the driver while the dataset runs, then once more
  in :meth:`ShardSink.on_write_complete`) watches the fragments; when those of a shard hold each of its rows
  to read, it writes the shard's parts under their deterministic names (``part-<shard>.parquet``, the
  same for every attempt) with the local engine's own :class:`~tagger.tag.rows.ShardRows` and commits them
  with :class:`~tagger.tag.shards.ShardCommitter` (fence, parts, done marker), then deletes the fragments.

Several photos per product: each photo is a row of the fragments (``row`` its product's, ``photo`` its place
among the product's photos, ``<attribute>_probs`` its probabilities); "a row" below is then a photo, a shard
is committed when all its products' photos have landed, and the commit turns them into product rows with
the local engine's :class:`~tagger.tag.photos.PhotoAssembler` (mean of the probabilities) before writing.
A product's photos may come from different blocks, tasks and fragments: only the commit sees them all.

Exactly once: a row is written from the first fragment (in name order) that holds it; the same row in a
fragment of a retried write task (one that failed after its file landed), of a task Ray ran twice, or
arriving after its shard was committed is dropped. A shard is committed only when every one of its rows to
read is covered, and a row that is not one of them fails the run; ``DataContext.max_errored_blocks`` stays 0,
so a block Ray gives up on fails the run instead of leaving rows out. ``_SUCCESS`` follows, written by the
runner's finalize step once every shard is done.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ... import storage
from ...data.reader import Batch
from ...model.scope import decode_labels, scope_predictions
from ..partition import Partition
from ..rows import ShardRows
from ..shards import ShardCommitter, ShardCursor
from ..stop import StopFlag
from .stages import ROW_COLUMNS

try:  # the sink is pickled to Ray's workers; outside the ray branch nothing here is used
    from ray.data import Datasink
except ImportError:  # pragma: no cover - the ray extra is not installed
    Datasink = object  # type: ignore[assignment,misc]

log = logging.getLogger("tagger.runner")  # the name the job's log lines have always shown

ABORT_FILE = "_ABORT"


def fragments_root(partition: Partition) -> str:
    """Where the Ray engine's workers leave fragments: beside the plan, wiped with the partition."""
    return storage.join(partition.state, "ray")


def fragment_schema(attributes: list[str], probabilities: bool = False) -> pa.Schema:
    fields = [pa.field("row", pa.int64()), pa.field("photo", pa.int32()), pa.field("image_version", pa.string()),
              pa.field("error_type", pa.string()), pa.field("message", pa.string())]
    for name in attributes:
        fields += [pa.field(name, pa.string()), pa.field(f"{name}_score", pa.float32())]
        if probabilities:
            fields.append(pa.field(f"{name}_probs", pa.list_(pa.float32())))
    return pa.schema(fields + [pa.field("tagged_at", pa.timestamp("us", tz="UTC"))])


def fragment_shard(name: str) -> int | None:
    head = name.split("-", 1)[0]
    return int(head) if name.endswith(".parquet") and not name.startswith(".") and head.isdigit() else None


class ShardSink(Datasink):
    """Workers: :meth:`write`; the driver: :meth:`on_write_complete` / :meth:`on_write_failed` (the committer)."""

    def __init__(self, folder: str, shard_size: int, attributes: list[str], options: dict[str, Any] | None,
                 min_rows: int = 1024, probabilities: bool = False):
        self.folder, self.shard_size, self.attributes = folder, shard_size, list(attributes)
        self.probabilities = probabilities  # several photos per product: each photo's probabilities kept
        self.options = dict(options or {})
        self._min_rows = min_rows
        self.committer: FragmentCommitter | None = None  # the driver's; never pickled to a worker

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["committer"] = None
        return state

    @property
    def min_rows_per_write(self) -> int | None:
        return self._min_rows  # fewer, larger fragments than one per model batch

    def get_name(self) -> str:
        return "TaggerShards"

    # -- on the workers ----------------------------------------------------------------------------------
    def write(self, blocks: Iterable[Any], ctx: Any) -> list[dict[str, Any]]:
        """This task's rows, one fragment per shard they belong to; returns what it wrote (for the record)."""
        from ray.data.block import BlockAccessor

        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        if storage.exists(storage.join(self.folder, ABORT_FILE), self.options):
            raise RunAborted(f"{self.folder}: the driver stopped committing (see its log); not writing")
        schema = fragment_schema(self.attributes, self.probabilities)
        columns = [f.name for f in schema][:-1]
        table = pa.concat_tables([_as_lists(t.select(columns)).cast(schema.remove(len(schema) - 1)) for t in tables])
        table = table.append_column(schema.field("tagged_at"), pa.array([datetime.now(timezone.utc)] * table.num_rows,
                                                                         schema.field("tagged_at").type))
        shard_of_row = table.column("row").to_numpy() // self.shard_size
        token = uuid.uuid4().hex[:12]
        written = []
        for shard in np.unique(shard_of_row):
            part = table.filter(pa.array(shard_of_row == shard))
            name = f"{int(shard):05d}-{token}.parquet"
            write_fragment(storage.join(self.folder, name), part, self.options)
            written.append({"shard": int(shard), "fragment": name, "rows": part.num_rows})
        return written

    # -- on the driver ---------------------------------------------------------------------------------------
    def on_write_complete(self, write_result: Any) -> None:
        """Every write task succeeded: the committer's last sweep, then every shard must be committed."""
        committer = self.committer
        committer.stop()
        committer.raise_failure()
        committer.sweep()
        committer.check_done()

    def on_write_failed(self, error: Exception) -> None:
        if self.committer is not None:
            self.committer.stop()


def _as_lists(table: pa.Table) -> pa.Table:
    """Ray's tensor columns (the probabilities, one vector per photo) as plain Arrow lists of float32."""
    for index, field in enumerate(table.schema):
        if isinstance(field.type, pa.ExtensionType):
            values = np.concatenate([np.asarray(chunk.to_numpy(), dtype=np.float32) for chunk in table.column(index).chunks])
            column = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1] if values.ndim == 2 else 0)
            table = table.set_column(index, field.name, column.cast(pa.list_(pa.float32())))
    return table


class RunAborted(RuntimeError):
    """A write task found the driver's abort marker: the driver stopped committing, the run is ending."""


def write_fragment(url: str, table: pa.Table, options: dict[str, Any] | None) -> None:
    storage.write_parquet(url, table, options)


def read_fragment(url: str, options: dict[str, Any] | None, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.filesystem(url, options)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns)


class FragmentCommitter:
    """The driver's side of the sink: fragments -> committed shards, in a thread while the dataset runs.

    ``expected``: for each pending shard, how many of its rows the workers read (the rest were settled by
    the manifest check or carried over by ``--since``, and :meth:`ShardRows.open` writes them).
    ``readable``: the manifest rows the workers read; any other row in a fragment fails the run.
    """

    def __init__(self, folder: str, shards: ShardCommitter, rows: ShardRows, expected: dict[int, int],
                 readable: np.ndarray, options: dict[str, Any] | None, progress: Any = None, poll: float = 0.5,
                 stop: StopFlag | None = None, photos: np.ndarray | None = None,
                 photo_reads: dict[int, int] | None = None, separator: str | None = None, labels: Any = None,
                 text: Any = None):
        self.text = text  # --text-column: the run's tagger.tag.text_rows.TextFuser, applied as the local engine applies it
        self.folder, self.shards, self.rows, self.options = folder, shards, rows, dict(options or {})
        self.expected, self.readable, self.progress, self.poll = dict(expected), readable, progress, poll
        self.stop_flag = stop  # the run's SIGTERM/SIGINT handling, for the commits made on the main thread
        self.shard_size = shards.plan.shard_size
        # The unit of coverage: each photo of each row has a slot, first[row] + photo (one photo per row without
        # a separator: the slot is the row). ``photo_reads``: per pending shard, how many photos are read.
        self.photos = np.ones(len(readable), np.int64) if photos is None else np.asarray(photos, np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.photos)])
        self.photo_reads = dict(self.expected if photo_reads is None else photo_reads)
        self.separator, self.labels = separator, labels  # several photos: the manifest's separator, bundle.attributes
        self.open: set[int] = set(self.expected)  # pending shards not committed yet
        self.fragments: dict[str, np.ndarray] = {}  # fragment name -> its slots (shard-local), for open shards
        self.covered: dict[int, np.ndarray] = {}  # open shard -> which of its slots some fragment holds
        self.images = 0  # rows read by the workers and committed by this process
        self.duplicates = 0  # rows dropped because another fragment held them first
        self.failure: BaseException | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the thread -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tagger-ray-committer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the thread after the shard it is committing (a commit in progress is finished, never cut)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                self.failure = exc
                self._abort_workers()
                return
            self._stop.wait(self.poll)

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    def _abort_workers(self) -> None:
        """Tell the write tasks to stop (a lost lease, a store failing on commit): the run ends at the next write."""
        try:
            storage.write_bytes(storage.join(self.folder, ABORT_FILE), repr(self.failure).encode(), self.options)
        except Exception as exc:  # best effort: the run still fails at on_write_complete
            log.warning("could not leave the abort marker for the Ray workers: %s", exc)

    # -- sweeps -------------------------------------------------------------------------------------------------
    def sweep(self) -> None:
        """New fragments -> coverage; every open shard now fully covered is committed, in shard order."""
        with self._lock:
            for name in storage.list_files(self.folder, self.options):
                shard = fragment_shard(name)
                if shard is None or name in self.fragments:
                    continue
                if shard not in self.open:
                    # A late copy (a retried or duplicated write task) of a shard committed already: dropped.
                    self.duplicates += self._rows_in(name)
                    self._remove(name)
                    continue
                self._add(name, shard)
            for shard in sorted(self.open):
                if self._stop.is_set() and threading.current_thread() is self._thread:
                    break  # the run is stopping (SIGTERM, a failure): no more commits from this thread
                if int(self.covered.get(shard, np.zeros(0, bool)).sum()) == self.photo_reads[shard]:
                    self._commit_whole(shard)

    def _commit_whole(self, shard: int) -> None:
        """On the main thread a stop request raises at once (see :class:`~tagger.tag.stop.StopFlag`), which would
        cut a part file mid-write: there a commit in hand is finished first, and the stop is honoured after it."""
        if self.stop_flag is None or threading.current_thread() is not threading.main_thread():
            self._commit(shard)
            return
        with self.stop_flag.graceful():
            self._commit(shard)
        self.stop_flag.check()

    def _add(self, name: str, shard: int) -> None:
        table = read_fragment(storage.join(self.folder, name), self.options, ["row", "photo"])
        rows, photo = table.column("row").to_numpy(), table.column("photo").to_numpy().astype(np.int64)
        start = shard * self.shard_size
        end = min(start + self.shard_size, len(self.readable))
        outside = (rows < start) | (rows >= end)
        if not outside.any():
            outside = ~self.readable[rows] | (photo < 0) | (photo >= self.photos[rows])
        if outside.any():
            raise RuntimeError(f"fragment {name} holds manifest rows {[int(r) + 1 for r in rows[outside][:5]]} that shard "
                               f"{shard} does not read; not committing it")
        covered = self.covered.setdefault(shard, np.zeros(int(self.first[end] - self.first[start]), dtype=bool))
        local = self.first[rows] + photo - self.first[start]
        fresh = int((~covered[np.unique(local)]).sum())
        covered[local] = True
        self.fragments[name] = local
        if self.progress is not None and fresh:
            self.progress.update(fresh)

    def _commit(self, shard: int) -> None:
        """The shard's parts from its fragments, each row once, then its done marker (behind the fence)."""
        names = sorted(n for n in self.fragments if fragment_shard(n) == shard)
        output = self.rows.open(shard, self.expected[shard])
        cursor = ShardCursor([shard], lambda _: output, self.shards.commit)
        try:
            cursor.advance()  # commits at once a shard with nothing to read
            start = shard * self.shard_size
            end = min(start + self.shard_size, len(self.readable))
            taken = np.zeros(int(self.first[end] - self.first[start]), dtype=bool)
            photos = []  # several photos per product: the shard's photos, assembled into products at the end
            for name in names:
                table = read_fragment(storage.join(self.folder, name), self.options)
                rows = table.column("row").to_numpy()
                local = self.first[rows] + table.column("photo").to_numpy().astype(np.int64) - self.first[start]
                keep = np.zeros(len(local), dtype=bool)
                keep[np.unique(local, return_index=True)[1]] = True  # once within the fragment
                keep &= ~taken[local]  # and not already taken from an earlier one
                self.duplicates += int(len(local) - keep.sum())
                if not keep.any():
                    continue
                taken[local[keep]] = True
                kept = table.filter(pa.array(keep))
                if self.separator is not None:
                    photos.append(kept)
                    continue
                if self.text is not None:
                    batch, predictions = photo_batch(kept, self.rows.attributes)
                    self._write(cursor, batch, predictions, None, kept.column("tagged_at")[0].as_py())
                    continue
                batch, predictions, labels = fragment_batch(kept, self.rows.attributes)
                self.rows.write_batch(cursor, batch, predictions, labels, kept.column("tagged_at")[0].as_py())
            if photos:
                self._write_products(cursor, pa.concat_tables(photos))
            if cursor.current is not None:
                raise RuntimeError(f"shard {shard}: its fragments hold {int(taken.sum())} of its "
                                   f"{self.expected[shard]} rows to read; not committing it")
        except BaseException:
            cursor.abort()
            raise
        self.open.discard(shard)
        self.images += self.photo_reads[shard]
        for name in names:
            del self.fragments[name]
            self._remove(name)
        self.covered.pop(shard, None)

    def _write_products(self, cursor: ShardCursor, table: pa.Table) -> None:
        """A shard's photos -> its product rows, through the local engine's assembler: in manifest order, each
        product's photos in their order, so that the mean and ``images_used`` are the local engine's."""
        from ..photos import PhotoAssembler

        table = table.sort_by([("row", "ascending"), ("photo", "ascending")])
        batch, predictions = photo_batch(table, self.rows.attributes)
        assembler = PhotoAssembler(SimpleNamespace(labels=self._labels, scoped=lambda p: scope_predictions(self.labels, p)),
                                   self.rows.attributes, self.separator)
        tagged_at = table.column("tagged_at")[0].as_py()
        self._write(cursor, *assembler.feed(batch, predictions), tagged_at)
        self._write(cursor, *assembler.flush(), tagged_at)

    def _write(self, cursor: ShardCursor, batch: Batch, predictions: Any, labels: Any, tagged_at: Any) -> None:
        """Rows (products) into the open shard; with text columns, fused with the text first (as the local engine)."""
        self.rows.write_fused(cursor, batch, predictions, labels, tagged_at, self.text)

    def _labels(self, predictions: Any) -> dict[str, np.ndarray]:
        """Label strings from the bundle's vocabularies (what the actors' Predictor.labels does)."""
        return decode_labels(self.labels, predictions.indices)

    def _rows_in(self, name: str) -> int:
        fs, path = storage.filesystem(storage.join(self.folder, name), self.options)
        try:
            with fs.open(path, "rb") as handle:
                return pq.read_metadata(handle).num_rows
        except FileNotFoundError:
            return 0

    def _remove(self, name: str) -> None:
        try:
            storage.remove_tree(storage.join(self.folder, name), self.options)
        except FileNotFoundError:
            pass

    def check_done(self) -> None:
        """After the last write task: every pending shard is committed, or the run fails saying which are not."""
        with self._lock:
            if self.open:
                missing = {s: self.photo_reads[s] - int(self.covered.get(s, np.zeros(0, bool)).sum()) for s in sorted(self.open)}
                shown = ", ".join(f"shard {s}: {n} row(s)" for s, n in list(missing.items())[:10])
                raise RuntimeError(f"Ray finished but rows never reached the sink ({shown}); those shards were not "
                                   "committed, the same command resumes them")


def fragment_batch(table: pa.Table, attributes: list[str]) -> tuple[Batch, Any, dict[str, np.ndarray]]:
    """A fragment's rows as the local engine's :class:`Batch` + predictions + labels, for :meth:`ShardRows.write_batch`."""
    good = pc.equal(table.column("error_type"), "").to_numpy(zero_copy_only=False)
    rows = table.column("row").to_numpy()
    versions = np.asarray(table.column("image_version").to_pylist(), dtype=object)
    error_types = table.column("error_type").to_pylist()
    messages = table.column("message").to_pylist()
    batch = Batch(rows=rows[good], versions=list(versions[good]), images=None, error_rows=rows[~good],
                  error_types=[t for t, g in zip(error_types, good) if not g],
                  error_messages=[m for m, g in zip(messages, good) if not g], size=len(rows))
    scores = {name: table.column(f"{name}_score").to_numpy()[good] for name in attributes}
    labels = {name: np.asarray(table.column(name).to_pylist(), dtype=object)[good] for name in attributes}
    return batch, SimpleNamespace(scores=scores), labels


def photo_batch(table: pa.Table, attributes: list[str]) -> tuple[Batch, Any]:
    """A shard's photos (fragment rows with ``<attribute>_probs``) as the per-photo :class:`Batch` and
    probabilities that :meth:`PhotoAssembler.feed` takes from the local engine's model."""
    batch, _, _ = fragment_batch(table, attributes)
    good = pc.equal(table.column("error_type"), "").to_numpy(zero_copy_only=False)
    n = int(good.sum())
    probabilities = {}
    for name in attributes:
        column = table.column(f"{name}_probs").combine_chunks()
        values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
        probabilities[name] = values.reshape(len(table), -1)[good] if len(table) else values.reshape(0, 0)
    return batch, SimpleNamespace(probabilities=probabilities) if n else None
