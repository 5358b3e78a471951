"""``tagger report`` as the night grows: its time and peak memory on a 1,000,000-row night against a 10,000-row one.

    python -m bench.nightly_report [--rows 10000,1000000] [--tag-rate 61.6] [--no-write]

Each size gets two synthetic complete nights under bench/work/nightly-report/<rows>/ (made once): the tags
tables as the tag job writes them (tagger.tag.writers: its schema, parts of 10,000 rows, ``_SUCCESS``, a plan
that names the catalog and the shipped bundle), the shipped bundle's seven attributes and vocabularies, labels
drawn from a skewed mix that moves a little between the nights (season most), a review list from the bundle's
thresholds, 1 % error rows; and a CSV catalog with the seven label columns (85 % equal to the tags, the rest
another label of the vocabulary, 5 % empty), joined by product id. Images are the demo's 150 photos, cycled,
so the gallery reads real JPEGs. Each report runs in its own process (``python -m jobs.cli report``), its
peak memory sampled from /proc (bench.procmem), in the order small, large, small.

What tagging the large night costs is not measured here (hours on this machine): it is the rows divided by
``--tag-rate``, the local engine's measured rate with the shipped model on 2 cores (61.6 img/s at 4,800
photos, docs/benchmarks.md, "Engines"). Writes docs/benchmarks.md (``bench:nightly-report`` markers) and
bench/results/raw/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from . import catalogs, procmem, report

WORK = catalogs.WORK / "nightly-report"
MODEL = catalogs.ROOT / "models" / "fashion-lite0"
NIGHTS = ("2026-11-26", "2026-11-27")
PART_ROWS = 10_000


def make_nights(rows: int) -> Path:
    """Two complete nights and the catalog of ``rows`` products (made once; a finished set has a DONE file)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from tagger.tag import writers
    from tagger.tag.partition import Partition

    out = WORK / str(rows)
    if (out / "DONE").exists():
        return out
    meta = json.loads((MODEL / "model.json").read_text())
    attributes = [a["name"] for a in meta["attributes"]]
    images = sorted(str(p) for p in (catalogs.ROOT / "demo" / "images").glob("[0-9]*.jpg"))
    rng = np.random.default_rng(rows)
    errors = rows // 100
    tagged = rows - errors
    ids = pa.array([f"p{i:09d}" for i in range(rows)])
    image = pa.array(images).take(pa.array(np.arange(rows) % len(images)))
    catalog = {"product_id": ids, "image": image}
    labels_tonight = {}
    for n, date in enumerate(NIGHTS):
        partition = Partition(str(out / "out"), date)
        partition.wipe()
        columns = {"product_id": ids[:tagged], "image": image[:tagged]}
        review = np.zeros((tagged, len(attributes)), dtype=bool)
        for k, spec in enumerate(meta["attributes"]):
            vocab = pa.array(spec["labels"])
            weights = 1.0 / np.arange(1, len(vocab) + 1) ** 1.2
            if n == 1:  # the night moves: season most, every attribute a little
                weights = weights * rng.uniform(0.8, 1.25, len(vocab)) ** (4 if spec["name"] == "season" else 1)
            codes = rng.choice(len(vocab), size=tagged, p=weights / weights.sum())
            scores = rng.beta(5, 1.5, tagged).astype(np.float32)
            columns[spec["name"]] = vocab.take(pa.array(codes))
            columns[f"{spec['name']}_score"] = pa.array(scores)
            review[:, k] = scores < float(spec.get("threshold", 0.0))
            if n == 1:
                labels_tonight[spec["name"]] = (vocab, codes)
        names = pa.array(attributes)
        rows_, cols_ = np.nonzero(review)  # row-major: each row's attributes in the bundle's order
        offsets = np.concatenate([[0], np.cumsum(review.sum(axis=1))]).astype(np.int32)
        columns["needs_review"] = pa.ListArray.from_arrays(pa.array(offsets), names.take(pa.array(cols_)))
        run_id = f"{date}-bench"
        columns.update(images_used=pa.array([1] * tagged, pa.int32()), image_version=pa.array(["1-1"] * tagged), model_version=pa.array([meta["model_version"]] * tagged),
                       run_id=pa.array([run_id] * tagged),
                       tagged_at=pa.array([datetime(2026, 11, 27, tzinfo=timezone.utc)] * tagged, pa.timestamp("us", tz="UTC")))
        table = pa.table(columns).cast(writers.tags_schema(attributes))
        parts = {}
        for shard, start in enumerate(range(0, tagged, PART_ROWS)):
            writer = writers.PartWriter(str(Path(partition.tags) / writers.part_name(shard)), table.schema)
            writer.write(table.slice(start, PART_ROWS))
            writer.commit()
            parts[writers.part_name(shard)] = min(PART_ROWS, tagged - start)
        bad = pa.table({"product_id": ids[tagged:], "image": image[tagged:], "error_type": pa.array(["missing"] * errors),
                        "message": pa.array(["m"] * errors), "run_id": pa.array([run_id] * errors)}).cast(writers.ERRORS_SCHEMA)
        writer = writers.PartWriter(str(Path(partition.errors) / writers.part_name(0)), bad.schema)
        writer.write(bad)
        writer.commit()
        partition.write_plan({"run_id": run_id, "rows": rows, "catalog": str(out / "catalog.csv"), "model": str(MODEL),
                              "model_version": meta["model_version"], "attributes": attributes})
        partition.commit(parts, {writers.part_name(0): errors}, {"run_id": run_id, "model_version": meta["model_version"]})
    for name, (vocab, codes) in labels_tonight.items():
        codes = np.concatenate([codes, rng.integers(0, len(vocab), errors)])
        other = np.where(rng.random(rows) < 0.85, codes, rng.integers(0, len(vocab), rows))
        label = vocab.take(pa.array(other))
        catalog[name] = pa.compute.if_else(pa.array(rng.random(rows) < 0.05), pa.scalar("", pa.string()), label)
    pacsv.write_csv(pa.table(catalog), out / "catalog.csv")
    (out / "DONE").write_text("")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.nightly_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="10000,1000000", help="night sizes, small first (default 10000,1000000)")
    parser.add_argument("--tag-rate", type=float, default=61.6, help="img/s of tagging on this machine (docs/benchmarks.md)")
    parser.add_argument("--no-repeat", action="store_true", help="do not run the small night again at the end")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    command = "python -m bench.nightly_report " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started = time.time()
    sizes = [int(x) for x in args.rows.split(",")]
    order = sizes + ([] if args.no_repeat or len(sizes) < 2 else [sizes[0]])
    runs = []
    for rows in order:
        made = time.time()
        folder = make_nights(rows)
        if time.time() - made > 1:
            print(f"  {rows:>9,} rows: nights made in {time.time() - made:.0f} s", file=sys.stderr, flush=True)
        argv_ = [sys.executable, "-m", "jobs.cli", "report", "--out", str(folder / "out"), "--run-date", NIGHTS[1]]
        code, out, err, memory, wall = procmem.run_measured(argv_)
        if code != 0:
            raise SystemExit(f"bench.nightly_report: the {rows}-row report failed (exit {code}):\n{err[-3000:]}")
        body = json.loads((folder / "out" / "_reports" / f"run_date={NIGHTS[1]}" / "report.json").read_text())
        run = {"rows": rows, "wall_s": round(wall, 2), **memory, "report_s": body["duration_s"],
               "disagreements": body["agreement"]["disagreements"],
               "season_js": round(body["attributes"]["season"]["drift"]["js_distance"], 4),
               "tagging_s_derived": round(rows / args.tag_rate, 0)}
        run["share_of_tagging"] = round(run["wall_s"] / run["tagging_s_derived"], 5)
        runs.append(run)
        print(f"  {rows:>9,} rows: {wall:7.1f} s ({run['share_of_tagging']:.2%} of tagging at {args.tag_rate} img/s)  CPU {memory['cpu_s']:.0f} s  "
              f"peak RSS {memory['peak_rss_mib']:6.0f} MiB  PSS {memory['peak_pss_mib']:6.0f} MiB", file=sys.stderr, flush=True)
    small = [r for r in runs if r["rows"] == sizes[0]]
    large = [r for r in runs if r["rows"] == sizes[-1]]
    ratios = {key: round(max(r[key] for r in large) / max(r[key] for r in small), 3) for key in ("peak_rss_mib", "peak_pss_mib")}
    results = {"command": command.strip(), "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": procmem.machine_info(), "tag_rate_img_s": args.tag_rate, "runs": runs,
               "ratio_large_to_small": ratios, "elapsed_s": round(time.time() - started, 1)}
    raw = catalogs.ROOT / "bench" / "results" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / f"nightly-report-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json").write_text(json.dumps(results, indent=2))
    markdown = nightly_markdown(results)
    print(markdown)
    if not args.no_write:
        report.update_section("nightly-report", markdown, results, module="nightly_report")
    return 0


def nightly_markdown(r: dict) -> str:
    lines = [
        f"Command: `{r['command']}` ({r['started_at']}, {r['elapsed_s']:.0f} s with making the nights)  ",
        f"Machine: {report._machine(r['machine'])}  ",
        "Nights: synthetic, as the tag job writes them (parts of 10,000 rows), the shipped bundle's 7 attributes; a CSV "
        "catalog with the 7 label columns joined by id; 24 gallery thumbnails from the demo photos. Tagging time: rows / "
        f"{r['tag_rate_img_s']} img/s (the local engine's measured rate with the shipped model, not measured here).",
        "", "| rows | report wall | CPU | tagging (derived) | report / tagging | peak RSS | peak PSS | disagreements |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        lines.append(f"| {run['rows']:,} | {run['wall_s']:.1f} s | {run['cpu_s']:.0f} s | {run['tagging_s_derived']:,.0f} s | "
                     f"**{run['share_of_tagging']:.2%}** | {run['peak_rss_mib']:.0f} MiB | {run['peak_pss_mib']:.0f} MiB | "
                     f"{run['disagreements']:,} |")
    q = r["ratio_large_to_small"]
    lines += ["", f"Largest / smallest night: peak RSS **{q['peak_rss_mib']:.2f}x**, PSS **{q['peak_pss_mib']:.2f}x** (target: "
                  "within 1.3x); report time at most 10 % of tagging's."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
