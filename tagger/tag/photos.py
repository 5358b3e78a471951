"""Several photos per product: batches of photos in, batches of products out.

Reading, decoding and the model work photo by photo (a product with 40 photos is 40 entries of the rows
file, spread over batches like any others: no batch waits for it, and memory holds one batch of photos).
:class:`PhotoAssembler` sits between the model and the shard rows: it adds up each product's per-photo
probabilities as they come, and hands on a product once its last photo has passed (the photos of a product
are consecutive, in manifest order), as a :class:`Batch` of products that :class:`ShardRows` writes as usual.

A product's tags are the top labels of the **mean of its photos' probabilities** (each photo one vote
weighted by its confidence; a blurred back shot does not outvote a clear front one). It is tagged when at
least one photo was read; ``images_used`` says how many. Only when none could be read is it an error row, and
then its message holds each photo's error. Its ``image_version`` is the photos' versions joined by the
manifest's separator ("" for a photo that could not be read), so ``--since`` re-tags it when any photo changed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data.reader import Batch
from ..model.predictor import Predictions


@dataclass
class _Product:
    row: int
    sums: dict[str, np.ndarray] | None = None
    used: int = 0
    versions: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)


class PhotoAssembler:
    """Per-photo batches (with probabilities) -> per-product batches, predictions and labels."""

    def __init__(self, predictor: Any, attributes: list[str], separator: str):
        self.predictor, self.attributes, self.separator = predictor, attributes, separator
        self._open: _Product | None = None

    def feed(self, batch: Batch, predictions: Predictions | None) -> tuple[Batch, Predictions | None, dict | None]:
        """The products this batch completes (all but its last row, which may go on in the next batch)."""
        done: list[_Product] = []
        photos = self._photos(batch, predictions)
        for row, entry in photos:
            if self._open is not None and self._open.row != row:
                done.append(self._open)
                self._open = None
            if self._open is None:
                self._open = _Product(row)
            self._add(self._open, entry)
        return self._emit(done, batch.size)

    def flush(self) -> tuple[Batch, Predictions | None, dict | None]:
        """The last product, after the last batch."""
        done = [self._open] if self._open is not None else []
        self._open = None
        return self._emit(done, 0)

    def _photos(self, batch: Batch, predictions: Predictions | None) -> list[tuple[int, tuple]]:
        # The batch's photos back in their order (collate put the decoded ones first): by position in the loader.
        good = [(int(r), ("ok", i, v)) for i, (r, v) in enumerate(zip(batch.rows, batch.versions))]
        bad = [(int(r), ("error", t, m)) for r, t, m in zip(batch.error_rows, batch.error_types, batch.error_messages)]
        self._probabilities = predictions.probabilities if predictions is not None else None
        # Rows are non-decreasing in the loader; a stable sort by row restores each product's photo order
        # (a decoded photo and an error of the same product keep their relative order only within a kind,
        # which the versions string reflects; the tags do not depend on it).
        return sorted(good + bad, key=lambda item: item[0])

    def _add(self, product: _Product, entry: tuple) -> None:
        if entry[0] == "ok":
            _, index, version = entry
            if product.sums is None:
                product.sums = {name: np.zeros_like(self._probabilities[name][index], dtype=np.float64) for name in self.attributes}
            for name in self.attributes:
                product.sums[name] += self._probabilities[name][index]
            product.used += 1
            product.versions.append(version)
        else:
            _, error_type, message = entry
            product.errors.append((error_type, message))
            product.versions.append("")

    def _emit(self, done: list[_Product], size: int) -> tuple[Batch, Predictions | None, dict | None]:
        tagged = [p for p in done if p.used]
        failed = [p for p in done if not p.used]
        batch = Batch(
            rows=np.array([p.row for p in tagged], dtype=np.int64),
            versions=[self.separator.join(p.versions) for p in tagged],
            images=None,
            error_rows=np.array([p.row for p in failed], dtype=np.int64),
            error_types=[_error_type(p) for p in failed],
            error_messages=[_error_message(p) for p in failed],
            size=size,
            images_used=np.array([p.used for p in tagged], dtype=np.int32),
            photo_errors=[(p.row, t, m) for p in done for t, m in p.errors],
        )
        if not tagged:
            return batch, None, None
        indices, scores = {}, {}
        for name in self.attributes:
            mean = np.stack([p.sums[name] / p.used for p in tagged])
            indices[name] = mean.argmax(axis=1)
            scores[name] = mean.max(axis=1).astype(np.float32)
        # Scoped on the mean, as one photo is: the product's own top label of the scope attribute decides.
        predictions = self.predictor.scoped(Predictions(indices=indices, scores=scores))
        return batch, predictions, self.predictor.labels(predictions)


def _error_type(product: _Product) -> str:
    # The most common error among the photos (the first on a tie): "missing" for a product whose photos are
    # all gone, "decode" for one whose photos are all broken.
    return Counter(t for t, _ in product.errors).most_common(1)[0][0]


def _error_message(product: _Product) -> str:
    n = len(product.errors)
    if n == 1:
        return product.errors[0][1]
    listed = "; ".join(f"photo {i + 1}: {message}" for i, (_, message) in enumerate(product.errors))
    return f"none of the {n} photos could be read: {listed}"
