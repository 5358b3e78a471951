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
from .config import TagConfig
from .incremental import check_since
from .lease import Lease
from ..data.manifest import Manifest, read_manifest
from .partition import Partition
from .loader import WorkerFailure
from .local import engine_for
from .plan import PLAN_FORMAT, Plan, PlanMismatch, make_plan, plan_key
from ..model.scorer import NonFiniteScores
from .shards import ShardCommitter, ShardCursor, ShardOutput, owning_partition
from .stop import Interrupted, StopFlag
from .text_rows import text_fuser
from .summary import ProcessFacts, RunResult, over_error_rate, partition_counts, summary_line, write_summary

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
        self.engine = engine_for(self)  # what tags the pending shards: tagger.tag.local.ENGINES
        self.lease: Lease | None = None
        self.plan: Plan | None = None  # once planned: what a run that fails says of the output it was to replace
        self.text = None  # --text-column: the bundle's text model and fusion over the catalog's text (tagger.tag.text_rows)

    def run(self) -> RunResult:
        """Everything is checked (output location, manifest, bundle with its weights loaded, device) before
        anything under ``--out`` changes; then the date's lease is taken, and only then the partition touched."""
        started = time.time()
        try:
            manifest, bundle = self._checked_inputs()
            with owning_partition(self.config, self.stop.check) as self.lease:
                return self._run_owned(manifest, bundle, started)
        finally:
            self.engine.close()

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
        if not self.engine.slow_start:  # read here, on the main thread: a SIGTERM during a stalled read stops it at once
            self.engine.start()
            manifest, bundle = self._read_inputs()
            self.engine.prepare(bundle)  # the runtime is an input too: resolved, export and a trial batch, before the lease
            return manifest, bundle
        # The engine starts (Ray: 5 s on 2 cores) while another thread reads the manifest and loads the bundle (3 s):
        # its start-up is most of what the Ray engine costs on one machine. Its start stays on the main thread,
        # where ray.init may touch signal handlers.
        with ThreadPoolExecutor(1, thread_name_prefix="tagger-inputs") as pool:
            inputs = pool.submit(self._read_inputs)
            try:
                self.engine.start()
            except BaseException:
                inputs.result()  # a bad manifest or bundle (exit 2) is what the user fixes first
                raise
            manifest, bundle = inputs.result()
        self.engine.prepare(bundle)  # the runtime is an input too: resolved, export and a trial batch, before the lease
        return manifest, bundle

    def _read_inputs(self) -> tuple[Manifest, ModelBundle]:
        config = self.config
        t = time.time()
        manifest = read_manifest(config.catalog, id_column=config.id_column, image_column=config.image_column,
                                 image_separator=config.image_separator, extra_columns=config.text_columns,
                                 fmt=config.catalog_format, storage_options=self.options)
        self.facts.timed("manifest_s", t)
        if pc.any(pc.match_substring(manifest.table.column("image"), "s3://")).as_py():
            storage.storage_options("s3://", self.options)  # images on S3: their endpoint is checked now, not per row
        t = time.time()
        bundle = load_bundle(config.model, self.options)
        # Weights that do not fit are refused here, before the partition is touched: by building the network;
        # or, where the engine runs this process's export (the local engine) and a cached export already reproduces
        # the bundle's reference outputs (which only these weights compute), by that, without importing timm
        # (~2.5 s of a run's start); a PyTorch runtime still builds the network in Inference.prepare, before the lease.
        from ..model.export import verified_export

        if not self.engine.weights_proven_by_export or config.runtime == "torch" or verified_export(bundle) is None:
            bundle.check_weights()
        if config.text_columns:
            self.text = text_fuser(config, manifest, bundle, self.options)
        self.facts.timed("model_load_s", t)
        # Said once both inputs hold, so that a bad bundle's error is the run's only line.
        log.info("manifest %s: %d rows", config.catalog, manifest.num_rows)
        return manifest, bundle

    def _run_owned(self, manifest: Manifest, bundle: ModelBundle, started: float) -> RunResult:
        config = self.config
        plan = self.plan = make_plan(config, self.partition, manifest, bundle)
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
        self.engine.tag_shards(manifest, bundle, shards, pending)

    def finalize(self, plan: Plan | dict[str, Any], started: float) -> RunResult:
        """Commit a date whose shards are all done (``tagger finalize``); ``plan``: the partition's plan."""
        plan = self.plan = plan if isinstance(plan, Plan) else Plan.from_dict(plan)
        return self._finalize(ShardCommitter(self.partition, plan, self.lease), started)

    def _finalize(self, shards: ShardCommitter, started: float) -> RunResult:
        """Summary from every shard's stats, the error-rate gate, then ``_SUCCESS``, last."""
        stats = shards.shard_stats()
        summary = partition_counts(shards.plan, stats)
        failed = over_error_rate(summary, self.config.max_error_rate)
        if failed:
            kept = shards.plan.kept_note(self.config.run_date)
            summary.update(status="failed", message=f"{failed}; {kept}" if kept else failed)
            return self._result(EXIT_TOO_MANY_ERRORS, summary, started)
        summary["status"] = "succeeded"
        result = self._result(EXIT_OK, summary, started)
        shards.commit_partition(stats)
        return result

    def kept_note(self) -> str:
        """"; the previous complete output of D (run X) is kept until a run commits" for a run that replaces a
        complete date and ended without committing ("" otherwise): what its last line adds."""
        note = self.plan.kept_note(self.config.run_date) if self.plan is not None else ""
        return f"; {note}" if note else ""

    def _result(self, code: int, facts: dict[str, Any], started: float) -> RunResult:
        return write_summary(self.partition, self.config, code, facts, started, self.facts)
