"""One run date's output partition and its state: plan, shard done-markers, summary, ``_SUCCESS``.

The work of a run date is cut into shards of consecutive manifest rows. A shard is done when its stats
JSON exists (written after its tags and errors parts, img2dataset-style), so a killed run resumes from
the shards without one, and several processes (``--shard I/N``) can share a partition.

A date that is complete stays complete while a new run replaces it (:meth:`Partition.start_over`): the new run
writes parts under other names beside those its ``_SUCCESS`` lists, the committed run's plan and summary move
to ``_runs/run_date=.../committed/``, and only once the new ``_SUCCESS`` is written are the old parts deleted
(:meth:`Partition.commit`). S3 has no rename, so nothing moves: ``_SUCCESS`` is what says which parts are the
partition, and each reader takes exactly those.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from .. import storage
from . import writers

log = logging.getLogger(__name__)

# Under the date's state folder: the plan and summary of the run whose parts ``_SUCCESS`` lists, while another
# run (its plan.json, summary.json) replaces it.
COMMITTED = "committed"
STATE_FILES = ("plan.json", "summary.json")


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

    def success(self) -> dict[str, Any] | None:
        """The tags ``_SUCCESS`` (the partition's commit point), None while no run has committed the date."""
        return writers.read_success(self.tags, self.options)

    def is_complete(self) -> bool:
        """The date is committed and no run is replacing it: ``_SUCCESS`` names the run of plan.json (or there is
        no plan). A run that replaces a complete date is not complete until its own ``_SUCCESS``."""
        success = self.success()
        if success is None:
            return False
        plan = self.read_plan()
        return plan is None or committed_by(success, plan.get("run_id"))

    def committed_state(self, name: str, success: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """``plan.json`` or ``summary.json`` of the run whose parts ``_SUCCESS`` lists: the state folder's own
        while that run is the latest, else the copy kept while another run replaces the date (None if neither)."""
        success = self.success() if success is None else success
        run_id = (success or {}).get("run_id")
        for url in (storage.join(self.state, name), storage.join(self.state, COMMITTED, name)):
            body = self._read_json(url)
            # A body without a run id (written by hand or a tool) is taken as the date's own, as it always was.
            if body is not None and (run_id is None or body.get("run_id") in (None, run_id)):
                return body
        return None

    def start_over(self, success: Mapping[str, Any]) -> None:
        """Clear the way for a run that replaces a complete date, keeping what readers read until it commits: the
        parts the two ``_SUCCESS`` list, and the committed run's plan and summary (copied to ``committed/``
        first, so that a crash at any point leaves them somewhere). Everything else goes: the state of any run
        since (a failed re-run's plan, markers, fragments) and parts no ``_SUCCESS`` lists."""
        for name in STATE_FILES:
            body = self._read_json(storage.join(self.state, name))
            if body is not None and committed_by(success, body.get("run_id")):
                self._write_json(storage.join(self.state, COMMITTED, name), body)
        for name in storage.list_files(self.state, self.options):
            if name != COMMITTED:
                storage.remove_tree(storage.join(self.state, name), self.options)
        self.drop_unlisted_parts()

    def drop_unlisted_parts(self) -> list[str]:
        """Delete the part files of each table that its ``_SUCCESS`` does not list (a replaced run's, a failed
        re-run's); returns them. Call only while this process owns the date (no other run writes parts)."""
        dropped = []
        for url in (self.tags, self.errors):
            listed = (writers.read_success(url, self.options) or {}).get("parts", {})
            for name in storage.file_sizes(url, self.options):
                if writers.is_part(name) and name not in listed:
                    storage.remove_file(storage.join(url, name), self.options)
                    dropped.append(name)
        return dropped

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
        """``_SUCCESS`` last of all, errors first: a reader who sees the tags marker sees both tables whole.

        A replaced partition's parts are deleted only after the new ``_SUCCESS`` and index, which no longer list
        them: until then every reader that follows either reads the old run's rows whole."""
        for url in (self.tags, self.errors, self.state, storage.join(self.state, "shards")):
            storage.remove_stale_temporaries(url)  # left by a process killed mid-write; every shard is done now
        writers.write_success(self.errors, errors_parts, extra, self.options)
        writers.write_success(self.tags, tags_parts, extra, self.options)
        self.write_indexes()
        try:
            dropped = self.drop_unlisted_parts()
            storage.remove_tree(storage.join(self.state, COMMITTED), self.options)
        except Exception as exc:  # committed: what is left is listed by no _SUCCESS, so read by no reader
            log.warning("run_date=%s is committed, but the replaced run's files could not all be deleted (%s: %s); "
                        "no reader takes them, and the next run of the date deletes them", self.run_date,
                        type(exc).__name__, exc)
            return
        if dropped:
            log.info("run_date=%s: the replaced run's %d part file(s) deleted", self.run_date, len(dropped))

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


def committed_by(success: Mapping[str, Any], run_id: str | None) -> bool:
    """``_SUCCESS`` is that run's (one written without a run id, by hand or a tool, counts as any run's)."""
    return success.get("run_id") is None or success.get("run_id") == run_id
