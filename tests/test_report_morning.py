"""The morning after (issue 30): truth columns that add up, a verdict on every report, drift that knows its sample
size, agreement with the night before, the catalog's own label mix, the training split counted apart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from jobs.cli import cli

from .test_report import report_json, run, write_night

DATE, BEFORE = "2026-11-27", "2026-11-26"


def test_a_truth_column_adds_to_the_name_matches_and_the_page_says_what_was_compared(tmp_path):
    rows = [{"product_id": f"p{i}", "gender": "Men", "colour": "Black"} for i in range(6)]
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("product_id,image,gender,shade\n" + "".join(f"p{i},x.png,{'Men' if i < 4 else 'Women'},Black\n"
                                                                  for i in range(6)))
    write_night(tmp_path / "out", DATE, rows, catalog=str(catalog))
    out = str(tmp_path / "out")
    result = run("--out", out, "--run-date", DATE, "--truth-column", "colour=shade", "--gallery", "0")
    assert result.exit_code == 0, result.output
    body = report_json(tmp_path / "out", DATE)
    assert body["agreement"]["columns"] == {"gender": "gender", "colour": "shade"}
    assert body["attributes"]["gender"]["agreement"]["agree"] == 4 and body["attributes"]["colour"]["agreement"]["agree"] == 6
    page = (tmp_path / "out" / "_reports" / f"run_date={DATE}" / "report.html").read_text()
    assert "gender with column <code>gender</code> (a column named like the attribute)" in page
    assert "colour with column <code>shade</code> (--truth-column colour=shade)" in page

    # Without the mapping, colour is not compared, and the page says why.
    assert run("--out", out, "--run-date", DATE, "--gallery", "0").exit_code == 0
    body = report_json(tmp_path / "out", DATE)
    assert body["agreement"]["columns"] == {"gender": "gender"}
    assert "no column 'colour'" in body["agreement"]["not_compared"]["colour"]
    page = (tmp_path / "out" / "_reports" / f"run_date={DATE}" / "report.html").read_text()
    assert "Not compared: colour: the catalog has no column" in page.replace("&#x27;", "'")


def test_tag_report_takes_the_report_options(demo, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    args = ["tag", "--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(out), "--run-date", DATE,
            "--workers", "0", "--progress", "none", "--report", "--gallery", "0", "--max-review-share", "0"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, "the tag's exit code stands"
    assert report_json(out, DATE)["thresholds"] == {"max_review_share": 0.0}, "handed on to the report"
