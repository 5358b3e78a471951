"""The words of ``--device``, ``--precision`` and ``--runtime``, and the error of a setting that cannot run here.

Every command takes these options (jobs/options.py declares them once); the model layer checks them. They live
here, below the tag job, evaluate, predict and retrain, so that each of them and the model layer read one
definition without importing each other. Importing this module loads nothing heavy (the CLI reads it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")  # what each means: tagger.model.predictor.precision_settings
RUNTIMES = ("auto", "torch", "onnx", "openvino")  # what runs the model: tagger.model.choice.choose_runtime


class RuntimeSettingError(ValueError):
    """A --runtime (or --precision) that cannot run here: its package is not installed, it does not run on
    this device, or it does not compute that precision. An invalid option: exit 2 before anything changes."""


@dataclass(frozen=True)
class InferenceSpec:
    """The options that decide what runs the model, as every command spells them (jobs/options.py); resolved
    against a bundle by :func:`tagger.model.inference.resolve`. Light on purpose: the tag job's config checks
    its options through it before torch is imported."""

    device: str = "auto"
    runtime: str = "auto"
    precision: str = "auto"
    threads: int = 0  # torch threads of the model on the CPU; 0: torch's default

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise RuntimeSettingError("; ".join(problems))

    def problems(self) -> list[str]:
        return spec_problems(self.device, self.runtime, self.precision, self.threads)


def spec_problems(device: str, runtime: str, precision: str, threads: int) -> list[str]:
    """What is wrong with these option values, one sentence each (empty: nothing)."""
    problems = []
    if device not in DEVICES and not re.fullmatch(r"cuda:\d+", device):
        problems.append(f"device must be one of {', '.join(DEVICES)} or cuda:N, got {device!r}")
    if precision not in PRECISIONS:
        problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if runtime not in RUNTIMES:
        problems.append(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if threads < 0:
        problems.append("threads must be >= 0 (0: automatic)")
    return problems
