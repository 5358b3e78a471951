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


# -- drift that knows its sample size --------------------------------------------------------------------------
def catalog_mix(seed: int = 0) -> tuple[list[str], list[str], np.ndarray]:
    """A generated catalog's article types (80, Zipf-like shares, as a shop's) with their master category."""
    rng = np.random.default_rng(seed)
    articles = [f"type{i:02d}" for i in range(80)]
    masters = ["Footwear" if i % 5 == 0 else ("Apparel" if i % 5 < 4 else "Accessories") for i in range(80)]
    shares = 1 / np.arange(1, 81) ** 0.9
    return articles, masters, shares / shares.sum()


def night_rows(n: int, seed: int, *, footwear_only: bool = False) -> list[dict]:
    articles, masters, shares = catalog_mix()
    if footwear_only:
        shares = np.where(np.array(masters) == "Footwear", shares, 0.0)
        shares = shares / shares.sum()
    picks = np.random.default_rng(seed).choice(80, size=n, p=shares)
    return [{"product_id": f"n{seed}-{i}", "articleType": articles[k], "masterCategory": masters[k]} for i, k in enumerate(picks)]


@pytest.mark.parametrize("rows", [300, 20_000])
def test_two_random_nights_of_one_catalog_are_quiet_and_a_footwear_only_night_is_loud(tmp_path, rows):
    attributes = ["masterCategory", "articleType"]
    out = tmp_path / "out"
    write_night(out, BEFORE, night_rows(rows, 1), attributes=attributes)
    write_night(out, DATE, night_rows(rows, 2), attributes=attributes)
    quiet = run("--out", str(out), "--run-date", DATE, "--max-drift", "0.02", "--max-psi", "0.01", "--gallery", "0")
    assert quiet.exit_code == 0, quiet.output
    body = report_json(out, DATE)
    for a in attributes:
        d = body["attributes"][a]["drift"]
        assert not d["beyond_noise"] and d["js_distance"] <= d["js_noise_floor"], (a, d)
    if rows == 300:  # the distance stays on the page: at 300 rows of 80 types it is well above 0.2
        assert body["attributes"]["articleType"]["drift"]["js_distance"] > 0.2

    write_night(out, "2026-11-28", night_rows(max(60, rows // 10), 3, footwear_only=True), attributes=attributes)
    loud = run("--out", str(out), "--run-date", "2026-11-28", "--max-drift", "0.1", "--gallery", "0")
    assert loud.exit_code == 6, loud.output
    assert "masterCategory label mix drifted" in loud.output and "articleType label mix drifted" in loud.output
    d = report_json(out, "2026-11-28")["attributes"]["masterCategory"]["drift"]
    assert d["beyond_noise"] and d["p_value"] < 0.001


# -- a verdict on every report ------------------------------------------------------------------------------------
def bundle_with_metrics(folder: Path, train_ids: list[str]) -> str:
    """A bundle's model.json as training writes it (thresholds, validation coverage, test accuracy) and its
    split.parquet: all the report reads of a bundle."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    meta = {"attributes": [{"name": "gender", "labels": ["Men", "Women"], "threshold": 0.5},
                           {"name": "colour", "labels": ["Black", "Grey"], "threshold": 0.8}],
            "training": {"split": {"file": "split.parquet"},
                         "thresholds": {"val_coverage": {"gender": 1.0, "colour": 0.3}},
                         "metrics": {"val": {"gender": {"n": 900}, "colour": {"n": 900}},
                                     "test": {"gender": {"accuracy": 0.92, "n": 900}, "colour": {"accuracy": 0.7, "n": 900}}}}}
    (folder / "model.json").write_text(json.dumps(meta))
    pq.write_table(pa.table({"id": train_ids + ["v1"], "split": ["train"] * len(train_ids) + ["val"]}), folder / "split.parquet")
    return str(folder)


def verdict_night(out: Path, date: str, model: str, catalog: Path, n: int, *, colour_review: float, seed: int) -> None:
    from tagger.tag.partition import Partition

    rng = np.random.default_rng(seed)
    rows = [{"product_id": f"p{i}", "gender": "Men", "colour": "Black",
             "needs_review": ["colour"] if rng.random() < colour_review else []} for i in range(n)]
    write_night(out, date, rows, catalog=str(catalog))
    partition = Partition(str(out), date)
    plan = partition.read_plan()
    partition.write_plan({**plan, "model": model})


def test_every_report_has_a_verdict_from_the_bundle_and_the_night_before(tmp_path):
    n = 400
    # Products p0-p99 are in the training split and agree on gender; the new ones agree 92 % as the test split did.
    model = bundle_with_metrics(tmp_path / "bundle", [f"p{i}" for i in range(100)])
    catalog = tmp_path / "catalog.csv"
    rng = np.random.default_rng(0)
    genders = ["Men" if i < 100 or rng.random() < 0.92 else "Women" for i in range(n)]
    catalog.write_text("product_id,image,gender\n" + "".join(f"p{i},x.png,{g}\n" for i, g in enumerate(genders)))
    out = tmp_path / "out"
    verdict_night(out, BEFORE, model, catalog, n, colour_review=0.7, seed=1)
    verdict_night(out, DATE, model, catalog, n, colour_review=0.7, seed=2)
    assert run("--out", str(out), "--run-date", BEFORE, "--gallery", "0").exit_code == 0
    result = run("--out", str(out), "--run-date", DATE, "--gallery", "0")
    assert result.exit_code == 0, result.output
    assert "verdict OK" in result.output, result.output
    body = report_json(out, DATE)
    checks = {c["check"]: c for c in body["verdict"]["checks"]}
    assert body["verdict"]["status"] == "ok"
    assert checks["colour review share"]["expected"].startswith("70.0 %") and checks["colour review share"]["status"] == "ok"
    gender = body["attributes"]["gender"]["agreement"]
    assert gender["labelled_in_training_split"] == 100 and gender["accuracy_in_training_split"] == 1.0
    assert gender["labelled_new"] == 300 and gender["accuracy_new"] == pytest.approx(genders[100:].count("Men") / 300)
    assert checks["gender agreement"]["value"] == gender["accuracy_new"], "the new products, against the test split"
    assert body["attributes"]["gender"]["previous_agreement"]["accuracy"] == gender["accuracy"]
    assert "gender agreement vs the night before" in checks
    page = (out / "_reports" / f"run_date={DATE}" / "report.html").read_text()
    assert page.index('id="verdict"') < page.index("<h2>Counts</h2>") and "Verdict: OK" in page

    # The colour export breaks: nearly every colour tag goes to review. Broken, said at the top; no exit 6
    # without an explicit threshold, which overrides the derived expectation.
    verdict_night(out, "2026-11-28", model, catalog, n, colour_review=0.99, seed=3)
    broken = run("--out", str(out), "--run-date", "2026-11-28", "--gallery", "0")
    assert broken.exit_code == 0 and "verdict BROKEN: colour review share 99" in broken.output, broken.output
    assert report_json(out, "2026-11-28")["verdict"]["status"] == "broken"
    lenient = run("--out", str(out), "--run-date", "2026-11-28", "--gallery", "0", "--max-review-share", "1")
    checks = {c["check"]: c for c in report_json(out, "2026-11-28")["verdict"]["checks"]}
    assert lenient.exit_code == 0 and checks["colour review share"]["status"] == "ok"
    assert checks["colour review share"]["why"] == "explicit threshold"


def test_the_catalogs_own_label_mix_moving_is_reported(tmp_path):
    out = tmp_path / "out"
    for date, grey, seed in ((BEFORE, 0.08, 1), (DATE, 0.20, 2)):
        rng = np.random.default_rng(seed)
        catalog = tmp_path / f"catalog-{date}.csv"
        colours = ["Grey" if rng.random() < grey else "Black" for _ in range(2000)]
        catalog.write_text("product_id,image,colour\n" + "".join(f"p{i},x.png,{c}\n" for i, c in enumerate(colours)))
        write_night(out, date, [{"product_id": f"p{i}", "gender": "Men", "colour": "Black"} for i in range(2000)],
                    catalog=str(catalog))
        assert run("--out", str(out), "--run-date", date, "--gallery", "0").exit_code == 0
    body = report_json(out, DATE)
    moved = body["attributes"]["colour"]["catalog_drift"]
    assert moved["beyond_noise"] and moved["movers"][0]["label"] in ("Grey", "Black")
    grey = {m["label"]: m for m in moved["movers"]}["Grey"]
    assert grey["previous_share"] == pytest.approx(0.08, abs=0.02) and grey["share"] == pytest.approx(0.20, abs=0.02)
    assert any(c["check"] == "colour catalog's own labels" and c["status"] == "look" for c in body["verdict"]["checks"])


def test_the_shipped_bundle_says_what_every_attribute_is_expected_to_do():
    from tagger.report.verdict import expectations

    meta = json.loads((Path(__file__).parent.parent / "models" / "fashion-lite0" / "model.json").read_text())
    expected = expectations(meta)
    assert list(expected) == [a["name"] for a in meta["attributes"]]
    assert all(set(facts) == {"review_share", "accuracy"} for facts in expected.values())
    # The model card's coverage: colour and season are the attributes whose tags go to review most.
    assert expected["baseColour"]["review_share"][0] == pytest.approx(0.66, abs=0.01)
    assert expected["season"]["review_share"][0] == pytest.approx(0.41, abs=0.01)
    assert expected["gender"]["accuracy"] == (pytest.approx(0.924, abs=0.001), 895)


def test_a_report_with_nothing_to_check_against_says_so(tmp_path):
    write_night(tmp_path, DATE, [{"product_id": "p", "gender": "Men", "colour": "Black"}])  # no bundle, no night before
    result = run("--out", str(tmp_path), "--run-date", DATE, "--gallery", "0")
    assert result.exit_code == 0 and "verdict: nothing to check" in result.output, result.output
    assert report_json(tmp_path, DATE)["verdict"] == {"status": "ok", "checks": [], "not_ok": []}
    assert "Verdict: nothing to check" in (tmp_path / "_reports" / f"run_date={DATE}" / "report.html").read_text()


def test_an_empty_night_says_it_has_no_rows_not_that_nothing_is_expected(tmp_path):
    write_night(tmp_path, DATE, [])  # a header-only manifest: "no products today", a success with 0 rows
    result = run("--out", str(tmp_path), "--run-date", DATE, "--gallery", "0")
    assert result.exit_code == 0, result.output
    assert "verdict: nothing to check (the night has no rows: a header-only manifest)" in result.output
    page = (tmp_path / "_reports" / f"run_date={DATE}" / "report.html").read_text()
    assert "the night has no rows" in page and "no figure has an expectation" not in page
