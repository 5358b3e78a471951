"""Who owns a run date's partition: a lease with a heartbeat, on local disk and on S3 alike.

Two runs of one ``--out`` and ``--run-date`` (a scheduler's retry while the first attempt still runs, a
manual run beside the nightly one) must never both write: the second would wipe or mix the first's shards,
and a ``_SUCCESS`` could stand over rows of two manifests. Before it changes anything under ``--out`` a run
takes the date's lease; a run that cannot take it changes nothing and fails (:class:`LeaseHeld`, exit 5),
after waiting ``--lease-wait`` seconds for it.

The lease is a folder of numbered generations, ``OUT/_leases/run_date=D/00000001.json`` ...; the highest
number is the current one. A generation file is created only if absent (locally a hard link, which fails
when the name exists; on S3 a conditional PUT, ``If-None-Match: *``), so of two runs that try to take the
same generation exactly one gets it. The owner rewrites its file every ``ttl / 4`` seconds (the heartbeat).
A lease may be taken over, by creating the next generation, when its owner released it, when its heartbeat
is older than ``ttl``, or at once when the owner ran on this host and its process is gone (a killed run,
re-run straight away, resumes without waiting out the ttl).

Fencing: before each shard commit and before ``_SUCCESS`` the owner calls :meth:`Lease.check`, which fails
(:class:`LeaseLost`) when a newer generation exists or when its own heartbeat could not be renewed within the
ttl (another run may have taken over since). Stale-lease detection compares the heartbeat's wall-clock time
with the reader's: machines sharing an ``--out`` need clocks in step to well within the ttl (NTP).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from .. import storage

log = logging.getLogger(__name__)

DEFAULT_TTL = 120.0


class LeaseHeld(RuntimeError):
    """Another live run owns the partition; nothing was changed."""


class LeaseLost(RuntimeError):
    """This run no longer owns the partition (taken over, or its heartbeat could not be renewed)."""


def lease_folder(out: str, run_date: str) -> str:
    return storage.join(out, "_leases", f"run_date={run_date}")


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot: tells a live owner from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return ""


class Lease:
    def __init__(self, folder: str, options: Mapping[str, Any] | None = None, *, ttl: float = DEFAULT_TTL,
                 run: str = "", clock: Callable[[], float] = time.time):
        if ttl <= 0:
            raise ValueError("the lease ttl must be positive")
        self.folder = folder
        self.options = dict(options or {})
        self.ttl = ttl
        self.clock = clock
        self.owner = uuid.uuid4().hex
        self.generation: int | None = None
        self.facts = {"owner": self.owner, "run": run, "host": socket.gethostname(), "boot_id": _boot_id(),
                      "pid": os.getpid(), "pid_start": _process_start(os.getpid())}
        self._renewed = 0.0  # time.monotonic() of the last heartbeat written
        self._problem = ""  # why the last heartbeat failed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the files ------------------------------------------------------------------------------------
    def _url(self, generation: int) -> str:
        return storage.join(self.folder, f"{generation:08d}.json")

    def _body(self, released: bool = False) -> bytes:
        return json.dumps({**self.facts, "generation": self.generation, "heartbeat_at": self.clock(), "ttl": self.ttl,
                           "released": released}).encode()

    def _generations(self) -> list[int]:
        names = storage.list_files(self.folder, self.options)
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def current(self) -> tuple[int, dict[str, Any] | None]:
        """The newest generation and its content (0, None when the date was never leased)."""
        generations = self._generations()
        if not generations:
            return 0, None
        try:
            holder = json.loads(storage.read_bytes(self._url(generations[-1]), self.options))
            return generations[-1], self._believable(generations[-1], holder)
        except (FileNotFoundError, ValueError):
            # Removed by hand since the listing (files appear whole: a hard link, a single PUT): nothing to respect.
            return generations[-1], {}

    def _believable(self, generation: int, holder: dict[str, Any]) -> dict[str, Any]:
        """``holder`` with a heartbeat this run can believe. One stamped more than a ttl ahead of this clock (a
        host whose clock runs ahead, a hand-edited file) would hold the date until that moment came, days
        perhaps, with nobody alive behind it: the store's own time of the file's last write stands in for it.
        A live owner on such a host keeps rewriting the file, so its lease stays live; a dead one's expires
        a ttl after its last write, as any other."""
        claimed = float(holder.get("heartbeat_at", 0.0)) if isinstance(holder, dict) else 0.0
        if not isinstance(holder, dict) or claimed - self.clock() <= float(holder.get("ttl", self.ttl)):
            return holder
        written = storage.modified_at(self._url(generation), self.options)
        log.warning("%s: generation %d claims a heartbeat %.0fs ahead of this clock (clock skew on host %s?); "
                    "going by the store's time of its last write instead", self.folder, generation,
                    claimed - self.clock(), holder.get("host"))
        return {**holder, "heartbeat_at": min(claimed, written), "claimed_heartbeat_at": claimed}

    def vacancy(self, holder: dict[str, Any] | None) -> str:
        """Why ``holder`` may be taken over, or "" while it is live."""
        if holder is None:
            return "never leased"
        if holder.get("released"):
            return "released"
        age = self.clock() - float(holder.get("heartbeat_at", 0.0))
        if age > float(holder.get("ttl", self.ttl)):
            return f"its heartbeat is {age:.0f}s old, over the {float(holder.get('ttl', self.ttl)):.0f}s ttl"
        same_machine = holder.get("host") == self.facts["host"] and holder.get("boot_id") == self.facts["boot_id"]
        if same_machine and holder.get("pid") and _process_start(int(holder["pid"])) != holder.get("pid_start"):
            return f"its process {holder['pid']} on this host is gone"
        return ""

    @staticmethod
    def describe(holder: dict[str, Any] | None, clock: Callable[[], float] = time.time) -> str:
        if not holder:
            return "another run"
        age = clock() - float(holder.get("heartbeat_at", 0.0))
        return (f"run {holder.get('run') or '?'} (host {holder.get('host')}, pid {holder.get('pid')}; last heartbeat "
                f"{age:.0f}s ago, ttl {float(holder.get('ttl', 0)):.0f}s)")

    # -- taking, keeping, giving back -------------------------------------------------------------------
    def acquire(self, wait: float = 0.0, poll: float = 1.0, interrupted: Callable[[], None] = lambda: None) -> None:
        """Take the lease, waiting up to ``wait`` seconds for a live owner to release it or go stale."""
        deadline = time.monotonic() + wait
        while True:
            interrupted()
            generation, holder = self.current()
            why = self.vacancy(holder)
            if why:
                self.generation = generation + 1
                if storage.create_exclusive(self._url(self.generation), self._body(), self.options):
                    self._renewed = time.monotonic()
                    if holder is not None:
                        log.info("took over the partition lease (%s): generation %d", why, self.generation)
                    self._start_heartbeat()
                    return
                self.generation = None
                continue  # another run created that generation first: look again
            if time.monotonic() >= deadline:
                raise LeaseHeld(
                    f"{self.folder}: the partition is owned by {self.describe(holder, self.clock)}; nothing was "
                    "changed. Wait for that run to end (or pass --lease-wait SECONDS to wait for it); a run that "
                    "died is taken over once its heartbeat is older than the ttl"
                )
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="tagger-lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                if self._newest() != self.generation:
                    self._problem = "a newer generation of the lease exists"
                    return  # taken over: never write into a lease that is no longer ours
                storage.write_bytes(self._url(self.generation), self._body(), self.options)
                self._renewed, self._problem = time.monotonic(), ""
            except Exception as exc:  # the store is down for now: check() fails once the ttl has passed
                self._problem = f"{type(exc).__name__}: {exc}"
                log.warning("could not renew the partition lease: %s", self._problem)

    def annotate(self, run: str) -> None:
        """Name the run in the lease now (its id is known only once planned): a loser's message names it."""
        self.facts["run"] = run
        if self.generation is not None and self._newest() == self.generation:
            storage.write_bytes(self._url(self.generation), self._body(), self.options)
            self._renewed = time.monotonic()

    def _newest(self) -> int:
        generations = self._generations()
        return generations[-1] if generations else 0

    def check(self) -> None:
        """Fencing: raise :class:`LeaseLost` unless this run still owns the partition."""
        if self.generation is None:
            raise LeaseLost(f"{self.folder}: this run does not hold the partition lease")
        silent = time.monotonic() - self._renewed
        if silent > self.ttl:
            raise LeaseLost(f"{self.folder}: the lease heartbeat could not be renewed for {silent:.0f}s (over the "
                            f"{self.ttl:.0f}s ttl: {self._problem or 'no heartbeat'}); another run may own the partition now")
        newest = self._newest()
        if newest != self.generation:
            _, holder = self.current()
            raise LeaseLost(f"{self.folder}: the partition was taken over by {self.describe(holder, self.clock)} "
                            f"(generation {newest}, ours {self.generation})")

    def release(self) -> None:
        """Stop the heartbeat and mark our generation released, if it is still the newest."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.generation is None:
            return
        try:
            if self._newest() == self.generation:
                storage.write_bytes(self._url(self.generation), self._body(released=True), self.options)
        except Exception as exc:  # the lease then expires by its ttl
            log.warning("could not release the partition lease %s: %s", self._url(self.generation), exc)
        self.generation = None
