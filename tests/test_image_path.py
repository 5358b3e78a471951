"""The one image path: read (byte cap, typed errors), ImageRows, Predictor, and evaluate scoring what tag writes."""

from __future__ import annotations

import builtins
import csv
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from jobs.cli import cli
from tagger.data import reader
from tagger.data.decode import ImageError
from tagger.data.reader import ImageRows, ImageSettings, StorageUnavailable, collate, fetch_image, load_image


def jpeg_bytes(colour=(200, 30, 30), size=(40, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture()
def opened(monkeypatch) -> list[str]:
    """The paths the reader opens: proves that an oversized file is refused without being read."""
    calls: list[str] = []

    def spy(path, *args, **kwargs):
        calls.append(str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(reader, "open", spy, raising=False)
    return calls


def test_byte_cap_refuses_a_local_file_from_its_size_without_reading_it(tmp_path, opened):
    data = jpeg_bytes()
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    assert fetch_image(str(path), None, max_bytes=len(data))[0] == data
    with pytest.raises(ImageError) as caught:
        fetch_image(str(path), None, max_bytes=len(data) - 1)
    assert caught.value.error_type == "too_large"
    assert str(path) in caught.value.message and "--max-image-bytes" in caught.value.message
    assert opened == [str(path)]  # read once, for the call under the cap; never for the one over it


def test_a_file_that_grew_after_its_stat_is_read_whole_or_refused_at_the_cap(tmp_path, monkeypatch):
    data = jpeg_bytes()
    path = tmp_path / "growing.jpg"
    path.write_bytes(data)
    real_stat = reader.os.stat

    def stale_stat(target, *args, **kwargs):  # the size the file had when it was stat'ed: 10 bytes
        result = real_stat(target, *args, **kwargs)
        return reader.os.stat_result((result.st_mode, result.st_ino, result.st_dev, result.st_nlink, result.st_uid,
                                      result.st_gid, 10, result.st_atime, result.st_mtime, result.st_ctime))

    monkeypatch.setattr(reader.os, "stat", stale_stat)
    assert fetch_image(str(path), None, max_bytes=len(data))[0] == data
    with pytest.raises(ImageError, match="exceeds the limit") as caught:
        fetch_image(str(path), None, max_bytes=len(data) - 1)
    assert caught.value.error_type == "too_large"


def test_byte_cap_refuses_an_s3_object_from_its_head_without_a_get(s3_bucket, monkeypatch):
    import s3fs

    bucket, fs = s3_bucket
    data = jpeg_bytes()
    fs.pipe(f"{bucket}/big.jpg", data)
    url = f"s3://{bucket}/big.jpg"
    assert fetch_image(url, None, max_bytes=len(data))[0] == data

    async def no_get(self, path, *args, **kwargs):
        raise AssertionError(f"GET {path}: the object should have been refused from its HEAD")

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", no_get)
    try:
        with pytest.raises(ImageError) as caught:
            fetch_image(url, None, max_bytes=len(data) - 1)
    finally:
        # An instance made while the patch stands binds its sync cat_file to no_get for good (fsspec mirrors the
        # async methods at creation) and fsspec caches it: later tests on this endpoint would get no_get.
        s3fs.S3FileSystem.clear_instance_cache()
    assert caught.value.error_type == "too_large" and url in caught.value.message


def test_image_rows_keep_every_row_in_place_with_its_own_error(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg_bytes())
    big = tmp_path / "big.jpg"
    big.write_bytes(jpeg_bytes(size=(400, 400)))
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (tmp_path / "folder").mkdir()
    locations = [str(good), str(tmp_path / "gone.jpg"), "http://example.com/a.jpg", str(big), str(tmp_path / "corrupt.jpg"),
                 str(tmp_path / "folder"), str(good)]
    dataset = ImageRows.from_locations(locations, 32, ImageSettings(max_bytes=len(good.read_bytes()) + 10), preview=len)
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch.rows.tolist() == [0, 6] and batch.images.shape == (2, 3, 32, 32) and batch.images.dtype == torch.uint8
    assert batch.previews == [len(good.read_bytes())] * 2  # the preview of the bytes, decoded rows only
    assert batch.error_rows.tolist() == [1, 2, 3, 4, 5]
    assert batch.error_types == ["missing", "invalid_location", "too_large", "decode", "not_a_file"]
    assert all(location in message for location, message in zip(locations[1:6], batch.error_messages))
    assert batch.size == 7


def test_load_image_is_what_image_rows_decode(tmp_path):
    path = tmp_path / "p.jpg"
    path.write_bytes(jpeg_bytes(size=(300, 200)))
    pixels = load_image(str(path), 48)
    assert np.array_equal(pixels, ImageRows.from_locations([str(path)], 48)[0].pixels)
    with pytest.raises(ImageError) as caught:
        load_image(str(tmp_path / "nothing.jpg"), 48)
    assert caught.value.error_type == "missing"


def test_a_failing_store_is_storage_unavailable_never_an_error_row(tmp_path, monkeypatch):
    path = tmp_path / "p.jpg"
    path.write_bytes(jpeg_bytes())

    def down(location, options, *, max_bytes, **_):
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(reader, "read_image", down)
    with pytest.raises(StorageUnavailable, match="read failed after retries"):
        load_image(str(path), 32)  # retrain: stops rather than silently training on fewer images
    item = ImageRows.from_locations([str(path)], 32)[0]
    assert item.error_type == reader.TRANSIENT  # tag and evaluate: their loops stop the run on it


def test_predictor_probabilities_agree_with_its_top_labels(tiny_bundle):
    from tagger.model.bundle import load_bundle
    from tagger.model.predictor import Predictor

    bundle = load_bundle(tiny_bundle)
    predictor = Predictor(bundle, torch.device("cpu"), precision="fp32")
    images = torch.randint(0, 256, (5, 3, bundle.input_size, bundle.input_size), dtype=torch.uint8)
    top = predictor(images)
    full = predictor(images, probabilities=True)
    assert top.probabilities is None
    for spec in bundle.attributes:
        p = full.probabilities[spec.name]
        assert p.shape == (5, len(spec.labels)) and np.allclose(p.sum(axis=1), 1, atol=1e-5)
        assert np.array_equal(full.indices[spec.name], top.indices[spec.name])
        assert np.array_equal(full.scores[spec.name], top.scores[spec.name])
        assert np.array_equal(p.max(axis=1), top.scores[spec.name])
    with pytest.raises(ValueError, match="fp16 is for CUDA"):
        Predictor(bundle, torch.device("cpu"), precision="fp16")
    with pytest.raises(ValueError, match="either precision or amp"):
        Predictor(bundle, torch.device("cpu"), precision="fp32", amp=False)


@pytest.mark.precision
def test_a_training_net_runs_through_the_predictor_and_keeps_its_mode(tiny_bundle):
    from tagger.model.bundle import load_bundle
    from tagger.model.scoring import predict_batches

    bundle = load_bundle(tiny_bundle)
    net = bundle.build_net().train()
    images = torch.randint(0, 256, (6, 3, bundle.input_size, bundle.input_size), dtype=torch.uint8)
    targets = torch.zeros((6, len(bundle.attributes)), dtype=torch.long)
    # fp32 on purpose: what is checked is eval mode (dropout off), which fp32 against fp32 shows within 1e-5
    # (summation order only); at auto a native-bf16 CPU would compute bf16 (scores within ~1e-2).
    probs, seen = predict_batches(net, [(images[:4], targets[:4]), (images[:0], targets[:0]), (images[4:], targets[4:])], "cpu",
                                  precision="fp32")
    assert net.training  # back in training mode for whatever follows
    assert seen.shape == (6, len(bundle.attributes))
    reference = load_bundle(tiny_bundle).build_net()
    with torch.no_grad():
        logits = reference(images)
    for name, p in probs.items():
        assert np.allclose(p, logits[name].softmax(dim=1).numpy(), atol=1e-5)  # eval mode: no dropout


@pytest.mark.precision
@pytest.mark.parametrize("precision", ["auto", "bf16"])  # bf16: the precision evaluate used to ignore
def test_evaluate_scores_exactly_what_tag_writes(demo, tiny_bundle, tmp_path, precision):
    """The same images through `tagger tag` and `tagger evaluate`: the same labels and the same scores, bit for bit
    (both pick the same runtime and precision for the same options, whatever this CPU has)."""
    with open(demo.styles_csv, newline="", encoding="utf-8") as handle:
        ids = [row["id"] for row in csv.DictReader(handle)]
    catalog = tmp_path / "catalog.csv"
    with open(catalog, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["product_id", "image"])
        writer.writerows([i, str(demo.images_dir / f"{i}.jpg")] for i in ids)
    common = ["--workers", "0", "--batch-size", "16", "--precision", precision, "--model", tiny_bundle]
    tagged = CliRunner().invoke(cli, ["tag", "--catalog", str(catalog), "--out", str(tmp_path / "out"), "--run-date", "2026-01-02",
                                      "--progress", "none", *common], catch_exceptions=False)
    assert tagged.exit_code == 0, tagged.output
    evaluated = CliRunner().invoke(cli, ["evaluate", "--data", str(demo.root), "--split", "all", "--out", str(tmp_path / "eval"),
                                         "--no-plots", *common], catch_exceptions=False)
    assert evaluated.exit_code == 0, evaluated.output

    tags = pq.read_table(tmp_path / "out" / "tags" / "run_date=2026-01-02").to_pylist()
    predictions = pq.read_table(tmp_path / "eval" / "predictions.parquet").to_pylist()
    assert len(tags) == len(predictions) == len(ids)
    by_id = {row["product_id"]: row for row in tags}
    from tagger.model.bundle import load_bundle

    for row in predictions:
        tag = by_id[row["id"]]
        for name in load_bundle(tiny_bundle).attribute_names:
            assert (row[f"{name}_pred"], row[f"{name}_score"]) == (tag[name], tag[f"{name}_score"]), (row["id"], name)


def test_run_model_gives_the_same_with_worker_processes(demo, tiny_bundle, tmp_path):
    """The in-memory rows and the preview function travel to worker processes; results are per input, in order."""
    from tagger.model.bundle import load_bundle
    from tagger.model.inference import InferenceSpec, resolve
    from tagger.model.scoring import run_model

    bundle = load_bundle(tiny_bundle)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    paths = [str(p) for p in sorted(demo.images_dir.glob("*.jpg"))[:5]]
    paths[2:2] = [str(tmp_path / "bad.jpg")]
    fp32 = InferenceSpec(device="cpu", runtime="torch", precision="fp32")
    inline = run_model(bundle, paths, inference=resolve(fp32, bundle), batch_size=2, workers=0, thumb_size=50)
    forked = run_model(bundle, paths, inference=resolve(fp32, bundle), batch_size=2, workers=2, thumb_size=50)
    assert inline.ok.tolist() == forked.ok.tolist() == [True, True, False, True, True, True]
    assert inline.errors == forked.errors and inline.errors[2][0] == "decode"
    assert sorted(inline.thumbs) == sorted(forked.thumbs) == [0, 1, 3, 4, 5]
    assert max(inline.thumbs[0].shape[:2]) == 50
    for name in bundle.attribute_names:
        assert np.array_equal(inline.top_index[name], forked.top_index[name]) and inline.top_index[name][2] == -1
        np.testing.assert_array_equal(inline.probs[name], forked.probs[name])


def test_predict_and_evaluate_take_the_tag_jobs_caps_and_precision(demo, tiny_bundle, tmp_path):
    image = sorted(demo.images_dir.glob("*.jpg"))[0]
    out = tmp_path / "sheet.png"
    result = CliRunner().invoke(cli, ["predict", str(image), "--model", tiny_bundle, "--out", str(out), "--workers", "0",
                                      "--max-image-bytes", "100"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    row = pq.read_table(tmp_path / "sheet.parquet").to_pylist()[0]
    assert row["error_type"] == "too_large" and "--max-image-bytes" in row["error"]
    if not torch.cuda.is_available():
        result = CliRunner().invoke(cli, ["evaluate", "--model", tiny_bundle, "--data", str(demo.root), "--split", "all",
                                          "--precision", "fp16", "--out", str(tmp_path / "r")], catch_exceptions=False)
        assert result.exit_code == 2 and "fp16 is for CUDA" in result.output
        assert not (tmp_path / "r").exists()
