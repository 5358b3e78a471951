"""Issue 31: --max-minutes bounds the command (said early when it cannot hold, a bundle when reached mid-way), the
frozen-trunk features are kept in $TAGGER_CACHE and reused, and the run talks (epoch lines in retrain.log)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tagger.model.bundle import load_bundle
from tagger.model.network import TaggerNet
from tagger.training import ConfigError, RetrainConfig, retrain
from tagger.training.budget import Budget

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def one_thread_and_own_cache(monkeypatch, tmp_path):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("TAGGER_CACHE", str(tmp_path / "cache"))
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory) -> Path:
    from tagger.demo.drawn import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("kaggle"), n_train=120, n_catalog=0, n_bad=0, image_size=(48, 64)).root


def config(data: Path, out: Path, **overrides) -> RetrainConfig:
    settings = dict(backbone="test_efficientnet", pretrained=False, input_size=32, batch_size=16, max_epochs=3, lr=5e-3,
                    progress=False, threads=1, freeze_stages=3, log_dir=str(out.parent / f"{out.name}-logs"))
    settings.update(overrides)
    return RetrainConfig(data=str(data), out=str(out), **settings)


class FakeClock:
    """Minutes pass only when the test says so: per trunk batch, per training step."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_budget_the_trunk_pass_cannot_hold_is_said_before_it_is_spent(kaggle, tmp_path, monkeypatch):
    clock, calls = FakeClock(), []
    real = TaggerNet.trunk

    def slow_trunk(self, images, stages):
        calls.append(len(images))
        clock.now += 5.0  # five "seconds" per batch of 8: 240 photo views take 150 s
        return real(self, images, stages)

    monkeypatch.setattr(TaggerNet, "trunk", slow_trunk)
    out = tmp_path / "bundle"
    with pytest.raises(ConfigError) as error:
        retrain(config(kaggle, out, max_minutes=1), budget=Budget(1, clock=clock))
    assert error.value.option == "max_minutes"
    message = error.value.message
    assert "frozen-trunk pass is estimated at" in message and "Raise --max-minutes to at least" in message
    assert "--no-cache-mirror" in message and "kept in the cache" in message
    assert sum(calls) < 240 and clock.now < 60  # said after its first batches, before the minute was spent
    assert not out.exists()

    # The work done so far is kept: the next run computes only the rest.
    calls.clear()
    bundle = retrain(config(kaggle, tmp_path / "second", max_epochs=1, max_minutes=60), budget=Budget(60, clock=clock))
    facts = bundle.training["feature_cache"]
    assert facts["reused"] > 0 and facts["reused"] + facts["computed"] == 240 and sum(calls) == facts["computed"]


def test_a_budget_that_slow_decoding_cannot_hold_is_said_after_the_first_photos(kaggle, tmp_path, monkeypatch):
    """Decoding is part of the estimate: photos that take five "seconds" each (a slow store, 1800x2400 originals)
    are refused within the first minute, before the trunk pass, with the decoding named."""
    from tagger.data.reader import ImageSettings

    clock, loads = FakeClock(), []
    real = ImageSettings.load

    def slow_load(self, url, size):
        loads.append(url)
        clock.now += 5.0
        return real(self, url, size)

    monkeypatch.setattr(ImageSettings, "load", slow_load)
    trunk_calls = []
    monkeypatch.setattr(TaggerNet, "trunk", lambda self, images, stages: trunk_calls.append(1))
    out = tmp_path / "bundle"
    with pytest.raises(ConfigError) as error:
        retrain(config(kaggle, out, max_minutes=5), budget=Budget(5, clock=clock))
    message = error.value.message
    assert error.value.option == "max_minutes" and "decoding the photos is estimated at" in message
    assert "photos in" in message and "Raise --max-minutes to at least" in message and "fewer photos" in message
    assert clock.now < 60 and len(loads) < 120  # said within a minute, the remaining photos not decoded
    assert not trunk_calls and not out.exists()


def test_scoring_keeps_time_to_decode_val_and_test_again_without_the_image_cache():
    from tagger.training.train import scoring_reserve

    cached = scoring_reserve(0.01, 100)
    assert scoring_reserve(0.01, 100, decode_s=0.5, workers=1) == pytest.approx(cached + 1.5 * 100 * 0.5)
    assert scoring_reserve(0.01, 100, decode_s=0.5, workers=5) == pytest.approx(cached + 1.5 * 100 * 0.1)


def test_a_budget_reached_mid_epoch_writes_the_best_model_so_far(kaggle, tmp_path, monkeypatch, caplog):
    from tagger.training.module import TaggerModule

    clock = FakeClock()
    real = TaggerModule.training_step

    def step(self, batch, batch_idx):
        clock.now += 10.0  # ten "seconds" per training step; nothing else advances the clock
        return real(self, batch, batch_idx)

    monkeypatch.setattr(TaggerModule, "training_step", step)
    out = tmp_path / "bundle"
    caplog.set_level("INFO", logger="tagger")
    # 90 training rows in batches of 16: 5 steps an epoch. 1.5 minutes less the ~10 s scoring reserve: the limit is
    # reached at step 8, in the second epoch.
    bundle = retrain(config(kaggle, out, max_epochs=5, max_minutes=1.5), budget=Budget(1.5, clock=clock))
    t = bundle.training
    assert t["stopped_by"] == "max_minutes"
    assert t["split"]["sizes"]["train"] == 90 and t["global_steps"] == 8  # mid-way through the second epoch
    assert load_bundle(str(out)).model_version == bundle.model_version
    assert t["best_checkpoint"] and Path(t["best_checkpoint"]).is_file()
    assert "reached during epoch 2" in caplog.text and "best model so far" in caplog.text
    # One line per epoch, with the loss and every attribute's validation score, also in retrain.log.
    logged = (Path(t["log_dir"]).parent / "retrain.log").read_text()
    epoch_lines = [line for line in logged.splitlines() if " train loss " in line]
    assert len(epoch_lines) == 2 and "stopped after 3 of 5 batches" in epoch_lines[1]
    assert all(f"{attr} " in epoch_lines[0] for attr in bundle.attribute_names)


def test_a_trunk_pass_that_slows_after_a_passing_estimate_ends_with_a_bundle_on_the_photos_it_reached(kaggle, tmp_path, monkeypatch):
    """The estimate holds on the first batches, then every batch takes 100 "seconds": the pass stops where only the
    reserve (fitting's share and scoring) is left, the heads are trained on the photos it reached, and the bundle says so."""
    from tagger.training.budget import FIT_SHARE
    from tagger.training.summary import format_summary

    clock, batches = FakeClock(), []
    real = TaggerNet.trunk

    def slowing_trunk(self, images, stages):
        batches.append(len(images))
        clock.now += 1.0 if len(batches) <= 4 else 100.0
        return real(self, images, stages)

    monkeypatch.setattr(TaggerNet, "trunk", slowing_trunk)
    out = tmp_path / "bundle"
    bundle = retrain(config(kaggle, out, max_epochs=2, max_minutes=10), budget=Budget(10, clock=clock))
    t = bundle.training
    cut, train = t["trunk_pass_cut"], t["split"]["sizes"]["train"]
    assert t["stopped_by"] == "max_minutes" and cut["train_total"] == train
    assert 0 < cut["train_photos"] < train and cut["val_photos"] == cut["val_total"]  # val first: the run validates
    assert sum(batches) < 240  # the pass stopped; the test rows' and the rest of the train rows' features were not computed
    assert clock.now <= 600 - FIT_SHARE * 600 + 100  # stopped at the reserve (give or take the batch that crossed it)
    assert load_bundle(str(out)).model_version == bundle.model_version
    assert t["metrics"]["test"]  # val and test scored on their photos
    assert f"trained on {cut['train_photos']} of {train} train photos, the budget ran out during the trunk pass" in format_summary(bundle)
    assert t["feature_cache"]["computed"] == sum(batches)  # what it computed is kept for the next run


def test_trunk_features_are_kept_per_photo_and_a_changed_photo_is_recomputed(kaggle, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(kaggle, data)
    first = retrain(config(data, tmp_path / "first", max_epochs=1))
    assert first.training["feature_cache"]["computed"] == 240 and first.training["feature_cache"]["reused"] == 0

    # Another attribute set on the same photos: the pass is skipped.
    second = retrain(config(data, tmp_path / "second", max_epochs=1, attributes=["gender", "baseColour"]))
    assert second.training["feature_cache"] == {**first.training["feature_cache"], "reused": 240, "computed": 0}

    # A photo that changed is computed again (photo and mirror), the rest reused.
    image = next((data / "images").glob("*.jpg"))
    pixels = np.asarray(Image.open(image).convert("RGB")).copy()
    pixels[:, : pixels.shape[1] // 2] = 0
    Image.fromarray(pixels).save(image)
    third = retrain(config(data, tmp_path / "third", max_epochs=1))
    assert third.training["feature_cache"]["computed"] == 2 and third.training["feature_cache"]["reused"] == 238


def test_the_feature_cache_stays_under_its_limit(tmp_path):
    from tagger.training.features import FeatureStore, trunk_features

    pixels = np.random.default_rng(0).integers(0, 255, (10, 8, 8, 3), dtype=np.uint8)
    trunk = lambda images: images.float().mean(dim=(2, 3), keepdim=True).expand(-1, -1, 4, 4)  # noqa: E731
    store = FeatureStore.open("key", limit_gb=1e-9 * 10 * 3 * 16 * 2 * 1.5)  # room for ~15 of the 20 files' data
    trunk_features(pixels, trunk, store, views=2)
    assert store.computed == 20 and store.evicted > 0
    assert 0 < len(list((tmp_path / "cache" / "trunk-features").glob("*/*/*.npy"))) < 20
    off = FeatureStore.open("key", limit_gb=0)
    features, have = trunk_features(pixels, trunk, off, views=1)
    assert off.folder is None and off.computed == 10 and features.shape == (10, 1, 3, 4, 4) and have.all()
