"""Retraining: Kaggle "Fashion Product Images" data -> a model bundle the tag job can load.

- styles.csv and images/ (:mod:`tagger.data.kaggle`), rare labels and label encoding
  (:mod:`tagger.data.labels`): in :mod:`tagger.data`, shared with evaluate.
- :mod:`tagger.data.split`: seeded train/val/test split stratified on all attributes; split.parquet (evaluate
  reads it too, so it sits below both).
- :mod:`.datamodule`: the LightningDataModule (decode, cache, augment, batch).
- :mod:`.module`: the LightningModule (masked loss, optimiser, schedule, metrics).
- metrics, majority baseline and review thresholds: :mod:`tagger.metrics`, shared with evaluate;
  val/test predictions: :func:`tagger.model.scoring.predict_batches` (the tag job's Predictor).
- :mod:`.config`: :class:`RetrainConfig`, every setting and its default.
- :mod:`.train`: :func:`retrain`.

Importing this package is cheap; Lightning and timm load when training starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ConfigError", "RetrainConfig", "retrain"]

from .config import ConfigError, RetrainConfig

if TYPE_CHECKING:
    from .train import retrain


def __getattr__(name: str) -> Any:
    if name == "retrain":
        from .train import retrain

        return retrain
    raise AttributeError(name)
