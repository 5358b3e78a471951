"""Where the bound lies, for the shipped model on 1800x2400 photos, today's code against an older commit.

    python -m bench.bound [--images 1024] [--rounds 2] [--workers 2] [--batch-size 32] [--against 18c6b55]
                          [--model models/fashion-lite0] [--no-write]

For each side (``today``: this tree; ``today-fp32``: this tree with ``TAGGER_CPU_BF16=0``, as on a CPU without
native bfloat16, where ``auto`` chooses among fp32 runtimes only; ``before``: the tree of commit ``--against``,
extracted once with ``git archive`` under bench/work/, run with ``PYTHONPATH`` pointing at it):

* the two costs (bench/bound_child.py, in its own process, in every round; the median of the rounds): decode CPU
  ms per photo (one worker's share) and model CPU ms per photo (the runtime ``--runtime auto`` picks, at torch's
  thread count);
* the limit they imply for this machine's cores: ``cores x 1000 / (decode + model)`` img/s, the rate the job
  would reach if every core did nothing but decode and run the model;
* the job end to end (``tagger tag`` through bench/child.py, ``--runtime auto``, the same catalog, batch size
  and workers), rounds alternating in order: img/s and CPU ms per photo of the process tree;
* the job's rate as a share of the limit, and its CPU efficiency: (decode + model) / the job's CPU ms per
  photo, which the neighbours' load on a shared machine hardly moves.

Before anything is timed each side runs once on 16 photos: the ONNX export and ``auto``'s measured choice
are made and cached then, as on a user's first run. The section ``bench:bound`` of docs/benchmarks.md is
rewritten (unless ``--no-write``); raw JSON goes to bench/results/raw/.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from . import catalogs, procmem, report

SIDES = ("today", "today-fp32", "before")
# today-fp32: today's code as on a CPU without native bfloat16 (TAGGER_CPU_BF16=0), where `auto` has only the fp32
# runtimes to choose from; on such a CPU it is the same as today.
SIDE_ENV = {"today-fp32": {"TAGGER_CPU_BF16": "0"}}
SMALL = 16  # photos of the short run whose costs are subtracted (see main)


def baseline_tree(commit: str) -> Path:
    """The code of ``commit``, extracted once under bench/work/ (no worktree, nothing in .git changes)."""
    sha = subprocess.run(["git", "-C", str(catalogs.ROOT), "rev-parse", "--short=12", commit], check=True,
                         capture_output=True, text=True).stdout.strip()
    tree = catalogs.WORK / f"code-{sha}"
    if not (tree / "tagger" / "__init__.py").exists():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(catalogs.ROOT), "archive", sha, "tagger", "bench"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def _env(tree: Path, side: str = "today") -> dict:
    return {**os.environ, "PYTHONPATH": str(tree), **SIDE_ENV.get(side, {})}


def _result(argv: list[str], env: dict, label: str) -> tuple[dict, dict, float]:
    code, out, err, memory, wall = procmem.run_measured(argv, env=env)
    lines = [line for line in out.splitlines() if line.startswith("BENCH-RESULT ")]
    if code != 0 or not lines:
        raise RuntimeError(f"{label} failed (exit {code}):\n{err[-3000:]}")
    return json.loads(lines[-1].removeprefix("BENCH-RESULT ")), memory, wall


def job(tree: Path, spec: dict, label: str, side: str) -> dict:
    # -P: bench.child comes from ``tree`` (PYTHONPATH), not from this tree's folder.
    result, memory, _ = _result([sys.executable, "-P", "-m", "bench.child", json.dumps(spec)], _env(tree, side), label)
    n = result["rows"]
    result["images_per_s"] = round(n / result["wall_s"], 2)
    result["cpu_ms_per_image"] = round(1000 * memory["cpu_s"] / n, 1)
    print(f"  {label:<22} {result['images_per_s']:7.2f} img/s  CPU {result['cpu_ms_per_image']:6.1f} ms/photo  "
          f"runtime {(result.get('runtime') or {}).get('name')} {(result.get('runtime') or {}).get('precision')}",
          file=sys.stderr, flush=True)
    return result


def costs(tree: Path, spec: dict, label: str, side: str) -> dict:
    child = catalogs.ROOT / "bench" / "bound_child.py"
    result, _, _ = _result([sys.executable, "-P", str(child), json.dumps(spec)], _env(tree, side), label)
    print(f"  {label:<22} decode {result['decode_cpu_ms']:.1f} CPU ms/photo, model {result['model_cpu_ms']:.1f} "
          f"({result['runtime']} {result['precision']})", file=sys.stderr, flush=True)
    return result


def _steady(full: dict) -> tuple[float | None, float | None]:
    """img/s and CPU ms per photo of the photos the full run has beyond the short one; None where the machine's
    load swung so much between the two runs that the difference is not positive (no figure rather than a wrong one)."""
    few = full["small_run"]
    extra = full["rows"] - few["rows"]
    wall = full["wall_s"] - few["wall_s"]
    cpu = full["cpu_ms_per_image"] * full["rows"] - few["cpu_ms_per_image"] * few["rows"]
    return (round(extra / wall, 2) if wall > 0 else None), (round(cpu / extra, 1) if cpu > 0 else None)


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(results: dict) -> None:
    """Per side: the costs, the limit, the job's rates against it; today / before per round. Also re-run on a raw
    JSON by ``--render`` (the arithmetic only, nothing measured again)."""
    runs, component, cores = results["runs"], results["component"], results["cores"]
    sides = {}
    for side in [s for s in SIDES if s in runs]:  # raw JSON of older runs has no today-fp32
        c = component[side]
        steady = [_steady(x) for x in runs[side]]
        rate, steady_rate = _median(x["images_per_s"] for x in runs[side]), _median(s[0] for s in steady)
        steady_cpu = _median(s[1] for s in steady)
        limit = cores * 1000 / (c["decode_cpu_ms"] + c["model_cpu_ms"])
        sides[side] = {**c, "runtime": f"{c['runtime']} {c['precision']}", "limit_images_per_s": round(limit, 1),
                       "images_per_s": rate, "runs": [x["images_per_s"] for x in runs[side]],
                       "steady_images_per_s": steady_rate, "steady_runs": [s[0] for s in steady],
                       "cpu_ms_per_image": _median(x["cpu_ms_per_image"] for x in runs[side]),
                       "steady_cpu_ms_per_image": steady_cpu, "steady_cpu_runs": [s[1] for s in steady],
                       "share_of_limit": round(steady_rate / limit, 3) if steady_rate else None,
                       "cpu_efficiency": round((c["decode_cpu_ms"] + c["model_cpu_ms"]) / steady_cpu, 3) if steady_cpu else None}
    def ratios(side: str) -> dict:
        whole = [round(t["images_per_s"] / b["images_per_s"], 2) for t, b in zip(runs[side], runs["before"])]
        steady = [round(_steady(t)[0] / _steady(b)[0], 2) if _steady(t)[0] and _steady(b)[0] else None
                  for t, b in zip(runs[side], runs["before"])]
        cost = component[side]["decode_cpu_ms"] + component[side]["model_cpu_ms"]
        return {"per_round": whole, "median": _median(whole), "steady_per_round": steady, "steady_median": _median(steady),
                "cost_ratio": round((component["before"]["decode_cpu_ms"] + component["before"]["model_cpu_ms"]) / cost, 2)}

    versus = {side: ratios(side) for side in sides if side != "before"}
    results.update(sides=sides, versus_before=versus, speedup_per_round=versus["today"]["per_round"],
                   speedup=versus["today"]["median"], cost_ratio=versus["today"]["cost_ratio"])


def _f(value, fmt: str = ".1f", none: str = "n/a") -> str:
    return none if value is None else format(value, fmt)


def markdown(r: dict) -> str:
    lines = [
        f"Command: `{r['command']}` ({r['started_at']}, {r['elapsed_s']:.0f} s)  ",
        f"Machine: {report._machine(r['machine'])}; at the end {r['machine_after']['load_average']}  ",
        f"Model: {r['model']}; {r['images']} photos re-encoded at 1800x2400 (mean {r['mean_file_kb']:.0f} KB); batch size "
        f"{r['batch_size']}, {r['workers']} workers; {r['rounds']} rounds, alternating; `before` = commit {r['against']}.  ",
        "",
        "| | runtime (`auto`) | decode CPU ms/photo | model CPU ms/photo | limit for the cores (img/s) | job img/s, whole process "
        "(median; runs) | job img/s, steady state (median; runs) | share of the limit (steady) | job CPU ms/photo (steady) | CPU efficiency |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for side in r["sides"]:
        s = r["sides"][side]
        lines.append(f"| {side} | {s['runtime']} | {s['decode_cpu_ms']:.1f} | {s['model_cpu_ms']:.1f} | {s['limit_images_per_s']:.1f} "
                     f"| {_f(s['images_per_s'], '.2f')} ({', '.join(_f(x, '.2f') for x in s['runs'])}) "
                     f"| {_f(s['steady_images_per_s'], '.2f')} ({', '.join(_f(x, '.2f') for x in s['steady_runs'])}) "
                     f"| {_f(s['share_of_limit'], '.0%')} | {_f(s['steady_cpu_ms_per_image'])} ({', '.join(_f(x) for x in s['steady_cpu_runs'])}) "
                     f"| {_f(s['cpu_efficiency'], '.0%')} |")
    lines.append("")
    for side, v in r.get("versus_before", {"today": {"per_round": r["speedup_per_round"], "median": r["speedup"],
                                                     "cost_ratio": r["cost_ratio"]}}).items():
        steady = (f"; steady state {v['steady_per_round']} (median {_f(v['steady_median'], '.2f')}x)"
                  if v.get("steady_per_round") else "")
        lines.append(f"**{side} / before: decode + model CPU per photo {v['cost_ratio']:.2f}x less (limit "
                     f"{r['sides'][side]['limit_images_per_s']:.0f} vs {r['sides']['before']['limit_images_per_s']:.0f} img/s); "
                     f"end to end, same run, whole process {v['per_round']} per round (median {_f(v['median'], '.2f')}x){steady}.**  ")
    lines += ["", "`today-fp32`: today's code with `TAGGER_CPU_BF16=0`, as on a CPU without native bfloat16, where `auto` "
              "chooses among fp32 runtimes only (on such a CPU it is `today`).",
              "", f"Steady state: the run of all photos minus the run of the first {SMALL} (start-up, imports, model load, "
              "worker start drop out); n/a where the machine's load swung so much between the two runs that the difference "
              "is not positive. The limit assumes every core does nothing but decode and run the model; CPU efficiency = "
              "(decode + model) / the job's steady CPU per photo; the share of the limit in img/s needs the cores to be the job's alone."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bound", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1024)  # enough that start-up (~6 s) is not most of the run
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--against", default="18c6b55", help="the commit to compare with (default: before issue #22)")
    parser.add_argument("--model", default=str(catalogs.ROOT / "models" / "fashion-lite0"))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--render", metavar="RAW_JSON", help="recompute the figures and the section from a raw JSON "
                        "of an earlier run (bench/results/raw/bound-*.json); nothing is measured")
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(Path(args.render).read_text())
        if "runs" not in results:  # written before the raw JSON kept the runs at the top level
            results["runs"] = {side: results["sides"][side]["raw"] for side in ("today", "before")}
            results["component"] = {side: {k: results["sides"][side][k] for k in
                                           ("decode_cpu_ms", "model_cpu_ms", "runtime", "precision", "threads", "photos")}
                                    for side in ("today", "before")}
            for side in ("today", "before"):
                results["component"][side]["runtime"] = results["component"][side]["runtime"].split(" ")[0]
        summarise(results)
        text = markdown(results)
        print(text)
        if not args.no_write:
            report.update_section("bound", text, results, module="bound")
        return 0
    command = "python -m bench.bound " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        catalogs.sample_dir()
    except catalogs.SampleMissing as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 0
    started = time.time()
    trees = {"today": catalogs.ROOT, "today-fp32": catalogs.ROOT, "before": baseline_tree(args.against)}
    catalog, images = catalogs.large_catalog(args.images)
    warm, _ = catalogs.large_catalog(SMALL)
    base = {"variant": "tagger", "model": str(Path(args.model).resolve()), "batch_size": args.batch_size,
            "workers": args.workers}
    results = {"command": command.strip(), "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": procmem.machine_info(), "model": f"{Path(args.model).name} (the shipped bundle)",
               "images": args.images, "batch_size": args.batch_size, "workers": args.workers, "rounds": args.rounds,
               "against": args.against, "mean_file_kb": round(sum(p.stat().st_size for p in set(images)) / len(set(images)) / 1024, 1)}
    for side in SIDES:  # first use: export and `auto`'s measuring, cached, out of the timed runs
        job(trees[side], {**base, "catalog": str(warm)}, f"{side} warm-up", side)
    cost_spec = {"catalog": str(catalog), "model": base["model"], "batch_size": args.batch_size, "images": min(64, args.images)}
    # The two costs are measured in every round beside the job (a machine's speed drifts: one measurement at
    # the start made a limit the later rounds did not share); the figure is the median of the rounds.
    measured_costs: dict[str, list[dict]] = {side: [] for side in SIDES}
    # Each side runs the catalog twice per round, at SMALL photos and at all of them: the difference is the
    # job's steady state, what a large catalog sees (process start, imports, model load and worker start-up
    # are the same in both and drop out).
    small, _ = catalogs.large_catalog(SMALL)
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for r in range(args.rounds):
        for side in SIDES if r % 2 == 0 else tuple(reversed(SIDES)):
            measured_costs[side].append(costs(trees[side], cost_spec, f"round {r + 1} {side} costs", side))
            few = job(trees[side], {**base, "catalog": str(small)}, f"round {r + 1} {side} ({SMALL})", side)
            full = job(trees[side], {**base, "catalog": str(catalog)}, f"round {r + 1} {side} ({args.images})", side)
            full["small_run"] = few
            runs[side].append(full)
    component = {side: {**measured_costs[side][0], "rounds": measured_costs[side],
                        **{k: round(statistics.median(c[k] for c in measured_costs[side]), 2) for k in ("decode_cpu_ms", "model_cpu_ms")}}
                 for side in SIDES}
    results.update(component=component, runs=runs, cores=os.cpu_count() or 1,
                   machine_after={"load_average": procmem.machine_info()["load_average"]}, elapsed_s=round(time.time() - started, 1))
    summarise(results)
    raw = catalogs.ROOT / "bench" / "results" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / f"bound-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json").write_text(json.dumps(results, indent=2))
    text = markdown(results)
    print(text)
    if not args.no_write:
        report.update_section("bound", text, results, module="bound")
        print(f"bench: docs/benchmarks.md updated ({results['elapsed_s']:.0f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
