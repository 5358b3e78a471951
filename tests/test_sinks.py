"""Where predictions go (tagger.model.sinks): one loop, source -> Scorer -> sink, and each sink alone. A fake
Predictor (no network) scores an image by its first pixel, so every row's result says which image it came from."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from tagger.data.reader import Batch
from tagger.model.predictor import Predictions
from tagger.model.scorer import NonFiniteScores, Scorer
from tagger.model.sinks import GalleryInput, LabelledArrays, OutputArrays, score_batches

ATTRIBUTES = [SimpleNamespace(name="colour", labels=["red", "blue", "green"])]


class FirstPixel:
    """Class = first pixel mod 3, score 0.5 + pixel / 1000 (NaN for pixel 255); probabilities put 0.5 on the class."""

    def __call__(self, images, *, probabilities=False):
        pixel = np.asarray(images)[:, 0].astype(np.int64)
        index = pixel % 3
        score = np.where(pixel == 255, np.nan, 0.5 + pixel / 1000).astype(np.float32)
        probs = np.full((len(pixel), 3), 0.25, np.float32)
        probs[np.arange(len(pixel)), index] = 0.5
        return Predictions({"colour": index}, {"colour": score}, {"colour": probs} if probabilities else None)

    def labels(self, predictions):
        return {"colour": np.asarray(["red", "blue", "green"], dtype=object)[predictions.indices["colour"]]}


def batch(rows, pixels, error_rows=(), previews=None, targets=None) -> Batch:
    return Batch(rows=np.asarray(rows, np.int64), versions=[""] * len(rows),
                 images=np.asarray(pixels, np.uint8)[:, None] if len(rows) else None,
                 error_rows=np.asarray(error_rows, np.int64), error_types=["decode"] * len(error_rows),
                 error_messages=[f"{r}: not an image" for r in error_rows], size=len(rows) + len(error_rows),
                 previews=previews, targets=None if targets is None else np.asarray(targets))


def test_every_input_ends_in_one_result_or_one_error_in_input_order():
    seen = []
    batches = [batch([0, 2], [4, 7], error_rows=[1]), batch([], [], error_rows=[3]), batch([4], [5])]
    outputs = score_batches(batches, Scorer(FirstPixel(), probabilities=True, labels=False), OutputArrays(ATTRIBUTES, 5),
                            on_batch=lambda b: seen.append(b.size))
    assert seen == [3, 1, 1]
    assert outputs.ok.tolist() == [True, False, True, False, True]
    assert outputs.errors == {1: ("decode", "1: not an image"), 3: ("decode", "3: not an image")}
    index, score = outputs.top("colour")
    assert index.tolist() == [1, -1, 1, -1, 2]
    np.testing.assert_allclose(score, [0.504, np.nan, 0.507, np.nan, 0.505], rtol=1e-6)
    assert np.isnan(outputs.probs["colour"][1]).all() and outputs.probs["colour"][4].tolist() == [0.25, 0.25, 0.5]
    assert outputs.thumbs == {}


def test_the_gallery_keeps_each_decoded_images_thumbnail():
    thumb = np.zeros((2, 2, 3), np.uint8)
    sink = GalleryInput(ATTRIBUTES, 3)
    outputs = score_batches([batch([0, 2], [1, 2], error_rows=[1], previews=[thumb, None])],
                            Scorer(FirstPixel(), probabilities=True, labels=False), sink)
    assert list(outputs.thumbs) == [0] and outputs.ok.tolist() == [True, False, True]


def test_labelled_arrays_keep_probabilities_and_targets_of_the_decoded_rows_in_order():
    probs, targets = score_batches([batch([0, 1], [0, 1], targets=[[0], [1]]), batch([], []), batch([2], [2], targets=[[2]])],
                                   Scorer(FirstPixel(), probabilities=True, labels=False), LabelledArrays())
    assert targets.tolist() == [[0], [1], [2]] and probs["colour"].argmax(axis=1).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="no image of this split could be decoded"):
        score_batches([batch([], [], error_rows=[0])], Scorer(FirstPixel(), labels=False), LabelledArrays())


def test_a_nan_score_stops_the_loop_before_the_sink_sees_the_batch():
    written = []
    sink = SimpleNamespace(write=lambda b, s: written.append(b.rows.tolist()), close=lambda: pytest.fail("closed after a failure"))
    scorer = Scorer(FirstPixel(), kept="nothing was written", where=lambda rows: f"images {[int(r) for r in rows]}")
    with pytest.raises(NonFiniteScores, match=r"for 1 image\(s\) of a batch \(images \[3\]\); nothing was written\. Try --precision fp32"):
        score_batches([batch([0], [1]), batch([2, 3], [2, 255])], scorer, sink)
    assert written == [[0]]


def test_the_tag_jobs_sink_writes_shards_through_the_same_loop(tmp_path):
    """ShardSink: the local engine's loop into the open shard's parts; close() says when a shard still expects rows."""
    from tagger.tag import writers
    from tagger.tag.rows import ShardRows, ShardSink
    from tagger.tag.shards import ShardCursor

    from .test_runner_parts import committer, make_manifest, make_plan

    manifest = make_manifest(tmp_path, ["", "", ""])
    plan = make_plan(rows=3, shard_size=2)
    partition, shards, _ = committer(tmp_path, manifest, plan)
    rows = ShardRows(partition, plan, manifest, ["colour"], "v1")
    reads = {0: 2, 1: 1}
    cursor = ShardCursor([0, 1], lambda s: rows.open(s, reads[s]), shards.commit)
    cursor.advance()
    sink = ShardSink(rows, cursor)
    with pytest.raises(RuntimeError, match=r"shard 1 still expects 1 row\(s\) after the last batch"):
        score_batches([batch([0], [1], error_rows=[1])], Scorer(FirstPixel()), sink)
    assert partition.done_shards() == {0}
    score_batches([batch([2], [2])], Scorer(FirstPixel()), sink)
    assert cursor.current is None and shards.all_done()
    shards.commit_partition(shards.shard_stats())
    tags = writers.read_complete_partition(partition.tags).sort_by("product_id")
    assert tags.column("colour").to_pylist() == ["blue", "green"] and tags.column("product_id").to_pylist() == ["p0", "p2"]
    assert writers.read_complete_partition(partition.errors).column("product_id").to_pylist() == ["p1"]
    assert pa.types.is_float32(tags.schema.field("colour_score").type)
