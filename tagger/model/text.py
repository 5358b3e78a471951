"""The catalog's own words as a second input: hashed n-grams of a row's text fields -> one linear softmax per attribute.

A bundle may carry a text model beside its image network (``text.safetensors``; model.json's ``text`` section
says how text becomes features). Nothing about it is learned but the weights: the featurisation is
stateless (scikit-learn's :class:`~sklearn.feature_extraction.text.HashingVectorizer`: MurmurHash3 of each
n-gram, no vocabulary to ship), so model.json's settings reproduce it exactly:

- the text of a row: its text fields in the recorded order, empty ones skipped, joined with " | ";
- normalised: Unicode NFKC, case-folded, whitespace runs -> one space, stripped, cut to ``max_chars``
  (a pasted 50 kB description costs what 2,000 characters cost);
- features: word 1-2-grams (tokens of 2+ word characters) in one hashed half, character 2-5-grams within
  word boundaries (``char_wb``) in the other, so a word and a character n-gram of the same spelling never
  share a column; counts -> log(1 + count), each row L2-normalised;
- per attribute a softmax over ``weights[:, heads] + bias``; the weights are stored only for the hashed
  columns seen in training (any other column has weight 0: it never received a gradient).

A row whose normalised text is empty has no text: it gets no text probabilities (NaN) and is tagged from its
photos alone. Training drops each row's text at random (whole and word by word), so the model has seen
generic, short and absent text. Cost: ~0.1 ms of CPU per row against ~20 ms for a photo.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TEXT_WEIGHTS_FILE = "text.safetensors"
TEXT_FORMAT = 1
FIELD_SEPARATOR = " | "
TOKEN_PATTERN = r"(?u)\b\w\w+\b"
_WHITESPACE = re.compile(r"\s+")


class TextModelError(ValueError):
    """A text model or its description that cannot be used, with the reason."""


@dataclass(frozen=True)
class TextFeaturizer:
    """How a row's text fields become a sparse feature row; all of it is recorded in model.json."""

    fields: tuple[str, ...]
    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] = (2, 5)
    hash_bits: int = 18  # per half: 2**18 word columns, then 2**18 character columns
    max_chars: int = 2000

    def __post_init__(self) -> None:
        if not self.fields or not all(isinstance(f, str) and f for f in self.fields) or len(set(self.fields)) != len(self.fields):
            raise TextModelError(f"text fields must be distinct non-empty column names, got {list(self.fields)!r}")
        for name, (low, high) in (("word_ngrams", self.word_ngrams), ("char_ngrams", self.char_ngrams)):
            if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high <= 10):
                raise TextModelError(f"{name} must be [low, high] with 1 <= low <= high <= 10, got {[low, high]!r}")
        if not isinstance(self.hash_bits, int) or not 10 <= self.hash_bits <= 24:
            raise TextModelError(f"hash_bits must be an integer in [10, 24], got {self.hash_bits!r}")
        if not isinstance(self.max_chars, int) or self.max_chars < 1:
            raise TextModelError(f"max_chars must be a positive integer, got {self.max_chars!r}")

    @property
    def n_features(self) -> int:
        return 2 << self.hash_bits

    def to_json(self) -> dict[str, Any]:
        return {
            "fields": list(self.fields),
            "join": FIELD_SEPARATOR,
            "normalisation": f"NFKC, casefold, whitespace runs -> one space, stripped, first {self.max_chars} characters",
            "max_chars": self.max_chars,
            "word_ngrams": list(self.word_ngrams),
            "token_pattern": TOKEN_PATTERN,
            "char_ngrams": list(self.char_ngrams),
            "char_analyzer": "char_wb",
            "hash": "scikit-learn HashingVectorizer: MurmurHash3_32 (seed 0) of the n-gram, absolute value mod 2**hash_bits, alternate_sign off",
            "hash_bits": self.hash_bits,
            "columns": "word n-grams in [0, 2**hash_bits), character n-grams in [2**hash_bits, 2 * 2**hash_bits)",
            "weighting": "log(1 + count), each row L2-normalised",
        }

    @classmethod
    def from_json(cls, spec: Mapping[str, Any]) -> TextFeaturizer:
        if spec.get("token_pattern", TOKEN_PATTERN) != TOKEN_PATTERN or spec.get("char_analyzer", "char_wb") != "char_wb" \
                or spec.get("join", FIELD_SEPARATOR) != FIELD_SEPARATOR:
            raise TextModelError("this build featurises text with one token pattern, char_wb and ' | '; the bundle asks for others")
        try:
            return cls(fields=tuple(spec["fields"]), word_ngrams=tuple(spec["word_ngrams"]), char_ngrams=tuple(spec["char_ngrams"]),
                       hash_bits=spec["hash_bits"], max_chars=spec["max_chars"])
        except (KeyError, TypeError) as exc:
            raise TextModelError(f"text featurisation lacks or mistypes {exc}") from None

    def normalise(self, text: str | None) -> str:
        if not text:
            return ""
        text = unicodedata.normalize("NFKC", str(text)[: self.max_chars * 2]).casefold()
        return _WHITESPACE.sub(" ", text).strip()[: self.max_chars]

    def join(self, values: Mapping[str, Any]) -> str:
        """One row's text: its fields in order, empty ones skipped, normalised ("" when it has none)."""
        parts = [self.normalise(values.get(f)) for f in self.fields]
        return FIELD_SEPARATOR.join(p for p in parts if p)

    def rows_text(self, columns: Mapping[str, Sequence[Any]], n: int) -> list[str]:
        """Per row, the joined normalised text of ``columns`` (a field without a column counts as empty)."""
        present = [columns[f] for f in self.fields if f in columns]
        if not present:
            return [""] * n
        out = []
        for i in range(n):
            parts = [self.normalise(col[i]) for col in present]
            out.append(FIELD_SEPARATOR.join(p for p in parts if p))
        return out

    def transform(self, texts: Sequence[str]):
        """Normalised texts -> CSR matrix (n, :attr:`n_features`), float32; an empty text is an all-zero row."""
        import scipy.sparse as sp
        from sklearn.feature_extraction.text import HashingVectorizer

        half = 1 << self.hash_bits
        common = dict(n_features=half, alternate_sign=False, norm=None, lowercase=False, dtype=np.float32)
        words = HashingVectorizer(analyzer="word", ngram_range=self.word_ngrams, token_pattern=TOKEN_PATTERN, **common)
        chars = HashingVectorizer(analyzer="char_wb", ngram_range=self.char_ngrams, **common)
        matrix = sp.hstack([words.transform(texts), chars.transform(texts)], format="csr", dtype=np.float32)
        matrix.data = np.log1p(matrix.data)
        norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
        norms[norms == 0] = 1.0
        return sp.csr_matrix(sp.diags(1.0 / norms) @ matrix, dtype=np.float32)


@dataclass
class TextModel:
    """Hashed n-gram features -> softmax probabilities per attribute."""

    featurizer: TextFeaturizer
    attributes: tuple[tuple[str, int], ...]  # (name, number of labels), in the bundle's order
    columns: np.ndarray  # (m,) int64, sorted: the hashed columns that have weights
    weights: np.ndarray  # (m, sum of labels) float32
    bias: np.ndarray  # (sum of labels,) float32
    facts: dict[str, Any] = field(default_factory=dict)  # training facts, recorded in model.json

    def __post_init__(self) -> None:
        total = sum(k for _, k in self.attributes)
        if self.weights.shape != (len(self.columns), total) or self.bias.shape != (total,):
            raise TextModelError(f"text weights {self.weights.shape} / bias {self.bias.shape} do not fit {len(self.columns)} "
                                 f"columns and {total} labels")
        if len(self.columns) and (np.any(np.diff(self.columns) <= 0) or self.columns[0] < 0 or self.columns[-1] >= self.featurizer.n_features):
            raise TextModelError("text columns must be sorted, distinct and inside the hashed feature space")
        if not (np.isfinite(self.weights).all() and np.isfinite(self.bias).all()):
            raise TextModelError("text weights hold NaN or infinite values; the training diverged or the file is damaged")

    @property
    def fields(self) -> tuple[str, ...]:
        return self.featurizer.fields

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """(n, sum of labels) float32 from normalised texts."""
        import scipy.sparse as sp

        x = self.featurizer.transform(texts)
        position = np.searchsorted(self.columns, x.indices)
        position = np.minimum(position, max(len(self.columns) - 1, 0))
        known = (self.columns[position] == x.indices) if len(self.columns) else np.zeros(len(x.indices), bool)
        # Columns never seen in training carry no weight: drop them, keep the row structure.
        kept = sp.csr_matrix((x.data * known, np.where(known, position, 0), x.indptr), shape=(x.shape[0], max(len(self.columns), 1)))
        out = kept @ self.weights if len(self.columns) else np.zeros((x.shape[0], len(self.bias)), np.float32)
        return np.asarray(out, dtype=np.float32) + self.bias

    def probabilities(self, texts: Sequence[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``({attr: (n, K) float32}, present (n,) bool)`` for normalised texts; rows without text: NaN."""
        present = np.array([bool(t) for t in texts], dtype=bool)
        n = len(texts)
        probs = {name: np.full((n, k), np.nan, np.float32) for name, k in self.attributes}
        if present.any():
            logits = self.logits([t for t, p in zip(texts, present) if p])
            start = 0
            for name, k in self.attributes:
                part = logits[:, start : start + k]
                part = np.exp(part - part.max(axis=1, keepdims=True))
                probs[name][present] = part / part.sum(axis=1, keepdims=True)
                start += k
        return probs, present

    # --- the bundle's files ---
    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        # float16 halves the file (~7 MB for ~20k columns x 171 labels); the scores are computed in float32 and the
        # bundle's figures are measured on the weights as stored.
        return save({"columns": self.columns.astype(np.int64), "weights": self.weights.astype(np.float16),
                     "bias": self.bias.astype(np.float32)})

    def stored(self) -> TextModel:
        """This model as its file holds it (float16 weights): what a bundle loaded from disk computes."""
        return TextModel(self.featurizer, self.attributes, self.columns, self.weights.astype(np.float16).astype(np.float32),
                         self.bias, self.facts)

    def spec(self, weights: bytes) -> dict[str, Any]:
        """model.json's ``text`` section (fusion added by the caller)."""
        return {
            "format": TEXT_FORMAT,
            "file": TEXT_WEIGHTS_FILE,
            "sha256": hashlib.sha256(weights).hexdigest(),
            "featurisation": self.featurizer.to_json(),
            "model": "one linear softmax per attribute over the hashed features; weights[:, offset:offset+labels] in the "
                     "bundle's attribute and label order; columns: the hashed columns with weights",
            "training": self.facts,
        }

    @classmethod
    def from_bundle_files(cls, spec: Mapping[str, Any], weights: bytes, attributes: Sequence[tuple[str, int]], where: str) -> TextModel:
        from safetensors.numpy import load

        if spec.get("format") != TEXT_FORMAT:
            raise TextModelError(f"{where}: text format {spec.get('format')!r} is not supported (this build reads {TEXT_FORMAT})")
        if spec.get("sha256") != hashlib.sha256(weights).hexdigest():
            raise TextModelError(f"{where}: {TEXT_WEIGHTS_FILE} is not the file model.json records (sha256 differs); "
                                 "the bundle was changed after it was written, fit its text model again")
        try:
            tensors = load(weights)
            model = cls(TextFeaturizer.from_json(spec.get("featurisation") or {}), tuple(attributes),
                        np.asarray(tensors["columns"], np.int64), np.asarray(tensors["weights"], np.float32),
                        np.asarray(tensors["bias"], np.float32), dict(spec.get("training") or {}))
        except TextModelError as exc:
            raise TextModelError(f"{where}: {exc}") from None
        except Exception as exc:  # safetensors' own errors, a missing tensor
            raise TextModelError(f"{where}: {TEXT_WEIGHTS_FILE} cannot be read: {type(exc).__name__}: {exc}") from None
        return model


def drop_text(texts: Sequence[str], rng: np.random.Generator, p_row: float, p_word: float) -> list[str]:
    """Texts with each one emptied with probability ``p_row`` and each word dropped with ``p_word``: the model
    learns what an absent or partial title means (its empty-text output becomes the labels' prior)."""
    out = []
    for text in texts:
        if rng.random() < p_row:
            out.append("")
            continue
        words = text.split(" ")
        keep = rng.random(len(words)) >= p_word
        out.append(" ".join(w for w, k in zip(words, keep) if k) if keep.any() else text)
    return out


def fit_text_model(
    texts: Sequence[str],
    targets: np.ndarray,
    attributes: Sequence[tuple[str, int]],
    featurizer: TextFeaturizer,
    *,
    c: float = 10.0,
    min_rows: int = 2,
    altered: float = 0.3,
    p_row: float = 0.1,
    p_word: float = 0.15,
    seed: int = 0,
) -> TextModel:
    """Fit the softmax heads on normalised ``texts`` and ``targets`` (n, n_attr; -1 = unknown, masked out).

    The training rows: every row as given, plus an ``altered`` share of them again with words dropped and
    ``p_row`` of them with no text at all (:func:`drop_text`), so that the empty-text output is the labels'
    prior. Only hashed columns that occur in at least ``min_rows`` rows get weights (a column seen once is a
    spelling, not evidence, and costs as much to ship as any other). One L2-regularised multinomial
    logistic regression per attribute (scikit-learn, lbfgs, ``C=c``): convex, so the data order does not
    matter; about two CPU minutes for ~7k titles."""
    import time

    from sklearn.linear_model import LogisticRegression

    started = time.monotonic()
    rng = np.random.default_rng(seed)
    texts = list(texts)
    targets = np.asarray(targets)
    again = np.flatnonzero(rng.random(len(texts)) < altered)
    empty = np.flatnonzero(rng.random(len(texts)) < p_row)
    all_texts = texts + drop_text([texts[i] for i in again], rng, 0.0, p_word) + [""] * len(empty)
    all_targets = np.concatenate([targets, targets[again], targets[empty]])
    x = featurizer.transform(all_texts)
    counts = np.bincount(x.indices, minlength=featurizer.n_features)
    columns = np.flatnonzero(counts >= min_rows).astype(np.int64)
    x = x[:, columns].tocsr()
    sizes = [k for _, k in attributes]
    weights = np.zeros((len(columns), sum(sizes)), np.float32)
    # A label no training row has: never predicted (its logit sits far under every other).
    bias = np.full(sum(sizes), -30.0, np.float32)
    start = 0
    for j, k in enumerate(sizes):
        known = all_targets[:, j] >= 0
        classes = np.unique(all_targets[known, j])
        if len(classes) == 1:
            bias[start + classes[0]] = 0.0
        elif len(classes) > 1:
            model = LogisticRegression(C=c, max_iter=1000).fit(x[known], all_targets[known, j])
            coef, intercept = model.coef_, model.intercept_
            if len(classes) == 2:  # scikit-learn's binary form: one score for the second class
                coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.r_[0.0, intercept]
            weights[:, start + classes] = coef.T
            bias[start + classes] = intercept
        start += k
    facts = {"rows": len(texts), "altered_rows": int(len(again)), "empty_rows": int(len(empty)), "drop_word": p_word,
             "min_rows_per_column": min_rows, "columns": int(len(columns)),
             "classifier": f"scikit-learn LogisticRegression (lbfgs, L2, C={c}) per attribute", "seed": seed,
             "seconds": round(time.monotonic() - started, 1)}
    return TextModel(featurizer, tuple(attributes), columns, weights, bias, facts)


@dataclass
class TextPart:
    """A bundle's text model and its fusion with the photos (model.json's ``text`` section + ``text.safetensors``)."""

    model: TextModel
    fusion: Any  # tagger.model.fusion.Fusion
    text_version: str  # hash of the text weights and the text section's prediction-relevant fields
    spec: Mapping[str, Any] = field(default_factory=dict)

    @property
    def fields(self) -> tuple[str, ...]:
        return self.model.fields


def _text_version(weights: bytes, featurisation: Mapping[str, Any], fusion: Any) -> str:
    digest = hashlib.sha256(weights)
    digest.update(repr(sorted(featurisation.items())).encode())
    digest.update(repr(fusion).encode())
    return digest.hexdigest()[:16]


def load_text_part(bundle: Any, meta: Mapping[str, Any], read_bytes: Any) -> TextPart | None:
    """The text part of a bundle whose model.json is ``meta`` (None: the bundle reads photos only).
    ``read_bytes(name)``: a file of the bundle's folder. Refuses a text section that does not add up."""
    from .fusion import Fusion

    spec = meta.get("text")
    if spec is None:
        return None
    where = f"{bundle.path}: model.json text"
    if not isinstance(spec, Mapping):
        raise TextModelError(f"{where}: expected an object")
    name = spec.get("file", TEXT_WEIGHTS_FILE)
    if name != TEXT_WEIGHTS_FILE:
        raise TextModelError(f"{where}: file must be {TEXT_WEIGHTS_FILE}, got {name!r}")
    try:
        weights = read_bytes(TEXT_WEIGHTS_FILE)
    except FileNotFoundError:
        raise TextModelError(f"{bundle.path}: model.json has a text model but {TEXT_WEIGHTS_FILE} is missing; copy the bundle "
                             "whole, or drop model.json's text section to tag from photos alone") from None
    attributes = [(a.name, len(a.labels)) for a in bundle.attributes]
    model = TextModel.from_bundle_files(spec, weights, attributes, where)
    fusion = Fusion.from_json(spec.get("fusion"), dict(attributes), where)
    return TextPart(model, fusion, _text_version(weights, spec.get("featurisation") or {}, fusion.to_json()), spec)


def read_text_part(bundle: Any, storage_options: Mapping[str, Any] | None = None) -> TextPart | None:
    """The text part of a loaded bundle, read from its folder (local or remote); None: photos only."""
    from .. import storage

    meta = json.loads(storage.read_bytes(storage.join(bundle.path, "model.json"), storage_options))
    return load_text_part(bundle, meta, lambda name: storage.read_bytes(storage.join(bundle.path, name), storage_options))


def text_section(model: TextModel, fusion: Any, weights: bytes, **facts: Any) -> dict[str, Any]:
    """model.json's ``text`` section for ``model`` (written as ``weights``) and ``fusion``, with ``facts`` (metrics, fitting)."""
    section = model.spec(weights)
    section["fusion"] = fusion.to_json()
    section["text_version"] = _text_version(weights, section["featurisation"], section["fusion"])
    section.update(facts)
    return section


def write_text_part(out: str, model: TextModel, fusion: Any, storage_options: Mapping[str, Any] | None = None, **facts: Any) -> str:
    """Add ``model`` and ``fusion`` to the bundle at ``out``: ``text.safetensors`` first, then model.json with its
    ``text`` section (every other field, and model.safetensors, as they were). Returns the text_version."""
    from .. import storage

    weights = model.to_bytes()
    meta_url = storage.join(out, "model.json")
    meta = json.loads(storage.read_bytes(meta_url, storage_options))
    meta["text"] = text_section(model, fusion, weights, **facts)
    storage.write_bytes(storage.join(out, TEXT_WEIGHTS_FILE), weights, storage_options)
    storage.write_bytes(meta_url, json.dumps(meta, indent=2).encode(), storage_options)
    return meta["text"]["text_version"]
