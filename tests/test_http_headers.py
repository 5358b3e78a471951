"""Issue 32: TAGGER_HTTP_HEADERS, a CDN's token header for the https:// images, from the environment only (the
Airflow DAG hands it over from a Connection): sent to the allowed hosts, never shown, a bad value refused by
name with exit 2."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from jobs.cli import cli
from tagger.data.decode import ImageError
from tagger.data.http import HEADERS_ENV, HttpPolicy, env_http_headers, fetch, http_policy

TOKEN = "Bearer sekret-token-1234"
PHOTO = b"\xff\xd8not really a jpeg, enough for fetch"


@pytest.fixture()
def cdn():
    """127.0.0.1: the photo only for a request carrying the token, else 401; every Authorization it saw."""
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            ok = self.headers.get("Authorization") == TOKEN
            body = PHOTO if ok else b"no"
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", '"v1"')
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def policy() -> HttpPolicy:
    return http_policy(["127.0.0.1:*"], allow_private_addresses=True, allow_plain_http=True, deadline=10)


def test_the_header_goes_to_the_allowed_host_and_opens_the_photo(cdn, monkeypatch):
    url, seen = cdn
    with pytest.raises(ImageError) as refused:
        fetch(f"{url}/p1.jpg", policy())
    assert refused.value.error_type == "forbidden" and seen == [None]
    monkeypatch.setenv(HEADERS_ENV, '{"Authorization": "%s"}' % TOKEN)
    data, version = fetch(f"{url}/p1.jpg", policy())
    assert data == PHOTO and version == f"{len(PHOTO)}-v1" and seen[-1] == TOKEN


def test_the_value_is_never_shown(monkeypatch):
    monkeypatch.setenv(HEADERS_ENV, '{"Authorization": "%s"}' % TOKEN)
    assert "sekret" not in repr(policy()) and "sekret" not in str(policy())


@pytest.mark.parametrize("raw, said", [
    ("Authorization: Bearer sekret", "not JSON"),
    ('["sekret"]', "expected a JSON object"),
    ('{"Bad Name": "sekret"}', "not an HTTP header name"),
    ('{"Authorization": "sekret\\r\\nX-Injected: 1"}', "without line breaks"),
    ('{"Host": "sekret"}', "set by the job itself"),
])
def test_a_bad_value_is_refused_by_name_without_repeating_it(monkeypatch, raw, said):
    monkeypatch.setenv(HEADERS_ENV, raw)
    with pytest.raises(ValueError) as raised:
        env_http_headers()
    assert said in str(raised.value) and HEADERS_ENV in str(raised.value) and "sekret" not in str(raised.value)


def test_headers_without_an_allowed_host_are_an_error_not_ignored(monkeypatch):
    monkeypatch.setenv(HEADERS_ENV, '{"Authorization": "x"}')
    with pytest.raises(ValueError, match="no --allow-host"):
        http_policy([])


def test_the_tag_job_exits_2_on_a_bad_value_before_anything_changes(monkeypatch, tmp_path):
    monkeypatch.setenv(HEADERS_ENV, "{not json sekret")
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("product_id,image\np1,https://cdn.example.com/p1.jpg\n")
    result = CliRunner().invoke(cli, ["tag", "--catalog", str(catalog), "--model", str(tmp_path / "m"),
                                      "--out", str(tmp_path / "out"), "--allow-host", "cdn.example.com"])
    assert result.exit_code == 2 and HEADERS_ENV in result.output and "sekret" not in result.output
    assert not (tmp_path / "out").exists()
