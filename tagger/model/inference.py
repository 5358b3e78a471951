"""What runs the model, decided once: ``--device``, ``--runtime``, ``--precision`` and ``--threads`` as one frozen
:class:`InferenceSpec`, resolved against a bundle by :func:`resolve` into an :class:`Inference` that builds the
:class:`~tagger.model.predictor.Predictor` and runs the trial batch.

The tag job (both engines), evaluate, predict and retrain's val/test scoring all call :func:`resolve`; where they
must differ, the difference is one of its named arguments, not a copy of the rule (Lightning resolves
``precision=`` into one plugin object the same way):

- ``measure``: whether ``--runtime auto`` on a CPU may measure the candidates here (:mod:`tagger.model.choice`,
  cached per model_version and CPU). ``"always"``: the tag job and predict. ``"checked"``: evaluate, which
  measures only where the bundle passed a precision check this CPU could pick, so that it scores what tag
  writes, and otherwise takes the first installed fp32 runtime as retrain's scoring did. ``"never"``: the
  order of preference; retrain (the bundle is not saved yet, its thresholds unknown) and Ray actors that may
  run on other CPUs than the driver's.
- ``device``: a device decided elsewhere (the Ray engine decides it from the cluster's resources).
- ``cache_dir``: where the ONNX export is cached (retrain: its own folder, as its model_version is not final).
- ``fallback_to_torch``: a runtime that cannot be built is replaced by PyTorch with a warning instead of
  failing (retrain: the training is not lost for an export that fails; the bundle records what scored).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from . import choice
from .bundle import ModelBundle
from .check_images import trial_images
from .engines import RuntimeChoice
from .predictor import Predictor, precision_settings, resolve_device
from .settings import InferenceSpec, RuntimeSettingError

log = logging.getLogger(__name__)

MEASURE = ("always", "checked", "never")


@dataclass
class Inference:
    """A spec resolved against one bundle: the device, the runtime and why (with the measured costs where it
    measured), and the Predictor arguments of the precision it computes in."""

    spec: InferenceSpec
    bundle: ModelBundle
    device: torch.device
    runtime: RuntimeChoice
    settings: dict[str, Any]  # Predictor's amp / amp_dtype / int8
    cache_dir: str | None = None
    fallback_to_torch: bool = False
    _prepared: Predictor | None = field(default=None, repr=False)

    @property
    def precision(self) -> str:
        """What the model computes in: fp32, bf16, fp16 or int8."""
        if self.settings.get("int8"):
            return "int8"
        if not self.settings.get("amp", self.device.type == "cuda"):
            return "fp32"
        dtype = self.settings.get("amp_dtype") or (torch.bfloat16 if self.device.type == "cpu" else torch.float16)
        return "bf16" if dtype == torch.bfloat16 else "fp16"

    @property
    def computed(self) -> str:
        """``runtime`` or ``runtime precision`` where ``auto`` chose the precision too (evaluate's report)."""
        return f"{self.runtime.name} {self.runtime.precision}" if self.runtime.precision else self.runtime.name

    def describe(self) -> dict[str, Any]:
        """The run summary's ``runtime`` entry: what ran, in what arithmetic, and why."""
        facts: dict[str, Any] = {"name": self.runtime.name, "precision": self.precision, "reason": self.runtime.reason}
        if self.runtime.measured:  # --runtime auto measured the candidates: what an image cost each
            facts["measured_cpu_ms_per_image"] = self.runtime.measured
        return facts

    def predictor(self) -> Predictor:
        """The Predictor: the one :meth:`prepare` built and tried (handed over once), else a new one."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            return prepared
        return self._build()

    def prepare(self) -> Predictor:
        """The Predictor built (for ONNX Runtime/OpenVINO: the export made, or the cached file checked) and two
        generated images through it, with the threads the job runs with: what a runtime fails on fails here,
        before a job changes anything. Kept for the next :meth:`predictor`."""
        predictor = self._build()
        with self.cpu_threads():
            predictor(trial_images(self.bundle.input_size, 2))
        self._prepared = predictor
        return predictor

    def _build(self) -> Predictor:
        try:
            return Predictor(self.bundle, self.device, runtime=self.runtime, runtime_cache=self.cache_dir, **self.settings)
        except (RuntimeError, OSError, ValueError) as exc:
            if not self.fallback_to_torch or self.runtime.name == "torch":
                raise
            log.warning("the runtime %s failed (%s); scoring with PyTorch instead, whose numbers tag writes with "
                        "--runtime torch", self.runtime.name, exc)
            self.runtime = RuntimeChoice("torch", f"{self.runtime.name} failed ({exc}); PyTorch instead")
            self.settings = precision_settings(self.spec.precision, self.device, "torch")
            return Predictor(self.bundle, self.device, runtime=self.runtime, **self.settings)

    @contextmanager
    def cpu_threads(self) -> Iterator[None]:
        """``threads`` for the model on the CPU while it runs; torch's own count again afterwards."""
        previous = torch.get_num_threads()
        if self.device.type == "cpu" and self.spec.threads > 0:
            torch.set_num_threads(self.spec.threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)


def resolve(spec: InferenceSpec, bundle: ModelBundle, *, measure: str = "always", device: torch.device | None = None,
            cache_dir: str | None = None, fallback_to_torch: bool = False) -> Inference:
    """``spec`` against ``bundle``: the device (``auto`` says which), the runtime (``auto`` measured or by order of
    preference, see the module docstring for ``measure``) and the precision, checked against each other now.

    Raises :class:`RuntimeSettingError` for a setting that cannot run here (a runtime not installed or not on
    this device, a precision it does not compute) and RuntimeError for a CUDA device without a GPU: each
    command turns them into its exit 2 before anything under its output changes."""
    if measure not in MEASURE:
        raise ValueError(f"measure must be one of {', '.join(MEASURE)}, got {measure!r}")
    device = device if device is not None else resolve_device(spec.device)
    measured_on = bundle if _measures(measure, spec, bundle) else None
    previous = torch.get_num_threads()
    if device.type == "cpu" and spec.threads > 0:
        torch.set_num_threads(spec.threads)  # a measured choice is made with the threads the job will use
    try:
        runtime = choice.choose_runtime(spec.runtime, device, spec.precision, bundle=measured_on)
    finally:
        torch.set_num_threads(previous)
    precision = runtime.precision if runtime.precision and spec.precision == "auto" else spec.precision
    try:
        settings = precision_settings(precision, device, runtime.name)
    except ValueError as exc:  # a precision this device or runtime does not compute: a bad option
        raise RuntimeSettingError(str(exc)) from None
    return Inference(spec, bundle, device, runtime, settings, cache_dir, fallback_to_torch)


def _measures(measure: str, spec: InferenceSpec, bundle: ModelBundle) -> bool:
    if measure == "always":
        return True
    if measure == "never":
        return False
    # "checked": only where a reduced precision could be chosen (the bundle passed its check, this CPU computes it)
    return spec.precision == "auto" and any(p != "fp32" for _, p in choice.candidates("auto", bundle))

