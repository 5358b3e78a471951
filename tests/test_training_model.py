"""The training module: masked loss, LR schedule, thresholds, and that a few steps actually learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tagger.model.network import create_tagger_net, resolve_data_config
from tagger.metrics import THRESHOLD_MARGIN, calibrate_threshold, majority_baseline
from tagger.training.module import TaggerModule, masked_cross_entropy, warmup_cosine


@pytest.fixture(autouse=True)
def one_thread():
    # The test machine is shared: one thread avoids OpenMP spin-waits that make steps erratically slow.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_masked_loss_ignores_unknown_targets():
    torch.manual_seed(0)
    logits = {"a": torch.randn(4, 3, requires_grad=True), "b": torch.randn(4, 2, requires_grad=True)}
    targets = torch.tensor([[0, -1], [2, 1], [-1, -1], [1, 0]])
    loss = masked_cross_entropy(logits, targets, ["a", "b"])
    known_a, known_b = [0, 1, 3], [1, 3]
    expected = torch.nn.functional.cross_entropy(logits["a"][known_a], targets[known_a, 0]) + torch.nn.functional.cross_entropy(
        logits["b"][known_b], targets[known_b, 1]
    )
    assert torch.allclose(loss, expected)
    loss.backward()
    assert torch.all(logits["a"].grad[2] == 0) and torch.all(logits["b"].grad[[0, 2]] == 0)
    # An attribute unknown in the whole batch adds nothing (not NaN).
    nothing = masked_cross_entropy(logits, torch.full((4, 2), -1), ["a", "b"])
    assert nothing.item() == 0.0


def test_warmup_then_cosine():
    lrs = [warmup_cosine(s, warmup_steps=10, total_steps=100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # monotone decay after warm-up
    assert lrs[-1] == pytest.approx(0.01, abs=0.01)
    assert warmup_cosine(55, warmup_steps=10, total_steps=100) == pytest.approx(0.01 + 0.99 * 0.5, abs=1e-6)
    # A wall-clock budget that is further along than the steps drives the cosine.
    assert warmup_cosine(20, warmup_steps=10, total_steps=100, time_fraction=0.5) == pytest.approx(0.01 + 0.99 * 0.5, abs=1e-6)
    assert warmup_cosine(20, warmup_steps=10, total_steps=100, time_fraction=2.0) == pytest.approx(0.01)


def test_threshold_accepts_the_largest_set_that_keeps_precision_and_sits_between_scores():
    scores = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    correct = np.array([1, 1, 1, 1, 1, 0, 1, 0], dtype=bool)
    # precision of the top-k: 1, 1, 1, 1, 1, 5/6, 6/7, 6/8; the threshold lies halfway to the next lower score.
    assert calibrate_threshold(scores, correct, 0.85) == pytest.approx(0.45)  # accepts down to 0.5
    assert calibrate_threshold(scores, correct, 0.9) == pytest.approx(0.65)  # accepts down to 0.7
    assert calibrate_threshold(scores, np.zeros(8, dtype=bool), 0.9) == 1.0  # never precise enough: review all
    # All accepted: just under the lowest score, there being no lower one to sit halfway to.
    assert calibrate_threshold(scores, np.ones(8, dtype=bool), 0.9) == pytest.approx(0.4 - THRESHOLD_MARGIN)
    # Tied scores are accepted or refused together.
    assert calibrate_threshold(np.array([0.9, 0.8, 0.8]), np.array([1, 1, 0], dtype=bool), 0.9) == pytest.approx(0.85)


def test_threshold_is_strictly_between_scores_so_float_jitter_moves_no_row_across():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.2, 1.0, size=500).astype(np.float32)
    correct = rng.uniform(size=500) < scores  # confident predictions are more often right
    threshold = calibrate_threshold(scores, correct, 0.9)
    accepted = scores >= threshold
    assert 0 < accepted.sum() < len(scores)
    assert not np.any(scores == np.float32(threshold))  # no validation row sits on the threshold
    assert (accepted & correct).sum() / accepted.sum() >= 0.9
    # The last bits of every score moved (another batch composition, another kernel): the same rows pass.
    for jitter in (1e-6, -1e-6):
        assert np.array_equal((scores * np.float32(1 + jitter)) >= threshold, accepted)


def test_majority_baseline():
    train = np.array([[0], [1], [1], [-1]])
    test = np.array([[1], [1], [0], [-1]])
    assert majority_baseline(train, test, {"a": ["x", "y"]}) == {"a": {"label": "y", "accuracy": pytest.approx(2 / 3)}}


COLOURS = torch.tensor([[220, 30, 30], [30, 160, 40], [40, 60, 220], [240, 220, 40]], dtype=torch.uint8)


def solid_squares(n: int, seed: int, size: int = 32):
    """Squares of one of 4 colours at random places on white; the colour is the (only) label.
    A second attribute is always unknown, so only the masked loss lets this train at all."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    images = torch.full((n, 3, size, size), 255, dtype=torch.uint8)
    for i in range(n):
        side = int(torch.randint(size // 3, size - 4, (1,), generator=g))
        x0, y0 = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=g))
        images[i, :, y0 : y0 + side, x0 : x0 + side] = COLOURS[y[i]].view(3, 1, 1)
    return images, torch.stack([y, torch.full_like(y, -1)], dim=1)


def test_a_few_steps_learn_colour_well_above_chance(tmp_path):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    labels = {"baseColour": ["Red", "Green", "Blue", "Yellow"], "season": ["Summer", "Winter"]}
    net = create_tagger_net("resnet10t", {k: len(v) for k, v in labels.items()}, resolve_data_config("resnet10t", 32))
    module = TaggerModule(net, labels, lr=3e-3, warmup_epochs=0.2, label_smoothing=0.0)
    train = DataLoader(TensorDataset(*solid_squares(256, seed=0)), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(*solid_squares(128, seed=1)), batch_size=64)
    trainer = pl.Trainer(
        max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )
    trainer.fit(module, train, val)
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    metrics = trainer.validate(module, val, verbose=False)[0]
    assert metrics["val/baseColour/accuracy"] > 0.9  # chance is 0.25
    assert metrics["val/score"] == pytest.approx((metrics["val/baseColour/macro_f1"] + metrics["val/season/macro_f1"]) / 2)


def test_frozen_backbone_only_trains_the_heads(tmp_path):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    labels = {"baseColour": ["Red", "Green", "Blue", "Yellow"], "season": ["Summer", "Winter"]}
    net = create_tagger_net("test_efficientnet", {k: len(v) for k, v in labels.items()}, resolve_data_config("test_efficientnet", 32))
    before_backbone = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    before_head = net.heads["baseColour"].weight.detach().clone()
    module = TaggerModule(net, labels, lr=1e-2, freeze_backbone_epochs=1)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, limit_train_batches=3,
    )
    trainer.fit(module, DataLoader(TensorDataset(*solid_squares(96, seed=0)), batch_size=32))
    after = net.backbone.state_dict()
    # Weights and BatchNorm running statistics alike stay put while frozen.
    assert all(torch.equal(before_backbone[k], after[k]) for k in before_backbone)
    assert not torch.equal(before_head, net.heads["baseColour"].weight)
