"""Fan-out: ``--plan-only`` once, then ``--shard I/N`` tasks in any order; the last one commits.

The union of the shard tasks' output must equal a single run's, row for row (less run-specific columns).
"""

from __future__ import annotations

import json

import polars as pl
import pytest
from click.testing import CliRunner

from jobs.cli import cli
from tagger.tag.writers import read_complete_partition

DATE = "2026-03-04"
SHARD_SIZE = "7"  # 50 catalog rows -> 8 shards, spread over 3 tasks as {0,3,6}, {1,4,7}, {2,5}


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def tag(*args: str):
    return invoke("tag", "--workers", "0", "--progress", "none", *args)


def read(out, table: str) -> pl.DataFrame:
    return pl.from_arrow(read_complete_partition(f"{out}/{table}/run_date={DATE}"))


def comparable(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.drop("run_id", "tagged_at", strict=False).sort("product_id")


@pytest.fixture()
def job(demo, tiny_bundle, tmp_path):
    out = tmp_path / "fan"
    base = ("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(out), "--run-date", DATE,
            "--shard-size", SHARD_SIZE)
    return out, base


@pytest.fixture(scope="module")
def single_run(demo, tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    result = tag("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(out), "--run-date", DATE,
                 "--shard-size", SHARD_SIZE)
    assert result.exit_code == 0, result.output
    return read(out, "tags"), read(out, "errors")


def state(out):
    return out / "_runs" / f"run_date={DATE}"


def success(out):
    return out / "tags" / f"run_date={DATE}" / "_SUCCESS"


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1)])
def test_shard_tasks_in_any_order_commit_once_and_equal_a_single_run(job, single_run, order):
    out, base = job
    planned = tag(*base, "--plan-only")
    assert planned.exit_code == 0, planned.output
    plan = json.loads((state(out) / "plan.json").read_text())
    assert plan["num_shards"] == 8 and plan["rows"] == 50
    assert not success(out).exists()

    for n, task in enumerate(order):
        result = tag(*base, "--shard", f"{task}/3")
        assert result.exit_code == 0, result.output
        last = n == len(order) - 1
        assert success(out).exists() == last, (task, result.output)
        summary = json.loads((state(out) / "summary.json").read_text())
        assert summary["status"] == ("succeeded" if last else "shards_done")
        assert summary["run_id"] == plan["run_id"]

    tags, errors = read(out, "tags"), read(out, "errors")
    single_tags, single_errors = single_run
    assert comparable(tags).equals(comparable(single_tags))
    assert comparable(errors).equals(comparable(single_errors))
    assert sorted(errors["error_type"].to_list()) == sorted(single_errors["error_type"].to_list())
    assert tags["run_id"].unique().to_list() == [plan["run_id"]]
    summary = json.loads((state(out) / "summary.json").read_text())
    assert summary["rows"] == 50 and summary["tagged"] == len(tags) and summary["errors"] == len(errors)
    success_body = json.loads(success(out).read_text())
    assert sorted(success_body["parts"]) == [f"part-{i:05d}.parquet" for i in range(8)]
    # Each shard's marker names the arithmetic its tags were computed in; the summary counts the tagged rows of each.
    assert len(summary["computed"]) == 1 and sum(summary["computed"].values()) == summary["tagged"]


def test_shard_tasks_computing_in_different_arithmetic_are_counted_apart(job):
    """Fan-out tasks on two kinds of CPU (one with native bf16, where `auto` may take a bundle's checked bf16):
    the partition is still one night, and its summary says which share of the tags each arithmetic made."""
    out, base = job
    assert tag(*base, "--plan-only").exit_code == 0
    assert tag(*base, "--shard", "0/2", "--runtime", "torch", "--precision", "fp32").exit_code == 0
    last = tag(*base, "--shard", "1/2", "--runtime", "torch", "--precision", "bf16")
    assert last.exit_code == 0, last.output
    summary = json.loads((state(out) / "summary.json").read_text())
    assert set(summary["computed"]) == {"torch fp32", "torch bf16"} and sum(summary["computed"].values()) == summary["tagged"]


def test_a_shard_task_that_runs_twice_writes_nothing_twice(job):
    out, base = job
    assert tag(*base, "--plan-only").exit_code == 0
    assert tag(*base, "--shard", "1/3").exit_code == 0
    again = tag(*base, "--shard", "1/3")  # e.g. the scheduler retried a task that had in fact finished
    assert again.exit_code == 0, again.output
    summary = json.loads((state(out) / "summary.json").read_text())
    assert summary["this_process"]["shards_committed"] == 0
    for task in (0, 2):
        assert tag(*base, "--shard", f"{task}/3").exit_code == 0
    tags = read(out, "tags")
    assert tags["product_id"].n_unique() == len(tags)


def test_finalize_refuses_while_shards_are_missing_then_commits(job, single_run):
    out, base = job
    assert tag(*base, "--plan-only").exit_code == 0
    assert tag(*base, "--shard", "0/3").exit_code == 0
    assert tag(*base, "--shard", "2/3").exit_code == 0

    refused = invoke("finalize", "--out", str(out), "--run-date", DATE)
    assert refused.exit_code != 0
    assert "shard(s) 1, 4, 7 of 8 not done" in refused.output, refused.output
    assert not success(out).exists()

    # A task that died before its shards: its shards are done by rerunning the task, then finalize commits.
    assert tag(*base, "--shard", "1/3").exit_code == 0  # being last, it commits by itself...
    assert success(out).exists()
    committed = success(out).read_text()
    again = invoke("finalize", "--out", str(out), "--run-date", DATE)  # ...and a finalize after that is harmless
    assert again.exit_code == 0, again.output
    assert "succeeded" in again.output
    assert json.loads(success(out).read_text())["parts"] == json.loads(committed)["parts"]
    assert comparable(read(out, "tags")).equals(comparable(single_run[0]))


def test_finalize_commits_when_the_last_task_could_not(job, single_run):
    out, base = job
    assert tag(*base, "--plan-only").exit_code == 0
    for task in range(3):
        assert tag(*base, "--shard", f"{task}/3").exit_code == 0
    # As if the last task was killed between its last shard marker and _SUCCESS.
    for table in ("tags", "errors"):
        (out / table / f"run_date={DATE}" / "_SUCCESS").unlink()
    result = invoke("finalize", "--out", str(out), "--run-date", DATE)
    assert result.exit_code == 0, result.output
    assert success(out).exists()
    summary = json.loads((state(out) / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["rows"] == 50
    assert comparable(read(out, "tags")).equals(comparable(single_run[0]))


def test_shard_without_a_plan_or_with_another_plan_is_refused(job, tmp_path):
    out, base = job
    result = tag(*base, "--shard", "0/3")
    assert result.exit_code == 2 and "--plan-only" in result.output
    assert tag(*base, "--plan-only").exit_code == 0
    other = tag(*base[:-1], "5", "--shard", "0/3")  # another --shard-size: another plan
    assert other.exit_code == 2 and "--plan-only" in other.output


def test_finalize_without_a_plan_is_refused(tmp_path):
    result = invoke("finalize", "--out", str(tmp_path / "nothing"), "--run-date", DATE)
    assert result.exit_code == 2 and "no plan" in result.output


def test_plan_only_with_shard_is_refused(job):
    _, base = job
    result = tag(*base, "--plan-only", "--shard", "0/3")
    assert result.exit_code == 2


@pytest.mark.parametrize("how", ["resume", "finalize"])
def test_a_lost_committed_part_is_tagged_again_never_published(job, single_run, how):
    """A done marker is a claim about files: resume and finalize check it against a listing (each part there,
    at the size it was committed with). A shard whose part is gone is tagged again by the next run, never
    listed in a _SUCCESS over rows that do not exist."""
    out, base = job
    assert tag(*base).exit_code == 0
    for table in ("tags", "errors"):  # as a run killed just before its _SUCCESS would have left it
        (out / table / f"run_date={DATE}" / "_SUCCESS").unlink()
    lost = out / "tags" / f"run_date={DATE}" / "part-00003.parquet"
    lost.unlink()
    marker = state(out) / "shards" / "00003.json"
    assert "bytes" in json.loads(marker.read_text())
    if how == "finalize":
        refused = invoke("finalize", "--out", str(out), "--run-date", DATE)
        assert refused.exit_code == 2, refused.output
        assert "shard 3: tags/part-00003.parquet is missing" in refused.output and "run the same tag command again" in refused.output
        assert not success(out).exists() and not marker.exists()
    result = tag(*base)
    assert result.exit_code == 0, result.output
    assert lost.exists() and success(out).exists()
    assert json.loads((state(out) / "summary.json").read_text())["this_process"]["shards_committed"] == 1
    assert comparable(read(out, "tags")).equals(comparable(single_run[0]))
    assert comparable(read(out, "errors")).equals(comparable(single_run[1]))


def test_a_part_cut_short_after_its_commit_is_tagged_again(job, single_run):
    out, base = job
    assert tag(*base).exit_code == 0
    for table in ("tags", "errors"):
        (out / table / f"run_date={DATE}" / "_SUCCESS").unlink()
    part = out / "errors" / f"run_date={DATE}" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:-10])
    result = tag(*base)
    assert result.exit_code == 0, result.output
    assert comparable(read(out, "errors")).equals(comparable(single_run[1]))
