"""The morning after a failed night: a re-run with the missing option fixed tags the date (tagger/tag/plan.py),
and the one-line summary says what went wrong without opening the errors table (tagger/tag/summary.py)."""

from __future__ import annotations

import csv
import json
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from jobs.cli import cli
from tagger.tag.writers import read_complete_partition

from .http_server import PhotoServer

DATE = "2026-06-01"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cdn")
    rng = np.random.default_rng(1)
    for index in range(4):
        buffer = BytesIO()
        Image.new("RGB", (48, 64), tuple(int(v) for v in rng.integers(0, 255, 3))).save(buffer, "JPEG", quality=90)
        (folder / f"p{index}.jpg").write_bytes(buffer.getvalue())
    return folder


@pytest.fixture()
def server(photos):
    server = PhotoServer(photos).start()
    yield server
    server.stop()


def catalog(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["product_id", "image"])
        writer.writerows(rows)
    return path


def tag(catalog: Path, model: str, out: Path, *extra: str):
    args = ["tag", "--catalog", str(catalog), "--model", model, "--out", str(out), "--run-date", DATE, "--workers", "0",
            "--progress", "none", *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_a_night_that_failed_for_a_missing_option_is_tagged_by_the_same_command_with_it(server, tiny_bundle, tmp_path):
    rows = [(f"p{i}", f"{server.url}/img/p{i}.jpg") for i in range(4)]
    manifest = catalog(tmp_path / "catalog.csv", rows)
    out = tmp_path / "out"
    loopback = ["--allow-host", "127.0.0.1", "--allow-private-addresses"]
    failed = tag(manifest, tiny_bundle, out, *loopback)
    assert failed.exit_code == 3, failed.output
    assert server.requests == [], "plain http:// is refused before any request"
    again = tag(manifest, tiny_bundle, out, *loopback)
    assert again.exit_code == 3, "the same command replays the same failure"

    fixed = tag(manifest, tiny_bundle, out, *loopback, "--allow-plain-http")
    assert fixed.exit_code == 0, fixed.output
    tagged = read_complete_partition(f"{out}/tags/run_date={DATE}")
    errors = read_complete_partition(f"{out}/errors/run_date={DATE}")
    assert sorted(tagged.column("product_id").to_pylist()) == ["p0", "p1", "p2", "p3"] and errors.num_rows == 0
    plan = json.loads((out / "_runs" / f"run_date={DATE}" / "plan.json").read_text())
    assert plan["key"]["allow_plain_http"] is True and plan["key"]["allow_hosts"] == ["127.0.0.1"]


def test_a_plan_written_before_the_reading_options_were_recorded_resumes_under_the_defaults(demo, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    manifest = demo.catalog
    first = tag(manifest, tiny_bundle, out, "--shard-size", "16", "--max-error-rate", "1", "--plan-only")
    assert first.exit_code == 0, first.output
    plan_file = out / "_runs" / f"run_date={DATE}" / "plan.json"
    plan = json.loads(plan_file.read_text())
    assert not {"allow_hosts", "allow_plain_http", "allow_private_addresses", "max_image_bytes"} & set(plan["key"])
    resumed = tag(manifest, tiny_bundle, out, "--shard-size", "16", "--max-error-rate", "1")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(plan_file.read_text())["run_id"] == plan["run_id"], "the older plan was resumed, not replaced"
