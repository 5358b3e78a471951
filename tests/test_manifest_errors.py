"""Bad manifests: a whole-file problem is exit 2 with a clear message before any model work; a bad row is
one error row (``invalid_row``, ``duplicate_id``); an empty catalog is a successful, empty partition."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobs.cli import cli
from tagger.tag.writers import read_complete_partition

DATE = "2026-04-05"


def tag(*args: str):
    return CliRunner().invoke(cli, ["tag", "--workers", "0", "--progress", "none", "--run-date", DATE, *args], catch_exceptions=False)


def read(out: Path, table: str) -> pl.DataFrame:
    return pl.from_arrow(read_complete_partition(f"{out}/{table}/run_date={DATE}"))


def write_csv(path: Path, rows, header=("product_id", "image")) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def demo_rows(demo, n: int) -> list[tuple[str, str]]:
    with open(demo.catalog, newline="") as handle:
        return [(r["product_id"], str(Path(demo.root, r["image"]))) for r in csv.DictReader(handle)][:n]


def refused(tmp_path: Path, catalog: Path, *args: str) -> str:
    """Run against a model that does not exist: a manifest error must come first, before any model work."""
    out = tmp_path / "out"
    result = tag("--catalog", str(catalog), "--model", str(tmp_path / "no-such-model"), "--out", str(out), *args)
    assert result.exit_code == 2, result.output
    assert "invalid input" in result.output and "model bundle" not in result.output
    assert not out.exists(), "nothing may be written for a refused manifest"
    return result.output


# -- whole-file problems: exit 2 -------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, header",
    [("m.csv", ("sku", "picture")), ("m.parquet", ("sku", "picture")), ("m.jsonl", ("sku", "picture")), ("m2.csv", ("product_id", "url"))],
)
def test_missing_columns_lists_the_columns_found(tmp_path, name, header):
    path = tmp_path / name
    if name.endswith(".csv"):
        write_csv(path, [("1", "a.jpg")], header=header)
    elif name.endswith(".parquet"):
        pq.write_table(pa.table({header[0]: ["1"], header[1]: ["a.jpg"]}), path)
    else:
        path.write_text(json.dumps({header[0]: "1", header[1]: "a.jpg"}) + "\n")
    output = refused(tmp_path, path)
    assert "missing column(s)" in output and f"columns found: {header[0]}, {header[1]}" in output
    assert "--id-column / --image-column" in output


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_a_zero_byte_manifest_is_refused(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_bytes(content)
    assert "the file is empty (not even a header)" in refused(tmp_path, path)


def test_non_utf8_csv_names_the_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("product_id,image\n1,a.jpg\n2,caf\u00e9.jpg\n".encode("latin-1"))
    output = refused(tmp_path, path)
    assert "line 3 is not valid UTF-8" in output and "latin1.csv" in output
    header = tmp_path / "header.csv"
    header.write_bytes("product_id,im\u00e1ge\n1,a.jpg\n".encode("latin-1"))
    assert "header.csv" in refused(tmp_path, header) and "line 1 (the header) is not valid UTF-8" in refused(tmp_path, header)


def test_utf16_csv_is_refused_with_the_encoding(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("product_id,image\n1,a.jpg\n".encode("utf-16"))
    assert "UTF-16" in refused(tmp_path, path)


def test_parquet_bytes_named_csv(tmp_path):
    path = tmp_path / "catalog.csv"
    pq.write_table(pa.table({"product_id": ["1"], "image": ["a.jpg"]}), path)
    output = refused(tmp_path, path)
    assert "not a valid CSV manifest: the content is a Parquet file" in output and "--catalog-format" in output
    # With the format said explicitly, the same file is fine (and the model is the next thing checked).
    result = tag("--catalog", str(path), "--catalog-format", "parquet", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "not a model bundle" in result.output


def test_csv_named_parquet(tmp_path):
    path = write_csv(tmp_path / "catalog.parquet", [("1", "a.jpg")])
    assert "not a valid PARQUET manifest: the content is text (CSV?)" in refused(tmp_path, path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\x01\x02garbage{{{\n", "the content is binary data"),
        (b"product_id,image\n1,a.jpg\n", "line 1 is not valid JSON"),
        (b'{"product_id": "1", "image": "a.jpg"}\n{"product_id": "2", "image": \n', "line 2 is not valid JSON"),
        (b"[1, 2]\n", "line 1 is a JSON list"),
    ],
)
def test_garbage_jsonl(tmp_path, content, message):
    path = tmp_path / "catalog.jsonl"
    path.write_bytes(content)
    output = refused(tmp_path, path)
    assert "not a valid JSONL manifest" in output and message in output


def test_not_really_gzipped(tmp_path):
    path = tmp_path / "catalog.csv.gz"
    path.write_bytes(b"product_id,image\n1,a.jpg\n")
    assert "cannot decompress the manifest" in refused(tmp_path, path)
    truncated = tmp_path / "cut.csv.gz"
    truncated.write_bytes(gzip.compress(b"product_id,image\n" + b"1,a.jpg\n" * 1000)[:60])
    assert "cannot decompress the manifest" in refused(tmp_path, truncated)


def test_unknown_extension(tmp_path):
    path = write_csv(tmp_path / "catalog.xlsx", [("1", "a.jpg")])
    assert "cannot tell the manifest format from its name" in refused(tmp_path, path)


# -- empty catalogs: a successful run with zero rows -----------------------------------------------
@pytest.mark.parametrize("kind", ["csv", "csv-no-newline", "parquet"])
def test_a_header_only_manifest_is_an_empty_successful_run(tiny_bundle, tmp_path, kind):
    if kind == "parquet":
        path = tmp_path / "empty.parquet"
        pq.write_table(pa.table({"product_id": pa.array([], pa.string()), "image": pa.array([], pa.string())}), path)
    else:
        path = tmp_path / "empty.csv"
        path.write_text("product_id,image\n" if kind == "csv" else "product_id,image")
    out = tmp_path / "out"
    result = tag("--catalog", str(path), "--model", tiny_bundle, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "succeeded" in result.output and "rows=0" in result.output
    for table in ("tags", "errors"):
        assert (out / table / f"run_date={DATE}" / "_SUCCESS").exists()
        assert read(out, table).height == 0
    summary = json.loads((out / "_runs" / f"run_date={DATE}" / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["rows"] == 0 and summary["error_rate"] == 0.0


# -- bad rows: one error row each ------------------------------------------------------------------
def test_empty_ids_and_images_are_invalid_rows(demo, tiny_bundle, tmp_path):
    good = demo_rows(demo, 3)
    rows = [good[0], ("", good[1][1]), ("   ", good[1][1]), ("no-image", ""), ("blank-image", "  "), good[1], good[2]]
    out = tmp_path / "out"
    result = tag("--catalog", str(write_csv(tmp_path / "m.csv", rows)), "--model", tiny_bundle, "--out", str(out),
                 "--max-error-rate", "0.9", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    errors = read(out, "errors").sort("message")
    assert errors["error_type"].to_list() == ["invalid_row"] * 4
    assert errors["message"].to_list() == ["row 2: empty product_id", "row 3: empty product_id", "row 4: empty image", "row 5: empty image"]
    assert sorted(read(out, "tags")["product_id"].to_list()) == sorted(r[0] for r in good)


def test_duplicate_ids_first_wins(demo, tiny_bundle, tmp_path):
    good = demo_rows(demo, 3)
    rows = [good[0], good[1], (good[0][0], good[2][1]), good[2], (good[0][0], good[1][1])]
    out = tmp_path / "out"
    result = tag("--catalog", str(write_csv(tmp_path / "m.csv", rows)), "--model", tiny_bundle, "--out", str(out),
                 "--max-error-rate", "0.9")
    assert result.exit_code == 0, result.output
    tags, errors = read(out, "tags"), read(out, "errors")
    assert sorted(tags["product_id"].to_list()) == sorted(r[0] for r in good)
    assert tags.filter(pl.col("product_id") == good[0][0])["image"].to_list() == [good[0][1]]
    assert errors["error_type"].to_list() == ["duplicate_id", "duplicate_id"]
    assert sorted(errors["message"].to_list()) == [
        f"row 3: product_id '{good[0][0]}' already appears at row 1",
        f"row 5: product_id '{good[0][0]}' already appears at row 1",
    ]
    assert tags.height + errors.height == len(rows)


def test_jsonl_ids_that_are_numbers_on_some_lines(demo, tiny_bundle, tmp_path):
    good = demo_rows(demo, 3)
    path = tmp_path / "m.jsonl"
    with open(path, "w") as handle:
        for index, (pid, image) in enumerate(good):
            handle.write(json.dumps({"product_id": int(pid) if index % 2 == 0 else pid, "image": image, "extra": [index]}) + "\n")
    out = tmp_path / "out"
    result = tag("--catalog", str(path), "--model", tiny_bundle, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(read(out, "tags")["product_id"].to_list()) == sorted(r[0] for r in good)


def test_one_column_named_as_both_id_and_image_is_exit_2_in_one_line(demo, tmp_path):
    catalog = write_csv(tmp_path / "m.csv", demo_rows(demo, 3))
    output = refused(tmp_path, catalog, "--id-column", "image", "--image-column", "image")
    assert "--id-column and --image-column both name 'image'" in output
    assert len(output.strip().splitlines()) == 1, output


def test_a_semicolon_separated_csv_is_named_as_such(tmp_path):
    path = tmp_path / "excel.csv"  # an Excel export in a locale whose list separator is ';'
    path.write_text("product_id;image\n1;a.jpg\n")
    output = refused(tmp_path, path)
    assert "columns found: product_id;image" in output
    assert "looks ';'-separated" in output and "export it with commas" in output and "--id-column" not in output
