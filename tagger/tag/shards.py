"""Shards: the partition's lease, each shard's open parts, their commit (parts, then the done marker),
fencing before every commit, and ``_SUCCESS`` once every shard of the plan is done.

A shard's parts are visible only once committed; its stats JSON (the done marker) follows them, and
``_SUCCESS`` comes last of all. Before each commit this run checks that it still owns the date (the lease)
and that the partition still holds its plan, so a run that was replaced never commits over its successor.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from . import writers
from .config import TagConfig
from .lease import Lease, LeaseHeld, LeaseLost, lease_folder
from .partition import Partition
from .plan import Plan, PlanMismatch, now_iso

log = logging.getLogger("tagger.runner")


@dataclass
class ShardOutput:
    """The open parts of one shard while its rows stream through."""

    index: int
    tags: writers.PartWriter
    errors: writers.PartWriter
    remaining: int  # rows still to come from the DataLoader
    name: str = ""  # the parts' file name (both tables), :meth:`tagger.tag.plan.Plan.part_name`; "" the first run's
    started: float = field(default_factory=time.time)
    error_types: Counter = field(default_factory=Counter)
    # The first row of each error type, "product id: message": what the summary line and the log quote.
    error_examples: dict[str, str] = field(default_factory=dict)
    photo_errors: Counter | None = None  # several photos per product: every photo not read, by type
    photo_examples: dict[str, str] = field(default_factory=dict)
    tagged: int = 0
    reused: int = 0
    review: Counter = field(default_factory=Counter)  # attribute -> tags under its review threshold
    review_rows: int = 0  # tag rows with at least one such attribute
    computed: str | None = None  # what ran the model on this shard's images ("openvino bf16"), for its marker

    def stats(self, run_id: str) -> dict[str, Any]:
        """The done marker's body."""
        errors = sum(self.error_types.values())
        name = self.name or writers.part_name(self.index)
        return {
            "shard": self.index,
            "run_id": run_id,
            "rows": self.tagged + self.reused + errors,
            "tagged": self.tagged,
            "reused": self.reused,
            "errors": errors,
            "error_types": dict(self.error_types),
            "error_examples": self.error_examples,
            **({"photo_errors": dict(self.photo_errors), "photo_error_examples": self.photo_examples}
               if self.photo_errors is not None else {}),
            "needs_review": {"rows": self.review_rows, "attributes": {k: v for k, v in self.review.items() if v}},
            "parts": {"tags": {name: self.tags.rows}, "errors": {name: self.errors.rows}},
            # What resume and finalize check against a listing before they trust the marker (lost_parts).
            "bytes": {"tags": {name: self.tags.bytes}, "errors": {name: self.errors.bytes}},
            # Fan-out tasks on different machines may compute in different arithmetic (`auto` and a bundle
            # checked in bf16: bf16 where the CPU has it natively): the partition's summary counts each.
            **({"computed": self.computed} if self.computed and self.tagged else {}),
            "seconds": round(time.time() - self.started, 3),
            "finished_at": now_iso(),
        }


class ShardCursor:
    """Walks the pending shards in order: the shard being filled, committed the moment it is full.

    A shard whose rows were all settled by the manifest check (nothing to read) commits on the spot.
    """

    def __init__(self, pending: list[int], open_shard: Callable[[int], ShardOutput],
                 commit_shard: Callable[[ShardOutput], None]):
        self._pending = iter(pending)
        self._open, self._commit = open_shard, commit_shard
        self.current: ShardOutput | None = None

    def advance(self) -> None:
        self.current = None
        for shard in self._pending:
            output = self._open(shard)
            if output.remaining:
                self.current = output
                return
            self._commit(output)

    def consumed(self, rows: int) -> None:
        assert self.current is not None
        self.current.remaining -= rows
        if self.current.remaining == 0:
            self._commit(self.current)
            self.advance()

    def abort(self) -> None:
        if self.current is not None:
            self.current.tags.abort()
            self.current.errors.abort()
            self.current = None


def lost_parts(stats: list[dict[str, Any]], sizes: dict[str, dict[str, int]]) -> dict[int, str]:
    """Shards whose marker lists a part that ``sizes`` (table -> part -> bytes, a listing) lacks, or holds at
    another size than the marker recorded (markers written before sizes were recorded: presence only)."""
    lost: dict[int, str] = {}
    for body in stats:
        for table, parts in body["parts"].items():
            recorded = (body.get("bytes") or {}).get(table, {})
            for name in parts:
                found = sizes.get(table, {}).get(name)
                if found is None:
                    lost[body["shard"]] = f"{table}/{name} is missing"
                elif name in recorded and recorded[name] != found:
                    lost[body["shard"]] = f"{table}/{name} has {found} bytes, committed with {recorded[name]}"
    return lost


@contextmanager
def owning_partition(config: TagConfig, interrupted: Callable[[], None] = lambda: None) -> Iterator[Lease | None]:
    """The date's lease around everything that writes, for a whole run or a --plan-only run (yields it).

    ``--shard I/N`` tasks share the partition of one plan: they take no lease (yield None), but refuse to
    start while a whole run owns the date, and are fenced by the plan's run_id (:meth:`ShardCommitter.fence`).
    """
    lease = Lease(lease_folder(config.out, config.run_date), config.storage_options, ttl=config.lease_ttl,
                  run=config.run_id or "")
    if config.fanout is not None:
        generation, holder = lease.current()
        if lease.vacancy(holder) == "":
            raise LeaseHeld(f"{lease.folder}: a whole run owns the partition: {Lease.describe(holder)}; "
                            "the --shard tasks run after it has ended")
        yield None
        return
    lease.acquire(wait=config.lease_wait, interrupted=interrupted)
    try:
        yield lease
    finally:
        lease.release()


class ShardCommitter:
    """Commits this run's shards and, once all are done, the partition, each behind the fence."""

    def __init__(self, partition: Partition, plan: Plan, lease: Lease | None = None):
        self.partition, self.plan, self.lease = partition, plan, lease
        self.committed = 0  # shards committed by this process

    def fence(self) -> None:
        """Before each commit: this run still owns the partition, and the partition still holds its plan."""
        if self.lease is not None:
            self.lease.check()
        current = self.partition.read_plan()
        if current is None or current.get("run_id") != self.plan.run_id:
            theirs = current.get("run_id") if current else None
            raise LeaseLost(f"{self.partition.state}: the partition now holds run {theirs}, not this run "
                            f"{self.plan.run_id} (another run replaced it); nothing more is committed by this run")

    def commit(self, output: ShardOutput) -> None:
        """The shard's parts, then its done marker."""
        self.fence()
        output.tags.commit()
        output.errors.commit()
        self.partition.mark_shard_done(output.index, output.stats(self.plan.run_id))
        self.committed += 1

    def pending(self, fanout: tuple[int, int] | None) -> tuple[range, list[int]]:
        """This task's shards, and those of them not done yet: a shard whose marker lists a part that is
        gone (or not the size it was committed with) is not done, and runs again."""
        mine = self.plan.shards(fanout)
        done = self.partition.done_shards() & set(mine)
        if done:
            done -= set(self._drop_lost(self.partition.read_shard_stats(sorted(done))))
        return mine, [s for s in mine if s not in done]

    def _drop_lost(self, stats: list[dict[str, Any]]) -> dict[int, str]:
        """Remove the done markers of shards whose committed parts are not all there (one listing per table),
        so that they count as not done; returns them with what is wrong."""
        lost = lost_parts(stats, self.partition.part_sizes())
        for shard, problem in lost.items():
            log.warning("%s: shard %d: %s; its done marker is removed and the shard is tagged again",
                        self.partition.state, shard, problem)
            self.partition.unmark_shard_done(shard)
        return lost

    def all_done(self) -> bool:
        return self.partition.done_shards() >= set(range(self.plan.num_shards))

    def shard_stats(self) -> list[dict[str, Any]]:
        """Every shard's stats, once all are done and all by this run."""
        plan = self.plan
        missing = sorted(set(range(plan.num_shards)) - self.partition.done_shards())
        if missing:
            shown = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
            raise PlanMismatch(
                f"{self.partition.state}: shard(s) {shown} of {plan.num_shards} not done; run the --shard tasks "
                "that own them (or the same command without --shard) first, nothing was committed"
            )
        stats = self.partition.read_shard_stats(range(plan.num_shards))
        foreign = [s["shard"] for s in stats if s.get("run_id") != plan.run_id]
        if foreign:
            raise LeaseLost(f"{self.partition.state}: shard(s) {foreign[:20]} were committed by another run than "
                            f"{plan.run_id}; not committing a partition that mixes runs. Re-run the date.")
        lost = self._drop_lost(stats)
        if lost:
            shown = "; ".join(f"shard {shard}: {problem}" for shard, problem in sorted(lost.items())[:5])
            raise PlanMismatch(
                f"{self.partition.state}: {len(lost)} done shard(s) lost a committed part ({shown}); no _SUCCESS written. "
                "Their done markers were removed: run the same tag command again (it tags those shards again and commits)"
            )
        return stats

    def commit_partition(self, stats: list[dict[str, Any]]) -> None:
        """``_SUCCESS``, listing every shard's parts, behind the fence."""
        self.fence()
        parts: dict[str, dict[str, int]] = {"tags": {}, "errors": {}}
        for s in stats:
            for table in parts:
                parts[table].update(s["parts"][table])
        self.partition.commit(parts["tags"], parts["errors"],
                              {"run_id": self.plan.run_id, "model_version": self.plan.model_version, "committed_at": now_iso()})
