"""Keys and moves of the reliable queue: every key of a queue lives in the
queue's Redis Cluster hash slot, so each Lua script touches one slot; a
requeue counts only the tasks that were started."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from shared.config import ConfigError, Settings
from shared.messages import parse_envelope
from shared.redis_queue import QueueKeys, ReliableQueue


@pytest.mark.parametrize("queue", ["hosting_tasks", "tasks:eu-west", "{tenant-7}:hosting", "eu:{tenant-7}"])
def test_every_key_shares_the_queue_slot(queue: str) -> None:
    keys = QueueKeys(queue)
    all_keys = [
        keys.registry, keys.dead, keys.announced, keys.delayed, keys.stats(1_700_000_000),
        keys.processing("instance1", "w42"), keys.lease("instance1"), keys.host("gpu-3"), keys.live_host("gpu-3"),
        keys.committing, keys.wait_sources,
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


def test_requeue_does_not_count_claimed_but_unstarted_tasks(redis_client, queue_name: str) -> None:
    """A worker claims several tasks at once; when it dies on the first, the
    others were never started and must not lose an attempt to it."""
    queue = ReliableQueue(redis_client, QueueKeys(queue_name), max_message_bytes=1 << 20)
    processing = QueueKeys(queue_name).processing("instance1", "w1")
    redis_client.rpush(queue_name, *[b'{"n": %d}' % n for n in range(1, 9)])
    assert len(queue.claim(processing, count=4, id_prefix="a")) == 4

    assert queue.requeue(processing, 3) == 4  # died while running the first

    again = [parse_envelope(raw) for raw in queue.claim(processing, count=4, id_prefix="b")]
    assert [(e.body, e.deliveries) for e in again] == [
        (b'{"n": 1}', 2), (b'{"n": 2}', 1), (b'{"n": 3}', 1), (b'{"n": 4}', 1)
    ]
    assert [e.task_id for e in again] == ["a-1", "a-2", "a-3", "a-4"]  # same identities
    queue.requeue(processing)  # nothing known about what ran: every task counts
    assert [parse_envelope(raw).deliveries for raw in queue.claim(processing, count=4, id_prefix="c")] == [3, 2, 2, 2]


def test_a_claim_takes_at_most_half_of_what_waits(redis_client, queue_name: str) -> None:
    """So that the last tasks of a burst spread over the workers instead of
    queueing behind each other in one of them."""
    queue = ReliableQueue(redis_client, QueueKeys(queue_name), max_message_bytes=1 << 20)
    processing = QueueKeys(queue_name).processing("instance1", "w1")
    redis_client.rpush(queue_name, *[b"{}"] * 20)
    taken = [len(queue.claim(processing, count=8, id_prefix=f"p{i}")) for i in range(8)]
    assert taken == [8, 6, 3, 1, 1, 1, 0, 0]


def test_a_message_moved_but_never_stamped_goes_back_to_the_list_it_came_from(redis_client, queue_name: str) -> None:
    """A worker waiting on its host's queue is stopped (or killed) after BLMOVE
    moved a shared-memory task into its processing list and before the task got
    its envelope. The raw message names no origin; it must go back to the host
    queue, not to the shared one where another host would look for the segment."""
    keys = QueueKeys(queue_name)
    host_queue = keys.host("gpu-3")
    queue = ReliableQueue(redis_client, keys, max_message_bytes=1 << 20, host_queue=host_queue)
    processing = keys.processing("instance1", "w1")
    queue.register(processing)
    message = b'{"request_id": "r1", "image_id": "i1", "shm_info": "seg_1"}'
    redis_client.rpush(host_queue, message)
    assert redis_client.blmove(host_queue, processing, 1, "LEFT", "RIGHT") == message  # the wait, unanswered

    assert queue.requeue(processing) == 1
    assert redis_client.lrange(host_queue, 0, -1) == [message]
    assert redis_client.llen(queue_name) == 0
    assert not redis_client.hexists(keys.wait_sources, processing) and not redis_client.sismember(keys.registry, processing)
