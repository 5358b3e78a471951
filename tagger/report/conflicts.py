"""Photos and text that disagree: the night's ``conflict`` column (written by ``tagger tag --text-column``) counted,
and its most confident conflicts, with their thumbnail, the product's text and what each input said.

A conflict's confidence is the lower of the two scores: a title and a photo both sure of different labels is the
case a person should see first (a title pasted on the wrong product, a colour the photo does not show).
Read columnar from the committed partition; the titles of the few products shown are read from the catalog.
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter
from typing import Any

from ..data import manifest as manifests

log = logging.getLogger(__name__)


def conflicts(night: Any, config: Any, batch_rows: int) -> dict[str, Any] | None:
    """``{"rows", "tagged_with_text", "attributes", "top"}``, or None when the night was tagged without text."""
    schema = night.tags_schema()
    if schema is None or "conflict" not in schema.names:
        return None
    rows, with_text, per_attribute = 0, 0, Counter()
    top: list[tuple[float, int, dict[str, Any]]] = []
    seen = 0
    wanted = max(int(getattr(config, "gallery", 0) or 0), 0)
    for batch in night.iter_tags(["product_id", "image", "inputs", "conflict"], batch_rows):
        data = batch.to_pydict()
        for product_id, image, inputs, found in zip(data["product_id"], data["image"], data["inputs"], data["conflict"]):
            with_text += inputs in ("text", "both")
            if not found:
                continue
            rows += 1
            per_attribute.update(c["attribute"] for c in found)
            confidence = max(min(c["photos_score"], c["text_score"]) for c in found)
            seen += 1
            item = (confidence, -seen, {"product_id": product_id, "image": image, "confidence": round(confidence, 4),
                                        "conflicts": found})
            if len(top) < wanted:
                heapq.heappush(top, item)
            elif wanted and item > top[0]:
                heapq.heapreplace(top, item)
    shown = [item for _, _, item in sorted(top, reverse=True)]
    _add_titles(shown, night, config)
    return {"rows": rows, "tagged_with_text": with_text, "attributes": dict(per_attribute.most_common()), "top": shown}


def _add_titles(items: list[dict[str, Any]], night: Any, config: Any) -> None:
    """Each shown product's text, from the catalog's --text-column columns (as the run's summary names them)."""
    arguments = (night.summary or {}).get("arguments") or {}
    columns = list(arguments.get("text_columns") or [])
    catalog = config.catalog or (night.plan or {}).get("catalog")
    if not items or not columns or not catalog:
        return
    id_column = arguments.get("id_column") or "product_id"
    wanted = {item["product_id"]: item for item in items}
    try:
        for batch in manifests.iter_catalog_columns(catalog, [id_column, *columns], fmt=arguments.get("catalog_format"),
                                                    storage_options=config.storage_options):
            data = batch.to_pydict() if hasattr(batch, "to_pydict") else batch
            for i, product_id in enumerate(data[id_column]):
                if product_id in wanted and "text" not in wanted[product_id]:
                    wanted[product_id]["text"] = " | ".join(str(data[c][i]) for c in columns if data[c][i])
    except (manifests.ManifestError, OSError, KeyError) as exc:  # the page still shows both tags without the title
        log.warning("conflicts: the catalog's text could not be read (%s)", exc)


def text_expectations(text: Any, photos: dict[str, dict[str, tuple[float, int]]]) -> dict[str, dict[str, tuple[float, int]]]:
    """What a night tagged with text should look like, from the bundle's text section (its test rows with both
    inputs): the review share is the share under the fused threshold plus the share in conflict; the accuracy is
    the fused one. An attribute the section does not measure keeps the photos' expectation."""
    if not isinstance(text, dict):
        return photos
    metrics = text.get("metrics") or {}
    test, review = metrics.get("test") or {}, metrics.get("test_review_both") or {}
    own = ((metrics.get("test_conflicts") or {}).get("own_titles")) or {}
    out = {a: dict(v) for a, v in photos.items()}
    for attribute, figures in test.items():
        n = int(figures.get("n") or 0)
        if not n or figures.get("both") is None:
            continue
        facts = out.setdefault(attribute, {})
        facts["accuracy"] = (float(figures["both"]), n)
        if attribute in review:
            share = 1.0 - float(review[attribute]["coverage"]) + int(own.get(attribute, 0)) / n
            facts["review_share"] = (min(share, 1.0), n)
    return out
