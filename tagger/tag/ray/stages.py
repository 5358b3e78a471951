"""The two Ray Data stages between the manifest rows and the sink: decode (CPU tasks) and the model (actors).

Both keep every row: a row that cannot be read or decoded leaves the decode stage as an error row (its
``error_type`` and ``message`` set, its pixels zero) and passes the model stage untouched, so that each
stage returns exactly one row per row it was given, keyed by its manifest ``row`` throughout.

Several photos per product: each photo is one Ray row, ``row`` its product's manifest row and ``photo`` its
place among the product's photos; the model stage then also hands on each photo's probabilities
(``<attribute>_probs``), which the driver averages per product (:mod:`tagger.tag.photos`) when it commits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from ...data.reader import TRANSIENT, ImageRows, ImageSettings, StorageUnavailable

# Columns leaving the model stage, beside ``<attribute>`` and ``<attribute>_score``: what a fragment holds.
ROW_COLUMNS = ("row", "photo", "image_version", "error_type", "message")


def decode_rows(batch: pa.Table, *, size: int, images: ImageSettings) -> dict[str, np.ndarray]:
    """Rows ``(row, photo, location)`` -> pixels or the row's typed error, through the project's one decode path
    (:class:`tagger.data.reader.ImageRows`: fetch under the store's deadline, size caps, :func:`decode_image`).

    A read that failed for a reason retrying later may fix (the store is down) raises
    :class:`StorageUnavailable`: the run stops (exit 4) instead of committing it as an error row.
    """
    rows = ImageRows(batch.select(["row", "location"]), size, images)
    n = len(rows)
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    versions, error_types, messages = [""] * n, [""] * n, [""] * n
    row_numbers = np.empty(n, dtype=np.int64)
    for index in range(n):
        item = rows[index]
        if item.error_type == TRANSIENT:
            raise StorageUnavailable(
                f"row {item.row + 1}: {item.message}. Storage looks unavailable; committed shards are kept, nothing "
                "was written for the shards in flight, and running the same command again resumes."
            )
        row_numbers[index] = item.row
        versions[index], error_types[index], messages[index] = item.version, item.error_type, item.message
        if item.pixels is not None:
            pixels[index] = item.pixels
    return {
        "row": row_numbers,
        "photo": batch.column("photo").to_numpy().astype(np.int32),
        "image_version": np.array(versions, dtype=object),
        "error_type": np.array(error_types, dtype=object),
        "message": np.array(messages, dtype=object),
        "pixels": pixels,
    }


class ModelActor:
    """One model per actor (a :class:`tagger.model.predictor.Predictor` built once from the bundle), called on
    batches: the decoded rows go through the network, every row comes out with its labels and scores (error
    rows with empty labels, score 0, never read by the sink as tags)."""

    def __init__(self, bundle: Any, device: str, runtime: Any, precision: dict[str, Any], threads: int = 0,
                 probabilities: bool = False):
        import torch

        from ...model.predictor import Predictor
        from ...model.scorer import Scorer

        if device == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        self.attributes = bundle.attribute_names
        # Several photos per product: each photo's whole softmax vector goes on, for the driver's mean.
        self.probabilities = {spec.name: len(spec.labels) for spec in bundle.attributes} if probabilities else None
        self.predictor = Predictor(bundle, torch.device(device), runtime=runtime, **precision)
        self.scorer = Scorer(self.predictor, probabilities=bool(self.probabilities), kept="nothing of those shards was committed")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        good = batch["error_type"] == ""
        n = len(batch["row"])
        out: dict[str, np.ndarray] = {name: batch[name] for name in ROW_COLUMNS}
        for name in self.attributes:
            out[name] = np.full(n, "", dtype=object)
            out[f"{name}_score"] = np.zeros(n, dtype=np.float32)
            if self.probabilities:
                out[f"{name}_probs"] = np.zeros((n, self.probabilities[name]), dtype=np.float32)
        if good.any():
            # NHWC uint8 viewed as NCHW: channels-last strides, as the local engine's collate makes them.
            images = torch.from_numpy(np.ascontiguousarray(batch["pixels"][good])).permute(0, 3, 1, 2)
            scored = self.scorer(images, batch["row"][good])
            predictions, labels = scored.predictions, scored.labels
            for name in self.attributes:
                out[name][good] = labels[name]
                out[f"{name}_score"][good] = predictions.scores[name]
                if self.probabilities:
                    out[f"{name}_probs"][good] = predictions.probabilities[name]
        return out

