"""Every key of a queue lives in the queue's Redis Cluster hash slot, so each
Lua script touches one slot."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from shared.config import ConfigError, Settings
from shared.redis_queue import QueueKeys


@pytest.mark.parametrize("queue", ["hosting_tasks", "tasks:eu-west", "{tenant-7}:hosting", "eu:{tenant-7}"])
def test_every_key_shares_the_queue_slot(queue: str) -> None:
    keys = QueueKeys(queue)
    all_keys = [
        keys.registry, keys.dead, keys.announced, keys.delayed, keys.stats(1_700_000_000),
        keys.processing("instance1", "w42"), keys.lease("instance1"),
    ]
    assert {key_slot(key.encode()) for key in all_keys} == {key_slot(queue.encode())}


def test_processing_lists_name_their_instance() -> None:
    keys = QueueKeys("hosting_tasks")
    assert keys.instance_of(keys.processing("abc123", "w7")) == "abc123"
    assert keys.instance_of("{other}:processing:abc123:w7") is None


@pytest.mark.parametrize("queue", ["odd}{name", "x}", "{}", "a{b"])
def test_braces_that_are_no_hash_tag_are_refused(queue: str) -> None:
    with pytest.raises(ConfigError, match="hash tag"):
        Settings.from_env({"HOSTING_TASKS_QUEUE": queue}, dotenv_path=None)
