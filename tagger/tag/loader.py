"""The reader part of the tag run: which rows are read, the DataLoader over :class:`tagger.data.reader.ImageRows`
that reads and decodes them in worker processes, and its faults turned into typed errors.

torch reports a dead worker, a stuck store or a broken pipe as a ``RuntimeError`` (or ``ConnectionError``)
whose text says which; that text matching lives here, and nowhere else: a dead worker is
:class:`WorkerFailure` (exit 1), no batch within ``worker_timeout`` is :class:`StorageUnavailable` (exit 4),
and a stop request wins over whatever it caused (:class:`Interrupted`, exit 143).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from .config import TagConfig
from ..data.manifest import Manifest
from .partition import Partition
from ..data.reader import TRANSIENT, Batch, ImageRows, StorageUnavailable, collate, worker_context
from .plan import Plan
from .stop import Interrupted, StopFlag

log = logging.getLogger("tagger.tag.runner")  # the runner's logger: the run's lines show one name


class WorkerFailure(RuntimeError):
    pass


def rows_to_read(manifest: Manifest, plan: Plan, pending: list[int], partition: Partition,
                 options: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A mask of the manifest rows the DataLoader reads (rows of pending shards that passed the manifest
    check and carry no ``--since`` tags over), and how many that is per shard."""
    table = manifest.table
    shard_of_row = table.column("row").to_numpy() // plan.shard_size
    readable = np.isin(shard_of_row, np.asarray(pending, dtype=np.int64))
    readable &= pc.equal(table.column("status"), "").to_numpy(zero_copy_only=False)
    if plan.reuses:
        from .incremental import reused_rows

        readable[reused_rows(partition, options)] = False  # carried over, not read again
    return readable, np.bincount(shard_of_row[readable], minlength=plan.num_shards)


def write_rows(path: str, manifest: Manifest, readable: np.ndarray, chunk: int = 65_536) -> None:
    """The photos to read (``row``, ``location``) as an Arrow IPC file for the workers to memory-map.

    Written a slice of the manifest at a time: the locations of a million rows are never all in this
    process's memory (nor in the allocator's, to be shared with the forked workers).
    """
    schema = pa.schema([("row", pa.int64()), ("location", pa.string())])
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for start in range(0, manifest.num_rows, chunk):
            rows = manifest.table.slice(start, chunk).filter(pa.array(readable[start:start + chunk])).select(["row", "image"])
            if rows.num_rows:
                # One entry per photo: a product with several photos is several consecutive entries of its row.
                numbers, locations = manifest.photo_locations(rows)
                writer.write_table(pa.table({"row": numbers, "location": locations}, schema=schema))
    pa.default_memory_pool().release_unused()


class ImageLoader:
    """A context: the rows file in a scratch folder, the dataset and its DataLoader; :meth:`batches`."""

    def __init__(self, config: TagConfig, manifest: Manifest, readable: np.ndarray, input_size: int,
                 pin_memory: bool, stop: StopFlag):
        self.config, self.manifest, self.stop = config, manifest, stop
        self._readable, self._input_size, self._pin_memory = readable, input_size, pin_memory
        self._scratch: tempfile.TemporaryDirectory | None = None
        self.dataset: ImageRows | None = None
        self.loader: Any = None

    def __enter__(self) -> ImageLoader:
        import torch

        config = self.config
        self._scratch = tempfile.TemporaryDirectory(prefix="tagger-")
        rows_file = f"{self._scratch.name}/rows.arrow"
        write_rows(rows_file, self.manifest, self._readable)
        self._readable = None
        self.dataset = ImageRows(rows_file, self._input_size, config.image_settings())
        workers = config.workers if len(self.dataset) > 0 else 0
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=config.batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self._pin_memory,
            multiprocessing_context=self._context() if workers else None,
            timeout=config.worker_timeout if workers else 0,
            prefetch_factor=4 if workers else None,
            persistent_workers=False,
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        self._scratch.cleanup()

    def __len__(self) -> int:
        return len(self.dataset)

    def _context(self) -> Any:
        # s3fs is not fork-safe: a forkserver when the catalog, the model or any image is on S3 (or another fsspec
        # store). http(s) images are not a reason: tagger.data.http builds its connection pools per process, and a
        # forked worker stays the main process's child, whose death (a SIGTERM mid-download) it hears at once.
        remote = storage.is_remote(self.config.catalog) or storage.is_remote(self.config.model)
        images = self.manifest.table.column("image")
        stores = pc.and_(pc.match_substring(images, "://"), pc.invert(pc.match_substring_regex(images, "^(?i)https?://")))
        remote = remote or bool(pc.any(stores).as_py())
        return worker_context(self.config.worker_start_method, remote)

    def batches(self) -> Iterator[Batch]:
        """The loader's batches; a worker that died is reported as such, and a stop request wins."""
        iterator = iter(self.loader)
        try:
            while True:
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                except RuntimeError as exc:
                    self.stop.check()  # workers receive the scheduler's SIGTERM too
                    text = str(exc)
                    if "DataLoader timed out" in text:
                        raise StorageUnavailable(
                            f"no images arrived from the reading workers for {self.config.worker_timeout:.0f}s ({text}): "
                            "the storage is not answering (or a decoder is stuck); committed shards are kept, nothing was "
                            "written for the open shard, and running the same command again resumes"
                        ) from exc
                    if "DataLoader worker" in text:
                        raise WorkerFailure(_worker_failure_message(text)) from exc
                    raise
                except (ConnectionError, EOFError) as exc:
                    # A worker killed while handing over a batch breaks the pipe under the queue; that is not
                    # the storage (exit 4) but a dead worker.
                    self.stop.check()
                    if not getattr(self.loader, "num_workers", 0):
                        raise
                    raise WorkerFailure(_worker_failure_message(
                        f"lost the connection to the workers ({type(exc).__name__}: {exc}); {_worker_states(iterator)}."
                    )) from exc
                yield batch
        finally:
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                try:
                    shutdown()
                except RuntimeError:
                    pass  # torch's SIGCHLD handler repeating that a worker died (e.g. of the same SIGTERM)


def check_transient(batch: Batch) -> None:
    """A read that failed for a reason retrying later may fix stops the run: never an error row."""
    for row, error_type, message in zip(batch.error_rows, batch.error_types, batch.error_messages):
        if error_type == TRANSIENT:
            raise StorageUnavailable(
                f"row {int(row) + 1}: {message}. Storage looks unavailable; committed shards are kept, nothing "
                "was written for this shard, and running the same command again resumes."
            )


def loop_failure(exc: BaseException, stop: StopFlag) -> BaseException | None:
    """What a failure of the tagging loop is reported as, or None to raise it as it is."""
    if stop.event.is_set() and not isinstance(exc, Interrupted):
        # A stop request wins over what it caused (e.g. workers that died of the same SIGTERM).
        return Interrupted(f"stopped by {stop.signal_name or 'request'}")
    if isinstance(exc, RuntimeError) and not isinstance(exc, WorkerFailure) and "DataLoader worker" in str(exc):
        # torch's SIGCHLD handler raises this wherever the main process happens to be.
        return WorkerFailure(_worker_failure_message(str(exc)))
    return None


def _worker_states(iterator: Any) -> str:
    states = []
    for worker in getattr(iterator, "_workers", []):
        if worker.exitcode is None:
            worker.join(timeout=0.5)  # a worker that just died may not have been reaped yet
        code = worker.exitcode
        state = "running" if code is None else (f"killed by signal {-code}" if code < 0 else f"exited with code {code}")
        states.append(f"pid {worker.pid} {state}")
    return "workers: " + (", ".join(states) or "none")


def _worker_failure_message(text: str) -> str:
    text = text.strip().rstrip(".") + "."
    return (
        f"an image-reading worker failed: {text} A decoder crash or the out-of-memory killer is the usual "
        "cause; committed shards are kept and the same command resumes after the last one."
    )


def progress_meter(config: TagConfig, total: int) -> Any:
    """A tqdm bar on an interactive stderr, a log line every ``log_every`` seconds otherwise (or none)."""
    mode = config.progress
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "log"
    if mode == "ray":  # --engine ray: Ray's own per-operator bars, asked for, and then the only bars
        mode = "none" if config.engine == "ray" else "bar"
    if mode == "bar":
        return _Bar(total)
    return _LogProgress(total, config.log_every if mode == "log" else float("inf"))


class _Bar:
    """tqdm's bar, the one bar of a run, with log records routed through it while it is shown.

    A record written straight to the terminal lands after the bar's last frame on the same line, and the
    bar's next frame is drawn below it: a split line and a stale copy of the bar. tqdm's logging redirect
    writes each record with ``tqdm.write``, which clears the bar, prints the record on its own line and
    redraws the bar under it.
    """

    def __init__(self, total: int):
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        # Only loggers that print to the console themselves: tqdm adds its handler to every logger it is
        # given, and one that only propagates would then print each record twice.
        loggers = [logger for logger in (logging.root, logging.getLogger("ray"), logging.getLogger("ray.data"))
                   if any(_is_console(h) for h in logger.handlers)]
        self._redirect = logging_redirect_tqdm(loggers=loggers, tqdm_class=tqdm)
        self._redirect.__enter__()
        self._bar = tqdm(total=total, unit="img", desc="tagging", file=sys.stderr, dynamic_ncols=True)
        self._closed = False

    def update(self, n: int) -> None:
        self._bar.update(n)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._bar.close()
        finally:
            self._redirect.__exit__(None, None, None)


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stdout, sys.stderr)


class _LogProgress:
    """For cron and Airflow logs: a line every ``every`` seconds instead of a carriage-return bar."""

    def __init__(self, total: int, every: float):
        self.total, self.every, self.done = total, every, 0
        self.started = self.last = time.time()

    def update(self, n: int) -> None:
        self.done += n
        now = time.time()
        if now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            log.info("tagging: %d/%d images (%.1f%%), %.1f img/s, eta %.0fs", self.done, self.total,
                     100.0 * self.done / max(self.total, 1), rate, eta)

    def close(self) -> None:
        pass
