"""``tagger tag --engine ray``: the same tables and promises as the local engine, on Ray Data.

One Ray for the module (``num_cpus=2``, as on the CI machines), started in this process: the CLI runs
in-process and uses it, and the driver killed with SIGKILL is a separate ``tagger`` process that joins it
with ``--ray-address``. Faults are injected by replacing the model actor or the sink with a subclass defined
in a function (cloudpickle ships such a class to the workers by value).

Invariant checked throughout: every manifest row ends in exactly one row of ``tags`` or ``errors``, the
partition holds exactly its parts and ``_SUCCESS``, and no fragment of the Ray engine is left behind.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from jobs.cli import cli
from tagger.attributes import ATTRIBUTES
from tagger.tag.writers import ERRORS_SCHEMA, SUCCESS_FILE, read_complete_partition, tags_schema

from .faults import wait_for
from .test_images import write_manifest

pytest.importorskip("ray", reason="the ray extra (pip install '.[ray]') is not installed")

pytestmark = pytest.mark.slow

DATE = "2026-03-04"
ROWS = 120
SHARD = 10
SCORES = [f"{a}_score" for a in ATTRIBUTES]


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray for the module, 2 CPUs; its GCS address for drivers in other processes."""
    import ray

    if ray.is_initialized():  # pragma: no cover - another module left one running
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def tag(*args: str):
    return CliRunner().invoke(cli, ["tag", "--progress", "none", "--run-date", DATE, *args], catch_exceptions=False)


def ray_tag(*args: str):
    return tag("--engine", "ray", *args)


def comparable(out: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    tags = pl.from_arrow(read_complete_partition(f"{out}/tags/run_date={DATE}")).drop("run_id", "tagged_at").sort("product_id")
    errors = pl.from_arrow(read_complete_partition(f"{out}/errors/run_date={DATE}")).drop("run_id").sort("product_id")
    return tags, errors


def assert_same_rows(tags: pl.DataFrame, expected: pl.DataFrame) -> None:
    """Equal, scores within 1e-5 (CPU kernels may differ in the last bits with the batch an image falls in)."""
    assert tags.drop(SCORES).equals(expected.drop(SCORES)), "tags differ"
    for column in SCORES:
        assert np.allclose(tags[column].to_numpy(), expected[column].to_numpy(), atol=1e-5), column


def assert_exactly_once(out: Path, baseline: tuple[pl.DataFrame, pl.DataFrame], rows: int, shards: int) -> None:
    """Every row once in tags or errors, equal to the baseline; only parts and _SUCCESS; no fragment left."""
    tags, errors = comparable(out)
    assert tags["product_id"].n_unique() == tags.height and errors["product_id"].n_unique() == errors.height
    assert tags.height + errors.height == rows
    assert_same_rows(tags, baseline[0])
    assert errors.equals(baseline[1]), "errors differ"
    for table in ("tags", "errors"):
        names = sorted(p.name for p in (out / table / f"run_date={DATE}").iterdir())
        assert names == sorted([SUCCESS_FILE] + [f"part-{i:05d}.parquet" for i in range(shards)]), names
    state = out / "_runs" / f"run_date={DATE}"
    assert sorted(p.name for p in state.iterdir()) == ["plan.json", "shards", "summary.json"], "Ray fragments left behind"
    # _SUCCESS last: after every part and every done marker.
    last = max(p.stat().st_mtime_ns for t in ("tags", "errors") for p in (out / t / f"run_date={DATE}").glob("part-*"))
    last = max([last] + [p.stat().st_mtime_ns for p in (state / "shards").glob("*.json")])
    assert (out / "tags" / f"run_date={DATE}" / SUCCESS_FILE).stat().st_mtime_ns >= last


def summary(out: Path) -> dict:
    return json.loads((out / "_runs" / f"run_date={DATE}" / "summary.json").read_text())


def markers(out: Path) -> list[str]:
    folder = out / "_runs" / f"run_date={DATE}" / "shards"
    return sorted(p.name for p in folder.glob("*.json")) if folder.exists() else []


def success(out: Path) -> bool:
    return any((out / table / f"run_date={DATE}" / SUCCESS_FILE).exists() for table in ("tags", "errors"))


def demo_images(demo) -> list[tuple[str, str]]:
    with open(demo.catalog, newline="") as handle:
        return [(r["product_id"], str(Path(demo.root, r["image"]))) for r in csv.DictReader(handle)]


# -- a catalog of ROWS rows, slow enough to interrupt --------------------------------------------------------
@pytest.fixture(scope="module")
def catalog(demo, tmp_path_factory) -> Path:
    """ROWS rows over the demo images (its missing and corrupt ones among them), every third a large noisy PNG."""
    root = tmp_path_factory.mktemp("ray-catalog")
    rng = np.random.default_rng(1)
    big = []
    for index in range(3):
        path = root / f"big-{index}.png"
        Image.fromarray(rng.integers(0, 255, (900, 900, 3), dtype=np.uint8)).save(path, compress_level=1)
        big.append(str(path))
    images = [image for _, image in demo_images(demo)]
    rows = [(f"p{row:04d}", big[row // 3 % len(big)] if row % 3 == 0 else images[row % len(images)]) for row in range(ROWS)]
    return write_manifest(root / "catalog.csv", rows)


def catalog_args(catalog: Path, model: str, out: Path, *extra: str) -> list[str]:
    return ["--catalog", str(catalog), "--model", model, "--out", str(out), "--shard-size", str(SHARD),
            "--batch-size", "4", "--max-error-rate", "0.5", *extra]


@pytest.fixture(scope="module")
def baseline(catalog, tiny_bundle, tmp_path_factory):
    """The local engine's tables for the catalog: what every Ray run, faults or not, must equal."""
    out = tmp_path_factory.mktemp("ray-baseline") / "out"
    result = tag("--workers", "0", *catalog_args(catalog, tiny_bundle, out))
    assert result.exit_code == 0, result.output
    tags, errors = comparable(out)
    assert tags.height + errors.height == ROWS and errors.height > 0
    return tags, errors


# -- parity ------------------------------------------------------------------------------------------------
def test_same_rows_and_schemas_as_the_local_engine(demo, tiny_bundle, ray_address, tmp_path):
    local, ray = tmp_path / "local", tmp_path / "ray"
    args = ("--catalog", str(demo.catalog), "--model", tiny_bundle, "--shard-size", "20", "--batch-size", "8")
    assert tag("--workers", "0", "--out", str(local), *args).exit_code == 0
    result = ray_tag("--out", str(ray), *args)
    assert result.exit_code == 0, result.output
    assert "succeeded" in result.output

    rows = len(demo_images(demo))
    expected = comparable(local)
    assert_exactly_once(ray, expected, rows, shards=3)
    for table, schema in (("tags", tags_schema(ATTRIBUTES)), ("errors", ERRORS_SCHEMA)):
        for name in ("part-00000.parquet", "part-00002.parquet"):
            ours = pq.read_schema(ray / table / f"run_date={DATE}" / name)
            theirs = pq.read_schema(local / table / f"run_date={DATE}" / name)
            assert ours.equals(theirs, check_metadata=False) and ours.equals(schema, check_metadata=False), (table, name)

    facts = summary(ray)
    assert facts["status"] == "succeeded" and facts["rows"] == rows and facts["errors"] == 2
    assert facts["error_types"] == {"decode": 1, "missing": 1}
    assert facts["this_process"]["engine"]["name"] == "ray" and facts["this_process"]["images_read"] == rows
    assert facts["this_process"]["engine"]["cpus"] == 2 and facts["arguments"]["engine"] == "ray"
    assert facts["this_process"]["device"] == "cpu" and "ray_start_s" in facts["durations_s"]
    assert summary(local)["this_process"]["engine"] == {"name": "local"}


def test_bad_images_mid_batch_are_error_rows_and_change_no_neighbour(demo, tiny_bundle, ray_address, tmp_path):
    good = [r for r in demo_images(demo)[:-2]][:10]
    corrupt, empty = tmp_path / "corrupt.jpg", tmp_path / "empty.jpg"
    corrupt.write_bytes(Path(good[0][1]).read_bytes()[:300])
    empty.write_bytes(b"")
    mixed = good[:3] + [("bad-corrupt", str(corrupt))] + good[3:6] + [("bad-missing", str(tmp_path / "nope.jpg")),
                                                                     ("bad-empty", str(empty))] + good[6:]
    out = tmp_path / "mixed"
    result = ray_tag("--catalog", str(write_manifest(tmp_path / "mixed.csv", mixed)), "--model", tiny_bundle,
                     "--out", str(out), "--batch-size", "16", "--max-error-rate", "0.5")
    assert result.exit_code == 0, result.output
    tags, errors = comparable(out)
    assert dict(zip(errors["product_id"], errors["error_type"])) == {"bad-corrupt": "decode", "bad-missing": "missing",
                                                                      "bad-empty": "empty_file"}
    assert "corrupt.jpg" in errors.filter(pl.col("product_id") == "bad-corrupt")["message"][0]

    clean = tmp_path / "clean"
    assert tag("--workers", "0", "--catalog", str(write_manifest(tmp_path / "clean.csv", good)), "--model", tiny_bundle,
               "--out", str(clean), "--batch-size", "16").exit_code == 0
    assert_same_rows(tags, comparable(clean)[0])


def test_max_image_bytes_reaches_the_decode_tasks(demo, tiny_bundle, ray_address, tmp_path):
    """The too_large row advises --max-image-bytes: the Ray engine takes it as the local one does."""
    images = demo_images(demo)[:6]
    sizes = sorted(Path(image).stat().st_size for _, image in images)
    cap = sizes[2]  # the larger half is refused from its size
    out = tmp_path / "capped"
    result = ray_tag("--catalog", str(write_manifest(tmp_path / "c.csv", images)), "--model", tiny_bundle, "--out", str(out),
                     "--max-image-bytes", str(cap), "--max-error-rate", "1")
    assert result.exit_code == 0, result.output
    tags, errors = comparable(out)
    assert errors.height == sum(size > cap for size in sizes) and tags.height == 6 - errors.height
    assert set(errors["error_type"]) == {"too_large"} and all("--max-image-bytes" in m for m in errors["message"])


def test_an_unwritable_onnx_cache_leaves_the_previous_partition_as_it_was(demo, tiny_bundle, ray_address, tmp_path, monkeypatch):
    from .test_runtime import engines, unwritable_cache_keeps_the_partition

    if not engines.installed("onnx"):
        pytest.skip("extra [onnx] not installed")
    unwritable_cache_keeps_the_partition(demo, tiny_bundle, tmp_path, monkeypatch, "--engine", "ray")


def test_a_rerun_that_replaces_a_complete_night_keeps_it_until_the_ray_run_commits(demo, tiny_bundle, ray_address, tmp_path):
    """The Ray driver writes a re-run's parts under their own names: a failed re-run leaves the night readable, a
    committed one replaces it, and no part of either night is left beside the new one."""
    out = tmp_path / "out"
    args = ("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(out), "--shard-size", "20", "--batch-size", "8")
    assert tag("--workers", "0", *args).exit_code == 0
    first = comparable(out)
    run = json.loads((out / "tags" / f"run_date={DATE}" / SUCCESS_FILE).read_text())["run_id"]
    refused = ray_tag(*args, "--max-image-bytes", "100")  # every photo refused from its size
    assert refused.exit_code == 3, refused.output
    assert f"the previous complete output of {DATE} (run {run}) is kept until a run commits" in refused.output, refused.output
    kept = comparable(out)
    assert kept[0].equals(first[0]) and kept[1].equals(first[1])
    assert json.loads((out / "tags" / f"run_date={DATE}" / SUCCESS_FILE).read_text())["run_id"] == run

    fixed = ray_tag(*args, "--max-image-bytes", "20000000")
    assert fixed.exit_code == 0, fixed.output
    tags, errors = comparable(out)
    assert_same_rows(tags, first[0])
    assert errors.equals(first[1])
    for table in ("tags", "errors"):
        body = json.loads((out / table / f"run_date={DATE}" / SUCCESS_FILE).read_text())
        names = sorted(p.name for p in (out / table / f"run_date={DATE}").iterdir())
        assert body["run_id"] != run and names == sorted([SUCCESS_FILE, *body["parts"]]) and len(body["parts"]) == 3, names
        assert "part-00000.parquet" not in names
    state = out / "_runs" / f"run_date={DATE}"
    assert sorted(p.name for p in state.iterdir()) == ["plan.json", "shards", "summary.json"], "fragments or kept state left"


# -- exactly once under faults --------------------------------------------------------------------------
def dying_actor(marker: Path):
    """The model actor, killed (os._exit) at its second batch, once: Ray restarts it and retries the batch."""
    from tagger.tag.ray.stages import ModelActor

    class DyingActor(ModelActor):
        calls = 0

        def __call__(self, batch):
            self.calls += 1
            if self.calls == 2 and not os.path.exists(marker):
                Path(marker).write_text(str(os.getpid()))
                os._exit(1)
            return super().__call__(batch)

    return DyingActor


def test_an_actor_killed_mid_run_loses_and_repeats_no_row(catalog, tiny_bundle, baseline, ray_address, tmp_path, monkeypatch):
    from tagger.tag.ray import stages

    marker = tmp_path / "actor-killed"
    monkeypatch.setattr(stages, "ModelActor", dying_actor(marker))
    out = tmp_path / "out"
    result = ray_tag(*catalog_args(catalog, tiny_bundle, out))
    assert result.exit_code == 0, result.output
    assert marker.exists(), "the fault was not injected"
    assert_exactly_once(out, baseline, ROWS, ROWS // SHARD)
    assert summary(out)["this_process"]["shards_committed"] == ROWS // SHARD


def failing_sink(marker: Path):
    """The sink, whose first write raises after its fragment landed: Ray runs the task again."""
    from tagger.tag.ray.sink import ShardSink

    class FailingSink(ShardSink):
        def write(self, blocks, ctx):
            written = super().write(blocks, ctx)
            if written and not os.path.exists(marker):
                Path(marker).write_text(json.dumps(written))
                raise OSError("injected: the write failed after its fragment landed")
            return written

    return FailingSink


def test_a_write_that_fails_after_its_file_landed_adds_no_row(catalog, tiny_bundle, baseline, ray_address, tmp_path,
                                                              monkeypatch):
    from tagger.tag.ray import sink

    marker = tmp_path / "write-failed"
    monkeypatch.setattr(sink, "ShardSink", failing_sink(marker))  # tag_shards takes it from the sink module per run
    out = tmp_path / "out"
    result = ray_tag(*catalog_args(catalog, tiny_bundle, out))
    assert result.exit_code == 0, result.output
    landed = json.loads(marker.read_text())
    assert landed, "the fault was not injected"
    assert_exactly_once(out, baseline, ROWS, ROWS // SHARD)
    # The failed attempt's fragment and the retry's both held those rows: one copy was dropped.
    assert summary(out)["this_process"]["engine"]["duplicate_rows_dropped"] >= sum(w["rows"] for w in landed)


def raising_actor():
    from tagger.tag.ray.stages import ModelActor

    class RaisingActor(ModelActor):
        def __call__(self, batch):
            raise RuntimeError("injected: the model is broken")

    return RaisingActor


def test_a_model_that_always_raises_fails_the_run(catalog, tiny_bundle, ray_address, tmp_path, monkeypatch):
    from tagger.tag.ray import stages

    monkeypatch.setattr(stages, "ModelActor", raising_actor())
    out = tmp_path / "out"
    started = time.monotonic()
    result = ray_tag(*catalog_args(catalog, tiny_bundle, out))
    assert result.exit_code == 1, result.output
    assert "tagger tag: failed: a Ray task failed: RuntimeError: injected: the model is broken" in result.output
    assert time.monotonic() - started < 240
    assert not success(out) and markers(out) == []
    assert not list((out / "tags" / f"run_date={DATE}").glob("*")), "nothing committed"
    assert not (out / "_runs" / f"run_date={DATE}" / "ray").exists(), "fragments left behind"


def sigterm_after_first_commit(monkeypatch) -> None:
    """SIGTERM to this process (the in-process CLI's stop handler; what a scheduler sends) as soon as the driver
    has committed a first shard. The driver's later commits wait until the run has taken the signal, so the
    stop falls mid-run however fast or loaded the machine is."""
    from tagger.tag.ray import sink

    original = sink.FragmentCommitter._commit
    sent: list[int] = []

    def commit(self, shard: int) -> None:
        if sent and threading.current_thread() is not threading.main_thread():
            self._stop.wait(60)  # the main thread takes the signal, then stops this thread
        original(self, shard)
        if not sent:
            sent.append(shard)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(sink.FragmentCommitter, "_commit", commit)


# The driver as another process, each shard's commit followed by a pause: a SIGKILL after its first new
# commit then lands mid-run on any machine.
PACED_DRIVER = """
import sys, time
from tagger.tag.ray import sink
original = sink.FragmentCommitter._commit
def commit(self, shard):
    original(self, shard)
    time.sleep(0.5)
sink.FragmentCommitter._commit = commit
from jobs.cli import main
sys.argv[0] = "tagger"
main()
"""


def test_sigterm_then_a_driver_killed_with_sigkill_then_a_rerun_equals_an_uninterrupted_run(
        catalog, tiny_bundle, baseline, ray_address, tmp_path, monkeypatch):
    out = tmp_path / "out"
    # 1. SIGTERM mid-run: exit 143, committed shards kept, no _SUCCESS, no fragment or torn part left.
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with monkeypatch.context() as patch:
            sigterm_after_first_commit(patch)
            result = ray_tag(*catalog_args(catalog, tiny_bundle, out))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 143, result.output
    assert "interrupted: stopped by SIGTERM; committed shards are kept" in result.output
    terminated = markers(out)
    assert 1 <= len(terminated) < ROWS // SHARD and not success(out)
    assert sorted(p.name for p in (out / "tags" / f"run_date={DATE}").iterdir()) == \
        [f"part-{int(m[:5]):05d}.parquet" for m in terminated], "exactly the committed shards' parts"
    assert not (out / "_runs" / f"run_date={DATE}" / "ray").exists(), "fragments left behind"

    # 2. The same command as another process, joining this Ray, killed with SIGKILL once it committed more.
    args = catalog_args(catalog, tiny_bundle, out, "--engine", "ray", "--progress", "none", "--run-date", DATE)
    log = tmp_path / "killed.log"
    process = subprocess.Popen([sys.executable, "-c", PACED_DRIVER, "tag", *args, "--ray-address", ray_address],
                               stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: len(markers(out)) > len(terminated) or process.poll() is not None, 240, 0.005, "a new marker")
        os.kill(process.pid, signal.SIGKILL)  # the driver only, as the out-of-memory killer would
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    done = markers(out)
    assert len(terminated) < len(done) < ROWS // SHARD, f"not killed mid-way ({len(done)} shards done): {log.read_text()}"
    assert not success(out), "_SUCCESS written by a run that did not finish"

    # 3. The same command again: it resumes after the committed shards and ends as one uninterrupted run.
    result = ray_tag(*catalog_args(catalog, tiny_bundle, out))
    assert result.exit_code == 0, result.output
    facts = summary(out)
    assert facts["status"] == "succeeded" and facts["rows"] == ROWS
    assert facts["this_process"]["shards_committed"] == ROWS // SHARD - len(done), "committed shards were redone"
    assert_exactly_once(out, baseline, ROWS, ROWS // SHARD)


# -- GPUs, --since, options --------------------------------------------------------------------------------
def test_cuda_without_a_gpu_fails_at_once_and_changes_nothing(demo, tiny_bundle, ray_address, tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    result = ray_tag("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(out), "--device", "cuda")
    assert result.exit_code == 1, result.output
    assert "--device cuda: the Ray cluster" in result.output and "has no GPU" in result.output
    assert time.monotonic() - started < 60, "it waited for a GPU"
    assert not out.exists() or not any(out.rglob("*.json")), "the partition was touched"


def test_since_reuses_unchanged_images_and_ray_reads_only_the_changed_one(demo, tiny_bundle, ray_address, tmp_path):
    root = tmp_path / "catalog"
    root.mkdir()
    rows = []
    for pid, image in demo_images(demo):
        copy = root / Path(image).name
        if Path(image).exists():
            copy.write_bytes(Path(image).read_bytes())
        rows.append((pid, str(copy)))
    manifest = write_manifest(root / "catalog.csv", rows)
    first, second = tmp_path / "night1", tmp_path / "night2"
    assert tag("--workers", "0", "--catalog", str(manifest), "--model", tiny_bundle, "--out", str(first),
               "--run-date", "2026-03-03", "--shard-size", "20").exit_code == 0
    changed = Path(rows[5][1])
    Image.open(changed).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed, quality=90)

    result = ray_tag("--catalog", str(manifest), "--model", tiny_bundle, "--out", str(second), "--since", str(first),
                     "--shard-size", "20")
    assert result.exit_code == 0, result.output
    facts = summary(second)
    assert facts["reused"] == len(rows) - 3 and facts["tagged"] == 1 and facts["errors"] == 2
    assert facts["this_process"]["images_read"] == 3, "only the changed image and the two bad rows are read"
    night1 = pl.from_arrow(read_complete_partition(f"{first}/tags/run_date=2026-03-03")).sort("product_id")
    night2 = comparable(second)[0]
    unchanged = night1.filter(pl.col("product_id") != rows[5][0]).drop("run_id", "tagged_at")
    assert_same_rows(night2.filter(pl.col("product_id") != rows[5][0]), unchanged)
    assert night2.filter(pl.col("product_id") == rows[5][0])["image_version"][0] != \
        night1.filter(pl.col("product_id") == rows[5][0])["image_version"][0]


def test_fan_out_tasks_may_use_either_engine(demo, tiny_bundle, ray_address, tmp_path):
    """The Airflow recipe: --plan-only, then the --shard I/N tasks (here one on Ray, one local), then _SUCCESS."""
    out = tmp_path / "out"
    base = ("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(out), "--shard-size", "10")
    assert tag(*base, "--plan-only", "--engine", "ray").exit_code == 0
    result = ray_tag(*base, "--shard", "0/2")
    assert result.exit_code == 0, result.output
    assert "shards_done" in result.output and not success(out)
    assert markers(out) == ["00000.json", "00002.json", "00004.json"]
    result = tag(*base, "--shard", "1/2", "--workers", "0")
    assert result.exit_code == 0 and "succeeded" in result.output, result.output
    local = tmp_path / "local"
    assert tag("--workers", "0", *base[:4], "--out", str(local), "--shard-size", "10").exit_code == 0
    assert_exactly_once(out, comparable(local), len(demo_images(demo)), shards=5)


def test_catalog_images_and_output_on_s3(demo, tiny_bundle, ray_address, s3_bucket, s3_endpoint):
    """--out on S3 under Ray: decode tasks read the images and write tasks the fragments over S3, the driver
    publishes there; the same rows as the local engine's run on the same bucket, nothing left under _runs/ray."""
    from .conftest import upload_tree

    bucket, fs = s3_bucket
    upload_tree(fs, demo.root, f"{bucket}/catalog")
    # Explicit, not only the test's AWS_ENDPOINT_URL: the options travel to Ray's workers with the run.
    base = ("--catalog", f"s3://{bucket}/catalog/catalog.csv", "--model", tiny_bundle, "--shard-size", "20",
            "--storage-option", f"client_kwargs.endpoint_url={s3_endpoint}")
    assert tag(*base, "--out", f"s3://{bucket}/local", "--workers", "0").exit_code == 0
    result = ray_tag(*base, "--out", f"s3://{bucket}/ray")
    assert result.exit_code == 0 and "succeeded" in result.output, result.output

    fs.invalidate_cache()
    for table in ("tags", "errors"):
        ours = pl.from_arrow(read_complete_partition(f"s3://{bucket}/ray/{table}/run_date={DATE}")).drop("run_id")
        theirs = pl.from_arrow(read_complete_partition(f"s3://{bucket}/local/{table}/run_date={DATE}")).drop("run_id")
        if table == "tags":
            ours, theirs = ours.drop("tagged_at").sort("product_id"), theirs.drop("tagged_at").sort("product_id")
            assert_same_rows(ours, theirs)
        else:
            assert ours.sort("product_id").equals(theirs.sort("product_id"))
        assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/ray/{table}/run_date={DATE}")) == \
            sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/local/{table}/run_date={DATE}"))
    assert not fs.exists(f"{bucket}/ray/_runs/run_date={DATE}/ray"), "Ray fragments left behind on S3"
    facts = json.loads(fs.cat_file(f"{bucket}/ray/_runs/run_date={DATE}/summary.json"))
    assert facts["status"] == "succeeded" and facts["arguments"]["engine"] == "ray"


def test_engine_options_are_checked_at_the_boundary(demo, tiny_bundle, tmp_path, monkeypatch):
    import importlib.util

    base = ["--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(tmp_path / "out")]
    result = tag(*base, "--ray-address", "127.0.0.1:6379")
    assert result.exit_code == 2 and "--ray-address) is for --engine ray" in result.output

    from .conftest import free_port

    started = time.monotonic()
    result = tag(*base, "--engine", "ray", "--ray-address", f"127.0.0.1:{free_port()}")  # nothing listens there
    assert result.exit_code == 1 and "cannot reach the Ray cluster at 127.0.0.1:" in result.output, result.output
    assert time.monotonic() - started < 60 and not (tmp_path / "out").exists()
    # Ray starts while the manifest is read: a bad manifest is still exit 2, and what is reported first.
    bad = tmp_path / "bad.csv"
    bad.write_text("product_id,picture\np1,a.jpg\n")
    result = tag("--catalog", str(bad), *base[2:], "--engine", "ray", "--ray-address", f"127.0.0.1:{free_port()}")
    assert result.exit_code == 2 and "image" in result.output and "cannot reach" not in result.output, result.output
    assert not (tmp_path / "out").exists()

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    result = tag(*base, "--engine", "ray")
    assert result.exit_code == 2, result.output
    assert "Ray Data, which is not installed here" in result.output and "pip install '.[ray]'" in result.output
    assert not (tmp_path / "out").exists()


def test_importing_the_cli_does_not_import_ray():
    code = "import sys, jobs.cli, tagger.tag.runner, tagger.tag.ray; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_the_ray_workers_decode_and_write_without_importing_torch():
    """Decode and write tasks import the stages and the sink: torch there would cost each worker ~3 s and ~350 MiB."""
    code = "import sys, tagger.tag.ray.stages, tagger.tag.ray.sink; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


@pytest.mark.parametrize("cpus, node_cpus, threads, expected", [
    (2, 2, 0, {"max_size": 1, "threads": 2, "num_cpus": 1}),     # this machine: both cores to the model, a decode slot
    (16, 16, 0, {"max_size": 4, "threads": 4, "num_cpus": 3}),   # a big node: four actors, four decode slots
    (16, 2, 0, {"max_size": 8, "threads": 2, "num_cpus": 1}),    # eight 2-CPU nodes: no actor larger than a node
    (2, 2, 1, {"max_size": 1, "threads": 1, "num_cpus": 1}),     # --threads 1: still a CPU left to decode
    (64, 64, 8, {"max_size": 8, "threads": 8, "num_cpus": 7}),   # --threads 8
])
def test_cpu_actors_use_the_cores_and_leave_each_a_decode_slot(cpus, node_cpus, threads, expected):
    from tagger.tag.ray.cluster import cpu_actors

    pool = cpu_actors(cpus, node_cpus, threads)
    assert {k: pool[k] for k in expected} == expected and pool["min_size"] == 1 and pool["num_gpus"] == 0


# -- the committer, without Ray: duplicates and gaps -------------------------------------------------------
def test_the_committer_takes_each_row_once_and_refuses_gaps(demo, tiny_bundle, tmp_path):
    """Fragments as retried and duplicated write tasks leave them: every row ends once in its shard's parts."""
    from tagger.data.manifest import read_manifest
    from tagger.model.bundle import load_bundle
    from tagger.tag.config import TagConfig
    from tagger.tag.partition import Partition
    from tagger.tag.plan import make_plan
    from tagger.tag.ray.sink import FragmentCommitter, fragment_schema, write_fragment
    from tagger.tag.rows import ShardRows
    from tagger.tag.shards import ShardCommitter

    config = TagConfig(catalog=str(demo.catalog), model=tiny_bundle, out=str(tmp_path / "out"), run_date=DATE, shard_size=20)
    manifest, bundle = read_manifest(config.catalog), load_bundle(config.model)
    partition = Partition(config.out, DATE)
    plan = make_plan(config, partition, manifest, bundle)
    shards = ShardCommitter(partition, plan)
    rows = ShardRows(partition, plan, manifest, bundle.attribute_names, bundle.model_version)
    readable = np.ones(manifest.num_rows, dtype=bool)
    folder = f"{partition.state}/ray/attempt"

    def fragment(name: str, numbers) -> None:
        numbers = np.asarray(numbers, dtype=np.int64)
        n = len(numbers)
        columns = {"row": numbers, "photo": np.zeros(n, np.int32), "image_version": ["v"] * n, "error_type": [""] * n, "message": [""] * n}
        for attribute in bundle.attribute_names:
            columns[attribute] = [bundle.attributes[0].labels[0]] * n
            columns[f"{attribute}_score"] = np.full(n, 0.5, np.float32)
        columns["tagged_at"] = pa.array([datetime.now(timezone.utc)] * n, pa.timestamp("us", tz="UTC"))
        write_fragment(f"{folder}/{name}", pa.table(columns, schema=fragment_schema(bundle.attribute_names)), None)

    expected = {0: 20, 1: 20, 2: manifest.num_rows - 40}
    committer = FragmentCommitter(folder, shards, rows, expected, readable, None)
    fragment("00000-a.parquet", range(0, 12))
    fragment("00000-b.parquet", range(8, 20))  # a retried task: rows 8-11 again
    fragment("00000-c.parquet", [3, 3, 4])  # a task Ray ran twice, and a row twice within it
    fragment("00001-a.parquet", range(20, 35))  # shard 1: five rows still missing
    committer.sweep()
    assert committer.open == {1, 2} and committer.duplicates == 4 + 3
    fragment("00000-d.parquet", range(0, 20))  # a late copy of the committed shard: dropped
    committer.sweep()
    assert committer.duplicates == 7 + 20 and committer.open == {1, 2}
    with pytest.raises(RuntimeError, match="shard 1: 5 row"):
        committer.check_done()
    fragment("00002-a.parquet", [5])  # a row of shard 0 under shard 2's name: refused
    with pytest.raises(RuntimeError, match="that shard 2 does not read"):
        committer.sweep()

    tags = pq.read_table(f"{partition.tags}/part-00000.parquet")
    assert sorted(tags.column("product_id").to_pylist()) == sorted(manifest.table.column("product_id").to_pylist()[:20])
    assert sorted(p.name for p in Path(folder).iterdir()) == ["00001-a.parquet", "00002-a.parquet"]


def test_at_default_options_both_engines_compute_the_same_on_one_machine(demo, tiny_bundle, ray_address, tmp_path, monkeypatch):
    """One inference rule (tagger.model.inference.resolve): on a CPU with native bf16 and a bundle that passed its
    bf16 check, --runtime auto may choose bf16 by measuring; the Ray engine on this machine resolves the same way,
    so its tables equal the local engine's (its own rule used to keep it at fp32: 1,638 of 4,200 cells differed)."""
    import shutil

    from tagger.model import choice
    from tagger.model.bundle import load_bundle, record_precision_check

    bundle = tmp_path / "checked"
    shutil.copytree(tiny_bundle, bundle)
    version = load_bundle(str(bundle)).model_version
    record_precision_check(str(bundle), {"candidate": "torch bf16", "model_version": version, "passed": True,
                                         "tolerance_points": 0.5, "largest_drop_points": 0.2})
    monkeypatch.setenv("TAGGER_CPU_BF16", "1")
    monkeypatch.delenv("TAGGER_AUTO_RUNTIME", raising=False)  # measure, as at default options
    monkeypatch.setenv("TAGGER_CACHE", str(tmp_path / "cache"))
    costs = {"torch bf16": 1.0}  # the measurement, made deterministic: the checked bf16 is the cheapest here
    monkeypatch.setattr(choice, "_measure_all", lambda b, pairs, *a: {f"{r} {p}": costs.get(f"{r} {p}", 9.0) for r, p in pairs})
    local, ray = tmp_path / "local", tmp_path / "ray"
    args = ("--catalog", str(demo.catalog), "--model", str(bundle), "--shard-size", "20", "--batch-size", "8")
    assert tag("--workers", "0", "--out", str(local), *args).exit_code == 0
    result = ray_tag("--out", str(ray), *args)
    assert result.exit_code == 0, result.output
    for out in (local, ray):
        assert summary(out)["this_process"]["runtime"]["precision"] == "bf16", summary(out)["this_process"]["runtime"]
    assert summary(ray)["this_process"]["runtime"]["name"] == summary(local)["this_process"]["runtime"]["name"] == "torch"
    assert_exactly_once(ray, comparable(local), len(demo_images(demo)), shards=3)


def test_on_one_machine_a_proven_export_spares_the_driver_building_the_network(demo, tiny_bundle, ray_address, tmp_path,
                                                                                 monkeypatch):
    """As for the local engine: a cached export that reproduces the bundle's reference outputs proves its weights,
    and the actors of a Ray on this machine run that very file, so the driver neither imports timm nor builds the
    network to check them (seconds of the run's start, on the cores Ray starts on); the tables are the same."""
    from tagger.model import export
    from tagger.model.bundle import ModelBundle

    monkeypatch.setenv("TAGGER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = ("--catalog", str(demo.catalog), "--model", tiny_bundle, "--shard-size", "20", "--batch-size", "8",
            "--runtime", "onnx")
    first = ray_tag("--out", str(tmp_path / "first"), *args)  # exports (and builds the network to check the file)
    assert first.exit_code == 0, first.output

    built, build = [], ModelBundle._build

    def counted(self):
        built.append(self.model_version)
        return build(self)

    monkeypatch.setattr(ModelBundle, "_build", counted)  # the driver's class only: the actors' are their own
    export._REFERENCE_CHECKED.clear()
    second = ray_tag("--out", str(tmp_path / "second"), *args)
    assert second.exit_code == 0, second.output
    assert built == [], "the driver built the PyTorch network although the cached export proves the weights"
    assert_exactly_once(tmp_path / "second", comparable(tmp_path / "first"), len(demo_images(demo)), shards=3)
    # A PyTorch runtime's actors build the network from the bundle: the driver still checks it, before the lease.
    assert ray_tag("--out", str(tmp_path / "torch"), *args[:-1], "torch").exit_code == 0 and built


def test_a_ray_the_job_started_stops_its_monitor_first_and_a_joined_one_is_left_alone(monkeypatch):
    """ray.shutdown stops the autoscaler monitor after the GCS, and the monitor then waits on the dead GCS for its
    whole grace period: a Ray this process started has its monitor killed before ray.shutdown; a cluster it joined
    (--ray-address / RAY_ADDRESS) has no processes of this one, and nothing but ray.shutdown is called."""
    import types

    import ray

    from tagger.tag.ray.cluster import Cluster

    events = []

    class Process:
        def poll(self):
            return None if "killed" not in events else -9

        def kill(self):
            events.append("killed")

        def wait(self, timeout=None):
            return -9

    node = types.SimpleNamespace(all_processes={"monitor": [types.SimpleNamespace(process=Process())]})
    monkeypatch.setattr(ray._private.worker, "_global_node", node)
    monkeypatch.setattr(ray, "shutdown", lambda: events.append("shutdown"))
    Cluster(address="local", owned=True, cpus=2, gpus=0, seconds=0, started=True).close()
    assert events == ["killed", "shutdown"]
    events.clear()
    Cluster(address="head:6379", owned=True, cpus=2, gpus=0, seconds=0, started=False).close()
    assert events == ["shutdown"]
    monkeypatch.setattr(ray._private.worker, "_global_node", None)  # no handle where Ray kept it: shutdown as before
    Cluster(address="local", owned=True, cpus=2, gpus=0, seconds=0, started=True).close()
    assert events == ["shutdown", "shutdown"]
