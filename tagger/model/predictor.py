"""A batch of uint8 images -> top label index and score (and, when asked, every probability) per attribute.

The one forward pass of tag, evaluate, predict and retrain's val/test scoring: the same device rule,
runtime (``--runtime``: PyTorch, or the exported network in ONNX Runtime or OpenVINO, see
:mod:`tagger.model.engines`), precision (``--precision``), channels-last and uint8 input everywhere, and one
softmax/top-label step after whichever runtime produced the logits, so that evaluate and the review
thresholds measure exactly what the tag job writes. Pure compute; the only I/O is the ONNX export cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import cpu, engines
from .bundle import ModelBundle
from .engines import RuntimeChoice
from .export import onnx_model
from .int8 import int8_model
from .network import TaggerNet
from .scope import decode_labels, scope_predictions
from .settings import PRECISIONS

log = logging.getLogger(__name__)


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when there is a GPU and says so; asking for CUDA without one is an error."""
    if requested == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda")
            log.info("device auto: using CUDA (%s)", torch.cuda.get_device_name(device))
        else:
            device = torch.device("cpu")
            log.info("device auto: no CUDA GPU visible, using the CPU (%d threads)", torch.get_num_threads())
        return device
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"--device {requested}: no CUDA GPU is visible to PyTorch (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda}); use --device cpu or auto, or check the driver and CUDA_VISIBLE_DEVICES"
        )
    return torch.device(requested)


def precision_settings(precision: str, device: torch.device, runtime: str = "torch") -> dict:
    """``--precision`` -> Predictor arguments.

    ``auto``: fp16 autocast on CUDA; on the CPU bf16 autocast where the CPU computes bfloat16 natively
    (AVX512-BF16, AMX), else fp32. bf16 autocasts convolutions and matmuls to bfloat16: on such a CPU
    efficientnet_b3 tags ~1.5x faster than in fp32, top labels equal except near-ties, scores within
    0.05 (tests/test_decode_equivalence.py states and tests the tolerance, docs/benchmarks.md has the
    figures). ``fp32`` turns autocast off.

    ``runtime`` onnx/openvino (CPU only): the same words, checked against what that runtime computes
    (:func:`tagger.model.engines.cpu_precision`: ONNX Runtime fp32 only, OpenVINO fp32 or bf16, ``auto`` bf16
    only where the CPU has it natively); the result is passed on as ``amp``/``amp_dtype`` like PyTorch's.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if runtime not in ("torch", "auto"):
        computed = engines.cpu_precision(runtime, precision)
        if computed == "int8":
            return {"amp": False, "int8": True}
        return {"amp": True, "amp_dtype": torch.bfloat16} if computed == "bf16" else {"amp": False}
    if precision == "int8":
        raise ValueError("--precision int8 runs the quantized ONNX export on the CPU: use --runtime onnx, openvino or auto")
    if precision == "auto":
        return {"amp": True, "amp_dtype": torch.bfloat16} if device.type == "cpu" and _cpu_has_bf16() else {}
    if precision == "fp32":
        return {"amp": False}
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("--precision fp16 is for CUDA; on the CPU use bf16 (or fp32)")
    if precision == "bf16" and device.type == "cpu" and not _cpu_has_bf16():
        log.warning("--precision bf16: this CPU has no native bfloat16 (AVX512-BF16/AMX); expect it to be slower than fp32")
    return {"amp": True, "amp_dtype": torch.bfloat16 if precision == "bf16" else torch.float16}


def _cpu_has_bf16() -> bool:
    return cpu.cpu_has_bf16()


@dataclass(frozen=True)
class Predictions:
    """Per attribute, in the net's head order: top label index (int64) and its softmax score (float32);
    ``probabilities``: the whole softmax vector per image ``(n, n_labels)`` float32, when asked for."""

    indices: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]
    probabilities: dict[str, np.ndarray] | None = None


class Predictor:
    """Runs a network on batches of uint8 images: eval mode, inference mode, channels-last, autocast.

    ``model``: a bundle (the tag job, evaluate, predict) or a :class:`TaggerNet` being trained (retrain's
    val/test scoring, before any bundle exists; it is put in eval mode and left on ``device``).
    ``precision``: ``auto``/``fp32``/``bf16``/``fp16``, as :func:`precision_settings` resolves it; or
    give ``amp``/``amp_dtype`` directly. Neither: autocast (fp16) on CUDA only.
    ``runtime``: ``torch`` (default), ``onnx``, ``openvino``, or a :class:`RuntimeChoice` made earlier (``auto``
    is chosen by :func:`tagger.model.inference.resolve`, which measures with Predictors); the exported runtimes
    need a bundle (the export is cached
    by its ``model_version``). ``runtime_cache``: where exports are cached (default: the user cache).
    """

    def __init__(self, model: ModelBundle | TaggerNet, device: torch.device, *, precision: str | None = None,
                 amp: bool | None = None, channels_last: bool = True, amp_dtype: torch.dtype | None = None,
                 runtime: str | RuntimeChoice = "torch", runtime_cache: str | None = None, int8: bool = False):
        if not isinstance(runtime, RuntimeChoice):
            runtime = engines.asked_for(runtime, device)
        self.runtime = runtime
        if runtime.precision is not None and precision in (None, "auto") and amp is None:
            precision = runtime.precision  # `auto` measured the runtime together with what it computes in
        if precision is not None:
            if amp is not None or amp_dtype is not None:
                raise ValueError("give either precision or amp/amp_dtype, not both")
            settings = precision_settings(precision, device, self.runtime.name)
            amp, amp_dtype, int8 = settings.get("amp"), settings.get("amp_dtype"), settings.get("int8", False)
        self.int8 = int8
        self.bundle = model if isinstance(model, ModelBundle) else None
        self.device = device
        self.amp = device.type == "cuda" if amp is None else amp
        self.amp_dtype = amp_dtype or (torch.bfloat16 if device.type == "cpu" else torch.float16)
        # Channels-last matches the NHWC layout the decoder produces (no transpose copy) and is the
        # fast path for convolutions on both CUDA (tensor cores) and CPU (oneDNN).
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net: TaggerNet | None = None
        self.exported: ExportedModel | None = None
        if self.runtime.name == "torch":
            if self.int8:
                raise ValueError("int8 runs the quantized ONNX export: use runtime onnx or openvino")
            net = model.build_net() if isinstance(model, ModelBundle) else model
            self.net = net.eval().to(device).to(memory_format=self.memory_format)
        else:
            if self.bundle is None:
                raise ValueError(f"runtime {self.runtime.name} runs a bundle's exported network; a bare network runs with runtime torch")
            if self.amp and self.amp_dtype != torch.bfloat16:
                raise ValueError(f"runtime {self.runtime.name} runs on the CPU in fp32 or bf16, not {self.amp_dtype}")
            computed = "int8" if self.int8 else "bf16" if self.amp else "fp32"
            if computed not in engines.CPU_PRECISIONS[self.runtime.name]:
                raise ValueError(f"runtime {self.runtime.name} computes {' or '.join(engines.CPU_PRECISIONS[self.runtime.name])}, not {computed}")
            self.exported = ExportedModel(self.bundle, self.runtime.name, computed, runtime_cache)
        # What runs, in what arithmetic, then why ("model: onnx computing in fp32: measured cheapest on this CPU just
        # now (...)"): the arithmetic used, never a --precision setting that reads as contradicting it.
        log.info("model: %s computing in %s: %s", self.runtime.name, self.precision_name, self.runtime.reason)

    @property
    def precision_name(self) -> str:
        """What the model computes in: fp32, bf16, fp16 (autocast for PyTorch, the engine's setting otherwise) or int8."""
        if self.int8:
            return "int8"
        if not self.amp:
            return "fp32"
        return "bf16" if self.amp_dtype == torch.bfloat16 else "fp16"

    def _logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.exported is not None:
            names = [spec.name for spec in self.bundle.attributes]
            return dict(zip(names, self.exported(images)))
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            return self.net(images)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, *, probabilities: bool = False) -> Predictions:
        """Top label and score per attribute; with ``probabilities`` also every class's probability
        (the top label and score are the same either way: evaluate scores what tag writes)."""
        logits = self._logits(images)
        indices, scores, vectors = {}, {}, {}
        for name, values in logits.items():
            softmax = values.float().softmax(dim=1)
            score, index = softmax.max(dim=1)
            indices[name] = index.cpu().numpy()
            scores[name] = score.cpu().numpy().astype(np.float32)
            if probabilities:
                vectors[name] = softmax.cpu().numpy()
        return self.scoped(Predictions(indices, scores, vectors if probabilities else None))

    def scoped(self, predictions: Predictions) -> Predictions:
        """Out of an attribute's scope (its ``applies_when``), index -1 and score NaN: a null tag, not a guess."""
        return scope_predictions(self.bundle.attributes, predictions) if self.bundle is not None else predictions

    def labels(self, predictions: Predictions) -> dict[str, np.ndarray]:
        """Label strings per attribute (numpy object arrays) from the bundle's vocabularies; None out of scope."""
        if self.bundle is None:
            raise ValueError("this Predictor runs a bare network: label strings come from a bundle's vocabularies")
        return decode_labels(self.bundle.attributes, predictions.indices)


class ExportedModel:
    """A bundle's ONNX export run by ``runtime`` on the CPU; the session is made at the first batch, with
    the torch thread count in effect then, so that ``--threads`` sets every runtime's threads."""

    def __init__(self, bundle: ModelBundle, runtime: str, precision: str, cache_dir: str | Path | None = None):
        engines.require(runtime)
        self.runtime, self.precision = runtime, precision
        self.path = int8_model(bundle, cache_dir) if precision == "int8" else onnx_model(bundle, cache_dir)
        self._engine: Any = None
        self._threads = 0

    def engine(self):
        threads = max(1, torch.get_num_threads())
        if self._engine is None or threads != self._threads:
            self._engine, self._threads = engines.ENGINES[self.runtime](self.path, self.precision, threads), threads
            log.info("runtime %s: %s", self.runtime, self._engine.description)
        return self._engine

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.dtype != torch.uint8:
            raise TypeError(f"the exported model takes uint8 images, got {images.dtype}")
        return [torch.from_numpy(np.asarray(a)) for a in self.engine()(images.cpu())]
