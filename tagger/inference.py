"""A batch of uint8 images -> top label index and score per attribute. Pure compute, no I/O."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .bundle import ModelBundle

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


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def precision_settings(precision: str, device: torch.device) -> dict:
    """``--precision`` -> Predictor arguments.

    ``auto``: fp16 autocast on CUDA; on the CPU bf16 autocast where the CPU computes bfloat16 natively
    (AVX512-BF16, AMX), else fp32. bf16 autocasts convolutions and matmuls to bfloat16: on such a CPU
    efficientnet_b3 tags ~1.5x faster than in fp32, top labels equal except near-ties, scores within
    0.05 (tests/test_decode_equivalence.py states and tests the tolerance, docs/benchmarks.md has the
    figures). ``fp32`` turns autocast off.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
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
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


@dataclass(frozen=True)
class Predictions:
    """Per attribute, in bundle order: top label index (int64) and its softmax score (float32)."""

    indices: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]


class Predictor:
    """Runs a bundle's network on batches: eval mode, inference mode, channels-last, AMP on CUDA."""

    def __init__(self, bundle: ModelBundle, device: torch.device, *, amp: bool | None = None, channels_last: bool = True,
                 amp_dtype: torch.dtype | None = None):
        self.bundle = bundle
        self.device = device
        self.amp = device.type == "cuda" if amp is None else amp
        self.amp_dtype = amp_dtype or (torch.bfloat16 if device.type == "cpu" else torch.float16)
        self.net = bundle.build_net().to(device)
        # Channels-last matches the NHWC layout the decoder produces (no transpose copy) and is the
        # fast path for convolutions on both CUDA (tensor cores) and CPU (oneDNN).
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = self.net.to(memory_format=self.memory_format)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> Predictions:
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            logits = self.net(images)
        indices, scores = {}, {}
        for name, values in logits.items():
            probabilities = values.float().softmax(dim=1)
            score, index = probabilities.max(dim=1)
            indices[name] = index.cpu().numpy()
            scores[name] = score.cpu().numpy().astype(np.float32)
        return Predictions(indices, scores)

    def labels(self, predictions: Predictions) -> dict[str, np.ndarray]:
        """Label strings per attribute (numpy object arrays) from the bundle's vocabularies."""
        return {
            spec.name: np.asarray(spec.labels, dtype=object)[predictions.indices[spec.name]] for spec in self.bundle.attributes
        }
