"""Prometheus metrics and /healthz, served from a thread of the supervisor (METRICS_PORT).

    ledger --cumulative snapshots over its pipe--> supervisor loop
    supervisor loop (banks ledger counts, counts restarts, reads queue depths
        from Redis every few seconds, judges health) --publish()--> one PoolView
    PoolView --read by the metrics thread--> HTTP clients (/metrics, /healthz)

The supervisor's loop never waits on a client: it only publishes an immutable
PoolView each pass, and a thread of its own answers HTTP from the newest one.
(Served from the loop itself, two idle connections once starved it: a killed
worker was replaced 10-28 s late, the lease expired and /healthz took 27 s.)

Why one thread multiplexing non-blocking sockets, not a thread per connection
(ThreadingHTTPServer) nor a process of its own: a thread per client lets a
thousand idle sockets make a thousand threads, and http.server writes a log
line to stderr per request, which must not happen here (see the fork hazard).
A separate process would be one more child to reap, restart and feed over a
pipe, for work that takes a millisecond. One thread with poll() has a fixed
cost: at most MAX_CONNECTIONS sockets, each with one deadline.

Hazards handled here:
- A client that sends nothing, or a byte a second (slow loris), or never
  reads its reply: every connection has REQUEST_DEADLINE from accept to the
  last byte of the reply, and a request head is at most MAX_HEAD_BYTES.
- Many connections at once: beyond MAX_CONNECTIONS the oldest one still
  sending its request is dropped (never one being answered), and requests
  that arrived are read before new connections are accepted, so a scrape is
  answered through a flood of connects and file descriptors stay bounded.
  On Linux (TCP_DEFER_ACCEPT) a connection reaches accept() with its request,
  which is read there and then: a scraper descheduled between its connect and
  its send is not taken for one of a flood's idle connections and evicted.
- Fork while the thread runs: whatever lock it holds at that instant is
  copied held into the child. So the thread never logs (structlog's writer
  and sys.stderr each have a lock), never touches Redis or the supervisor's
  objects (only the published PoolView and sockets of its own), and it works
  only inside quiesced(), which the supervisor holds across every fork: a
  child is forked while the thread waits in poll() or for that lock, holding
  nothing, with its table of connections whole. (Python 3.12 warns of any
  fork in a process with threads: this is the case it warns about, handled.)
- A child inherits every descriptor (close-on-exec needs an exec, which a
  forked child never does): close_in_child() closes the listener and every
  accepted connection first thing, or a child would keep a dropped client's
  connection open and the port bound after the supervisor is gone.
- A wedged loop: /healthz answers 503 once the view is LOOP_STALE_SECONDS old.
- A bug in the thread: it records the exception in `failure` and ends; the
  loop logs it and starts a new thread (the thread cannot log, see above).
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from shared.pool_registry import PoolRegistry
from shared.process import LEDGER_STALE_SECONDS
from shared.redis_queue import REDIS_ERRORS, ReliableQueue
from shared.shm_usage import ShmUsage
from shared.task_stats import BUCKETS, MAX_SNAPSHOT_BYTES, TaskStats

# From accept to the reply's last byte; a scrape takes milliseconds.
REQUEST_DEADLINE = 5.0
MAX_HEAD_BYTES = 8192
MAX_CONNECTIONS = 64
# The kernel hands us a connection once its request has arrived (or after this
# long without one): a scraper's request is read as it is accepted, before a
# flood of connections that send nothing can take its place.
DEFER_ACCEPT_SECONDS = 1
# How long close() may wait for the thread to notice it should stop.
POLL_SECONDS = 0.25
QUEUE_REFRESH_SECONDS = 5.0
# A loop that has published nothing for this long is wedged: the same patience
# as for the ledger's heartbeat, and as systemd's watchdog (WatchdogSec=30).
LOOP_STALE_SECONDS = LEDGER_STALE_SECONDS

Gauge = tuple[str, str, float]  # name, help, value


@dataclass(frozen=True, slots=True)
class PoolView:
    """What the loop last published; never changed once published (stats is a fresh copy)."""

    healthy: bool = False
    live_workers: int = 0
    restarts: tuple[tuple[str, int], ...] = ()
    stats: TaskStats = field(default_factory=TaskStats)
    queue_gauges: tuple[Gauge, ...] = ()
    shm: ShmUsage | None = None  # None: /dev/shm could not be read
    published_at: float = field(default_factory=time.monotonic)

    def serving(self) -> bool:
        """Healthy, as the loop said no longer than LOOP_STALE_SECONDS ago:
        a loop that stopped publishing is not vouching for the pool."""
        return self.healthy and time.monotonic() - self.published_at < LOOP_STALE_SECONDS


class PoolCollector:
    """Turns the newest PoolView into metric families; registered once, read per scrape."""

    def __init__(self, endpoint: MetricsEndpoint) -> None:
        self.endpoint = endpoint

    def collect(self) -> Iterator:
        view = self.endpoint.view  # one view for the whole scrape
        tasks = CounterMetricFamily("image_result_tasks", "Tasks ended, by status and source", labels=["status", "source"])
        for (status, source), count in sorted(view.stats.outcomes.items()):
            tasks.add_metric([status, source], count)
        yield tasks
        durations = HistogramMetricFamily(
            "image_result_task_phase_seconds", "Time spent in each phase of a task", labels=["phase"]
        )
        for phase, histogram in view.stats.phases.items():
            cumulative, running = [], 0
            for bound, count in zip([*map(str, BUCKETS), "+Inf"], histogram.buckets, strict=True):
                running += count
                cumulative.append((bound, running))
            durations.add_metric([phase], cumulative, sum_value=histogram.total)
        yield durations
        restarts = CounterMetricFamily("image_result_child_restarts", "Children that died and were replaced", labels=["role"])
        for role, count in view.restarts:
            restarts.add_metric([role], count)
        yield restarts
        yield CounterMetricFamily(
            "image_result_tasks_expired", "Tasks failed because their deadline passed before they started",
            value=view.stats.expired,
        )
        if view.shm is not None:
            yield GaugeMetricFamily(
                "image_result_shm_waiting_bytes", "Bytes of frames waiting in this host's /dev/shm (SHM_NAME_PREFIX)",
                value=view.shm.waiting_bytes,
            )
            yield GaugeMetricFamily(
                "image_result_shm_budget_bytes", "SHM_BUDGET_BYTES (0: no budget)", value=view.shm.budget_bytes
            )
        for name, help_text, value in view.queue_gauges:
            yield GaugeMetricFamily(name, help_text, value=value)
        yield GaugeMetricFamily("image_result_workers", "Live worker processes", value=view.live_workers)
        yield GaugeMetricFamily("image_result_ready", "1 while /healthz answers ok, else 0", value=int(view.serving()))


@dataclass(eq=False, slots=True)
class _Client:
    sock: socket.socket
    deadline: float
    received: bytearray = field(default_factory=bytearray)
    reply: memoryview | None = None


class MetricsEndpoint:
    """The loop's side (read_snapshots, child_restarted, publish, quiesced,
    close_in_child) and the HTTP thread's side (_serve and below)."""

    def __init__(
        self,
        *,
        address: str,
        port: int,
        registry: PoolRegistry,
        queue: ReliableQueue,
        request_deadline: float = REQUEST_DEADLINE,
        max_connections: int = MAX_CONNECTIONS,
        defer_accept: int = DEFER_ACCEPT_SECONDS,
    ) -> None:
        # A long queue: connections held back for their request (below) wait in
        # it, and one that overflows it is let through at once, request or not.
        self.listener = socket.create_server((address, port), backlog=socket.SOMAXCONN, reuse_port=False)
        self.listener.setblocking(False)
        if hasattr(socket, "TCP_DEFER_ACCEPT"):  # Linux
            self.listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer_accept)
        self.pool_registry = registry  # queue depths
        self.queue = queue  # replicas claims are copied to, under Sentinel
        self.request_deadline = request_deadline
        self.max_connections = max_connections
        # The loop's alone.
        self.restarts: dict[str, int] = {}
        self._base = TaskStats()  # from ledgers that have exited
        self._current = TaskStats()  # the running ledger's latest snapshot
        self._pipe_buffer = b""
        self._gauges: tuple[Gauge, ...] = ()
        self._gauges_due = 0.0
        # Replaced whole by the loop, read by the thread: one attribute store,
        # so the thread sees the old view or the new one, never half of each.
        self.view = PoolView()
        # The thread's alone, except across a fork (see quiesced()).
        self._quiet = threading.Lock()
        self._poller = selectors.PollSelector()  # poll() holds no descriptor a child must close
        self._clients: dict[socket.socket, _Client] = {}  # oldest first
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.failure: Exception | None = None
        self._poller.register(self.listener, selectors.EVENT_READ)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PoolCollector(self))

    # -- what the loop calls ------------------------------------------------

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]

    def start(self) -> None:
        """Start (or, after a failure, restart) the HTTP thread. The thread
        inherits the caller's signal mask: block the loop's signals around this."""
        if self._thread is not None:
            self._thread.join()  # a failed one: it has recorded its failure and is returning
        self._drop_all()
        self.failure = None
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="metrics-http", daemon=True)
        self._thread.start()

    def read_snapshots(self, fd: int) -> int:
        """Keep the newest complete snapshot the ledger wrote to its pipe; returns
        how many it refused as not what our ledger writes (the last good counts
        stay, and the next snapshot carries them and more)."""
        try:
            while chunk := os.read(fd, 65536):
                self._pipe_buffer += chunk
        except BlockingIOError:
            pass
        refused = 0
        while len(self._pipe_buffer) >= 4:
            size = int.from_bytes(self._pipe_buffer[:4], "big")
            if size > MAX_SNAPSHOT_BYTES:  # no frame of ours: nothing after it can be trusted either
                self._pipe_buffer = b""
                return refused + 1
            if len(self._pipe_buffer) < 4 + size:
                break
            snapshot, self._pipe_buffer = self._pipe_buffer[4 : 4 + size], self._pipe_buffer[4 + size :]
            try:
                self._current = TaskStats.from_bytes(snapshot)
            except ValueError:
                refused += 1
        return refused

    def ledger_replaced(self) -> None:
        """The ledger's counts are cumulative since it started: bank them."""
        self._base.add(self._current)
        self._current = TaskStats()
        self._pipe_buffer = b""

    def child_restarted(self, role: str) -> None:
        self.restarts[role] = self.restarts.get(role, 0) + 1

    def publish(self, *, healthy: bool, live_workers: int, shm: ShmUsage | None = None) -> None:
        """Hand the thread a fresh view of the pool; it reads nothing else of ours."""
        stats = TaskStats()
        stats.add(self._base)
        stats.add(self._current)
        self.view = PoolView(
            healthy=healthy,
            live_workers=live_workers,
            restarts=tuple(sorted(self.restarts.items())),
            stats=stats,
            queue_gauges=self._queue_gauges(),
            shm=shm,
        )

    def quiesced(self) -> threading.Lock:
        """Hold across a fork: the thread is then between passes, holding nothing."""
        return self._quiet

    def close_in_child(self) -> None:
        """In a freshly forked child: close the listener and every client socket.
        Only closes: the connections stay open in the supervisor."""
        for sock in [self.listener, *self._clients]:
            sock.close()
        self._clients.clear()

    def close(self) -> None:
        self._stopping = True
        if self._thread is not None:
            self._thread.join(timeout=POLL_SECONDS * 4)
        with self._quiet:
            self._drop_all()
            self.listener.close()

    def _queue_gauges(self) -> tuple[Gauge, ...]:
        """Queue figures from Redis, at most every few seconds; an outage keeps
        the last figures (the loop's other Redis steps log it)."""
        if time.monotonic() < self._gauges_due:
            return self._gauges
        self._gauges_due = time.monotonic() + QUEUE_REFRESH_SECONDS
        try:
            depths = self.pool_registry.depths()
            replicas = self.queue.replicas_connected() if self.queue.replicated_claims else None
        except REDIS_ERRORS:
            return self._gauges
        self._gauges = (
            ("image_result_queue_depth", "Tasks waiting in the queue", depths.waiting),
            ("image_result_in_flight", "Tasks in processing lists", depths.in_flight),
            ("image_result_delayed_retries", "Tasks waiting for a retry", depths.delayed),
            ("image_result_dead_letters", "Entries in the dead-letter list", depths.dead),
        )
        if replicas is not None:
            self._gauges += (("image_result_replicas_connected", "Replicas claims are copied to (Sentinel)", replicas),)
        return self._gauges

    # -- the HTTP thread ----------------------------------------------------

    def _serve(self) -> None:
        timeout = POLL_SECONDS
        try:
            while True:
                events = self._poller.select(timeout)  # the one wait, and it holds nothing
                with self._quiet:
                    if self._stopping:
                        return
                    # Clients first, then new connections: a request already in
                    # has its answer under way before a flood of connects evicts anyone.
                    for key, _ in events:
                        if key.fileobj is not self.listener and key.data.sock.fileno() >= 0:
                            self._advance(key.data)  # (not dropped earlier in this pass)
                    if any(key.fileobj is self.listener for key, _ in events):
                        self._accept()
                    timeout = self._drop_late()
        except Exception as exc:  # noqa: BLE001 - recorded: the loop logs it and restarts us
            self.failure = exc

    def _accept(self) -> None:
        for _ in range(self.max_connections):  # bounded: a flood of connects cannot keep us here
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return  # none left (BlockingIOError), or one that went away before we took it
            sock.setblocking(False)
            if len(self._clients) >= self.max_connections:
                self._drop(self._least_worth_keeping())
            client = _Client(sock, time.monotonic() + self.request_deadline)
            self._clients[sock] = client
            self._poller.register(sock, selectors.EVENT_READ, client)
            self._advance(client)  # its request is most often in already: answered, it cannot be evicted

    def _least_worth_keeping(self) -> _Client:
        """The oldest client still sending its request (idle, a slow loris, a
        flood's), before any whose answer is on its way."""
        waiting = (client for client in self._clients.values() if client.reply is None)
        return next(waiting, None) or next(iter(self._clients.values()))

    def _advance(self, client: _Client) -> None:
        try:
            if client.reply is None:
                self._receive(client)
            if client.reply is not None:
                self._send(client)
        except BlockingIOError:
            pass  # not ready after all; poll() will say when
        except OSError:
            self._drop(client)  # the client went away

    def _receive(self, client: _Client) -> None:
        chunk = client.sock.recv(MAX_HEAD_BYTES)
        if not chunk:
            self._drop(client)
            return
        client.received += chunk
        head_done = b"\r\n\r\n" in client.received or b"\n\n" in client.received
        if not head_done:
            if len(client.received) > MAX_HEAD_BYTES:
                self._drop(client)
            return
        client.reply = memoryview(self._respond(bytes(client.received.split(b"\n", 1)[0])))
        self._poller.modify(client.sock, selectors.EVENT_WRITE, client)

    def _send(self, client: _Client) -> None:
        sent = client.sock.send(client.reply)
        client.reply = client.reply[sent:]
        if not client.reply:
            self._drop(client)

    def _drop_late(self) -> float:
        """Drop the clients past their deadline; return how long poll() may wait."""
        now = time.monotonic()
        for client in list(self._clients.values()):  # oldest first, so deadlines ascend
            if client.deadline > now:
                return min(POLL_SECONDS, client.deadline - now)
            self._drop(client)
        return POLL_SECONDS

    def _drop(self, client: _Client) -> None:
        self._poller.unregister(client.sock)
        del self._clients[client.sock]
        client.sock.close()

    def _drop_all(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client)

    def _respond(self, request_line: bytes) -> bytes:
        parts = request_line.split()
        method = parts[0] if parts else b""
        path = parts[1].decode(errors="replace").split("?", 1)[0] if len(parts) >= 2 else ""
        if method != b"GET":
            status, body, kind = "405 Method Not Allowed", b"GET only\n", "text/plain"
        elif path == "/metrics":
            status, body, kind = "200 OK", generate_latest(self.registry), "text/plain; version=0.0.4"
        elif path == "/healthz":
            if self.view.serving():
                status, body, kind = "200 OK", b"ok\n", "text/plain"
            else:
                status, body, kind = "503 Service Unavailable", b"unhealthy\n", "text/plain"
        else:
            status, body, kind = "404 Not Found", b"try /metrics or /healthz\n", "text/plain"
        head = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        return head.encode() + body
