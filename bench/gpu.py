"""The GPU benchmark (issue 10): one command for a lent GPU machine, under 8 minutes, nothing downloaded.

    bash bench/gpu.sh                 # = python -m bench.gpu: the real thing (CUDA required)
    bash bench/gpu.sh --dry           # the same logic on the CPU with tiny sizes, in seconds (the tests run it)
    python -m bench.gpu --fetch-wheels   # on a machine with PyPI: the wheels the GPU machine lacks (below)

What it measures, efficientnet_b3 at 300 px (random init: speed does not depend on the weights):

1. ``images``: generates its own 1800x2400 product-like JPEGs (quality 90, camera grain, ~400 KB, as
   bench/catalogs.py's large catalog) with all cores, and a manifest that cycles through them.
2. ``decode``: the job's own decode (tagger.data.reader.ImageRows: read, JPEG integrity check, draft decode,
   letterbox) in one process, and in ``--workers`` processes at once: the images/s the CPU workers can feed.
3. ``model``: model-only images/s of the tag job's Predictor (AMP fp16, channels-last, uint8 host batches
   copied to the GPU, softmax/top label back on the host), per batch size; and with the batch already on
   the GPU (the ceiling without any transfer).
4. ``compile``: the same with ``torch.compile`` on the network: compile seconds, images/s, and after how
   many images a job gains from it.
5. ``tag``: end to end ``tagger tag`` (``python -m jobs.cli tag``: manifest, reader workers, model,
   Parquet output, _SUCCESS) with ``--device cuda --workers 14 --precision auto --runtime auto`` per batch
   size; images/s from the run summary, and which side bounds it (decode vs model rate above).
6. ``gpu_decode``: ``torchvision.io.decode_jpeg`` on the device, batched (nvJPEG): JPEG bytes -> GPU
   decode -> antialiased resize + letterbox on the GPU -> the model; images/s of the decode alone and
   of the whole chain, fed from the page cache by one reading thread pool.

Every step has a share of a time budget (``--budget-s``, default 420 s) and is skipped, with the
reason recorded, when too little time is left. The results go to ``$OUT`` (or ``--out``) as
``gpu-bench.json`` and ``gpu-bench.md``; ``python -m bench.gpu --from-json gpu-bench.json --write``
puts them into docs/benchmarks.md (section ``bench:gpu``).

The GPU machine's Python has torch, torchvision, timm, pyarrow, Pillow and scikit-learn (and what timm
pulls in: safetensors, huggingface_hub, fsspec, tqdm, PyYAML). The tag job also needs click and
simplejpeg: ``--fetch-wheels`` downloads them (for CPython 3.10-3.13) into bench/work/gpu-wheels/, which
travels with the repository (e.g. the device tool's ``carry``); the script unpacks the matching wheel
into bench/work/gpu-site/ only when the module is missing. ONNX Runtime / OpenVINO are not needed: on
CUDA ``--runtime auto`` is PyTorch.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "bench" / "work" / "gpu-wheels"
SITE = ROOT / "bench" / "work" / "gpu-site"
# module -> pip requirement; versions as setup.cfg resolves them in .venv
NEEDED = {"click": "click==8.5.1", "simplejpeg": "simplejpeg==1.9.0"}
PYTHONS = ("3.10", "3.11", "3.12", "3.13")

REAL = {"backbone": "efficientnet_b3", "size": 300, "unique_images": 600, "rows": 12000, "width": 1800, "height": 2400,
        "workers": 14, "batch_sizes": [256, 128], "model_seconds": 8.0, "decode_images": 240, "gpu_decode_images": 600,
        "compile_mode": "default", "device": "cuda", "runtime": "auto"}
DRY = {"backbone": "test_efficientnet", "size": 32, "unique_images": 8, "rows": 24, "width": 180, "height": 240,
       "workers": 2, "batch_sizes": [8], "model_seconds": 0.3, "decode_images": 8, "gpu_decode_images": 8,
       "compile_mode": "eager-backend", "device": "cpu", "runtime": "torch"}
# Dry runs use --runtime torch: on CUDA `auto` is PyTorch, and the dry run is there to check that path.
# Share of the budget each step may start with at most (a step is skipped if less than its need is left).
NEEDS_S = {"images": 60, "decode": 30, "model": 40, "compile": 150, "tag": 90, "gpu_decode": 40}


# -- environment ------------------------------------------------------------------------------------

def wheel_matches(filename: str, version: tuple[int, int] = sys.version_info[:2]) -> bool:
    """A wheel this interpreter can use: pure Python, or built for this CPython (or its stable ABI)."""
    parts = filename[:-4].split("-")
    if len(parts) < 5:
        return False
    python, abi, platform = parts[-3], parts[-2], parts[-1]
    if python.startswith("py3") and abi == "none" and platform == "any":
        return True
    tag = f"cp{version[0]}{version[1]}"
    if "x86_64" not in platform or "linux" not in platform:
        return False
    return tag in python.split(".") or (abi == "abi3" and python.startswith("cp3") and int(python[3:]) <= version[1])


def ensure_packages(wheels: Path = WHEELS, site: Path = SITE) -> dict[str, str]:
    """Make click and simplejpeg importable here and in child processes; say where each came from."""
    import importlib.util

    found = {}
    for module, requirement in NEEDED.items():
        if importlib.util.find_spec(module) is not None:
            found[module] = "installed"
            continue
        candidates = sorted(p for p in wheels.glob(f"{module}-*.whl") if wheel_matches(p.name)) if wheels.is_dir() else []
        if not candidates:
            raise SystemExit(
                f"bench.gpu: the tag job needs {module}, which this Python lacks, and {wheels} holds no wheel for "
                f"CPython {sys.version_info[0]}.{sys.version_info[1]}: run `python -m bench.gpu --fetch-wheels` where "
                "PyPI is reachable and bring bench/work/gpu-wheels along"
            )
        site.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(candidates[-1]) as archive:
            archive.extractall(site)
        found[module] = f"wheel {candidates[-1].name}"
    if any(v != "installed" for v in found.values()):
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    else:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return found


def fetch_wheels(target: Path = WHEELS) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for python in PYTHONS:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--python-version", python, "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
                        "-d", str(target), *NEEDED.values()], check=True)
    print("\n".join(sorted(p.name for p in target.glob("*.whl"))))


def bench_bundle(backbone: str, size: int) -> str:
    """A random-init bundle with the Kaggle vocabulary's head sizes (built once under bench/work/models/):
    bench/catalogs.py's bundle needs the Kaggle sample for its labels, which a lent machine does not have."""
    import torch

    from tagger.attributes import ATTRIBUTES
    from tagger.model.bundle import save_bundle
    from tagger.model.network import create_tagger_net, resolve_data_config

    path = ROOT / "bench" / "work" / "models" / f"gpu-{backbone}-{size}"
    if not (path / "model.json").exists():
        torch.manual_seed(0)
        labels = {name: [f"{name}-{i}" for i in range(HEAD_SIZES.get(name, 10))] for name in ATTRIBUTES}
        net = create_tagger_net(backbone, {k: len(v) for k, v in labels.items()}, resolve_data_config(backbone, size))
        save_bundle(net, str(path), backbone=backbone, labels=labels, training={"note": "random init, GPU benchmark only"})
    return str(path)


# The Kaggle styles.csv vocabulary sizes per attribute (the heads' widths barely matter next to the trunk).
HEAD_SIZES = {"gender": 5, "masterCategory": 7, "subCategory": 45, "articleType": 143, "baseColour": 46, "season": 4, "usage": 8}


# -- step 1: images -------------------------------------------------------------------------------------

def _photo(args: tuple[int, int, int, str]) -> int:
    """A product-like photo: a shaded, textured garment on white, upscaled (LANCZOS) + grain, JPEG q90."""
    from PIL import Image, ImageDraw

    seed, width, height, path = args
    rng = np.random.default_rng(seed)
    w, h = max(8, width // 4), max(8, height // 4)
    picture = Image.new("RGB", (w, h), (255, 255, 255))
    base = tuple(int(c) for c in rng.integers(20, 235, 3))
    draw = ImageDraw.Draw(picture)
    draw.polygon([(w * 0.2, h * 0.1), (w * 0.8, h * 0.1), (w * 0.9, h * rng.uniform(0.3, 0.6)), (w * 0.75, h * 0.92),
                  (w * 0.25, h * 0.92), (w * 0.1, h * rng.uniform(0.3, 0.6))], fill=base)
    period = int(rng.integers(4, 12))
    for x in range(0, w, period):
        draw.line([(x, h * 0.1), (x + w * 0.1, h * 0.9)], fill=tuple(max(0, c - 25) for c in base), width=1)
    picture = picture.resize((width, height), Image.Resampling.LANCZOS)
    pixels = np.asarray(picture, dtype=np.float32) + rng.normal(0, 2.0, (height, width, 1)).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    Path(path).write_bytes(buffer.getvalue())
    return len(buffer.getvalue())


def make_images(folder: Path, cfg: dict) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.jpg" for i in range(cfg["unique_images"])]
    started = time.perf_counter()
    with get_context("fork").Pool(os.cpu_count() or 2) as pool:
        sizes = pool.map(_photo, [(i, cfg["width"], cfg["height"], str(p)) for i, p in enumerate(paths)], chunksize=4)
    manifest = folder.parent / "catalog.csv"
    with open(manifest, "w") as handle:
        handle.write("product_id,image\n")
        for row in range(cfg["rows"]):
            handle.write(f"p{row:08d},{paths[row % len(paths)]}\n")
    return {"unique": len(paths), "rows": cfg["rows"], "size": f"{cfg['width']}x{cfg['height']}",
            "mean_kb": round(sum(sizes) / len(sizes) / 1024, 1), "seconds": round(time.perf_counter() - started, 1),
            "manifest": str(manifest), "paths": [str(p) for p in paths]}


# -- step 2: CPU decode rate ------------------------------------------------------------------------------

_DATASET = None


def _decode_one(index: int) -> bool:
    return _DATASET[index].pixels is not None


def decode_rates(paths: list[str], size: int, workers: int, n: int) -> dict:
    """The job's reader on ``n`` images: one process, then ``workers`` forked processes sharing the list."""
    global _DATASET
    from tagger.data.reader import ImageRows

    paths = [paths[i % len(paths)] for i in range(n)]
    _DATASET = ImageRows.from_locations(paths, size)
    _decode_one(0)
    one_n = max(1, n // max(1, workers))
    started = time.perf_counter()
    ok = [_decode_one(i) for i in range(one_n)]
    single = one_n / (time.perf_counter() - started)
    with get_context("fork").Pool(workers) as pool:
        pool.map(_decode_one, range(workers), chunksize=1)  # started and warm
        started = time.perf_counter()
        ok += pool.map(_decode_one, range(n), chunksize=4)
        together = n / (time.perf_counter() - started)
    if not all(ok):
        raise RuntimeError("the generated images did not decode")
    return {"images": n, "one_process_images_per_s": round(single, 1), "workers": workers,
            "workers_images_per_s": round(together, 1)}


# -- steps 3-4: model only, eager and compiled ------------------------------------------------------------

def _timed(predict, images, seconds: float, sync) -> float:
    predict(images)
    sync()
    done, started = 0, time.perf_counter()
    while True:
        predict(images)
        done += images.shape[0]
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            sync()
            return done / (time.perf_counter() - started)


def model_rates(bundle_path: str, cfg: dict, device) -> dict:
    import torch

    from tagger.model.bundle import load_bundle
    from tagger.model.predictor import Predictor

    bundle = load_bundle(bundle_path)
    predictor = Predictor(bundle, device, precision="auto", runtime=cfg["runtime"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {"runtime": predictor.runtime.name, "precision": predictor.precision_name, "per_batch": {}}
    for batch in cfg["batch_sizes"]:
        host = torch.randint(0, 256, (batch, cfg["size"], cfg["size"], 3), dtype=torch.uint8).permute(0, 3, 1, 2)
        if device.type == "cuda":
            host = host.pin_memory()  # as the job's DataLoader delivers it (pin_memory on CUDA)
        row = {"host_batches_images_per_s": round(_timed(predictor, host, cfg["model_seconds"], sync), 1)}
        resident = host.to(device)
        row["device_resident_images_per_s"] = round(_timed(predictor, resident, cfg["model_seconds"], sync), 1)
        out["per_batch"][str(batch)] = row
    # cuDNN's autotuner picks the fastest convolution algorithms for the fixed batch shape; not on in the job
    # (unmeasured on hardware so far): measured here as a lever for the largest batch.
    batch = cfg["batch_sizes"][0]
    host = torch.randint(0, 256, (batch, cfg["size"], cfg["size"], 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    if device.type == "cuda":
        host = host.pin_memory()
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        out["cudnn_benchmark"] = {"batch": batch, "host_batches_images_per_s": round(_timed(predictor, host, cfg["model_seconds"], sync), 1)}
    finally:
        torch.backends.cudnn.benchmark = previous
    return out


def compile_rates(bundle_path: str, cfg: dict, device, eager: dict) -> dict:
    import torch

    from tagger.model.bundle import load_bundle
    from tagger.model.predictor import Predictor

    predictor = Predictor(load_bundle(bundle_path), device, precision="auto", runtime=cfg["runtime"])
    if predictor.net is None:
        raise RuntimeError(f"torch.compile needs the PyTorch runtime, not {predictor.runtime.name}")
    if cfg["compile_mode"] == "eager-backend":  # dry mode: the code path without a C++/Triton toolchain
        predictor.net = torch.compile(predictor.net, backend="eager")
    else:
        # The default mode: max-autotune's kernel search alone can take minutes on efficientnet_b3.
        predictor.net = torch.compile(predictor.net, mode=cfg["compile_mode"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batch = cfg["batch_sizes"][0]
    host = torch.randint(0, 256, (batch, cfg["size"], cfg["size"], 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    if device.type == "cuda":
        host = host.pin_memory()
    started = time.perf_counter()
    predictor(host)
    sync()
    compile_s = time.perf_counter() - started
    rate = _timed(predictor, host, cfg["model_seconds"], sync)
    eager_rate = eager["per_batch"][str(batch)]["host_batches_images_per_s"]
    saved = 1 / eager_rate - 1 / rate  # seconds saved per image
    return {"mode": cfg["compile_mode"], "batch": batch, "compile_s": round(compile_s, 1), "images_per_s": round(rate, 1),
            "vs_eager": round(rate / eager_rate, 3),
            "break_even_images": int(compile_s / saved) if saved > 0 else None,
            "note": "the last, smaller batch of a run compiles once more (another shape)"}


# -- step 5: end to end ------------------------------------------------------------------------------------

def tag_runs(manifest: str, bundle_path: str, cfg: dict, scratch: Path) -> list[dict]:
    runs = []
    for batch in cfg["batch_sizes"]:
        out = scratch / f"out-{batch}"
        shutil.rmtree(out, ignore_errors=True)
        argv = [sys.executable, "-m", "jobs.cli", "tag", "--catalog", manifest, "--model", bundle_path, "--out", str(out),
                "--run-date", "2026-01-01", "--device", cfg["device"], "--workers", str(cfg["workers"]),
                "--batch-size", str(batch), "--precision", "auto", "--runtime", cfg["runtime"], "--progress", "none"]
        started = time.perf_counter()
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"tagger tag exited {done.returncode}:\n{done.stderr[-3000:]}")
        summary = json.loads((out / "_runs" / "run_date=2026-01-01" / "summary.json").read_text())
        runs.append({"batch_size": batch, "workers": cfg["workers"], "rows": summary["rows"], "tagged": summary.get("tagged"),
                     "images_per_s": summary["this_process"]["images_per_second"],
                     "runtime": summary["this_process"].get("runtime"), "device": summary["this_process"].get("device"),
                     "durations_s": summary["durations_s"], "process_wall_s": round(wall, 1),
                     "command": " ".join(argv[1:])})
        shutil.rmtree(out, ignore_errors=True)
    return runs


# -- step 6: GPU JPEG decoding -----------------------------------------------------------------------------

def gpu_decode_rates(paths: list[str], bundle_path: str, cfg: dict, device) -> dict:
    import torch
    import torch.nn.functional as F
    import torchvision
    from torchvision.io import decode_jpeg

    from tagger.model.bundle import load_bundle
    from tagger.model.predictor import Predictor

    size, batch = cfg["size"], cfg["batch_sizes"][0]
    paths = [paths[i % len(paths)] for i in range(cfg["gpu_decode_images"])]
    predictor = Predictor(load_bundle(bundle_path), device, precision="auto", runtime=cfg["runtime"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def read(path: str) -> torch.Tensor:
        return torchvision.io.read_file(path)

    def letterbox(image: torch.Tensor) -> torch.Tensor:
        # Fit the longer side to `size` (antialiased), centre on white: the job's geometry, on the device.
        _, h, w = image.shape
        scale = size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        small = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        canvas = torch.full((1, 3, size, size), 255.0, device=image.device)
        top, left = (size - nh) // 2, (size - nw) // 2
        canvas[:, :, top:top + nh, left:left + nw] = small
        return canvas.round_().clamp_(0, 255).to(torch.uint8)

    with ThreadPoolExecutor(8) as pool:
        data = list(pool.map(read, paths))  # page cache -> host memory, kept: the decode is what is timed
        chunks = [data[i:i + batch] for i in range(0, len(data), batch)]
        decode_jpeg(chunks[0], device=device)  # warm-up: nvJPEG handles
        sync()
        started = time.perf_counter()
        for chunk in chunks:
            decode_jpeg(chunk, device=device)
        sync()
        decode_only = len(data) / (time.perf_counter() - started)
        started = time.perf_counter()
        for chunk in chunks:
            images = torch.cat([letterbox(x) for x in decode_jpeg(chunk, device=device)])
            predictor(images.contiguous(memory_format=torch.channels_last))
        sync()
        chain = len(data) / (time.perf_counter() - started)
    return {"images": len(data), "batch": batch, "decode_only_images_per_s": round(decode_only, 1),
            "decode_resize_model_images_per_s": round(chain, 1),
            "note": "full-resolution decode (nvJPEG has no DCT-scaled decode); the job's integrity check "
                    "(simplejpeg, CPU) is not in this chain"}


# -- report ------------------------------------------------------------------------------------------------

def markdown(r: dict) -> str:
    lines = [f"Command: `{r['command']}` ({r['started_at']}, {r['elapsed_s']:.0f} s{', DRY RUN on the CPU' if r['dry'] else ''})  ",
             f"Device: {r['device_name']}; {r['cpus']} CPUs; torch {r['torch']}, torchvision {r['torchvision']}, "
             f"Python {r['python']}; packages: {r['packages']}  ",
             f"Model: {r['config']['backbone']} @ {r['config']['size']} px, random init; images: {r.get('images', {}).get('unique')} "
             f"generated {r.get('images', {}).get('size')} JPEGs ({r.get('images', {}).get('mean_kb')} KB), manifest of "
             f"{r.get('images', {}).get('rows')} rows cycling through them.", "",
             "| measurement | images/s | notes |", "|---|---|---|"]
    d = r.get("decode")
    if d:
        lines.append(f"| CPU decode, 1 process (the job's reader) | {d['one_process_images_per_s']:.0f} | read + integrity check + draft decode + letterbox |")
        lines.append(f"| CPU decode, {d['workers']} processes | **{d['workers_images_per_s']:.0f}** | what --workers {d['workers']} can feed |")
    m = r.get("model")
    if m:
        for batch, row in m["per_batch"].items():
            lines.append(f"| model only, batch {batch}, host uint8 batches ({m['runtime']}, {m['precision']}, channels-last) | "
                         f"**{row['host_batches_images_per_s']:.0f}** | Predictor as the job calls it |")
            lines.append(f"| model only, batch {batch}, batch already on the device | {row['device_resident_images_per_s']:.0f} | no transfer: the ceiling |")
        if m.get("cudnn_benchmark"):
            cb = m["cudnn_benchmark"]
            lines.append(f"| model only, batch {cb['batch']}, host batches, torch.backends.cudnn.benchmark on | {cb['host_batches_images_per_s']:.0f} | "
                         "a lever, not in the job yet |")
    c = r.get("compile")
    if c:
        lines.append(f"| torch.compile ({c['mode']}), batch {c['batch']} | {c['images_per_s']:.0f} | {c['vs_eager']:.2f}x eager; compile "
                     f"{c['compile_s']:.0f} s, pays off after {c['break_even_images'] if c['break_even_images'] is not None else 'never'} images |")
    for run in r.get("tag", []):
        bound = ""
        if d and m:
            model = m["per_batch"].get(str(run["batch_size"]), {}).get("host_batches_images_per_s")
            if model:
                side = "decode" if d["workers_images_per_s"] < model else "model"
                bound = f"; {side}-bound (decode {d['workers_images_per_s']:.0f} vs model {model:.0f} img/s)"
        lines.append(f"| **`tagger tag` end to end**, batch {run['batch_size']}, workers {run['workers']} | **{run['images_per_s']:.0f}** | "
                     f"{run['rows']} rows, tagging {run['durations_s'].get('tagging_s')} s{bound} |")
    g = r.get("gpu_decode")
    if g:
        lines.append(f"| GPU JPEG decode (decode_jpeg on {r['config']['device']}, batch {g['batch']}) | {g['decode_only_images_per_s']:.0f} | decode only |")
        lines.append(f"| GPU decode + resize + model | {g['decode_resize_model_images_per_s']:.0f} | {g['note']} |")
    for step, why in r.get("skipped", {}).items():
        lines.append(f"| {step} | skipped | {why} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="tiny sizes on the CPU: checks the logic in seconds")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu-bench.json/.md (default $OUT)")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--steps", default="images,decode,model,compile,tag,gpu_decode")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--fetch-wheels", action="store_true")
    parser.add_argument("--from-json", default=None, help="render a gpu-bench.json (with --write: into docs/benchmarks.md)")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    if args.fetch_wheels:
        fetch_wheels()
        return 0
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        text = markdown(results)
        print(text)
        if args.write:
            from . import report

            report.update_section("gpu", text, results, module="gpu")
        return 0

    started = time.time()
    cfg = dict(DRY if args.dry else REAL)
    if args.workers is not None:
        cfg["workers"] = args.workers
    if args.rows is not None:
        cfg["rows"] = args.rows
    packages = ensure_packages()
    import torch
    import torchvision

    if not args.dry and not torch.cuda.is_available():
        print("bench.gpu: no CUDA device visible (use --dry to check the logic on the CPU)", file=sys.stderr)
        return 2
    device = torch.device(cfg["device"])
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    results: dict = {
        "command": "bash bench/gpu.sh " + " ".join(argv if argv is not None else sys.argv[1:]), "dry": args.dry,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": cfg,
        "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (dry run)",
        "cpus": os.cpu_count(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "python": sys.version.split()[0], "packages": packages, "skipped": {},
    }

    targets = [Path(args.out)] if args.out else []
    if not args.dry:
        targets.append(ROOT / "bench" / "results" / "raw")

    def save() -> str:
        """After every step: a run cut short by the timeout still leaves what it measured."""
        results["elapsed_s"] = round(time.time() - started, 1)
        text = markdown(results)
        for folder in targets:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "gpu-bench.json").write_text(json.dumps(results, indent=1))
            (folder / "gpu-bench.md").write_text(text + "\n")
        return text

    def allowed(step: str) -> bool:
        save()
        if step not in steps:
            return False
        left = args.budget_s - (time.time() - started)
        if not args.dry and left < NEEDS_S[step]:
            results["skipped"][step] = f"{left:.0f} s of the budget left, the step needs ~{NEEDS_S[step]} s"
            return False
        return True

    scratch = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    try:
        bundle_path = bench_bundle(cfg["backbone"], cfg["size"])
        images = make_images(scratch / "images", cfg)
        results["images"] = {k: v for k, v in images.items() if k != "paths"}
        print(f"bench.gpu: {images['unique']} images in {images['seconds']} s", file=sys.stderr, flush=True)
        if allowed("decode"):
            results["decode"] = decode_rates(images["paths"], cfg["size"], cfg["workers"], cfg["decode_images"])
            print(f"bench.gpu: decode {results['decode']}", file=sys.stderr, flush=True)
        if allowed("model"):
            results["model"] = model_rates(bundle_path, cfg, device)
            print(f"bench.gpu: model {results['model']}", file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the tag job runs in a process of its own, on the same GPU
        if allowed("tag"):
            results["tag"] = tag_runs(images["manifest"], bundle_path, cfg, scratch)
            print(f"bench.gpu: tag {[(r['batch_size'], r['images_per_s']) for r in results['tag']]}", file=sys.stderr, flush=True)
        if allowed("gpu_decode"):
            results["gpu_decode"] = gpu_decode_rates(images["paths"], bundle_path, cfg, device)
            print(f"bench.gpu: gpu decode {results['gpu_decode']}", file=sys.stderr, flush=True)
        if "model" in results and allowed("compile"):  # last: the longest, and the one most likely to fail
            try:
                results["compile"] = compile_rates(bundle_path, cfg, device, results["model"])
            except Exception as exc:  # recorded, not fatal: the other figures stand on their own
                results["skipped"]["compile"] = f"torch.compile failed: {type(exc).__name__}: {str(exc)[:300]}"
            print(f"bench.gpu: compile {results.get('compile') or results['skipped'].get('compile')}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(save())
    return 0


if __name__ == "__main__":
    sys.exit(main())
