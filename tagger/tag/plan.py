"""The typed plan of a run date: which manifest and model it tags, cut into how many shards, under which
run id. Stored as ``_runs/run_date=.../plan.json``; a resumed run and every ``--shard I/N`` task read it back.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .. import storage
from . import writers
from ..data.decode import DEFAULT_MAX_IMAGE_BYTES
from ..data.manifest import Manifest
from .config import TagConfig
from .partition import Partition, committed_by

if TYPE_CHECKING:  # the plan needs a bundle's version and attributes, not torch (Ray's write tasks import this)
    from ..model.bundle import ModelBundle

log = logging.getLogger("tagger.tag.runner")  # the runner's logger: the run's lines show one name

# What the parts of a partition hold; a partial partition of another format is started over, never mixed
# into (2: the tags table gained needs_review; 3: images_used).
PLAN_FORMAT = 3


class PlanMismatch(RuntimeError):
    """The partition holds no plan this run may continue (exit 2)."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def plan_key(config: TagConfig, manifest: Manifest, bundle: ModelBundle) -> dict[str, Any]:
    """What a run's output depends on: a partition planned under another key is not resumed."""
    return {
        "format": PLAN_FORMAT,
        "manifest": manifest.fingerprint,
        "model_version": bundle.model_version,
        "shard_size": config.shard_size,
        "since": config.since,
        "max_image_pixels": config.max_image_pixels,
        "image_separator": manifest.separator,
        **reading_key(config),
    }


def reading_key(config: TagConfig) -> dict[str, Any]:
    """The options that decide how a photo is read, so what a row of tags or errors is: a row refused under one
    setting (a plain http:// photo without --allow-plain-http, a host not allowed, a file over --max-image-bytes,
    a 403 without the CDN's token header) is read under another. A re-run with other settings starts the date over instead of resuming into rows the
    new settings would read differently (a night that ended in exit 3 for a missing option, then re-run with it:
    an Airflow "clear" after the arguments were fixed).

    Each is in the key only when it is not the default, so that plans written before it was recorded (under the
    default) stay resumable. --http-deadline is not: past it the run stops with exit 4 and commits nothing of
    the shard, so it decides no row, and a re-run with a longer deadline after exit 4 must resume."""
    policy = config.http_policy()
    key: dict[str, Any] = {}
    if config.max_image_bytes != DEFAULT_MAX_IMAGE_BYTES:
        key["max_image_bytes"] = config.max_image_bytes
    if policy is not None:
        key["allow_hosts"] = sorted(set(policy.allow_hosts))
        if policy.allow_private:
            key["allow_private_addresses"] = True
        if policy.allow_plain_http:
            key["allow_plain_http"] = True
        if policy.headers:
            # The names only (never a secret in plan.json): adding the CDN's token header after a night of 403s
            # starts over; a token that rotates between a run and its resume does not.
            key["http_headers"] = sorted({name.lower() for name, _ in policy.headers})
    return key


def key_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two plan keys, for the log line that says why a date starts over."""
    def shown(key: dict[str, Any], name: str) -> str:
        return "default" if name not in key else str(key[name])

    names = sorted(n for n in set(old) | set(new) if old.get(n, None) != new.get(n, None) or (n in old) != (n in new))
    return ", ".join(f"{n} {shown(old, n)} -> {shown(new, n)}" for n in names)


@dataclass(frozen=True)
class Plan:
    key: dict[str, Any]  # plan_key(): compared whole, never taken apart
    run_id: str
    rows: int
    num_shards: int
    shard_size: int
    catalog: str
    model: str
    model_version: str
    attributes: list[str]
    created_at: str
    since: dict[str, Any] | None = None  # tagger.tag.incremental.plan_reuse's facts, for --since runs
    # A run that replaces a complete date: the committed run it replaces (whose output stays readable until this
    # run commits), and the suffix of this run's part names, which keeps them off the names that run's _SUCCESS lists.
    replaces: str | None = None
    part_suffix: str | None = None

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> Plan:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in body.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("since", "replaces", "part_suffix"):
            if body[name] is None:
                del body[name]
        return body

    @classmethod
    def read(cls, partition: Partition) -> Plan | None:
        body = partition.read_plan()
        return None if body is None else cls.from_dict(body)

    def write(self, partition: Partition) -> None:
        partition.write_plan(self.to_dict())

    @property
    def reuses(self) -> bool:
        """Some rows carry their tags over from ``--since``'s partition (tagger.tag.incremental)."""
        return bool((self.since or {}).get("reused"))

    def part_name(self, shard: int) -> str:
        return writers.part_name(shard, self.part_suffix)

    def kept_note(self, run_date: str) -> str:
        """What a run that did not commit says of the output it was to replace ("" when it replaces none)."""
        if not self.replaces:
            return ""
        return f"the previous complete output of {run_date} (run {self.replaces}) is kept until a run commits"

    def shard_of(self, row: int) -> int:
        return row // self.shard_size

    def shards(self, fanout: tuple[int, int] | None = None) -> range:
        """Every shard, or those of task I of N (``--shard I/N``): I, I+N, I+2N..."""
        return range(self.num_shards) if fanout is None else range(fanout[0], self.num_shards, fanout[1])

    def facts(self) -> dict[str, Any]:
        """What the run summary says of the plan."""
        facts = {"run_id": self.run_id, "rows": self.rows, "num_shards": self.num_shards, "model_version": self.model_version}
        if self.replaces:
            facts["replaces"] = self.replaces
        if self.since:
            facts["since"] = self.since
        return facts


def make_plan(config: TagConfig, partition: Partition, manifest: Manifest, bundle: ModelBundle) -> Plan:
    """The plan to run: the partition's own when it may be resumed (or, for ``--shard`` tasks, must be),
    else a new one. For a new one the partition is wiped first, except a complete date's output: that stays
    readable until the new run commits (:meth:`Partition.start_over`)."""
    options = config.storage_options
    key = plan_key(config, manifest, bundle)
    existing = Plan.read(partition)
    success = partition.success()
    # The open plan is done with once _SUCCESS names its run; a complete date's re-run is a new plan.
    complete = success is not None and (existing is None or committed_by(success, existing.run_id))
    if config.fanout is not None and not config.plan_only:
        if existing is None or existing.key != key or complete:
            differs = f" (the plan's settings differ: {key_changes(existing.key, key)})" if existing and existing.key != key else ""
            raise PlanMismatch(
                f"{partition.state}: no open plan for this manifest and model{differs}; before the --shard I/N "
                "tasks, run the same command once with --plan-only (and without --shard), with the same options"
            )
        return existing
    if existing is not None and existing.key == key and not complete and not config.plan_only:
        log.info("resuming run %s: the partition has an unfinished plan for this manifest and model", existing.run_id)
        if existing.replaces:
            log.info("%s", existing.kept_note(config.run_date).capitalize())
        return existing
    if existing is not None and existing.key != key and not complete:
        # Said, so that a re-run after a fix (another option) is seen to start over rather than resume.
        log.info("starting run_date=%s over: its unfinished plan %s was made under other settings (%s)", config.run_date,
                 existing.run_id, key_changes(existing.key, key))
    previous = None
    if config.since:
        from .incremental import find_previous

        # Before the wipe: a --since that cannot be used must leave the date's partition as it was.
        previous = find_previous(config.since, config.run_date, options, current_out=config.out)
    replaces = suffix = None
    if success is not None:
        replaces = str(success.get("run_id") or "unknown")
        listed = set(success.get("parts", {})) | set((writers.read_success(partition.errors, options) or {}).get("parts", {}))
        suffix = uuid.uuid4().hex[:8]
        while any(n.endswith(f"-{suffix}.parquet") for n in listed):  # never a name that _SUCCESS lists
            suffix = uuid.uuid4().hex[:8]
        log.info("replacing partition run_date=%s under %s: its complete output (run %s) stays readable until this run "
                 "commits", config.run_date, config.out, replaces)
        partition.start_over(success)
    else:
        if existing is not None or storage.exists(partition.tags, options):
            log.info("replacing partition run_date=%s under %s", config.run_date, config.out)
        partition.wipe()
    created_at, since = now_iso(), None
    if config.since:
        from .incremental import plan_reuse

        # Decided once, stored beside the plan: resumed runs and --shard tasks reuse the same rows.
        since = plan_reuse(manifest, bundle.model_version, bundle.attribute_names, config.since, previous,
                           partition, config.shard_size, options, http=config.http_policy(), text_columns=config.text_columns)
    plan = Plan(
        key=key,
        run_id=config.run_id or f"{config.run_date}-{uuid.uuid4().hex[:8]}",
        rows=manifest.num_rows,
        num_shards=max(1, -(-manifest.num_rows // config.shard_size)),
        shard_size=config.shard_size,
        catalog=config.catalog,
        model=config.model,
        model_version=bundle.model_version,
        attributes=bundle.attribute_names,
        created_at=created_at,
        since=since,
        replaces=replaces,
        part_suffix=suffix,
    )
    plan.write(partition)
    return plan
