"""One report as a straight line: the night and the night before -> profiles -> drift -> agreement ->
thumbnails -> tables, report.json, report.html (committed) -> what crossed a threshold."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .. import storage
from ..data import manifest as manifests
from . import ReportError, load, metrics
from .config import ReportConfig

log = logging.getLogger("tagger.report")


@dataclass
class ReportResult:
    folder: str
    page: str
    report: dict[str, Any]
    crossed: list[str]


def build_report(config: ReportConfig) -> ReportResult:
    started = time.time()
    options = config.storage_options
    # Before anything is read (a file in --out's path would fail the first read with NotADirectoryError, exit 1)
    # and before minutes of joins and drift: an --out the report cannot be written under is an input error (exit 2).
    storage.check_output_location(config.folder, options)
    night = load.tonight(config.out, config.run_date, options)
    before = load.previous_night(config.out, config.run_date, options, config.previous)
    attributes = night.attributes()
    now = metrics.profile(night, attributes, config.batch_rows)
    past = metrics.profile(before, attributes, config.batch_rows) if before else None
    counts = metrics.counts(night, now, config.batch_rows)
    previous_counts = metrics.counts(before, past, config.batch_rows) if before else None
    bundle = bundle_facts(night, options)
    thresholds = bundle["thresholds"]
    past_attributes = set(before.attributes()) if before else set()
    # What the night before's report said of its agreement and of the catalog's own labels: compared as such.
    past_report = load.report_of(config.out, before.run_date, options) if before else None

    truth = truth_source(config, night, attributes)
    agreement = metrics.Agreement(truth["columns"] if truth else {}, config.max_disagreements, train_ids=bundle["train_ids"])
    if truth and truth["columns"]:
        expected = max(night.tag_rows, int((night.plan or {}).get("rows", 0)))
        buckets = max(1, -(-expected // config.bucket_rows))
        wanted = [truth["id_column"], *truth["columns"].values()]

        def catalog_batches():
            return manifests.iter_catalog_columns(truth["catalog"], wanted, fmt=truth["format"], storage_options=options,
                                                  batch_rows=config.batch_rows)

        for joined in metrics.iter_joined(night, catalog_batches, truth["columns"], attributes, config.batch_rows, buckets):
            agreement.add(joined)

    report: dict[str, Any] = {
        "run_date": config.run_date,
        "previous_run_date": before.run_date if before else None,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "out": storage.redact(config.out),
        "run_id": night.run_id,
        "model_version": night.model_version,
        "previous_model_version": before.model_version if before else None,
        "computed": night.computed,
        "previous_computed": before.computed if before else None,
        "catalog": (night.plan or {}).get("catalog"),
        "counts": counts,
        "tag_max_error_rate": ((night.summary or {}).get("arguments") or {}).get("max_error_rate"),
        "previous_counts": previous_counts,
        "change": metrics.change(counts, previous_counts),
        "attributes": {},
        "agreement": None if not truth else {
            "catalog": truth["catalog"], "id_column": truth["id_column"], "columns": truth["columns"],
            "how": truth["how"], "why": truth["why"], "not_compared": truth["not_compared"],
            "disagreements": agreement.disagreements,
            "disagreements_written": min(agreement.disagreements, config.max_disagreements),
        },
        "thresholds": config.thresholds.active(),
    }
    for a in attributes:
        facts: dict[str, Any] = {
            "labels": len(now.mix[a]),
            "review_threshold": thresholds.get(a),
            "review_share": now.review_share(a),
            "previous_review_share": past.review_share(a) if past and a in past_attributes else None,
            "score_mean": now.score_mean(a),
            "previous_score_mean": past.score_mean(a) if past and a in past_attributes else None,
            "score_histogram": now.hist[a].tolist(),
            "previous_score_histogram": past.hist[a].tolist() if past and a in past_attributes else None,
            "top_labels": [{"label": k, "rows": v} for k, v in sorted(now.mix[a].items(), key=lambda i: (-i[1], i[0]))[:5]],
            # The bars on the page: every label's rows, tonight and the night before (label_mix.parquet has shares).
            "label_rows": dict(sorted(now.mix[a].items(), key=lambda i: (-i[1], i[0]))),
            "previous_label_rows": (dict(sorted(past.mix[a].items(), key=lambda i: (-i[1], i[0])))
                                    if past and a in past_attributes else None),
            "drift": metrics.drift(now.mix[a], past.mix[a]) if past and a in past_attributes else None,
            "agreement": None,
        }
        facts["expected"] = {k: {"share": v[0], "rows": v[1]} for k, v in bundle["expected"].get(a, {}).items()}
        past_agreement = (((past_report or {}).get("attributes") or {}).get(a) or {}).get("agreement") or {}
        facts["previous_agreement"] = ({"accuracy": past_agreement.get("accuracy"), "labelled": past_agreement.get("labelled")}
                                       if past_agreement.get("accuracy") is not None else None)
        facts["catalog_drift"] = None
        if a in agreement.columns:
            facts["agreement"] = agreement.facts(a, now.rows)
            past_mix = past_agreement.get("catalog_label_rows")
            if past_mix and facts["agreement"]["catalog_label_rows"]:
                # The catalog's own labels moving (Grey 8 % -> 20 %) is the feed changing, whatever the model does.
                facts["catalog_drift"] = metrics.drift(facts["agreement"]["catalog_label_rows"], past_mix)
        report["attributes"][a] = facts
    from .conflicts import conflicts

    report["conflicts"] = conflicts(night, config, config.batch_rows)  # None: the night was tagged without text
    report["crossed"] = metrics.crossed(config.thresholds, report)
    from .verdict import checks, verdict

    previous_agreement = {a: f["previous_agreement"] for a, f in report["attributes"].items() if f["previous_agreement"]}
    report["verdict"] = verdict(checks(report, bundle["expected"], previous_agreement, config.thresholds))

    tables = {
        "label_mix": metrics.label_mix_table(config.run_date, report["previous_run_date"], now, past),
        "drift": drift_table(report),
        "agreement": agreement.table(config.run_date, now.rows),
        "confusions": agreement.confusions_table(config.run_date),
        "disagreements": agreement.disagreements_table(),
    }
    from .html import conflict_thumbs, gallery_items, render_page
    from .write import file_names, write_report

    gallery = gallery_items(tables["disagreements"], night, config)
    if report["conflicts"]:
        conflict_thumbs(report["conflicts"]["top"], night, config)
    report["files"] = file_names(list(tables))
    report["duration_s"] = round(time.time() - started, 3)
    mix = {a: (dict(now.mix[a]), dict(past.mix[a]) if past and a in past_attributes else None) for a in attributes}
    page = render_page(report, gallery, config, mix)
    for item in (report["conflicts"] or {}).get("top", []):
        item.pop("src", None)  # the page holds the thumbnails; report.json keeps the figures
    folder, page_url = write_report(config, tables, report, page)
    return ReportResult(folder, page_url, report, report["crossed"])


def bundle_facts(night: load.Night, options) -> dict[str, Any]:
    """What the report takes from the bundle the plan names: its review thresholds, what its validation and test
    split expect of a night (verdict.expectations), and the ids of its training split (split.parquet). Each is
    absent when it cannot be read (moved, another store, an older bundle): the page then shows the figures
    without the threshold line, the expectation or the split, and says so in the log."""
    import json

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from .verdict import expectations

    facts: dict[str, Any] = {"thresholds": {}, "expected": {}, "train_ids": None}
    model = (night.plan or {}).get("model")
    if not model:
        return facts
    try:
        meta = json.loads(storage.read_bytes(storage.join(model, "model.json"), options))
    except Exception as exc:  # the report does without; the tags are what it is about
        log.info("review thresholds and expectations not shown: %s/model.json: %s", model, exc)
        return facts
    if meta.get("model_version") and night.model_version and meta["model_version"] != night.model_version:
        # The folder now holds another bundle (retrained in place): its figures are not what tagged this night.
        log.warning("%s holds model %s, the night was tagged by %s: no review thresholds, expectations or training "
                    "split from it", model, meta["model_version"], night.model_version)
        return facts
    facts["thresholds"] = {a["name"]: float(a["threshold"]) for a in meta.get("attributes", []) if "threshold" in a}
    facts["expected"] = expectations(meta)
    schema = night.tags_schema()
    if schema is not None and "inputs" in schema.names:  # tagged with text: the fused figures are what to expect
        from .conflicts import text_expectations

        facts["expected"] = text_expectations(meta.get("text"), facts["expected"])
    split = ((meta.get("training") or {}).get("split") or {}).get("file")
    if split:
        try:
            fs, path = storage.filesystem(storage.join(model, split), options)
            with fs.open(path, "rb") as handle:
                table = pq.read_table(handle, columns=["id", "split"])
            facts["train_ids"] = table.filter(pc.equal(table.column("split"), "train")).column("id").combine_chunks()
        except Exception as exc:
            log.info("training split not counted apart: %s/%s: %s", model, split, exc)
    return facts


def truth_source(config: ReportConfig, night: load.Night, attributes: list[str]) -> dict[str, Any] | None:
    """Where the catalog's own labels are: the catalog (``--catalog``, else the one the run's plan names), its
    id column and, per attribute, the column (``--truth-column``, else a column named like the attribute).
    None when there is no catalog to read or no such column (no agreement section)."""
    plan_catalog = (night.plan or {}).get("catalog")
    catalog = config.catalog or plan_catalog
    if not catalog:
        if config.truth_columns:
            raise ReportError("--truth-column: the run's plan names no catalog; name it with --catalog")
        return None
    arguments = (night.summary or {}).get("arguments") or {}
    same_run = arguments.get("catalog") == plan_catalog  # a finalize's summary carries its own, empty arguments
    id_column = config.id_column or (arguments.get("id_column") if same_run else None) or "product_id"
    fmt = config.catalog_format or (arguments.get("catalog_format") if same_run and catalog == plan_catalog else None)
    try:
        names = manifests.catalog_columns(catalog, fmt=fmt, storage_options=config.storage_options)
    except manifests.ManifestError as exc:
        if config.catalog or config.truth_columns:
            raise ReportError(f"{exc}") from None
        log.warning("no agreement section: %s", exc)
        return None
    if id_column not in names:
        raise ReportError(f"{catalog}: no id column {id_column!r}; columns found: {', '.join(names)}. Name it with --id-column")
    unknown = sorted(set(config.truth_columns) - set(attributes))
    if unknown:
        raise ReportError(f"--truth-column {', '.join(unknown)}: not an attribute of the run's bundle "
                          f"({', '.join(attributes)})")
    if config.truth_columns:
        missing = {a: c for a, c in config.truth_columns.items() if c not in names}
        if missing:
            raise ReportError(f"{catalog}: --truth-column names column(s) {', '.join(sorted(missing.values()))} that the "
                              f"catalog does not have; columns found: {', '.join(names)}")
    # Columns named like the attributes, then --truth-column on top: one mapping adds to the name matches (and
    # overrides the attribute it names), it does not switch the others off.
    columns = {a: a for a in attributes if a in names and a != id_column}
    reasons = {a: "a column named like the attribute" for a in columns}
    for a, column in config.truth_columns.items():
        columns[a] = column
        reasons[a] = f"--truth-column {a}={column}"
    if not columns:
        return None
    columns = {a: columns[a] for a in attributes if a in columns}  # the bundle's order
    not_compared = {a: f"the catalog has no column {a!r} (name one with --truth-column {a}=COLUMN)"
                    for a in attributes if a not in columns}
    how = ("--truth-column" if set(columns) == set(config.truth_columns) else
           "columns named like the attributes" if not config.truth_columns else
           "columns named like the attributes and --truth-column")
    return {"catalog": catalog, "format": fmt, "id_column": id_column, "columns": columns, "how": how,
            "why": {a: reasons[a] for a in columns}, "not_compared": not_compared}


def drift_table(report: dict[str, Any]):
    import pyarrow as pa

    rows = []
    for a, f in report["attributes"].items():
        d = f["drift"] or {}
        mover = (d.get("movers") or [None])[0]
        rows.append({
            "run_date": report["run_date"], "previous_run_date": report["previous_run_date"], "attribute": a,
            "labels": f["labels"], "psi": d.get("psi"), "js_distance": d.get("js_distance"),
            "js_noise_floor": d.get("js_noise_floor"), "psi_noise_floor": d.get("psi_noise_floor"),
            "p_value": d.get("p_value"), "beyond_noise": d.get("beyond_noise"),
            "new_labels": d.get("new_labels", []), "vanished_labels": d.get("vanished_labels", []),
            "largest_mover": mover["label"] if mover else None, "largest_change": mover["change"] if mover else None,
            "review_share": f["review_share"], "previous_review_share": f["previous_review_share"],
            "score_mean": f["score_mean"], "previous_score_mean": f["previous_score_mean"],
        })
    schema = pa.schema([("run_date", pa.string()), ("previous_run_date", pa.string()), ("attribute", pa.string()),
                        ("labels", pa.int64()), ("psi", pa.float64()), ("js_distance", pa.float64()),
                        ("js_noise_floor", pa.float64()), ("psi_noise_floor", pa.float64()), ("p_value", pa.float64()),
                        ("beyond_noise", pa.bool_()),
                        ("new_labels", pa.list_(pa.string())), ("vanished_labels", pa.list_(pa.string())),
                        ("largest_mover", pa.string()), ("largest_change", pa.float64()), ("review_share", pa.float64()),
                        ("previous_review_share", pa.float64()), ("score_mean", pa.float64()),
                        ("previous_score_mean", pa.float64())])
    return pa.Table.from_pylist(rows, schema=schema)
