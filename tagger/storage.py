"""Where bytes live: local paths and ``s3://`` URLs through fsspec.

One place decides how a URL becomes a filesystem, how S3 is configured (endpoint, retries, timeouts),
how an output file is committed so that a reader never sees half of it, and how secrets are kept out
of anything we print.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import re
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec

log = logging.getLogger(__name__)

# botocore's own retry/timeout knobs. "adaptive" mode backs off on 5xx, throttling and connection
# resets; the timeouts guarantee that a read against a dead endpoint fails instead of hanging.
# A person waits for the answer of a store that accepts connections and never answers: 5 attempts x (5 s
# connect + 15 s without a byte) + back-off = 115 s per read (read_deadline), then exit 4 naming the options
# that raise it. The deadline bounds a whole object's read too: a manifest or bundle that takes longer than
# that to download needs them raised (the message says how).
DEFAULT_S3_CONFIG: dict[str, Any] = {
    "retries": {"max_attempts": 4, "mode": "adaptive"},
    "connect_timeout": 5,
    "read_timeout": 15,
}

_SECRET_WORDS = ("secret", "token", "password", "key", "credential", "session")

# What a store that is down, throttling or unreachable raises once botocore's and s3fs's retries are spent
# (s3fs maps 503 SlowDown/ServiceUnavailable to EBUSY and 500 InternalError to EREMOTEIO).
_UNAVAILABLE_ERRNOS = {
    errno.EBUSY, errno.EIO, getattr(errno, "EREMOTEIO", errno.EIO), errno.ETIMEDOUT, errno.ECONNRESET,
    errno.ECONNREFUSED, errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN,
}
_UNAVAILABLE_TYPES = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError", "HTTPClientError",
    "FSTimeoutError", "ServerDisconnectedError", "ClientConnectorError", "ClientOSError", "ClientPayloadError",
}


class StorageConfigError(ValueError):
    """A storage setting that can never work (a malformed endpoint, credentials in a URL, a bad bucket name):
    an input error to fix, not an outage to wait out."""


class OutputLocationError(ValueError):
    """``--out`` cannot take the output: an existing file, a folder this user may not write, no such bucket."""


# botocore/s3fs errors that say the request itself is wrong, whatever the store's health: retrying later
# gives the same answer, so they are input errors (exit 2), never "storage unavailable" (exit 4).
_PERMANENT_TYPES = {"ParamValidationError", "InvalidEndpointError", "InvalidS3AddressingStyleError", "InvalidRegionError",
                    "NoCredentialsError", "PartialCredentialsError", "InvalidConfigError", "UnknownServiceError"}


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def storage_options(url: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """fsspec options for ``url``: the user's ``--storage-option`` values over our S3 defaults.

    Credentials are left to botocore's standard chain (environment, profile, instance role). The endpoint
    from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` is passed explicitly because not every
    aiobotocore release reads those variables itself.
    """
    options: dict[str, Any] = dict(extra or {})
    if protocol(url) in ("s3", "s3a"):
        config = dict(DEFAULT_S3_CONFIG)
        config.update(options.pop("config_kwargs", {}) or {})
        options["config_kwargs"] = config
        client = dict(options.pop("client_kwargs", {}) or {})
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if "endpoint_url" in options:
            client.setdefault("endpoint_url", options.pop("endpoint_url"))
        elif endpoint:
            client.setdefault("endpoint_url", endpoint)
        if client:
            options["client_kwargs"] = client
        if client.get("endpoint_url") is not None:
            check_endpoint(client["endpoint_url"])
    return options


def check_endpoint(endpoint: Any) -> None:
    """Refuse an S3 endpoint URL that no retry can make work, without echoing any secret in it."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(str(endpoint))
        port = parts.port  # raises for a port that is not a number
    except ValueError as exc:
        raise StorageConfigError(f"S3 endpoint URL is malformed ({exc}); expected http(s)://host[:port]") from None
    if parts.username is not None or parts.password is not None:
        shown = parts._replace(netloc=f"***@{parts.hostname}" + (f":{port}" if port else "")).geturl()
        raise StorageConfigError(
            f"S3 endpoint URL {shown} carries credentials; give them through the AWS chain (AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, a role) and name only http(s)://host[:port] as the endpoint"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StorageConfigError(f"S3 endpoint URL {endpoint!r} is not an http(s)://host[:port] URL "
                                 "(AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3 or --storage-option endpoint_url)")


# botocore's own rule for a bucket name (it also takes access-point ARNs, which pass here as they are); checked
# up front so that a bad name is one line naming it, not botocore's message with both of its regexes.
_BUCKET_NAME = re.compile(r"[a-zA-Z0-9.\-_]{1,255}")


def check_bucket_name(url: str) -> None:
    """Refuse an ``s3://`` URL whose bucket name no store accepts (:class:`StorageConfigError`, one line)."""
    if protocol(url) not in ("s3", "s3a"):
        return
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    if bucket.startswith("arn:") or _BUCKET_NAME.fullmatch(bucket):
        return
    raise StorageConfigError(f"{url}: {bucket!r} is not a valid S3 bucket name (letters, digits, '.', '-' and '_' only, "
                             "1-255 characters; AWS itself: 3-63 lowercase letters, digits, '.' and '-')")


def is_permanent(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is a configuration error of the storage that no retry fixes."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (StorageConfigError, OutputLocationError)) or type(exc).__name__ in _PERMANENT_TYPES:
            return True
        if type(exc).__name__ == "ValueError" and str(exc).startswith("Invalid endpoint"):  # botocore's own check
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def check_output_location(url: str, options: Mapping[str, Any] | None = None) -> None:
    """Refuse an ``--out`` that cannot take the output, before the run reads anything big or writes anything.

    Raises :class:`OutputLocationError` (an input error). Storage that does not answer raises what it raises
    (an outage, exit 4). Nothing is written.
    """
    if not is_remote(url):
        path = url.removeprefix("file://")
        if os.path.exists(path) and not os.path.isdir(path):
            raise OutputLocationError(f"--out {url}: is an existing file, not a folder; name a folder (it may not exist yet)")
        existing = os.path.abspath(path)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise OutputLocationError(f"--out {url}: {existing} is a file, so no folder can be made under it")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise OutputLocationError(f"--out {url}: {existing} is not writable by this user (read-only folder or "
                                      "file system); choose another --out or fix its permissions")
        return
    if protocol(url) not in ("s3", "s3a"):
        return  # another fsspec store: its first write says what is wrong
    fs, path = filesystem(url, options)
    bucket = path.split("/", 1)[0]
    try:
        fs.call_s3("head_bucket", Bucket=bucket, **deadline(url, options))
    except FileNotFoundError:
        raise OutputLocationError(f"--out {url}: bucket {bucket!r} does not exist; create it or fix --out") from None
    except PermissionError:
        # A policy may grant writes under a prefix without s3:ListBucket, which HEAD needs: that is no proof
        # the bucket is unusable. The first write says so if it is.
        log.info("--out %s: cannot check that bucket %r exists (access denied to HEAD); going on", url, bucket)
    except Exception as exc:
        if is_permanent(exc):
            raise OutputLocationError(f"--out {url}: {type(exc).__name__}: {exc}") from None
        raise


def create_exclusive(url: str, data: bytes, options: Mapping[str, Any] | None = None) -> bool:
    """Write a small file only if nothing exists at ``url``, atomically: True if this call created it.

    Locally: written under a temporary name, then hard-linked to the final name (``link`` fails if the name
    exists, and the file is never seen half-written). On S3: a conditional PUT (``If-None-Match: *``), which
    the store refuses with 412 when the key exists.
    """
    fs, path = filesystem(url, options)
    if is_remote(url):
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{name}{TEMP_MARK}{uuid.uuid4().hex[:8]}")
    with open(temporary, "wb") as handle:
        handle.write(data)
    try:
        os.link(temporary, path)
    except FileExistsError:
        return False
    finally:
        os.remove(temporary)
    return True


def read_deadline(url: str, options: Mapping[str, Any] | None = None) -> float | None:
    """Seconds that one object read may take, all retries included, or None where there is no such bound.

    botocore's own budget: attempts x (connect + read timeout) + its back-off (2^i s, at most 20 s, between
    attempts). s3fs retries on top of botocore, in two nested layers (request and body), which would multiply
    that budget 25 times against a store that accepts connections and never answers.
    """
    if protocol(url) not in ("s3", "s3a"):
        return None
    config = storage_options(url, options)["config_kwargs"]
    retries = config.get("retries") or {}
    # botocore: "max_attempts" counts retries (so total = max_attempts + 1), "total_max_attempts" counts all.
    attempts = int(retries.get("total_max_attempts") or int(retries.get("max_attempts", 4)) + 1)
    per_attempt = float(config.get("connect_timeout", 60)) + float(config.get("read_timeout", 60))
    return attempts * per_attempt + sum(min(2.0**i, 20.0) for i in range(attempts - 1))


def deadline(url: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``timeout=`` for one call of an async filesystem's (s3fs) blocking method on ``url``: fsspec's ``sync`` takes
    it and raises FSTimeoutError (storage unavailable, exit 4) when the call, all its retries included, outlasts
    :func:`read_deadline`. Without it a store that accepts connections and never answers holds the run for
    botocore's budget times s3fs's retry layers (hours at the defaults). Local paths: no keyword."""
    seconds = read_deadline(url, options)
    return {"timeout": seconds} if seconds else {}


def filesystem(url: str, options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and in-filesystem path for ``url``.

    fsspec caches instances per process, and a process that forks after one was created must not use
    it (s3fs is not fork-safe), so callers in DataLoader workers call this lazily, in the worker.
    """
    fs, path = fsspec.core.url_to_fs(url, **storage_options(url, options))
    return fs, path


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def parent(url: str) -> str:
    if is_remote(url):
        return url.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(url))


def resolve(location: str, relative_to: str) -> str:
    """An image location from a manifest, made absolute: URLs and absolute paths stay as they are,
    anything else is relative to the manifest's folder."""
    if "://" in location or os.path.isabs(location):
        return location
    return join(relative_to, location)


def read_bytes(url: str, options: Mapping[str, Any] | None = None) -> bytes:
    """The whole object, within :func:`read_deadline` on S3."""
    fs, path = filesystem(url, options)
    return fs.cat_file(path, **deadline(url, options))


def info(url: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """fsspec's ``info`` (size, type, ETag...), within :func:`read_deadline` on S3."""
    fs, path = filesystem(url, options)
    return fs.info(path, **deadline(url, options))


def modified_at(url: str, options: Mapping[str, Any] | None = None) -> float:
    """When the store last wrote the file, in seconds since the epoch, by the store's clock (S3's
    LastModified; a local file's mtime)."""
    details = info(url, options)
    stamp = details.get("LastModified", details.get("mtime", details.get("created")))
    return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)


def exists(url: str, options: Mapping[str, Any] | None = None) -> bool:
    fs, path = filesystem(url, options)
    return fs.exists(path, **deadline(url, options))


def remove_tree(url: str, options: Mapping[str, Any] | None = None) -> None:
    fs, path = filesystem(url, options)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    if is_remote(url):
        fs.invalidate_cache()


def list_files(url: str, options: Mapping[str, Any] | None = None) -> list[str]:
    fs, path = filesystem(url, options)
    if is_remote(url):
        fs.invalidate_cache(path)
    if not fs.exists(path, **deadline(url, options)):
        return []
    return sorted(posixpath.basename(p) for p in fs.ls(path, detail=False, **deadline(url, options)))


def file_sizes(url: str, options: Mapping[str, Any] | None = None) -> dict[str, int]:
    """The files directly in the folder ``url`` with their sizes in bytes ({} when there is no such folder):
    one listing, fresh (fsspec's listing cache is dropped first)."""
    fs, path = filesystem(url, options)
    if is_remote(url):
        fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True, **deadline(url, options))
    except FileNotFoundError:
        return {}
    return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0) for e in entries if e.get("type") == "file"}


def remove_file(url: str, options: Mapping[str, Any] | None = None) -> None:
    """Delete one file; gone already is fine."""
    fs, path = filesystem(url, options)
    try:
        fs.rm_file(path, **deadline(url, options))
    except FileNotFoundError:
        pass
    if is_remote(url):
        fs.invalidate_cache(posixpath.dirname(path))


TEMP_MARK = ".tmp-"


def remove_stale_temporaries(url: str) -> list[str]:
    """Delete the temporary files that writers killed mid-write (SIGKILL, OOM) left in the local folder ``url``.

    Object stores have none (an unfinished upload never becomes visible). Only call this when no writer can
    still be working in the folder, e.g. when every shard of a partition is done.
    """
    if is_remote(url):
        return []
    folder = url.removeprefix("file://")
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        if name.startswith(".") and TEMP_MARK in name:
            try:
                os.remove(os.path.join(folder, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


class CommittedFile:
    """A writable file that appears at its final name only once it is complete.

    Locally it is written under a temporary name and renamed (atomic on POSIX). S3 has no rename, but a
    PUT or multipart upload becomes visible only when it completes, so the final key is written directly;
    an interrupted upload leaves nothing behind. Either way a reader sees the whole file or none.
    """

    def __init__(self, url: str, options: Mapping[str, Any] | None = None):
        self.url = url
        self.fs, self.path = filesystem(url, options)
        self.remote = is_remote(url)
        if not self.remote:
            self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        # Locally a hidden name (a leading dot): Spark, Arrow datasets and globs skip it, so a process killed
        # mid-write leaves nothing that looks like data; remove_stale_temporaries() cleans it up later.
        folder, name = posixpath.split(self.path)
        self._write_path = self.path if self.remote else posixpath.join(folder, f".{name}{TEMP_MARK}{uuid.uuid4().hex[:8]}")
        self._file = self.fs.open(self._write_path, "wb")

    def write(self, data: bytes) -> int:
        return self._file.write(data)

    def __getattr__(self, name: str) -> Any:  # pyarrow's sink wants the rest of the file API
        return getattr(self._file, name)

    def commit(self) -> None:
        self._file.close()
        if not self.remote:
            os.replace(self._write_path, self.path)

    def abort(self) -> None:
        self._file.close()
        if not self.remote and os.path.exists(self._write_path):
            os.remove(self._write_path)


def write_bytes(url: str, data: bytes, options: Mapping[str, Any] | None = None) -> None:
    """Write a small file so that readers see the old content, or the new, never a torn one."""
    sink = CommittedFile(url, options)
    try:
        sink.write(data)
    except BaseException:
        sink.abort()
        raise
    sink.commit()


def write_parquet(url: str, table: Any, options: Mapping[str, Any] | None = None) -> None:
    """Write an Arrow table as one Parquet file (zstd), whole or absent, as :func:`write_bytes` does."""
    import pyarrow.parquet as pq

    sink = CommittedFile(url, options)
    try:
        pq.write_table(table, sink, compression="zstd")
    except BaseException:
        sink.abort()
        raise
    sink.commit()


def is_unavailable(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) says the storage is unreachable or failing for now, after retries,
    rather than that the request itself was wrong: the run should stop and be retried later (exit 4)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (TimeoutError, ConnectionError)) or type(exc).__name__ in _UNAVAILABLE_TYPES:
            return True
        if isinstance(exc, OSError) and exc.errno in _UNAVAILABLE_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def describe_unavailable(exc: BaseException) -> str:
    """``exc`` (storage unavailable) in words: fsspec's timeout says nothing itself."""
    if type(exc).__name__ == "FSTimeoutError":
        return ("the store did not answer within the read deadline (attempts x (connect + read timeout) + back-off "
                f"of config_kwargs: {read_deadline('s3://-'):.0f} s at the defaults, see tagger.storage.read_deadline); "
                "for a store that is only slow raise it, e.g. --storage-option config_kwargs.read_timeout=60 or "
                "--storage-option 'config_kwargs.retries={\"max_attempts\": 8}'")
    return f"{type(exc).__name__}: {exc}"


def redact(value: Any) -> Any:
    """A copy of ``value`` fit for logs and summaries: anything that looks like a secret is masked."""
    if isinstance(value, Mapping):
        return {
            k: ("***" if any(w in str(k).lower() for w in _SECRET_WORDS) and v not in (None, "") else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def user_cache_dir(kind: str) -> "os.PathLike[str]":
    """``$TAGGER_CACHE/<kind>``, else ``$XDG_CACHE_HOME/fashion-tagger/<kind>`` (``~/.cache`` by default):
    where converted weights and runtime exports live, one folder per kind. A user cache rather than a
    bundle's folder, which may be on S3 or read-only."""
    from pathlib import Path

    root = os.environ.get("TAGGER_CACHE")
    if root:
        return Path(root) / kind
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fashion-tagger" / kind


def file_sha256(path: "str | os.PathLike[str]") -> str:
    """Hex sha256 of a local file, read in 1 MiB blocks (weights and exports are tens of MB)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
