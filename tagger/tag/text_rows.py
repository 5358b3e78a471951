"""The catalog's text beside its photos in the tag job: each batch's (or assembled products') image predictions
fused with the text model's, per row by its input mode (:mod:`tagger.model.fusion`).

Placed after the photos are assembled (several photos per product) and before the shard's rows are written:
a row whose photos all failed but whose text is usable leaves the errors for the tags, tagged from its text
(``images_used`` 0, no ``image_version``); a row without text keeps the image model's probabilities untouched.
Per row it adds the ``inputs`` it was tagged from and the attributes in ``conflict``, and the review threshold
of its mode. The text's own CPU time is counted, so the run summary can say what reading titles costs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa

from ..data.manifest import Manifest
from ..data.reader import Batch
from ..model.bundle import ModelBundle
from ..model.predictor import Predictions
from ..model.scope import decode_labels, scope_predictions
from ..model.text import TextPart


def text_versions(manifest: Manifest, columns: Sequence[str], rows: np.ndarray) -> list[str]:
    """Per manifest row, a digest of its text columns' names and raw values (a null and an empty cell differ): the
    ``text_version`` a row is written with and what ``--since`` compares, so a changed title, another column, or
    the same title under another column name makes the row be tagged again."""
    taken = pa.array(np.asarray(rows, np.int64))
    values = [manifest.extra.column(column).take(taken).to_pylist() for column in columns]
    out = []
    for row_values in zip(*values) if values else ([] for _ in range(len(rows))):
        payload = json.dumps([[c, v] for c, v in zip(columns, row_values)], ensure_ascii=False, separators=(",", ":"))
        out.append(hashlib.blake2b(payload.encode("utf-8"), digest_size=8).hexdigest())
    return out


@dataclass
class TextColumns:
    """Per row, in the written rows' order: the input mode, the conflicting attributes, the review thresholds."""

    inputs: list[str]
    conflict: list[list[dict[str, Any]]]  # per row: {attribute, photos, photos_score, text, text_score}
    thresholds: dict[str, np.ndarray]  # attr -> (n,) float32


@dataclass
class TextFuser:
    part: TextPart
    bundle: ModelBundle
    manifest: Manifest
    columns: tuple[str, ...]  # the catalog's text columns, in the order of the bundle's text fields
    cpu_s: float = 0.0
    modes: Counter = field(default_factory=Counter)
    conflicts: Counter = field(default_factory=Counter)
    conflict_rows: int = 0

    def thresholds(self, modes: Sequence[str]) -> dict[str, np.ndarray]:
        """Per attribute, each row's review threshold: its input mode's (``photos``, ``text``, ``both``)."""
        return {spec.name: np.array([self.part.fusion.threshold(spec.name, m, spec.threshold) for m in modes], np.float32)
                for spec in self.bundle.attributes}

    def versions(self, rows: np.ndarray) -> list[str]:
        """Per row, :func:`text_version` of its text columns as the catalog has them."""
        return text_versions(self.manifest, self.columns, rows)

    def texts(self, rows: np.ndarray) -> list[str]:
        extra = self.manifest.extra
        values = {field_name: extra.column(column).take(rows).to_pylist() for field_name, column in zip(self.part.fields, self.columns)}
        return self.part.model.featurizer.rows_text(values, len(rows))

    def __call__(self, batch: Batch, predictions: Predictions | None) -> tuple[Batch, Predictions | None, dict | None, TextColumns | None]:
        started = time.process_time()
        names = self.bundle.attribute_names
        good = np.asarray(batch.rows, np.int64)
        bad = np.asarray(batch.error_rows, np.int64)
        if len(good) == 0 and len(bad) == 0:
            return batch, predictions, None, None
        texts_good, texts_bad = self.texts(good), self.texts(bad)
        rescued = np.array([bool(t) for t in texts_bad], dtype=bool)  # photos failed, text usable: tagged from text
        rows = np.concatenate([good, bad[rescued]])
        if len(rows) == 0:
            self.cpu_s += time.process_time() - started
            return batch, predictions, None, None
        order = np.argsort(rows, kind="stable")
        texts = [*texts_good, *(t for t, r in zip(texts_bad, rescued) if r)]
        text_probs, present = self.part.model.probabilities(texts)
        n_good = len(good)
        photo_ok = np.zeros(len(rows), bool)
        photo_ok[:n_good] = True
        photo = {}
        for spec in self.bundle.attributes:
            values = np.full((len(rows), len(spec.labels)), np.nan, np.float32)
            if n_good:
                values[:n_good] = predictions.probabilities[spec.name]
            photo[spec.name] = values
        fused = self.part.fusion.combine(photo, photo_ok, text_probs, present)
        # A row without text keeps the image model's probabilities, so its top label and score are the Predictor's own
        # (softmax max and argmax of the same float32 vector), as without a text model; the Ray engine's fragments carry
        # the same vectors.
        indices = {a: np.nan_to_num(fused.probs[a], nan=-1.0).argmax(axis=1)[order] for a in names}
        scores = {a: fused.probs[a].max(axis=1)[order].astype(np.float32) for a in names}
        result = scope_predictions(self.bundle.attributes, Predictions(indices, scores, {a: fused.probs[a][order] for a in names}))
        modes = [str(m) for m in fused.mode[order]]
        conflict = [self._conflicts(fused, photo, text_probs, int(i)) for i in order]
        thresholds = self.thresholds(modes)
        kept = ~rescued
        versions = list(batch.versions) + [""] * int(rescued.sum())
        used = batch.images_used if batch.images_used is not None else np.ones(n_good, np.int32)
        new_batch = replace(
            batch, rows=rows[order], versions=[versions[i] for i in order],
            images_used=np.concatenate([used, np.zeros(int(rescued.sum()), np.int32)])[order],
            error_rows=bad[kept], error_types=[t for t, k in zip(batch.error_types, kept) if k],
            error_messages=[m for m, k in zip(batch.error_messages, kept) if k],
        )
        self.modes.update(modes)
        for row_conflicts in conflict:
            self.conflicts.update(c["attribute"] for c in row_conflicts)
            self.conflict_rows += bool(row_conflicts)
        self.cpu_s += time.process_time() - started
        return new_batch, result, decode_labels(self.bundle.attributes, result.indices), TextColumns(modes, conflict, thresholds)

    def _conflicts(self, fused: Any, photo: dict, text: dict, i: int) -> list[dict[str, Any]]:
        """Row ``i``'s conflicts with what each input said: the two labels and their scores."""
        out = []
        for spec in self.bundle.attributes:
            if fused.conflict[spec.name][i]:
                p, t = int(fused.photo_top[spec.name][i]), int(fused.text_top[spec.name][i])
                out.append({"attribute": spec.name, "photos": spec.labels[p], "photos_score": float(photo[spec.name][i, p]),
                            "text": spec.labels[t], "text_score": float(text[spec.name][i, t])})
        return out

    def facts(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "fields": list(self.part.fields), "text_version": self.part.text_version,
                "rows_by_inputs": dict(self.modes), "conflict_rows": self.conflict_rows, "conflicts": dict(self.conflicts),
                "cpu_s": round(self.cpu_s, 4)}


def text_fuser(config: Any, manifest: Manifest, bundle: ModelBundle, options: Any) -> TextFuser:
    """The run's fuser, once the catalog's text columns and the bundle's text part are checked (exit 2 otherwise)."""
    from ..data.manifest import ManifestError
    from ..model.bundle import BundleError
    from ..model.text import TextModelError, read_text_part

    columns = tuple(config.text_columns)
    found = manifest.extra.column_names if manifest.extra is not None else []
    missing = [c for c in columns if c not in found]
    if missing:
        raise ManifestError(f"{config.catalog}: --text-column {', '.join(missing)}: no such column of text in the catalog "
                            f"(text columns found among those asked for: {', '.join(found) or 'none'})")
    try:
        part = read_text_part(bundle, options)
    except TextModelError as exc:
        raise BundleError(str(exc)) from None
    if part is None:
        raise BundleError(f"{bundle.path} has no text model (model.json has no text section): it tags from photos alone. "
                          "Drop --text-column, or use a bundle trained with text (models/fashion-lite0 reads titles).")
    if len(columns) != len(part.fields):
        raise BundleError(f"{bundle.path} reads {len(part.fields)} text field(s) ({', '.join(part.fields)}); give as many "
                          f"--text-column, in that order (got {', '.join(columns)})")
    part.model.probabilities(["warm up"])  # scikit-learn and scipy load now, with the inputs, not inside the first batch
    return TextFuser(part, bundle, manifest, columns)
