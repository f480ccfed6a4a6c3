"""The hardened HTTP base (control/http_base.py), tested once for both of the
pool's ports: every test below runs against METRICS_PORT's endpoint and
against the dashboard, each a real server on 127.0.0.1 over a real Redis.
Hostile clients: idle and slow-loris connections, oversized requests, a cap
on connections, floods of connects from a process of their own (as an
attacker's are, so that they cannot starve the test of the GIL); then a port
already taken, for each of the two commands that listen.

The request parser's decisions are also tested in-process, in milliseconds."""

from __future__ import annotations

import dataclasses
import http.client
import multiprocessing
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import pytest
import redis

from control.dashboard import make_server
from control.http_base import LIMITS, HardenedHTTPServer, Refusal, parse_request
from control.metrics import MetricsEndpoint
from image_result_client.protocol import QueueKeys
from shared.config import Settings
from shared.state.pool_registry import PoolRegistry
from shared.state.redis_queue import ReliableQueue
from tests.helpers import REPO_ROOT, operator_env, wait_until

pytestmark = pytest.mark.timeout(90)

HOST = "127.0.0.1"
# What each port answers 200 to: a scrape, and the page's read of Redis.
PROBES = {"metrics": "/healthz", "dashboard": "/api/overview"}


# ---------------------------------------------------------------- the parser's decisions


def parse(data: bytes, **limits) -> object:
    try:
        return parse_request(data, client=HOST, limits=dataclasses.replace(LIMITS, **limits))
    except Refusal as refused:
        return refused.status


@pytest.mark.fast
@pytest.mark.parametrize(
    ("data", "outcome"),
    [
        (b"GET / HTTP/1.1\r\nHost: x", None),  # more to come
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "GET /"),
        (b"GET / HTTP/1.1\nHost: x\n\n", "GET /"),
        (b"POST /a HTTP/1.1\r\nContent-Length: 4\r\n\r\n{}", None),  # its body is not all in
        (b"POST /a HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", "POST /a"),
        (b"POST /a HTTP/1.1\r\nContent-Length: 5000\r\n\r\n", HTTPStatus.REQUEST_ENTITY_TOO_LARGE),
        (b"POST /a HTTP/1.1\r\nContent-Length: \xc2\xb2\r\n\r\n", HTTPStatus.BAD_REQUEST),  # a superscript two
        (b"POST /a HTTP/1.1\r\nContent-Length: -1\r\n\r\n", HTTPStatus.BAD_REQUEST),
        # int() refuses 4,301 digits and more with a ValueError, which ended the I/O thread.
        (b"POST /a HTTP/1.1\r\nContent-Length: " + b"9" * 4301 + b"\r\n\r\n", HTTPStatus.REQUEST_ENTITY_TOO_LARGE),
        (b"POST /a HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", HTTPStatus.BAD_REQUEST),
        (b"POST /a HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}", "POST /a"),
        (b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", HTTPStatus.LENGTH_REQUIRED),
        (b"GET /\r\n\r\n", HTTPStatus.BAD_REQUEST),
        (b"GET / SPDY/3\r\n\r\n", HTTPStatus.BAD_REQUEST),
        (b"GET /" + b"a" * 20_000, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE),  # no end in sight
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n", HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE),
        (b"GET / HTTP/1.1\r\n" + b"X: a\r\n" * 200 + b"\r\n", HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE),
    ],
)
def test_what_the_parser_passes_on_and_what_it_refuses(data: bytes, outcome) -> None:
    parsed = parse(data)
    if isinstance(outcome, str):
        assert f"{parsed.method} {parsed.target}" == outcome
    else:
        assert parsed == outcome


# ---------------------------------------------------------------- both ports, real servers


@pytest.fixture(params=sorted(PROBES))
def port_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def serve(port_kind: str, redis_server, redis_client: redis.Redis, queue_name: str, tmp_path: Path) -> Iterator:
    """Starts the port under test with the given limits (LIMITS otherwise); closes each at the end."""
    made: list[HardenedHTTPServer] = []
    keys = QueueKeys(queue_name)

    def make(**limits) -> HardenedHTTPServer:
        chosen = dataclasses.replace(LIMITS, **limits)
        if port_kind == "metrics":
            queue = ReliableQueue(redis_client, keys, max_message_bytes=1 << 20)
            server: HardenedHTTPServer = MetricsEndpoint(
                address=HOST, port=0, registry=PoolRegistry(redis_client, keys), queue=queue, limits=chosen
            )
            server.start()
            server.publish(healthy=True, live_workers=1)
        else:
            env = {"REDIS_URL": redis_server.url, "HOSTING_TASKS_QUEUE": queue_name, "OUTPUT_DIR": str(tmp_path)}
            server = make_server(Settings.from_env(env, dotenv_path=None), address=HOST, port=0, limits=chosen)
            server.start()
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            server.close()


def probe(server: HardenedHTTPServer, kind: str, *, timeout: float = 5) -> int:
    """The status of a fresh client's request for the port's probe path."""
    connection = http.client.HTTPConnection(HOST, server.port, timeout=timeout)
    try:
        connection.request("GET", PROBES[kind])
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def connect(port: int) -> socket.socket:
    return socket.create_connection((HOST, port), timeout=10)


def slow_client(port: int) -> socket.socket:
    """A client that sends the start of a request and never its end (a slow loris)."""
    sock = connect(port)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1")
    return sock


def answer_or_drop(sock: socket.socket, within: float) -> bytes | None:
    """What the server sent before closing sock (b"" for a bare close or a
    reset), or None if it is still open after `within`."""
    sock.settimeout(within)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        return None
    return received


def test_idle_and_slow_clients_are_dropped_at_their_deadline(serve, port_kind) -> None:
    server = serve(deadline=0.5)
    idle, slow = connect(server.port), slow_client(server.port)
    try:
        # The idle one reaches accept() after TCP_DEFER_ACCEPT's second or so, then has its 0.5 s.
        assert answer_or_drop(idle, within=8) == b"" and answer_or_drop(slow, within=8) == b""
        assert probe(server, port_kind) == 200
    finally:
        idle.close()
        slow.close()


def test_an_oversized_request_is_refused_at_once(serve, port_kind) -> None:
    server = serve()  # the deadline is 10 s; the caps act at once
    with connect(server.port) as client:
        client.sendall(b"GET /" + b"a" * (LIMITS.max_head_bytes + 1))
        reply = answer_or_drop(client, within=3)
    assert reply is not None and (reply == b"" or reply.startswith(b"HTTP/1.1 431")), reply
    with connect(server.port) as client:
        client.sendall(f"POST / HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {LIMITS.max_body_bytes + 1}\r\n\r\n".encode())
        reply = answer_or_drop(client, within=3)
    assert reply is not None and reply.startswith(b"HTTP/1.1 413"), reply
    with connect(server.port) as client:
        client.sendall(f"POST / HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        reply = answer_or_drop(client, within=3)
    assert reply is not None and reply.startswith(b"HTTP/1.1 411"), reply
    assert probe(server, port_kind) == 200


def test_a_content_length_of_thousands_of_digits_is_refused_and_the_port_serves_on(serve, port_kind) -> None:
    """Python's int() raises past 4,300 digits; that ended the thread serving every client."""
    server = serve()
    for _ in range(3):
        with connect(server.port) as client:
            client.sendall(f"POST / HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {'9' * 5000}\r\n\r\n".encode())
            reply = answer_or_drop(client, within=3)
        assert reply is not None and reply.startswith(b"HTTP/1.1 413"), reply
    assert server.failure is None
    assert probe(server, port_kind) == 200


def test_beyond_the_cap_the_oldest_client_still_sending_is_dropped(serve, port_kind) -> None:
    server = serve(deadline=60, max_connections=4)
    slow = []
    try:
        for _ in range(10):
            slow.append(slow_client(server.port))
            time.sleep(0.01)  # taken in this order
        assert probe(server, port_kind) == 200  # would wait 60 s without room
        assert answer_or_drop(slow[0], within=5) == b""
        assert answer_or_drop(slow[-1], within=0.2) is None
    finally:
        for sock in slow:
            sock.close()


def test_connections_that_send_nothing_take_no_room(serve, port_kind) -> None:
    """On Linux the kernel holds back a connection until its request arrives
    (TCP_DEFER_ACCEPT): idle ones, however many, are not in the way."""
    if not hasattr(socket, "TCP_DEFER_ACCEPT"):
        pytest.skip("TCP_DEFER_ACCEPT is Linux's")
    server = serve(deadline=60, max_connections=4, defer_accept=30)
    idle = [connect(server.port) for _ in range(50)]
    try:
        assert [probe(server, port_kind) for _ in range(5)] == [200] * 5
        # None was taken in, so none was evicted to make room (46 would be, at a cap of 4).
        assert all(answer_or_drop(sock, within=0.02) is None for sock in idle)
    finally:
        for sock in idle:
            sock.close()


def open_connections(port: int, limit: int, partial: bool, opened: Synchronized, stop: EventType) -> None:
    """A flood: up to `limit` connections opened as fast as they go, each
    sending nothing or (partial) the start of a request; held until stop."""
    flood: list[socket.socket] = []
    while not stop.is_set() and len(flood) < limit:
        try:
            sock = connect(port)
            if partial:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1")
            flood.append(sock)
        except OSError:
            time.sleep(0.001)
        opened.value = len(flood)
    stop.wait(60)
    for sock in flood:
        sock.close()


def flooding(port: int, *, limit: int, partial: bool) -> tuple[Synchronized, Callable[[], bool], Callable[[], None]]:
    """Starts a flood in a process of its own: (how many it opened, whether it
    is still at it, how to end it)."""
    context = multiprocessing.get_context("spawn")  # no fork of a process running a server's threads
    opened, stop = context.Value("i", 0), context.Event()
    flooder = context.Process(target=open_connections, args=(port, limit, partial, opened, stop), daemon=True)
    flooder.start()

    def end() -> None:
        stop.set()
        flooder.join(timeout=10)
        if flooder.is_alive():
            flooder.kill()
            flooder.join()

    return opened, flooder.is_alive, end


def test_a_flood_of_connects_does_not_cost_a_request_its_answer(serve, port_kind) -> None:
    """A client that opens connections as fast as it can once made every
    other scrape fail: the eviction took connections whose request was in."""
    server = serve(deadline=60, max_connections=8)
    opened, alive, end = flooding(server.port, limit=2000, partial=False)
    try:
        # Ask only once the flood is well past the cap, so the test cannot pass by asking before it began.
        wait_until(lambda: opened.value >= 50, 30, "the flood never opened 50 connections")
        answers = [probe(server, port_kind) for _ in range(20)]
        flooding_throughout = opened.value < 2000 and alive()
    finally:
        end()
    assert answers == [200] * 20
    assert flooding_throughout


def test_65_slow_connections_do_not_wedge_the_port(serve, port_kind) -> None:
    """Issue 19: at its cap of 64 the dashboard closed the 65th connection
    under a lock that closing takes again, and never answered anything again."""
    server = serve()  # the limits as shipped
    opened, _, end = flooding(server.port, limit=LIMITS.max_connections + 1, partial=True)
    try:
        wait_until(lambda: opened.value == LIMITS.max_connections + 1, 30, "the flood never opened its connections")
        time.sleep(0.5)  # each has reached accept() (its bytes are in), the last one past the cap
        assert probe(server, port_kind) == 200
    finally:
        end()
    assert probe(server, port_kind) == 200  # and after it


# ---------------------------------------------------------------- a port already taken


def held_port() -> Iterator[int]:
    with socket.create_server((HOST, 0)) as listener:  # a real listener, as another program's
        yield listener.getsockname()[1]


@pytest.fixture
def busy_port() -> Iterator[int]:
    yield from held_port()


def one_line_and_exit_2(result: subprocess.CompletedProcess, *names: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and all(name in lines[0] for name in names), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "already in use" in lines[0]


def test_the_dashboard_on_a_busy_port_is_one_line_and_exit_2(busy_port, redis_server, queue_name, tmp_path) -> None:
    env = operator_env(redis_url=redis_server.url, queue=queue_name, output_dir=tmp_path)
    env["DASHBOARD_ADDRESS"] = HOST
    for args, extra in [(["--port", str(busy_port)], {}), ([], {"DASHBOARD_PORT": str(busy_port)})]:
        result = subprocess.run(
            [sys.executable, "supervisor.py", "dashboard", *args], cwd=REPO_ROOT, env={**env, **extra},
            capture_output=True, text=True, timeout=30,
        )
        one_line_and_exit_2(result, "DASHBOARD_PORT", str(busy_port))


def test_the_pool_on_a_busy_metrics_port_is_one_line_and_exit_2(busy_port, redis_server, queue_name, tmp_path) -> None:
    env = operator_env(redis_url=redis_server.url, queue=queue_name, output_dir=tmp_path)  # exists: no log line
    env.update(METRICS_PORT=str(busy_port), METRICS_ADDRESS=HOST, WORKERS="1")
    result = subprocess.run(
        [sys.executable, "supervisor.py"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    one_line_and_exit_2(result, "METRICS_PORT", str(busy_port))

