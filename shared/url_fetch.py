"""Download an image over http(s) with every limit a hostile URL needs.

    image_url -> parse (urllib3's parser, the only one that names the destination)
      -> scheme, URL_ALLOWED_HOSTS -> resolve the host once -> refusal() on every address
      -> connect to a vetted address; Host header, TLS SNI and certificate keep the name
      -> status -> body against URL_MAX_BYTES and a deadline
      -> a redirect's Location goes round again as a new hop, checked the same way

Hazards handled here:
- DNS rebinding: each hop's name is resolved once and the connection goes to an
  address that was checked, never to a second answer from the resolver.
- An address has many spellings (127.1, 2130706433, 0x7f.1, [::ffff:127.0.0.1],
  NAT64, 6to4): the resolver turns every spelling into the address we connect to,
  and refusal() judges IPv6 forms that carry an IPv4 address by that address.
- Two URL parsers can disagree on the host (`http://127.0.0.1\\@example.com/`):
  one parser decides what is checked and where we connect.
- A response whose body is left unread poisons the kept-alive connection for the
  next request on it: it is drained (up to DRAIN_BYTES) or its connection closed.
- Errors are a port scanner's oracle: records say only "cannot connect" or "no HTTP
  response"; which errno it was goes to a DEBUG log line, never into a record.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import structlog
import urllib3
from urllib3.util import parse_url

from shared.config import Settings
from shared.images import ImageError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOWED_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
CHUNK_BYTES = 256 * 1024
# A body we did not want (a redirect's, an error's) is read off a kept-alive
# connection up to this much; a longer one costs a new connection instead.
DRAIN_BYTES = 64 * 1024

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
        self._pools = urllib3.PoolManager(
            num_pools=16,
            retries=False,
            timeout=urllib3.Timeout(connect=settings.url_connect_timeout, read=settings.url_read_timeout),
        )

    def fetch(self, url: str) -> bytes:
        """The body at `url`, or ImageError saying what went wrong."""
        for _ in range(self._settings.url_max_redirects + 1):
            hop = self._plan(url)
            response = self._request(hop)
            deadline = time.monotonic() + self._settings.url_read_timeout
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
            if reason is not None:
                log.debug("url_address_refused", url=_short(url), address=str(address), reason=reason)
                raise ImageError(f"refused address: {_short(url)} resolves to {reason}")
        return addresses

    def _request(self, hop: _Hop) -> urllib3.BaseHTTPResponse:
        """Send the request to the first vetted address that takes a connection."""
        headers = {"Host": hop.host_header, "User-Agent": "image-result-worker"}
        # The name travels only as SNI and for the certificate; the socket gets the address.
        tls = {"server_hostname": hop.name, "assert_hostname": hop.name} if hop.scheme == "https" else None
        for address in hop.addresses:
            pool = self._pools.connection_from_host(str(address), hop.port, hop.scheme, pool_kwargs=tls)
            try:
                return pool.urlopen(
                    "GET", hop.target, headers=headers, retries=False, redirect=False,
                    preload_content=False, assert_same_host=False,
                )
            except urllib3.exceptions.ConnectTimeoutError as exc:  # refused, unreachable, timed out alike
                log.debug("url_connect_failed", url=_short(hop.url), address=str(address), port=hop.port,
                          error=_reason(exc))
            except urllib3.exceptions.SSLError as exc:
                log.debug("url_tls_failed", url=_short(hop.url), address=str(address), error=_reason(exc))
                raise ImageError(f"TLS with the image host failed for {_short(hop.url)}", transient=True) from None
            except urllib3.exceptions.HTTPError as exc:  # reset, closed, timed out or garbage before a status line
                log.debug("url_no_response", url=_short(hop.url), address=str(address), error=_reason(exc))
                raise ImageError(f"no HTTP response from the image host for {_short(hop.url)}", transient=True) from None
            except ValueError as exc:  # http.client's InvalidURL and kin
                raise ImageError(f"image_url is not a valid URL: {exc}") from None
        raise ImageError(f"cannot connect to the image host for {_short(hop.url)}", transient=True)

    def _read_body(self, response: urllib3.BaseHTTPResponse, url: str, deadline: float) -> bytes:
        limit = self._settings.url_max_bytes
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ImageError(f"{_short(url)} is {declared} bytes; URL_MAX_BYTES is {limit}")
        body = bytearray()
        try:
            while chunk := response.read1(CHUNK_BYTES):
                body += chunk
                if len(body) > limit:
                    raise ImageError(f"{_short(url)} is larger than URL_MAX_BYTES={limit}")
                if time.monotonic() > deadline:
                    raise ImageError(
                        f"{_short(url)} took longer than URL_READ_TIMEOUT={self._settings.url_read_timeout:g}s",
                        transient=True,
                    )
        except urllib3.exceptions.ReadTimeoutError:
            raise ImageError(
                f"download of {_short(url)} timed out (URL_READ_TIMEOUT={self._settings.url_read_timeout:g}s)",
                transient=True,
            ) from None
        except urllib3.exceptions.HTTPError as exc:
            log.debug("url_download_cut", url=_short(url), error=_reason(exc))
            raise ImageError(f"download of {_short(url)} was cut off", transient=True) from None
        return bytes(body)


def _release(response: urllib3.BaseHTTPResponse, deadline: float) -> None:
    """Hand the connection back ready for its next request, or closed.

    A kept-alive connection still holding part of a body would feed it to the next
    request on it as its response, so what is left is read off first, if it is small.
    """
    remaining = getattr(response, "length_remaining", None)
    if remaining is None or remaining <= DRAIN_BYTES:
        drained = 0
        try:
            while drained <= DRAIN_BYTES and time.monotonic() < deadline:
                chunk = response.read1(DRAIN_BYTES, decode_content=False)
                if not chunk:
                    response.release_conn()
                    return
                drained += len(chunk)
        except urllib3.exceptions.HTTPError:
            pass
    response.close()  # closes the connection; the pool opens a new one when it needs one
    response.release_conn()


def _status_error(response: urllib3.BaseHTTPResponse, url: str) -> ImageError:
    """5xx, 408 and 429 may pass; any other status will not."""
    status = response.status
    transient = status >= 500 or status in (408, 429)
    retry_after = response.headers.get("Retry-After", "")
    seconds = float(retry_after) if retry_after.strip().isdigit() else None
    return ImageError(f"HTTP {status} from {_short(url)}", transient=transient, retry_after=seconds)


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
