"""Several photos per product (tagger/tag/photos.py): tags from the mean of the photos' probabilities.

A product is tagged when at least one photo is read (``images_used`` says how many), an error row only when
none is, with each photo's error in its message; batches stay by photo; ``--since`` re-tags a product when
any of its photos changed.
"""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from jobs.cli import cli
from tagger.data.reader import load_image
from tagger.model.bundle import load_bundle
from tagger.model.predictor import Predictor
from tagger.tag.writers import read_complete_partition

NIGHT1, NIGHT2 = "2026-07-01", "2026-07-02"


def photo(path: Path, colour, size=(48, 64)) -> str:
    buffer = BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG", quality=90)
    path.write_bytes(buffer.getvalue())
    return path.name


@pytest.fixture()
def shop(tmp_path) -> Path:
    rng = np.random.default_rng(1)
    for index in range(8):
        photo(tmp_path / f"f{index}.jpg", tuple(int(v) for v in rng.integers(0, 255, 3)))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return tmp_path


def tag(catalog: Path, model: str, out: Path, date: str, *extra: str):
    args = ["tag", "--catalog", str(catalog), "--model", model, "--out", str(out), "--run-date", date, "--workers", "0",
            "--progress", "none", "--max-error-rate", "1", "--batch-size", "4", *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def tables(out: Path, date: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    return (pl.from_arrow(read_complete_partition(f"{out}/tags/run_date={date}")),
            pl.from_arrow(read_complete_partition(f"{out}/errors/run_date={date}")))


def probabilities(bundle_path: str, paths: list[Path]) -> dict[str, np.ndarray]:
    bundle = load_bundle(bundle_path)
    predictor = Predictor(bundle, torch.device("cpu"), precision="fp32")
    images = torch.from_numpy(np.stack([load_image(str(p), bundle.input_size) for p in paths])).permute(0, 3, 1, 2)
    return predictor(images, probabilities=True).probabilities


def write_csv(path: Path, rows) -> Path:
    path.write_text("product_id,image\n" + "".join(f'{pid},"{cell}"\n' for pid, cell in rows))
    return path


def test_tags_are_the_mean_of_the_photos_and_a_bad_photo_is_skipped(shop, tiny_bundle, tmp_path):
    rows = [
        ("two", "f0.jpg; f1.jpg"),
        ("three_one_bad", "f2.jpg;gone.jpg;f3.jpg"),
        ("one", "f4.jpg"),
        ("none", "gone.jpg; broken.jpg; gone2.jpg"),
        ("blank", " ; "),
        ("forty", ";".join(f"f{i % 8}.jpg" for i in range(40))),  # 10 batches of 4 photos for one product
        ("after", "f5.jpg;f6.jpg"),
    ]
    out = tmp_path / "out"
    result = tag(write_csv(tmp_path / "c.csv", rows), tiny_bundle, out, NIGHT1, "--image-separator", ";")
    assert result.exit_code == 0, result.output
    tagged, errors = tables(out, NIGHT1)
    used = dict(zip(tagged["product_id"], tagged["images_used"]))
    assert used == {"two": 2, "three_one_bad": 2, "one": 1, "forty": 40, "after": 2}
    assert tagged.filter(pl.col("product_id") == "two")["image"][0] == "f0.jpg; f1.jpg", "as written in the manifest"
    failed = dict(zip(errors["product_id"], zip(errors["error_type"], errors["message"])))
    assert set(failed) == {"none", "blank"} and failed["blank"][0] == "invalid_row"
    error_type, message = failed["none"]
    assert error_type == "missing" and "none of the 3 photos" in message
    assert "gone.jpg" in message and "broken.jpg" in message and "gone2.jpg" in message

    from tagger.attributes import ATTRIBUTES

    bundle = load_bundle(tiny_bundle)
    expected = {"two": ["f0.jpg", "f1.jpg"], "three_one_bad": ["f2.jpg", "f3.jpg"], "one": ["f4.jpg"],
                "forty": [f"f{i % 8}.jpg" for i in range(40)]}
    for product, names in expected.items():
        probs = probabilities(tiny_bundle, [shop / n for n in names])
        row = tagged.filter(pl.col("product_id") == product)
        for spec in bundle.attributes:
            mean = probs[spec.name].mean(axis=0)
            assert row[spec.name][0] == spec.labels[int(mean.argmax())], (product, spec.name)
            assert abs(row[f"{spec.name}_score"][0] - float(mean.max())) < 1e-5, (product, spec.name)
    assert ATTRIBUTES  # the Kaggle names exist; the tiny bundle's attributes are what was compared


def test_lists_in_parquet_and_jsonl(shop, tiny_bundle, tmp_path):
    # A null among the photos is no photo (as a blank piece), not an invalid row for the whole product.
    products = {"a": ["f0.jpg", "f1.jpg"], "b": ["gone.jpg", "f2.jpg", None, "f3.jpg"], "c": ["f4.jpg", None],
                "piped": ["f5.jpg", "f6.jpg?w=1|2"]}  # the separator inside a photo: that row, not the manifest
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"product_id": list(products), "image": list(products.values())}), parquet)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"product_id": k, "image": v}) + "\n" for k, v in products.items()))
    results = []
    for catalog in (parquet, jsonl):
        out = tmp_path / f"out-{catalog.suffix[1:]}"
        result = tag(catalog, tiny_bundle, out, NIGHT1)
        assert result.exit_code == 0, result.output
        tagged, errors = tables(out, NIGHT1)
        assert errors["product_id"].to_list() == ["piped"] and errors["error_type"].to_list() == ["invalid_row"]
        assert "contains '|'" in errors["message"][0] and "--image-separator" in errors["message"][0]
        assert dict(zip(tagged["product_id"], tagged["images_used"])) == {"a": 2, "b": 2, "c": 1}
        assert dict(zip(tagged["product_id"], tagged["image"]))["a"] == "f0.jpg|f1.jpg"
        results.append(tagged.drop("run_id", "tagged_at").sort("product_id"))
    assert results[0].equals(results[1])


def test_since_retags_a_product_when_any_photo_changed(shop, tiny_bundle, tmp_path):
    rows = [("a", "f0.jpg;f1.jpg"), ("b", "f2.jpg;f3.jpg"), ("c", "f4.jpg"), ("d", "f5.jpg;gone.jpg")]
    catalog = write_csv(tmp_path / "c.csv", rows)
    out = tmp_path / "out"
    assert tag(catalog, tiny_bundle, out, NIGHT1, "--image-separator", ";").exit_code == 0
    photo(shop / "f3.jpg", (9, 9, 9), size=(40, 40))  # b's second photo changes
    result = tag(catalog, tiny_bundle, out, NIGHT2, "--image-separator", ";", "--since", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "_runs" / f"run_date={NIGHT2}" / "summary.json").read_text())
    # a and c unchanged; b changed; d has a photo that could not be read, so it is tried again.
    assert summary["reused"] == 2 and summary["tagged"] == 2, summary
    night1, _ = tables(out, NIGHT1)
    night2, _ = tables(out, NIGHT2)
    run_ids = dict(zip(night2["product_id"], night2["run_id"]))
    first = dict(zip(night1["product_id"], night1["run_id"]))
    assert run_ids["a"] == first["a"] and run_ids["c"] == first["c"]
    assert run_ids["b"] != first["b"] and run_ids["d"] != first["d"]


def test_a_one_photo_catalog_is_unchanged_by_a_separator(shop, tiny_bundle, tmp_path):
    rows = [("a", "f0.jpg"), ("b", "f1.jpg"), ("c", "gone.jpg")]
    catalog = write_csv(tmp_path / "c.csv", rows)
    plain, split = tmp_path / "plain", tmp_path / "split"
    assert tag(catalog, tiny_bundle, plain, NIGHT1).exit_code == 0
    assert tag(catalog, tiny_bundle, split, NIGHT1, "--image-separator", ";").exit_code == 0
    a, ea = tables(plain, NIGHT1)
    b, eb = tables(split, NIGHT1)
    assert a.drop("run_id", "tagged_at").equals(b.drop("run_id", "tagged_at"))
    assert set(a["images_used"]) == {1}
    assert ea.drop("run_id").equals(eb.drop("run_id"))


@pytest.mark.slow
def test_the_ray_engine_writes_the_local_engines_tables(shop, tiny_bundle, tmp_path):
    """Each photo one Ray row; the driver's shard commit averages a product's photos with the same assembler:
    rows, images_used, labels and error messages equal the local engine's, scores within 1e-5 (as the Ray
    engine's own tests). Small shards and batches: a product's photos land in different blocks and fragments."""
    pytest.importorskip("ray")
    import ray

    rows = [
        ("two", "f0.jpg; f1.jpg"),
        ("three_one_bad", "f2.jpg;gone.jpg;f3.jpg"),
        ("one", "f4.jpg"),
        ("none", "gone.jpg; broken.jpg; gone2.jpg"),
        ("blank", " ; "),
        ("nine", ";".join(f"f{i % 8}.jpg" for i in range(9))),
        ("after", "f5.jpg;f6.jpg"),
        ("last", "f7.jpg;f0.jpg"),
    ]
    catalog = write_csv(tmp_path / "c.csv", rows)
    local, distributed = tmp_path / "local", tmp_path / "ray"
    common = ("--image-separator", ";", "--shard-size", "3")
    assert tag(catalog, tiny_bundle, local, NIGHT1, *common).exit_code == 0
    if ray.is_initialized():  # pragma: no cover - another module left one running
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        result = tag(catalog, tiny_bundle, distributed, NIGHT1, *common, "--engine", "ray")
    finally:
        ray.shutdown()
    assert result.exit_code == 0, result.output
    (a, ea), (b, eb) = tables(local, NIGHT1), tables(distributed, NIGHT1)
    a, b = (t.drop("run_id", "tagged_at").sort("product_id") for t in (a, b))
    scores = [c for c in a.columns if c.endswith("_score")]
    assert b.columns == a.columns
    for column in set(a.columns) - set(scores) - {"image_version"}:
        assert b[column].to_list() == a[column].to_list(), column
    # A product's photo versions, "" for one not read: where an unread one falls among them follows the local
    # engine's batch boundaries (tag/photos.py); what --since reads from them (any "" = read again) is the same.
    pieces = [[sorted(v.split(";")) for v in t["image_version"]] for t in (a, b)]
    assert pieces[1] == pieces[0]
    for column in scores:
        assert np.allclose(b[column].to_numpy(), a[column].to_numpy(), atol=1e-5), column
    assert dict(zip(b["product_id"], b["images_used"])) == {"two": 2, "three_one_bad": 2, "one": 1, "nine": 9,
                                                            "after": 2, "last": 2}
    assert eb.drop("run_id").sort("product_id").equals(ea.drop("run_id").sort("product_id")), "errors differ"
    assert "none of the 3 photos" in eb.filter(pl.col("product_id") == "none")["message"][0]
    summary = json.loads((distributed / "_runs" / f"run_date={NIGHT1}" / "summary.json").read_text())
    assert summary["this_process"]["images_read"] == 2 + 3 + 1 + 3 + 9 + 2 + 2, "photos read, as the local engine counts"
    local_summary = json.loads((local / "_runs" / f"run_date={NIGHT1}" / "summary.json").read_text())
    assert summary["photo_errors"] == local_summary["photo_errors"] and sum(summary["photo_errors"].values()) >= 4, \
        "every photo not read is counted, by type, also of the products tagged from their other photos"
    assert not list((distributed / "_runs").rglob("ray/**/*.parquet")), "the fragments are removed"


def test_retrain_refuses_a_labelled_manifest_with_lists_of_photos(tmp_path):
    from tagger.data.kaggle import DataError, DataReport
    from tagger.data.labelled import _read_labelled_manifest

    catalog = tmp_path / "labelled.parquet"
    pq.write_table(pa.table({"product_id": ["a"], "image": [["x.jpg", "y.jpg"]], "gender": ["Men"]}), catalog)
    with pytest.raises(DataError, match="one image per row"):
        _read_labelled_manifest(str(catalog), ["gender"], None, "product_id", "image", None, DataReport())


def test_the_ray_committer_takes_each_photo_once_and_averages_a_products_photos(shop, tiny_bundle, tmp_path):
    """A product's photos in different fragments, one of them twice (a retried write task): one product row,
    the mean of its photos' probabilities, each photo counted once; a shard waits for all its photos."""
    from datetime import datetime, timezone

    from tagger.data.manifest import read_manifest
    from tagger.tag.config import TagConfig
    from tagger.tag.partition import Partition
    from tagger.tag.plan import make_plan
    from tagger.tag.ray.engine import photo_counts
    from tagger.tag.ray.sink import FragmentCommitter, fragment_schema, write_fragment
    from tagger.tag.rows import ShardRows
    from tagger.tag.shards import ShardCommitter

    catalog = write_csv(tmp_path / "c.csv", [("a", "f0.jpg;f1.jpg;f2.jpg"), ("b", "f3.jpg")])
    config = TagConfig(catalog=str(catalog), model=tiny_bundle, out=str(tmp_path / "out"), run_date=NIGHT1,
                       image_separator=";")
    manifest, bundle = read_manifest(config.catalog, image_separator=";"), load_bundle(tiny_bundle)
    partition = Partition(config.out, NIGHT1)
    plan = make_plan(config, partition, manifest, bundle)
    shards = ShardCommitter(partition, plan)
    rows = ShardRows(partition, plan, manifest, bundle.attribute_names, bundle.model_version)
    photos = photo_counts(manifest)
    assert photos.tolist() == [3, 1]
    folder = f"{partition.state}/ray/attempt"
    rng = np.random.default_rng(0)
    vectors = {(r, p): {s.name: rng.dirichlet(np.ones(len(s.labels))).astype(np.float32) for s in bundle.attributes}
               for r, p in [(0, 0), (0, 1), (0, 2), (1, 0)]}

    def fragment(name: str, keys) -> None:
        n = len(keys)
        columns = {"row": np.array([r for r, _ in keys], np.int64), "photo": np.array([p for _, p in keys], np.int32),
                   "image_version": [f"v{r}{p}" for r, p in keys], "error_type": [""] * n, "message": [""] * n}
        for spec in bundle.attributes:
            columns[spec.name] = [spec.labels[0]] * n
            columns[f"{spec.name}_score"] = np.full(n, 0.5, np.float32)
            columns[f"{spec.name}_probs"] = [vectors[k][spec.name].tolist() for k in keys]
        columns["tagged_at"] = pa.array([datetime.now(timezone.utc)] * n, pa.timestamp("us", tz="UTC"))
        schema = fragment_schema(bundle.attribute_names, probabilities=True)
        write_fragment(f"{folder}/{name}", pa.table(columns, schema=schema), None)

    committer = FragmentCommitter(folder, shards, rows, {0: 2}, np.ones(2, bool), None, photos=photos,
                                  photo_reads={0: 4}, separator=";", labels=bundle.attributes)
    fragment("00000-a.parquet", [(0, 1), (1, 0)])
    committer.sweep()
    assert committer.open == {0}, "photos 0 and 2 of product a have not landed"
    fragment("00000-b.parquet", [(0, 0), (0, 2), (0, 1)])  # photo 1 again: a retried task
    committer.sweep()
    assert committer.open == set() and committer.duplicates == 1 and committer.images == 4
    tags = pq.read_table(f"{partition.tags}/part-00000.parquet").to_pylist()
    assert [(t["product_id"], t["images_used"]) for t in tags] == [("a", 3), ("b", 1)]
    assert tags[0]["image_version"] == "v00;v01;v02", "the product's photos in their order"
    for spec in bundle.attributes:
        mean = np.mean([vectors[(0, p)][spec.name] for p in range(3)], axis=0)
        assert tags[0][spec.name] == spec.labels[int(mean.argmax())]
        assert abs(tags[0][f"{spec.name}_score"] - float(mean.max())) < 1e-6
