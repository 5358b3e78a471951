"""Image rows for the DataLoader: location -> bytes -> decoded pixels, or an error for that row.

The rows to read live in an Arrow IPC file that each worker memory-maps: workers share the page cache
instead of each unpickling a copy of a million-element Python list, whose refcount writes would also
defeat copy-on-write after a fork. Each item carries its manifest row number, so a bad image becomes an
error for exactly that row; nothing shifts to a neighbour.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from fsspec.asyn import sync

from . import storage
from .images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, decode_image

# Raised in the main process when a read failed for a reason that retrying later may fix (S3 down,
# timeouts, throttling beyond botocore's retries). Such rows are never committed as errors.
TRANSIENT = "transient"

# Where images may be read from. Anything else in a manifest (http://, ftp://, gs://...) is an error row,
# never a request: a manifest must not make the job fetch arbitrary URLs (SSRF) with its credentials.
READABLE_PROTOCOLS = ("file", "s3", "s3a")

# Errors that no retry can fix, whatever the store does: the location itself is unusable.
_BAD_LOCATION_ERRNOS = {errno.ENAMETOOLONG, errno.ENOTDIR, errno.ELOOP, errno.EINVAL}


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


class InvalidLocation(ValueError):
    """An image location that cannot be read, ever: unsupported scheme, malformed path or URL."""


def local_version(stat: os.stat_result) -> str:
    """A local image's version: size + mtime (ns). What ``--since`` compares without reading the file."""
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def remote_version(size: int, details: Mapping[str, Any]) -> str:
    """An object's version: size + ETag, from a GET's, a HEAD's or a listing's details alike."""
    etag = str(details.get("ETag") or details.get("etag") or details.get("md5") or "").strip('"')
    return f"{size}-{etag or details.get('LastModified', '')}"


def read_image(location: str, options: Mapping[str, Any] | None) -> tuple[bytes, str]:
    """The image's bytes and a version string (local: size + mtime; object stores: ETag + size)."""
    if storage.protocol(location) not in READABLE_PROTOCOLS:
        raise InvalidLocation(f"unsupported URL scheme {storage.protocol(location)!r}; images are local paths or s3:// URLs")
    if not storage.is_remote(location):
        path = location.removeprefix("file://")
        stat = os.stat(path)
        if not os.path.isfile(path):
            raise IsADirectoryError(path)
        with open(path, "rb") as handle:
            data = handle.read()
        return data, local_version(stat)
    fs, path = storage.filesystem(location, options)
    # HEAD then GET, under one deadline: botocore's retry budget. Without it s3fs's nested retries would let
    # a store that accepts requests and never answers hold a single image for many times that.
    details, data = sync(fs.loop, _fetch, fs, path, location, timeout=storage.read_deadline(location, options))
    return data, remote_version(len(data), details)


async def _fetch(fs: Any, path: str, location: str) -> tuple[dict[str, Any], bytes]:
    details = await fs._info(path)
    if details.get("type") == "directory":
        raise IsADirectoryError(location)
    return details, await fs._cat_file(path)


def classify_read_error(exc: BaseException, location: str) -> tuple[str, str]:
    if isinstance(exc, FileNotFoundError):
        return "missing", f"{location}: no such file or object"
    if isinstance(exc, PermissionError):
        return "forbidden", f"{location}: access denied; the credentials may not read it (s3:GetObject)"
    if isinstance(exc, IsADirectoryError):
        return "not_a_file", f"{location}: is a folder or a special file, not an image file"
    if _is_bad_location(exc, location):
        return "invalid_location", f"{location}: not a readable image location: {type(exc).__name__}: {exc}"
    return TRANSIENT, f"{location}: read failed after retries: {type(exc).__name__}: {exc}"


def _is_bad_location(exc: BaseException, location: str) -> bool:
    if isinstance(exc, (InvalidLocation, ImportError)):
        return True
    if type(exc).__name__ == "ParamValidationError":  # botocore: e.g. an invalid bucket name
        return True
    if not storage.is_remote(location):
        # Locally, a path with a NUL byte, too long, or through a file is wrong for good; S3 maps some of
        # its service errors to EINVAL too, so there these stay transient.
        return isinstance(exc, (ValueError, TypeError)) or (isinstance(exc, OSError) and exc.errno in _BAD_LOCATION_ERRNOS)
    if isinstance(exc, OSError):
        return exc.errno == errno.ENAMETOOLONG  # S3's KeyTooLongError
    return isinstance(exc, ValueError)  # e.g. s3fs: "Attempt to open non key-like path"


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
        # Set after the first transient read failure: storage looks down, the run will stop at this row's
        # batch, so the rest of this process's rows fail at once instead of each waiting out the retries.
        self._unavailable: str | None = None

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
        if self._unavailable is not None:
            return Item(row, None, "", TRANSIENT, f"{location}: not read; {self._unavailable}")
        try:
            data, version = read_image(location, self.storage_options)
        except Exception as exc:
            error_type, message = classify_read_error(exc, location)
            if error_type == TRANSIENT:
                self._unavailable = message
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
