"""Prometheus metrics and /healthz, served from a thread of the supervisor (METRICS_PORT).

    ledger --cumulative snapshots over its pipe--> supervisor loop
    supervisor loop (banks ledger counts, counts restarts, reads queue depths
        from Redis every few seconds, judges health) --publish()--> one PoolView
    PoolView --read by the HTTP thread--> HTTP clients (/metrics, /healthz)

The supervisor's loop never waits on a client: it only publishes an immutable
PoolView each pass, and a thread of its own answers HTTP from the newest one.
(Served from the loop itself, two idle connections once starved it: a killed
worker was replaced 10-28 s late, the lease expired and /healthz took 27 s.)
The HTTP side is control/http_base.py's, with the dashboard's limits; this
module adds the two routes, answered inline in that one I/O thread (a
scrape takes a millisecond).

Why a thread of the supervisor and not a process of its own, though a thread
in a parent that forks is why every fork goes through quiesced(): what the
thread costs the fork is one uncontended lock and a few close() calls in the
child, and the rules that make it safe are few and local (the thread never
logs, never touches Redis or the supervisor's objects, only the published
PoolView and its own sockets; see http_base.py). A process would be one more
child to start before the others, reap, restart and watch, fed the view
over a pipe each pass (serialised, read, refused if torn), and /healthz would
then vouch for that process's last read of the pipe rather than for the loop
itself. For work that takes a millisecond a pass, the thread is the smaller
risk. http.server's thread per connection was no option here: it writes a
log line to stderr per request (a lock a fork could copy held), and a
thousand idle sockets would make a thousand threads.

Hazards handled here (the HTTP ones, floods, slow clients and large requests,
are the base's):
- Fork while the thread runs: the supervisor holds quiesced() across every
  fork and each child calls close_in_child() first thing, or a child would
  keep a dropped client's connection open and the port bound after the
  supervisor is gone. (Python 3.12 warns of any fork in a process with
  threads: this is the case it warns about, handled.)
- A wedged loop: /healthz answers 503 once the view is LOOP_STALE_SECONDS old.
- A bug in the thread: it records the exception in `failure` and ends; the
  loop logs it and starts a new thread (the thread cannot log, see above).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from control.http_base import LIMITS, HardenedHTTPServer, Limits, Request, Response
from shared.imaging.shm_usage import ShmUsage
from shared.ipc.task_stats import BUCKETS, MAX_SNAPSHOT_BYTES, TaskStats
from shared.process import LEDGER_STALE_SECONDS
from shared.state.pool_registry import PoolRegistry
from shared.state.redis_queue import REDIS_ERRORS, ReliableQueue

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


class MetricsEndpoint(HardenedHTTPServer):
    """The loop's side (read_snapshots, child_restarted, publish; the base's
    start, quiesced, close_in_child, close) and the HTTP thread's (respond)."""

    name = "metrics-http"

    def __init__(
        self,
        *,
        address: str,
        port: int,
        registry: PoolRegistry,
        queue: ReliableQueue,
        limits: Limits = LIMITS,
    ) -> None:
        super().__init__(address=address, port=port, limits=limits)  # answered inline: a fork stays safe
        self.pool_registry = registry  # queue depths
        self.queue = queue  # replicas claims are copied to, under Sentinel
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
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PoolCollector(self))

    # -- what the loop calls ------------------------------------------------

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
            ("image_result_junk_dead_letters", "Entries in the junk dead-letter list (no request_id)", depths.junk),
            ("image_result_dead_letters_trimmed", "Dead letters pushed out by DEAD_LETTER_MAX, ever",
             depths.trimmed.get("failed", 0)),
            ("image_result_junk_dead_letters_trimmed", "Junk dead letters pushed out by DEAD_LETTER_MAX, ever",
             depths.trimmed.get("junk", 0)),
        )
        if replicas is not None:
            self._gauges += (("image_result_replicas_connected", "Replicas claims are copied to (Sentinel)", replicas),)
        return self._gauges

    # -- the HTTP thread ----------------------------------------------------

    def respond(self, request: Request) -> Response:
        path = request.target.split("?", 1)[0]
        if request.method != "GET":
            return Response(HTTPStatus.METHOD_NOT_ALLOWED, "text/plain", b"GET only\n")
        if path == "/metrics":
            return Response(HTTPStatus.OK, "text/plain; version=0.0.4", generate_latest(self.registry))
        if path == "/healthz":
            if self.view.serving():
                return Response(HTTPStatus.OK, "text/plain", b"ok\n")
            return Response(HTTPStatus.SERVICE_UNAVAILABLE, "text/plain", b"unhealthy\n")
        return Response(HTTPStatus.NOT_FOUND, "text/plain", b"try /metrics or /healthz\n")
