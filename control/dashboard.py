"""The web dashboard: `python supervisor.py dashboard [--port N] [--address A]`.

    browser --GET /, /static/*--> the page and its script (from this package, no CDN)
    browser --GET /api/overview every 2 s--> Overview (control/dashboard_data.py):
        one cached read of Redis per second, shared by every client
    browser --GET /api/task?id=--> control.lookup.find_task, with a budget
    browser --GET /thumb?name=--> a small JPEG of a file a record names, from OUTPUT_DIR
    browser --POST /api/dead/{requeue,requeue-all,purge}, /api/unlock--> with the token

A process of its own, apart from the pool: it reads Redis (and OUTPUT_DIR, where
it is local) from any host that reaches them, and the pool never waits on it.

Why no web framework: the dashboard serves four fixed files, a few JSON
answers and thumbnails to a few operators; routing is a dict. What it needs
beyond that (a deadline per connection, caps on connections and on request
size, surviving a flood) is control/http_base.py's, shared with METRICS_PORT;
a framework would add a dependency and its own defaults to audit. The base
reads each request whole in one I/O thread, then one of HANDLER_THREADS
answers it here: a blocking Redis read or a thumbnail decode takes a thread,
an idle or slow client never does.

Changes (requeue, purge) need DASHBOARD_TOKEN: unset, the dashboard is
read-only and its buttons say so. Against cross-site requests (CSRF):
- the token is not a cookie: the page's script sends it in a header
  (X-Dashboard-Token) from what the operator typed, so a page of another site
  can neither read it nor make the browser attach it;
- a cross-origin request with that header needs a CORS preflight, which is
  never granted (no Access-Control-Allow-* header is ever sent);
- a POST must carry an Origin naming this very host and port, no
  Sec-Fetch-Site other than same-origin, and Content-Type application/json
  (which an HTML form cannot send).
Against DNS rebinding, when bound to a loopback address only a loopback Host
header is served. Everything shown comes from Redis, where producers write: the
page's script builds the DOM with textContent only, and a strict
Content-Security-Policy (no inline script, no eval, nothing from elsewhere)
stops whatever might slip through.

Hazards handled here:
- Clients that send nothing, trickle their request, never read the reply,
  come by the thousand or send too much: the base's (control/http_base.py).
- A thumbnail is served only for a file a record sent to a page names, by
  its bare name, opened in OUTPUT_DIR without following a symlink: a name
  cannot reach outside OUTPUT_DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import ipaddress
import json
import os
import signal
import stat
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import redis
import structlog

from control import dashboard_data
from control.dashboard_data import ActionResult, Overview
from control.http_base import LIMITS, HardenedHTTPServer, Limits, Request, Response
from control.lookup import DASHBOARD_BUDGET, find_task
from image_result_client.protocol import QueueKeys
from image_result_client.terminal import printable
from shared import exitcodes
from shared.cli import OneLineParser, complain
from shared.config import ConfigError, Settings
from shared.logs import configure_logging
from shared.state.pool_registry import PoolRegistry
from shared.state.reading import json_object
from shared.state.redis_queue import REDIS_ERRORS, connect

# Threads that answer requests the base has read whole: Redis reads, searches
# (SEARCHES_AT_ONCE of them) and thumbnails; more requests wait their turn
# within their deadline.
HANDLER_THREADS = 8
SERVER_NAME = "image-result-dashboard"
# Redis answers a dashboard read in a millisecond; one that takes seconds means an outage.
REDIS_TIMEOUT = 3.0
SEARCHES_AT_ONCE = 2
THUMB_SIZE = 160
THUMB_MAX_FILE_BYTES = 64 << 20
THUMBS_CACHED = 256
# Thumbnails made per second at most, after a burst of THUMB_BURST: decoding a
# 3840x2160 JPEG takes a core about 7 ms even at 1/8 scale, and a pool that
# finishes 80 of them a second would have the dashboard decode 80 a second.
# Made at that rate on the pool's host, they cost it a third of its images/s
# (make bench --dashboard-clients 20); at this one, nothing measurable. A
# thumbnail over budget is a 503; the page asks again at its next refresh.
THUMBS_PER_SECOND = 1.0
THUMB_BURST = 3
TOKEN_HEADER = "X-Dashboard-Token"
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/favicon.ico": ("favicon.svg", "image/svg+xml"),
}
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
)

log = structlog.get_logger()


class Refused(Exception):
    """A request the dashboard will not serve; the status and a reason for the page."""

    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# -- decisions (pure, tested in milliseconds) -----------------------------------------


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host_header: str | None, *, bound_to_loopback: bool) -> None:
    """Bound to loopback, serve only requests addressed to a loopback name: a
    page of another site that rebinds its own name to 127.0.0.1 still sends
    its own name as Host."""
    if not bound_to_loopback:
        return
    host = (host_header or "").strip()
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if not is_loopback(name):
        raise Refused(HTTPStatus.MISDIRECTED_REQUEST, "this dashboard answers only to a loopback host name")


def authorize_change(headers: dict[str, str], *, token: str | None) -> None:
    """Whether a POST that changes the queue may go ahead; `headers` has
    lower-case names. Raises Refused with the reason."""
    if token is None:
        raise Refused(HTTPStatus.FORBIDDEN, "read-only: DASHBOARD_TOKEN is not set where the dashboard runs")
    host = headers.get("host", "")
    origin = headers.get("origin")
    if origin is None:
        raise Refused(HTTPStatus.FORBIDDEN, "refused: a change needs an Origin header (send it as a browser does)")
    if not host or origin != f"http://{host}":
        raise Refused(HTTPStatus.FORBIDDEN, "refused: the request comes from another site (Origin is not this host)")
    if headers.get("sec-fetch-site", "same-origin") != "same-origin":
        raise Refused(HTTPStatus.FORBIDDEN, "refused: the request comes from another site (Sec-Fetch-Site)")
    if headers.get("content-type", "").split(";", 1)[0].strip().lower() != "application/json":
        raise Refused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "refused: a change is sent as application/json")
    given = headers.get(TOKEN_HEADER.lower())
    if given is None:
        raise Refused(HTTPStatus.FORBIDDEN, "refused: enter the token to make changes")
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise Refused(HTTPStatus.FORBIDDEN, "refused: wrong token")


def thumbnail_name(raw: str | None) -> str:
    """A bare file name: no directory, not hidden, nothing a path could use."""
    name = raw or ""
    if not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise Refused(HTTPStatus.NOT_FOUND, "no such thumbnail")
    return name


# -- thumbnails -------------------------------------------------------------------------


class Thumbnails:
    """Small JPEGs of the records' files, made once each (a decode at 1/8
    scale, then a resize) and kept in a bounded cache."""

    def __init__(self, output_dir: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.output_dir = output_dir
        self._cache: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._clock = clock
        self._budget = float(THUMB_BURST)  # decodes allowed now (a token bucket)
        self._budget_at = clock()

    def get(self, name: str) -> bytes:
        fd, identity = self._open(name)
        try:
            with self._lock:
                if identity in self._cache:
                    self._cache.move_to_end(identity)
                    return self._cache[identity]
                if not self._spend():
                    raise Refused(HTTPStatus.SERVICE_UNAVAILABLE, "thumbnails are being made; ask again")
            with os.fdopen(fd, "rb", closefd=False) as file:
                data = file.read(THUMB_MAX_FILE_BYTES + 1)
        finally:
            os.close(fd)
        thumb = _shrink(data)
        with self._lock:
            self._cache[identity] = thumb
            while len(self._cache) > THUMBS_CACHED:
                self._cache.popitem(last=False)
        return thumb

    def _spend(self) -> bool:
        """Take one decode from the budget, if there is one (under the lock)."""
        now = self._clock()
        self._budget = min(float(THUMB_BURST), self._budget + (now - self._budget_at) * THUMBS_PER_SECOND)
        self._budget_at = now
        if self._budget < 1.0:
            return False
        self._budget -= 1.0
        return True

    def _open(self, name: str) -> tuple[int, tuple[str, int, int]]:
        """A descriptor on the file and what identifies its content; the file is
        read only when a thumbnail is to be made of it."""
        try:
            dir_fd = os.open(self.output_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise Refused(HTTPStatus.NOT_FOUND, "OUTPUT_DIR is not readable here") from None
        try:
            # Relative to OUTPUT_DIR, one component, no symlink followed: nothing outside it.
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:
            raise Refused(HTTPStatus.NOT_FOUND, "no such file in OUTPUT_DIR") from None
        finally:
            os.close(dir_fd)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > THUMB_MAX_FILE_BYTES:
            os.close(fd)
            raise Refused(HTTPStatus.NOT_FOUND, "not a file a thumbnail is made of")
        return fd, (name, info.st_ino, info.st_mtime_ns)


def _shrink(data: bytes) -> bytes:
    import cv2
    import numpy as np

    from shared.imaging.images import ImageError, decodable

    # The worker's gate: a file in OUTPUT_DIR is not necessarily the pool's
    # JPEG, and no other decoder (TIFF, JPEG 2000, GIF, ...) may see it.
    try:
        _, data = decodable(data)
    except ImageError as exc:
        raise Refused(HTTPStatus.NOT_FOUND, f"not an image a thumbnail is made of: {exc}") from None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_8)
    if image is None:
        raise Refused(HTTPStatus.NOT_FOUND, "not an image")
    height, width = image.shape[:2]
    scale = THUMB_SIZE / max(height, width)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 75])
    if not ok:
        raise Refused(HTTPStatus.NOT_FOUND, "not an image")
    return encoded.tobytes()


# -- the server --------------------------------------------------------------------------


class Dashboard:
    """What the request handlers share: settings, Redis, the cached overview."""

    def __init__(self, settings: Settings, client: redis.Redis, *, bound_to_loopback: bool) -> None:
        self.settings = settings
        self.client = client
        self.registry = PoolRegistry(client, QueueKeys(settings.queue))
        self.overview = Overview(client, settings)
        self.thumbnails = Thumbnails(settings.output_dir)
        self.bound_to_loopback = bound_to_loopback
        self.searches = threading.BoundedSemaphore(SEARCHES_AT_ONCE)
        self.changes = threading.Lock()  # one change at a time: requeue-all and purge do not interleave
        self.assets = {path: (_asset(name), kind) for path, (name, kind) in STATIC.items()}


def _asset(name: str) -> bytes:
    return resources.files("control").joinpath("dashboard_static", name).read_bytes()


class DashboardServer(HardenedHTTPServer):
    """The dashboard's routes on the hardened base (control/http_base.py): the
    base reads each request whole, within its limits, and a few handler
    threads answer it here (a Redis read, a search, a thumbnail)."""

    name = "dashboard-http"

    def __init__(self, address: tuple[str, int], dashboard: Dashboard, *, limits: Limits = LIMITS) -> None:
        super().__init__(address=address[0], port=address[1], limits=limits, handler_threads=HANDLER_THREADS)
        self.dashboard = dashboard

    def refusal(self, status: HTTPStatus, reason: str) -> Response:
        return _answer(status, "application/json", _json({"error": reason}))

    def respond(self, request: Request) -> Response:
        route = {"GET": self._get, "HEAD": self._get, "POST": self._post}.get(request.method)
        if route is None:  # a CORS preflight's OPTIONS among them: never granted
            return self.refusal(HTTPStatus.NOT_IMPLEMENTED, f"Unsupported method ({request.method!r})")
        try:
            check_host(request.headers.get("Host"), bound_to_loopback=self.dashboard.bound_to_loopback)
            status, kind, body = route(request)
        except Refused as refused:
            status, kind, body = refused.status, "application/json", _json({"error": refused.reason})
        except REDIS_ERRORS as exc:
            reason = printable(f"Redis at {self.dashboard.settings.redacted_redis_url()} is unreachable: {exc}")
            status, kind, body = HTTPStatus.SERVICE_UNAVAILABLE, "application/json", _json({"error": reason})
        except Exception as exc:  # noqa: BLE001 - a bug of ours: a 500 and a log line, the server goes on
            log.exception("dashboard_request_failed", path=request.target[:200])
            status, kind, body = HTTPStatus.INTERNAL_SERVER_ERROR, "application/json", _json({"error": repr(exc)})
        return _answer(status, kind, body)

    def _get(self, request: Request) -> tuple[HTTPStatus, str, bytes]:
        url = urlsplit(request.target)
        try:
            query = parse_qs(url.query, max_num_fields=4)
        except ValueError:
            raise Refused(HTTPStatus.BAD_REQUEST, "too many query fields") from None
        if url.path in self.dashboard.assets:
            body, kind = self.dashboard.assets[url.path]
            return HTTPStatus.OK, kind, body
        if url.path == "/api/overview":
            return HTTPStatus.OK, "application/json", self.dashboard.overview.get()
        if url.path == "/api/task":
            return HTTPStatus.OK, "application/json", self._search(query.get("id", [""])[0])
        if url.path == "/thumb":
            name = thumbnail_name(query.get("name", [""])[0])
            if not self.dashboard.overview.thumbnail_allowed(name):
                raise Refused(HTTPStatus.NOT_FOUND, "no record names this file")
            return HTTPStatus.OK, "image/jpeg", self.dashboard.thumbnails.get(name)
        raise Refused(HTTPStatus.NOT_FOUND, "no such page")

    def _search(self, wanted: str) -> bytes:
        wanted = wanted.strip()
        if not wanted or len(wanted) > 512:
            raise Refused(HTTPStatus.BAD_REQUEST, "give a request id (1..512 characters)")
        if not self.dashboard.searches.acquire(blocking=False):
            raise Refused(HTTPStatus.TOO_MANY_REQUESTS, "other searches are running; try again in a moment")
        try:
            search = find_task(self.dashboard.client, self.dashboard.settings, wanted, budget=DASHBOARD_BUDGET)
        finally:
            self.dashboard.searches.release()
        return _json(search.as_json())

    def _post(self, request: Request) -> tuple[HTTPStatus, str, bytes]:
        # The base has read the body whole (Content-Length, within its limit; chunked is refused).
        raw_body = request.body or b"{}"
        path = urlsplit(request.target).path
        actions = {
            "/api/unlock": self._unlock,
            "/api/dead/requeue": self._requeue,
            "/api/dead/requeue-all": self._requeue_all,
            "/api/dead/purge": self._purge,
        }
        if path not in actions:
            raise Refused(HTTPStatus.NOT_FOUND, "no such action")
        headers = {name.lower(): value for name, value in request.headers.items()}
        try:
            authorize_change(headers, token=self.dashboard.settings.dashboard_token)
        except Refused as refused:
            log.warning("dashboard_change_refused", action=path, reason=refused.reason, client=request.client)
            raise
        body = json_object(raw_body)
        if body is None:
            raise Refused(HTTPStatus.BAD_REQUEST, "the body is not a JSON object")
        with self.dashboard.changes:
            result = actions[path](body)
        if path != "/api/unlock":
            log.info("dashboard_change", action=path, outcome=result.message, client=request.client)
        return HTTPStatus.OK, "application/json", _json(result.as_json())

    def _unlock(self, body: dict) -> ActionResult:
        return ActionResult(True, "token accepted")

    def _requeue(self, body: dict) -> ActionResult:
        letter_id = body.get("id")
        if not isinstance(letter_id, str) or len(letter_id) != 40:
            raise Refused(HTTPStatus.BAD_REQUEST, "name the dead letter by its id")
        return dashboard_data.requeue_dead_letter(self.dashboard.registry, letter_id)

    def _requeue_all(self, body: dict) -> ActionResult:
        return dashboard_data.requeue_all_dead_letters(self.dashboard.registry)

    def _purge(self, body: dict) -> ActionResult:
        return dashboard_data.purge_dead_letters(self.dashboard.registry)


def _answer(status: HTTPStatus, kind: str, body: bytes) -> Response:
    headers = (("Server", SERVER_NAME), ("Date", formatdate(usegmt=True)), *SECURITY_HEADERS)
    return Response(status, kind, body, headers)


def _json(value: object) -> bytes:
    return json.dumps(value, default=str).encode()


# -- the command ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="supervisor.py dashboard", description="Serve the web dashboard.")
    parser.add_argument("--port", type=int, metavar="N", help="port to listen on (default: DASHBOARD_PORT, 8090)")
    parser.add_argument(
        "--address", metavar="A", help="address to listen on (default: DASHBOARD_ADDRESS, 127.0.0.1)"
    )
    return parser


def make_server(settings: Settings, *, address: str, port: int, limits: Limits = LIMITS) -> DashboardServer:
    client = connect(settings)
    # A dashboard read is one round trip: do not let an outage hold a page for the pool's 10 s.
    client.connection_pool.connection_kwargs.update(socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT)
    dashboard = Dashboard(settings, client, bound_to_loopback=is_loopback(address))
    return DashboardServer((address, port), dashboard, limits=limits)


def yield_the_cpu() -> None:
    """Run only on CPU the pool leaves idle. On the pool's host every cycle the
    dashboard takes (JSON for its clients, thumbnails decoded from 4K JPEGs) is a
    cycle an encoding worker does not get: with 20 watchers and normal priority
    the pool lost a third to a half of its images/s (make bench
    --dashboard-clients 20). SCHED_IDLE runs it only when a core is idle; under
    load its page lags by what the pool needs, and the pool does not slow."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or refused: be as nice as allowed
        with contextlib.suppress(OSError):
            os.nice(19)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv[1:] if argv and argv[0] == "dashboard" else argv)
    environ = dict(os.environ)
    if args.port:  # 0: any free port (tests); the log line says which
        environ["DASHBOARD_PORT"] = str(args.port)
    if args.address is not None:
        environ["DASHBOARD_ADDRESS"] = args.address
    try:
        settings = Settings.from_env(environ)
    except ConfigError as exc:
        complain(str(exc).replace("DASHBOARD_PORT", "--port/DASHBOARD_PORT"))
        return exitcodes.CONFIG_ERROR
    configure_logging(settings, role="dashboard")
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(settings.max_pixels))  # before thumbnails load OpenCV
    yield_the_cpu()
    port = settings.dashboard_port if args.port != 0 else 0
    try:
        server = make_server(settings, address=settings.dashboard_address, port=port)
    except OSError as exc:
        # In use by another program, an address not of this host, a port below
        # 1024: settings to correct, as for METRICS_PORT (exit 2, no restart loop).
        complain(
            f"--port/DASHBOARD_PORT={port} on --address/DASHBOARD_ADDRESS={settings.dashboard_address!r}"
            f" cannot be listened on: {os.strerror(exc.errno) if exc.errno else exc}"
        )
        return exitcodes.CONFIG_ERROR
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    host = settings.dashboard_address
    url = f"http://{'[' + host + ']' if ':' in host else host}:{server.port}/"
    log.info(
        "dashboard_listening",
        url=url,
        port=server.port,
        queue=settings.queue,
        redis=settings.redacted_redis_url(),
        writable=settings.dashboard_token is not None,
    )
    while not stop.wait(1.0):
        if server.failure is not None:  # a bug in its I/O thread, which cannot log: we do, and start it again
            log.error("dashboard_http_thread_failed", error=repr(server.failure))
            server.start()
    server.close()
    log.info("dashboard_stopped")
    return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
