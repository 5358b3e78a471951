"""The tag runner's parts (tagger.tag), each alone: the typed plan, the shard committer on a tmp folder,
the shard cursor, the rows of a shard, the summary counts, the reader's rows and faults, the NaN guard."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from tagger.tag import writers
from tagger.tag.lease import LeaseLost
from tagger.data.manifest import Manifest
from tagger.tag.partition import Partition
from tagger.data.reader import TRANSIENT, Batch, StorageUnavailable
from tagger.tag.loader import WorkerFailure, check_transient, loop_failure, rows_to_read, write_rows
from tagger.tag.plan import Plan, PlanMismatch
from tagger.tag.model_part import NonFiniteScores, refuse_non_finite
from tagger.tag.rows import ShardRows
from tagger.tag.shards import ShardCommitter, ShardCursor
from tagger.tag.stop import Interrupted, StopFlag
from tagger.tag.summary import over_error_rate, partition_counts, summary_line

DATE = "2026-11-26"
ATTRIBUTES = ["gender", "baseColour"]


def make_plan(rows: int = 5, shard_size: int = 2, run_id: str = "run-a", since=None) -> Plan:
    return Plan(key={"format": 1, "manifest": "m", "model_version": "v1", "shard_size": shard_size, "since": None,
                     "max_image_pixels": 100}, run_id=run_id, rows=rows, num_shards=-(-rows // shard_size),
                shard_size=shard_size, catalog="catalog.csv", model="models/m", model_version="v1",
                attributes=list(ATTRIBUTES), created_at="2026-11-26T00:00:00+00:00", since=since)


def make_manifest(tmp_path, statuses: list[str]) -> Manifest:
    n = len(statuses)
    table = pa.table({
        "row": pa.array(np.arange(n), pa.int64()),
        "product_id": pa.array([f"p{i}" for i in range(n)], pa.string()),
        "image": pa.array([f"img/{i}.jpg" for i in range(n)], pa.string()),
        "status": pa.array(statuses, pa.string()),
        "message": pa.array([f"row {i + 1}: {s}" if s else "" for i, s in enumerate(statuses)], pa.string()),
    })
    return Manifest(str(tmp_path / "catalog.csv"), table, "fingerprint")


def batch(rows: list[int], error_rows: list[int] = (), error_type: str = "decode") -> Batch:
    return Batch(rows=np.asarray(rows, dtype=np.int64), versions=[f"v{r}" for r in rows], images=None,
                 error_rows=np.asarray(error_rows, dtype=np.int64), error_types=[error_type] * len(error_rows),
                 error_messages=[f"row {r + 1} bad" for r in error_rows], size=len(rows) + len(error_rows))


def predictions_for(n: int, score: float = 0.9):
    # indices: every row tagged (none out of its attribute's scope), as the Predictor's own predictions carry them
    return SimpleNamespace(scores={a: np.full(n, score, np.float32) for a in ATTRIBUTES},
                           indices={a: np.zeros(n, np.int64) for a in ATTRIBUTES})


def labels_for(n: int):
    return {a: np.asarray(["x"] * n, dtype=object) for a in ATTRIBUTES}


# -- the typed plan ----------------------------------------------------------------------------------
def test_plan_round_trips_through_plan_json(tmp_path):
    partition = Partition(str(tmp_path), DATE)
    plan = make_plan()
    plan.write(partition)
    body = json.loads((tmp_path / "_runs" / f"run_date={DATE}" / "plan.json").read_text())
    assert list(body) == ["key", "run_id", "rows", "num_shards", "shard_size", "catalog", "model", "model_version",
                          "attributes", "created_at"], "the keys plan.json always had, and no since without --since"
    assert Plan.read(partition) == plan
    with_since = make_plan(since={"since": "old", "reused": 3})
    with_since.write(partition)
    assert Plan.read(partition) == with_since and with_since.reuses and not plan.reuses
    assert Plan.from_dict({**plan.to_dict(), "added_later": 1}) == plan, "unknown keys are ignored"
    assert Plan.read(Partition(str(tmp_path / "elsewhere"), DATE)) is None


def test_plan_shards_and_facts():
    plan = make_plan(rows=7, shard_size=2)
    assert plan.num_shards == 4 and list(plan.shards()) == [0, 1, 2, 3]
    assert list(plan.shards((1, 3))) == [1] and list(plan.shards((0, 3))) == [0, 3]
    assert plan.facts() == {"run_id": "run-a", "rows": 7, "num_shards": 4, "model_version": "v1"}
    assert make_plan(since={"reused": 0}).facts()["since"] == {"reused": 0}


# -- shards: rows, cursor, committer -----------------------------------------------------------------
def committer(tmp_path, manifest, plan):
    partition = Partition(str(tmp_path / "out"), DATE)
    plan.write(partition)
    return partition, ShardCommitter(partition, plan), ShardRows(partition, plan, manifest, ATTRIBUTES, "v1")


def test_a_shard_commits_parts_then_marker_and_the_partition_success_last(tmp_path):
    manifest = make_manifest(tmp_path, ["", "", "", "invalid_row", ""])  # shards [0,1] [2,3] [4]
    plan = make_plan(rows=5, shard_size=2)
    partition, shards, rows = committer(tmp_path, manifest, plan)
    mine, pending = shards.pending(None)
    assert list(mine) == [0, 1, 2] and pending == [0, 1, 2]
    reads = {0: 2, 1: 1, 2: 1}
    cursor = ShardCursor(pending, lambda s: rows.open(s, reads[s]), shards.commit)
    cursor.advance()
    now = pa.scalar(0, pa.timestamp("us", tz="UTC")).as_py()
    rows.write_batch(cursor, batch([0, 2], error_rows=[1]), predictions_for(2), labels_for(2), now)
    assert partition.done_shards() == {0, 1} and cursor.current.index == 2, "a batch straddles shards; each commits when full"
    rows.write_batch(cursor, batch([4]), predictions_for(1), labels_for(1), now)
    assert cursor.current is None and shards.committed == 3 and shards.all_done()

    stats = shards.shard_stats()
    assert [s["rows"] for s in stats] == [2, 2, 1]
    assert stats[1]["error_types"] == {"invalid_row": 1}, "the manifest's verdicts go out when the shard opens"
    assert not partition.is_complete()
    shards.commit_partition(stats)
    tags = writers.read_complete_partition(partition.tags)
    errors = writers.read_complete_partition(partition.errors)
    assert sorted(tags.column("product_id").to_pylist()) == ["p0", "p2", "p4"]
    assert sorted(errors.column("error_type").to_pylist()) == ["decode", "invalid_row"]
    assert set(tags.column("run_id").to_pylist()) == {"run-a"} and tags.schema == writers.tags_schema(ATTRIBUTES)
    counts = partition_counts(plan, stats)
    assert (counts["tagged"], counts["errors"], counts["error_rate"]) == (3, 2, 0.4)


def test_needs_review_lists_the_attributes_under_their_thresholds_for_tagged_and_reused_rows(tmp_path):
    from tagger.tag.incremental import _write_reuse

    manifest = make_manifest(tmp_path, ["", "", "", ""])
    plan = make_plan(rows=4, shard_size=4, since={"reused": 2})
    partition = Partition(str(tmp_path / "out"), DATE)
    plan.write(partition)
    # Rows 2 and 3 carry over from an older partition: scores only, no needs_review (written before it existed).
    old = writers.tags_schema(ATTRIBUTES, review=False)
    carried = {f.name: pa.array([f"p{i}" if f.name == "product_id" else "v" for i in (2, 3)], f.type)
               for f in old if f.type == pa.string()}
    carried |= {"images_used": pa.array([1, 1], pa.int32()),
                "gender_score": pa.array([0.2, 0.9], pa.float32()), "baseColour_score": pa.array([0.5, 0.95], pa.float32()),
                "tagged_at": pa.array([0, 0], pa.timestamp("us", tz="UTC"))}
    _write_reuse(partition, pa.table({"row": pa.array([2, 3], pa.int64()), **{n: carried[n] for n in old.names}}), 4, None)
    shards = ShardCommitter(partition, plan)
    rows = ShardRows(partition, plan, manifest, ATTRIBUTES, "v1", review_thresholds={"gender": 0.3, "baseColour": 0.8})
    cursor = ShardCursor([0], lambda s: rows.open(s, 2), shards.commit)
    cursor.advance()
    scores = SimpleNamespace(scores={"gender": np.array([0.25, 0.3], np.float32), "baseColour": np.array([0.1, 0.8], np.float32)})
    rows.write_batch(cursor, batch([0, 1]), scores, labels_for(2), pa.scalar(0, pa.timestamp("us", tz="UTC")).as_py())
    stats = shards.shard_stats()
    shards.commit_partition(stats)

    tags = writers.read_complete_partition(partition.tags)
    assert tags.schema == writers.tags_schema(ATTRIBUTES)
    review = dict(zip(tags.column("product_id").to_pylist(), tags.column("needs_review").to_pylist()))
    assert review == {"p0": ["gender", "baseColour"], "p1": [], "p2": ["gender", "baseColour"], "p3": []}, \
        "under the threshold is flagged, on it is not; carried-over rows get the column from their scores"
    assert stats[0]["needs_review"] == {"rows": 2, "attributes": {"gender": 2, "baseColour": 2}}
    counts = partition_counts(plan, stats)
    assert counts["needs_review"] == {"rows": 2, "share": 0.5, "attributes": {"baseColour": 2, "gender": 2}}
    old_stats = [{k: v for k, v in s.items() if k != "needs_review"} for s in stats]
    assert partition_counts(plan, old_stats)["needs_review"]["rows"] == 0, "shards from before the column count nothing"


def test_fencing_refuses_a_commit_once_another_run_holds_the_partition(tmp_path):
    manifest = make_manifest(tmp_path, ["", ""])
    partition, shards, rows = committer(tmp_path, manifest, make_plan(rows=2, shard_size=2))
    output = rows.open(0, 2)
    make_plan(rows=2, shard_size=2, run_id="run-b").write(partition)  # another run replaced the plan
    with pytest.raises(LeaseLost, match="now holds run run-b"):
        shards.commit(output)
    output.tags.abort()
    output.errors.abort()
    assert partition.done_shards() == set() and not list((tmp_path / "out" / "tags").rglob("*.parquet"))


def test_finalizing_needs_every_shard_and_all_of_this_run(tmp_path):
    manifest = make_manifest(tmp_path, ["invalid_row"] * 4)
    partition, shards, rows = committer(tmp_path, manifest, make_plan(rows=4, shard_size=2))
    shards.commit(rows.open(0, 0))
    with pytest.raises(PlanMismatch, match=r"shard\(s\) 1 of 2 not done"):
        shards.shard_stats()
    partition.mark_shard_done(1, {"shard": 1, "run_id": "run-b"})
    with pytest.raises(LeaseLost, match="another run than run-a"):
        shards.shard_stats()


def test_a_shard_with_nothing_to_read_commits_on_the_spot(tmp_path):
    opened, committed = [], []

    def open_shard(s):
        opened.append(s)
        return SimpleNamespace(index=s, remaining=0 if s < 2 else 1)

    cursor = ShardCursor([0, 1, 2], open_shard, lambda out: committed.append(out.index))
    cursor.advance()
    assert opened == [0, 1, 2] and committed == [0, 1] and cursor.current.index == 2
    cursor.consumed(1)
    assert committed == [0, 1, 2] and cursor.current is None


# -- summary -----------------------------------------------------------------------------------------
def test_error_rate_gate_and_summary_line():
    assert over_error_rate({"rows": 100, "errors": 5}, 0.05) == ""
    assert "6 of 100 rows (6.0%) are errors" in over_error_rate({"rows": 100, "errors": 6}, 0.05)
    assert over_error_rate({"rows": 0, "errors": 0}, 0.0) == ""
    with pytest.raises(RuntimeError, match="shards account for 1 rows"):
        partition_counts(make_plan(rows=2), [{"rows": 1, "errors": 0, "error_types": {}, "tagged": 1, "reused": 0}])
    line = summary_line({"status": "succeeded", "run_date": DATE, "rows": 3, "tagged": 2, "errors": 1,
                         "this_process": {"images_per_second": 12.0}, "durations_s": {"total_s": 1.25}})
    assert line == f"succeeded: run_date={DATE} rows=3 tagged=2 errors=1 12.0 img/s 1.2s"
    line = summary_line({"status": "succeeded", "run_date": DATE, "rows": 3, "tagged": 2, "errors": 1,
                         "needs_review": {"rows": 1}, "durations_s": {"total_s": 1.25}})
    assert line == f"succeeded: run_date={DATE} rows=3 tagged=2 errors=1 needs_review=1 1.2s"


# -- the reader's rows and faults, the model's NaN guard ---------------------------------------------
def test_rows_to_read_skip_done_shards_and_judged_rows(tmp_path):
    manifest = make_manifest(tmp_path, ["", "duplicate_id", "", "", ""])
    partition = Partition(str(tmp_path / "out"), DATE)
    readable, reads = rows_to_read(manifest, make_plan(rows=5, shard_size=2), [0, 2], partition)
    assert readable.tolist() == [True, False, False, False, True] and reads.tolist() == [1, 0, 1]
    write_rows(str(tmp_path / "rows.arrow"), manifest, readable, chunk=2)
    table = pa.ipc.open_file(pa.memory_map(str(tmp_path / "rows.arrow"))).read_all()
    assert table.column("row").to_pylist() == [0, 4]
    assert table.column("location").to_pylist() == [str(tmp_path / "img/0.jpg"), str(tmp_path / "img/4.jpg")]


def test_loop_faults_are_typed():
    stop = StopFlag()
    with pytest.raises(StorageUnavailable, match="row 4: "):
        check_transient(batch([0], error_rows=[3], error_type=TRANSIENT))
    check_transient(batch([0], error_rows=[3]))
    assert isinstance(loop_failure(RuntimeError("DataLoader worker (pid 7) is killed by signal"), stop), WorkerFailure)
    assert loop_failure(ValueError("x"), stop) is None
    stop.event.set()
    assert isinstance(loop_failure(WorkerFailure("died of the SIGTERM"), stop), Interrupted), "a stop request wins"


def test_nan_scores_are_refused_naming_the_rows(tmp_path):
    manifest = make_manifest(tmp_path, ["", "", ""])
    predictions = predictions_for(3)
    refuse_non_finite(predictions, batch([0, 1, 2]), manifest)
    predictions.scores["gender"][1] = np.nan
    with pytest.raises(NonFiniteScores, match=r"manifest rows 2: product ids \['p1'\]"):
        refuse_non_finite(predictions, batch([0, 1, 2]), manifest)

