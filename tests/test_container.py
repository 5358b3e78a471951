"""docs/deploy/container.md, without podman: its `podman run` example is the command `make image-run` (and so
`make image-test`) runs, word for word; `make image` leaves nothing dangling; the tag-only image's requirements
(container/requirements.py) leave out only what `tagger tag`, `finalize` and `report` never import."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _docs_container_block() -> str:
    page = (REPO / "docs" / "deploy" / "container.md").read_text()
    return re.search(r"```bash\n(.*?)```", page, re.S).group(1)


def test_the_docs_podman_run_is_what_make_image_run_runs():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in {"IMAGE", "MAKEFLAGS", "MAKELEVEL"}}
    made = subprocess.run(["make", "-n", "--no-print-directory", "image-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, check=True).stdout
    commands = [line for line in made.splitlines() if line.strip()]
    assert commands[0] == "mkdir -p out/container" and "podman run" in commands[1], made
    block = _docs_container_block()
    assert made.strip() in block, f"docs/deploy/container.md's command differs from `make -n image-run`:\n{made}"
    # What makes it work on a rootful host with default settings (the page's two notes under the command).
    run = " ".join(commands[1:])
    assert "CONTAINERS_CONF=container/containers.conf" in run and '"$PWD/out/container:/out:U"' in run
    assert "default_ulimits = []" in (REPO / "container/containers.conf").read_text()


def test_make_image_names_its_build_stage_and_prunes_only_what_this_containerfile_left():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in {"IMAGE", "IMAGE_BUILD", "MAKEFLAGS", "MAKELEVEL"}}
    made = subprocess.run(["make", "-n", "--no-print-directory", "-o", "image-base", "image"], cwd=REPO, env=env,
                          capture_output=True, text=True, check=True).stdout
    assert "--target build -t localhost/fashion-tagger:latest-build ." in made
    assert "image prune -f --filter label=org.fashion-tagger.image" in made
    containerfile = (REPO / "Containerfile").read_text()
    stages = re.split(r"^FROM ", containerfile, flags=re.M)[1:]
    assert len(stages) == 2 and all("org.fashion-tagger.image=" in stage.split("\nRUN", 1)[0] for stage in stages)


def _requirements_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("container_requirements", REPO / "container" / "requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tag_profile_leaves_out_the_training_stack_and_nothing_else():
    requirements = _requirements_module()
    full = requirements.requirements(str(REPO / "setup.cfg"), "full", ["runtimes"])
    tag = requirements.requirements(str(REPO / "setup.cfg"), "tag", ["onnx"])
    names = {requirements._name(line) for line in full}
    assert {"torch", "timm", "pyarrow", "onnxruntime", "openvino", *requirements.TRAINING_ONLY} <= names
    assert {requirements._name(line) for line in tag} == (names - set(requirements.TRAINING_ONLY)) - {"openvino"}
    assert not any(line.startswith("#") for line in full)
    # The job's .venv has the training stack: the image's post-install check would name it.
    assert requirements.check("tag") == list(requirements.TRAINING_ONLY) and requirements.check("full") == []
    with pytest.raises(SystemExit, match="no extra 'nope'"):
        requirements.requirements(str(REPO / "setup.cfg"), "tag", ["nope"])


# The import names of container/requirements.py's TRAINING_ONLY distributions.
TRAINING_MODULES = {"lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics", "sklearn", "iterstrat",
                    "matplotlib", "tensorboard"}


def test_tag_finalize_and_report_never_import_the_training_stack(demo, tiny_bundle, tmp_path):
    """What lets the tag-only image drop it: the commands it holds, run end to end (ONNX Runtime, as in that image)."""
    out = tmp_path / "out"
    script = f"""
import json, sys
from click.testing import CliRunner
from jobs.cli import cli
common = ["--out", {str(out)!r}, "--run-date", "2026-11-26"]
for args in (["tag", "--catalog", {str(demo.catalog)!r}, "--model", {tiny_bundle!r}, *common, "--workers", "0",
              "--runtime", "onnx"],
             ["finalize", *common], ["report", *common]):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, (args[0], result.exit_code, result.output[-2000:])
print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}} & set({sorted(TRAINING_MODULES)!r}))))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TAGGER_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_every_file_the_containerfile_copies_is_in_the_build_context():
    """.containerignore is an allow-list: a file the Containerfile copies must be named in it, or the build fails."""
    allowed = [line[1:].rstrip("/") for line in (REPO / ".containerignore").read_text().splitlines()
               if line.startswith("!")]
    copied = []
    for line in (REPO / "Containerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(word.startswith("--from") for word in words):
            copied += [word for word in words[1:-1] if not word.startswith("--")]
    assert "container/requirements.py" in copied and "setup.cfg" in copied
    missing = [path for path in copied if not any(path == a or path.startswith(a + "/") for a in allowed)]
    assert not missing, f"copied by the Containerfile but not allowed by .containerignore: {missing}"
