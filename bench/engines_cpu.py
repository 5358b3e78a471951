"""Where each engine's CPU goes: one ``bench.child`` run per engine named, its whole process tree's CPU seconds by
process name (the driver, the local engine's decode workers; Ray's GCS, raylet, agents, Ray Data's helper actors,
decode/write workers, the model actor), sampled from /proc every 0.2 s.

    python -m bench.engines_cpu [--images 2400] [ENGINE ...]      # default: local ray ray local

Same catalog, model and options as :mod:`bench.engines` (its helpers build them). On a machine whose cores are
all busy during a run, a run's wall cannot be less than its CPU seconds over the cores: this is what says how far
the Ray engine's own processes put it from the local engine, whatever the start-up order. Prints one line per
run; nothing is written (the figures quoted in docs/benchmarks.md name this command).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from . import engines, procmem

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[str, float] | None:
    """The process's name (``comm``: Ray names its workers ``ray::<actor or task>``) and user + system CPU seconds."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return None
    name, fields = stat[stat.find("(") + 1:stat.rfind(")")], stat[stat.rfind(")") + 2:].split()
    return name, (int(fields[11]) + int(fields[12])) / TICKS


def measure(engine: str, spec: dict) -> dict:
    process = subprocess.Popen([sys.executable, "-m", "bench.child", json.dumps({**spec, "engine": engine})],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen: dict[int, tuple[str, float]] = {}
    while process.poll() is None:  # the last sample of a process that exits between two is lost: <= 0.2 s of it
        for pid in procmem.descendants(process.pid):
            found = cpu_seconds(pid)
            if found:
                seen[pid] = ("driver" if pid == process.pid else found[0], found[1])
        time.sleep(0.2)
    lines = [line for line in process.stdout.read().splitlines() if line.startswith("BENCH-RESULT ")]
    result = json.loads(lines[-1].removeprefix("BENCH-RESULT ")) if lines else {}
    by_name: dict[str, float] = {}
    for name, seconds in seen.values():
        by_name[name] = by_name.get(name, 0.0) + seconds
    return {"engine": engine, "wall_s": result.get("wall_s"), "durations_s": result.get("durations_s"),
            "cpu_s": round(sum(by_name.values()), 1),
            "by_process": {k: round(v, 1) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engines_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2400)
    parser.add_argument("--model", default=str(engines.SHIPPED_MODEL))
    parser.add_argument("engines", nargs="*", default=["local", "ray", "ray", "local"])
    args = parser.parse_args(argv)
    manifest, _ = engines.catalog(args.images)
    spec = {"variant": "tagger", "catalog": str(manifest), "model": engines.model_snapshot(args.model),
            "batch_size": 64, "workers": 2}
    print(f"load average at start {os.getloadavg()}", flush=True)
    for engine in args.engines:
        print(json.dumps(measure(engine, spec)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
