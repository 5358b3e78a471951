"""tagger report: drift, agreement, thresholds and the page, on small generated nights (no model, no images
except the gallery's few)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobs.cli import cli
from tagger.tag import writers
from tagger.tag.partition import Partition

ATTRS = ["gender", "colour"]


def write_night(out: Path, run_date: str, rows: list[dict], *, errors: list[tuple[str, str]] = (), catalog: str | None = None,
                attributes: list[str] = ATTRS, run_id: str | None = None, review: bool = True) -> None:
    """A committed night as the tag job leaves it: tags and errors parts, _SUCCESS, plan.json."""
    run_id = run_id or f"{run_date}-test"
    partition = Partition(str(out), run_date)
    schema = writers.tags_schema(attributes, review=review)
    now = datetime(2026, 11, 27, tzinfo=timezone.utc)
    columns = {"product_id": [r["product_id"] for r in rows], "image": [r.get("image", f"{r['product_id']}.png") for r in rows]}
    for a in attributes:
        columns[a] = [r[a] for r in rows]
        columns[f"{a}_score"] = [r.get(f"{a}_score", 0.9) for r in rows]
    if review:
        columns["needs_review"] = [r.get("needs_review", []) for r in rows]
    columns["images_used"] = [1] * len(rows)
    columns["image_version"] = ["1-1"] * len(rows)
    columns["model_version"] = ["m1"] * len(rows)
    columns["run_id"] = [r.get("run_id", run_id) for r in rows]
    columns["tagged_at"] = [now] * len(rows)
    table = pa.table(columns).cast(schema)
    error_table = pa.table({"product_id": [p for p, _ in errors], "image": ["x"] * len(errors), "error_type": [t for _, t in errors],
                            "message": ["m"] * len(errors), "run_id": [run_id] * len(errors)}).cast(writers.ERRORS_SCHEMA)
    parts = {}
    for name, data, url in (("tags", table, partition.tags), ("errors", error_table, partition.errors)):
        writer = writers.PartWriter(os.path.join(url, writers.part_name(0)), data.schema)
        writer.write(data)
        writer.commit()
        parts[name] = {writers.part_name(0): data.num_rows}
    partition.write_plan({"run_id": run_id, "rows": len(rows) + len(errors), "catalog": catalog, "model": None,
                          "model_version": "m1", "attributes": attributes})
    partition.commit(parts["tags"], parts["errors"], {"run_id": run_id, "model_version": "m1"})


def mix_rows(counts: dict[str, int], prefix: str = "p", colour: str = "Black") -> list[dict]:
    rows, i = [], 0
    for label, n in counts.items():
        for _ in range(n):
            rows.append({"product_id": f"{prefix}{i}", "gender": label, "colour": colour})
            i += 1
    return rows


def run(*args: str):
    result = CliRunner().invoke(cli, ["report", *args], catch_exceptions=False)
    return result


def report_json(out: Path, date: str) -> dict:
    return json.loads((out / "_reports" / f"run_date={date}" / "report.json").read_text())


def test_first_night_has_no_drift_and_an_unchanged_mix_is_not_flagged(tmp_path):
    write_night(tmp_path, "2026-11-26", mix_rows({"Men": 50, "Women": 50}))
    first = run("--out", str(tmp_path), "--run-date", "2026-11-26", "--max-drift", "0.05")
    assert first.exit_code == 0, first.output
    body = report_json(tmp_path, "2026-11-26")
    assert body["previous_run_date"] is None and body["attributes"]["gender"]["drift"] is None
    assert body["counts"]["rows"] == 100 and body["counts"]["tagged"] == 100

    write_night(tmp_path, "2026-11-27", mix_rows({"Women": 50, "Men": 50}, prefix="q"))
    same = run("--out", str(tmp_path), "--run-date", "2026-11-27", "--max-drift", "0.05", "--max-psi", "0.01")
    assert same.exit_code == 0, same.output
    drift = report_json(tmp_path, "2026-11-27")["attributes"]["gender"]["drift"]
    assert drift["psi"] == pytest.approx(0.0) and drift["js_distance"] == pytest.approx(0.0)
    assert drift["new_labels"] == [] and drift["vanished_labels"] == []


def test_a_shifted_label_mix_is_flagged_with_exit_6_and_the_tables_are_written(tmp_path):
    write_night(tmp_path, "2026-11-26", mix_rows({"Men": 50, "Women": 50}))
    # A night that failed in between (no _SUCCESS) is skipped: the previous complete night is compared.
    (tmp_path / "tags" / "run_date=2026-11-27").mkdir(parents=True)
    write_night(tmp_path, "2026-11-28", mix_rows({"Men": 80, "Women": 10, "Girls": 10}))
    result = run("--out", str(tmp_path), "--run-date", "2026-11-28", "--max-drift", "0.1")
    assert result.exit_code == 6, result.output
    line = [l for l in result.output.splitlines() if "threshold crossed" in l]
    assert len(line) == 1 and "gender" in line[0] and "--max-drift 0.1" in line[0] and "colour" not in line[0]
    psi = run("--out", str(tmp_path), "--run-date", "2026-11-28", "--max-psi", "0.25")
    assert psi.exit_code == 6 and "gender label mix drifted from run_date=2026-11-26: PSI" in psi.output
    body = report_json(tmp_path, "2026-11-28")
    assert body["previous_run_date"] == "2026-11-26"
    d = body["attributes"]["gender"]["drift"]
    assert d["new_labels"] == ["Girls"] and d["vanished_labels"] == []
    gender = body["attributes"]["gender"]
    assert gender["label_rows"] == {"Men": 80, "Girls": 10, "Women": 10} and gender["previous_label_rows"] == {"Men": 50, "Women": 50}
    assert d["movers"][0]["label"] == "Women" and d["movers"][0]["change"] == pytest.approx(-0.4)
    # Hand computation: p = (.8, .1, .1) for Men, Women, Girls; q = (.5, .5, 0) with Girls floored at 1e-4.
    p, q = np.array([0.1, 0.8, 0.1]), np.array([0.0, 0.5, 0.5])  # Girls, Men, Women
    psi = float(np.sum((p - q) * np.log(np.maximum(p, 1e-4) / np.maximum(q, 1e-4))))
    m = (p + q) / 2
    kl = lambda a: float(np.sum(a[a > 0] * np.log2(a[a > 0] / m[a > 0])))  # noqa: E731
    assert d["psi"] == pytest.approx(psi) and d["js_distance"] == pytest.approx(np.sqrt(0.5 * kl(p) + 0.5 * kl(q)))
    folder = tmp_path / "_reports" / "run_date=2026-11-28"
    for name in ("label_mix", "drift", "agreement", "disagreements", "confusions"):
        assert (folder / f"{name}.parquet").is_file()
    drift_table = pq.read_table(folder / "drift.parquet").to_pylist()
    assert [r["attribute"] for r in drift_table] == ATTRS and drift_table[0]["new_labels"] == ["Girls"]
    mix = {(r["attribute"], r["label"]): r for r in pq.read_table(folder / "label_mix.parquet").to_pylist()}
    assert mix[("gender", "Girls")]["previous_count"] == 0 and mix[("gender", "Men")]["change"] == pytest.approx(0.3)


def test_agreement_confusions_and_disagreements_equal_a_hand_computation(tmp_path):
    rows = [
        {"product_id": "a", "gender": "Men", "colour": "Black", "gender_score": 0.9, "colour_score": 0.5},
        {"product_id": "b", "gender": "Men", "colour": "Blue", "gender_score": 0.8, "colour_score": 0.95},
        {"product_id": "c", "gender": "Women", "colour": "Red", "gender_score": 0.7, "colour_score": 0.6},
        {"product_id": "d", "gender": "Men", "colour": "Red", "gender_score": 0.99, "colour_score": 0.4},
        {"product_id": "e", "gender": "Women", "colour": "Black", "gender_score": 0.6, "colour_score": 0.3},
        {"product_id": "007", "gender": "Men", "colour": "Black", "gender_score": 0.5, "colour_score": 0.2},
    ]
    catalog = tmp_path / "catalog.csv"
    # e has no gender label (left out of gender), f is not tagged (no row to compare), 007 keeps its zeros; a's
    # second row is a repeated id: its first row counts, as in the tag job.
    catalog.write_text("product_id,image,sex,colour\na,a.png,Men,Black\nb,b.png,Women,Navy\nc,c.png,Women, Red \n"
                       "d,d.png,Women,Red\ne,e.png,,Black\nf,f.png,Men,Black\n007,007.png,Women,Black\na,a.png,Women,Red\n")
    write_night(tmp_path / "out", "2026-11-27", rows, errors=[("f", "missing")], catalog=str(catalog))
    result = run("--out", str(tmp_path / "out"), "--run-date", "2026-11-27", "--truth-column", "gender=sex",
                 "--truth-column", "colour=colour", "--gallery", "0")
    assert result.exit_code == 0, result.output
    body = report_json(tmp_path / "out", "2026-11-27")
    gender, colour = body["attributes"]["gender"]["agreement"], body["attributes"]["colour"]["agreement"]
    # gender labelled: a b c d 007 (5); right: a, c -> 2/5. Confusions Women -> Men: b, d, 007 (3).
    assert (gender["labelled"], gender["agree"]) == (5, 2) and gender["accuracy"] == pytest.approx(0.4)
    assert gender["confusions"] == [{"catalog_label": "Women", "tag": "Men", "rows": 3}]
    # colour labelled: all six; right: a, c (" Red " trimmed), d, e, 007 -> 5/6; b Navy -> Blue.
    assert (colour["labelled"], colour["agree"]) == (6, 5)
    assert colour["confusions"] == [{"catalog_label": "Navy", "tag": "Blue", "rows": 1}]
    assert body["counts"] == {"rows": 7, "tagged": 6, "reused": 0, "errors": 1, "error_types": {"missing": 1},
                              "error_rate": pytest.approx(1 / 7), "review_rows": 0, "review_share": 0.0}
    table = pq.read_table(tmp_path / "out" / "_reports" / "run_date=2026-11-27" / "disagreements.parquet").to_pylist()
    assert [(r["product_id"], r["attribute"], r["catalog_label"], r["tag"]) for r in table] == [
        ("d", "gender", "Women", "Men"), ("b", "colour", "Navy", "Blue"), ("b", "gender", "Women", "Men"),
        ("007", "gender", "Women", "Men")]
    assert table[0]["score"] == pytest.approx(0.99) and table[0]["image"] == "d.png"


def test_a_catalog_bigger_than_a_bucket_is_joined_in_buckets_with_the_same_result(tmp_path):
    from tagger.report.build import build_report
    from tagger.report.config import ReportConfig

    rng = np.random.default_rng(0)
    labels = np.array(["Men", "Women", "Boys"])
    rows = [{"product_id": f"id{i}", "gender": str(labels[rng.integers(3)]), "colour": "Black",
             "gender_score": float(rng.random())} for i in range(500)]
    catalog = tmp_path / "catalog.parquet"
    # The last 50 rows repeat ids 0-49 with other labels: the first row of an id counts, bucketed or not.
    ids = [f"id{i}" for i in range(520)] + [f"id{i}" for i in range(50)]
    genders = [str(labels[rng.integers(3)]) for _ in range(520)]
    genders += [str(labels[(list(labels).index(g) + 1) % 3]) for g in genders[:50]]
    pq.write_table(pa.table({"product_id": ids, "image": ["x"] * 570, "gender": genders}), catalog)
    write_night(tmp_path / "out", "2026-11-27", rows, catalog=str(catalog))
    whole = build_report(ReportConfig(out=str(tmp_path / "out"), run_date="2026-11-27", gallery=0, batch_rows=64))
    buckets = build_report(ReportConfig(out=str(tmp_path / "out"), run_date="2026-11-27", gallery=0, batch_rows=64,
                                        bucket_rows=100, max_disagreements=50))
    assert whole.report["agreement"]["columns"] == {"gender": "gender"}
    a, b = whole.report["attributes"]["gender"]["agreement"], buckets.report["attributes"]["gender"]["agreement"]
    assert a["labelled"] == b["labelled"] == 500 and a["agree"] == b["agree"] and 100 < a["agree"] < 250
    assert a["agree"] == sum(r["gender"] == genders[i] for i, r in enumerate(rows))
    top = pq.read_table(Path(buckets.folder) / "disagreements.parquet")
    assert top.num_rows == 50 and top.column("score").to_pylist() == sorted(top.column("score").to_pylist(), reverse=True)
    assert buckets.report["agreement"]["disagreements"] == 500 - a["agree"]


def test_thresholds_exit_6_naming_what_crossed(tmp_path):
    rows = [{"product_id": f"p{i}", "gender": "Men", "colour": "Black", "needs_review": ["colour"] if i < 3 else []} for i in range(10)]
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("product_id,image,gender\n" + "".join(f"p{i},x.png,{'Men' if i < 6 else 'Women'}\n" for i in range(10)))
    write_night(tmp_path / "out", "2026-11-27", rows, errors=[("z", "decode")], catalog=str(catalog))
    out = str(tmp_path / "out")
    assert run("--out", out, "--run-date", "2026-11-27", "--min-agreement", "0.6", "--max-review-share", "0.3",
               "--gallery", "0").exit_code == 0
    result = run("--out", out, "--run-date", "2026-11-27", "--min-agreement", "0.7", "--gallery", "0")
    assert result.exit_code == 6 and "gender agrees with the catalog on 60.0% of 10 labelled rows < --min-agreement 70.0%" in result.output
    result = run("--out", out, "--run-date", "2026-11-27", "--max-review-share", "0.25", "--gallery", "0")
    assert result.exit_code == 6 and "colour review share 30.0% > --max-review-share 25.0%" in result.output
    result = run("--out", out, "--run-date", "2026-11-27", "--max-error-rate", "0.05", "--gallery", "0")
    assert result.exit_code == 6 and "error rate 9.1%" in result.output
    body = report_json(tmp_path / "out", "2026-11-27")
    assert body["crossed"] and body["thresholds"] == {"max_error_rate": 0.05}
    assert "Thresholds crossed" in (tmp_path / "out" / "_reports" / "run_date=2026-11-27" / "report.html").read_text()


def test_a_night_with_zero_tags_gives_a_report(tmp_path):
    write_night(tmp_path, "2026-11-26", mix_rows({"Men": 3}))
    write_night(tmp_path, "2026-11-27", [], errors=[("a", "missing"), ("b", "decode")])
    result = run("--out", str(tmp_path), "--run-date", "2026-11-27", "--max-drift", "0.1", "--max-rows-change", "0.3")
    assert result.exit_code == 6 and "rows changed -33.3% (3 -> 2)" in result.output  # drift: nothing to compare
    body = report_json(tmp_path, "2026-11-27")
    assert body["counts"]["tagged"] == 0 and body["counts"]["errors"] == 2
    assert body["attributes"]["gender"]["drift"] is None and body["attributes"]["gender"]["review_share"] is None
    assert "run_date=2026-11-27" in (tmp_path / "_reports" / "run_date=2026-11-27" / "report.html").read_text()


def test_reused_rows_are_counted_and_attributes_come_from_the_plan(tmp_path):
    rows = [{"product_id": "a", "size": "M", "run_id": "old"}, {"product_id": "b", "size": "L"}]
    write_night(tmp_path, "2026-11-27", rows, attributes=["size"])
    assert run("--out", str(tmp_path), "--run-date", "2026-11-27").exit_code == 0
    body = report_json(tmp_path, "2026-11-27")
    assert list(body["attributes"]) == ["size"] and (body["counts"]["tagged"], body["counts"]["reused"]) == (1, 1)


def test_invalid_input_exits_2_before_writing(tmp_path):
    write_night(tmp_path, "2026-11-27", mix_rows({"Men": 2}), catalog=str(tmp_path / "nowhere.csv"))
    result = run("--out", str(tmp_path), "--run-date", "2026-11-28")
    assert result.exit_code == 2 and "no partition run_date=2026-11-28" in result.output
    (tmp_path / "tags" / "run_date=2026-11-29").mkdir()
    result = run("--out", str(tmp_path), "--run-date", "2026-11-29")
    assert result.exit_code == 2 and "incomplete" in result.output
    result = run("--out", str(tmp_path), "--run-date", "2026-11-27", "--truth-column", "gender=sex")
    assert result.exit_code == 2 and "nowhere.csv" in result.output
    catalog = tmp_path / "c.csv"
    catalog.write_text("product_id,image,gender\np0,x,Men\n")
    result = run("--out", str(tmp_path), "--run-date", "2026-11-27", "--catalog", str(catalog), "--truth-column", "gender=sex")
    assert result.exit_code == 2 and "'sex'" not in result.output and "sex" in result.output and "columns found: product_id, image, gender" in result.output
    result = run("--out", str(tmp_path), "--run-date", "2026-11-27", "--truth-column", "gender")
    assert result.exit_code == 2 and "ATTRIBUTE=COLUMN" in result.output
    assert not (tmp_path / "_reports").exists()
    # The plan's catalog is gone: the report goes on without the agreement section.
    assert run("--out", str(tmp_path), "--run-date", "2026-11-27").exit_code == 0
    assert report_json(tmp_path, "2026-11-27")["agreement"] is None


def tag(*args: str):
    return CliRunner().invoke(cli, ["tag", "--workers", "0", "--progress", "none", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def tagged_demo(demo, tiny_bundle, tmp_path_factory):
    """The generated demo catalog tagged by the tiny bundle with --report, then reported on with its truth."""
    out = tmp_path_factory.mktemp("tagged") / "out"
    # A night before, reported on with the catalog's labels: the page then has every column it can have.
    assert tag("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(out), "--run-date", "2026-11-26").exit_code == 0
    assert run("--out", str(out), "--run-date", "2026-11-26", "--catalog", str(demo.catalog_truth), "--gallery", "0").exit_code == 0
    result = tag("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(out), "--run-date", "2026-11-27", "--report")
    assert result.exit_code == 0, result.output
    assert f"report: {out}/_reports/run_date=2026-11-27/report.html" in result.output
    assert json.loads((out / "_reports" / "run_date=2026-11-27" / "report.json").read_text())["agreement"] is None
    result = run("--out", str(out), "--run-date", "2026-11-27", "--catalog", str(demo.catalog_truth), "--gallery", "8")
    assert result.exit_code == 0, result.output
    return out


def test_tag_report_flag_and_catalog_truth_by_id(tagged_demo, demo):
    import csv

    body = report_json(tagged_demo, "2026-11-27")
    with open(demo.catalog_truth, newline="") as handle:
        truth = list(csv.DictReader(handle))
    assert body["counts"]["tagged"] == len(truth) and body["counts"]["errors"] == 2
    assert list(body["attributes"]) == list(truth[0])[1:]  # the bundle's attributes, in its order
    for attribute, facts in body["attributes"].items():
        assert facts["agreement"]["labelled"] == sum(1 for r in truth if r[attribute])
    page = (tagged_demo / "_reports" / "run_date=2026-11-27" / "report.html").read_text()
    assert page.count("data:image/jpeg;base64,") == min(8, len({r["product_id"] for r in pq.read_table(
        tagged_demo / "_reports" / "run_date=2026-11-27" / "disagreements.parquet").to_pylist()}))
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHECK = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const wide = document.documentElement.scrollWidth > window.innerWidth;
  // A table wider than its box scrolls inside it: the page does not overflow, but a screenshot, a PDF or a mail
  // loses the columns past the edge.
  const cut = [...document.querySelectorAll(".wide")].filter(w => w.scrollWidth > w.clientWidth + 1).length;
  document.body.insertAdjacentHTML("beforeend",
    `<pre id="check">images=${images.length} broken=${broken} overflow=${wide} cut=${cut} width=${document.documentElement.scrollWidth}/${window.innerWidth}</pre>`);
});
</script>"""


def chromium(tmp_path: Path, page: Path, *args: str) -> str:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'chromium-profile'}", *args, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium, or `make "
                    "browser-setup`): report.html is not rendered in a browser here")
@pytest.mark.parametrize("width", [1200, 640])
def test_report_html_renders_in_headless_chromium(tagged_demo, tmp_path, width):
    """Every image loads and nothing is wider than the window, at 1,200 px no table wider than the page either
    (a night with a night before and the catalog's labels: every column); a screenshot is kept for a person."""
    import re

    page = tagged_demo / "_reports" / "run_date=2026-11-27" / "report.html"
    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    dom = chromium(tmp_path, checked, f"--window-size={width},1000", "--virtual-time-budget=10000", "--dump-dom")
    found = re.search(r'<pre id="check">images=(\d+) broken=(\d+) overflow=(\w+) cut=(\d+) width=([\d/]+)</pre>', dom)
    assert found, f"the check did not run: {dom[-500:]}"
    images, broken, overflow, cut, sizes = found.groups()
    assert int(images) >= 1 and int(broken) == 0 and overflow == "false", found.group(0)
    if width >= 1200:
        assert int(cut) == 0, f"a table is wider than the page at {width} px: {found.group(0)}"
    shot = tmp_path / f"report-{width}.png"
    chromium(tmp_path, page, f"--window-size={width},2400", f"--screenshot={shot}")
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("TAGGER_REPORT_SCREENSHOTS")
    if keep:
        shutil.copy(shot, Path(keep) / shot.name)


def test_report_reads_and_writes_s3(tmp_path, s3_bucket):
    from tests.conftest import upload_tree

    bucket, fs = s3_bucket
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("product_id,image,gender\np0,x.png,Women\np1,x.png,Men\n")
    write_night(tmp_path / "local", "2026-11-26", mix_rows({"Men": 2}))
    write_night(tmp_path / "local", "2026-11-27", mix_rows({"Men": 1, "Women": 1}), catalog=str(catalog))
    upload_tree(fs, tmp_path / "local", f"{bucket}/out")
    result = run("--out", f"s3://{bucket}/out", "--run-date", "2026-11-27", "--max-drift", "0.9")
    assert result.exit_code == 0, result.output
    fs.invalidate_cache()
    folder = f"{bucket}/out/_reports/run_date=2026-11-27"
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(folder)) == sorted(
        ["agreement.parquet", "confusions.parquet", "disagreements.parquet", "drift.parquet", "label_mix.parquet",
         "report.html", "report.json"])
    body = json.loads(fs.cat_file(f"{folder}/report.json"))
    assert body["previous_run_date"] == "2026-11-26" and body["attributes"]["gender"]["agreement"]["accuracy"] == 0.0
    assert "no image" in fs.cat_file(f"{folder}/report.html").decode() or "missing" in fs.cat_file(f"{folder}/report.html").decode()


@pytest.mark.parametrize("allowed", [True, False])
def test_gallery_reads_http_images_only_under_the_runs_own_allow_host(tmp_path, allowed):
    from PIL import Image

    from .http_server import PhotoServer

    (tmp_path / "cdn").mkdir()
    Image.new("RGB", (30, 40), (200, 30, 30)).save(tmp_path / "cdn" / "a.jpg", "JPEG")
    server = PhotoServer(tmp_path / "cdn").start()
    try:
        catalog = tmp_path / "catalog.csv"
        catalog.write_text(f"product_id,image,gender\na,{server.url}/img/a.jpg,Women\n")
        write_night(tmp_path / "out", "2026-11-27", [{"product_id": "a", "image": f"{server.url}/img/a.jpg", "gender": "Men",
                                                      "colour": "Red"}], catalog=str(catalog))
        arguments = {"catalog": str(catalog), "allow_hosts": ["127.0.0.1:*"] if allowed else [],
                     "allow_private_addresses": allowed, "allow_plain_http": allowed}
        (tmp_path / "out" / "_runs" / "run_date=2026-11-27" / "summary.json").write_text(json.dumps({"arguments": arguments}))
        assert run("--out", str(tmp_path / "out"), "--run-date", "2026-11-27").exit_code == 0
        page = (tmp_path / "out" / "_reports" / "run_date=2026-11-27" / "report.html").read_text()
        assert ("data:image/jpeg;base64," in page) == allowed
        assert (len(server.requests) > 0) == allowed, "no URL is requested that the run was not allowed to read"
    finally:
        server.stop()


def test_a_partition_written_before_needs_review_has_no_review_share(tmp_path):
    write_night(tmp_path, "2026-11-26", mix_rows({"Men": 2}), review=False)
    write_night(tmp_path, "2026-11-27", [{"product_id": "a", "gender": "Men", "colour": "Red", "needs_review": ["colour"]}])
    assert run("--out", str(tmp_path), "--run-date", "2026-11-27", "--max-review-share", "0.5").exit_code == 6
    body = report_json(tmp_path, "2026-11-27")
    assert body["attributes"]["colour"]["review_share"] == 1.0 and body["attributes"]["colour"]["previous_review_share"] is None
    assert body["previous_counts"]["review_share"] is None and "review_share" not in body["change"]


def test_a_product_of_several_photos_is_shown_by_its_first():
    from types import SimpleNamespace

    from tagger.report.html import _first_photo

    several = SimpleNamespace(plan={"key": {"image_separator": "|"}})
    assert _first_photo("front.jpg|back.jpg", several) == "front.jpg"
    # one photo per row (no separator planned): a '|' in a path is part of the path
    assert _first_photo("a|b.jpg", SimpleNamespace(plan={"key": {"image_separator": None}})) == "a|b.jpg"
    assert _first_photo("a.jpg", SimpleNamespace(plan=None)) == "a.jpg"


def test_a_change_of_arithmetic_between_nights_is_said_on_the_page(tmp_path):
    """A night tagged in bf16 after one in fp32 (the job moved to a CPU with native bfloat16, where the bundle's
    checked bf16 wins): a few near-tie tags move without the catalog changing, and the page says why."""
    for date, prefix, computed in (("2026-11-26", "p", ("onnx", "fp32")), ("2026-11-27", "q", ("openvino", "bf16"))):
        write_night(tmp_path, date, mix_rows({"Men": 50, "Women": 50}, prefix=prefix))
        state = tmp_path / "_runs" / f"run_date={date}"
        state.mkdir(parents=True, exist_ok=True)
        (state / "summary.json").write_text(json.dumps({"this_process": {"runtime": {"name": computed[0], "precision": computed[1]}}}))
    result = run("--out", str(tmp_path), "--run-date", "2026-11-27")
    assert result.exit_code == 0, result.output
    body = report_json(tmp_path, "2026-11-27")
    assert (body["computed"], body["previous_computed"]) == ("openvino bf16", "onnx fp32")
    page = (tmp_path / "_reports" / "run_date=2026-11-27" / "report.html").read_text()
    assert "computed in openvino bf16" in page and "The arithmetic changed since run_date=2026-11-26 (onnx fp32 → openvino bf16)" in page
    # Another fp32 runtime is float jitter, not a change worth a banner.
    (tmp_path / "_runs" / "run_date=2026-11-27" / "summary.json").write_text(
        json.dumps({"this_process": {"runtime": {"name": "openvino", "precision": "fp32"}}}))
    assert run("--out", str(tmp_path), "--run-date", "2026-11-27").exit_code == 0
    assert "The arithmetic changed" not in (tmp_path / "_reports" / "run_date=2026-11-27" / "report.html").read_text()
    # Fan-out tasks on two kinds of CPU: the partition's counts of each shard's arithmetic say so.
    (tmp_path / "_runs" / "run_date=2026-11-27" / "summary.json").write_text(
        json.dumps({"computed": {"onnx fp32": 30, "openvino bf16": 70}, "this_process": {"runtime": {"name": "onnx", "precision": "fp32"}}}))
    assert run("--out", str(tmp_path), "--run-date", "2026-11-27").exit_code == 0
    assert report_json(tmp_path, "2026-11-27")["computed"] == "mixed: onnx fp32 (30% of tagged rows), openvino bf16 (70% of tagged rows)"
    assert "computed in different arithmetic" in (tmp_path / "_reports" / "run_date=2026-11-27" / "report.html").read_text()


def test_tag_report_on_a_night_that_failed_says_there_is_no_report(demo, tiny_bundle, tmp_path):
    import csv

    catalog = tmp_path / "broken.csv"  # every row a missing photo: exit 3, nothing committed
    with open(catalog, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([["product_id", "image"], *[[f"p{k}", f"nowhere/{k}.jpg"] for k in range(4)]])
    result = tag("--catalog", str(catalog), "--model", tiny_bundle, "--out", str(tmp_path / "out"), "--run-date", "2026-11-27",
                 "--report")
    assert result.exit_code == 3, result.output
    assert "tagger tag --report: no report: the run ended with exit 3" in result.output
    assert not (tmp_path / "out" / "_reports").exists()


def test_a_night_committed_with_every_row_an_error_is_reported_against_the_catalogs_labels(tiny_bundle, tmp_path):
    import csv

    catalog = tmp_path / "labelled.csv"  # every photo missing, the catalog's labels present, the gate raised to commit
    with open(catalog, "w", newline="") as handle:
        csv.writer(handle).writerows([["product_id", "image", "gender"], *[[f"p{k}", f"nowhere/{k}.jpg", "Men"] for k in range(4)]])
    out = tmp_path / "out"
    result = tag("--catalog", str(catalog), "--model", tiny_bundle, "--out", str(out), "--run-date", "2026-11-27",
                 "--max-error-rate", "1", "--report")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "failed" not in result.output
    body = report_json(out, "2026-11-27")
    assert body["counts"]["tagged"] == 0 and body["counts"]["errors"] == 4
    assert body["verdict"]["status"] == "broken" and "tagged rows" in [c["check"] for c in body["verdict"]["not_ok"]]
