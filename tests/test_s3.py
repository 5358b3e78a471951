"""The tag job against a real S3 endpoint: moto's server on loopback, reached over HTTP by s3fs."""

from __future__ import annotations

import json

import polars as pl
import pytest
from click.testing import CliRunner

from jobs.cli import cli
from tagger.tag.writers import read_complete_partition

from .conftest import upload_tree

DATE = "2026-02-03"


def run(*args: str):
    return CliRunner().invoke(cli, ["tag", "--progress", "none", *args], catch_exceptions=False)


@pytest.mark.parametrize("workers", [0, 2])
def test_manifest_images_and_output_all_on_s3(demo, tiny_bundle, s3_bucket, workers):
    bucket, fs = s3_bucket
    upload_tree(fs, demo.root, f"{bucket}/catalog")
    out = f"s3://{bucket}/tagged"
    result = run("--catalog", f"s3://{bucket}/catalog/catalog.csv", "--model", tiny_bundle, "--out", out,
                 "--run-date", DATE, "--workers", str(workers), "--shard-size", "16")
    assert result.exit_code == 0, result.output

    tags = pl.from_arrow(read_complete_partition(f"{out}/tags/run_date={DATE}"))
    errors = pl.from_arrow(read_complete_partition(f"{out}/errors/run_date={DATE}"))
    with open(demo.catalog) as handle:
        expected = len(handle.readlines()) - 1
    assert len(tags) + len(errors) == expected
    assert sorted(errors["error_type"].to_list()) == ["decode", "missing"]
    assert any(f"s3://{bucket}/catalog/" in m for m in errors["message"])
    # On S3 the version of an image is its ETag (plus size): what tomorrow's incremental run compares.
    assert all(v.count("-") >= 1 and len(v) > 10 for v in tags["image_version"])
    fs.invalidate_cache()
    summary = json.loads(fs.cat_file(f"{bucket}/tagged/_runs/run_date={DATE}/summary.json"))
    assert summary["status"] == "succeeded"
    assert fs.exists(f"{bucket}/tagged/tags/run_date={DATE}/_SUCCESS")


def test_s3_manifest_with_absolute_image_urls_and_a_missing_key(demo, tiny_bundle, s3_bucket, tmp_path):
    bucket, fs = s3_bucket
    upload_tree(fs, demo.images_dir, f"{bucket}/img")
    ids = sorted(p.stem for p in demo.images_dir.glob("*.jpg"))[:5]
    lines = ["product_id,image"] + [f"{i},s3://{bucket}/img/{i}.jpg" for i in ids] + [f"ghost,s3://{bucket}/img/ghost.jpg"]
    fs.pipe_file(f"{bucket}/m.csv", ("\n".join(lines) + "\n").encode())
    out = tmp_path / "out"
    result = run("--catalog", f"s3://{bucket}/m.csv", "--model", tiny_bundle, "--out", str(out), "--run-date", DATE,
                 "--workers", "0", "--max-error-rate", "0.5")
    assert result.exit_code == 0, result.output
    errors = pl.from_arrow(read_complete_partition(f"{out}/errors/run_date={DATE}"))
    assert errors.select("product_id", "error_type").rows() == [("ghost", "missing")]
    assert f"s3://{bucket}/img/ghost.jpg" in errors["message"][0]


def test_missing_s3_manifest_is_an_input_error(s3_bucket, tiny_bundle, tmp_path):
    bucket, _ = s3_bucket
    result = run("--catalog", f"s3://{bucket}/nope.csv", "--model", tiny_bundle, "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and f"s3://{bucket}/nope.csv: manifest not found" in result.output


def test_a_rerun_on_s3_keeps_the_complete_night_until_it_commits(demo, tiny_bundle, s3_bucket):
    """No rename on S3: the re-run's parts land beside the night's under names of their own, and the old ones go
    only after the new _SUCCESS."""
    from tagger.tag.partition import Partition

    bucket, fs = s3_bucket
    out = f"s3://{bucket}/tagged"
    args = ("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", out, "--run-date", DATE, "--workers", "0",
            "--shard-size", "25")
    assert run(*args).exit_code == 0
    first = read_complete_partition(f"{out}/tags/run_date={DATE}").sort_by("product_id")
    summary = Partition(out, DATE).committed_state("summary.json")
    refused = run(*args, "--max-image-bytes", "100")
    assert refused.exit_code == 3 and f"(run {summary['run_id']}) is kept until a run commits" in refused.output, refused.output
    assert read_complete_partition(f"{out}/tags/run_date={DATE}").sort_by("product_id").equals(first)
    assert Partition(out, DATE).committed_state("summary.json") == summary
    assert run(*args).exit_code == 0
    fs.invalidate_cache()
    for table in ("tags", "errors"):
        listed = json.loads(fs.cat_file(f"{bucket}/tagged/{table}/run_date={DATE}/_SUCCESS"))["parts"]
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/tagged/{table}/run_date={DATE}"))
        assert names == sorted(["_SUCCESS", *listed]) and len(listed) == 2 and "part-00000.parquet" not in names, names
    assert not fs.exists(f"{bucket}/tagged/_runs/run_date={DATE}/committed/summary.json")
    again = read_complete_partition(f"{out}/tags/run_date={DATE}").sort_by("product_id")
    assert again.drop(["run_id", "tagged_at"]).equals(first.drop(["run_id", "tagged_at"]))
