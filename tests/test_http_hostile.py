"""Hostile CDN answers and URLs (issue 29): ordinary 404 pages must not stop a night, the allow-list must mean
what it says, every deadline must hold. A photo server on 127.0.0.1 (tests/http_server.py) plays the CDN."""

from __future__ import annotations

import socket
import time
from urllib.parse import quote

import pytest

from tagger.data.decode import ImageError
from tagger.data.http import HttpPolicy, InvalidHttpLocation
from tagger.data.reader import StorageUnavailable, fetch_image

from .http_server import PhotoServer
from .test_http_images import photos, server  # noqa: F401 (fixtures)


def loopback(**settings) -> HttpPolicy:
    return HttpPolicy(("127.0.0.1:*",), allow_private=True, allow_plain_http=True, **settings)


def test_error_pages_and_oversized_photos_do_not_use_up_the_pool(server, photos):
    """Every answer that is not used gives its connection's pool slot back: more of them than the pool holds
    (big and chunked 404 pages, photos over the byte cap, declared or found while reading), then a photo."""
    policy = loopback(per_host=2, deadline=3.0)
    cap = min((photos / n).stat().st_size for n in ("p0.jpg", "p1.jpg")) - 1
    hostile = {"/big404/a": "missing", "/chunked404/b": "missing", "/img/p0.jpg": "too_large",
               "/nolength/p1.jpg": "too_large"}
    for _ in range(3):  # 12 > per_host and > the default 8
        for path, error_type in hostile.items():
            with pytest.raises(ImageError) as info:
                fetch_image(server.url + path, None, http=policy, max_bytes=cap)
            assert info.value.error_type == error_type, info.value.message
    data, _ = fetch_image(f"{server.url}/img/p2.jpg", None, http=policy)
    assert data == (photos / "p2.jpg").read_bytes()
    assert server.count("GET", "/img/p2.jpg") == 1


def test_a_small_error_page_keeps_its_connection(server, photos):
    policy = loopback(per_host=1, deadline=3.0)
    for _ in range(5):
        with pytest.raises(ImageError):
            fetch_image(f"{server.url}/status/404", None, http=policy)
    assert fetch_image(f"{server.url}/img/p3.jpg", None, http=policy)[0] == (photos / "p3.jpg").read_bytes()


# -- the allow-list means what it says: the host checked is the host connected to -----------------------------
@pytest.mark.parametrize("url,why", [
    ("https://localhost\\.cdn.test/x.jpg", "backslash"),  # urlsplit: host localhost\.cdn.test; urllib3: localhost
    ("https://img.cdn.test\\@localhost/x.jpg", "backslash"),
    ("https://localhost%2ecdn.test/x.jpg", "percent-encoded"),
    ("https://img.cdn.test@localhost/x.jpg", "credentials"),
    ("https://user:pw@img.cdn.test/x.jpg", "credentials"),
    ("https://[::1]/x.jpg", "IPv6"),
    ("https://img.cdn.test\t.evil.net/x.jpg", "control character"),
    ("https://img.cdn.test\n.evil.net/x.jpg", "control character"),
    ("https://img.cdn.test%00.evil.net/x.jpg", "percent-encoded"),
    ("https://img.cdn.test;.evil.net/x.jpg", "not a host name"),
    ("https://ｉｍｇ.cdn.test/x.jpg", "malformed"),  # full-width letters: no valid IDNA name
    ("https://img.cdn.test\u3002evil.net/x.jpg", "malformed"),  # an ideographic full stop
    ("https:img.cdn.test/x.jpg", "malformed"),
    ("https:///img.cdn.test/x.jpg", "malformed"),
    ("https://img.cdn.test:443:80/x.jpg", "malformed"),
    ("https://localhost#.cdn.test/x.jpg", "not allowed"),
    ("https://localhost?.cdn.test/x.jpg", "not allowed"),
    ("https://cdn.test/x.jpg", "not allowed"),  # the wildcard's domain itself
])
def test_ambiguous_urls_are_refused_before_any_request(url, why):
    policy = HttpPolicy(("*.cdn.test",))
    with pytest.raises(InvalidHttpLocation) as info:
        policy.target(url)
    assert why in str(info.value), str(info.value)
    assert "pw" not in str(info.value), "credentials are never echoed into the errors table"


def test_the_parse_that_is_checked_is_the_one_requested():
    policy = HttpPolicy(("*.cdn.test:8443", "bücher.example"))
    target = policy.target("HTTPS://Img.CDN.test:8443/a b/x.jpg?w=1")
    assert (target.scheme, target.host, target.port, target.request_uri) == ("https", "img.cdn.test", 8443, "/a%20b/x.jpg?w=1")
    assert policy.target("https://bücher.example/x.jpg").host == "xn--bcher-kva.example", "IDNA: one ASCII form"


def test_a_backslash_host_never_reaches_the_server(server):
    # urllib3 alone would connect to 127.0.0.1 for this URL, which names the host "127.0.0.1\.cdn.test".
    policy = HttpPolicy(("*.cdn.test:*", "127.0.0.1:*"), allow_private=True, allow_plain_http=True, deadline=3.0)
    url = server.url.replace("127.0.0.1", "127.0.0.1\\.cdn.test") + "/img/p0.jpg"
    with pytest.raises(ImageError) as info:
        fetch_image(url, None, http=policy)
    assert info.value.error_type == "invalid_location"
    bounced = f"{server.url}/redirect?to=" + quote(url, safe="")
    with pytest.raises(ImageError) as info:
        fetch_image(bounced, None, http=policy)
    assert info.value.error_type == "invalid_location" and "redirected from" in info.value.message
    assert server.count("GET", "/img/") == 0 and server.count("GET", "/%5C") == 0


# -- every deadline holds ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/drip/p0.jpg", "/drip-headers"])
def test_a_dripping_server_is_cut_at_the_deadline(server, path):
    """One byte every half second restarts a socket timeout each time; the deadline still holds (the watchdog)."""
    policy = loopback(deadline=2.0, read_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="--http-deadline 2s"):
        fetch_image(server.url + path, None, http=policy)
    assert time.monotonic() - started < 6, "cut at the deadline, not at the end of the body"


# -- the doubtful cases, decided (docs/failure-modes.md): the row's error, or the run's -------------------------
def test_a_body_shorter_than_its_content_length_is_retried_then_the_rows_decode_error(server):
    policy = loopback(deadline=10.0, attempts=2)
    with pytest.raises(ImageError) as info:
        fetch_image(f"{server.url}/short/p0.jpg", None, http=policy)
    assert info.value.error_type == "decode" and "truncated" in info.value.message, info.value.message
    assert server.count("GET", "/short/") == 2, "retried once: a cut connection may be the network's"


@pytest.mark.parametrize("code, outcome", [(socket.EAI_NONAME, "invalid_location"), (socket.EAI_AGAIN, "unavailable")])
def test_a_host_that_does_not_exist_is_the_rows_error_a_failing_resolver_the_runs(monkeypatch, code, outcome):
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        if host == "nowhere.cdn.test":
            raise socket.gaierror(code, "no such host" if code == socket.EAI_NONAME else "temporary failure")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    for policy in (HttpPolicy(("*.cdn.test",), deadline=3.0, attempts=2),
                   HttpPolicy(("*.cdn.test",), allow_private=True, deadline=3.0, attempts=2)):  # both connection kinds
        if outcome == "invalid_location":
            with pytest.raises(ImageError) as info:
                fetch_image("https://nowhere.cdn.test/x.jpg", None, http=policy)
            assert info.value.error_type == "invalid_location" and "does not exist" in info.value.message
        else:
            with pytest.raises(StorageUnavailable):
                fetch_image("https://nowhere.cdn.test/x.jpg", None, http=policy)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for localhost: a server whose CA this machine does not trust."""
    pytest.importorskip("cryptography")
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"


def test_an_untrusted_certificate_is_the_rows_error_and_ssl_cert_file_trusts_a_private_ca(photos, certificate, monkeypatch):
    server = PhotoServer(photos).tls(*map(str, certificate)).start()
    try:
        with pytest.raises(ImageError) as info:
            fetch_image(f"{server.url}/img/p0.jpg", None, http=HttpPolicy(("localhost:*",), allow_private=True, deadline=5.0))
        assert info.value.error_type == "invalid_location" and "SSL_CERT_FILE" in info.value.message, info.value.message
        assert server.requests == [], "no request went out over the untrusted connection"
        monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
        trusted = HttpPolicy(("localhost:*",), allow_private=True, deadline=6.0)  # a new policy: new connections
        assert fetch_image(f"{server.url}/img/p0.jpg", None, http=trusted)[0] == (photos / "p0.jpg").read_bytes()
    finally:
        server.stop()


# -- more of the attacker's answers ------------------------------------------------------------------------------
def test_a_redirect_loop_is_the_rows_error(server):
    with pytest.raises(ImageError) as info:
        fetch_image(f"{server.url}/loop", None, http=loopback(deadline=5.0))
    assert info.value.error_type == "invalid_location" and "redirects" in info.value.message
    assert server.count("GET", "/loop") == 6


def test_ten_thousand_headers_are_refused_not_read(server, photos):
    policy = loopback(deadline=5.0, attempts=2, per_host=1)
    with pytest.raises(StorageUnavailable, match="headers"):
        fetch_image(f"{server.url}/many-headers", None, http=policy)
    assert fetch_image(f"{server.url}/img/p1.jpg", None, http=policy)[0] == (photos / "p1.jpg").read_bytes()


def test_one_private_address_among_public_ones_refuses_the_host(monkeypatch):
    """A round-robin answer (or a rebinding resolver) cannot smuggle in an internal address: every address is
    checked, and the connection goes to a checked one, never to a name resolved again."""
    answers = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 443)),
               (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 443))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: answers)
    with pytest.raises(ImageError) as info:
        fetch_image("https://img.cdn.test/x.jpg", None, http=HttpPolicy(("*.cdn.test",), deadline=3.0))
    assert info.value.error_type == "invalid_location" and "169.254.169.254 is a link-local address" in info.value.message
    # one sentence a person reads in the summary line: not "resolves to 169.254.169.254 is a link-local address"
    assert "resolves to an address it may not reach: 169.254.169.254 is a link-local address; refused" in info.value.message
