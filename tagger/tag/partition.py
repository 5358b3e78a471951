"""One run date's output partition and its state: plan, shard done-markers, summary, ``_SUCCESS``.

The work of a run date is cut into shards of consecutive manifest rows. A shard is done when its stats
JSON exists (written after its tags and errors parts, img2dataset-style), so a killed run resumes from
the shards without one, and several processes (``--shard I/N``) can share a partition.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from .. import storage
from . import writers

log = logging.getLogger(__name__)


class Partition:
    def __init__(self, out: str, run_date: str, options: Mapping[str, Any] | None = None):
        self.out = out
        self.run_date = run_date
        self.options = dict(options or {})
        self.tags = writers.partition_url(out, "tags", run_date)
        self.errors = writers.partition_url(out, "errors", run_date)
        self.state = writers.partition_url(out, "_runs", run_date)

    def shard_marker(self, shard: int) -> str:
        return storage.join(self.state, "shards", f"{shard:05d}.json")

    def _read_json(self, url: str) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_bytes(url, self.options))
        except FileNotFoundError:
            return None

    def _write_json(self, url: str, body: Mapping[str, Any]) -> None:
        storage.write_bytes(url, json.dumps(body, indent=2, default=str).encode(), self.options)

    def read_plan(self) -> dict[str, Any] | None:
        return self._read_json(storage.join(self.state, "plan.json"))

    def write_plan(self, plan: Mapping[str, Any]) -> None:
        self._write_json(storage.join(self.state, "plan.json"), plan)

    def is_complete(self) -> bool:
        return storage.exists(storage.join(self.tags, writers.SUCCESS_FILE), self.options)

    def wipe(self) -> None:
        """Remove the date's tags, errors and state: a new run replaces the partition, never adds to it."""
        for url in (self.tags, self.errors, self.state):
            storage.remove_tree(url, self.options)
        self.write_indexes()  # a replaced date leaves the partitions index at once, not at the next commit

    def done_shards(self) -> set[int]:
        names = storage.list_files(storage.join(self.state, "shards"), self.options)
        return {int(name.split(".")[0]) for name in names if name.endswith(".json") and name.split(".")[0].isdigit()}

    def mark_shard_done(self, shard: int, stats: Mapping[str, Any]) -> None:
        self._write_json(self.shard_marker(shard), stats)

    def unmark_shard_done(self, shard: int) -> None:
        storage.remove_file(self.shard_marker(shard), self.options)

    def part_sizes(self) -> dict[str, dict[str, int]]:
        """The files of the tags and errors folders with their sizes: one listing each (on S3, not a HEAD per part)."""
        return {"tags": storage.file_sizes(self.tags, self.options), "errors": storage.file_sizes(self.errors, self.options)}

    def read_shard_stats(self, shards: range) -> list[dict[str, Any]]:
        stats = []
        for shard in shards:
            body = self._read_json(self.shard_marker(shard))
            if body is None:
                raise FileNotFoundError(f"{self.shard_marker(shard)}: shard {shard} is not done")
            stats.append(body)
        return stats

    def write_summary(self, summary: Mapping[str, Any]) -> str:
        url = storage.join(self.state, "summary.json")
        self._write_json(url, summary)
        return url

    def commit(self, tags_parts: Mapping[str, int], errors_parts: Mapping[str, int], extra: Mapping[str, Any]) -> None:
        """``_SUCCESS`` last of all, errors first: a reader who sees the tags marker sees both tables whole."""
        for url in (self.tags, self.errors, self.state, storage.join(self.state, "shards")):
            storage.remove_stale_temporaries(url)  # left by a process killed mid-write; every shard is done now
        writers.write_success(self.errors, errors_parts, extra, self.options)
        writers.write_success(self.tags, tags_parts, extra, self.options)
        self.write_indexes()

    def write_indexes(self) -> None:
        """Each table's ``_partitions.json`` (complete partitions, their files, the latest), after ``_SUCCESS``:
        a reader that trusts the index never sees a partition before its ``_SUCCESS``."""
        for table in ("errors", "tags"):
            url = storage.join(self.out, table)
            try:
                writers.write_partitions_index(url, self.options)
            except Exception as exc:  # derived data: the partitions and their _SUCCESS stand without it
                log.warning("could not update %s/%s (%s: %s); the next commit of any date rewrites it",
                            url, writers.INDEX_FILE, type(exc).__name__, exc)
