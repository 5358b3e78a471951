"""SIGTERM/SIGINT, honoured from the first second: at once outside the tagging loop, between batches inside it."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any

from ..data import http as http_images


class Interrupted(BaseException):
    """A stop request. A BaseException, like KeyboardInterrupt: no library's ``except Exception`` (a retry
    loop, say) may swallow it."""


class StopFlag:
    """SIGTERM/SIGINT, honoured from the first second.

    Outside the tagging loop (reading the manifest or the bundle, waiting out S3 retries, planning) the
    handler raises :class:`Interrupted` at once, wherever the main thread is. Inside it (:meth:`graceful`)
    the handler only sets the flag: the batch in hand is finished, the open shard aborted, committed shards
    kept, then the run stops; unless this thread is waiting on an http(s) photo, which is interrupted at once.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name = ""
        self._previous: dict[int, Any] = {}
        self._graceful = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        self.event.set()
        # Inside the loop too when this thread is waiting on an http(s) photo (--workers 0): the batch would end
        # only with that photo's deadline, minutes for a slow server. Nothing is lost: the open shard is aborted.
        if not self._graceful or http_images.fetching():
            raise Interrupted(f"stopped by {self.signal_name}")

    @contextmanager
    def graceful(self):
        """While in this block a stop request only sets the flag, for the loop to check between batches."""
        self.check()
        previous, self._graceful = self._graceful, True  # nestable: an inner block leaves the outer one graceful
        try:
            yield
        finally:
            self._graceful = previous

    def check(self) -> None:
        if self.event.is_set():
            raise Interrupted(f"stopped by {self.signal_name or 'request'}")
