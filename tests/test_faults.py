"""Faults during a run: real signals to a real ``tagger tag`` process, a dying worker, S3 that fails.

Invariant checked throughout: every manifest row ends in exactly one row of ``tags`` or ``errors``; a
resumed run gives what an uninterrupted one gives; ``_SUCCESS`` never stands over missing rows; nothing
hangs (every wait here has a deadline).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from jobs.cli import cli
from tagger.tag.writers import SUCCESS_FILE, read_complete_partition, write_success

from .conftest import upload_tree
from .faults import S3FaultProxy, children, kill_quietly, wait_for

pytestmark = pytest.mark.slow

DATE = "2026-05-06"
TAGGER = str(Path(sys.executable).parent / "tagger")
ROWS = 200
SHARD = 10


# -- a catalog slow enough to interrupt ------------------------------------------------------------
@pytest.fixture(scope="module")
def catalog(demo, tmp_path_factory) -> Path:
    """ROWS rows over the demo images, every fourth one a large noisy PNG (several ms to decode, so that a
    run lasts a second or more even on a fast machine), with the demo's missing and corrupt images among them."""
    root = tmp_path_factory.mktemp("faults-catalog")
    rng = np.random.default_rng(0)
    big = []
    for index in range(4):
        path = root / f"big-{index}.png"
        Image.fromarray(rng.integers(0, 255, (800, 800, 3), dtype=np.uint8)).save(path, compress_level=1)
        big.append(str(path))
    with open(demo.catalog, newline="") as handle:
        demo_images = [str(Path(demo.root, r["image"])) for r in csv.DictReader(handle)]
    path = root / "catalog.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("product_id", "image"))
        for row in range(ROWS):
            image = big[row // 4 % len(big)] if row % 4 == 0 else demo_images[row % len(demo_images)]
            writer.writerow((f"p{row:04d}", image))
    return path


def command(catalog: Path, model: str, out: Path, *extra: str) -> list[str]:
    return [TAGGER, "tag", "--catalog", str(catalog), "--model", model, "--out", str(out), "--run-date", DATE,
            "--shard-size", str(SHARD), "--batch-size", "4", "--max-error-rate", "0.5", "--progress", "none", *extra]


def start(args: list[str], logs: Path) -> subprocess.Popen:
    logs.parent.mkdir(parents=True, exist_ok=True)
    # Its own process group, as a scheduler would start it; output to a file, so no pipe can fill up.
    return subprocess.Popen(args, stdout=open(logs, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 120) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise AssertionError(f"tagger did not finish within {timeout}s: it hangs") from None


def markers(out: Path) -> list[str]:
    folder = out / "_runs" / f"run_date={DATE}" / "shards"
    return sorted(p.name for p in folder.glob("*.json")) if folder.exists() else []


def success(out: Path) -> bool:
    return any((out / table / f"run_date={DATE}" / SUCCESS_FILE).exists() for table in ("tags", "errors"))


def worker_pids(pid: int) -> list[int]:
    """The DataLoader workers of ``pid``: its children running the same program (not a resource tracker)."""
    try:
        own = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return []
    found = []
    for child in children(pid):
        try:
            if Path(f"/proc/{child}/cmdline").read_bytes() == own:
                found.append(child)
        except FileNotFoundError:
            continue
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def comparable(out: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    tags = pl.from_arrow(read_complete_partition(f"{out}/tags/run_date={DATE}")).drop("run_id", "tagged_at").sort("product_id")
    errors = pl.from_arrow(read_complete_partition(f"{out}/errors/run_date={DATE}")).drop("run_id").sort("product_id")
    return tags, errors


def assert_same_rows(tags: pl.DataFrame, expected: pl.DataFrame) -> None:
    """Equal, scores within 1e-5: CPU kernels differ in the last bits with the batch an image falls in."""
    scores = [c for c in expected.columns if c.endswith("_score")]
    assert tags.drop(scores).equals(expected.drop(scores)), "tags differ from an uninterrupted run"
    for column in scores:
        assert np.allclose(tags[column].to_numpy(), expected[column].to_numpy(), atol=1e-5), column


def assert_complete_and_equal(out: Path, baseline) -> None:
    tags, errors = comparable(out)
    assert tags["product_id"].n_unique() == tags.height and errors["product_id"].n_unique() == errors.height
    assert tags.height + errors.height == ROWS
    assert_same_rows(tags, baseline[0])
    assert errors.equals(baseline[1]), "errors differ from an uninterrupted run"
    # Exactly the committed files: no temporary file left behind by the killed writer.
    for table in ("tags", "errors"):
        names = sorted(p.name for p in (out / table / f"run_date={DATE}").iterdir())
        assert names == sorted([SUCCESS_FILE] + [f"part-{i:05d}.parquet" for i in range(ROWS // SHARD)]), names


@pytest.fixture(scope="module")
def baseline(catalog, tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline") / "out"
    result = CliRunner().invoke(cli, command(catalog, tiny_bundle, out, "--workers", "0")[1:], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    tags, errors = comparable(out)
    assert tags.height + errors.height == ROWS and errors.height > 0
    return tags, errors


# -- signals -----------------------------------------------------------------------------------------
def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(catalog, tiny_bundle, baseline, tmp_path):
    out = tmp_path / "out"
    args = command(catalog, tiny_bundle, out, "--workers", "1")
    process = start(args, tmp_path / "killed.log")
    wait_for(lambda: markers(out) or process.poll() is not None, 120, 0.005, "a first shard marker")
    workers = worker_pids(process.pid)
    os.kill(process.pid, signal.SIGKILL)  # the main process only, as the out-of-memory killer would
    process.wait(timeout=30)
    done = markers(out)
    assert 1 <= len(done) < ROWS // SHARD, f"the run was not interrupted mid-way ({len(done)} shards done)"
    assert not success(out), "_SUCCESS written by a run that did not finish"
    # Orphaned workers notice their parent is gone and exit by themselves.
    wait_for(lambda: not any(alive(pid) for pid in workers), 30, 0.2, "orphaned DataLoader workers to exit")

    rerun = start(args, tmp_path / "rerun.log")
    assert finish(rerun) == 0, (tmp_path / "rerun.log").read_text()
    summary = json.loads((out / "_runs" / f"run_date={DATE}" / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["rows"] == ROWS
    assert summary["this_process"]["shards_committed"] == ROWS // SHARD - len(done), "finished shards were redone"
    assert_complete_and_equal(out, baseline)


def test_sigterm_stops_gracefully_and_the_rerun_completes(catalog, tiny_bundle, baseline, tmp_path):
    out = tmp_path / "out"
    args = command(catalog, tiny_bundle, out, "--workers", "2")
    process = start(args, tmp_path / "terminated.log")
    wait_for(lambda: markers(out) or process.poll() is not None, 120, 0.005, "a first shard marker")
    os.killpg(process.pid, signal.SIGTERM)  # the whole group, workers included, as a scheduler does
    code = finish(process, 60)
    log = (tmp_path / "terminated.log").read_text()
    assert code == 143, log
    assert "interrupted: stopped by SIGTERM" in log and "committed shards are kept" in log
    assert "Traceback" not in log
    done = markers(out)
    assert 1 <= len(done) < ROWS // SHARD
    assert not success(out)
    partition = out / "tags" / f"run_date={DATE}"
    assert sorted(p.name for p in partition.iterdir()) == [f"part-{int(m[:5]):05d}.parquet" for m in done], \
        "a graceful stop keeps exactly the finished shards, and cleans up the open one"

    rerun = start(args, tmp_path / "rerun.log")
    assert finish(rerun) == 0, (tmp_path / "rerun.log").read_text()
    assert_complete_and_equal(out, baseline)


def test_a_worker_that_dies_is_reported_and_nothing_hangs(catalog, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    process = start(command(catalog, tiny_bundle, out, "--workers", "2"), tmp_path / "worker.log")
    workers = wait_for(lambda: (markers(out) and worker_pids(process.pid)) or process.poll() is not None, 120, 0.005,
                       "a worker, mid-run")
    assert process.poll() is None, "the run finished before a worker could be killed"
    os.kill(workers[0], signal.SIGKILL)
    code = finish(process, 60)
    log = (tmp_path / "worker.log").read_text()
    assert code == 1, log
    # torch says it one of several ways ("is killed by signal: Killed", "exited unexpectedly"), or the pipe
    # under the queue breaks first; each way names the worker and says the shards are kept.
    assert "tagger tag: failed: an image-reading worker failed: " in log and str(workers[0]) in log
    assert "committed shards are kept" in log
    assert not success(out)
    for pid in workers:
        kill_quietly(pid)


# -- S3 that fails -----------------------------------------------------------------------------------
def s3_tag(*args: str):
    return CliRunner().invoke(cli, ["tag", "--progress", "none", "--workers", "0", "--run-date", DATE, *args], catch_exceptions=False)


@pytest.fixture()
def s3_catalog(demo, s3_endpoint, s3_bucket):
    bucket, fs = s3_bucket
    upload_tree(fs, demo.root / "catalog_images", f"{bucket}/catalog/catalog_images")
    fs.put_file(str(demo.catalog), f"{bucket}/catalog/catalog.csv")
    with open(demo.catalog, newline="") as handle:
        images = [r["image"] for r in csv.DictReader(handle)]
    with S3FaultProxy(s3_endpoint) as proxy:
        yield bucket, fs, proxy, images


def test_transient_s3_errors_are_retried_and_the_run_succeeds(s3_catalog, tiny_bundle, tmp_path):
    bucket, fs, proxy, images = s3_catalog
    key = f"/{bucket}/catalog/"
    proxy.fail(key + images[0], status=503, method="GET", times=2)  # SlowDown, twice
    proxy.fail(key + images[1], status=500, method="HEAD", times=1)  # InternalError
    proxy.reset(key + images[2], method="GET", times=1)  # connection reset
    proxy.fail(f"/{bucket}/out/tags/run_date={DATE}/part-", status=503, method="PUT", times=1)  # a write throttled
    proxy.deny(key + images[3])  # and one the credentials may not read: an error row, not a retry
    out = f"s3://{bucket}/out"
    result = s3_tag("--catalog", f"s3://{bucket}/catalog/catalog.csv", "--model", tiny_bundle, "--out", out,
                    "--max-error-rate", "0.5", "--storage-option", f"endpoint_url={proxy.url}")
    assert result.exit_code == 0, result.output
    assert [rule.hits for rule in proxy.rules[:4]] == [2, 1, 1, 1], "every injected fault was served"
    assert proxy.rules[4].hits >= 1
    tags = pl.from_arrow(read_complete_partition(f"{out}/tags/run_date={DATE}", {"endpoint_url": proxy.url}))
    errors = pl.from_arrow(read_complete_partition(f"{out}/errors/run_date={DATE}", {"endpoint_url": proxy.url}))
    assert tags.height + errors.height == len(images)
    assert sorted(errors["error_type"].to_list()) == ["decode", "forbidden", "missing"]
    assert set(tags["image"]) >= set(images[:3])


FAST_FAIL = ("--storage-option", 'config_kwargs.retries={"max_attempts": 2, "mode": "standard"}',
             "--storage-option", "config_kwargs.connect_timeout=1", "--storage-option", "config_kwargs.read_timeout=1")


@pytest.mark.parametrize("fault", ["503", "stall"])
def test_s3_that_stays_down_fails_with_exit_4_in_bounded_time(s3_catalog, tiny_bundle, tmp_path, fault):
    bucket, fs, proxy, images = s3_catalog
    options = FAST_FAIL
    if fault == "503":
        proxy.fail(f"/{bucket}/catalog/catalog_images/", status=503)  # every image request, for ever
    else:
        # Accepted, never answered: each attempt ends in a read timeout; one retry of 1 s here, and the
        # deadline of tagger.storage.read_deadline keeps s3fs's nested retries from multiplying it.
        proxy.stall(f"/{bucket}/catalog/catalog_images/", method="GET", seconds=10)
        options = (*FAST_FAIL, "--storage-option", 'config_kwargs.retries={"max_attempts": 1, "mode": "standard"}')
    out = tmp_path / "out"
    started = time.monotonic()
    result = s3_tag("--catalog", f"s3://{bucket}/catalog/catalog.csv", "--model", tiny_bundle, "--out", str(out),
                    "--shard-size", "8", "--batch-size", "4", "--storage-option", f"endpoint_url={proxy.url}", *options)
    elapsed = time.monotonic() - started
    assert result.exit_code == 4, result.output
    assert "storage unavailable" in result.output and "running the same command again resumes" in result.output
    assert elapsed < 45, f"took {elapsed:.0f}s to give up"
    # The first failed read stops the reading: the rows after it are not each retried in turn.
    image_requests = {path for _, path, _ in proxy.requests(path="/catalog_images/")}
    assert len(image_requests) == 1, image_requests
    assert not success(out) and markers(out) == []
    assert not list((out / "tags" / f"run_date={DATE}").glob("*")), "nothing written for the open shard"


def test_s3_down_from_the_start_is_exit_4(tiny_bundle, tmp_path):
    from .conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = s3_tag("--catalog", "s3://some-bucket/catalog.csv", "--model", tiny_bundle, "--out", str(tmp_path / "out"),
                    "--storage-option", f"endpoint_url={dead}", *FAST_FAIL)
    assert result.exit_code == 4, result.output
    assert "storage unavailable" in result.output and "Traceback" not in result.output


# -- the commit protocol -----------------------------------------------------------------------------
def test_read_complete_partition_reads_exactly_the_listed_parts(tmp_path):
    partition = tmp_path / "tags" / f"run_date={DATE}"
    partition.mkdir(parents=True)
    for index, ids in enumerate((["a", "b"], ["c"], ["x-stray"])):
        pq.write_table(pa.table({"product_id": ids}), partition / f"part-{index:05d}.parquet")
    (partition / ".part-00003.parquet.tmp-1234").write_bytes(b"half a file")

    with pytest.raises(FileNotFoundError, match="no _SUCCESS; the partition is incomplete"):
        read_complete_partition(str(partition))

    write_success(str(partition), {"part-00000.parquet": 2, "part-00001.parquet": 1}, {"run_id": "r"})
    body = json.loads((partition / SUCCESS_FILE).read_text())
    assert body["rows"] == 3 and body["parts"] == {"part-00000.parquet": 2, "part-00001.parquet": 1}
    assert sorted(read_complete_partition(str(partition)).column("product_id").to_pylist()) == ["a", "b", "c"]


def test_success_lists_every_part_with_its_rows(demo, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    result = s3_tag("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(out), "--shard-size", "20")
    assert result.exit_code == 0, result.output
    for table in ("tags", "errors"):
        partition = out / table / f"run_date={DATE}"
        body = json.loads((partition / SUCCESS_FILE).read_text())
        assert sorted(body["parts"]) == sorted(p.name for p in partition.glob("part-*.parquet"))
        for name, rows in body["parts"].items():
            assert pq.read_metadata(partition / name).num_rows == rows
        assert body["rows"] == read_complete_partition(str(partition)).num_rows
    # errors/_SUCCESS is written before tags/_SUCCESS: a reader that sees the tags marker sees both whole.
    assert (out / "errors" / f"run_date={DATE}" / SUCCESS_FILE).stat().st_mtime_ns <= \
        (out / "tags" / f"run_date={DATE}" / SUCCESS_FILE).stat().st_mtime_ns

