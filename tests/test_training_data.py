"""Retrain data handling: styles.csv parsing, image matching, rare labels, the stratified split, batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from tagger.attributes import ATTRIBUTES
from tagger.training.datamodule import FashionDataModule, train_transform
from tagger.training.config import RetrainConfig
from tagger.data.kaggle import DataError, load_kaggle, parse_styles
from tagger.data.labels import OTHER, build_vocabularies, encode_targets, fold_rare_labels, resolve_min_label_count
from tagger.data.split import SPLITS, read_split, stratified_split, write_split

HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"
COLOURS = {"Red": (210, 30, 30), "Green": (30, 150, 50), "Blue": (40, 70, 220), "Yellow": (240, 215, 40)}


def write_image(path: Path, colour, size=(24, 32)) -> None:
    Image.new("RGB", size, colour).save(path, "JPEG", quality=95)


def make_kaggle(root: Path, rows: list[list[str]], *, extra_lines: tuple[str, ...] = (), skip_images=(), corrupt=()) -> Path:
    """A Kaggle-layout folder: one solid image per row in the row's baseColour (grey if unknown)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = [HEADER, *(",".join(r) for r in rows), *extra_lines]
    (root / "styles.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for r in rows:
        if r[0] in skip_images:
            continue
        path = root / "images" / f"{r[0]}.jpg"
        if r[0] in corrupt:
            path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        else:
            write_image(path, COLOURS.get(r[5], (128, 128, 128)))
    return root


def row(i: int, colour: str = "Red", gender: str = "Men", season: str = "Summer", usage: str = "Casual", name: str | None = None) -> list[str]:
    return [str(i), gender, "Apparel", "Topwear", "Tshirts", colour, season, "2012", usage, name or f"Brand {colour} Tshirt"]


# --------------------------------------------------------------------------- parsing

def test_parse_repairs_unquoted_commas_in_the_last_column():
    text = "\n".join(
        [
            HEADER,
            "1,Men,Apparel,Topwear,Tshirts,Red,Summer,2012,Casual,Plain name",
            "2,Women,Apparel,Topwear,Tops,Blue,Fall,2013,Casual,Name, with, two commas",  # 12 fields
            "3,Men,Footwear,Shoes,Casual Shoes,Black,Winter,2011,Casual,One, comma",  # 11 fields
            '4,Men,Footwear,Shoes,Heels,Black,Winter,2011,Casual,"Quoted, properly"',
            "5,Men,Apparel,Topwear",  # too few fields: dropped
        ]
    )
    parsed = parse_styles(text.encode())
    table, report = parsed.table, parsed.report
    assert isinstance(table, pl.DataFrame)
    assert table["id"].to_list() == ["1", "2", "3", "4"]
    assert table["productDisplayName"].to_list() == ["Plain name", "Name, with, two commas", "One, comma", "Quoted, properly"]
    assert table["articleType"].to_list() == ["Tshirts", "Tops", "Casual Shoes", "Heels"]
    assert (report.lines, report.parsed, report.repaired, report.malformed) == (5, 4, 2, 1)
    assert report.repaired_lines == [3, 4] and report.malformed_lines == [6]


def test_parse_missing_values_are_unknown_and_duplicates_dropped():
    text = "\ufeff" + "\n".join(
        [
            HEADER,
            "1,Men,Apparel,Topwear,Tshirts,,Summer,,Casual,a",
            "2,Women,Apparel,Topwear,Tshirts,Blue,NA,2012, ,b",
            "2,Women,Apparel,Topwear,Tshirts,Red,Fall,2012,Casual,duplicate",
            ",Men,Apparel,Topwear,Tshirts,Red,Fall,2012,Casual,no id",
            "",
        ]
    )
    parsed = parse_styles(text)
    t = parsed.table
    assert t["baseColour"].to_list() == [None, "Blue"]
    assert t["season"].to_list() == ["Summer", None]
    assert t["usage"].to_list() == ["Casual", None]
    assert parsed.report.duplicate_id == 1 and parsed.report.missing_id == 1
    assert parsed.report.unknown_values["baseColour"] == 1
    vocab = build_vocabularies(t, ATTRIBUTES)
    assert "NA" not in vocab["season"] and "" not in vocab["baseColour"]
    targets = encode_targets(t, vocab)
    assert targets[0, ATTRIBUTES.index("baseColour")] == -1 and targets[1, ATTRIBUTES.index("season")] == -1


def test_parse_rejects_a_file_without_the_kaggle_columns():
    with pytest.raises(DataError, match=r"styles.csv: header lacks column\(s\) baseColour"):
        parse_styles(b"id,gender,masterCategory,subCategory,articleType,season,usage\n1,Men,a,b,c,d,e\n")


def test_load_kaggle_drops_rows_without_image_and_counts_them(tmp_path):
    rows = [row(i, colour) for i, colour in zip(range(1, 7), ["Red", "Green", "Blue", "Yellow", "Red", "Green"])]
    root = make_kaggle(tmp_path / "k", rows, skip_images={"3", "5"}, extra_lines=("7,Men,Apparel,Topwear,Tshirts,Red,Summer,2012,Casual,A, B",))
    write_image(root / "images" / "7.jpg", COLOURS["Red"])
    data = load_kaggle(str(root))
    assert data.table["id"].to_list() == ["1", "2", "4", "6", "7"]
    assert data.table["image"].to_list()[0] == str(root / "images" / "1.jpg")
    assert data.report.missing_image == 2 and data.report.missing_image_ids == ["3", "5"]
    assert data.report.repaired == 1
    assert data.fingerprint.startswith("sha256:") and load_kaggle(str(root)).fingerprint == data.fingerprint
    (root / "images" / "6.jpg").unlink()
    assert load_kaggle(str(root)).fingerprint != data.fingerprint  # the image listing is part of it


def test_load_kaggle_names_the_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"styles.csv: not found. --data must be the folder"):
        load_kaggle(str(tmp_path))


# --------------------------------------------------------------------------- rare labels

def test_min_label_count_auto_scales_with_rows_and_has_a_floor():
    assert resolve_min_label_count("auto", 44_424) == 500
    assert resolve_min_label_count("auto", 4_443) == 51
    assert resolve_min_label_count("auto", 1_200) == 14
    assert resolve_min_label_count("auto", 60) == 5
    assert resolve_min_label_count(3, 10) == 3
    with pytest.raises(ValueError):
        resolve_min_label_count("often", 10)


def test_rare_labels_fold_into_other_or_unknown():
    table = pl.DataFrame(
        {
            "articleType": ["Tshirts"] * 10 + ["Shirts"] * 6 + ["Cufflinks"] * 3 + ["Ties"] * 2 + [None],
            "usage": ["Casual"] * 20 + ["Home", None],
        }
    )
    result = fold_rare_labels(table, ["articleType", "usage"], min_count=5)
    assert result.folded == {"articleType": {"Cufflinks": 3, "Ties": 2}, "usage": {"Home": 1}}
    # 5 folded articleType rows make a learnable Other; a single usage row would not, so it is masked.
    assert result.folded_into == {"articleType": OTHER, "usage": "unknown"}
    assert result.table["articleType"].to_list().count(OTHER) == 5
    assert result.table["usage"].null_count() == 2
    vocab = build_vocabularies(result.table, ["articleType", "usage"])
    assert vocab == {"articleType": ["Shirts", "Tshirts", OTHER], "usage": ["Casual"]}


# --------------------------------------------------------------------------- split

def _synthetic_targets(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    counts = [3, 10, 4, 6]
    probs = [rng.dirichlet(np.ones(c) * 0.7) for c in counts]
    targets = np.stack([rng.choice(c, n, p=p) for c, p in zip(counts, probs)], axis=1)
    targets[rng.random(targets.shape) < 0.03] = -1
    return targets, counts


def test_split_is_stratified_on_every_attribute():
    targets, counts = _synthetic_targets()
    assignment = stratified_split(targets, counts, val_fraction=0.1, test_fraction=0.1, seed=0)
    sizes = np.bincount(assignment, minlength=3) / len(assignment)
    assert np.allclose(sizes, [0.8, 0.1, 0.1], atol=0.02)
    for j, c in enumerate(counts):
        overall = np.bincount(targets[targets[:, j] >= 0, j], minlength=c) / (targets[:, j] >= 0).sum()
        for s in range(3):
            part = targets[assignment == s, j]
            part = part[part >= 0]
            share = np.bincount(part, minlength=c) / len(part)
            assert np.abs(share - overall).max() < 0.03, (j, s, share, overall)


def test_split_is_seeded_and_saved(tmp_path):
    targets, counts = _synthetic_targets(500)
    a = stratified_split(targets, counts, seed=7)
    assert np.array_equal(a, stratified_split(targets, counts, seed=7))
    assert not np.array_equal(a, stratified_split(targets, counts, seed=8))
    ids = np.asarray([f"id{i}" for i in range(len(a))])
    url = str(tmp_path / "bundle" / "split.parquet")
    write_split(url, ids, a)
    saved = read_split(url)
    assert saved == {i: SPLITS[s] for i, s in zip(ids.tolist(), a.tolist())}


def test_split_refuses_too_few_rows():
    with pytest.raises(DataError, match="too few"):
        stratified_split(np.zeros((5, 1), dtype=np.int64), [1])


# --------------------------------------------------------------------------- data module

@pytest.fixture(scope="module")
def small_kaggle(tmp_path_factory):
    names = list(COLOURS)
    rows = [row(i, names[i % 4], gender=("Men", "Women")[i % 2], season=("Summer", "Winter", "Fall")[i % 3]) for i in range(1, 81)]
    return make_kaggle(tmp_path_factory.mktemp("kaggle"), rows, skip_images={"80"}, corrupt={"79", "78"})


@pytest.mark.parametrize("cache", ["on", "off"])
def test_datamodule_batches_and_drops_unreadable_images(small_kaggle, cache):
    # The rows vary in colour, gender and season; the other attributes have one class there (refused since #29).
    varied = ["gender", "baseColour", "season"]
    dm = FashionDataModule(RetrainConfig(data=str(small_kaggle), out="unused", batch_size=16, cache_images=cache, seed=0,
                                         attributes=varied), input_size=32)
    dm.setup()
    assert dm.report.missing_image == 1
    if cache == "on":  # decoded up front: the corrupt rows never reach the split
        assert dm.report.unreadable_image == 2 and sorted(dm.report.unreadable_image_ids) == ["78", "79"]
        assert dm.report.used == 77
    seen = 0
    for split in SPLITS:
        for images, targets in dm.loader(split, augment=split == "train"):
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
            assert targets.dtype == torch.long and targets.shape == (images.shape[0], len(varied))
            seen += images.shape[0]
    assert seen == 77
    assert sorted(dm.unreadable_ids()) == ([] if cache == "on" else ["78", "79"])
    assert dm.vocab["baseColour"] == sorted(COLOURS)


def test_train_augmentation_keeps_the_colour():
    image = torch.full((3, 48, 48), 255, dtype=torch.uint8)
    image[:, 8:40, 8:40] = torch.tensor([210, 30, 30], dtype=torch.uint8).view(3, 1, 1)
    transform = train_transform(48)
    torch.manual_seed(0)
    for _ in range(10):
        out = transform(image)
        assert out.dtype == torch.uint8 and out.shape == image.shape
        product = out.reshape(3, -1)[:, (out.int().sum(0) < 600).reshape(-1)]  # non-white pixels
        # Geometry only: the product's colour stays the colour it was (no hue/brightness jitter).
        assert torch.allclose(product.float().median(dim=1).values, torch.tensor([210.0, 30.0, 30.0]), atol=6)
        assert out[:, 0, 0].tolist() == [255, 255, 255]  # rotated-in corners are white, like the background
