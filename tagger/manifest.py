"""Read and check a catalog manifest: product ids and image locations, as Arrow columns.

A manifest is CSV, Parquet or JSON Lines (optionally gzipped), local or on S3. It is read columnar,
only the two columns we need, so a million-row catalog is two Arrow string arrays, not a million
Python objects. Anything that makes the whole manifest unusable raises :class:`ManifestError` before
any model work; problems of single rows (empty id or image, a repeated id) become error rows.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from . import storage

FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}


class ManifestError(ValueError):
    """The manifest as a whole cannot be used; the message names the file, and the row or column."""


@dataclass(frozen=True)
class Manifest:
    url: str
    # Columns: row (int64, 0-based manifest position), product_id, image (as written in the manifest),
    # location (absolute path or URL to read), status ("" = to tag, else an error_type), message.
    table: pa.Table
    fingerprint: str

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


def detect_format(url: str) -> str:
    name = url.lower()
    for suffix in (".gz", ".bz2", ".zst", ".xz"):
        name = name.removesuffix(suffix)
    for extension, fmt in FORMATS.items():
        if name.endswith(extension):
            return fmt
    raise ManifestError(
        f"{url}: cannot tell the manifest format from its name; use a .csv, .parquet or .jsonl(.gz) "
        "file, or pass --catalog-format csv|parquet|jsonl"
    )


def read_manifest(
    url: str,
    *,
    id_column: str = "product_id",
    image_column: str = "image",
    fmt: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    fmt = fmt or detect_format(url)
    fs, path = storage.filesystem(url, storage_options)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise ManifestError(f"{url}: manifest not found") from None
    except PermissionError as exc:
        raise ManifestError(f"{url}: manifest cannot be read with these credentials ({exc})") from None
    if info.get("type") == "directory":
        raise ManifestError(f"{url}: is a folder; --catalog takes one manifest file")
    with fs.open(path, "rb", compression="infer") as handle:
        data = handle.read()
    if not data.strip():
        raise ManifestError(f"{url}: the file is empty (not even a header); an empty catalog is a header-only file")
    table = _parse(data, fmt, url, (id_column, image_column))
    table = _select(table, url, id_column, image_column)
    return Manifest(url=url, table=_annotate(table, storage.parent(url)), fingerprint=_fingerprint(url, info, data))


def _parse(data: bytes, fmt: str, url: str, wanted: tuple[str, ...]) -> pa.Table:
    try:
        if fmt == "csv":
            from pyarrow import csv

            delimiter = "\t" if url.lower().removesuffix(".gz").endswith(".tsv") else ","
            # Every column read as text: ids like 000123 must keep their zeros.
            header = _csv_header(data, delimiter)
            return csv.read_csv(
                io.BytesIO(data),
                parse_options=csv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                convert_options=csv.ConvertOptions(
                    column_types={name: pa.string() for name in header},
                    include_columns=[c for c in wanted if c in header] or None,
                    strings_can_be_null=True,
                ),
            )
        if fmt == "parquet":
            import pyarrow.parquet as pq

            schema = pq.read_schema(io.BytesIO(data))
            return pq.read_table(io.BytesIO(data), columns=[c for c in wanted if c in schema.names] or None)
        if fmt == "jsonl":
            from pyarrow import json as pajson

            return pajson.read_json(io.BytesIO(data))
    except ManifestError:
        raise
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, UnicodeDecodeError) as exc:
        detail = _locate_bad_utf8(data) if fmt != "parquet" else None
        raise ManifestError(f"{url}: not a valid {fmt.upper()} manifest: {detail or exc}") from None
    raise ManifestError(f"unknown manifest format {fmt!r}; choose csv, parquet or jsonl")


def _csv_header(data: bytes, delimiter: str) -> list[str]:
    import csv as pycsv

    first_line = data.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        text = first_line.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ManifestError("line 1 (the header) is not valid UTF-8") from None
    return next(pycsv.reader([text], delimiter=delimiter))


def _locate_bad_utf8(data: bytes) -> str | None:
    for number, line in enumerate(data.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"line {number} is not valid UTF-8 (byte {line[exc.start:exc.start + 1]!r} at column {exc.start + 1}); re-encode the file as UTF-8"
    return None


def _select(table: pa.Table, url: str, id_column: str, image_column: str) -> pa.Table:
    missing = [c for c in (id_column, image_column) if c not in table.column_names]
    if missing:
        found = ", ".join(table.column_names) or "none"
        raise ManifestError(
            f"{url}: missing column(s) {', '.join(missing)}; columns found: {found}. "
            "Name them with --id-column / --image-column."
        )
    columns = []
    for name in (id_column, image_column):
        column = table.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_integer(column.type)):
            raise ManifestError(f"{url}: column {name!r} has type {column.type}; expected text (or integer ids)")
        columns.append(pc.utf8_trim_whitespace(column.cast(pa.string())))
    return pa.table({"product_id": columns[0], "image": columns[1]}).combine_chunks()


def _annotate(table: pa.Table, base: str) -> pa.Table:
    """Add row numbers, resolved image locations and the pre-model status of every row.

    Vectorised in polars: a Python loop here would turn a million-row catalog into millions of objects.
    """
    import polars as pl

    frame = pl.from_arrow(table).with_row_index("row").with_columns(
        pl.col("row").cast(pl.Int64), pl.col("product_id").fill_null(""), pl.col("image").fill_null("")
    )
    image = pl.col("image")
    absolute = image.str.contains("://", literal=True) | image.str.starts_with("/")
    prefix = base.rstrip("/") + "/"
    # First occurrence wins; a repeated id must not yield two tag rows for one product.
    first_row = pl.col("row").min().over("product_id")
    frame = frame.with_columns(
        pl.when(absolute | (image == "")).then(image).otherwise(pl.lit(prefix) + image).alias("location"),
        pl.when(pl.col("product_id") == "")
        .then(pl.lit("invalid_row"))
        .when(image == "")
        .then(pl.lit("invalid_row"))
        .when(first_row != pl.col("row"))
        .then(pl.lit("duplicate_id"))
        .otherwise(pl.lit(""))
        .alias("status"),
        pl.when(pl.col("product_id") == "")
        .then(pl.format("row {}: empty product_id", pl.col("row") + 1))
        .when(image == "")
        .then(pl.format("row {}: empty image", pl.col("row") + 1))
        .when(first_row != pl.col("row"))
        .then(pl.format("row {}: product_id '{}' already appears at row {}", pl.col("row") + 1, pl.col("product_id"), first_row + 1))
        .otherwise(pl.lit(""))
        .alias("message"),
    )
    columns = ("row", "product_id", "image", "location", "status", "message")
    arrow = frame.select(columns).to_arrow()
    return pa.table({name: arrow.column(name).cast(pa.int64() if name == "row" else pa.string()) for name in columns}).combine_chunks()


def _fingerprint(url: str, info: Mapping[str, Any], data: bytes) -> str:
    digest = hashlib.sha256(data)
    digest.update(json.dumps({"url": url}).encode())
    return digest.hexdigest()[:16]
