"""The Ray Data pipeline of one run: manifest rows -> decode (CPU tasks) -> model (actor pool) -> the sink.

Called by :class:`tagger.tag.runner.TagRunner` for the pending shards, after the same checks, lease and plan
as the local engine; the runner's finalize step (summary, error-rate gate, ``_SUCCESS``) follows as usual.

The manifest is read and checked by the project's reader on the driver (:func:`tagger.data.manifest.read_manifest`:
its up-front exit-2 checks, the repeated-id rule and the fingerprint need the whole column), then handed to
Ray Data as Arrow blocks of ``(row, photo, location)``, one per photo of the rows to read.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ... import storage
from ...data.manifest import Manifest, split_photos
from ...data.reader import StorageUnavailable
from ...model.bundle import ModelBundle
from ..loader import progress_meter, rows_to_read
from ...model.scorer import NonFiniteScores
from ..rows import ShardRows
from ..shards import ShardCommitter
from ..summary import computed_name
from ..stop import Interrupted
from . import RayEngineError

if TYPE_CHECKING:
    from .sink import FragmentCommitter

log = logging.getLogger("tagger.runner")  # the name the job's log lines have always shown

# Write tasks retried on an I/O error (the fragment is written again under a new name; the committer takes
# each row once): a store that throttles a PUT must not fail a long run.
WRITE_RETRIES = 3
DECODE_WORKER_BYTES = 256 * 2**20


class RayEngine:
    """``--engine ray`` as :class:`tagger.tag.runner.TagRunner` runs it (the engine interface: :mod:`tagger.tag.local`):
    Ray started or joined while the inputs are read, the model actors' device checked against the cluster, the
    tag job's one inference rule against the bundle, then the pending shards on Ray Data."""

    name = "ray"
    slow_start = True  # ray.init: seconds, overlapped with reading the inputs

    def __init__(self, runner: Any):
        self.runner = runner
        self.cluster: Any = None
        self.settings: Any = None
        # A cached export that reproduces the bundle's reference outputs proves its weights, as for the local engine,
        # where the actors will run that very file: on a Ray this process starts (this machine), not on a cluster
        # named by --ray-address / RAY_ADDRESS, whose actors may export on other machines from the bundle. Decided
        # from the options alone: the inputs are read while Ray starts. prepare() checks the rest.
        self.weights_proven_by_export = not (runner.config.ray_address or os.environ.get("RAY_ADDRESS"))

    def start(self) -> None:
        from .cluster import RayModelSettings, connect

        # Ray Data and the pipeline's modules (~1 s of imports on an idle core) load while ray.init waits for the
        # processes it starts; imported by this module, they were start-up of their own before ray.init began.
        imports = threading.Thread(target=_import_pipeline, name="tagger-ray-imports", daemon=True)
        imports.start()
        t = time.time()
        try:
            self.cluster = connect(self.runner.config.ray_address)
        finally:
            imports.join()
        self.runner.facts.timed("ray_start_s", t)
        self.runner.facts.engine = {"name": "ray", **self.cluster.facts()}
        self.settings = RayModelSettings(self.runner.config, self.cluster)

    def prepare(self, bundle: ModelBundle) -> None:
        self.settings.prepare(bundle)
        if self.settings.runtime.name == "torch" or not self.cluster.this_machine:
            # The actors build their network from the bundle (PyTorch), or may export it elsewhere: its weights are
            # checked here, before the lease, unless the inputs' reader did already (then this returns at once).
            bundle.check_weights()

    def tag_shards(self, manifest: Manifest, bundle: ModelBundle, shards: ShardCommitter, pending: list[int]) -> None:
        tag_shards(self.runner, self.settings, manifest, bundle, shards, pending)

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()


def _import_pipeline() -> None:
    """Ray Data, the stages and the sink, imported ahead of :func:`tag_shards` (on a thread, while Ray starts)."""
    try:
        for module in ("sink", "stages"):
            importlib.import_module(f"{__package__}.{module}")
    except Exception:  # pragma: no cover - raised again, with its own traceback, where tag_shards imports them
        pass


def tag_shards(runner: Any, settings: Any, manifest: Manifest, bundle: ModelBundle, shards: ShardCommitter,
               pending: list[int]) -> None:
    """Tag the rows of ``pending`` shards on Ray and commit each shard as its rows land."""
    import ray.data

    from .sink import FragmentCommitter, ShardSink, fragments_root

    config, partition = runner.config, runner.partition
    plan = shards.plan
    readable, reads = rows_to_read(manifest, plan, pending, partition, runner.options)
    runner.facts.device, runner.facts.runtime = str(settings.device), settings.describe()
    rows = ShardRows(partition, plan, manifest, bundle.attribute_names, bundle.model_version, runner.options,
                     review_thresholds=bundle.review_thresholds, scoped=list(bundle.scopes), computed=computed_name(runner.facts.runtime),
                     text=runner.text is not None, fuser=runner.text)
    root = fragments_root(partition)
    # Fragments a killed run left: a whole run owns the date (the lease) and removes them all; a --shard I/N
    # task shares the partition with the other tasks and touches its own attempt's folder only.
    mine = root if config.fanout is None else None
    if mine:
        storage.remove_tree(mine, runner.options)
    folder = storage.join(root, uuid.uuid4().hex[:12])
    photos = photo_counts(manifest)
    photo_reads = np.bincount(manifest.table.column("row").to_numpy()[readable] // plan.shard_size,
                              weights=photos[readable], minlength=plan.num_shards).astype(np.int64)
    progress = progress_meter(config, int(photos[readable].sum()))
    committer = FragmentCommitter(folder, shards, rows, {s: int(reads[s]) for s in pending}, readable, runner.options,
                                  progress, stop=runner.stop, photos=photos,
                                  photo_reads={s: int(photo_reads[s]) for s in pending}, separator=manifest.separator,
                                  labels=bundle.attributes, text=runner.text)
    sink = ShardSink(folder, plan.shard_size, bundle.attribute_names, runner.options,
                     min_rows=min(plan.shard_size, max(config.batch_size, 1024)),
                     probabilities=manifest.separator is not None or runner.text is not None)
    sink.committer = committer
    try:
        committer.sweep()  # shards with nothing to read (all settled by the manifest check or --since) commit now
        if committer.open:
            dataset = _pipeline(ray.data, runner, settings, manifest, bundle, readable)
            committer.start()
            started = time.time()
            dataset.write_datasink(sink, ray_remote_args={"max_retries": WRITE_RETRIES, "retry_exceptions": [OSError]})
            log.info("ray: %d image(s) in %.1fs; %d duplicate row(s) of retried tasks dropped", committer.images,
                     time.time() - started, committer.duplicates)
    except BaseException as exc:
        committer.stop()
        failure = _failure(exc, committer, runner.stop.signal_name if runner.stop.event.is_set() else "")
        if failure is exc:
            raise
        raise failure from exc
    finally:
        committer.stop()
        progress.close()
        runner.facts.images += committer.images
        runner.facts.engine["duplicate_rows_dropped"] = committer.duplicates
        runner.facts.shards = shards.committed
        if runner.text is not None:
            runner.facts.text = runner.text.facts()
        _remove_fragments(mine or folder, root, runner.options)


def _remove_fragments(url: str, root: str, options: dict[str, Any]) -> None:
    try:
        storage.remove_tree(url, options)
    except Exception as exc:  # the next run of the date removes them
        log.warning("could not remove the Ray fragments under %s: %s", url, exc)
    if url != root and not storage.is_remote(root):
        try:
            os.rmdir(root.removeprefix("file://"))  # empty now, unless other --shard tasks still run
        except OSError:
            pass


def _pipeline(data: Any, runner: Any, settings: Any, manifest: Manifest, bundle: ModelBundle, readable: np.ndarray) -> Any:
    from ray.data import ActorPoolStrategy, DataContext

    from .stages import ModelActor, decode_rows

    config = runner.config
    context = DataContext.get_current()
    context.max_errored_blocks = 0  # a block Ray gives up on fails the run; it never silently drops rows
    # A stage's own exception (StorageUnavailable: exit 4, NonFiniteScores: exit 1), not a UserCodeException
    # that keeps only its text: the driver maps it to the job's exit code.
    context.raise_original_map_exception = True
    # One bar per run: the tagger's (or its log lines). Ray's per-operator bars and its hints are asked for
    # with --progress ray; beside ours they interleave with it on the terminal.
    ray_bars = config.progress == "ray"
    context.enable_progress_bars = ray_bars
    context.enable_operator_progress_bars = ray_bars
    logging.getLogger("ray.data").setLevel(logging.INFO if ray_bars else logging.WARNING)
    if not ray_bars:  # it would say, once per process, that the bars are off: that is the point
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)

    # ONNX Runtime/OpenVINO: the export was made (or found cached) by settings.prepare, before the lease.
    actors = settings.actors()
    # from_blocks, not from_arrow: the blocks' metadata computed here, where the tables are, rather than by a remote
    # task per block that the driver waits for (seconds on a Ray just started, its workers still importing).
    dataset = data.from_blocks(_row_blocks(manifest, readable, max(config.batch_size, 64) * 4))
    # Decode tasks: 1 CPU each, as many at once as the cluster has CPUs free; each reserves the memory of its
    # worker (Ray, Ray Data and the reader, no torch: ~180 MiB RSS measured) and of its batch of decoded images.
    # (A reservation the actors do not have also keeps Ray from fusing decoding into the model actors, which it
    # does for stages with equal resources: every image would then be decoded in an actor, behind the model.)
    decode_memory = DECODE_WORKER_BYTES + 4 * config.batch_size * bundle.input_size ** 2 * 3
    dataset = dataset.map_batches(
        decode_rows, batch_size=config.batch_size, batch_format="pyarrow", num_cpus=1, memory=decode_memory,
        udf_modifying_row_count=False,
        fn_kwargs={"size": bundle.input_size, "images": config.image_settings()},
    )
    shipped = _shippable(bundle)
    dataset = dataset.map_batches(
        ModelActor, batch_size=config.batch_size, batch_format="numpy", udf_modifying_row_count=False,
        compute=ActorPoolStrategy(min_size=actors["min_size"], max_size=actors["max_size"]),
        num_cpus=actors["num_cpus"], num_gpus=actors["num_gpus"] or None,
        fn_constructor_kwargs={"bundle": shipped, "device": settings.device.type, "runtime": settings.runtime,
                               "precision": settings.precision, "threads": actors["threads"],
                               "probabilities": manifest.separator is not None or runner.text is not None},
    )
    log.info("ray: %d row(s) to read: decode tasks (1 CPU each) -> %d-%d model actor(s) on %s (%s%s) -> shard sink",
             int(readable.sum()), actors["min_size"], actors["max_size"], settings.device.type, settings.runtime.name,
             f", {actors['threads']} thread(s), {actors['num_cpus']} CPU reserved" if actors["threads"] else "")
    return dataset


def photo_counts(manifest: Manifest, chunk: int = 65_536) -> np.ndarray:
    """Per manifest row, how many photos it names (1 each without a separator): the committer's unit of
    coverage is the photo, so that a shard commits only when every photo of its products has landed."""
    if manifest.separator is None:
        return np.ones(manifest.num_rows, dtype=np.int64)
    counts = [pc.list_value_length(split_photos(manifest.table.column("image").slice(start, chunk), manifest.separator))
              for start in range(0, manifest.num_rows, chunk)]
    return np.concatenate([np.asarray(c.to_numpy(zero_copy_only=False), dtype=np.int64) for c in counts] or
                          [np.zeros(0, np.int64)])


def _row_blocks(manifest: Manifest, readable: np.ndarray, block_rows: int, chunk: int = 65_536) -> list[pa.Table]:
    """The photos to read, ``(row, photo, location)``, cut into blocks: the decode stage's unit of parallelism.
    One entry per photo, ``photo`` its place among its product's photos (0 with one photo per row)."""
    schema = pa.schema([("row", pa.int64()), ("photo", pa.int32()), ("location", pa.string())])
    blocks = []
    for start in range(0, manifest.num_rows, chunk):
        rows = manifest.table.slice(start, chunk).filter(pa.array(readable[start:start + chunk])).select(["row", "image"])
        if not rows.num_rows:
            continue
        numbers, locations = manifest.photo_locations(rows)
        numbers = np.asarray(numbers.to_numpy(), dtype=np.int64)
        # A product's photos are consecutive: each one's place is its distance from the product's first.
        first = np.flatnonzero(np.r_[True, numbers[1:] != numbers[:-1]])
        photo = np.arange(len(numbers)) - np.repeat(first, np.diff(np.r_[first, len(numbers)]))
        table = pa.table({"row": numbers, "photo": photo.astype(np.int32), "location": locations},
                         schema=schema).combine_chunks()
        blocks += [table.slice(i, block_rows) for i in range(0, table.num_rows, block_rows)]
    return blocks


def _shippable(bundle: ModelBundle) -> ModelBundle:
    """The bundle as the actors get it (weights included: the model need not be readable from the workers),
    without the network the driver's weight check built."""
    import dataclasses

    return dataclasses.replace(bundle, _checked_net=[])


def _failure(exc: BaseException, committer: FragmentCommitter, stopped_by: str) -> BaseException:
    """What a failed Ray run is reported as: a stop request first (SIGTERM reaches Ray's processes of the same
    process group too, and whatever that breaks is its consequence), the committer's own failure (a lost
    lease, a store failing on commit), then the cause inside Ray's wrapping (a store that is down: exit 4;
    a NaN score: exit 1), else a :class:`RayEngineError` naming the root cause."""
    if isinstance(exc, Interrupted):
        return exc
    if stopped_by or isinstance(exc, KeyboardInterrupt):
        return Interrupted(f"stopped by {stopped_by or 'SIGINT'}")
    if committer.failure is not None:
        return committer.failure
    chain = _causes(exc)
    for kind in (StorageUnavailable, NonFiniteScores):
        found = [c for c in chain if isinstance(c, kind)]
        if found:  # the innermost: Ray's wrappers subclass the cause's type, with a traceback in their text
            return kind(_first_line(found[-1]))
    root = chain[-1]
    return RayEngineError(f"a Ray task failed: {type(root).__name__}: {_first_line(root)}. Committed shards are "
                          "kept; the same command resumes after them")


def _first_line(exc: BaseException) -> str:
    """The exception's own message: Ray appends its retry advice on further lines."""
    text = str(exc.args[0]) if exc.args else str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: ``__cause__``/``__context__`` and a RayTaskError's ``cause``."""
    seen, chain, current = set(), [], exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        inner = getattr(current, "cause", None)
        current = inner if isinstance(inner, BaseException) else (current.__cause__ or current.__context__)
    return chain
