"""bench/gpu.sh, the GPU benchmark, in its dry mode: every step's logic on the CPU with tiny sizes, and how
it brings the packages a lent GPU machine lacks (wheels unpacked only when a module is missing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bench import gpu

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dry_run_measures_every_step_and_writes_its_report(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "TAGGER_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(["bash", "bench/gpu.sh", "--dry", "--out", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "gpu-bench.json").read_text())
    assert results["dry"] and not results["skipped"]
    assert results["images"]["unique"] == gpu.DRY["unique_images"] and results["images"]["rows"] == gpu.DRY["rows"]
    assert results["decode"]["workers_images_per_s"] > 0 and results["decode"]["one_process_images_per_s"] > 0
    batch = str(gpu.DRY["batch_sizes"][0])
    assert results["model"]["runtime"] == "torch"  # the CUDA path's runtime, on the CPU
    assert results["model"]["per_batch"][batch]["host_batches_images_per_s"] > 0
    (run,) = results["tag"]
    assert run["rows"] == run["tagged"] == gpu.DRY["rows"] and run["images_per_s"] > 0
    assert run["runtime"]["name"] == "torch" and "--workers 2" in run["command"]
    assert results["gpu_decode"]["images"] == gpu.DRY["gpu_decode_images"]
    assert results["compile"]["images_per_s"] > 0
    text = (tmp_path / "out" / "gpu-bench.md").read_text()
    for words in ("CPU decode, 2 processes", "model only, batch", "cudnn.benchmark on", "`tagger tag` end to end", "-bound", "GPU decode + resize + model", "torch.compile"):
        assert words in text, words


def test_no_cuda_without_dry_is_said(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--steps", "images"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("name, version, ok", [
    ("click-8.5.1-py3-none-any.whl", (3, 12), True),
    ("simplejpeg-1.9.0-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", (3, 12), True),
    ("simplejpeg-1.9.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", (3, 12), False),
    ("simplejpeg-1.9.0-cp312-cp312-macosx_11_0_arm64.whl", (3, 12), False),
    ("safetensors-0.8.0-cp38-abi3-manylinux_2_17_x86_64.whl", (3, 12), True),
])
def test_wheel_choice(name, version, ok):
    assert gpu.wheel_matches(name, version) is ok


def test_a_missing_module_comes_from_its_wheel_and_a_present_one_is_left_alone(tmp_path, monkeypatch):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "fakemod_for_gpu_test-1.0-py3-none-any.whl", "w") as archive:
        archive.writestr("fakemod_for_gpu_test/__init__.py", "VALUE = 42\n")
    monkeypatch.setattr(gpu, "NEEDED", {"click": "click", "fakemod_for_gpu_test": "fakemod_for_gpu_test==1.0"})
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    found = gpu.ensure_packages(wheels, site)
    assert found == {"click": "installed", "fakemod_for_gpu_test": "wheel fakemod_for_gpu_test-1.0-py3-none-any.whl"}
    import fakemod_for_gpu_test

    assert fakemod_for_gpu_test.VALUE == 42
    assert str(site) in os.environ["PYTHONPATH"].split(os.pathsep)  # the tag job's processes see it too
    sys.modules.pop("fakemod_for_gpu_test", None)

    monkeypatch.setattr(gpu, "NEEDED", {"nonexistent_mod_for_gpu_test": "x==1"})
    with pytest.raises(SystemExit, match="--fetch-wheels"):
        gpu.ensure_packages(wheels, site)
