"""Training data from any mix of sources: Kaggle folders, labelled manifests and reviewers' corrections.

What ``--data`` names decides how it is read:

- a file whose name says CSV, Parquet or JSON Lines (optionally ``.gz``) is a **labelled manifest**: the tag
  job's own catalog manifest (:func:`tagger.data.manifest.read_manifest`: same formats, locations,
  ``--id-column``/``--image-column`` and errors) with one label column per attribute;
- anything else is a **Kaggle folder** (``styles.csv`` + ``images/``, :mod:`tagger.data.kaggle`).

A source without a column for an attribute leaves that attribute unlabelled in its rows (masked out of
that attribute's loss and metrics), so a catalog labelled for ``pattern`` only can be mixed with the
Kaggle folder that has the seven Kaggle attributes. Rows of the sources are matched by product id: the
first source that has an id gives its image and its row's labels; a later source's row for the same id
fills the cells that are still empty (it never overrides a label: which of two labels is right is not
ours to guess).

A **corrections file** (``--corrections``: product id, ``attribute``, ``label`` per line, e.g. what the
review queue sent back) does override: a reviewer's label replaces the one the data had. It brings no
images: a correction for an id that no source has an image for cannot train anything and is counted.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from .. import storage
from .kaggle import MISSING_VALUES, DataError, DataReport, KaggleData, load_kaggle
from .manifest import ManifestError, detect_format, read_columns, read_manifest

log = logging.getLogger(__name__)

CORRECTION_COLUMNS: tuple[str, str] = ("attribute", "label")
_EXAMPLES = 5


def is_manifest(source: str) -> bool:
    """A labelled manifest (a file named after its format), not a Kaggle folder."""
    if not storage.is_remote(source):
        import os

        if os.path.isdir(source):
            return False
    try:
        detect_format(source)
    except ManifestError:
        return False
    return True


def load_training_data(
    sources: str | Sequence[str],
    attributes: Sequence[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    corrections: Sequence[str] = (),
    id_column: str = "product_id",
    image_column: str = "image",
    fmt: str | None = None,
    text_columns: Sequence[str] = (),
) -> KaggleData:
    """Every source as one table: ``id``, ``image`` (where to read it) and one text column per attribute
    (null = unknown), with the row accounting in the report (``report.sources``: what each source gave).
    ``text_columns`` (--text-column): kept as they are, beside the labels; every source must have them (a source
    without one is a :class:`DataError` naming the column and the file, never a text model trained on part of the rows)."""
    sources = [sources] if isinstance(sources, str) else list(sources)
    if not sources:
        raise DataError("no training data given: --data must name a Kaggle folder or a labelled manifest")
    attributes = list(attributes)
    text_columns = [c for c in text_columns if c not in attributes]
    folders = [s for s in sources if not is_manifest(s)]
    manifests = [s for s in sources if is_manifest(s)]
    if not manifests and not corrections:
        # The Kaggle layout alone: exactly what it always was (fingerprint included, which evaluate compares).
        data = load_kaggle(folders, storage_options, attributes=attributes, require_attributes=False)
        data.report.sources = [_source_facts(folders, "kaggle", data.table, attributes)]
        return data

    report = DataReport()
    parts: list[pl.DataFrame] = []
    digest = hashlib.sha256()
    labels_where: list[str] = []
    images_where: list[str] = []
    facts: list[dict[str, Any]] = []
    # Kaggle folders first, in one call (several folders are one data set, as on their own); then manifests in order.
    for source in sources:
        if source in manifests:
            table, fingerprint = _read_labelled_manifest(source, attributes, storage_options, id_column, image_column, fmt, report,
                                                         text_columns)
            kind = "manifest"
            labels_where.append(source)
            images_where.append(f"the image column of {source}")
        elif source == folders[0]:
            data = load_kaggle(folders, storage_options, attributes=attributes, require_attributes=False)
            _merge_reports(report, data.report)
            missing = [c for c in text_columns if c not in data.table.columns]
            if missing:
                raise DataError(f"{data.styles_url}: no column {', '.join(map(repr, missing))} for --text-column (a Kaggle "
                                "folder's title is productDisplayName); every --data source needs the text columns")
            table = data.table.select("id", "image", *attributes, *(pl.col(c).cast(pl.Utf8) for c in text_columns))
            fingerprint, kind = data.fingerprint, "kaggle"
            labels_where.append(data.styles_url)
            images_where.append(data.images_url)
            source = ", ".join(folders)
        else:
            continue
        digest.update(fingerprint.encode())
        facts.append(_source_facts(source, kind, table, attributes))
        parts.append(table.with_columns(pl.lit(len(parts), dtype=pl.Int32).alias("_source")))

    table = _merge(parts, attributes, text_columns)
    report.parsed = table.height
    for url in corrections:
        table, fingerprint, applied = _apply_corrections(table, url, attributes, storage_options, id_column, fmt)
        digest.update(fingerprint.encode())
        facts.append(applied)
        labels_where.append(url)
    report.unknown_values = {a: int(table[a].null_count()) for a in attributes}
    report.sources = facts
    if table.height == 0:
        raise DataError(f"no usable rows in {', '.join(sources)}: every row lacks an id or an image")
    return KaggleData(
        root=", ".join(sources), styles_url=", ".join(labels_where), images_url=", ".join(images_where), table=table,
        report=report, fingerprint=f"sha256:{digest.hexdigest()}",
    )


def _in_retrains_words(message: str) -> str:
    """A manifest error as retrain says it: its format option is --data-format (the tag job's --catalog-format)."""
    return message.replace("--catalog-format", "--data-format")


def _read_labelled_manifest(url, attributes, storage_options, id_column, image_column, fmt, report: DataReport,
                            text_columns: Sequence[str] = ()):
    try:
        manifest = read_manifest(url, id_column=id_column, image_column=image_column, fmt=fmt,
                                 storage_options=storage_options, extra_columns=(*attributes, *text_columns))
    except ManifestError as exc:
        raise DataError(_in_retrains_words(str(exc))) from None
    extra = manifest.extra
    missing = [c for c in text_columns if extra is None or c not in extra.column_names]
    if missing:
        raise DataError(f"{url}: no column {', '.join(map(repr, missing))} for --text-column; name the manifest's "
                        "title or description column (e.g. --text-column title)")
    if manifest.separator is not None:
        # A list of photos (the tag job's several photos per product) is no training row: one photo, one label set.
        raise DataError(f"{url}: column {image_column!r} holds lists of photos; a labelled manifest names one image per "
                        "row (repeat the labels on a row per photo to train on each)")
    rows = manifest.table
    status = rows.column("status").to_pylist()
    report.lines += rows.num_rows
    report.missing_id += sum(1 for s in status if s == "invalid_row")
    report.duplicate_id += sum(1 for s in status if s == "duplicate_id")
    columns = {"id": rows.column("product_id"), "image": manifest.locations()}
    frame = pl.DataFrame({k: pl.Series(k, v.to_pylist(), dtype=pl.Utf8) for k, v in columns.items()})
    labels = {a: _clean(extra.column(a).to_pylist()) if extra is not None and a in extra.column_names else [None] * rows.num_rows
              for a in attributes}
    frame = frame.with_columns(pl.Series(a, v, dtype=pl.Utf8) for a, v in labels.items())
    # The text as written (the text model normalises it); an empty cell is a row without text, not an error.
    frame = frame.with_columns(pl.Series(c, extra.column(c).to_pylist(), dtype=pl.Utf8) for c in text_columns)
    keep = pl.Series([s == "" for s in status])
    absent = [a for a in attributes if extra is None or a not in extra.column_names]
    if absent:
        log.info("%s: no column for %s; unlabelled in its rows", url, ", ".join(absent))
    return frame.filter(keep), manifest.fingerprint


def _clean(values: list[str | None]) -> list[str | None]:
    out = []
    for value in values:
        value = None if value is None else value.strip()
        out.append(None if value is None or value.lower() in MISSING_VALUES else value)
    return out


def _merge(parts: list[pl.DataFrame], attributes: Sequence[str], text_columns: Sequence[str] = ()) -> pl.DataFrame:
    """One row per id: the first source's image, each label (and text) from the first source that has one."""
    if len(parts) == 1:
        return parts[0].drop("_source")
    stacked = pl.concat(parts, how="diagonal_relaxed")
    merged = stacked.group_by("id", maintain_order=True).agg(
        pl.col("image").drop_nulls().first(), *(pl.col(a).drop_nulls().first() for a in (*attributes, *text_columns))
    )
    return merged.filter(pl.col("image").is_not_null())


def _apply_corrections(table: pl.DataFrame, url: str, attributes: Sequence[str], storage_options, id_column: str, fmt: str | None):
    """The reviewer's labels over the data's; ``(table, fingerprint, what happened)``."""
    try:
        raw, fingerprint = read_columns(url, (id_column, *CORRECTION_COLUMNS), fmt=fmt, storage_options=storage_options)
    except ManifestError as exc:
        raise DataError(f"{_in_retrains_words(str(exc))} (a corrections file has one line per correction: {id_column}, "
                        "attribute, label)") from None
    ids = [None if v is None else v.strip() for v in raw.column(id_column).to_pylist()]
    names = [None if v is None else v.strip() for v in raw.column("attribute").to_pylist()]
    labels = _clean(raw.column("label").to_pylist())
    known_ids = set(table["id"].to_list())
    # Attribute names compare ignoring case, as everywhere else (attribute_name_problem: SQL folds them): a
    # reviewer's "Colour" corrects colour, not an attribute "not trained here".
    canonical = {a.lower(): a for a in attributes}
    latest: dict[tuple[str, str], str] = {}  # a later line for the same id and attribute supersedes an earlier one
    facts: dict[str, Any] = {"source": url, "kind": "corrections", "rows": len(ids), "applied": {}, "superseded": 0,
                             "empty": 0, "other_attribute": {}, "no_image": 0, "no_image_ids": []}
    for line, (pid, attr, label) in enumerate(zip(ids, names, labels), start=2):
        if not pid or not attr or label is None:
            facts["empty"] += 1
            continue
        attr = canonical.get(attr.lower(), attr)
        if attr not in canonical.values():
            facts["other_attribute"][attr] = facts["other_attribute"].get(attr, 0) + 1
            continue
        if pid not in known_ids:
            facts["no_image"] += 1
            if len(facts["no_image_ids"]) < _EXAMPLES:
                facts["no_image_ids"].append(pid)
            continue
        if (pid, attr) in latest:
            facts["superseded"] += 1
        latest[(pid, attr)] = label
    if facts["other_attribute"]:
        log.warning("%s: %d correction(s) of attributes not trained here (%s) ignored", url,
                    sum(facts["other_attribute"].values()), ", ".join(sorted(facts["other_attribute"])))
    if facts["no_image"]:
        log.warning("%s: %d correction(s) for ids that no --data source has an image for were ignored (e.g. %s)",
                    url, facts["no_image"], ", ".join(facts["no_image_ids"]))
    by_attr: dict[str, dict[str, str]] = {}
    for (pid, attr), label in latest.items():
        by_attr.setdefault(attr, {})[pid] = label
    updates = []
    for attr, fixes in by_attr.items():
        update = pl.DataFrame({"id": list(fixes), "_fix": list(fixes.values())}, schema={"id": pl.Utf8, "_fix": pl.Utf8})
        changed = table.join(update, on="id", how="left").select(
            (pl.col("_fix").is_not_null() & (pl.col("_fix") != pl.col(attr)).fill_null(True)).sum()
        ).item()
        facts["applied"][attr] = {"rows": len(fixes), "changed": int(changed)}
        updates.append((attr, update))
    for attr, update in updates:
        table = table.join(update, on="id", how="left").with_columns(pl.coalesce("_fix", attr).alias(attr)).drop("_fix")
    log.info("%s: corrections applied %s", url, ", ".join(f"{a} {v['rows']} ({v['changed']} changed)" for a, v in facts["applied"].items()) or "none")
    return table, fingerprint, facts


def _merge_reports(into: DataReport, report: DataReport) -> None:
    for name in ("lines", "repaired", "malformed", "missing_id", "duplicate_id", "missing_image"):
        setattr(into, name, getattr(into, name) + getattr(report, name))
    for name in ("repaired_lines", "malformed_lines", "missing_image_ids"):
        getattr(into, name).extend(getattr(report, name)[: _EXAMPLES - len(getattr(into, name))])


def _source_facts(source: str | Sequence[str], kind: str, table: pl.DataFrame, attributes: Sequence[str]) -> dict[str, Any]:
    name = source if isinstance(source, str) else ", ".join(source)
    return {"source": name, "kind": kind, "rows": table.height,
            "labelled": {a: int(table.height - table[a].null_count()) for a in attributes if a in table.columns}}
