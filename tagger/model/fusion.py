"""Decision-level fusion: the image model's and the text model's probabilities -> one set of tags per row, and where they disagree.

Each row has an input mode: ``photos`` (no usable text), ``text`` (no readable photo), ``both``. Per attribute:

- ``photos``: the image model's probabilities, untouched, and the bundle's own review threshold, so that a row
  without text is tagged exactly as a bundle without a text model tags it;
- ``text``: the text model's probabilities and the threshold calibrated on validation text alone;
- ``both``: by the attribute's ``rule``, chosen on validation rows: ``fused`` (softmax of
  ``photo_weight * log p_photo + text_weight * log p_text + prior_weight * log prior``: a product of the two
  experts with fitted temperatures; a prior weight of -1 is the naive-Bayes correction for counting the
  labels' prior twice), or one modality alone where fusing did not beat it on validation; the threshold
  calibrated on validation fused scores.

A **conflict**: on a ``both`` row, the photos' top label scores at least ``conflict_photos`` and the text's top
label at least ``conflict_text`` (each modality's level above which it was rarely wrong on validation), and the
two labels differ. The attribute is listed in the row's ``conflict`` and goes to review whatever the fused
score. Pure numpy; fitted by :func:`tagger.training.fusion.fit_fusion`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MODES: tuple[str, ...] = ("photos", "text", "both")
RULES: tuple[str, ...] = ("fused", "text", "photos")
_FLOOR = 1e-12  # log of a zero probability


class FusionError(ValueError):
    """A fusion description that cannot be used."""


@dataclass(frozen=True)
class AttributeFusion:
    name: str
    rule: str = "fused"
    photo_weight: float = 1.0
    text_weight: float = 1.0
    prior_weight: float = 0.0
    prior: tuple[float, ...] = ()  # the train rows' label shares (for prior_weight)
    thresholds: Mapping[str, float] = field(default_factory=dict)  # mode -> review threshold
    conflict_photos: float = 1.01  # > 1: never confident enough to call a conflict
    conflict_text: float = 1.01

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "rule": self.rule, "photo_weight": self.photo_weight, "text_weight": self.text_weight,
                "prior_weight": self.prior_weight, "prior": [round(p, 6) for p in self.prior],
                "thresholds": {m: float(self.thresholds[m]) for m in MODES if m in self.thresholds},
                "conflict": {"photos": self.conflict_photos, "text": self.conflict_text}}

    @classmethod
    def from_json(cls, spec: Mapping[str, Any], n_labels: int, where: str) -> AttributeFusion:
        try:
            made = cls(name=str(spec["name"]), rule=spec["rule"], photo_weight=float(spec["photo_weight"]),
                       text_weight=float(spec["text_weight"]), prior_weight=float(spec.get("prior_weight", 0.0)),
                       prior=tuple(float(p) for p in spec.get("prior") or ()),
                       thresholds={m: float(v) for m, v in (spec.get("thresholds") or {}).items()},
                       conflict_photos=float(spec["conflict"]["photos"]), conflict_text=float(spec["conflict"]["text"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise FusionError(f"{where}: fusion of {spec.get('name') if isinstance(spec, Mapping) else spec!r} lacks or mistypes {exc}") from None
        problems = []
        if made.rule not in RULES:
            problems.append(f"rule must be one of {', '.join(RULES)}, got {made.rule!r}")
        numbers = [made.photo_weight, made.text_weight, made.prior_weight, made.conflict_photos, made.conflict_text, *made.prior,
                   *made.thresholds.values()]
        if not all(math.isfinite(v) for v in numbers):
            problems.append("every weight, level and threshold must be finite")
        if made.prior_weight and len(made.prior) != n_labels:
            problems.append(f"prior has {len(made.prior)} shares for {n_labels} labels")
        if set(made.thresholds) != {"text", "both"} and set(made.thresholds) != set(MODES):
            problems.append(f"thresholds must be given for text and both, got {sorted(made.thresholds)}")
        if any(not 0.0 <= v <= 1.0 for v in made.thresholds.values()):
            problems.append("thresholds must be in [0, 1]")
        if problems:
            raise FusionError(f"{where}: fusion of {made.name!r}: {'; '.join(problems)}")
        return made

    def combine(self, photo: np.ndarray, text: np.ndarray) -> np.ndarray:
        """Probabilities for ``both`` rows (n, K) from the two modalities' (n, K)."""
        if self.rule == "photos":
            return photo
        if self.rule == "text":
            return text
        score = self.photo_weight * np.log(np.maximum(photo, _FLOOR)) + self.text_weight * np.log(np.maximum(text, _FLOOR))
        if self.prior_weight:
            score = score + self.prior_weight * np.log(np.maximum(np.asarray(self.prior, np.float64), _FLOOR))
        score = np.exp(score - score.max(axis=1, keepdims=True))
        return (score / score.sum(axis=1, keepdims=True)).astype(np.float32)


@dataclass
class Fused:
    """Per row, in input order: the probabilities the tags come from, the input mode, and conflicts."""

    probs: dict[str, np.ndarray]  # NaN rows: no usable input
    mode: np.ndarray  # (n,) object: "photos" | "text" | "both" | "" (nothing usable)
    conflict: dict[str, np.ndarray]  # attr -> (n,) bool
    photo_top: dict[str, np.ndarray] = field(default_factory=dict)  # attr -> (n,) top index of the photos alone (-1: none)
    text_top: dict[str, np.ndarray] = field(default_factory=dict)

    def conflicts(self, row: int) -> list[str]:
        return [a for a, flags in self.conflict.items() if flags[row]]


@dataclass(frozen=True)
class Fusion:
    attributes: tuple[AttributeFusion, ...]

    def __getitem__(self, name: str) -> AttributeFusion:
        for spec in self.attributes:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def to_json(self) -> list[dict[str, Any]]:
        return [a.to_json() for a in self.attributes]

    @classmethod
    def from_json(cls, specs: Any, labels: Mapping[str, int], where: str) -> Fusion:
        if not isinstance(specs, list) or [s.get("name") if isinstance(s, Mapping) else None for s in specs] != list(labels):
            raise FusionError(f"{where}: text.fusion must list the bundle's attributes in order ({', '.join(labels)})")
        return cls(tuple(AttributeFusion.from_json(s, labels[s["name"]], where) for s in specs))

    def threshold(self, name: str, mode: str, photo_threshold: float) -> float:
        if mode == "photos":
            return photo_threshold
        return float(self[name].thresholds[mode])

    def combine(self, photo: Mapping[str, np.ndarray], photo_ok: np.ndarray, text: Mapping[str, np.ndarray],
                text_present: np.ndarray) -> Fused:
        """Fuse per row by its mode. ``photo``/``text``: {attr: (n, K)}; rows not ok / not present are ignored."""
        photo_ok = np.asarray(photo_ok, bool)
        text_present = np.asarray(text_present, bool)
        n = len(photo_ok)
        mode = np.full(n, "", dtype=object)
        both = photo_ok & text_present
        mode[photo_ok & ~text_present] = "photos"
        mode[~photo_ok & text_present] = "text"
        mode[both] = "both"
        probs, conflict, photo_top, text_top = {}, {}, {}, {}
        for spec in self.attributes:
            p, t = np.asarray(photo[spec.name], np.float32), np.asarray(text[spec.name], np.float32)
            out = np.full(p.shape, np.nan, np.float32)
            only_photo = photo_ok & ~text_present
            only_text = ~photo_ok & text_present
            out[only_photo] = p[only_photo]
            out[only_text] = t[only_text]
            flags = np.zeros(n, bool)
            if both.any():
                out[both] = spec.combine(p[both], t[both])
                pb, tb = p[both], t[both]
                flags[both] = ((pb.max(axis=1) >= spec.conflict_photos) & (tb.max(axis=1) >= spec.conflict_text)
                               & (pb.argmax(axis=1) != tb.argmax(axis=1)))
            probs[spec.name], conflict[spec.name] = out, flags
            photo_top[spec.name] = np.where(photo_ok, np.nan_to_num(p, nan=-1).argmax(axis=1), -1)
            text_top[spec.name] = np.where(text_present, np.nan_to_num(t, nan=-1).argmax(axis=1), -1)
        return Fused(probs, mode, conflict, photo_top, text_top)


def describe_modes(modes: Sequence[str]) -> dict[str, int]:
    """How many rows were tagged from each input mode."""
    values, counts = np.unique(np.asarray(modes, dtype=object).astype(str), return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts) if v}
