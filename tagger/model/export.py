"""The bundle's network exported to ONNX once per ``model_version`` into the user cache, and verified: against
the PyTorch network on generated images, or against the bundle's recorded reference outputs (then the network
is never built). ONNX Runtime and OpenVINO (:mod:`tagger.model.engines`) run the file."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import engines
from .check_images import check_images_digest, trial_images
from .settings import RuntimeSettingError
from ..storage import file_sha256, user_cache_dir

if TYPE_CHECKING:
    from .bundle import ModelBundle
    from .network import TaggerNet

log = logging.getLogger(__name__)

OPSET = 17
EXPORT_FORMAT = 1  # bump when the exported graph's contract (inputs, outputs, names) changes
# Largest difference of any softmax probability between a fresh export and the PyTorch network, in fp32,
# above which the export is refused: both compute the same fp32 graph, so only summation order differs
# (measured ~1e-8 on efficientnet_b3 and test_efficientnet).
EXPORT_TOLERANCE = 1e-4


def onnx_cache_dir() -> Path:
    """``$TAGGER_CACHE/onnx``, else ``$XDG_CACHE_HOME/fashion-tagger/onnx`` (``~/.cache`` by default): the
    convention of :func:`tagger.model.pretrained.weights_cache_dir`. A user cache rather than the bundle's folder,
    which may be on S3 or read-only."""
    return Path(user_cache_dir("onnx"))


class _Logits(torch.nn.Module):
    """The bundle's network with its dict of logits as a tuple in attribute order: ONNX outputs are
    positional, and positions (``logits_0``...) do not depend on what characters a label name holds."""

    def __init__(self, net: TaggerNet, names: list[str]):
        super().__init__()
        self.net, self.names = net, names

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.net(images)
        return tuple(logits[name] for name in self.names)


def _expected_record(bundle: ModelBundle) -> dict[str, Any]:
    """What a cached export must say about itself to be used for ``bundle``."""
    return {
        "export_format": EXPORT_FORMAT,
        "model_version": bundle.model_version,
        "input": [3, bundle.input_size, bundle.input_size],
        "outputs": [[spec.name, len(spec.labels)] for spec in bundle.attributes],
    }


def _trusted(folder: Path, bundle: ModelBundle) -> tuple[Path | None, str]:
    """The cached export for ``bundle`` if its record matches the bundle and its file matches its hash."""
    record_file = folder / "export.json"
    if not record_file.is_file():
        return None, "no export yet"
    try:
        record = json.loads(record_file.read_text())
        expected = _expected_record(bundle)
        different = [k for k, v in expected.items() if record.get(k) != v]
        if different:
            return None, f"{record_file} was made for something else ({', '.join(different)} differ)"
        path = folder / str(record["file"])
        if path.name != record["file"] or not path.is_file():
            return None, f"{record_file} names {record['file']!r}, which is not there"
        if file_sha256(path) != record["sha256"]:
            return None, f"{path} does not match the sha256 in {record_file} (changed or cut short)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{record_file} is unreadable ({type(exc).__name__}: {exc})"
    return path, "cached"


def onnx_model(bundle: ModelBundle, cache_dir: str | Path | None = None) -> Path:
    """The bundle's network as an ONNX file: uint8 NCHW ``images`` (batch dynamic, side = the bundle's
    input size) in, normalisation inside, ``logits_<i>`` out in the bundle's attribute order.

    Exported once per ``model_version`` (a hash of the weights and of everything in model.json that changes
    predictions) into ``<cache>/<model_version>/``, beside ``export.json`` (model_version, shapes, the
    file's sha256, how it was made and checked). A cached file is used only when its record matches the
    bundle, the file matches its hash, and it computes what the bundle's PyTorch network computes on
    generated images (:func:`_check_export`, at every load: a record and a hash are easily rewritten
    together, so they only say the file is whole, not that it is this model); anything else is exported
    again. A fresh export is checked the same way before it is recorded.
    """
    _require_export()
    folder = Path(cache_dir or onnx_cache_dir()) / bundle.model_version
    path, why = _trusted(folder, bundle)
    if path is not None and _reproduces_reference(bundle, path):
        return path
    if path is not None:
        try:
            check = _check_export(bundle.build_net().float().eval(), bundle.attribute_names, path)
        except Exception as exc:  # another network's export under this model's record, forged or damaged
            why = f"{path} is not this model's network ({exc})"
        else:
            log.info("ONNX export of model %s: %s (cached; checked: %s)", bundle.model_version, path, check)
            return path
    if why != "no export yet":
        log.warning("ONNX export of model %s not trusted: %s; exporting again", bundle.model_version, why)
    try:
        return _export(bundle, folder)
    except OSError as exc:  # e.g. a container whose HOME is read-only: say what to set, not a bare errno
        raise RuntimeSettingError(
            f"cannot write the ONNX export of model {bundle.model_version} under {folder} ({exc}); set TAGGER_CACHE "
            "to a writable folder (the export is made once per model_version), or use --runtime torch"
        ) from None


def _export(bundle: ModelBundle, folder: Path) -> Path:
    started = time.time()
    log.info("exporting model %s (%s @ %d px) to ONNX, once for this model_version: %s",
             bundle.model_version, bundle.backbone, bundle.input_size, folder)
    folder.mkdir(parents=True, exist_ok=True)
    net = bundle.build_net().float().eval()
    partial = folder / f"export.{os.getpid()}.partial"
    names = bundle.attribute_names
    sample = trial_images(bundle.input_size, 2)
    with warnings.catch_warnings():
        # The TorchScript exporter announces its deprecation on every call; it is pinned with torch
        # (setup.cfg) and is chosen on purpose: seconds instead of minutes, no onnxscript dependency.
        warnings.simplefilter("ignore")
        # .eval() on the wrapper too: the exporter puts the module back in the mode it found it in,
        # recursively, and a fresh wrapper is in training mode (BatchNorm would then use batch statistics).
        torch.onnx.export(
            _Logits(net, names).eval(), (sample,), str(partial), dynamo=False, opset_version=OPSET,
            input_names=["images"], output_names=[f"logits_{i}" for i in range(len(names))],
            dynamic_axes={"images": {0: "batch"}, **{f"logits_{i}": {0: "batch"} for i in range(len(names))}},
        )
    digest = file_sha256(partial)
    check = _check_export(net, names, partial)
    # Content-addressed file name: concurrent exports (fan-out tasks on one machine) never overwrite a
    # file another process is reading; the record is replaced atomically and always names a whole file.
    path = folder / f"model-{digest[:16]}.onnx"
    os.replace(partial, path)
    record = {**_expected_record(bundle), "file": path.name, "sha256": digest, "backbone": bundle.backbone,
              "torch": torch.__version__, "opset": OPSET, "exporter": "torch.onnx.export(dynamo=False)",
              "check": check, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    tmp = folder / f"export.json.{os.getpid()}.partial"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, folder / "export.json")
    log.info("ONNX export of model %s done in %.1f s: %s (checked: %s)", bundle.model_version, time.time() - started, path, check)
    return path


# (model_version, export file's sha256) pairs this process has seen reproduce the bundle's reference outputs.
_REFERENCE_CHECKED: dict[tuple[str, str], dict[str, Any]] = {}


def verified_export(bundle: ModelBundle, cache_dir: str | Path | None = None) -> Path | None:
    """The cached export of ``bundle`` if it is whole and reproduces the bundle's reference outputs, else None
    (nothing is exported or built here). Such an export proves the bundle's weights are this network, so the
    tag job then skips building the PyTorch network just to check them."""
    if not bundle.reference_outputs or not (engines.installed("onnx") or engines.installed("openvino")):
        return None
    path, _ = _trusted(Path(cache_dir or onnx_cache_dir()) / bundle.model_version, bundle)
    return path if path is not None and _reproduces_reference(bundle, path) else None


def _reproduces_reference(bundle: ModelBundle, path: Path) -> bool:
    """Whether the export at ``path`` computes the bundle's recorded fp32 probabilities on the check images
    (within EXPORT_TOLERANCE, as a fresh export must match PyTorch). False where the bundle has none, or they
    were computed on other check images (then the PyTorch network is built and compared, as before)."""
    reference = bundle.reference_outputs
    images = trial_images(bundle.input_size, 2)
    if not reference or reference.get("images") != check_images_digest(images):
        return False
    key = (bundle.model_version, file_sha256(path))  # the content: a file replaced in place is checked again
    if key in _REFERENCE_CHECKED:
        return True
    try:
        expected = {name: torch.tensor(reference["probabilities"][name]) for name in bundle.attribute_names}
        engine_name, worst = _export_difference(path, images, expected)
    except Exception as exc:  # a damaged file, a reference of another shape: fall back to the PyTorch check
        log.warning("ONNX export of model %s: checking it against the bundle's reference outputs failed (%s: %s); "
                    "checking it against the PyTorch network instead", bundle.model_version, type(exc).__name__, exc)
        return False
    if not worst <= EXPORT_TOLERANCE:  # also NaN
        log.warning("ONNX export of model %s at %s does not reproduce the bundle's reference outputs (largest probability "
                    "difference %.2e); checking it against the PyTorch network", bundle.model_version, path, worst)
        return False
    _REFERENCE_CHECKED[key] = {"by": engine_name, "max_probability_difference": worst}
    log.info("ONNX export of model %s: %s (cached; reproduces the bundle's reference outputs: largest probability "
             "difference %.1e, by %s)", bundle.model_version, path, worst, engine_name)
    return True


def _require_export() -> None:
    if importlib.util.find_spec(engines.EXPORT_PACKAGE) is None:
        raise RuntimeSettingError(
            f"the ONNX export needs the Python package {engines.EXPORT_PACKAGE}: pip install 'fashion-tagger[onnx]' "
            "(or [openvino]; `make setup` installs both), or use --runtime torch"
        )


def _export_difference(path: Path, images: torch.Tensor, expected: dict[str, torch.Tensor]) -> tuple[str, float]:
    """The export at ``path`` run in fp32 (ONNX Runtime, else OpenVINO) on ``images`` -> (engine, the largest
    difference of any softmax probability from ``expected``, attribute -> probabilities, in output order)."""
    engine_name = "onnx" if engines.installed("onnx") else "openvino"
    got = engines.ENGINES[engine_name](path, "fp32", threads=max(1, torch.get_num_threads()))(images)
    worst = 0.0
    for i, probabilities in enumerate(expected.values()):
        p = torch.from_numpy(np.asarray(got[i], dtype=np.float32)).softmax(1)
        worst = max(worst, float((p - probabilities).abs().max()))
    return engine_name, worst


def _check_export(net: TaggerNet, names: list[str], path: Path) -> dict[str, Any]:
    """Run the export (ONNX Runtime, else OpenVINO, in fp32) and PyTorch on the same generated images."""
    images = trial_images(int(net.data_config.input_size), 2)
    with torch.inference_mode():
        logits = net(images)
    engine_name, worst = _export_difference(path, images, {name: logits[name].float().softmax(1) for name in names})
    if not worst <= EXPORT_TOLERANCE:  # also NaN
        raise RuntimeError(
            f"the ONNX export of this model does not compute what PyTorch computes (largest probability "
            f"difference {worst:.2e} > {EXPORT_TOLERANCE:g} on generated images, run by {engine_name}); "
            "use --runtime torch and report the backbone"
        )
    return {"by": engine_name, "images": int(images.shape[0]), "max_probability_difference": worst}
