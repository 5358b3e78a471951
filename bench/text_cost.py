"""What reading titles costs the tag job: CPU per row with and without --text-column, side by side in one run.

    taskset -c 1 nice .venv/bin/python -m bench.text_cost [--copies 4 --rounds 2]

The demo catalog (demo/catalog.csv: 150 real photos with their titles) repeated ``--copies`` times under new
product ids, tagged by the shipped model with ``--workers 0`` (decode in the job's own process, so its CPU time
is all of the job's) in alternating rounds; per run the process's user+system CPU seconds (start-up included)
and the text's own CPU seconds as the run summary counts them (featurise, score, fuse, per-row columns).
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def catalog(folder: Path, copies: int) -> tuple[Path, int]:
    with open(ROOT / "demo" / "catalog.csv", newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if not r["product_id"].startswith("broken-")]
    path = folder / "catalog.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for copy in range(copies):
            for row in rows:
                writer.writerow({**row, "product_id": f"{row['product_id']}-{copy}", "image": str(ROOT / "demo" / row["image"])})
    return path, copies * len(rows)


def run(path: Path, out: Path, text: bool) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    command = [str(Path(sys.executable).parent / "tagger"), "tag", "--catalog", str(path), "--model", str(ROOT / "models" / "fashion-lite0"),
               "--out", str(out), "--run-date", "2026-01-01", "--workers", "0", "--threads", "1", "--progress", "none",
               *(["--text-column", "title"] if text else [])]
    subprocess.run(command, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = json.loads((out / "_runs" / "run_date=2026-01-01" / "summary.json").read_text())
    return {"cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), "wall_s": time.monotonic() - started,
            "text_cpu_s": (summary["this_process"].get("text") or {}).get("cpu_s"), "tagging_s": summary["durations_s"].get("tagging_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="text-cost-") as scratch:
        path, rows = catalog(Path(scratch), args.copies)
        results: dict[str, list[dict]] = {"photos": [], "photos + titles": []}
        for r in range(args.rounds):
            for name, text in (("photos", False), ("photos + titles", True)):
                results[name].append(run(path, Path(scratch, f"out-{r}-{text}"), text))
    print(f"{rows} rows, --workers 0 --threads 1, {args.rounds} alternating rounds (median):")
    medians = {}
    for name, runs in results.items():
        cpu = sorted(x["cpu_s"] for x in runs)[len(runs) // 2]
        medians[name] = cpu
        text = [x["text_cpu_s"] for x in runs if x["text_cpu_s"] is not None]
        line = f"  {name:<16} job CPU {cpu:6.1f} s = {cpu / rows * 1e3:5.1f} ms/row"
        if text:
            t = sorted(text)[len(text) // 2]
            line += f"; text's own CPU {t:.2f} s = {t / rows * 1e3:.2f} ms/row ({t / cpu:.1%} of the job's CPU)"
        print(line)
    extra = medians["photos + titles"] - medians["photos"]
    print(f"  difference: {extra:+.1f} s = {extra / medians['photos']:+.1%} of the photos-only job's CPU (start-up included)")


if __name__ == "__main__":
    main()
