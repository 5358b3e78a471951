"""``--since``: a nightly run reuses the tags of unchanged images and reads only new and changed ones.

Night 1 tags the catalog. Before night 2 one image is rewritten with other bytes, one product is added and
one removed. Night 2 with ``--since`` must reuse exactly the unchanged products (tags equal to a full run's),
tag the changed and the new one, drop the removed one, and say so in its summary.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from jobs.cli import cli
from tagger.tag import incremental
from tagger.attributes import ATTRIBUTES
from tagger.data.reader import read_image
from tagger.tag.writers import read_complete_partition

from .conftest import upload_tree

NIGHT1, NIGHT2, NIGHT3 = "2026-04-01", "2026-04-02", "2026-04-03"
PREDICTED = [*ATTRIBUTES, *(f"{a}_score" for a in ATTRIBUTES)]


def tag(*args: str, workers: int = 0):
    return CliRunner().invoke(cli, ["tag", "--workers", str(workers), "--progress", "none", *args], catch_exceptions=False)


def read(out, date: str, table: str = "tags") -> pl.DataFrame:
    return pl.from_arrow(read_complete_partition(f"{out}/{table}/run_date={date}"))


def summary(out, date: str) -> dict:
    return json.loads(Path(out, "_runs", f"run_date={date}", "summary.json").read_text())


def manifest_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return [[r["product_id"], r["image"]] for r in csv.DictReader(handle)]


def write_manifest(path: Path, rows) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["product_id", "image"])
        writer.writerows(rows)
    return path


class Catalog:
    """A private copy of the demo catalog that a test may change between nights."""

    def __init__(self, demo, root: Path):
        shutil.copytree(demo.root, root)
        self.root = root
        self.manifest = root / "catalog.csv"
        self.rows = manifest_rows(self.manifest)
        self.good = [r for r in self.rows if (root / r[1]).is_file() and (root / r[1]).stat().st_size > 1000]

    def night2_changes(self) -> dict[str, str]:
        """Rewrite one image with other bytes, add a product, remove one. Returns their ids."""
        changed, removed, donor = self.good[0], self.good[1], self.good[2]
        path = self.root / changed[1]
        before = path.stat()
        path.write_bytes((self.root / donor[1]).read_bytes())  # another product's photo: other bytes
        # Same size and same mtime would be indistinguishable from "unchanged" by design; make sure the
        # test exercises a real rewrite (different bytes) whatever the filesystem's timestamp granularity.
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        new_image = self.root / "catalog_images" / "new-product.jpg"
        new_image.write_bytes((self.root / donor[1]).read_bytes())
        rows = [r for r in self.rows if r[0] != removed[0]] + [["new-product", "catalog_images/new-product.jpg"]]
        write_manifest(self.manifest, rows)
        return {"changed": changed[0], "removed": removed[0], "new": "new-product"}


@pytest.fixture()
def catalog(demo, tmp_path):
    return Catalog(demo, tmp_path / "catalog")


def run(catalog: Catalog, bundle: str, out: Path, date: str, *extra: str):
    result = tag("--catalog", str(catalog.manifest), "--model", bundle, "--out", str(out), "--run-date", date, *extra)
    assert result.exit_code == 0, result.output
    return result


def test_night2_reuses_unchanged_and_tags_changed_new_products(catalog, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    run(catalog, tiny_bundle, out, NIGHT1, "--shard-size", "16")
    night1 = read(out, NIGHT1)
    ids = catalog.night2_changes()

    result = run(catalog, tiny_bundle, out, NIGHT2, "--shard-size", "16", "--since", str(out))
    night2, errors2 = read(out, NIGHT2), read(out, NIGHT2, "errors")
    facts = summary(out, NIGHT2)

    unchanged = set(night1["product_id"]) - {ids["changed"], ids["removed"]}
    reused = night2.filter(pl.col("run_id") == night1["run_id"][0])
    tagged = night2.filter(pl.col("run_id") == facts["run_id"])
    assert set(reused["product_id"]) == unchanged
    assert set(tagged["product_id"]) == {ids["changed"], ids["new"]}
    assert ids["removed"] not in set(night2["product_id"]) | set(errors2["product_id"])
    assert sorted(errors2["error_type"].to_list()) == ["decode", "missing"]  # bad rows are read again, never reused
    assert night2["product_id"].n_unique() == len(night2)

    assert facts["status"] == "succeeded" and facts["rows"] == len(catalog.rows)
    assert facts["reused"] == len(unchanged) and facts["tagged"] == 2 and facts["errors"] == 2
    assert facts["since"]["previous"] == str(out / "tags" / f"run_date={NIGHT1}")
    assert facts["since"]["candidates"] == len(unchanged) + 1  # the changed product is a candidate, not reused
    assert facts["this_process"]["images_read"] == 2 + 2  # changed + new + the two bad rows
    assert f"reused={len(unchanged)}" in result.output and "tagged=2" in result.output

    # Reused rows are night 1's rows verbatim: same tags, scores, versions, run_id and tagged_at.
    before = night1.filter(pl.col("product_id").is_in(list(unchanged))).sort("product_id")
    assert reused.sort("product_id").equals(before)
    # The changed image got a new version; the version of every row is the file's as it is now.
    changed_row = night2.filter(pl.col("product_id") == ids["changed"])
    old_version = night1.filter(pl.col("product_id") == ids["changed"])["image_version"][0]
    assert changed_row["image_version"][0] != old_version
    for pid, image, version in night2.select("product_id", "image", "image_version").iter_rows():
        assert version == read_image(str(catalog.root / image), None)[1], pid

    # And everything equals what a full run of tonight's catalog says.
    full = tmp_path / "full"
    run(catalog, tiny_bundle, full, NIGHT2, "--shard-size", "16")
    expected = read(full, NIGHT2).sort("product_id")
    got = night2.sort("product_id")
    assert got["product_id"].to_list() == expected["product_id"].to_list()
    assert got.select("image", "image_version", "model_version", *ATTRIBUTES).equals(
        expected.select("image", "image_version", "model_version", *ATTRIBUTES))
    for name in ATTRIBUTES:
        assert (got[f"{name}_score"] - expected[f"{name}_score"]).abs().max() < 1e-5


def test_a_third_night_chains_from_the_second(catalog, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    run(catalog, tiny_bundle, out, NIGHT1)
    run(catalog, tiny_bundle, out, NIGHT2, "--since", str(out))
    run(catalog, tiny_bundle, out, NIGHT3, "--since", str(out))
    facts = summary(out, NIGHT3)
    assert facts["since"]["previous"].endswith(f"run_date={NIGHT2}")
    assert facts["tagged"] == 0 and facts["reused"] == len(read(out, NIGHT1))
    # Carried over twice, still the run that computed them.
    assert read(out, NIGHT3).sort("product_id").equals(read(out, NIGHT1).sort("product_id"))


def test_a_partition_written_before_needs_review_existed_is_reused_and_gets_the_column(catalog, tiny_bundle, tmp_path):
    import pyarrow.parquet as pq

    from tagger.model.bundle import load_bundle, save_bundle

    # Thresholds at each attribute's median score, so that some rows are flagged and some are not.
    probe = tmp_path / "probe"
    run(catalog, tiny_bundle, probe, NIGHT1)
    # float32 values: the job compares float32 scores with float32 thresholds, the check below in Python floats.
    medians = {a: float(np.float32(read(probe, NIGHT1)[f"{a}_score"].median())) for a in ATTRIBUTES}
    tiny = load_bundle(tiny_bundle)
    bundle = str(tmp_path / "thresholded")
    save_bundle(tiny.build_net(), bundle, backbone=tiny.backbone, labels={a.name: a.labels for a in tiny.attributes},
                thresholds=medians)
    out = tmp_path / "out"
    run(catalog, bundle, out, NIGHT1)
    night1 = read(out, NIGHT1)
    for row in night1.iter_rows(named=True):
        assert row["needs_review"] == [a for a in ATTRIBUTES if row[f"{a}_score"] < medians[a]]
    assert 0 < night1.filter(pl.col("needs_review").list.len() > 0).height < len(night1)
    for part in (out / "tags" / f"run_date={NIGHT1}").glob("part-*.parquet"):  # as the releases before wrote it
        pq.write_table(pq.read_table(part).drop_columns(["needs_review", "images_used"]), part)
    run(catalog, bundle, out, NIGHT2, "--since", str(out))
    assert summary(out, NIGHT2)["reused"] == len(night1)
    assert set(read(out, NIGHT2)["images_used"]) == {1}, "a partition from before several photos: one photo each"
    assert read(out, NIGHT2).sort("product_id").select("product_id", "needs_review").equals(
        night1.sort("product_id").select("product_id", "needs_review")), "recomputed from the carried-over scores"


def test_another_model_version_reuses_nothing(catalog, tiny_bundle, tmp_path):
    import torch

    from tagger.model.bundle import load_bundle, save_bundle

    bundle = load_bundle(tiny_bundle)
    net = bundle.build_net()
    with torch.no_grad():
        net.heads["gender"].bias.add_(0.5)  # a retrained model, as far as model_version goes
    retrained = tmp_path / "retrained"
    save_bundle(net, str(retrained), backbone=bundle.backbone, labels={a.name: a.labels for a in bundle.attributes})
    assert load_bundle(str(retrained)).model_version != bundle.model_version

    out = tmp_path / "out"
    run(catalog, tiny_bundle, out, NIGHT1)
    run(catalog, str(retrained), out, NIGHT2, "--since", str(out))
    facts = summary(out, NIGHT2)
    assert facts["reused"] == 0 and facts["tagged"] == len(read(out, NIGHT1))
    assert "model_version" in facts["since"]["reason"]
    assert read(out, NIGHT2)["model_version"].unique().to_list() == [load_bundle(str(retrained)).model_version]


def test_since_takes_the_latest_complete_partition_before_the_run_date(catalog, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    run(catalog, tiny_bundle, out, NIGHT1)
    run(catalog, tiny_bundle, out, NIGHT2)
    (out / "tags" / f"run_date={NIGHT2}" / "_SUCCESS").unlink()  # night 2 failed: not a source
    run(catalog, tiny_bundle, out, NIGHT3, "--since", str(out))
    assert summary(out, NIGHT3)["since"]["previous"].endswith(f"run_date={NIGHT1}")

    # An explicit partition is taken as given, whatever its date; an output root only offers earlier dates.
    run(catalog, tiny_bundle, out, NIGHT2, "--since", str(out / "tags" / f"run_date={NIGHT3}"))
    assert summary(out, NIGHT2)["reused"] == len(read(out, NIGHT1))
    run(catalog, tiny_bundle, out, "2026-03-31", "--since", str(out))
    assert summary(out, "2026-03-31")["reused"] == 0 and "no complete partition" in summary(out, "2026-03-31")["since"]["reason"]


def test_unusable_since_is_refused_before_touching_the_partition(catalog, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    run(catalog, tiny_bundle, out, NIGHT1)
    run(catalog, tiny_bundle, out, NIGHT2)
    night2 = read(out, NIGHT2)
    base = ("--catalog", str(catalog.manifest), "--model", tiny_bundle, "--out", str(out), "--run-date", NIGHT2)

    itself = tag(*base, "--since", str(out / "tags" / f"run_date={NIGHT2}"))
    assert itself.exit_code == 2 and "the partition this run replaces" in itself.output
    (out / "tags" / f"run_date={NIGHT1}" / "_SUCCESS").unlink()
    incomplete = tag(*base, "--since", str(out / "tags" / f"run_date={NIGHT1}"))
    assert incomplete.exit_code == 2 and "incomplete partition is never reused" in incomplete.output
    wrong = tag(*base, "--since", str(out / "errors" / f"run_date={NIGHT1}"))
    assert wrong.exit_code == 2 and "tags partition" in wrong.output
    assert read(out, NIGHT2).equals(night2)  # untouched


def test_fanned_out_incremental_run_reuses_the_planned_rows(catalog, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    run(catalog, tiny_bundle, out, NIGHT1)
    ids = catalog.night2_changes()
    base = ("--shard-size", "7", "--since", str(out))
    run(catalog, tiny_bundle, out, NIGHT2, *base, "--plan-only")
    plan = json.loads((out / "_runs" / f"run_date={NIGHT2}" / "plan.json").read_text())
    assert plan["since"]["reused"] == len(catalog.good) - 2
    for task in (2, 0, 1):
        run(catalog, tiny_bundle, out, NIGHT2, *base, "--shard", f"{task}/3")
    facts = summary(out, NIGHT2)
    assert facts["status"] == "succeeded"
    assert facts["reused"] == len(catalog.good) - 2 and facts["tagged"] == 2
    night2 = read(out, NIGHT2)
    assert set(night2.filter(pl.col("run_id") == facts["run_id"])["product_id"]) == {ids["changed"], ids["new"]}


def test_a_resumed_incremental_run_keeps_its_reuse_plan(catalog, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    run(catalog, tiny_bundle, out, NIGHT1)
    catalog.night2_changes()
    args = ("--shard-size", "7", "--since", str(out))
    run(catalog, tiny_bundle, out, NIGHT2, *args)
    complete = read(out, NIGHT2).sort("product_id")
    state = out / "_runs" / f"run_date={NIGHT2}"
    for marker in sorted((state / "shards").glob("*.json"))[3:]:
        marker.unlink()
    for table in ("tags", "errors"):
        (out / table / f"run_date={NIGHT2}" / "_SUCCESS").unlink()
    run(catalog, tiny_bundle, out, NIGHT2, *args)
    resumed = read(out, NIGHT2).sort("product_id")
    scores = [f"{a}_score" for a in ATTRIBUTES]
    assert resumed.drop("tagged_at", *scores).equals(complete.drop("tagged_at", *scores))
    for name in scores:  # a batch of other images around it may move a score by a float rounding, no more
        assert (resumed[name] - complete[name]).abs().max() < 1e-5
    assert summary(out, NIGHT2)["reused"] == len(catalog.good) - 2


@pytest.mark.parametrize("pool", [False, True], ids=["serial", "thread-pool"])
def test_current_versions_match_what_the_reader_reports(catalog, tmp_path, monkeypatch, pool):
    if pool:  # as on NFS: every stat slow enough to go through the thread pool
        monkeypatch.setattr(incremental, "PROBE_STATS", 1)
        monkeypatch.setattr(incremental, "FAST_STAT_S", 0.0)
    paths = [str(catalog.root / r[1]) for r in catalog.good[:5]]
    missing = str(catalog.root / "catalog_images" / "nope.jpg")
    folder = str(catalog.root / "catalog_images")
    unreadable = "http://127.0.0.1:9/x.jpg"  # never requested: not a scheme the reader reads
    versions = incremental.current_versions(__import__("pyarrow").array([*paths, missing, folder, "file://" + paths[0], unreadable]))
    assert versions.to_pylist() == [read_image(p, None)[1] for p in paths] + [None, None, read_image(paths[0], None)[1], None]


@pytest.mark.parametrize("listing", [True, False], ids=["list-per-folder", "head-per-object"])
def test_incremental_on_s3(demo, tiny_bundle, s3_bucket, tmp_path, monkeypatch, listing):
    import pyarrow as pa

    bucket, fs = s3_bucket
    monkeypatch.setattr(incremental, "LIST_MIN_OBJECTS", 1 if listing else 10**9)
    upload_tree(fs, demo.root, f"{bucket}/catalog")
    rows = manifest_rows(demo.catalog)
    good = [r for r in rows if fs.exists(f"{bucket}/catalog/{r[1]}") and fs.size(f"{bucket}/catalog/{r[1]}") > 1000]
    catalog_url, out = f"s3://{bucket}/catalog/catalog.csv", f"s3://{bucket}/tagged"
    args = ("--catalog", catalog_url, "--model", tiny_bundle, "--out", out)
    assert tag(*args, "--run-date", NIGHT1).exit_code == 0

    # The current versions, found by listing or HEADs, are what a GET reports.
    urls = [f"s3://{bucket}/catalog/{r[1]}" for r in good[:4]] + [f"s3://{bucket}/catalog/catalog_images/nope.jpg"]
    versions = incremental.current_versions(pa.array(urls))
    assert versions.to_pylist() == [read_image(u, None)[1] for u in urls[:4]] + [None]

    changed = good[0]
    fs.pipe_file(f"{bucket}/catalog/{changed[1]}", fs.cat_file(f"{bucket}/catalog/{good[1][1]}"))  # new bytes, new ETag
    fs.invalidate_cache()
    result = tag(*args, "--run-date", NIGHT2, "--since", out)
    assert result.exit_code == 0, result.output
    facts = json.loads(fs.cat_file(f"{bucket}/tagged/_runs/run_date={NIGHT2}/summary.json"))
    assert facts["reused"] == len(good) - 1 and facts["tagged"] == 1
    night2 = pl.from_arrow(read_complete_partition(f"{out}/tags/run_date={NIGHT2}"))
    assert night2.filter(pl.col("run_id") == facts["run_id"])["product_id"].to_list() == [changed[0]]


def test_summary_splits_the_read_products_and_counts_those_that_left(catalog, tiny_bundle, tmp_path):
    """Night 2 reads a new product, a changed one and night 1's two error rows again; one product left."""
    out = tmp_path / "out"
    run(catalog, tiny_bundle, out, NIGHT1)
    catalog.night2_changes()
    result = run(catalog, tiny_bundle, out, NIGHT2, "--since", str(out))
    since = summary(out, NIGHT2)["since"]
    assert (since["new"], since["changed"], since["retried"], since["left"]) == (1, 1, 2, 1), since
    assert since["in_previous"] == since["reused"] + since["changed"]
    assert "new=1 changed=1 retried=2 left=1" in result.output
