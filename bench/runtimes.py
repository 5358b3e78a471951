"""Model-only throughput of each runtime through the tag job's Predictor (``--runtime``), same process,
same generated batch, rounds alternating in order; plus the decode rate of the image workers.

    python -m bench.runtimes [--backbone efficientnet_b3 --size 300 | --model BUNDLE] [--batch-size 32]
                             [--batches 3] [--rounds 3] [--runtimes torch-fp32,torch-auto,onnx,openvino]
                             [--decode-images 48] [--no-write]

Each runtime runs ``--batches`` batches per round after one warm-up batch (the ONNX export is made, or
found in the cache, before anything is timed). The figure is the best round (least disturbed by the
neighbours on a shared machine) and the median. ``--decode-images`` > 0 also times the job's decode
(read + draft decode + resize, :class:`tagger.data.reader.ImageRows`) of that many 1800x2400 catalog photos
in one process: the rate one worker adds. The section ``bench:runtimes`` of docs/benchmarks.md is
rewritten (unless ``--no-write``); raw JSON goes to bench/results/raw/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone

from . import catalogs, procmem, report

VARIANTS = {
    # name: (runtime, precision, channels_last)
    "torch fp32": ("torch", "fp32", False),
    "torch fp32 channels-last": ("torch", "fp32", True),
    "torch auto (as shipped before --runtime)": ("torch", "auto", True),
    "onnx": ("onnx", "auto", True),
    "openvino": ("openvino", "auto", True),
    "openvino fp32": ("openvino", "fp32", True),
    # int8: the export quantized once per model_version, calibrated on $TAGGER_INT8_CALIBRATION (else generated images)
    "onnx int8": ("onnx", "int8", True),
    "openvino int8": ("openvino", "int8", True),
}


def model_only(bundle_path: str, names: list[str], batch_size: int, batches: int, rounds: int) -> dict:
    import torch

    from tagger.model.bundle import load_bundle
    from tagger.model.predictor import Predictor
    from tagger.model.choice import choose_runtime

    bundle = load_bundle(bundle_path)
    size = bundle.input_size
    generator = torch.Generator().manual_seed(0)
    # NCHW view of NHWC memory, as the reader's collate delivers batches.
    images = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, generator=generator).permute(0, 3, 1, 2)
    predictors, results = {}, {}
    for name in names:
        runtime, precision, channels_last = VARIANTS[name]
        started = time.perf_counter()
        predictor = Predictor(bundle, torch.device("cpu"), precision=precision, channels_last=channels_last,
                              runtime=choose_runtime(runtime, torch.device("cpu"), precision))
        predictor(images)  # warm-up: engine creation, oneDNN primitive cache
        predictors[name] = predictor
        results[name] = {"runtime": runtime, "precision": predictor.precision_name, "channels_last": channels_last,
                         "setup_s": round(time.perf_counter() - started, 2), "rounds": []}
        print(f"  {name}: ready in {results[name]['setup_s']} s ({predictor.precision_name})", file=sys.stderr, flush=True)
    for r in range(rounds):
        order = names if r % 2 == 0 else list(reversed(names))
        for name in order:
            cpu = time.process_time()  # every thread of this process: the engine's pool included
            started = time.perf_counter()
            for _ in range(batches):
                predictors[name](images)
            rate = batches * batch_size / (time.perf_counter() - started)
            results[name]["rounds"].append(round(rate, 2))
            results[name].setdefault("cpu_ms_per_image", []).append(round(1000 * (time.process_time() - cpu) / (batches * batch_size), 1))
        print("  round", r + 1, {n: results[n]["rounds"][-1] for n in names}, file=sys.stderr, flush=True)
    for row in results.values():
        row["median_cpu_ms_per_image"] = statistics.median(row["cpu_ms_per_image"])
        row["best_images_per_s"] = max(row["rounds"])
        row["median_images_per_s"] = round(statistics.median(row["rounds"]), 2)
    return results


def decode_rate(n: int, size: int) -> dict:
    """One process decoding the large catalog as a worker does: images/s and CPU ms per image."""
    import resource

    from tagger.data.reader import ImageRows

    catalog, images = catalogs.large_catalog(n)
    dataset = ImageRows.from_locations([str(p) for p in images], size)
    dataset[0]  # warm the page cache and imports
    usage = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    for i in range(len(dataset)):
        item = dataset[i]
        if item.pixels is None:
            raise RuntimeError(f"{images[i]}: {item.message}")
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    return {"images": n, "size": size, "images_per_s": round(n / wall, 2), "cpu_ms_per_image": round(1000 * cpu / n, 1)}


def markdown(r: dict) -> str:
    lines = [
        f"Command: `{r['command']}` ({r['started_at']}, {r['elapsed_s']:.0f} s)  ",
        f"Machine: {report._machine(r['machine'])}; native bfloat16: {r['native_bf16']}  ",
        f"Model: {r['model']}; batch {r['batch_size']} (random uint8), {r['batches']} batches per round, {r['rounds']} rounds "
        "in alternating order, after one warm-up batch; torch threads "
        f"{r['machine'].get('torch_threads')}. `auto` chooses **{r['auto']}** here ({r['auto_reason']}).",
        "", "| runtime | computes | img/s best round | img/s median | rounds | vs torch fp32 channels-last (best) | CPU ms/img (median) | set-up s (export from cache) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ref = r["model_only"].get("torch fp32 channels-last", {}).get("best_images_per_s")
    for name, row in r["model_only"].items():
        ratio = f"{row['best_images_per_s'] / ref:.2f}x" if ref else "-"
        lines.append(f"| {name} | {row['precision']} | **{row['best_images_per_s']:.2f}** | {row['median_images_per_s']:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in row['rounds'])} | {ratio} | {row.get('median_cpu_ms_per_image', float('nan')):.0f} | {row['setup_s']} |")
    if r.get("decode"):
        d = r["decode"]
        lines += ["", f"Decode (the job's reader: read + draft decode + letterbox to {d['size']} px) of {d['images']} 1800x2400 "
                      f"catalog photos in one process: **{d['images_per_s']:.1f} img/s** per worker, {d['cpu_ms_per_image']:.0f} CPU ms/img."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.runtimes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="efficientnet_b3")
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--model", default=None, help="a bundle folder instead of a random-init --backbone/--size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtimes", default=",".join(v for v in VARIANTS if "int8" not in v and v != "openvino fp32"),
                        help="comma-separated names of " + "; ".join(VARIANTS))
    parser.add_argument("--decode-images", type=int, default=48)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (and so every runtime's); 0: torch's default")
    parser.add_argument("--section", default="runtimes", help="docs/benchmarks.md section to rewrite")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.runtimes.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown runtime variant(s) {unknown}; choose from {list(VARIANTS)}")
    command = "python -m bench.runtimes " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    import torch

    from tagger.model.bundle import load_bundle
    from tagger.model.choice import choose_runtime
    from tagger.model.cpu import cpu_has_bf16

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    if args.model:
        model_path = args.model
        bundle = load_bundle(model_path)
        model = f"{args.model} ({bundle.backbone} @ {bundle.input_size} px, model_version {bundle.model_version})"
    else:
        model_path = str(catalogs.bundle(args.backbone, args.size))
        model = f"{args.backbone} @ {args.size} px, random init"
    # What the tag job's `auto` would pick for this model here: measured (or found in the choice cache).
    choice = choose_runtime("auto", torch.device("cpu"), bundle=load_bundle(model_path))
    auto = f"{choice.name} {choice.precision}" if choice.precision else choice.name
    results = {"command": command.strip(), "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": procmem.machine_info(), "native_bf16": cpu_has_bf16(), "model": model,
               "batch_size": args.batch_size, "batches": args.batches, "rounds": args.rounds,
               "auto": auto, "auto_reason": choice.reason}
    results["model_only"] = model_only(model_path, names, args.batch_size, args.batches, args.rounds)
    if args.decode_images:
        try:
            results["decode"] = decode_rate(args.decode_images, load_bundle(model_path).input_size)
        except catalogs.SampleMissing as exc:
            print(f"bench: decode rate skipped: {exc}", file=sys.stderr)
    results["elapsed_s"] = round(time.time() - started, 1)
    raw = catalogs.ROOT / "bench" / "results" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / f"runtimes-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json").write_text(json.dumps(results, indent=2))
    text = markdown(results)
    print(text)
    if not args.no_write:
        report.update_section(args.section, text, results, module="runtimes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
