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


# A catalog's titles beside its photos (tests/test_text_tag.py: the tag job; tests/test_predict_text.py: predict).
def title(labels: dict[str, str]) -> str:
    return f"Acme {labels['gender']} {labels['baseColour']} {labels['articleType']} {labels['usage']} {labels['season']}"


@pytest.fixture(scope="session")
def text_bundle(tiny_bundle, tmp_path_factory) -> str:
    """The tiny bundle with a text model fitted on generated titles and a fusion fitted on generated photo scores."""
    import json
    import shutil

    import numpy as np

    from tagger.data.drawings import CLASSES
    from tagger.model.bundle import load_bundle
    from tagger.model.text import TEXT_WEIGHTS_FILE, TextFeaturizer, fit_text_model, text_section
    from tagger.training.fusion import fit_fusion, label_prior

    folder = tmp_path_factory.mktemp("text-bundle") / "tiny-text"
    shutil.copytree(tiny_bundle, folder)
    bundle = load_bundle(str(folder))
    attributes = [(a.name, len(a.labels)) for a in bundle.attributes]
    rng = np.random.default_rng(0)

    def sample(n):
        labels = [{a: a_labels[rng.integers(len(a_labels))] for a, a_labels in CLASSES.items()} for _ in range(n)]
        targets = np.array([[list(spec.labels).index(row[spec.name]) for spec in bundle.attributes] for row in labels])
        return [title(row) for row in labels], targets

    featurizer = TextFeaturizer(("productDisplayName",))
    texts, targets = sample(300)
    model = fit_text_model([featurizer.normalise(t) for t in texts], targets, attributes, featurizer, c=10.0).stored()
    val_texts, val_targets = sample(150)
    text_probs, _ = model.probabilities([featurizer.normalise(t) for t in val_texts])
    photo = {name: np.full((150, k), 1.0 / k, np.float32) for name, k in attributes}  # photos that know nothing
    priors = {name: label_prior(targets[:, j], k) for j, (name, k) in enumerate(attributes)}
    fusion, _ = fit_fusion(photo, text_probs, val_targets, priors)
    weights = model.to_bytes()
    meta = json.loads((folder / "model.json").read_text())
    meta["text"] = text_section(model, fusion, weights)
    (folder / TEXT_WEIGHTS_FILE).write_bytes(weights)
    (folder / "model.json").write_text(json.dumps(meta, indent=2))
    return str(folder)


@pytest.fixture(scope="session")
def titled_catalog(demo, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The demo catalog with a title column: each product's own title, except row 0 (none), 1 (non-ASCII), 2 (60 kB),
    3 (row 4's), the last but one (a broken photo with a usable title) and the last (a broken photo, a blank title)."""
    import csv

    with open(demo.catalog, newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(demo.catalog_truth, newline="") as handle:
        truth = {r["product_id"]: r for r in csv.DictReader(handle)}
    for row in rows:
        row["title"] = title(truth[row["product_id"]]) if row["product_id"] in truth else ""
    rows[0]["title"] = ""  # no title: photos alone
    rows[1]["title"] = "Ａｃｍｅ " + rows[1]["title"] + " — élégant 紳士"  # full-width, accents, CJK
    rows[2]["title"] = rows[2]["title"] + " lorem ipsum" * 5_000  # 60 kB: cut to the featuriser's max_chars
    rows[3]["title"] = rows[4]["title"]  # another product's title
    rows[-2]["title"] = "Acme Men Black Tshirts Casual Summer"  # a broken photo with a usable title: tagged from text
    rows[-1]["title"] = "   "  # a broken photo without text: an error row, as ever
    path = Path(demo.catalog).parent / "catalog_titles.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path, rows
