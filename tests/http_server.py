"""A photo server on 127.0.0.1 for the https:// image tests: photos with ETags, and every way a CDN fails.

Routes (``NAME`` is a photo's file name in the served folder):

- ``/img/NAME``: the photo (ETag from its bytes, Last-Modified, Content-Length); HEAD too;
- ``/status/CODE``: that status with a small body (404, 410, 403, 401, 503...);
- ``/slow/NAME``: the photo in 4 pieces, ``slow_pause`` s apart (slow, but inside the deadline);
- ``/stall/NAME``: headers and half the body, then nothing (until the server stops);
- ``/flaky/NAME``: 429 with ``Retry-After: 1`` on the first request of each path, then the photo;
- ``/redirect?to=URL``: 302 to URL;
- ``/huge``: 60 MB, streamed with no Content-Length (only the byte cap while reading can stop it);
- ``/huge-declared``: a Content-Length of 60 MB (refused unread), then bytes.

Hostile ones (tests/test_http_hostile.py):

- ``/big404/X``: 404 with a 100 KiB HTML page (nginx, CloudFront and S3 websites send such pages);
- ``/chunked404/X``: 404 with a 200 KiB page sent chunked (no Content-Length);
- ``/nolength/NAME``: the photo without a Content-Length (only the byte cap while reading can refuse it);
- ``/drip/NAME``: the photo one byte every ``drip_pause`` s (each byte would restart a socket timeout);
- ``/drip-headers``: a 200 whose headers come one byte every ``drip_pause`` s, without end;
- ``/many-headers``: a 200 with 10,000 headers;
- ``/loop``: a redirect to itself;
- ``/short/NAME``: the photo's Content-Length, then half of it, then the connection closes.

``tls(certfile, keyfile)`` before ``start()`` serves HTTPS instead (``url`` then names ``https://localhost``).

``requests`` records (method, path) of every request. A second listener (``silent_url``) accepts
connections and never answers. Both are daemon threads: they stop with the test process, or when stopped.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit


class PhotoServer:
    def __init__(self, folder: Path, slow_pause: float = 0.2, drip_pause: float = 0.5):
        self.folder = Path(folder)
        self.slow_pause = slow_pause
        self.drip_pause = drip_pause
        self.requests: list[tuple[str, str]] = []
        self.stopping = threading.Event()
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self.handle_request(head=True)

            def do_GET(self):
                self.handle_request(head=False)

            def send_body(self, code, body, headers=(), head=False):
                self.send_response(code)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def chunked(self, code, size):
                self.send_response(code)
                self.send_header("Content-Type", "text/html")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                piece = b"<p>not here</p>" * 1000
                sent = 0
                while sent < size:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    sent += len(piece)
                self.wfile.write(b"0\r\n\r\n")

            def drip(self, data):
                for index in range(len(data)):
                    if server.stopping.wait(server.drip_pause):
                        return
                    self.wfile.write(data[index:index + 1])
                    self.wfile.flush()

            def photo(self, name):
                path = server.folder / name
                if not path.is_file():
                    return None, ()
                data = path.read_bytes()
                stamp = formatdate(path.stat().st_mtime, usegmt=True)
                return data, (("ETag", f'"{hashlib.md5(data).hexdigest()}"'), ("Last-Modified", stamp),
                              ("Content-Type", "image/jpeg"))

            def handle_request(self, head):
                parts = urlsplit(self.path)
                with server._lock:
                    server.requests.append((self.command, parts.path))
                    first = parts.path not in server._seen
                    server._seen.add(parts.path)
                route, _, rest = parts.path.lstrip("/").partition("/")
                try:
                    return self.route(route, rest, parts, first, head)
                except OSError:
                    self.close_connection = True  # the client hung up (its byte cap, its deadline)
                    return None

            def route(self, route, rest, parts, first, head):
                if route == "big404":
                    return self.send_body(404, b"<html>" + b"not found " * 10_000 + b"</html>", head=head)
                if route == "chunked404":
                    return self.chunked(404, 200_000) if not head else self.send_body(404, b"", head=True)
                if route == "loop":
                    return self.send_body(302, b"", (("Location", "/loop"),), head=head)
                if route == "many-headers":
                    self.send_response(200)
                    for index in range(10_000):
                        self.send_header(f"X-{index}", "x")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                if route == "drip-headers":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    self.drip(b"X-Slow: " + b"y" * 1_000_000)
                    self.close_connection = True
                    return None
                if route == "status":
                    return self.send_body(int(rest), b"no", head=head)
                if route == "redirect":
                    target = parse_qs(parts.query)["to"][0]
                    return self.send_body(302, b"", (("Location", target),), head=head)
                if route == "huge":
                    self.send_response(200)
                    self.send_header("Connection", "close")  # body ends when the connection does
                    self.end_headers()
                    if not head:
                        chunk = b"\0" * (1 << 20)
                        try:
                            for _ in range(60):
                                self.wfile.write(chunk)
                        except OSError:
                            pass  # the client gave up at its cap
                    self.close_connection = True
                    return None
                if route == "huge-declared":
                    self.send_response(200)
                    self.send_header("Content-Length", str(60 << 20))
                    self.end_headers()
                    self.close_connection = True
                    return None
                data, headers = self.photo(rest)
                if data is None:
                    return self.send_body(404, b"not found", head=head)
                if route == "img":
                    return self.send_body(200, data, headers, head=head)
                if route == "flaky" and first:
                    return self.send_body(429, b"slow down", (("Retry-After", "1"),), head=head)
                if route == "flaky":
                    return self.send_body(200, data, headers, head=head)
                if route == "nolength":
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    if not head:
                        self.wfile.write(data)
                    self.close_connection = True
                    return None
                if route == "short":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if not head:
                        self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    return None
                if route == "drip":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if not head:
                        self.drip(data)
                    return None
                if route in ("slow", "stall"):
                    self.send_response(200)
                    for key, value in headers:
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if head:
                        return None
                    pieces = [data[k * len(data) // 4:(k + 1) * len(data) // 4] for k in range(4)]
                    for index, piece in enumerate(pieces):
                        if route == "stall" and index == 2:
                            server.stopping.wait()  # half a photo, then silence
                            return None
                        self.wfile.write(piece)
                        self.wfile.flush()
                        time.sleep(server.slow_pause)
                    return None
                return self.send_body(404, b"no route", head=head)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        # A listener that accepts connections (the kernel's backlog does) and never answers a byte.
        self.silent = socket.socket()
        self.silent.bind(("127.0.0.1", 0))
        self.silent.listen(64)
        self.silent_url = f"http://127.0.0.1:{self.silent.getsockname()[1]}"

    def tls(self, certfile: str, keyfile: str) -> PhotoServer:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile, keyfile)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://localhost:{self.httpd.server_address[1]}"
        return self

    def start(self) -> PhotoServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.silent.close()

    def count(self, method: str, prefix: str = "/") -> int:
        with self._lock:
            return sum(1 for m, p in self.requests if m == method and p.startswith(prefix))
