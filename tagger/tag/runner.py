"""The tag job as one straight line, composed of small parts (:mod:`tagger.tag`).

check inputs -> own the date (lease) -> plan (:mod:`.tag.plan`) -> per pending shard: the DataLoader's
decoded images or per-row errors (:mod:`.tag.loader`) -> the model (:mod:`.tag.predictor`) -> rows of the
open shard (:mod:`.tag.rows`) -> shard commit (:mod:`.tag.shards`) -> run summary (:mod:`.tag.summary`) ->
``_SUCCESS``.

Every manifest row ends in exactly one row of ``tags`` or ``errors``: rows are keyed by their manifest
position from the reader to the writer, and a shard is committed only once all of its rows are written.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import pyarrow.compute as pc

from .. import storage
from ..model.bundle import ModelBundle, load_bundle
from ..model.inference import resolve
from .config import TagConfig
from .incremental import check_since
from .lease import Lease
from ..data.manifest import Manifest, read_manifest
from .partition import Partition
from .loader import ImageLoader, WorkerFailure, check_transient, loop_failure, progress_meter, rows_to_read
from .plan import PLAN_FORMAT, Plan, PlanMismatch, make_plan, plan_key
from .model_part import BatchModel, NonFiniteScores, inference_spec
from .rows import ShardRows
from .shards import ShardCommitter, ShardCursor, ShardOutput, owning_partition
from .stop import Interrupted, StopFlag
from .summary import ProcessFacts, RunResult, computed_name, over_error_rate, partition_counts, summary_line, write_summary

__all__ = ["TagRunner", "RunResult", "StopFlag", "Interrupted", "PlanMismatch", "NonFiniteScores", "WorkerFailure",
           "Plan", "plan_key", "PLAN_FORMAT", "ShardCursor", "ShardOutput", "summary_line"]

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_INVALID_INPUT = 2
EXIT_TOO_MANY_ERRORS = 3
EXIT_STORAGE = 4
EXIT_PARTITION_BUSY = 5  # another run owns the date's partition, or took it over from this one
EXIT_INTERRUPTED = 143  # 128 + SIGTERM, what schedulers expect from a terminated task


class TagRunner:
    def __init__(self, config: TagConfig, stop: StopFlag | None = None):
        self.config = config
        self.stop = stop or StopFlag()
        self.options = config.storage_options
        self.partition = Partition(config.out, config.run_date, self.options)
        self.facts = ProcessFacts()
        self.model: Any = None  # the resolved Inference; --engine ray: tagger.tag.ray.cluster.RayModelSettings
        self.lease: Lease | None = None
        self.cluster = None  # --engine ray: the Ray this run uses (tagger.tag.ray.cluster.Cluster)

    def run(self) -> RunResult:
        """Everything is checked (output location, manifest, bundle with its weights loaded, device) before
        anything under ``--out`` changes; then the date's lease is taken, and only then the partition touched."""
        started = time.time()
        try:
            manifest, bundle = self._checked_inputs()
            with owning_partition(self.config, self.stop.check) as self.lease:
                return self._run_owned(manifest, bundle, started)
        finally:
            if self.cluster is not None:
                self.cluster.close()

    def _checked_inputs(self) -> tuple[Manifest, ModelBundle]:
        config = self.config
        for url in (config.out, config.catalog, config.model, config.since):
            if url:
                storage.check_bucket_name(url)
                storage.storage_options(url, self.options)  # a malformed endpoint fails here, not after retries
        storage.check_output_location(config.out, self.options)
        check_since(config.since, config.out, self.options, missing_ok=config.since_missing_ok)
        if config.plan_only:
            return self._read_inputs()
        if config.engine != "ray":
            manifest, bundle = self._read_inputs()
            self.model = resolve(inference_spec(config), bundle)  # --runtime auto measures here, with the run's threads
            self.model.prepare()  # the runtime is an input too: export and a trial batch, before the lease
            return manifest, bundle
        # Ray starts (5 s on 2 cores) while another thread reads the manifest and loads the bundle (3 s): its
        # start-up is most of what the Ray engine costs on one machine. ray.init stays on the main thread,
        # where it may touch signal handlers.
        with ThreadPoolExecutor(1, thread_name_prefix="tagger-inputs") as pool:
            inputs = pool.submit(self._read_inputs)
            try:
                self.model = self._ray_settings()
            except BaseException:
                inputs.result()  # a bad manifest or bundle (exit 2) is what the user fixes first
                raise
            manifest, bundle = inputs.result()
        self.model.prepare(bundle)
        return manifest, bundle

    def _read_inputs(self) -> tuple[Manifest, ModelBundle]:
        config = self.config
        t = time.time()
        manifest = read_manifest(config.catalog, id_column=config.id_column, image_column=config.image_column,
                                 image_separator=config.image_separator,
                                 fmt=config.catalog_format, storage_options=self.options)
        self.facts.timed("manifest_s", t)
        if pc.any(pc.match_substring(manifest.table.column("image"), "s3://")).as_py():
            storage.storage_options("s3://", self.options)  # images on S3: their endpoint is checked now, not per row
        t = time.time()
        bundle = load_bundle(config.model, self.options)
        # Weights that do not fit are refused here, before the partition is touched: by building the network;
        # or, on the local engine, where a cached export already reproduces the bundle's reference outputs (which
        # only these weights compute), by that, without importing timm (~2.5 s of a run's start); a PyTorch
        # runtime still builds the network in Inference.prepare, before the lease.
        from ..model.export import verified_export

        if config.engine == "ray" or config.runtime == "torch" or verified_export(bundle) is None:
            bundle.check_weights()
        self.facts.timed("model_load_s", t)
        # Said once both inputs hold, so that a bad bundle's error is the run's only line.
        log.info("manifest %s: %d rows", config.catalog, manifest.num_rows)
        return manifest, bundle

    def _ray_settings(self):
        """--engine ray: Ray started or joined, and the model actors' device checked against the cluster, now."""
        from .ray.cluster import RayModelSettings, connect

        t = time.time()
        self.cluster = connect(self.config.ray_address)
        self.facts.timed("ray_start_s", t)
        self.facts.engine = {"name": "ray", **self.cluster.facts()}
        return RayModelSettings(self.config, self.cluster)

    def _run_owned(self, manifest: Manifest, bundle: ModelBundle, started: float) -> RunResult:
        config = self.config
        plan = make_plan(config, self.partition, manifest, bundle)
        if self.lease is not None:
            self.lease.annotate(plan.run_id)
        if config.plan_only:
            return self._result(EXIT_OK, {"status": "planned", **plan.facts()}, started)
        shards = ShardCommitter(self.partition, plan, self.lease)
        mine, pending = shards.pending(config.fanout)
        log.info(
            "run %s, date %s: %d shard(s) of %d row(s), %d already done, %d to do",
            plan.run_id, config.run_date, len(mine), config.shard_size, len(mine) - len(pending), len(pending),
        )
        t = time.time()
        if pending:
            self._tag_shards(manifest, bundle, shards, pending)
        self.facts.timed("tagging_s", t)
        if shards.all_done():
            return self._finalize(shards, started)
        status = {"status": "shards_done", "message": f"shard(s) {config.fanout} done; other shards still running"}
        return self._result(EXIT_OK, {**status, **plan.facts()}, started)

    def _tag_shards(self, manifest: Manifest, bundle: ModelBundle, shards: ShardCommitter, pending: list[int]) -> None:
        if self.config.engine == "ray":
            from .ray.engine import tag_shards

            return tag_shards(self, manifest, bundle, shards, pending)
        plan = shards.plan
        readable, reads = rows_to_read(manifest, plan, pending, self.partition, self.options)
        model = BatchModel(self.model.predictor(), manifest, probabilities=manifest.separator is not None)
        self.facts.device, self.facts.runtime = model.device, model.runtime
        rows = ShardRows(self.partition, plan, manifest, bundle.attribute_names, bundle.model_version, self.options,
                         review_thresholds=bundle.review_thresholds, scoped=list(bundle.scopes), computed=computed_name(model.runtime))
        cursor = ShardCursor(pending, lambda s: rows.open(s, int(reads[s])), shards.commit)
        loader = ImageLoader(self.config, manifest, readable, bundle.input_size, self.model.device.type == "cuda", self.stop)
        del readable
        with loader, self.model.cpu_threads(), self.stop.graceful():
            self._loop(loader, cursor, model, rows)
        self.facts.shards = shards.committed

    def _loop(self, loader: ImageLoader, cursor: ShardCursor, model: BatchModel, rows: ShardRows) -> None:
        """Batches -> predictions -> the open shard's parts; a shard commits the moment its last row is in."""
        batches, progress = loader.batches(), progress_meter(self.config, len(loader))
        photos = None
        if loader.manifest.separator is not None:  # several photos per product: products assembled from photos
            from .photos import PhotoAssembler

            photos = PhotoAssembler(model.predictor, rows.attributes, loader.manifest.separator)
        try:
            cursor.advance()
            for batch in batches:
                self.stop.check()
                check_transient(batch)
                predictions, labels = model(batch)
                if photos is not None:
                    rows.write_batch(cursor, *photos.feed(batch, predictions), datetime.now(timezone.utc))
                else:
                    rows.write_batch(cursor, batch, predictions, labels, datetime.now(timezone.utc))
                self.facts.images += batch.size
                progress.update(batch.size)
            if photos is not None:
                rows.write_batch(cursor, *photos.flush(), datetime.now(timezone.utc))
            self.stop.check()
            if cursor.current is not None:
                raise RuntimeError(f"shard {cursor.current.index} still expects {cursor.current.remaining} row(s) after the last batch")
        except BaseException as exc:
            cursor.abort()
            failure = loop_failure(exc, self.stop)
            if failure is None:
                raise
            raise failure from exc
        finally:
            batches.close()  # stops the workers now, not whenever the garbage collector gets to them
            progress.close()

    def finalize(self, plan: Plan | dict[str, Any], started: float) -> RunResult:
        """Commit a date whose shards are all done (``tagger finalize``); ``plan``: the partition's plan."""
        plan = plan if isinstance(plan, Plan) else Plan.from_dict(plan)
        return self._finalize(ShardCommitter(self.partition, plan, self.lease), started)

    def _finalize(self, shards: ShardCommitter, started: float) -> RunResult:
        """Summary from every shard's stats, the error-rate gate, then ``_SUCCESS``, last."""
        stats = shards.shard_stats()
        summary = partition_counts(shards.plan, stats)
        failed = over_error_rate(summary, self.config.max_error_rate)
        if failed:
            summary.update(status="failed", message=failed)
            return self._result(EXIT_TOO_MANY_ERRORS, summary, started)
        summary["status"] = "succeeded"
        result = self._result(EXIT_OK, summary, started)
        shards.commit_partition(stats)
        return result

    def _result(self, code: int, facts: dict[str, Any], started: float) -> RunResult:
        return write_summary(self.partition, self.config, code, facts, started, self.facts)
