"""How good is a model bundle, and what does it say about images it has never seen.

- :mod:`.inference`: images (files or URLs) -> softmax probabilities per attribute, errors kept per image.
- :mod:`.labels`: Kaggle label strings -> the bundle's class indices, mirroring retrain's folding.
- :mod:`.metrics`: per-attribute and per-class numbers (scikit-learn), majority baseline, review coverage.
- :mod:`.evaluate`: ``tagger evaluate``: bundle + Kaggle-layout data + split -> a report folder.
- :mod:`.report`: the report's Parquet tables, ``report.md`` and the stdout summary.
- :mod:`.plots`: per-class F1 bars, row-normalised confusion matrices, model vs baseline (PNG, Agg).
- :mod:`.gallery`: ``tagger predict``'s contact sheet (PNG) and self-contained HTML gallery.

Importing this package is cheap: torch, scikit-learn and matplotlib load inside the functions that use them.
"""

from __future__ import annotations

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".gif")
"""What ``tagger predict`` picks up when it walks a folder (case-insensitive)."""


class EvaluationError(ValueError):
    """Input that cannot be evaluated as asked (bundle, data, split, options), with what to do."""
