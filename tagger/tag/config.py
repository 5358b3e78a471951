"""The tag job's configuration: one typed, validated object; every default lives here."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from .. import storage
from ..data.decode import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from ..data.http import HttpPolicy, http_policy
from ..model.settings import spec_problems

ENGINES = ("local", "ray")  # what tags the pending shards: this process and its DataLoader, or Ray Data (tagger.tag.ray)
PROGRESS_MODES = ("auto", "bar", "log", "none", "ray")  # ray: Ray's own bars (--engine ray) instead of ours
START_METHODS = ("auto", "fork", "forkserver", "spawn")


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2)))


def today_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def parse_shard(text: str) -> tuple[int, int]:
    """``i/N`` -> (i, N) with 0 <= i < N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"expected I/N such as 0/4, got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard index must be in [0, {count}) for {count} shard(s), got {text!r}")
    return index, count


@dataclass(frozen=True)
class TagConfig:
    catalog: str
    model: str
    out: str
    run_date: str = field(default_factory=today_utc)
    id_column: str = "product_id"
    image_column: str = "image"
    image_separator: str | None = None  # several photos per product in one CSV cell, split by it (tagger.tag.photos)
    catalog_format: str | None = None
    # --text-column: catalog columns of text (title, description, ...) read beside the photos, in the order of the
    # bundle's text fields; the bundle's text model and fusion tag from them (tagger.tag.text_rows). Empty: photos only.
    text_columns: tuple[str, ...] = ()
    device: str = "auto"
    batch_size: int = 64
    workers: int = field(default_factory=default_workers)
    worker_start_method: str = "auto"
    # Seconds a batch may take to arrive from the workers before the run is declared stuck.
    worker_timeout: float = 600.0
    max_error_rate: float = 0.05
    shard_size: int = 10_000
    fanout: tuple[int, int] | None = None  # --shard I/N
    plan_only: bool = False
    since: str | None = None
    since_missing_ok: bool = False  # a --since that does not exist tags everything instead of exit 2
    run_id: str | None = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # larger files are too_large rows, refused from their size
    draft_decode: bool = True
    precision: str = "auto"  # auto (CUDA fp16, CPU bf16 where native else fp32) | fp32 | bf16 | fp16, see inference.precision_settings
    runtime: str = "auto"  # auto (by device and measured speed) | torch | onnx | openvino, see tagger.model.choice.choose_runtime
    threads: int = 0  # torch threads of the model on the CPU; 0: torch's default (the cores, or OMP_NUM_THREADS)
    progress: str = "auto"
    log_every: float = 30.0
    storage_options: dict[str, Any] = field(default_factory=dict)
    # The date's lease (tagger.tag.lease): its heartbeat is renewed every ttl/4 s and may be taken over once it is
    # older than the ttl; a run that finds the lease held waits up to lease_wait s, then exits 5.
    lease_ttl: float = 120.0
    lease_wait: float = 0.0
    engine: str = "local"
    ray_address: str | None = None  # --engine ray: the cluster to join; None: RAY_ADDRESS, else a local Ray
    # http(s):// images (tagger.data.http): none without hosts named; private addresses and plain HTTP only when asked.
    allow_hosts: tuple[str, ...] = ()
    allow_private_addresses: bool = False
    allow_plain_http: bool = False
    http_deadline: float = 120.0  # seconds for one image, retries included

    def __post_init__(self) -> None:
        problems = []
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", self.run_date):
            problems.append(f"run_date must be YYYY-MM-DD, got {self.run_date!r}")
        else:
            try:
                datetime.strptime(self.run_date, "%Y-%m-%d")
            except ValueError:
                problems.append(f"run_date {self.run_date!r} is not a calendar date")
        if self.batch_size < 1:
            problems.append("batch_size must be >= 1")
        if self.workers < 0:
            problems.append("workers must be >= 0")
        if self.worker_start_method not in START_METHODS:
            problems.append(f"worker_start_method must be one of {', '.join(START_METHODS)}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            problems.append("max_error_rate must be in [0, 1]")
        if self.shard_size < 1:
            problems.append("shard_size must be >= 1")
        if self.engine not in ENGINES:
            problems.append(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.ray_address and self.engine != "ray":
            problems.append("ray_address (--ray-address) is for --engine ray")
        if len(set(self.text_columns)) != len(self.text_columns) or any(not c for c in self.text_columns):
            problems.append(f"text_columns must be distinct non-empty column names, got {list(self.text_columns)!r}")
        if self.plan_only and self.fanout is not None:
            problems.append("plan_only (--plan-only) plans the whole date once; run it without --shard, then the --shard I/N tasks")
        if self.progress not in PROGRESS_MODES:
            problems.append(f"progress must be one of {', '.join(PROGRESS_MODES)}")
        problems.extend(spec_problems(self.device, self.runtime, self.precision, self.threads))  # the one definition
        if self.max_image_pixels < 1:
            problems.append("max_image_pixels must be >= 1")
        if self.max_image_bytes < 1:
            problems.append("max_image_bytes must be >= 1")
        if not 1.0 <= self.lease_ttl <= 86_400:
            problems.append("lease_ttl must be in [1, 86400] seconds")
        if not 0.0 <= self.lease_wait <= 86_400:
            problems.append("lease_wait must be in [0, 86400] seconds")
        try:
            self.http_policy()
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))

    def http_policy(self) -> HttpPolicy | None:
        """What http(s):// images may be read (None: none, they are invalid_location rows as before)."""
        return http_policy(self.allow_hosts, allow_private_addresses=self.allow_private_addresses,
                           allow_plain_http=self.allow_plain_http, deadline=self.http_deadline)

    def image_settings(self):
        """How every image of the run is read (caps, draft decode, http policy, storage options): a
        :class:`tagger.data.reader.ImageSettings` (imported here: the CLI reads this module without pyarrow)."""
        from ..data.reader import image_settings_of

        return image_settings_of(self)

    def public_dict(self) -> dict[str, Any]:
        """The arguments as the run summary records them: secrets masked."""
        return storage.redact(asdict(self))
