"""The tag job end to end through its CLI: outputs, schemas, exactly-once, re-runs, exit codes."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobs.cli import cli
from tagger.attributes import ATTRIBUTES
from tagger.tag.writers import ERRORS_SCHEMA, read_complete_partition, tags_schema

DATE = "2026-01-02"


def tag(*args: str, workers: int = 0):
    result = CliRunner().invoke(cli, ["tag", "--workers", str(workers), "--progress", "none", *args], catch_exceptions=False)
    return result


def read(out: str | Path, table: str, date: str = DATE) -> pl.DataFrame:
    return pl.from_arrow(read_complete_partition(f"{out}/{table}/run_date={date}"))


def write_manifest(path: Path, rows: list[tuple[str, str]], header=("product_id", "image")) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def catalog_rows(demo) -> list[tuple[str, str]]:
    with open(demo.catalog, newline="") as handle:
        return [(r["product_id"], r["image"]) for r in csv.DictReader(handle)]


def test_tags_the_demo_catalog_with_exact_schemas(demo, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    result = tag("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(out), "--run-date", DATE)
    assert result.exit_code == 0, result.output
    assert "succeeded" in result.output

    partition = out / "tags" / f"run_date={DATE}"
    assert (partition / "_SUCCESS").exists() and (out / "errors" / f"run_date={DATE}" / "_SUCCESS").exists()
    tags_table = pq.read_table(partition / "part-00000.parquet")
    assert tags_table.schema.equals(tags_schema(ATTRIBUTES), check_metadata=False)
    errors_table = pq.read_table(out / "errors" / f"run_date={DATE}" / "part-00000.parquet")
    assert errors_table.schema.equals(ERRORS_SCHEMA, check_metadata=False)

    tags, errors = read(out, "tags"), read(out, "errors")
    manifest = catalog_rows(demo)
    assert len(tags) + len(errors) == len(manifest)
    assert sorted(tags["product_id"].to_list() + errors["product_id"].to_list()) == sorted(r[0] for r in manifest)
    assert sorted(errors["error_type"].to_list()) == ["decode", "missing"]
    assert all(Path(demo.root, img).name in msg for img, msg in zip(errors["image"], errors["message"]))
    assert tags["model_version"].n_unique() == 1 and tags["run_id"].n_unique() == 1
    for name in ATTRIBUTES:
        assert tags[name].null_count() == 0
        assert tags[f"{name}_score"].is_between(0.0, 1.0).all()

    summary = json.loads((out / "_runs" / f"run_date={DATE}" / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["exit_code"] == 0
    assert summary["rows"] == len(manifest) and summary["tagged"] == len(tags) and summary["errors"] == 2
    assert summary["error_types"] == {"decode": 1, "missing": 1}
    assert summary["model_version"] == tags["model_version"][0]
    for key in ("manifest_s", "model_load_s", "tagging_s", "total_s"):
        assert key in summary["durations_s"]


def test_manifest_formats_give_the_same_tags(demo, tiny_bundle, tmp_path):
    rows = catalog_rows(demo)[:12]
    table = pa.table({"sku": [r[0] for r in rows], "url": [str(Path(demo.root, r[1])) for r in rows]})
    pq.write_table(table, tmp_path / "m.parquet")
    with gzip.open(tmp_path / "m.jsonl.gz", "wt") as handle:
        for sku, url in zip(table["sku"].to_pylist(), table["url"].to_pylist()):
            handle.write(json.dumps({"sku": sku, "url": url, "extra": 1}) + "\n")
    write_manifest(tmp_path / "m.csv", list(zip(table["sku"].to_pylist(), table["url"].to_pylist())), header=("sku", "url"))
    results = []
    for name in ("m.parquet", "m.jsonl.gz", "m.csv"):
        out = tmp_path / name.replace(".", "_")
        result = tag("--catalog", str(tmp_path / name), "--model", tiny_bundle, "--out", str(out), "--run-date", DATE,
                     "--id-column", "sku", "--image-column", "url")
        assert result.exit_code == 0, result.output
        results.append(read(out, "tags").sort("product_id").drop("run_id", "tagged_at"))
    assert results[0].equals(results[1]) and results[0].equals(results[2])


@pytest.mark.precision
def test_a_corrupt_image_mid_batch_changes_no_other_product(demo, tiny_bundle, tmp_path):
    rows = [r for r in catalog_rows(demo)[:-2]][:9]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(Path(demo.root, rows[0][1]).read_bytes()[:300])
    mixed = rows[:4] + [("bad-1", str(corrupt))] + rows[4:]
    images = [(pid, str(Path(demo.root, img))) for pid, img in mixed]
    out = tmp_path / "mixed"
    assert tag("--catalog", str(write_manifest(tmp_path / "mixed.csv", images)), "--model", tiny_bundle,
               "--out", str(out), "--run-date", DATE, "--batch-size", "10", "--max-error-rate", "0.5").exit_code == 0
    together = read(out, "tags").sort("product_id")
    errors = read(out, "errors")
    assert errors["product_id"].to_list() == ["bad-1"] and errors["error_type"].to_list() == ["decode"]
    assert "corrupt.jpg" in errors["message"][0]

    for pid, image in images:
        if pid == "bad-1":
            continue
        alone_out = tmp_path / f"alone-{pid}"
        manifest = write_manifest(tmp_path / f"alone-{pid}.csv", [(pid, image)])
        assert tag("--catalog", str(manifest), "--model", tiny_bundle, "--out", str(alone_out), "--run-date", DATE).exit_code == 0
        alone = read(alone_out, "tags")
        mine = together.filter(pl.col("product_id") == pid)
        for name in ATTRIBUTES:
            assert alone[name][0] == mine[name][0], (pid, name)
            # 1e-5: at auto the CPU runs ONNX Runtime fp32 (any CPU), where batch composition moves only last bits.
            assert alone[f"{name}_score"][0] == pytest.approx(mine[f"{name}_score"][0], abs=1e-5)


def test_rerunning_a_date_replaces_the_partition(demo, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    args = ("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(out), "--run-date", DATE, "--shard-size", "7")
    assert tag(*args).exit_code == 0
    first = read(out, "tags")
    assert tag(*args).exit_code == 0
    second = read(out, "tags")
    assert len(second) == len(first) and second["product_id"].n_unique() == len(second)
    assert second["run_id"].n_unique() == 1 and second["run_id"][0] != first["run_id"][0]
    files = sorted(p.name for p in (out / "tags" / f"run_date={DATE}").iterdir())
    shards = -(-len(catalog_rows(demo)) // 7)
    # One part per shard and _SUCCESS, no part of the first run left. The re-run's parts have names of their own
    # (part-NNNNN-<suffix>.parquet): the first run's stayed readable, listed by its _SUCCESS, until it committed.
    listed = json.loads((out / "tags" / f"run_date={DATE}" / "_SUCCESS").read_text())["parts"]
    assert files == sorted([*listed, "_SUCCESS"]) and len(listed) == shards
    assert not set(files) & {f"part-{i:05d}.parquet" for i in range(shards)}


def test_an_unfinished_run_resumes_from_the_first_unfinished_shard(demo, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    args = ("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(out), "--run-date", DATE, "--shard-size", "7")
    assert tag(*args).exit_code == 0
    complete = read(out, "tags").sort("product_id")
    # Make it look like a run that died after shard 1: no later markers, no _SUCCESS.
    state = out / "_runs" / f"run_date={DATE}"
    shards = -(-len(catalog_rows(demo)) // 7)
    for shard in range(2, shards):
        (state / "shards" / f"{shard:05d}.json").unlink()
    for table in ("tags", "errors"):
        (out / table / f"run_date={DATE}" / "_SUCCESS").unlink()
    result = tag(*args)
    assert result.exit_code == 0, result.output
    summary = json.loads((state / "summary.json").read_text())
    assert summary["this_process"]["shards_committed"] == shards - 2
    assert summary["this_process"]["images_read"] == len(catalog_rows(demo)) - 14
    resumed = read(out, "tags").sort("product_id")
    assert resumed.drop("tagged_at").equals(complete.drop("tagged_at"))


def test_missing_manifest_fails_before_model_work(tmp_path):
    result = tag("--catalog", str(tmp_path / "nope.csv"), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert "nope.csv: manifest not found" in result.output
    assert not (tmp_path / "o").exists()


def test_manifest_without_the_columns_lists_what_it_found(tiny_bundle, tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", [("1", "a.jpg")], header=("sku", "picture"))
    result = tag("--catalog", str(manifest), "--model", tiny_bundle, "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert "missing column(s) product_id, image" in result.output and "columns found: sku, picture" in result.output


def test_invalid_bundle_is_refused_with_the_reason(demo, tiny_bundle, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    meta = json.loads((broken / "model.json").read_text())
    meta["attributes"][0]["labels"].append("Extra")
    (broken / "model.json").write_text(json.dumps(meta))
    result = tag("--catalog", str(demo.catalog), "--model", str(broken), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "does not match its content" in result.output


def test_error_rate_over_the_limit_fails_without_success(demo, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    result = tag("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(out), "--run-date", DATE, "--max-error-rate", "0.01")
    assert result.exit_code == 3
    assert "over --max-error-rate" in result.output
    assert not (out / "tags" / f"run_date={DATE}" / "_SUCCESS").exists()
    summary = json.loads((out / "_runs" / f"run_date={DATE}" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["exit_code"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--run-date", "2026-13-01"], "expected YYYY-MM-DD"),
        (["--batch-size", "0"], "batch-size"),
        (["--shard", "3/2"], "shard index"),
        (["--device", "tpu"], "device"),
        (["--storage-option", "novalue"], "KEY=VALUE"),
    ],
)
def test_cli_rejects_bad_options(args, message, tmp_path):
    result = tag("--catalog", "x.csv", "--model", "m", "--out", str(tmp_path), *args)
    assert result.exit_code == 2 and message in result.output


def test_cuda_requested_without_a_gpu_is_said_out_loud(demo, tiny_bundle, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = tag("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(tmp_path / "o"), "--device", "cuda")
    assert result.exit_code == 1 and "no CUDA GPU is visible" in result.output


def test_worker_processes_give_the_same_tags(demo, tiny_bundle, tmp_path):
    outs = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        result = tag("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(out), "--run-date", DATE,
                     "--batch-size", "4", "--shard-size", "5", workers=workers)
        assert result.exit_code == 0, result.output
        outs.append(read(out, "tags").sort("product_id").drop("run_id", "tagged_at"))
    assert outs[0].equals(outs[1])


def test_log_progress_lines_when_not_interactive(demo, tiny_bundle, tmp_path):
    result = CliRunner().invoke(
        cli, ["tag", "--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(tmp_path / "o"),
              "--workers", "0", "--progress", "log"],
    )
    assert result.exit_code == 0, result.output
    assert "succeeded: run_date=" in result.output.splitlines()[-1]


def test_max_image_bytes_is_the_option_a_too_large_row_advises(demo, tiny_bundle, tmp_path):
    from tests.test_images import write_manifest

    images = [(pid, str(Path(demo.root, img))) for pid, img in catalog_rows(demo)[:6]]
    sizes = sorted(Path(image).stat().st_size for _, image in images)
    cap = sizes[2]  # the larger half is refused from its size, before it is read
    out = tmp_path / "capped"
    result = tag("--catalog", str(write_manifest(tmp_path / "c.csv", images)), "--model", tiny_bundle, "--out", str(out),
                 "--run-date", DATE, "--max-image-bytes", str(cap), "--max-error-rate", "1")
    assert result.exit_code == 0, result.output
    errors = read(out, "errors")
    assert errors.height == sum(size > cap for size in sizes) and read(out, "tags").height == 6 - errors.height
    assert set(errors["error_type"]) == {"too_large"} and all("--max-image-bytes" in m for m in errors["message"])
