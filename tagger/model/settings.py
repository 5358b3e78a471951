"""The words of ``--device``, ``--precision`` and ``--runtime``, and the error of a setting that cannot run here.

Every command takes these options (jobs/options.py declares them once); the model layer checks them. They live
here, below the tag job, evaluate, predict and retrain, so that each of them and the model layer read one
definition without importing each other. Importing this module loads nothing heavy (the CLI reads it).
"""

from __future__ import annotations

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")  # what each means: tagger.model.predictor.precision_settings
RUNTIMES = ("auto", "torch", "onnx", "openvino")  # what runs the model: tagger.model.choice.choose_runtime


class RuntimeSettingError(ValueError):
    """A --runtime (or --precision) that cannot run here: its package is not installed, it does not run on
    this device, or it does not compute that precision. An invalid option: exit 2 before anything changes."""
