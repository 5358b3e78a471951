"""Read and check a catalog manifest: product ids and image locations, as Arrow columns.

A manifest is CSV, Parquet or JSON Lines (optionally gzipped), local or on S3. It is read columnar,
only the two columns we need, so a million-row catalog is two Arrow string arrays, not a million
Python objects. Anything that makes the whole manifest unusable raises :class:`ManifestError` before
any model work; problems of single rows (empty id or image, a repeated id) become error rows.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import storage

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


# How a Parquet/JSON Lines list of photos is written in the ``image`` column (and the tags table) when no
# --image-separator is given: a character that no path or URL of a photo holds in practice.
LIST_SEPARATOR = "|"


@dataclass(frozen=True)
class Manifest:
    url: str
    # Columns: row (int64, 0-based manifest position), product_id, image (as written in the manifest; a list
    # of photos joined by ``separator``), status ("" = to tag, else an error_type), message. Where to read
    # each image: :meth:`locations`, each photo: :meth:`photo_locations`.
    table: pa.Table
    fingerprint: str
    # The ``extra_columns`` asked for that the file has (retrain's label columns), as text, row for row with
    # ``table``; None when none were asked for (the tag job).
    extra: pa.Table | None = None
    # Several photos per product: the separator of the image cells (--image-separator, or LIST_SEPARATOR for a
    # list column); None: one photo per row, the image cell as a whole (today's meaning).
    separator: str | None = None

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def locations(self, rows: pa.Table | None = None) -> pa.Array:
        """The absolute path or URL of each image of ``rows`` (default: every row), made on demand.

        Not a column of :attr:`table`: for a million relative paths it would be ~50 MiB held for the whole
        run, while only planning and the workers' rows file need it.
        """
        source = self.table if rows is None else rows
        return resolve_locations(source.column("image"), storage.parent(self.url), self.separator)

    def photo_locations(self, rows: pa.Table) -> tuple[pa.Array, pa.Array]:
        """One entry per photo of ``rows``, in order: its manifest row and its location. One photo per row
        without a separator; else each non-blank piece of the cell, so a product's photos are consecutive."""
        if self.separator is None:
            return rows.column("row"), self.locations(rows)
        pieces = split_photos(rows.column("image"), self.separator)
        parents = pc.list_parent_indices(pieces)
        return (pc.take(rows.column("row"), parents),
                resolve_locations(pc.list_flatten(pieces), storage.parent(self.url)))


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
    extra_columns: tuple[str, ...] = (),
    image_separator: str | None = None,
) -> Manifest:
    """``extra_columns``: more columns to keep as text (a labelled manifest's label columns); those the file
    lacks are simply absent from :attr:`Manifest.extra`. ``image_separator``: the image cells hold several
    photos separated by it (a CSV); a list column (Parquet, JSON Lines) always holds several, joined by it or
    by :data:`LIST_SEPARATOR` in ``image``."""
    if image_separator is not None and not image_separator.strip():
        raise ManifestError(f"--image-separator {image_separator!r}: a blank separator would split paths with spaces; use e.g. ';' or '|'")
    if id_column == image_column:  # one column cannot be both: Arrow would select it twice and fail on the name
        raise ManifestError(f"--id-column and --image-column both name {id_column!r}; a product's id and its image "
                            "are two columns of the manifest: name each with its own option")
    fmt = fmt or detect_format(url)
    data, info = _read_file(url, storage_options)
    table = _parse(data, fmt, url, (id_column, image_column), tuple(extra_columns))
    fingerprint = _fingerprint(url, info, data)
    del data  # a big manifest's bytes are not needed once parsed
    extra = _extra(table, url, extra_columns) if extra_columns else None
    table, separator, clash = _select(table, url, id_column, image_column, image_separator)
    return Manifest(url=url, table=_annotate(table, storage.parent(url), separator, clash), fingerprint=fingerprint,
                    extra=extra, separator=separator)


def read_columns(
    url: str, columns: tuple[str, ...], *, fmt: str | None = None, storage_options: Mapping[str, Any] | None = None
) -> tuple[pa.Table, str]:
    """``(the named columns as text, fingerprint)`` of a table file with the manifest's formats, locations and
    checks (a corrections file: product id, attribute, label); a missing column is an error naming it."""
    fmt = fmt or detect_format(url)
    data, info = _read_file(url, storage_options)
    table = _parse(data, fmt, url, columns)
    fingerprint = _fingerprint(url, info, data)
    del data
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ManifestError(f"{url}: missing column(s) {', '.join(missing)}; columns found: {', '.join(table.column_names) or 'none'}")
    return _extra(table, url, columns), fingerprint


def _read_file(url: str, storage_options: Mapping[str, Any] | None) -> tuple[bytes, Mapping[str, Any]]:
    try:
        info = storage.info(url, storage_options)
    except FileNotFoundError:
        raise ManifestError(f"{url}: manifest not found") from None
    except PermissionError as exc:
        raise ManifestError(f"{url}: manifest cannot be read with these credentials ({exc})") from None
    if info.get("type") == "directory":
        raise ManifestError(f"{url}: is a folder; --catalog takes one manifest file")
    if info.get("type") != "file":
        # A FIFO, a device or a socket: reading it would block until some other process writes, for ever.
        raise ManifestError(f"{url}: is not a regular file ({info.get('type')}: a FIFO, device or socket); "
                            "--catalog takes a manifest file, written out in full before the run")
    try:
        # One whole-object read (within the store's deadline, see storage.read_deadline), then decompressed
        # in memory: a streamed read's many small requests would each wait out the store on their own.
        data = _decompress(storage.read_bytes(url, storage_options), url)
    except (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as exc:
        raise ManifestError(f"{url}: cannot decompress the manifest ({type(exc).__name__}: {exc}); is it really compressed as its name says?") from None
    if not data.strip():
        raise ManifestError(f"{url}: the file is empty (not even a header); an empty catalog is a header-only file")
    return data, info


def _extra(table: pa.Table, url: str, names: tuple[str, ...]) -> pa.Table:
    """The wanted columns the file has, as text; a nested column (a list, a struct) is no label."""
    columns = {}
    for name in names:
        if name not in table.column_names:
            continue
        column = table.column(name)
        if pa.types.is_nested(column.type) or pa.types.is_binary(column.type):
            raise ManifestError(f"{url}: column {name!r} has type {column.type}; a label column holds text (or numbers)")
        columns[name] = column.cast(pa.string())
    return pa.table(columns) if columns else pa.table({"_": pa.nulls(table.num_rows, pa.string())}).drop(["_"])


def _decompress(raw: bytes, url: str) -> bytes:
    """``raw`` as its name's suffix says it is compressed (.gz, .bz2, .xz, .zst...: fsspec's inference)."""
    from fsspec.compression import compr
    from fsspec.utils import infer_compression

    codec = infer_compression(url)
    if codec is None:
        return raw
    with compr[codec](io.BytesIO(raw), mode="rb") as handle:
        return handle.read()


def sniff_format(data: bytes) -> str | None:
    """What the bytes look like, whatever the file's name says: parquet, jsonl, csv, utf16, or None (binary)."""
    if data[:4] == b"PAR1":
        return "parquet"
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "utf16"
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head[:1] == b"{":
        return "jsonl"
    if b"\x00" in head:
        return None
    return "csv"


def _parse(data: bytes, fmt: str, url: str, wanted: tuple[str, ...], optional: tuple[str, ...] = ()) -> pa.Table:
    looks_like = sniff_format(data)
    if looks_like != fmt and (looks_like in ("parquet", "utf16", None) or fmt == "parquet"):
        what = {"parquet": "a Parquet file", "jsonl": "JSON Lines", "csv": "text (CSV?)", None: "binary data",
                "utf16": "UTF-16 text (re-encode it as UTF-8)"}[looks_like]
        advice = "" if looks_like == "utf16" else ". Name the file after its format (.csv, .parquet, .jsonl) or pass --catalog-format"
        raise ManifestError(f"{url}: not a valid {fmt.upper()} manifest: the content is {what}{advice}")
    try:
        if fmt == "csv":
            from pyarrow import csv

            delimiter = "\t" if url.lower().removesuffix(".gz").endswith(".tsv") else ","
            # Every column read as text: ids like 000123 must keep their zeros.
            header = _csv_header(data, delimiter)
            _refuse_duplicate_names(header)
            if not data.endswith(b"\n"):
                data += b"\n"  # a header-only file without a final newline is still a header
            return csv.read_csv(
                io.BytesIO(data),
                parse_options=csv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                convert_options=csv.ConvertOptions(
                    column_types={name: pa.string() for name in header},
                    # Every column when one is missing, so that the error can list what the file has.
                    include_columns=[*wanted, *(c for c in optional if c in header and c not in wanted)] if set(wanted) <= set(header) else None,
                    strings_can_be_null=True,
                ),
            )
        if fmt == "parquet":
            import pyarrow.parquet as pq

            schema = pq.read_schema(io.BytesIO(data))
            _refuse_duplicate_names(schema.names)
            keep = [*wanted, *(c for c in optional if c in schema.names and c not in wanted)]
            return pq.read_table(io.BytesIO(data), columns=keep if set(wanted) <= set(schema.names) else None)
        if fmt == "jsonl":
            from pyarrow import json as pajson

            try:
                return pajson.read_json(io.BytesIO(data))
            except pa.ArrowInvalid as exc:
                if "changed from" not in str(exc):
                    raise
                # Ids that are numbers on some lines and text on others: Arrow will not mix them; polars
                # reads just our columns as text.
                import polars as pl

                try:
                    return pl.read_ndjson(io.BytesIO(data), schema={c: pl.String for c in (*wanted, *optional)}).to_arrow()
                except Exception:
                    raise exc from None
    except ManifestError as exc:
        raise ManifestError(f"{url}: not a valid {fmt.upper()} manifest: {exc}") from None
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, UnicodeDecodeError, ValueError) as exc:
        detail = _locate_bad_utf8(data) if fmt != "parquet" else None
        if detail is None and fmt == "jsonl":
            detail = _locate_bad_json(data)
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


def _refuse_duplicate_names(names: list[str]) -> None:
    """Two columns of one name: which one holds the ids is a guess, and Arrow would silently take the first."""
    seen: set[str] = set()
    repeated = sorted({name for name in names if name in seen or seen.add(name)})
    if repeated:
        raise ManifestError(f"the header names column(s) {', '.join(map(repr, repeated))} more than once; "
                            "rename the duplicates so that each column has its own name")


def _locate_bad_utf8(data: bytes) -> str | None:
    for number, line in enumerate(data.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"line {number} is not valid UTF-8 (byte {line[exc.start:exc.start + 1]!r} at column {exc.start + 1}); re-encode the file as UTF-8"
    return None


def _locate_bad_json(data: bytes) -> str | None:
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            return f"line {number} is not valid JSON ({exc})"
        if not isinstance(value, dict):
            return f"line {number} is a JSON {type(value).__name__}, not an object with the manifest's columns"
    return None


def _select(table: pa.Table, url: str, id_column: str, image_column: str,
            separator: str | None = None) -> tuple[pa.Table, str | None, np.ndarray | None]:
    missing = [c for c in (id_column, image_column) if c not in table.column_names]
    if missing:
        found = ", ".join(table.column_names) or "none"
        names = table.column_names
        # A header read as one column holding another separator: an Excel export in a ';' locale, say. Renaming
        # columns would not help, so the hint is the separator.
        other = next((d for d in (";", "\t", "|") if len(names) == 1 and d in names[0]), None)
        hint = (f"The header is one column holding {other!r}: the file looks {other!r}-separated, and a CSV manifest is "
                "read comma-separated (tab-separated when named .tsv); export it with commas" if other
                else "Name them with --id-column / --image-column")
        raise ManifestError(f"{url}: missing column(s) {', '.join(missing)}; columns found: {found}. {hint}.")
    columns, clash = [], None
    for name in (id_column, image_column):
        column = table.column(name)
        if name == image_column and (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
            # Several photos per product as a list: kept as one text cell, the photos joined by the separator.
            separator = separator or LIST_SEPARATOR
            values = pc.list_flatten(column)
            if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type) or pa.types.is_null(values.type)):
                raise ManifestError(f"{url}: column {name!r} is a list of {values.type}; expected a list of image paths or URLs")
            lists = column.combine_chunks().cast(pa.list_(pa.string()))
            # A null photo in a list is no photo, as a blank piece between separators: the product keeps its
            # other photos (images_used says how many), where a join with the null would blank the whole cell.
            values = pc.fill_null(lists.flatten(), "")
            # A photo that holds the separator (a URL's query string may) would split in two: that product is an
            # invalid row (_annotate says why), not the whole manifest refused for one row.
            hit = pc.match_substring(values, separator).to_numpy(zero_copy_only=False)
            clash = np.zeros(len(lists), dtype=bool)
            clash[pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)[hit]] = True
            lists = pa.ListArray.from_arrays(lists.offsets, pc.fill_null(lists.values, ""),
                                             mask=pc.or_(lists.is_null(), pa.array(clash)))
            columns.append(pc.binary_join(lists, separator))
            continue
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_integer(column.type)):
            raise ManifestError(f"{url}: column {name!r} has type {column.type}; expected text (or integer ids)")
        # Kept exactly as written: ' p1' and 'p1' are two ids (a join on the output must find what the
        # catalog holds). Blank values are caught in _annotate.
        columns.append(column.cast(pa.string()))
    return pa.table({"product_id": columns[0], "image": columns[1]}).combine_chunks(), separator, clash


def _annotate(table: pa.Table, base: str, separator: str | None = None, clash: np.ndarray | None = None) -> pa.Table:
    """Add row numbers and the pre-model status of every row (locations: :meth:`Manifest.locations`).

    Vectorised in Arrow and numpy: a Python loop here would turn a million-row catalog into millions of
    objects. (It used polars until the memory benchmark showed polars' allocator keeping ~300 MiB of a
    1M-row manifest's intermediates for the rest of the run; Arrow's pool gives them back.)
    """
    import numpy as np

    pa.default_memory_pool().release_unused()  # what parsing left behind, before the next allocations
    n = table.num_rows
    product_id = pc.fill_null(table.column("product_id"), "").combine_chunks()
    image = pc.fill_null(table.column("image"), "").combine_chunks()
    row = np.arange(n, dtype=np.int64)
    # First occurrence wins; a repeated id must not yield two tag rows for one product.
    codes = pc.dictionary_encode(product_id).indices.to_numpy(zero_copy_only=False)
    _, first_of_code = np.unique(codes, return_index=True)
    first = first_of_code[codes]
    del codes, first_of_code
    empty_id = pc.equal(pc.utf8_trim_whitespace(product_id), "").to_numpy(zero_copy_only=False)
    if separator is None:
        empty_image = pc.equal(pc.utf8_trim_whitespace(image), "").to_numpy(zero_copy_only=False)
    else:  # no photo at all among the pieces ("", " ; ")
        empty_image = pc.equal(pc.list_value_length(split_photos(image, separator)), 0).to_numpy(zero_copy_only=False)
    invalid = empty_id | empty_image
    duplicate = ~invalid & (first != row)
    status = pc.if_else(pa.array(invalid), "invalid_row", pc.if_else(pa.array(duplicate), "duplicate_id", ""))
    # Messages are written for the flagged rows only, then spread out with a take (the others get "").
    flagged = np.flatnonzero(invalid | duplicate)
    texts = pa.array([""], pa.string())
    if len(flagged):
        number = pc.cast(pa.array(flagged + 1), pa.string())
        repeated = pc.binary_join_element_wise(
            "row ", number, ": product_id '", pc.take(product_id, pa.array(flagged)), "' already appears at row ",
            pc.cast(pa.array(first[flagged] + 1), pa.string()), "",
        )
        no_image = pc.if_else(pa.array(empty_image[flagged]), pc.binary_join_element_wise("row ", number, ": empty image", ""), repeated)
        if clash is not None and clash.any():
            no_image = pc.if_else(pa.array(clash[flagged]), pc.binary_join_element_wise(
                "row ", number, f": a photo contains {separator!r}, which joins a product's photos in the tags table; "
                "choose another with --image-separator", ""), no_image)
        texts = pa.concat_arrays([texts, pc.if_else(pa.array(empty_id[flagged]), pc.binary_join_element_wise("row ", number, ": empty product_id", ""), no_image)])
    slot = np.zeros(n, dtype=np.int64)
    slot[flagged] = np.arange(1, len(flagged) + 1)
    message = pc.take(texts, pa.array(slot))
    del first, slot
    columns = {"row": pa.array(row), "product_id": product_id, "image": image, "status": status, "message": message}
    result = pa.table({k: v.cast(pa.int64() if k == "row" else pa.string()) for k, v in columns.items()}).combine_chunks()
    pa.default_memory_pool().release_unused()  # the intermediates of a big manifest go back to the system
    return result


def split_photos(image: pa.Array | pa.ChunkedArray, separator: str) -> pa.ListArray:
    """Each cell's photos: the pieces between separators, trimmed, blank ones dropped (a list per row)."""
    if isinstance(image, pa.ChunkedArray):
        image = image.combine_chunks()
    pieces = pc.split_pattern(pc.fill_null(image.cast(pa.string()), ""), separator)
    values = pc.utf8_trim_whitespace(pc.list_flatten(pieces))
    keep = pc.not_equal(values, "").to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(pieces).to_numpy(zero_copy_only=False)
    counts = np.bincount(parents[keep], minlength=len(image)) if len(parents) else np.zeros(len(image), np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values.filter(pa.array(keep)))


def resolve_locations(image: pa.Array | pa.ChunkedArray, base: str, separator: str | None = None) -> pa.Array | pa.ChunkedArray:
    """The manifest's image column -> the locations to read (absolute paths or URLs).

    URLs and absolute paths stay as written, anything else is relative to ``base``, the manifest's folder.
    Also used by ``--since`` to resolve a previous run's images against that run's manifest folder. With a
    ``separator``, each photo of a cell is resolved, and the cell's photos joined again by it.
    """
    if separator is not None:
        pieces = split_photos(image, separator)
        resolved = resolve_locations(pc.list_flatten(pieces), base)
        return pc.binary_join(pa.ListArray.from_arrays(pieces.offsets, resolved), separator)
    image = image.cast(pa.string())
    absolute = pc.or_(pc.match_substring(image, "://"), pc.starts_with(image, "/"))
    keep = pc.or_(absolute, pc.equal(image, ""))
    return pc.if_else(keep, image, pc.binary_join_element_wise(base.rstrip("/") + "/", image, ""))


def _fingerprint(url: str, info: Mapping[str, Any], data: bytes) -> str:
    digest = hashlib.sha256(data)
    digest.update(json.dumps({"url": url}).encode())
    return digest.hexdigest()[:16]


def catalog_columns(url: str, *, fmt: str | None = None, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The manifest's column names, from its header (CSV), schema (Parquet) or first line (JSON Lines),
    without reading the rest: what the report looks at to find the catalog's own label columns."""
    fmt = fmt or detect_format(url)
    fs, path = storage.filesystem(url, storage_options)
    try:
        with fs.open(path, "rb", compression="infer") as handle:
            if fmt == "parquet":
                import pyarrow.parquet as pq

                return list(pq.ParquetFile(handle).schema_arrow.names)
            first = handle.readline()
    except FileNotFoundError:
        raise ManifestError(f"{url}: catalog not found; name it with --catalog") from None
    if fmt == "csv":
        delimiter = "\t" if url.lower().removesuffix(".gz").endswith(".tsv") else ","
        return _csv_header(first, delimiter)
    try:
        return list(json.loads(first))
    except (ValueError, TypeError):
        raise ManifestError(f"{url}: line 1 is not a JSON object with the manifest's columns") from None


def iter_catalog_columns(
    url: str,
    columns: list[str],
    *,
    fmt: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    batch_rows: int = 8_192,
):
    """The named columns of a manifest as Arrow record batches of text, streamed in manifest order: a
    million-row catalog is never held whole (CSV and Parquet; JSON Lines has no streaming reader in
    Arrow and is read at once). Integers become text, so ``000123`` and ``123`` stay what they were."""
    fmt = fmt or detect_format(url)
    fs, path = storage.filesystem(url, storage_options)
    with fs.open(path, "rb", compression="infer") as handle:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            batches = pq.ParquetFile(handle).iter_batches(batch_size=batch_rows, columns=columns)
        elif fmt == "csv":
            from pyarrow import csv

            delimiter = "\t" if url.lower().removesuffix(".gz").endswith(".tsv") else ","
            batches = csv.open_csv(
                handle,
                # One thread, 1 MiB blocks: what the reader holds does not grow with the catalog.
                read_options=csv.ReadOptions(block_size=1 << 20, use_threads=False),
                parse_options=csv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                convert_options=csv.ConvertOptions(column_types={c: pa.string() for c in columns},
                                                   include_columns=columns, strings_can_be_null=True),
            )
        else:
            from pyarrow import json as pajson

            batches = pajson.read_json(handle).select(columns).to_batches(max_chunksize=batch_rows)
        for batch in batches:
            yield pa.RecordBatch.from_arrays([batch.column(c).cast(pa.string()) for c in columns], names=columns)
