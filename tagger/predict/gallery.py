"""``tagger predict``: external images -> their predicted tags, shown beside them.

- :func:`collect_images`: files and folders (recursive) -> image paths, in a stable order;
- :func:`image_predictions`: the model's outputs for the paths (:func:`tagger.model.scoring.run_model`)
  -> one :class:`ImagePrediction` per path, an unreadable one with its error;
- :func:`sheet_pngs`: a contact sheet (thumbnail left, tags and scores right), paged;
- :func:`gallery_html`: one self-contained HTML file (thumbnails embedded as base64 JPEG);
- :func:`predictions_table`: the same as an Arrow table (written beside the sheet as Parquet).
- :func:`catalog_rows` and :func:`catalog_predictions` (``--catalog``): a manifest's rows, read as the tag job
  reads them, and with ``--text-column`` their titles fused with the photos by the tag job's own
  :class:`tagger.tag.text_rows.TextFuser`: the labels and scores shown are those the tag job writes, with each
  row's ``inputs`` and ``conflict``.

A top label scoring under its attribute's review threshold (the bundle's, calibrated on validation
data) is shown in grey italics with a '?': the tag job would send it to review.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..model.bundle import ModelBundle
from ..data.kaggle import IMAGE_EXTENSIONS
from ..evaluation import EvaluationError
from ..model.sinks import ModelOutputs


@dataclass
class ImagePrediction:
    path: str
    tags: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # attr -> top-k (label, score), best first
    review: dict[str, bool] = field(default_factory=dict)  # attr -> top score under the review threshold
    threshold: dict[str, float] = field(default_factory=dict)  # attr -> that threshold (with text: the row's input mode's)
    thumb: np.ndarray | None = None  # (h, w, 3) uint8, the original picture scaled down
    error_type: str | None = None
    error: str | None = None
    # --catalog only: the row's product id; with --text-column its text as the catalog has it, the inputs its
    # tags came from (photos, text, both), its conflicts (the tag job's), and, tagged from text, why the photo was not.
    product_id: str | None = None
    text: str | None = None
    inputs: str | None = None
    conflict: list[dict[str, Any]] = field(default_factory=list)
    photo_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_type is None


def collect_images(inputs: Sequence[str], extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Files as given (whatever their extension, present or not: a bad or missing one shows up as an error entry), folders walked
    recursively for ``extensions`` (case-insensitive; hidden files and folders skipped), sorted per folder.
    Each path once, in the order first met."""
    wanted = tuple(e.lower() for e in extensions)
    paths: list[str] = []
    seen: set[str] = set()

    def add(path: str) -> None:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            paths.append(path)

    for item in inputs:
        if os.path.isdir(item):
            for folder, dirs, files in os.walk(item):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith(".") and name.lower().endswith(wanted):
                        add(os.path.join(folder, name))
        else:
            # A file, or a name that is not there: the reader lists a missing photo as an error entry beside the
            # others (error_type missing), as it does an unreadable one, rather than failing the whole call.
            add(item)
    missing = [item for item in inputs if not os.path.exists(item)]
    if missing and len(missing) == len(inputs):  # nothing to show beside the errors: a mistyped argument
        raise EvaluationError(f"{', '.join(missing)}: does not exist (no such file or folder)")
    if not paths:
        raise EvaluationError(
            f"no images ({', '.join(extensions)}) found in {', '.join(inputs)}"
        )
    return paths


def image_predictions(bundle: ModelBundle, paths: Sequence[str], outputs: ModelOutputs, top_k: int = 3) -> list[ImagePrediction]:
    """One entry per path, in order, from :func:`tagger.model.scoring.run_model`'s outputs: top-k
    tags and review marks, or the error that kept the image from the model."""
    results = []
    for i, path in enumerate(paths):
        entry = ImagePrediction(path, thumb=outputs.thumbs.get(i))
        if not outputs.ok[i]:
            entry.error_type, entry.error = outputs.errors.get(i, ("unknown", f"{path}: no prediction"))
            results.append(entry)
            continue
        _set_tags(bundle, entry, {a: outputs.top_index[a][i] for a in bundle.attribute_names},
                  {a: outputs.probs[a][i] for a in bundle.attribute_names}, {a.name: a.threshold for a in bundle.attributes}, top_k)
        results.append(entry)
    return results


def _set_tags(bundle: ModelBundle, entry: ImagePrediction, top: dict[str, int], probs: dict[str, np.ndarray],
              thresholds: dict[str, float], top_k: int) -> None:
    for spec in bundle.attributes:
        if top[spec.name] < 0:  # out of the attribute's scope (applies_when): no tag
            entry.tags[spec.name], entry.review[spec.name] = [], False
            continue
        p = probs[spec.name]
        order = np.argsort(-p, kind="stable")[: max(1, min(top_k, len(p)))]
        entry.tags[spec.name] = [(spec.labels[j], float(p[j])) for j in order]
        entry.review[spec.name] = bool(p[order[0]] < thresholds[spec.name])
        entry.threshold[spec.name] = float(thresholds[spec.name])


def catalog_rows(manifest: Any) -> tuple[list[str], np.ndarray]:
    """A manifest's image locations, row for row, and the rows to score: those the tag job would read (not an
    ``invalid_row`` or ``duplicate_id``, which :func:`catalog_predictions` lists with the tag job's message)."""
    if manifest.separator is not None:
        raise EvaluationError(f"{manifest.url}: several photos per product (--image-separator, or a list column): predict "
                              "shows one photo per row; give a catalog with one image per row")
    status = manifest.table.column("status").to_numpy(zero_copy_only=False)
    return [str(x) for x in manifest.locations().to_pylist()], np.flatnonzero(status == "")


def catalog_predictions(bundle: ModelBundle, manifest: Any, locations: Sequence[str], scored: np.ndarray, outputs: ModelOutputs,
                        fuser: Any = None, top_k: int = 3) -> list[ImagePrediction]:
    """One entry per manifest row, in order. ``outputs``: :func:`tagger.model.scoring.run_model`'s of the ``scored``
    rows' locations. ``fuser`` (--text-column): the tag job's :class:`tagger.tag.text_rows.TextFuser`, which turns
    the photos' predictions into the row's fused ones (a row without text keeps its photos' own; a row whose photo
    failed but whose text is usable is tagged from its text)."""
    from ..data.reader import Batch
    from ..model.predictor import Predictions

    table = manifest.table
    ids, status, message = (table.column(c).to_pylist() for c in ("product_id", "status", "message"))
    results = [ImagePrediction(path, product_id=ids[r]) for r, path in enumerate(locations)]
    for r, entry in enumerate(results):
        if status[r]:
            entry.error_type, entry.error = status[r], message[r]
    for k, r in enumerate(scored):
        results[r].thumb = outputs.thumbs.get(k)
    names = bundle.attribute_names
    thresholds = {a.name: a.threshold for a in bundle.attributes}
    if fuser is None:
        for k, r in enumerate(scored):
            if outputs.ok[k]:
                _set_tags(bundle, results[r], {a: outputs.top_index[a][k] for a in names}, {a: outputs.probs[a][k] for a in names}, thresholds, top_k)
            else:
                results[r].error_type, results[r].error = outputs.errors.get(k, ("unknown", f"{locations[r]}: no prediction"))
        return results

    texts = [" · ".join(v for v in values if v and v.strip()) or None
             for values in zip(*(manifest.extra.column(c).to_pylist() for c in fuser.columns))]
    for r, entry in enumerate(results):
        entry.text = texts[r]
    good = np.asarray(scored[outputs.ok], np.int64)
    failed = np.flatnonzero(~outputs.ok)
    errors = [outputs.errors.get(int(k), ("unknown", f"{locations[scored[k]]}: no prediction")) for k in failed]
    batch = Batch(rows=good, versions=[""] * len(good), images=None, error_rows=np.asarray(scored[failed], np.int64),
                  error_types=[t for t, _ in errors], error_messages=[m for _, m in errors], size=len(scored))
    photos = Predictions({a: outputs.top_index[a][outputs.ok] for a in names}, {a: outputs.top_score[a][outputs.ok] for a in names},
                         {a: outputs.probs[a][outputs.ok] for a in names})
    fused_batch, fused, _, columns = fuser(batch, photos)
    for r, error_type, error in zip(fused_batch.error_rows, fused_batch.error_types, fused_batch.error_messages):
        results[r].error_type, results[r].error = error_type, error
    if columns is None:  # nothing tagged: every photo failed, and no row had text
        return results
    photo_errors = dict(zip(batch.error_rows.tolist(), errors))
    for k, r in enumerate(fused_batch.rows):
        entry = results[r]
        _set_tags(bundle, entry, {a: fused.indices[a][k] for a in names}, {a: fused.probabilities[a][k] for a in names},
                  {a: columns.thresholds[a][k] for a in names}, top_k)
        entry.inputs, entry.conflict = columns.inputs[k], columns.conflict[k]
        if int(r) in photo_errors:  # tagged from its text: the photo's error is said beside the tags
            error_type, error = photo_errors[int(r)]
            entry.photo_error = f"{error_type}: {error}"
    return results


def predictions_table(bundle: ModelBundle, results: Sequence[ImagePrediction], *, catalog: bool = False, text: bool = False):
    """One row per image: path, error_type, error, and per attribute the top label, its score, whether it
    goes to review, and the top-k as a list of (label, score). ``catalog``: also the product_id (first);
    ``text`` (--text-column): also the row's text and the tag job's ``inputs`` and ``conflict`` (null on error rows)."""
    import pyarrow as pa

    from ..attributes import CONFLICT_COLUMN, INPUTS_COLUMN
    from ..tag.writers import CONFLICT_TYPE

    top_type = pa.list_(pa.struct([("label", pa.string()), ("score", pa.float32())]))
    columns: dict[str, pa.Array] = {}
    if catalog:
        columns["product_id"] = pa.array([r.product_id for r in results], pa.string())
    columns |= {
        "path": pa.array([r.path for r in results], pa.string()),
        "error_type": pa.array([r.error_type for r in results], pa.string()),
        "error": pa.array([r.error for r in results], pa.string()),
    }
    if text:
        columns["text"] = pa.array([r.text for r in results], pa.string())
        columns[INPUTS_COLUMN] = pa.array([r.inputs if r.ok else None for r in results], pa.string())
        columns[CONFLICT_COLUMN] = pa.array([r.conflict if r.ok else None for r in results], CONFLICT_TYPE)
    for spec in bundle.attributes:
        name = spec.name
        tagged = [r.ok and bool(r.tags[name]) for r in results]  # not: unreadable, or out of the attribute's scope
        columns[name] = pa.array([r.tags[name][0][0] if t else None for r, t in zip(results, tagged)], pa.string())
        columns[f"{name}_score"] = pa.array([r.tags[name][0][1] if t else None for r, t in zip(results, tagged)], pa.float32())
        columns[f"{name}_review"] = pa.array([r.review[name] if t else None for r, t in zip(results, tagged)], pa.bool_())
        columns[f"{name}_top_k"] = pa.array(
            [[{"label": label, "score": score} for label, score in r.tags[name]] if t else None for r, t in zip(results, tagged)], top_type
        )
    metadata = {"tagger.model_version": bundle.model_version, "tagger.model": bundle.path}
    return pa.table(columns).replace_schema_metadata(metadata)


def display_names(paths: Sequence[str]) -> dict[str, str]:
    """Each path relative to the deepest folder holding them all (``sub/a.jpg``), so equal file names in
    different folders stay apart; a lone file is its base name."""
    absolute = {p: os.path.abspath(p) for p in paths}
    try:
        root = os.path.commonpath([os.path.dirname(a) for a in absolute.values()]) if absolute else ""
    except ValueError:  # different drives
        root = ""
    return {p: os.path.relpath(a, root) if root else p for p, a in absolute.items()}


def _describe(bundle: ModelBundle, results: Sequence[ImagePrediction]) -> tuple[str, str]:
    bad = sum(not r.ok for r in results)
    title = f"{len(results)} image(s), {bad} unreadable: tags from {bundle.path}"
    meta = (
        f"model_version {bundle.model_version}, {bundle.backbone} at {bundle.input_size} px. Review thresholds: "
        + ", ".join(f"{a.name} {a.threshold:.2f}" for a in bundle.attributes)
    )
    return title, meta


LEGEND = (
    "Top label and score first, then the next guesses. Grey italics with '?': the top score is under the "
    "attribute's review threshold, so the tag job would send it to human review."
)
TEXT_LEGEND = (
    "Tags fused from the photo and the text as the tag job writes them; 'from' says which inputs a row was tagged from "
    "(photos, text, both). A conflict: photos and text each confident and disagreeing (the tag job sends it to review)."
)


def _legend(results: Sequence[ImagePrediction]) -> str:
    return LEGEND + (" " + TEXT_LEGEND if any(r.inputs is not None for r in results) else "")


TEXT_SHOWN = 200  # characters of a row's text on its card (the table has it whole): a 60 kB description is not a caption


def _card_notes(entry: ImagePrediction) -> list[str]:
    """Under the file name (--catalog): the product id and text, what the tags came from, each conflict."""
    notes = []
    if entry.product_id is not None:
        text = entry.text if not entry.text or len(entry.text) <= TEXT_SHOWN else entry.text[:TEXT_SHOWN] + "…"
        notes.append(f"{entry.product_id}: {text}" if text else entry.product_id)
    if entry.inputs is not None:
        notes.append(f"from {entry.inputs}" + (f" (photo {entry.photo_error})" if entry.photo_error else ""))
    notes += [_conflict_text(c) for c in entry.conflict]
    return notes


def _conflict_text(c: dict[str, Any]) -> str:
    return f"conflict {c['attribute']}: photos {c['photos']} {c['photos_score']:.2f}, text {c['text']} {c['text_score']:.2f}"


# ---------------------------------------------------------------------------------------------- PNG


def _fonts(size: int) -> dict[str, Any]:
    from PIL import ImageFont

    try:
        import matplotlib

        folder = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
        files = {"regular": "DejaVuSans.ttf", "bold": "DejaVuSans-Bold.ttf", "italic": "DejaVuSans-Oblique.ttf"}
        fonts = {k: ImageFont.truetype(os.path.join(folder, v), size) for k, v in files.items()}
        fonts["small"] = ImageFont.truetype(os.path.join(folder, files["regular"]), size - 2)
        fonts["title"] = ImageFont.truetype(os.path.join(folder, files["bold"]), size + 4)
        return fonts
    except Exception:  # no matplotlib fonts: Pillow's own (no italics; the '?' still marks review)
        default = ImageFont.load_default(size)
        return {"regular": default, "bold": default, "italic": default, "small": ImageFont.load_default(size - 2),
                "title": ImageFont.load_default(size + 4)}


INK = (25, 25, 28)
GREY = (135, 135, 140)
ERROR_INK = (178, 34, 34)
RULE = (222, 222, 226)


def sheet_pngs(
    bundle: ModelBundle,
    results: Sequence[ImagePrediction],
    *,
    columns: int = 2,
    per_page: int = 40,
    thumb_size: int = 160,
    font_size: int = 13,
) -> list[bytes]:
    """The contact sheet as PNG pages of at most ``per_page`` entries, ``columns`` entries side by side."""
    pages = [results[i : i + per_page] for i in range(0, len(results), per_page)] or [[]]
    names = display_names([r.path for r in results])
    return [
        _sheet_page(bundle, page, results, names, number=k + 1, pages=len(pages), columns=columns, thumb_size=thumb_size,
                    font_size=font_size)
        for k, page in enumerate(pages)
    ]


def _sheet_page(bundle, page, everything, shown_names, *, number, pages, columns, thumb_size, font_size) -> bytes:
    from PIL import Image, ImageDraw

    fonts = _fonts(font_size)
    line = font_size + 6
    pad = 12
    names = [a.name for a in bundle.attributes]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    attr_width = max(probe.textlength(n, font=fonts["small"]) for n in names) + 10
    text_width = int(max(430, attr_width + 340))
    cell_w = pad + thumb_size + pad + text_width + pad
    notes = max((len(_card_notes(entry)) for entry in page), default=0)
    cell_h = pad + max(thumb_size, line * (1 + len(names) + notes) + 4) + pad
    columns = max(1, min(columns, len(page) or 1))
    rows = max(1, math.ceil(len(page) / columns))
    width = max(cell_w * columns, 760)
    title, meta = _describe(bundle, everything)
    if pages > 1:
        title += f" (page {number} of {pages})"
    header_lines = [(title, fonts["title"], INK)] + [
        (text, fonts["small"], GREY) for text in _wrap(probe, meta, fonts["small"], width - 2 * pad)
    ] + [(text, fonts["small"], GREY) for text in _wrap(probe, _legend(everything), fonts["small"], width - 2 * pad)]
    header_h = pad + sum(font_size + (10 if f is fonts["title"] else 5) for _, f, _ in header_lines) + pad
    sheet = Image.new("RGB", (width, header_h + rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    for text, font, colour in header_lines:
        draw.text((pad, y), text, font=font, fill=colour)
        y += font_size + (10 if font is fonts["title"] else 5)
    draw.line([(0, header_h - 1), (width, header_h - 1)], fill=RULE, width=1)

    for k, entry in enumerate(page):
        x0 = (k % columns) * cell_w
        y0 = header_h + (k // columns) * cell_h
        if k % columns:
            draw.line([(x0, y0 + 6), (x0, y0 + cell_h - 6)], fill=RULE)
        draw.line([(x0 + 6, y0 + cell_h - 1), (x0 + cell_w - 6, y0 + cell_h - 1)], fill=RULE)
        _draw_thumb(sheet, draw, entry, (x0 + pad, y0 + pad), thumb_size, fonts)
        tx, ty = x0 + pad + thumb_size + pad, y0 + pad
        name = _ellipsis(probe, shown_names[entry.path], fonts["bold"], text_width)
        draw.text((tx, ty), name, font=fonts["bold"], fill=INK if entry.ok else ERROR_INK)
        ty += line + 2
        for note in _card_notes(entry):
            colour = ERROR_INK if note.startswith("conflict") else GREY
            draw.text((tx, ty), _ellipsis(probe, note, fonts["small"], text_width), font=fonts["small"], fill=colour)
            ty += line
        if not entry.ok:
            for text in _wrap(probe, f"unreadable ({entry.error_type}): {entry.error}", fonts["regular"], text_width)[:7]:
                draw.text((tx, ty), text, font=fonts["regular"], fill=ERROR_INK)
                ty += line
            continue
        for attr in names:
            tags, review = entry.tags[attr], entry.review[attr]
            draw.text((tx, ty + 1), attr, font=fonts["small"], fill=GREY)
            x = tx + attr_width
            if not tags:  # out of the attribute's scope
                draw.text((x, ty), "–", font=fonts["regular"], fill=GREY)
                ty += line
                continue
            label, score = tags[0]
            font, colour = (fonts["italic"], GREY) if review else (fonts["bold"], INK)
            shown = f"{label}?" if review else label
            draw.text((x, ty), shown, font=font, fill=colour)
            x += probe.textlength(shown, font=font) + 5
            draw.text((x, ty), f"{score:.2f}", font=fonts["regular"], fill=colour)
            x += probe.textlength(f"{score:.2f}", font=fonts["regular"]) + 14
            alternatives = "   ".join(f"{l} {s:.2f}" for l, s in tags[1:])
            if alternatives:
                room = tx + text_width - x
                draw.text((x, ty + 1), _ellipsis(probe, alternatives, fonts["small"], room), font=fonts["small"], fill=GREY)
            ty += line
    buffer = io.BytesIO()
    sheet.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def _draw_thumb(sheet, draw, entry: ImagePrediction, origin: tuple[int, int], size: int, fonts) -> None:
    from PIL import Image

    x, y = origin
    if entry.thumb is not None:
        image = Image.fromarray(entry.thumb)
        sheet.paste(image, (x + (size - image.width) // 2, y + (size - image.height) // 2))
        draw.rectangle([x - 1, y - 1, x + size, y + size], outline=RULE)
        return
    fill, ink, text = ((253, 236, 236), ERROR_INK, "unreadable") if not entry.ok else ((242, 242, 244), GREY, "no preview")
    draw.rectangle([x, y, x + size - 1, y + size - 1], fill=fill, outline=ink)
    draw.line([(x + 8, y + 8), (x + size - 9, y + size - 9)], fill=ink, width=2)
    draw.line([(x + size - 9, y + 8), (x + 8, y + size - 9)], fill=ink, width=2)
    width = draw.textlength(text, font=fonts["bold"])
    box = (x + (size - width) / 2 - 4, y + size / 2 - 11, x + (size + width) / 2 + 4, y + size / 2 + 11)
    draw.rectangle(box, fill=fill)
    draw.text((x + (size - width) / 2, y + size / 2 - 8), text, font=fonts["bold"], fill=ink)


def _ellipsis(draw, text: str, font, width: float) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…" if text else ""


def _wrap(draw, text: str, font, width: float) -> list[str]:
    """Greedy word wrap; a word longer than the line (a path) is cut into pieces."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        while draw.textlength(word, font=font) > width:
            cut = len(word)
            while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                cut -= 1
            if current:
                lines.append(current)
                current = ""
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font) <= width:
            current = candidate
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    return lines


# ---------------------------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; margin: 24px; color: #19191c; }
h1 { font-size: 20px; margin: 0 0 4px; }
p.meta, p.legend { color: #6e6e73; font-size: 13px; margin: 2px 0; }
table { border-collapse: collapse; margin-top: 16px; }
th, td { border-bottom: 1px solid #e4e4e8; padding: 6px 10px; text-align: left; vertical-align: top; font-size: 13px; }
th { position: sticky; top: 0; background: #f7f7f9; font-weight: 600; }
td.thumb { width: THUMBpx; height: THUMBpx; text-align: center; vertical-align: middle; }
td.thumb img { max-width: THUMBpx; max-height: THUMBpx; }
td.file { max-width: 220px; word-break: break-all; }
td.file .dir { color: #8e8e93; font-size: 11px; }
.top { font-weight: 600; }
.low { color: #8e8e93; font-style: italic; font-weight: normal; }
.score { color: #48484d; font-variant-numeric: tabular-nums; }
.low + .score { color: #8e8e93; }
.alt { color: #8e8e93; font-size: 11.5px; margin-top: 2px; }
tr.error td.err { color: #b22222; }
td.file .note { color: #48484d; font-size: 11.5px; margin-top: 2px; word-break: normal; }
td.file .conflict, .conflict { color: #b22222; font-size: 11.5px; margin-top: 2px; }
div.noimg { width: THUMBpx; height: THUMBpx; line-height: THUMBpx; background: #fdecec; color: #b22222; border: 1px solid #b22222; }
"""


def _thumb_data_uri(thumb: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(thumb).save(buffer, "JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def gallery_html(bundle: ModelBundle, results: Sequence[ImagePrediction], *, thumb_size: int = 160) -> str:
    """One self-contained HTML page: a row per image, a column per attribute; nothing loaded from outside."""
    e = html.escape
    title, meta = _describe(bundle, results)
    names = [a.name for a in bundle.attributes]
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        f"<style>{_CSS.replace('THUMB', str(thumb_size))}</style>",
        "</head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="meta">{e(meta)}</p>',
        f'<p class="legend">{e(_legend(results))}</p>',
        "<table><thead><tr><th>image</th><th>file</th>" + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr></thead><tbody>",
    ]
    shown_names = display_names([r.path for r in results])
    for entry in results:
        name = shown_names[entry.path]
        folder = os.path.dirname(os.path.abspath(entry.path))
        notes = "".join(f'<div class="{"conflict" if n.startswith("conflict") else "note"}">{e(n)}</div>' for n in _card_notes(entry))
        file_cell = f'<td class="file">{e(name)}<div class="dir">{e(folder)}</div>{notes}</td>'
        if entry.thumb is not None:
            thumb = f'<td class="thumb"><img alt="{e(name)}" src="{_thumb_data_uri(entry.thumb)}"></td>'
        else:
            thumb = f'<td class="thumb"><div class="noimg">{"unreadable" if not entry.ok else "no preview"}</div></td>'
        if not entry.ok:
            out.append(
                f'<tr class="error">{thumb}{file_cell}<td class="err" colspan="{len(names)}">'
                f"unreadable ({e(entry.error_type or '')}): {e(entry.error or '')}</td></tr>"
            )
            continue
        cells = []
        for attr in names:
            if not entry.tags[attr]:  # out of the attribute's scope
                cells.append('<td><span class="score" title="out of this attribute\'s scope">–</span></td>')
                continue
            (label, score), rest = entry.tags[attr][0], entry.tags[attr][1:]
            low = entry.review[attr]
            top = (f'<span class="top low" title="under the review threshold ({entry.threshold[attr]:.2f})">{e(label)}?</span>' if low
                   else f'<span class="top">{e(label)}</span>')
            alt = "<br>".join(f"{e(l)} {s:.2f}" for l, s in rest)
            clash = "".join(f'<div class="conflict">{e(_conflict_text(c))}</div>' for c in entry.conflict if c["attribute"] == attr)
            cells.append(f'<td>{top} <span class="score">{score:.2f}</span>' + (f'<div class="alt">{alt}</div>' if alt else "") + clash + "</td>")
        out.append(f"<tr>{thumb}{file_cell}{''.join(cells)}</tr>")
    out += ["</tbody></table>", "</body></html>", ""]
    return "\n".join(out)


def page_names(out: str, pages: int) -> list[str]:
    """``sheet.png`` -> ``[sheet.png, sheet-2.png, ...]``."""
    stem, ext = os.path.splitext(out)
    return [out] + [f"{stem}-{k}{ext}" for k in range(2, pages + 1)]


def table_path(out: str) -> str:
    return os.path.splitext(out)[0] + ".parquet"

