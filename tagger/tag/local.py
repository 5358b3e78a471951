"""The local engine: this process and its DataLoader workers tag the pending shards.

An engine is what :class:`tagger.tag.runner.TagRunner` runs the pending shards on; the runner holds the durable
parts (checks, lease, plan, shard commits, summary) and never asks which engine it has. Each engine:

- ``start()``: what must start before the model is resolved (Ray: start or join the cluster); with
  ``slow_start`` it runs while another thread reads the manifest and loads the bundle;
- ``prepare(bundle)``: the one inference rule (:func:`tagger.model.inference.resolve`) against the bundle and the
  trial batch, before the lease: a runtime that cannot run is exit 2 with the partition untouched;
- ``weights_proven_by_export``: whether a cached export that reproduces the bundle's reference outputs may stand
  in for building the network to check its weights (the local engine; the Ray engine on a Ray it starts on this
  machine, whose actors run that file; its ``prepare`` checks them where its actors build a network after all);
- ``tag_shards(manifest, bundle, shards, pending)``: the same source (:class:`tagger.data.reader.ImageRows`),
  scorer (:class:`tagger.model.scorer.Scorer`) and shard rows (:class:`tagger.tag.rows.ShardRows`); here run by
  the loop evaluate, predict and retrain share (:func:`tagger.model.sinks.score_batches`, into
  :class:`tagger.tag.rows.ShardSink`);
- ``close()``.

:data:`ENGINES` names both; the Ray engine lives in :mod:`tagger.tag.ray.engine` and is imported only when asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

from .loader import ImageLoader, check_transient, loop_failure, progress_meter, rows_to_read
from .model_part import BatchModel, inference_spec
from .rows import ShardRows, ShardSink
from .shards import ShardCommitter, ShardCursor
from .summary import computed_name
from ..data.manifest import Manifest
from ..data.reader import Batch
from ..model.bundle import ModelBundle
from ..model.sinks import score_batches

# --engine -> "module:class"; imported when chosen (the Ray engine needs the ray extra).
ENGINES = {"local": "tagger.tag.local:LocalEngine", "ray": "tagger.tag.ray.engine:RayEngine"}


def engine_for(runner: Any) -> Any:
    """The engine ``runner.config.engine`` names, made for ``runner``."""
    module, _, name = ENGINES[runner.config.engine].partition(":")
    return getattr(importlib.import_module(module), name)(runner)


class LocalEngine:
    name = "local"
    weights_proven_by_export = True
    slow_start = False  # nothing to start: the inputs are read on the main thread

    def __init__(self, runner: Any):
        self.runner = runner
        self.inference: Any = None

    def start(self) -> None:
        """Nothing to start: the DataLoader's workers start with the first pending shard."""

    def prepare(self, bundle: ModelBundle) -> None:
        from ..model.inference import resolve

        self.inference = resolve(inference_spec(self.runner.config), bundle)  # auto measures here, with the run's threads
        self.inference.prepare()  # the runtime is an input too: export and a trial batch, before the lease

    def close(self) -> None:
        pass

    def tag_shards(self, manifest: Manifest, bundle: ModelBundle, shards: ShardCommitter, pending: list[int]) -> None:
        runner, plan = self.runner, shards.plan
        readable, reads = rows_to_read(manifest, plan, pending, runner.partition, runner.options)
        model = BatchModel(self.inference.predictor(), manifest, probabilities=manifest.separator is not None or runner.text is not None)
        runner.facts.device, runner.facts.runtime = model.device, model.runtime
        rows = ShardRows(runner.partition, plan, manifest, bundle.attribute_names, bundle.model_version, runner.options,
                         review_thresholds=bundle.review_thresholds, scoped=list(bundle.scopes), computed=computed_name(model.runtime),
                         text=runner.text is not None, fuser=runner.text)
        cursor = ShardCursor(pending, lambda s: rows.open(s, int(reads[s])), shards.commit)
        loader = ImageLoader(runner.config, manifest, readable, bundle.input_size, self.inference.device.type == "cuda", runner.stop)
        del readable
        with loader, self.inference.cpu_threads(), runner.stop.graceful():
            self._loop(loader, cursor, model, rows)
        runner.facts.shards = shards.committed
        if runner.text is not None:
            runner.facts.text = runner.text.facts()

    def _loop(self, loader: ImageLoader, cursor: ShardCursor, model: BatchModel, rows: ShardRows) -> None:
        """Batches -> the scorer -> the open shard's parts (:func:`tagger.model.sinks.score_batches`); a shard
        commits the moment its last row is in."""
        runner = self.runner
        batches, progress = loader.batches(), progress_meter(runner.config, len(loader))
        photos = None
        if loader.manifest.separator is not None:  # several photos per product: products assembled from photos
            from .photos import PhotoAssembler

            photos = PhotoAssembler(model.predictor, rows.attributes, loader.manifest.separator)

        def done(batch: Batch) -> None:
            runner.facts.images += batch.size
            progress.update(batch.size)

        try:
            cursor.advance()
            score_batches(self._checked(batches), model.scorer, ShardSink(rows, cursor, photos=photos, text=runner.text),
                          on_batch=done)
        except BaseException as exc:
            cursor.abort()
            failure = loop_failure(exc, runner.stop)
            if failure is None:
                raise
            raise failure from exc
        finally:
            batches.close()  # stops the workers now, not whenever the garbage collector gets to them
            progress.close()

    def _checked(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """The loader's batches while no stop is asked for; a read the store did not answer stops the run."""
        for batch in batches:
            self.runner.stop.check()
            check_transient(batch)
            yield batch
        self.runner.stop.check()
