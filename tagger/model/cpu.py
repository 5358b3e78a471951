"""What this CPU computes natively (bfloat16) and what identifies it: the facts a measured runtime choice
depends on (:mod:`tagger.model.choice`) and a precision check records."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .settings import RuntimeSettingError

# Forces cpu_has_bf16's answer: 1 = as if the CPU had native bfloat16, 0 = as if not; unset = ask the CPU.
# What ``auto`` picks follows it, so the test suite also runs the native-bf16 branch on a CPU without it (bf16
# autocast is emulated there: the same numbers, only slower); .ci/run runs the precision tests both ways.
CPU_BF16_ENV = "TAGGER_CPU_BF16"

_CPU_BF16_WORDS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def cpu_has_bf16() -> bool:
    """Native bfloat16 arithmetic (AVX512-BF16 or AMX): without it bf16 is emulated and slower than fp32.
    ``$TAGGER_CPU_BF16`` (1/0) overrides the answer."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip().lower()
    if forced:
        if forced not in _CPU_BF16_WORDS:
            raise RuntimeSettingError(f"{CPU_BF16_ENV}={os.environ[CPU_BF16_ENV]!r}: expected 1 (as if the CPU had native "
                                      "bfloat16) or 0 (as if not); unset it to ask the CPU")
        return _CPU_BF16_WORDS[forced]
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def cpu_identity() -> dict[str, Any]:
    """What makes one CPU faster with one runtime than another: its model name and instruction-set flags."""
    import hashlib
    import platform

    name, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine()):
                name = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = value.strip()
    except OSError:
        pass
    return {"model": name, "flags_sha256": hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:16]}


def library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for package in ("torch", "onnxruntime", "openvino"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions
