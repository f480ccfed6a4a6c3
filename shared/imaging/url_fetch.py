"""Download an image over http(s) with every limit a hostile URL needs.

    image_url -> parse (urllib3's parser, the only one that names the destination)
      -> scheme, URL_ALLOWED_HOSTS -> resolve the host once -> refusal() on every address,
         and none may be this host's own
      -> connect to a vetted address; Host header, TLS SNI and certificate keep the name
      -> status -> raw body, gzip/deflate undone here, against URL_MAX_BYTES
      -> a redirect's Location goes round again as a new hop, checked the same way
    and all of it, every hop, within one deadline: URL_READ_TIMEOUT in all.

Hazards handled here:
- DNS rebinding: each hop's name is resolved once and the connection goes to an
  address that was checked, never to a second answer from the resolver.
- An address has many spellings (127.1, 2130706433, 0x7f.1, [::ffff:127.0.0.1],
  NAT64, 6to4): the resolver turns every spelling into the address we connect to,
  and refusal() judges IPv6 forms that carry an IPv4 address by that address.
- A service bound to the wildcard address answers on every address of this host,
  not only on 127.0.0.1: the host's own addresses are refused as loopback.
- Two URL parsers can disagree on the host (`http://127.0.0.1\\@example.com/`):
  one parser decides what is checked and where we connect.
- A server can drip a byte at a time, each within any per-read timeout, before
  its headers end, inside a TLS handshake or inside a gzip header that decodes to
  nothing: a watchdog shuts the socket down at the fetch's deadline (_Deadline).
- A decompression bomb (1 GiB of zeros in 1 MiB of gzip): the body is read raw and
  decompressed here in steps no larger than what URL_MAX_BYTES leaves (_Inflater).
- A response whose body is left unread poisons the kept-alive connection for the
  next request on it: it is drained (up to DRAIN_BYTES) or its connection closed.
- Errors are a port scanner's oracle: records say only "cannot connect" or "no HTTP
  response"; which errno it was goes to a DEBUG log line, never into a record.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
import zlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import structlog
import urllib3
from urllib3.util import parse_url

from shared.config import Settings

# Enough for any real length or delay; a longer run of digits is no number a server means.
ASCII_DIGITS = re.compile(r"[0-9]{1,19}")
from shared.imaging.images import ImageError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOWED_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
CHUNK_BYTES = 256 * 1024
# A body we did not want (a redirect's, an error's) is read off a kept-alive
# connection up to this much; a longer one costs a new connection instead.
DRAIN_BYTES = 64 * 1024
# Of a name's vetted addresses, the first this many are tried, so that a name with
# a hundred addresses cannot multiply URL_CONNECT_TIMEOUT by a hundred.
MAX_ADDRESSES = 4
# Images are compressed already: we ask for them as they are. A server that
# compresses anyway with one of these is undone here; any other coding is refused.
ACCEPT_ENCODING = "identity"
GZIP_CODINGS = ("gzip", "x-gzip")
DEFLATE = "deflate"

log = structlog.get_logger()


# ---------------------------------------------------------------- which addresses


LOOPBACK = "loopback"
PRIVATE = "private"
METADATA = "cloud metadata"


def _table(*rows: tuple[str, str | None]) -> tuple[tuple[Any, str | None], ...]:
    return tuple((ipaddress.ip_network(cidr), category) for cidr, category in rows)


# First match wins; None is public. An address in no row: IPv4 public, IPv6 reserved.
_IPV4 = _table(
    ("0.0.0.0/8", "unspecified"),  # a connect to 0.0.0.0 reaches this host (imgproxy's CVE-2025-24354)
    ("127.0.0.0/8", LOOPBACK),
    ("169.254.0.0/16", "link-local"),  # AWS, GCP, Azure, DigitalOcean... metadata at 169.254.169.254
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),  # and the broadcast address 255.255.255.255
    ("100.100.100.200/32", METADATA),  # Alibaba Cloud, inside 100.64/10
    ("192.0.0.192/32", METADATA),  # Oracle Cloud
    ("168.63.129.16/32", METADATA),  # Azure's host endpoint (WireServer): public, never an image host
    ("192.0.0.0/24", "reserved"),  # IETF protocol assignments
    ("10.0.0.0/8", PRIVATE),
    ("172.16.0.0/12", PRIVATE),
    ("192.168.0.0/16", PRIVATE),
    ("100.64.0.0/10", PRIVATE),  # carrier-grade NAT, also used inside clusters and VPNs
    ("198.18.0.0/15", PRIVATE),  # benchmarking; proxies' fake-IP DNS answers live here
    ("192.0.2.0/24", PRIVATE),  # documentation ranges, which labs and sandboxes use
    ("198.51.100.0/24", PRIVATE),
    ("203.0.113.0/24", PRIVATE),
)
_IPV6 = _table(
    ("::/128", "unspecified"),
    ("::1/128", LOOPBACK),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
    ("2001::/32", "Teredo"),  # its IPv4 client address is obfuscated; no image host needs Teredo
    ("64:ff9b:1::/48", "local-use NAT64"),  # where its IPv4 address sits depends on the prefix length
    ("fd00:ec2::254/128", METADATA),  # AWS instance metadata over IPv6
    ("fd00:ec2::23/128", METADATA),  # AWS EKS Pod Identity
    ("fc00::/7", PRIVATE),
    ("fec0::/10", PRIVATE),  # site-local, the deprecated predecessor of fc00::/7
    ("2001:db8::/32", PRIVATE),  # documentation, as 192.0.2.0/24
    ("2000::/3", None),  # global unicast
)
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def refusal(ip: IPAddress, *, allow_loopback: bool, allow_private: bool) -> str | None:
    """Why a connection to `ip` is refused ("a loopback address", ...), or None if it may be made.

    Loopback is refused unless allow_loopback; private networks (RFC 1918, fc00::/7,
    100.64/10) are refused unless allow_private; the rest of the non-public space, cloud
    metadata services included, always. An IPv6 form that carries an IPv4 address is
    judged by that address.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            form, inner = embedded
            reason = refusal(inner, allow_loopback=allow_loopback, allow_private=allow_private)
            return f"{reason} in {form} IPv6 form" if reason else None
    category = _category(ip)
    if category is None or (category == LOOPBACK and allow_loopback) or (category == PRIVATE and allow_private):
        return None
    article = "the" if category == "unspecified" else "an" if category[0] in "aeiou" else "a"
    return f"{article} {category} address"


def _category(ip: IPAddress) -> str | None:
    table = _IPV4 if ip.version == 4 else _IPV6
    for network, category in table:
        if ip in network:
            return category
    return None if ip.version == 4 else "reserved"


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address inside an IPv4-mapped, IPv4-compatible, NAT64 or 6to4 address."""
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # :: and ::1 are IPv6's own
        return "IPv4-compatible", low32
    if ip in _NAT64:
        return "NAT64", low32
    if ip.sixtofour is not None:
        return "6to4", ip.sixtofour
    return None


def _is_this_host(ip: IPAddress) -> bool:
    """Whether a connection to `ip` would stay on this host: one of its own addresses
    (192.0.2.2 on eth0, say), where a service bound to 0.0.0.0 or :: answers too. An
    IPv6 form that carries an IPv4 address is judged by both, as in refusal().

    Asked of the kernel's routing table, which is where a connection would go: a UDP
    socket connect() looks the route up and sends nothing, and for a local destination
    the source it picks is the address itself (or loopback, for a local route added on
    lo). Not bind(): with net.ipv4.ip_nonlocal_bind=1 (keepalived and HAProxy hosts)
    bind takes any address and every host would look like this one. It costs a system
    call or two, less than the resolver before it, so nothing is cached and an address
    added to the host later counts at once.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None and _is_this_host(embedded[1]):
            return True
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((str(ip), 9))
            source = ipaddress.ip_address(probe.getsockname()[0].split("%", 1)[0])
    except OSError:  # no route there: no connection could reach it either
        return False
    if isinstance(source, ipaddress.IPv6Address) and source.ipv4_mapped is not None:
        return source == ip or source.ipv4_mapped.is_loopback  # a dual-stack socket's view of IPv4
    return source == ip or source.is_loopback


# ---------------------------------------------------------------- one deadline a fetch


class _Deadline:
    """URL_READ_TIMEOUT for a whole fetch: resolving, connecting, TLS, request, headers,
    body, every redirect hop.

    A per-read socket timeout cannot do it: a server sending a byte a second satisfies
    any of them, and the reads happen deep in http.client (header lines), ssl (the
    handshake) and decoders, where no check of ours runs between them. So a watchdog
    timer shuts the socket in use down at the deadline (shutdown(), unlike close(),
    is the safe way to end a recv() blocked in another thread): the read under way
    returns at once, wherever it is, and the fetch reports the deadline. The worker is
    single-threaded apart from this timer, which only ever calls shutdown().

    The watchdog holds a dup of the socket's descriptor, so urllib3 closing its own
    can never leave the timer shutting down a number the kernel gave to another file.
    A connection whose socket may have been shut down is closed, never pooled.

    Resolving is the one step the watchdog cannot cut short (getaddrinfo does not
    time out but by resolv.conf's timeout and attempts); its time counts all the same.
    """

    def __init__(self, seconds: float) -> None:
        self._ends = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._watched: socket.socket | None = None
        self._fired = False
        self._stopped = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def left(self) -> float:
        return self._ends - time.monotonic()

    @property
    def passed(self) -> bool:
        return self._fired or time.monotonic() >= self._ends

    def watch(self, sock: socket.socket) -> None:
        """From now on the socket the deadline shuts down is this one."""
        with self._lock:
            self._forget()
            if self._stopped or sock.fileno() < 0:
                return
            self._watched = socket.fromfd(sock.fileno(), sock.family, sock.type)
            if self._fired:
                _shut(self._watched)

    def unwatch(self) -> None:
        """Once this returns the watchdog no longer touches the socket it watched."""
        with self._lock:
            self._forget()

    def stop(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._stopped = True
            self._forget()

    def _fire(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._fired = True
            if self._watched is not None:
                _shut(self._watched)

    def _forget(self) -> None:
        if self._watched is not None:
            self._watched.close()
            self._watched = None


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # not connected (any more): nothing left to cut
        pass


# The fetch under way in this worker, for the connections to hand their sockets to.
_deadline: ContextVar[_Deadline | None] = ContextVar("url_fetch_deadline", default=None)


def _watch(sock: socket.socket) -> None:
    deadline = _deadline.get()
    if deadline is not None:
        deadline.watch(sock)


class _Watched:
    """Hands each socket a request uses to the fetch's deadline: a new one as soon as
    TCP connects (before any TLS handshake), a kept-alive one when a request starts."""

    sock: socket.socket | None

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        _watch(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        if self.sock is not None:
            _watch(self.sock)
        super().request(*args, **kwargs)  # type: ignore[misc]


class _HTTPConnection(_Watched, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_Watched, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


# ---------------------------------------------------------------- content codings


class _Inflater:
    """Undoes a body's gzip or deflate in steps no larger than what URL_MAX_BYTES
    leaves, so a decompression bomb stops at the limit instead of filling memory.

    gzip may come in several members, one after the other (RFC 1952); bytes after a
    complete member that are not another one are ignored, as browsers and urllib3 do.
    deflate is zlib-wrapped by the RFC and raw from some servers: its first two bytes
    tell which.
    """

    def __init__(self, coding: str, url: str) -> None:
        self._coding = coding
        self._url = url
        self._gzip = coding in GZIP_CODINGS
        self._zlib = zlib.decompressobj(31) if self._gzip else None
        self._head = b""  # deflate: bytes held until the first two are in
        self._fed = False  # the current stream (or gzip member) has had bytes
        self._members = 0  # gzip members complete
        self._done = False  # the end of the data: anything after it is ignored

    def inflate(self, data: bytes, room: int) -> bytes:
        """What `data` decompresses to, cut at room + 1 bytes: one more than fits,
        enough for the caller to refuse the body without decompressing the rest."""
        if self._zlib is None:
            self._head += data
            if len(self._head) < 2:
                return b""
            data, self._head = self._head, b""
            zlib_wrapped = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._zlib = zlib.decompressobj(15 if zlib_wrapped else -15)
        out = bytearray()
        while data and not self._done and len(out) <= room:
            self._fed = True
            try:
                # Returns less than the maximum only once every byte of data is used
                # or the stream has ended; a full maximum means the body is too big.
                out += self._zlib.decompress(data, room + 1 - len(out))
            except zlib.error:
                if self._members:
                    self._done = True
                    break
                raise self._corrupt() from None
            if not self._zlib.eof:
                break
            data = self._zlib.unused_data
            if self._gzip:
                self._members += 1
                self._zlib, self._fed = zlib.decompressobj(31), False
            else:
                self._done = True
        return bytes(out)

    def finish(self) -> None:
        """Refuse a body whose compressed data stopped before its end."""
        ended = self._done or (self._zlib is not None and self._zlib.eof) or (self._members > 0 and not self._fed)
        if not ended and (self._fed or self._head):
            raise self._corrupt()

    def _corrupt(self) -> ImageError:
        return ImageError(f"{_short(self._url)} has a corrupt {self._coding} body")


def _inflater(response: urllib3.BaseHTTPResponse, url: str) -> _Inflater | None:
    """What undoes the body's Content-Encoding: None for none, else an _Inflater."""
    header = response.headers.get("Content-Encoding", "")
    codings = [coding.strip().lower() for coding in header.split(",")]
    codings = [coding for coding in codings if coding not in ("", "identity")]
    if not codings:
        return None
    if len(codings) == 1 and (codings[0] in GZIP_CODINGS or codings[0] == DEFLATE):
        return _Inflater(codings[0], url)
    # br, zstd, compress, or gzip twice over: asked for identity, the server will not change.
    raise ImageError(f"{_short(url)} came with Content-Encoding {header.strip()[:60]!r}; only gzip and deflate are undone")


# ---------------------------------------------------------------- one hop


@dataclass(frozen=True, slots=True)
class _Hop:
    """One request of a fetch: where it goes and what it says."""

    url: str
    scheme: str
    name: str  # the host as resolved, for SNI and the certificate: "example.com", "::1"
    port: int
    target: str  # path and query, percent-encoded
    host_header: str
    addresses: tuple[IPAddress, ...]  # every one vetted


class UrlFetcher:
    """One pool of connections per worker process, made after fork; connections are
    kept per (scheme, vetted address, port, and for https the host name)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._pools = urllib3.PoolManager(num_pools=16, retries=False)
        # Our connection classes, so that each socket is handed to the fetch's deadline.
        self._pools.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}

    def fetch(self, url: str) -> bytes:
        """The body at `url`, or ImageError saying what went wrong."""
        deadline = _Deadline(self._settings.url_read_timeout)
        token = _deadline.set(deadline)
        try:
            return self._follow(url, deadline)
        finally:
            _deadline.reset(token)
            deadline.stop()

    def _follow(self, url: str, deadline: _Deadline) -> bytes:
        for _ in range(self._settings.url_max_redirects + 1):
            hop = self._plan(url)
            response = self._request(hop, deadline)
            try:
                if response.status in REDIRECT_STATUSES:
                    location = response.headers.get("Location")
                    if not location:
                        raise ImageError(f"HTTP {response.status} redirect without a Location from {_short(url)}")
                    url = urljoin(url, location)
                    continue
                if response.status != 200:
                    raise _status_error(response, url)
                return self._read_body(response, url, deadline)
            finally:
                _release(response, deadline)
        raise ImageError(f"more than URL_MAX_REDIRECTS={self._settings.url_max_redirects} redirects")

    def _plan(self, url: str) -> _Hop:
        """Parse, check the scheme and URL_ALLOWED_HOSTS, resolve once, vet every address."""
        try:
            parts = parse_url(url)
        except ValueError:
            raise ImageError("image_url is not a valid URL") from None
        scheme = parts.scheme or ""
        if scheme not in ALLOWED_SCHEMES:
            raise ImageError(f"image_url scheme {scheme or '(none)'!r} is not allowed; expected http or https")
        if not parts.host:
            raise ImageError(f"image_url {_short(url)} has no host")
        name = parts.host.strip("[]")
        allowed = self._settings.url_allowed_hosts
        if allowed and name not in allowed and parts.host not in allowed:
            raise ImageError(f"host {name!r} is not in URL_ALLOWED_HOSTS")
        port = DEFAULT_PORTS[scheme] if parts.port is None else parts.port
        addresses = self._vetted_addresses(name, port, url)
        host_header = parts.host if parts.port is None else f"{parts.host}:{parts.port}"
        return _Hop(url, scheme, name, port, parts.request_uri, host_header, addresses)

    def _vetted_addresses(self, name: str, port: int, url: str) -> tuple[IPAddress, ...]:
        """Every address `name` resolves to, once; any refused one refuses the host,
        since a resolver's order is no promise of which one a client uses."""
        try:
            infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            # EAI_AGAIN is a DNS server's hiccup; "no such name" will not change.
            transient = getattr(exc, "errno", None) == socket.EAI_AGAIN
            raise ImageError(f"cannot resolve {name!r}: {exc}", transient=transient) from None
        addresses = tuple(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos))
        if not addresses:
            raise ImageError(f"cannot resolve {name!r}: no address", transient=True)
        for address in addresses:
            reason = refusal(
                address,
                allow_loopback=self._settings.url_allow_loopback,
                allow_private=self._settings.url_allow_private,
            )
            if reason is None and not self._settings.url_allow_loopback and _is_this_host(address):
                reason = "an address of this host (refused as loopback)"
            if reason is not None:
                log.debug("url_address_refused", url=_short(url), address=str(address), reason=reason)
                raise ImageError(f"refused address: {_short(url)} resolves to {reason}")
        return addresses

    def _request(self, hop: _Hop, deadline: _Deadline) -> urllib3.BaseHTTPResponse:
        """Send the request to the first vetted address that takes a connection."""
        headers = {"Host": hop.host_header, "User-Agent": "image-result-worker", "Accept-Encoding": ACCEPT_ENCODING}
        # The name travels only as SNI and for the certificate; the socket gets the address.
        tls = {"server_hostname": hop.name, "assert_hostname": hop.name} if hop.scheme == "https" else None
        for address in hop.addresses[:MAX_ADDRESSES]:
            left = deadline.left()
            if left <= 0:
                raise self._took_too_long(hop.url)
            # The watchdog ends any read at the deadline; these make the socket's own
            # timeouts agree, and bound a connect(), which has no socket to shut yet.
            timeout = urllib3.Timeout(connect=min(self._settings.url_connect_timeout, left), read=left)
            pool = self._pools.connection_from_host(str(address), hop.port, hop.scheme, pool_kwargs=tls)
            try:
                return pool.urlopen(
                    "GET", hop.target, headers=headers, retries=False, redirect=False,
                    preload_content=False, assert_same_host=False, timeout=timeout,
                )
            except urllib3.exceptions.ConnectTimeoutError as exc:  # refused, unreachable, timed out alike
                log.debug("url_connect_failed", url=_short(hop.url), address=str(address), port=hop.port,
                          error=_reason(exc))
                if deadline.passed:
                    raise self._took_too_long(hop.url) from None
            except urllib3.exceptions.SSLError as exc:
                log.debug("url_tls_failed", url=_short(hop.url), address=str(address), error=_reason(exc))
                if deadline.passed:
                    raise self._took_too_long(hop.url) from None
                raise ImageError(f"TLS with the image host failed for {_short(hop.url)}", transient=True) from None
            except urllib3.exceptions.HTTPError as exc:  # reset, closed, timed out or garbage before a status line
                log.debug("url_no_response", url=_short(hop.url), address=str(address), error=_reason(exc))
                if deadline.passed:
                    raise self._took_too_long(hop.url) from None
                raise ImageError(f"no HTTP response from the image host for {_short(hop.url)}", transient=True) from None
            except ValueError as exc:  # http.client's InvalidURL and kin
                raise ImageError(f"image_url is not a valid URL: {exc}") from None
        raise ImageError(f"cannot connect to the image host for {_short(hop.url)}", transient=True)

    def _read_body(self, response: urllib3.BaseHTTPResponse, url: str, deadline: _Deadline) -> bytes:
        """The body, decompressed if it came gzip or deflate, at most URL_MAX_BYTES of it."""
        limit = self._settings.url_max_bytes
        declared = header_number(response.headers.get("Content-Length"))
        if declared is not None and declared > limit:
            raise ImageError(f"{_short(url)} is {declared} bytes; URL_MAX_BYTES is {limit}")
        inflater = _inflater(response, url)
        body = bytearray()
        received = 0
        try:
            # Raw bytes always: urllib3's decoding would read on while a decoder yields
            # nothing, and it cannot be mixed with the raw reads that drain a connection.
            while chunk := response.read1(CHUNK_BYTES, decode_content=False):
                received += len(chunk)
                body += chunk if inflater is None else inflater.inflate(chunk, limit - len(body))
                if received > limit or len(body) > limit:
                    once = "" if inflater is None or received > limit else " once decompressed"
                    raise ImageError(f"{_short(url)} is larger than URL_MAX_BYTES={limit}{once}")
                if deadline.passed:
                    break
        except urllib3.exceptions.HTTPError as exc:  # a read timeout, or the connection cut
            log.debug("url_download_cut", url=_short(url), error=_reason(exc))
            if deadline.passed or isinstance(exc, urllib3.exceptions.ReadTimeoutError):
                raise self._took_too_long(url) from None
            raise ImageError(f"download of {_short(url)} was cut off", transient=True) from None
        # A body without a length ends where the connection does, as it does when the
        # watchdog shuts it down: past the deadline no end is trusted.
        if deadline.passed:
            raise self._took_too_long(url)
        if inflater is not None:
            inflater.finish()
        return bytes(body)

    def _took_too_long(self, url: str) -> ImageError:
        return ImageError(
            f"{_short(url)} took longer than URL_READ_TIMEOUT={self._settings.url_read_timeout:g}s", transient=True
        )


def _release(response: urllib3.BaseHTTPResponse, deadline: _Deadline) -> None:
    """Hand the connection back ready for its next request, or closed.

    A kept-alive connection still holding part of a body would feed it to the next
    request on it as its response, so what is left is read off first, if it is small.
    One whose socket the deadline may have shut down is closed.
    """
    drained = _drain(response, deadline)
    deadline.unwatch()  # from here the watchdog cannot touch it; before, it may have
    if not drained or deadline.passed:
        # Closes the connection; the pool opens a new one when it needs one. (A body
        # read to its end has already gone back to the pool; if the deadline shut its
        # socket just after, urllib3's check of a pooled connection sees it dropped.)
        response.close()
    response.release_conn()


def _drain(response: urllib3.BaseHTTPResponse, deadline: _Deadline) -> bool:
    """Read off what is left of the body if it is small; whether it all was."""
    remaining = getattr(response, "length_remaining", None)
    if remaining is not None and remaining > DRAIN_BYTES:
        return False
    drained = 0
    try:
        while drained <= DRAIN_BYTES and not deadline.passed:
            chunk = response.read1(DRAIN_BYTES, decode_content=False)
            if not chunk:
                return True
            drained += len(chunk)
    except urllib3.exceptions.HTTPError:
        pass
    return False


def _status_error(response: urllib3.BaseHTTPResponse, url: str) -> ImageError:
    """5xx, 408 and 429 may pass; any other status will not."""
    status = response.status
    transient = status >= 500 or status in (408, 429)
    seconds = header_number(response.headers.get("Retry-After"))
    return ImageError(f"HTTP {status} from {_short(url)}", transient=transient, retry_after=seconds)


def header_number(value: str | None) -> int | None:
    """A header's 1*DIGIT (RFC 9110), or None. ASCII digits only: str.isdigit()
    also takes "²" and "١", which int() then refuses or reads as another number."""
    if value is None or not ASCII_DIGITS.fullmatch(value.strip(" \t")):
        return None
    return int(value)


def _short(url: str) -> str:
    """The URL without query or credentials, for errors and logs, as urllib3 parses it."""
    try:
        parts = parse_url(url)
    except ValueError:
        return "(unparsable URL)"
    host = parts.host or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path or ''}"[:200]


def _reason(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc)[:300]
