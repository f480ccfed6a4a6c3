"""The owners of the pool's Redis state (shared/state/, shared/state/pool_registry.py):
each read method against a real redis-server, on keys set up with known
content; and, in-process, the decisions they make about what they read."""

from __future__ import annotations

import json

import pytest
import redis

from image_result_client.protocol import STATS_BUCKET_SECONDS, QueueKeys
from shared.state.dead_letters import DeadLetters
from shared.state.leases import lease_states
from shared.state.pool_registry import PoolRegistry
from shared.state.reading import glob_escape, json_object, list_pages, scan_prefix
from shared.state.redis_queue import ReliableQueue
from shared.state.results_stream import ResultsStream
from shared.state.stats import bucket_counts, slot_of

pytestmark = pytest.mark.timeout(60)

# The start of a stats bucket, far from now: no live bucket of another test.
WALL = 1_000_000.0 * STATS_BUCKET_SECONDS
SLOT = slot_of(WALL)


@pytest.fixture
def registry(redis_client: redis.Redis, queue_name: str) -> PoolRegistry:
    return PoolRegistry(redis_client, QueueKeys(queue_name))


def letter(number: int) -> bytes:
    return json.dumps({"task_id": f"t{number}", "message": json.dumps({"request_id": f"r{number}"})}).encode()


# -- decisions, in-process --------------------------------------------------------------


@pytest.mark.fast
def test_a_stats_bucket_reads_every_outcome_and_counts_what_is_not_a_number_as_zero():
    assert bucket_counts({b"completed": b"7", b"failed": b"x", b"other": b"3"}) == {
        "completed": 7, "failed": 0, "retried": 0, "expired": 0,
    }
    assert slot_of(WALL + STATS_BUCKET_SECONDS - 0.5) == SLOT and slot_of(WALL + STATS_BUCKET_SECONDS) == SLOT + 1


@pytest.mark.fast
def test_only_a_json_object_is_a_lease_state_and_scan_patterns_match_literally():
    assert lease_states([b'{"host_id": "a"}', None, b"[1]", b"not json", b'{"host_id": "b"}']) == [
        {"host_id": "a"}, {"host_id": "b"},
    ]
    assert json_object(b"[" * 100_000) is None  # too deep: RecursionError, not a crash
    assert glob_escape("q[1]*?\\") == "q\\[1\\]\\*\\?\\\\"


# -- reading ---------------------------------------------------------------------------------


def test_scan_prefix_finds_keys_literally_and_says_when_it_stopped_early(redis_client, queue_name):
    prefix = f"{queue_name}:a*b:"
    redis_client.set(prefix + "1", b"x")
    redis_client.set(prefix + "2", b"x")
    redis_client.set(f"{queue_name}:aXb:3", b"x")  # what an unescaped * would match
    found, complete = scan_prefix(redis_client, prefix, max_calls=None)
    assert sorted(found) == [(prefix + "1").encode(), (prefix + "2").encode()] and complete
    redis_client.mset({f"{queue_name}:filler:{n}": b"x" for n in range(50)})
    _, complete = scan_prefix(redis_client, prefix, max_calls=1, count=2)
    assert not complete


def test_list_pages_reads_oldest_or_newest_first_up_to_a_limit(redis_client, queue_name):
    redis_client.rpush(queue_name, *[b"e%d" % n for n in range(7)])
    assert list(list_pages(redis_client, queue_name, limit=None, page_size=3)) == [(n, b"e%d" % n) for n in range(7)]
    assert list(list_pages(redis_client, queue_name, limit=4, newest_first=True, page_size=3)) == [
        (-1, b"e6"), (-2, b"e5"), (-3, b"e4"), (-4, b"e3"),
    ]


def test_leases_are_renewed_read_one_or_all_and_dropped(registry, redis_client):
    leases = registry.leases
    leases.renew("inst1", 30, json.dumps({"host_id": "h1"}).encode(), serving_host="h1")
    leases.renew("inst2", 30, json.dumps({"host_id": "h2"}).encode())
    redis_client.set(registry.keys.lease("junk"), b"not a state")
    assert redis_client.get(registry.keys.live_host("h1")) == b"inst1"
    assert leases.held("inst1") and not leases.held("gone")
    assert leases.state("inst1") == {"host_id": "h1"}
    assert leases.state("gone") is None and leases.state("junk") is None
    assert leases.states() == {"inst1": {"host_id": "h1"}, "inst2": {"host_id": "h2"}}
    found = leases.found()
    assert sorted(found) == sorted(registry.keys.lease(i).encode() for i in ("inst1", "inst2", "junk"))
    assert sorted(s["host_id"] for s in leases.states_at(found)) == ["h1", "h2"]
    assert leases.states_at([]) == []
    leases.drop("inst1")
    assert not leases.held("inst1") and list(leases.states()) == ["inst2"]


def test_stats_are_read_per_bucket_summed_and_with_the_waiting_lists(registry, redis_client, queue_name):
    stats = registry.stats
    redis_client.hset(stats.key(SLOT), mapping={"completed": 5, "failed": 1})
    redis_client.hset(stats.key(SLOT - 1), mapping={"completed": 2, "retried": 3, "expired": 1})
    redis_client.hset(stats.key(SLOT - 6), mapping={"completed": 100})  # more than a minute before
    assert registry.keys.stats(WALL) == stats.key(SLOT)
    assert stats.buckets([SLOT, SLOT - 1, SLOT - 2]) == {
        SLOT: {"completed": 5, "failed": 1, "retried": 0, "expired": 0},
        SLOT - 1: {"completed": 2, "failed": 0, "retried": 3, "expired": 1},
    }
    assert stats.total([SLOT, SLOT - 1]) == {"completed": 7, "failed": 1, "retried": 3, "expired": 1}
    assert stats.last_minute(WALL + 9) == {"completed": 7, "failed": 1, "retried": 3, "expired": 1}
    redis_client.rpush(queue_name, b"a", b"b")
    redis_client.rpush(registry.keys.host("h1"), b"c")
    buckets, waiting = stats.buckets_and_waiting(range(SLOT - 1, SLOT + 2), (queue_name, registry.keys.host("h1")))
    assert sorted(buckets) == [SLOT - 1, SLOT] and buckets[SLOT]["completed"] == 5 and waiting == 3


def test_dead_letters_are_counted_paged_and_read_one_at_a_time(registry, redis_client):
    letters = registry.dead_letters
    entries = [letter(n) for n in range(5)]
    redis_client.rpush(registry.keys.dead, *entries)
    redis_client.hset(registry.keys.dead_trimmed, mapping={"failed": 4, "junk": 2})
    assert letters.key == registry.keys.dead and letters.count() == 5
    assert letters.at(0) == entries[0] and letters.at(-1) == entries[4] and letters.at(5) is None
    assert letters.page(1, 2) == entries[1:3] and letters.page(0, -1) == entries
    assert list(letters.entries(page_size=2)) == list(enumerate(entries))
    assert list(letters.entries(limit=2, newest_first=True)) == [(-1, entries[4]), (-2, entries[3])]
    assert letters.trimmed() == {"failed": 4, "junk": 2}
    redis_client.hset(registry.keys.dead_trimmed, "failed", b"many")
    with pytest.raises(ValueError):
        letters.trimmed()  # the ledger's look waits for the next one


def test_dead_letters_are_requeued_once_and_purged_either_way(registry, redis_client, queue_name):
    letters, junk = registry.dead_letters, registry.junk_dead_letters
    redis_client.rpush(registry.keys.dead, letter(1), letter(2))
    redis_client.rpush(registry.keys.dead_junk, letter(3))
    assert junk.key == registry.keys.dead_junk and junk.count() == 1 and junk.at(0) == letter(3)
    assert letters.requeue(letter(1), b'{"request_id": "r1"}')
    assert not letters.requeue(letter(1), b'{"request_id": "r1"}')  # moved already
    assert redis_client.lrange(queue_name, 0, -1) == [b'{"request_id": "r1"}'] and letters.count() == 1
    assert junk.requeue(letter(3), b"{}") and junk.count() == 0
    assert letters.purge() == 1 and letters.count() == 0
    redis_client.rpush(registry.keys.dead, letter(4))
    assert letters.purge(in_background=True) == 1 and not redis_client.exists(registry.keys.dead)
    assert DeadLetters(redis_client, registry.keys).purge() == 0


def test_task_lists_read_lengths_pages_processing_lists_and_entries_in_hand(registry, redis_client, queue_name):
    lists, keys = registry.task_lists, registry.keys
    redis_client.rpush(queue_name, b"m0", b"m1", b"m2")
    first, second = keys.processing("inst1", "w1"), keys.processing("inst1", "w2")
    redis_client.sadd(keys.registry, second, first)
    redis_client.rpush(first, b"done", b"in hand", b"unstarted")
    assert lists.length(queue_name) == 3 and lists.length(second) == 0
    assert lists.lengths([queue_name, first, second]) == [3, 3, 0]
    assert lists.all_entries(queue_name) == [b"m0", b"m1", b"m2"]
    assert list(lists.entries(queue_name, limit=2)) == [(0, b"m0"), (1, b"m1")]
    assert list(lists.entries(queue_name, limit=None, newest_first=True)) == [(-1, b"m2"), (-2, b"m1"), (-3, b"m0")]
    assert lists.processing_lists() == [first.encode(), second.encode()]
    assert lists.entries_at({"a": (first, -2), "b": (second, -1)}) == {"a": b"in hand", "b": None}
    assert lists.entries_at({}) == {}


def test_task_lists_read_the_delayed_retries_and_the_committing_count(registry, redis_client):
    lists, keys = registry.task_lists, registry.keys
    assert lists.delayed_count() == 0 and lists.delayed_page(0, 10) == []
    redis_client.zadd(keys.delayed, {b"later": 200.0, b"sooner": 100.0, b"last": 300.0})
    redis_client.hset(keys.committing, mapping={"t1": keys.host("h1"), "t2": keys.host("h1")})
    assert lists.delayed_count() == 3
    assert lists.delayed_page(1, 5) == [(b"later", 200.0), (b"last", 300.0)]
    assert lists.committing_count() == 2


def test_the_results_stream_is_read_backwards_a_page_at_a_time(redis_client, queue_name):
    name = queue_name + ":results"
    ids = [redis_client.xadd(name, {"record": b'{"n": %d}' % n}) for n in range(5)]
    stream = ResultsStream(redis_client, name)
    page = stream.newest(2)
    assert [entry_id for entry_id, _ in page] == [ids[4], ids[3]] and page[0][1] == {b"record": b'{"n": 4}'}
    assert [entry_id for entry_id, _ in stream.newest(10, before=page[-1][0])] == [ids[2], ids[1], ids[0]]
    redis_client.set(name, b"not a stream")
    with pytest.raises(redis.exceptions.ResponseError):
        stream.newest(1)


def test_depths_and_orphaned_lists_come_from_the_owners(registry, redis_client, queue_name):
    keys = registry.keys
    alive, orphan = keys.processing("alive", "w1"), keys.processing("dead", "w1")
    redis_client.sadd(keys.registry, alive, orphan)
    redis_client.rpush(alive, b"e1", b"e2")
    redis_client.rpush(queue_name, b"m")
    redis_client.zadd(keys.delayed, {b"d": 1.0})
    redis_client.rpush(keys.dead, letter(1))
    redis_client.rpush(keys.dead_junk, letter(2), letter(3))
    redis_client.hset(keys.dead_trimmed, "junk", 7)
    registry.leases.renew("alive", 30)
    depths = registry.depths()
    assert (depths.waiting, depths.delayed, depths.dead, depths.junk) == (1, 1, 1, 2)
    assert depths.in_flight_by_list == {alive: 2, orphan: 0} and depths.trimmed == {"junk": 7}
    assert registry.orphaned_lists() == [orphan]


def test_depths_take_two_round_trips_however_many_processing_lists(registry, redis_client, queue_name):
    keys = registry.keys
    lists = [keys.processing("inst1", f"w{n}") for n in range(5)]
    redis_client.sadd(keys.registry, *lists)
    for name in lists:
        redis_client.rpush(name, b"e")
    redis_client.rpush(keys.dead, letter(1))
    redis_client.hset(keys.dead_trimmed, "failed", 3)
    pipelines, commands = [], []
    execute, execute_command = redis.client.Pipeline.execute, redis.Redis.execute_command

    def counted(pipe, *args, **kwargs):
        pipelines.append(len(pipe.command_stack))
        return execute(pipe, *args, **kwargs)

    def direct(client, *args, **kwargs):
        commands.append(args[0])
        return execute_command(client, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(redis.client.Pipeline, "execute", counted)
        patch.setattr(redis.Redis, "execute_command", direct)
        depths = registry.depths()
    assert len(pipelines) == 2 and commands == []
    assert depths.in_flight_by_list == dict.fromkeys(lists, 1) and depths.in_flight == 5
    assert (depths.waiting, depths.delayed, depths.dead, depths.junk, depths.trimmed) == (0, 0, 1, 0, {"failed": 3})


def test_the_snapshot_reads_everything_the_overview_shows_in_two_round_trips(registry, redis_client, queue_name):
    keys = registry.keys
    listed = keys.processing("inst1", "w1")
    redis_client.rpush(queue_name, b"a", b"b", b"c")
    redis_client.sadd(keys.registry, listed)
    redis_client.rpush(listed, b"e1", b"e2")
    redis_client.zadd(keys.delayed, {b"d1": 500.0, b"d2": 400.0})
    redis_client.rpush(keys.dead, *[letter(n) for n in range(4)])
    redis_client.hset(keys.committing, "t1", keys.host("h1"))
    redis_client.hset(registry.stats.key(SLOT), "completed", 4)
    redis_client.hset(registry.stats.key(SLOT - 2), "failed", 1)
    redis_client.rpush(keys.host("h1"), b"x")
    redis_client.set(keys.host("h2"), b"not a list")  # a key of another type reads as 0
    stream = queue_name + ":results"
    redis_client.xadd(stream, {"record": b"{}"})
    registry.leases.renew("inst1", 30, json.dumps({"instance": "inst1"}).encode())  # found by its processing list
    registry.leases.renew("inst2", 30, json.dumps({"instance": "inst2"}).encode())  # found by the last SCAN
    calls = []
    execute = redis.client.Pipeline.execute

    def counted(pipe, *args, **kwargs):
        calls.append(len(pipe.command_stack))
        return execute(pipe, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(redis.client.Pipeline, "execute", counted)
        snapshot = registry.snapshots.read(
            slot=SLOT, buckets=3, hosts=["h1", "h2"], known_leases={keys.lease("inst2").encode()},
            newest_dead=2, stream=stream, stream_count=5,
        )
    assert len(calls) == 2
    assert (snapshot.waiting, snapshot.delayed, snapshot.dead, snapshot.committing) == (3, 2, 4, 1)
    assert snapshot.next_due == 400.0
    assert snapshot.newest_dead == [letter(3), letter(2)]
    assert snapshot.buckets == {
        SLOT: {"completed": 4, "failed": 0, "retried": 0, "expired": 0},
        SLOT - 2: {"completed": 0, "failed": 1, "retried": 0, "expired": 0},
    }
    assert snapshot.host_depths == {"h1": 1, "h2": 0}
    assert snapshot.stream_page is not None and snapshot.stream_page[0][1] == {b"record": b"{}"}
    assert snapshot.in_flight == {listed: 2} and snapshot.in_flight_total == 2
    assert sorted(state["instance"] for state in snapshot.leases) == ["inst1", "inst2"]
    quiet = registry.snapshots.read(
        slot=SLOT, buckets=1, hosts=[], known_leases=set(), newest_dead=1, stream=None, stream_count=5
    )
    assert quiet.stream_page is None and [state["instance"] for state in quiet.leases] == ["inst1"]


def test_the_queue_answers_a_ping(redis_client, queue_name):
    ReliableQueue(redis_client, QueueKeys(queue_name), max_message_bytes=1024).ping()
