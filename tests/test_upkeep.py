"""The supervisor's chores in Redis (control/upkeep.py) against a real
redis-server that is away, then back on the same port: what could not be done
is kept and done on a later pass, with one warning per outage."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from structlog.testing import capture_logs

from control.upkeep import PoolUpkeep
from image_result_client.protocol import QueueKeys
from shared.config import Settings
from shared.ipc.sdnotify import Notifier
from shared.state.pool_registry import PoolRegistry
from shared.state.redis_queue import ReliableQueue, ScriptCall, connect
from shared.state.request_state import EXPIRE_BATCH, CountedImage
from tools.local_redis import LocalRedis, free_port


@pytest.fixture
def redis_later(tmp_path: Path) -> Iterator[LocalRedis]:
    """A Redis on a port chosen now, started when the test says so; its data
    outlives a stop (append-only file), as a production Redis's does."""
    server = LocalRedis(port=free_port(), data_dir=tmp_path / "redis", persist=True)
    try:
        yield server
    finally:
        server.stop()


def upkeep_for(server: LocalRedis, tmp_path: Path, queue_name: str) -> PoolUpkeep:
    settings = Settings.from_env(
        {"REDIS_URL": server.url, "OUTPUT_DIR": str(tmp_path / "out"), "HOSTING_TASKS_QUEUE": queue_name},
        dotenv_path=None,
    )
    queue = ReliableQueue(connect(settings), QueueKeys(queue_name), max_message_bytes=1 << 20)
    return PoolUpkeep(
        settings, instance="i1", queue=queue, registry=PoolRegistry(queue.client, queue.keys), notifier=Notifier()
    )


def test_a_dead_workers_list_waits_out_a_redis_outage_and_is_requeued_after(redis_later, tmp_path, queue_name):
    redis_later.start()
    upkeep = upkeep_for(redis_later, tmp_path, queue_name)
    keys = upkeep.keys
    processing = keys.processing("i1", "w1")
    producers = redis.Redis.from_url(redis_later.url)
    producers.rpush(queue_name, b'{"n": 1}', b'{"n": 2}')
    upkeep.queue.register(processing)
    claimed = upkeep.queue.claim(processing, count=2)  # a fair share of the backlog: one
    claimed += upkeep.queue.claim(processing, count=2)
    assert len(claimed) == 2
    redis_later.stop()

    upkeep.requeue_later(processing, 1)  # the worker died with one task not started
    with capture_logs() as logs:
        for _ in range(3):  # three passes while Redis is away
            upkeep.requeue_lists()
    assert upkeep.lists_to_requeue == [(processing, 1)]
    assert [entry["log_level"] for entry in logs if entry["event"] == "requeue_failed"] == ["warning", "debug", "debug"]

    redis_later.start()
    with capture_logs() as logs:
        upkeep.requeue_lists()
    assert upkeep.lists_to_requeue == []
    assert [entry["event"] for entry in logs] == ["redis_reconnected", "tasks_requeued"]
    producers = redis.Redis.from_url(redis_later.url)
    assert producers.lrange(queue_name, 0, -1) == [b'{"n": 1}', b'{"n": 2}']  # the producer's bytes, in order
    assert producers.llen(processing) == 0


def test_the_lease_is_renewed_at_once_when_the_state_changes_and_otherwise_every_third_of_its_ttl(
    redis_later, tmp_path, queue_name
):
    redis_later.start()
    upkeep = upkeep_for(redis_later, tmp_path, queue_name)
    states = iter(b'{"n": %d}' % n for n in range(1, 100))
    renew = lambda: upkeep.renew_lease(lambda: next(states), serving_host=None)  # noqa: E731
    lease = upkeep.keys.lease("i1")
    client = redis.Redis.from_url(redis_later.url)

    renew()
    renew()  # within LEASE_TTL/3: nothing is written
    assert client.get(lease) == b'{"n": 1}'
    upkeep.state_changed()
    renew()
    assert client.get(lease) == b'{"n": 2}'
    assert 0 < client.pttl(lease) <= upkeep.settings.lease_ttl * 1000

    redis_later.stop()
    upkeep.state_changed()
    with capture_logs() as logs:
        renew()
    assert [entry["event"] for entry in logs] == ["lease_renewal_failed"]
    redis_later.start()
    renew()  # the state changed while Redis was away: the next pass writes it
    assert redis.Redis.from_url(redis_later.url).get(lease) == b'{"n": 4}'


def test_requests_past_request_ttl_end_in_batches_within_one_pass(redis_later, tmp_path, queue_name):
    """Producers open requests far faster than one batch a second would end
    them; a pass ends batch after batch (for a bounded time), and a backlog left
    then is taken at the very next pass."""
    redis_later.start()
    upkeep = upkeep_for(redis_later, tmp_path, queue_name)
    ping = upkeep.queue.client.register_script("return 1")
    long_ago = time.time() - upkeep.settings.request_ttl - 60
    images = [
        CountedImage(f"r{n}", "only-one-of-two", 2, True, b'{"image_id": "only-one-of-two"}', f"t{n}")
        for n in range(5 * EXPIRE_BATCH)
    ]
    upkeep.requests.count_with(ScriptCall(ping, [], []), images, now=long_ago)

    upkeep.expire_requests()
    left = upkeep.queue.client.zcard(upkeep.keys.open_requests)
    assert left < 4 * EXPIRE_BATCH, f"one pass ended {5 * EXPIRE_BATCH - left}, one batch at most"
    upkeep.expire_requests()  # a backlog is not kept waiting a second
    upkeep.expire_requests()
    assert upkeep.queue.client.zcard(upkeep.keys.open_requests) == 0
