"""Rows into the open shard's parts: the rows the manifest check already judged and the ``--since`` rows
carried over when a shard opens, then each batch's tags and errors, keyed by manifest row.
:class:`ShardSink` is the tag job's :class:`tagger.model.sinks.Sink`: what the local engine's loop writes into.

Columnar throughout (Arrow ``take`` by row, numpy masks): nothing here runs Python per row.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from . import writers
from ..data.manifest import Manifest
from .partition import Partition
from ..data.reader import Batch
from ..model.scorer import Scored
from .plan import Plan
from .shards import ShardCursor, ShardOutput


class ShardRows:
    """Writes one run's rows into its shards' parts (``attributes``, ``model_version``, ``review_thresholds``:
    the bundle's)."""

    def __init__(self, partition: Partition, plan: Plan, manifest: Manifest, attributes: list[str], model_version: str,
                 options: dict[str, Any] | None = None, *, review_thresholds: Mapping[str, float] | None = None,
                 computed: str | None = None, scoped: list[str] | tuple[str, ...] = (), text: bool = False,
                 fuser: Any = None):
        self.partition, self.plan, self.manifest, self.options = partition, plan, manifest, options
        self.computed = computed  # "<runtime> <precision>" of the model, recorded in each shard's marker
        self.attributes, self.model_version = attributes, model_version
        self.thresholds = {name: float((review_thresholds or {}).get(name, 0.0)) for name in attributes}
        self.text = text  # --text-column: each row says which inputs its tags came from and where they conflict
        self.fuser = fuser  # ... and a row without a photo (an empty image cell) is tagged from its text when it has one
        self.schema = writers.tags_schema(attributes, nullable=scoped, text=text)

    def open(self, shard: int, reads: int) -> ShardOutput:
        """The shard's parts, ``reads`` rows still to come from the DataLoader."""
        name = self.plan.part_name(shard)
        output = ShardOutput(
            index=shard,
            name=name,
            tags=writers.PartWriter(storage.join(self.partition.tags, name), self.schema, self.options),
            errors=writers.PartWriter(storage.join(self.partition.errors, name), writers.ERRORS_SCHEMA, self.options),
            remaining=reads,
            computed=self.computed,
        )
        # Rows already judged by the manifest check (empty id or image, repeated id) go out first.
        start, stop = shard * self.plan.shard_size, (shard + 1) * self.plan.shard_size
        rows = self.manifest.table.slice(start, stop - start)
        rejected = rows.filter(pc.not_equal(rows.column("status"), ""))
        if rejected.num_rows and self.fuser is not None:
            rejected = self._tag_from_text(output, rejected)
        if rejected.num_rows:
            output.errors.write(self._errors(rejected, rejected.column("status"), rejected.column("message")))
            types = rejected.column("status").to_pylist()
            output.error_types.update(types)
            _examples(output.error_examples, types, rejected.column("product_id"), rejected.column("message").to_pylist())
        if self.manifest.separator is not None:
            output.photo_errors = Counter()
        if self.plan.reuses:
            from .incremental import read_reused

            reused = read_reused(self.partition, start, stop, self.options)
            if reused.num_rows:
                scores = {name: reused.column(f"{name}_score").to_numpy() for name in self.attributes}
                if self.text:  # each row's review as the night that tagged it computed it: its input mode's thresholds
                    review = self._review(output, scores, self.fuser.thresholds(reused.column(writers.INPUTS_COLUMN).to_pylist()),
                                          reused.column(writers.CONFLICT_COLUMN).to_pylist())
                else:
                    review = self._review(output, scores)
                output.tags.write(pa.table({**{c: reused.column(c) for c in reused.column_names if c != "row"},
                                            writers.REVIEW_COLUMN: review}).select(self.schema.names))
                output.reused = reused.num_rows
        return output

    def _tag_from_text(self, output: ShardOutput, rejected: pa.Table) -> pa.Table:
        """Rows the manifest check rejected for an empty image cell (an id, no photo) that have text: tagged from it.
        Returns the rows that stay errors (no text, an empty id, a repeated id)."""
        no_photo = pc.and_(pc.equal(rejected.column("status"), "invalid_row"),
                           pc.and_(pc.equal(pc.utf8_trim_whitespace(rejected.column("image")), ""),
                                   pc.not_equal(pc.utf8_trim_whitespace(rejected.column("product_id")), "")))
        candidates = rejected.filter(no_photo)
        if candidates.num_rows == 0:
            return rejected
        rows = candidates.column("row").to_numpy()
        batch = Batch(rows=np.empty(0, np.int64), versions=[], images=None, error_rows=rows,
                      error_types=candidates.column("status").to_pylist(), error_messages=candidates.column("message").to_pylist(),
                      size=len(rows))
        batch, predictions, labels, text = self.fuser(batch, None)
        if text is None or len(batch.rows) == 0:
            return rejected
        self._write_tags(output, batch, np.ones(len(batch.rows), bool), predictions, labels, datetime.now(timezone.utc), text)
        return rejected.filter(pc.invert(pc.is_in(rejected.column("row"), pa.array(batch.rows))))

    def write_batch(self, cursor: ShardCursor, batch: Batch, predictions: Any, labels: dict[str, np.ndarray] | None,
                    tagged_at: datetime, text: Any = None) -> None:
        """A batch's rows into the open shard; batches arrive in row order and may straddle a shard boundary.
        ``text``: the rows' :class:`tagger.tag.text_rows.TextColumns` when the run reads text."""
        shard_size = self.plan.shard_size
        for shard in np.unique(np.concatenate([batch.rows, batch.error_rows]) // shard_size):
            output = cursor.current
            if output is None or output.index != shard:
                raise RuntimeError(f"rows of shard {shard} arrived while shard {output and output.index} was open")
            good = batch.rows // shard_size == shard
            bad = batch.error_rows // shard_size == shard
            self._write_tags(output, batch, good, predictions, labels, tagged_at, text)
            self._write_errors(output, batch, bad)
            if batch.photo_errors and output.photo_errors is not None:
                photos = [(r, t, m) for r, t, m in batch.photo_errors if r // shard_size == shard]
                output.photo_errors.update(t for _, t, _ in photos)
                ids = self.manifest.table.column("product_id").take(pa.array([r for r, _, _ in photos], pa.int64()))
                _examples(output.photo_examples, [t for _, t, _ in photos], ids, [m for _, _, m in photos])
            cursor.consumed(int(good.sum() + bad.sum()))

    def write_fused(self, cursor: ShardCursor, batch: Batch, predictions: Any, labels: dict[str, np.ndarray] | None,
                    tagged_at: datetime, fuser: Any = None) -> None:
        """:meth:`write_batch` after ``fuser`` (--text-column: the run's :class:`tagger.tag.text_rows.TextFuser`)
        fused the rows with the catalog's text: both engines' sinks write through here."""
        text = None
        if fuser is not None:
            batch, predictions, labels, text = fuser(batch, predictions)
        self.write_batch(cursor, batch, predictions, labels, tagged_at, text)

    def _write_tags(self, output: ShardOutput, batch: Batch, mask: np.ndarray, predictions: Any,
                    labels: dict[str, np.ndarray] | None, tagged_at: datetime, text: Any = None) -> None:
        if predictions is None or not mask.any():
            return
        rows = batch.rows[mask]
        source = self.manifest.table.take(pa.array(rows))
        columns: dict[str, Any] = {"product_id": source.column("product_id"), "image": source.column("image")}
        scores = {name: predictions.scores[name][mask] for name in self.attributes}
        for name in self.attributes:
            columns[name] = pa.array(labels[name][mask], pa.string())
            columns[f"{name}_score"] = pa.array(scores[name], pa.float32(), from_pandas=True)  # NaN: a null tag's
        n = len(rows)
        if self.text:
            picked = np.flatnonzero(mask)
            conflict = [text.conflict[i] for i in picked] if text is not None else [[] for _ in picked]
            thresholds = {name: text.thresholds[name][mask] for name in self.attributes} if text is not None else None
            columns[writers.REVIEW_COLUMN] = self._review(output, scores, thresholds, conflict)
            columns[writers.INPUTS_COLUMN] = pa.array([text.inputs[i] for i in picked] if text is not None else ["photos"] * n, pa.string())
            columns[writers.CONFLICT_COLUMN] = pa.array(conflict, writers.CONFLICT_TYPE)
            columns[writers.TEXT_VERSION_COLUMN] = pa.array(self.fuser.versions(rows), pa.string())
        else:
            columns[writers.REVIEW_COLUMN] = self._review(output, scores)
        used = batch.images_used[mask] if batch.images_used is not None else np.ones(n, np.int32)
        columns[writers.IMAGES_USED_COLUMN] = pa.array(used, pa.int32())
        columns["image_version"] = pa.array([v for v, keep in zip(batch.versions, mask) if keep], pa.string())
        columns["model_version"] = pa.array([self.model_version] * n, pa.string())
        columns["run_id"] = pa.array([self.plan.run_id] * n, pa.string())
        columns["tagged_at"] = pa.array([tagged_at] * n, pa.timestamp("us", tz="UTC"))
        output.tags.write(pa.table(columns))
        output.tagged += n

    def _review(self, output: ShardOutput, scores: Mapping[str, np.ndarray], thresholds: Mapping[str, np.ndarray] | None = None,
                conflict: list[list[str]] | None = None) -> pa.ListArray:
        """Per row, the attributes whose score is under its review threshold (in the schema's order), and
        their counts on the shard's stats. ``thresholds``: per row (the row's input mode's, with text);
        ``conflict``: per row, attributes that go to review whatever their score."""
        n = len(next(iter(scores.values()))) if scores else 0
        under = np.zeros((n, len(self.attributes)), dtype=bool)
        for j, name in enumerate(self.attributes):
            limit = thresholds[name] if thresholds is not None else np.float32(self.thresholds[name])
            under[:, j] = np.asarray(scores[name], dtype=np.float32) < limit
            if conflict is not None:
                under[:, j] |= np.array([any(c["attribute"] == name for c in row) for row in conflict], dtype=bool)
            output.review[name] += int(under[:, j].sum())
        output.review_rows += int(under.any(axis=1).sum())
        rows, columns = np.nonzero(under)  # row-major: each row's attributes in order
        offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int32)
        names = pa.array(self.attributes, pa.string()).take(pa.array(columns, pa.int64()))
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), names)

    def _write_errors(self, output: ShardOutput, batch: Batch, mask: np.ndarray) -> None:
        if not mask.any():
            return
        source = self.manifest.table.take(pa.array(batch.error_rows[mask]))
        types = [t for t, keep in zip(batch.error_types, mask) if keep]
        messages = [m for m, keep in zip(batch.error_messages, mask) if keep]
        output.errors.write(self._errors(source, pa.array(types, pa.string()), pa.array(messages, pa.string())))
        output.error_types.update(types)
        _examples(output.error_examples, types, source.column("product_id"), messages)

    def _errors(self, source: pa.Table, types: Any, messages: Any) -> pa.Table:
        return pa.table({
            "product_id": source.column("product_id"),
            "image": source.column("image"),
            "error_type": types,
            "message": messages,
            "run_id": pa.array([self.plan.run_id] * source.num_rows, pa.string()),
        })


class ShardSink:
    """Scored batches -> the open shard of ``cursor`` (:meth:`ShardRows.write_batch`): with ``photos`` (a
    :class:`tagger.tag.photos.PhotoAssembler`) assembled into products first, with ``text`` (the run's
    :class:`tagger.tag.text_rows.TextFuser`) fused with the catalog's text. A shard commits the moment its last
    row is in; :meth:`close` writes the last product and checks that no shard still expects rows."""

    def __init__(self, rows: ShardRows, cursor: ShardCursor, *, photos: Any = None, text: Any = None):
        self.rows, self.cursor, self.photos, self.text = rows, cursor, photos, text

    def write(self, batch: Batch, scored: Scored | None) -> None:
        predictions, labels = (scored.predictions, scored.labels) if scored is not None else (None, None)
        if self.photos is not None:
            self._put(*self.photos.feed(batch, predictions))
        else:
            self._put(batch, predictions, labels)

    def close(self) -> None:
        """The last product; the shards it committed are the :class:`~tagger.tag.shards.ShardCommitter`'s."""
        if self.photos is not None:
            self._put(*self.photos.flush())
        if self.cursor.current is not None:
            raise RuntimeError(f"shard {self.cursor.current.index} still expects {self.cursor.current.remaining} row(s) after the last batch")

    def _put(self, batch: Batch, predictions: Any, labels: Any) -> None:
        self.rows.write_fused(self.cursor, batch, predictions, labels, datetime.now(timezone.utc), self.text)


def _examples(examples: dict[str, str], types: list[str], ids: Any, messages: list[str]) -> None:
    """The first product of each error type not seen yet, as "product id: message" (a lookup per new type, not
    per row)."""
    for error_type in set(types) - set(examples):
        first = types.index(error_type)
        examples[error_type] = f"{ids[first].as_py() if hasattr(ids[first], 'as_py') else ids[first]}: {messages[first]}"
