"""Fixtures that own every real resource a test touches.

Each resource is released in a `finally` (or fixture teardown), so a failing or
timed-out test never leaves a redis-server, a pool process, a listening socket or
a /dev/shm segment behind.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import redis

from harness.http_server import HttpServer
from harness.photos import load_photos
from harness.pool import Pool
from harness.segments import SegmentTracker, unlink_segment
from image_result_client.protocol import SHM_DIR
from tools.local_redis import LocalRedis

# The fixtures that start a real process or server. A test that asks for one is
# not in-process, whatever its mark says.
REAL_RESOURCES = frozenset({"redis_server", "redis_client", "pool_factory", "http_server"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`-m fast` (make test-fast) is the in-process layer: a test marked fast that
    asks for a real resource is a mistake in its marks, said at collection."""
    for item in items:
        used = REAL_RESOURCES.intersection(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("fast") is not None and used:
            raise pytest.UsageError(f"{item.nodeid} is marked fast but uses {', '.join(sorted(used))}")


class LeavingTheProcess:
    """Counts what takes a test out of its process: a child started, a fork, a
    socket connected or bound. Installed once for the session."""

    count = 0

    @classmethod
    def install(cls) -> None:
        def counting(original: Callable) -> Callable:
            def call(*args: object, **kwargs: object) -> object:
                cls.count += 1
                return original(*args, **kwargs)

            return call

        subprocess.Popen._execute_child = counting(subprocess.Popen._execute_child)  # type: ignore[attr-defined]
        os.fork = counting(os.fork)
        for method in ("connect", "connect_ex", "bind"):
            setattr(socket.socket, method, counting(getattr(socket.socket, method)))


# Fixtures seen starting a process or opening a socket while being set up (any
# scope): a test that uses one is not in-process, even when the resource was
# made for an earlier test.
RESOURCE_FIXTURES: set[str] = set(REAL_RESOURCES)


def pytest_configure(config: pytest.Config) -> None:
    LeavingTheProcess.install()


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest) -> Iterator[object]:
    before = LeavingTheProcess.count
    try:
        return (yield)
    finally:
        if LeavingTheProcess.count != before:
            RESOURCE_FIXTURES.add(fixturedef.argname)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    before = LeavingTheProcess.count
    try:
        return (yield)
    finally:
        item.stash[LEFT_THE_PROCESS] = LeavingTheProcess.count != before


LEFT_THE_PROCESS = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[pytest.TestReport]:
    """The other half of the fast layer's promise: a test that passes without
    leaving its process, and uses no fixture that did, belongs in `make
    test-fast`, the loop run before each commit, so it must carry the mark."""
    report = yield
    in_process = not item.stash.get(LEFT_THE_PROCESS, True) and not RESOURCE_FIXTURES.intersection(
        getattr(item, "fixturenames", ())
    )
    if report.when == "call" and report.passed and in_process and item.get_closest_marker("fast") is None:
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} runs in process (no child, no socket, no such fixture): mark it @pytest.mark.fast"
    return report


@pytest.fixture(autouse=True)
def fast_tests_stay_in_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test marked fast starts no Python interpreter and no redis-server: the
    mark promises milliseconds, and `make test-fast` is run before every commit.
    A stand-in child such as `sleep` (a worker for the reaping decisions) is fine."""
    if request.node.get_closest_marker("fast") is None:
        return
    start_child = subprocess.Popen._execute_child  # type: ignore[attr-defined]

    def start_only_small_children(self: subprocess.Popen, args: object, *rest: object, **kwargs: object) -> None:
        argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)  # type: ignore[call-overload]
        program = os.path.basename(os.fsdecode(argv[0])) if argv else ""
        if program.startswith("python") or program == "redis-server" or os.fsdecode(argv[0]) == sys.executable:
            raise AssertionError(f"{request.node.nodeid} is marked fast but starts {program}: take the mark off")
        start_child(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "_execute_child", start_only_small_children)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    """A private redis-server for the whole session, on a free port.

    persist=True so restart() keeps queued messages, as a real Redis with AOF would.
    """
    server = LocalRedis(data_dir=tmp_path_factory.mktemp("redis"), persist=True)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_server: LocalRedis) -> Iterator[redis.Redis]:
    """A client on an empty database; restarts the server if a previous test left it stopped."""
    redis_server.start()
    client = redis.Redis.from_url(redis_server.url, decode_responses=False)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def queue_name() -> str:
    return "hosting_tasks_" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """astronaut, chelsea, coffee (BGR uint8) and camera (2-D grayscale); read-only."""
    return load_photos()


@pytest.fixture(autouse=True)
def segments() -> Iterator[SegmentTracker]:
    """Tracks segments made during the test and unlinks leftovers afterwards.

    Autouse so a test that calls make_segment/shm_message directly is covered too.
    """
    tracker = SegmentTracker()
    try:
        yield tracker
    finally:
        tracker.cleanup()


@pytest.fixture
def shm_prefix() -> Iterator[str]:
    """A segment name prefix of the test's own (inside the pool's SHM_NAME_PREFIX);
    whatever is left under it is unlinked afterwards."""
    prefix = f"img_shm_test_{uuid.uuid4().hex[:8]}_"
    try:
        yield prefix
    finally:
        for name in os.listdir(SHM_DIR):
            if name.startswith(prefix):
                unlink_segment(name)


@pytest.fixture
def http_server() -> Iterator[HttpServer]:
    server = HttpServer().start()
    try:
        yield server
    finally:
        server.stop()


PoolFactory = Callable[..., Pool]


@pytest.fixture
def pool_factory(tmp_path: Path, redis_server: LocalRedis, queue_name: str) -> Iterator[PoolFactory]:
    """Starts pools (not yet ready: call wait_ready()); every one is killed at teardown.

    Pools of one test share tmp_path/"out", so a restarted pool appends to the same ledger.
    """
    pools: list[Pool] = []

    def start(
        *,
        workers: int | None = 2,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        output_dir: Path | None = None,
        queue: str | None = None,
        script: str = "supervisor.py",
        cwd: Path | None = None,
        python: str = sys.executable,
    ) -> Pool:
        pool = Pool(
            workdir=tmp_path / f"pool{len(pools)}",
            output_dir=output_dir or tmp_path / "out",
            redis_url=redis_server.url,
            queue=queue or queue_name,
            workers=workers,
            env=dict(env or {}),
            args=tuple(args),
            script=script,
            cwd=cwd,
            python=python,
        )
        pools.append(pool)
        return pool.start()

    try:
        yield start
    finally:
        for pool in pools:
            pool.kill_all()
