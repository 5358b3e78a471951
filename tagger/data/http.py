"""Images on an HTTP(S) server the user allowed (a shop's CDN): ``https://`` location -> bytes + version.

The reader's third backend beside local files and ``s3://`` (:mod:`tagger.data.reader` dispatches to it).
A manifest is data, not configuration: without ``--allow-host`` no URL in it is ever requested, and with it
only the hosts named, so a catalog row cannot make the job reach an internal service (SSRF) or a metadata
endpoint. The defaults follow from that:

- **hosts**: exact names, or ``*.example.com`` for its subdomains (not ``example.com`` itself); every
  redirect target is checked again, so an allowed host cannot bounce the job elsewhere;
- **addresses**: the name is resolved once per connection and the job connects to the address it checked,
  never one resolved later (DNS rebinding: a name that answers a public address to the check and a private
  one to the connect). Private, loopback, link-local, shared and reserved addresses are refused unless
  ``allow_private`` (tests on 127.0.0.1, a CDN inside the VPC);
- **schemes**: ``https`` only, unless ``allow_plain_http`` (tests): plain HTTP lets anyone on the path
  change the photo;
- **bounds**: a per-host connection pool (``per_host`` connections per process: the workers together make at
  most ``workers x per_host``), connect and read timeouts, and one deadline for an image, retries included;
  the body is streamed and dropped past the byte cap (a ``Content-Length`` over it is refused unread).

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
import ipaddress
import os
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from .decode import DEFAULT_MAX_IMAGE_BYTES, ImageError

SCHEMES = ("http", "https")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
RETRY_STATUSES = (429, 500, 502, 503, 504)
MAX_REDIRECTS = 5
CHUNK = 256 * 1024
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

    def __post_init__(self) -> None:
        problems = [f"--allow-host {h!r}: {p}" for h in self.allow_hosts for p in [host_pattern_problem(h)] if p]
        if self.deadline <= 0 or self.connect_timeout <= 0 or self.read_timeout <= 0:
            problems.append("HTTP timeouts and deadline must be > 0 seconds")
        if self.attempts < 1 or self.per_host < 1:
            problems.append("HTTP attempts and per-host connections must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "allow_hosts", tuple(h.strip().lower().rstrip(".") for h in self.allow_hosts))

    def allows_host(self, host: str | None) -> bool:
        host = (host or "").lower().rstrip(".")
        for pattern in self.allow_hosts:
            if pattern.startswith("*."):
                if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                    return True
            elif host == pattern:
                return True
        return False

    def check(self, url: str, *, redirected_from: str | None = None) -> None:
        """Raise :class:`InvalidHttpLocation` unless ``url`` may be requested."""
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises for a port that is not a number
        except ValueError as exc:
            raise InvalidHttpLocation(f"{url}: malformed URL ({exc})") from None
        via = f" (redirected from {redirected_from})" if redirected_from else ""
        if parts.scheme not in SCHEMES:
            raise InvalidHttpLocation(f"{url}{via}: scheme {parts.scheme!r} is not http(s)")
        if parts.scheme == "http" and not self.allow_plain_http:
            raise InvalidHttpLocation(f"{url}{via}: plain http:// is refused (anyone on the path could change the photo); "
                                      "use https://, or --allow-plain-http for a server you trust")
        if parts.username is not None or parts.password is not None:
            raise InvalidHttpLocation(f"{urlsplit(url)._replace(netloc=parts.hostname or '').geturl()}{via}: credentials in an image URL are refused")
        if not self.allows_host(parts.hostname):
            raise InvalidHttpLocation(f"{url}{via}: host {parts.hostname!r} is not allowed; add --allow-host {parts.hostname} "
                                      "(or TAGGER_ALLOW_HOSTS) if the job may read images from it")


def host_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a usable ``--allow-host`` value, or None."""
    text = pattern.strip().lower().rstrip(".")
    body = text[2:] if text.startswith("*.") else text
    if not body or "*" in body or "/" in body or ":" in body or "@" in body:
        return "expected a host name such as cdn.example.com, or *.example.com for its subdomains (no scheme, port, path)"
    if "." not in body and not text.startswith("*."):
        return None  # e.g. localhost: allowed by name, its address is still checked
    if text.startswith("*.") and "." not in body:
        return "a wildcard must keep at least two labels (*.example.com), not a whole top-level domain"
    return None


def http_policy(allow_hosts: Sequence[str], *, allow_private_addresses: bool = False, allow_plain_http: bool = False,
                deadline: float = 120.0) -> HttpPolicy | None:
    """The options --allow-host, --allow-private-addresses, --allow-plain-http and --http-deadline (tag and
    evaluate alike) -> the policy (None: no host named, every http(s):// image an invalid_location error).
    ValueError for options that contradict each other or a host that is not a host."""
    if not allow_hosts:
        if allow_private_addresses or allow_plain_http:
            raise ValueError("allow_private_addresses / allow_plain_http widen --allow-host, which names no host")
        return None
    return HttpPolicy(tuple(allow_hosts), allow_private=allow_private_addresses, allow_plain_http=allow_plain_http,
                      deadline=deadline, connect_timeout=min(10.0, deadline), read_timeout=min(30.0, deadline))


def split_hosts(values: Sequence[str]) -> tuple[str, ...]:
    """Hosts from repeated options or a comma/space separated environment value."""
    hosts: list[str] = []
    for value in values:
        hosts.extend(h for h in value.replace(",", " ").split() if h)
    return tuple(hosts)


# -- connections that check the address they connect to --------------------------------------------------
class BlockedAddress(ValueError):
    """A host that resolves to an address the policy refuses (not an OSError: urllib3 must not retry it)."""


def address_refused(address: str) -> str | None:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_global and not ip.is_multicast:
        return None
    kind = ("loopback" if ip.is_loopback else "link-local" if ip.is_link_local else "private" if ip.is_private
            else "multicast" if ip.is_multicast else "reserved or shared")
    return f"{ip} is a {kind} address"


def _guarded_classes() -> tuple[type, type]:
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
    from urllib3.util import connection

    def new_conn(self: Any) -> socket.socket:
        try:
            infos = socket.getaddrinfo(self._dns_host, self.port, 0, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        for *_, sockaddr in infos:
            problem = address_refused(sockaddr[0])
            if problem:
                # Every address checked, not only the first: a round-robin answer must not smuggle one in.
                raise BlockedAddress(f"host {self.host!r} resolves to {problem}; refused (--allow-private-addresses "
                                     "allows it for a server inside your network)")
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

    guarded_http = type("GuardedHTTPConnection", (HTTPConnection,), {"_new_conn": new_conn})
    guarded_https = type("GuardedHTTPSConnection", (HTTPSConnection,), {"_new_conn": new_conn})
    return guarded_http, guarded_https


_MANAGERS: dict[tuple[int, HttpPolicy], Any] = {}


def _manager(policy: HttpPolicy) -> Any:
    """One pool manager per process and policy (a forked child builds its own: sockets are not shared)."""
    key = (os.getpid(), policy)
    manager = _MANAGERS.get(key)
    if manager is None:
        import urllib3
        from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

        # block=True: a host gets at most per_host connections from this process; more callers wait for one.
        manager = urllib3.PoolManager(num_pools=64, maxsize=policy.per_host, block=True,
                                      headers={"User-Agent": USER_AGENT, "Accept": "image/*"})
        if not policy.allow_private:
            http_conn, https_conn = _guarded_classes()
            manager.pool_classes_by_scheme = {
                "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
                "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
            }
        _MANAGERS.clear()  # a parent's managers are of no use in this process
        _MANAGERS[key] = manager
    return manager


# -- requests ---------------------------------------------------------------------------------------------
def fetch(url: str, policy: HttpPolicy, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> tuple[bytes, str]:
    """The image's bytes and version (``size-ETag`` or ``size-Last-Modified``; "" when the server gives neither).

    Raises :class:`ImageError` (``missing``, ``forbidden``, ``too_large``), :class:`InvalidHttpLocation`, or
    :class:`HttpUnavailable` once the deadline's retries are spent.
    """
    deadline = time.monotonic() + policy.deadline
    response = _request("GET", url, policy, deadline, max_bytes=max_bytes)
    try:
        chunks, total = [], 0
        for chunk in response.stream(CHUNK):
            total += len(chunk)
            if total > max_bytes:
                raise ImageError("too_large", f"{url}: the body passed the limit of {max_bytes:,} bytes; dropped unread "
                                              "(raise --max-image-bytes if such files are expected)")
            if time.monotonic() > deadline:
                raise HttpUnavailable(f"{url}: the body did not arrive within {policy.deadline:.0f}s "
                                      f"({total:,} bytes so far); the server is too slow")
            chunks.append(chunk)
    except (ImageError, HttpUnavailable):
        response.close()  # never back to the pool: the rest of that body is still on the wire
        raise
    except Exception as exc:  # a read timeout or a connection cut mid-body
        response.close()
        raise HttpUnavailable(f"{url}: the body was cut short: {type(exc).__name__}: {exc}") from exc
    response.release_conn()
    data = b"".join(chunks)
    return data, version(len(data), response.headers)


def head_version(url: str, policy: HttpPolicy) -> str | None:
    """The version a GET would report, from a HEAD; None when the server does not say (then the photo is read)."""
    try:
        response = _request("HEAD", url, policy, time.monotonic() + policy.deadline)
    except (ImageError, InvalidHttpLocation):
        return None  # the reader reads it and says why in the errors table
    response.release_conn()
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


def _request(method: str, url: str, policy: HttpPolicy, deadline: float, *, max_bytes: int | None = None) -> Any:
    """A response with status 200 (body not yet read), redirects followed through the policy, 429/5xx retried."""
    import urllib3
    from urllib3.exceptions import HTTPError

    manager = _manager(policy)
    current, origin, redirects, attempt = url, None, 0, 0
    while True:
        policy.check(current, redirected_from=origin)
        left = deadline - time.monotonic()
        if left <= 0:
            raise HttpUnavailable(f"{url}: no answer within {policy.deadline:.0f}s ({attempt} attempt(s))")
        timeout = urllib3.Timeout(connect=min(policy.connect_timeout, left), read=min(policy.read_timeout, left))
        try:
            response = manager.request(method, current, preload_content=False, redirect=False, retries=False,
                                       timeout=timeout, pool_timeout=left)
        except BlockedAddress as exc:
            raise InvalidHttpLocation(f"{current}: {exc}") from None
        except HTTPError as exc:
            attempt += 1
            problem = f"{type(exc).__name__}: {exc}"
            if attempt >= policy.attempts:
                raise HttpUnavailable(f"{url}: request failed after {attempt} attempt(s): {problem}") from exc
            _sleep(_backoff(attempt), deadline, url, problem)
            continue
        status = response.status
        if status == 200:
            length = response.headers.get("Content-Length")
            if max_bytes is not None and length and length.isdigit() and int(length) > max_bytes:
                response.close()
                raise ImageError("too_large", f"{url}: {int(length):,} bytes (Content-Length) exceeds the limit of "
                                              f"{max_bytes:,}; not downloaded (raise --max-image-bytes if such files are expected)")
            return response
        location = response.headers.get("Location")
        _discard(response)
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
            _sleep(max(_retry_after(response.headers.get("Retry-After")), _backoff(attempt)), deadline, url, problem)
            continue
        raise InvalidHttpLocation(f"{current}: HTTP {status}; the server will not serve this URL")


def _discard(response: Any) -> None:
    # A small error body is read so the connection can serve the next request; a large one costs a new connection.
    try:
        length = int(response.headers.get("Content-Length") or -1)
        if 0 <= length <= 65_536:
            response.drain_conn()
            response.release_conn()
        else:
            response.close()
    except Exception:
        response.close()


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
