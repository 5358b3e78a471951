"""Shared fixtures: a tiny demo dataset, a tiny model bundle, a real S3 endpoint (moto) on loopback.

Nothing here needs the network or the real Kaggle sample.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

# Credentials for moto only; set before anything (a forkserver, an s3fs client) snapshots the environment.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing-key-id")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing-secret-value")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)
# No test may reach the Hugging Face hub; huggingface_hub reads this once, at import, so it is set here,
# before anything imports timm. Pretrained weights then come from the installed packages at once.
os.environ["HF_HUB_OFFLINE"] = "1"
# `--runtime auto` measures the runtimes on the machine (tagger.model.choice.measured_choice): its choice would
# depend on the load of a shared test machine. Tests get the fixed preference order; test_runtime measures on purpose.
os.environ["TAGGER_AUTO_RUNTIME"] = "preference"


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """A small generated Kaggle-layout dataset with a catalog (2 bad rows at the end)."""
    from tagger.demo.drawn import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=60, n_catalog=48, image_size=(60, 80), n_bad=2)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> str:
    """A randomly initialised but deterministic bundle: enough to test plumbing, not accuracy."""
    import torch

    from tagger.model.bundle import save_bundle
    from tagger.demo.drawn import CLASSES
    from tagger.model.network import create_tagger_net, resolve_data_config

    torch.manual_seed(0)
    labels = {name: list(values) for name, values in CLASSES.items()}
    net = create_tagger_net("test_efficientnet", {k: len(v) for k, v in labels.items()}, resolve_data_config("test_efficientnet", 32))
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    save_bundle(net, str(out), backbone="test_efficientnet", labels=labels, training={"note": "random init, tests only"})
    return str(out)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on loopback: a real HTTP endpoint for s3fs/botocore, not an in-process mock."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    previous = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    server.stop()
    if previous is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = previous


@pytest.fixture()
def s3_bucket(s3_endpoint, request):
    """A fresh bucket per test; returns (name, s3fs filesystem)."""
    import s3fs

    name = "t-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40]
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    if not fs.exists(name):
        fs.mkdir(name)
    yield name, fs
    fs.invalidate_cache()


def upload_tree(fs, local: Path, url: str) -> None:
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{url}/{path.relative_to(local).as_posix()}")
