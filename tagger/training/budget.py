"""``--max-minutes`` as a bound on the whole command, the way Lightning's ``max_time`` bounds fitting.

The clock starts when retrain starts. Each costly phase is estimated from its first batches; a budget that cannot
hold is said then (exit 2, naming the estimate and what to change), not when it is spent. What is left after the
frozen-trunk pass goes to fitting, less a reserve for scoring val and test and writing the bundle, so that a run
that reaches its limit mid-way stops, validates, and still writes the best model so far.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .config import ConfigError


# The share of --max-minutes kept for fitting while the trunk pass runs (Budget.reserve_for_fitting).
FIT_SHARE = 0.2


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


class Budget:
    """``max_minutes`` from ``clock()`` at creation (None: no limit). ``clock``: monotonic seconds (tests pass
    one that runs faster than time)."""

    def __init__(self, max_minutes: float | None, clock: Callable[[], float] = time.monotonic):
        self.max_minutes = max_minutes
        self.limit_s = max_minutes * 60 if max_minutes else None
        self.clock = clock
        self.started = clock()

    def spent(self) -> float:
        return self.clock() - self.started

    def left(self) -> float | None:
        return None if self.limit_s is None else self.limit_s - self.spent()

    def require(self, what: str, estimate_s: float, *, after_s: float = 0.0, basis: str = "", fix: str = "",
                after: str = "to score val/test and write the bundle") -> None:
        """Refuse (exit 2) when ``what``, estimated to take ``estimate_s`` more seconds, and ``after_s`` of work
        after it (``after`` says what it is for) cannot end within the limit."""
        if self.limit_s is None:
            return
        spent = self.spent()
        need = spent + estimate_s + after_s
        if need <= self.limit_s:
            return
        raise ConfigError(
            "max_minutes",
            f"--max-minutes {self.max_minutes:g} cannot hold: {what} is estimated at {minutes(estimate_s)} more"
            f"{f' ({basis})' if basis else ''}, after {minutes(spent)} already spent"
            f"{f' and with {minutes(after_s)} needed after it {after}' if after_s else ''}: "
            f"about {need / 60:.1f} min in all. Raise --max-minutes to at least {need / 60 * 1.2:.0f}"
            f"{f', or {fix}' if fix else ''}.",
        )

    def reserve_for_fitting(self) -> float:
        """Seconds of the limit a pass before fitting (the frozen-trunk pass) leaves for the epochs: it stops when only
        this and the scoring reserve are left, so that a pass slower than its estimate still ends in a bundle."""
        return 0.0 if self.limit_s is None else FIT_SHARE * self.limit_s

    def for_fitting(self, reserve_s: float) -> float | None:
        """Seconds left to fit, keeping ``reserve_s`` for what follows it; None: no limit. Exit 2 when nothing is
        left (the work done so far, such as cached trunk features, is kept for the next run)."""
        left = self.left()
        if left is None:
            return None
        fit = left - reserve_s
        if fit < 1:
            raise ConfigError(
                "max_minutes",
                f"--max-minutes {self.max_minutes:g} was spent before the first epoch ({minutes(self.spent())} getting ready, "
                f"{minutes(reserve_s)} needed afterwards to score val/test and write the bundle); raise it. Cached "
                "trunk features are kept: a re-run skips that pass.",
            )
        return fit
