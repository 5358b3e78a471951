"""Benchmark inputs: catalogs built from the real Kaggle sample, and a model bundle.

Nothing here is committed: catalogs and models are written under ``bench/work/`` (gitignored) once and
reused by later runs. The sample is read from ``$FASHION_SAMPLE_DIR`` (default
``../shared/data/fashion-sample`` beside the repository).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work"
LARGE_SIZE = (1800, 2400)  # the Kaggle originals' size
GRAIN_SIGMA = 2.0  # camera grain added to the upscaled photos, see large_catalog()
JPEG_QUALITY = 90


class SampleMissing(RuntimeError):
    pass


def sample_dir() -> Path:
    configured = os.environ.get("FASHION_SAMPLE_DIR")
    path = Path(configured) if configured else ROOT.parent / "shared" / "data" / "fashion-sample"
    if not (path / "images").is_dir():
        raise SampleMissing(
            f"no Kaggle fashion sample at {path} (expected {path}/images/*.jpg); set FASHION_SAMPLE_DIR to a folder "
            "in the dataset's layout to run this benchmark. Skipped."
        )
    return path


def sample_images(n: int) -> list[Path]:
    images = sorted(sample_dir().joinpath("images").glob("*.jpg"), key=lambda p: p.name)
    if not images:
        raise SampleMissing(f"{sample_dir()}/images holds no .jpg file. Skipped.")
    if n > len(images):
        # More rows than photos: cycle through them (a benchmark of throughput, not of accuracy).
        images = [images[i % len(images)] for i in range(n)]
    return images[:n]


def write_manifest(path: Path, images: list[Path]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["product_id", "image"])
        for i, image in enumerate(images):
            writer.writerow([f"p{i:07d}", str(image)])
    return path


def small_catalog(n: int) -> tuple[Path, list[Path]]:
    """The sample as it is (225x300 JPEGs), by absolute path."""
    images = sample_images(n)
    return write_manifest(WORK / "small" / f"catalog-{n}.csv", images), images


def large_catalog(n: int) -> tuple[Path, list[Path]]:
    """The same photos re-encoded at the originals' 1800x2400 (written once, reused).

    Upscaled photos are smoother than real 1800x2400 originals, so they would decode (entropy-decode)
    faster than real ones; a little camera grain (Gaussian, sigma 2 grey levels) brings the files to the
    few-hundred-KB size of real originals. JPEG quality 90.
    """
    from PIL import Image

    out = WORK / "large" / "images"
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for source in sample_images(n):
        target = out / source.name
        if not target.exists():
            with Image.open(source) as photo:
                big = photo.convert("RGB").resize(LARGE_SIZE, Image.Resampling.LANCZOS)
            rng = np.random.default_rng(int.from_bytes(source.stem.encode()[-4:].ljust(4, b"0"), "little"))
            pixels = np.asarray(big, dtype=np.float32) + rng.normal(0, GRAIN_SIGMA, (LARGE_SIZE[1], LARGE_SIZE[0], 1))
            buffer = io.BytesIO()
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=JPEG_QUALITY)
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(buffer.getvalue())
            os.replace(tmp, target)
        images.append(target)
    return write_manifest(WORK / "large" / f"catalog-{n}.csv", images), images


def sample_labels() -> dict[str, list[str]]:
    """Label vocabularies of the sample's styles.csv (malformed lines skipped): realistic head sizes."""
    from tagger.attributes import ATTRIBUTES

    styles = sample_dir() / "styles.csv"
    values: dict[str, set[str]] = {a: set() for a in ATTRIBUTES}
    if styles.exists():
        with open(styles, newline="", encoding="utf-8", errors="replace") as handle:
            reader = csv.reader(handle)
            header = next(reader)
            for row in reader:
                if len(row) != len(header):
                    continue
                record = dict(zip(header, row))
                for a in ATTRIBUTES:
                    if record.get(a):
                        values[a].add(record[a])
    return {a: sorted(v) or ["unknown", "other"] for a, v in values.items()}


def bundle(backbone: str = "efficientnet_b3", size: int = 300) -> Path:
    """A randomly initialised (``--no-pretrained``-style) bundle of ``backbone`` at ``size`` px, built once."""
    import torch

    from tagger.model.bundle import save_bundle
    from tagger.model.network import create_tagger_net, resolve_data_config

    path = WORK / "models" / f"{backbone}-{size}"
    if not (path / "model.json").exists():
        torch.manual_seed(0)
        labels = sample_labels()
        net = create_tagger_net(backbone, {k: len(v) for k, v in labels.items()}, resolve_data_config(backbone, size))
        save_bundle(net, str(path), backbone=backbone, labels=labels, training={"note": "random init, benchmark only"})
    return path
