"""Procedurally drawn demo catalog in the layout of the Kaggle "Fashion Product Images" dataset.

Nothing can be downloaded where the project runs its demo and tests, so this module draws
its own products. Every label follows from something visible in the picture, so a small
CNN at 64-96 px input can learn all seven attributes in a minute or two on CPU:

* articleType (and so subCategory / masterCategory): the silhouette.
* baseColour: the fill colour of the product (White is drawn with a dark outline).
* gender: the cut. Tops and jeans are boxy/straight for Men and tapered for Women;
  shoes are bulky for Men and slim with a raised heel for Women; watches have a wide
  strap and big dial for Men and a thin strap and small dial for Women. Dresses and
  handbags are always Women, caps always Unisex.
* season: the fabric pattern. Summer solid, Winter horizontal stripes (and long
  sleeves on tops), Fall dots, Spring checks.
* usage: Sports items carry a contrasting tick logo (sports watches are digital),
  Formal shirts wear a tie, formal dresses are floor-length gowns with a sash, formal
  handbags are structured with a flap and clasp, formal watches have a gold case.
  Everything else is Casual.

Layout written by :func:`make_demo_dataset`::

    root/styles.csv            Kaggle header, one row per training product
    root/images/<id>.jpg       training images
    root/catalog.csv           product_id,image (image relative to catalog.csv)
    root/catalog_images/       catalog images
    root/catalog_truth.csv     true labels of the good catalog rows

The last ``n_bad`` catalog rows are broken on purpose (a missing file, a truncated JPEG)
so that the tag job's error handling shows up in the demo.

``tagger demo-data ROOT`` writes one from the command line.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..attributes import ATTRIBUTES
from ..data.drawings import ARTICLES, CLASSES, COLOUR_WEIGHTS, COLOURS, SEASON_WEIGHTS, render_product  # noqa: F401 (CLASSES: the demo's label set)

STYLES_HEADER: tuple[str, ...] = (
    "id",
    "gender",
    "masterCategory",
    "subCategory",
    "articleType",
    "baseColour",
    "season",
    "year",
    "usage",
    "productDisplayName",
)


_BRANDS = ("Acme", "Roadster", "Nimbus", "Urban Loom", "Peak", "Northwind", "Tern", "Kite & Co")
_COMMA_BRAND = "Stitch, Inc."  # a few names with commas so CSV quoting gets exercised


@dataclass(frozen=True)
class DemoDataset:
    root: Path
    styles_csv: Path
    images_dir: Path
    catalog: Path
    catalog_truth: Path


def make_demo_dataset(
    root: str | Path,
    n_train: int = 1200,
    n_catalog: int = 200,
    seed: int = 0,
    image_size: tuple[int, int] = (120, 160),
    n_bad: int = 2,
) -> DemoDataset:
    """Write a demo dataset under ``root`` and return its paths.

    ``image_size`` is (width, height). The same arguments always give byte-identical files.
    From ``n_train >= 18`` on, every class of every attribute appears in styles.csv.
    Existing files in ``root`` are overwritten but never deleted.
    """
    if n_train < 1 or n_catalog < 0 or n_bad < 0:
        raise ValueError("n_train must be >= 1, n_catalog and n_bad >= 0")
    root = Path(root)
    ds = DemoDataset(
        root=root,
        styles_csv=root / "styles.csv",
        images_dir=root / "images",
        catalog=root / "catalog.csv",
        catalog_truth=root / "catalog_truth.csv",
    )
    cat_dir = root / "catalog_images"
    ds.images_dir.mkdir(parents=True, exist_ok=True)
    cat_dir.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    n_total = n_train + n_catalog + n_bad
    ids = rng.choice(np.arange(10000, 10000 + max(60000, 3 * n_total)), n_total, replace=False)
    ids = [int(i) for i in ids]
    train_ids, cat_ids, bad_ids = ids[:n_train], ids[n_train:n_train + n_catalog], ids[n_train + n_catalog:]

    train_labels = _cover_labels(min(n_train, 18)) + [_sample_labels(rng) for _ in range(n_train - min(n_train, 18))]
    train_labels = [train_labels[i] for i in rng.permutation(n_train)]
    cat_labels = [_sample_labels(rng) for _ in range(n_catalog)]

    with open(ds.styles_csv, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(STYLES_HEADER)
        for row, (pid, lab) in enumerate(zip(train_ids, train_labels)):
            brand = _COMMA_BRAND if row % 50 == 7 else _BRANDS[int(rng.integers(len(_BRANDS)))]
            name = f"{brand} {lab['gender']} {lab['baseColour']} {lab['articleType']}"
            year = int(rng.integers(2011, 2019))
            w.writerow([pid, lab["gender"], lab["masterCategory"], lab["subCategory"], lab["articleType"],
                        lab["baseColour"], lab["season"], year, lab["usage"], name])

    size = (int(image_size[0]), int(image_size[1]))
    for pid, lab in zip(train_ids, train_labels):
        render_product(lab, size, seed=(seed, pid)).save(ds.images_dir / f"{pid}.jpg", "JPEG", quality=90)

    rows: list[tuple[int, str]] = []
    for pid, lab in zip(cat_ids, cat_labels):
        rel = f"catalog_images/{pid}.jpg"
        render_product(lab, size, seed=(seed, pid)).save(root / rel, "JPEG", quality=90)
        rows.append((pid, rel))

    for k, pid in enumerate(bad_ids):
        rel = f"catalog_images/{pid}.jpg"
        path = root / rel
        if k % 2 == 0:
            path.unlink(missing_ok=True)
        else:
            # A download cut short: 200 bytes end inside the JPEG header, so no reader can decode it,
            # not even one that sets ImageFile.LOAD_TRUNCATED_IMAGES.
            buf = io.BytesIO()
            render_product(_sample_labels(rng), size, seed=(seed, pid)).save(buf, "JPEG", quality=90)
            path.write_bytes(buf.getvalue()[:200])
        rows.append((pid, rel))

    with open(ds.catalog, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("product_id", "image"))
        w.writerows(rows)

    with open(ds.catalog_truth, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("product_id", *ATTRIBUTES))
        for pid, lab in zip(cat_ids, cat_labels):
            w.writerow((pid, *(lab[a] for a in ATTRIBUTES)))

    return ds


# --------------------------------------------------------------------------- labels

def _labels(article: str, gender: str, colour: str, season: str, usage: str) -> dict[str, str]:
    master, sub = ARTICLES[article][:2]
    return {"gender": gender, "masterCategory": master, "subCategory": sub, "articleType": article,
            "baseColour": colour, "season": season, "usage": usage}


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _sample_labels(rng: np.random.Generator) -> dict[str, str]:
    article = _pick(rng, {a: v[2] for a, v in ARTICLES.items()})
    _, _, _, genders, usages = ARTICLES[article]
    return _labels(article, _pick(rng, genders), _pick(rng, COLOUR_WEIGHTS), _pick(rng, SEASON_WEIGHTS),
                   _pick(rng, usages))


def _cover_labels(n: int) -> list[dict[str, str]]:
    """Rows that together hit every class, so even a tiny training set has all of them."""
    articles, colours, seasons = list(ARTICLES), list(COLOURS), list(SEASON_WEIGHTS)
    out = []
    for i in range(n):
        article = articles[i % len(articles)]
        genders, usages = list(ARTICLES[article][3]), list(ARTICLES[article][4])
        turn = i // len(articles) + i
        out.append(_labels(article, genders[turn % len(genders)], colours[i % len(colours)],
                           seasons[i % len(seasons)], usages[turn % len(usages)]))
    return out


def score_against_truth(tags, truth_csv: str | Path) -> dict[str, float]:
    """Share of catalog products whose predicted label equals the true one, per attribute, plus
    ``all``: the share with every attribute right. ``tags`` is a polars frame of the tags table.

    A product without a true value for an attribute (real catalogs leave season or usage empty) is
    left out of that attribute's share, and ``all`` asks only for the attributes it has; a product
    that was not tagged at all counts as wrong everywhere.

    The attributes are the truth file's columns that the tags table has too (the bundle's attributes, whatever
    they are); the others are not scored."""
    import polars as pl

    from ..attributes import FIXED_COLUMNS

    header = pl.read_csv(truth_csv, n_rows=0).columns
    attributes = [c for c in header if c in tags.columns and c not in FIXED_COLUMNS]
    if not attributes:
        raise ValueError(f"{truth_csv}: none of its columns ({', '.join(header)}) is an attribute of the tags "
                         f"({', '.join(c for c in tags.columns if f'{c}_score' in tags.columns)})")
    truth = pl.read_csv(truth_csv, schema_overrides={name: pl.String for name in ("product_id", *attributes)})
    joined = truth.join(tags.select("product_id", *attributes), on="product_id", how="left", suffix="_predicted")
    scores = {}
    every = pl.lit(True)
    for name in attributes:
        right = (pl.col(name) == pl.col(f"{name}_predicted")).fill_null(False)
        known = pl.col(name).is_not_null()
        scores[name] = float(joined.filter(known).select(right.mean()).item())
        every = every & (right | ~known)
    scores["all"] = float(joined.select(every.mean()).item())
    return scores
