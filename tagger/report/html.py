"""The morning page: one self-contained HTML file. Charts are inline SVG, thumbnails embedded JPEG data: URIs,
no script and nothing fetched, so it reads the same from a mail attachment, an S3 console or a file:// URL."""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from .. import storage
from .config import EDGE_LABELS, ReportConfig
from .load import Night
from .verdict import RANK

log = logging.getLogger("tagger.report")
e = html.escape

NOW, BEFORE, ALERT = "#2f6fb0", "#c4c9d0", "#c0392b"

_CSS = """
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f; margin: 0; background: #f5f6f8; }
main { max-width: 1180px; margin: 0 auto; padding: 20px 24px 40px; }
h1 { font-size: 22px; margin: 0 0 4px; } main > h3 { margin-top: 16px; } h2 { font-size: 17px; margin: 28px 0 10px; } h3 { font-size: 15px; margin: 0 0 6px; }
p.meta { color: #555; margin: 0 0 14px; overflow-wrap: anywhere; }
.banner { padding: 10px 14px; border-radius: 6px; margin: 12px 0; }
.banner.bad { background: #fdecea; border: 1px solid #e6b0aa; } .banner.ok { background: #eaf6ec; border: 1px solid #b5dcbc; }
.banner.note { background: #fff8e1; border: 1px solid #f0d58c; }
.banner ul { margin: 4px 0 0 18px; padding: 0; }
.wide { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; background: #fff; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 9px; border-bottom: 1px solid #e3e5e8; text-align: right; vertical-align: top; white-space: nowrap; }
td.text { white-space: normal; }
th { background: #eef0f3; font-weight: 600; white-space: normal; } th:first-child, td:first-child, td.text, th.text { text-align: left; }
td.up { color: #a04000; } td.down { color: #1f618d; } td.alert, span.alert { color: #c0392b; font-weight: 600; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(520px, 100%), 1fr)); gap: 14px; }
.card { background: #fff; border: 1px solid #dde0e4; border-radius: 6px; padding: 12px 14px; min-width: 0; }
.card svg { max-width: 100%; height: auto; display: block; }
.card p { margin: 6px 0 0; font-size: 13px; overflow-wrap: anywhere; }
.legend span { display: inline-block; width: 11px; height: 11px; margin: 0 4px -1px 10px; border-radius: 2px; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(170px, 100%), 1fr)); gap: 10px; }
.thumb { background: #fff; border: 1px solid #dde0e4; border-radius: 6px; padding: 8px; font-size: 12.5px; min-width: 0; overflow-wrap: anywhere; }
.thumb img, .thumb .noimg { width: 100%; max-width: THUMBpx; aspect-ratio: 1; display: block; margin: 0 auto 6px; object-fit: contain; }
.thumb .noimg { background: #fdecea; color: #b22222; display: flex; align-items: center; justify-content: center; }
.thumb b { font-size: 13px; } .thumb .pair { margin-top: 2px; } .thumb s { color: #777; }
footer { margin-top: 30px; color: #666; font-size: 12.5px; overflow-wrap: anywhere; }
code { font-size: 12.5px; }
details { margin: 10px 0; } summary { cursor: pointer; color: #333; }
"""


def _pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value * 100:.{digits}f} %"


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _signed(value: float | None, pct: bool = False) -> str:
    if value is None:
        return ""
    return f"{value * 100:+.1f} pt" if pct else f"{value:+,}"


def _delta_cell(value: Any, pct: bool = False) -> str:
    if value is None or value == 0:
        return '<td></td>' if value is None else '<td>±0</td>'
    return f'<td class="{"up" if value > 0 else "down"}">{_signed(value, pct)}</td>'


def mix_svg(now: dict[str, int], before: dict[str, int] | None, top: int = 10, width: int = 500) -> str:
    """Horizontal bars: tonight's share of the most frequent labels (either night), the night before's beneath."""
    n = sum(now.values()) or 1
    m = sum((before or {}).values()) or 1
    labels = sorted(set(now) | set(before or {}), key=lambda x: (-max(now.get(x, 0) / n, (before or {}).get(x, 0) / m), x))
    shown, rest = labels[:top], labels[top:]
    row, left, right = 24 if before else 18, 150, 100
    height = row * len(shown) + (18 if rest else 4)
    scale = max([now.get(x, 0) / n for x in shown] + [(before or {}).get(x, 0) / m for x in shown] + [1e-9])
    bar = width - left - right
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'role="img" font-size="12" font-family="system-ui, sans-serif">']
    for i, label in enumerate(shown):
        y = i * row + 2
        p = now.get(label, 0) / n
        name = label if len(label) <= 22 else label[:21] + "…"
        parts.append(f'<text x="{left - 6}" y="{y + 11}" text-anchor="end">{e(name)}<title>{e(label)}</title></text>')
        parts.append(f'<rect x="{left}" y="{y + 1}" width="{bar * p / scale:.1f}" height="11" fill="{NOW}"/>')
        text = f"{p * 100:.1f} %"
        if before is not None:
            q = before.get(label, 0) / m
            parts.append(f'<rect x="{left}" y="{y + 13}" width="{bar * q / scale:.1f}" height="6" fill="{BEFORE}"/>')
            text += f" ({(p - q) * 100:+.1f})" if abs(p - q) >= 0.0005 else ""
        parts.append(f'<text x="{left + bar * p / scale + 4:.1f}" y="{y + 11}" fill="#333">{e(text)}</text>')
    if rest:
        share = sum(now.get(x, 0) for x in rest) / n
        parts.append(f'<text x="{left}" y="{height - 4}" fill="#666">+ {len(rest)} more labels, {share * 100:.1f} % together</text>')
    parts.append("</svg>")
    return "".join(parts)


def histogram_svg(now: Sequence[int], before: Sequence[int] | None, threshold: float | None, width: int = 500, height: int = 130) -> str:
    """Score histogram (share of tags per 0.05 bin): tonight as bars, the night before as an outline, the review
    threshold as a dashed red line."""
    left, bottom, top = 34, 20, 18
    plot_w, plot_h = width - left - 8, height - bottom - top
    total_now = sum(now) or 1
    total_before = sum(before or []) or 1
    shares_now = [v / total_now for v in now]
    shares_before = [v / total_before for v in before] if before is not None else []
    peak = max(shares_now + shares_before + [1e-9])
    bins = len(now)
    w = plot_w / bins
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'role="img" font-size="11" font-family="system-ui, sans-serif">',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#888"/>']
    for i, share in enumerate(shares_now):
        h = plot_h * share / peak
        parts.append(f'<rect x="{left + i * w + 1:.1f}" y="{top + plot_h - h:.1f}" width="{w - 2:.1f}" height="{h:.1f}" fill="{NOW}" opacity="0.85"/>')
    if shares_before:
        points = []
        for i, share in enumerate(shares_before):
            y = top + plot_h - plot_h * share / peak
            points += [f"{left + i * w:.1f},{y:.1f}", f"{left + (i + 1) * w:.1f},{y:.1f}"]
        parts.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="#7f8c8d" stroke-width="1.6"/>')
    if threshold:  # 0: nothing goes to review, no line to draw
        x = left + plot_w * threshold
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="{ALERT}" stroke-dasharray="4 3" stroke-width="1.5"/>')
        anchor = "end" if threshold > 0.6 else "start"
        parts.append(f'<text x="{x + (-4 if anchor == "end" else 4):.1f}" y="{top - 6}" fill="{ALERT}" text-anchor="{anchor}">review &lt; {threshold:.2f}</text>')
    for tick in EDGE_LABELS:
        x = left + plot_w * tick
        parts.append(f'<text x="{x:.1f}" y="{height - 5}" text-anchor="middle" fill="#555">{tick:g}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + 4}" text-anchor="end" fill="#555">{peak * 100:.0f}%</text>')
    parts.append("</svg>")
    return "".join(parts)


def gallery_items(disagreements: pa.Table, night: Night, config: ReportConfig) -> list[dict[str, Any]]:
    """The products of the most confident disagreements (up to ``config.gallery``), each with its thumbnail,
    read through the tag job's own reader and decoder: a JPEG data: URI, or the error that stopped it."""
    if not config.gallery or disagreements.num_rows == 0:
        return []
    products: dict[str, dict[str, Any]] = {}
    for row in disagreements.slice(0, config.gallery * 8).to_pylist():
        item = products.get(row["product_id"])
        if item is None:
            if len(products) >= config.gallery:
                continue
            item = products[row["product_id"]] = {"product_id": row["product_id"], "image": _first_photo(row["image"], night),
                                                  "pairs": []}
        item["pairs"].append(row)
    base = storage.parent((night.plan or {}).get("catalog") or config.catalog or config.out)
    items = list(products.values())
    http = _http_policy(night)
    with ThreadPoolExecutor(max_workers=8) as pool:
        for item, (uri, error) in zip(items, pool.map(lambda i: _thumbnail(storage.resolve(i["image"], base), config, http), items)):
            item["src"], item["error"] = uri, error
    return items


def conflict_thumbs(items: list[dict[str, Any]], night: Night, config: ReportConfig) -> None:
    """Thumbnails (``src``, or the ``error`` that stopped one) for the conflicts the page shows, as for disagreements."""
    base = storage.parent((night.plan or {}).get("catalog") or config.catalog or config.out)
    http = _http_policy(night)
    with ThreadPoolExecutor(max_workers=8) as pool:
        found = pool.map(lambda i: _thumbnail(storage.resolve(_first_photo(i["image"], night), base), config, http), items)
        for item, (uri, error) in zip(items, found):
            item["src"], item["error"] = uri, error


def _first_photo(image: str, night: Night) -> str:
    """A product tagged from several photos (its image cell joined by the plan's separator) is shown by its first."""
    separator = ((night.plan or {}).get("key") or {}).get("image_separator")
    return image.split(separator)[0].strip() if separator and separator in image else image


def _http_policy(night: Night):
    """The tag run's own ``--allow-host`` policy (its summary's arguments) for http(s) images: the report reads
    no URL the run itself was not allowed to read. None (no http(s) image read) without one."""
    from ..data.http import HttpPolicy, env_http_headers

    arguments = (night.summary or {}).get("arguments") or {}
    if not arguments.get("allow_hosts"):
        return None
    try:
        return HttpPolicy(tuple(arguments["allow_hosts"]), allow_private=bool(arguments.get("allow_private_addresses")),
                          allow_plain_http=bool(arguments.get("allow_plain_http")), headers=env_http_headers())
    except (ValueError, TypeError):
        return None


def _thumbnail(location: str, config: ReportConfig, http=None) -> tuple[str | None, str | None]:
    from PIL import Image

    from ..data.decode import ImageError, decode_image
    from ..data.reader import StorageUnavailable, fetch_image

    try:
        data, _ = fetch_image(location, config.storage_options, http=http)
        pixels = decode_image(data, config.thumb_size, source=location)
    except ImageError as exc:
        return None, exc.error_type
    except StorageUnavailable:
        return None, "storage unavailable"
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), None


def render_page(report: dict[str, Any], gallery: list[dict[str, Any]], config: ReportConfig, mix: dict[str, Any] | None = None) -> str:
    r = report
    date, previous = r["run_date"], r["previous_run_date"]
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>Tagging report run_date={e(date)}</title>", f"<style>{_CSS.replace('THUMB', str(config.thumb_size))}</style>",
           "</head><body><main>", f"<h1>Tagging report · run_date={e(date)}</h1>"]
    compared = (f"compared with the night before, run_date={e(previous)}" if previous
                else "first night: no earlier complete night to compare with")
    computed = f' · computed in {e(r["computed"])}' if r.get("computed") else ""
    out.append(f'<p class="meta">{compared} · run {e(str(r["run_id"]))} · model {e(str(r["model_version"]))}{computed} · '
               f'generated {e(r["generated_at"])} in {r.get("duration_s", 0):.1f} s</p>')
    now, then = r.get("computed"), r.get("previous_computed")
    if now and now.startswith("mixed"):
        out.append(f'<div class="banner note">This night\'s shards were computed in different arithmetic ({e(now)}): fan-out '
                   "tasks ran on different kinds of CPU. Tags may differ in near-ties between shards; pin --precision fp32 "
                   "(or one kind of machine) for one arithmetic.</div>")
    elif previous and now and then and not then.startswith("mixed") and now.split()[-1] != then.split()[-1]:
        # fp32 runtimes agree within float jitter; another precision moves a few near-tie tags (the bundle's precision check counts them)
        out.append(f'<div class="banner note">The arithmetic changed since run_date={e(previous)} ({e(then)} → {e(now)}): a few '
                   "near-tie tags differ without the catalog changing; the bundle's precision check (model.json, precision_checks) "
                   "says how many on its test split.</div>")
    if previous and r["previous_model_version"] and r["previous_model_version"] != r["model_version"]:
        out.append(f'<div class="banner note">The model changed since run_date={e(previous)} ({e(r["previous_model_version"])} → '
                   f'{e(str(r["model_version"]))}): drift below may be the model\'s, not the catalog\'s.</div>')
    out += _verdict(r)
    if r["crossed"]:
        out.append('<div class="banner bad"><b>Thresholds crossed</b><ul>' + "".join(f"<li>{e(c)}</li>" for c in r["crossed"]) + "</ul></div>")
    elif r["thresholds"]:
        checked = ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in r["thresholds"].items())
        out.append(f'<div class="banner ok">No threshold crossed ({e(checked)}).</div>')
    out += _checks(r)
    out += _counts(r)
    out += _overview(r)
    out += _attribute_cards(r, mix or {})
    out += _disagreements(r, gallery)
    out += _conflicts(r)
    files = ", ".join(r.get("files", []))
    out.append(f'<footer>Written by <code>tagger report --out {e(str(r["out"]))} --run-date {e(date)}</code> to '
               f'{e(config.folder)}: {e(files)}. Every figure on this page is in report.json; shares are of the night\'s '
               "tag rows; PSI and Jensen-Shannon distance compare label mixes (docs/morning-report.md).</footer>")
    out += ["</main></body></html>", ""]
    return "\n".join(out)


VERDICT_CLASS = {"ok": "ok", "look": "note", "broken": "bad"}
VERDICT_TEXT = {"ok": "OK: every figure is within what was expected of it",
                "look": "look: a figure is outside what was expected of it",
                "broken": "broken: a figure is far outside what was expected of it, or a threshold was crossed"}


def _verdict(r: dict[str, Any]) -> list[str]:
    v = r.get("verdict")
    if not v:
        return []
    if not v["checks"] and not r["counts"]["rows"]:
        return ['<div class="banner note" id="verdict"><b>Verdict: nothing to check</b>: the night has no rows '
                "(a header-only manifest: no products today).</div>"]
    if not v["checks"]:
        return ['<div class="banner note" id="verdict"><b>Verdict: nothing to check</b>: no figure has an expectation '
                "(the bundle's model.json has no validation figures, or cannot be read, and there is no night before).</div>"]
    items = "".join(f"<li>{e(c['check'])}: {e(c['figure'])}, expected {e(c['expected'])} ({e(c['why'])})</li>"
                    for c in v["not_ok"])
    return [f'<div class="banner {VERDICT_CLASS[v["status"]]}" id="verdict"><b>Verdict: {e(VERDICT_TEXT[v["status"]])}</b>'
            + (f"<ul>{items}</ul>" if items else f' ({len(v["checks"])} checks, below).') + "</div>"]


def _checks(r: dict[str, Any]) -> list[str]:
    v = r.get("verdict")
    if not v or not v["checks"]:
        return []
    rows = "".join(f'<tr><td class="text">{e(c["check"])}</td><td>{e(c["figure"])}</td><td>{e(c["expected"])}</td>'
                   f'<td class="text">{e(c["why"])}</td><td class="{"alert" if c["status"] != "ok" else ""}">{e(c["status"])}</td></tr>'
                   for c in sorted(v["checks"], key=lambda c: -RANK[c["status"]]))  # what is not OK first
    # Folded when every check is OK (the banner says so; a click opens it, no script); open when one is not.
    return [f'<details{"" if v["status"] == "ok" else " open"}><summary><b>Checks</b>: {len(v["checks"])}, each figure beside '
            "what was expected of it: from the bundle's own validation and test split (an interval for tonight's rows), "
            "from the night before, or an explicit threshold</summary>",
            '<div class="wide"><table><tr><th>check</th><th>tonight</th><th class="text">expected</th><th class="text">from</th>'
            f"<th>status</th></tr>{rows}</table></div></details>"]


def _counts(r: dict[str, Any]) -> list[str]:
    now, before, change = r["counts"], r["previous_counts"], r["change"]
    head = "<tr><th></th><th>tonight</th>" + ("<th>night before</th><th>change</th>" if before else "") + "</tr>"
    rows = []
    keys = [("rows", "manifest rows"), ("tagged", "tagged by the model"), ("reused", "reused (--since)"), ("errors", "error rows")]
    for key, name in keys:
        cells = f"<td>{now[key]:,}</td>" + (f"<td>{before[key]:,}</td>{_delta_cell(change.get(key))}" if before else "")
        rows.append(f"<tr><td>{name}</td>{cells}</tr>")
    types = sorted(set(now["error_types"]) | set((before or {}).get("error_types", {})))
    for t in types:
        cells = f"<td>{now['error_types'].get(t, 0):,}</td>" + (
            f"<td>{before['error_types'].get(t, 0):,}</td>{_delta_cell(change['error_types'].get(t))}" if before else "")
        rows.append(f'<tr><td>&nbsp;&nbsp;{e(t)}</td>{cells}</tr>')
    photos = now.get("photo_errors")
    if photos is not None:
        past = (before or {}).get("photo_errors") or {}
        for t in sorted(set(photos) | set(past)):
            cells = f"<td>{photos.get(t, 0):,}</td>" + (
                f"<td>{past.get(t, 0):,}</td>{_delta_cell(photos.get(t, 0) - past.get(t, 0))}" if before else "")
            rows.append(f'<tr><td>photos not read: {e(t)}</td>{cells}</tr>')
    review = f"<td>{_pct(now['review_share'])}</td>" + (
        f"<td>{_pct(before['review_share'])}</td>" + _delta_cell(
            None if now["review_share"] is None or before["review_share"] is None else now["review_share"] - before["review_share"], True)
        if before else "")
    rows.append(f"<tr><td>tags with an attribute to review</td>{review}</tr>")
    return ["<h2>Counts</h2>", f'<div class="wide"><table>{head}{"".join(rows)}</table></div>']


def _table(head: list[str], rows: list[str]) -> str:
    return '<div class="wide"><table><tr>' + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>" + "".join(rows) + "</table></div>"


def _overview(r: dict[str, Any]) -> list[str]:
    """Per attribute, three narrow tables rather than one wide one (a table wider than a 1,200 px page is cut in
    screenshots, PDFs and mail): the label mix and its drift; review share and scores; agreement with the catalog."""
    previous = r["previous_run_date"]
    limits = r["thresholds"]
    tag_rows = max(1, r["counts"]["tagged"] + r["counts"]["reused"])
    mix, review, agreement = [], [], []
    for a, f in r["attributes"].items():
        top = f["top_labels"][0] if f["top_labels"] else None
        cells = [f"<td>{e(a)}</td>", f"<td>{f['labels']}</td>",
                 f'<td class="text">{e(top["label"]) + " " + _pct(top["rows"] / tag_rows, 0) if top else "–"}</td>']
        if previous:
            d = f["drift"]
            if d is None:
                cells.append('<td colspan="4" class="text">not tagged the night before</td>')
            else:
                beyond = d.get("beyond_noise", True)
                js_bad = beyond and ("max_drift" not in limits or d["js_distance"] > limits["max_drift"])
                psi_bad = beyond and "max_psi" in limits and d["psi"] > limits["max_psi"]
                cells.append(f'<td class="{"alert" if js_bad else ""}">{_num(d["js_distance"])}</td>')
                cells.append(f"<td>{_num(d.get('js_noise_floor'))}</td>")
                cells.append(f'<td class="{"alert" if psi_bad else ""}">{_num(d["psi"])}</td>')
                cells.append(f"<td>{len(d['new_labels'])} / {len(d['vanished_labels'])}</td>")
        mix.append("<tr>" + "".join(cells) + "</tr>")

        expected = (f.get("expected") or {}).get("review_share")
        bad = "max_review_share" in limits and f["review_share"] is not None and f["review_share"] > limits["max_review_share"]
        cells = [f"<td>{e(a)}</td>", f'<td class="{"alert" if bad else ""}">{_pct(f["review_share"])}</td>',
                 f"<td>{_pct(expected['share']) if expected else '–'}</td>"]
        if previous:
            cells.append(f"<td>{_pct(f['previous_review_share'])}</td>")
        cells.append(f"<td>{_num(f['score_mean'], 2)}</td>")
        if previous:
            cells.append(f"<td>{_num(f['previous_score_mean'], 2)}</td>")
        review.append("<tr>" + "".join(cells) + "</tr>")

        g = f["agreement"]
        if g is not None:
            expected = (f.get("expected") or {}).get("accuracy")
            bad = "min_agreement" in limits and g["accuracy"] is not None and g["accuracy"] < limits["min_agreement"]
            past = f.get("previous_agreement") or {}
            cd = f.get("catalog_drift")
            known = g.get("training_split_known")
            cells = [f"<td>{e(a)}</td>", f'<td class="text">{e(g["catalog_column"])}</td>',
                     f'<td class="{"alert" if bad else ""}">{_pct(g["accuracy"])}</td>',
                     f"<td>{g['labelled']:,} ({_pct(g['labelled_share'], 0)})</td>",
                     f"<td>{_pct(g.get('accuracy_new')) if known else '–'}</td>",
                     f"<td>{_pct(expected['share']) if expected else '–'}</td>",
                     f"<td>{(format(g['labelled_in_training_split'], ',') + ' · ' + _pct(g.get('accuracy_in_training_split'))) if known else '–'}</td>",
                     f"<td>{_pct(past.get('accuracy'))}</td>",
                     f'<td class="{"alert" if cd and cd.get("beyond_noise") else ""}">{_num(cd["js_distance"]) if cd else "–"}</td>']
            agreement.append("<tr>" + "".join(cells) + "</tr>")
    out = ["<h2>Attributes</h2>", "<h3>Label mix</h3>",
           _table(["attribute", "labels", "most frequent tag"]
                  + (["Jensen-Shannon", "noise floor", "PSI", "new / vanished"] if previous else []), mix)]
    if previous:
        out.append('<p class="meta">A mix is flagged only past its noise floor: the distance two nights of these row counts '
                   "reach by sampling alone (99.9 % of draws from their pooled mix).</p>")
    out += ["<h3>Review share and scores</h3>",
            _table(["attribute", "review share", "expected"] + (["night before"] if previous else []) + ["mean score"]
                   + (["night before"] if previous else []), review)]
    if agreement:
        out += ["<h3>Agreement with the catalog</h3>",
                _table(["attribute", "column", "agrees", "labelled", "new products", "expected", "training split",
                        "night before", "catalog mix moved"], agreement),
                '<p class="meta">new products: those not in the bundle\'s training split (split.parquet), held against its '
                "test accuracy (expected); training split: labelled rows the model was trained on · their agreement. "
                "catalog mix moved: Jensen-Shannon distance of the catalog's own labels from the night before's report.</p>"]
    return out


def _attribute_cards(r: dict[str, Any], mix: dict[str, Any]) -> list[str]:
    previous = r["previous_run_date"]
    legend = (f'<p class="legend"><span style="background:{NOW}"></span>run_date={e(r["run_date"])}'
              + (f'<span style="background:{BEFORE}"></span>run_date={e(previous)} (bars: thin; scores: outline)' if previous else "")
              + "</p>")
    out = ["<h2>Label mix and scores per attribute</h2>", legend, '<div class="grid">']
    for a, f in r["attributes"].items():
        now, before = mix.get(a, ({}, None))
        card = [f'<div class="card"><h3>{e(a)}</h3>', mix_svg(now, before)]
        card.append(histogram_svg(f["score_histogram"], f["previous_score_histogram"], f["review_threshold"]))
        d = f["drift"]
        if d:
            movers = ", ".join(f"{e(m['label'])} {m['previous_share'] * 100:.1f} → {m['share'] * 100:.1f} %" for m in d["movers"][:3])
            card.append(f"<p>Largest movers: {movers or 'none'}.</p>")
            if d["new_labels"]:
                card.append(f"<p>New tonight: {e(', '.join(d['new_labels'][:12]))}{' …' if len(d['new_labels']) > 12 else ''}.</p>")
            if d["vanished_labels"]:
                card.append(f"<p>Vanished: {e(', '.join(d['vanished_labels'][:12]))}{' …' if len(d['vanished_labels']) > 12 else ''}.</p>")
        g = f["agreement"]
        if g and g["confusions"]:
            pairs = ", ".join(f"{e(c['catalog_label'])} → {e(c['tag'])} ({c['rows']})" for c in g["confusions"])
            card.append(f"<p>Most frequent confusions (catalog → tag): {pairs}.</p>")
        card.append("</div>")
        out += card
    out.append("</div>")
    return out


def _disagreements(r: dict[str, Any], gallery: list[dict[str, Any]]) -> list[str]:
    g = r["agreement"]
    if not g:
        return ["<h2>Agreement with the catalog</h2>",
                "<p>The catalog has no label column named like an attribute (or given with --truth-column): nothing to compare.</p>"]
    compared = "; ".join(f"{e(a)} with column <code>{e(c)}</code> ({e((g.get('why') or {}).get(a, g['how']))})"
                         for a, c in g["columns"].items())
    skipped = "; ".join(f"{e(a)}: {e(why)}" for a, why in (g.get("not_compared") or {}).items())
    out = ["<h2>Most confident disagreements with the catalog</h2>",
           f'<p class="meta">Compared: {compared}.' + (f" Not compared: {skipped}." if skipped else "") + "</p>",
           f'<p class="meta">{g["disagreements"]:,} disagreements (catalog label ≠ tag) on the labelled rows of '
           f'{e(str(g["catalog"]))} ({e(g["how"])}); the most confident first: either the tag or the catalog is wrong. '
           f'Table disagreements.parquet holds the top {g["disagreements_written"]:,}.</p>']
    if not gallery:
        out.append("<p>None.</p>")
        return out
    out.append('<div class="gallery">')
    for item in gallery:
        image = (f'<img alt="{e(item["product_id"])}" src="{item["src"]}">' if item.get("src")
                 else f'<div class="noimg">{e(item.get("error") or "no image")}</div>')
        pairs = "".join(f'<div class="pair">{e(p["attribute"])}: <s>{e(p["catalog_label"])}</s> → <b>{e(p["tag"])}</b> '
                        f'{p["score"]:.2f}</div>' for p in item["pairs"][:4])
        out.append(f'<div class="thumb">{image}<b>{e(item["product_id"])}</b>{pairs}</div>')
    out.append("</div>")
    return out


def _conflicts(r: dict[str, Any]) -> list[str]:
    """Photos and text each confident and naming different labels (tagger tag --text-column)."""
    c = r.get("conflicts")
    if not c:
        return []
    per = ", ".join(f"{e(a)} {n:,}" for a, n in c["attributes"].items()) or "none"
    out = ["<h2>Photos and text disagree</h2>",
           f'<p class="meta">{c["rows"]:,} of the {c["tagged_with_text"]:,} products tagged with text have a conflict '
           f"(per attribute: {per}): the photos and the text were each confident and named different labels, so the "
           "attribute went to review. The most confident first: a title on the wrong product, or a colour the photo does "
           "not show. The tags table's <code>conflict</code> column has every one.</p>"]
    if not c["top"]:
        out.append("<p>None.</p>")
        return out
    out.append('<div class="gallery">')
    for item in c["top"]:
        image = (f'<img alt="{e(item["product_id"])}" src="{item["src"]}">' if item.get("src")
                 else f'<div class="noimg">{e(item.get("error") or "no image")}</div>')
        title = f'<div class="pair"><i>{e(item["text"])}</i></div>' if item.get("text") else ""
        pairs = "".join(f'<div class="pair">{e(x["attribute"])}: photos <b>{e(x["photos"])}</b> {x["photos_score"]:.2f} · '
                        f'text <b>{e(x["text"])}</b> {x["text_score"]:.2f}</div>' for x in item["conflicts"][:4])
        out.append(f'<div class="thumb">{image}<b>{e(item["product_id"])}</b>{title}{pairs}</div>')
    out.append("</div>")
    return out
