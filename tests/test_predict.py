"""``tagger predict``: external images -> PNG contact sheet / HTML gallery (+ Parquet), errors kept, exit codes."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from jobs.cli import cli
from tagger.demo.drawn import CLASSES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def predict(*args: str):
    return CliRunner().invoke(cli, ["predict", "--workers", "0", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def images(demo, tmp_path_factory) -> tuple[Path, list[str]]:
    """A folder of external images in every accepted format, nested, plus one that cannot be read and
    files that are not picked up (hidden, .txt). Returns the folder and the expected entries in order."""
    root = tmp_path_factory.mktemp("external")
    sources = sorted(p for p in (demo.root / "catalog_images").glob("*.jpg"))[:3]
    for k, source in enumerate(sources):
        shutil.copy(source, root / f"shot{k}.JPG" if k == 0 else root / source.name)
    nested = root / "more" / "deeper"
    nested.mkdir(parents=True)
    product = Image.open(sources[0]).convert("RGB")
    product.convert("RGBA").save(nested / "alpha.png")
    product.save(nested / "anim.gif")
    product.save(nested / "photo.webp")
    (root / "more" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (root / ".hidden.jpg").write_bytes(b"skipped")
    (root / "notes.txt").write_text("not an image")
    expected = sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix != ".txt")
    expected = [str(root / name) for name in expected] + [
        str(root / "more" / "broken.jpg"), str(nested / "alpha.png"), str(nested / "anim.gif"), str(nested / "photo.webp"),
    ]
    return root, expected


@pytest.fixture(scope="module")
def strict_bundle(tmp_path_factory) -> str:
    """Review thresholds of 1.0 (review everything): every tag must be marked low-confidence."""
    import torch

    from tagger.model.bundle import save_bundle
    from tagger.model.network import create_tagger_net, resolve_data_config

    torch.manual_seed(1)
    labels = {name: list(values) for name, values in CLASSES.items()}
    net = create_tagger_net("test_efficientnet", {k: len(v) for k, v in labels.items()}, resolve_data_config("test_efficientnet", 32))
    out = tmp_path_factory.mktemp("strict") / "bundle"
    save_bundle(net, str(out), backbone="test_efficientnet", labels=labels, thresholds={k: 1.0 for k in labels})
    return str(out)


def test_collect_images_walks_folders_and_keeps_files_once(images):
    from tagger.predict.gallery import collect_images

    root, expected = images
    assert collect_images([str(root)]) == expected
    notes = str(root / "notes.txt")
    # A file named explicitly is taken whatever its extension (it then shows up as an error entry), and once.
    assert collect_images([expected[0], str(root), notes, expected[0]]) == [expected[0], *expected[1:], notes]


def test_png_sheet_with_a_table_beside_it(images, tiny_bundle, tmp_path):
    root, expected = images
    out = tmp_path / "sheet.png"
    result = predict(str(root), "--model", tiny_bundle, "--out", str(out), "--top-k", "2")
    assert result.exit_code == 0, result.output
    assert f"{len(expected)} image(s), 1 unreadable" in result.output

    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 20_000
    with Image.open(io.BytesIO(data)) as sheet:
        assert sheet.width >= 760 and sheet.height > 4 * 160

    rows = pq.read_table(tmp_path / "sheet.parquet").to_pylist()
    assert [r["path"] for r in rows] == expected
    broken = [r for r in rows if r["error_type"]]
    assert [r["path"] for r in broken] == [str(root / "more" / "broken.jpg")]
    assert broken[0]["error_type"] == "decode" and "not a recognised image format" in broken[0]["error"]
    assert broken[0]["gender"] is None and broken[0]["gender_top_k"] is None
    for row in rows:
        if row["error_type"]:
            continue
        for attr, labels in CLASSES.items():
            top = row[f"{attr}_top_k"]
            assert len(top) == 2 and top[0]["score"] >= top[1]["score"]
            assert row[attr] == top[0]["label"] in labels and 0 < row[f"{attr}_score"] <= 1
            assert row[f"{attr}_review"] is False  # the tiny bundle's thresholds are 0


def test_html_gallery_is_self_contained_with_one_row_per_image(images, tiny_bundle, tmp_path):
    root, expected = images
    out = tmp_path / "gallery.html"
    result = predict(str(root), "--model", tiny_bundle, "--out", str(out), "--no-table")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "gallery.parquet").exists()
    page = out.read_text(encoding="utf-8")
    body = page.split("<tbody>", 1)[1]
    assert body.count("<tr") == len(expected)
    assert body.count('<tr class="error">') == 1 and "not a recognised image format" in body
    assert page.count("data:image/jpeg;base64,") == len(expected) - 1
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # nothing loaded from outside
    assert all(f"<th>{attr}</th>" in page for attr in CLASSES)
    assert "more/deeper/anim.gif" in page  # names relative to the folder given, so equal names stay apart


def test_tags_under_the_review_threshold_are_marked(images, strict_bundle, tmp_path):
    root, expected = images
    out = tmp_path / "gallery.html"
    result = predict(str(root), "--model", strict_bundle, "--out", str(out))
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")
    ok = len(expected) - 1
    assert page.count('class="top low"') == ok * len(CLASSES)
    rows = pq.read_table(tmp_path / "gallery.parquet").to_pylist()
    assert all(r[f"{a}_review"] for r in rows if not r["error_type"] for a in CLASSES)


def test_png_pages(images, tiny_bundle, tmp_path):
    root, expected = images
    out = tmp_path / "sheet.png"
    result = predict(str(root), "--model", tiny_bundle, "--out", str(out), "--per-page", "3", "--no-table")
    assert result.exit_code == 0, result.output
    pages = [out, *(tmp_path / f"sheet-{k}.png" for k in range(2, -(-len(expected) // 3) + 1))]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in pages)
    assert all(p.read_bytes().startswith(PNG_SIGNATURE) for p in pages)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "tags.txt"], ".png"),
        (["--out", "x.png", "--top-k", "0"], "top-k"),
        (["--out", "x.png", "--batch-size", "0"], "batch-size"),
        (["--out", "x.png", "--device", "tpu"], "device"),
    ],
)
def test_bad_options_exit_2(images, tiny_bundle, tmp_path, args, message):
    root, _ = images
    result = predict(str(root), "--model", tiny_bundle, *[a if a != "x.png" else str(tmp_path / a) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not list(tmp_path.iterdir())


def test_a_missing_photo_is_listed_beside_the_others(images, tiny_bundle, tmp_path):
    root, expected = images
    out = tmp_path / "gallery.html"
    missing = tmp_path / "missing.jpg"
    result = predict(str(root), str(missing), "--model", tiny_bundle, "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = pq.read_table(tmp_path / "gallery.parquet").to_pylist()
    assert len(rows) == len(expected) + 1
    last = rows[-1]
    assert last["path"] == str(missing) and last["error_type"] == "missing" and str(missing) in last["error"]
    assert last["gender"] is None and sum(r["error_type"] is None for r in rows) == len(expected) - 1


def test_invalid_inputs_exit_2(images, tiny_bundle, tmp_path):
    root, _ = images
    out = str(tmp_path / "x.png")
    result = predict(str(tmp_path / "missing.jpg"), "--model", tiny_bundle, "--out", out)
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "empty").mkdir()
    result = predict(str(tmp_path / "empty"), "--model", tiny_bundle, "--out", out)
    assert result.exit_code == 2 and "no images" in result.output
    result = predict(str(root), "--model", str(tmp_path / "nothing"), "--out", out)
    assert result.exit_code == 2 and "not a model bundle" in result.output
    result = predict("--model", tiny_bundle, "--out", out)
    assert result.exit_code == 2 and "IMAGES" in result.output
    assert not (tmp_path / "x.png").exists()


def test_a_read_only_out_is_exit_2_in_one_line_before_the_model_work(images, tiny_bundle, tmp_path, monkeypatch):
    import os

    from tagger.model import scoring

    root, _ = images
    monkeypatch.setattr(scoring, "run_model", lambda *a, **k: pytest.fail("the model ran before --out was checked"))
    real = os.access
    # As root writes anywhere, the read-only folder is os.access's answer (what check_output_location asks).
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path).startswith(str(tmp_path)) and mode & os.W_OK
                        else real(path, mode))
    out = tmp_path / "sheet.png"
    result = predict(str(root), "--model", tiny_bundle, "--out", str(out))
    assert result.exit_code == 2, result.output
    assert f"--out {out}: its folder" in result.output and "not writable" in result.output
    assert len(result.output.strip().splitlines()) == 1
    monkeypatch.setattr(os, "access", real)
    (tmp_path / "a-file").write_text("in the way")
    result = predict(str(root), "--model", tiny_bundle, "--out", str(tmp_path / "a-file" / "sheet.png"))
    assert result.exit_code == 2 and "is an existing file" in result.output, result.output
    (tmp_path / "folder.html").mkdir()
    result = predict(str(root), "--model", tiny_bundle, "--out", str(tmp_path / "folder.html"))
    assert result.exit_code == 2 and "is an existing folder" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "folder.html"]


def test_a_write_the_file_system_refuses_is_exit_2(images, tiny_bundle, tmp_path, monkeypatch):
    from tagger import storage

    root, _ = images

    def refuse(url, data, options=None):
        raise PermissionError(13, "Permission denied", url)

    monkeypatch.setattr(storage, "write_bytes", refuse)
    result = predict(str(root), "--model", tiny_bundle, "--out", str(tmp_path / "gallery.html"))
    assert result.exit_code == 2, result.output
    assert "cannot write --out" in result.output and "Traceback" not in result.output
