"""Reading the Kaggle "Fashion Product Images" layout: ``styles.csv`` + ``images/<id>.jpg``.

The real ``styles.csv`` is not valid CSV: 22 of its 44,446 lines have unquoted commas inside
``productDisplayName``, so they split into 11 or 12 fields instead of 10. ``productDisplayName`` is the
last column, so the surplus fields can only belong to it; they are joined back with the commas they
lost. Rows are returned as Polars columns (Arrow memory), never as a list of dicts.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from .. import storage
from ..attributes import ATTRIBUTES

STYLES_FILE = "styles.csv"
IMAGES_DIR = "images"
REQUIRED_COLUMNS: tuple[str, ...] = ("id", *ATTRIBUTES)
# Cells that mean "nobody recorded this": unknown, masked out of the loss, never a class of their own.
MISSING_VALUES = frozenset({"", "na", "n/a", "nan", "null", "none"})
# When an id has several files, the format Kaggle ships wins; the others are accepted for own data.
# Also what `tagger predict` picks up in a folder: every format the decoder reads (GIF too: first frame).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".gif")
_EXAMPLES = 5  # ids/line numbers kept in reports: enough to find the rows, small enough to print


class DataError(ValueError):
    """Training data that cannot be used as given, with where and what to do."""


@dataclass
class DataReport:
    """What happened to the rows of styles.csv on their way to training; goes into the bundle."""

    lines: int = 0  # data lines in styles.csv (header and blank lines excluded)
    parsed: int = 0  # rows with an id that were kept by the parser
    repaired: int = 0  # lines with unquoted commas in the last column, recovered
    repaired_lines: list[int] = field(default_factory=list)
    malformed: int = 0  # lines with too few fields: dropped
    malformed_lines: list[int] = field(default_factory=list)
    missing_id: int = 0
    duplicate_id: int = 0
    missing_image: int = 0  # no file in images/
    missing_image_ids: list[str] = field(default_factory=list)
    unreadable_image: int = 0  # a file that decode_image refused
    unreadable_image_ids: list[str] = field(default_factory=list)
    unknown_values: dict[str, int] = field(default_factory=dict)  # attr -> cells without a value
    used: int = 0  # rows that reached the split
    sources: list = field(default_factory=list)  # per --data source (and corrections file): kind, rows, labels per attribute

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}

    def note_unreadable(self, ids: list[str]) -> None:
        self.unreadable_image += len(ids)
        room = _EXAMPLES - len(self.unreadable_image_ids)
        self.unreadable_image_ids.extend(ids[: max(room, 0)])


@dataclass(frozen=True)
class ParsedStyles:
    """styles.csv as string columns (null = unknown), and how the parse went."""

    table: pl.DataFrame
    report: DataReport


@dataclass(frozen=True)
class KaggleData:
    """Rows of styles.csv that have an image, with the image's URL in column ``image``."""

    root: str  # the --data folder(s), comma-separated when several
    styles_url: str  # likewise for their styles.csv ...
    images_url: str  # ... and images/ folders, for messages
    table: pl.DataFrame
    report: DataReport
    fingerprint: str  # sha256 of styles.csv and the images/ listing: same data -> same value


def parse_styles(
    data: bytes | str,
    *,
    source: str = STYLES_FILE,
    report: DataReport | None = None,
    attributes: Sequence[str] = ATTRIBUTES,
    require_attributes: bool = True,
) -> ParsedStyles:
    """Parse ``styles.csv`` content, repairing unquoted commas in its last column.

    Returns every header column as Utf8 (``id`` included: ids are file names, not numbers), stripped,
    with :data:`MISSING_VALUES` as null. Rows without an id are dropped, and repeated ids keep their
    first row (a second row for the same image would count it twice in training and could put it in
    two splits); both are counted in the report.

    ``require_attributes=False``: an attribute without a column is not an error but an all-unknown column
    (several sources, each labelling some attributes: it is unlabelled in this one).
    """
    report = report or DataReport()
    text = data.decode("utf-8-sig", errors="replace") if isinstance(data, bytes) else data.lstrip("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataError(f"{source}: the file is empty; expected a header line starting with 'id,'") from None
    missing = [c for c in ("id", *attributes) if c not in header] if require_attributes else [c for c in ("id",) if c not in header]
    if missing:
        raise DataError(
            f"{source}: header lacks column(s) {', '.join(missing)} (found: {', '.join(header)}). "
            "--data must point at the Kaggle 'Fashion Product Images' folder (styles.csv + images/)."
        )
    width = len(header)
    columns: list[list[str | None]] = [[] for _ in header]
    seen: set[str] = set()
    id_col = header.index("id")
    for fields in reader:
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue
        report.lines += 1
        line = reader.line_num
        if len(fields) > width:
            # Only the free-text last column (productDisplayName in Kaggle's file) can hold the extras.
            fields = fields[: width - 1] + [",".join(fields[width - 1 :])]
            report.repaired += 1
            if len(report.repaired_lines) < _EXAMPLES:
                report.repaired_lines.append(line)
        elif len(fields) < width:
            report.malformed += 1
            if len(report.malformed_lines) < _EXAMPLES:
                report.malformed_lines.append(line)
            continue
        values = [_clean(v) for v in fields]
        row_id = values[id_col]
        if row_id is None:
            report.missing_id += 1
            continue
        if row_id in seen:
            report.duplicate_id += 1
            continue
        seen.add(row_id)
        for column, value in zip(columns, values):
            column.append(value)
    table = pl.DataFrame({name: pl.Series(name, values, dtype=pl.Utf8) for name, values in zip(header, columns)})
    absent = [a for a in attributes if a not in table.columns]
    if absent:
        table = table.with_columns(pl.lit(None, dtype=pl.Utf8).alias(a) for a in absent)
    report.parsed = table.height
    report.unknown_values = {a: int(table[a].null_count()) for a in attributes}
    return ParsedStyles(table, report)


def _clean(value: str) -> str | None:
    value = value.strip()
    return None if value.lower() in MISSING_VALUES else value


def image_names_by_id(names: list[str]) -> dict[str, str]:
    """``{"15970": "15970.jpg", ...}`` from a listing of images/; the earlier extension in
    :data:`IMAGE_EXTENSIONS` wins when an id has several files."""
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    best: dict[str, tuple[int, str]] = {}
    for name in names:
        stem, dot, ext = name.rpartition(".")
        key = rank.get(f"{dot}{ext}".lower())
        if not stem or key is None:
            continue
        if stem not in best or key < best[stem][0]:
            best[stem] = (key, name)
    return {stem: name for stem, (_, name) in best.items()}


def load_kaggle(
    roots: str | Sequence[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    attributes: Sequence[str] = ATTRIBUTES,
    require_attributes: bool = True,
) -> KaggleData:
    """Parse each root's ``styles.csv`` and keep the rows whose image is in one of the ``images/`` folders.

    Several roots are one data set: rows are the union of the ``styles.csv`` files (an identical copy is
    parsed once; an id listed again in another file keeps its first row, counted as ``duplicate_id``), and
    an id's image is taken from the first root that has one. Existence is decided from one listing of each
    images/ (one request per 1,000 files on S3) rather than a request per row; a listed file that turns out
    to be unreadable is dropped later, when decoded.
    """
    roots = [roots] if isinstance(roots, str) else list(roots)
    if not roots:
        raise DataError("no data folder given: --data must name at least one folder with styles.csv and images/")
    report = DataReport()
    tables: list[pl.DataFrame] = []
    seen_styles: set[bytes] = set()
    by_id: dict[str, str] = {}
    digest = hashlib.sha256()
    for root in roots:
        styles_url, images_url = storage.join(root, STYLES_FILE), storage.join(root, IMAGES_DIR)
        try:
            raw = storage.read_bytes(styles_url, storage_options)
        except FileNotFoundError:
            raise DataError(
                f"{styles_url}: not found. --data must be the folder holding styles.csv and images/ "
                "(the Kaggle 'Fashion Product Images' layout)."
            ) from None
        styles_hash = hashlib.sha256(raw).digest()
        if styles_hash not in seen_styles:  # the same labels shipped beside each folder count once
            seen_styles.add(styles_hash)
            tables.append(parse_styles(raw, source=styles_url, report=report, attributes=attributes,
                                       require_attributes=require_attributes).table)
        listing = storage.list_files(images_url, storage_options)
        if not listing:
            raise DataError(f"{images_url}: no image files found; expected images/<id>.jpg beside styles.csv")
        for stem, name in image_names_by_id(listing).items():
            by_id.setdefault(stem, storage.join(images_url, name))
        digest.update(styles_hash)
        digest.update("\n".join(listing).encode())

    table = tables[0] if len(tables) == 1 else _first_row_per_id(pl.concat(tables, how="diagonal_relaxed"), report)
    report.parsed = table.height
    report.unknown_values = {a: int(table[a].null_count()) for a in attributes}
    urls = pl.Series("image", [by_id.get(i) for i in table["id"].to_list()], dtype=pl.Utf8)
    has_image = urls.is_not_null()
    missing_ids = table.filter(~has_image)["id"]
    report.missing_image = missing_ids.len()
    report.missing_image_ids = missing_ids.head(_EXAMPLES).to_list()
    table = table.with_columns(urls).filter(has_image)
    where = ", ".join(storage.join(r, IMAGES_DIR) for r in roots)
    if table.height == 0:
        example = f" (e.g. no {report.missing_image_ids[0]}.jpg)" if report.missing_image_ids else ""
        raise DataError(
            f"none of the {report.parsed} rows of styles.csv has an image in {where}{example}. "
            "Check that --data is the Kaggle folder whose images/ goes with this styles.csv."
        )
    styles = ", ".join(storage.join(r, STYLES_FILE) for r in roots)
    return KaggleData(", ".join(roots), styles, where, table, report, f"sha256:{digest.hexdigest()}")


def _first_row_per_id(table: pl.DataFrame, report: DataReport) -> pl.DataFrame:
    unique = table.unique(subset="id", keep="first", maintain_order=True)
    report.duplicate_id += table.height - unique.height
    return unique
