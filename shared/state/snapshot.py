"""The dashboard's view of the pool, read in two round trips, whatever the
queue's depth.

    first:  LLEN {Q}, SMEMBERS {Q}:processing, ZCARD and the first of
            {Q}:delayed, LLEN and the newest entries of {Q}:dead, HLEN
            {Q}:committing, HGETALL of the stats buckets, LLEN of the listed
            host queues, XREVRANGE of the results stream
    second: LLEN of each processing list, MGET of the leases (those known
            from the last SCAN, and those of the processing lists' instances)

The Overview polls once a second for every browser (control/dashboard_data.py):
two pipelines of O(1) commands keep that well under a millisecond of Redis
time. The keys and what their values mean are their owners': shared.state's
leases, stats and dead_letters modules, task_lists, results_stream.

Hazards handled here:
- A connection error or a timeout anywhere raises (the Overview keeps its last
  figures). Any other error in an answer (a key of the wrong type) reads as
  nothing there: 0, no entries, no bucket.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import redis

from image_result_client.protocol import QueueKeys
from shared.state.leases import lease_states
from shared.state.results_stream import StreamEntry
from shared.state.stats import Counts, OutcomeStats, bucket_counts


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    waiting: int
    delayed: int
    dead: int
    committing: int
    next_due: float | None  # when the first delayed retry is due (epoch seconds)
    newest_dead: list[bytes]  # newest first
    buckets: dict[int, Counts]  # slot -> counts, for the buckets still in Redis
    host_depths: dict[str, int]  # of the host queues asked for, in their order
    stream_page: list[StreamEntry] | None  # newest first; None: not read, or not a stream
    in_flight: dict[str, int]  # processing list -> tasks in it
    leases: list[dict]  # the supervisors' states

    @property
    def in_flight_total(self) -> int:
        return sum(self.in_flight.values())


class SnapshotReader:
    """Reads a PoolSnapshot, on one client."""

    def __init__(self, client: redis.Redis, keys: QueueKeys) -> None:
        self.client = client
        self.keys = keys
        self._stats = OutcomeStats(client, keys)

    def read(
        self,
        *,
        slot: int,
        buckets: int,
        hosts: Sequence[str],
        known_leases: Collection[bytes],
        newest_dead: int,
        stream: str | None,
        stream_count: int,
    ) -> PoolSnapshot:
        """The snapshot, with the `buckets` stats buckets up to `slot`, the
        depths of `hosts`' queues, the `newest_dead` newest dead letters and,
        with a `stream`, its `stream_count` newest entries."""
        keys = self.keys
        slots = [slot - back for back in range(buckets)]
        with self.client.pipeline(transaction=False) as pipe:
            pipe.llen(keys.queue)
            pipe.smembers(keys.registry)
            pipe.zcard(keys.delayed)
            pipe.llen(keys.dead)
            pipe.hlen(keys.committing)
            pipe.zrange(keys.delayed, 0, 0, withscores=True)
            pipe.lrange(keys.dead, -newest_dead, -1)
            for bucket in slots:
                pipe.hgetall(self._stats.key(bucket))
            for host_id in hosts:
                pipe.llen(keys.host(host_id))
            if stream is not None:
                pipe.xrevrange(stream, count=stream_count)
            first = _answers(pipe.execute(raise_on_error=False))
        waiting, registry, delayed, dead, committing, next_due, dead_raw = first[:7]
        bucket_replies = first[7 : 7 + len(slots)]
        host_replies = first[7 + len(slots) : 7 + len(slots) + len(hosts)]
        stream_page = first[7 + len(slots) + len(hosts)] if stream is not None else None
        lists = sorted(registry or set())
        lease_keys = sorted(set(known_leases) | {keys.lease(i).encode() for i in _instances(keys, lists)})
        with self.client.pipeline(transaction=False) as pipe:
            for name in lists:
                pipe.llen(name)
            if lease_keys:
                pipe.mget(lease_keys)
            second = _answers(pipe.execute(raise_on_error=False))
        return PoolSnapshot(
            waiting=_count(waiting),
            delayed=_count(delayed),
            dead=_count(dead),
            committing=_count(committing),
            next_due=next_due[0][1] if next_due else None,
            newest_dead=list(reversed(dead_raw or [])),
            buckets={
                bucket: bucket_counts(reply)
                for bucket, reply in zip(slots, bucket_replies, strict=True)
                if isinstance(reply, dict) and reply
            },
            host_depths={host_id: _count(depth) for host_id, depth in zip(hosts, host_replies, strict=True)},
            stream_page=stream_page if isinstance(stream_page, list) else None,
            in_flight={
                name.decode(errors="backslashreplace"): _count(n) for name, n in zip(lists, second, strict=False)
            },
            leases=lease_states(second[len(lists)] or []) if lease_keys else [],
        )


def _instances(keys: QueueKeys, lists: list[bytes]) -> set[str]:
    instances = set()
    for name in lists:
        instance = keys.instance_of(name.decode(errors="surrogateescape"))
        if instance:
            instances.add(instance)
    return instances


def _answers(replies: list) -> list:
    """The pipeline's answers, with None for an error in one; a lost connection raises."""
    for reply in replies:
        if isinstance(reply, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
            raise reply
    return [None if isinstance(reply, Exception) else reply for reply in replies]


def _count(value: object) -> int:
    """A count Redis answered, or 0 for an error in its place (a key of the wrong type)."""
    return value if isinstance(value, int) else 0
