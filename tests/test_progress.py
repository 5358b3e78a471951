"""Issue 23, progress and logs: on a terminal a log record printed while the bar is shown gets its own line
(no split line, no stale bar); one bar per run, with either engine; retrain's bar is on stderr."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import select
import struct
import sys
import termios

import pytest

from tagger.tag.config import TagConfig
from tagger.tag.loader import _Bar, _LogProgress, progress_meter

FORMAT = "%(levelname)s %(name)s: %(message)s"


def read_all(fd: int) -> str:
    chunks = []
    while select.select([fd], [], [], 0.2)[0]:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


@pytest.fixture()
def terminal(monkeypatch):
    """Puts stderr on a real pseudo-terminal, with the tagger's console log handler on it, as `tagger` sets up;
    called in the test itself (pytest's capture sets sys.stderr again between a fixture and its test)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    stream = os.fdopen(slave, "w", buffering=1)
    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def start() -> int:
        monkeypatch.setattr(sys, "stderr", stream)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        root.handlers = [handler]
        root.setLevel(logging.INFO)
        return master

    yield start
    root.handlers, level = saved
    root.setLevel(level)
    stream.close()
    os.close(master)


def test_log_records_get_their_own_line_while_the_bar_is_shown(terminal):
    master = terminal()
    config = TagConfig(catalog="c", model="m", out="o", progress="auto")
    bar = progress_meter(config, 200)
    assert isinstance(bar, _Bar), "a terminal gets the bar"
    log = logging.getLogger("tagger.tag.shards")
    bar.update(64)
    log.info("committed shard 0")
    bar.update(64)
    log.warning("a slow image")
    bar.update(72)
    bar.close()
    screen = read_all(master)

    for message in ("INFO tagger.tag.shards: committed shard 0", "WARNING tagger.tag.shards: a slow image"):
        lines = [line for line in screen.split("\n") if message in line]
        assert len(lines) == 1, screen
        # What stays on the terminal's line is what follows the last carriage return: the record alone.
        assert lines[0].rstrip("\r").split("\r")[-1].lstrip() == message, repr(lines[0])
    # The bar was redrawn under each record and ends complete.
    assert "200/200" in screen.split("a slow image", 1)[1], screen
    # After the bar, records go straight to the terminal again (the handler is given back).
    assert logging.getLogger().handlers[0].__class__ is logging.StreamHandler


def test_one_bar_per_run_whichever_engine(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert isinstance(progress_meter(TagConfig(catalog="c", model="m", out="o", progress="log"), 1), _LogProgress)
    # --progress ray: Ray's own bars (switched on in the pipeline) and then no bar of ours beside them.
    ray_config = TagConfig(catalog="c", model="m", out="o", progress="ray", engine="ray")
    meter = progress_meter(ray_config, 1)
    assert isinstance(meter, _LogProgress) and meter.every == float("inf")


def test_the_model_line_says_what_runs_in_what_arithmetic_and_why(tiny_bundle, caplog):
    import torch

    from tagger.model.bundle import load_bundle
    from tagger.model.predictor import Predictor

    caplog.set_level(logging.INFO, logger="tagger.model.predictor")
    Predictor(load_bundle(tiny_bundle), torch.device("cpu"), precision="fp32", runtime="torch")
    assert "model: torch computing in fp32: asked for with --runtime" in caplog.text, caplog.text
