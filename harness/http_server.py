"""A loopback HTTP server whose routes the caller fills in: the origin of URL
tasks (photos, 404s, 500s, redirects, bodies that trickle). The pools the
harness starts allow loopback sources (URL_ALLOW_LOOPBACK=true) for it."""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class _Route:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    trickle_chunk: bytes | None = None
    trickle_interval: float = 0.5


class _Handler(BaseHTTPRequestHandler):
    server: HttpServer._Server

    def do_GET(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler naming
        owner = self.server.owner
        owner._record(self.path)
        route = owner._route_for(self.path)
        if route is None:
            self._send(404, b"not found\n", [("Content-Type", "text/plain")])
        elif route.trickle_chunk is not None:
            self._trickle(route)
        else:
            self._send(route.status, route.body, list(route.headers))

    def _send(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _trickle(self, route: _Route) -> None:
        self.send_response(route.status)
        for name, value in route.headers:
            self.send_header(name, value)
        self.end_headers()
        stopping = self.server.owner._stopping
        # Waiting on the stop event rather than sleeping lets shutdown end us at once.
        while not stopping.is_set():
            try:
                self.wfile.write(route.trickle_chunk or b"x")
                self.wfile.flush()
            except OSError:
                return  # the client gave up, which is what a timeout test wants
            stopping.wait(route.trickle_interval)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - inherited name
        pass


class HttpServer:
    """A loopback HTTP server whose routes a test fills in; unknown paths 404."""

    class _Server(ThreadingHTTPServer):
        daemon_threads = True  # a trickling handler must never block interpreter exit
        owner: HttpServer

        def handle_error(self, request: Any, client_address: Any) -> None:
            # Clients that hang up mid-response are the point of several tests.
            if not isinstance(sys.exc_info()[1], OSError):
                super().handle_error(request, client_address)

    def __init__(self) -> None:
        self._routes: dict[str, _Route] = {}
        self._lock = threading.Lock()
        self._requests: list[str] = []
        self._stopping = threading.Event()
        self._server = self._Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="http-server", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> HttpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def add(
        self,
        path: str,
        body: bytes,
        status: int = 200,
        content_type: str = "image/jpeg",
        headers: Mapping[str, str | None] | None = None,
    ) -> str:
        """Serve body at path; a header given as None is left out (e.g. Content-Length)."""
        defaults = {"Content-Type": content_type, "Content-Length": str(len(body))}
        self._set(path, _Route(status, body, _merge_headers(defaults, headers)))
        return self.url(path)

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        self._set(path, _Route(status, b"", (("Location", location), ("Content-Length", "0"))))
        return self.url(path)

    def trickle(
        self,
        path: str,
        chunk: bytes = b"x",
        interval: float = 0.5,
        headers: Mapping[str, str | None] | None = None,
    ) -> str:
        """Send headers, then chunk every interval until the client leaves or we stop."""
        defaults = {"Content-Type": "image/jpeg", "Content-Length": str(10 * 1024 * 1024)}
        route = _Route(200, b"", _merge_headers(defaults, headers), chunk, interval)
        self._set(path, route)
        return self.url(path)

    def hits(self, path: str) -> int:
        """How many GET requests reached path (query string included if given)."""
        with self._lock:
            return sum(1 for seen in self._requests if seen == path or seen.split("?", 1)[0] == path)

    def _set(self, path: str, route: _Route) -> None:
        with self._lock:
            self._routes[path] = route

    def _record(self, path: str) -> None:
        with self._lock:
            self._requests.append(path)

    def _route_for(self, path: str) -> _Route | None:
        with self._lock:
            return self._routes.get(path) or self._routes.get(path.split("?", 1)[0])


def _merge_headers(defaults: Mapping[str, str], overrides: Mapping[str, str | None] | None) -> tuple[tuple[str, str], ...]:
    merged: dict[str, tuple[str, str | None]] = {name.lower(): (name, value) for name, value in defaults.items()}
    for name, value in (overrides or {}).items():
        merged[name.lower()] = (name, value)
    return tuple((name, value) for name, value in merged.values() if value is not None)
