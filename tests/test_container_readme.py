"""README "Container image": its `podman run` example is the command `make image-run` (and so `make image-test`)
runs, word for word, so that the one a new user copies is the one that was tested. No podman needed here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _readme_container_block() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Container image"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_the_readmes_podman_run_is_what_make_image_run_runs():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in {"IMAGE", "MAKEFLAGS", "MAKELEVEL"}}
    made = subprocess.run(["make", "-n", "--no-print-directory", "image-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, check=True).stdout
    commands = [line for line in made.splitlines() if line.strip()]
    assert commands[0] == "mkdir -p out/container" and "podman run" in commands[1], made
    block = _readme_container_block()
    assert made.strip() in block, f"README's command differs from `make -n image-run`:\n{made}"
    # What makes it work on a rootful host with default settings (README: the two notes under the command).
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
