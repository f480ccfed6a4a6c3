"""Producers may create any `{Q}:host:*` key (their ACL allows it): with
100,000 of them in a real Redis, `status`, `task` and the dashboard's page
read and show a bounded part (the served hosts' queues and the fullest
others, the rest as one count), and still show a served host's queue.

Asserted on what a person gets (lines, bytes), not on time."""

from __future__ import annotations

import http.client
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from control.dashboard import make_server
from image_result_client.protocol import QueueKeys
from shared.config import Settings
from shared.state.pool_registry import HOST_QUEUES_LISTED
from tests.helpers import operator_command

pytestmark = pytest.mark.timeout(120)

FAKE_HOSTS = 100_000
TASK = json.dumps({"request_id": "waiting-1", "image_id": "i", "image_url": "http://x.invalid/a.png"})


@pytest.fixture(scope="module")
def queue_name() -> str:
    return f"host_flood_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def flooded(redis_server, queue_name: str) -> Iterator[QueueKeys]:
    """100,000 host queues of one entry each, as a producer could make them,
    and one real host: a supervisor's lease naming it and a task in its queue.
    Made once for the module's tests, which only read."""
    keys = QueueKeys(queue_name)
    redis_client = redis.Redis.from_url(redis_server.url)
    with redis_client.pipeline(transaction=False) as pipe:
        for index in range(FAKE_HOSTS):
            pipe.rpush(keys.host(f"fake-{index:06d}"), b"x")
            if index % 10_000 == 9_999:
                pipe.execute()
        pipe.execute()
    lease = {
        "instance": "inst1", "host": "box", "host_id": "real-host", "pid": 10, "ready": True, "desired_workers": 1,
        "updated_at": time.time(), "workers": [], "ledger": None,
    }
    redis_client.set(keys.lease("inst1"), json.dumps(lease), ex=60)
    redis_client.rpush(keys.host("real-host"), TASK)
    try:
        yield keys
    finally:
        found = list(redis_client.scan_iter(match=f"{keys.prefix}:*", count=10_000))
        for start in range(0, len(found), 10_000):
            redis_client.unlink(*found[start : start + 10_000])
        redis_client.close()


def test_status_lists_the_served_host_and_counts_the_rest(flooded, redis_server, queue_name, tmp_path: Path) -> None:
    result = operator_command("status", redis_url=redis_server.url, queue=queue_name, output_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) < HOST_QUEUES_LISTED + 15, lines[:5]
    assert "host real-host: 1 waiting in its own queue" in lines
    others = FAKE_HOSTS + 1 - 1 - HOST_QUEUES_LISTED  # all but the served one and those listed
    summary = [line for line in lines if "more host queues with no supervisor" in line]
    assert summary and f"and {others} more host queues" in summary[0], summary

    result = operator_command("status", "--json", redis_url=redis_server.url, queue=queue_name, output_dir=tmp_path)
    report = json.loads(result.stdout)
    assert len(result.stdout) < 20_000
    assert report["host_queues"]["real-host"] == 1 and len(report["host_queues"]) == HOST_QUEUES_LISTED + 1
    # Depths past the first HOST_DEPTHS_READ are not read: the rest are counted, their tasks not.
    assert report["host_queues_unlisted"] == {"queues": others, "waiting": None, "complete": True}


def test_task_reads_a_bounded_part_and_says_what_it_did_not(flooded, redis_server, queue_name, tmp_path: Path) -> None:
    result = operator_command("task", "waiting-1", redis_url=redis_server.url, queue=queue_name, output_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "real-host" in result.stdout  # found in the served host's queue
    lines = result.stdout.splitlines()
    assert len(lines) < 20, lines
    assert any("host queues with no supervisor" in line for line in lines), lines


def test_the_dashboards_overview_stays_small(flooded, redis_server, queue_name, tmp_path: Path) -> None:
    env = {"REDIS_URL": redis_server.url, "HOSTING_TASKS_QUEUE": queue_name, "OUTPUT_DIR": str(tmp_path)}
    server = make_server(Settings.from_env(env, dotenv_path=None), address="127.0.0.1", port=0)
    server.start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request("GET", "/api/overview")
        response = connection.getresponse()
        body = response.read()
        connection.close()
    finally:
        server.close()
    assert response.status == 200
    assert len(body) < 50_000, len(body)  # 745 KB before
    overview = json.loads(body)
    assert len(overview["host_queues"]) <= HOST_QUEUES_LISTED + 1
    assert overview["host_queues_unlisted"]["queues"] >= FAKE_HOSTS - HOST_QUEUES_LISTED - 1 or not (
        overview["host_queues_unlisted"]["complete"]
    )
