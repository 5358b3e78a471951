"""How good is a model bundle, and what does it say about images it has never seen.

- :mod:`.evaluate`: ``tagger evaluate``: bundle + Kaggle-layout data + split -> a report folder.
- :mod:`.report`: the report's Parquet tables, ``report.md`` and the stdout summary.
- :mod:`.plots`: per-class F1 bars, row-normalised confusion matrices, model vs baseline (PNG, Agg).

Images become probabilities through :mod:`tagger.model.scoring` (the tag job's reader and Predictor).

The numbers (per-attribute and per-class metrics, majority baseline, review thresholds, coverage) are
:mod:`tagger.metrics`, below both evaluation and training, which share them.

Label strings become targets through :func:`tagger.data.labels.encode_labels`, as in retrain.

Importing this package is cheap: torch and matplotlib load inside the modules and functions that use them.
"""

from __future__ import annotations


class EvaluationError(ValueError):
    """Input that cannot be evaluated as asked (bundle, data, split, options), with what to do."""
