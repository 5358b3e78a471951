"""The run summary: ``_runs/run_date=.../summary.json`` and the one line on stderr.

The partition's counts come from the shards' stats (every task of a fan-out contributes); what this
process did (images read, shards committed, speed, device, runtime, durations) from :class:`ProcessFacts`.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .config import TagConfig
from .partition import Partition
from .plan import Plan, now_iso

log = logging.getLogger("tagger.tag.runner")  # the runner's logger: the run's lines show one name


@dataclass
class RunResult:
    exit_code: int
    summary: dict[str, Any]
    summary_line: str


@dataclass
class ProcessFacts:
    """What this process did, for the summary's ``this_process`` and ``durations_s``."""

    timings: dict[str, float] = field(default_factory=dict)
    images: int = 0
    shards: int = 0
    device: str | None = None
    runtime: dict[str, Any] | None = None
    engine: dict[str, Any] = field(default_factory=lambda: {"name": "local"})  # --engine, and the Ray cluster used
    text: dict[str, Any] | None = None  # --text-column: rows per input mode, conflicts, the text's CPU seconds

    def timed(self, name: str, since: float) -> None:
        self.timings[name] = time.time() - since


def partition_counts(plan: Plan, stats: list[dict[str, Any]]) -> dict[str, Any]:
    """The partition's counts from every shard's stats; they must account for every manifest row."""
    rows = sum(s["rows"] for s in stats)
    errors = sum(s["errors"] for s in stats)
    error_types: Counter = Counter()
    review: Counter = Counter()
    examples: dict[str, str] = {}  # error type -> its first row in manifest order, "product id: message"
    photo_errors: Counter | None = None
    photo_examples: dict[str, str] = {}
    for s in sorted(stats, key=lambda s: s.get("shard", 0)):
        error_types.update(s["error_types"])
        examples.update({t: m for t, m in s.get("error_examples", {}).items() if t not in examples})
        if "photo_errors" in s:  # several photos per product (markers written before it was counted: none)
            photo_errors = (photo_errors or Counter()) + Counter(s["photo_errors"])
            photo_examples.update({t: m for t, m in s.get("photo_error_examples", {}).items() if t not in photo_examples})
        # Shards committed before the tags table had needs_review have no counts: they add nothing.
        review.update(s.get("needs_review", {}).get("attributes", {}))
    if rows != plan.rows:
        raise RuntimeError(f"shards account for {rows} rows but the manifest has {plan.rows}; not committing")
    tags = sum(s["tagged"] + s["reused"] for s in stats)
    review_rows = sum(s.get("needs_review", {}).get("rows", 0) for s in stats)
    computed: Counter = Counter()  # arithmetic -> rows tagged in it this run (markers before it was recorded: none)
    for s in stats:
        if s.get("computed"):
            computed[s["computed"]] += s["tagged"]
    return {
        **plan.facts(),
        "tagged": sum(s["tagged"] for s in stats),
        "reused": sum(s["reused"] for s in stats),
        "errors": errors,
        "error_types": dict(sorted(error_types.items())),
        "error_rate": round(errors / rows if rows else 0.0, 6),
        "error_examples": dict(sorted(examples.items())),
        **({"photo_errors": dict(sorted(photo_errors.items())), "photo_error_examples": dict(sorted(photo_examples.items()))}
           if photo_errors is not None else {}),
        "needs_review": {
            "rows": review_rows,
            "share": round(review_rows / tags if tags else 0.0, 6),
            "attributes": dict(sorted(review.items())),
        },
        "computed": dict(sorted(computed.items())),
    }


def computed_name(runtime: dict[str, Any] | None) -> str | None:
    """A process's runtime facts -> "<runtime> <precision>" ("openvino bf16"), None when unknown."""
    if isinstance(runtime, dict) and runtime.get("name") and runtime.get("precision"):
        return f"{runtime['name']} {runtime['precision']}"
    return None


def over_error_rate(counts: dict[str, Any], max_error_rate: float) -> str:
    """Why the run fails the ``--max-error-rate`` gate, or "" when it passes."""
    rows, errors = counts["rows"], counts["errors"]
    error_rate = errors / rows if rows else 0.0
    if error_rate <= max_error_rate:
        return ""
    fix = configuration_fix(counts)
    return (f"{errors} of {rows} rows ({error_rate:.1%}) are errors, over --max-error-rate "
            f"{max_error_rate:.1%}; {fix + '; ' if fix else ''}the log names each type's first row, the errors table every row; no _SUCCESS written")


def error_counts(types: dict[str, int]) -> str:
    """"invalid_location 117, missing 3": the most frequent first."""
    return ", ".join(f"{t} {n:,}" for t, n in sorted(types.items(), key=lambda i: (-i[1], i[0])))


# An option named in an error's message ("use https://, or --allow-plain-http for a server you trust").
_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z-]*[a-z]")


def configuration_fix(counts: dict[str, Any]) -> str:
    """When every row failed the same way and its message names the option that decides it (a missing
    --allow-plain-http, --allow-host, a --max-image-bytes too small), the advice: "" otherwise. One row's
    message is the example; the others are of the same type, so of the same cause as far as the job can tell."""
    types, rows = counts.get("error_types") or {}, counts.get("rows", 0)
    if len(types) != 1 or not rows or counts.get("errors") != rows:
        return ""
    (error_type,) = types
    example = (counts.get("error_examples") or {}).get(error_type, "")
    options = list(dict.fromkeys(_OPTION.findall(example)))
    if not options:
        return ""
    return (f"every row failed as {error_type} for a setting: re-run the same command with {' or '.join(options)} "
            f"if it applies (first row {example})")


def log_errors(summary: dict[str, Any]) -> None:
    """One log line per error type (rows, then photos): its count and its first row's message."""
    for key, examples, what in (("error_types", "error_examples", "rows"), ("photo_errors", "photo_error_examples", "photos")):
        for error_type, n in sorted((summary.get(key) or {}).items(), key=lambda i: (-i[1], i[0])):
            first = (summary.get(examples) or {}).get(error_type)
            log.warning("%s %s: %d %s%s", "error" if what == "rows" else "photo error", error_type, n, what,
                        f"; first: {first}" if first else "")


def write_summary(partition: Partition, config: TagConfig, code: int, facts: dict[str, Any], started: float,
                  process: ProcessFacts) -> RunResult:
    elapsed = time.time() - started
    tagging = process.timings.get("tagging_s", 0.0)
    summary = {
        "run_date": config.run_date,
        "exit_code": code,
        **facts,
        "this_process": {
            "images_read": process.images,
            "shards_committed": process.shards,
            "images_per_second": round(process.images / tagging, 2) if tagging > 0 else None,
            "device": process.device,
            "runtime": process.runtime,
            "engine": process.engine,
            **({"text": process.text} if process.text is not None else {}),
        },
        "durations_s": {k: round(v, 3) for k, v in {**process.timings, "total_s": elapsed}.items()},
        "finished_at": now_iso(),
        "arguments": config.public_dict(),
    }
    summary_url = partition.write_summary(summary)
    log_errors(summary)
    line = summary_line(summary)
    log.info("run summary written to %s", summary_url)
    return RunResult(code, summary, line)


def summary_line(summary: dict[str, Any]) -> str:
    status = summary.get("status", "?")
    parts = [f"{status}: run_date={summary.get('run_date')}", f"rows={summary.get('rows')}"]
    for key in ("tagged", "reused", "errors"):
        if key in summary:
            parts.append(f"{key}={summary[key]}")
    if summary.get("errors") and summary.get("error_types"):
        parts[-1] += f" ({error_counts(summary['error_types'])})"
    if summary.get("photo_errors"):  # photos not read, also of products tagged from their other photos
        parts.append(f"photo_errors={sum(summary['photo_errors'].values())} ({error_counts(summary['photo_errors'])})")
    since = summary.get("since") or {}
    if "new" in since:  # --since: what was read (new, changed, last night's errors), and who left the catalog
        parts.append(f"new={since['new']} changed={since['changed']} retried={since['retried']} left={since['left']}")
    if summary.get("needs_review", {}).get("rows"):
        parts.append(f"needs_review={summary['needs_review']['rows']}")
    rate = summary.get("this_process", {}).get("images_per_second")
    if rate:
        parts.append(f"{rate:.1f} img/s")
    parts.append(f"{summary['durations_s']['total_s']:.1f}s")
    if summary.get("message"):
        parts.append(f"- {summary['message']}")
    elif configuration_fix(summary):  # a run allowed to fail whole (--max-error-rate 1) still says why
        parts.append(f"- {configuration_fix(summary)}")
    return " ".join(parts)
