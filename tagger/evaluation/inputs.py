"""``tagger evaluate --text-column``: per attribute on the same rows, the photos alone, the text alone, and both as
the tag job fuses them (the bundle's text model and fusion, :mod:`tagger.model.fusion`).

The evaluation's own figures stay the photos' (the review thresholds and coverage are the image model's); this is
the side table the model card shows, from the rows' own text columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import EvaluationError

HEADER = ("attribute", "n", "photos", "text", "both")


def text_part(bundle: Any, table: Any, columns: Sequence[str], options: Any = None) -> Any:
    """The bundle's text part, checked against --text-column and --data before the model runs (exit 2 otherwise)."""
    from ..model.text import TextModelError, read_text_part

    try:
        part = read_text_part(bundle, options)
    except TextModelError as exc:
        raise EvaluationError(str(exc)) from None
    if part is None:
        raise EvaluationError(f"{bundle.path} has no text model (model.json has no text section); drop --text-column")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise EvaluationError(f"--text-column {', '.join(missing)}: no such column in --data (a Kaggle folder's title is "
                              f"productDisplayName; columns: {', '.join(table.columns)})")
    if len(columns) != len(part.fields):
        raise EvaluationError(f"{bundle.path} reads {len(part.fields)} text field(s) ({', '.join(part.fields)}); give as many --text-column")
    return part


def by_inputs(bundle: Any, part: Any, table: Any, columns: Sequence[str], photo: dict[str, np.ndarray], photo_ok: np.ndarray,
              targets: np.ndarray) -> dict[str, Any]:
    """Accuracy per attribute and input over the rows with a label (a row missing an input counts as wrong there)."""
    texts = part.model.featurizer.rows_text({f: table[c].to_list() for f, c in zip(part.fields, columns)}, table.height)
    text, present = part.model.probabilities(texts)
    fused = part.fusion.combine(photo, photo_ok, text, present)
    rows = []
    for j, spec in enumerate(bundle.attributes):
        known = targets[:, j] >= 0
        y = targets[known, j]

        def right(probs, usable):
            top = np.where(usable[known], np.nan_to_num(probs[known], nan=-1.0).argmax(axis=1), -1)
            return float((top == y).mean()) if len(y) else float("nan")

        rows.append({"attribute": spec.name, "n": int(known.sum()), "photos": right(photo[spec.name], photo_ok),
                     "text": right(text[spec.name], present), "both": right(fused.probs[spec.name], fused.mode != "")})
    modes = {m: int((fused.mode == m).sum()) for m in ("photos", "text", "both")}
    return {"columns": list(columns), "text_version": part.text_version, "rows_by_inputs": modes, "attributes": rows,
            "conflict_rows": int(np.any([fused.conflict[a] for a in fused.conflict], axis=0).sum())}


def inputs_text(table: dict[str, Any]) -> list[str]:
    rows = [HEADER, *[(r["attribute"], str(r["n"]), *(f"{100 * r[k]:.1f} %" for k in ("photos", "text", "both")))
                      for r in table["attributes"]]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = [f"by input, same rows (text: {', '.join(table['columns'])}; rows by inputs {table['rows_by_inputs']}, "
             f"{table['conflict_rows']} with a conflict):"]
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines
