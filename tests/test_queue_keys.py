"""Keys and moves of the reliable queue: every key of a queue lives in the
queue's Redis Cluster hash slot, so each Lua script touches one slot; a
requeue counts only the tasks that were started; the producers' lists hold
only the bytes producers pushed, whatever those bytes are."""

from __future__ import annotations

import json
import time

import pytest
from redis.crc import key_slot

from image_result_client.protocol import QueueKeys
from shared.config import ConfigError, Settings
from shared.messages import Envelope, parse_envelope
from shared.state.redis_queue import CLAIM_CYCLE, Acknowledgement, ReliableQueue


@pytest.mark.fast
@pytest.mark.parametrize("queue", ["hosting_tasks", "tasks:eu-west", "{tenant-7}:hosting", "eu:{tenant-7}"])
def test_every_key_shares_the_queue_slot(queue: str) -> None:
    keys = QueueKeys(queue)
    all_keys = [
        keys.registry, keys.dead, keys.announced, keys.delayed, keys.stats(1_700_000_000),
        keys.processing("instance1", "w42"), keys.lease("instance1"), keys.host("gpu-3"), keys.live_host("gpu-3"),
        keys.committing, keys.wait_sources, keys.redelivery, keys.incoming(keys.processing("instance1", "w42")),
        keys.request('"{other}"'), keys.request('"}x{"'), keys.open_requests, keys.ended_requests,
        keys.unwritten_requests("gpu-3"),
    ]
    assert {key_slot(key.encode()) for key in all_keys} == {key_slot(queue.encode())}


@pytest.mark.fast
def test_processing_lists_name_their_instance() -> None:
    keys = QueueKeys("hosting_tasks")
    assert keys.instance_of(keys.processing("abc123", "w7")) == "abc123"
    assert keys.instance_of("{other}:processing:abc123:w7") is None


@pytest.mark.fast
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
    first = [parse_envelope(raw) for raw in queue.claim(processing, count=4)]
    assert len(first) == 4

    assert queue.requeue(processing, 3) == 4  # died while running the first

    again = [parse_envelope(raw) for raw in queue.claim(processing, count=4)]
    assert [(e.body, e.deliveries) for e in again] == [
        (b'{"n": 1}', 2), (b'{"n": 2}', 1), (b'{"n": 3}', 1), (b'{"n": 4}', 1)
    ]
    assert [e.task_id for e in again] == [e.task_id for e in first]  # same identities
    queue.requeue(processing)  # nothing known about what ran: every task counts
    assert [parse_envelope(raw).deliveries for raw in queue.claim(processing, count=4)] == [3, 2, 2, 2]


def test_a_claim_takes_at_most_half_of_what_waits(redis_client, queue_name: str) -> None:
    """So that the last tasks of a burst spread over the workers instead of
    queueing behind each other in one of them."""
    queue = ReliableQueue(redis_client, QueueKeys(queue_name), max_message_bytes=1 << 20)
    processing = QueueKeys(queue_name).processing("instance1", "w1")
    redis_client.rpush(queue_name, *[b"{}"] * 20)
    taken = [len(queue.claim(processing, count=8)) for _ in range(8)]
    assert taken == [8, 6, 3, 1, 1, 1, 0, 0]


def test_a_message_moved_but_never_wrapped_goes_back_to_the_list_it_came_from(redis_client, queue_name: str) -> None:
    """A worker waiting on its host's queue is stopped (or killed) after BLMOVE
    moved a shared-memory task into its incoming list and before the task got
    its envelope. It must go back to the host queue, not to the shared one
    where another host would look for the segment."""
    keys = QueueKeys(queue_name)
    host_queue = keys.host("gpu-3")
    queue = ReliableQueue(redis_client, keys, max_message_bytes=1 << 20, host_queue=host_queue)
    processing = keys.processing("instance1", "w1")
    queue.register(processing)
    message = b'{"request_id": "r1", "image_id": "i1", "shm_info": "seg_1"}'
    redis_client.rpush(host_queue, message)
    assert redis_client.blmove(host_queue, keys.incoming(processing), 1, "LEFT", "RIGHT") == message  # the wait

    assert queue.requeue(processing) == 1
    assert redis_client.lrange(host_queue, 0, -1) == [message]
    assert redis_client.llen(queue_name) == 0
    assert not redis_client.hexists(keys.wait_sources, processing) and not redis_client.sismember(keys.registry, processing)


# Messages that look like the pool's own envelopes, or are not text at all.
FORGED = [
    b"irw2 0123456789abcdef01234567 1 5 s\n{}",
    b"irw1 victim-1-1 1 2 hosting_tasks\n{}",
    b"irw1 x 1 99999999 {other_app}:jobs\n" + b"x" * 100,
    b"\xff\xfe not utf-8 \x00",
    b"",
]


def claim_all(queue: ReliableQueue, processing: str) -> list[Envelope]:
    """Claim until the queue is empty (one claim takes at most half of it)."""
    claimed: list[Envelope] = []
    while batch := queue.claim(processing, count=32):
        claimed += [parse_envelope(raw) for raw in batch]
    return claimed


def test_every_message_is_wrapped_whatever_it_starts_with(redis_client, queue_name: str) -> None:
    """A message that starts like one of the pool's envelopes is a producer's
    message like any other: it gets a fresh identity and its bytes as the body,
    so it can neither take another task's id nor name a list to go back to."""
    queue = ReliableQueue(redis_client, QueueKeys(queue_name), max_message_bytes=1 << 20)
    processing = QueueKeys(queue_name).processing("instance1", "w1")
    redis_client.rpush(queue_name, *FORGED)
    claimed = claim_all(queue, processing)
    assert [e.body for e in claimed] == FORGED
    assert {e.deliveries for e in claimed} == {1}
    assert not {e.task_id for e in claimed} & {"0123456789abcdef01234567", "victim-1-1", "x"}


def test_requeue_puts_back_exactly_the_bytes_producers_pushed(redis_client, queue_name: str) -> None:
    """A requeue (a dead worker, a stop) and a due retry return producers' bytes
    to the producers' lists, never the pool's envelopes; the identity stays
    behind, and the next claim of the message takes it up again."""
    keys = QueueKeys(queue_name)
    queue = ReliableQueue(redis_client, keys, max_message_bytes=1024)
    processing = keys.processing("instance1", "w1")
    queue.register(processing)
    oversized = json.dumps({"request_id": "r", "image_id": "i", "pad": "x" * 5000}).encode()
    pushed = [*FORGED, oversized, b'{"n": 1}']
    redis_client.rpush(queue_name, *pushed)
    first = claim_all(queue, processing)
    assert len(first) == len(pushed)
    assert [e.truncated for e in first] == [m is oversized for m in pushed]  # the worker sees at most 1024 bytes

    assert queue.requeue(processing) == len(pushed)
    assert redis_client.lrange(queue_name, 0, -1) == pushed
    assert not redis_client.exists("{other_app}:jobs")  # the list a forged envelope named

    again = claim_all(queue, processing)
    assert [(e.task_id, e.deliveries) for e in again] == [(e.task_id, 2) for e in first]

    # A transient failure of the last one: into the delayed set, then due.
    retried = again[-1]
    acknowledge(
        queue,
        [Acknowledgement(processing, retried.raw, "retry", retried.task_id, retry_at=time.time() - 1)],
        counts={}, dead_letter_max=10, now=time.time(),
    )
    assert queue.promote_due_retries(time.time()) == 1
    assert redis_client.lrange(queue_name, -1, -1) == [b'{"n": 1}']
    (promoted,) = [parse_envelope(raw) for raw in queue.claim(processing, count=1)]
    assert (promoted.task_id, promoted.deliveries, promoted.body) == (retried.task_id, 3, b'{"n": 1}')



def acknowledge(queue: ReliableQueue, acks: list[Acknowledgement], **options: object) -> None:
    """What the ledger does with a batch's acknowledgement, without the request count."""
    call = queue.acknowledgement(acks, **options)
    call.script(keys=call.keys, args=call.args)


def test_a_message_cut_for_the_worker_is_acknowledged_whole(redis_client, queue_name: str) -> None:
    """The worker holds only the first MAX_MESSAGE_BYTES of a large message;
    acknowledging what it holds removes the whole envelope."""
    keys = QueueKeys(queue_name)
    queue = ReliableQueue(redis_client, keys, max_message_bytes=1024)
    processing = keys.processing("instance1", "w1")
    redis_client.rpush(queue_name, b"y" * 1_500_000)
    (held,) = [parse_envelope(raw) for raw in queue.claim(processing, count=1)]
    assert held.truncated and len(held.raw) < 1100
    acknowledge(
        queue,
        [Acknowledgement(processing, held.raw, "final", held.task_id, dead_letter=b"{}")],
        counts={"failed": 1}, dead_letter_max=10, now=time.time(),
    )
    assert redis_client.llen(processing) == 0
    assert redis_client.llen(keys.dead) == 1


def test_task_ids_are_random_not_a_sequence(redis_client, queue_name: str) -> None:
    """Task ids appear in results.json; none may tell another."""
    queue = ReliableQueue(redis_client, QueueKeys(queue_name), max_message_bytes=1024)
    processing = QueueKeys(queue_name).processing("instance1", "w1")
    redis_client.rpush(queue_name, *[b"{}"] * 64)
    ids = [parse_envelope(raw).task_id for raw in queue.claim(processing, count=32)]
    assert len(set(ids)) == len(ids)
    assert all(len(task_id) == 24 and int(task_id, 16) >= 0 for task_id in ids)
    assert len({task_id[:8] for task_id in ids}) == len(ids)  # no shared prefix to count on


@pytest.mark.parametrize("count", [1, 32])
def test_neither_the_hosts_queue_nor_the_shared_queue_starves_the_other(
    redis_client, queue_name: str, count: int
) -> None:
    """While both hold tasks, one claim in CLAIM_CYCLE goes to the shared queue
    first and the rest to the host's queue first, whether claims take one task
    or many; once one queue is empty, the other gives everything."""
    keys = QueueKeys(queue_name)
    host_queue = keys.host("h1")
    queue = ReliableQueue(redis_client, keys, max_message_bytes=1 << 20, host_queue=host_queue)
    processing = keys.processing("instance1", "w1")
    redis_client.rpush(host_queue, *[b'{"from": "host"}'] * 400)
    redis_client.rpush(queue_name, *[b'{"from": "shared"}'] * 40)
    origins: list[str] = []
    while len(origins) < 160:
        origins += [parse_envelope(raw).body.decode()[10:-2] for raw in queue.claim(processing, count=count)]
    first = origins[:160]
    assert first.count("shared") == 160 // CLAIM_CYCLE and first.count("host") == 160 - 160 // CLAIM_CYCLE
    while batch := queue.claim(processing, count=count):
        origins += [parse_envelope(raw).body.decode()[10:-2] for raw in batch]
    assert origins.count("shared") == 40 and origins.count("host") == 400
    assert set(origins[-100:]) == {"host"}  # the shared queue ran dry first; the host's gave the rest
