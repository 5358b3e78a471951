"""`tagger predict --catalog --text-column`: a catalog's titles fused with its photos, as the tag job fuses them.

The generated text bundle and titled catalog of tests/test_text_tag.py (conftest): the labels, scores, inputs and
conflicts predict shows are the tag job's own for the same rows; a row without a title is the photos-only prediction;
a broken photo with a title is tagged from its text; the refusals (exit 2) come before anything is written.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from jobs.cli import cli
from tagger.tag.writers import read_complete_partition

DATE = "2026-01-02"


def predict(*args: str):
    return CliRunner().invoke(cli, ["predict", "--workers", "0", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def conflict_bundle(text_bundle, tmp_path_factory) -> str:
    """The text bundle with conflict levels every label clears: a photo and a title that disagree are a conflict."""
    folder = tmp_path_factory.mktemp("conflicts") / "bundle"
    shutil.copytree(text_bundle, folder)
    meta = json.loads((folder / "model.json").read_text())
    for spec in meta["text"]["fusion"]:
        spec["conflict"] = {"photos": 0.0, "text": 0.0}
    (folder / "model.json").write_text(json.dumps(meta))
    return str(folder)


def test_predict_fuses_titles_as_the_tag_job(conflict_bundle, titled_catalog, demo, tmp_path):
    catalog, rows = titled_catalog
    plain = predict("--catalog", str(catalog), "--model", conflict_bundle, "--out", str(tmp_path / "plain.html"))
    assert plain.exit_code == 0, plain.output
    result = predict("--catalog", str(catalog), "--model", conflict_bundle, "--out", str(tmp_path / "text.html"), "--text-column", "title")
    assert result.exit_code == 0, result.output
    assert "1 tagged from text" in result.output
    photos = pl.read_parquet(tmp_path / "plain.parquet")
    fused = pl.read_parquet(tmp_path / "text.parquet")
    assert "inputs" not in photos.columns and "conflict" not in photos.columns
    assert fused["product_id"].to_list() == [r["product_id"] for r in rows]
    attributes = [c for c in photos.columns if c + "_score" in photos.columns]

    # The tag job's rows for the same catalog and bundle: labels, scores, inputs and conflicts are predict's.
    out = tmp_path / "tagged"
    tagged = CliRunner().invoke(cli, ["tag", "--workers", "0", "--progress", "none", "--run-date", DATE, "--catalog", str(catalog),
                                      "--model", conflict_bundle, "--out", str(out), "--text-column", "title"], catch_exceptions=False)
    assert tagged.exit_code == 0, tagged.output
    tags = {r["product_id"]: r for r in pl.from_arrow(read_complete_partition(f"{out}/tags/run_date={DATE}")).iter_rows(named=True)}
    shown = {r["product_id"]: r for r in fused.iter_rows(named=True)}
    assert set(tags) == {i for i, r in shown.items() if r["error_type"] is None}
    for product_id, row in tags.items():
        mine = shown[product_id]
        assert mine["inputs"] == row["inputs"] and mine["conflict"] == row["conflict"], product_id
        for a in attributes:
            assert mine[a] == row[a] and mine[a + "_score"] == pytest.approx(row[a + "_score"], abs=1e-6), (product_id, a)
    assert any(r["conflict"] for r in shown.values())

    # The labels follow the titles: against the catalog's truth, the fused tags are right more often than the photos'.
    with open(demo.catalog_truth, newline="") as handle:
        truth = {r["product_id"]: r for r in csv.DictReader(handle)}
    both = [r for r in fused.iter_rows(named=True) if r["inputs"] == "both" and r["product_id"] in truth]
    by_id = {r["product_id"]: r for r in photos.iter_rows(named=True)}
    titled = ("gender", "baseColour", "articleType", "usage", "season")  # what a title says (conftest's title())
    right = sum(r[a] == truth[r["product_id"]][a] for r in both for a in titled)
    right_photos = sum(by_id[r["product_id"]][a] == truth[r["product_id"]][a] for r in both for a in titled)
    assert right > 2 * right_photos and right >= 0.8 * len(both) * len(titled), (right, right_photos)

    # No title: the photos-only prediction, exactly.
    first, alone = fused.row(0, named=True), photos.row(0, named=True)
    assert first["inputs"] == "photos" and first["conflict"] == []
    for a in attributes:
        assert first[a] == alone[a] and first[a + "_score"] == alone[a + "_score"] and first[a + "_top_k"] == alone[a + "_top_k"]
    # A broken photo with a title: tagged from its text; without one: an error row, as without --text-column.
    rescued, broken = fused.row(len(rows) - 2, named=True), fused.row(len(rows) - 1, named=True)
    assert photos.row(len(rows) - 2, named=True)["error_type"] is not None
    assert rescued["error_type"] is None and rescued["inputs"] == "text" and rescued["articleType"] == "Tshirts"
    assert broken["error_type"] is not None and broken["inputs"] is None and broken["articleType"] is None

    page = (tmp_path / "text.html").read_text()
    assert "from text (photo " in page and "from both" in page and "conflict " in page
    assert rows[5]["title"] in page
    png = predict("--catalog", str(catalog), "--model", conflict_bundle, "--out", str(tmp_path / "sheet.png"), "--text-column", "title")
    assert png.exit_code == 0 and (tmp_path / "sheet.png").stat().st_size > 0


def test_predict_text_refusals(text_bundle, tiny_bundle, titled_catalog, demo, tmp_path):
    catalog, _ = titled_catalog
    out = str(tmp_path / "g.html")
    cases = [
        (["--catalog", str(catalog), "--model", tiny_bundle, "--text-column", "title"], "has no text model"),
        (["--catalog", str(catalog), "--model", text_bundle, "--text-column", "subtitle"], "--text-column subtitle: no such column"),
        (["--catalog", str(catalog), "--model", text_bundle, "--text-column", "title", "--text-column", "product_id"],
         "reads 1 text field(s)"),
        ([str(Path(demo.catalog).parent), "--catalog", str(catalog), "--model", text_bundle], "not both"),
        ([str(Path(demo.catalog).parent), "--model", text_bundle, "--text-column", "title"], "give --catalog FILE"),
        (["--catalog", str(tmp_path / "none.csv"), "--model", text_bundle], "none.csv"),
    ]
    for args, message in cases:
        result = predict(*args, "--out", out)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert not list(tmp_path.iterdir()), args
