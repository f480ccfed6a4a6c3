"""The per-outcome counts of acknowledgements, in 10-second buckets.

    {Q}:stats:<slot>  hash, slot = epoch seconds // STATS_BUCKET_SECONDS:
                      completed, failed, retried, expired; counted into by
                      the ledger's acknowledgement (shared/state/lua/ack.lua, HINCRBY)
                      and expiring 120 s after its last count

Read by `status` (the last minute, summed), the supervisor's `progress` line
(the buckets one by one, to count what each gained) and the dashboard (each
refresh's buckets, for its charts: shared.state.snapshot).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import redis

from image_result_client.protocol import STATS_BUCKET_SECONDS, QueueKeys

OUTCOMES = ("completed", "failed", "retried", "expired")

Counts = dict[str, int]


def bucket_counts(reply: Mapping[bytes, bytes]) -> Counts:
    """A bucket's HGETALL as counts, every outcome present; a field that is not
    a number counts 0 (anyone who can write to Redis may have written it)."""
    return {name: _number(reply.get(name.encode())) for name in OUTCOMES}


def _number(raw: bytes | None) -> int:
    try:
        return int(raw or 0)
    except ValueError:
        return 0


def slot_of(epoch_seconds: float) -> int:
    """The bucket counting acknowledgements at this time."""
    return int(epoch_seconds) // STATS_BUCKET_SECONDS


class OutcomeStats:
    """The stats buckets, on one client."""

    def __init__(self, client: redis.Redis, keys: QueueKeys) -> None:
        self.client = client
        self.keys = keys

    def key(self, slot: int) -> str:
        return self.keys.stats(slot * STATS_BUCKET_SECONDS)

    def buckets(self, slots: Iterable[int]) -> dict[int, Counts]:
        """slot -> its counts, for each of these buckets still in Redis (one round trip)."""
        slots = list(slots)
        with self.client.pipeline(transaction=False) as pipe:
            for slot in slots:
                pipe.hgetall(self.key(slot))
            replies = pipe.execute()
        return {slot: bucket_counts(reply) for slot, reply in zip(slots, replies, strict=True) if reply}

    def total(self, slots: Iterable[int]) -> Counts:
        """The counts of these buckets, summed."""
        totals = dict.fromkeys(OUTCOMES, 0)
        for counts in self.buckets(slots).values():
            for name in OUTCOMES:
                totals[name] += counts[name]
        return totals

    def last_minute(self, now: float) -> Counts:
        """The counts of the minute up to `now`: its bucket and the five before."""
        slot = slot_of(now)
        return self.total(range(slot, slot - 60 // STATS_BUCKET_SECONDS, -1))

    def buckets_and_waiting(self, slots: Sequence[int], lists: Sequence[str]) -> tuple[dict[int, Counts], int]:
        """The buckets still in Redis, by slot, and the tasks waiting in
        `lists`, in one round trip (the supervisor's `progress` line)."""
        with self.client.pipeline(transaction=True) as pipe:
            for slot in slots:
                pipe.hgetall(self.key(slot))
            for name in lists:
                pipe.llen(name)
            replies = pipe.execute()
        buckets = {slot: bucket_counts(reply) for slot, reply in zip(slots, replies, strict=False) if reply}
        return buckets, sum(replies[len(slots) :])
