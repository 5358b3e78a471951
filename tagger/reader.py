"""Image rows for the DataLoader: location -> bytes -> decoded pixels, or an error for that row.

The rows to read live in an Arrow IPC file that each worker memory-maps: workers share the page cache
instead of each unpickling a copy of a million-element Python list, whose refcount writes would also
defeat copy-on-write after a fork. Each item carries its manifest row number, so a bad image becomes an
error for exactly that row; nothing shifts to a neighbour.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from . import storage
from .images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, decode_image

# Raised in the main process when a read failed for a reason that retrying later may fix (S3 down,
# timeouts, throttling beyond botocore's retries). Such rows are never committed as errors.
TRANSIENT = "transient"


class StorageUnavailable(RuntimeError):
    pass


@dataclass
class Item:
    row: int
    pixels: np.ndarray | None
    version: str
    error_type: str
    message: str


def write_rows_file(path: str, rows: pa.Table) -> None:
    """Persist the rows to read (columns ``row``, ``location``) for the workers to memory-map."""
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, rows.schema) as writer:
        writer.write_table(rows)


def read_image(location: str, options: Mapping[str, Any] | None) -> tuple[bytes, str]:
    """The image's bytes and a version string (local: size + mtime; object stores: ETag + size)."""
    if not storage.is_remote(location):
        path = location.removeprefix("file://")
        stat = os.stat(path)
        if not os.path.isfile(path):
            raise IsADirectoryError(path)
        with open(path, "rb") as handle:
            data = handle.read()
        return data, f"{stat.st_size}-{stat.st_mtime_ns}"
    fs, path = storage.filesystem(location, options)
    with fs.open(path, "rb") as handle:
        details = getattr(handle, "details", None) or {}
        data = handle.read()
    etag = str(details.get("ETag") or details.get("etag") or details.get("md5") or "").strip('"')
    return data, f"{len(data)}-{etag or details.get('LastModified', '')}"


def classify_read_error(exc: BaseException, location: str) -> tuple[str, str]:
    if isinstance(exc, FileNotFoundError):
        return "missing", f"{location}: no such file or object"
    if isinstance(exc, PermissionError):
        return "forbidden", f"{location}: access denied; the credentials may not read it (s3:GetObject)"
    if isinstance(exc, IsADirectoryError):
        return "not_a_file", f"{location}: is a folder, not an image file"
    return TRANSIENT, f"{location}: read failed after retries: {type(exc).__name__}: {exc}"


class ImageRows(torch.utils.data.Dataset):
    def __init__(
        self,
        rows_file: str,
        size: int,
        *,
        storage_options: Mapping[str, Any] | None = None,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        draft: bool = True,
    ):
        self.rows_file = rows_file
        self.size = size
        self.storage_options = dict(storage_options or {})
        self.max_pixels = max_pixels
        self.draft = draft
        with pa.memory_map(rows_file) as source:
            self._length = pa.ipc.open_file(source).read_all().num_rows
        self._table: pa.Table | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_table"] = None  # each worker maps the file itself
        return state

    def __len__(self) -> int:
        return self._length

    def _rows(self) -> pa.Table:
        if self._table is None:
            self._table = pa.ipc.open_file(pa.memory_map(self.rows_file)).read_all()
        return self._table

    def __getitem__(self, index: int) -> Item:
        table = self._rows()
        row = table.column("row")[index].as_py()
        location = table.column("location")[index].as_py()
        try:
            data, version = read_image(location, self.storage_options)
        except Exception as exc:
            error_type, message = classify_read_error(exc, location)
            return Item(row, None, "", error_type, message)
        try:
            pixels = decode_image(data, self.size, source=location, max_pixels=self.max_pixels, draft=self.draft)
        except ImageError as exc:
            return Item(row, None, version, exc.error_type, exc.message)
        return Item(row, pixels, version, "", "")


@dataclass
class Batch:
    rows: np.ndarray  # manifest rows of the decoded images, in order
    versions: list[str]
    images: torch.Tensor | None  # uint8 (N, 3, H, W), channels-last strides
    error_rows: np.ndarray
    error_types: list[str]
    error_messages: list[str]
    size: int  # all rows in the batch, decoded or not

    def pin_memory(self) -> Batch:
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def collate(items: list[Item]) -> Batch:
    good = [item for item in items if item.pixels is not None]
    bad = [item for item in items if item.pixels is None]
    images = None
    if good:
        # NHWC stacked then viewed as NCHW: channels-last strides for free, no transpose copy.
        images = torch.from_numpy(np.stack([item.pixels for item in good])).permute(0, 3, 1, 2)
    return Batch(
        rows=np.array([item.row for item in good], dtype=np.int64),
        versions=[item.version for item in good],
        images=images,
        error_rows=np.array([item.row for item in bad], dtype=np.int64),
        error_types=[item.error_type for item in bad],
        error_messages=[item.message for item in bad],
        size=len(items),
    )
