"""Prometheus metrics and /healthz, served by the supervisor (METRICS_PORT).

One scrape target per pool: the workers' numbers reach it through the ledger's
cumulative snapshots (shared/task_stats.py), the queue's from Redis. The
endpoint runs inside the supervisor's loop, without a thread: the listening
socket is one more thing the loop waits on, and a request is answered at once
(a client gets a second to send its request line). No thread means nothing to
be caught mid-lock when the supervisor forks.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from shared.redis_queue import REDIS_ERRORS, ReliableQueue
from shared.task_stats import BUCKETS, TaskStats

REQUEST_TIMEOUT = 1.0
QUEUE_REFRESH_SECONDS = 5.0


class PoolCollector:
    """Collects from what the supervisor knows; registered once, read per scrape."""

    def __init__(self, endpoint: MetricsEndpoint) -> None:
        self.endpoint = endpoint

    def collect(self) -> Iterator:
        stats = self.endpoint.task_stats()
        tasks = CounterMetricFamily("image_result_tasks", "Tasks ended, by status and source", labels=["status", "source"])
        for (status, source), count in sorted(stats.outcomes.items()):
            tasks.add_metric([status, source], count)
        yield tasks
        durations = HistogramMetricFamily(
            "image_result_task_phase_seconds", "Time spent in each phase of a task", labels=["phase"]
        )
        for phase, histogram in stats.phases.items():
            cumulative, running = [], 0
            for bound, count in zip([*map(str, BUCKETS), "+Inf"], histogram.buckets, strict=True):
                running += count
                cumulative.append((bound, running))
            durations.add_metric([phase], cumulative, sum_value=histogram.total)
        yield durations
        restarts = CounterMetricFamily("image_result_child_restarts", "Children that died and were replaced", labels=["role"])
        for role, count in sorted(self.endpoint.restarts.items()):
            restarts.add_metric([role], count)
        yield restarts
        for name, help_text, value in self.endpoint.queue_gauges():
            yield GaugeMetricFamily(name, help_text, value=value)
        yield GaugeMetricFamily("image_result_workers", "Live worker processes", value=self.endpoint.live_workers())


class MetricsEndpoint:
    def __init__(
        self, *, address: str, port: int, queue: ReliableQueue, live_workers: Callable[[], int],
        healthy: Callable[[], bool],
    ) -> None:
        self.listener = socket.create_server((address, port), reuse_port=False)
        self.listener.setblocking(False)
        self.queue = queue
        self.live_workers = live_workers
        self.healthy = healthy
        self.restarts: dict[str, int] = {}
        self._base = TaskStats()  # from ledgers that have exited
        self._current = TaskStats()  # the running ledger's latest snapshot
        self._pipe_buffer = b""
        self._gauges: list[tuple[str, str, float]] = []
        self._gauges_at = 0.0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PoolCollector(self))

    # -- what the loop calls ------------------------------------------------

    def fileno(self) -> int:
        return self.listener.fileno()

    def answer_waiting_requests(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            with conn:
                conn.settimeout(REQUEST_TIMEOUT)
                try:
                    self._answer(conn)
                except OSError:
                    pass  # a client that went away or was too slow

    def read_snapshots(self, fd: int) -> None:
        """Keep the newest complete snapshot the ledger wrote to its pipe."""
        try:
            while chunk := os.read(fd, 65536):
                self._pipe_buffer += chunk
        except BlockingIOError:
            pass
        while len(self._pipe_buffer) >= 4:
            size = int.from_bytes(self._pipe_buffer[:4], "big")
            if len(self._pipe_buffer) < 4 + size:
                break
            self._current = TaskStats.from_bytes(self._pipe_buffer[4 : 4 + size])
            self._pipe_buffer = self._pipe_buffer[4 + size :]

    def ledger_replaced(self) -> None:
        """The ledger's counts are cumulative since it started: bank them."""
        self._base.add(self._current)
        self._current = TaskStats()
        self._pipe_buffer = b""

    def child_restarted(self, role: str) -> None:
        self.restarts[role] = self.restarts.get(role, 0) + 1

    def close(self) -> None:
        self.listener.close()

    # -- what the collector reads -------------------------------------------

    def task_stats(self) -> TaskStats:
        total = TaskStats()
        total.add(self._base)
        total.add(self._current)
        return total

    def queue_gauges(self) -> list[tuple[str, str, float]]:
        """Queue figures from Redis, at most every few seconds and never failing a scrape."""
        if time.monotonic() - self._gauges_at < QUEUE_REFRESH_SECONDS:
            return self._gauges
        try:
            depths = self.queue.depths()
            self._gauges = [
                ("image_result_queue_depth", "Tasks waiting in the queue", depths.waiting),
                ("image_result_in_flight", "Tasks in processing lists", depths.in_flight),
                ("image_result_delayed_retries", "Tasks waiting for a retry", depths.delayed),
                ("image_result_dead_letters", "Entries in the dead-letter list", depths.dead),
            ]
        except REDIS_ERRORS:
            pass  # keep the last figures; the Redis outage is in the log
        self._gauges_at = time.monotonic()
        return self._gauges

    def _answer(self, conn: socket.socket) -> None:
        request = conn.recv(4096).split(b"\r\n", 1)[0].split()
        path = request[1].decode(errors="replace") if len(request) >= 2 else ""
        if path.startswith("/metrics"):
            status, body, kind = "200 OK", generate_latest(self.registry), "text/plain; version=0.0.4"
        elif path.startswith("/healthz"):
            ok = self.healthy()
            status, body, kind = ("200 OK", b"ok\n", "text/plain") if ok else ("503 Service Unavailable", b"unhealthy\n", "text/plain")
        else:
            status, body, kind = "404 Not Found", b"try /metrics or /healthz\n", "text/plain"
        head = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        conn.sendall(head.encode() + body)
