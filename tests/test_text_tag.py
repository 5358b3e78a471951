"""`tagger tag --text-column`: a catalog's titles beside its photos, through the tag job's CLI.

A generated catalog (drawn photos, 2 broken) with a title column: rows with both, a row without a title (tagged
from its photos exactly as without --text-column), a broken photo with a title (tagged from its text), a broken
photo without one (an error row, as ever), non-ASCII and very long titles, and another product's title.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobs.cli import cli
from tagger.attributes import ATTRIBUTES
from tagger.tag.writers import read_complete_partition, tags_schema

DATE = "2026-01-02"


def tag(*args: str):
    return CliRunner().invoke(cli, ["tag", "--workers", "0", "--progress", "none", "--run-date", DATE, *args], catch_exceptions=False)


def read(out: Path, table: str) -> pl.DataFrame:
    return pl.from_arrow(read_complete_partition(f"{out}/{table}/run_date={DATE}"))


def test_tag_with_titles(text_bundle, titled_catalog, tmp_path):
    catalog, rows = titled_catalog
    plain, text = tmp_path / "plain", tmp_path / "text"
    assert tag("--catalog", str(catalog), "--model", text_bundle, "--out", str(plain), "--max-error-rate", "1").exit_code == 0
    result = tag("--catalog", str(catalog), "--model", text_bundle, "--out", str(text), "--text-column", "title")
    assert result.exit_code == 0, result.output

    # Without --text-column: today's schema, whatever the bundle carries.
    assert pq.read_table(plain / "tags" / f"run_date={DATE}" / "part-00000.parquet").schema.equals(tags_schema(ATTRIBUTES), check_metadata=False)
    assert pq.read_table(text / "tags" / f"run_date={DATE}" / "part-00000.parquet").schema.equals(
        tags_schema(ATTRIBUTES, text=True), check_metadata=False)

    photos, fused = read(plain, "tags"), read(text, "tags")
    by_id = {r["product_id"]: r for r in fused.iter_rows(named=True)}
    ids = [r["product_id"] for r in rows]
    assert by_id[ids[0]]["inputs"] == "photos"
    assert by_id[ids[-2]]["inputs"] == "text" and by_id[ids[-2]]["images_used"] == 0 and by_id[ids[-2]]["image_version"] == ""
    assert by_id[ids[-2]]["baseColour"] == "Black" and by_id[ids[-2]]["articleType"] == "Tshirts"
    assert ids[-1] not in by_id and read(text, "errors")["product_id"].to_list() == [ids[-1]]
    assert {by_id[i]["inputs"] for i in ids[1:-2]} == {"both"}
    assert fused.height == photos.height + 1

    # A row without a title: exactly the photos-only run's tags and scores.
    plain_row = photos.filter(pl.col("product_id") == ids[0]).row(0, named=True)
    for name in ATTRIBUTES:
        assert by_id[ids[0]][name] == plain_row[name] and by_id[ids[0]][f"{name}_score"] == plain_row[f"{name}_score"]
    assert by_id[ids[0]]["needs_review"] == plain_row["needs_review"]

    # The titles decide here (the tiny bundle's photos know nothing): the tags follow them, long and non-ASCII ones too.
    with open(Path(catalog).parent / "catalog_truth.csv", newline="") as handle:
        truth = {r["product_id"]: r for r in csv.DictReader(handle)}
    for i in (1, 2, 5, 6):
        assert by_id[ids[i]]["baseColour"] == truth[ids[i]]["baseColour"], i
    assert by_id[ids[3]]["baseColour"] == truth[ids[4]]["baseColour"]  # the borrowed title's colour
    for row in fused.iter_rows(named=True):
        assert {c["attribute"] for c in row["conflict"]} <= set(row["needs_review"])

    summary = json.loads((text / "_runs" / f"run_date={DATE}" / "summary.json").read_text())
    facts = summary["this_process"]["text"]
    assert facts["rows_by_inputs"] == {"photos": 1, "text": 1, "both": len(rows) - 3} and facts["columns"] == ["title"]


def test_conflict_flags_a_borrowed_title(text_bundle, titled_catalog, tmp_path):
    """With conflict levels every label clears, a photo and a title that disagree are a conflict and go to review."""
    folder = tmp_path / "bundle"
    shutil.copytree(text_bundle, folder)
    meta = json.loads((folder / "model.json").read_text())
    for spec in meta["text"]["fusion"]:
        spec["conflict"] = {"photos": 0.0, "text": 0.0}
    (folder / "model.json").write_text(json.dumps(meta))
    catalog, rows = titled_catalog
    out = tmp_path / "out"
    assert tag("--catalog", str(catalog), "--model", str(folder), "--out", str(out), "--text-column", "title").exit_code == 0
    flagged = read(out, "tags").filter(pl.col("inputs") == "both")
    assert (flagged["conflict"].list.len() > 0).any()
    for row in flagged.iter_rows(named=True):
        for c in row["conflict"]:
            assert c["photos"] != c["text"] and 0 <= c["photos_score"] <= 1 and 0 <= c["text_score"] <= 1
        assert {c["attribute"] for c in row["conflict"]} <= set(row["needs_review"])
    assert (read(out, "tags").filter(pl.col("inputs") != "both")["conflict"].list.len() == 0).all()

    # The morning report counts them and shows the most confident, with the product's title and both labels.
    result = CliRunner().invoke(cli, ["report", "--out", str(out), "--run-date", DATE], catch_exceptions=False)
    assert result.exit_code in (0, 6), result.output
    folder = out / "_reports" / f"run_date={DATE}"
    report = json.loads((folder / "report.json").read_text())
    conflicts = report["conflicts"]
    assert conflicts["rows"] == int((flagged["conflict"].list.len() > 0).sum()) and conflicts["tagged_with_text"] == flagged.height + 1
    top = conflicts["top"][0]
    assert top["text"] == next(r["title"] for r in rows if r["product_id"] == top["product_id"]).strip()
    assert "src" not in top and top["conflicts"][0]["photos"] != top["conflicts"][0]["text"]
    page = (folder / "report.html").read_text()
    assert "Photos and text disagree" in page and f"{conflicts['rows']:,} of the" in page


def test_since_with_titles_reuses_a_row_only_when_its_photo_and_its_title_are_unchanged(text_bundle, titled_catalog, tmp_path):
    """--since with --text-column: an unchanged product keeps last night's fused tags (and their review); a changed title is
    tagged again; a night of photos alone never takes fused tags, nor the other way round."""
    catalog, rows = titled_catalog
    out = tmp_path / "out"
    first = tag("--catalog", str(catalog), "--model", text_bundle, "--out", str(out), "--text-column", "title", "--since", str(out))
    assert first.exit_code == 0, first.output
    night1 = {r["product_id"]: r for r in read(out, "tags").iter_rows(named=True)}
    assert all(len(r["text_version"]) == 16 for r in night1.values())

    changed = [dict(r) for r in rows]
    changed[5]["title"] = "Acme Women Red Tshirts Casual Summer"
    tonight = Path(catalog).parent / "catalog_tonight.csv"  # beside it: the image cells are relative to the catalog
    with open(tonight, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(changed[0]))
        writer.writeheader()
        writer.writerows(changed)
    night2_date = "2026-01-03"
    result = CliRunner().invoke(cli, ["tag", "--workers", "0", "--progress", "none", "--run-date", night2_date, "--catalog", str(tonight),
                                      "--model", text_bundle, "--out", str(out), "--text-column", "title", "--since", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    night2 = {r["product_id"]: r for r in pl.from_arrow(read_complete_partition(f"{out}/tags/run_date={night2_date}")).iter_rows(named=True)}
    run1 = next(iter(night1.values()))["run_id"]
    again = {i for i, r in night2.items() if r["run_id"] != run1}
    # The changed title, and the product tagged from its title alone (no image_version to compare), are read again.
    assert again == {changed[5]["product_id"], changed[-2]["product_id"]}
    assert night2[changed[5]["product_id"]]["text_version"] != night1[changed[5]["product_id"]]["text_version"]
    for i in set(night2) - again:  # carried over verbatim, review as the night that tagged them computed it
        for column in ("baseColour", "baseColour_score", "inputs", "conflict", "needs_review", "text_version", "tagged_at"):
            assert night2[i][column] == night1[i][column], (i, column)
    summary = json.loads((out / "_runs" / f"run_date={night2_date}" / "summary.json").read_text())
    assert summary["since"]["reused"] == len(night2) - 2

    # Photos alone tonight: last night's fused tags are not theirs to keep.
    third = CliRunner().invoke(cli, ["tag", "--workers", "0", "--progress", "none", "--run-date", "2026-01-04", "--catalog", str(tonight),
                                     "--model", text_bundle, "--out", str(out), "--since", str(out), "--max-error-rate", "1"],
                               catch_exceptions=False)
    assert third.exit_code == 0, third.output
    summary = json.loads((out / "_runs" / "run_date=2026-01-04" / "summary.json").read_text())
    assert summary["since"]["reused"] == 0 and "photos alone" in summary["since"]["reason"]


def test_text_column_refusals(text_bundle, tiny_bundle, titled_catalog, tmp_path):
    catalog, _ = titled_catalog
    result = tag("--catalog", str(catalog), "--model", tiny_bundle, "--out", str(tmp_path / "a"), "--text-column", "title")
    assert result.exit_code == 2 and "has no text model" in result.output
    result = tag("--catalog", str(catalog), "--model", text_bundle, "--out", str(tmp_path / "b"), "--text-column", "blurb")
    assert result.exit_code == 2 and "--text-column blurb" in result.output
    result = tag("--catalog", str(catalog), "--model", text_bundle, "--out", str(tmp_path / "c"), "--text-column", "title",
                 "--text-column", "image")
    assert result.exit_code == 2 and "reads 1 text field" in result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c" / "tags").exists()


def test_evaluate_by_input(text_bundle, demo, tmp_path):
    """evaluate --text-column: photos alone, text alone and both on the same rows, beside the usual figures."""
    result = CliRunner().invoke(cli, ["evaluate", "--model", text_bundle, "--data", str(demo.root), "--split", "all", "--workers", "0",
                                      "--no-plots", "--out", str(tmp_path / "eval"), "--text-column", "productDisplayName"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "by input, same rows (text: productDisplayName" in result.output
    line = next(x for x in result.output.splitlines() if x.startswith("baseColour") and x.count("%") == 3)
    photos, text, both = (float(v) for v in line.replace("%", "").split()[2:5])
    assert text > 90 and both >= text  # the drawn products' titles name their colour; these photos know nothing
    bad = CliRunner().invoke(cli, ["evaluate", "--model", text_bundle, "--data", str(demo.root), "--split", "all", "--workers", "0",
                                   "--no-plots", "--out", str(tmp_path / "eval2"), "--text-column", "blurb"])
    assert bad.exit_code == 2 and "--text-column blurb" in bad.output


def test_retrain_trains_the_text_model_and_fusion_in_one_command(tmp_path):
    """retrain --text-column productDisplayName on a Kaggle folder (one photo that does not decode): the bundle reads
    titles, its image part is what retrain alone writes, and the fused test figures are recorded."""
    import torch

    from tagger.demo.drawn import make_demo_dataset
    from tagger.model.bundle import load_bundle
    from tagger.model.text import read_text_part
    from tagger.training import RetrainConfig, retrain

    demo = make_demo_dataset(tmp_path / "kaggle", n_train=150, n_catalog=0, n_bad=0, image_size=(48, 64))
    lines = demo.styles_csv.read_text(encoding="utf-8").splitlines()
    first = lines[1].split(",")
    demo.styles_csv.write_text("\n".join(lines + [",".join(["900003", *first[1:10]])]) + "\n", encoding="utf-8")
    (demo.images_dir / "900003.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "bundle"
        bundle = retrain(RetrainConfig(data=str(demo.root), out=str(out), backbone="test_efficientnet", pretrained=False, input_size=32,
                                       batch_size=32, max_epochs=1, lr=5e-3, progress=False, threads=1, workers=0,
                                       log_dir=str(tmp_path / "logs"), text_columns=["productDisplayName"]))
    finally:
        torch.set_num_threads(threads)
    part = read_text_part(load_bundle(str(out)))
    assert part is not None and part.fields == ("productDisplayName",)
    assert bundle.model_version == load_bundle(str(out)).model_version
    test = json.loads((out / "model.json").read_text())["text"]["metrics"]["test"]
    assert set(test) == set(ATTRIBUTES) and test["baseColour"]["text"] > 0.8  # the generated titles name the colour
    probs, _ = part.model.probabilities([part.model.featurizer.normalise("Acme Men Red Tshirts")])
    labels = {a.name: a.labels for a in bundle.attributes}
    assert labels["baseColour"][probs["baseColour"][0].argmax()] == "Red"


@pytest.mark.slow
def test_the_ray_engine_writes_the_local_engines_tables_with_text(text_bundle, titled_catalog, tmp_path):
    """--engine ray --text-column: the same rows, inputs, conflicts and review lists as the local engine (scores within
    the last bits of the batch an image falls in)."""
    pytest.importorskip("ray", reason="the ray extra (pip install '.[ray]') is not installed")
    import ray

    catalog, _ = titled_catalog
    folder = tmp_path / "bundle"
    shutil.copytree(text_bundle, folder)
    meta = json.loads((folder / "model.json").read_text())
    for spec in meta["text"]["fusion"]:
        spec["conflict"] = {"photos": 0.0, "text": 0.0}  # conflicts on many rows, to compare them too
    (folder / "model.json").write_text(json.dumps(meta))
    args = ("--catalog", str(catalog), "--model", str(folder), "--text-column", "title", "--shard-size", "20", "--batch-size", "8")
    assert tag("--out", str(tmp_path / "local"), *args).exit_code == 0
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        result = CliRunner().invoke(cli, ["tag", "--progress", "none", "--run-date", DATE, "--engine", "ray", "--out",
                                          str(tmp_path / "ray"), *args], catch_exceptions=False)
    finally:
        ray.shutdown()
    assert result.exit_code == 0, result.output
    scores = [f"{a}_score" for a in ATTRIBUTES]
    local, on_ray = (read(tmp_path / name, "tags").drop("run_id", "tagged_at", "conflict").sort("product_id") for name in ("local", "ray"))
    assert on_ray.drop(scores).equals(local.drop(scores))
    for column in scores:
        assert np.allclose(on_ray[column].to_numpy(), local[column].to_numpy(), atol=1e-5), column
    conflicts = [read(tmp_path / name, "tags").sort("product_id")["conflict"].to_list() for name in ("local", "ray")]
    assert [[c["attribute"] for c in row] for row in conflicts[0]] == [[c["attribute"] for c in row] for row in conflicts[1]]
    assert read(tmp_path / "ray", "errors")["product_id"].to_list() == read(tmp_path / "local", "errors")["product_id"].to_list()
    assert json.loads((tmp_path / "ray" / "_runs" / f"run_date={DATE}" / "summary.json").read_text())["this_process"]["text"]["rows_by_inputs"] \
        == json.loads((tmp_path / "local" / "_runs" / f"run_date={DATE}" / "summary.json").read_text())["this_process"]["text"]["rows_by_inputs"]


def test_a_row_without_a_photo_but_with_a_title_is_tagged_from_it(text_bundle, demo, tmp_path):
    """An empty image cell is an invalid_row without text; with a usable title it is tagged from the title."""
    catalog = tmp_path / "catalog.csv"
    with open(demo.catalog, newline="") as handle:
        first = next(csv.DictReader(handle))
    with open(catalog, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["product_id", "image", "title"])
        writer.writerow([first["product_id"], str(Path(demo.catalog).parent / first["image"]), ""])
        writer.writerow(["no-photo", "", "Acme Women Red Tops Casual Summer"])
        writer.writerow(["nothing", "", ""])
    out = tmp_path / "out"
    result = tag("--catalog", str(catalog), "--model", text_bundle, "--out", str(out), "--text-column", "title", "--max-error-rate", "1")
    assert result.exit_code == 0, result.output
    tags = {r["product_id"]: r for r in read(out, "tags").iter_rows(named=True)}
    assert tags["no-photo"]["inputs"] == "text" and tags["no-photo"]["baseColour"] == "Red" and tags["no-photo"]["images_used"] == 0
    assert tags[first["product_id"]]["inputs"] == "photos"
    errors = read(out, "errors")
    assert errors["product_id"].to_list() == ["nothing"] and errors["error_type"].to_list() == ["invalid_row"]
    # Without --text-column both rows without a photo are errors, as ever.
    plain = tmp_path / "plain"
    assert tag("--catalog", str(catalog), "--model", text_bundle, "--out", str(plain), "--max-error-rate", "1").exit_code == 0
    assert sorted(read(plain, "errors")["product_id"].to_list()) == ["no-photo", "nothing"]
