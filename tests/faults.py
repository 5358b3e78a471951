"""Test helpers for failure tests: an S3 fault-injecting HTTP proxy, catalogs to interrupt, process tools.

:class:`S3FaultProxy` sits on 127.0.0.1 between the tag job and the moto S3 server of conftest's
``s3_endpoint`` fixture. Point ``--storage-option endpoint_url=<proxy.url>`` (or ``AWS_ENDPOINT_URL``) at
it; every request is forwarded unchanged unless a rule matches it, in which case the proxy answers with
an S3 error (500 InternalError, 503 SlowDown, 403 AccessDenied), resets the connection, stalls, or
delays the request. Rules match on the HTTP method and a substring of the request path
(``/bucket/key``, path-style addressing, which botocore uses for an IP endpoint), and can be limited to
the first N matching requests, so "fails twice, then works" is one rule.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect"}

_STATUS_CODES = {500: "InternalError", 503: "SlowDown", 403: "AccessDenied"}


@dataclass
class Rule:
    action: str  # "error" | "reset" | "stall" | "delay"
    path: str = ""  # substring of the request path; "" matches every request
    method: str | None = None  # GET, HEAD, PUT...; None matches every method
    status: int = 503
    code: str = ""
    times: int | None = None  # apply to the first N matching requests only; None: always
    seconds: float = 0.0  # for "stall" and "delay"
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        if self.path and self.path not in path:
            return False
        return self.times is None or self.hits < self.times


class S3FaultProxy:
    """A threaded HTTP proxy on loopback that forwards to ``upstream`` and injects S3 faults by rule."""

    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rules: list[Rule] = []
        self.log: list[tuple[str, str, int]] = []  # (method, path, status or -1 for a reset/stall)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self) -> None:
                body = self._body()
                rule = proxy._match(self.command, self.path)
                if rule is not None and rule.action == "delay":
                    time.sleep(rule.seconds)
                    rule = None
                if rule is None:
                    self._forward(body)
                elif rule.action == "error":
                    self._error(rule.status, rule.code or _STATUS_CODES.get(rule.status, "InternalError"))
                elif rule.action == "reset":
                    proxy._record(self.command, self.path, -1)
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                elif rule.action == "stall":
                    proxy._record(self.command, self.path, -1)
                    time.sleep(rule.seconds)
                    self.close_connection = True
                else:
                    raise ValueError(rule.action)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

            def _error(self, status: int, code: str) -> None:
                proxy._record(self.command, self.path, status)
                payload = (
                    '<?xml version="1.0" encoding="UTF-8"?>\n'
                    f"<Error><Code>{code}</Code><Message>injected by the test proxy</Message>"
                    f"<Resource>{self.path}</Resource><RequestId>fault</RequestId></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _forward(self, body: bytes) -> None:
                connection = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    connection.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                            connection.putheader(name, value)
                    if body or self.command in ("PUT", "POST"):
                        connection.putheader("Content-Length", str(len(body)))
                    connection.endheaders(body or None)
                    response = connection.getresponse()
                    payload = response.read()
                    proxy._record(self.command, self.path, response.status)
                    self.send_response(response.status)
                    for name, value in response.getheaders():
                        if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                            self.send_header(name, value)
                    if self.command == "HEAD":
                        length = response.getheader("Content-Length")
                        if length is not None:
                            self.send_header("Content-Length", length)
                    else:
                        self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                finally:
                    connection.close()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    # -- rules -----------------------------------------------------------------------------------
    def add(self, action: str, path: str = "", **kwargs) -> Rule:
        rule = Rule(action, path, **kwargs)
        with self._lock:
            self.rules.append(rule)
        return rule

    def fail(self, path: str = "", status: int = 503, code: str = "", **kwargs) -> Rule:
        """Answer with an S3 error: 503 SlowDown by default, or 500 InternalError."""
        return self.add("error", path, status=status, code=code, **kwargs)

    def deny(self, path: str, **kwargs) -> Rule:
        """403 AccessDenied, as S3 answers a key the credentials may not read."""
        return self.add("error", path, status=403, code="AccessDenied", **kwargs)

    def reset(self, path: str = "", **kwargs) -> Rule:
        """Reset the TCP connection (RST) instead of answering."""
        return self.add("reset", path, **kwargs)

    def stall(self, path: str = "", seconds: float = 30.0, **kwargs) -> Rule:
        """Accept the request and answer nothing for ``seconds`` (a read timeout on the client)."""
        return self.add("stall", path, seconds=seconds, **kwargs)

    def delay(self, path: str = "", seconds: float = 0.05, **kwargs) -> Rule:
        """Forward, but only after ``seconds``: a slow store."""
        return self.add("delay", path, seconds=seconds, **kwargs)

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def _match(self, method: str, path: str) -> Rule | None:
        path = unquote(path)  # botocore sends run_date=... as run_date%3D...
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.hits += 1
                    return rule
        return None

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.log.append((method, path, status))

    def requests(self, method: str | None = None, path: str = "") -> list[tuple[str, str, int]]:
        with self._lock:
            return [r for r in self.log if (method is None or r[0] == method) and path in unquote(r[1])]

    # -- lifetime --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> S3FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- processes -------------------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (Linux /proc)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.update(int(p) for p in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    if not found:  # kernels without CONFIG_PROC_CHILDREN: scan every process's parent id
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            fields = text.rsplit(")", 1)[-1].split()
            if len(fields) > 1 and int(fields[1]) == pid:
                found.add(int(stat.parent.name))
    return sorted(found)


def wait_for(predicate, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
