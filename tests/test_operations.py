"""Issue 12: nothing under --out changes before every input is checked; bundles whose numbers do not add up
are refused and a score is never NaN; stops work from the first second; permanent storage errors are input
errors (exit 2), not outages (exit 4); manifests with repeated headers, padded ids, FIFOs; odd --out values."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import socket
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobs.cli import cli
from tagger.model.bundle import BundleError, compute_model_version, load_bundle
from tagger.tag.writers import SUCCESS_FILE, read_complete_partition

from .conftest import upload_tree
from .faults import S3FaultProxy, wait_for

DATE = "2026-08-09"
TAGGER = str(Path(sys.executable).parent / "tagger")


def tag(*args: str):
    return CliRunner().invoke(cli, ["tag", "--workers", "0", "--progress", "none", "--run-date", DATE, *args],
                              catch_exceptions=False)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_line(output: str, command: str = "tag") -> str:
    lines = [line for line in output.splitlines() if line.startswith(f"tagger {command}:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def tampered(tiny_bundle: str, tmp_path: Path, name: str, change) -> str:
    """A copy of the tiny bundle with model.json changed by ``change`` and model_version recomputed, as a
    careless (or hostile) editor would: the hash alone cannot tell."""
    bundle = tmp_path / name
    shutil.copytree(tiny_bundle, bundle)
    meta = json.loads((bundle / "model.json").read_text())
    change(meta)
    meta["model_version"] = compute_model_version((bundle / "model.safetensors").read_bytes(), meta)
    (bundle / "model.json").write_text(json.dumps(meta))  # json writes NaN/Infinity as bare literals
    return str(bundle)


@pytest.fixture()
def complete(demo, tiny_bundle, tmp_path) -> Path:
    """--out with a complete partition for DATE: what a bad re-run must leave exactly as it is."""
    out = tmp_path / "out"
    result = tag("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(out), "--max-error-rate", "0.5")
    assert result.exit_code == 0, result.output
    return out


# -- 4: nothing changes before the inputs are checked ----------------------------------------------------
def test_weights_that_do_not_fit_leave_the_previous_partition_untouched(demo, tiny_bundle, complete, tmp_path):
    import torch
    from safetensors.torch import save

    misfit = tmp_path / "misfit"
    shutil.copytree(tiny_bundle, misfit)
    weights = save({"backbone.not_a_layer.weight": torch.zeros(3, 3)})
    (misfit / "model.safetensors").write_bytes(weights)
    meta = json.loads((misfit / "model.json").read_text())
    meta["model_version"] = compute_model_version(weights, meta)
    (misfit / "model.json").write_text(json.dumps(meta))

    before = snapshot(complete)
    result = tag("--catalog", str(demo.catalog), "--model", str(misfit), "--out", str(complete))
    assert result.exit_code == 2
    assert "weights do not fit backbone 'test_efficientnet'" in one_line(result.output)
    assert snapshot(complete) == before, "a refused bundle changed --out"
    assert read_complete_partition(f"{complete}/tags/run_date={DATE}").num_rows > 0


def test_weights_with_nan_are_refused_before_anything_changes(demo, tiny_bundle, complete, tmp_path):
    from safetensors.torch import load, save

    broken = tmp_path / "nan-weights"
    shutil.copytree(tiny_bundle, broken)
    state = load((broken / "model.safetensors").read_bytes())
    first = sorted(k for k, v in state.items() if v.is_floating_point())[0]
    state[first][..., 0] = float("nan")
    weights = save(state)
    (broken / "model.safetensors").write_bytes(weights)
    meta = json.loads((broken / "model.json").read_text())
    meta["model_version"] = compute_model_version(weights, meta)
    (broken / "model.json").write_text(json.dumps(meta))

    before = snapshot(complete)
    result = tag("--catalog", str(demo.catalog), "--model", str(broken), "--out", str(complete))
    assert result.exit_code == 2 and f"NaN or infinite values in 1 tensor(s) ({first})" in one_line(result.output)
    assert snapshot(complete) == before


# -- 5: every number of a bundle is checked; a score is never NaN ---------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("mean", [float("nan"), 0.5, 0.5], "mean must be 3 finite numbers"),
    ("std", [0.2, float("nan"), 0.2], "std must be 3 finite numbers"),
    ("std", [0.2, float("inf"), 0.2], "std must be 3 finite numbers"),
    ("std", [0.2, 0.0, 0.2], "std must be in [0.001, 10]"),
    ("mean", [0.5, 0.5, 300], "mean must be in [0, 1]"),
    ("input_size", True, "input_size must be an integer"),
    ("input_size", 100000, "input_size must be an integer in [16, 2048]"),
    ("threshold", float("nan"), "threshold must be in [0, 1]"),
    ("threshold", 1.5, "threshold must be in [0, 1]"),
])
def test_a_bundle_with_a_number_out_of_range_is_refused(demo, tiny_bundle, complete, tmp_path, field, value, message):
    def change(meta):
        if field == "threshold":
            meta["attributes"][0]["threshold"] = value
        else:
            meta[field] = value

    bundle = tampered(tiny_bundle, tmp_path, "bad", change)
    with pytest.raises(BundleError, match=message.replace("[", r"\[")):
        load_bundle(bundle)
    before = snapshot(complete)
    result = tag("--catalog", str(demo.catalog), "--model", bundle, "--out", str(complete))
    assert result.exit_code == 2 and message in one_line(result.output)
    assert snapshot(complete) == before


def test_nan_scores_fail_the_run_and_are_never_written(demo, tiny_bundle, tmp_path, monkeypatch):
    from tagger.model.predictor import Predictor

    real = Predictor.__call__

    def poisoned(self, images, **kwargs):
        predictions = real(self, images, **kwargs)
        name = next(iter(predictions.scores))
        predictions.scores[name][-1] = np.nan  # e.g. an fp16 overflow on a GPU
        return predictions

    monkeypatch.setattr(Predictor, "__call__", poisoned)
    out = tmp_path / "out"
    result = tag("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(out), "--batch-size", "8")
    assert result.exit_code == 1
    line = one_line(result.output)
    assert "NaN or infinite scores for 1 image(s)" in line and "--precision fp32" in line
    assert not (out / "tags" / f"run_date={DATE}" / SUCCESS_FILE).exists()
    assert not list((out / "tags" / f"run_date={DATE}").glob("part-*.parquet")), "a NaN score reached a part file"


@pytest.fixture
def poisoned_last_image(monkeypatch):
    """The Predictor scores the last image of each batch NaN (e.g. an fp16 overflow on a GPU)."""
    from tagger.model.predictor import Predictor

    real = Predictor.__call__

    def poisoned(self, images, **kwargs):
        predictions = real(self, images, **kwargs)
        predictions.scores[next(iter(predictions.scores))][-1] = np.nan
        return predictions

    monkeypatch.setattr(Predictor, "__call__", poisoned)


def test_evaluate_and_predict_refuse_a_nan_score_as_tag_does(demo, tiny_bundle, tmp_path, poisoned_last_image):
    """The one NaN guard (tagger.model.scorer) for evaluate and predict too: exit 1 naming the image and the fix, no
    report or sheet (before, evaluate scored the NaN row with the Predictor's argmax and said nothing)."""
    images = sorted(demo.images_dir.glob("*.jpg"))[:3]
    report = tmp_path / "eval"
    result = CliRunner().invoke(cli, ["evaluate", "--model", tiny_bundle, "--data", str(demo.root), "--split", "all",
                                      "--out", str(report), "--no-plots", "--workers", "0", "--batch-size", "500"])
    line = one_line(result.output, "evaluate")
    assert result.exit_code == 1, result.output
    assert "NaN or infinite scores for 1 image(s)" in line and "nothing was written" in line and "--precision fp32" in line
    assert not (report / "metrics.parquet").exists() and not (report / "predictions.parquet").exists()

    sheet = tmp_path / "sheet.png"
    result = CliRunner().invoke(cli, ["predict", *map(str, images), "--model", tiny_bundle, "--out", str(sheet), "--workers", "0"])
    line = one_line(result.output, "predict")
    assert result.exit_code == 1, result.output
    assert f"NaN or infinite scores for 1 image(s) of a batch (images {images[-1]})" in line and "--precision fp32" in line
    assert not sheet.exists() and not sheet.with_suffix(".parquet").exists()


def test_retrains_scoring_refuses_a_nan_score(tiny_bundle, monkeypatch):
    """retrain's val/test scoring goes through the same guard: a NaN score is no threshold to calibrate."""
    import torch

    from tagger.model.predictor import Predictor
    from tagger.model.scoring import predict_batches
    from tagger.model.scorer import NonFiniteScores

    real = Predictor.__call__

    def poisoned(self, images, **kwargs):  # the second batch's first image
        predictions = real(self, images, **kwargs)
        if len(images) == 3:
            predictions.scores[next(iter(predictions.scores))][0] = np.inf
        return predictions

    monkeypatch.setattr(Predictor, "__call__", poisoned)
    net = load_bundle(tiny_bundle).build_net()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    targets = torch.zeros((5, 2), dtype=torch.long)
    with pytest.raises(NonFiniteScores, match=r"\(decoded images 3 of the split\); no bundle was written\. .*--lr"):
        predict_batches(net, [(images[:2], targets[:2]), (images[2:], targets[2:])], "cpu", precision="fp32")


# -- 6: stops from the first second; a FIFO is no manifest ---------------------------------------------
def test_a_fifo_as_catalog_is_refused_instead_of_blocking(tiny_bundle, tmp_path):
    fifo = tmp_path / "catalog.csv"
    os.mkfifo(fifo)
    done = subprocess.run([TAGGER, "tag", "--catalog", str(fifo), "--model", tiny_bundle, "--out", str(tmp_path / "out"),
                           "--progress", "none"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "is not a regular file" in one_line(done.stderr) and "FIFO" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stalled", ["manifest", "bundle"])
def test_sigterm_while_reading_the_manifest_or_the_bundle_stops_at_once(demo, tiny_bundle, s3_endpoint, s3_bucket,
                                                                      tmp_path, stalled):
    bucket, fs = s3_bucket
    fs.put_file(str(demo.catalog), f"{bucket}/catalog.csv")
    upload_tree(fs, Path(tiny_bundle), f"{bucket}/model")
    with S3FaultProxy(s3_endpoint) as proxy:
        # The store accepts the request and answers nothing for 10 minutes, far past this test's deadline.
        key = f"/{bucket}/catalog.csv" if stalled == "manifest" else f"/{bucket}/model/model.json"
        proxy.stall(key, seconds=600)
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url}
        process = subprocess.Popen(
            [TAGGER, "tag", "--catalog", f"s3://{bucket}/catalog.csv", "--model", f"s3://{bucket}/model",
             "--out", str(tmp_path / "out"), "--progress", "none", "--storage-option", "config_kwargs.read_timeout=600"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        try:
            wait_for(lambda: proxy.requests(path=key) or process.poll() is not None, 120, 0.05, f"the {stalled} read")
            assert process.poll() is None, process.communicate()[1]
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=60)  # a stop that waited for the read would blow this deadline
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    assert process.returncode == 143, stderr
    assert "interrupted: stopped by SIGTERM" in one_line(stderr)
    assert not (tmp_path / "out").exists()


@contextmanager
def silent_endpoint():
    """An "S3 endpoint" on 127.0.0.1 that accepts every connection and never sends a byte; yields its URL and
    the list of connections it accepted (each one botocore attempt, or s3fs retry, that reached it)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.05)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:  # the accept timeout: look at the stop flag again
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        server.close()


# One attempt of 1 s connect + 1 s read: storage.read_deadline gives each read 2 s, retries included.
SHORT_BUDGET = ("--storage-option", "config_kwargs.connect_timeout=1", "--storage-option", "config_kwargs.read_timeout=1",
                "--storage-option", 'config_kwargs.retries={"total_max_attempts": 1}')


@pytest.mark.timeout(120)
@pytest.mark.parametrize("silent", ["manifest", "bundle"])
def test_a_store_that_never_answers_is_exit_4_within_the_read_deadline(demo, tiny_bundle, tmp_path, silent):
    """Every manifest and bundle read has a deadline (storage.read_deadline: attempts x (connect + read timeout)
    + back-off), so s3fs's retry layers cannot multiply botocore's: the run ends with exit 4 after a
    read, where s3fs's retries used to multiply botocore's (here 5 connections, 1.2 s apart, then exit 4; at
    the default settings 5 x 541 s for a manifest read, which `timeout 600` killed).
    Measured by what reached the endpoint, not by a clock: one connection per attempt, one attempt per read in
    this budget, and the first read that fails ends the run."""
    with silent_endpoint() as (url, accepted):
        catalog = "s3://bucket/catalog.csv" if silent == "manifest" else str(demo.catalog)
        model = "s3://bucket/model" if silent == "bundle" else tiny_bundle
        out = tmp_path / "out"
        result = tag("--catalog", catalog, "--model", model, "--out", str(out), "--storage-option", f"endpoint_url={url}",
                     *SHORT_BUDGET)
        reached = len(accepted)
    assert result.exit_code == 4, result.output
    assert "storage unavailable: the store did not answer within the read deadline" in one_line(result.output)
    # Before the deadline: botocore's one attempt times s3fs's five retries, each a connection (0 is possible
    # here: on a loaded machine making the S3 client may take the whole 2 s).
    assert reached <= 2, reached
    assert not out.exists()


# -- 7: permanent storage errors are exit 2 at once -----------------------------------------------------
@pytest.mark.parametrize("endpoint, message", [
    ("http://AKIAEXAMPLE:s3cr3t-value@127.0.0.1:9", "carries credentials"),
    ("not-a-url", "is not an http(s)://host[:port] URL"),
    ("http://127.0.0.1:port", "S3 endpoint URL is malformed"),
])
def test_a_malformed_endpoint_is_an_input_error_not_an_outage(tiny_bundle, tmp_path, endpoint, message):
    result = tag("--catalog", "s3://bucket/catalog.csv", "--model", tiny_bundle, "--out", str(tmp_path / "out"),
                 "--storage-option", f"endpoint_url={endpoint}")
    assert result.exit_code == 2
    line = one_line(result.output)
    assert message in line and "s3cr3t-value" not in result.output and "AKIAEXAMPLE" not in result.output
    assert not (tmp_path / "out").exists()


def test_an_invalid_bucket_name_is_an_input_error(s3_endpoint, tiny_bundle, tmp_path):
    result = tag("--catalog", "s3://Bad_Bucket!/catalog.csv", "--model", tiny_bundle, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    line = one_line(result.output)
    assert "invalid input" in line and "'Bad_Bucket!' is not a valid S3 bucket name" in line
    assert len(result.output.strip().splitlines()) == 1 and "regex" not in result.output, result.output  # not botocore's dump


def test_an_output_bucket_that_does_not_exist_is_exit_2_before_the_model_loads(demo, s3_endpoint, tmp_path):
    result = tag("--catalog", str(demo.catalog), "--model", str(tmp_path / "no-such-model"),
                 "--out", "s3://no-such-bucket-here/out")
    assert result.exit_code == 2
    assert "bucket 'no-such-bucket-here' does not exist" in one_line(result.output)


# -- Also: odd --out values ---------------------------------------------------------------------------
def test_an_out_that_is_an_existing_file_is_exit_2_before_anything_else(demo, tmp_path):
    existing = tmp_path / "out.txt"
    existing.write_text("not a folder")
    result = tag("--catalog", str(demo.catalog), "--model", str(tmp_path / "no-such-model"), "--out", str(existing))
    assert result.exit_code == 2
    assert "is an existing file, not a folder" in one_line(result.output)
    assert existing.read_text() == "not a folder"


def test_a_read_only_out_is_exit_2_before_the_model_loads(tmp_path):
    shared = Path(os.environ.get("TMPDIR", "/tmp")) / f"tagger-ro-{os.getpid()}"
    readonly = shared / "readonly"
    readonly.mkdir(parents=True)
    try:
        readonly.chmod(0o555)
        shared.chmod(0o755)
        args = [TAGGER, "tag", "--catalog", "/nonexistent/catalog.csv", "--model", "/nonexistent/model",
                "--out", str(readonly / "out")]
        if os.geteuid() == 0:  # root writes anywhere: run as nobody, for whom the folder is read-only
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv to drop privileges")
            args = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *args]
        done = subprocess.run(args, capture_output=True, text=True, timeout=180, env={**os.environ, "HOME": str(shared)})
        assert done.returncode == 2, done.stderr
        assert "is not writable by this user" in one_line(done.stderr)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# -- Also: manifests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_duplicated_header_names_are_refused_naming_them(tmp_path, kind):
    if kind == "csv":
        catalog = tmp_path / "m.csv"
        catalog.write_text("product_id,image,product_id,image\n1,a.jpg,2,b.jpg\n")
    else:
        catalog = tmp_path / "m.parquet"
        table = pa.Table.from_arrays([pa.array(["1"]), pa.array(["a.jpg"]), pa.array(["2"])], names=["product_id", "image", "product_id"])
        pq.write_table(table, catalog)
    result = tag("--catalog", str(catalog), "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    line = one_line(result.output)
    assert "'product_id'" in line and "more than once" in line and "m." + kind in line
    assert ("'image'" in line) == (kind == "csv")
    assert not (tmp_path / "out").exists()


def test_ids_are_kept_exactly_as_written(demo, tiny_bundle, tmp_path):
    with open(demo.catalog, newline="") as handle:
        image = str(Path(demo.root, next(csv.DictReader(handle))["image"]))
    catalog = tmp_path / "m.csv"
    with open(catalog, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([("product_id", "image"), ("p1", image), (" p1", image), ("p1 ", image), ("  ", image)])
    out = tmp_path / "out"
    result = tag("--catalog", str(catalog), "--model", tiny_bundle, "--out", str(out), "--max-error-rate", "0.5")
    assert result.exit_code == 0, result.output
    tags = pl.from_arrow(read_complete_partition(f"{out}/tags/run_date={DATE}"))
    errors = pl.from_arrow(read_complete_partition(f"{out}/errors/run_date={DATE}"))
    assert sorted(tags["product_id"]) == [" p1", "p1", "p1 "], "ids were trimmed or collided"
    assert errors.select("product_id", "error_type").rows() == [("  ", "invalid_row")]
