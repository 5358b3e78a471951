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
from collections.abc import Mapping
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

    root: str
    styles_url: str
    images_url: str
    table: pl.DataFrame
    report: DataReport
    fingerprint: str  # sha256 of styles.csv and the images/ listing: same data -> same value


def parse_styles(data: bytes | str, *, source: str = STYLES_FILE, report: DataReport | None = None) -> ParsedStyles:
    """Parse ``styles.csv`` content, repairing unquoted commas in its last column.

    Returns every header column as Utf8 (``id`` included: ids are file names, not numbers), stripped,
    with :data:`MISSING_VALUES` as null. Rows without an id are dropped, and repeated ids keep their
    first row (a second row for the same image would count it twice in training and could put it in
    two splits); both are counted in the report.
    """
    report = report or DataReport()
    text = data.decode("utf-8-sig", errors="replace") if isinstance(data, bytes) else data.lstrip("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataError(f"{source}: the file is empty; expected a header line starting with 'id,'") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
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
    report.parsed = table.height
    report.unknown_values = {a: int(table[a].null_count()) for a in ATTRIBUTES}
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


def load_kaggle(root: str, storage_options: Mapping[str, Any] | None = None) -> KaggleData:
    """Parse ``root/styles.csv`` and keep the rows whose image is in ``root/images/``.

    Existence is decided from one listing of images/ (one request per 1,000 files on S3) rather than
    a request per row; a listed file that turns out to be unreadable is dropped later, when decoded.
    """
    styles_url, images_url = storage.join(root, STYLES_FILE), storage.join(root, IMAGES_DIR)
    try:
        raw = storage.read_bytes(styles_url, storage_options)
    except FileNotFoundError:
        raise DataError(
            f"{styles_url}: not found. --data must be the folder holding styles.csv and images/ "
            "(the Kaggle 'Fashion Product Images' layout)."
        ) from None
    parsed = parse_styles(raw, source=styles_url)
    listing = storage.list_files(images_url, storage_options)
    if not listing:
        raise DataError(f"{images_url}: no image files found; expected images/<id>.jpg beside styles.csv")
    by_id = image_names_by_id(listing)

    table = parsed.table
    names = [by_id.get(i) for i in table["id"].to_list()]
    has_image = pl.Series([n is not None for n in names])
    report = parsed.report
    missing_ids = table.filter(~has_image)["id"]
    report.missing_image = missing_ids.len()
    report.missing_image_ids = missing_ids.head(_EXAMPLES).to_list()
    urls = pl.Series("image", [None if n is None else storage.join(images_url, n) for n in names], dtype=pl.Utf8)
    table = table.with_columns(urls).filter(has_image)
    if table.height == 0:
        example = f" (e.g. no {report.missing_image_ids[0]}.jpg)" if report.missing_image_ids else ""
        raise DataError(
            f"{styles_url}: none of its {report.parsed} rows has an image in {images_url}{example}. "
            "Check that --data is the Kaggle folder whose images/ goes with this styles.csv."
        )

    digest = hashlib.sha256()
    digest.update(hashlib.sha256(raw).digest())
    digest.update("\n".join(listing).encode())
    return KaggleData(root, styles_url, images_url, table, report, f"sha256:{digest.hexdigest()}")
