"""Issue 31: `tagger evaluate --baseline BUNDLE`: both bundles on the same rows, the paired difference per attribute."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

from jobs.cli import cli
from tagger.metrics import accuracy_se, paired_difference


def test_paired_difference_counts_only_the_rows_that_changed():
    first = np.array([1, 1, 1, 0, 0, 1, 0, 1, 1, 0], dtype=bool)
    second = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=bool)  # broke 1 (row 2), fixed 3 (rows 3, 4, 9)
    d = paired_difference(first, second)
    assert (d["n"], d["fixed"], d["broken"]) == (10, 3, 1)
    assert d["difference"] == pytest.approx(0.2)
    assert d["paired_se"] == pytest.approx(math.sqrt(4 - 4 / 10) / 10)
    assert accuracy_se(0.784, 37) == pytest.approx(0.0677, abs=1e-4)  # the 37-row figure: about ±7 points
    same = paired_difference(first, first)
    assert same["difference"] == 0 and same["paired_se"] == 0


def test_evaluate_baseline_scores_both_bundles_on_the_same_rows(demo, tiny_bundle, tmp_path):
    from tagger.demo.drawn import CLASSES
    from tagger.model.bundle import save_bundle
    from tagger.model.network import create_tagger_net, resolve_data_config

    torch.manual_seed(1)
    labels = {name: list(values) for name, values in CLASSES.items()}
    other = tmp_path / "other"
    net = create_tagger_net("test_efficientnet", {k: len(v) for k, v in labels.items()}, resolve_data_config("test_efficientnet", 32))
    save_bundle(net, str(other), backbone="test_efficientnet", labels=labels)

    report = tmp_path / "report"
    result = CliRunner().invoke(cli, ["evaluate", "--model", str(other), "--baseline", tiny_bundle, "--data", str(demo.root),
                                      "--split", "all", "--out", str(report), "--workers", "0", "--no-plots"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"against the baseline {tiny_bundle}" in result.output and "difference ±paired SE" in result.output

    comparison = pl.read_parquet(report / "comparison.parquet")
    metrics = pl.read_parquet(report / "metrics.parquet")
    assert comparison["attribute"].to_list() == list(CLASSES)
    changed = pl.read_parquet(report / "changed_rows.parquet")
    for row in comparison.iter_rows(named=True):
        mine = metrics.filter(pl.col("attribute") == row["attribute"]).row(0, named=True)
        assert row["n"] == mine["n"] and row["accuracy"] == pytest.approx(mine["accuracy"])  # the same rows as its own report
        assert row["difference"] == pytest.approx(row["accuracy"] - row["baseline_accuracy"])
        assert row["difference"] == pytest.approx((row["fixed"] - row["broken"]) / row["n"])
        rows = changed.filter(pl.col("attribute") == row["attribute"])
        assert len(rows) == row["changed"] >= row["fixed"] + row["broken"]
        assert (rows["change"] == "fixed").sum() == row["fixed"] and (rows["change"] == "broken").sum() == row["broken"]
    assert "## Against the baseline" in (report / "report.md").read_text()
