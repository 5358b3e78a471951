"""The Containerfile's dependency list for one image profile, read from setup.cfg; and the check after install.

    python3 container/requirements.py SETUP_CFG PROFILE [EXTRA ...] > requirements.txt
    /opt/tagger/bin/python container/requirements.py --check PROFILE

full: install_requires and the extras (the whole job). tag: the same less the training and evaluation stack,
which `tagger tag`, `finalize` and `report` never import (docs/deploy/container.md: what each image holds);
--check then fails if pip brought any of it in anyway. Standard library only: it runs on the base image's python3.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import re
import sys

# Imported only by retrain, evaluate and predict's sheets (and their dependencies: scipy, fonttools, grpcio ...).
TRAINING_ONLY = ("pytorch-lightning", "torchmetrics", "scikit-learn", "iterative-stratification", "matplotlib",
                 "tensorboard")
PROFILES = ("full", "tag")


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def requirements(setup_cfg: str, profile: str, extras: list[str]) -> list[str]:
    config = configparser.ConfigParser()
    if not config.read(setup_cfg):
        raise SystemExit(f"requirements.py: cannot read {setup_cfg}")
    lines = [line.strip() for line in config["options"]["install_requires"].splitlines() if line.strip()]
    for extra in extras:
        if extra not in config["options.extras_require"]:
            raise SystemExit(f"requirements.py: setup.cfg has no extra {extra!r} (EXTRAS build arg); it has "
                             f"{', '.join(config['options.extras_require'])}")
        lines += [line.strip() for line in config["options.extras_require"][extra].splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("#")]
    if profile == "tag":
        names = {_name(line) for line in lines}
        stale = [name for name in TRAINING_ONLY if name not in names]
        if stale:  # setup.cfg changed: the tag profile must be looked at again, not silently keep a package
            raise SystemExit(f"requirements.py: {', '.join(stale)} no longer in setup.cfg's install_requires: "
                             "update TRAINING_ONLY in container/requirements.py")
        lines = [line for line in lines if _name(line) not in TRAINING_ONLY]
    return lines


def check(profile: str) -> list[str]:
    """The training packages installed in a tag image (none expected)."""
    if profile != "tag":
        return []
    installed = {_name(dist.metadata["Name"]) for dist in importlib.metadata.distributions()}
    return [name for name in TRAINING_ONLY if name in installed]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--check"] and len(argv) == 2 and argv[1] in PROFILES:
        found = check(argv[1])
        if found:
            print(f"requirements.py: the {argv[1]} image holds {', '.join(found)}: a dependency pulled them in",
                  file=sys.stderr)
            return 1
        return 0
    if len(argv) < 2 or argv[1] not in PROFILES:
        print(__doc__, file=sys.stderr)
        print(f"requirements.py: PROFILE must be one of {', '.join(PROFILES)}", file=sys.stderr)
        return 2
    print("\n".join(requirements(argv[0], argv[1], argv[2:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
