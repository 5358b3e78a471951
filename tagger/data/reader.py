"""The one way from an image location to pixels, or to a typed error, for tag, evaluate, predict and retrain.

- :func:`read_image`: location -> bytes + version, under the store's deadline, local paths and ``s3://``
  (and ``https://`` from the hosts an :class:`tagger.data.http.HttpPolicy` allows), at most ``max_bytes``;
- :func:`fetch_image`: the same with every failure typed: :class:`ImageError` for this image (``missing``,
  ``forbidden``, ``not_a_file``, ``invalid_location``, ``too_large``), :class:`StorageUnavailable` when
  the store itself is failing;
- :class:`ImageSettings`: how every command reads an image (byte and pixel caps, draft decode, the http
  policy, storage options), built once from the options (:func:`image_settings`; jobs/options.py declares
  them) and carried whole: :meth:`ImageSettings.load` is one location -> pixels or a typed error;
- :func:`load_image`: the same as a function (retrain's data module reads through it);
- :class:`ImageRows` + :func:`collate`: rows -> pixels or each row's error, the dataset and batches of tag (both
  engines), evaluate and predict; :func:`worker_context`: their worker processes' start method.

The rows to read live in an Arrow table (for the tag job an IPC file that each worker memory-maps:
workers share the page cache instead of each unpickling a copy of a million-element Python list, whose
refcount writes would also defeat copy-on-write after a fork). Each item carries its row number, so a bad
image becomes an error for exactly that row; nothing shifts to a neighbour.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from fsspec.asyn import sync

from .. import storage
from . import http as http_images
from .decode import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, ImageError, decode_image
from .http import HttpPolicy, http_policy

if TYPE_CHECKING:
    import torch

# Raised in the main process when a read failed for a reason that retrying later may fix (S3 down,
# timeouts, throttling beyond botocore's retries). Such rows are never committed as errors.
TRANSIENT = "transient"

# Where images may be read from. Anything else in a manifest (ftp://, gs://...) is an error row, never a
# request: a manifest must not make the job fetch arbitrary URLs (SSRF) with its credentials. http(s):// is
# read only from the hosts the user allowed (an HttpPolicy: --allow-host), never on the manifest's say-so.
READABLE_PROTOCOLS = ("file", "s3", "s3a")

# Errors that no retry can fix, whatever the store does: the location itself is unusable.
_BAD_LOCATION_ERRNOS = {errno.ENAMETOOLONG, errno.ENOTDIR, errno.ELOOP, errno.EINVAL}


class StorageUnavailable(RuntimeError):
    """The store is failing for now (after retries): stop, keep what is committed, run again later."""


@dataclass
class Item:
    row: int
    pixels: np.ndarray | None
    version: str
    error_type: str
    message: str
    preview: Any = None  # ImageRows' ``preview(bytes)`` of a decoded image, when asked for (predict's thumbnails)


class InvalidLocation(ValueError):
    """An image location that cannot be read, ever: unsupported scheme, malformed path or URL."""


def local_version(stat: os.stat_result) -> str:
    """A local image's version: size + mtime (ns). What ``--since`` compares without reading the file."""
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def remote_version(size: int, details: Mapping[str, Any]) -> str:
    """An object's version: size + ETag, from a GET's, a HEAD's or a listing's details alike."""
    etag = str(details.get("ETag") or details.get("etag") or details.get("md5") or "").strip('"')
    return f"{size}-{etag or details.get('LastModified', '')}"


def read_image(
    location: str, options: Mapping[str, Any] | None, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    http: HttpPolicy | None = None,
) -> tuple[bytes, str]:
    """The image's bytes and a version string (local: size + mtime; object stores: ETag + size; HTTP: size +
    ETag or Last-Modified).

    Raises what the store raised (see :func:`classify_read_error`), or :class:`ImageError` ``too_large``
    for a file over ``max_bytes``, known from its size before it is read.
    """
    if http is not None and storage.protocol(location).lower() in http_images.SCHEMES:
        return http_images.fetch(location, http, max_bytes=max_bytes)
    if storage.protocol(location) not in READABLE_PROTOCOLS:
        # Said of the commands that have the option (predict reads local files and s3:// only): no advice to use
        # an option the command at hand lacks.
        hint = (" (http(s):// images are read only by tag, evaluate and retrain, from the hosts their --allow-host "
                "names)" if http_images.is_http(location) else "")
        raise InvalidLocation(f"unsupported URL scheme {storage.protocol(location)!r}; images are local paths or s3:// URLs{hint}")
    if not storage.is_remote(location):
        path = location.removeprefix("file://")
        stat = os.stat(path)
        if not os.path.isfile(path):
            raise IsADirectoryError(path)
        _check_size(stat.st_size, max_bytes, location)
        with open(path, "rb") as handle:
            # Sized from the stat (a cap-sized read would allocate the cap for every image); a file that
            # grew since is read on, but never more than one byte past the cap.
            data = handle.read(stat.st_size + 1)
            if len(data) > stat.st_size:
                data += handle.read(max_bytes + 1 - len(data))
        _check_size(len(data), max_bytes, location)
        return data, local_version(stat)
    fs, path = storage.filesystem(location, options)
    # HEAD then GET, under one deadline: botocore's retry budget. Without it s3fs's nested retries would let
    # a store that accepts requests and never answers hold a single image for many times that.
    details, data = sync(fs.loop, _fetch, fs, path, location, max_bytes, timeout=storage.read_deadline(location, options))
    return data, remote_version(len(data), details)


async def _fetch(fs: Any, path: str, location: str, max_bytes: int) -> tuple[dict[str, Any], bytes]:
    details = await fs._info(path)
    if details.get("type") == "directory":
        raise IsADirectoryError(location)
    # The HEAD's size decides before the GET: an oversized object is refused without downloading it.
    _check_size(int(details.get("size") or 0), max_bytes, location)
    return details, await fs._cat_file(path)


def _check_size(size: int, max_bytes: int, location: str) -> None:
    if size > max_bytes:
        raise ImageError(
            "too_large",
            f"{location}: {size:,} bytes exceeds the limit of {max_bytes:,} (raise --max-image-bytes if such files are expected)",
        )


def fetch_image(
    location: str, options: Mapping[str, Any] | None, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    http: HttpPolicy | None = None,
) -> tuple[bytes, str]:
    """:func:`read_image` with its failures typed: :class:`ImageError` when this image cannot be had (its
    ``error_type`` is the errors-table code), :class:`StorageUnavailable` when the store is failing for now."""
    try:
        return read_image(location, options, max_bytes=max_bytes, http=http)
    except Exception as exc:
        error_type, message = classify_read_error(exc, location)
        if error_type == TRANSIENT:
            raise StorageUnavailable(message) from exc
        raise ImageError(error_type, message) from None


@dataclass(frozen=True)
class ImageSettings:
    """How an image is read, the same in every command: the byte cap (refused from the size, before reading),
    the pixel cap (decompression bombs, refused from the header), JPEG draft decode, which http(s):// hosts may
    be read and how patiently (None: none), and the fsspec options of s3:// and other stores. Frozen and
    picklable: it travels whole to DataLoader workers and Ray's decode tasks."""

    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    draft: bool = True
    http: HttpPolicy | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def fetch(self, location: str) -> tuple[bytes, str]:
        """Bytes and version, or :class:`ImageError` / :class:`StorageUnavailable` (:func:`fetch_image`)."""
        return fetch_image(location, self.storage_options, max_bytes=self.max_bytes, http=self.http)

    def decode(self, data: bytes, size: int, location: str) -> np.ndarray:
        return decode_image(data, size, source=location, max_pixels=self.max_pixels, draft=self.draft)

    def load(self, location: str, size: int) -> np.ndarray:
        """Location -> ``(size, size, 3)`` uint8 (read-only), exactly as the tag job prepares it; raises like
        :func:`fetch_image` and :func:`tagger.data.decode.decode_image`."""
        data, _ = self.fetch(location)
        return self.decode(data, size, location)


def image_settings(*, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                   draft_decode: bool = True, allow_hosts: Sequence[str] = (), allow_private_addresses: bool = False,
                   allow_plain_http: bool = False, http_deadline: float = 120.0,
                   storage_options: Mapping[str, Any] | None = None) -> ImageSettings:
    """The image options as every command names them (jobs/options.py) -> :class:`ImageSettings`. ValueError
    for values that cannot be (a cap under 1, http options that contradict each other, a host that is not one)."""
    problems = [f"{name} must be >= 1" for name, value in (("max_image_bytes", max_image_bytes),
                                                           ("max_image_pixels", max_image_pixels)) if value < 1]
    if problems:
        raise ValueError("; ".join(problems))
    http = http_policy(tuple(allow_hosts), allow_private_addresses=allow_private_addresses,
                       allow_plain_http=allow_plain_http, deadline=http_deadline)
    return ImageSettings(max_image_bytes, max_image_pixels, draft_decode, http, dict(storage_options or {}))


# The fields of a command's config that say how it reads images, named as the options are (jobs/options.py).
IMAGE_OPTIONS = ("max_image_bytes", "max_image_pixels", "draft_decode", "allow_hosts", "allow_private_addresses",
                 "allow_plain_http", "http_deadline", "storage_options")


def image_settings_of(config: Any) -> ImageSettings:
    """:func:`image_settings` from the fields of ``IMAGE_OPTIONS`` that a command's config has (tag's, evaluate's,
    retrain's): each command reads its images the same way from the same options."""
    return image_settings(**{name: getattr(config, name) for name in IMAGE_OPTIONS if hasattr(config, name)})


def load_image(location: str, size: int, images: ImageSettings | None = None) -> np.ndarray:
    """:meth:`ImageSettings.load` with ``images`` (default: the default caps, no http, no storage options)."""
    return (images or ImageSettings()).load(location, size)


def classify_read_error(exc: BaseException, location: str) -> tuple[str, str]:
    """``(error_type, message)`` for an exception of :func:`read_image`; :data:`TRANSIENT` when retrying
    later may succeed."""
    if isinstance(exc, ImageError):
        return exc.error_type, exc.message
    if isinstance(exc, http_images.InvalidHttpLocation):
        return "invalid_location", str(exc)
    if isinstance(exc, http_images.HttpUnavailable):
        return TRANSIENT, f"{exc} (the server is failing; the same command resumes later)"
    if isinstance(exc, FileNotFoundError):
        return "missing", f"{location}: no such file or object"
    if isinstance(exc, PermissionError):
        return "forbidden", f"{location}: access denied; the credentials may not read it (s3:GetObject)"
    if isinstance(exc, IsADirectoryError):
        return "not_a_file", f"{location}: is a folder or a special file, not an image file"
    if _is_bad_location(exc, location):
        return "invalid_location", f"{location}: not a readable image location: {type(exc).__name__}: {exc}"
    return TRANSIENT, f"{location}: read failed after retries: {storage.describe_unavailable(exc)}"


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


class ImageRows:
    """Rows ``(row, location)`` -> :class:`Item`: pixels, or the row's error, never a gap.

    A map-style dataset as the DataLoader takes it (``__len__`` + ``__getitem__``), deliberately not a
    ``torch.utils.data.Dataset``: the Ray engine's decode tasks use it without torch, which would add ~3 s of
    imports and ~350 MiB to each decode worker. Torch comes in with :func:`collate`.

    ``rows``: the path of an Arrow IPC file with columns ``row`` (int64) and ``location`` (string),
    memory-mapped by each worker (the tag job's millions of rows), or such a table in memory (evaluate,
    predict; see :meth:`from_locations`). ``images``: how each is read (default: the default caps, no http).
    ``preview``: a picklable function of the image's bytes whose result rides along with decoded images,
    so that predict's thumbnails need no second read.
    """

    def __init__(self, rows: str | pa.Table, size: int, images: ImageSettings | None = None, *,
                 preview: Callable[[bytes], Any] | None = None):
        self.rows_file = rows if isinstance(rows, str) else None
        self.size = size
        self.images = images or ImageSettings()
        self.preview = preview
        if self.rows_file is None:
            self._table: pa.Table | None = rows
            self._length = rows.num_rows
        else:
            with pa.memory_map(self.rows_file) as source:
                self._length = pa.ipc.open_file(source).read_all().num_rows
            self._table = None
        # Set after the first transient read failure: storage looks down, the run will stop at this row's
        # batch, so the rest of this process's rows fail at once instead of each waiting out the retries.
        self._unavailable: str | None = None

    @classmethod
    def from_locations(cls, locations: Sequence[str], size: int, images: ImageSettings | None = None, *,
                       preview: Callable[[bytes], Any] | None = None) -> ImageRows:
        """Rows numbered 0..n-1 in the order given."""
        table = pa.table({"row": pa.array(np.arange(len(locations)), pa.int64()), "location": pa.array(list(locations), pa.string())})
        return cls(table, size, images, preview=preview)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self.rows_file is not None:
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
            data, version = self.images.fetch(location)
        except StorageUnavailable as exc:
            self._unavailable = str(exc)
            return Item(row, None, "", TRANSIENT, str(exc))
        except ImageError as exc:
            return Item(row, None, "", exc.error_type, exc.message)
        try:
            pixels = self.images.decode(data, self.size, location)
        except ImageError as exc:
            return Item(row, None, version, exc.error_type, exc.message)
        return Item(row, pixels, version, "", "", self.preview(data) if self.preview is not None else None)


def worker_context(method: str, remote: bool) -> multiprocessing.context.BaseContext:
    """The start method of image workers: ``auto`` forks for local data and uses a forkserver when S3 is
    involved (s3fs keeps an event loop and connections that a forked child must not reuse; forkserver
    children start from a clean server process that has this module imported already)."""
    if method == "auto":
        method = "forkserver" if remote else "fork"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload([__name__])
    return context


@dataclass
class Batch:
    rows: np.ndarray  # manifest rows of the decoded images, in order
    versions: list[str]
    images: torch.Tensor | None  # uint8 (N, 3, H, W), channels-last strides
    error_rows: np.ndarray
    error_types: list[str]
    error_messages: list[str]
    size: int  # all rows in the batch, decoded or not
    previews: list[Any] | None = None  # per decoded image, when the dataset makes previews
    images_used: np.ndarray | None = None  # per tagged row, the photos its tags come from (None: one each)
    # Several photos per product: (row, error_type, message) of every photo that could not be read, also of the
    # products tagged from their other photos (the run summary counts them; the errors table has products only).
    photo_errors: list[tuple[int, str, str]] | None = None
    targets: np.ndarray | None = None  # labelled rows (retrain's val/test): per decoded image, its label indices

    def pin_memory(self) -> Batch:
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def collate(items: list[Item]) -> Batch:
    import torch

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
        previews=[item.preview for item in good] if any(item.preview is not None for item in good) else None,
    )
