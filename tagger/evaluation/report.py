"""An :class:`~tagger.evaluation.evaluate.Evaluation` -> the report folder, and the stdout summary.

Files (``out`` local or ``s3://``; each written whole, see :func:`tagger.storage.write_bytes`):

- ``metrics.parquet``: one row per attribute (:data:`METRICS_SCHEMA`);
- ``per_class.parquet``: one row per attribute and label (:data:`PER_CLASS_SCHEMA`);
- ``confusion.parquet``: non-zero confusion counts (attribute, true_label, predicted_label, count);
- ``predictions.parquet``: one row per evaluated image: id, image, error, and per attribute the
  styles.csv value, the target it was scored as, the prediction and its score;
- ``report.md``: summary table (model vs majority baseline), label mapping, per-attribute class tables
  with their plots, unreadable images;
- ``plots/*.png``: see :mod:`tagger.evaluation.plots`.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from .evaluate import MAJORITY_SOURCES, Evaluation

METRICS_SCHEMA = pa.schema(
    [
        ("model_version", pa.string()),
        ("split", pa.string()),
        ("attribute", pa.string()),
        ("n", pa.int64()),  # scored rows: decoded image and a target
        ("n_classes", pa.int64()),
        ("n_classes_present", pa.int64()),
        ("accuracy", pa.float64()),
        ("accuracy_se", pa.float64()),  # its standard error, sqrt(p(1-p)/n)
        ("macro_f1", pa.float64()),
        ("weighted_f1", pa.float64()),
        ("majority_label", pa.string()),
        ("majority_source", pa.string()),
        ("majority_accuracy", pa.float64()),
        ("threshold", pa.float64()),
        ("coverage", pa.float64()),
        ("n_covered", pa.int64()),
        ("accuracy_covered", pa.float64()),
        ("n_missing", pa.int64()),  # empty cells, excluded
        ("n_folded", pa.int64()),  # rare labels scored as Other, as retrain folded them
        ("n_masked", pa.int64()),  # rare labels excluded, as retrain masked them
        ("n_unknown_label", pa.int64()),  # labels the bundle does not know
        ("unknown_as_other", pa.bool_()),  # whether those were scored as Other (else excluded)
        ("applies_when", pa.string()),  # the attribute's scope (OTHER=VALUE,...), null: everywhere
        ("n_out_of_scope", pa.int64()),  # rows given a null tag: out of the scope
        ("n_labelled_out_of_scope", pa.int64()),  # of which with a label (not scored: no tag to score)
    ]
)
PER_CLASS_SCHEMA = pa.schema(
    [
        ("model_version", pa.string()),
        ("split", pa.string()),
        ("attribute", pa.string()),
        ("label", pa.string()),
        ("precision", pa.float64()),
        ("recall", pa.float64()),
        ("f1", pa.float64()),
        ("support", pa.int64()),
        ("predicted", pa.int64()),
    ]
)
CONFUSION_SCHEMA = pa.schema(
    [("attribute", pa.string()), ("true_label", pa.string()), ("predicted_label", pa.string()), ("count", pa.int64())]
)


def metrics_table(evaluation: Evaluation) -> pa.Table:
    rows = []
    for attr in evaluation.attributes:
        m, mapping = attr.metrics, attr.mapping
        rows.append(
            {
                "model_version": evaluation.bundle.model_version,
                "split": evaluation.split,
                "attribute": attr.name,
                **{k: m[k] for k in METRICS_SCHEMA.names if k in m},
                "n_missing": mapping.missing,
                "n_folded": mapping.n_folded,
                "n_masked": mapping.n_masked,
                "n_unknown_label": mapping.n_unknown,
                "unknown_as_other": mapping.unknown_as_other,
            }
        )
    return pa.Table.from_pylist(rows, schema=METRICS_SCHEMA).replace_schema_metadata(_metadata(evaluation))


def per_class_table(evaluation: Evaluation) -> pa.Table:
    rows = [
        {"model_version": evaluation.bundle.model_version, "split": evaluation.split, "attribute": attr.name, **row}
        for attr in evaluation.attributes
        for row in attr.classes
    ]
    return pa.Table.from_pylist(rows, schema=PER_CLASS_SCHEMA).replace_schema_metadata(_metadata(evaluation))


def confusion_table(evaluation: Evaluation) -> pa.Table:
    rows = []
    for attr in evaluation.attributes:
        for i, j in zip(*attr.confusion.nonzero()):
            rows.append({"attribute": attr.name, "true_label": attr.labels[i], "predicted_label": attr.labels[j], "count": int(attr.confusion[i, j])})
    return pa.Table.from_pylist(rows, schema=CONFUSION_SCHEMA).replace_schema_metadata(_metadata(evaluation))


def predictions_table(evaluation: Evaluation) -> pa.Table:
    n = evaluation.n_rows
    errors = evaluation.errors
    columns: dict[str, pa.Array] = {
        "id": pa.array(evaluation.ids, pa.string()),
        "image": pa.array(evaluation.urls, pa.string()),
        "error_type": pa.array([errors[i][0] if i in errors else None for i in range(n)], pa.string()),
        "error": pa.array([errors[i][1] if i in errors else None for i in range(n)], pa.string()),
    }
    for j, attr in enumerate(evaluation.attributes):
        labels = attr.labels
        index, score = evaluation.top_index[attr.name], evaluation.top_score[attr.name]
        target = evaluation.targets[:, j]
        columns[attr.name] = pa.array(evaluation.raw_labels[attr.name], pa.string())
        columns[f"{attr.name}_target"] = pa.array([labels[t] if t >= 0 else None for t in target], pa.string())
        columns[f"{attr.name}_pred"] = pa.array([labels[i] if i >= 0 else None for i in index], pa.string())
        columns[f"{attr.name}_score"] = pa.array([None if math.isnan(s) else float(s) for s in score], pa.float32())
    return pa.table(columns).replace_schema_metadata(_metadata(evaluation))


def _metadata(evaluation: Evaluation) -> dict[str, str]:
    return {
        "tagger.model": storage.redact(evaluation.config.model),
        "tagger.model_version": evaluation.bundle.model_version,
        "tagger.data": evaluation.config.data_text,
        "tagger.data_fingerprint": evaluation.data_fingerprint,
        "tagger.split": evaluation.split,
    }


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def plot_name(kind: str, attribute: str) -> str:
    return f"plots/{kind}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', attribute)}.png"


def write_report(evaluation: Evaluation, out: str | None = None) -> dict[str, str]:
    """Write every file of the report under ``out`` (default: the evaluation's); returns {name: url}."""
    out = out or evaluation.out
    options = evaluation.config.storage_options
    written: dict[str, str] = {}

    def put(name: str, data: bytes) -> None:
        url = storage.join(out, *name.split("/"))
        storage.write_bytes(url, data, options)
        written[name] = url

    put("metrics.parquet", parquet_bytes(metrics_table(evaluation)))
    put("per_class.parquet", parquet_bytes(per_class_table(evaluation)))
    put("confusion.parquet", parquet_bytes(confusion_table(evaluation)))
    put("predictions.parquet", parquet_bytes(predictions_table(evaluation)))
    if evaluation.comparison is not None:
        put("comparison.parquet", parquet_bytes(evaluation.comparison.table.replace_schema_metadata(_metadata(evaluation))))
        put("changed_rows.parquet", parquet_bytes(evaluation.comparison.changed.replace_schema_metadata(_metadata(evaluation))))
    plots: dict[str, str] = {}
    if evaluation.config.plots:
        from . import plots as figures

        put("plots/summary.png", figures.summary_png(evaluation))
        plots["summary"] = "plots/summary.png"
        for attr in evaluation.attributes:
            name = plot_name("f1", attr.name)
            context = f"{evaluation.split} split, n={attr.metrics['n']}"
            put(name, figures.per_class_f1_png(attr, context))
            plots[f"f1/{attr.name}"] = name
            if len(attr.labels) <= evaluation.config.max_confusion_classes:
                name = plot_name("confusion", attr.name)
                put(name, figures.confusion_png(attr, context))
                plots[f"confusion/{attr.name}"] = name
    # report.md last: a folder with a report.md is a complete report.
    put("report.md", markdown(evaluation, plots).encode())
    return written


# ---------------------------------------------------------------------------------------------- text


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.1%}"


def pct_se(value: Any, se: Any) -> str:
    """An accuracy with its standard error: ``78.4% ±6.8``."""
    if se is None or (isinstance(se, float) and math.isnan(se)):
        return pct(value)
    return f"{pct(value)} ±{100 * se:.1f}"


def _gain(m: dict[str, Any]) -> str:
    a, b = m.get("accuracy"), m.get("majority_accuracy")
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return "–"
    return f"{(a - b) * 100:+.1f} pt"


def summary_rows(evaluation: Evaluation) -> list[list[str]]:
    rows = []
    for attr in evaluation.attributes:
        m = attr.metrics
        majority = f"{pct(m['majority_accuracy'])} ({m['majority_label'] or '–'})"
        name = attr.name + (f" (where {m['applies_when']})" if m.get("applies_when") else "")
        rows.append(
            [
                name, str(m["n"]), pct_se(m["accuracy"], m.get("accuracy_se")), majority, _gain(m), fmt(m["macro_f1"]), fmt(m["weighted_f1"]),
                fmt(m["threshold"], 2), pct(m["coverage"]), pct(m["accuracy_covered"]),
            ]
        )
    return rows


SUMMARY_HEADER = ["attribute", "n", "accuracy ±SE", "majority baseline", "vs baseline", "macro-F1", "weighted-F1",
                  "threshold", "coverage", "acc. covered"]


def headline(evaluation: Evaluation) -> str:
    b = evaluation.bundle
    return (
        f"model {evaluation.config.model} (model_version {b.model_version}, {b.backbone} @ {b.input_size}px) on "
        f"{evaluation.config.data_text}, split {evaluation.split}: {evaluation.n_rows} rows, "
        f"{evaluation.n_unreadable} unreadable, {evaluation.seconds:.1f}s on {evaluation.device}"
    )


def summary_text(evaluation: Evaluation) -> str:
    """The summary table as fixed-width text (what ``tagger evaluate`` prints)."""
    rows = [SUMMARY_HEADER, *summary_rows(evaluation)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(SUMMARY_HEADER))]
    lines = [headline(evaluation)]
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    sources = sorted({a.metrics["majority_source"] for a in evaluation.attributes})
    lines.append(f"majority label taken from {'; '.join(MAJORITY_SOURCES[s] for s in sources)}; ±: one standard error")
    lines.extend(f"note: {note}" for note in scope_notes(evaluation) + list(evaluation.notes))
    if evaluation.by_inputs is not None:
        from .inputs import inputs_text

        lines += ["", *inputs_text(evaluation.by_inputs)]
    if evaluation.comparison is not None:
        lines += ["", *comparison_text(evaluation.comparison)]
    return "\n".join(lines)


def comparison_text(comparison) -> list[str]:
    from .compare import COMPARISON_HEADER, COMPARISON_LEGEND, comparison_rows

    rows = [COMPARISON_HEADER, *comparison_rows(comparison)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COMPARISON_HEADER))]
    lines = [f"against the baseline {comparison.baseline} (model_version {comparison.baseline_version}), same rows:"]
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines + [COMPARISON_LEGEND] + [f"note: {note}" for note in comparison.notes]


def scope_notes(evaluation: Evaluation) -> list[str]:
    """One line per scoped attribute: where it applies and how many rows got a null tag."""
    notes = []
    for attr in evaluation.attributes:
        m = attr.metrics
        if m.get("applies_when"):
            notes.append(f"{attr.name} applies where {m['applies_when']} (the bundle's applies_when): {m['n_out_of_scope']} "
                         f"row(s) out of it got a null tag, {m['n_labelled_out_of_scope']} of them labelled (not scored)")
    return notes


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    cells = lambda row: "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"  # noqa: E731
    return [cells(header), "|" + "|".join(rule) + "|", *[cells(r) for r in rows]]


def markdown(evaluation: Evaluation, plots: dict[str, str] | None = None) -> str:
    plots = plots or {}
    lines = _md_header(evaluation) + _md_summary(evaluation, plots) + _md_comparison(evaluation) + _md_labels(evaluation)
    for attr in evaluation.attributes:
        lines += _md_attribute(attr, plots)
    lines += _md_unreadable(evaluation)
    lines.append("")
    return "\n".join(lines)


def _md_comparison(evaluation: Evaluation) -> list[str]:
    comparison = evaluation.comparison
    if comparison is None:
        return []
    from .compare import COMPARISON_HEADER, COMPARISON_LEGEND, comparison_rows

    lines = ["", f"## Against the baseline `{comparison.baseline}` (model_version `{comparison.baseline_version}`)", ""]
    lines += _md_table(COMPARISON_HEADER, comparison_rows(comparison))
    return lines + ["", f"- {COMPARISON_LEGEND}"] + [f"- {note}" for note in comparison.notes]


def _md_header(evaluation: Evaluation) -> list[str]:
    b, cfg = evaluation.bundle, evaluation.config
    created = b.training.get("created_at", "–") if isinstance(b.training, dict) else "–"
    data_rows = evaluation.data_rows
    lines = [
        f"# Evaluation of {cfg.model}",
        "",
        f"- **Model**: `{cfg.model}`, model_version `{b.model_version}`, {b.backbone} at {b.input_size} px, created {created}",
        f"- **Data**: `{cfg.data}` ({data_rows.get('parsed', '–')} rows in {_label_files(data_rows)}, "
        f"{data_rows.get('missing_image', 0)} without an image file), fingerprint `{evaluation.data_fingerprint}`",
        f"- **Split**: {evaluation.split}" + (" (every row with an image)" if evaluation.split == "all" else " (from the bundle's split.parquet)"),
        f"- **Rows evaluated**: {evaluation.n_rows}, of which {evaluation.n_unreadable} unreadable image(s)",
        f"- **Run**: {evaluation.seconds:.1f} s on {evaluation.device} (precision {cfg.precision}{'; ' + evaluation.computed if evaluation.computed else ''}), batch size {cfg.batch_size}",
    ]
    notes = scope_notes(evaluation) + list(evaluation.notes)
    if notes:
        lines += ["", "**Notes**", ""] + [f"- {note}" for note in notes]
    return lines


def _md_summary(evaluation: Evaluation, plots: dict[str, str]) -> list[str]:
    lines = ["", "## Summary: model vs majority baseline", ""]
    lines += _md_table(SUMMARY_HEADER, summary_rows(evaluation))
    sources = sorted({a.metrics["majority_source"] for a in evaluation.attributes})
    lines += [
        "",
        "- *n*: rows with a decoded image, a known label and a tag (in the attribute's scope). *accuracy*: top label "
        "right, ± one standard error sqrt(p(1-p)/n). "
        "*majority baseline*: accuracy of always answering the majority label (in brackets); "
        + "majority label taken from " + "; ".join(MAJORITY_SOURCES[s] for s in sources) + ".",
        "- *macro-F1*: mean F1 over the classes present in labels or predictions (as in retrain); "
        "*weighted-F1*: F1 weighted by support.",
        "- *threshold*: the bundle's review threshold; *coverage*: share of images whose top score reaches it "
        "(tagged without review); *acc. covered*: accuracy among those. A threshold of 1.00 sends every tag to review.",
    ]
    if "summary" in plots:
        lines += ["", f"![model vs majority baseline]({plots['summary']})"]
    return lines


def _md_labels(evaluation: Evaluation) -> list[str]:
    mapping_rows = []
    for attr in evaluation.attributes:
        mp = attr.mapping
        examples = "; ".join(
            f"{kind}: " + ", ".join(f"{label} ({n})" for label, n in counts.most_common(5)) + (", …" if len(counts) > 5 else "")
            for kind, counts in (("unknown", mp.unknown), ("folded", mp.folded), ("masked", mp.masked))
            if counts
        )
        mapping_rows.append(
            [attr.name, str(attr.metrics["n"]), str(mp.missing), str(mp.n_folded), str(mp.n_masked),
             f"{mp.n_unknown}" + (" → Other" if mp.unknown_as_other and mp.n_unknown else ""), examples or "–"]
        )
    lines = ["", "## Labels", ""]
    lines += _md_table(["attribute", "scored", "empty", "folded into Other", "masked (rare)", "unknown to the model", "labels"],
                       mapping_rows, "lrrrrrl")
    return lines + [
        "",
        "Labels are scored as retrain made its targets: rare labels it folded into `Other` count as `Other`, ones it "
        "masked are left out, empty cells are left out. Labels the model has never seen are counted under "
        "*unknown to the model* and "
        + ("scored as `Other` where the attribute has one (--unknown-labels other)." if evaluation.config.unknown_labels == "other"
           else "left out of the metrics (--unknown-labels exclude)."),
    ]


def _md_attribute(attr, plots: dict[str, str]) -> list[str]:
    m = attr.metrics
    lines = [
        "",
        f"## {attr.name}",
        "",
        f"accuracy {pct(m['accuracy'])} vs majority baseline {pct(m['majority_accuracy'])} "
        f"(always '{m['majority_label'] or '–'}'); macro-F1 {fmt(m['macro_f1'])}, weighted-F1 {fmt(m['weighted_f1'])}; "
        f"{m['n']} rows, {m['n_classes_present']} of {m['n_classes']} classes present.",
        "",
    ]
    class_rows = [
        [c["label"], fmt(c["precision"]), fmt(c["recall"]), fmt(c["f1"]), str(c["support"]), str(c["predicted"])]
        for c in sorted(attr.classes, key=lambda c: -c["support"])
    ]
    lines += _md_table(["label", "precision", "recall", "F1", "support", "predicted"], class_rows)
    confusions = _top_confusions(attr)
    if confusions:
        lines += ["", "Most frequent confusions: " + "; ".join(confusions) + "."]
    images = [f"![{kind} {attr.name}]({plots[f'{kind}/{attr.name}']})" for kind in ("f1", "confusion") if f"{kind}/{attr.name}" in plots]
    if images:
        lines += ["", " ".join(images)]
    return lines


def _md_unreadable(evaluation: Evaluation) -> list[str]:
    if not evaluation.errors:
        return []
    shown = sorted(evaluation.errors.items())[:50]
    lines = ["", "## Unreadable images", ""]
    lines += _md_table(["id", "error", "message"], [[evaluation.ids[i], t, msg] for i, (t, msg) in shown], "lll")
    if len(evaluation.errors) > len(shown):
        lines += ["", f"... and {len(evaluation.errors) - len(shown)} more (predictions.parquet has them all)."]
    return lines


def _top_confusions(attr, k: int = 5) -> list[str]:
    matrix = attr.confusion.copy()
    support = matrix.sum(axis=1)
    for i in range(len(matrix)):
        matrix[i, i] = 0
    pairs = sorted(((int(matrix[i, j]), i, j) for i, j in zip(*matrix.nonzero())), reverse=True)[:k]
    return [f"{attr.labels[i]} → {attr.labels[j]} {n} ({n / support[i]:.0%} of {attr.labels[i]})" for n, i, j in pairs]


def _label_files(data_rows) -> str:
    kinds = {s.get("kind") for s in data_rows.get("sources") or [] if isinstance(s, dict)}
    return "styles.csv" if kinds <= {"kaggle"} else "the labelled data"
