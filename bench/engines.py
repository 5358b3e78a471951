"""Both engines side by side: ``tagger tag`` (local) and ``tagger tag --engine ray``, same catalog, same run.

    python -m bench.engines [--images 300,1200] [--rounds 1] [--batch-size 64] [--workers 2]
                            [--model models/fashion-lite0] [--no-write]

The catalog is the Kaggle sample's real 225x300 photos (``$FASHION_SAMPLE_DIR``, as ``bench.run``), cycled to
each size; without the sample, the shipped demo's 150 real photos (demo/images). The model is the shipped
one (models/fashion-lite0, EfficientNet-Lite0 at 224 px; ``--runtime auto``). Each run is a fresh process
(bench/child.py: :class:`tagger.tag.runner.TagRunner` as ``tagger tag`` runs it, output committed,
``_SUCCESS`` written) whose whole process tree is sampled in /proc every 0.5 s: for the Ray engine that tree
is the driver plus the Ray it starts (GCS, raylet, agents, decode workers, model actor), as on a laptop or an
Airflow worker without a cluster. The Ray side starts Ray itself (``ray.init``, 2 CPUs here); its start-up is
part of its time, as it is part of the job's.

Two sizes separate the fixed cost of each engine from its cost per image: with walls ``t1`` and ``t2`` at
``n1`` and ``n2`` images, the marginal rate is ``(n2 - n1) / (t2 - t1)`` and the fixed cost what the larger
run took beyond ``n2`` images at that rate. Order alternates each round (local first, then Ray first).
Figures go to docs/benchmarks.md (``bench:engines`` markers) and raw JSON to bench/results/raw/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from . import catalogs, procmem, report

SHIPPED_MODEL = catalogs.ROOT / "models" / "fashion-lite0"
DEMO_IMAGES = catalogs.ROOT / "demo" / "images"


def catalog(n: int) -> tuple[Path, str]:
    """A manifest of ``n`` rows: the Kaggle sample's photos, else the shipped demo's."""
    try:
        path, _ = catalogs.small_catalog(n)
        return path, "Kaggle sample, 225x300 JPEGs"
    except catalogs.SampleMissing:
        images = sorted(DEMO_IMAGES.glob("*.jpg"))
        images = [images[i % len(images)] for i in range(n)]
        return catalogs.write_manifest(catalogs.WORK / "engines" / f"demo-{n}.csv", images), "shipped demo photos"


def model_snapshot(model: str) -> str:
    """The bundle's two files copied under bench/work/ once per run: every run of a comparison reads the same
    model even if the bundle is rewritten meanwhile (a retrain writing models/)."""
    import shutil

    target = catalogs.WORK / "engines" / f"model-{Path(model).name}"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("model.json", "model.safetensors"):
        shutil.copyfile(Path(model) / name, target / name)
    return str(target)


# Memory is sampled every 0.5 s, not bench.run's 0.1 s: reading smaps_rollup of the Ray engine's 14 processes
# ten times a second took ~40 % of the core the runs share (measured), and Ray's workers run at nice 15.
SAMPLE_INTERVAL_S = 0.5


def measure(spec: dict, label: str) -> dict:
    code, out, err, memory, wall = procmem.run_measured([sys.executable, "-m", "bench.child", json.dumps(spec)],
                                                        interval=SAMPLE_INTERVAL_S)
    lines = [line for line in out.splitlines() if line.startswith("BENCH-RESULT ")]
    if code != 0 or not lines:
        raise RuntimeError(f"{label} failed (exit {code}):\n{err[-3000:]}")
    result = json.loads(lines[-1].removeprefix("BENCH-RESULT "))
    result.update(memory, process_wall_s=round(wall, 2), images_per_s=round(result["rows"] / result["wall_s"], 2))
    print(f"  {label:<18} {result['rows']:>6} img {result['images_per_s']:7.2f} img/s  wall {result['wall_s']:7.1f}s  "
          f"peak RSS {memory['peak_rss_mib']:7.0f} MiB  PSS {memory['peak_pss_mib']:7.0f} MiB  "
          f"processes {memory['max_processes']}", file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engines", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default="300,1200", help="catalog sizes, comma-separated (default 300,1200)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="the local engine's decode workers")
    parser.add_argument("--model", default=str(SHIPPED_MODEL))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    command = "python -m bench.engines " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        import ray  # noqa: F401
    except ImportError:
        print("bench.engines: Ray is not installed (pip install '.[ray]'); skipped.", file=sys.stderr)
        return 0

    started = time.time()
    machine = procmem.machine_info()
    sizes = [int(x) for x in args.images.split(",")]
    model = model_snapshot(args.model)
    runs: dict[str, dict[int, list[dict]]] = {"local": {}, "ray": {}}
    source = ""
    for round_ in range(args.rounds):
        for n in sizes:
            manifest, source = catalog(n)
            order = ["local", "ray"] if round_ % 2 == 0 else ["ray", "local"]
            for engine in order:
                spec = {"variant": "tagger", "catalog": str(manifest), "model": model, "batch_size": args.batch_size,
                        "workers": args.workers, "engine": engine}
                runs[engine].setdefault(n, []).append(measure(spec, f"{engine} r{round_ + 1}"))

    summary = {}
    for engine, by_size in runs.items():
        walls = {n: statistics.median(r["wall_s"] for r in rs) for n, rs in by_size.items()}
        row = {
            "wall_s": walls,
            "images_per_s": {n: round(n / w, 2) for n, w in walls.items()},
            "peak_rss_mib": max(r["peak_rss_mib"] for rs in by_size.values() for r in rs),
            "peak_pss_mib": max(r["peak_pss_mib"] for rs in by_size.values() for r in rs),
            "max_processes": max(r["max_processes"] for rs in by_size.values() for r in rs),
            # The split of the run nearest the median wall (not round 1's): it adds up to the wall in the table.
            "durations_s": min(by_size[sizes[-1]], key=lambda r: abs(r["wall_s"] - walls[sizes[-1]]))["durations_s"],
        }
        if len(sizes) >= 2:
            n1, n2 = sizes[0], sizes[-1]
            marginal = (n2 - n1) / max(walls[n2] - walls[n1], 1e-9)
            row["marginal_images_per_s"] = round(marginal, 2)
            row["fixed_s"] = round(walls[n2] - n2 / marginal, 1)
        summary[engine] = row
    ratios = {n: round(summary["ray"]["wall_s"][n] / summary["local"]["wall_s"][n], 2) for n in sizes}
    # Each round's two runs ran one after the other under the same neighbours: their ratio is the paired figure;
    # the process's own wall (interpreter start, imports, exit) beside the job's (TagRunner.run, what wall_s is).
    paired = {n: [round(r["wall_s"] / l["wall_s"], 2) for l, r in zip(runs["local"][n], runs["ray"][n])] for n in sizes}
    process = {n: round(statistics.median(r["process_wall_s"] for r in runs["ray"][n])
                        / statistics.median(r["process_wall_s"] for r in runs["local"][n]), 2) for n in sizes}
    results = {"command": command.strip(), "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": machine, "catalog": source, "model": Path(args.model).name, "batch_size": args.batch_size,
               "workers": args.workers, "rounds": args.rounds, "sizes": sizes, "summary": summary,
               "ray_to_local_wall": ratios, "ray_to_local_wall_per_round": paired,
               "ray_to_local_process_wall": process, "runs": runs, "elapsed_s": round(time.time() - started, 1)}
    raw = catalogs.ROOT / "bench" / "results" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / f"engines-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json").write_text(json.dumps(results, indent=2))
    markdown = engines_markdown(results)
    print(markdown)
    if not args.no_write:
        report.update_section("engines", markdown, results, module="engines")
    return 0


def engines_markdown(r: dict) -> str:
    sizes, s = r["sizes"], r["summary"]
    lines = [
        f"Command: `{r['command']}` ({r['started_at']}, {r['elapsed_s']:.0f} s)  ",
        f"Machine: {report._machine(r['machine'])}  ",
        f"Catalog: {r['catalog']}; model {r['model']} (`--runtime auto`), batch size {r['batch_size']}; local engine "
        f"with {r['workers']} decode workers, Ray engine on a Ray it starts itself (2 CPUs); {r['rounds']} round(s), "
        "each run a fresh process, memory of its whole process tree.",
        "",
        "| engine | " + " | ".join(f"{n} images: wall, img/s" for n in sizes) + " | per image (marginal) | fixed cost | "
        "peak RSS sum | peak PSS sum | processes |",
        "|---|" + "---|" * len(sizes) + "---|---|---|---|---|",
    ]
    for engine in ("local", "ray"):
        row = s[engine]
        cells = [f"{row['wall_s'][n]:.1f} s, **{row['images_per_s'][n]:.1f}**" for n in sizes]
        lines.append(f"| {engine} | " + " | ".join(cells) + f" | {row.get('marginal_images_per_s', '-')} img/s | "
                     f"{row.get('fixed_s', '-')} s | {row['peak_rss_mib']:.0f} MiB | {row['peak_pss_mib']:.0f} MiB | "
                     f"{row['max_processes']} |")
    lines.append("| ray / local (time) | " + " | ".join(f"**{r['ray_to_local_wall'][n]:.2f}x**" for n in sizes)
                 + " | | | | | |")
    per_round = "; ".join(f"{n} images " + ", ".join(f"{x:.2f}x" for x in r["ray_to_local_wall_per_round"][n]) for n in sizes)
    process = "; ".join(f"{n} images {r['ray_to_local_process_wall'][n]:.2f}x" for n in sizes)
    lines += ["", f"Ray / local per round (a round's two runs side by side): {per_round}. The whole process "
              f"(interpreter start to exit, medians): {process}."]
    ray = s["ray"]["durations_s"]
    lines += ["", f"Ray engine, {sizes[-1]} images, where its time went (run summary `durations_s` of the run nearest "
              "the median wall; `wall_s` is the job's own time, `TagRunner.run`, as `tagger tag` runs it): "
              + ", ".join(f"{k} {v:.1f} s" for k, v in ray.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
