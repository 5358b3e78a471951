"""Deterministic generated images: the trial batch every runtime runs before a job changes anything, and the
check images a bundle's reference outputs and an ONNX export's verification are computed on."""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def check_images_digest(images: torch.Tensor) -> str:
    """A hash of the check images: a bundle's reference outputs hold only for the images they were computed on."""
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(images.numpy()).tobytes()).hexdigest()[:32]


def trial_images(size: int, n: int) -> torch.Tensor:
    """Deterministic uint8 images (``n``, 3, ``size``, ``size``) for a trial or check pass, with structure
    (gradients + noise): something a conv net responds to."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    images = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        for c in range(3):
            images[i, c] = (ramp[None, :] * (c + 1 + i) / 4 + ramp[:, None] / 2) % 256
    images += rng.normal(0, 20, images.shape)
    return torch.from_numpy(np.clip(images, 0, 255).astype(np.uint8))
