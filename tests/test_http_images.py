"""https:// images from allowed hosts (tagger/data/http.py): each way a CDN answers ends as documented.

A photo server on 127.0.0.1 (tests/http_server.py) stands in for the CDN; loopback and plain HTTP are
allowed here only through the explicit --allow-private-addresses and --allow-plain-http.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from PIL import Image

from jobs.cli import cli
from tagger.data.decode import ImageError
from tagger.data.http import HttpPolicy, address_refused, host_pattern_problem
from tagger.data.reader import StorageUnavailable, fetch_image
from tagger.tag.writers import read_complete_partition

from .http_server import PhotoServer

TAGGER = str(Path(sys.executable).parent / "tagger")
NIGHT1, NIGHT2 = "2026-06-01", "2026-06-02"
# The test server listens on a port of its own: "127.0.0.1:*" allows every port of the host (a bare name, the
# scheme's default port only).
LOOPBACK = HttpPolicy(("127.0.0.1:*",), allow_private=True, allow_plain_http=True, deadline=5.0)
ALLOW = ["--allow-host", "127.0.0.1:*", "--allow-private-addresses", "--allow-plain-http"]


def photo(path: Path, colour: tuple[int, int, int], size=(48, 64)) -> Path:
    buffer = BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG", quality=90)
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cdn")
    rng = np.random.default_rng(0)
    for index in range(12):
        photo(folder / f"p{index}.jpg", tuple(int(v) for v in rng.integers(0, 255, 3)))
    return folder


@pytest.fixture()
def server(photos):
    server = PhotoServer(photos, slow_pause=0.2).start()
    yield server
    server.stop()


# -- the policy, without a server ------------------------------------------------------------------------
def test_hosts_and_wildcards():
    policy = HttpPolicy(("cdn.example.com", "*.shop.example"))
    assert policy.allows_host("cdn.example.com") and policy.allows_host("CDN.Example.com.")
    assert policy.allows_host("img.shop.example") and policy.allows_host("a.b.shop.example")
    assert not policy.allows_host("shop.example"), "a wildcard names subdomains, not the domain itself"
    assert not policy.allows_host("evilshop.example") and not policy.allows_host("cdn.example.com.evil.net")
    assert host_pattern_problem("https://cdn.example.com") and host_pattern_problem("*.com") and host_pattern_problem("cdn:99999")
    with pytest.raises(ValueError, match="--allow-host"):
        HttpPolicy(("*",))


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "::1", "fe80::1",
                                     "::ffff:127.0.0.1", "100.64.0.1", "0.0.0.0", "fc00::1",
                                     # IPv6 forms carrying an internal IPv4 address (NAT64, 6to4, compatible, translated)
                                     "64:ff9b::a9fe:a9fe", "64:ff9b:1::7f00:1", "2002:a9fe:a9fe::1", "::127.0.0.1",
                                     "::ffff:0:10.0.0.1"])
def test_internal_addresses_are_refused(address):
    assert address_refused(address)


def test_public_addresses_pass():
    assert address_refused("93.184.216.34") is None and address_refused("2606:2800:220:1:248:1893:25c8:1946") is None
    assert address_refused("64:ff9b::5db8:d822") is None, "NAT64 of a public address"


def test_without_allow_host_a_url_is_never_requested(server):
    with pytest.raises(ImageError) as info:
        fetch_image(f"{server.url}/img/p0.jpg", None)
    assert info.value.error_type == "invalid_location" and "--allow-host" in info.value.message
    assert server.requests == []


def test_loopback_is_refused_unless_allowed(server):
    for policy, why in ((HttpPolicy(("127.0.0.1:*",), allow_plain_http=True), "loopback"),
                        (HttpPolicy(("127.0.0.1:*",), allow_private=True), "plain http")):
        with pytest.raises(ImageError) as info:
            fetch_image(f"{server.url}/img/p0.jpg", None, http=policy)
        assert info.value.error_type == "invalid_location" and why in info.value.message, info.value.message
    assert server.requests == [], "refused before any byte was sent"


# -- each answer of the server ------------------------------------------------------------------------
def test_photo_version_and_connection_reuse(server, photos):
    data, version = fetch_image(f"{server.url}/img/p1.jpg", None, http=LOOPBACK)
    assert data == (photos / "p1.jpg").read_bytes()
    assert version.startswith(f"{len(data)}-") and len(version) > len(str(len(data))) + 20  # size-ETag
    again, same = fetch_image(f"{server.url}/img/p1.jpg", None, http=LOOPBACK)
    assert (again, same) == (data, version)


@pytest.mark.parametrize("code,error_type", [(404, "missing"), (410, "missing"), (403, "forbidden"), (401, "forbidden"),
                                              (400, "invalid_location")])
def test_status_codes_are_typed_rows(server, code, error_type):
    with pytest.raises(ImageError) as info:
        fetch_image(f"{server.url}/status/{code}", None, http=LOOPBACK)
    assert info.value.error_type == error_type and str(code) in info.value.message
    assert server.count("GET") == 1, "a definite answer is not retried"


def test_retry_after_429_then_the_photo(server, photos):
    started = time.monotonic()
    data, _ = fetch_image(f"{server.url}/flaky/p2.jpg", None, http=LOOPBACK)
    assert data == (photos / "p2.jpg").read_bytes()
    assert time.monotonic() - started >= 0.9, "Retry-After: 1 was honoured"
    assert server.count("GET", "/flaky/") == 2


def test_server_errors_become_storage_unavailable(server):
    policy = HttpPolicy(("127.0.0.1:*",), allow_private=True, allow_plain_http=True, deadline=5.0, attempts=3)
    with pytest.raises(StorageUnavailable, match="HTTP 503"):
        fetch_image(f"{server.url}/status/503", None, http=policy)
    assert server.count("GET") == 3


def test_redirects_only_to_allowed_hosts(server, photos):
    inside = f"{server.url}/redirect?to=/img/p3.jpg"
    assert fetch_image(inside, None, http=LOOPBACK)[0] == (photos / "p3.jpg").read_bytes()
    away = f"{server.url}/redirect?to=" + server.url.replace("127.0.0.1", "localhost") + "/img/p3.jpg"
    with pytest.raises(ImageError) as info:
        fetch_image(away, None, http=LOOPBACK)
    assert info.value.error_type == "invalid_location" and "'localhost' is not allowed" in info.value.message
    assert "redirected from" in info.value.message
    assert server.count("GET", "/img/") == 1, "the disallowed target was never requested"


def test_byte_cap_streamed_and_declared(server):
    for path in ("/huge", "/huge-declared"):
        started = time.monotonic()
        with pytest.raises(ImageError) as info:
            fetch_image(server.url + path, None, http=LOOPBACK, max_bytes=50 << 20)
        assert info.value.error_type == "too_large", info.value.message
        assert time.monotonic() - started < 30


def test_slow_body_inside_the_deadline_and_a_stalled_one_past_it(server, photos):
    assert fetch_image(f"{server.url}/slow/p4.jpg", None, http=LOOPBACK)[0] == (photos / "p4.jpg").read_bytes()
    policy = HttpPolicy(("127.0.0.1:*",), allow_private=True, allow_plain_http=True, deadline=2.0, read_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable):
        fetch_image(f"{server.url}/stall/p4.jpg", None, http=policy)
    with pytest.raises(StorageUnavailable):
        fetch_image(f"{server.silent_url}/img/p4.jpg", None, http=policy)
    assert time.monotonic() - started < 10, "bounded by the deadline"


# -- the tag job -------------------------------------------------------------------------------------------
def write_catalog(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["product_id", "image"])
        writer.writerows(rows)
    return path


def tag(catalog: Path, model: str, out: Path, date: str, *extra: str):
    args = ["tag", "--catalog", str(catalog), "--model", model, "--out", str(out), "--run-date", date, "--workers", "0",
            "--progress", "none", "--max-error-rate", "1", *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def tables(out: Path, date: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    return (pl.from_arrow(read_complete_partition(f"{out}/tags/run_date={date}")),
            pl.from_arrow(read_complete_partition(f"{out}/errors/run_date={date}")))


def mixed_rows(server: PhotoServer) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(product, url) rows and the outcome each must end in: "" tagged, else the error type."""
    away = server.url.replace("127.0.0.1", "localhost")
    cases = {
        "ok0": (f"{server.url}/img/p0.jpg", ""),
        "ok1": (f"{server.url}/img/p1.jpg", ""),
        "slow": (f"{server.url}/slow/p5.jpg", ""),
        "flaky": (f"{server.url}/flaky/p6.jpg", ""),
        "moved": (f"{server.url}/redirect?to=/img/p7.jpg", ""),
        "gone404": (f"{server.url}/img/nope.jpg", "missing"),
        "gone410": (f"{server.url}/status/410", "missing"),
        "denied": (f"{server.url}/status/403", "forbidden"),
        "bounced": (f"{server.url}/redirect?to={away}/img/p0.jpg", "invalid_location"),
        "other_host": (f"{away}/img/p0.jpg", "invalid_location"),
        "huge": (f"{server.url}/huge", "too_large"),
        "ftp": ("ftp://127.0.0.1/p0.jpg", "invalid_location"),
    }
    return [(k, url) for k, (url, _) in cases.items()], {k: outcome for k, (_, outcome) in cases.items()}


@pytest.mark.parametrize("engine", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_every_row_ends_as_documented(server, tiny_bundle, tmp_path, engine):
    if engine == "ray":
        pytest.importorskip("ray")
    rows, expected = mixed_rows(server)
    catalog = write_catalog(tmp_path / "catalog.csv", rows)
    out = tmp_path / "out"
    result = tag(catalog, tiny_bundle, out, NIGHT1, *ALLOW, "--engine", engine)
    assert result.exit_code == 0, result.output
    tagged, errors = tables(out, NIGHT1)
    outcome = {**{p: "" for p in tagged["product_id"]}, **dict(zip(errors["product_id"], errors["error_type"]))}
    assert outcome == expected
    assert all(v for v in tagged["image_version"]), "every web photo has a version"


def test_without_allow_host_nothing_is_requested(server, tiny_bundle, tmp_path):
    rows, _ = mixed_rows(server)
    out = tmp_path / "out"
    result = tag(write_catalog(tmp_path / "catalog.csv", rows), tiny_bundle, out, NIGHT1)
    assert result.exit_code == 0, result.output
    tagged, errors = tables(out, NIGHT1)
    assert tagged.height == 0 and set(errors["error_type"]) == {"invalid_location"}
    assert server.requests == []


def test_an_unanswering_server_is_exit_4_not_a_hang(server, tiny_bundle, tmp_path):
    rows = [("a", f"{server.url}/img/p0.jpg"), ("b", f"{server.silent_url}/img/p1.jpg")]
    out = tmp_path / "out"
    started = time.monotonic()
    result = tag(write_catalog(tmp_path / "catalog.csv", rows), tiny_bundle, out, NIGHT1, *ALLOW, "--http-deadline", "2")
    assert result.exit_code == 4, result.output
    assert "storage unavailable" in result.output and "row 2" in result.output
    assert time.monotonic() - started < 60
    assert not (out / "tags" / f"run_date={NIGHT1}" / "_SUCCESS").exists()


def test_since_downloads_nothing_unchanged(server, photos, tiny_bundle, tmp_path):
    rows = [(f"p{i}", f"{server.url}/img/p{i}.jpg") for i in range(8)]
    catalog = write_catalog(tmp_path / "catalog.csv", rows)
    out = tmp_path / "out"
    assert tag(catalog, tiny_bundle, out, NIGHT1, *ALLOW).exit_code == 0
    assert server.count("GET") == 8
    photo(photos / "p3.jpg", (1, 2, 3), size=(50, 60))  # one photo changes on the CDN
    server.requests.clear()
    result = tag(catalog, tiny_bundle, out, NIGHT2, *ALLOW, "--since", str(out))
    assert result.exit_code == 0, result.output
    assert server.count("GET") == 1 and server.requests[-1] == ("GET", "/img/p3.jpg"), server.requests
    assert server.count("HEAD") == 8
    summary = json.loads((out / "_runs" / f"run_date={NIGHT2}" / "summary.json").read_text())
    assert summary["reused"] == 7 and summary["tagged"] == 1
    tagged, _ = tables(out, NIGHT2)
    assert tagged.height == 8


@pytest.mark.parametrize("route, workers, sig", [
    ("stall", "1", signal.SIGTERM),
    # --workers 0: the photo is read in the loop of the main process; a server dripping a byte a second must not
    # hold the stop until the photo's deadline (120 s by default) (issue 29)
    ("drip", "0", signal.SIGTERM), ("drip", "0", signal.SIGINT),
], ids=["stalled-worker", "dripping-no-workers-SIGTERM", "dripping-no-workers-SIGINT"])
def test_a_stop_request_during_a_download(server, tiny_bundle, tmp_path, route, workers, sig):
    rows = [("a", f"{server.url}/img/p0.jpg"), ("b", f"{server.url}/{route}/p1.jpg")]
    catalog = write_catalog(tmp_path / "catalog.csv", rows)
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    args = [TAGGER, "tag", "--catalog", str(catalog), "--model", tiny_bundle, "--out", str(out), "--run-date", NIGHT1,
            "--workers", workers, "--progress", "none", *ALLOW]
    process = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while server.count("GET", f"/{route}/") == 0:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"the {route} photo was never requested"
            time.sleep(0.05)
        time.sleep(1.0)  # stuck in the body now
        os.killpg(process.pid, sig)  # as a scheduler does: the whole group
        code = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert code == 143, log.read_text()
    assert f"interrupted: stopped by {sig.name}" in log.read_text()
