"""Does a reduced precision tag as well as fp32? ``tagger evaluate --check-precision``.

The bundle's metrics and review thresholds were computed in fp32. A runtime computing in bf16 or int8 is
faster but rounds differently, so a few tags change; whether that matters is measured, not assumed: the same
split is scored twice, by the same runtime in fp32 and in the reduced precision, and the reduced one passes
when no attribute's accuracy falls more than ``tolerance`` points below fp32's (issue 22: 0.5). The record goes
into the bundle's model.json (``precision_checks``), passed or not, and ``--runtime auto`` then lets that runtime
and precision compete with the fp32 ones, where the CPU computes it natively (:func:`tagger.model.choice.candidates`).
"""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from . import EvaluationError
from .evaluate import EvaluateConfig, Evaluation, evaluate

TOLERANCE_POINTS = 0.5
# Fewer scored rows than this and a check does not pass, whatever its drops: on a few dozen photos one changed
# tag is several points, and no change at all says little (the shipped model's test split has 895).
MIN_ROWS = 200
REDUCED = ("bf16", "int8")


def check_precision(config: EvaluateConfig, tolerance: float = TOLERANCE_POINTS,
                    min_rows: int = MIN_ROWS) -> tuple[dict[str, Any], Evaluation, Evaluation]:
    """Score ``config``'s split in fp32 and in ``config.precision`` with ``config.runtime`` -> (record, fp32
    evaluation, reduced evaluation). Raises :class:`EvaluationError` for a runtime or precision that is not one to check."""
    from ..model.cpu import cpu_identity, library_versions
    from ..model.engines import CPU_PRECISIONS
    from ..model.int8 import calibration_identity

    if config.precision not in REDUCED:
        raise EvaluationError(f"--check-precision compares a reduced precision with fp32: give --precision {' or '.join(REDUCED)}, "
                              f"not {config.precision}")
    if config.runtime not in CPU_PRECISIONS or config.precision not in CPU_PRECISIONS[config.runtime]:
        able = [r for r, p in CPU_PRECISIONS.items() if config.precision in p]
        raise EvaluationError(f"--check-precision needs the runtime that will compute {config.precision}: --runtime "
                              f"{' or '.join(able)}, not {config.runtime}")
    if config.device not in ("auto", "cpu"):
        raise EvaluationError("--check-precision checks the CPU runtimes; use --device cpu (or auto)")
    base = replace(config, device="cpu")
    reference = evaluate(replace(base, precision="fp32"))
    reduced = evaluate(base)
    attributes = {}
    for ref, red in zip(reference.attributes, reduced.attributes):
        a, b = ref.metrics["accuracy"], red.metrics["accuracy"]
        drop = round(100 * (a - b), 2) if not (math.isnan(a) or math.isnan(b)) else None
        ok = reference.ok & reduced.ok
        threshold = reference.bundle.review_thresholds[ref.name]
        attributes[ref.name] = {"accuracy_fp32": a, "accuracy": b, "drop_points": drop,
                                "changed_top_labels": int((reference.top_index[ref.name] != reduced.top_index[ref.name])[ok].sum()),
                                # the review thresholds were calibrated in fp32: the share they send to a person, both ways
                                "review_share_fp32": float((reference.top_score[ref.name][ok] < threshold).mean()) if ok.any() else None,
                                "review_share": float((reduced.top_score[ref.name][ok] < threshold).mean()) if ok.any() else None}
    drops = [v["drop_points"] for v in attributes.values() if v["drop_points"] is not None]
    if not drops:
        raise EvaluationError("no attribute could be scored (no labelled rows decoded); nothing to check")
    record = {
        "candidate": f"{config.runtime} {config.precision}",
        "model_version": reference.bundle.model_version,
        "passed": max(drops) <= tolerance and int(reduced.ok.sum()) >= min_rows,
        "tolerance_points": tolerance, "min_rows": min_rows,
        "largest_drop_points": max(drops),
        "split": config.split, "rows": int(reduced.ok.sum()), "data_fingerprint": reduced.data_fingerprint,
        "attributes": attributes,
        **({"calibration": calibration_identity()} if config.precision == "int8" else {}),
        "cpu": cpu_identity()["model"], "libraries": library_versions(),
        "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return record, reference, reduced


def check_text(record: dict[str, Any]) -> str:
    """The check as a table: one line per attribute, then the verdict."""
    lines = [f"precision check of {record['candidate']} against fp32, {record['split']} split, {record['rows']} rows "
             f"(model {record['model_version']}):", f"  {'attribute':<16} {'fp32':>7} {record['candidate'].split()[1]:>7} {'drop':>6}  changed tags  review share (fp32 -> this)"]
    for name, v in record["attributes"].items():
        drop = "n/a" if v["drop_points"] is None else f"{v['drop_points']:+.2f}"
        review = ("n/a" if v.get("review_share") is None
                  else f"{100 * v['review_share_fp32']:.1f}% -> {100 * v['review_share']:.1f}%")
        lines.append(f"  {name:<16} {100 * v['accuracy_fp32']:6.1f}% {100 * v['accuracy']:6.1f}% {drop:>6}  {v['changed_top_labels']:>12}  {review}")
    verdict = "PASSED" if record["passed"] else "FAILED"
    few = record["rows"] < record.get("min_rows", 0)
    lines.append(f"{verdict}: largest drop {record['largest_drop_points']:.2f} points (tolerance {record['tolerance_points']}"
                 + (f"; {record['rows']} rows, fewer than the {record['min_rows']} a check needs" if few else "") + "); "
                 + ("--runtime auto may now choose it where the CPU computes it natively" if record["passed"]
                    else "--runtime auto never chooses it; --precision " + record["candidate"].split()[1] + " still runs it on request"))
    return "\n".join(lines)
