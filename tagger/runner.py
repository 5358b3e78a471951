"""The tag job as one straight line.

manifest -> plan (shards not yet done) -> DataLoader of decoded images or per-row errors -> batched
model -> label decoding -> per-shard Parquet parts + done marker -> run summary -> ``_SUCCESS``.

Every manifest row ends in exactly one row of ``tags`` or ``errors``: rows are keyed by their manifest
position from the reader to the writer, and a shard is committed only once all of its rows are written.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import storage, writers
from .bundle import ModelBundle, load_bundle
from .config import TagConfig
from .lease import Lease, LeaseHeld, LeaseLost, lease_folder
from .manifest import Manifest, read_manifest
from .partition import Partition
from .reader import TRANSIENT, Batch, ImageRows, StorageUnavailable, collate

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_INVALID_INPUT = 2
EXIT_TOO_MANY_ERRORS = 3
EXIT_STORAGE = 4
EXIT_PARTITION_BUSY = 5  # another run owns the date's partition, or took it over from this one
EXIT_INTERRUPTED = 143  # 128 + SIGTERM, what schedulers expect from a terminated task

PLAN_FORMAT = 1


class Interrupted(BaseException):
    """A stop request. A BaseException, like KeyboardInterrupt: no library's ``except Exception`` (a retry
    loop, say) may swallow it."""


@dataclass
class RunResult:
    exit_code: int
    summary: dict[str, Any]
    summary_line: str


@dataclass
class ShardOutput:
    """The open parts of one shard while its rows stream through."""

    index: int
    tags: writers.PartWriter
    errors: writers.PartWriter
    remaining: int  # rows still to come from the DataLoader
    started: float = field(default_factory=time.time)
    error_types: Counter = field(default_factory=Counter)
    tagged: int = 0
    reused: int = 0


class ShardCursor:
    """Walks the pending shards in order: the shard being filled, committed the moment it is full.

    A shard whose rows were all settled by the manifest check (nothing to read) commits on the spot.
    """

    def __init__(self, pending: list[int], open_shard, commit_shard):
        self._pending = iter(pending)
        self._open, self._commit = open_shard, commit_shard
        self.current: ShardOutput | None = None

    def advance(self) -> None:
        self.current = None
        for shard in self._pending:
            output = self._open(shard)
            if output.remaining:
                self.current = output
                return
            self._commit(output)

    def consumed(self, rows: int) -> None:
        assert self.current is not None
        self.current.remaining -= rows
        if self.current.remaining == 0:
            self._commit(self.current)
            self.advance()

    def abort(self) -> None:
        if self.current is not None:
            self.current.tags.abort()
            self.current.errors.abort()
            self.current = None


class StopFlag:
    """SIGTERM/SIGINT, honoured from the first second.

    Outside the tagging loop (reading the manifest or the bundle, waiting out S3 retries, planning) the
    handler raises :class:`Interrupted` at once, wherever the main thread is. Inside it (:meth:`graceful`)
    the handler only sets the flag: the batch in hand is finished, the open shard aborted, committed shards
    kept, then the run stops.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name = ""
        self._previous: dict[int, Any] = {}
        self._graceful = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        self.event.set()
        if not self._graceful:
            raise Interrupted(f"stopped by {self.signal_name}")

    @contextmanager
    def graceful(self):
        """While in this block a stop request only sets the flag, for the loop to check between batches."""
        self.check()
        self._graceful = True
        try:
            yield
        finally:
            self._graceful = False

    def check(self) -> None:
        if self.event.is_set():
            raise Interrupted(f"stopped by {self.signal_name or 'request'}")


def plan_key(config: TagConfig, manifest: Manifest, bundle: ModelBundle) -> dict[str, Any]:
    """What a run's output depends on: a partition planned under another key is not resumed."""
    return {
        "format": PLAN_FORMAT,
        "manifest": manifest.fingerprint,
        "model_version": bundle.model_version,
        "shard_size": config.shard_size,
        "since": config.since,
        "max_image_pixels": config.max_image_pixels,
    }


class TagRunner:
    def __init__(self, config: TagConfig, stop: StopFlag | None = None):
        self.config = config
        self.stop = stop or StopFlag()
        self.options = config.storage_options
        self.partition = Partition(config.out, config.run_date, self.options)
        self.timings: dict[str, float] = {}
        self.counts: Counter = Counter()
        self.lease: Lease | None = None

    # -- the line --------------------------------------------------------------------------------
    def run(self) -> RunResult:
        """Everything is checked (output location, manifest, bundle with its weights loaded, device) before
        anything under ``--out`` changes; then the date's lease is taken, and only then the partition touched."""
        started = time.time()
        config = self.config
        for url in (config.out, config.catalog, config.model, config.since):
            if url:
                storage.storage_options(url, self.options)  # a malformed endpoint fails here, not after retries
        storage.check_output_location(config.out, self.options)
        t = time.time()
        manifest = read_manifest(
            config.catalog,
            id_column=config.id_column,
            image_column=config.image_column,
            fmt=config.catalog_format,
            storage_options=self.options,
        )
        self.timings["manifest_s"] = time.time() - t
        if pc.any(pc.match_substring(manifest.table.column("image"), "s3://")).as_py():
            storage.storage_options("s3://", self.options)  # images on S3: their endpoint is checked now, not per row
        log.info("manifest %s: %d rows", config.catalog, manifest.num_rows)
        t = time.time()
        bundle = load_bundle(config.model, self.options)
        bundle.check_weights()  # weights that do not fit are refused here, before the partition is touched
        self.timings["model_load_s"] = time.time() - t
        if not config.plan_only:
            from .inference import precision_settings, resolve_device
            from .runtimes import RuntimeSettingError, choose_runtime

            self._device = resolve_device(config.device)
            self._runtime = choose_runtime(config.runtime, self._device, config.precision)
            try:
                self._precision = precision_settings(config.precision, self._device, self._runtime.name)
            except ValueError as exc:  # a precision this device or runtime does not compute: a bad option (exit 2)
                raise RuntimeSettingError(str(exc)) from None
        with self.owning_partition():
            return self._run_owned(manifest, bundle, started)

    @contextmanager
    def owning_partition(self):
        """The date's lease around everything that writes, for a whole run or a --plan-only run.

        ``--shard I/N`` tasks share the partition of one plan: they take no lease, but refuse to start while
        a whole run owns the date, and are fenced by the plan's run_id (:meth:`_fence`).
        """
        config = self.config
        lease = Lease(lease_folder(config.out, config.run_date), self.options, ttl=config.lease_ttl,
                      run=config.run_id or "")
        if config.fanout is not None:
            generation, holder = lease.current()
            if lease.vacancy(holder) == "":
                raise LeaseHeld(f"{lease.folder}: a whole run owns the partition: {Lease.describe(holder)}; "
                                "the --shard tasks run after it has ended")
            yield
            return
        lease.acquire(wait=config.lease_wait, interrupted=self.stop.check)
        self.lease = lease
        try:
            yield
        finally:
            self.lease = None
            lease.release()

    def _fence(self, plan: dict[str, Any]) -> None:
        """Before each commit: this run still owns the partition, and the partition still holds its plan."""
        if self.lease is not None:
            self.lease.check()
        current = self.partition.read_plan()
        if current is None or current.get("run_id") != plan["run_id"]:
            theirs = current.get("run_id") if current else None
            raise LeaseLost(f"{self.partition.state}: the partition now holds run {theirs}, not this run "
                            f"{plan['run_id']} (another run replaced it); nothing more is committed by this run")

    def _run_owned(self, manifest: Manifest, bundle: ModelBundle, started: float) -> RunResult:
        config = self.config
        plan = self._plan(manifest, bundle)
        if self.lease is not None:
            self.lease.annotate(plan["run_id"])
        if config.plan_only:
            return self._result(EXIT_OK, {"status": "planned", **self._plan_facts(plan)}, started)
        num_shards = plan["num_shards"]
        mine = range(num_shards) if config.fanout is None else range(config.fanout[0], num_shards, config.fanout[1])
        done = self.partition.done_shards()
        pending = [s for s in mine if s not in done]
        log.info(
            "run %s, date %s: %d shard(s) of %d row(s), %d already done, %d to do",
            plan["run_id"], config.run_date, len(mine), config.shard_size, len(mine) - len(pending), len(pending),
        )
        t = time.time()
        if pending:
            self._tag_shards(manifest, bundle, plan, pending)
        self.timings["tagging_s"] = time.time() - t

        if self.partition.done_shards() >= set(range(num_shards)):
            return self.finalize(plan, started)
        status = {"status": "shards_done", "message": f"shard(s) {config.fanout} done; other shards still running"}
        return self._result(EXIT_OK, {**status, **self._plan_facts(plan)}, started)

    # -- planning --------------------------------------------------------------------------------
    def _plan(self, manifest: Manifest, bundle: ModelBundle) -> dict[str, Any]:
        config = self.config
        key = plan_key(config, manifest, bundle)
        existing = self.partition.read_plan()
        complete = self.partition.is_complete()
        if config.fanout is not None and not config.plan_only:
            if existing is None or existing["key"] != key or complete:
                raise PlanMismatch(
                    f"{self.partition.state}: no open plan for this manifest and model; before the --shard I/N "
                    "tasks, run the same command once with --plan-only (and without --shard)"
                )
            return existing
        if existing is not None and existing["key"] == key and not complete and not config.plan_only:
            log.info("resuming run %s: the partition has an unfinished plan for this manifest and model", existing["run_id"])
            return existing
        previous = None
        if config.since:
            from .incremental import find_previous

            # Before the wipe: a --since that cannot be used must leave the date's partition as it was.
            previous = find_previous(config.since, config.run_date, self.options, current_out=config.out)
        if existing is not None or complete or storage.exists(self.partition.tags, self.options):
            log.info("replacing partition run_date=%s under %s", config.run_date, config.out)
        self.partition.wipe()
        plan = {
            "key": key,
            "run_id": config.run_id or f"{config.run_date}-{uuid.uuid4().hex[:8]}",
            "rows": manifest.num_rows,
            "num_shards": max(1, -(-manifest.num_rows // config.shard_size)),
            "shard_size": config.shard_size,
            "catalog": config.catalog,
            "model": config.model,
            "model_version": bundle.model_version,
            "attributes": bundle.attribute_names,
            "created_at": _now_iso(),
        }
        if config.since:
            from .incremental import plan_reuse

            # Decided once, stored beside the plan: resumed runs and --shard tasks reuse the same rows.
            plan["since"] = plan_reuse(manifest, bundle.model_version, bundle.attribute_names, config.since, previous,
                                       self.partition, config.shard_size, self.options)
        self.partition.write_plan(plan)
        return plan

    @staticmethod
    def _plan_facts(plan: dict[str, Any]) -> dict[str, Any]:
        facts = {k: plan[k] for k in ("run_id", "rows", "num_shards", "model_version")}
        if plan.get("since"):
            facts["since"] = plan["since"]
        return facts

    # -- tagging ---------------------------------------------------------------------------------
    def _tag_shards(self, manifest: Manifest, bundle: ModelBundle, plan: dict[str, Any], pending: list[int]) -> None:
        import torch

        from .inference import Predictor

        config = self.config
        table = manifest.table
        shard_of_row = table.column("row").to_numpy() // config.shard_size
        readable = np.isin(shard_of_row, np.asarray(pending, dtype=np.int64))
        readable &= pc.equal(table.column("status"), "").to_numpy(zero_copy_only=False)
        if (plan.get("since") or {}).get("reused"):
            from .incremental import reused_rows

            readable[reused_rows(self.partition, self.options)] = False  # carried over, not read again
        per_shard_reads = np.bincount(shard_of_row[readable], minlength=plan["num_shards"])
        del shard_of_row

        device = self._device
        predictor = Predictor(bundle, device, runtime=self._runtime, **self._precision)
        self.device = str(device)
        self.runtime = {"name": predictor.runtime.name, "precision": predictor.precision_name, "reason": predictor.runtime.reason}
        schema = writers.tags_schema(bundle.attribute_names)
        context = self._start_method(manifest)

        with tempfile.TemporaryDirectory(prefix="tagger-") as scratch:
            rows_file = f"{scratch}/rows.arrow"
            _write_rows(rows_file, manifest, readable)
            del readable
            dataset = ImageRows(
                rows_file,
                bundle.input_size,
                storage_options=self.options,
                max_pixels=config.max_image_pixels,
                draft=config.draft_decode,
            )
            workers = config.workers if len(dataset) > 0 else 0
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_size=config.batch_size,
                shuffle=False,
                num_workers=workers,
                collate_fn=collate,
                pin_memory=device.type == "cuda",
                multiprocessing_context=context if workers else None,
                timeout=config.worker_timeout if workers else 0,
                prefetch_factor=4 if workers else None,
                persistent_workers=False,
            )
            cursor = ShardCursor(pending, lambda s: self._open_shard(s, manifest, schema, plan, int(per_shard_reads[s])),
                                 lambda out: self._commit_shard(out, plan))
            progress = self._progress(len(dataset))
            previous_threads = torch.get_num_threads()
            if device.type == "cpu" and config.threads > 0:
                torch.set_num_threads(config.threads)
            batches = self._batches(loader)
            with self.stop.graceful():
                self._loop(batches, cursor, predictor, manifest, bundle, plan, progress, previous_threads)

    def _loop(self, batches, cursor, predictor, manifest, bundle, plan, progress, previous_threads) -> None:
        """Batches -> predictions -> the open shard's parts; a shard commits the moment its last row is in."""
        import torch

        config = self.config
        try:
            cursor.advance()
            for batch in batches:
                self.stop.check()
                self._check_transient(batch)
                predictions = predictor(batch.images) if batch.images is not None else None
                if predictions is not None:
                    _refuse_non_finite(predictions, batch, manifest)
                labels = predictor.labels(predictions) if predictions is not None else None
                tagged_at = datetime.now(timezone.utc)
                # Batches arrive in row order and may straddle a shard boundary.
                for shard in np.unique(np.concatenate([batch.rows, batch.error_rows]) // config.shard_size):
                    output = cursor.current
                    if output is None or output.index != shard:
                        raise RuntimeError(f"rows of shard {shard} arrived while shard {output and output.index} was open")
                    good = batch.rows // config.shard_size == shard
                    bad = batch.error_rows // config.shard_size == shard
                    self._write_tags(output, manifest, batch, good, predictions, labels, bundle, plan, tagged_at)
                    self._write_errors(output, manifest, batch, bad, plan)
                    cursor.consumed(int(good.sum() + bad.sum()))
                self.counts["images"] += batch.size
                progress.update(batch.size)
            self.stop.check()
            if cursor.current is not None:
                raise RuntimeError(f"shard {cursor.current.index} still expects {cursor.current.remaining} row(s) after the last batch")
        except BaseException as exc:
            cursor.abort()
            if self.stop.event.is_set() and not isinstance(exc, Interrupted):
                # A stop request wins over what it caused (e.g. workers that died of the same SIGTERM).
                raise Interrupted(f"stopped by {self.stop.signal_name or 'request'}") from exc
            if isinstance(exc, RuntimeError) and not isinstance(exc, WorkerFailure) and "DataLoader worker" in str(exc):
                # torch's SIGCHLD handler raises this wherever the main process happens to be.
                raise WorkerFailure(_worker_failure_message(str(exc))) from exc
            raise
        finally:
            batches.close()  # stops the workers now, not whenever the garbage collector gets to them
            progress.close()
            torch.set_num_threads(previous_threads)

    def _batches(self, loader: Any):
        """The loader's batches; a worker that died is reported as such, and a stop request wins."""
        iterator = iter(loader)
        try:
            while True:
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                except RuntimeError as exc:
                    self.stop.check()  # workers receive the scheduler's SIGTERM too
                    text = str(exc)
                    if "DataLoader timed out" in text:
                        raise StorageUnavailable(
                            f"no images arrived from the reading workers for {self.config.worker_timeout:.0f}s ({text}): "
                            "the storage is not answering (or a decoder is stuck); committed shards are kept, nothing was "
                            "written for the open shard, and running the same command again resumes"
                        ) from exc
                    if "DataLoader worker" in text:
                        raise WorkerFailure(_worker_failure_message(text)) from exc
                    raise
                except (ConnectionError, EOFError) as exc:
                    # A worker killed while handing over a batch breaks the pipe under the queue; that is not
                    # the storage (exit 4) but a dead worker.
                    self.stop.check()
                    if not getattr(loader, "num_workers", 0):
                        raise
                    raise WorkerFailure(_worker_failure_message(
                        f"lost the connection to the workers ({type(exc).__name__}: {exc}); {_worker_states(iterator)}."
                    )) from exc
                yield batch
        finally:
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                try:
                    shutdown()
                except RuntimeError:
                    pass  # torch's SIGCHLD handler repeating that a worker died (e.g. of the same SIGTERM)

    def _check_transient(self, batch: Batch) -> None:
        for row, error_type, message in zip(batch.error_rows, batch.error_types, batch.error_messages):
            if error_type == TRANSIENT:
                raise StorageUnavailable(
                    f"row {int(row) + 1}: {message}. Storage looks unavailable; committed shards are kept, nothing "
                    "was written for this shard, and running the same command again resumes."
                )

    def _open_shard(self, shard: int, manifest: Manifest, schema: pa.Schema, plan: dict[str, Any], reads: int) -> ShardOutput:
        name = writers.part_name(shard)
        output = ShardOutput(
            index=shard,
            tags=writers.PartWriter(storage.join(self.partition.tags, name), schema, self.options),
            errors=writers.PartWriter(storage.join(self.partition.errors, name), writers.ERRORS_SCHEMA, self.options),
            remaining=reads,
        )
        # Rows already judged by the manifest check (empty id or image, repeated id) go out first.
        start, stop = shard * self.config.shard_size, (shard + 1) * self.config.shard_size
        rows = manifest.table.slice(start, stop - start)
        rejected = rows.filter(pc.not_equal(rows.column("status"), ""))
        if rejected.num_rows:
            output.errors.write(
                pa.table(
                    {
                        "product_id": rejected.column("product_id"),
                        "image": rejected.column("image"),
                        "error_type": rejected.column("status"),
                        "message": rejected.column("message"),
                        "run_id": pa.array([plan["run_id"]] * rejected.num_rows, pa.string()),
                    }
                )
            )
            output.error_types.update(rejected.column("status").to_pylist())
        if (plan.get("since") or {}).get("reused"):
            from .incremental import read_reused

            reused = read_reused(self.partition, start, stop, self.options)
            if reused.num_rows:
                output.tags.write(reused.drop_columns(["row"]))
                output.reused = reused.num_rows
        return output

    def _write_tags(self, output, manifest, batch, mask, predictions, labels, bundle, plan, tagged_at) -> None:
        if predictions is None or not mask.any():
            return
        rows = batch.rows[mask]
        source = manifest.table.take(pa.array(rows))
        columns: dict[str, Any] = {"product_id": source.column("product_id"), "image": source.column("image")}
        for name in bundle.attribute_names:
            columns[name] = pa.array(labels[name][mask], pa.string())
            columns[f"{name}_score"] = pa.array(predictions.scores[name][mask], pa.float32())
        n = len(rows)
        columns["image_version"] = pa.array([v for v, keep in zip(batch.versions, mask) if keep], pa.string())
        columns["model_version"] = pa.array([bundle.model_version] * n, pa.string())
        columns["run_id"] = pa.array([plan["run_id"]] * n, pa.string())
        columns["tagged_at"] = pa.array([tagged_at] * n, pa.timestamp("us", tz="UTC"))
        output.tags.write(pa.table(columns))
        output.tagged += n

    def _write_errors(self, output, manifest, batch, mask, plan) -> None:
        if not mask.any():
            return
        rows = batch.error_rows[mask]
        source = manifest.table.take(pa.array(rows))
        types = [t for t, keep in zip(batch.error_types, mask) if keep]
        output.errors.write(
            pa.table(
                {
                    "product_id": source.column("product_id"),
                    "image": source.column("image"),
                    "error_type": pa.array(types, pa.string()),
                    "message": pa.array([m for m, keep in zip(batch.error_messages, mask) if keep], pa.string()),
                    "run_id": pa.array([plan["run_id"]] * len(rows), pa.string()),
                }
            )
        )
        output.error_types.update(types)

    def _commit_shard(self, output: ShardOutput, plan: dict[str, Any]) -> None:
        self._fence(plan)
        output.tags.commit()
        output.errors.commit()
        errors = sum(output.error_types.values())
        self.partition.mark_shard_done(
            output.index,
            {
                "shard": output.index,
                "run_id": plan["run_id"],
                "rows": output.tagged + output.reused + errors,
                "tagged": output.tagged,
                "reused": output.reused,
                "errors": errors,
                "error_types": dict(output.error_types),
                "parts": {"tags": {writers.part_name(output.index): output.tags.rows},
                          "errors": {writers.part_name(output.index): output.errors.rows}},
                "seconds": round(time.time() - output.started, 3),
                "finished_at": _now_iso(),
            },
        )
        self.counts["shards"] += 1

    # -- finishing -------------------------------------------------------------------------------
    def finalize(self, plan: dict[str, Any], started: float) -> RunResult:
        """Summary from every shard's stats, the error-rate gate, then ``_SUCCESS``, last."""
        missing = sorted(set(range(plan["num_shards"])) - self.partition.done_shards())
        if missing:
            shown = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
            raise PlanMismatch(
                f"{self.partition.state}: shard(s) {shown} of {plan['num_shards']} not done; run the --shard tasks "
                "that own them (or the same command without --shard) first, nothing was committed"
            )
        stats = self.partition.read_shard_stats(range(plan["num_shards"]))
        foreign = [s["shard"] for s in stats if s.get("run_id") != plan["run_id"]]
        if foreign:
            raise LeaseLost(f"{self.partition.state}: shard(s) {foreign[:20]} were committed by another run than "
                            f"{plan['run_id']}; not committing a partition that mixes runs. Re-run the date.")
        rows = sum(s["rows"] for s in stats)
        errors = sum(s["errors"] for s in stats)
        error_types: Counter = Counter()
        for s in stats:
            error_types.update(s["error_types"])
        if rows != plan["rows"]:
            raise RuntimeError(f"shards account for {rows} rows but the manifest has {plan['rows']}; not committing")
        error_rate = errors / rows if rows else 0.0
        summary: dict[str, Any] = {
            **self._plan_facts(plan),
            "tagged": sum(s["tagged"] for s in stats),
            "reused": sum(s["reused"] for s in stats),
            "errors": errors,
            "error_types": dict(sorted(error_types.items())),
            "error_rate": round(error_rate, 6),
        }
        if error_rate > self.config.max_error_rate:
            summary["status"] = "failed"
            summary["message"] = (
                f"{errors} of {rows} rows ({error_rate:.1%}) are errors, over --max-error-rate "
                f"{self.config.max_error_rate:.1%}; see the errors table, no _SUCCESS written"
            )
            return self._result(EXIT_TOO_MANY_ERRORS, summary, started)
        summary["status"] = "succeeded"
        result = self._result(EXIT_OK, summary, started)
        self._fence(plan)
        parts = {"tags": {}, "errors": {}}
        for s in stats:
            for table in parts:
                parts[table].update(s["parts"][table])
        self.partition.commit(
            parts["tags"], parts["errors"], {"run_id": plan["run_id"], "model_version": plan["model_version"], "committed_at": _now_iso()}
        )
        return result

    def _result(self, code: int, facts: dict[str, Any], started: float) -> RunResult:
        elapsed = time.time() - started
        tagging = self.timings.get("tagging_s", 0.0)
        images = self.counts.get("images", 0)
        summary = {
            "run_date": self.config.run_date,
            "exit_code": code,
            **facts,
            "this_process": {
                "images_read": images,
                "shards_committed": self.counts.get("shards", 0),
                "images_per_second": round(images / tagging, 2) if tagging > 0 else None,
                "device": getattr(self, "device", None),
                "runtime": getattr(self, "runtime", None),
            },
            "durations_s": {k: round(v, 3) for k, v in {**self.timings, "total_s": elapsed}.items()},
            "finished_at": _now_iso(),
            "arguments": self.config.public_dict(),
        }
        summary_url = self.partition.write_summary(summary)
        line = summary_line(summary)
        log.info("run summary written to %s", summary_url)
        return RunResult(code, summary, line)

    # -- plumbing --------------------------------------------------------------------------------
    def _start_method(self, manifest: Manifest) -> Any:
        method = self.config.worker_start_method
        if method == "auto":
            # s3fs keeps an event loop and connections that a forked child must not reuse; forkserver
            # children start from a clean server process. Local-only runs keep the cheap fork.
            remote = storage.is_remote(self.config.catalog) or storage.is_remote(self.config.model)
            remote = remote or bool(pc.any(pc.match_substring(manifest.table.column("image"), "://")).as_py())
            method = "forkserver" if remote else "fork"
        context = multiprocessing.get_context(method)
        if method == "forkserver":
            context.set_forkserver_preload(["tagger.reader"])
        return context

    def _progress(self, total: int):
        mode = self.config.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        if mode == "bar":
            from tqdm import tqdm

            return tqdm(total=total, unit="img", desc="tagging", file=sys.stderr, dynamic_ncols=True)
        return _LogProgress(total, self.config.log_every if mode == "log" else float("inf"))


def _write_rows(path: str, manifest: Manifest, readable: np.ndarray, chunk: int = 65_536) -> None:
    """The rows to read (``row``, ``location``) as an Arrow IPC file for the workers to memory-map.

    Written a slice of the manifest at a time: the locations of a million rows are never all in this
    process's memory (nor in the allocator's, to be shared with the forked workers).
    """
    schema = pa.schema([("row", pa.int64()), ("location", pa.string())])
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for start in range(0, manifest.num_rows, chunk):
            rows = manifest.table.slice(start, chunk).filter(pa.array(readable[start:start + chunk])).select(["row", "image"])
            if rows.num_rows:
                writer.write_table(pa.table({"row": rows.column("row"), "location": manifest.locations(rows)}, schema=schema))
    pa.default_memory_pool().release_unused()


class _LogProgress:
    """For cron and Airflow logs: a line every ``every`` seconds instead of a carriage-return bar."""

    def __init__(self, total: int, every: float):
        self.total, self.every, self.done = total, every, 0
        self.started = self.last = time.time()

    def update(self, n: int) -> None:
        self.done += n
        now = time.time()
        if now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            log.info("tagging: %d/%d images (%.1f%%), %.1f img/s, eta %.0fs", self.done, self.total,
                     100.0 * self.done / max(self.total, 1), rate, eta)

    def close(self) -> None:
        pass


class PlanMismatch(RuntimeError):
    pass


class NonFiniteScores(RuntimeError):
    pass


def _refuse_non_finite(predictions: Any, batch: Batch, manifest: Manifest) -> None:
    """A score is never NaN: a model that yields one fails the run loudly instead of writing it."""
    bad = np.zeros(len(batch.rows), dtype=bool)
    for scores in predictions.scores.values():
        bad |= ~np.isfinite(scores)
    if bad.any():
        rows = batch.rows[bad]
        ids = manifest.table.column("product_id").take(pa.array(rows[:5])).to_pylist()
        raise NonFiniteScores(
            f"the model produced NaN or infinite scores for {int(bad.sum())} image(s) of a batch (manifest rows "
            f"{', '.join(str(r + 1) for r in rows[:5])}: product ids {ids}); nothing of the open shard was written. "
            "Try --precision fp32; if it persists, the model bundle is broken: retrain or re-export it."
        )


class WorkerFailure(RuntimeError):
    pass


def _worker_states(iterator: Any) -> str:
    states = []
    for worker in getattr(iterator, "_workers", []):
        if worker.exitcode is None:
            worker.join(timeout=0.5)  # a worker that just died may not have been reaped yet
        code = worker.exitcode
        state = "running" if code is None else (f"killed by signal {-code}" if code < 0 else f"exited with code {code}")
        states.append(f"pid {worker.pid} {state}")
    return "workers: " + (", ".join(states) or "none")


def _worker_failure_message(text: str) -> str:
    text = text.strip().rstrip(".") + "."
    return (
        f"an image-reading worker failed: {text} A decoder crash or the out-of-memory killer is the usual "
        "cause; committed shards are kept and the same command resumes after the last one."
    )


def summary_line(summary: dict[str, Any]) -> str:
    status = summary.get("status", "?")
    parts = [f"{status}: run_date={summary.get('run_date')}", f"rows={summary.get('rows')}"]
    for key in ("tagged", "reused", "errors"):
        if key in summary:
            parts.append(f"{key}={summary[key]}")
    rate = summary.get("this_process", {}).get("images_per_second")
    if rate:
        parts.append(f"{rate:.1f} img/s")
    parts.append(f"{summary['durations_s']['total_s']:.1f}s")
    if summary.get("message"):
        parts.append(f"- {summary['message']}")
    return " ".join(parts)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
