"""What a retrain says while it runs: a line every 30 s with the rate and the ETA of the phase it is in (trunk pass,
each epoch's batches, scoring), and one line per epoch with the train loss and the validation score per attribute.

Plain log lines, not a progress bar: they read the same on a terminal, in ``> log.txt``, under nohup or Airflow, and
in the run's own ``retrain.log`` beside the checkpoints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

log = logging.getLogger("tagger.training")

EVERY_S = 30.0


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Ticker:
    """``update(done)`` logs ``what: done/total unit (rate/s), ETA ...`` at most every ``every_s`` seconds."""

    def __init__(self, what: str, total: int, unit: str = "images", *, every_s: float = EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.what, self.total, self.unit, self.every_s, self.clock = what, total, unit, every_s, clock
        self.started = clock()
        self.last = self.started
        self.done = 0

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    def rate(self) -> float:
        return self.done / max(self.elapsed, 1e-9)

    def eta(self) -> float:
        rate = self.rate()
        return (self.total - self.done) / rate if rate > 0 else float("inf")

    def update(self, done: int) -> None:
        self.done = done
        now = self.clock()
        if now - self.last >= self.every_s and done < self.total:
            self.last = now
            log.info("%s: %d/%d %s (%.1f/s), %s in, ETA %s", self.what, done, self.total, self.unit, self.rate(),
                     duration(now - self.started), duration(self.eta()))

    def finish(self, note: str = "") -> None:
        log.info("%s: %d %s in %s (%.1f/s)%s", self.what, self.done, self.unit, duration(self.elapsed), self.rate(), note)


def ticking(batches: Iterable[Any], ticker: Ticker, size: Callable[[Any], int]) -> Iterator[Any]:
    """``batches`` as they come, ``ticker`` told how many items have passed."""
    done = 0
    for batch in batches:
        yield batch
        done += size(batch)
        ticker.update(done)
    ticker.finish()


def epoch_reporter(attributes: Sequence[str], score_metric: str):
    """A Lightning callback: a rate/ETA line every 30 s within each epoch's training and validation batches, and one
    line per epoch: train loss, validation score, and per attribute its validation accuracy and macro-F1."""
    import pytorch_lightning as pl

    class EpochReport(pl.Callback):
        def __init__(self):
            self.losses: list[float] = []
            self.best: float | None = None
            self.train: Ticker | None = None
            self.val: Ticker | None = None

        def on_train_epoch_start(self, trainer, module):
            self.losses = []
            epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
            self.train = Ticker(f"epoch {trainer.current_epoch + 1}{epochs} training", int(trainer.num_training_batches), "batches")

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if loss is not None:
                self.losses.append(float(loss))
            if self.train is not None:
                self.train.update(batch_idx + 1)

        def on_validation_epoch_start(self, trainer, module):
            if not trainer.sanity_checking:
                total = trainer.num_val_batches[0] if trainer.num_val_batches else 0
                self.val = Ticker(f"epoch {trainer.current_epoch + 1} validation", int(total), "batches")

        def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
            if self.val is not None and not trainer.sanity_checking:
                self.val.update(batch_idx + 1)

        def on_validation_end(self, trainer, module):
            # Not on_validation_epoch_end: callbacks run that hook before the module logs the epoch's scores.
            if trainer.sanity_checking:
                return
            metrics = trainer.callback_metrics
            score = float(metrics[score_metric]) if score_metric in metrics else float("nan")
            better = self.best is None or score > self.best
            self.best = score if better else self.best
            loss = sum(self.losses) / len(self.losses) if self.losses else float("nan")
            steps = len(self.losses)
            partial = ""
            if self.train is not None and steps < self.train.total:
                partial = f" (stopped after {steps} of {self.train.total} batches)"
            parts = []
            for attr in attributes:
                acc, f1 = metrics.get(f"val/{attr}/accuracy"), metrics.get(f"val/{attr}/macro_f1")
                if acc is not None and f1 is not None:
                    parts.append(f"{attr} {100 * float(acc):.1f}%/{float(f1):.3f}")
            spent = duration(self.train.elapsed) if self.train is not None else "?"
            log.info("epoch %d%s in %s: train loss %.4f, val score %.4f%s; val accuracy/macro-F1: %s",
                     trainer.current_epoch + 1, partial, spent, loss, score, " (best so far)" if better else "",
                     ", ".join(parts))

    return EpochReport()
