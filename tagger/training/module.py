"""The LightningModule: masked multi-head cross-entropy, AdamW, warm-up + cosine, per-attribute metrics.

Validation metrics accumulate a confusion matrix per attribute (torchmetrics: summed across devices)
and are read off it by :func:`tagger.metrics.confusion_scores`, the definition that the
bundle's final numbers and ``tagger evaluate`` use too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from ..metrics import confusion_scores
from ..model.network import TaggerNet

SCORE_METRIC = "val/score"  # mean macro-F1 over attributes: what early stopping and checkpoints watch
LABELS_KEY = "tagger_labels"  # checkpoint entry that lets --resume refuse a checkpoint of other labels


def masked_cross_entropy(
    logits: Mapping[str, torch.Tensor],
    targets: torch.Tensor,
    attributes: Sequence[str],
    *,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Sum over attributes of the mean cross-entropy over the rows whose value is known (target >= 0).

    An attribute with no known value in the batch contributes 0, not NaN (plain ``ignore_index``
    with mean reduction divides by zero there).
    """
    total = targets.new_zeros((), dtype=torch.float32)
    for j, attr in enumerate(attributes):
        target = targets[:, j]
        known = target >= 0
        if not bool(known.any()):
            continue
        total = total + F.cross_entropy(logits[attr][known].float(), target[known], label_smoothing=label_smoothing)
    return total


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, floor: float = 0.01, time_fraction: float = 0.0) -> float:
    """LR multiplier: linear from ~0 to 1 over ``warmup_steps``, then cosine down to ``floor``.

    The cosine follows whichever is further along: the steps, or ``time_fraction`` of a wall-clock
    budget. Under ``--max-minutes`` the run then still anneals before it is cut off, instead of
    stopping at a high learning rate somewhere in the first half of a schedule laid out for
    ``max_epochs``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, max((step - warmup_steps) / max(1, total_steps - warmup_steps), time_fraction))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _confusion_matrices(label_counts: Mapping[str, int]) -> nn.ModuleDict:
    # torchmetrics refuses num_classes=1; a one-label attribute is counted as two classes, one unused
    # (a class with no row and no prediction does not enter the macro mean).
    return nn.ModuleDict({attr: MulticlassConfusionMatrix(max(2, n), ignore_index=-1) for attr, n in label_counts.items()})


class TaggerModule(pl.LightningModule):
    def __init__(
        self,
        net: TaggerNet,
        labels: Mapping[str, Sequence[str]],
        *,
        lr: float = 5e-4,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        label_smoothing: float = 0.1,
        freeze_backbone_epochs: int = 0,
        freeze_stages: int = 0,
        time_budget_s: float | None = None,
        frozen_heads: Sequence[str] = (),
    ):
        super().__init__()
        self.net = net
        self.labels = {attr: list(v) for attr, v in labels.items()}
        self.attributes = list(self.labels)
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.label_smoothing = label_smoothing
        self.freeze_backbone_epochs = freeze_backbone_epochs
        # > 0: batches are cached features of the frozen trunk (stem + this many stages), not pixels.
        self.freeze_stages = freeze_stages
        self.time_budget_s = time_budget_s
        # Heads carried over from a bundle and kept as they are (--freeze-carried-heads).
        self.frozen_heads = list(frozen_heads)
        self._train_started: float | None = None
        # Plain values only: checkpoints are read back with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["net"])
        self.val_confusion = _confusion_matrices({attr: len(v) for attr, v in self.labels.items()})

    def forward(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.freeze_stages:
            return self.net.forward_from(inputs, self.freeze_stages)
        return self.net(inputs)

    # ------------------------------------------------------------------ backbone freezing

    @property
    def backbone_frozen(self) -> bool:
        return self.current_epoch < self.freeze_backbone_epochs

    def _apply_freeze(self) -> None:
        frozen = self.backbone_frozen
        for p in self.net.backbone.parameters():
            p.requires_grad_(not frozen)
        if frozen:
            # BatchNorm statistics would otherwise keep drifting under a backbone that is not learning.
            self.net.backbone.eval()
        if self.freeze_stages:
            # The trunk's features were cached once: its weights and statistics must stay what made them.
            for p in self.net.trunk_parameters(self.freeze_stages):
                p.requires_grad_(False)
            for module in self.net.trunk_modules(self.freeze_stages):
                module.eval()
        for name in self.frozen_heads:
            for p in self.net.heads[name].parameters():
                p.requires_grad_(False)

    def on_train_start(self) -> None:
        self._train_started = time.monotonic()  # where Lightning's max_time Timer starts counting too

    def time_fraction(self) -> float:
        if not self.time_budget_s or self._train_started is None:
            return 0.0
        # Aim a little short of the cut, so the last full epoch is validated at the low learning rate.
        return (time.monotonic() - self._train_started) / (0.9 * self.time_budget_s)

    def on_train_epoch_start(self) -> None:
        self._apply_freeze()

    def on_validation_model_train(self) -> None:
        super().on_validation_model_train()  # puts everything back in train mode after validation
        self._apply_freeze()

    # ------------------------------------------------------------------ steps

    def training_step(self, batch, batch_idx):
        images, targets = batch
        if images.shape[0] == 0:  # every image of the batch failed to decode
            return None
        loss = masked_cross_entropy(self(images), targets, self.attributes, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        images, targets = batch
        if images.shape[0] == 0:
            return
        logits = self(images)
        loss = masked_cross_entropy(logits, targets, self.attributes)
        self.log("val/loss", loss, batch_size=images.shape[0])
        for j, attr in enumerate(self.attributes):
            self.val_confusion[attr].update(logits[attr].float(), targets[:, j])

    def on_validation_epoch_end(self):
        f1s = []
        for attr in self.attributes:
            values = confusion_scores(self.val_confusion[attr].compute().cpu().numpy())
            self.val_confusion[attr].reset()
            for name in ("accuracy", "macro_f1"):
                self.log(f"val/{attr}/{name}", _finite(values[name]))
            f1s.append(_finite(values["macro_f1"]))
        self.log(SCORE_METRIC, float(np.mean(f1s)), prog_bar=True)

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self):
        # No weight decay on biases and norm parameters: decaying them only fights the normalisation.
        decay, no_decay = [], []
        for p in self.parameters():
            (decay if p.ndim > 1 else no_decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=self.lr
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = max(1, round(self.warmup_epochs * total / epochs)) if self.warmup_epochs > 0 else 0
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup_steps=warmup, total_steps=total, time_fraction=self.time_fraction())
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[LABELS_KEY] = self.labels


def _finite(value: float) -> float:
    # An attribute without a known value in the validation rows has no score; counting it as 0 keeps
    # val/score (what checkpoints and early stopping compare) a number instead of NaN.
    return value if np.isfinite(value) else 0.0
