import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from tagger.demo.drawn import (
    ARTICLES,
    ATTRIBUTES,
    CLASSES,
    COLOURS,
    STYLES_HEADER,
    DemoDataset,
    make_demo_dataset,
    render_product,
)

KAGGLE_HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"
SMALL = dict(n_train=60, n_catalog=10)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _decode(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im.copy()


def _foreground(img: Image.Image, thresh: int = 252) -> np.ndarray:
    a = np.asarray(img, dtype=np.float64).reshape(-1, 3)
    return a[a.min(axis=1) < thresh]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> DemoDataset:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), **SMALL, seed=0)


def test_layout_and_kaggle_header(small):
    assert small.styles_csv == small.root / "styles.csv"
    assert small.images_dir == small.root / "images"
    assert small.catalog == small.root / "catalog.csv"
    assert small.catalog_truth == small.root / "catalog_truth.csv"
    for p in (small.styles_csv, small.catalog, small.catalog_truth):
        assert p.is_file()
    assert small.styles_csv.read_text(encoding="utf-8").splitlines()[0] == KAGGLE_HEADER
    assert ",".join(STYLES_HEADER) == KAGGLE_HEADER
    assert tuple(ATTRIBUTES) == ("gender", "masterCategory", "subCategory", "articleType", "baseColour",
                                 "season", "usage")


def test_styles_rows_and_images(small):
    rows = _rows(small.styles_csv)
    assert len(rows) == SMALL["n_train"]
    ids = [int(r["id"]) for r in rows]
    assert len(set(ids)) == len(ids)
    assert {p.name for p in small.images_dir.iterdir()} == {f"{i}.jpg" for i in ids}
    for r in rows:
        assert 2011 <= int(r["year"]) <= 2018
        assert r["baseColour"] in r["productDisplayName"] and r["articleType"] in r["productDisplayName"]
        path = small.images_dir / f"{r['id']}.jpg"
        assert path.read_bytes()[:3] == b"\xff\xd8\xff"
        img = _decode(path)
        assert img.mode == "RGB" and img.size == (120, 160)
        # Product photo convention: white background in the corners.
        corners = np.asarray(img)[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert corners.min() >= 235


def test_names_with_commas_survive_csv(small):
    rows = _rows(small.styles_csv)
    assert any("," in r["productDisplayName"] for r in rows)
    assert all(len(r) == len(STYLES_HEADER) and None not in r for r in rows)


def test_labels_are_in_the_declared_vocabulary_and_hierarchy(small):
    assert set(CLASSES) == set(ATTRIBUTES)
    for rows in (_rows(small.styles_csv), _rows(small.catalog_truth)):
        for r in rows:
            for a in ATTRIBUTES:
                assert r[a] in CLASSES[a], (a, r[a])
            master, sub = ARTICLES[r["articleType"]][:2]
            assert (r["masterCategory"], r["subCategory"]) == (master, sub)


def test_small_training_set_still_has_every_class(small):
    rows = _rows(small.styles_csv)
    for a in ATTRIBUTES:
        assert {r[a] for r in rows} == set(CLASSES[a]), a


def test_catalog_and_truth(small):
    cat = _rows(small.catalog)
    assert list(cat[0]) == ["product_id", "image"]
    assert len(cat) == SMALL["n_catalog"] + 2
    train_ids = {r["id"] for r in _rows(small.styles_csv)}
    cat_ids = [r["product_id"] for r in cat]
    assert not train_ids & set(cat_ids)
    assert len(set(cat_ids)) == len(cat_ids)

    good, bad = cat[:-2], cat[-2:]
    for r in cat:
        assert not Path(r["image"]).is_absolute() and r["image"].startswith("catalog_images/")
    for r in good:
        img = _decode(small.catalog.parent / r["image"])
        assert img.mode == "RGB" and img.size == (120, 160)

    truth = _rows(small.catalog_truth)
    assert list(truth[0]) == ["product_id", *ATTRIBUTES]
    assert [r["product_id"] for r in truth] == [r["product_id"] for r in good]


def test_bad_catalog_rows(small, monkeypatch):
    missing, corrupt = (small.catalog.parent / r["image"] for r in _rows(small.catalog)[-2:])
    assert not missing.exists()
    assert corrupt.is_file() and 0 < corrupt.stat().st_size <= 200
    # Stays undecodable even for a reader that tolerates truncated images.
    for tolerant in (False, True):
        monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", tolerant)
        with pytest.raises(OSError):
            _decode(corrupt)


@pytest.mark.parametrize("n_bad", [0, 1, 3])
def test_n_bad(tmp_path, n_bad):
    ds = make_demo_dataset(tmp_path, n_train=20, n_catalog=3, n_bad=n_bad)
    cat = _rows(ds.catalog)
    assert len(cat) == 3 + n_bad
    assert len(_rows(ds.catalog_truth)) == 3
    exists = [(ds.root / r["image"]).exists() for r in cat[3:]]
    assert exists == [k % 2 == 1 for k in range(n_bad)]


def test_image_size_is_width_by_height(tmp_path):
    ds = make_demo_dataset(tmp_path, n_train=5, n_catalog=1, image_size=(96, 128), n_bad=0)
    for p in [*ds.images_dir.iterdir(), *(ds.root / "catalog_images").iterdir()]:
        assert _decode(p).size == (96, 128)


def test_same_seed_gives_identical_bytes(tmp_path, small):
    again = make_demo_dataset(tmp_path / "again", **SMALL, seed=0)
    assert _tree_bytes(again.root) == _tree_bytes(small.root)


def test_different_seed_differs(tmp_path, small):
    other = make_demo_dataset(tmp_path / "other", **SMALL, seed=1)
    assert other.styles_csv.read_bytes() != small.styles_csv.read_bytes()
    a, b = _tree_bytes(small.images_dir), _tree_bytes(other.images_dir)
    assert sorted(a.values()) != sorted(b.values())


def test_red_products_are_red_and_blue_ones_blue(small):
    rows = _rows(small.styles_csv)
    means = {}
    for colour in ("Red", "Blue"):
        pix = [_foreground(_decode(small.images_dir / f"{r['id']}.jpg"), thresh=200)
               for r in rows if r["baseColour"] == colour]
        assert pix, colour
        means[colour] = np.concatenate(pix).mean(axis=0)
    red, blue = means["Red"], means["Blue"]
    assert red[0] > red[2] + 40 and red[0] > red[1] + 40
    assert blue[2] > blue[0] + 40
    assert red[0] > blue[0] and blue[2] > red[2]


@pytest.mark.parametrize("article", ["Tshirts", "Shirts", "Jeans", "Dresses", "Handbags", "Caps"])
def test_most_of_the_product_is_its_base_colour(article):
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=np.float64)
    master, sub, _, genders, usages = ARTICLES[article]
    for k, colour in enumerate(names):
        for season in CLASSES["season"]:
            labels = dict(gender=list(genders)[k % len(genders)], masterCategory=master, subCategory=sub,
                          articleType=article, baseColour=colour, season=season,
                          usage=list(usages)[k % len(usages)])
            fg = _foreground(render_product(labels, (120, 160), seed=k))
            nearest = ((fg[:, None, :] - palette[None]) ** 2).sum(axis=2).argmin(axis=1)
            assert names[np.bincount(nearest, minlength=len(names)).argmax()] == colour, (colour, season)


@pytest.mark.parametrize("attribute", ["gender", "season", "usage"])
def test_every_label_changes_the_picture(attribute):
    """Each option of a non-article attribute draws differently, so it can be learned."""
    for article, (master, sub, _, genders, usages) in ARTICLES.items():
        options = {"gender": list(genders), "season": list(CLASSES["season"]), "usage": list(usages)}[attribute]
        base = dict(gender=list(genders)[0], masterCategory=master, subCategory=sub, articleType=article,
                    baseColour="Green", season="Summer", usage=list(usages)[0])
        images = [np.asarray(render_product({**base, attribute: o}, (120, 160), seed=3)) for o in options]
        for i in range(len(images)):
            for j in range(i + 1, len(images)):
                diff = np.abs(images[i].astype(int) - images[j].astype(int)).max(axis=2) > 40
                assert diff.mean() > 0.005, (article, options[i], options[j])


def test_rejects_bad_counts(tmp_path):
    with pytest.raises(ValueError):
        make_demo_dataset(tmp_path, n_train=0)


def test_demo_check_scores_only_known_truth_and_counts_untagged_as_wrong(tmp_path):
    import polars as pl

    from tagger.attributes import ATTRIBUTES
    from tagger.demo.drawn import score_against_truth

    truth = tmp_path / "truth.csv"
    header = ",".join(["product_id", *ATTRIBUTES])
    truth.write_text(
        f"{header}\n"
        "p1,Men,Apparel,Topwear,Tshirts,Black,Summer,Casual\n"
        "p2,Women,Apparel,Topwear,Tops,White,,\n"  # no true season or usage: not scored there
        "p3,Men,Footwear,Shoes,Casual Shoes,Brown,Fall,Casual\n"  # never tagged: wrong everywhere
    )
    predicted = {
        "p1": ["Men", "Apparel", "Topwear", "Tshirts", "Black", "Winter", "Casual"],
        "p2": ["Women", "Apparel", "Topwear", "Tops", "White", "Summer", "Sports"],
    }
    tags = pl.DataFrame({"product_id": list(predicted), **{a: [v[i] for v in predicted.values()] for i, a in enumerate(ATTRIBUTES)}})
    scores = score_against_truth(tags, truth)
    assert scores["gender"] == pytest.approx(2 / 3)
    assert scores["season"] == pytest.approx(0 / 2)  # p1 wrong, p3 untagged; p2 has no true season
    assert scores["usage"] == pytest.approx(1 / 2)
    assert scores["all"] == pytest.approx(1 / 3)  # p2: every attribute it has is right


def test_the_committed_demo_catalog_comes_from_the_shipped_models_test_split():
    """make tag's figures are honest only if the demo photos were never trained or calibrated on."""
    import csv
    from pathlib import Path

    from tagger.data.split import read_split

    root = Path(__file__).resolve().parent.parent
    split = read_split(str(root / "models" / "fashion-lite0" / "split.parquet"))
    with open(root / "demo" / "catalog.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    products = [r for r in rows if not r["product_id"].startswith("broken-")]
    assert len(products) >= 100 and len(rows) - len(products) == 2
    assert all(split.get(r["product_id"]) == "test" for r in products)
    assert all((root / "demo" / r["image"]).is_file() for r in products)
