"""Issue 12, failure 1: a run owns its partition. Two runs of one --out and --run-date never both commit.

The lease itself (tagger.tag.lease) on local disk and on S3 (moto: conditional PUT), then real concurrent
``tagger tag`` processes: the loser changes nothing and exits 5; a run whose lease is taken over mid-run stops
at its next commit (fencing) and never writes ``_SUCCESS``.
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

import polars as pl
import pytest

from tagger.tag.lease import Lease, LeaseHeld, LeaseLost, lease_folder
from tagger.tag.writers import SUCCESS_FILE, read_complete_partition

from .faults import wait_for

DATE = "2026-07-08"
TAGGER = str(Path(sys.executable).parent / "tagger")


class Clock:
    """A wall clock the test moves by hand: staleness is decided from it, never from sleeping."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def leases(folder: str, n: int, clock, ttl: float = 60.0, options=None) -> list[Lease]:
    return [Lease(folder, options, ttl=ttl, run=f"run-{i}", clock=clock) for i in range(n)]


def test_one_owner_at_a_time_then_release_hands_over(tmp_path):
    first, second = leases(lease_folder(str(tmp_path), DATE), 2, Clock())
    first.acquire()
    with pytest.raises(LeaseHeld, match=r"owned by run run-0 .*pid %d" % os.getpid()):
        second.acquire()
    first.check()
    first.release()
    second.acquire()
    second.check()
    with pytest.raises(LeaseLost):
        first.check()
    second.release()


def test_a_stale_lease_is_taken_over_and_the_old_owner_is_fenced(tmp_path):
    clock = Clock()
    folder = lease_folder(str(tmp_path), DATE)
    old, new = leases(folder, 2, clock, ttl=60)
    old.acquire()
    old._stop.set()  # the old owner hangs: no more heartbeats
    clock.now += 30
    with pytest.raises(LeaseHeld, match="last heartbeat 30s ago, ttl 60s"):
        new.acquire()
    clock.now += 31  # past the ttl
    new.acquire()
    assert new.generation == old.generation + 1
    with pytest.raises(LeaseLost, match="taken over by run run-1"):
        old.check()
    old.release()  # a fenced owner's release leaves the new owner's lease alone
    new.check()
    new.release()


def test_a_lease_left_by_a_dead_process_on_this_host_is_taken_at_once(tmp_path):
    folder = lease_folder(str(tmp_path), DATE)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    holder, taker = leases(folder, 2, Clock())
    holder.facts.update(pid=pid, pid_start="1")  # as the killed run wrote it
    holder.acquire()
    holder._stop.set()
    taker.acquire()  # the heartbeat is fresh, but its process is gone
    assert taker.generation == 2


def test_waiting_for_the_owner_to_release(tmp_path):
    import threading

    folder = lease_folder(str(tmp_path), DATE)
    owner, waiter = leases(folder, 2, Clock())
    owner.acquire()
    released = threading.Timer(0.3, owner.release)
    released.start()
    waiter.acquire(wait=120, poll=0.05)  # returns as soon as the owner released, long before the wait is over
    released.join()
    waiter.check()
    waiter.release()


def test_two_contenders_for_one_generation_exactly_one_wins(tmp_path):
    from tagger import storage

    url = str(tmp_path / "lease" / "00000001.json")
    assert storage.create_exclusive(url, b"a")
    assert not storage.create_exclusive(url, b"b")
    assert Path(url).read_bytes() == b"a"
    assert sorted(p.name for p in Path(url).parent.iterdir()) == ["00000001.json"], "no temporary file left"


def test_the_lease_on_s3_uses_a_conditional_put(s3_bucket):
    bucket, fs = s3_bucket
    folder = lease_folder(f"s3://{bucket}/out", DATE)
    clock = Clock()
    first, second = leases(folder, 2, clock)
    first.acquire()
    with pytest.raises(LeaseHeld):
        second.acquire()
    from tagger import storage

    # What makes it safe: the store itself refuses a second create of one key.
    assert not storage.create_exclusive(f"{folder}/00000001.json", b"{}")
    first._stop.set()
    clock.now += 61
    second.acquire()
    with pytest.raises(LeaseLost):
        first.check()
    second.release()
    fs.invalidate_cache()
    body = json.loads(fs.cat_file(f"{bucket}/out/_leases/run_date={DATE}/00000002.json"))
    assert body["released"] is True and body["run"] == "run-1"


# -- real runs ---------------------------------------------------------------------------------------
ROWS = 60


def slow_catalog(demo, root: Path, name: str, prefix: str) -> Path:
    """ROWS rows over big noisy PNGs (slow to decode), product ids starting with ``prefix``."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    big = root / "big.png"
    if not big.exists():
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)).save(big, compress_level=1)
    path = root / name
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("product_id", "image"))
        writer.writerows((f"{prefix}{row:04d}", str(big)) for row in range(ROWS))
    return path


def command(catalog: Path, model: str, out: Path, *extra: str) -> list[str]:
    return [TAGGER, "tag", "--catalog", str(catalog), "--model", model, "--out", str(out), "--run-date", DATE,
            "--shard-size", "10", "--batch-size", "2", "--workers", "0", "--progress", "none", *extra]


def markers(out: Path) -> list[Path]:
    return sorted((out / "_runs" / f"run_date={DATE}" / "shards").glob("*.json"))


def test_a_second_run_of_the_same_date_exits_5_and_changes_nothing(demo, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    first_catalog = slow_catalog(demo, tmp_path / "data", "a.csv", "a-")
    second_catalog = slow_catalog(demo, tmp_path / "data", "b.csv", "b-")
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command(first_catalog, tiny_bundle, out), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        wait_for(lambda: markers(out) or first.poll() is not None, 180, 0.02, "the first run's first shard")
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        os.kill(first.pid, signal.SIGSTOP)  # held mid-run for as long as the second run takes, however slow
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "_leases" not in p.parts}
        second = subprocess.run(command(second_catalog, tiny_bundle, out), capture_output=True, text=True, timeout=180)
        assert second.returncode == 5, second.stderr
        assert "partition busy" in second.stderr and "nothing was changed" in second.stderr
        plan = json.loads((out / "_runs" / f"run_date={DATE}" / "plan.json").read_text())
        assert f"owned by run {plan['run_id']} (host " in second.stderr, "the message names the owner"
        assert second.stderr.count("\ntagger tag:") + second.stderr.startswith("tagger tag:") == 1
        assert all(p.exists() and p.stat().st_mtime_ns == t for p, t in before.items()), "the loser touched the partition"
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    tags = pl.from_arrow(read_complete_partition(f"{out}/tags/run_date={DATE}"))
    assert tags.height == ROWS and tags["product_id"].str.starts_with("a-").all(), "_SUCCESS over a mix of manifests"


def test_a_run_whose_lease_is_taken_over_stops_at_its_next_commit(demo, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    catalog = slow_catalog(demo, tmp_path / "data", "a.csv", "a-")
    log_path = tmp_path / "run.log"
    run = subprocess.Popen(command(catalog, tiny_bundle, out), stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        wait_for(lambda: markers(out) or run.poll() is not None, 180, 0.02, "a first shard")
        assert run.poll() is None, log_path.read_text()
        os.kill(run.pid, signal.SIGSTOP)
        # Another run takes the date over (as after a stalled heartbeat): a newer generation appears.
        folder = out / "_leases" / f"run_date={DATE}"
        newest = max(int(p.stem) for p in folder.glob("*.json"))
        intruder = json.loads((folder / f"{newest:08d}.json").read_text())
        intruder.update(owner="intruder", run="intruder-run", pid=1, host="elsewhere", generation=newest + 1)
        (folder / f"{newest + 1:08d}.json").write_text(json.dumps(intruder))
        os.kill(run.pid, signal.SIGCONT)
        code = run.wait(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    text = log_path.read_text()
    assert code == 5, text
    assert "partition lost" in text and "taken over by run intruder-run" in text
    assert not (out / "tags" / f"run_date={DATE}" / SUCCESS_FILE).exists()
    assert len(markers(out)) < ROWS // 10, "the fenced run went on committing"


def test_a_heartbeat_from_the_future_is_not_believed_past_the_stores_own_clock(tmp_path, caplog):
    """A host whose clock runs a day ahead stamps its heartbeats a day ahead. Alive, it keeps the date (the
    store saw its file written just now); dead, the date is free a ttl after its last write, not a day later."""
    folder = lease_folder(str(tmp_path), DATE)
    ahead = Lease(folder, ttl=60, run="skewed", clock=lambda: time.time() + 86_400)
    ahead.acquire()
    live = Lease(folder, ttl=60, run="now", clock=time.time)
    with pytest.raises(LeaseHeld, match="owned by run skewed"):
        live.acquire()
    assert "claims a heartbeat 86" in caplog.text and "clock skew" in caplog.text
    ahead._stop.set()  # the skewed run dies: no more heartbeats
    later = Lease(folder, ttl=60, run="later", clock=lambda: time.time() + 61)
    later.acquire()  # before: refused until the claimed heartbeat was a ttl old, a day from now
    assert later.generation == ahead.generation + 1
    later.release()
