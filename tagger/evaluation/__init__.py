"""How good is a model bundle, and what does it say about images it has never seen.

- :mod:`.metrics`: the one definition of the numbers (retrain's too): per-attribute and per-class metrics
  from confusion matrices, majority baseline, review thresholds and coverage.
- :mod:`.evaluate`: ``tagger evaluate``: bundle + Kaggle-layout data + split -> a report folder.
- :mod:`.report`: the report's Parquet tables, ``report.md`` and the stdout summary.
- :mod:`.plots`: per-class F1 bars, row-normalised confusion matrices, model vs baseline (PNG, Agg).

Images become probabilities through :mod:`tagger.model.scoring` (the tag job's reader and Predictor).

Label strings become targets through :func:`tagger.data.labels.encode_labels`, as in retrain.

Importing this package is cheap: torch and matplotlib load inside the modules and functions that use them.
"""

from __future__ import annotations


class EvaluationError(ValueError):
    """Input that cannot be evaluated as asked (bundle, data, split, options), with what to do."""
