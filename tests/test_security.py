"""Security: no pickle is ever loaded, secrets stay out of every output, a manifest cannot make the job
write outside ``--out`` nor fetch arbitrary URLs."""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pytest
import torch
from click.testing import CliRunner

from jobs.cli import cli
from tagger.model.bundle import BundleError, compute_model_version, load_bundle, state_dict_from_checkpoint
from tagger.tag.writers import read_complete_partition

DATE = "2026-06-07"
TAGGER = str(Path(sys.executable).parent / "tagger")


def tag(*args: str):
    return CliRunner().invoke(cli, ["tag", "--workers", "0", "--progress", "none", "--run-date", DATE, *args], catch_exceptions=False)


class Payload:
    """Unpickling this creates a file: proof that pickle code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# -- no pickle -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fix_version", [False, True])
def test_a_bundle_whose_weights_are_a_pickle_is_refused(demo, tiny_bundle, tmp_path, fix_version):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    shutil.copytree(tiny_bundle, evil)
    weights = pickle.dumps({"backbone.conv_stem.weight": Payload(marker)})
    (evil / "model.safetensors").write_bytes(weights)
    if fix_version:  # the attacker also updates model_version: the hash is an integrity check, not a signature
        meta = json.loads((evil / "model.json").read_text())
        meta["model_version"] = compute_model_version(weights, meta)
        (evil / "model.json").write_text(json.dumps(meta))

    with pytest.raises(BundleError, match="not a safetensors file"):
        load_bundle(str(evil))
    result = tag("--catalog", str(demo.catalog), "--model", str(evil), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "not a safetensors file" in result.output and "pickle" in result.output
    assert not marker.exists(), "the pickle payload ran"
    # A torch.save() zip checkpoint under the safetensors name: refused the same way.
    torch.save({"w": torch.zeros(1)}, evil / "model.safetensors")
    with pytest.raises(BundleError, match="not a safetensors file"):
        load_bundle(str(evil))


def test_checkpoints_load_with_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    malicious = tmp_path / "evil.ckpt"
    with open(malicious, "wb") as handle:
        pickle.dump({"state_dict": {"w": torch.zeros(2)}, "hook": Payload(marker)}, handle)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        state_dict_from_checkpoint(str(malicious))
    assert not marker.exists(), "the pickle payload ran"

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, good)
    assert torch.equal(state_dict_from_checkpoint(str(good))["w"], torch.ones(2))


# -- secrets ---------------------------------------------------------------------------------------
SECRET_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET = "s3cr3t-wJalrXUtnFEMI-K7MDENG"


def test_secrets_never_appear_in_logs_errors_or_the_summary(demo, tiny_bundle, s3_endpoint, s3_bucket, tmp_path):
    bucket, fs = s3_bucket
    fs.put_file(str(demo.catalog), f"{bucket}/catalog.csv")
    for path in sorted((demo.root / "catalog_images").iterdir()):
        fs.put_file(str(path), f"{bucket}/catalog_images/{path.name}")
    out = f"s3://{bucket}/out"
    secrets = ["--storage-option", f"key={SECRET_KEY_ID}", "--storage-option", f"secret={SECRET}",
               "--storage-option", f"client_kwargs.aws_session_token={SECRET}-token"]
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_endpoint}
    runs = {
        "ok": [TAGGER, "-v", "tag", "--catalog", f"s3://{bucket}/catalog.csv", "--model", tiny_bundle, "--out", out,
               "--run-date", DATE, "--workers", "1", "--progress", "log", *secrets],
        "failed": [TAGGER, "-v", "tag", "--catalog", f"s3://{bucket}/nope.csv", "--model", tiny_bundle, "--out", out,
                   "--run-date", DATE, *secrets],
        "bad-option": [TAGGER, "tag", "--catalog", "x.csv", "--model", "m", "--out", out, *secrets, "--batch-size", "0"],
    }
    outputs = {}
    for name, args in runs.items():
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=180)
        outputs[name] = (done.returncode, done.stdout + done.stderr)
    assert outputs["ok"][0] == 0, outputs["ok"][1]
    assert outputs["failed"][0] == 2 and outputs["bad-option"][0] == 2
    fs.invalidate_cache()
    summary = fs.cat_file(f"{bucket}/out/_runs/run_date={DATE}/summary.json").decode()
    assert json.loads(summary)["arguments"]["storage_options"]["secret"] == "***"
    for where, text in [*((name, output) for name, (_, output) in outputs.items()), ("summary.json", summary)]:
        assert SECRET not in text, f"the secret leaked into {where}"
        assert SECRET_KEY_ID not in text, f"the access key id leaked into {where}"


# -- paths from the manifest -------------------------------------------------------------------------
def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_manifest_paths_cannot_make_the_job_write_outside_out(demo, tiny_bundle, tmp_path, monkeypatch):
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    good = demo.root / "catalog_images"
    first = sorted(good.iterdir())[0]
    rows = [
        ("../../../etc/passwd", "../../../../../../../../../etc/passwd"),
        ("/etc/shadow", "/etc/passwd"),
        ("..", "../../x.jpg"),
        ("../../../tmp/evil", str(first)),
        ("ok/../../../../escape", f"{good}/../catalog_images/{first.name}"),
        ("run_date=1999-01-01", str(first)),
    ]
    manifest = work / "catalog.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("product_id", "image"))
        writer.writerows(rows)
    before_tmp, before_demo = snapshot(tmp_path), snapshot(demo.root)
    out = tmp_path / "out"
    result = tag("--catalog", str(manifest), "--model", tiny_bundle, "--out", str(out), "--max-error-rate", "1",
                 "--run-id", "../../../../run")
    assert result.exit_code == 0, result.output
    created = snapshot(tmp_path) - before_tmp
    assert created and all(p == "out" or p.startswith("out/") for p in created), sorted(created)
    assert snapshot(demo.root) == before_demo
    tags = pl.from_arrow(read_complete_partition(f"{out}/tags/run_date={DATE}"))
    errors = pl.from_arrow(read_complete_partition(f"{out}/errors/run_date={DATE}"))
    assert sorted(tags["product_id"].to_list() + errors["product_id"].to_list()) == sorted(r[0] for r in rows)
    assert dict(errors.select("product_id", "error_type").iter_rows())["../../../etc/passwd"] == "decode"
    # the one night written, beside the table's index of complete nights (_partitions.json)
    assert {p.name for p in (out / "tags").iterdir()} == {f"run_date={DATE}", "_partitions.json"}


def test_image_urls_are_never_fetched_over_http(demo, tiny_bundle, tmp_path):
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/latest/meta-data/iam/security-credentials/role"
        manifest = tmp_path / "m.csv"
        first = sorted((demo.root / "catalog_images").iterdir())[0]
        manifest.write_text(f"product_id,image\nimds,{url}\nftp,ftp://127.0.0.1/x.jpg\nok,{first}\n")
        out = tmp_path / "out"
        result = tag("--catalog", str(manifest), "--model", tiny_bundle, "--out", str(out), "--max-error-rate", "1")
        assert result.exit_code == 0, result.output
    finally:
        server.shutdown()
        server.server_close()
    assert hits == [], "the job made a request to a URL from the manifest"
    errors = pl.from_arrow(read_complete_partition(f"{out}/errors/run_date={DATE}")).sort("product_id")
    assert errors.select("product_id", "error_type").rows() == [("ftp", "invalid_location"), ("imds", "invalid_location")]
    assert "unsupported URL scheme 'http'" in errors["message"][1]
