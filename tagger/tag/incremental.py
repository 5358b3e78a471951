"""``--since``: carry the previous night's tags over for products whose image did not change.

A manifest row is *reused* when its product_id, image location, image_version and the model_version all
equal those of a row of the previous output's latest complete (``_SUCCESS``) partition. The current
image_version is learnt without decoding anything, the way :func:`tagger.data.reader.read_image` would
report it: local files are ``stat``-ed (a thread pool), S3 objects are listed per folder (one LIST
request per 1,000 keys instead of a HEAD per image), with a HEAD per object where a folder holds only a
few of the wanted keys or listing is refused (s3:ListBucket is not always granted).

The decision is taken once, when the run is planned, and stored beside the plan as
``_runs/run_date=.../reuse.parquet`` (the reused tag rows, keyed by manifest row, one row group per
shard): a resumed run and every ``--shard I/N`` task reuse exactly the same rows, and only the others
go through the DataLoader.

Reused rows are copied verbatim, with the ``run_id`` and ``tagged_at`` of the run that actually ran the
model on that image: they say when and by which run the tags were computed. A row whose ``run_id``
differs from the partition's run (``_SUCCESS`` and the summary name it) was carried over. Only
``product_id`` and ``image`` come from today's manifest (the same product at the same location).
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat as stat_module
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import storage
from . import writers
from .partition import Partition
from ..data import http as http_images
from ..data.http import HttpPolicy
from ..data.reader import READABLE_PROTOCOLS, StorageUnavailable, local_version, remote_version

log = logging.getLogger(__name__)

REUSE_FILE = "reuse.parquet"
STAT_THREADS = 32
# A folder holding fewer wanted objects than this is HEADed object by object rather than listed: a
# listing costs a request per 1,000 keys of the *whole* folder, which may be far larger than the catalog.
LIST_MIN_OBJECTS = 64
_CHUNK = 65_536  # rows handled at a time: bounded Python objects whatever the catalog's size
PROBE_STATS = 256  # local files stat-ed one by one first, to tell a page-cache hit from a round trip
FAST_STAT_S = 50e-6


class SinceError(ValueError):
    """``--since`` names something that cannot be reused; the message says what and why."""


@dataclass(frozen=True)
class Previous:
    out: str
    run_date: str
    tags: str  # the tags partition URL
    success: dict[str, Any]


def check_since(since: str | None, out: str, options: Mapping[str, Any] | None = None, *, missing_ok: bool = False) -> None:
    """A ``--since`` that names nothing is refused (exit 2) before the run starts, unless it is the run's own
    ``--out`` or ``missing_ok``: the first night of a chain and a mistyped path cannot be told apart by the path
    alone, and a typo that quietly re-tags the whole catalog costs a night's compute and hides the mistake."""
    if not since or missing_ok or _same_place(since, out):
        return  # --since OUT: its first night has nothing yet, and every later night finds the earlier ones there
    if not storage.exists(since, options):
        raise SinceError(
            f"--since {since}: no such folder. Give the output root of earlier nights (e.g. this run's --out) or a "
            "partition OUT/tags/run_date=YYYY-MM-DD; on a first night, leave --since out or add --since-missing-ok"
        )


def find_previous(since: str, run_date: str, options: Mapping[str, Any] | None = None, *, current_out: str | None = None) -> Previous | None:
    """The partition ``--since`` points at.

    ``since`` is either a tags partition (``OUT/tags/run_date=YYYY-MM-DD``, which must be complete) or an
    output root, whose latest complete partition dated before ``run_date`` is taken (None when it has none:
    the first night of an incremental schedule tags everything).
    """
    since = since.rstrip("/") or since
    name = posixpath.basename(since)
    if name.startswith("run_date="):
        tables_dir = storage.parent(since)
        if posixpath.basename(tables_dir.rstrip("/")) != "tags":
            raise SinceError(f"--since {since}: a partition must be a tags partition, OUT/tags/run_date=YYYY-MM-DD")
        date = name.split("=", 1)[1]
        out = storage.parent(tables_dir)
        if current_out is not None and date == run_date and _same_place(out, current_out):
            raise SinceError(f"--since {since} is the partition this run replaces; name an earlier one or the output root")
        success = writers.read_success(since, options)
        if success is None:
            raise SinceError(f"--since {since}: no {writers.SUCCESS_FILE}; an incomplete partition is never reused")
        return Previous(out, date, since, success)
    tables_dir = storage.join(since, "tags")
    try:
        names = storage.list_files(tables_dir, options)
    except FileNotFoundError:
        names = []
    dates = sorted((n.split("=", 1)[1] for n in names if n.startswith("run_date=")), reverse=True)
    for date in dates:
        if date >= run_date:
            continue
        partition = writers.partition_url(since, "tags", date)
        success = writers.read_success(partition, options)
        if success is not None:
            return Previous(since, date, partition, success)
        log.info("--since: skipping %s, which has no %s", partition, writers.SUCCESS_FILE)
    return None


def _same_place(a: str, b: str) -> bool:
    if storage.is_remote(a) or storage.is_remote(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.abspath(a) == os.path.abspath(b)


def plan_reuse(
    manifest,
    model_version: str,
    attributes: list[str],
    since: str,
    previous: Previous | None,
    partition: Partition,
    shard_size: int,
    options: Mapping[str, Any] | None = None,
    http: HttpPolicy | None = None,
    text_columns: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Decide which rows of ``manifest`` reuse the tags of ``previous`` (see :func:`find_previous`); write
    them to the partition's state. ``text_columns`` (``--text-column``): a row is reused only when the previous
    night read the same text columns and the row's text is unchanged (its ``text_version``); tags fused with
    text are never carried into a night without it, nor the other way round.

    Returns the facts the plan records: the previous partition, how many rows were candidates (same
    product at the same location), how many are reused, and what finding the versions cost.
    """
    import polars as pl

    from ..data.manifest import resolve_locations

    started = time.time()
    facts: dict[str, Any] = {"since": since, "previous": None, "candidates": 0, "reused": 0}
    if previous is None:
        facts["reason"] = f"no complete partition dated before {partition.run_date} under {since}: every row is tagged"
        log.warning("--since %s: %s", since, facts["reason"])
        return facts
    facts["previous"] = previous.tags
    if previous.success.get("model_version") != model_version:
        previous_ids = writers.read_complete_partition(previous.tags, options).column("product_id")
        facts.update(_catalog_changes(manifest, previous, previous_ids.combine_chunks(), options))
        facts["changed"] = facts["in_previous"]  # another model: every product it tagged is read again
        facts["reason"] = (
            f"the previous partition was tagged by model_version {previous.success.get('model_version')}, this run uses "
            f"{model_version}: every row is tagged"
        )
        log.info("--since %s: %s", previous.tags, facts["reason"])
        return facts

    # The plan of the run whose parts are reused (not that of a re-run of its date still in progress or failed).
    prev_plan = Partition(previous.out, previous.run_date, options).committed_state("plan.json", previous.success) or {}
    prev_base = storage.parent(prev_plan["catalog"]) if prev_plan.get("catalog") else storage.parent(manifest.url)
    # reading: a scoped attribute's nulls
    schema = writers.tags_schema(attributes, review=False, nullable=attributes, text=bool(text_columns))
    previous_tags = writers.read_complete_partition(previous.tags, options)
    mismatch = _text_mismatch(previous_tags.column_names, text_columns)
    if mismatch:
        facts.update(_catalog_changes(manifest, previous, previous_tags.column("product_id").combine_chunks(), options))
        facts["changed"] = facts["in_previous"]
        facts["reason"] = mismatch
        log.warning("--since %s: %s", previous.tags, mismatch)
        return facts
    if writers.IMAGES_USED_COLUMN not in previous_tags.column_names:  # written before several photos per product
        previous_tags = previous_tags.append_column(writers.IMAGES_USED_COLUMN, pa.array(np.ones(previous_tags.num_rows, np.int32)))
    old = pl.from_arrow(previous_tags.select(schema.names).cast(schema))
    del previous_tags
    facts.update(_catalog_changes(manifest, previous, old.get_column("product_id").to_arrow(), options))
    old = old.filter(pl.col("model_version") == model_version)
    separator = manifest.separator
    old = old.with_columns(pl.Series("location", resolve_locations(old.get_column("image").to_arrow(), prev_base, separator))).drop("image")

    valid = manifest.table.filter(pc.equal(manifest.table.column("status"), "")).select(["row", "product_id", "image"])
    current = pl.from_arrow(valid).with_columns(pl.Series("location", manifest.locations(valid)))
    del valid
    matched = current.join(old, on=["product_id", "location"], how="inner").sort("row")
    del old, current
    facts["candidates"] = matched.height
    if matched.height:
        t = time.time()
        versions = current_versions(matched.get_column("location").to_arrow(), options, http=http, separator=separator)
        facts["version_lookup_s"] = round(time.time() - t, 3)
        keep = pc.fill_null(pc.equal(versions, matched.get_column("image_version").to_arrow()), False)
        if text_columns:
            from .text_rows import text_versions

            texts = pa.array(text_versions(manifest, text_columns, matched.get_column("row").to_numpy()), pa.string())
            keep = pc.and_(keep, pc.fill_null(pc.equal(texts, matched.get_column(writers.TEXT_VERSION_COLUMN).to_arrow()), False))
        matched = matched.filter(pl.Series(keep.to_numpy(zero_copy_only=False)))
    facts["reused"] = matched.height
    # Products read again although the night before tagged them: image changed or moved (or another model).
    facts["changed"] = facts["in_previous"] - matched.height
    if matched.height:
        table = matched.select(["row", *schema.names]).to_arrow()
        table = pa.table(
            {"row": table.column("row").cast(pa.int64()), **{f.name: table.column(f.name).cast(f.type) for f in schema}}
        )
        _write_reuse(partition, table, shard_size, options)
    facts["plan_s"] = round(time.time() - started, 3)
    log.info(
        "--since %s: %d of %d row(s) reuse their tags (%d same product and location; versions in %.1fs)",
        previous.tags, facts["reused"], manifest.num_rows, facts["candidates"], facts.get("version_lookup_s", 0.0),
    )
    return facts


def _text_mismatch(previous_columns: list[str], text_columns: tuple[str, ...]) -> str | None:
    """Why no row of a partition with ``previous_columns`` may be reused by a night reading ``text_columns``, or None."""
    had_text = writers.INPUTS_COLUMN in previous_columns
    if text_columns and not had_text:
        return "the previous partition was tagged from the photos alone, this run reads --text-column too: every row is tagged"
    if text_columns and writers.TEXT_VERSION_COLUMN not in previous_columns:
        return ("the previous partition was tagged with text but has no text_version column (written before it existed): "
                "every row is tagged")
    if had_text and not text_columns:
        return ("the previous partition's tags were fused with the catalog's text (--text-column), this run reads the photos "
                "alone: every row is tagged")
    return None


def _catalog_changes(manifest, previous: Previous, tagged_ids, options: Mapping[str, Any] | None) -> dict[str, int]:
    """How tonight's catalog differs from the previous partition, by product id: ``new`` (in neither of its
    tables), ``in_previous`` (in its tags: reused, or read again as ``changed``), ``retried`` (only in its
    errors table: error rows are never reused) and ``left`` (in either table then, not in the catalog now).
    Tonight's rows that are errors before any read (blank or repeated ids) count in none."""
    try:
        failed = writers.read_complete_partition(writers.partition_url(previous.out, "errors", previous.run_date), options).column("product_id")
    except FileNotFoundError:  # no error rows that night: no part files listed
        failed = pa.chunked_array([], pa.string())
    current = pc.unique(manifest.table.filter(pc.equal(manifest.table.column("status"), "")).column("product_id"))
    tagged = pc.unique(tagged_ids)
    failed = pc.unique(failed.combine_chunks())
    failed = failed.filter(pc.and_(pc.invert(pc.is_in(failed, value_set=tagged)), pc.not_equal(pc.utf8_length(failed), 0)))
    in_tags = pc.sum(pc.is_in(current, value_set=tagged)).as_py() or 0
    retried = pc.sum(pc.is_in(current, value_set=failed)).as_py() or 0
    return {"new": len(current) - in_tags - retried, "in_previous": in_tags, "retried": retried,
            "left": len(tagged) + len(failed) - in_tags - retried}


def reuse_url(partition: Partition) -> str:
    return storage.join(partition.state, REUSE_FILE)


def _write_reuse(partition: Partition, table: pa.Table, shard_size: int, options) -> None:
    """Sorted by row, one row group per shard: a shard reads its own rows and nothing else."""
    sink = storage.CommittedFile(reuse_url(partition), options)
    try:
        with pq.ParquetWriter(sink, table.schema, compression="zstd") as writer:
            shards = table.column("row").to_numpy() // shard_size
            bounds = np.flatnonzero(np.diff(shards)) + 1
            for start, stop in zip(np.r_[0, bounds], np.r_[bounds, table.num_rows]):
                writer.write_table(table.slice(int(start), int(stop - start)), row_group_size=int(stop - start))
    except BaseException:
        sink.abort()
        raise
    sink.commit()


def reused_rows(partition: Partition, options: Mapping[str, Any] | None = None) -> np.ndarray:
    """Manifest rows whose tags are carried over (sorted int64; empty without a reuse file)."""
    url = reuse_url(partition)
    if not storage.exists(url, options):
        return np.empty(0, dtype=np.int64)
    fs, path = storage.filesystem(url, options)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=["row"]).column("row").to_numpy()


def read_reused(partition: Partition, start: int, stop: int, options: Mapping[str, Any] | None = None) -> pa.Table:
    """The carried-over tag rows of manifest rows [start, stop), with their ``row`` column."""
    fs, path = storage.filesystem(reuse_url(partition), options)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        groups = []
        for index in range(parquet.metadata.num_row_groups):
            stats = parquet.metadata.row_group(index).column(0).statistics
            if stats is None or not stats.has_min_max or (stats.min < stop and stats.max >= start):
                groups.append(index)
        table = parquet.read_row_groups(groups) if groups else parquet.schema_arrow.empty_table()
    rows = table.column("row")
    return table.filter(pc.and_(pc.greater_equal(rows, start), pc.less(rows, stop)))


# -- current versions, without reading the images -----------------------------------------------
def current_versions(locations: pa.Array | pa.ChunkedArray, options: Mapping[str, Any] | None = None, *,
                     threads: int = STAT_THREADS, http: HttpPolicy | None = None, separator: str | None = None) -> pa.Array:
    """The image_version each location has now (None where it is missing or not a file), in order.

    ``separator``: each location is a product's photos joined by it, and so is its version (None when any
    photo is missing: the product is read again), as :mod:`tagger.tag.photos` writes it."""
    if isinstance(locations, pa.ChunkedArray):
        locations = locations.combine_chunks()
    if separator is not None:
        from ..data.manifest import split_photos

        pieces = split_photos(locations, separator)
        versions = current_versions(pc.list_flatten(pieces), options, threads=threads, http=http)
        # binary_join gives null for a list with a null element: one photo gone, the product is read again.
        return pc.binary_join(pa.ListArray.from_arrays(pieces.offsets, versions), separator)
    n = len(locations)
    if n == 0:
        return pa.array([], pa.string())
    remote = pc.fill_null(pc.match_substring(locations, "://"), False)
    remote = pc.and_(remote, pc.invert(pc.starts_with(locations, "file://"))).to_numpy(zero_copy_only=False)
    out: list[pa.Array] = []
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="since-versions") as pool:
        for start in range(0, n, _CHUNK):
            chunk = locations.slice(start, _CHUNK).to_pylist()
            is_remote = remote[start:start + len(chunk)]
            versions: list[str | None] = [None] * len(chunk)
            local_index = [i for i in range(len(chunk)) if not is_remote[i]]
            if local_index:
                paths = [chunk[i].removeprefix("file://") for i in local_index]
                for i, version in zip(local_index, _stat_all(paths, pool, threads)):
                    versions[i] = version
            remote_index = [i for i in range(len(chunk)) if is_remote[i]]
            if remote_index:
                found = remote_versions([chunk[i] for i in remote_index], options, pool, http)
                for i, version in zip(remote_index, found):
                    versions[i] = version
            out.append(pa.array(versions, pa.string()))
    return pa.concat_arrays(out)


def _stat_one(path: str) -> str | None:
    try:
        result = os.stat(path)
    except (OSError, ValueError):
        return None
    return local_version(result) if stat_module.S_ISREG(result.st_mode) else None


def _stat_all(paths: list[str], pool: ThreadPoolExecutor, threads: int) -> list[str | None]:
    """Versions of local files: one by one where a stat is a cache hit (~2 us, the pool would only add
    its overhead), through the thread pool where it is a round trip (NFS, a cold disk: ~0.1-1 ms each)."""
    started = time.perf_counter()
    results: list[str | None] = [_stat_one(p) for p in paths[:PROBE_STATS]]
    paths = paths[PROBE_STATS:]
    if not paths or (time.perf_counter() - started) / len(results) < FAST_STAT_S:
        return results + [_stat_one(p) for p in paths]
    # Slices rather than a future per path: os.stat releases the GIL, the bookkeeping would not.
    size = max(256, -(-len(paths) // (threads * 4)))
    slices = [paths[i:i + size] for i in range(0, len(paths), size)]
    for part in pool.map(lambda part: [_stat_one(p) for p in part], slices):
        results.extend(part)
    return results


def remote_versions(locations: list[str], options: Mapping[str, Any] | None, pool: ThreadPoolExecutor,
                    http: HttpPolicy | None = None) -> list[str | None]:
    """Object-store versions: a listing per folder with many wanted keys, else a HEAD per object; http(s)
    photos of allowed hosts: a HEAD each (at most the policy's per-host connections at once)."""
    by_folder: dict[tuple[str, str], list[int]] = {}
    web: list[int] = []
    for i, location in enumerate(locations):
        scheme, key = location.split("://", 1)
        if http is not None and scheme.lower() in http_images.SCHEMES:
            web.append(i)
            continue
        if scheme not in READABLE_PROTOCOLS:
            continue  # never a request to an arbitrary URL; the reader turns the row into an error
        by_folder.setdefault((scheme, key.rsplit("/", 1)[0] if "/" in key else key), []).append(i)
    versions: list[str | None] = [None] * len(locations)
    heads: list[int] = []
    for (scheme, folder), indices in by_folder.items():
        if len(indices) < LIST_MIN_OBJECTS:
            heads.extend(indices)
            continue
        fs, _ = storage.filesystem(f"{scheme}://{folder}", options)
        try:
            listing = fs.find(folder, maxdepth=1, detail=True)
        except FileNotFoundError:
            continue  # no such folder: every object in it is missing
        except Exception as exc:  # e.g. AccessDenied on s3:ListBucket: fall back to HEADs
            log.info("--since: cannot list %s://%s (%s: %s); asking object by object", scheme, folder, type(exc).__name__, exc)
            heads.extend(indices)
            continue
        finally:
            fs.invalidate_cache(folder)  # a big folder's listing must not stay in s3fs's cache
        for i in indices:
            info = listing.get(locations[i].split("://", 1)[1])
            if info is not None and info.get("type", "file") == "file":
                versions[i] = remote_version(int(info["size"]), info)
    if heads:
        for i, version in zip(heads, pool.map(lambda i: _head(locations[i], options), heads)):
            versions[i] = version
    if web:
        for i, version in zip(web, pool.map(lambda i: _http_head(locations[i], http), web)):
            versions[i] = version
    return versions


def _http_head(location: str, http: HttpPolicy) -> str | None:
    try:
        return http_images.head_version(location, http)
    except http_images.HttpUnavailable as exc:
        raise StorageUnavailable(f"--since: cannot look up {location}: {exc}") from exc


def _head(location: str, options: Mapping[str, Any] | None) -> str | None:
    fs, path = storage.filesystem(location, options)
    try:
        info = fs.info(path)
    except (FileNotFoundError, PermissionError, ValueError):
        return None  # not reused: the DataLoader reads it and says why in the errors table
    except Exception as exc:
        raise StorageUnavailable(f"--since: cannot look up {location}: {type(exc).__name__}: {exc}") from exc
    finally:
        fs.invalidate_cache(path)
    if info.get("type", "file") != "file":
        return None
    return remote_version(int(info["size"]), info)
