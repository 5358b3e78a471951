"""Where an attribute applies: ``pattern`` for apparel, heel height for shoes, strap for bags.

A bundle's attribute may carry ``applies_when = {"attribute": OTHER, "values": [...]}``: it is tagged only where the
model's own top label for OTHER is one of the values. Elsewhere the tag is null (no label, no score), not a guess the
attribute never learnt to make. This module is the one place predictions become tags with their scope applied:
:class:`tagger.model.predictor.Predictor` (tag, evaluate, predict, the Ray actors) and the several-photos assembler
call :func:`scope_predictions`; label strings come from :func:`decode_labels` (null where the index is -1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

OUT_OF_SCOPE = -1  # the index of a null tag (failed images carry -1 too, in the evaluate and predict outputs)


@dataclass(frozen=True)
class Scope:
    attribute: str  # the attribute whose top label decides
    values: tuple[str, ...]  # where it is one of these, the scoped attribute applies

    def to_json(self) -> dict[str, Any]:
        return {"attribute": self.attribute, "values": list(self.values)}

    def describe(self) -> str:
        return f"{self.attribute}={','.join(self.values)}"


def parse_applies_when(text: str) -> tuple[str, Scope]:
    """``ATTR:OTHER=VALUE[,VALUE...]`` -> (ATTR, Scope). ValueError names what is missing."""
    attr, sep, rest = text.partition(":")
    other, eq, values = rest.partition("=")
    names = tuple(v.strip() for v in values.split(",") if v.strip())
    if not sep or not eq or not attr.strip() or not other.strip() or not names:
        raise ValueError(f"{text!r}: expected ATTRIBUTE:OTHER=VALUE[,VALUE...], e.g. pattern:masterCategory=Apparel")
    return attr.strip(), Scope(other.strip(), names)


def scope_problem(scopes: Mapping[str, Scope], labels: Mapping[str, Sequence[str]]) -> str | None:
    """Why these scopes cannot work with these attributes and labels (None: they can)."""
    for attr, scope in scopes.items():
        if attr not in labels:
            return f"{attr}: not an attribute of this model ({', '.join(labels)})"
        if scope.attribute == attr or scope.attribute not in labels:
            return f"{attr}: its scope must name another attribute of this model, got {scope.attribute!r}"
        if scope.attribute in scopes:
            return f"{attr}: its scope attribute {scope.attribute} is scoped itself; scope by an attribute that is always tagged"
        unknown = [v for v in scope.values if v not in labels[scope.attribute]]
        if unknown:
            return (f"{attr}: {scope.attribute} has no label {', '.join(map(repr, unknown))} "
                    f"(its labels: {', '.join(list(labels[scope.attribute])[:12])})")
    return None


def in_scope(scopes: Mapping[str, Scope], labels: Mapping[str, Sequence[str]], indices: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per scoped attribute, which rows it applies to, from the top label indices of its scope attribute."""
    out = {}
    for attr, scope in scopes.items():
        wanted = [labels[scope.attribute].index(v) for v in scope.values]
        out[attr] = np.isin(np.asarray(indices[scope.attribute]), wanted)
    return out


def scope_predictions(specs: Sequence[Any], predictions: Any) -> Any:
    """``predictions`` (indices, scores) with each scoped attribute's out-of-scope rows at index -1 and score NaN;
    the probabilities, when present, stay the model's (several photos are averaged from them, then scoped)."""
    scopes = {s.name: s.applies_when for s in specs if getattr(s, "applies_when", None) is not None}
    if not scopes:
        return predictions
    labels = {s.name: s.labels for s in specs}
    indices, scores = dict(predictions.indices), dict(predictions.scores)
    for attr, inside in in_scope(scopes, labels, indices).items():
        indices[attr] = np.where(inside, indices[attr], OUT_OF_SCOPE)
        scores[attr] = np.where(inside, scores[attr], np.float32("nan")).astype(np.float32)
    return replace(predictions, indices=indices, scores=scores)


def decode_labels(specs: Sequence[Any], indices: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Label strings per attribute (object arrays), None where the index is -1 (out of scope)."""
    out = {}
    for spec in specs:
        index = np.asarray(indices[spec.name])
        vocab = np.asarray(list(spec.labels) + [None], dtype=object)  # -1 picks the None
        out[spec.name] = vocab[index]
    return out


def non_finite(predictions: Any) -> np.ndarray:
    """Rows with a NaN or infinite score where a tag was made (a null tag's NaN is not one)."""
    bad = None
    for name, scores in predictions.scores.items():
        wrong = ~np.isfinite(scores) & (np.asarray(predictions.indices[name]) != OUT_OF_SCOPE)
        bad = wrong if bad is None else bad | wrong
    return bad if bad is not None else np.zeros(0, dtype=bool)
