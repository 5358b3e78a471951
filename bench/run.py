"""``make bench``: the tag job against the loop a user would otherwise write, on the same images.

    python -m bench.run [--images 128] [--rounds 2] [--workers 2] [--batch-size 32] [--catalogs small,large] [--against REV]
                        [--levers] [--lever-images 96] [--no-write]

Two catalogs are built from the real Kaggle sample (``$FASHION_SAMPLE_DIR``, default
``../shared/data/fashion-sample``; skipped with a message when absent): the sample as it is (225x300), and
the same photos re-encoded at the originals' 1800x2400 (under bench/work/, once). On each, ``tagger``
(the real job as shipped, ``--runtime auto``, see bench/child.py), ``tagger-torch`` (the same job with
``--runtime torch``: the job before the exported runtimes) and ``baseline`` (timm's inference.py loop) run
in turn, order reversed every other round, each in a fresh process whose tree's peak memory is sampled
from /proc: same images, same model (efficientnet_b3 at 300 px, random init), same batch size and worker
count. The ONNX export is made once per model_version and cached (tagger.model.export), so a first run of
``tagger`` includes it and later runs do not: run ``python -m bench.runtimes`` once before to warm it.

``--against REV`` adds a fourth side, ``tagger@REV``: the same job from git revision REV's own source (``git archive``
into bench/work/trees/, run with this venv), so a restructuring is measured against the code it replaced in the
same rounds.

``--levers`` then measures each speed lever of the job on the large catalog against the job as shipped
(order default, L1..Lk, then reversed, to cancel drift). Figures go to docs/benchmarks.md (between the
``bench:run`` markers) and raw JSON to bench/results/raw/.
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

# Levers of the PyTorch runtime (channels-last, autocast, torch.compile) are measured with --runtime torch:
# under the exported runtimes they do not apply.
LEVERS: dict[str, dict] = {
    "no draft decode": {"draft": False},
    "PyTorch runtime (--runtime torch)": {"runtime": "torch"},
    "PyTorch, no channels-last": {"runtime": "torch", "channels_last": False},
    "PyTorch, fp32, no autocast (--precision fp32)": {"runtime": "torch", "precision": "fp32"},
    "torch threads 1 in main (--threads 1)": {"threads": 1},
    "workers 1": {"workers": 1},
    "PyTorch, torch.compile": {"runtime": "torch", "compile": True},
}


def measure(spec: dict, label: str) -> dict:
    argv = [sys.executable, "-m", "bench.child", json.dumps({k: v for k, v in spec.items() if k != "tree"})]
    env = None
    if spec.get("tree"):  # another revision's tagger (and bench.child) first on the path: see --against
        import os

        env = {**os.environ, "PYTHONPATH": spec["tree"]}
    code, out, err, memory, wall = procmem.run_measured(argv, env=env)
    lines = [line for line in out.splitlines() if line.startswith("BENCH-RESULT ")]
    if code != 0 or not lines:
        raise RuntimeError(f"{label} failed (exit {code}):\n{err[-3000:]}")
    result = json.loads(lines[-1].removeprefix("BENCH-RESULT "))
    n = result["rows"]
    result.update(memory)
    result["images_per_s"] = round(n / result["wall_s"], 3)
    result["cpu_ms_per_image"] = round(1000 * memory["cpu_s"] / n, 1)
    result["process_wall_s"] = round(wall, 2)
    print(f"  {label:<34} {result['images_per_s']:7.2f} img/s  wall {result['wall_s']:7.1f}s  CPU {result['cpu_ms_per_image']:6.0f} ms/img  "
          f"peak RSS {memory['peak_rss_mib']:7.0f} MiB  PSS {memory['peak_pss_mib']:7.0f} MiB", file=sys.stderr, flush=True)
    return result


# The three sides of the comparison: the job as shipped (--runtime auto), the job on PyTorch (--runtime torch,
# the job before runtimes existed), and the plain loop.
SIDES = {"tagger": {"variant": "tagger"}, "tagger-torch": {"variant": "tagger", "runtime": "torch"},
         "baseline": {"variant": "baseline"}}


def revision_tree(rev: str) -> tuple[str, Path]:
    """``rev``'s files (``git archive``) under bench/work/trees/<commit>, once: the job as it was at ``rev``, run
    from its own source with this checkout's venv (same packages, same model, same images)."""
    import subprocess
    import tarfile
    import io

    commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=catalogs.ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    tree = catalogs.WORK / "trees" / commit
    if not (tree / "tagger").is_dir():
        archive = subprocess.run(["git", "archive", commit, "tagger", "bench"], cwd=catalogs.ROOT, check=True, capture_output=True).stdout
        tree.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tree, filter="data")
    return commit[:7], tree


def ab(catalog: Path, model: Path, args, name: str) -> dict:
    base = {"catalog": str(catalog), "model": str(model), "batch_size": args.batch_size, "workers": args.workers}
    sides = dict(SIDES)
    if args.against:
        short, tree = revision_tree(args.against)
        sides[f"tagger@{short}"] = {"variant": "tagger", "tree": str(tree)}
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for r in range(args.rounds):
        for side in list(sides) if r % 2 == 0 else list(reversed(sides)):
            runs[side].append(measure({**base, **sides[side]}, f"{name} round {r + 1} {side}"))
    ratios = [t["images_per_s"] / b["images_per_s"] for t, b in zip(runs["tagger"], runs["baseline"])]
    vs_torch = [t["images_per_s"] / b["images_per_s"] for t, b in zip(runs["tagger"], runs["tagger-torch"])]
    cpu = {v: statistics.median(x["cpu_ms_per_image"] for x in rs) for v, rs in runs.items()}
    against = {}
    if args.against:
        side = next(s for s in runs if s.startswith("tagger@"))
        per_round = [t["images_per_s"] / o["images_per_s"] for t, o in zip(runs["tagger"], runs[side])]
        against = {"against": side, "ratio_vs_against_per_round": [round(x, 3) for x in per_round],
                   "ratio_vs_against_median": round(statistics.median(per_round), 3)}
    return {
        **against,
        "runtime": runs["tagger"][0].get("runtime"),
        "ratio_vs_torch_per_round": [round(x, 3) for x in vs_torch],
        "ratio_vs_torch_median": round(statistics.median(vs_torch), 3),
        "catalog": name,
        "images": args.images,
        "runs": runs,
        "median_images_per_s": {v: statistics.median(x["images_per_s"] for x in rs) for v, rs in runs.items()},
        "peak_rss_mib": {v: max(x["peak_rss_mib"] for x in rs) for v, rs in runs.items()},
        "peak_pss_mib": {v: max(x["peak_pss_mib"] for x in rs) for v, rs in runs.items()},
        "ratio_per_round": [round(x, 3) for x in ratios],
        "ratio_median": round(statistics.median(ratios), 3),
        "median_cpu_ms_per_image": cpu,
        "cpu_ratio": round(cpu["baseline"] / cpu["tagger"], 3),
        "transform": runs["baseline"][0].get("transform"),
    }


def levers(catalog: Path, model: Path, args) -> dict:
    base = {"variant": "tagger", "catalog": str(catalog), "model": str(model), "batch_size": args.batch_size,
            "workers": args.workers}
    names = [n for n in LEVERS if not args.lever_only or n in args.lever_only]
    results: dict[str, list[dict]] = {"as shipped": [], **{n: [] for n in names}}
    for r in range(args.rounds):
        order = ["as shipped", *names] if r % 2 == 0 else [*reversed(names), "as shipped"]
        for name in order:
            results[name].append(measure({**base, **LEVERS.get(name, {})}, f"lever round {r + 1}: {name}"))
    shipped = statistics.median(x["images_per_s"] for x in results["as shipped"])
    table = {}
    for name, runs in results.items():
        rate = statistics.median(x["images_per_s"] for x in runs)
        table[name] = {"spec": LEVERS.get(name, {}), "median_images_per_s": round(rate, 3),
                       "vs_shipped": round(rate / shipped, 3), "runs": [x["images_per_s"] for x in runs],
                       "cpu_ms_per_image": statistics.median(x["cpu_ms_per_image"] for x in runs),
                       "peak_pss_mib": max(x["peak_pss_mib"] for x in runs)}
    return {"catalog": "large", "images": args.lever_images, "levers": table}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128, help="images per catalog (default 128)")
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds per catalog (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, both sides (default 2)")
    parser.add_argument("--batch-size", type=int, default=32, help="both sides (default 32)")
    parser.add_argument("--catalogs", default="small,large", help="small (225x300), large (1800x2400) or both")
    parser.add_argument("--levers", action="store_true", help="also measure each speed lever (large catalog)")
    parser.add_argument("--lever-images", type=int, default=96)
    parser.add_argument("--lever-only", action="append", help="measure only this lever (repeatable)")
    parser.add_argument("--no-write", action="store_true", help="print, do not update docs/benchmarks.md")
    parser.add_argument("--against", metavar="REV", help="also run the job as it was at git revision REV, side by side "
                        "(e.g. the commit before a restructuring: is the job as fast as it was?)")
    args = parser.parse_args(argv)
    command = "python -m bench.run " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    try:
        catalogs.sample_dir()
    except catalogs.SampleMissing as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 0
    started = time.time()
    model = catalogs.bundle("efficientnet_b3", 300)
    results = {"command": command.strip(), "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": procmem.machine_info(), "model": "efficientnet_b3 @ 300 px, random init",
               "batch_size": args.batch_size, "workers": args.workers, "rounds": args.rounds, "comparisons": []}
    for name in [c.strip() for c in args.catalogs.split(",") if c.strip()]:
        build = {"small": catalogs.small_catalog, "large": catalogs.large_catalog}[name]
        catalog, images = build(args.images)
        size_kb = sum(p.stat().st_size for p in set(images)) / len(set(images)) / 1024
        print(f"{name} catalog: {len(images)} images, {size_kb:.0f} KB on average", file=sys.stderr)
        comparison = ab(catalog, model, args, name)
        comparison["mean_file_kb"] = round(size_kb, 1)
        results["comparisons"].append(comparison)
    if args.levers:
        catalog, _ = catalogs.large_catalog(args.lever_images)
        results["lever_study"] = levers(catalog, model, args)
    results["machine_after"] = {"load_average": procmem.machine_info()["load_average"]}
    results["elapsed_s"] = round(time.time() - started, 1)

    raw = catalogs.ROOT / "bench" / "results" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    (raw / f"run-{stamp}.json").write_text(json.dumps(results, indent=2))
    sections = {}
    if results["comparisons"]:
        sections["run"] = report.throughput_markdown(results)
    if "lever_study" in results:
        sections["levers"] = report.levers_markdown(results)
    for name, markdown in sections.items():
        print(markdown)
        if not args.no_write:
            report.update_section(name, markdown, {k: v for k, v in results.items() if (k != "lever_study") == (name == "run") or k in ("command", "machine", "started_at")})
    if not args.no_write:
        print(f"bench: docs/benchmarks.md updated ({results['elapsed_s']:.0f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
