"""``--precision int8``: the bundle's ONNX export statically quantized, with the photos (or generated drawings)
that set its activation ranges. ONNX Runtime and OpenVINO both run the result."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .export import onnx_model
from .settings import RuntimeSettingError
from ..data.decode import ImageError, decode_image
from ..data.drawings import CLASSES, render_product
from ..storage import file_sha256

if TYPE_CHECKING:
    from .bundle import ModelBundle

log = logging.getLogger(__name__)

INT8_FORMAT = 1  # bump when how the int8 model is made changes (calibration, quantizer settings)
# TAGGER_INT8_CALIBRATION: a folder of photos like the catalog's (the first INT8_CALIBRATION_IMAGES by name)
# that set the int8 model's activation ranges; unset: generated product drawings (tagger.demo), which need no
# data but fit real photos less well (docs/performance.md has both measured on the shipped model).
INT8_CALIBRATION_ENV = "TAGGER_INT8_CALIBRATION"
INT8_CALIBRATION_IMAGES = 200
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def calibration_identity() -> dict[str, Any]:
    """What :func:`calibration_images` would calibrate on now, without decoding anything: the folder and a hash
    of the names it would take, or the generated set. A precision check of int8 records it."""
    folder = os.environ.get(INT8_CALIBRATION_ENV)
    if not folder:
        return {"source": "generated"}
    try:
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)[:INT8_CALIBRATION_IMAGES]
    except OSError:
        return {"source": "folder", "folder": str(Path(folder).resolve()), "names_sha256": None}
    names = hashlib.sha256("\n".join(p.name for p in files).encode()).hexdigest()[:16]
    return {"source": "folder", "folder": str(Path(folder).resolve()), "names_sha256": names}


def calibration_images(size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """uint8 NCHW images that calibrate the int8 model, and what they were (recorded, part of the cache key)."""
    folder = os.environ.get(INT8_CALIBRATION_ENV)
    if folder:
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)[:INT8_CALIBRATION_IMAGES]
        pixels = []
        for path in files:
            try:
                pixels.append(decode_image(path.read_bytes(), size, source=str(path)))
            except (ImageError, OSError) as exc:
                log.warning("int8 calibration: %s skipped (%s)", path, exc)
        if len(pixels) < 16:
            raise RuntimeSettingError(
                f"{INT8_CALIBRATION_ENV}={folder}: {len(pixels)} usable photo(s) (.jpg/.png/.webp), at least 16 are needed "
                f"to calibrate --precision int8 (up to {INT8_CALIBRATION_IMAGES} are used); point it at a folder of catalog photos or unset it"
            )
        names = hashlib.sha256("\n".join(p.name for p in files).encode()).hexdigest()[:16]
        source = {"source": "folder", "folder": str(Path(folder).resolve()), "images": len(pixels), "names_sha256": names}
    else:
        rng = np.random.default_rng(0)
        pixels = []
        for i in range(64):
            labels = {name: values[rng.integers(len(values))] for name, values in CLASSES.items()}
            drawing = render_product(labels, (size * 3 // 4, size), seed=(i, 22))
            pixels.append(decode_image(_png(drawing), size))
        source = {"source": "generated", "images": len(pixels)}
    return np.stack(pixels).transpose(0, 3, 1, 2).copy(), source


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def int8_model(bundle: ModelBundle, cache_dir: str | Path | None = None) -> Path:
    """The bundle's ONNX export quantized to int8 (ONNX Runtime's static QDQ quantization: weights int8 per
    channel, activations uint8 per tensor, ranges from :func:`calibration_images`), made once per
    ``model_version`` and calibration set beside the fp32 export (``int8-<calibration>.json`` records it)."""
    fp32 = onnx_model(bundle, cache_dir)
    folder = fp32.parent
    images, source = calibration_images(bundle.input_size)
    tag = hashlib.sha256(json.dumps({"format": INT8_FORMAT, **source}, sort_keys=True).encode()).hexdigest()[:12]
    record_file = folder / f"int8-{tag}.json"
    try:
        record = json.loads(record_file.read_text())
        path = folder / record["file"]
        if record.get("fp32_sha256") == file_sha256(fp32) and path.is_file() and file_sha256(path) == record["sha256"]:
            log.info("int8 model of %s: %s (cached; calibrated on %s)", bundle.model_version, path, record["calibration"])
            return path
    except (OSError, ValueError, KeyError, TypeError):
        pass
    started = time.time()
    log.info("int8 model of %s: quantizing the ONNX export, calibrated on %d %s image(s); once per model_version",
             bundle.model_version, source["images"], source["source"])
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise RuntimeSettingError("--precision int8 quantizes with onnxruntime: pip install 'fashion-tagger[onnx]'") from None

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": images[i:i + 16]} for i in range(0, len(images), 16)])

        def get_next(self):
            return next(self.batches, None)

    prepared = folder / f"int8-prep.{os.getpid()}.partial"
    partial = folder / f"int8.{os.getpid()}.partial"
    # The quantizer logs a line per adjusted weight scale on the root logger: hundreds of lines, none actionable.
    logging.disable(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(fp32), str(prepared))
            quantize_static(str(prepared), str(partial), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    prepared.unlink(missing_ok=True)
    digest = file_sha256(partial)
    path = folder / f"model-int8-{digest[:16]}.onnx"
    os.replace(partial, path)
    record = {"int8_format": INT8_FORMAT, "model_version": bundle.model_version, "file": path.name, "sha256": digest,
              "fp32_sha256": file_sha256(fp32), "calibration": source, "quantizer": "onnxruntime.quantization.quantize_static "
              "QDQ, per-channel int8 weights, uint8 activations, MinMax", "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    tmp = folder / f"{record_file.name}.{os.getpid()}.partial"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, record_file)
    log.info("int8 model of %s done in %.0f s: %s", bundle.model_version, time.time() - started, path)
    return path
