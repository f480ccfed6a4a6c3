"""Download an image over http(s) with every limit a hostile URL needs.

Redirects are followed by hand so that each hop's scheme is checked again;
the body is read in pieces against both a byte cap and an overall deadline,
so neither a huge file nor a server trickling bytes can hold a worker.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from urllib.parse import urljoin, urlsplit

import urllib3

from shared.config import Settings
from shared.images import ImageError

ALLOWED_SCHEMES = ("http", "https")
CHUNK_BYTES = 256 * 1024


class UrlFetcher:
    """One connection pool per worker process, made after fork."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._pool = urllib3.PoolManager(
            num_pools=16,
            retries=False,
            timeout=urllib3.Timeout(connect=settings.url_connect_timeout, read=settings.url_read_timeout),
            headers={"User-Agent": "image-result-worker"},
        )

    def fetch(self, url: str) -> bytes:
        """The body at `url`, or ImageError saying what went wrong."""
        for _ in range(self._settings.url_max_redirects + 1):
            _check_scheme(url)
            self._check_host(url)
            response = self._request(url)
            try:
                if response.status in (301, 302, 303, 307, 308):
                    location = response.headers.get("Location")
                    if not location:
                        raise ImageError(f"HTTP {response.status} redirect without a Location from {_short(url)}")
                    url = urljoin(url, location)
                    continue
                if response.status != 200:
                    raise _status_error(response, url)
                return self._read_body(response, url)
            finally:
                response.release_conn()
        raise ImageError(f"more than URL_MAX_REDIRECTS={self._settings.url_max_redirects} redirects")

    def _check_host(self, url: str) -> None:
        """Refuse hosts outside URL_ALLOWED_HOSTS and link-local addresses (a cloud's
        metadata service lives at 169.254.169.254), for every hop of a redirect."""
        host = (urlsplit(url).hostname or "").lower()
        allowed = self._settings.url_allowed_hosts
        if allowed and host not in allowed:
            raise ImageError(f"host {host!r} is not in URL_ALLOWED_HOSTS")
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
        except (OSError, UnicodeError) as exc:
            # EAI_AGAIN is a DNS server's hiccup; "no such name" will not change.
            transient = getattr(exc, "errno", None) == socket.EAI_AGAIN
            raise ImageError(f"cannot resolve {host!r}: {exc}", transient=transient) from None
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            if getattr(ip, "ipv4_mapped", None):
                ip = ip.ipv4_mapped
            if ip.is_link_local:
                raise ImageError(f"{host!r} resolves to the link-local address {address}, which is refused")

    def _request(self, url: str) -> urllib3.BaseHTTPResponse:
        try:
            return self._pool.request("GET", url, preload_content=False, redirect=False)
        except urllib3.exceptions.LocationValueError as exc:
            raise ImageError(f"image_url is not a valid URL: {_reason(exc)}") from None
        except urllib3.exceptions.HTTPError as exc:
            raise ImageError(f"cannot download {_short(url)}: {_reason(exc)}", transient=True) from None
        except ValueError as exc:
            raise ImageError(f"image_url is not a valid URL: {exc}") from None

    def _read_body(self, response: urllib3.BaseHTTPResponse, url: str) -> bytes:
        limit = self._settings.url_max_bytes
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ImageError(f"{_short(url)} is {declared} bytes; URL_MAX_BYTES is {limit}")
        deadline = time.monotonic() + self._settings.url_read_timeout
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
        except urllib3.exceptions.HTTPError as exc:
            raise ImageError(f"download of {_short(url)} failed: {_reason(exc)}", transient=True) from None
        return bytes(body)


def _status_error(response: urllib3.BaseHTTPResponse, url: str) -> ImageError:
    """5xx, 408 and 429 may pass; any other status will not."""
    status = response.status
    transient = status >= 500 or status in (408, 429)
    retry_after = response.headers.get("Retry-After", "")
    seconds = float(retry_after) if retry_after.strip().isdigit() else None
    return ImageError(f"HTTP {status} from {_short(url)}", transient=transient, retry_after=seconds)


def _check_scheme(url: str) -> None:
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        raise ImageError("image_url is not a valid URL") from None
    if scheme not in ALLOWED_SCHEMES:
        raise ImageError(f"image_url scheme {scheme or '(none)'!r} is not allowed; expected http or https")


def _short(url: str) -> str:
    """The URL without query or credentials, for errors and logs."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return "(unparsable URL)"
    if port:
        host = f"{host}:{port}"
    return f"{parts.scheme}://{host}{parts.path}"[:200]


def _reason(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc.__class__.__name__)[:200]
