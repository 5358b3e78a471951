"""``tagger evaluate``: metrics against scikit-learn and by hand, label mapping, report files, splits, exit codes."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from jobs.cli import cli
from tagger.demo.drawn import CLASSES, make_demo_dataset

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def evaluate(*args: str):
    return CliRunner().invoke(cli, ["evaluate", "--workers", "0", *args], catch_exceptions=False)


def assert_png(path: Path, min_bytes: int = 5_000, min_side: int = 250) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    assert len(data) > min_bytes, (path, len(data))
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    with Image.open(io.BytesIO(data)) as image:
        assert min(image.size) >= min_side, (path, image.size)
        # Not a blank canvas: a real figure has text and bars in several colours.
        assert len(image.convert("RGB").getcolors(1_000_000) or []) > 20


def styles_rows(root: Path) -> list[dict[str, str]]:
    with open(root / "styles.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def constant_bundle(out: Path, *, thresholds=None, training=None, bias: float = 2.0) -> str:
    """A bundle whose every head always answers its first label with the same score: hand-checkable."""
    import torch

    from tagger.model.bundle import save_bundle
    from tagger.model.network import create_tagger_net, resolve_data_config

    torch.manual_seed(0)
    labels = {name: list(values) for name, values in CLASSES.items()}
    net = create_tagger_net("test_efficientnet", {k: len(v) for k, v in labels.items()}, resolve_data_config("test_efficientnet", 32))
    with torch.no_grad():
        for head in net.heads.values():
            head.weight.zero_()
            head.bias.zero_()
            head.bias[0] = bias
    save_bundle(net, str(out), backbone="test_efficientnet", labels=labels, thresholds=thresholds, training=training)
    return str(out)


def constant_score(n_labels: int, bias: float = 2.0) -> float:
    return math.exp(bias) / (math.exp(bias) + n_labels - 1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("eval-data"), n_train=60, n_catalog=10, image_size=(60, 80)).root


@pytest.fixture(scope="module")
def retrained(data, tmp_path_factory) -> str:
    """A real retrain bundle (1 epoch, test_efficientnet at 32 px): split.parquet, folded labels, training facts."""
    from tagger.training import RetrainConfig, retrain

    out = tmp_path_factory.mktemp("eval-bundle") / "retrained"
    retrain(
        RetrainConfig(
            data=str(data), out=str(out), backbone="test_efficientnet", pretrained=False, input_size=32, max_epochs=1,
            batch_size=16, workers=0, val_fraction=0.2, test_fraction=0.2, progress=False, cache_images="on",
            log_dir=str(out.parent / "logs"),
        )
    )
    return str(out)


@pytest.fixture(scope="module")
def external(tmp_path_factory) -> Path:
    """Another Kaggle-layout folder: a label no model knows, an empty cell, a corrupt image."""
    root = make_demo_dataset(tmp_path_factory.mktemp("eval-external"), n_train=24, n_catalog=0, n_bad=0, seed=7,
                             image_size=(60, 80)).root
    rows = styles_rows(root)
    rows[0]["articleType"] = rows[1]["articleType"] = "Kurtas"
    rows[2]["baseColour"] = ""
    with open(root / "styles.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (root / "images" / f"{rows[3]['id']}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


# ---------------------------------------------------------------------------------------------- arithmetic


def test_metrics_agree_with_sklearn_and_by_hand():
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    from tagger.metrics import attribute_metrics, confusion, per_class

    # 4 classes, class 3 ("D") never occurs and is never predicted.
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 2, 0, 1])
    scores = np.array([0.9, 0.8, 0.4, 0.7, 0.6, 0.95, 0.3, 0.5])
    m = attribute_metrics(y_true, y_pred, 4, scores=scores, all_scores=np.r_[scores, 0.2, 0.99], threshold=0.6, majority=0)
    assert m["n"] == 8
    assert m["accuracy"] == pytest.approx(5 / 8)
    # By hand: A p=2/3 r=2/3 f=2/3; B p=2/4 r=2/2 f=2/3; C p=1/1 r=1/3 f=1/2; D absent from the macro mean.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx((3 * 2 / 3 + 2 * 2 / 3 + 3 * 1 / 2) / 8)
    assert m["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))
    assert m["majority_accuracy"] == pytest.approx(3 / 8)
    # threshold 0.6: covered rows 0 1 3 4 5 (scores 0.9 0.8 0.7 0.6 0.95), all right; the wrong ones scored lower.
    # Coverage counts every decoded image (10, two without a label): 6 reach 0.6.
    assert (m["n_covered"], m["accuracy_covered"], m["coverage"]) == (5, 1.0, pytest.approx(6 / 10))
    m = attribute_metrics(y_true, y_pred, 4, scores=scores, threshold=0.5)  # row 7 (0.5, wrong) joins: 5 of 6
    assert (m["n_covered"], m["accuracy_covered"], m["coverage"]) == (6, pytest.approx(5 / 6), pytest.approx(6 / 8))
    assert (m["n_classes"], m["n_classes_present"]) == (4, 3)

    rows = {r["label"]: r for r in per_class(y_true, y_pred, ["A", "B", "C", "D"])}
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2], zero_division=0)
    for k, label in enumerate("ABC"):
        assert (rows[label]["precision"], rows[label]["recall"], rows[label]["f1"], rows[label]["support"]) == (
            pytest.approx(p[k]), pytest.approx(r[k]), pytest.approx(f[k]), s[k])
    assert rows["B"]["predicted"] == 4
    assert math.isnan(rows["D"]["precision"]) and math.isnan(rows["D"]["recall"]) and rows["D"]["support"] == 0
    assert confusion(y_true, y_pred, 4).tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]


def test_retrains_running_validation_metric_is_evaluates_definition():
    """The LightningModule's val metrics (a torchmetrics confusion matrix, fed batch by batch, -1 ignored),
    retrain's split_metrics (model.json) and evaluate's attribute_metrics agree, on random data."""
    import torch

    from tagger.metrics import attribute_metrics, confusion_scores, split_metrics
    from tagger.training.module import _confusion_matrices

    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(6), size=200).astype(np.float32)
    probs[:, 5] = 0.0  # a class that is never predicted...
    targets = rng.integers(0, 5, size=200)  # ...and never occurs
    targets[:7] = -1
    ours = attribute_metrics(targets[targets >= 0], probs.argmax(1)[targets >= 0], 6)
    theirs = split_metrics({"a": probs}, targets[:, None])["a"]
    running = _confusion_matrices({"a": 6})["a"]
    for start in range(0, 200, 64):
        running.update(torch.from_numpy(probs[start:start + 64]), torch.from_numpy(targets[start:start + 64]))
    streamed = confusion_scores(running.compute().numpy())
    assert ours["n"] == theirs["n"] == 193
    for key in ("accuracy", "macro_f1"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-12) == pytest.approx(streamed[key], abs=1e-12)


def test_labels_are_mapped_like_retrain_made_its_targets():
    from tagger.data.labels import encode_labels

    vocab = {"articleType": ["Shirts", "Tshirts", "Other"], "baseColour": ["Black", "Blue"]}
    training = {"data": {"folded": {"articleType": {"Jeans": 3}, "baseColour": {"Red": 2}},
                         "folded_into": {"articleType": "Other", "baseColour": "unknown"}}}
    columns = {
        "articleType": ["Shirts", "Jeans", "Kurtas", None, "Tshirts", "Kurtas"],
        "baseColour": ["Black", "Red", "Blue", "Teal", None, "Blue"],
    }
    targets, mapping = encode_labels(columns, vocab, training)
    assert targets[:, 0].tolist() == [0, 2, -1, -1, 1, -1]  # Jeans folded into Other; Kurtas unknown; None missing
    assert targets[:, 1].tolist() == [0, -1, 1, -1, -1, 1]  # Red masked as retrain did; Teal unknown
    a, c = mapping["articleType"], mapping["baseColour"]
    assert (a.known, a.missing, a.n_folded, a.n_masked, a.n_unknown) == (3, 1, 1, 0, 2)
    assert a.unknown == {"Kurtas": 2}
    assert (c.known, c.missing, c.n_folded, c.n_masked, c.n_unknown) == (3, 1, 0, 1, 1)

    targets, mapping = encode_labels(columns, vocab, training, unknown_labels="other")
    assert targets[:, 0].tolist() == [0, 2, 2, -1, 1, 2] and mapping["articleType"].unknown_as_other
    assert targets[:, 1].tolist() == [0, -1, 1, -1, -1, 1]  # no Other class: unknown stays excluded
    assert not mapping["baseColour"].unknown_as_other


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.precision
def test_evaluate_writes_the_report_and_reproduces_retrains_test_metrics(retrained, data, tmp_path):
    from tagger.model.bundle import load_bundle
    from tagger.evaluation.report import METRICS_SCHEMA

    out = tmp_path / "report"
    result = evaluate("--model", retrained, "--data", str(data), "--split", "test", "--out", str(out))
    assert result.exit_code == 0, result.output

    metrics = pq.read_table(out / "metrics.parquet")
    assert metrics.schema.names == METRICS_SCHEMA.names
    per_class = pq.read_table(out / "per_class.parquet")
    assert {"attribute", "label", "precision", "recall", "f1", "support"} <= set(per_class.schema.names)
    bundle = load_bundle(retrained)
    assert metrics.column("attribute").to_pylist() == bundle.attribute_names
    assert per_class.num_rows == sum(len(a.labels) for a in bundle.attributes)

    # The bundle's own test split, scored as retrain scored it at the end of training.
    test_facts = bundle.training["metrics"]["test"]
    for row in metrics.to_pylist():
        facts = test_facts[row["attribute"]]
        assert row["n"] == facts["n"] == bundle.training["split"]["sizes"]["test"]
        assert row["accuracy"] == pytest.approx(facts["accuracy"], abs=1e-6)
        assert row["macro_f1"] == pytest.approx(facts["macro_f1"], abs=1e-6)
        assert row["majority_label"] == facts["majority_label"] and row["majority_source"] == "training facts"
        assert row["majority_accuracy"] == pytest.approx(facts["majority_accuracy"])
        support = sum(r["support"] for r in per_class.to_pylist() if r["attribute"] == row["attribute"])
        assert support == row["n"]

    report = (out / "report.md").read_text()
    assert "## Summary: model vs majority baseline" in report
    assert all(f"## {name}" in report for name in bundle.attribute_names)
    assert bundle.model_version in report
    for png in ["summary", *(f"f1_{a}" for a in bundle.attribute_names), *(f"confusion_{a}" for a in bundle.attribute_names)]:
        assert_png(out / "plots" / f"{png}.png")
        assert f"plots/{png}.png" in report
    predictions = pq.read_table(out / "predictions.parquet")
    assert predictions.num_rows == bundle.training["split"]["sizes"]["test"]

    # stdout: the summary table, one line per attribute.
    assert "majority baseline" in result.stdout and "macro-F1" in result.stdout
    assert all(any(line.startswith(name + " ") for line in result.stdout.splitlines()) for name in bundle.attribute_names)


@pytest.mark.precision
@pytest.mark.parametrize("native_bf16", ["1", "0"])
def test_retrain_scores_on_the_runtime_and_precision_evaluate_picks_at_auto(data, tmp_path, monkeypatch, native_bf16):
    """With PyTorch the only runtime, auto is bf16 autocast on a CPU with native bfloat16 and fp32 elsewhere:
    retrain's recorded test metrics (and the thresholds calibrated beside them) must be those of the scores
    that evaluate (and tag) compute at auto, on either kind of CPU. Equal, not close: the same runtime, the
    same precision, the same images. (With ONNX Runtime installed, auto is ONNX Runtime fp32 on every CPU:
    the test above.)"""
    from tagger.model import engines
    from tagger.model.bundle import load_bundle
    from tagger.training import RetrainConfig, retrain

    monkeypatch.setenv("TAGGER_CPU_BF16", native_bf16)
    monkeypatch.setattr(engines, "installed", lambda name: name == "torch")
    out = tmp_path / "bundle"
    retrain(RetrainConfig(data=str(data), out=str(out), backbone="test_efficientnet", pretrained=False, input_size=32,
                          max_epochs=1, batch_size=16, workers=0, val_fraction=0.2, test_fraction=0.2, progress=False,
                          cache_images="on", log_dir=str(tmp_path / "logs")))
    bundle = load_bundle(str(out))
    precision = "bf16" if native_bf16 == "1" else "fp32"
    assert {k: bundle.training["scored_with"][k] for k in ("runtime", "precision")} == {"runtime": "torch", "precision": precision}
    result = evaluate("--model", str(out), "--data", str(data), "--split", "test", "--out", str(tmp_path / "report"), "--no-plots")
    assert result.exit_code == 0, result.output
    for row in pq.read_table(tmp_path / "report" / "metrics.parquet").to_pylist():
        facts = bundle.training["metrics"]["test"][row["attribute"]]
        assert (row["accuracy"], row["macro_f1"]) == (facts["accuracy"], facts["macro_f1"]), row["attribute"]


def test_a_constant_model_scores_what_a_hand_count_says(data, tmp_path):
    from tagger.data.split import write_split

    rows = styles_rows(data)
    ids = [r["id"] for r in rows]
    assignment = np.array([0] * 40 + [1] * 10 + [2] * 10, dtype=np.int8)
    # gender's constant score is above its threshold, season's below: coverage 1 and 0.
    gender_score = constant_score(len(CLASSES["gender"]))
    bundle = constant_bundle(tmp_path / "constant", thresholds={"gender": gender_score - 0.01, "season": gender_score})
    write_split(str(tmp_path / "constant" / "split.parquet"), ids, assignment)

    out = tmp_path / "report"
    result = evaluate("--model", bundle, "--data", str(data), "--out", str(out), "--no-plots")
    assert result.exit_code == 0, result.output
    metrics = {r["attribute"]: r for r in pq.read_table(out / "metrics.parquet").to_pylist()}
    per_class = {(r["attribute"], r["label"]): r for r in pq.read_table(out / "per_class.parquet").to_pylist()}
    test_rows, train_rows = rows[50:], rows[:40]
    for attr, labels in CLASSES.items():
        first = labels[0]  # what the constant model always answers
        hits = sum(r[attr] == first for r in test_rows)
        m = metrics[attr]
        assert m["n"] == 10 and m["accuracy"] == pytest.approx(hits / 10)
        # No training facts in this bundle: the majority comes from the train split's rows of --data.
        counts = {label: sum(r[attr] == label for r in train_rows) for label in labels}
        majority = max(labels, key=lambda label: (counts[label], -labels.index(label)))
        assert (m["majority_label"], m["majority_source"]) == (majority, "train split rows")
        assert m["majority_accuracy"] == pytest.approx(sum(r[attr] == majority for r in test_rows) / 10)
        top = per_class[(attr, first)]
        assert (top["support"], top["predicted"]) == (hits, 10)
        assert top["precision"] == pytest.approx(hits / 10) and (top["recall"] == 1.0 if hits else math.isnan(top["recall"]))
        for label in labels[1:]:
            assert per_class[(attr, label)]["predicted"] == 0 and math.isnan(per_class[(attr, label)]["precision"])
    assert (metrics["gender"]["coverage"], metrics["season"]["coverage"]) == (1.0, 0.0)
    assert metrics["gender"]["accuracy_covered"] == pytest.approx(metrics["gender"]["accuracy"])
    assert not (out / "plots").exists()


@pytest.mark.precision
def test_split_all_evaluates_an_external_folder(retrained, external, tmp_path):
    from tagger.model.bundle import load_bundle

    bundle = load_bundle(retrained)
    out = tmp_path / "report"
    result = evaluate("--model", retrained, "--data", str(external), "--split", "all", "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = styles_rows(external)
    metrics = {r["attribute"]: r for r in pq.read_table(out / "metrics.parquet").to_pylist()}
    # 24 rows, one image corrupt: 23 scored, except the Kurtas (unknown) and the empty baseColour.
    assert metrics["articleType"]["n_unknown_label"] == 2
    assert metrics["articleType"]["n"] == 21 - metrics["articleType"]["n_masked"]
    assert metrics["baseColour"]["n_missing"] == 1 and metrics["baseColour"]["n"] == 22 - metrics["baseColour"]["n_masked"]
    assert metrics["gender"]["n"] == 23
    folded = set(bundle.training["data"]["folded"].get("articleType", {}))
    assert metrics["articleType"]["n_folded"] == sum(r["articleType"] in folded for r in rows)
    predictions = pq.read_table(out / "predictions.parquet").to_pylist()
    assert len(predictions) == 24
    broken = [p for p in predictions if p["error_type"] is not None]
    assert [p["id"] for p in broken] == [rows[3]["id"]] and broken[0]["gender_pred"] is None
    report = (out / "report.md").read_text()
    assert "## Unreadable images" in report and rows[3]["id"] in report and "unknown: Kurtas (2)" in report

    # The same data with unknown labels scored as Other (articleType has an Other class after folding).
    assert "Other" in bundle.attributes[bundle.attribute_names.index("articleType")].labels
    result = evaluate("--model", retrained, "--data", str(external), "--split", "all", "--out", str(tmp_path / "other"),
                      "--unknown-labels", "other", "--no-plots")
    assert result.exit_code == 0, result.output
    other = {r["attribute"]: r for r in pq.read_table(tmp_path / "other" / "metrics.parquet").to_pylist()}
    assert other["articleType"]["n"] == 23 and other["articleType"]["unknown_as_other"]


def test_split_all_flags_rows_the_model_was_trained_on(retrained, data, tmp_path):
    result = evaluate("--model", retrained, "--data", str(data), "--split", "all", "--out", str(tmp_path / "r"), "--no-plots")
    assert result.exit_code == 0, result.output
    assert "in the bundle's train split" in result.stdout and "optimistic" in result.stdout


def test_a_bundle_without_split_parquet(data, tmp_path):
    bundle = constant_bundle(tmp_path / "nosplit")
    result = evaluate("--model", bundle, "--data", str(data), "--split", "test", "--out", str(tmp_path / "r"))
    assert result.exit_code == 2
    assert "split.parquet" in result.output and "--split all" in result.output
    assert not (tmp_path / "r").exists()

    result = evaluate("--model", bundle, "--data", str(data), "--split", "all", "--out", str(tmp_path / "r"), "--no-plots")
    assert result.exit_code == 0, result.output
    metrics = pq.read_table(tmp_path / "r" / "metrics.parquet").to_pylist()
    assert {m["majority_source"] for m in metrics} == {"evaluated rows"}
    assert "the evaluated rows themselves" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--split", "holdout"], "holdout"),
        (["--batch-size", "0"], "batch-size"),
        (["--workers", "-1"], "workers"),
        (["--unknown-labels", "maybe"], "unknown-labels"),
        (["--storage-option", "novalue"], "KEY=VALUE"),
    ],
)
def test_bad_options_exit_2(tiny_bundle, data, tmp_path, args, message):
    result = evaluate("--model", tiny_bundle, "--data", str(data), "--out", str(tmp_path / "r"), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_invalid_inputs_exit_2(tiny_bundle, data, tmp_path):
    result = CliRunner().invoke(cli, ["evaluate", "--model", tiny_bundle], catch_exceptions=False)
    assert result.exit_code == 2 and "--data" in result.output
    result = evaluate("--model", str(tmp_path / "nothing"), "--data", str(data), "--split", "all")
    assert result.exit_code == 2 and "not a model bundle" in result.output
    (tmp_path / "empty").mkdir()
    result = evaluate("--model", tiny_bundle, "--data", str(tmp_path / "empty"), "--split", "all")
    assert result.exit_code == 2 and "styles.csv" in result.output


def test_device_cuda_without_a_gpu_exit_2(tiny_bundle, data, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    result = evaluate("--model", tiny_bundle, "--data", str(data), "--split", "all", "--device", "cuda")
    assert result.exit_code == 2 and "CUDA" in result.output


def _openvino() -> bool:
    from tagger.model import engines

    return engines.installed("openvino")


@pytest.mark.skipif(not _openvino(), reason="extra [openvino] not installed")
def test_check_precision_scores_both_ways_and_records_the_verdict_in_the_bundle(retrained, data, tmp_path):
    import shutil

    from tagger.model.bundle import load_bundle

    folder = tmp_path / "bundle"
    shutil.copytree(retrained, folder)
    before = load_bundle(str(folder))
    result = evaluate("--model", str(folder), "--data", str(data), "--split", "test", "--runtime", "openvino",
                      "--precision", "bf16", "--check-precision", "--workers", "0")
    assert result.exit_code == 0, result.output
    after = load_bundle(str(folder))
    assert after.model_version == before.model_version  # a check changes no prediction
    record = after.precision_checks["openvino bf16"]
    assert record["model_version"] == before.model_version and record["split"] == "test"
    assert list(record["attributes"]) == after.attribute_names
    drops = [v["drop_points"] for v in record["attributes"].values() if v["drop_points"] is not None]
    assert record["largest_drop_points"] == max(drops)
    # A few dozen test rows cannot show a 0.5-point drop: the check does not pass on them, whatever the drops.
    assert record["rows"] < 200 and record["passed"] is False and not after.validated("openvino", "bf16")
    assert "fewer than the 200 a check needs" in result.stdout
    assert "precision check of openvino bf16 against fp32" in result.stdout and "FAILED" in result.stdout
    # Its fp32 side is what a plain evaluate computes with the same runtime in fp32.
    plain = evaluate("--model", str(folder), "--data", str(data), "--split", "test", "--runtime", "openvino", "--precision", "fp32",
                     "--out", str(tmp_path / "report"), "--no-plots", "--workers", "0")
    assert plain.exit_code == 0, plain.output
    for row in pq.read_table(tmp_path / "report" / "metrics.parquet").to_pylist():
        assert record["attributes"][row["attribute"]]["accuracy_fp32"] == pytest.approx(row["accuracy"], abs=1e-9)
    assert not (folder.parent / "out").exists()  # no report folder written by the check


@pytest.mark.parametrize("args, message", [
    (["--runtime", "openvino", "--precision", "fp32"], "give --precision bf16 or int8"),
    (["--runtime", "onnx", "--precision", "bf16"], "--runtime torch or openvino"),
])
def test_check_precision_refuses_what_it_cannot_compare(tiny_bundle, data, args, message):
    result = evaluate("--model", tiny_bundle, "--data", str(data), "--split", "all", "--check-precision", *args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_check_precision_on_a_read_only_bundle_is_exit_2_before_scoring(tiny_bundle, data, tmp_path, monkeypatch):
    import os
    import shutil

    from tagger.evaluation import precision_check

    folder = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, folder)
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path).startswith(str(folder)) and mode == os.W_OK else real(path, mode))
    monkeypatch.setattr(precision_check, "evaluate", lambda *a, **k: pytest.fail("scored a bundle whose verdict cannot be written"))
    result = evaluate("--model", str(folder), "--data", str(data), "--split", "all", "--runtime", "openvino", "--precision", "bf16",
                      "--check-precision")
    assert result.exit_code == 2 and "is not writable" in result.output and "copy the bundle" in result.output, result.output


def test_evaluate_reads_a_labelled_manifest_of_cdn_urls_from_allowed_hosts_only(retrained, data, tmp_path):
    """A retailer's labelled catalog points at its CDN: evaluate reads those photos as the tag job does, from
    the hosts --allow-host names, and scores them like the same photos on disk."""
    from .http_server import PhotoServer

    rows = styles_rows(data)[:12]
    server = PhotoServer(data / "images").start()
    try:
        names = ["gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "usage"]
        for kind, location in (("local", lambda r: str(data / "images" / f"{r['id']}.jpg")),
                               ("cdn", lambda r: f"{server.url}/img/{r['id']}.jpg")):
            with open(tmp_path / f"{kind}.csv", "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["product_id", "image", *names])
                writer.writerows([r["id"], location(r), *(r[n] for n in names)] for r in rows)
        local = evaluate("--model", retrained, "--data", str(tmp_path / "local.csv"), "--split", "all", "--workers", "0",
                         "--out", str(tmp_path / "local"), "--no-plots")
        assert local.exit_code == 0, local.output
        refused = evaluate("--model", retrained, "--data", str(tmp_path / "cdn.csv"), "--split", "all", "--workers", "0",
                           "--out", str(tmp_path / "refused"), "--no-plots")
        assert refused.exit_code == 2 and "none of the 12 images could be decoded" in refused.output
        assert "--allow-host" in refused.output, refused.output
        allowed = evaluate("--model", retrained, "--data", str(tmp_path / "cdn.csv"), "--split", "all", "--workers", "0",
                           "--out", str(tmp_path / "cdn"), "--no-plots", "--allow-host", "127.0.0.1:*",
                           "--allow-private-addresses", "--allow-plain-http")
        assert allowed.exit_code == 0, allowed.output
        assert server.count("GET", "/img/") == 12
    finally:
        server.stop()
    same = ["attribute", "n", "accuracy", "macro_f1"]
    assert (pq.read_table(tmp_path / "cdn" / "metrics.parquet").select(same).to_pylist()
            == pq.read_table(tmp_path / "local" / "metrics.parquet").select(same).to_pylist())
    widen = evaluate("--model", retrained, "--data", str(tmp_path / "cdn.csv"), "--split", "all", "--allow-plain-http")
    assert widen.exit_code == 2 and "which names no host" in widen.output


def test_an_out_it_cannot_write_is_exit_2_before_the_model_runs(tiny_bundle, data, tmp_path, monkeypatch):
    from tagger.model import scoring

    monkeypatch.setattr(scoring, "run_model", lambda *a, **k: pytest.fail("the model ran before --out was checked"))
    (tmp_path / "a-file").write_text("in the way")
    result = evaluate("--model", tiny_bundle, "--data", str(data), "--split", "all", "--out", str(tmp_path / "a-file" / "report"))
    assert result.exit_code == 2, result.output
    assert "is a file, so no folder can be made under it" in result.output and "Traceback" not in result.output
