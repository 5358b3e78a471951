"""``--runtime auto``: which runtime (and, where the bundle allows, which precision) runs the model on this
CPU, measured once per model_version and CPU and cached; or, without measuring, the first installed in the
order measured in docs/benchmarks.md. :func:`tagger.model.inference.resolve` is the one caller."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import cpu, engines, int8
from .check_images import trial_images
from .engines import RuntimeChoice
from .predictor import Predictor
from .settings import RUNTIMES, RuntimeSettingError
from ..storage import user_cache_dir

if TYPE_CHECKING:
    from .bundle import ModelBundle

log = logging.getLogger(__name__)

# What `auto` prefers on a CPU, fastest first (efficientnet_b3 at 300 px, model only; docs/benchmarks.md):
# ONNX Runtime fp32 leads both on a CPU with native bfloat16 (21.7 img/s against OpenVINO bf16 20.7 and
# PyTorch bf16 autocast 13.5) and on one without (here, AVX-512 without BF16: 3.5x PyTorch fp32 channels-last,
# OpenVINO fp32 1.4x). With --precision bf16 ONNX Runtime is out (no bf16 kernels on its CPU provider).
# A runtime that is not installed is skipped, and the log names the extra that would have given it.
CPU_PREFERENCE = ("onnx", "openvino", "torch")

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
    if requested != "auto" or device.type != "cpu":
        return engines.asked_for(requested, device)
    if bundle is not None and os.environ.get(AUTO_ENV, "measure") != "preference":
        return measured_choice(bundle, precision, threads=threads, batch_size=batch_size or MEASURE_BATCH)
    wanted = precision if precision in ("bf16", "int8") else "fp32"  # auto precision: every runtime has fp32 on any CPU
    candidates = [r for r in CPU_PREFERENCE if wanted in engines.CPU_PRECISIONS[r]]
    skipped = []
    for runtime in candidates:
        if engines.installed(runtime):
            reason = f"the first installed of {', '.join(candidates)} (the order measured in docs/benchmarks.md)"
            reason += f"; not installed: {', '.join(skipped)}" if skipped else ""
            if skipped:
                extras = sorted({engines.PACKAGES[s][1] for s in skipped})
                log.warning("runtime auto: %s would be faster here but is not installed (pip install 'fashion-tagger[%s]'); "
                            "using %s", " and ".join(skipped), ",".join(extras), runtime)
            return RuntimeChoice(runtime, reason)
        skipped.append(runtime)
    raise AssertionError("torch is always installed")  # pragma: no cover


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
        return [(r, precision) for r in CPU_PREFERENCE if precision in engines.CPU_PRECISIONS[r] and engines.installed(r)]
    pairs = [(r, "fp32") for r in CPU_PREFERENCE if engines.installed(r)]
    if bundle is not None:
        for runtime in CPU_PREFERENCE:
            for reduced in ("bf16", "int8"):
                if (reduced in engines.CPU_PRECISIONS[runtime] and bundle.validated(runtime, reduced) and engines.installed(runtime)
                        and (reduced != "bf16" or cpu.cpu_has_bf16())
                        # int8's ranges come from its calibration photos: the check holds for the ones it used
                        and (reduced != "int8" or bundle.precision_checks[f"{runtime} int8"].get("calibration") == int8.calibration_identity())):
                    pairs.append((runtime, reduced))
    return pairs


def choice_key(bundle: ModelBundle, precision: str, threads: int) -> dict[str, Any]:
    """Everything a measured choice depends on; a cached choice is used only when all of it is equal."""
    return {"format": CHOICE_FORMAT, "model_version": bundle.model_version, "precision": precision,
            "cpu": cpu.cpu_identity(), "libraries": cpu.library_versions(), "threads": threads,
            "candidates": [f"{r} {p}" for r, p in candidates(precision, bundle)]}


def _choice_file(key: dict[str, Any], cache_dir: str | Path | None) -> Path:
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
        if record.get("key") == key and record.get("runtime") in engines.CPU_PRECISIONS:
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
    images = trial_images(bundle.input_size, batch_size)
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
