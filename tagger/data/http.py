"""Images on an HTTP(S) server the user allowed (a shop's CDN): ``https://`` location -> bytes + version.

The reader's third backend beside local files and ``s3://`` (:mod:`tagger.data.reader` dispatches to it).
A manifest is data, not configuration: without ``--allow-host`` no URL in it is ever requested, and with it
only the hosts named, so a catalog row cannot make the job reach an internal service (SSRF) or a metadata
endpoint. The defaults follow from that:

- **hosts**: exact names, or ``*.example.com`` for its subdomains (not ``example.com`` itself); every
  redirect target is checked again, so an allowed host cannot bounce the job elsewhere. A URL is parsed once
  (urllib3's parser) and the request is built from that parse, so the host checked is the host connected to;
  a URL that parsers could read differently (a backslash, ``%`` or ``@`` in the authority, control
  characters) is refused (:meth:`HttpPolicy.target`);
- **addresses**: the name is resolved once per connection and the job connects to the address it checked,
  never one resolved later (DNS rebinding: a name that answers a public address to the check and a private
  one to the connect). Private, loopback, link-local, shared and reserved addresses are refused unless
  ``allow_private`` (tests on 127.0.0.1, a CDN inside the VPC);
- **schemes**: ``https`` only, unless ``allow_plain_http`` (tests): plain HTTP lets anyone on the path
  change the photo;
- **bounds**: a per-host connection pool (``per_host`` connections per process: the workers together make at
  most ``workers x per_host``; every answer gives its slot back, also one whose connection is dropped),
  connect and read timeouts, and one deadline for an image, retries included, that holds within a read (a
  watchdog cuts the socket: a server dripping a byte a second cannot hold an image past it); the body is
  streamed and dropped past the byte cap (a ``Content-Length`` over it is refused unread).

Outcomes, as the errors table types them: 200 -> bytes; 404/410 ``missing``; 401/403 ``forbidden``; other
4xx and a refused host/address/scheme/redirect ``invalid_location``; 429 and 5xx are retried with back-off
(``Retry-After`` honoured within the deadline), then, like connection failures and timeouts,
:class:`HttpUnavailable`: the store is failing, the run stops with exit 4 as for S3.

The version ``--since`` compares is ``size-ETag`` (``size-Last-Modified`` without an ETag); a server that
sends neither gives no version, and such photos are always read again. ``--since`` learns the current
version with a HEAD (:func:`head_version`), so an unchanged photo is never downloaded twice.
"""

from __future__ import annotations

import email.utils
import heapq
import ipaddress
import os
import random
import re
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

from .decode import DEFAULT_MAX_IMAGE_BYTES, ImageError

SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
RETRY_STATUSES = (429, 500, 502, 503, 504)
MAX_REDIRECTS = 5
CHUNK = 256 * 1024
DISCARD_BYTES = 64 * 1024  # an error page read this far keeps its connection; a longer one is dropped
# Characters no image URL needs and that parsers treat differently (urlsplit drops tabs and newlines, urllib3
# percent-encodes them), and where a URL's authority ends.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_AUTHORITY_END = re.compile(r"[/?#]")
# A host name in its ASCII (IDNA) form as urllib3 gives it, or an IPv4 address: nothing else reaches the socket.
_HOST = re.compile(r"(?:[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?\.?")
USER_AGENT = "fashion-tagger (catalog photo tagging; +https://github.com/)"


class InvalidHttpLocation(ValueError):
    """A URL the policy refuses for good: host not allowed, private address, plain HTTP, bad redirect."""


class HttpUnavailable(ConnectionError):
    """The server failed (5xx, 429, timeouts, refused connections) after the retries of one image's deadline."""


@dataclass(frozen=True)
class HttpPolicy:
    """What ``http(s)://`` images may be read, and how patiently. Frozen and picklable: it travels to the
    DataLoader workers and Ray's decode tasks."""

    allow_hosts: tuple[str, ...] = ()
    allow_private: bool = False
    allow_plain_http: bool = False
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    deadline: float = 120.0  # one image, all attempts and back-off included
    attempts: int = 5
    per_host: int = 8
    # Sent with every request to the allowed hosts (a CDN's token header). Secret: kept out of repr and logs.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        problems = [f"--allow-host {h!r}: {p}" for h in self.allow_hosts for p in [host_pattern_problem(h)] if p]
        if self.deadline <= 0 or self.connect_timeout <= 0 or self.read_timeout <= 0:
            problems.append("HTTP timeouts and deadline must be > 0 seconds")
        if self.attempts < 1 or self.per_host < 1:
            problems.append("HTTP attempts and per-host connections must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "allow_hosts", tuple(_normal_pattern(h) for h in self.allow_hosts))

    def allows_host(self, host: str | None, port: int | None = None, scheme: str = "https") -> bool:
        """Whether an allow-list entry names ``host`` on ``port`` (None: the scheme's default). An entry without
        a port allows the default port only (443, 80 for plain http); ``host:8443`` that port; ``host:*`` any."""
        return self._refusal(host, port, scheme) is None

    def _refusal(self, host: str | None, port: int | None, scheme: str) -> str | None:
        host = (host or "").lower().rstrip(".")
        default = DEFAULT_PORTS.get(scheme, 443)
        port = port or default
        named = False
        for pattern in self.allow_hosts:
            name, allowed = _split_port(pattern)
            if name.startswith("*."):
                matches = host.endswith(name[1:]) and len(host) > len(name) - 1
            else:
                matches = host == name
            if not matches:
                continue
            named = True
            if allowed == "*" or port == (default if allowed is None else int(allowed)):
                return None
        suffix = "" if port == default else f":{port}"
        if named:
            return (f"port {port} of host {host!r} is not allowed (an --allow-host without a port allows the default port "
                    f"{default} only); add --allow-host {host}{suffix} if the job may read images from it")
        return (f"host {host!r} is not allowed; add --allow-host {host}{suffix} (or TAGGER_ALLOW_HOSTS) if the job may "
                "read images from it")

    def check(self, url: str, *, redirected_from: str | None = None) -> None:
        """Raise :class:`InvalidHttpLocation` unless ``url`` may be requested."""
        self.target(url, redirected_from=redirected_from)

    def target(self, url: str, *, redirected_from: str | None = None) -> Any:
        """``url`` parsed once, by urllib3's parser (a ``urllib3.util.Url``), if the policy allows it; else
        :class:`InvalidHttpLocation`. The request is made from this very object (its host, port and path), so
        the host checked is the host connected to. A URL that parsers read differently (a backslash, a
        percent-encoded or otherwise odd authority, credentials) is refused rather than guessed at."""
        from urllib3.exceptions import LocationParseError
        from urllib3.util import parse_url

        via = f" (redirected from {redirected_from})" if redirected_from else ""
        if not isinstance(url, str):
            raise InvalidHttpLocation(f"{url!r}{via}: not a URL")
        if _CONTROL.search(url) or "\\" in url:
            raise InvalidHttpLocation(f"{url!r}{via}: a backslash or a control character in a URL is refused (parsers "
                                      "disagree on where its host ends); percent-encode it in the path")
        scheme, sep, rest = url.partition("://")
        authority = _AUTHORITY_END.split(rest, 1)[0] if sep else ""
        if "@" in authority:
            shown = f"{scheme}://{authority.rpartition('@')[2]}"
            raise InvalidHttpLocation(f"{shown}/...{via}: credentials in an image URL are refused")
        if not sep or not authority:
            raise InvalidHttpLocation(f"{url}{via}: malformed URL (expected scheme://host/path)")
        if "%" in authority or any(c.isspace() for c in authority):
            raise InvalidHttpLocation(f"{url}{via}: a percent-encoded or blank character in the host is refused")
        try:
            parsed = parse_url(url)
            split = urlsplit(url)
            split.port  # noqa: B018 - raises for a port that is not a number
        except (LocationParseError, ValueError) as exc:
            raise InvalidHttpLocation(f"{url}{via}: malformed URL ({exc})") from None
        if parsed.scheme not in SCHEMES:
            raise InvalidHttpLocation(f"{url}{via}: scheme {parsed.scheme!r} is not http(s)")
        if parsed.scheme == "http" and not self.allow_plain_http:
            raise InvalidHttpLocation(f"{url}{via}: plain http:// is refused (anyone on the path could change the photo); "
                                      "use https://, or --allow-plain-http for a server you trust")
        host = parsed.host or ""
        if host.startswith("["):
            raise InvalidHttpLocation(f"{url}{via}: an IPv6 address literal cannot be allowed (--allow-host names hosts)")
        if not _HOST.fullmatch(host) or (authority.isascii() and (split.hostname or "") != host) \
                or split.port != parsed.port or parsed.auth is not None:
            raise InvalidHttpLocation(f"{url}{via}: the host is ambiguous or not a host name ({host!r}); refused")
        refusal = self._refusal(host, parsed.port, parsed.scheme)
        if refusal:
            raise InvalidHttpLocation(f"{url}{via}: {refusal}")
        return parsed


def host_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a usable ``--allow-host`` value, or None."""
    text, port = _split_port(pattern.strip().lower())
    text = text.rstrip(".")
    if port is not None and port != "*" and not (port.isdigit() and 0 < int(port) < 65536):
        return "a port is a number from 1 to 65535, or * for any (cdn.example.com:8443)"
    body = text[2:] if text.startswith("*.") else text
    if not body or "*" in body or "/" in body or ":" in body or "@" in body or "\\" in body or "%" in body:
        return ("expected a host name such as cdn.example.com, or *.example.com for its subdomains, optionally with a "
                "port (cdn.example.com:8443; no scheme, path or IPv6 address)")
    if not body.isascii():
        try:
            _ascii_host(body)
        except ValueError as exc:
            return f"not a valid international host name ({exc})"
    if "." not in body and not text.startswith("*."):
        return None  # e.g. localhost: allowed by name, its address is still checked
    if text.startswith("*.") and "." not in body:
        return "a wildcard must keep at least two labels (*.example.com), not a whole top-level domain"
    return None


def _split_port(pattern: str) -> tuple[str, str | None]:
    """``host[:port]`` -> (host, port text or None)."""
    host, sep, port = pattern.rpartition(":")
    return (host, port) if sep else (pattern, None)


def _normal_pattern(pattern: str) -> str:
    host, port = _split_port(pattern.strip().lower())
    host = _ascii_host(host.rstrip("."))
    return host if port is None else f"{host}:{int(port) if port != '*' else '*'}"


def _ascii_host(pattern: str) -> str:
    """A host (or ``*.`` pattern) in the ASCII form urllib3 gives a URL's host: bücher.example -> xn--bcher-kva.example."""
    from urllib3.util import parse_url

    wildcard, body = ("*.", pattern[2:]) if pattern.startswith("*.") else ("", pattern)
    return wildcard + (parse_url(f"http://{body}").host or body) if not body.isascii() else pattern


def http_policy(allow_hosts: Sequence[str], *, allow_private_addresses: bool = False, allow_plain_http: bool = False,
                deadline: float = 120.0) -> HttpPolicy | None:
    """The options --allow-host, --allow-private-addresses, --allow-plain-http and --http-deadline (tag and
    evaluate alike) -> the policy (None: no host named, every http(s):// image an invalid_location error).
    ValueError for options that contradict each other or a host that is not a host."""
    headers = env_http_headers()
    if not allow_hosts:
        if allow_private_addresses or allow_plain_http:
            raise ValueError("allow_private_addresses / allow_plain_http widen --allow-host, which names no host")
        if headers:
            raise ValueError(f"{HEADERS_ENV} is set but no --allow-host names a host to send its headers to")
        return None
    return HttpPolicy(tuple(allow_hosts), allow_private=allow_private_addresses, allow_plain_http=allow_plain_http,
                      deadline=deadline, connect_timeout=min(10.0, deadline), read_timeout=min(30.0, deadline),
                      headers=headers)


HEADERS_ENV = "TAGGER_HTTP_HEADERS"
# An HTTP field name (RFC 9110 token); a value may hold neither a line break nor a NUL (header injection).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE_BAD = re.compile(r"[\r\n\x00]")


def env_http_headers() -> tuple[tuple[str, str], ...]:
    """TAGGER_HTTP_HEADERS, a JSON object of header names and values (``{"Authorization": "Bearer ..."}``), for
    a CDN that wants a token. An environment variable only, never an option: a command line is visible to every
    user of the machine (``ps``) and lands in logs. A value is never repeated in an error."""
    raw = os.environ.get(HEADERS_ENV, "").strip()
    if not raw:
        return ()
    import json

    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{HEADERS_ENV}: not JSON (line {exc.lineno}, column {exc.colno}); expected an object such "
                         'as {"Authorization": "Bearer ..."}') from None
    if not isinstance(parsed, dict):
        raise ValueError(f'{HEADERS_ENV}: expected a JSON object of header names and values, got {type(parsed).__name__}')
    headers = []
    for name, value in parsed.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"{HEADERS_ENV}: {name!r} is not an HTTP header name")
        if not isinstance(value, str) or _HEADER_VALUE_BAD.search(value):
            raise ValueError(f"{HEADERS_ENV}: the value of {name} must be a string without line breaks")
        if name.lower() in ("host", "content-length", "transfer-encoding", "connection"):
            raise ValueError(f"{HEADERS_ENV}: {name} is set by the job itself")
        headers.append((name, value))
    return tuple(headers)


def split_hosts(values: Sequence[str]) -> tuple[str, ...]:
    """Hosts from repeated options or a comma/space separated environment value."""
    hosts: list[str] = []
    for value in values:
        hosts.extend(h for h in value.replace(",", " ").split() if h)
    return tuple(hosts)


# -- connections that check the address they connect to, and a deadline that holds within a read -----------
class BlockedAddress(ValueError):
    """A host that resolves to an address the policy refuses (not an OSError: urllib3 must not retry it)."""


# IPv6 forms that carry an IPv4 address a gateway or the kernel may deliver to: NAT64 (64:ff9b::/96, its local-use
# 64:ff9b:1::/48), IPv4-compatible (::a.b.c.d) and IPv4-translated (::ffff:0:a.b.c.d). ipaddress calls most of
# them global whatever they carry, so the address inside is checked (6to4 and the IPv4-mapped form: below).
_EMBEDDING_V4 = [ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96", "::ffff:0:0:0/96")]


def address_refused(address: str) -> str | None:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6:
        inner = ip.ipv4_mapped or ip.sixtofour or next(
            (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) for net in _EMBEDDING_V4 if ip in net and int(ip) > 1), None)
        if inner is not None:
            problem = address_refused(str(inner))
            return f"{ip} (carrying {problem})" if problem and ip.ipv4_mapped is None else problem
    if ip.is_global and not ip.is_multicast:
        return None
    kind = ("loopback" if ip.is_loopback else "link-local" if ip.is_link_local else "private" if ip.is_private
            else "multicast" if ip.is_multicast else "reserved or shared")
    return f"{ip} is a {kind} address"


class _Flight:
    """One image's requests under its deadline. The socket in use is noted as it changes (a new connection, a
    pooled one, a redirect's) so that the watchdog can cut it when the deadline passes: a socket timeout alone
    restarts with every byte, and a server that drips one byte a second would hold the image for ever."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.expired = False
        self.done = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def use(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            if self.expired:
                _cut(sock)

    def expire(self) -> None:
        with self._lock:
            if not self.done:
                self.expired = True
                _cut(self._sock)

    def __enter__(self) -> _Flight:
        _WATCHDOG.watch(self)
        _local.flight = self
        return self

    def __exit__(self, *exc: Any) -> None:
        _local.flight = None
        with self._lock:
            self.done = True
            self._sock = None  # never cut a socket after its image is done with it


class _Watchdog:
    """One thread per process that expires flights at their deadlines (a timer thread per image cost ~0.3 ms
    of thread start-up each). Rebuilt in a forked child, where the parent's thread does not exist."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Flight]] = []
        self._count = 0
        self._thread: threading.Thread | None = None

    def watch(self, flight: _Flight) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tagger-http-deadline", daemon=True)
                self._thread.start()
            self._count += 1
            heapq.heappush(self._heap, (flight.deadline, self._count, flight))
            if self._heap[0][2] is flight:
                self._cond.notify()

    def _run(self) -> None:
        cond = self._cond
        with cond:
            while True:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].done or self._heap[0][0] <= now):
                    flight = heapq.heappop(self._heap)[2]
                    flight.expire()  # a no-op for one already done
                cond.wait(self._heap[0][0] - now if self._heap else None)


_WATCHDOG = _Watchdog()


_local = threading.local()


def _cut(sock: socket.socket | None) -> None:
    # The plain socket's shutdown, also for a TLS socket: it wakes the reader blocked in recv() at once (EOF),
    # and leaves the TLS object to the thread that owns it.
    if sock is None:
        return
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass


def fetching() -> bool:
    """Whether this thread is waiting on an http(s) image now (a stop request may then interrupt it at once)."""
    return getattr(_local, "flight", None) is not None


def _connection_classes(guarded: bool) -> tuple[type, type]:
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
    from urllib3.util import connection

    def guarded_new_conn(self: Any) -> socket.socket:
        try:
            infos = socket.getaddrinfo(self._dns_host, self.port, 0, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        for *_, sockaddr in infos:
            problem = address_refused(sockaddr[0])
            if problem:
                # Every address checked, not only the first: a round-robin answer must not smuggle one in.
                raise BlockedAddress(f"host {self.host!r} resolves to an address it may not reach: {problem}; refused "
                                     "(--allow-private-addresses allows it for a server inside your network)")
        last: Exception | None = None
        for *_, sockaddr in infos:
            try:
                # The checked address itself, never the name again: no second resolution to rebind.
                return connection.create_connection((sockaddr[0], self.port), self.timeout,
                                                    source_address=self.source_address, socket_options=self.socket_options)
            except socket.timeout as exc:
                raise ConnectTimeoutError(self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})") from exc
            except OSError as exc:
                last = exc
        raise NewConnectionError(self, f"Failed to establish a new connection: {last}")

    classes = []
    for base in (HTTPConnection, HTTPSConnection):
        def new_conn(self: Any, base: type = base) -> socket.socket:
            sock = guarded_new_conn(self) if guarded else base._new_conn(self)
            flight = getattr(_local, "flight", None)
            if flight is not None:
                flight.use(sock)
            return sock

        def request(self: Any, *args: Any, base: type = base, **kwargs: Any) -> Any:
            flight = getattr(_local, "flight", None)
            if flight is not None and self.sock is not None:
                flight.use(self.sock)  # a pooled connection, or TLS wrapped around the socket noted at connect
            return base.request(self, *args, **kwargs)

        classes.append(type(f"Guarded{base.__name__}", (base,), {"_new_conn": new_conn, "request": request}))
    return classes[0], classes[1]


_MANAGERS: dict[tuple[int, HttpPolicy], Any] = {}


def _manager(policy: HttpPolicy) -> Any:
    """One pool manager per process and policy (a forked child builds its own: sockets are not shared)."""
    key = (os.getpid(), policy)
    manager = _MANAGERS.get(key)
    if manager is None:
        import urllib3
        from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

        # block=True: a host gets at most per_host connections from this process; more callers wait for one.
        # Every response is therefore handed back (release_conn, _drop, _discard): a connection never returned is a
        # slot lost.
        manager = urllib3.PoolManager(num_pools=64, maxsize=policy.per_host, block=True,
                                      headers={"User-Agent": USER_AGENT, "Accept": "image/*", **dict(policy.headers)})
        http_conn, https_conn = _connection_classes(guarded=not policy.allow_private)
        manager.pool_classes_by_scheme = {
            "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
            "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
        }
        _MANAGERS.clear()  # a parent's managers are of no use in this process
        _MANAGERS[key] = manager
    return manager


def _refuse_for_good(exc: BaseException, url: str, host: str) -> None:
    """Raise :class:`InvalidHttpLocation` for a failure that is the URL's, not the server's for now: a host name
    that does not exist (a mistyped supplier host) and a TLS certificate that is not trusted. Each is the row's
    error; a night of them trips --max-error-rate, where exit 4 would stop every night for one bad row.
    A DNS server that fails (EAI_AGAIN) stays a storage outage (exit 4)."""
    lookup = _caused_by(exc, "gaierror")
    if lookup is not None and lookup.errno in _NO_SUCH_HOST:
        raise InvalidHttpLocation(f"{url}: host {host!r} does not exist (DNS: {lookup.strerror}); check the URL") from None
    certificate = _caused_by(exc, "SSLCertVerificationError", "CertificateError")
    if certificate is not None:
        reason = getattr(certificate, "verify_message", None) or str(certificate)
        raise InvalidHttpLocation(
            f"{url}: the TLS certificate of {host!r} is not trusted ({reason}); if the server uses a private CA, point "
            "SSL_CERT_FILE at a PEM bundle that holds it (see docs/failure-modes.md)") from None


# getaddrinfo's "no such name" and "no address for it" (EAI_NODATA where the C library has it).
_NO_SUCH_HOST = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


def _drop(response: Any) -> None:
    """Close the response's connection (the rest of its body is still on the wire) and give its pool slot back:
    ``close()`` alone keeps the slot, and with ``block=True`` eight of those stop every later request to the host."""
    try:
        response.close()
    finally:
        response.release_conn()  # the closed connection goes back; the pool reconnects it when it is next taken


def _discard(response: Any, flight: _Flight) -> None:
    """An answer not used (an error page, a redirect): up to 64 KiB of its body read, so that the connection can
    serve the next request; a longer (or endless, chunked, dripping) one costs that connection, never the slot."""
    try:
        left = DISCARD_BYTES
        while left > 0 and not response.closed:
            data = response.read(min(left, 16_384), decode_content=False)
            if not data:
                break
            left -= len(data)
        if not response.closed and left <= 0:
            response.read(1, decode_content=False)  # exactly 64 KiB, then the end: the connection is clean
        if response.closed and not flight.expired:
            response.release_conn()
            return
    except Exception:  # noqa: BLE001 - whatever the error page did, the connection goes and the slot stays
        pass
    _drop(response)


# -- requests ---------------------------------------------------------------------------------------------
def fetch(url: str, policy: HttpPolicy, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> tuple[bytes, str]:
    """The image's bytes and version (``size-ETag`` or ``size-Last-Modified``; "" when the server gives neither).

    Raises :class:`ImageError` (``missing``, ``forbidden``, ``too_large``), :class:`InvalidHttpLocation`, or
    :class:`HttpUnavailable` once the deadline's retries are spent. The deadline holds within a read: a server
    that drips the body (or its headers) is cut when it passes.
    """
    with _Flight(time.monotonic() + policy.deadline) as flight:
        attempt, always_short = 0, True
        while True:
            attempt += 1
            response = _request("GET", url, policy, flight, max_bytes=max_bytes)
            try:
                chunks, total = [], 0
                for chunk in response.stream(CHUNK):
                    total += len(chunk)
                    if total > max_bytes:
                        raise ImageError("too_large", f"{url}: the body passed the limit of {max_bytes:,} bytes; dropped "
                                                      "unread (raise --max-image-bytes if such files are expected)")
                    chunks.append(chunk)
                if flight.expired:
                    raise HttpUnavailable(_late(url, policy, total))
            except (ImageError, HttpUnavailable):
                _drop(response)
                raise
            except Exception as exc:  # a read timeout, a connection cut mid-body, or the deadline's cut
                _drop(response)
                if flight.expired:
                    raise HttpUnavailable(_late(url, policy, total)) from exc
                problem = f"the body was cut short after {total:,} bytes: {type(exc).__name__}: {exc}"
                always_short = always_short and _caused_by(exc, "IncompleteRead") is not None
                if attempt < policy.attempts:
                    _sleep(_backoff(attempt), flight.deadline, url, problem)  # a glitch of the network: once more
                    continue
                if always_short:
                    # The server closed the body early on every attempt: its copy is short (a truncated upload), not
                    # the network. The row's error; a night of them trips --max-error-rate.
                    raise ImageError("decode", f"{url}: the server ended the body before the bytes it announced "
                                               f"(Content-Length, or a chunk's size) on each of {attempt} attempts ({total:,} "
                                               "bytes the last time); its copy looks truncated") from None
                raise HttpUnavailable(f"{url}: {problem} ({attempt} attempts)") from exc
            except BaseException:  # a stop request: the run ends, but the pool stays whole for whoever shares it
                _drop(response)
                raise
            response.release_conn()
            break
    data = b"".join(chunks)
    return data, version(len(data), response.headers)


def _caused_by(exc: BaseException, *names: str) -> BaseException | None:
    """The first exception named ``names`` in ``exc``'s causes, contexts and (urllib3 wraps them so) arguments."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if type(current).__name__ in names:
            return current
        todo += [current.__cause__, current.__context__, *(a for a in current.args if isinstance(a, BaseException))]
        todo += [getattr(current, "reason", None)] if isinstance(getattr(current, "reason", None), BaseException) else []
    return None


def _late(url: str, policy: HttpPolicy, total: int) -> str:
    return (f"{url}: the body did not arrive within --http-deadline {policy.deadline:g}s ({total:,} bytes so far); "
            "the server is too slow")


def head_version(url: str, policy: HttpPolicy) -> str | None:
    """The version a GET would report, from a HEAD; None when the server does not say (then the photo is read)."""
    with _Flight(time.monotonic() + policy.deadline) as flight:
        try:
            response = _request("HEAD", url, policy, flight)
        except (ImageError, InvalidHttpLocation):
            return None  # the reader reads it and says why in the errors table
        _discard(response, flight)  # a HEAD has no body; a server that sends one anyway costs the connection
    length = response.headers.get("Content-Length")
    if length is None or not length.isdigit():
        return None
    return version(int(length), response.headers) or None


def version(size: int, headers: Any) -> str:
    etag = (headers.get("ETag") or "").strip()
    if etag.startswith("W/"):
        etag = ""  # a weak ETag promises equivalence, not the same bytes
    tag = etag.strip('"') or (headers.get("Last-Modified") or "").strip()
    return f"{size}-{tag}" if tag else ""


def _request(method: str, url: str, policy: HttpPolicy, flight: _Flight, *, max_bytes: int | None = None) -> Any:
    """A response with status 200 (body not yet read), redirects followed through the policy, 429/5xx retried.

    The URL is parsed once (:meth:`HttpPolicy.target`) and the request goes to that parse's host and port:
    the host checked is the host connected to."""
    import urllib3
    from urllib3.exceptions import HTTPError

    manager = _manager(policy)
    current, origin, redirects, attempt = url, None, 0, 0
    while True:
        target = policy.target(current, redirected_from=origin)
        left = flight.deadline - time.monotonic()
        if left <= 0 or flight.expired:
            raise HttpUnavailable(f"{url}: no answer within --http-deadline {policy.deadline:g}s ({attempt} attempt(s))")
        timeout = urllib3.Timeout(connect=min(policy.connect_timeout, left), read=min(policy.read_timeout, left))
        try:
            pool = manager.connection_from_host(target.host, target.port, target.scheme)
            response = pool.urlopen(method, target.request_uri, headers=manager.headers, preload_content=False,
                                    redirect=False, retries=False, assert_same_host=False, timeout=timeout,
                                    pool_timeout=left)
        except BlockedAddress as exc:
            raise InvalidHttpLocation(f"{current}: {exc}") from None
        except HTTPError as exc:
            _refuse_for_good(exc, current, target.host)
            attempt += 1
            problem = f"{type(exc).__name__}: {exc}"
            if flight.expired:
                raise HttpUnavailable(f"{url}: no answer within --http-deadline {policy.deadline:g}s ({problem})") from exc
            if attempt >= policy.attempts:
                raise HttpUnavailable(f"{url}: request failed after {attempt} attempt(s): {problem}") from exc
            _sleep(_backoff(attempt), flight.deadline, url, problem)
            continue
        status = response.status
        if status == 200:
            length = response.headers.get("Content-Length")
            if max_bytes is not None and length and length.isdigit() and int(length) > max_bytes:
                _drop(response)
                raise ImageError("too_large", f"{url}: {int(length):,} bytes (Content-Length) exceeds the limit of "
                                              f"{max_bytes:,}; not downloaded (raise --max-image-bytes if such files are expected)")
            return response
        location = response.headers.get("Location")
        _discard(response, flight)
        if status in REDIRECT_STATUSES and location:
            redirects += 1
            if redirects > MAX_REDIRECTS:
                raise InvalidHttpLocation(f"{url}: more than {MAX_REDIRECTS} redirects")
            origin, current = current, urljoin(current, location)
            continue
        if status in (404, 410):
            raise ImageError("missing", f"{url}: HTTP {status}, no such image on the server")
        if status in (401, 403):
            raise ImageError("forbidden", f"{url}: HTTP {status}, the server refuses to serve it (signed URL expired? "
                                          "hotlink protection?)")
        if status in RETRY_STATUSES:
            attempt += 1
            problem = f"HTTP {status}"
            if attempt >= policy.attempts:
                raise HttpUnavailable(f"{url}: {problem} after {attempt} attempt(s)")
            _sleep(max(_retry_after(response.headers.get("Retry-After")), _backoff(attempt)), flight.deadline, url, problem)
            continue
        raise InvalidHttpLocation(f"{current}: HTTP {status}; the server will not serve this URL")


def _backoff(attempt: int) -> float:
    # Exponential with full jitter (as botocore's): many workers throttled together do not retry in step.
    return random.uniform(0, min(20.0, 0.5 * 2 ** (attempt - 1)))


def _retry_after(value: str | None) -> float:
    if not value:
        return 0.0
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, when.timestamp() - time.time())


def _sleep(seconds: float, deadline: float, url: str, problem: str) -> None:
    if time.monotonic() + seconds >= deadline:
        raise HttpUnavailable(f"{url}: {problem}; waiting {seconds:.0f}s more would pass the image's deadline")
    time.sleep(seconds)


def is_http(location: str) -> bool:
    return location[:8].lower().startswith(("http://", "https://"))


def host_of(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()
