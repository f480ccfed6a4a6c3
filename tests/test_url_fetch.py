"""`UrlFetcher` against hostile URLs: which addresses it refuses (this host's own
among them), that it connects to the address it checked, that every redirect hop is
checked and leaves its connection clean, that one deadline holds for the whole fetch
however a server drips, that a compressed body is undone within URL_MAX_BYTES, and
that its errors do not tell a port scanner what it wants.

Three layers: `refusal()` decided in-process from a table; UrlFetcher against real
HTTP/1.1 keep-alive servers on this host; and a real pool with default settings.
Where a test needs a name to resolve to a chosen address (DNS rebinding, a TLS
name), the `dns` fixture plays the DNS server: it answers for names ending in
.test and passes every other name to the real resolver.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import tracemalloc
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from structlog.testing import capture_logs

from harness.http_server import HttpServer
from shared.config import Settings
from shared.imaging import url_fetch
from shared.imaging.images import ImageError
from tests.helpers import dead_letters, push, wait_for_records

LOOPBACK_SPELLINGS = (
    "127.0.0.1", "localhost", "127.1", "2130706433", "0x7f.1", "0177.0.0.1", "[::1]", "[::ffff:127.0.0.1]",
)


def settings(**overrides: Any) -> Settings:
    """The defaults (loopback refused, private allowed), short timeouts so a failing test ends soon."""
    base = {"url_connect_timeout": 2.0, "url_read_timeout": 5.0}
    return dataclasses.replace(Settings(), **{**base, **overrides})


# ---------------------------------------------------------------- refusal(): the decision table

# (allow_loopback, allow_private)
FLAGS = {"default": (False, True), "loopback-on": (True, True), "private-off": (False, False)}
DEFAULT, LOOPBACK_ON, PRIVATE_OFF = FLAGS

# (address, settings, the refusal's words or None)
DECISIONS = [
    ("8.8.8.8", DEFAULT, None),
    ("2606:4700:4700::1111", DEFAULT, None),
    ("127.0.0.1", DEFAULT, "a loopback address"),
    ("127.255.0.9", DEFAULT, "a loopback address"),
    ("::1", DEFAULT, "a loopback address"),
    ("127.0.0.1", LOOPBACK_ON, None),
    ("::1", LOOPBACK_ON, None),
    ("0.0.0.0", DEFAULT, "the unspecified address"),
    ("0.0.0.0", LOOPBACK_ON, "the unspecified address"),
    ("0.1.2.3", LOOPBACK_ON, "the unspecified address"),
    ("::", LOOPBACK_ON, "the unspecified address"),
    ("169.254.169.254", LOOPBACK_ON, "a link-local address"),
    ("169.254.170.2", DEFAULT, "a link-local address"),
    ("fe80::1", LOOPBACK_ON, "a link-local address"),
    ("febf::1", DEFAULT, "a link-local address"),
    ("224.0.0.1", DEFAULT, "a multicast address"),
    ("239.255.255.250", DEFAULT, "a multicast address"),
    ("ff02::1", DEFAULT, "a multicast address"),
    ("255.255.255.255", DEFAULT, "a reserved address"),
    ("240.0.0.1", DEFAULT, "a reserved address"),
    ("192.0.0.8", DEFAULT, "a reserved address"),
    ("100::1", DEFAULT, "a reserved address"),
    ("::ffff:0:7f00:1", DEFAULT, "a reserved address"),
    ("4000::1", DEFAULT, "a reserved address"),
    # Cloud metadata: refused even where private networks are allowed.
    ("100.100.100.200", DEFAULT, "a cloud metadata address"),
    ("192.0.0.192", DEFAULT, "a cloud metadata address"),
    ("168.63.129.16", DEFAULT, "a cloud metadata address"),
    ("fd00:ec2::254", DEFAULT, "a cloud metadata address"),
    ("fd00:ec2::23", LOOPBACK_ON, "a cloud metadata address"),
    # Private networks follow allow_private.
    ("10.1.2.3", DEFAULT, None),
    ("172.31.255.1", DEFAULT, None),
    ("192.168.1.1", DEFAULT, None),
    ("100.64.0.1", DEFAULT, None),
    ("fd12:3456::1", DEFAULT, None),
    ("10.1.2.3", PRIVATE_OFF, "a private address"),
    ("172.16.0.1", PRIVATE_OFF, "a private address"),
    ("192.168.1.1", PRIVATE_OFF, "a private address"),
    ("100.127.255.254", PRIVATE_OFF, "a private address"),
    ("fc00::1", PRIVATE_OFF, "a private address"),
    ("172.32.0.1", PRIVATE_OFF, None),
    ("100.128.0.1", PRIVATE_OFF, None),
    # IPv6 forms that carry an IPv4 address are judged by that address.
    ("::ffff:127.0.0.1", DEFAULT, "a loopback address in IPv4-mapped IPv6 form"),
    ("::ffff:169.254.169.254", LOOPBACK_ON, "a link-local address in IPv4-mapped IPv6 form"),
    ("::ffff:10.0.0.1", PRIVATE_OFF, "a private address in IPv4-mapped IPv6 form"),
    ("::ffff:8.8.8.8", PRIVATE_OFF, None),
    ("::ffff:127.0.0.1", LOOPBACK_ON, None),
    ("::127.0.0.1", DEFAULT, "a loopback address in IPv4-compatible IPv6 form"),
    ("::169.254.169.254", LOOPBACK_ON, "a link-local address in IPv4-compatible IPv6 form"),
    ("64:ff9b::127.0.0.1", DEFAULT, "a loopback address in NAT64 IPv6 form"),
    ("64:ff9b::169.254.169.254", DEFAULT, "a link-local address in NAT64 IPv6 form"),
    ("64:ff9b::8.8.8.8", PRIVATE_OFF, None),  # DNS64 gives IPv4-only sites such addresses
    ("64:ff9b:1::a00:1", DEFAULT, "a local-use NAT64 address"),
    ("2002:7f00:1::", DEFAULT, "a loopback address in 6to4 IPv6 form"),
    ("2002:a9fe:a9fe::1", DEFAULT, "a link-local address in 6to4 IPv6 form"),
    ("2002:c0a8:101::1", PRIVATE_OFF, "a private address in 6to4 IPv6 form"),
    ("2002:808:808::1", PRIVATE_OFF, None),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", DEFAULT, "a Teredo address"),
]


@pytest.mark.fast
@pytest.mark.parametrize(("address", "flags", "expected"), DECISIONS, ids=[f"{a}-{f}" for a, f, _ in DECISIONS])
def test_refusal_decides_each_address(address: str, flags: str, expected: str | None) -> None:
    allow_loopback, allow_private = FLAGS[flags]
    ip = ipaddress.ip_address(address)
    assert url_fetch.refusal(ip, allow_loopback=allow_loopback, allow_private=allow_private) == expected


# ---------------------------------------------------------------- a real HTTP/1.1 keep-alive server


@dataclasses.dataclass(frozen=True)
class Route:
    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    reset: bool = False  # read the request, then close the connection with an RST
    delay: float = 0.0  # seconds to wait before answering


class KeepAliveServer:
    """HTTP/1.1 with keep-alive and a Content-Length on every response, as image
    hosts (nginx, CDNs) answer; counts connections so a test can see reuse."""

    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str, int]] = []  # (path, Host header, connection number)
        self.connections = 0
        self.server_names: list[str | None] = []  # TLS SNI, one per handshake
        self.accept_encodings: list[str | None] = []  # the Accept-Encoding of each request
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with owner._lock:
                    owner.connections += 1
                    self.number = owner.connections

            def do_GET(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler naming
                with owner._lock:
                    owner.requests.append((self.path, self.headers.get("Host", ""), self.number))
                    owner.accept_encodings.append(self.headers.get("Accept-Encoding"))
                    route = owner.routes.get(self.path.split("?", 1)[0], Route(404, b"not found\n"))
                time.sleep(route.delay)
                if route.reset:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                self.send_response(route.status)
                for name, value in route.headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                self.wfile.write(route.body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - inherited name
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients that hang up are what several tests do

        self._server = Server((host, 0), Handler)
        if tls is not None:
            tls.sni_callback = lambda _sock, name, _ctx: self.server_names.append(name)
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.host = host
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> KeepAliveServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def url(self, path: str, host: str | None = None, scheme: str = "http") -> str:
        host = host or (f"[{self.host}]" if ":" in self.host else self.host)
        return f"{scheme}://{host}:{self.port}{path}"

    def add(
        self, path: str, body: bytes = b"", status: int = 200, headers: Mapping[str, str] | None = None,
        *, delay: float = 0.0,
    ) -> str:
        self.routes[path] = Route(status, body, tuple((headers or {}).items()), delay=delay)
        return self.url(path)

    def redirect(self, path: str, location: str, body: bytes = b"", status: int = 302, *, delay: float = 0.0) -> str:
        return self.add(path, body, status, {"Location": location, "Content-Type": "text/html"}, delay=delay)

    def hits(self, path: str) -> int:
        return sum(1 for seen, _, _ in self.requests if seen.split("?", 1)[0] == path)


@pytest.fixture
def server() -> Iterator[KeepAliveServer]:
    with KeepAliveServer() as running:
        yield running


class Dns:
    """Plays the DNS server for made-up names: `dns[name] = [answer, answer, ...]`,
    each answer a list of addresses, the last one repeating; `calls` counts questions."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self._answers: dict[str, list[list[str]]] = {}
        self.calls: Counter[str] = Counter()

    def __setitem__(self, name: str, answers: list[list[str]]) -> None:
        self._answers[name] = list(answers)

    def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self._answers:
            return self._real(host, port, *args, **kwargs)
        self.calls[name] += 1
        answers = self._answers[name]
        addresses = answers.pop(0) if len(answers) > 1 else answers[0]
        return [info for address in addresses for info in self._real(address, port, *args, **kwargs)]


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> Dns:
    fake = Dns(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", fake.getaddrinfo)
    return fake


class RawServer:
    """A TCP server on 127.0.0.1 that plays `script(connection, stopped)` on each
    connection, for what no HTTP server library sends: a status line, then drips."""

    def __init__(self, script: Callable[[socket.socket, threading.Event], None]) -> None:
        self._script = script
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self.stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> RawServer:
        self._acceptor.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped.set()
        self._acceptor.join(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._play, args=(connection,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _play(self, connection: socket.socket) -> None:
        with connection:
            try:
                self._script(connection, self.stopped)
            except OSError:
                pass  # the client hung up, as a deadline makes it do


DRIP_SECONDS = 12.0  # how long a dripping server keeps it up: far past every deadline below


def drip(head: bytes, byte: bytes, interval: float = 0.25) -> Callable[[socket.socket, threading.Event], None]:
    """Read the request, send `head`, then one `byte` each `interval` (well within any
    per-read timeout) for DRIP_SECONDS."""

    def script(connection: socket.socket, stopped: threading.Event) -> None:
        connection.recv(65536)
        connection.sendall(head)
        ends = time.monotonic() + DRIP_SECONDS
        while time.monotonic() < ends and not stopped.wait(interval):
            connection.sendall(byte)

    return script


def fetch_error(fetcher: url_fetch.UrlFetcher, url: str) -> ImageError:
    with pytest.raises(ImageError) as caught:
        fetcher.fetch(url)
    return caught.value


# ---------------------------------------------------------------- refused addresses, through the fetcher


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_every_spelling_of_loopback_is_refused_by_default(server: KeepAliveServer, host: str) -> None:
    url = server.url("/photo.jpg", host=host)
    server.add("/photo.jpg", b"jpeg bytes")
    error = fetch_error(url_fetch.UrlFetcher(settings()), url)
    assert str(error).startswith("refused address:") and "loopback" in str(error), error
    assert not error.transient
    assert server.hits("/photo.jpg") == 0


@pytest.mark.parametrize("host", [h for h in LOOPBACK_SPELLINGS if h != "[::1]"])
def test_url_allow_loopback_opens_loopback_in_every_spelling(server: KeepAliveServer, host: str) -> None:
    """The spellings above are refused as what they are, not by accident: allowed, they reach the server."""
    server.add("/photo.jpg", b"jpeg bytes")
    fetcher = url_fetch.UrlFetcher(settings(url_allow_loopback=True))
    assert fetcher.fetch(server.url("/photo.jpg", host=host)) == b"jpeg bytes"


def test_the_unspecified_address_is_refused_even_with_loopback_allowed(server: KeepAliveServer) -> None:
    """On Linux a connection to 0.0.0.0 reaches this host's listening sockets."""
    server.add("/photo.jpg", b"jpeg bytes")
    error = fetch_error(url_fetch.UrlFetcher(settings(url_allow_loopback=True)), server.url("/photo.jpg", "0.0.0.0"))
    assert "refused address" in str(error) and "unspecified" in str(error)
    assert server.hits("/photo.jpg") == 0


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::ffff:169.254.169.254]/latest/", "link-local"),
        ("http://100.100.100.200/latest/meta-data/", "cloud metadata"),
        ("http://192.0.0.192/opc/v2/instance/", "cloud metadata"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "cloud metadata"),
        ("http://[64:ff9b::a9fe:a9fe]/latest/", "link-local address in NAT64"),
        ("http://[2002:a9fe:a9fe::]/latest/", "link-local address in 6to4"),
        ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "Teredo"),
        ("http://224.0.0.251/", "multicast"),
    ],
)
@pytest.mark.fast
def test_metadata_and_special_addresses_are_refused_before_any_connection(url: str, words: str) -> None:
    fetcher = url_fetch.UrlFetcher(settings(url_allow_loopback=True, url_connect_timeout=0.2))
    with capture_logs() as logs:
        error = fetch_error(fetcher, url)
    assert "refused address" in str(error) and words in str(error), error
    assert not error.transient
    assert [entry["event"] for entry in logs] == ["url_address_refused"]  # and no connection tried


@pytest.mark.fast
def test_url_allow_private_false_refuses_private_networks() -> None:
    fetcher = url_fetch.UrlFetcher(settings(url_allow_private=False, url_connect_timeout=0.2))
    for url in ("http://10.0.0.1/a.jpg", "http://[fd00::1]/a.jpg", "http://100.64.1.1/a.jpg"):
        assert "a private address" in str(fetch_error(fetcher, url)), url


def test_a_name_with_one_refused_address_among_good_ones_is_refused(server: KeepAliveServer, dns) -> None:
    """Which answer a client uses is up to it: every one is checked."""
    dns["mixed.test"] = [["10.255.255.1", "169.254.169.254"]]
    error = fetch_error(url_fetch.UrlFetcher(settings()), server.url("/a.jpg", "mixed.test"))
    assert "refused address" in str(error) and "link-local" in str(error)


def _own_address(family: socket.AddressFamily) -> str | None:
    """This machine's address of `family` other than loopback and link-local, or None."""
    probe = "192.0.2.1" if family == socket.AF_INET else "2001:db8::1"
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.connect((probe, 9))  # no packet is sent: this only picks a source address
            address = udp.getsockname()[0]
    except OSError:
        return None
    ip = ipaddress.ip_address(address)
    return None if ip.is_loopback or ip.is_link_local or ip.is_unspecified else address


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_this_hosts_own_addresses_are_refused_as_loopback(family: socket.AddressFamily, dns) -> None:
    """A service of this host bound to the wildcard address (METRICS_PORT's default
    0.0.0.0, say) answers on the host's own addresses too: they are loopback in all
    but name, in every spelling, and URL_ALLOW_LOOPBACK is what opens them."""
    address = _own_address(family)
    if address is None:
        pytest.skip(f"this machine has no {family.name} address besides loopback and link-local")
    with KeepAliveServer("0.0.0.0" if family == socket.AF_INET else "::") as anywhere:
        anywhere.add("/metrics", b"internal")
        dns["me.test"] = [[address]]
        hosts = ["me.test", address] if family == socket.AF_INET else ["me.test", f"[{address}]"]
        if family == socket.AF_INET and socket.has_ipv6:
            hosts.append(f"[::ffff:{address}]")
        for host in hosts:
            error = fetch_error(url_fetch.UrlFetcher(settings()), anywhere.url("/metrics", host))
            assert str(error).startswith("refused address: "), (host, error)
            assert str(error).endswith(" resolves to an address of this host (refused as loopback)"), (host, error)
            assert not error.transient
        assert anywhere.hits("/metrics") == 0
        allowed = url_fetch.UrlFetcher(settings(url_allow_loopback=True))
        for host in hosts:
            assert allowed.fetch(anywhere.url("/metrics", host)) == b"internal", host


# ---------------------------------------------------------------- resolve once, connect to what was checked


def test_dns_rebinding_cannot_move_the_connection_after_the_check(server: KeepAliveServer, dns) -> None:
    """The first answer passes the check; a second answer would point at the server.
    The fetcher asks once and connects to the first answer, so the server never sees us."""
    server.add("/secret.jpg", b"internal data")
    # 127.0.0.2 is loopback too, but nothing listens there: only a re-resolution reaches 127.0.0.1.
    dns["rebind.test"] = [["127.0.0.2"], ["127.0.0.1"]]
    fetcher = url_fetch.UrlFetcher(settings(url_allow_loopback=True))
    error = fetch_error(fetcher, server.url("/secret.jpg", "rebind.test"))
    assert str(error).startswith("cannot connect to the image host"), error
    assert server.hits("/secret.jpg") == 0
    assert dns.calls["rebind.test"] == 1


def test_the_vetted_address_is_used_and_the_name_is_kept_in_the_host_header(server: KeepAliveServer, dns) -> None:
    dns["images.test"] = [["127.0.0.1"]]
    server.add("/a.jpg", b"jpeg")
    fetcher = url_fetch.UrlFetcher(settings(url_allow_loopback=True))
    assert fetcher.fetch(server.url("/a.jpg?size=big", "images.test")) == b"jpeg"
    assert server.requests == [("/a.jpg?size=big", f"images.test:{server.port}", 1)]


def test_the_next_address_is_tried_when_the_first_takes_no_connection(server: KeepAliveServer, dns) -> None:
    dns["two.test"] = [["127.0.0.2", "127.0.0.1"]]
    server.add("/a.jpg", b"jpeg")
    assert url_fetch.UrlFetcher(settings(url_allow_loopback=True)).fetch(server.url("/a.jpg", "two.test")) == b"jpeg"


def test_one_parser_decides_the_host_that_is_checked_and_connected(server: KeepAliveServer) -> None:
    """urlsplit reads `http://127.0.0.1:PORT\\@localhost/` as host localhost; urllib3
    connects to 127.0.0.1. The host checked must be the one connected to."""
    server.add("/a.jpg", b"jpeg")
    fetcher = url_fetch.UrlFetcher(settings(url_allow_loopback=True, url_allowed_hosts=("localhost",)))
    error = fetch_error(fetcher, f"http://127.0.0.1:{server.port}\\@localhost/a.jpg")
    assert "'127.0.0.1' is not in URL_ALLOWED_HOSTS" in str(error), error
    assert server.requests == []


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for img.test, made by the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=img.test",
         "-addext", "subjectAltName=DNS:img.test", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def test_https_to_the_vetted_address_keeps_the_name_for_sni_and_the_certificate(
    certificate: tuple[Path, Path], dns, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # OpenSSL's default trust store, read at each connect
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    dns["img.test"] = [["127.0.0.1"]]
    dns["other.test"] = [["127.0.0.1"]]
    with KeepAliveServer(tls=context) as tls_server:
        tls_server.add("/a.jpg", b"jpeg over tls")
        fetcher = url_fetch.UrlFetcher(settings(url_allow_loopback=True))
        assert fetcher.fetch(tls_server.url("/a.jpg", "img.test", scheme="https")) == b"jpeg over tls"
        assert tls_server.server_names == ["img.test"]
        assert tls_server.requests == [("/a.jpg", f"img.test:{tls_server.port}", 1)]
        # The same address under a name the certificate does not carry: refused by TLS.
        error = fetch_error(fetcher, tls_server.url("/a.jpg", "other.test", scheme="https"))
        assert str(error).startswith("TLS with the image host failed") and error.transient
        assert len(tls_server.requests) == 1


# ---------------------------------------------------------------- redirects


def test_a_same_host_redirect_with_a_body_reuses_the_drained_connection(server: KeepAliveServer) -> None:
    """Image hosts answer 302 with a small HTML body on a kept-alive connection. Left
    unread, that body poisoned the next request on the connection (a ProtocolError,
    retried five times, every time)."""
    server.add("/real.jpg", b"jpeg")
    start = server.redirect("/old.jpg", "/real.jpg", body=b"<html><body>Moved</body></html>\n" * 20)
    fetcher = url_fetch.UrlFetcher(settings(url_allow_loopback=True))
    assert fetcher.fetch(start) == b"jpeg"
    assert fetcher.fetch(start) == b"jpeg"
    assert [number for _, _, number in server.requests] == [1, 1, 1, 1]  # one connection for all four


def test_a_redirect_with_a_large_body_closes_its_connection_instead(server: KeepAliveServer) -> None:
    server.add("/real.jpg", b"jpeg")
    start = server.redirect("/old.jpg", "/real.jpg", body=b"x" * (url_fetch.DRAIN_BYTES * 3))
    fetcher = url_fetch.UrlFetcher(settings(url_allow_loopback=True))
    assert fetcher.fetch(start) == b"jpeg"
    assert [number for _, _, number in server.requests] == [1, 2]


def test_an_error_response_with_a_body_leaves_the_connection_clean(server: KeepAliveServer) -> None:
    gone = server.add("/gone.jpg", b"<html>404 page</html>\n" * 10, status=404)
    good = server.add("/good.jpg", b"jpeg")
    fetcher = url_fetch.UrlFetcher(settings(url_allow_loopback=True))
    error = fetch_error(fetcher, gone)
    assert str(error) == f"HTTP 404 from {gone}" and not error.transient
    assert fetcher.fetch(good) == b"jpeg"
    assert [number for _, _, number in server.requests] == [1, 1]


def test_every_redirect_hop_is_checked_for_its_address(server: KeepAliveServer) -> None:
    """Loopback allowed, the first hop passes; the hop to 0.0.0.0 (this host, on Linux) does not."""
    server.add("/internal.jpg", b"internal")
    bounce = server.redirect("/bounce", server.url("/internal.jpg", "0.0.0.0"), body=b"moved")
    error = fetch_error(url_fetch.UrlFetcher(settings(url_allow_loopback=True)), bounce)
    assert "refused address" in str(error) and "unspecified" in str(error)
    assert server.hits("/internal.jpg") == 0


def test_every_redirect_hop_is_checked_for_scheme_and_allowed_hosts(server: KeepAliveServer) -> None:
    server.add("/a.jpg", b"jpeg")
    to_ftp = server.redirect("/to-ftp", "ftp://127.0.0.1/a.jpg")
    to_other = server.redirect("/to-other", server.url("/a.jpg", "localhost"))
    fetcher = url_fetch.UrlFetcher(settings(url_allow_loopback=True, url_allowed_hosts=("127.0.0.1",)))
    assert "scheme 'ftp' is not allowed" in str(fetch_error(fetcher, to_ftp))
    assert "'localhost' is not in URL_ALLOWED_HOSTS" in str(fetch_error(fetcher, to_other))
    assert server.hits("/a.jpg") == 0


def test_too_many_redirects(server: KeepAliveServer) -> None:
    server.redirect("/a", "/b", body=b"a")
    server.redirect("/b", "/a", body=b"b")
    fetcher = url_fetch.UrlFetcher(settings(url_allow_loopback=True, url_max_redirects=3))
    assert str(fetch_error(fetcher, server.url("/a"))) == "more than URL_MAX_REDIRECTS=3 redirects"
    assert len(server.requests) == 4 and {number for _, _, number in server.requests} == {1}


# ---------------------------------------------------------------- errors without a port scanner's oracle


def test_a_closed_port_and_a_silent_address_give_the_same_coarse_error(server: KeepAliveServer, dns) -> None:
    """Refused (a closed port) and timed out (a filtered one) read alike in the record;
    the errno is in a DEBUG line for the operator."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    dns["closed.test"] = [["127.0.0.1"]]
    dns["silent.test"] = [["10.255.255.1"]]  # private, allowed by default; nothing answers
    fetcher = url_fetch.UrlFetcher(settings(url_allow_loopback=True, url_connect_timeout=0.3))
    with capture_logs() as logs:
        refused = fetch_error(fetcher, f"http://closed.test:{port}/a.jpg?key=secret")
        silent = fetch_error(fetcher, f"http://silent.test:{port}/a.jpg")
    assert str(refused) == f"cannot connect to the image host for http://closed.test:{port}/a.jpg"
    assert str(silent) == f"cannot connect to the image host for http://silent.test:{port}/a.jpg"
    assert refused.transient and silent.transient
    details = [entry for entry in logs if entry["event"] == "url_connect_failed"]
    assert [entry["log_level"] for entry in details] == ["debug", "debug"]
    assert "refused" in details[0]["error"].lower() and details[0]["address"] == "127.0.0.1"
    assert "secret" not in json.dumps(details)


def test_a_reset_before_the_response_is_transient_and_coarse(server: KeepAliveServer) -> None:
    server.routes["/reset"] = Route(reset=True)
    fetcher = url_fetch.UrlFetcher(settings(url_allow_loopback=True))
    with capture_logs() as logs:
        error = fetch_error(fetcher, server.url("/reset"))
    assert str(error) == f"no HTTP response from the image host for {server.url('/reset')}"
    assert error.transient
    (detail,) = [entry for entry in logs if entry["event"] == "url_no_response"]
    assert detail["log_level"] == "debug" and detail["error"]


# ---------------------------------------------------------------- one deadline for the whole fetch

GZIP_HEADER_WITH_A_NAME = b"\x1f\x8b\x08\x08" + b"\x00" * 4 + b"\x00\x03"  # FNAME: a NUL-ended name follows
DRIPS = {
    # The status line, then a header line a byte at a time.
    "header": ("http", drip(b"HTTP/1.1 200 OK\r\nX-Drip: ", b"a")),
    # Headers done, then a gzip header whose file name never ends: bytes arrive, none decode.
    "gzip-file-name": ("http", drip(
        b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Encoding: gzip\r\nContent-Length: 100000\r\n\r\n"
        + GZIP_HEADER_WITH_A_NAME, b"a")),
    "body": ("http", drip(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", b"x")),
    # A TLS record header announcing 16 KiB of handshake, then its bytes one by one.
    "tls-handshake": ("https", drip(b"\x16\x03\x03\x40\x00", b"\x00")),
}


@pytest.mark.parametrize("case", DRIPS)
def test_a_dripping_server_holds_a_fetch_no_longer_than_url_read_timeout(case: str) -> None:
    """Each byte comes well within the per-read timeout; URL_READ_TIMEOUT is also the
    whole fetch's, wherever the server drips (before headers end, in a gzip header
    that decodes to nothing, in the body, in the TLS handshake)."""
    scheme, script = DRIPS[case]
    fetcher = url_fetch.UrlFetcher(settings(url_allow_loopback=True, url_read_timeout=1.0))
    with RawServer(script) as raw:
        url = raw.url("/slow.png", scheme)
        started = time.monotonic()
        error = fetch_error(fetcher, url)
        took = time.monotonic() - started
    assert str(error) == f"{url} took longer than URL_READ_TIMEOUT=1s", error
    assert error.transient
    assert took < 1.8, took


def test_one_deadline_covers_every_redirect_hop(server: KeepAliveServer) -> None:
    """Each hop answers in 0.4 s, within URL_READ_TIMEOUT=1s; four of them do not.
    The connection the deadline cut is not used again."""
    server.redirect("/a", "/b", delay=0.4)
    server.redirect("/b", "/c", delay=0.4)
    server.redirect("/c", "/d.jpg", delay=0.4)
    server.add("/d.jpg", b"jpeg", delay=0.4)
    fetcher = url_fetch.UrlFetcher(settings(url_allow_loopback=True, url_read_timeout=1.0))
    started = time.monotonic()
    error = fetch_error(fetcher, server.url("/a"))
    took = time.monotonic() - started
    assert str(error).endswith(" took longer than URL_READ_TIMEOUT=1s") and error.transient, error
    assert took < 1.5, took
    server.add("/quick.jpg", b"jpeg")
    assert fetcher.fetch(server.url("/quick.jpg")) == b"jpeg"
    assert [number for _, _, number in server.requests] == [1, 1, 1, 2]


def _full_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket whose accept queue is full: a connection to it gets no
    answer at all, as from a filtered port. Also returns the connections that fill it."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    queued: list[socket.socket] = []
    while len(queued) < 16:
        client = socket.socket()
        client.settimeout(0.2)
        try:
            client.connect(listener.getsockname())
        except TimeoutError:
            client.close()
            return listener, queued
        queued.append(client)
    raise AssertionError("the listener kept taking connections")


def test_connecting_counts_against_the_deadline() -> None:
    listener, queued = _full_listener()
    try:
        port = listener.getsockname()[1]
        fetcher = url_fetch.UrlFetcher(settings(url_allow_loopback=True, url_connect_timeout=4.0, url_read_timeout=0.8))
        started = time.monotonic()
        error = fetch_error(fetcher, f"http://127.0.0.1:{port}/a.jpg")
        took = time.monotonic() - started
    finally:
        for sock in [*queued, listener]:
            sock.close()
    assert str(error) == f"http://127.0.0.1:{port}/a.jpg took longer than URL_READ_TIMEOUT=0.8s", error
    assert error.transient and took < 1.5, took


def test_at_most_max_addresses_of_a_name_are_tried(dns) -> None:
    """A name with many addresses cannot multiply URL_CONNECT_TIMEOUT by their number."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    addresses = [f"127.0.0.{last}" for last in range(2, 12)]
    dns["many.test"] = [addresses]
    fetcher = url_fetch.UrlFetcher(settings(url_allow_loopback=True))
    with capture_logs() as logs:
        error = fetch_error(fetcher, f"http://many.test:{port}/a.jpg")
    assert str(error) == f"cannot connect to the image host for http://many.test:{port}/a.jpg"
    tried = [entry["address"] for entry in logs if entry["event"] == "url_connect_failed"]
    assert url_fetch.MAX_ADDRESSES == 4 and tried == addresses[:4]


# ---------------------------------------------------------------- content encodings


def compressed(data: bytes, wbits: int) -> bytes:
    """`data` as gzip (wbits 31), zlib-wrapped deflate (15) or raw deflate (-15)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return compressor.compress(data) + compressor.flush()


def bomb(wbits: int, size: int = 1 << 30) -> bytes:
    """`size` zero bytes as gzip (wbits 31) or zlib (15), about 1/1000 of that, made in
    a blink: after a full flush each MiB of zeros compresses to the same bytes."""
    mib = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    head = compressor.compress(mib) + compressor.flush(zlib.Z_FULL_FLUSH)
    step = compressor.compress(mib) + compressor.flush(zlib.Z_FULL_FLUSH)
    end = compressor.flush()  # the last, empty block and a trailer for 2 MiB, put right below
    check = 0 if wbits == 31 else 1
    for _ in range(size >> 20):
        check = zlib.crc32(mib, check) if wbits == 31 else zlib.adler32(mib, check)
    trailer = struct.pack("<II", check, size & 0xFFFF_FFFF) if wbits == 31 else struct.pack(">I", check)
    return head + step * ((size >> 20) - 1) + end[: -len(trailer)] + trailer


IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 400  # compresses well, as the test needs, unlike real images
ENCODINGS = {
    "gzip": ("gzip", compressed(IMAGE, 31)),
    "x-gzip": ("x-gzip", compressed(IMAGE, 31)),
    "deflate": ("deflate", compressed(IMAGE, 15)),
    "raw-deflate": ("deflate", compressed(IMAGE, -15)),  # what some servers send as deflate
    "two-gzip-members": ("gzip", compressed(IMAGE[:5000], 31) + compressed(IMAGE[5000:], 31)),
    "identity": ("identity", IMAGE),
}


@pytest.mark.parametrize("case", ENCODINGS)
def test_a_server_that_compresses_anyway_is_understood_and_its_connection_kept(
    server: KeepAliveServer, case: str
) -> None:
    """The fetcher asks for identity; a server that gzips regardless is undone, and the
    connection is clean for the next request (it failed as an internal error)."""
    coding, body = ENCODINGS[case]
    url = server.add("/a.png", body, headers={"Content-Type": "image/png", "Content-Encoding": coding})
    fetcher = url_fetch.UrlFetcher(settings(url_allow_loopback=True))
    assert fetcher.fetch(url) == IMAGE
    assert fetcher.fetch(url) == IMAGE
    assert [number for _, _, number in server.requests] == [1, 1]
    assert server.accept_encodings == ["identity", "identity"]


@pytest.mark.parametrize("wbits", [31, 15], ids=["gzip", "deflate"])
def test_a_decompression_bomb_stops_at_url_max_bytes_in_bounded_memory(server: KeepAliveServer, wbits: int) -> None:
    """1 GiB of zeros in 1 MiB: URL_MAX_BYTES bounds what it decompresses to."""
    limit = 4 << 20  # above the bomb's own size, so only its decompressed size can exceed it
    coding = "gzip" if wbits == 31 else "deflate"
    url = server.add("/bomb.png", bomb(wbits), headers={"Content-Type": "image/png", "Content-Encoding": coding})
    fetcher = url_fetch.UrlFetcher(settings(url_allow_loopback=True, url_max_bytes=limit))
    tracemalloc.start()
    try:
        started = time.monotonic()
        error = fetch_error(fetcher, url)
        took = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(error) == f"{url} is larger than URL_MAX_BYTES={limit} once decompressed", error
    assert not error.transient
    assert took < 3.0, took
    assert peak < 8 * limit, peak  # the bomb unpacks to 256 times the limit


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, br", "gzip, gzip"])
def test_other_content_encodings_are_a_permanent_error(server: KeepAliveServer, coding: str) -> None:
    url = server.add("/a.png", b"compressed somehow", headers={"Content-Encoding": coding})
    error = fetch_error(url_fetch.UrlFetcher(settings(url_allow_loopback=True)), url)
    assert str(error) == f"{url} came with Content-Encoding {coding!r}; only gzip and deflate are undone", error
    assert not error.transient


def test_a_corrupt_or_truncated_gzip_body_is_a_permanent_error(server: KeepAliveServer) -> None:
    garbage = server.add("/garbage.png", b"this is not gzip", headers={"Content-Encoding": "gzip"})
    short = server.add("/short.png", compressed(IMAGE, 31)[:-100], headers={"Content-Encoding": "gzip"})
    fetcher = url_fetch.UrlFetcher(settings(url_allow_loopback=True))
    for url in (garbage, short):
        error = fetch_error(fetcher, url)
        assert str(error) == f"{url} has a corrupt gzip body" and not error.transient, error


def test_a_gzip_body_cut_off_is_transient_not_an_internal_error() -> None:
    """The connection ends before Content-Length: the same error as without gzip (it
    became a RuntimeError from reading the rest of the body differently)."""
    body = compressed(IMAGE, 31)
    head = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body)

    def script(connection: socket.socket, _: threading.Event) -> None:
        connection.recv(65536)
        connection.sendall(head + body[: len(body) // 2])

    with RawServer(script) as raw:
        error = fetch_error(url_fetch.UrlFetcher(settings(url_allow_loopback=True)), raw.url("/a.png"))
    assert str(error) == f"download of {raw.url('/a.png')} was cut off" and error.transient, error


# ---------------------------------------------------------------- behaviour kept


def test_statuses_retry_after_and_short_urls(server: KeepAliveServer) -> None:
    fetcher = url_fetch.UrlFetcher(settings(url_allow_loopback=True))
    server.add("/busy", b"busy", status=503, headers={"Retry-After": "7"})
    server.add("/slow-down", b"", status=429)
    server.add("/gone", b"", status=410)
    busy = fetch_error(fetcher, f"http://user:hunter2@127.0.0.1:{server.port}/busy?token=abc")
    assert str(busy) == f"HTTP 503 from http://127.0.0.1:{server.port}/busy"
    assert busy.transient and busy.retry_after == 7.0
    assert fetch_error(fetcher, server.url("/slow-down")).transient
    assert not fetch_error(fetcher, server.url("/gone")).transient


def test_byte_cap_and_what_is_left_of_a_refused_body(server: KeepAliveServer) -> None:
    fetcher = url_fetch.UrlFetcher(settings(url_allow_loopback=True, url_max_bytes=1000))
    small, large = url_fetch.DRAIN_BYTES // 2, url_fetch.DRAIN_BYTES * 2
    server.add("/small", b"x" * small)
    server.add("/large", b"x" * large)
    server.add("/ok", b"x" * 1000)
    assert f"is {small} bytes; URL_MAX_BYTES is 1000" in str(fetch_error(fetcher, server.url("/small")))
    assert fetcher.fetch(server.url("/ok")) == b"x" * 1000  # drained: the same connection
    assert f"is {large} bytes; URL_MAX_BYTES is 1000" in str(fetch_error(fetcher, server.url("/large")))
    assert fetcher.fetch(server.url("/ok")) == b"x" * 1000  # closed: a new one
    assert [number for _, _, number in server.requests] == [1, 1, 1, 2]


@pytest.mark.fast
def test_bad_urls_are_permanent_errors() -> None:
    fetcher = url_fetch.UrlFetcher(settings())
    for url, words in [
        ("file:///etc/passwd", "scheme 'file' is not allowed"),
        ("//example.com/a.jpg", "scheme '(none)' is not allowed"),
        ("http://example.com:99999/a.jpg", "not a valid URL"),
        ("http:///a.jpg", "has no host"),
    ]:
        error = fetch_error(fetcher, url)
        assert words in str(error) and not error.transient, (url, error)


# ---------------------------------------------------------------- a real pool, default settings


def png_of(photo: Any) -> bytes:
    ok, encoded = cv2.imencode(".png", photo)
    assert ok
    return encoded.tobytes()


def url_task(request_id: str, url: str) -> dict[str, str]:
    return {"request_id": request_id, "image_id": request_id, "image_url": url}


# The pool factory opens loopback for the rest of the suite; these tests put back the default.
DEFAULT_LOOPBACK = {"URL_ALLOW_LOOPBACK": "false"}


def test_pool_fails_a_loopback_url_naming_the_refusal_and_serves_the_next_task(
    pool_factory, redis_client, queue_name, http_server, segments, photos
) -> None:
    url = http_server.add("/a.png", png_of(photos["coffee"]), content_type="image/png")
    push(redis_client, queue_name, url_task("loopback", url))
    push(redis_client, queue_name, url_task("spelled", url.replace("127.0.0.1", "2130706433")))
    push(redis_client, queue_name, segments.message("good", "good", photos["chelsea"]))
    pool = pool_factory(workers=1, env=DEFAULT_LOOPBACK)
    records = {r["request_id"]: r for r in wait_for_records(pool.output_dir, 3, timeout=30, pool=pool)}
    assert pool.stop() == 0
    for request_id in ("loopback", "spelled"):
        record = records[request_id]
        assert record["status"] == "failed" and record["attempts"] == 1, record
        assert "refused address" in record["error"] and "loopback" in record["error"], record
    assert records["good"]["status"] == "completed"
    assert http_server.hits("/a.png") == 0
    letters = {letter["request_id"]: letter for letter in dead_letters(redis_client, queue_name)}
    assert letters["loopback"]["error"] == records["loopback"]["error"]


def test_pool_refuses_this_hosts_own_address_by_default(
    pool_factory, redis_client, queue_name, segments, photos
) -> None:
    """A service of the pool's host bound to the wildcard is loopback in all but name."""
    family = next((f for f in (socket.AF_INET, socket.AF_INET6) if _own_address(f)), None)
    if family is None:
        pytest.skip("this machine has no address besides loopback and link-local")
    address = _own_address(family)
    with KeepAliveServer("0.0.0.0" if family == socket.AF_INET else "::") as anywhere:
        anywhere.add("/a.png", png_of(photos["coffee"]), headers={"Content-Type": "image/png"})
        own = anywhere.url("/a.png", address if family == socket.AF_INET else f"[{address}]")
        push(redis_client, queue_name, url_task("own", own))
        push(redis_client, queue_name, segments.message("good", "good", photos["chelsea"]))
        pool = pool_factory(workers=1, env=DEFAULT_LOOPBACK)
        records = {r["request_id"]: r for r in wait_for_records(pool.output_dir, 2, timeout=30, pool=pool)}
        assert pool.stop() == 0
    refused = records["own"]
    assert refused["status"] == "failed" and refused["attempts"] == 1, refused
    assert "refused address" in refused["error"] and "loopback" in refused["error"], refused
    assert records["good"]["status"] == "completed"
    assert anywhere.hits("/a.png") == 0


def test_pool_fails_a_redirect_to_cloud_metadata_and_serves_the_next_url(
    pool_factory, redis_client, queue_name, photos
) -> None:
    """Loopback allowed (as for the whole suite), the first hop passes; its redirect does not."""
    with KeepAliveServer() as host:
        bounce = host.redirect("/bounce", "http://169.254.169.254/latest/meta-data/", body=b"<html>moved</html>")
        good = host.add("/good.png", png_of(photos["astronaut"]), headers={"Content-Type": "image/png"})
        push(redis_client, queue_name, url_task("bounce", bounce))
        push(redis_client, queue_name, url_task("good", good))
        pool = pool_factory(workers=1)
        records = {r["request_id"]: r for r in wait_for_records(pool.output_dir, 2, timeout=30, pool=pool)}
        assert pool.stop() == 0
    bounced = records["bounce"]
    assert bounced["status"] == "failed" and bounced["attempts"] == 1, bounced
    assert "refused address" in bounced["error"] and "link-local" in bounced["error"], bounced
    assert records["good"]["status"] == "completed", records["good"]
    assert host.hits("/bounce") == 1 and host.hits("/good.png") == 1


def test_pool_completes_a_same_host_redirect_with_a_body_at_the_first_attempt(
    pool_factory, redis_client, queue_name, photos
) -> None:
    """The bug as producers met it: a kept-alive image host's 302 with an HTML body
    made every attempt fail with a ProtocolError, retried until MAX_ATTEMPTS."""
    with KeepAliveServer() as host:
        host.add("/real.png", png_of(photos["camera"]), headers={"Content-Type": "image/png"})
        moved = host.redirect("/moved.png", "/real.png", body=b"<html><body>302 Found</body></html>\n")
        push(redis_client, queue_name, url_task("moved", moved))
        pool = pool_factory(workers=1, env={"MAX_ATTEMPTS": "2"})  # loopback allowed, as for the whole suite
        (record,) = wait_for_records(pool.output_dir, 1, timeout=30, pool=pool)
        assert pool.stop() == 0
    assert record["status"] == "completed" and record["attempts"] == 1, record
    assert not pool.events("task_retry_scheduled")
    assert [number for _, _, number in host.requests] == [1, 1]


# ---------------------------------------------------------------- numbers in headers


def test_header_numbers_in_other_digits_are_no_numbers_and_no_crash(
    pool_factory, redis_client, queue_name, http_server: HttpServer
) -> None:
    """`Retry-After: ²` and `Content-Length: ²` (str.isdigit() takes them, int()
    does not) used to end as "internal error" records with a traceback. Now a
    header that is not ASCII digits counts as absent: the 503 is an HTTP 503,
    and the image is read to its end (header values are Latin-1 on the wire)."""
    _, png = cv2.imencode(".png", np.full((32, 32, 3), 200, np.uint8))
    routes = {
        "busy-sup": http_server.add("/busy-sup", b"busy", status=503, headers={"Retry-After": "\u00b2"}),
        "busy-sup3": http_server.add("/busy-sup3", b"busy", status=503, headers={"Retry-After": "1\u00b3"}),
        "length-sup": http_server.add("/len-sup.png", png.tobytes(), content_type="image/png",
                                      headers={"Content-Length": "\u00b2"}),
        "length-sup-big": http_server.add("/len-sup-big.png", png.tobytes(), content_type="image/png",
                                          headers={"Content-Length": "9\u00b9"}),
    }
    pool = pool_factory(workers=1, env={"MAX_ATTEMPTS": "1"})
    pool.wait_ready()
    for request_id, url in routes.items():
        push(redis_client, queue_name, {"request_id": request_id, "image_id": request_id, "image_url": url})
    records = {r["request_id"]: r for r in wait_for_records(pool.output_dir, len(routes), timeout=60, pool=pool)}
    assert pool.stop() == 0
    for request_id in ("busy-sup", "busy-sup3"):
        assert records[request_id]["status"] == "failed"
        assert records[request_id]["error"].startswith("gave up after 1 attempts: HTTP 503 from"), records[request_id]
    for request_id in ("length-sup", "length-sup-big"):
        assert records[request_id]["status"] == "completed", records[request_id]
    assert not pool.events("task_crashed")
    assert "Traceback" not in pool.stderr_text()


@pytest.mark.fast
@pytest.mark.parametrize(("value", "number"), [
    ("7", 7), (" 12 ", 12), ("\u00b2", None), ("\uff17", None), ("\u0663", None), ("1.5", None), ("-1", None),
    ("", None), (None, None), ("9" * 20, None), ("1_000", None),
])
def test_header_number_takes_ascii_digits_only(value: str | None, number: int | None) -> None:
    assert url_fetch.header_number(value) == number
