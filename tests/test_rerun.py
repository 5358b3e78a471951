"""The morning after a failed night: a re-run with the missing option fixed tags the date (tagger/tag/plan.py),
and the one-line summary says what went wrong without opening the errors table (tagger/tag/summary.py)."""

from __future__ import annotations

import csv
import json
from io import BytesIO
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from jobs.cli import cli
from tagger.tag.writers import read_complete_partition

from .http_server import PhotoServer

DATE = "2026-06-01"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cdn")
    rng = np.random.default_rng(1)
    for index in range(4):
        buffer = BytesIO()
        Image.new("RGB", (48, 64), tuple(int(v) for v in rng.integers(0, 255, 3))).save(buffer, "JPEG", quality=90)
        (folder / f"p{index}.jpg").write_bytes(buffer.getvalue())
    return folder


@pytest.fixture()
def server(photos):
    server = PhotoServer(photos).start()
    yield server
    server.stop()


def catalog(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["product_id", "image"])
        writer.writerows(rows)
    return path


def tag(catalog: Path, model: str, out: Path, *extra: str):
    args = ["tag", "--catalog", str(catalog), "--model", model, "--out", str(out), "--run-date", DATE, "--workers", "0",
            "--progress", "none", *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_a_night_that_failed_for_a_missing_option_is_tagged_by_the_same_command_with_it(server, tiny_bundle, tmp_path):
    rows = [(f"p{i}", f"{server.url}/img/p{i}.jpg") for i in range(4)]
    manifest = catalog(tmp_path / "catalog.csv", rows)
    out = tmp_path / "out"
    loopback = ["--allow-host", "127.0.0.1:*", "--allow-private-addresses"]
    failed = tag(manifest, tiny_bundle, out, *loopback)
    assert failed.exit_code == 3, failed.output
    line = failed.output.strip().splitlines()[-1]
    assert "errors=4 (invalid_location 4)" in line and "re-run the same command with --allow-plain-http" in line, line
    assert server.requests == [], "plain http:// is refused before any request"
    again = tag(manifest, tiny_bundle, out, *loopback)
    assert again.exit_code == 3, "the same command replays the same failure"

    fixed = tag(manifest, tiny_bundle, out, *loopback, "--allow-plain-http")
    assert fixed.exit_code == 0, fixed.output
    tagged = read_complete_partition(f"{out}/tags/run_date={DATE}")
    errors = read_complete_partition(f"{out}/errors/run_date={DATE}")
    assert sorted(tagged.column("product_id").to_pylist()) == ["p0", "p1", "p2", "p3"] and errors.num_rows == 0
    plan = json.loads((out / "_runs" / f"run_date={DATE}" / "plan.json").read_text())
    assert plan["key"]["allow_plain_http"] is True and plan["key"]["allow_hosts"] == ["127.0.0.1:*"]


def test_a_plan_written_before_the_reading_options_were_recorded_resumes_under_the_defaults(demo, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    manifest = demo.catalog
    first = tag(manifest, tiny_bundle, out, "--shard-size", "16", "--max-error-rate", "1", "--plan-only")
    assert first.exit_code == 0, first.output
    plan_file = out / "_runs" / f"run_date={DATE}" / "plan.json"
    plan = json.loads(plan_file.read_text())
    assert not {"allow_hosts", "allow_plain_http", "allow_private_addresses", "max_image_bytes"} & set(plan["key"])
    resumed = tag(manifest, tiny_bundle, out, "--shard-size", "16", "--max-error-rate", "1")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(plan_file.read_text())["run_id"] == plan["run_id"], "the older plan was resumed, not replaced"


def test_the_log_names_each_error_type_and_photo_errors_of_tagged_products_are_counted(server, tiny_bundle, tmp_path,
                                                                                      caplog):
    # Four products of two photos each; every second photo a 404: all are tagged from their other photo. One more
    # product has a file that is not there and one a host that is not allowed.
    rows = [(f"p{i}", f"{server.url}/img/p{i}.jpg;{server.url}/img/gone{i}.jpg") for i in range(4)]
    rows += [("lost", str(tmp_path / "nowhere.jpg")), ("away", "http://localhost:1/x.jpg")]
    manifest = catalog(tmp_path / "catalog.csv", rows)
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="tagger.tag.runner"):
        result = tag(manifest, tiny_bundle, out, "--allow-host", "127.0.0.1:*", "--allow-private-addresses",
                     "--allow-plain-http", "--image-separator", ";", "--max-error-rate", "1")
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    assert "tagged=4 reused=0 errors=2 (invalid_location 1, missing 1)" in line, line
    assert "photo_errors=6 (missing 5, invalid_location 1)" in line, line
    summary = json.loads((out / "_runs" / f"run_date={DATE}" / "summary.json").read_text())
    assert summary["photo_errors"] == {"invalid_location": 1, "missing": 5}
    assert summary["error_examples"]["missing"].startswith("lost: ")
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("error invalid_location: 1 rows; first: away: http://localhost:1/x.jpg") for m in logged), logged
    assert any(m.startswith("photo error missing: 5 photos; first: p0: ") and "gone0.jpg" in m for m in logged), logged
    report = CliRunner().invoke(cli, ["report", "--out", str(out), "--run-date", DATE, "--gallery", "0"], catch_exceptions=False)
    assert report.exit_code == 0, report.output
    body = json.loads((out / "_reports" / f"run_date={DATE}" / "report.json").read_text())
    assert body["counts"]["photo_errors"] == {"invalid_location": 1, "missing": 5}
    assert "photos not read: missing" in (out / "_reports" / f"run_date={DATE}" / "report.html").read_text()


def test_a_shard_task_with_other_reading_options_than_its_plan_is_refused_naming_them(demo, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    assert tag(demo.catalog, tiny_bundle, out, "--plan-only").exit_code == 0
    result = tag(demo.catalog, tiny_bundle, out, "--shard", "0/1", "--max-image-bytes", "1000")
    assert result.exit_code == 2, result.output
    assert "the plan's settings differ: max_image_bytes default -> 1000" in result.output, result.output


def test_the_cdn_header_names_are_part_of_the_plan_and_never_their_values(monkeypatch):
    from tagger.tag.config import TagConfig
    from tagger.tag.plan import reading_key

    config = dict(catalog="c.csv", model="m", out="o", allow_hosts=("cdn.example.com",))
    assert reading_key(TagConfig(**config)) == {"allow_hosts": ["cdn.example.com"]}
    monkeypatch.setenv("TAGGER_HTTP_HEADERS", json.dumps({"Authorization": "Bearer s3cr3t"}))
    key = reading_key(TagConfig(**config))
    assert key == {"allow_hosts": ["cdn.example.com"], "http_headers": ["authorization"]}
    assert "s3cr3t" not in json.dumps(key)


# -- a re-run that replaces a complete night keeps it readable until it commits ----------------------------------
def night(out: Path) -> dict:
    """What readers of the date see: the rows the partition's _SUCCESS lists, the same through the documented index
    (tags/_partitions.json), and the committed run's summary; each table's files with what _SUCCESS lists."""
    from tagger.tag.partition import Partition

    seen = {}
    for table in ("tags", "errors"):
        rows = read_complete_partition(f"{out}/{table}/run_date={DATE}").sort_by("product_id")
        index = json.loads((out / table / "_partitions.json").read_text())
        parts = [pq.ParquetFile(out / table / name).read() for name in index["files"]]
        assert pa.concat_tables(parts).sort_by("product_id").equals(rows), "the index reads other rows than _SUCCESS"
        success = json.loads((out / table / f"run_date={DATE}" / "_SUCCESS").read_text())
        seen[table] = rows.to_pylist()
        seen[f"{table} files"] = index["files"]
        seen[f"{table} run"] = success["run_id"]
    seen["summary"] = Partition(str(out), DATE).committed_state("summary.json")
    return seen


def report(out: Path) -> dict:
    result = CliRunner().invoke(cli, ["report", "--out", str(out), "--run-date", DATE, "--gallery", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    body = json.loads((out / "_reports" / f"run_date={DATE}" / "report.json").read_text())
    return {"run_id": body["run_id"], "counts": body["counts"]}


def files(out: Path, table: str) -> list[str]:
    return sorted(p.name for p in (out / table / f"run_date={DATE}").iterdir())


def without_run(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("run_id", "tagged_at")} for row in rows]


def test_a_rerun_that_fails_keeps_the_complete_night_readable_and_one_that_commits_replaces_it(demo, tiny_bundle, tmp_path,
                                                                                              monkeypatch):
    out = tmp_path / "out"
    args = ("--shard-size", "20")  # 50 rows, 3 shards
    assert tag(demo.catalog, tiny_bundle, out, *args).exit_code == 0
    # The layout every release before wrote (and a first run still writes): plain part names, no replace facts.
    assert files(out, "tags") == ["_SUCCESS", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    plan = json.loads((out / "_runs" / f"run_date={DATE}" / "plan.json").read_text())
    assert not {"replaces", "part_suffix"} & set(plan)
    first, first_report = night(out), report(out)
    kept = f"the previous complete output of {DATE} (run {plan['run_id']}) is kept until a run commits"

    # Every photo refused (a --max-image-bytes far too small): exit 3, the night before is still there.
    refused = tag(demo.catalog, tiny_bundle, out, *args, "--max-image-bytes", "100")
    assert refused.exit_code == 3, refused.output
    assert kept in refused.output.strip().splitlines()[-1], refused.output
    assert night(out) == first and report(out) == first_report
    failed = json.loads((out / "_runs" / f"run_date={DATE}" / "summary.json").read_text())
    assert failed["status"] == "failed" and failed["replaces"] == plan["run_id"], "the failed run's own summary"

    # Another setting again, and a crash after its first shard: still the first night, and the same command resumes.
    from tagger.tag.shards import ShardCommitter

    commit = ShardCommitter.commit

    def crash_after_one(self, output):
        if self.committed == 1:
            raise RuntimeError("the machine went away")
        commit(self, output)

    monkeypatch.setattr(ShardCommitter, "commit", crash_after_one)
    crashed = tag(demo.catalog, tiny_bundle, out, *args, "--max-image-bytes", "20000000")
    assert crashed.exit_code == 1 and kept in crashed.output.strip().splitlines()[-1], crashed.output
    assert night(out) == first and report(out) == first_report
    monkeypatch.setattr(ShardCommitter, "commit", commit)
    resumed = tag(demo.catalog, tiny_bundle, out, *args, "--max-image-bytes", "20000000")
    assert resumed.exit_code == 0, resumed.output
    second = night(out)
    run = second["tags run"]
    assert run != plan["run_id"] and second["errors run"] == run and second["summary"]["run_id"] == run
    assert second["summary"]["this_process"]["shards_committed"] == 2, "the crashed run was resumed, not started over"
    assert without_run(second["tags"]) == without_run(first["tags"]) and without_run(second["errors"]) == without_run(first["errors"])
    assert {row["run_id"] for row in second["tags"] + second["errors"]} == {run}
    # Only the new run's parts are left, under names of their own; the kept plan and summary are gone.
    for table in ("tags", "errors"):
        names = files(out, table)
        success = json.loads((out / table / f"run_date={DATE}" / "_SUCCESS").read_text())
        assert names == sorted(["_SUCCESS", *success["parts"]]) and len(success["parts"]) == 3, names
        assert not {"part-00000.parquet", "part-00001.parquet", "part-00002.parquet"} & set(names)
    assert not (out / "_runs" / f"run_date={DATE}" / "committed").exists()
    assert report(out)["run_id"] == run

    # A night written in the new layout is replaced the same way.
    third = tag(demo.catalog, tiny_bundle, out, *args)
    assert third.exit_code == 0, third.output
    replaced = night(out)
    assert replaced["tags run"] not in (run, plan["run_id"]) and without_run(replaced["tags"]) == without_run(first["tags"])
    assert not set(second["tags files"]) & set(replaced["tags files"]) and len(files(out, "tags")) == 4


def test_a_fanned_out_rerun_keeps_the_night_until_its_last_shard_task_commits(demo, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    args = ("--shard-size", "20")
    assert tag(demo.catalog, tiny_bundle, out, *args).exit_code == 0
    first = night(out)
    other = ("--max-image-bytes", "20000000")
    assert tag(demo.catalog, tiny_bundle, out, *args, *other, "--plan-only").exit_code == 0
    assert night(out) == first
    task = tag(demo.catalog, tiny_bundle, out, *args, *other, "--shard", "0/2")
    assert task.exit_code == 0 and "other shards still running" in task.output, task.output
    assert night(out) == first, "a shard task of the re-run changes nothing readers see"
    last = tag(demo.catalog, tiny_bundle, out, *args, *other, "--shard", "1/2")
    assert last.exit_code == 0 and "succeeded" in last.output, last.output
    replaced = night(out)
    assert replaced["tags run"] != first["tags run"] and without_run(replaced["tags"]) == without_run(first["tags"])
    assert files(out, "tags") == sorted(["_SUCCESS", *(f.split("/")[-1] for f in replaced["tags files"])])
