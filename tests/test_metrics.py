"""Prometheus metrics and /healthz: the HTTP thread in-process against real
sockets, then scraped over real HTTP from a running pool."""

from __future__ import annotations

import os
import pickle
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from control import metrics
from control.metrics import MetricsEndpoint
from harness.pool import Pool
from shared.ipc.task_stats import TaskStats
from shared.state.pool_registry import QueueDepths
from tests.helpers import push, push_photos, wait_for_records, wait_until, worker_pids
from tools.local_redis import free_port


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format, or None."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if found == labels or (labels and all(found.get(k) == v for k, v in labels.items()) and len(found) == len(labels)):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_count_tasks_phases_restarts_and_queue(pool_factory, redis_client, queue_name, segments):
    port = free_port()
    pool = pool_factory(workers=2, env={"METRICS_PORT": str(port), "METRICS_ADDRESS": "127.0.0.1"})
    pool.wait_ready()
    assert scrape(port, "/healthz") == (200, "ok\n")
    push_photos(redis_client, queue_name, segments, 4, size=(256, 256))
    push(redis_client, queue_name, b"not json")
    wait_for_records(pool.output_dir, 5, pool=pool)

    def counted() -> str | None:
        text = scrape(port)[1]
        done = sample(text, "image_result_tasks_total", status="completed", source="shm") == 4
        done = done and sample(text, "image_result_tasks_total", status="failed", source="none") == 1
        # The queue's figures are read from Redis every QUEUE_REFRESH_SECONDS.
        # Not JSON, so no request_id: a junk dead letter, capped apart from the others.
        done = done and sample(text, "image_result_junk_dead_letters") == 1
        return text if done and sample(text, "image_result_dead_letters") == 0 else None

    text = wait_until(counted, 10, "metrics never counted the tasks")
    assert sample(text, "image_result_task_phase_seconds_count", phase="encode") == 4
    assert sample(text, "image_result_task_phase_seconds_count", phase="ledger") == 5
    assert sample(text, "image_result_task_phase_seconds_count", phase="write") == 4
    assert sample(text, "image_result_queue_depth") == 0
    assert sample(text, "image_result_dead_letters") == 0
    assert sample(text, "image_result_workers") == 2
    assert sample(text, "image_result_ready") == 1

    os.kill(worker_pids(pool)[0], signal.SIGKILL)
    wait_until(
        lambda: sample(scrape(port)[1], "image_result_child_restarts_total", role="worker") == 1,
        10,
        "the restart was not counted",
    )
    assert scrape(port, "/nowhere")[0] == 404
    assert pool.stop() == 0


IDLE = 1.5


def test_an_idle_pools_tasks_count_in_the_fetch_phase(pool_factory, redis_client, queue_name, segments):
    """Tasks that arrive one at a time reach workers blocked on the queue, not a
    batch claim: their fetch (the claim once the message came, not the idle wait)
    counts as every other phase does."""
    port = free_port()
    pool = pool_factory(workers=1, env={"METRICS_PORT": str(port), "METRICS_ADDRESS": "127.0.0.1"})
    pool.wait_ready()
    for count in (1, 2, 3):
        time.sleep(IDLE)  # the worker waits on the queue this long before each task
        push_photos(redis_client, queue_name, segments, 1, size=(64, 64))
        wait_for_records(pool.output_dir, count, pool=pool)

    def counted() -> str | None:
        text = scrape(port)[1]
        return text if sample(text, "image_result_task_phase_seconds_count", phase="ledger") == 3 else None

    text = wait_until(counted, 10, "metrics never counted the tasks")
    assert sample(text, "image_result_task_phase_seconds_count", phase="encode") == 3
    assert sample(text, "image_result_task_phase_seconds_count", phase="fetch") == 3
    fetched = sample(text, "image_result_task_phase_seconds_sum", phase="fetch")
    assert fetched is not None and 0 < fetched < IDLE  # three claims, none of the idle waits
    assert pool.stop() == 0


def test_counts_survive_a_ledger_restart(pool_factory, redis_client, queue_name, segments):
    """Each ledger's counts are cumulative since its start; the supervisor banks
    them when it is replaced, so counters never go backwards."""
    port = free_port()
    pool = pool_factory(workers=1, env={"METRICS_PORT": str(port), "METRICS_ADDRESS": "127.0.0.1"})
    pool.wait_ready()
    push_photos(redis_client, queue_name, segments, 3, size=(256, 256))
    wait_for_records(pool.output_dir, 3, pool=pool)
    completed = lambda: sample(scrape(port)[1], "image_result_tasks_total", status="completed", source="shm")  # noqa: E731
    wait_until(lambda: completed() == 3, 10, "first ledger's counts never arrived")
    (ledger,) = [pid for pid, title in pool.children_by_title().items() if title.endswith(": ledger")]
    os.kill(ledger, signal.SIGKILL)
    wait_until(lambda: scrape(port, "/healthz")[0] == 200 and pool.events("ledger_started")[1:], 15, "no new ledger")
    push_photos(redis_client, queue_name, segments, 2, size=(256, 256))
    wait_for_records(pool.output_dir, 5, pool=pool)
    wait_until(lambda: completed() == 5, 10, "counts went wrong across the ledger restart")
    assert pool.stop() == 0


# ---------------------------------------------------------------- the HTTP thread, in-process


class StillQueue:
    """Stands in for the ReliableQueue: depths() is all the endpoint asks of it."""

    replicated_claims = False

    def depths(self) -> QueueDepths:
        return QueueDepths(waiting=3, in_flight_by_list={}, delayed=0, dead=0)


@pytest.fixture
def endpoint() -> Iterator:
    """Makes endpoints on a free loopback port, started and published healthy; closes them all."""
    made: list[MetricsEndpoint] = []

    def make() -> MetricsEndpoint:
        made.append(MetricsEndpoint(address="127.0.0.1", port=0, registry=StillQueue(), queue=StillQueue()))
        made[-1].start()
        made[-1].publish(healthy=True, live_workers=1)
        return made[-1]

    try:
        yield make
    finally:
        for each in made:
            each.close()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def dropped(sock: socket.socket, within: float) -> bool:
    """True once the server has closed sock (EOF or reset), False if it is still open after `within`."""
    sock.settimeout(within)
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


class RunsCodeWhenUnpickled:
    """A pickle that makes a directory when loaded: what a stats pipe must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def frame(snapshot: bytes) -> bytes:
    return len(snapshot).to_bytes(4, "big") + snapshot


def test_the_ledgers_stats_arrive_whole_and_anything_else_on_its_pipe_is_refused(endpoint, tmp_path):
    server = endpoint()
    stats = TaskStats()
    stats.observe(status="completed", source="shm", timings={"encode": 0.01, "ledger": 0.2})
    stats.duplicates = 2
    assert TaskStats.from_bytes(stats.to_bytes()) == stats
    marker = tmp_path / "ran"
    read_end, write_end = os.pipe2(os.O_NONBLOCK)
    try:
        os.write(write_end, frame(stats.to_bytes()))
        os.write(write_end, frame(pickle.dumps(RunsCodeWhenUnpickled(marker))))
        os.write(write_end, frame(b'{"outcomes": [], "phases": {"encode": [[1], 0, 1]}, "duplicates": 0}'))
        os.write(write_end, frame(b"\xff not json"))
        assert server.read_snapshots(read_end) == 3
        assert not marker.exists()
        server.publish(healthy=True, live_workers=1)
        assert sample(scrape(server.port)[1], "image_result_tasks_total", status="completed", source="shm") == 1

        os.write(write_end, b"\xff\xff\xff\xff" + b"x" * 100)  # no frame of ours: dropped whole
        assert server.read_snapshots(read_end) == 1
        stats.observe(status="completed", source="shm", timings={})
        os.write(write_end, frame(stats.to_bytes()))
        assert server.read_snapshots(read_end) == 0
        server.publish(healthy=True, live_workers=1)
        assert sample(scrape(server.port)[1], "image_result_tasks_total", status="completed", source="shm") == 2
    finally:
        os.close(read_end)
        os.close(write_end)


def test_healthz_follows_what_the_loop_publishes(endpoint, monkeypatch):
    server = endpoint()
    assert scrape(server.port, "/healthz") == (200, "ok\n")
    assert sample(scrape(server.port)[1], "image_result_ready") == 1
    monkeypatch.setattr(metrics, "LOOP_STALE_SECONDS", 0.0)  # a loop that stopped publishing
    assert scrape(server.port, "/healthz") == (503, "unhealthy\n")
    assert sample(scrape(server.port)[1], "image_result_ready") == 0
    monkeypatch.undo()
    server.publish(healthy=False, live_workers=1)
    assert scrape(server.port, "/healthz") == (503, "unhealthy\n")
    assert sample(scrape(server.port)[1], "image_result_ready") == 0
    server.child_restarted("worker")
    server.publish(healthy=True, live_workers=3)
    text = scrape(server.port)[1]
    assert sample(text, "image_result_ready") == 1
    assert sample(text, "image_result_workers") == 3
    assert sample(text, "image_result_child_restarts_total", role="worker") == 1
    assert sample(text, "image_result_queue_depth") == 3
    assert scrape(server.port, "/metrics?x=1")[0] == 200
    assert scrape(server.port, "/nowhere")[0] == 404


def test_a_failed_thread_is_recorded_and_can_be_started_again(endpoint, monkeypatch):
    server = endpoint()

    def broken(registry):
        raise RuntimeError("collector bug")

    monkeypatch.setattr(metrics, "generate_latest", broken)
    with connect(server.port) as client:
        client.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        wait_until(lambda: isinstance(server.failure, RuntimeError), 5, "the failure was not recorded")
        monkeypatch.undo()
        server.start()  # what the supervisor's loop does when it sees the failure
        assert dropped(client, within=5)
    assert server.failure is None
    assert scrape(server.port)[0] == 200


# ---------------------------------------------------------------- hostile clients against a real pool


def metrics_env(port: int) -> dict[str, str]:
    return {"METRICS_PORT": str(port), "METRICS_ADDRESS": "127.0.0.1"}


def any_worker(pool: Pool) -> tuple[int, int]:
    """(slot, pid) of a live worker."""
    for pid, title in pool.children_by_title().items():
        if ": worker " in title:
            return int(title.rsplit(" ", 1)[1]), pid
    raise AssertionError("no worker running")


def replaced(pool: Pool, slot: int, victim: int) -> bool:
    return any(
        event.get("role") == "worker" and event.get("slot") == slot and event.get("pid") != victim
        for event in pool.events("child_started")
    )


def trickle(sock: socket.socket, stop: threading.Event, outcome: dict[str, float]) -> None:
    """A slow-loris client: a byte of a request head a second, until the server hangs up."""
    started = time.monotonic()
    for byte in b"GET /metrics HTTP/1.1\r\n" + b"X" * 1000:
        if stop.wait(1.0):
            return
        try:
            sock.send(bytes([byte]))
        except OSError:
            outcome["dropped_after"] = time.monotonic() - started
            return


def test_idle_and_slow_clients_do_not_hold_up_the_pool(pool_factory):
    """The bug: clients of METRICS_PORT were served from the supervisor's loop,
    and a few idle ones delayed a dead worker's replacement by 10-28 s."""
    port = free_port()
    pool = pool_factory(workers=2, env=metrics_env(port))
    pool.wait_ready()
    idle = [connect(port) for _ in range(8)]
    loris, stop, outcome = connect(port), threading.Event(), {}
    trickler = threading.Thread(target=trickle, args=(loris, stop, outcome), daemon=True)
    trickler.start()
    try:
        time.sleep(2.5)  # the idle clients accepted, the slow one a few bytes in
        slot, victim = any_worker(pool)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: replaced(pool, slot, victim), 5, "the killed worker was not replaced within 5 s")
        assert scrape(port, "/healthz") == (200, "ok\n")  # a fresh client, answered within scrape's 5 s
        assert all(dropped(sock, within=10) for sock in idle), "an idle client was kept past its deadline"
        trickler.join(timeout=15)
        assert "dropped_after" in outcome, "the slow client was never dropped"
        assert scrape(port, "/healthz") == (200, "ok\n")
    finally:
        stop.set()
        for sock in [*idle, loris]:
            sock.close()
    assert pool.stop() == 0


def tcp_inodes(pid: int, *, local_port: int, remote_port: int | None = None) -> set[str]:
    """Socket inodes of 127.0.0.1 TCP sockets in pid's network namespace on
    local_port: the listener (remote port 0) or one connection."""
    found = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(address.split(":")[1], 16) for address in fields[1:3])
        if local == local_port and remote == (remote_port or 0):
            found.add(fields[9])
    return found


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets pid holds open."""
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            held.add(target[len("socket:[") : -1])
    return held


def test_children_hold_no_metrics_socket(pool_factory):
    """fork copies every descriptor: a child must close the listener and the
    clients' connections that the supervisor holds at the time of the fork."""
    port = free_port()
    pool = pool_factory(workers=2, env=metrics_env(port))
    pool.wait_ready()
    (listener,) = tcp_inodes(pool.pid, local_port=port)
    assert listener in socket_inodes(pool.pid)
    for pid in pool.child_pids():
        assert listener not in socket_inodes(pid), f"child {pid} holds the metrics listener"
    with connect(port) as client:
        connection = wait_until(
            lambda: tcp_inodes(pool.pid, local_port=port, remote_port=client.getsockname()[1]) & socket_inodes(pool.pid),
            5,
            "the supervisor never accepted the connection",
        )
        slot, victim = any_worker(pool)
        os.kill(victim, signal.SIGKILL)  # a fork while the connection is open
        wait_until(lambda: replaced(pool, slot, victim), 5, "the killed worker was not replaced")
        theirs = {listener, *connection}
        assert theirs <= socket_inodes(pool.pid), "the connection was dropped before the fork: nothing tested"
        children = pool.child_pids()
        assert len(children) == 3  # two workers and the ledger
        for pid in children:
            assert not socket_inodes(pid) & theirs, f"child {pid} holds a metrics socket"
    assert pool.stop() == 0
