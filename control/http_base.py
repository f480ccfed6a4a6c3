"""The one hardened HTTP server under both of the pool's ports: METRICS_PORT
(control/metrics.py) and the dashboard (control/dashboard.py). Each adds only
its routes: a subclass implements respond(Request) -> Response, and may shape
the base's own refusals (refusal()).

    client --connect--> kernel (TCP_DEFER_ACCEPT: held until its request arrives)
        --accept, read at once--> the I/O thread (poll(), non-blocking sockets)
        --a whole request (head and body within LIMITS)--> respond()
            inline in the I/O thread (handler_threads=0: metrics), or
            on one of a few handler threads (the dashboard: Redis, thumbnails)
        --the reply's bytes--> the I/O thread writes them --> close

One thread owns every socket, so a connection costs a table entry, not a
thread: a thousand idle clients make no thousand threads, a client that never
reads its reply holds no handler, and a handler only ever sees a request that
has arrived whole. The replies are HTTP/1.1 with `Connection: close`: one
request per connection, which is all a scraper or the dashboard's page needs.

Hazards handled here, the same for both ports (LIMITS, one set):
- A client that sends nothing, or a byte a second (slow loris), or never
  reads its reply: every connection has LIMITS.deadline from accept to the
  last byte of its reply, then it is closed.
- Large requests: a head is at most LIMITS.max_head_bytes (431), a body at
  most LIMITS.max_body_bytes by its Content-Length (413); a chunked body is
  refused (411), so nothing is read without a known end.
- Many connections at once: beyond LIMITS.max_connections the oldest one
  still sending its request is dropped (never one being answered), and
  requests that arrived are read before new connections are accepted, so a
  request is answered through a flood of connects and descriptors stay
  bounded. On Linux (TCP_DEFER_ACCEPT) a connection reaches accept() with its
  request, which is read there and then: a client descheduled between its
  connect and its send is not taken for one of a flood's idle connections.
  One thread owns the table of connections, so no lock is taken twice.
- Fork while the I/O thread runs (METRICS_PORT lives in the supervisor, which
  forks): the thread never logs and touches nothing but its sockets and what
  respond() reads, and works only while holding quiesced(), which the
  supervisor holds across every fork; close_in_child() closes every socket
  first thing in a child. Only a server that answers inline may be forked
  with: handler threads would hold locks that quiesced() does not cover.
- A bug in the I/O thread: it records the exception in `failure` and ends;
  the owner (the supervisor's loop, the dashboard's main) logs it and calls
  start() again. A bug in a handler thread's respond() is a 500.
"""

from __future__ import annotations

import io
import queue
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.client import HTTPException, HTTPMessage, parse_headers

# How long close() may wait for the I/O thread to notice it should stop.
POLL_SECONDS = 0.25


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may cost either port."""

    # From accept to the reply's last byte. A scrape or a page's read takes
    # milliseconds; a search or thumbnail a second or two at most (Redis's 3 s
    # timeout on the dashboard's reads ends one that would take longer).
    deadline: float = 10.0
    # A browser's head is about 1 KiB, but it carries every cookie set for the
    # host (any port of 127.0.0.1): room for some, not for an endless one.
    max_head_bytes: int = 16 * 1024
    max_body_bytes: int = 4096  # the dashboard's changes are a JSON id or {}
    max_connections: int = 64
    # The kernel hands us a connection once its request has arrived (or after
    # about this long without one): a request is read as it is accepted,
    # before a flood of connections that send nothing can take its place.
    defer_accept: int = 1


LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str  # the path and query, as sent
    headers: HTTPMessage  # names case-insensitive
    body: bytes
    client: str  # the peer's address


@dataclass(frozen=True, slots=True)
class Response:
    status: HTTPStatus
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self, *, head_only: bool = False) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status.value} {self.status.phrase}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            *(f"{name}: {value}" for name, value in self.headers),
            "Connection: close",
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else self.body)


class Refusal(Exception):
    """A request the base will not pass on: its status and the reason."""

    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def parse_request(data: bytes, *, client: str, limits: Limits) -> Request | None:
    """The request in `data` if it is all there, None if more is to come.
    Raises Refusal for one that is too large, malformed or chunked."""
    head_end = _head_end(data)
    if head_end is None or head_end > limits.max_head_bytes:
        if head_end is not None or len(data) > limits.max_head_bytes:
            raise Refusal(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"a request head is at most {limits.max_head_bytes} bytes")
        return None
    request_line, _, header_block = data[:head_end].partition(b"\n")
    words = request_line.decode("latin-1").split()
    if len(words) != 3 or not words[2].startswith("HTTP/1."):
        raise Refusal(HTTPStatus.BAD_REQUEST, "bad request line")
    method, target, _ = words
    try:
        headers = parse_headers(io.BytesIO(header_block))
    except HTTPException:
        raise Refusal(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many header lines") from None
    if headers.get("Transfer-Encoding"):
        raise Refusal(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
    lengths = {value.strip() for value in headers.get_all("Content-Length", ["0"])}
    if len(lengths) != 1:
        raise Refusal(HTTPStatus.BAD_REQUEST, "Content-Length given twice, differently")
    (raw_length,) = lengths
    if not raw_length.isascii() or not raw_length.isdigit():  # isdigit alone takes "²"
        raise Refusal(HTTPStatus.BAD_REQUEST, "bad Content-Length")
    # int() refuses more than 4,300 digits with a ValueError; no body we take has 20.
    length = int(raw_length) if len(raw_length) <= 19 else limits.max_body_bytes + 1
    if length > limits.max_body_bytes:
        raise Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a request body is at most {limits.max_body_bytes} bytes")
    if len(data) < head_end + length:
        return None
    return Request(method, target, headers, bytes(data[head_end : head_end + length]), client)


def _head_end(data: bytes) -> int | None:
    """Where the head ends (after its first blank line, CRLF or bare LF), if it has."""
    ends = [at + len(blank) for blank in (b"\r\n\r\n", b"\n\n") if (at := data.find(blank)) >= 0]
    return min(ends, default=None)


@dataclass(eq=False, slots=True)
class _Client:
    sock: socket.socket
    address: str
    deadline: float
    received: bytearray = field(default_factory=bytearray)
    handling: bool = False  # its request is with a handler thread
    reply: memoryview | None = None


class HardenedHTTPServer:
    """Listens, reads, bounds and writes; respond() (a subclass's) decides.

    start() runs the I/O thread (and `handler_threads` handler threads; 0
    answers inline, in the I/O thread, for a respond() that takes
    microseconds and may not log); close() stops it. Both are its owner's."""

    name = "http"

    def __init__(self, *, address: str, port: int, limits: Limits = LIMITS, handler_threads: int = 0) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        # A long queue: connections held back for their request (below) wait in
        # it, and one that overflows it is let through at once, request or not.
        self.listener = socket.create_server((address, port), family=family, backlog=socket.SOMAXCONN)
        self.listener.setblocking(False)
        if hasattr(socket, "TCP_DEFER_ACCEPT"):  # Linux
            self.listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, limits.defer_accept)
        self.limits = limits
        self.handler_threads = handler_threads
        # The I/O thread's alone, except across a fork (see quiesced()).
        self._quiet = threading.Lock()
        self._poller = selectors.PollSelector()  # poll() holds no descriptor a child must close
        self._clients: dict[socket.socket, _Client] = {}  # oldest first
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.failure: Exception | None = None
        # Handler threads hand replies back through `_done` and a byte on the wakeup pair.
        self._work: queue.SimpleQueue[tuple[_Client, Request] | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[_Client, bytes]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._handlers: list[threading.Thread] = []
        self._poller.register(self.listener, selectors.EVENT_READ)
        self._poller.register(self._wake_r, selectors.EVENT_READ)

    # -- what a subclass adds -------------------------------------------------

    def respond(self, request: Request) -> Response:
        raise NotImplementedError

    def refusal(self, status: HTTPStatus, reason: str) -> Response:
        """How this server words the base's own refusals (too large, malformed)."""
        return Response(status, "text/plain; charset=utf-8", f"{reason}\n".encode())

    # -- what the owner calls --------------------------------------------------

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]

    def start(self) -> None:
        """Start (or, after a failure, restart) the I/O thread. It inherits the
        caller's signal mask: the supervisor blocks its signals around this."""
        if self._thread is not None:
            self._thread.join()  # a failed one: it has recorded its failure and is returning
        with self._quiet:
            self._drop_all()
        self.failure = None
        self._stopping = False
        while len(self._handlers) < self.handler_threads:
            handler = threading.Thread(target=self._handle, name=f"{self.name}-handler", daemon=True)
            handler.start()
            self._handlers.append(handler)
        self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        self._thread.start()

    def quiesced(self) -> threading.Lock:
        """Hold across a fork: the I/O thread is then between passes, holding nothing."""
        return self._quiet

    def close_in_child(self) -> None:
        """In a freshly forked child: close the listener and every socket.
        Only closes: the connections stay open in the parent."""
        for sock in [self.listener, self._wake_r, self._wake_w, *self._clients]:
            sock.close()
        self._clients.clear()

    def close(self) -> None:
        self._stopping = True
        if self._thread is not None:
            self._thread.join(timeout=POLL_SECONDS * 4)
        for _ in self._handlers:
            self._work.put(None)
        with self._quiet:
            self._drop_all()
            for sock in (self.listener, self._wake_r, self._wake_w):
                sock.close()  # a handler still at work finds the pair closed, and its reply is dropped

    # -- the I/O thread ----------------------------------------------------------

    def _serve(self) -> None:
        timeout = POLL_SECONDS
        try:
            while True:
                events = self._poller.select(timeout)  # the one wait, and it holds nothing
                with self._quiet:
                    if self._stopping:
                        return
                    self._take_replies()
                    # Clients first, then new connections: a request already in
                    # has its answer under way before a flood of connects evicts anyone.
                    for key, _ in events:
                        if isinstance(key.data, _Client) and key.data.sock.fileno() >= 0:
                            self._advance(key.data)  # (not dropped earlier in this pass)
                    if any(key.fileobj is self.listener for key, _ in events):
                        self._accept()
                    timeout = self._drop_late()
        except Exception as exc:  # noqa: BLE001 - recorded: the owner logs it and restarts us
            self.failure = exc

    def _accept(self) -> None:
        for _ in range(self.limits.max_connections):  # bounded: a flood of connects cannot keep us here
            try:
                sock, peer = self.listener.accept()
            except OSError:
                return  # none left (BlockingIOError), or one that went away before we took it
            sock.setblocking(False)
            if len(self._clients) >= self.limits.max_connections:
                sending = self._least_worth_keeping()
                if sending is None:
                    sock.close()  # every place holds a request being answered: this one waits its turn elsewhere
                    continue
                self._drop(sending)
            client = _Client(sock, str(peer[0]), time.monotonic() + self.limits.deadline)
            self._clients[sock] = client
            self._poller.register(sock, selectors.EVENT_READ, client)
            self._advance(client)  # its request is most often in already: answered, it cannot be evicted

    def _least_worth_keeping(self) -> _Client | None:
        """The oldest client still sending its request (idle, a slow loris, a
        flood's); None when every one has its answer under way, which is never
        given up for a newcomer."""
        sending = (client for client in self._clients.values() if client.reply is None and not client.handling)
        return next(sending, None)

    def _advance(self, client: _Client) -> None:
        try:
            if client.reply is None and not client.handling:
                self._receive(client)
            if client.reply is not None and client.sock.fileno() >= 0:
                self._send(client)
        except BlockingIOError:
            pass  # not ready after all; poll() will say when
        except OSError:
            self._drop(client)  # the client went away

    def _receive(self, client: _Client) -> None:
        chunk = client.sock.recv(self.limits.max_head_bytes + self.limits.max_body_bytes)
        if not chunk:
            self._drop(client)
            return
        client.received += chunk
        try:
            request = parse_request(client.received, client=client.address, limits=self.limits)
        except Refusal as refused:
            self._reply(client, self.refusal(refused.status, refused.reason).encode())
            return
        except ValueError:  # no client's bytes may end the thread that serves every client
            self._reply(client, self.refusal(HTTPStatus.BAD_REQUEST, "malformed request").encode())
            return
        if request is None:
            return
        if self.handler_threads:
            client.handling = True
            self._poller.unregister(client.sock)  # nothing to read or write until its reply comes
            self._work.put((client, request))
        else:
            self._reply(client, self.respond(request).encode(head_only=request.method == "HEAD"))

    def _reply(self, client: _Client, reply: bytes) -> None:
        """Write `reply` from now on, as the socket takes it (_advance sends)."""
        client.reply = memoryview(reply)
        if client.handling:
            client.handling = False
            self._poller.register(client.sock, selectors.EVENT_WRITE, client)
        else:
            self._poller.modify(client.sock, selectors.EVENT_WRITE, client)

    def _send(self, client: _Client) -> None:
        sent = client.sock.send(client.reply)
        client.reply = client.reply[sent:]
        if not client.reply:
            self._drop(client)

    def _take_replies(self) -> None:
        """The handler threads' replies: each to its client, if it is still here."""
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while not self._done.empty():
            client, reply = self._done.get_nowait()
            if self._clients.get(client.sock) is client:  # not dropped (its deadline) meanwhile
                self._reply(client, reply)
                self._advance(client)

    def _drop_late(self) -> float:
        """Drop the clients past their deadline; return how long poll() may wait."""
        now = time.monotonic()
        for client in list(self._clients.values()):  # oldest first, so deadlines ascend
            if client.deadline > now:
                return min(POLL_SECONDS, client.deadline - now)
            self._drop(client)
        return POLL_SECONDS

    def _drop(self, client: _Client) -> None:
        if not client.handling:  # one with a handler thread is not polled
            self._poller.unregister(client.sock)
        del self._clients[client.sock]
        client.sock.close()

    def _drop_all(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client)

    # -- the handler threads (a server with handler_threads > 0) -----------------

    def _handle(self) -> None:
        while (work := self._work.get()) is not None:
            client, request = work
            if client.sock.fileno() < 0:
                continue  # dropped while it waited (its deadline passed): no work for nobody
            try:
                reply = self.respond(request).encode(head_only=request.method == "HEAD")
            except Exception:  # noqa: BLE001 - respond() answers its own errors; this is the backstop
                reply = self.refusal(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error").encode()
            self._done.put((client, reply))
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass  # the pair is full (the I/O thread will drain it) or closed
