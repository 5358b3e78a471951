"""retrain() and `tagger retrain` end to end, on a small generated Kaggle-layout folder."""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tagger.attributes import ATTRIBUTES
from tagger.model.bundle import load_bundle
from tagger.training import ConfigError, RetrainConfig, retrain
from tagger.data.split import read_split

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory) -> Path:
    """The demo generator's layout, plus the warts of the real file: a line with unquoted commas in
    productDisplayName, a row without an image, and an image that does not decode."""
    from tagger.demo.drawn import make_demo_dataset

    demo = make_demo_dataset(tmp_path_factory.mktemp("kaggle"), n_train=150, n_catalog=0, n_bad=0, image_size=(48, 64))
    lines = demo.styles_csv.read_text(encoding="utf-8").splitlines()
    first = lines[1].split(",")
    extra = [
        ",".join(["900001", *first[1:9], "Brand, Inc. Red, Slim Tshirt"]),  # 12 fields
        ",".join(["900002", *first[1:10]]),  # no image
        ",".join(["900003", *first[1:10]]),  # corrupt image
    ]
    demo.styles_csv.write_text("\n".join(lines + extra) + "\n", encoding="utf-8")
    shutil.copy(demo.images_dir / f"{first[0]}.jpg", demo.images_dir / "900001.jpg")
    (demo.images_dir / "900003.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return demo.root


def config(data: Path, out: Path, **overrides) -> RetrainConfig:
    settings = dict(
        backbone="test_efficientnet", pretrained=False, input_size=32, batch_size=32, max_epochs=2, lr=5e-3,
        progress=False, threads=1, log_dir=str(out.parent / f"{out.name}-logs"),
    )
    settings.update(overrides)
    return RetrainConfig(data=str(data), out=str(out), **settings)


@pytest.fixture(scope="module")
def trained(kaggle, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "bundle"
    return retrain(config(kaggle, out)), out


def test_retrain_writes_a_bundle_that_loads_and_predicts(trained):
    bundle, out = trained
    loaded = load_bundle(str(out))
    assert loaded.model_version == bundle.model_version
    assert loaded.attribute_names == list(ATTRIBUTES) and loaded.input_size == 32
    net = loaded.build_net()
    with torch.no_grad():
        logits = net(torch.full((2, 3, 32, 32), 255, dtype=torch.uint8))
    assert {k: tuple(v.shape) for k, v in logits.items()} == {a.name: (2, len(a.labels)) for a in loaded.attributes}
    assert all(0.0 <= a.threshold <= 1.0 for a in loaded.attributes)


def test_bundle_holds_the_best_checkpoint_weights(trained):
    bundle, _ = trained
    checkpoint = torch.load(bundle.training["best_checkpoint"], map_location="cpu", weights_only=True)
    net = bundle.build_net()
    for key, value in net.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][f"net.{key}"]), key
    assert bundle.training["best_epoch"] == checkpoint["epoch"]


def test_training_facts_account_for_every_row(trained):
    bundle, out = trained
    t = bundle.training
    rows = t["data"]["rows"]
    assert rows["lines"] == 153 and rows["repaired"] == 1
    assert rows["missing_image"] == 1 and rows["missing_image_ids"] == ["900002"]
    assert rows["unreadable_image"] == 1 and rows["unreadable_image_ids"] == ["900003"]
    assert rows["used"] == 151 == sum(t["split"]["sizes"].values())
    assert t["data"]["fingerprint"].startswith("sha256:") and t["data"]["min_label_count"] == 5
    for stage in ("val", "test"):
        assert set(t["metrics"][stage]) == set(ATTRIBUTES)
    test = t["metrics"]["test"]["baseColour"]
    assert {"accuracy", "macro_f1", "n", "majority_accuracy", "majority_label"} <= set(test)
    assert t["backbone"] == "test_efficientnet" and t["weights_init"] == "random" and t["seed"] == 0
    assert t["epochs"] == 2 and t["config"]["max_epochs"] == 2
    split = read_split(str(out / "split.parquet"))
    assert len(split) == 151 and "900001" in split and "900003" not in split
    assert {s: list(split.values()).count(s) for s in ("train", "val", "test")} == t["split"]["sizes"]


def test_resume_continues_and_the_cli_prints_a_summary(trained, kaggle, tmp_path):
    from jobs.retrain import retrain as command

    bundle, _ = trained
    last = str(Path(bundle.training["best_checkpoint"]).parent / "last.ckpt")
    out = tmp_path / "resumed"
    result = CliRunner().invoke(
        command,
        ["--data", str(kaggle), "--out", str(out), "--backbone", "test_efficientnet", "--no-pretrained", "--input-size", "32",
         "--batch-size", "32", "--max-epochs", "3", "--lr", "5e-3", "--no-progress", "--threads", "1", "--resume", last,
         "--log-dir", str(tmp_path / "logs")],
    )
    assert result.exit_code == 0, result.output
    assert "mean macro-F1" in result.output and "baseColour" in result.output
    resumed = load_bundle(str(out))
    assert resumed.training["epochs"] == 3 and resumed.training["global_steps"] > bundle.training["global_steps"]


def test_resume_refuses_a_checkpoint_for_other_labels(trained):
    from tagger.training.train import check_resume

    bundle, _ = trained
    labels = {a.name: list(a.labels) for a in bundle.attributes}
    check_resume(bundle.training["best_checkpoint"], labels)
    labels["baseColour"] = labels["baseColour"] + ["Magenta"]
    with pytest.raises(ConfigError, match="label vocabularies differ from this data's for baseColour"):
        check_resume(bundle.training["best_checkpoint"], labels)


def test_retrain_reads_and_writes_s3(kaggle, s3_bucket, tmp_path):
    from tests.conftest import upload_tree

    bucket, fs = s3_bucket
    upload_tree(fs, kaggle, f"{bucket}/kaggle")
    out = f"s3://{bucket}/models/v1"
    settings = replace(config(kaggle, tmp_path / "local"), data=f"s3://{bucket}/kaggle", out=out, max_epochs=1, cache_images="off")
    bundle = retrain(settings)
    assert load_bundle(out).model_version == bundle.model_version
    assert fs.exists(f"{bucket}/models/v1/split.parquet")
    # Lazy decoding finds the corrupt image while loading and still counts it.
    assert bundle.training["data"]["rows"]["unreadable_image"] == 1


# --------------------------------------------------------------------------- CLI errors

def invoke(*args: str):
    from jobs.retrain import retrain as command

    return CliRunner().invoke(command, list(args))


def test_cli_rejects_bad_options_with_exit_2(kaggle, tmp_path):
    result = invoke("--data", str(kaggle), "--out", str(tmp_path / "o"), "--batch-size", "0")
    assert result.exit_code == 2 and "Invalid value for '--batch-size'" in result.output
    result = invoke("--data", str(kaggle), "--out", str(tmp_path / "o"), "--min-label-count", "often")
    assert result.exit_code == 2 and "expected 'auto' or a positive integer" in result.output
    result = invoke("--data", str(kaggle), "--out", str(tmp_path / "o"), "--backbone", "efficientnet_b99")
    assert result.exit_code == 2 and "unknown timm backbone 'efficientnet_b99'" in result.output
    result = invoke("--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "Missing option '--data'" in result.output
    result = invoke("--data", str(kaggle), "--out", str(tmp_path / "o"), "--storage-option", "novalue")
    assert result.exit_code == 2 and "expected KEY=VALUE" in result.output


def test_cli_names_a_folder_that_is_not_kaggle_data(tmp_path):
    result = invoke("--data", str(tmp_path), "--out", str(tmp_path / "o"), "--backbone", "test_efficientnet", "--no-pretrained")
    assert result.exit_code == 2
    assert "--data" in result.output and "styles.csv: not found" in result.output


def test_cli_cuda_without_a_gpu_is_a_clear_error(kaggle, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke("--data", str(kaggle), "--out", str(tmp_path / "o"), "--device", "cuda", "--no-pretrained")
    assert result.exit_code == 2
    assert "--device" in result.output and "no CUDA GPU is visible" in result.output


def test_cli_pretrained_without_network_fails_clearly(kaggle, tmp_path, monkeypatch):
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:  # what the hub client raises with no route to huggingface.co, without waiting for it
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    result = invoke("--data", str(kaggle), "--out", str(tmp_path / "o"), "--backbone", "test_efficientnet", "--pretrained")
    assert result.exit_code == 1
    assert "could not load ImageNet-pretrained weights for 'test_efficientnet'" in result.output
    assert "--no-pretrained" in result.output and "--init-weights" in result.output
    assert not (tmp_path / "o").exists()  # failed before any data was read or anything written


def test_config_validation_names_the_setting(kaggle, tmp_path):
    with pytest.raises(ConfigError) as error:
        RetrainConfig(data=str(kaggle), out=str(tmp_path), val_fraction=0.5, test_fraction=0.5).validate()
    assert error.value.option == "val_fraction"
    with pytest.raises(ConfigError, match="none.ckpt: no such checkpoint file") as error:
        RetrainConfig(data=str(kaggle), out=str(tmp_path), resume=str(tmp_path / "none.ckpt")).validate()
    assert error.value.option == "resume"
    assert np.isclose(RetrainConfig(data="d", out="o").validate().lr, 5e-4)


def test_cli_bar_on_stderr_logs_beside_the_bundle_and_max_minutes_bounds_the_command(kaggle, tmp_path):
    """Issue 23: `> log.txt` holds the summary, not bar frames; the bundle folder holds the bundle only; the
    time limit counts the time spent before the first epoch."""
    from jobs.retrain import retrain as command

    out = tmp_path / "model"
    args = ["--data", str(kaggle), "--out", str(out), "--backbone", "test_efficientnet", "--no-pretrained",
            "--input-size", "32", "--batch-size", "32", "--max-epochs", "1", "--threads", "1", "--workers", "0"]
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    assert "Epoch 0" in result.stderr and "Epoch" not in result.stdout and "mean macro-F1" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors", "split.parquet"]
    logs = Path(f"{out}.logs")
    assert list(logs.glob("version_*/checkpoints/*.ckpt")), "checkpoints beside the bundle"
    assert load_bundle(str(out)).training["log_dir"].startswith(str(logs))

    from tagger.training.budget import Budget

    clock = [0.0]
    budget = Budget(10, clock=lambda: clock[0])
    clock[0] = 60.0
    assert budget.for_fitting(reserve_s=30) == pytest.approx(510)
    clock[0] = 590.0
    with pytest.raises(ConfigError, match="was spent before the first epoch"):
        budget.for_fitting(reserve_s=30)
