"""The report's numbers: label mix, scores and review share of a night; drift against the night before;
agreement with the catalog's own labels; the thresholds.

Everything is accumulated batch by batch (Arrow value counts, numpy histograms, polars joins of one batch),
so memory does not grow with the night. Definitions, as in Evidently's and whylogs' drift reports:

- share of a label: its rows / the night's tag rows;
- PSI = sum over labels of (p - q) * ln(p / q), shares floored at :data:`~.config.PSI_FLOOR` so that a new or
  vanished label counts heavily but finitely (< 0.1: stable, 0.1-0.25: moderate, > 0.25: a real shift);
- Jensen-Shannon distance: sqrt of the JS divergence in base 2, 0 (same mix) .. 1 (no label in common);
- noise floor: the distance two nights of the same row counts reach by sampling alone (a bootstrap from their
  pooled mix, :func:`noise_floor`); a mix is flagged as drifted only past it, so small nights of many labels
  are not alarms and large nights are held to a finer floor;
- agreement: tag == catalog label (both trimmed of spaces), on the rows whose catalog label is not empty.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .config import DRIFT_ALPHA, DRIFT_DRAWS, DRIFT_SEED, PSI_FLOOR, SCORE_BINS, Thresholds
from .load import Night, _value_counts

REVIEW = "needs_review"
EDGES = np.linspace(0.0, 1.0, SCORE_BINS + 1)


@dataclass
class Profile:
    """One night's tags, summed up: what drift and the page compare."""

    attributes: list[str]
    rows: int = 0
    reused: int = 0
    review_rows: int = 0
    mix: dict[str, Counter] = field(default_factory=dict)
    hist: dict[str, np.ndarray] = field(default_factory=dict)
    score_sum: dict[str, float] = field(default_factory=dict)
    review: Counter = field(default_factory=Counter)
    review_known: bool = False  # the tags have needs_review (partitions written before it existed do not)

    def share(self, attribute: str) -> dict[str, float]:
        total = sum(self.mix.get(attribute, {}).values())
        return {k: v / total for k, v in self.mix.get(attribute, {}).items()} if total else {}

    def score_mean(self, attribute: str) -> float | None:
        count = int(self.hist[attribute].sum()) if attribute in self.hist else 0
        return self.score_sum[attribute] / count if count else None

    def review_share(self, attribute: str) -> float | None:
        return self.review.get(attribute, 0) / self.rows if self.rows and self.review_known else None


def profile(night: Night, attributes: list[str], batch_rows: int) -> Profile:
    result = Profile(attributes)
    for a in attributes:
        result.mix[a], result.hist[a], result.score_sum[a] = Counter(), np.zeros(SCORE_BINS, np.int64), 0.0
    columns = [*attributes, *(f"{a}_score" for a in attributes), REVIEW, "run_id"]
    run_id = night.run_id
    for batch in night.iter_tags(columns, batch_rows):
        names = batch.schema.names
        result.rows += batch.num_rows
        for a in attributes:
            if a in names:
                result.mix[a].update(_value_counts(batch.column(a)))
            if f"{a}_score" in names:
                scores = batch.column(f"{a}_score").to_numpy(zero_copy_only=False)
                scores = scores[np.isfinite(scores)]  # a null tag has a null score
                result.hist[a] += np.histogram(np.clip(scores, 0.0, 1.0), bins=EDGES)[0]
                result.score_sum[a] += float(scores.sum(dtype=np.float64))
        if REVIEW in names:
            result.review_known = True
            column = batch.column(REVIEW)
            result.review.update(_value_counts(pc.list_flatten(column)))
            result.review_rows += int(pc.sum(pc.greater(pc.list_value_length(column), 0)).as_py() or 0)
        if "run_id" in names and run_id:
            # A --since run keeps a reused row's original run_id: the rows of other runs are the reused ones.
            result.reused += batch.num_rows - int(pc.sum(pc.equal(batch.column("run_id"), run_id)).as_py() or 0)
    return result


def counts(night: Night, tags: Profile, batch_rows: int) -> dict[str, Any]:
    errors = night.error_types(batch_rows)
    error_rows = sum(errors.values())
    rows = tags.rows + error_rows
    photos = (night.summary or {}).get("photo_errors")
    return {
        "rows": rows, "tagged": tags.rows - tags.reused, "reused": tags.reused, "errors": error_rows,
        "error_types": dict(sorted(errors.items())), "error_rate": error_rows / rows if rows else 0.0,
        "review_rows": tags.review_rows if tags.review_known else None,
        "review_share": tags.review_rows / tags.rows if tags.rows and tags.review_known else None,
        # Several photos per product: photos not read, by type, also of products tagged from their other photos
        # (the run summary's count; the errors table holds products only).
        **({"photo_errors": dict(sorted(photos.items()))} if isinstance(photos, dict) else {}),
    }


def change(now: Mapping[str, Any], before: Mapping[str, Any] | None) -> dict[str, Any]:
    """Tonight minus the night before, for every number both have (error types: every type either has)."""
    if before is None:
        return {}
    out: dict[str, Any] = {}
    for key, value in now.items():
        if isinstance(value, (int, float)) and isinstance(before.get(key), (int, float)):
            out[key] = value - before[key]
    types = set(now.get("error_types", {})) | set(before.get("error_types", {}))
    out["error_types"] = {t: now.get("error_types", {}).get(t, 0) - before.get("error_types", {}).get(t, 0) for t in sorted(types)}
    return out


def drift(now: Mapping[str, int], before: Mapping[str, int], movers: int = 5) -> dict[str, Any] | None:
    """PSI and Jensen-Shannon distance of two label mixes (counts), new and vanished labels, largest movers;
    None when either night has no tags for the attribute (nothing to compare)."""
    n, m = sum(now.values()), sum(before.values())
    if not n or not m:
        return None
    labels = sorted(set(now) | set(before))
    p = np.array([now.get(label, 0) / n for label in labels])
    q = np.array([before.get(label, 0) / m for label in labels])
    psi = float(_psi(p[None], q[None])[0])
    js = float(_js(p[None], q[None])[0])
    x, y = np.array([now.get(label, 0) for label in labels]), np.array([before.get(label, 0) for label in labels])
    noise = noise_floor(x, y)
    largest_move_se = float(_move_se(x[None], y[None])[0])
    order = sorted(range(len(labels)), key=lambda i: (-abs(p[i] - q[i]), labels[i]))
    return {
        "psi": psi,
        "js_distance": js,
        # What sampling alone gives for these row counts and this mix (module docstring): the shift is flagged
        # only past it, whatever the distance.
        "js_noise_floor": noise["js"],
        "psi_noise_floor": noise["psi"],
        "p_value": float((np.sum(noise["js_draws"] >= js - 1e-12) + 1) / (len(noise["js_draws"]) + 1)),
        # The largest single label's move in standard errors, against what sampling gives for it: a shift of one
        # label (Grey 8 % -> 30 %) among many rare ones is lost in the distance of a small night, not in this.
        "largest_move_se": largest_move_se,
        "largest_move_se_noise_floor": noise["move"],
        "beyond_noise": bool(js > noise["js"] or largest_move_se > noise["move"]),
        "new_labels": [labels[i] for i in range(len(labels)) if q[i] == 0],
        "vanished_labels": [labels[i] for i in range(len(labels)) if p[i] == 0],
        "movers": [{"label": labels[i], "share": float(p[i]), "previous_share": float(q[i]), "change": float(p[i] - q[i])}
                   for i in order[:movers] if p[i] != q[i]],
    }


def _psi(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """PSI of each row pair of share matrices (shares floored at PSI_FLOOR)."""
    return np.sum((p - q) * np.log(np.maximum(p, PSI_FLOOR) / np.maximum(q, PSI_FLOOR)), axis=1)


def _js(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon distance (base 2, 0..1) of each row pair of share matrices."""
    middle = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(np.where(p > 0, p, 1) / np.where(middle > 0, middle, 1)), 0.0).sum(axis=1)
        kl_q = np.where(q > 0, q * np.log2(np.where(q > 0, q, 1) / np.where(middle > 0, middle, 1)), 0.0).sum(axis=1)
    return np.minimum(np.sqrt(np.maximum(0.0, 0.5 * kl_p + 0.5 * kl_q)), 1.0)


def _move_se(now: np.ndarray, before: np.ndarray) -> np.ndarray:
    """Per row pair of count matrices, the largest |share tonight - share before| of a label in standard errors
    of a two-sample share (pooled), as a two-proportion z statistic."""
    n, m = now.sum(axis=1, keepdims=True), before.sum(axis=1, keepdims=True)
    pooled = (now + before) / (n + m)
    se = np.sqrt(np.maximum(pooled * (1 - pooled) * (1 / n + 1 / m), 1e-12))
    return np.max(np.abs(now / n - before / m) / se, axis=1)


def noise_floor(now: np.ndarray, before: np.ndarray, draws: int = DRIFT_DRAWS, alpha: float = DRIFT_ALPHA) -> dict[str, Any]:
    """What two nights of these row counts reach by sampling alone: the two nights' rows pooled and dealt out
    again at random (n to tonight, the rest to the night before) ``draws`` times, and the 1 - ``alpha`` quantile
    of the draws' Jensen-Shannon distance, PSI and largest label move (in standard errors). A permutation test of
    "the same catalog mix, sampled twice", as Evidently's small-sample tests: with 80 labels in 300 rows a
    distance of 0.3 is mostly sampling; with 100,000 rows 0.02 is not. (Drawing both nights from the pooled mix
    instead, a parametric bootstrap, under-counts the rare labels and flagged 1 in 60 random nights at 300 rows.)
    Seeded: the same nights give the same floor."""
    n, m = int(now.sum()), int(before.sum())
    rng = np.random.default_rng(DRIFT_SEED)
    pooled = (now + before).astype(np.int64)
    # numpy's "count" costs per row drawn, "marginals" per label: the cheaper of the two for this night.
    method = "count" if n <= 20 * len(pooled) else "marginals"
    a = rng.multivariate_hypergeometric(pooled, n, size=draws, method=method)
    b = pooled[None, :] - a
    js, psi, move = _js(a / n, b / m), _psi(a / n, b / m), _move_se(a, b)
    return {"js": float(np.quantile(js, 1 - alpha)), "psi": float(np.quantile(psi, 1 - alpha)),
            "move": float(np.quantile(move, 1 - alpha)), "js_draws": js}


def label_mix_table(run_date: str, previous_date: str | None, now: Profile, before: Profile | None) -> pa.Table:
    rows: dict[str, list] = {k: [] for k in ("run_date", "attribute", "label", "count", "share", "previous_run_date",
                                             "previous_count", "previous_share", "change")}
    for a in now.attributes:
        current, past = now.mix.get(a, Counter()), (before.mix.get(a, Counter()) if before else Counter())
        n, m = sum(current.values()), sum(past.values())
        for label in sorted(set(current) | set(past), key=lambda x: (-current.get(x, 0), -past.get(x, 0), x)):
            share = current.get(label, 0) / n if n else None
            previous_share = past.get(label, 0) / m if m else None
            for key, value in (("run_date", run_date), ("attribute", a), ("label", label), ("count", current.get(label, 0)),
                               ("share", share), ("previous_run_date", previous_date),
                               ("previous_count", past.get(label, 0) if before else None), ("previous_share", previous_share),
                               ("change", share - previous_share if share is not None and previous_share is not None else None)):
                rows[key].append(value)
    types = {"count": pa.int64(), "previous_count": pa.int64(), "share": pa.float64(), "previous_share": pa.float64(),
             "change": pa.float64()}
    return pa.table({k: pa.array(v, types.get(k, pa.string())) for k, v in rows.items()})


@dataclass
class Agreement:
    """Tags against the catalog's labels, accumulated over joined Arrow tables (one bucket of ids at a time)."""

    columns: dict[str, str]  # attribute -> catalog column
    max_rows: int
    # The ids of the bundle's training split (its split.parquet): their rows are counted apart as well, as the
    # model has seen them (its accuracy there is not what it does on new products). None: not known.
    train_ids: pa.Array | None = None
    labelled: Counter = field(default_factory=Counter)
    agree: Counter = field(default_factory=Counter)
    labelled_train: Counter = field(default_factory=Counter)
    agree_train: Counter = field(default_factory=Counter)
    catalog_mix: dict[str, Counter] = field(default_factory=dict)  # attribute -> the catalog's own label -> rows
    pairs: dict[str, Counter] = field(default_factory=dict)  # attribute -> (catalog label, tag) -> rows
    top: pa.Table | None = None  # the most confident disagreements so far
    disagreements: int = 0

    def add(self, joined: pa.Table) -> None:
        """``joined``: tags rows with the catalog's labels as ``truth:<attribute>`` columns."""
        frames = [] if self.top is None else [self.top]
        for a in self.columns:
            truth = pc.utf8_trim_whitespace(joined.column(f"truth:{a}"))
            labelled = pc.fill_null(pc.not_equal(truth, ""), False)
            wrong = pc.and_(labelled, pc.fill_null(pc.not_equal(joined.column(a), truth), True))
            n_labelled, n_wrong = _count(labelled), _count(wrong)
            if not n_labelled:
                continue
            self.labelled[a] += n_labelled
            self.agree[a] += n_labelled - n_wrong
            self.catalog_mix.setdefault(a, Counter()).update(_value_counts(truth.filter(labelled)))
            if self.train_ids is not None:
                seen = pc.and_(labelled, pc.is_in(joined.column("product_id"), value_set=self.train_ids.cast(joined.column("product_id").type)))
                self.labelled_train[a] += _count(seen)
                self.agree_train[a] += _count(seen) - _count(pc.and_(seen, wrong))
            self.disagreements += n_wrong
            if not n_wrong:
                continue
            rows = pa.table({
                "product_id": joined.column("product_id").filter(wrong), "image": joined.column("image").filter(wrong),
                "attribute": pa.array([a] * n_wrong, pa.string()), "catalog_label": truth.filter(wrong),
                "tag": joined.column(a).filter(wrong), "score": joined.column(f"{a}_score").filter(wrong).cast(pa.float32()),
            })
            pairs = self.pairs.setdefault(a, Counter())
            for row in rows.group_by(["catalog_label", "tag"], use_threads=False).aggregate([([], "count_all")]).to_pylist():
                pairs[(row["catalog_label"], row["tag"])] += row["count_all"]
            frames.append(rows)
        if len(frames) > (self.top is not None):
            merged = pa.concat_tables(frames).combine_chunks()
            order = pc.sort_indices(merged, [("score", "descending"), ("attribute", "ascending"), ("product_id", "ascending")])
            self.top = merged.take(order[: self.max_rows])

    def accuracy(self, attribute: str) -> float | None:
        return self.agree[attribute] / self.labelled[attribute] if self.labelled[attribute] else None

    def unseen(self, attribute: str) -> tuple[int, float | None]:
        """Labelled rows not in the training split, and the accuracy there: the figure to hold against the
        bundle's test accuracy."""
        n = self.labelled[attribute] - self.labelled_train[attribute]
        return n, ((self.agree[attribute] - self.agree_train[attribute]) / n if n else None)

    def facts(self, attribute: str, tag_rows: int) -> dict[str, Any]:
        labelled, agree = self.labelled[attribute], self.agree[attribute]
        unseen_rows, unseen_accuracy = self.unseen(attribute)
        train = self.labelled_train[attribute]
        return {
            "catalog_column": self.columns[attribute], "labelled": labelled,
            "labelled_share": labelled / tag_rows if tag_rows else None,
            "agree": agree, "accuracy": self.accuracy(attribute), "confusions": self.confusions(attribute),
            "training_split_known": self.train_ids is not None,
            "labelled_in_training_split": train if self.train_ids is not None else None,
            "accuracy_in_training_split": (self.agree_train[attribute] / train) if train else None,
            "labelled_new": unseen_rows, "accuracy_new": unseen_accuracy,
            "catalog_label_rows": dict(sorted(self.catalog_mix.get(attribute, Counter()).items(), key=lambda i: (-i[1], i[0]))),
        }

    def confusions(self, attribute: str, top: int = 5) -> list[dict[str, Any]]:
        pairs = self.pairs.get(attribute, Counter())
        ranked = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))[:top]
        return [{"catalog_label": t, "tag": g, "rows": c} for (t, g), c in ranked]

    def table(self, run_date: str, tag_rows: int) -> pa.Table:
        names = list(self.columns)
        top = [self.confusions(a, 1) for a in names]
        return pa.table({
            "run_date": pa.array([run_date] * len(names), pa.string()),
            "attribute": pa.array(names, pa.string()),
            "catalog_column": pa.array([self.columns[a] for a in names], pa.string()),
            "tagged": pa.array([tag_rows] * len(names), pa.int64()),
            "labelled": pa.array([self.labelled[a] for a in names], pa.int64()),
            "agree": pa.array([self.agree[a] for a in names], pa.int64()),
            "accuracy": pa.array([self.accuracy(a) for a in names], pa.float64()),
            "top_confusion": pa.array([f"{t[0]['catalog_label']} -> {t[0]['tag']}" if t else None for t in top], pa.string()),
            "top_confusion_rows": pa.array([t[0]["rows"] if t else 0 for t in top], pa.int64()),
        })

    def confusions_table(self, run_date: str) -> pa.Table:
        rows = [(a, t, g, c) for a in self.columns for (t, g), c in sorted(self.pairs.get(a, {}).items(), key=lambda i: (-i[1], i[0]))]
        return pa.table({
            "run_date": pa.array([run_date] * len(rows), pa.string()),
            "attribute": pa.array([r[0] for r in rows], pa.string()),
            "catalog_label": pa.array([r[1] for r in rows], pa.string()),
            "tag": pa.array([r[2] for r in rows], pa.string()),
            "rows": pa.array([r[3] for r in rows], pa.int64()),
        })

    def disagreements_table(self) -> pa.Table:
        schema = pa.schema([("product_id", pa.string()), ("image", pa.string()), ("attribute", pa.string()),
                            ("catalog_label", pa.string()), ("tag", pa.string()), ("score", pa.float32())])
        return schema.empty_table() if self.top is None else self.top.cast(schema)


def _count(mask) -> int:
    return int(pc.sum(mask).as_py() or 0)


def crossed(thresholds: Thresholds, report: Mapping[str, Any]) -> list[str]:
    """What crossed, one phrase each naming the attribute, the figure and the option."""
    out = []
    attributes = report["attributes"]
    previous = report.get("previous_run_date")
    for a, facts in attributes.items():
        d = facts.get("drift")
        # A distance over the limit crosses it only past the noise floor: two samples of one catalog differ by chance.
        beyond = d.get("beyond_noise", True) if d else False
        if d and beyond and thresholds.max_drift is not None and d["js_distance"] > thresholds.max_drift:
            out.append(f"{a} label mix drifted from run_date={previous}: Jensen-Shannon {d['js_distance']:.3f} > --max-drift "
                       f"{thresholds.max_drift:g} ({beyond_noise_phrase(d)})")
        if d and beyond and thresholds.max_psi is not None and d["psi"] > thresholds.max_psi:
            out.append(f"{a} label mix drifted from run_date={previous}: PSI {d['psi']:.3f} > --max-psi {thresholds.max_psi:g} "
                       f"({beyond_noise_phrase(d)})")
        share = facts.get("review_share")
        if share is not None and thresholds.max_review_share is not None and share > thresholds.max_review_share:
            out.append(f"{a} review share {share:.1%} > --max-review-share {thresholds.max_review_share:.1%}")
        accuracy = (facts.get("agreement") or {}).get("accuracy")
        if accuracy is not None and thresholds.min_agreement is not None and accuracy < thresholds.min_agreement:
            out.append(f"{a} agrees with the catalog on {accuracy:.1%} of {facts['agreement']['labelled']} labelled rows "
                       f"< --min-agreement {thresholds.min_agreement:.1%}")
    counts, before = report["counts"], report.get("previous_counts")
    if thresholds.max_error_rate is not None and counts["error_rate"] > thresholds.max_error_rate:
        out.append(f"error rate {counts['error_rate']:.1%} ({counts['errors']} of {counts['rows']} rows) > --max-error-rate {thresholds.max_error_rate:.1%}")
    if thresholds.max_rows_change is not None and before and before["rows"]:
        moved = counts["rows"] / before["rows"] - 1
        if abs(moved) > thresholds.max_rows_change:
            out.append(f"rows changed {moved:+.1%} ({before['rows']} -> {counts['rows']}) from run_date={previous} "
                       f"> --max-rows-change {thresholds.max_rows_change:.1%}")
    return out


def beyond_noise_phrase(d: Mapping[str, Any]) -> str:
    """Why a drift is more than sampling: the distance past its floor, or one label's move past its own."""
    if "js_noise_floor" not in d:
        return "no noise floor recorded"
    if d["js_distance"] > d["js_noise_floor"]:
        return f"sampling alone reaches {d['js_noise_floor']:.3f}"
    mover = (d.get("movers") or [{}])[0]
    return (f"beyond sampling: {mover.get('label')} {mover.get('previous_share', 0):.1%} -> {mover.get('share', 0):.1%}, "
            f"{d['largest_move_se']:.1f} standard errors where sampling reaches {d['largest_move_se_noise_floor']:.1f}")


# Per byte position (mod 64), a fixed random 64-bit weight: id_hash is a weighted sum of an id's bytes.
_WEIGHTS = np.random.default_rng(20).integers(1, 2**63, 64, dtype=np.uint64)


def id_hash(ids: pa.Array) -> np.ndarray:
    """A uint64 per id (text), from its bytes, in numpy: which bucket of ids a row joins in. Fixed (not
    per-process random), and without polars, whose allocator keeps what it used."""
    ids = ids.cast(pa.large_string()) if not pa.types.is_large_string(ids.type) else ids
    ids = pc.fill_null(ids, "")
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int64)[ids.offset: ids.offset + len(ids) + 1]
    data = np.frombuffer(ids.buffers()[2], dtype=np.uint8) if ids.buffers()[2] is not None else np.zeros(0, np.uint8)
    data = data[offsets[0]: offsets[-1]].astype(np.uint64)
    starts, lengths = offsets[:-1] - offsets[0], np.diff(offsets)
    position = np.arange(len(data), dtype=np.int64) - np.repeat(starts, lengths)
    with np.errstate(over="ignore"):
        # A trailing 0 makes every start a valid index of reduceat, trailing empty ids included.
        weighted = np.append(data * _WEIGHTS[position % 64], np.uint64(0))
        sums = np.add.reduceat(weighted, starts) if len(ids) else np.zeros(0, np.uint64)
        sums[lengths == 0] = 0
        return (sums ^ (sums >> np.uint64(29))) * np.uint64(0x9E3779B97F4A7C15)


def iter_joined(night: Night, catalog_batches, columns: Mapping[str, str], attributes: Iterable[str], batch_rows: int,
                buckets: int):
    """Tonight's tags joined by product id with the catalog's label columns, one bucket of ids at a time, as Arrow
    tables. ``catalog_batches()`` streams the catalog (id first, then the label columns).

    With more than one bucket, one pass over each side spills its rows, by the hash of the id, into a local
    temporary Arrow file per bucket (a grace hash join); each bucket is then read back and joined alone. The
    memory is a bucket's and a batch's, whatever the night's size; the catalog (maybe on S3) is read once. The
    join is Arrow's ``index_in`` (the first row of a repeated id wins, as in the tag job), which holds one
    hash table of the bucket's ids: a hash join, or polars, keeps several times the data in allocator arenas
    (measured: bench/nightly_report.py)."""
    import tempfile

    attributes = list(attributes)
    wanted = ["product_id", "image", *attributes, *(f"{a}_score" for a in attributes)]
    names = ["product_id", *(f"truth:{a}" for a in columns)]
    catalog_schema = pa.schema([(n, pa.string()) for n in names])

    def catalog_stream():
        for batch in catalog_batches():
            batch = pa.RecordBatch.from_arrays(batch.columns, schema=catalog_schema)
            yield batch.filter(pc.is_valid(batch.column(0)))

    pool = pa.default_memory_pool()
    if buckets == 1:
        tags = list(night.iter_tags(wanted, batch_rows))
        if tags:  # none: a night committed with every row an error (under a raised --max-error-rate) joins nothing
            yield from _join(pa.Table.from_batches(list(catalog_stream()), catalog_schema), pa.Table.from_batches(tags))
        return
    with tempfile.TemporaryDirectory(prefix="tagger-report-") as folder:
        catalog_files = _spill(catalog_stream(), buckets, os.path.join(folder, "catalog"))
        tags_files = _spill(night.iter_tags(wanted, batch_rows), buckets, os.path.join(folder, "tags"))
        for catalog_file, tags_file in zip(catalog_files, tags_files):
            with pa.memory_map(catalog_file) as c, pa.memory_map(tags_file) as t:
                yield from _join(pa.ipc.open_file(c).read_all(), pa.ipc.open_file(t).read_all())
            os.remove(catalog_file)
            os.remove(tags_file)
            pool.release_unused()


def _spill(batches, buckets: int, prefix: str) -> list[str]:
    """Rows of ``batches`` into one Arrow IPC file per bucket of ``id_hash(first column)``, in stream order
    (none when there are no batches)."""
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        return []
    paths = [f"{prefix}-{k:04d}.arrow" for k in range(buckets)]
    writers = [pa.ipc.new_file(path, first.schema) for path in paths]
    try:
        for batch in itertools.chain([first], batches):
            bucket = id_hash(batch.column(0)) % np.uint64(buckets)
            order = np.argsort(bucket, kind="stable")
            bounds = np.searchsorted(bucket[order], np.arange(buckets + 1, dtype=np.uint64))
            for k in range(buckets):
                if bounds[k + 1] > bounds[k]:
                    writers[k].write_batch(batch.take(pa.array(order[bounds[k]: bounds[k + 1]])))
    finally:
        for writer in writers:
            writer.close()
    return paths


def _join(catalog: pa.Table, tags: pa.Table):
    if not (tags.num_rows and catalog.num_rows):
        return
    catalog, tags = catalog.combine_chunks(), tags.combine_chunks()
    index = pc.index_in(tags.column("product_id"), value_set=catalog.column("product_id"))
    found = pc.is_valid(index)
    labels = catalog.drop_columns(["product_id"]).take(index.filter(found))
    joined = tags.filter(found)
    for name in labels.column_names:
        joined = joined.append_column(name, labels.column(name))
    yield joined
