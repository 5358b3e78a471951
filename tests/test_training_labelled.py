"""A catalog's own attributes end to end: a labelled manifest (not the Kaggle layout, not the Kaggle seven, one
attribute labelled on half the rows) -> retrain -> tag (local and Ray engines) -> evaluate -> predict; corrections,
a bundle's heads reused, and the attribute-name and label-count checks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from jobs.cli import cli
from tagger.model.bundle import BundleError, load_bundle
from tagger.tag.writers import read_complete_partition
from tagger.data.split import read_split

pytestmark = pytest.mark.slow

DATE = "2026-12-01"
# Not the Kaggle seven, and not in the Kaggle order: the tags table must follow the bundle.
ATTRS = ["garment", "colour"]
COMMON = ["--backbone", "test_efficientnet", "--no-pretrained", "--input-size", "32", "--batch-size", "32",
          "--max-epochs", "2", "--lr", "5e-3", "--no-progress", "--threads", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    """A Parquet manifest in a retailer's spelling (sku, photo): garment labelled on every other row, colour on all."""
    from tagger.demo.drawn import make_demo_dataset

    demo = make_demo_dataset(tmp_path_factory.mktemp("labelled"), n_train=120, n_catalog=0, n_bad=0, image_size=(48, 64))
    with open(demo.styles_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    table = pa.table({
        "sku": [f"sku-{r['id']}" for r in rows],
        "photo": [f"images/{r['id']}.jpg" for r in rows],
        "garment": [r["articleType"] if i % 2 == 0 else None for i, r in enumerate(rows)],
        "colour": [r["baseColour"] for r in rows],
        "note": ["free text the trainer must ignore"] * len(rows),
    })
    path = demo.root / "catalog.parquet"
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def bundle(catalog, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "own"
    result = run("retrain", "--data", str(catalog), "--attribute", "garment", "--attribute", "colour", "--id-column", "sku",
                 "--image-column", "photo", "--out", str(out), "--log-dir", str(out.parent / "logs"), *COMMON)
    assert result.exit_code == 0, result.output
    return out


def test_retrain_on_a_labelled_manifest_makes_a_bundle_of_its_attributes(bundle, catalog):
    loaded = load_bundle(str(bundle))
    assert loaded.attribute_names == ATTRS
    t = loaded.training
    counts = t["data"]["label_counts"]
    assert sum(counts["garment"].values()) == 60 and sum(counts["colour"].values()) == 120
    assert list(counts["colour"].values()) == sorted(counts["colour"].values(), reverse=True)
    assert t["data"]["rows"]["used"] == 120 and t["data"]["rows"]["sources"][0]["kind"] == "manifest"
    assert set(t["metrics"]["test"]) == set(ATTRS)
    # Half of garment is unknown: its val/test metrics count only the labelled rows.
    split = read_split(str(bundle / "split.parquet"))
    labelled = set(pl.read_parquet(catalog).filter(pl.col("garment").is_not_null())["sku"].to_list())
    assert t["metrics"]["test"]["garment"]["n"] == sum(1 for sku, s in split.items() if s == "test" and sku in labelled)
    assert t["metrics"]["test"]["colour"]["n"] == sum(1 for s in split.values() if s == "test")


def tag_args(catalog: Path, bundle: Path, out: Path, *extra: str) -> list[str]:
    return ["tag", "--catalog", str(catalog), "--model", str(bundle), "--out", str(out), "--run-date", DATE,
            "--id-column", "sku", "--image-column", "photo", "--progress", "none", "--workers", "0", "--batch-size", "16", *extra]


@pytest.fixture(scope="module")
def tagged(catalog, bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tagged")
    result = run(*tag_args(catalog, bundle, out))
    assert result.exit_code == 0, result.output
    return out


def test_tags_follow_the_bundle_columns_scores_and_review_queue(tagged, bundle):
    tags = pl.from_arrow(read_complete_partition(f"{tagged}/tags/run_date={DATE}"))
    assert tags.columns[:6] == ["product_id", "image", "garment", "garment_score", "colour", "colour_score"]
    assert "gender" not in tags.columns and tags.height == 120
    loaded = load_bundle(str(bundle))
    for spec in loaded.attributes:
        assert set(tags[spec.name].unique()) <= set(spec.labels)
        assert tags[f"{spec.name}_score"].is_between(0, 1).all()
    expected = [[a.name for a in loaded.attributes if row[f"{a.name}_score"] < a.threshold] for row in tags.iter_rows(named=True)]
    assert tags["needs_review"].to_list() == expected
    summary = json.loads((tagged / "_runs" / f"run_date={DATE}" / "summary.json").read_text())
    review = summary["counts"]["needs_review"] if "counts" in summary else summary["needs_review"]
    assert review["rows"] == sum(1 for e in expected if e)
    assert review["attributes"] == {a: n for a in ATTRS if (n := sum(a in e for e in expected))}


def test_the_ray_engine_writes_the_same_tags(catalog, bundle, tagged, tmp_path):
    pytest.importorskip("ray", reason="the ray extra (pip install '.[ray]') is not installed")
    import ray

    if ray.is_initialized():  # pragma: no cover
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        result = run(*tag_args(catalog, bundle, tmp_path, "--engine", "ray"))
    finally:
        ray.shutdown()
    assert result.exit_code == 0, result.output
    local = pl.from_arrow(read_complete_partition(f"{tagged}/tags/run_date={DATE}")).drop("run_id", "tagged_at").sort("product_id")
    remote = pl.from_arrow(read_complete_partition(f"{tmp_path}/tags/run_date={DATE}")).drop("run_id", "tagged_at").sort("product_id")
    assert remote.columns == local.columns
    scores = [f"{a}_score" for a in ATTRS]
    assert remote.drop(scores).equals(local.drop(scores))
    for column in scores:
        assert np.allclose(remote[column].to_numpy(), local[column].to_numpy(), atol=1e-5)


def test_evaluate_reports_the_bundle_attributes_on_labelled_rows_only(catalog, bundle, tmp_path):
    out = tmp_path / "report"
    result = run("evaluate", "--model", str(bundle), "--data", str(catalog), "--id-column", "sku", "--image-column", "photo",
                 "--split", "test", "--out", str(out), "--workers", "0")
    assert result.exit_code == 0, result.output
    metrics = pl.read_parquet(out / "metrics.parquet")
    assert metrics["attribute"].to_list() == ATTRS
    trained = load_bundle(str(bundle)).training["metrics"]["test"]
    support = dict(zip(metrics["attribute"].to_list(), metrics["n"].to_list()))
    assert support == {a: trained[a]["n"] for a in ATTRS}
    report = (out / "report.md").read_text()
    assert "garment" in report and "gender" not in report and "labelled data" in report
    assert (out / "plots").is_dir() and any((out / "plots").iterdir())


def test_predict_sheet_table_follows_the_bundle(catalog, bundle, tmp_path):
    images = sorted((catalog.parent / "images").glob("*.jpg"))[:3]
    result = run("predict", *map(str, images), "--model", str(bundle), "--out", str(tmp_path / "sheet.png"), "--workers", "0")
    assert result.exit_code == 0, result.output
    table = pl.read_parquet(tmp_path / "sheet.parquet")
    assert {"garment", "garment_score", "colour", "colour_score"} <= set(table.columns) and "gender" not in table.columns


def test_corrections_override_labels_and_a_bundle_heads_are_reused(catalog, bundle, tmp_path):
    """Original data + the review queue's answers, one command; starting from the first bundle, with a new attribute."""
    rows = pl.read_parquet(catalog)
    fixes = tmp_path / "corrections.csv"
    first, second = rows["sku"][1], rows["sku"][3]  # rows without a garment label
    fixes.write_text(f"sku,attribute,label\n{first},garment,Tshirts\n{second},garment,Jeans\n{second},garment,Shirts\n"
                     "nobody,garment,Jeans\n" f"{first},fit,Slim\n")
    extra = tmp_path / "sleeve.csv"  # a second manifest labelling a third attribute on some of the same products
    extra.write_text("sku,photo,sleeve\n" + "".join(f"{s},images/{p.split('/')[-1]},{'Long' if i % 3 else 'Short'}\n"
                                                     for i, (s, p) in enumerate(zip(rows["sku"], rows["photo"])) if i < 60))
    import shutil

    shutil.copytree(catalog.parent / "images", tmp_path / "images")
    out = tmp_path / "bundle2"
    result = run("retrain", "--data", str(catalog), "--data", str(extra), "--corrections", str(fixes), "--attribute", "garment",
                 "--attribute", "colour", "--attribute", "sleeve", "--id-column", "sku", "--image-column", "photo",
                 "--init-weights", str(bundle), "--split-from", str(bundle), "--out", str(out), "--log-dir", str(tmp_path / "logs"),
                 *COMMON)
    assert result.exit_code == 0, result.output
    t = load_bundle(str(out)).training
    assert t["heads_init"] == {"garment": "bundle", "colour": "bundle", "sleeve": "new"}
    assert read_split(str(out / "split.parquet")) == read_split(str(bundle / "split.parquet"))
    sources = t["data"]["rows"]["sources"]
    corrections = [s for s in sources if s["kind"] == "corrections"][0]
    assert corrections["applied"] == {"garment": {"rows": 2, "changed": 2}} and corrections["superseded"] == 1
    assert corrections["no_image"] == 1 and corrections["other_attribute"] == {"fit": 1}
    assert sum(t["data"]["label_counts"]["garment"].values()) == 62 and sum(t["data"]["label_counts"]["sleeve"].values()) == 60


def test_an_attribute_with_too_few_labels_is_refused_naming_it(catalog, tmp_path):
    result = run("retrain", "--data", str(catalog), "--attribute", "colour", "--attribute", "pattern", "--id-column", "sku",
                 "--image-column", "photo", "--out", str(tmp_path / "b"), *COMMON)
    assert result.exit_code == 2
    assert "attribute 'pattern' has 0 labelled row(s) of 120" in result.output and not (tmp_path / "b").exists()


@pytest.mark.parametrize("names, message", [
    (["colour", "Colour"], "given twice"),
    (["colour", "colour_score"], "clashes with the score column"),
    (["model_version"], "clashes with the tags table's own column"),
    (["Images_Used"], "clashes with the tags table's own column"),  # the column added with several photos
    (["location"], "clashes with the tags table's own column"),  # --since's join key
    (["sleeve length"], "not a valid column name"),
])
def test_attribute_names_are_checked_when_training_and_when_loading(catalog, tiny_bundle, tmp_path, names, message):
    args = [a for n in names for a in ("--attribute", n)]
    result = run("retrain", "--data", str(catalog), *args, "--out", str(tmp_path / "b"), *COMMON)
    assert result.exit_code == 2 and message in result.output
    broken = tmp_path / "bundle"
    broken.mkdir()
    meta = json.loads(Path(tiny_bundle, "model.json").read_text())
    for spec, name in zip(meta["attributes"], names):
        spec["name"] = name
    (broken / "model.json").write_text(json.dumps(meta))
    (broken / "model.safetensors").write_bytes(Path(tiny_bundle, "model.safetensors").read_bytes())
    with pytest.raises(BundleError, match=message):
        load_bundle(str(broken))


def test_demo_check_scores_the_bundle_attributes(catalog, tagged, tmp_path):
    truth = tmp_path / "truth.csv"
    pl.read_parquet(catalog).select(pl.col("sku").alias("product_id"), "colour", "garment").write_csv(truth)
    result = run("demo-check", "--out", str(tagged), "--truth", str(truth))
    assert result.exit_code == 0, result.output
    lines = [line.split()[0] for line in result.output.splitlines()[1:]]
    assert lines == ["colour", "garment", "all"]


def test_keep_labels_keeps_the_starting_bundles_vocabularies_and_heads_on_a_subset(catalog, bundle, tmp_path):
    """A few rows of the data: alone they would fold other labels (and lack some), so without --keep-labels the
    heads could not be kept; with it the shared attributes keep the bundle's labels and heads."""
    subset = tmp_path / "subset.parquet"
    rows = pl.read_parquet(catalog).head(60).with_columns(pl.lit("images/").add(pl.col("photo").str.split("/").list.last()).alias("photo"))
    rows.write_parquet(subset)
    import shutil

    shutil.copytree(catalog.parent / "images", tmp_path / "images")
    out = tmp_path / "kept"
    result = run("retrain", "--data", str(subset), "--attribute", "colour", "--attribute", "garment", "--id-column", "sku",
                 "--image-column", "photo", "--init-weights", str(bundle), "--keep-labels", "--split-from", str(bundle),
                 "--min-label-count", "8", "--out", str(out), "--log-dir", str(tmp_path / "logs"), *COMMON)
    assert result.exit_code == 0, result.output
    before, after = load_bundle(str(bundle)), load_bundle(str(out))
    assert after.attribute_names == ["colour", "garment"]
    assert {a.name: a.labels for a in after.attributes} == {a.name: a.labels for a in before.attributes}
    assert after.training["heads_init"] == {"colour": "bundle", "garment": "bundle"}
    assert sum(after.training["data"]["label_counts"]["colour"].values()) == 60


@pytest.mark.parametrize("fit, said", [
    (lambda i: "Regular", "one class only, 'Regular'"),
    (lambda i: "ABC"[i % 3] if i < 9 else None, "one class only, 'Other' (every rarer label was folded into it"),
])
def test_an_attribute_of_one_class_is_refused_before_any_image_is_decoded(catalog, tmp_path, monkeypatch, fit, said):
    import tagger.training.datamodule as datamodule

    def never(*args, **kwargs):
        raise AssertionError("images decoded before the labels were checked")

    monkeypatch.setattr(datamodule, "decode_all", never)
    table = pq.read_table(catalog)
    one = catalog.parent / f"one-class-{tmp_path.name}.parquet"
    pq.write_table(table.append_column("fit", pa.array([fit(i) for i in range(table.num_rows)], pa.string())), one)
    result = run("retrain", "--data", str(one), "--attribute", "colour", "--attribute", "fit", "--id-column", "sku",
                 "--image-column", "photo", "--min-label-count", "5", "--cache-images", "on",
                 "--out", str(tmp_path / "b"), *COMMON)
    assert result.exit_code == 2, result.output
    assert said in result.output and "--attribute fit" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "b").exists()


def test_retrain_reads_a_labelled_manifest_of_cdn_photos_from_allowed_hosts_only(catalog, tmp_path):
    """A retailer's labelled catalog points at its CDN: retrain reads those photos through the tag job's own
    source (its http policy and size caps, with the same options and messages), as evaluate does."""
    from .http_server import PhotoServer

    rows = pq.read_table(catalog).to_pylist()
    server = PhotoServer(catalog.parent / "images").start()
    try:
        manifest = tmp_path / "cdn.csv"
        with open(manifest, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sku", "photo", "garment", "colour"])
            writer.writerows([r["sku"], f"{server.url}/img/{Path(r['photo']).name}", r["garment"] or "", r["colour"]] for r in rows)
        common = ["--data", str(manifest), "--attribute", "garment", "--attribute", "colour", "--id-column", "sku",
                  "--image-column", "photo", *COMMON, "--max-epochs", "1"]
        refused = run("retrain", *common, "--out", str(tmp_path / "refused"))
        assert refused.exit_code == 2 and "could be decoded" in refused.output and "--allow-host" in refused.output, refused.output
        assert server.count("GET", "/img/") == 0
        allow = ["--allow-host", "127.0.0.1:*", "--allow-private-addresses", "--allow-plain-http"]
        too_big = run("retrain", *common, *allow, "--max-image-bytes", "100", "--out", str(tmp_path / "too-big"))
        assert too_big.exit_code == 2 and "raise --max-image-bytes" in too_big.output, too_big.output
        before = server.count("GET", "/img/")
        trained = run("retrain", *common, *allow, "--out", str(tmp_path / "cdn"))
        assert trained.exit_code == 0, trained.output
        assert server.count("GET", "/img/") - before == len(rows)  # each photo read once, into the decoded cache
    finally:
        server.stop()
    loaded = load_bundle(str(tmp_path / "cdn"))
    assert loaded.attribute_names == ATTRS and loaded.training["data"]["rows"]["used"] == len(rows)
    widen = run("retrain", *common, "--allow-plain-http", "--out", str(tmp_path / "widen"))
    assert widen.exit_code == 2 and "--allow-host" in widen.output and "which names no host" in widen.output, widen.output


def test_retrain_and_evaluate_read_a_labelled_manifests_text_column(tmp_path):
    """--text-column on a labelled manifest (a retailer's title column, one title empty): retrain trains the text model
    and its fusion, evaluate gives photos / text / both on the test rows; a manifest without the column is exit 2
    naming the column and the file, before any training."""
    from tagger.demo.drawn import make_demo_dataset
    from tagger.model.text import read_text_part

    demo = make_demo_dataset(tmp_path / "titled", n_train=120, n_catalog=0, n_bad=0, image_size=(48, 64))
    with open(demo.styles_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    manifest = demo.root / "titled.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sku", "photo", "garment", "colour", "title"])
        for i, r in enumerate(rows):
            writer.writerow([f"sku-{r['id']}", f"images/{r['id']}.jpg", r["articleType"], r["baseColour"],
                             "" if i == 0 else f"Acme {r['baseColour']} {r['articleType']}"])
    columns = ["--id-column", "sku", "--image-column", "photo"]
    attrs = ["--attribute", "garment", "--attribute", "colour"]
    out = tmp_path / "bundle"
    result = run("retrain", "--data", str(manifest), *attrs, *columns, "--text-column", "title", "--out", str(out),
                 "--log-dir", str(tmp_path / "logs"), *COMMON)
    assert result.exit_code == 0, result.output
    part = read_text_part(load_bundle(str(out)))
    assert part is not None and part.fields == ("title",)
    test = json.loads((out / "model.json").read_text())["text"]["metrics"]["test"]
    assert set(test) == set(ATTRS) and test["colour"]["text"] > 0.8  # the titles name the colour

    result = run("evaluate", "--model", str(out), "--data", str(manifest), *columns, "--split", "test", "--workers", "0",
                 "--no-plots", "--out", str(tmp_path / "eval"), "--text-column", "title")
    assert result.exit_code == 0, result.output
    assert "by input, same rows (text: title" in result.output
    table = result.output.split("by input, same rows")[1].splitlines()
    line = next(x for x in table if x.startswith("colour"))
    photos, text, both = (float(v) for v in line.replace("%", "").split()[2:5])
    assert text > 80 and both >= photos

    for command in (["retrain", *attrs, "--out", str(tmp_path / "no"), "--log-dir", str(tmp_path / "logs2"), *COMMON],
                    ["evaluate", "--model", str(out), "--split", "test", "--workers", "0", "--out", str(tmp_path / "eval2")]):
        bad = CliRunner().invoke(cli, [*command, "--data", str(manifest), *columns, "--text-column", "blurb"])
        assert bad.exit_code == 2, bad.output
        assert "'blurb'" in bad.output and str(manifest) in bad.output
    assert not (tmp_path / "no").exists() and not (tmp_path / "eval2").exists()
