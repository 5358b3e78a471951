"""Issue 31: attributes know where they apply. A scoped attribute (applies_when) is null, not a guess, out of its
scope: in the Predictor, the tag job's tables, evaluate and predict; retrain records the scope and learns within it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

from jobs.cli import cli
from tagger.model.bundle import BundleError, load_bundle, save_bundle
from tagger.model.scope import Scope, parse_applies_when
from tagger.tag.writers import read_complete_partition

DATE = "2026-01-02"


def catalog_images(demo) -> list[str]:
    with open(demo.catalog, newline="") as handle:
        return [str(Path(demo.root, r["image"])) if not Path(r["image"]).is_absolute() else r["image"] for r in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def scoped(demo, tiny_bundle, tmp_path_factory) -> tuple[str, str, tuple[str, ...]]:
    """The tiny bundle's weights with ``season`` scoped to the masterCategory values it predicts for about half the
    demo catalog: (bundle folder, scope attribute, values)."""
    from tagger.model.inference import InferenceSpec, resolve
    from tagger.model.scoring import run_model

    bundle = load_bundle(tiny_bundle)
    images = [p for p in catalog_images(demo) if Path(p).is_file()]
    outputs = run_model(bundle, images, inference=resolve(InferenceSpec("cpu", "torch", "fp32"), bundle))
    for other in ("masterCategory", "gender", "subCategory", "articleType", "usage", "baseColour"):
        predicted = np.asarray([bundle.attributes[bundle.attribute_names.index(other)].labels[i] for i in outputs.top_index[other][outputs.ok]])
        kinds, counts = np.unique(predicted, return_counts=True)
        if len(kinds) >= 2:
            break
    else:
        pytest.skip("the random tiny bundle predicts one label for every demo image")
    values = (str(kinds[counts.argmax()]),)
    out = tmp_path_factory.mktemp("scoped") / "bundle"
    labels = {a.name: list(a.labels) for a in bundle.attributes}
    save_bundle(bundle.build_net(), str(out), backbone=bundle.backbone, labels=labels,
                thresholds={a.name: 0.3 for a in bundle.attributes}, scopes={"season": Scope(other, values)})
    return str(out), other, values


def test_the_scope_is_in_model_json_and_checked(scoped, tiny_bundle, tmp_path):
    path, other, values = scoped
    meta = json.loads(Path(path, "model.json").read_text())
    season = next(a for a in meta["attributes"] if a["name"] == "season")
    assert season["applies_when"] == {"attribute": other, "values": list(values)}
    assert "applies_when" not in next(a for a in meta["attributes"] if a["name"] == "gender")
    assert load_bundle(path).scopes == {"season": Scope(other, values)}
    # An unscoped bundle keeps its model_version: the field is written only where set.
    assert load_bundle(tiny_bundle).model_version == json.loads(Path(tiny_bundle, "model.json").read_text())["model_version"]
    bundle = load_bundle(tiny_bundle)
    with pytest.raises(BundleError, match="has no label 'Nowhere'"):
        save_bundle(bundle.build_net(), str(tmp_path / "b"), backbone=bundle.backbone, labels={a.name: list(a.labels) for a in bundle.attributes},
                    scopes={"season": Scope("masterCategory", ("Nowhere",))})
    assert parse_applies_when("pattern:masterCategory=Apparel, Footwear") == ("pattern", Scope("masterCategory", ("Apparel", "Footwear")))
    with pytest.raises(ValueError, match="ATTRIBUTE:OTHER=VALUE"):
        parse_applies_when("pattern=Apparel")


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_a_scoped_attribute_is_null_out_of_its_scope_in_the_tags(demo, scoped, tmp_path, engine):
    path, other, values = scoped
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["tag", "--catalog", str(demo.catalog), "--model", path, "--out", str(out), "--run-date", DATE,
                                      "--workers", "0", "--progress", "none", "--engine", engine], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    tags = pl.from_arrow(read_complete_partition(f"{out}/tags/run_date={DATE}"))
    inside = tags[other].is_in(list(values))
    assert inside.any() and (~inside).any()
    assert tags.filter(~inside)["season"].null_count() == int((~inside).sum())
    assert tags.filter(~inside)["season_score"].null_count() == int((~inside).sum())
    assert tags.filter(inside)["season"].null_count() == 0 and tags.filter(inside)["season_score"].is_between(0, 1).all()
    # A null tag is not sent to review: there is nothing to review.
    assert not any("season" in r for r in tags.filter(~inside)["needs_review"].to_list())
    assert tags["gender"].null_count() == 0  # unscoped attributes are tagged everywhere
    if engine == "local":  # the morning report reads a night with null tags
        report = CliRunner().invoke(cli, ["report", "--out", str(out), "--run-date", DATE], catch_exceptions=False)
        assert report.exit_code == 0, report.output
        body = json.loads((out / "_reports" / f"run_date={DATE}" / "report.json").read_text())
        assert sum(body["attributes"]["season"]["label_rows"].values()) == int(inside.sum())


def test_evaluate_and_predict_show_the_scope(demo, scoped, tmp_path):
    path, other, values = scoped
    report = tmp_path / "report"
    result = CliRunner().invoke(cli, ["evaluate", "--model", path, "--data", str(demo.root), "--split", "all", "--out", str(report),
                                      "--workers", "0", "--no-plots"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"season (where {other}={','.join(values)})" in result.output and "±" in result.output
    metrics = pl.read_parquet(report / "metrics.parquet")
    season = metrics.filter(pl.col("attribute") == "season").row(0, named=True)
    assert season["applies_when"] == f"{other}={','.join(values)}" and season["n_out_of_scope"] > 0
    predictions = pl.read_parquet(report / "predictions.parquet").filter(pl.col("error").is_null())
    outside = ~predictions[f"{other}_pred"].is_in(list(values))
    assert predictions.filter(outside)["season_pred"].null_count() == int(outside.sum()) > 0
    assert predictions.filter(~outside)["season_pred"].null_count() == 0

    images = [p for p in catalog_images(demo) if Path(p).is_file()][:12]
    result = CliRunner().invoke(cli, ["predict", *images, "--model", path, "--out", str(tmp_path / "gallery.html"), "--workers", "0"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = pl.read_parquet(tmp_path / "gallery.parquet")
    assert "out of this attribute's scope" in (tmp_path / "gallery.html").read_text()
    outside = ~rows[other].is_in(list(values))
    assert rows.filter(outside)["season"].null_count() == int(outside.sum())
    assert rows.filter(~outside)["season"].null_count() == 0


def test_narrow_labels_suggest_a_scope():
    from tagger.training.datamodule import narrow_slices

    vocab = {"masterCategory": ["Apparel", "Footwear", "Accessories"], "pattern": ["Solid", "Printed"]}
    rng = np.random.default_rng(0)
    category = rng.integers(0, 3, 300)
    pattern = np.where((category == 0) & (rng.random(300) < 0.8), rng.integers(0, 2, 300), -1)
    found = narrow_slices(np.stack([category, pattern], axis=1), vocab)
    assert [(a, o, v) for a, o, v, *_ in found] == [("pattern", "masterCategory", "Apparel")]
    assert narrow_slices(np.stack([category, pattern], axis=1), vocab, exclude={"pattern"}) == []


@pytest.mark.slow
def test_retrain_learns_a_scoped_attribute_within_its_scope(tmp_path, monkeypatch):
    from jobs.retrain import retrain as command
    from tagger.demo.drawn import make_demo_dataset
    from tagger.training import RetrainConfig, retrain
    from tagger.training.summary import format_summary

    monkeypatch.setenv("TAGGER_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    data = make_demo_dataset(tmp_path / "kaggle", n_train=120, n_catalog=0, n_bad=0, image_size=(48, 64)).root
    config = RetrainConfig(data=str(data), out=str(tmp_path / "b"), backbone="test_efficientnet", pretrained=False, input_size=32,
                           batch_size=16, max_epochs=1, progress=False, threads=1, freeze_stages=3, log_dir=str(tmp_path / "logs"),
                           applies_when=["season:masterCategory=Apparel"])
    bundle = retrain(config)
    assert load_bundle(str(tmp_path / "b")).scopes == {"season": Scope("masterCategory", ("Apparel",))}
    facts = bundle.training["data"]
    assert facts["applies_when"] == {"season": "masterCategory=Apparel"} and facts["labelled_out_of_scope"]["season"] > 0
    assert "n_labelled_out_of_scope" in bundle.training["metrics"]["test"]["season"]
    assert "scope    season where masterCategory=Apparel" in format_summary(bundle)

    for bad, message in [("season:colour=Red", "must name another attribute"), ("season:masterCategory=Nowhere", "has no label 'Nowhere'"),
                         ("season=Apparel", "ATTRIBUTE:OTHER=VALUE")]:
        result = CliRunner().invoke(command, ["--data", str(data), "--out", str(tmp_path / "x"), "--backbone", "test_efficientnet",
                                              "--no-pretrained", "--input-size", "32", "--applies-when", bad])
        assert result.exit_code == 2 and "--applies-when" in result.output and message in result.output, result.output
