"""Memory as the catalog grows: the tag job's peak memory on a 1,000,000-row manifest vs a 10,000-row one.

    python -m bench.memory [--rows 10000,1000000] [--pool 2000] [--workers 2] [--batch-size 256] [--no-write]

Rows reuse a pool of small generated product photos (64x85 JPEGs drawn by tagger.demo.drawn, under
bench/work/memory/), and the model is the tests' tiny backbone (timm's test_efficientnet at 32 px, random
init): what is measured is the job's bookkeeping per row, not the network. Every row is really read,
decoded, predicted and written: no time budget, no sampling of rows. Each run is its own process; the
peak memory of its whole tree (main process + DataLoader workers) is sampled from /proc every 0.1 s, as
the sum of RSS and as the sum of PSS (shared pages split between the processes sharing them: the memory
the job really occupies). The runs go small, large, small, so that drift of the machine shows.

Needs nothing but the repository: no sample data, no network. Writes docs/benchmarks.md (``bench:memory``
markers) and bench/results/raw/.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from datetime import datetime, timezone

from . import catalogs, procmem, report

WORK = catalogs.WORK / "memory"


def image_pool(n: int) -> list[str]:
    from tagger.demo.drawn import _sample_labels, render_product

    import numpy as np

    folder = WORK / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        labels = _sample_labels(rng)
        if not path.exists():
            render_product(labels, (64, 85), seed=(0, i)).save(path, "JPEG", quality=90)
        names.append(f"images/{path.name}")
    return names


def manifest(rows: int, pool: list[str]) -> str:
    path = WORK / f"catalog-{rows}.csv"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["product_id", "image"])
            writer.writerows((f"p{i:08d}", pool[i % len(pool)]) for i in range(rows))
        tmp.replace(path)
    return str(path)


def tiny_bundle() -> str:
    import torch

    from tagger.model.bundle import save_bundle
    from tagger.demo.drawn import CLASSES
    from tagger.model.network import create_tagger_net, resolve_data_config

    path = WORK / "model-test_efficientnet-32"
    if not (path / "model.json").exists():
        torch.manual_seed(0)
        labels = {name: list(values) for name, values in CLASSES.items()}
        net = create_tagger_net("test_efficientnet", {k: len(v) for k, v in labels.items()}, resolve_data_config("test_efficientnet", 32))
        save_bundle(net, str(path), backbone="test_efficientnet", labels=labels, training={"note": "random init, benchmark only"})
    return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="10000,1000000", help="manifest sizes, small first (default 10000,1000000)")
    parser.add_argument("--pool", type=int, default=2000, help="distinct images the rows cycle through")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--start-method", default=None, help="worker start method (default: the job's auto)")
    parser.add_argument("--no-repeat", action="store_true", help="do not run the small manifest again at the end")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    command = "python -m bench.memory " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    started = time.time()
    sizes = [int(x) for x in args.rows.split(",")]
    pool = image_pool(args.pool)
    model = tiny_bundle()
    order = sizes + ([] if args.no_repeat or len(sizes) < 2 else [sizes[0]])
    runs = []
    for rows in order:
        spec = {"variant": "tagger", "catalog": manifest(rows, pool), "model": model, "batch_size": args.batch_size,
                "workers": args.workers, "shard_size": args.shard_size}
        if args.start_method:
            spec["worker_start_method"] = args.start_method
        code, out, err, memory, wall = procmem.run_measured([sys.executable, "-m", "bench.child", json.dumps(spec)])
        lines = [line for line in out.splitlines() if line.startswith("BENCH-RESULT ")]
        if code != 0 or not lines:
            raise SystemExit(f"bench.memory: the {rows}-row run failed (exit {code}):\n{err[-3000:]}")
        result = json.loads(lines[-1].removeprefix("BENCH-RESULT "))
        result.update(memory, rows=rows, images_per_s=round(rows / result["wall_s"], 1))
        runs.append(result)
        print(f"  {rows:>9,} rows: {result['wall_s']:8.1f}s {result['images_per_s']:8.1f} img/s  peak RSS sum "
              f"{memory['peak_rss_mib']:7.0f} MiB  PSS sum {memory['peak_pss_mib']:7.0f} MiB (anon {memory['peak_anon_pss_mib']:5.0f})  main RSS "
              f"{memory['peak_main_rss_mib']:7.0f} MiB", file=sys.stderr, flush=True)

    small = [r for r in runs if r["rows"] == sizes[0]]
    large = [r for r in runs if r["rows"] == sizes[-1]]
    ratios = {key: round(max(r[key] for r in large) / max(r[key] for r in small), 3)
              for key in ("peak_rss_mib", "peak_pss_mib", "peak_anon_pss_mib", "peak_main_rss_mib")}
    results = {"command": command.strip(), "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": procmem.machine_info(), "model": "test_efficientnet @ 32 px, random init",
               "pool_images": args.pool, "workers": args.workers, "batch_size": args.batch_size,
               "shard_size": args.shard_size, "runs": runs, "ratio_large_to_small": ratios,
               "elapsed_s": round(time.time() - started, 1)}
    raw = catalogs.ROOT / "bench" / "results" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / f"memory-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json").write_text(json.dumps(results, indent=2))
    markdown = memory_markdown(results)
    print(markdown)
    if not args.no_write:
        report.update_section("memory", markdown, results)
    return 0


def memory_markdown(r: dict) -> str:
    lines = [
        f"Command: `{r['command']}` ({r['started_at']}, {r['elapsed_s']:.0f} s)  ",
        f"Machine: {report._machine(r['machine'])}  ",
        f"Model: {r['model']}; {r['pool_images']} distinct 64x85 JPEGs cycled through; batch size {r['batch_size']}, "
        f"{r['workers']} workers, shards of {r['shard_size']:,} rows. Every row read, decoded, predicted, written.",
        "", "| rows | wall | img/s | peak RSS, main + workers | peak PSS, main + workers | of which anonymous | peak RSS, main |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        lines.append(f"| {run['rows']:,} | {run['wall_s']:.0f} s | {run['images_per_s']:.0f} | {run['peak_rss_mib']:.0f} MiB | "
                     f"{run['peak_pss_mib']:.0f} MiB | {run['peak_anon_pss_mib']:.0f} MiB | {run['peak_main_rss_mib']:.0f} MiB |")
    q = r["ratio_large_to_small"]
    lines += ["", f"Largest / smallest manifest: RSS sum **{q['peak_rss_mib']:.2f}x**, PSS sum **{q['peak_pss_mib']:.2f}x** "
                  f"(anonymous **{q['peak_anon_pss_mib']:.2f}x**), main-process RSS **{q['peak_main_rss_mib']:.2f}x** (target: within 1.2x)."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
