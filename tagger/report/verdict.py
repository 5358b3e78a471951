"""The verdict at the top of every report: OK, look or broken, each figure beside what was expected of it.

What is expected comes from the bundle itself and from the night before, so that a report with no option
still says whether the night can be trusted:

- **review share** of an attribute: 1 - the share of validation tags at or over its review threshold
  (model.json ``training.thresholds.val_coverage``), over the validation rows;
- **agreement** with the catalog: the attribute's accuracy on the bundle's test split (``training.metrics.test``),
  held against tonight's rows that are not in its training split (those the model has seen agree more);
- **error rate**: the night before's; **agreement**, the night before's report's (its own accuracy);
- **drift**: none beyond what sampling explains (metrics.noise_floor).

A figure is held against an interval: the expected share p plus or minus :data:`Z` standard errors of a
binomial share for tonight's rows and the reference's, sqrt(p (1 - p) (1/n + 1/n_ref)); outside it on the bad
side is *look*; further than :data:`BROKEN_MARGIN` beyond it, *broken* (not a bad night but a broken feed or
model: a colour export gone grey, a bundle swapped for another). An explicit threshold (``--max-review-share``,
``--min-agreement``...) replaces the derived expectation of its figure, and crossing it is *broken*; exit 6 stays
the explicit thresholds' alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .config import Thresholds

# 3 standard errors: a good night of 7 attributes x 2 checks is called "look" about once in 25 nights.
Z = 3.0
BROKEN_MARGIN = 0.2
RANK = {"ok": 0, "look": 1, "broken": 2}


def interval(p: float, n: int, n_ref: int | None) -> tuple[float, float]:
    """Where a share of ``n`` rows falls around an expected ``p`` measured on ``n_ref`` rows (None: known exactly)."""
    if n <= 0:
        return 0.0, 1.0
    # A share measured as 0 (or 1) on n_ref rows is known to within ~3 rows of them (the rule of three), not exactly.
    pv = min(max(p, 3 / n_ref), 1 - 3 / n_ref) if n_ref and n_ref > 6 else p
    variance = pv * (1 - pv) * (1 / n + (1 / n_ref if n_ref else 0.0))
    # A share expected at 0 or 1 still moves by a row or so: at least the half-width of one row in n.
    half = max(Z * math.sqrt(variance), 1 / n)
    return max(0.0, p - half), min(1.0, p + half)


def _status(value: float, low: float, high: float, bad: str) -> str:
    """ok / look / broken for a figure against [low, high]; ``bad``: "high" or "low", the side that is wrong."""
    beyond = value - high if bad == "high" else low - value
    return "ok" if beyond <= 0 else ("broken" if beyond > BROKEN_MARGIN else "look")


def _check(name: str, figure: str, value: float | None, expected: str, status: str, why: str, **extra: Any) -> dict[str, Any]:
    return {"check": name, "value": value, "figure": figure, "expected": expected, "status": status, "why": why, **extra}


def _pct(value: float) -> str:
    return f"{value * 100:.1f} %"


def checks(report: Mapping[str, Any], expected: Mapping[str, Any], previous: Mapping[str, Any] | None,
           thresholds: Thresholds) -> list[dict[str, Any]]:
    """Every check of the night, in the page's order: counts first, then each attribute's."""
    out: list[dict[str, Any]] = []
    counts, before = report["counts"], report.get("previous_counts")
    tag_rows = counts["tagged"] + counts["reused"]
    rows = counts["rows"]
    if rows and not tag_rows:
        out.append(_check("tagged rows", "0", 0, "the manifest's rows", "broken", "no row was tagged"))
    rate = counts["error_rate"]
    if thresholds.max_error_rate is not None:
        out.append(_check("error rate", _pct(rate), rate, f"≤ {_pct(thresholds.max_error_rate)} (--max-error-rate)",
                          "broken" if rate > thresholds.max_error_rate else "ok", "explicit threshold"))
    elif rows and before and before["rows"]:
        p = before["error_rate"]
        low, high = interval(p, rows, before["rows"])
        out.append(_check("error rate", _pct(rate), rate, f"{_pct(p)}, up to {_pct(high)}", _status(rate, 0.0, high, "high"),
                          f"the night before, for {rows:,} rows"))
    elif rows and report.get("tag_max_error_rate") is not None:
        gate = report["tag_max_error_rate"]  # the first night: the tag run's own gate, which it passed to commit
        out.append(_check("error rate", _pct(rate), rate, f"≤ {_pct(gate)}", "ok" if rate <= gate else "look",
                          "the tag run's --max-error-rate (first night)"))
    if before and before["rows"]:
        moved = rows / before["rows"] - 1
        if thresholds.max_rows_change is not None:
            status, expect, why = ("broken" if abs(moved) > thresholds.max_rows_change else "ok",
                                   f"within ±{_pct(thresholds.max_rows_change)} (--max-rows-change)", "explicit threshold")
        else:
            # A catalog's size is not a sample: half or twice the night before is worth a look, not a verdict.
            status, expect, why = ("look" if moved < -0.5 or moved > 1.0 else "ok", f"{before['rows']:,} (-50 % .. +100 %)",
                                   "the night before")
        out.append(_check("manifest rows", f"{rows:,} ({moved:+.0%})", moved, expect, status, why))

    for a, facts in report["attributes"].items():
        ref = expected.get(a, {})
        share = facts.get("review_share")
        if share is not None:
            if thresholds.max_review_share is not None:
                out.append(_check(f"{a} review share", _pct(share), share, f"≤ {_pct(thresholds.max_review_share)} "
                                  "(--max-review-share)", "broken" if share > thresholds.max_review_share else "ok",
                                  "explicit threshold", attribute=a))
            elif "review_share" in ref:
                p, n_ref = ref["review_share"]
                low, high = interval(p, tag_rows, n_ref)
                out.append(_check(f"{a} review share", _pct(share), share, f"{_pct(p)} ({_pct(low)} .. {_pct(high)})",
                                  _status(share, low, high, "high"), f"the bundle's validation ({n_ref:,} rows)", attribute=a,
                                  low=low, high=high, expected_value=p))
        g = facts.get("agreement") or {}
        value = g.get("accuracy_new") if g.get("training_split_known") else g.get("accuracy")
        n = g.get("labelled_new") if g.get("training_split_known") else g.get("labelled")
        if value is not None and n:
            if thresholds.min_agreement is not None:
                out.append(_check(f"{a} agreement", _pct(value), value, f"≥ {_pct(thresholds.min_agreement)} (--min-agreement)",
                                  "broken" if value < thresholds.min_agreement else "ok", "explicit threshold", attribute=a))
            elif "accuracy" in ref:
                p, n_ref = ref["accuracy"]
                low, high = interval(p, n, n_ref)
                seen = " (products not in its training split)" if g.get("training_split_known") else ""
                out.append(_check(f"{a} agreement", _pct(value), value, f"{_pct(p)} ({_pct(low)} .. {_pct(high)})",
                                  _status(value, low, high, "low"), f"the bundle's test split ({n_ref:,} rows){seen}",
                                  attribute=a, low=low, high=high, expected_value=p))
            past = ((previous or {}).get(a) or {})
            if past.get("accuracy") is not None and past.get("labelled"):
                low, high = interval(past["accuracy"], g["labelled"], past["labelled"])
                status = _status(g["accuracy"], low, high, "low")
                out.append(_check(f"{a} agreement vs the night before", _pct(g["accuracy"]), g["accuracy"],
                                  f"{_pct(past['accuracy'])} ({_pct(low)} .. {_pct(high)})", "look" if status == "broken" else status,
                                  f"the night before's report ({past['labelled']:,} labelled rows)", attribute=a))
        d = facts.get("drift")
        if d and "beyond_noise" in d:
            out.append(_check(f"{a} label mix", _drift_figure(d), d["js_distance"], _drift_floor(d),
                              "look" if d["beyond_noise"] else "ok", "the night before, for these row counts", attribute=a))
        moved = facts.get("catalog_drift")
        if moved and moved.get("beyond_noise"):
            out.append(_check(f"{a} catalog's own labels", _drift_figure(moved), moved["js_distance"], _drift_floor(moved), "look",
                              "the catalog's labels of the night before's tagged products", attribute=a))
    return out


def _drift_figure(d: Mapping[str, Any]) -> str:
    mover = (d.get("movers") or [None])[0]
    moved = (f", {mover['label']} {_pct(mover['previous_share'])} → {_pct(mover['share'])} ({d['largest_move_se']:.1f} SE)"
             if mover and "largest_move_se" in d else "")
    return f"JS {d['js_distance']:.3f}{moved}"


def _drift_floor(d: Mapping[str, Any]) -> str:
    return f"JS ≤ {d['js_noise_floor']:.3f}, a label ≤ {d.get('largest_move_se_noise_floor', 0):.1f} SE (sampling noise)"


def verdict(checks: list[dict[str, Any]]) -> dict[str, Any]:
    worst = max((c["status"] for c in checks), key=RANK.get, default="ok")
    return {"status": worst, "checks": checks, "not_ok": [c for c in checks if c["status"] != "ok"]}


def expectations(model_meta: Mapping[str, Any] | None) -> dict[str, dict[str, tuple[float, int]]]:
    """Per attribute, (expected share, rows it was measured on) of the review share and the accuracy, from the
    bundle's model.json; {} for a bundle that recorded neither (an older or a hand-made one)."""
    if not model_meta:
        return {}
    training = model_meta.get("training") or {}
    coverage = ((training.get("thresholds") or {}).get("val_coverage")) or {}
    metrics = training.get("metrics") or {}
    out: dict[str, dict[str, tuple[float, int]]] = {}
    for attribute in model_meta.get("attributes", []):
        a = attribute.get("name")
        val, test = (metrics.get("val") or {}).get(a) or {}, (metrics.get("test") or {}).get(a) or {}
        facts: dict[str, tuple[float, int]] = {}
        if a in coverage and val.get("n"):
            facts["review_share"] = (1.0 - float(coverage[a]), int(val["n"]))
        if test.get("accuracy") is not None and test.get("n"):
            facts["accuracy"] = (float(test["accuracy"]), int(test["n"]))
        if facts:
            out[a] = facts
    return out
