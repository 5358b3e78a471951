"""The engines that run a bundle's exported network on the CPU (ONNX Runtime, OpenVINO), what each computes,
whether its package is installed, and the :class:`RuntimeChoice` naming the runtime a job runs on and why.

The extra runtimes are optional packages (setup.cfg extras ``onnx``, ``openvino``, both in ``runtimes``); they
are imported only in the branch that uses them, and asking for one that is not installed is an error naming
the extra, never a quiet switch to another runtime.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import cpu
from .settings import RuntimeSettingError

# runtime -> (module that must import, setup.cfg extra that installs it)
PACKAGES = {"onnx": ("onnxruntime", "onnx"), "openvino": ("openvino", "openvino")}
# The legacy (TorchScript) exporter writes through the `onnx` package; both extras pin it.
EXPORT_PACKAGE = "onnx"

# Which precisions each runtime computes on the CPU (fp16 is CUDA-only everywhere). int8: the ONNX export
# statically quantized (int8_model), which both ONNX Runtime and OpenVINO run.
CPU_PRECISIONS = {"torch": ("fp32", "bf16"), "onnx": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8")}


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime that runs the model, and why (logged, and recorded in the run summary). ``precision``: what
    it computes in when ``auto`` chose that too by measuring (None: ``--precision`` decides as usual);
    ``measured``: each candidate's measured rate (img/s) or why it failed, for the run summary."""

    name: str
    reason: str
    precision: str | None = None
    measured: dict[str, Any] | None = None


def installed(runtime: str) -> bool:
    if runtime == "torch":
        return True
    module, _ = PACKAGES[runtime]
    return importlib.util.find_spec(module) is not None and importlib.util.find_spec(EXPORT_PACKAGE) is not None


def require(runtime: str) -> None:
    if not installed(runtime):
        module, extra = PACKAGES[runtime]
        raise RuntimeSettingError(
            f"--runtime {runtime} needs the Python packages {module} and {EXPORT_PACKAGE}, which are not installed: "
            f"pip install 'fashion-tagger[{extra}]' (or `make setup`, which installs the extras), or use --runtime torch"
        )


def cpu_precision(runtime: str, precision: str) -> str:
    """``--precision`` -> what a non-PyTorch runtime computes on the CPU: ``fp32`` or ``bf16``."""
    if precision == "fp16":
        raise ValueError("--precision fp16 is for CUDA; on the CPU use bf16 (or fp32)")
    if precision == "auto":
        return "bf16" if "bf16" in CPU_PRECISIONS[runtime] and cpu.cpu_has_bf16() else "fp32"
    if precision not in CPU_PRECISIONS[runtime]:
        raise ValueError(f"--precision {precision} is not available with --runtime {runtime} (it computes "
                         f"{' or '.join(CPU_PRECISIONS[runtime])} on the CPU); use --precision fp32 or --runtime openvino/torch")
    return precision


def asked_for(requested: str, device: torch.device) -> RuntimeChoice:
    """An explicit ``--runtime`` (torch, onnx, openvino) checked against ``device`` and what is installed; off the
    CPU, ``auto`` is PyTorch (the only GPU path shipped)."""
    if device.type != "cpu" and requested in ("auto", "torch"):
        return RuntimeChoice("torch", f"{device.type}: PyTorch (the GPU path: AMP, channels-last, uint8 transfer)")
    if device.type != "cpu":
        raise RuntimeSettingError(
            f"--runtime {requested} runs on the CPU only (the CPU builds of its package are what the extra installs); "
            f"with --device {device.type} use --runtime torch or auto"
        )
    if requested == "auto":
        raise ValueError("runtime auto is resolved by tagger.model.inference.resolve, which measures or orders the candidates")
    if requested != "torch":
        require(requested)
    return RuntimeChoice(requested, "asked for with --runtime")


# -- engines: uint8 NCHW numpy/torch batch -> list of logits arrays, in attribute order -------------

class OnnxRuntimeEngine:
    """ONNX Runtime's CPU execution provider, fp32, all graph optimisations."""

    name = "onnx"

    def __init__(self, path: Path, precision: str, threads: int):
        import onnxruntime as ort

        if precision not in ("fp32", "int8"):
            raise ValueError(f"ONNX Runtime's CPU provider runs fp32 or int8 here, not {precision}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # The decode workers share these cores: threads that spin while waiting for work would take the
        # CPU from them (the same effect --threads avoids for PyTorch's OpenMP pool).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.description = f"onnxruntime {ort.__version__} CPU {precision}, {threads} thread(s)"

    def __call__(self, images: torch.Tensor) -> list[np.ndarray]:
        # The reader's batches are NCHW views of NHWC memory; ONNX Runtime wants C-contiguous input.
        return self.session.run(None, {self.input: np.ascontiguousarray(images.numpy())})


class OpenVinoEngine:
    """OpenVINO's CPU plugin, latency hint (one batch at a time, every core on it), fp32 or bf16."""

    name = "openvino"

    def __init__(self, path: Path, precision: str, threads: int):
        import openvino as ov

        core = ov.Core()
        # int8: the quantized graph's QuantizeLinear/DequantizeLinear pairs make OpenVINO run those layers in
        # int8; what is left between them stays f32.
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                  "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.outputs = list(self.compiled.outputs)
        self.description = f"openvino {ov.__version__} CPU {precision}, {threads} thread(s)"

    def __call__(self, images: torch.Tensor) -> list[np.ndarray]:
        results = self.request.infer({0: np.ascontiguousarray(images.numpy())})
        # Copies: the request's output buffers are reused by the next batch.
        return [np.array(results[port]) for port in self.outputs]


ENGINES = {"onnx": OnnxRuntimeEngine, "openvino": OpenVinoEngine}
