"""Peak memory of a process and all its descendants (DataLoader workers, a forkserver), sampled from /proc.

Three sums are kept: RSS, what ``ps`` shows, which counts a page shared by a parent and its forked workers
once per process; PSS (proportional set size, /proc/PID/smaps_rollup), which splits each shared page
between the processes sharing it, so that the sum is the memory the job really occupies; and the anonymous
part of PSS (heap, arrays, shared memory: what the job allocates, without the pages of the shared
libraries mapped from disk, ~200-400 MiB of torch/CUDA/polars code whose resident share moves with the
page cache and with workers starting and exiting).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    todo.extend(int(c) for c in handle.read().split())
            except OSError:
                pass
    return found


def _kib(path: str, key: str) -> int:
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _rollup(pid: int) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    values[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        pass
    return values


@dataclass
class Sample:
    rss_kib: int
    pss_kib: int
    anon_kib: int
    processes: int


@dataclass
class TreeMemory:
    """Samples the tree of ``pid`` every ``interval`` seconds in a thread until :meth:`stop`."""

    pid: int
    interval: float = 0.1
    peak_rss_kib: int = 0
    peak_pss_kib: int = 0
    peak_anon_kib: int = 0
    peak_main_rss_kib: int = 0
    max_processes: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> Sample:
        pids = descendants(self.pid)
        rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids)
        pss = anon = 0
        for p in pids:
            rollup = _rollup(p)
            pss += rollup.get("Pss", 0)
            anon += rollup.get("Pss_Anon", 0) + rollup.get("Pss_Shmem", 0)
        self.peak_main_rss_kib = max(self.peak_main_rss_kib, _kib(f"/proc/{self.pid}/status", "VmRSS:"))
        return Sample(rss, pss, anon, len(pids))

    def _loop(self) -> None:
        while not self._stop.is_set():
            s = self.sample()
            self.samples += 1
            self.peak_rss_kib = max(self.peak_rss_kib, s.rss_kib)
            self.peak_pss_kib = max(self.peak_pss_kib, s.pss_kib)
            self.peak_anon_kib = max(self.peak_anon_kib, s.anon_kib)
            self.max_processes = max(self.max_processes, s.processes)
            self._stop.wait(self.interval)

    def start(self) -> TreeMemory:
        self._thread = threading.Thread(target=self._loop, name="tree-memory", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return {
            "peak_rss_mib": round(self.peak_rss_kib / 1024, 1),
            "peak_pss_mib": round(self.peak_pss_kib / 1024, 1),
            "peak_anon_pss_mib": round(self.peak_anon_kib / 1024, 1),
            "peak_main_rss_mib": round(self.peak_main_rss_kib / 1024, 1),
            "max_processes": self.max_processes,
            "samples": self.samples,
        }


def run_measured(argv: list[str], *, interval: float = 0.1, env: dict | None = None, timeout: float | None = None):
    """Run ``argv`` as a child process, sampling its tree's memory. Returns (returncode, stdout, stderr, memory, wall_s).

    ``memory`` also holds ``cpu_s``: user + system CPU seconds of the child and every descendant it waited
    for (DataLoader workers), from getrusage(RUSAGE_CHILDREN). On a shared machine wall time swings with
    the neighbours' load; CPU time per image barely does.
    """
    import resource
    import subprocess

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    monitor = TreeMemory(child.pid, interval).start()
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
    memory = monitor.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    memory["cpu_s"] = round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2)
    return child.returncode, out, err, memory, time.perf_counter() - started


def machine_info() -> dict:
    import platform

    info = {"python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as handle:
            text = handle.read()
        model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
        flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
        info["cpu"] = model
        info["cpu_flags"] = sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2", "avx_vnni")))
    except OSError:
        pass
    info["memory_gib"] = round(_kib("/proc/meminfo", "MemTotal:") / 1024 / 1024, 1)
    try:
        import PIL
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    torch_cpu_capability=torch.backends.cpu.get_cpu_capability(), pillow=PIL.__version__)
    except ImportError:
        pass
    info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info
