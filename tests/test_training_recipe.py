"""The CPU recipe: several --data folders as one data set, and a frozen trunk whose features are cached."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tagger.model.bundle import load_bundle
from tagger.model.network import create_tagger_net, resolve_data_config
from tagger.training import ConfigError, RetrainConfig, retrain
from tagger.data.kaggle import load_kaggle


@pytest.fixture(autouse=True)
def own_cache(monkeypatch, tmp_path):
    """Trunk features are cached under $TAGGER_CACHE (tagger.training.features): the test's own, not the user's."""
    monkeypatch.setenv("TAGGER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory) -> tuple[Path, Path]:
    """One generated data set cut in two folders, each with the full styles.csv, like fashion-sample/-more."""
    from tagger.demo.drawn import make_demo_dataset

    demo = make_demo_dataset(tmp_path_factory.mktemp("kaggle"), n_train=120, n_catalog=0, n_bad=0, image_size=(48, 64))
    second = tmp_path_factory.mktemp("more")
    (second / "images").mkdir()
    shutil.copy(demo.styles_csv, second / "styles.csv")
    for image in sorted(demo.images_dir.glob("*.jpg"))[::2]:
        shutil.move(str(image), second / "images" / image.name)
    return demo.root, second


def test_several_folders_are_one_data_set(two_folders):
    first, second = two_folders
    one = load_kaggle(str(first))
    both = load_kaggle([str(first), str(second)])
    assert one.report.missing_image > 0  # half of the rows have their image in the other folder
    assert both.report.missing_image == 0 and both.table.height == 120
    assert both.report.duplicate_id == 0  # an identical styles.csv beside each folder is read once
    assert set(both.table["id"].to_list()) >= set(one.table["id"].to_list())
    # Each id's image is found in whichever folder holds it.
    for image in both.table["image"].to_list():
        assert Path(image).is_file()
    assert both.fingerprint != one.fingerprint


def test_a_differing_second_styles_file_keeps_the_first_row_of_an_id(two_folders, tmp_path):
    first, second = two_folders
    third = tmp_path / "third"
    (third / "images").mkdir(parents=True)
    lines = (first / "styles.csv").read_text().splitlines()
    header, row = lines[0], lines[1].split(",")
    relabelled = ",".join([row[0], "Unisex", *row[2:]])
    (third / "styles.csv").write_text(f"{header}\n{relabelled}\n")
    shutil.copy(next((first / "images").glob("*.jpg")), third / "images" / "x.jpg")
    data = load_kaggle([str(first), str(second), str(third)])
    assert data.report.duplicate_id == 1
    assert data.table.filter(data.table["id"] == row[0])["gender"].item() == row[1]


@pytest.mark.parametrize("stages", [0, 2, 4, 5])  # 5: the whole backbone (its stage count)
def test_trunk_then_tail_equals_the_whole_network(stages):
    net = create_tagger_net("test_efficientnet", {"a": 3, "b": 2}, resolve_data_config("test_efficientnet", 32)).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        whole, split = net(images), net.forward_from(net.trunk(images, stages), stages)
    for name in whole:
        assert torch.equal(whole[name], split[name])


def test_other_backbone_families_are_refused_with_the_fix():
    net = create_tagger_net("test_resnet", {"a": 2}, resolve_data_config("test_resnet", 32))
    with pytest.raises(ValueError, match="--freeze-stages 0"):
        net.stage_count()


@pytest.mark.slow
def test_retrain_with_a_frozen_trunk_trains_only_the_tail(two_folders, tmp_path):
    torch.set_num_threads(1)
    first, second = two_folders
    out = tmp_path / "bundle"
    config = RetrainConfig(
        data=[str(first), str(second)], out=str(out), backbone="test_efficientnet", pretrained=False, input_size=32,
        batch_size=16, max_epochs=2, lr=5e-3, freeze_stages=3, progress=False, threads=1, seed=0,
        log_dir=str(tmp_path / "logs"),
    )
    from tagger.model.network import create_backbone

    torch.manual_seed(config.seed)  # what retrain's seed_everything does before it creates the backbone
    initial = create_backbone("test_efficientnet")
    bundle = retrain(config)
    assert bundle.training["freeze_stages"] == 3
    assert bundle.training["data"]["rows"]["used"] == 120
    net = load_bundle(str(out)).build_net()
    # The trunk keeps the weights it started from (same seed, same init); the tail has learnt.
    for trained_part, initial_part in zip(net.trunk_modules(3), [initial.conv_stem, initial.bn1, *initial.blocks[:3]]):
        for (name, value), (_, start) in zip(trained_part.state_dict().items(), initial_part.state_dict().items()):
            assert torch.equal(value, start), name  # weights and BatchNorm statistics alike
    assert not torch.equal(net.backbone.conv_head.weight, initial.conv_head.weight)

    # evaluate takes the same folders and finds the bundle's test rows in them.
    from jobs.cli import cli as main

    report = tmp_path / "report"
    result = CliRunner().invoke(main, ["evaluate", "--model", str(out), "--data", str(first), "--data", str(second),
                                       "--split", "test", "--out", str(report), "--workers", "0", "--no-plots"])
    assert result.exit_code == 0, result.output
    assert (report / "metrics.parquet").is_file()


@pytest.mark.slow
def test_an_attribute_added_on_a_frozen_backbone_leaves_the_carried_heads_as_they_were(two_folders, tmp_path):
    """--freeze-stages at the stage count and --freeze-carried-heads: the new bundle's carried attributes score exactly
    as the starting bundle's (the recipe that adds an attribute without moving the others)."""
    torch.set_num_threads(1)
    first, second = two_folders
    common = dict(data=[str(first), str(second)], backbone="test_efficientnet", pretrained=False, input_size=32,
                  batch_size=16, progress=False, threads=1, seed=0, cache_mirror=False)
    base = retrain(RetrainConfig(out=str(tmp_path / "base"), attributes=["gender", "masterCategory"], max_epochs=1,
                                 lr=5e-3, freeze_stages=3, log_dir=str(tmp_path / "base-logs"), **common))
    added = retrain(RetrainConfig(out=str(tmp_path / "added"), attributes=["gender", "masterCategory", "articleType"],
                                  max_epochs=2, lr=5e-2, freeze_stages=5, freeze_carried_heads=True,
                                  init_weights=str(tmp_path / "base"), keep_labels=True, split_from=str(tmp_path / "base"),
                                  log_dir=str(tmp_path / "added-logs"), **common))
    assert added.training["frozen_heads"] == ["gender", "masterCategory"]
    assert added.training["heads_init"]["articleType"] == "new"
    before, after = load_bundle(str(tmp_path / "base")).build_net(), load_bundle(str(tmp_path / "added")).build_net()
    for name, value in before.backbone.state_dict().items():
        assert torch.equal(value, after.backbone.state_dict()[name]), name  # weights and BatchNorm statistics alike
    for attr in ("gender", "masterCategory"):
        for name, value in before.heads[attr].state_dict().items():
            assert torch.equal(value, after.heads[attr].state_dict()[name]), (attr, name)
        assert added.training["metrics"]["test"][attr] == base.training["metrics"]["test"][attr]
        assert added.review_thresholds[attr] == base.review_thresholds[attr]
    from tagger.training.summary import format_summary

    assert "kept as they were: --freeze-carried-heads" in format_summary(added)


def test_freeze_carried_heads_needs_a_bundle_to_carry_from(tmp_path):
    config = RetrainConfig(data=str(tmp_path), out=str(tmp_path / "b"), freeze_carried_heads=True)
    with pytest.raises(ConfigError, match="--init-weights"):
        config.validate()


def test_freeze_stages_is_checked_against_the_backbone(two_folders, tmp_path):
    first, _ = two_folders
    config = RetrainConfig(data=str(first), out=str(tmp_path / "b"), backbone="test_efficientnet", pretrained=False,
                           input_size=32, freeze_stages=6, progress=False)
    with pytest.raises(ConfigError, match="0-5"):
        retrain(config)


def test_cli_takes_several_data_folders(two_folders, tmp_path):
    from jobs.cli import cli as main

    first, second = two_folders
    result = CliRunner().invoke(main, ["retrain", "--data", str(first), "--data", str(second), "--out", str(tmp_path / "b"),
                                       "--backbone", "test_resnet", "--no-pretrained", "--freeze-stages", "2", "--input-size", "32"])
    assert result.exit_code == 2 and "--freeze-stages" in result.output and "--freeze-stages 0" in result.output
