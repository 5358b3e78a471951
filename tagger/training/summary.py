"""A short, human summary of a retrain run, from the facts saved in the bundle."""

from __future__ import annotations

from typing import Any

from ..model.bundle import ModelBundle


def _pct(value: Any) -> str:
    return "   –" if value is None else f"{100 * value:5.1f}"


def _se(accuracy: Any, n: Any) -> str:
    from ..metrics import accuracy_se

    if accuracy is None or not n:
        return "–"
    return f"{100 * accuracy_se(accuracy, n):.1f}"


def format_summary(bundle: ModelBundle) -> str:
    t = bundle.training
    data, split, metrics = t.get("data", {}), t.get("split", {}), t.get("metrics", {})
    rows = data.get("rows", {})
    dropped = sum(rows.get(k, 0) for k in ("malformed", "missing_id", "duplicate_id", "missing_image", "unreadable_image"))
    lines = [
        f"bundle   {bundle.path}  (model_version {bundle.model_version})",
        f"model    {bundle.backbone} @ {bundle.input_size}px, weights {t.get('weights_init')}, {t.get('device')} {t.get('precision')}",
        f"run      {t.get('epochs')} epochs (best {t.get('best_epoch')}, stopped by {t.get('stopped_by')}) in {t.get('duration_s')}s, seed {t.get('seed')}",
        f"rows     {rows.get('used')} used of {rows.get('lines')} lines: {rows.get('repaired', 0)} repaired, {dropped} dropped "
        f"(missing image {rows.get('missing_image', 0)}, unreadable {rows.get('unreadable_image', 0)}, "
        f"malformed {rows.get('malformed', 0)}, duplicate id {rows.get('duplicate_id', 0)})",
        "split    " + ", ".join(f"{k} {v}" for k, v in split.get("sizes", {}).items()),
    ]
    cut = t.get("trunk_pass_cut")
    if cut:
        lines.append(f"budget   trained on {cut['train_photos']} of {cut['train_total']} train photos, the budget ran out during "
                     f"the trunk pass (--max-minutes {t.get('max_minutes'):g}); the rest were not used, their features so far "
                     "are cached")
    folded = data.get("folded") or {}
    if folded:
        into = data.get("folded_into", {})
        kept = data.get("kept_labels") or {}
        parts = [f"{attr}: {len(labels)} -> {into.get(attr, 'Other')}" + (" (as the --init-weights bundle folded them)" if attr in kept else "")
                 for attr, labels in folded.items()]
        lines.append(f"folded   labels under {data.get('min_label_count')} rows; " + "; ".join(parts))
    counts = data.get("label_counts") or {}
    patchy = {a: sum(c.values()) for a, c in counts.items() if sum(c.values()) < rows.get("used", 0)}
    if patchy:
        lines.append("labelled " + ", ".join(f"{a} {n} of {rows.get('used')}" for a, n in patchy.items())
                     + " rows (the rest unknown: masked out of the loss and the metrics)")
    for spec in bundle.attributes:
        if spec.applies_when is not None:
            left = (data.get("labelled_out_of_scope") or {}).get(spec.name, 0)
            lines.append(f"scope    {spec.name} where {spec.applies_when.describe()}; null elsewhere ({left} labelled row(s) "
                         "outside it not learnt; val/test scored and the threshold fitted where it applies)")
    for narrow in data.get("narrow_labels") or []:
        lines.append(f"narrow   {narrow['attribute']}: {100 * narrow['share']:.0f} % of its labelled rows have {narrow['other']}="
                     f"{narrow['value']}; consider --applies-when {narrow['attribute']}:{narrow['other']}={narrow['value']}")
    heads = t.get("heads_init") or {}
    if any(v == "bundle" for v in heads.values()):
        lines.append("heads    from --init-weights: " + ", ".join(a for a, v in heads.items() if v == "bundle")
                     + (" (kept as they were: --freeze-carried-heads)" if t.get("frozen_heads") else "")
                     + "; new: " + (", ".join(a for a, v in heads.items() if v != "bundle") or "none"))
    lines.append(f"logs     {t.get('log_dir')}")
    lines.append("")
    header = (f"{'attribute':<16}{'val acc':>8}{'val F1':>8}{'test acc':>9}{'±SE':>6}{'test F1':>8}{'majority':>9}{'threshold':>10}"
              f"{'auto-tag':>9}")
    lines += [header, "-" * len(header)]
    coverage = (t.get("thresholds") or {}).get("val_coverage", {})
    for spec in bundle.attributes:
        v = metrics.get("val", {}).get(spec.name, {})
        s = metrics.get("test", {}).get(spec.name, {})
        lines.append(
            f"{spec.name:<16}{_pct(v.get('accuracy')):>8}{_pct(v.get('macro_f1')):>8}{_pct(s.get('accuracy')):>9}"
            f"{_se(s.get('accuracy'), s.get('n')):>6}{_pct(s.get('macro_f1')):>8}{_pct(s.get('majority_accuracy')):>9}{spec.threshold:>10.2f}{_pct(coverage.get(spec.name)):>9}"
        )
    lines.append(
        f"{'mean macro-F1':<16}{'':>8}{_pct(metrics.get('val_score')):>8}{'':>9}{'':>6}{_pct(metrics.get('test_score')):>8}"
    )
    lines.append("(%; ±SE = one standard error of the test accuracy, sqrt(p(1-p)/n); majority = test accuracy of always answering the most frequent training label; "
                 "auto-tag = share of val predictions at or above the threshold)")
    return "\n".join(lines)
