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
    loopback = ["--allow-host", "127.0.0.1:*", "--allow-private-addresses"]
    failed = tag(manifest, tiny_bundle, out, *loopback)
    assert failed.exit_code == 3, failed.output
    line = failed.output.strip().splitlines()[-1]
    assert "errors=4 (invalid_location 4)" in line and "re-run the same command with --allow-plain-http" in line, line
    assert server.requests == [], "plain http:// is refused before any request"
    again = tag(manifest, tiny_bundle, out, *loopback)
    assert again.exit_code == 3, "the same command replays the same failure"

    fixed = tag(manifest, tiny_bundle, out, *loopback, "--allow-plain-http")
    assert fixed.exit_code == 0, fixed.output
    tagged = read_complete_partition(f"{out}/tags/run_date={DATE}")
    errors = read_complete_partition(f"{out}/errors/run_date={DATE}")
    assert sorted(tagged.column("product_id").to_pylist()) == ["p0", "p1", "p2", "p3"] and errors.num_rows == 0
    plan = json.loads((out / "_runs" / f"run_date={DATE}" / "plan.json").read_text())
    assert plan["key"]["allow_plain_http"] is True and plan["key"]["allow_hosts"] == ["127.0.0.1:*"]


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


def test_the_log_names_each_error_type_and_photo_errors_of_tagged_products_are_counted(server, tiny_bundle, tmp_path,
                                                                                      caplog):
    # Four products of two photos each; every second photo a 404: all are tagged from their other photo. One more
    # product has a file that is not there and one a host that is not allowed.
    rows = [(f"p{i}", f"{server.url}/img/p{i}.jpg;{server.url}/img/gone{i}.jpg") for i in range(4)]
    rows += [("lost", str(tmp_path / "nowhere.jpg")), ("away", "http://localhost:1/x.jpg")]
    manifest = catalog(tmp_path / "catalog.csv", rows)
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="tagger.tag.runner"):
        result = tag(manifest, tiny_bundle, out, "--allow-host", "127.0.0.1:*", "--allow-private-addresses",
                     "--allow-plain-http", "--image-separator", ";", "--max-error-rate", "1")
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    assert "tagged=4 reused=0 errors=2 (invalid_location 1, missing 1)" in line, line
    assert "photo_errors=6 (missing 5, invalid_location 1)" in line, line
    summary = json.loads((out / "_runs" / f"run_date={DATE}" / "summary.json").read_text())
    assert summary["photo_errors"] == {"invalid_location": 1, "missing": 5}
    assert summary["error_examples"]["missing"].startswith("lost: ")
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("error invalid_location: 1 rows; first: away: http://localhost:1/x.jpg") for m in logged), logged
    assert any(m.startswith("photo error missing: 5 photos; first: p0: ") and "gone0.jpg" in m for m in logged), logged
    report = CliRunner().invoke(cli, ["report", "--out", str(out), "--run-date", DATE, "--gallery", "0"], catch_exceptions=False)
    assert report.exit_code == 0, report.output
    body = json.loads((out / "_reports" / f"run_date={DATE}" / "report.json").read_text())
    assert body["counts"]["photo_errors"] == {"invalid_location": 1, "missing": 5}
    assert "photos not read: missing" in (out / "_reports" / f"run_date={DATE}" / "report.html").read_text()


def test_a_shard_task_with_other_reading_options_than_its_plan_is_refused_naming_them(demo, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    assert tag(demo.catalog, tiny_bundle, out, "--plan-only").exit_code == 0
    result = tag(demo.catalog, tiny_bundle, out, "--shard", "0/1", "--max-image-bytes", "1000")
    assert result.exit_code == 2, result.output
    assert "the plan's settings differ: max_image_bytes default -> 1000" in result.output, result.output


def test_the_cdn_header_names_are_part_of_the_plan_and_never_their_values(monkeypatch):
    from tagger.tag.config import TagConfig
    from tagger.tag.plan import reading_key

    config = dict(catalog="c.csv", model="m", out="o", allow_hosts=("cdn.example.com",))
    assert reading_key(TagConfig(**config)) == {"allow_hosts": ["cdn.example.com"]}
    monkeypatch.setenv("TAGGER_HTTP_HEADERS", json.dumps({"Authorization": "Bearer s3cr3t"}))
    key = reading_key(TagConfig(**config))
    assert key == {"allow_hosts": ["cdn.example.com"], "http_headers": ["authorization"]}
    assert "s3cr3t" not in json.dumps(key)
