"""Report figures as PNG bytes, drawn with matplotlib's Agg canvas (no pyplot, no display, no global state).

- :func:`summary_png`: accuracy vs majority baseline, and macro-F1, per attribute;
- :func:`per_class_f1_png`: one attribute's per-class F1 as horizontal bars, with support;
- :func:`confusion_png`: one attribute's confusion matrix, row-normalised (each row: where that true class went).
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .evaluate import AttributeEvaluation, Evaluation

DPI = 110
MODEL_COLOUR = "#2f6db5"
BASELINE_COLOUR = "#a8a8a8"
F1_COLOUR = "#e08a2c"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, facecolor="white", bbox_inches="tight", pad_inches=0.15)
    return buffer.getvalue()


def _nan_to_zero(value: float) -> float:
    return 0.0 if value is None or math.isnan(value) else float(value)


def summary_png(evaluation: Evaluation) -> bytes:
    attrs = evaluation.attributes
    n = len(attrs)
    figure = _figure(8.0, 1.3 + 0.62 * n)
    ax = figure.add_subplot()
    y = np.arange(n)[::-1].astype(float)
    height = 0.26
    series = [
        ("accuracy", "accuracy", MODEL_COLOUR, height),
        ("majority_accuracy", "majority baseline accuracy", BASELINE_COLOUR, 0.0),
        ("macro_f1", "macro-F1", F1_COLOUR, -height),
    ]
    for key, label, colour, offset in series:
        values = [_nan_to_zero(a.metrics[key]) for a in attrs]
        bars = ax.barh(y + offset, values, height=height * 0.95, color=colour, label=label)
        for bar, a in zip(bars, attrs):
            raw = a.metrics[key]
            text = "n/a" if raw is None or math.isnan(raw) else f"{raw:.2f}"
            ax.text(bar.get_width() + 0.008, bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=7.5)
    ax.set_yticks(y, [f"{a.name}\n(n={a.metrics['n']})" for a in attrs], fontsize=9)
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("score")
    ax.xaxis.grid(True, color="#e6e6e6")
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14 if n > 2 else -0.3), ncol=3, frameon=False, fontsize=8.5)
    ax.set_title(f"Model vs majority baseline ({evaluation.split} split, {evaluation.n_rows} rows)", fontsize=11)
    return _png(figure)


def per_class_f1_png(attr: AttributeEvaluation, context: str = "") -> bytes:
    classes = sorted(attr.classes, key=lambda c: (math.isnan(c["f1"]), -_nan_to_zero(c["f1"]), -c["support"]))
    n = len(classes)
    figure = _figure(7.5, max(2.6, 1.2 + 0.3 * n))
    ax = figure.add_subplot()
    y = np.arange(n)[::-1]
    f1 = [_nan_to_zero(c["f1"]) for c in classes]
    colours = [MODEL_COLOUR if c["support"] > 0 else BASELINE_COLOUR for c in classes]
    ax.barh(y, f1, height=0.72, color=colours)
    for yi, c in zip(y, classes):
        value = "n/a" if math.isnan(c["f1"]) else f"{c['f1']:.2f}"
        ax.text(_nan_to_zero(c["f1"]) + 0.01, yi, value, va="center", fontsize=8, zorder=4,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.6, "alpha": 0.85})
    ax.set_yticks(y, [f"{c['label']}  (n={c['support']})" for c in classes], fontsize=8.5)
    macro = attr.metrics.get("macro_f1")
    if macro is not None and not math.isnan(macro):
        ax.axvline(macro, color=F1_COLOUR, linestyle="--", linewidth=1.2, label=f"macro-F1 {macro:.2f}", zorder=3)
        ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    ax.set_xlim(0, 1.1)
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlabel("F1 (grey: no rows of this class; n/a: neither present nor predicted)", fontsize=8)
    ax.xaxis.grid(True, color="#e6e6e6")
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    title = f"{attr.name}: per-class F1"
    if context:
        title += f" ({context})"
    ax.set_title(title, fontsize=11)
    return _png(figure)


def confusion_png(attr: AttributeEvaluation, context: str = "") -> bytes:
    from matplotlib import colormaps

    counts = attr.confusion.astype(float)
    support = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(support[:, None] > 0, counts / support[:, None], np.nan)
    n = len(attr.labels)
    side = max(4.8, 2.6 + 0.42 * n)
    figure = _figure(side + 1.0, side)
    ax = figure.add_subplot()
    cmap = colormaps["Blues"].with_extremes(bad="#eeeeee")  # rows without any true example
    image = ax.imshow(np.ma.masked_invalid(rates), cmap=cmap, vmin=0.0, vmax=1.0, aspect="equal")
    if n <= 14:
        size = 8.5 if n <= 8 else 7.5
        for i in range(n):
            for j in range(n):
                if counts[i, j] > 0:
                    value = rates[i, j]
                    ax.text(j, i, f"{value:.0%}\n{int(counts[i, j])}" if n <= 8 else f"{value:.0%}", ha="center", va="center",
                            fontsize=size, color="white" if value > 0.55 else "#222222", fontweight="bold" if i == j else "normal")
    ax.set_xticks(range(n), attr.labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=8.5)
    ax.set_yticks(range(n), [f"{label} ({int(s)})" for label, s in zip(attr.labels, support)], fontsize=8.5)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true label (rows)")
    bar = figure.colorbar(image, ax=ax, shrink=0.8, fraction=0.05)
    bar.set_label("share of the true class's rows", fontsize=8)
    title = f"{attr.name}: confusion, row-normalised"
    if context:
        title += f" ({context})"
    ax.set_title(title, fontsize=11)
    return _png(figure)

