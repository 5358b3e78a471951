"""Which engine runs the network: PyTorch itself, or the bundle's network exported to ONNX and run by
ONNX Runtime or OpenVINO (``--runtime``).

:class:`tagger.model.predictor.Predictor` is still the one place the model runs: it asks an engine from here for
the logits of a batch of uint8 NCHW images and does the softmax, top label and score itself, the same
for every runtime. This module holds what differs: the choice (:func:`choose_runtime`), the ONNX export
and its cache (:func:`onnx_model`), and one small class per non-PyTorch engine.

The extra runtimes are optional packages (setup.cfg extras ``onnx``, ``openvino``, both in ``runtimes``);
they are imported only in the branch that uses them, and asking for one that is not installed is an
error naming the extra, never a quiet switch to another runtime.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..tag.config import RUNTIMES
from ..storage import file_sha256

if TYPE_CHECKING:
    from .bundle import ModelBundle
    from .network import TaggerNet

log = logging.getLogger(__name__)

# runtime -> (module that must import, setup.cfg extra that installs it)
PACKAGES = {"onnx": ("onnxruntime", "onnx"), "openvino": ("openvino", "openvino")}
# The legacy (TorchScript) exporter writes through the `onnx` package; both extras pin it.
EXPORT_PACKAGE = "onnx"
OPSET = 17
EXPORT_FORMAT = 1  # bump when the exported graph's contract (inputs, outputs, names) changes

# What `auto` prefers on a CPU, fastest first (efficientnet_b3 at 300 px, model only; docs/benchmarks.md):
# ONNX Runtime fp32 leads both on a CPU with native bfloat16 (21.7 img/s against OpenVINO bf16 20.7 and
# PyTorch bf16 autocast 13.5) and on one without (here, AVX-512 without BF16: 3.5x PyTorch fp32 channels-last,
# OpenVINO fp32 1.4x). With --precision bf16 ONNX Runtime is out (no bf16 kernels on its CPU provider).
# A runtime that is not installed is skipped, and the log names the extra that would have given it.
CPU_PREFERENCE = ("onnx", "openvino", "torch")
# Which precisions each runtime computes on the CPU (fp16 is CUDA-only everywhere). int8: the ONNX export
# statically quantized (int8_model), which both ONNX Runtime and OpenVINO run.
CPU_PRECISIONS = {"torch": ("fp32", "bf16"), "onnx": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8")}


class RuntimeSettingError(ValueError):
    """A --runtime (or --precision) that cannot run here: its package is not installed, it does not run on
    this device, or it does not compute that precision. An invalid option: exit 2 before anything changes."""


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


def _require(runtime: str) -> None:
    if not installed(runtime):
        module, extra = PACKAGES[runtime]
        raise RuntimeSettingError(
            f"--runtime {runtime} needs the Python packages {module} and {EXPORT_PACKAGE}, which are not installed: "
            f"pip install 'fashion-tagger[{extra}]' (or `make setup`, which installs the extras), or use --runtime torch"
        )


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


def choose_runtime(requested: str, device: torch.device, precision: str = "auto", *, bundle: ModelBundle | None = None,
                   threads: int = 0, batch_size: int = 0) -> RuntimeChoice:
    """``--runtime`` -> the runtime that will run, checked now (before a run touches anything).

    ``auto``: PyTorch on CUDA (AMP, channels-last: the only GPU path shipped); on the CPU, given the
    ``bundle``, the candidate measured cheapest in CPU per image on this CPU (:func:`measured_choice`, cached); without a
    bundle, or with ``TAGGER_AUTO_RUNTIME=preference``, the first installed runtime that computes
    ``precision`` in the order of :data:`CPU_PREFERENCE`. An explicit runtime that is not installed, or that
    does not run on ``device``, is :class:`RuntimeSettingError`.
    """
    if requested not in RUNTIMES:
        raise RuntimeSettingError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {requested!r}")
    if device.type != "cpu":
        if requested in ("auto", "torch"):
            return RuntimeChoice("torch", f"{device.type}: PyTorch (the GPU path: AMP, channels-last, uint8 transfer)")
        raise RuntimeSettingError(
            f"--runtime {requested} runs on the CPU only (the CPU builds of its package are what the extra installs); "
            f"with --device {device.type} use --runtime torch or auto"
        )
    if requested != "auto":
        if requested != "torch":
            _require(requested)
        return RuntimeChoice(requested, "asked for with --runtime")
    if bundle is not None and os.environ.get(AUTO_ENV, "measure") != "preference":
        return measured_choice(bundle, precision, threads=threads, batch_size=batch_size or MEASURE_BATCH)
    wanted = precision if precision in ("bf16", "int8") else "fp32"  # auto precision: every runtime has fp32 on any CPU
    candidates = [r for r in CPU_PREFERENCE if wanted in CPU_PRECISIONS[r]]
    skipped = []
    for runtime in candidates:
        if installed(runtime):
            reason = f"the first installed of {', '.join(candidates)} (the order measured in docs/benchmarks.md)"
            reason += f"; not installed: {', '.join(skipped)}" if skipped else ""
            if skipped:
                extras = sorted({PACKAGES[s][1] for s in skipped})
                log.warning("runtime auto: %s would be faster here but is not installed (pip install 'fashion-tagger[%s]'); "
                            "using %s", " and ".join(skipped), ",".join(extras), runtime)
            return RuntimeChoice(runtime, reason)
        skipped.append(runtime)
    raise AssertionError("torch is always installed")  # pragma: no cover


def cpu_precision(runtime: str, precision: str) -> str:
    """``--precision`` -> what a non-PyTorch runtime computes on the CPU: ``fp32`` or ``bf16``."""
    if precision == "fp16":
        raise ValueError("--precision fp16 is for CUDA; on the CPU use bf16 (or fp32)")
    if precision == "auto":
        return "bf16" if "bf16" in CPU_PRECISIONS[runtime] and cpu_has_bf16() else "fp32"
    if precision not in CPU_PRECISIONS[runtime]:
        raise ValueError(f"--precision {precision} is not available with --runtime {runtime} (it computes "
                         f"{' or '.join(CPU_PRECISIONS[runtime])} on the CPU); use --precision fp32 or --runtime openvino/torch")
    return precision


# -- auto by measuring ------------------------------------------------------------------------------

# TAGGER_AUTO_RUNTIME=preference: `auto` takes the first installed runtime of CPU_PREFERENCE without measuring
# (a choice that does not depend on the machine's load: the tests, or a user comparing runs).
AUTO_ENV = "TAGGER_AUTO_RUNTIME"
# Seconds all candidates together run after their warm-up batches, in MEASURE_ROUNDS rounds alternating between
# them: enough for a stable figure of a small CPU model, short enough that measuring costs well under a minute
# on the first run of a model_version on a CPU.
MEASURE_SECONDS = 4.0
MEASURE_ROUNDS = 3
MEASURE_BATCH = 8
CHOICE_FORMAT = 3  # bump when what a cached choice means changes (2: fp32 candidates only; 3: by CPU ms per image,
# and the precisions the bundle passed a check in)


def candidates(precision: str, bundle: ModelBundle | None = None) -> list[tuple[str, str]]:
    """(runtime, precision) pairs ``auto`` may choose from on this CPU, for ``--precision``: each installed
    runtime in what it computes.

    Under ``--precision auto``: fp32, the arithmetic the bundle's metrics and review thresholds were computed
    in (every fp32 runtime gives the same scores within float jitter, so tag, evaluate and retrain's scoring
    agree whichever wins here); and a reduced precision only where ``bundle`` records that this runtime, in
    that precision, passed its precision check (``tagger evaluate --check-precision``: every attribute within
    the tolerance of fp32 on a test split) and this CPU computes it natively (bf16: AVX512-BF16 or AMX; on
    other CPUs it is emulated, slower and not what was checked). A check that failed, or none, keeps that
    candidate out. An explicit ``--precision bf16``/``int8`` measures the runtimes that compute it, checked or not.
    """
    if precision != "auto":
        return [(r, precision) for r in CPU_PREFERENCE if precision in CPU_PRECISIONS[r] and installed(r)]
    pairs = [(r, "fp32") for r in CPU_PREFERENCE if installed(r)]
    if bundle is not None:
        for runtime in CPU_PREFERENCE:
            for reduced in ("bf16", "int8"):
                if (reduced in CPU_PRECISIONS[runtime] and bundle.validated(runtime, reduced) and installed(runtime)
                        and (reduced != "bf16" or cpu_has_bf16())
                        # int8's ranges come from its calibration photos: the check holds for the ones it used
                        and (reduced != "int8" or bundle.precision_checks[f"{runtime} int8"].get("calibration") == calibration_identity())):
                    pairs.append((runtime, reduced))
    return pairs


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


def choice_key(bundle: ModelBundle, precision: str, threads: int) -> dict[str, Any]:
    """Everything a measured choice depends on; a cached choice is used only when all of it is equal."""
    return {"format": CHOICE_FORMAT, "model_version": bundle.model_version, "precision": precision,
            "cpu": cpu_identity(), "libraries": library_versions(), "threads": threads,
            "candidates": [f"{r} {p}" for r, p in candidates(precision, bundle)]}


def _choice_file(key: dict[str, Any], cache_dir: str | Path | None) -> Path:
    import hashlib

    from ..storage import user_cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir or user_cache_dir("runtime-choice")) / f"{key['model_version']}-{digest}.json"


def measured_choice(bundle: ModelBundle, precision: str = "auto", *, threads: int = 0, batch_size: int = MEASURE_BATCH,
                    cache_dir: str | Path | None = None, seconds: float | None = None) -> RuntimeChoice:
    """The cheapest (runtime, precision) for ``bundle`` on this CPU, measured once and cached.

    Cheapest in CPU time per image, not in images per second: in the tag job the decode workers share the
    cores with the model, so the job's rate follows the CPU a photo costs (decode + model) once the cores are
    busy, and a runtime that spends more CPU to finish a batch sooner (threads that spin or split small
    layers) slows the job down. CPU time is also what a shared machine's neighbours move least: on the
    2-core AMX Xeon of issue 22, under load, images per second ranked ONNX Runtime first (36.5 against
    OpenVINO's 35.3) while on a quiet machine OpenVINO fp32 costs 15 CPU ms an image against ONNX
    Runtime's 24 and the job runs 1.4x faster with it (docs/benchmarks.md, "Where the bound lies").

    Each candidate (:func:`candidates`) is made and warmed up on generated images, then all of them run in
    MEASURE_ROUNDS rounds alternating in order (``seconds`` in all), with ``threads`` (0: torch's count
    now), in this process; a candidate's figure is its best round (noise only ever adds CPU time). The
    winner is cached under a key of model_version, --precision, CPU model and flags, library versions,
    threads and the candidate list (:func:`choice_key`): a later run with the same key reuses it without
    measuring. A candidate that fails (export, engine, forward pass) is skipped and said in the log.
    """
    threads = threads or max(1, torch.get_num_threads())
    key = choice_key(bundle, precision, threads)
    path = _choice_file(key, cache_dir)
    try:
        record = json.loads(path.read_text())
        if record.get("key") == key and record.get("runtime") in CPU_PRECISIONS:
            choice = RuntimeChoice(record["runtime"], f"measured cheapest on this CPU on {record['measured_at']} "
                                   f"({_rates_text(record['measured'])}; cached in {path})", record["precision"], record["measured"])
            log.info("runtime auto: %s %s, %s", choice.name, choice.precision, choice.reason)
            return choice
    except (OSError, ValueError, KeyError, TypeError):
        pass
    pairs = key["candidates"]
    log.info("runtime auto: measuring %s for model %s on this CPU (%s, %d thread(s)), once per model_version and CPU",
             ", ".join(pairs), bundle.model_version, key["cpu"]["model"], threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        measured = _measure_all(bundle, candidates(precision, bundle), batch_size, MEASURE_SECONDS if seconds is None else seconds)
    finally:
        torch.set_num_threads(previous)
    costs = {n: v for n, v in measured.items() if isinstance(v, float)}
    if not costs:
        raise RuntimeSettingError(f"runtime auto: no runtime could run model {bundle.model_version} on this CPU "
                                  f"({'; '.join(f'{n}: {v}' for n, v in measured.items())}); use --runtime torch and report it")
    best = min(costs, key=costs.get)
    runtime, computed = best.split(" ")
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
        tmp.write_text(json.dumps({"key": key, "runtime": runtime, "precision": computed, "measured": measured,
                                   "unit": "CPU ms per image", "measured_at": when, "batch_size": batch_size}, indent=1))
        os.replace(tmp, path)
        where = f"cached in {path}"
    except OSError as exc:  # a read-only cache costs a measurement per run, nothing else
        where = f"not cached: {exc}"
        log.warning("runtime auto: cannot cache the choice under %s (%s); set TAGGER_CACHE to a writable folder", path.parent, exc)
    choice = RuntimeChoice(runtime, f"measured cheapest on this CPU just now ({_rates_text(measured)}; {where})", computed, measured)
    log.info("runtime auto: %s %s costs the least CPU here: %s", runtime, computed, _rates_text(measured))
    return choice


def _rates_text(measured: dict[str, Any]) -> str:
    ranked = sorted(measured.items(), key=lambda kv: kv[1] if isinstance(kv[1], float) else float("inf"))
    return ", ".join(f"{n} {v:.1f} CPU ms/img" if isinstance(v, float) else f"{n} {v}" for n, v in ranked)


def _measure_all(bundle: ModelBundle, pairs: list[tuple[str, str]], batch_size: int, seconds: float) -> dict[str, Any]:
    """Per candidate, its best round's CPU milliseconds per image (process CPU time: every thread of the
    runtime counts), or why it failed."""
    from .predictor import Predictor

    images = _check_images(bundle.input_size, batch_size)
    measured: dict[str, Any] = {}
    ready = {}
    for runtime, computed in pairs:
        name = f"{runtime} {computed}"
        try:
            predictor = Predictor(bundle, torch.device("cpu"), precision=computed, runtime=RuntimeChoice(runtime, "measuring"))
            predictor(images)  # warm-up: the session, lazy kernels, first allocations
            ready[name] = predictor
        except Exception as exc:  # a candidate that cannot run here is not a reason to stop the run
            _failed(measured, name, exc)
    share = seconds / max(1, MEASURE_ROUNDS * len(ready))
    for _ in range(MEASURE_ROUNDS):
        for name, predictor in list(ready.items()):
            try:
                done, cpu, started = 0, time.process_time(), time.perf_counter()
                while done == 0 or time.perf_counter() - started < share:
                    predictor(images)
                    done += batch_size
                cost = 1000 * (time.process_time() - cpu) / done
            except Exception as exc:
                _failed(measured, name, exc)
                del ready[name]
                continue
            measured[name] = round(min(cost, measured.get(name, cost)), 2)
    names = [f"{r} {p}" for r, p in pairs]
    return {name: measured[name] for name in names if name in measured}  # in candidate order


def _failed(measured: dict[str, Any], name: str, exc: Exception) -> None:
    measured[name] = f"failed: {type(exc).__name__}: {exc}"[:300]
    log.warning("runtime auto: candidate %s failed and is skipped (%s: %s)", name, type(exc).__name__, exc)


# -- the ONNX export and its cache -------------------------------------------------------------------

def onnx_cache_dir() -> Path:
    """``$TAGGER_CACHE/onnx``, else ``$XDG_CACHE_HOME/fashion-tagger/onnx`` (``~/.cache`` by default): the
    convention of :func:`tagger.model.pretrained.weights_cache_dir`. A user cache rather than the bundle's folder,
    which may be on S3 or read-only."""
    from ..storage import user_cache_dir

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
    sample = _check_images(bundle.input_size, 2)
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
    if not bundle.reference_outputs or not (installed("onnx") or installed("openvino")):
        return None
    path, _ = _trusted(Path(cache_dir or onnx_cache_dir()) / bundle.model_version, bundle)
    return path if path is not None and _reproduces_reference(bundle, path) else None


def _reproduces_reference(bundle: ModelBundle, path: Path) -> bool:
    """Whether the export at ``path`` computes the bundle's recorded fp32 probabilities on the check images
    (within EXPORT_TOLERANCE, as a fresh export must match PyTorch). False where the bundle has none, or they
    were computed on other check images (then the PyTorch network is built and compared, as before)."""
    reference = bundle.reference_outputs
    images = _check_images(bundle.input_size, 2)
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
    if importlib.util.find_spec(EXPORT_PACKAGE) is None:
        raise RuntimeSettingError(
            f"the ONNX export needs the Python package {EXPORT_PACKAGE}: pip install 'fashion-tagger[onnx]' "
            "(or [openvino]; `make setup` installs both), or use --runtime torch"
        )


def trial_images(size: int, n: int) -> torch.Tensor:
    """Deterministic uint8 images (``n``, 3, ``size``, ``size``) for a trial or check pass."""
    return _check_images(size, n)


def check_images_digest(images: torch.Tensor) -> str:
    """A hash of the check images: a bundle's reference outputs hold only for the images they were computed on."""
    import hashlib

    return "sha256:" + hashlib.sha256(np.ascontiguousarray(images.numpy()).tobytes()).hexdigest()[:32]


def _check_images(size: int, n: int) -> torch.Tensor:
    """Deterministic uint8 images with structure (gradients + noise): something a conv net responds to."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    images = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        for c in range(3):
            images[i, c] = (ramp[None, :] * (c + 1 + i) / 4 + ramp[:, None] / 2) % 256
    images += rng.normal(0, 20, images.shape)
    return torch.from_numpy(np.clip(images, 0, 255).astype(np.uint8))


# Largest difference of any softmax probability between a fresh export and the PyTorch network, in fp32,
# above which the export is refused: both compute the same fp32 graph, so only summation order differs
# (measured ~1e-8 on efficientnet_b3 and test_efficientnet).
EXPORT_TOLERANCE = 1e-4


def _export_difference(path: Path, images: torch.Tensor, expected: dict[str, torch.Tensor]) -> tuple[str, float]:
    """The export at ``path`` run in fp32 (ONNX Runtime, else OpenVINO) on ``images`` -> (engine, the largest
    difference of any softmax probability from ``expected``, attribute -> probabilities, in output order)."""
    engine_name = "onnx" if installed("onnx") else "openvino"
    got = ENGINES[engine_name](path, "fp32", threads=max(1, torch.get_num_threads()))(images)
    worst = 0.0
    for i, probabilities in enumerate(expected.values()):
        p = torch.from_numpy(np.asarray(got[i], dtype=np.float32)).softmax(1)
        worst = max(worst, float((p - probabilities).abs().max()))
    return engine_name, worst


def _check_export(net: TaggerNet, names: list[str], path: Path) -> dict[str, Any]:
    """Run the export (ONNX Runtime, else OpenVINO, in fp32) and PyTorch on the same generated images."""
    images = _check_images(int(net.data_config.input_size), 2)
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


# -- int8: the export statically quantized ------------------------------------------------------------

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
    import hashlib

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
    import hashlib

    from ..data.decode import ImageError, decode_image

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
        from ..demo.drawn import CLASSES, render_product

        rng = np.random.default_rng(0)
        pixels = []
        for i in range(64):
            labels = {name: values[rng.integers(len(values))] for name, values in CLASSES.items()}
            drawing = render_product(labels, (size * 3 // 4, size), seed=(i, 22))
            pixels.append(decode_image(_png(drawing), size))
        source = {"source": "generated", "images": len(pixels)}
    return np.stack(pixels).transpose(0, 3, 1, 2).copy(), source


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def int8_model(bundle: ModelBundle, cache_dir: str | Path | None = None) -> Path:
    """The bundle's ONNX export quantized to int8 (ONNX Runtime's static QDQ quantization: weights int8 per
    channel, activations uint8 per tensor, ranges from :func:`calibration_images`), made once per
    ``model_version`` and calibration set beside the fp32 export (``int8-<calibration>.json`` records it)."""
    import hashlib

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


class ExportedModel:
    """A bundle's ONNX export run by ``runtime`` on the CPU; the session is made at the first batch, with
    the torch thread count in effect then, so that ``--threads`` sets every runtime's threads."""

    def __init__(self, bundle: ModelBundle, runtime: str, precision: str, cache_dir: str | Path | None = None):
        _require(runtime)
        self.runtime, self.precision = runtime, precision
        self.path = int8_model(bundle, cache_dir) if precision == "int8" else onnx_model(bundle, cache_dir)
        self._engine: Any = None
        self._threads = 0

    def engine(self):
        threads = max(1, torch.get_num_threads())
        if self._engine is None or threads != self._threads:
            self._engine, self._threads = ENGINES[self.runtime](self.path, self.precision, threads), threads
            log.info("runtime %s: %s", self.runtime, self._engine.description)
        return self._engine

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.dtype != torch.uint8:
            raise TypeError(f"the exported model takes uint8 images, got {images.dtype}")
        return [torch.from_numpy(np.asarray(a)) for a in self.engine()(images.cpu())]
