"""Redis at the pool's start: a refusal no wait can change (wrong credentials,
an ACL without a command the pool sends, a database the server lacks) is one
line naming REDIS_URL, password redacted, and exit 2; a network error is still
waited out, and its log line keeps the reason.

A private redis-server with `requirepass` and an ACL user made from the
shipped configs/redis-acl.conf; the real supervisor.
"""

from __future__ import annotations

import re
import secrets
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from harness import REPO_ROOT
from harness.pool import Pool
from shared.state.redis_queue import is_refusal
from tests.helpers import wait_until
from tools.local_redis import LocalRedis, free_port

QUEUE = "hosting_tasks"  # the names the shipped ACL file's patterns are for
POOL_USER = "image-result-worker"
ACL_FILE = REPO_ROOT / "configs" / "redis-acl.conf"
REFUSED_WITHIN = 20.0


@dataclass(frozen=True)
class Guarded:
    """A private server whose default user has a password, and a pool user
    made from the shipped ACL line without `+set` (the lease the pool renews)."""

    port: int
    password: str
    pool_password: str

    def url(self, credentials: str = "", database: int = 0) -> str:
        return f"redis://{credentials}127.0.0.1:{self.port}/{database}"


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Guarded]:
    server = LocalRedis(data_dir=tmp_path / "redis")
    server.start()
    password, pool_password = secrets.token_hex(8), secrets.token_hex(8)
    admin = redis.Redis(port=server.port)
    try:
        [line] = [line for line in ACL_FILE.read_text().splitlines() if line.startswith(f"user {POOL_USER} ")]
        rules = line.split()[2:]
        assert "+set" in rules
        rules = [f">{pool_password}" if rule.startswith(">") else rule for rule in rules if rule != "+set"]
        admin.execute_command("ACL", "SETUSER", POOL_USER, *rules)
        admin.config_set("requirepass", password)
        admin.close()
        yield Guarded(server.port, password, pool_password)
    finally:
        admin.close()
        with redis.Redis(port=server.port, password=password) as unlocked:
            unlocked.config_set("requirepass", "")  # so that stop() may ask it to shut down
        server.stop()


def start_pool(tmp_path: Path, redis_url: str, **env: str) -> Pool:
    return Pool(
        workdir=tmp_path / "pool", output_dir=tmp_path / "out", redis_url=redis_url, queue=QUEUE, env=env
    ).start()


def complaints(pool: Pool) -> list[str]:
    return [line for line in pool.stderr_text().splitlines() if line.startswith("image-result-worker:")]


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("wrong password", "invalid username-password pair"),
        ("no password", "Authentication required"),
        ("no such database", "DB index is out of range"),
        ("ACL without a command the pool needs", "no permissions to run the 'set' command"),
    ],
)
def test_a_permanent_refusal_is_one_line_naming_redis_url_and_exit_2(
    guarded: Guarded, tmp_path: Path, case: str, why: str
) -> None:
    url, secret = {
        "wrong password": (guarded.url(":not-it@"), "not-it"),
        "no password": (guarded.url(), None),
        "no such database": (guarded.url(f":{guarded.password}@", database=99), guarded.password),
        "ACL without a command the pool needs": (
            guarded.url(f"{POOL_USER}:{guarded.pool_password}@"),
            guarded.pool_password,
        ),
    }[case]
    pool = start_pool(tmp_path, url)
    try:
        code = pool.wait_exit(REFUSED_WITHIN)
    finally:
        pool.kill_all()

    [line] = complaints(pool)
    assert code == 2, pool.stderr_tail()
    assert line.startswith("image-result-worker: REDIS_URL='redis://"), line
    assert re.search(why, line), line
    assert secret is None or secret not in pool.stderr_text()
    assert "Traceback" not in pool.stderr_text()
    assert pool.events("redis_unavailable") == []  # refused once, not retried
    assert pool.events("child_started") == []


def test_a_network_error_is_retried_and_its_console_line_keeps_the_reason(tmp_path: Path) -> None:
    """Nothing listens: the pool waits, logging why on each attempt, and a
    SIGTERM still ends it cleanly."""
    pool = start_pool(tmp_path, f"redis://127.0.0.1:{free_port()}/0", LOG_FORMAT="console")
    try:
        wait_until(lambda: pool.stderr_text().count("redis_unavailable") >= 2, 30, "no second attempt")
        lines = [line for line in pool.stderr_text().splitlines() if "redis_unavailable" in line]
        assert pool.poll() is None
        assert all("Connection refused" in line for line in lines), lines
        assert complaints(pool) == []
        assert pool.stop(signal.SIGTERM, before_ready=True) == 0
    finally:
        pool.kill_all()


@pytest.mark.fast
def test_which_redis_errors_are_refusals() -> None:
    assert is_refusal(redis.AuthenticationError("invalid username-password pair or user is disabled."))
    assert is_refusal(redis.exceptions.NoPermissionError("this user has no permissions to run the 'set' command"))
    assert is_refusal(redis.ResponseError("DB index is out of range"))
    assert not is_refusal(redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."))
    assert not is_refusal(redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"))
    assert not is_refusal(redis.exceptions.ReadOnlyError("You can't write against a read only replica."))
    assert not is_refusal(redis.TimeoutError("Timeout reading from socket"))
