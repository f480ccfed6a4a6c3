"""Progress in the supervisor's log: while there is work, one `progress` line
every PROGRESS_SECONDS (0: never), from counts Redis keeps already.

    ledger's acknowledgement --HINCRBY--> {Q}:stats:<slot> (10-second buckets)
    supervisor, at most every SAMPLE_SECONDS: the buckets around now and the
        waiting lists' lengths (one round trip: shared.state.stats) --what each bucket gained
        since the last read--> the counts since the last line
    every PROGRESS_SECONDS: `progress` (completed, failed, retried, rate,
        waiting, eta_s), unless nothing was done and nothing waits

Nothing here touches a worker or the ledger. The counts are the queue's: with
several pools on one queue, each logs the same numbers, the rate at which the
queue drains and so the time it will take.

Hazards handled here:
- A bucket is still counted into after its 10 s (acknowledgements under way,
  another host's clock a little off): each read takes the buckets from the one
  before the last read to the one after now, and counts what each gained.
- A bucket expires 120 s after its last count: reads come at least every
  SAMPLE_SECONDS, and after a long Redis outage the counts of buckets gone
  meanwhile are lost, never counted twice.
"""

from __future__ import annotations

from collections.abc import Mapping

from image_result_client.protocol import STATS_BUCKET_SECONDS
from shared.state.stats import Counts, OutcomeStats

# The outcomes a progress line reports; the buckets also count how many of the failed expired.
OUTCOMES = ("completed", "failed", "retried")
SAMPLE_SECONDS = 10.0
# A bucket lives 120 s after its last count: older ones are not worth reading.
OLDEST_BUCKETS = 110 // STATS_BUCKET_SECONDS



def tally(seen: dict[int, Counts], read: Mapping[int, Counts], *, forget_before: int) -> Counts:
    """What the buckets `read` gained since they were last `seen`; `seen` is
    brought up to date and forgets buckets before `forget_before`."""
    gained = dict.fromkeys(OUTCOMES, 0)
    for slot, counts in read.items():
        before = seen.get(slot, {})
        for name in OUTCOMES:
            gained[name] += max(0, counts.get(name, 0) - before.get(name, 0))
        seen[slot] = dict(counts)
    for slot in [slot for slot in seen if slot < forget_before]:
        del seen[slot]
    return gained


def progress_fields(counts: Counts, *, seconds: float, waiting: int) -> dict | None:
    """A `progress` line's fields, or None when idle: nothing done, nothing waiting.
    The rate counts tasks that left for good (completed or failed)."""
    if not any(counts.values()) and waiting == 0:
        return None
    rate = (counts["completed"] + counts["failed"]) / seconds if seconds > 0 else 0.0
    return {
        **counts,
        "rate_per_s": round(rate, 2),
        "waiting": waiting,
        "eta_s": round(waiting / rate) if rate > 0 else None,
        "over_s": round(seconds, 1),
    }


class ProgressMeter:
    """The supervisor's reader of the stats buckets; one `step` per loop pass."""

    def __init__(self) -> None:
        self.seen: dict[int, Counts] = {}
        self.counted = dict.fromkeys(OUTCOMES, 0)  # since the last line
        self.last_slot: int | None = None  # of the last read
        self.line_started = 0.0
        self.sample_due = 0.0

    def step(
        self, stats: OutcomeStats, *, every: float, waiting_lists: tuple[str, ...], now: float, wall_now: float
    ) -> dict | None:
        """Read when due (now: time.monotonic()); the fields of a `progress`
        line when one is due and there is work, else None. `waiting_lists`:
        the lists whose tasks are the pool's to do."""
        if every <= 0:
            self.last_slot = None  # should a reload turn it on, start afresh
            return None
        if now < self.sample_due:
            return None
        slot = int(wall_now) // STATS_BUCKET_SECONDS
        first = slot - 1 if self.last_slot is None else max(self.last_slot - 1, slot - OLDEST_BUCKETS)
        slots = range(first, slot + 2)
        buckets, waiting = stats.buckets_and_waiting(slots, waiting_lists)
        read = {bucket: buckets.get(bucket, {}) for bucket in slots}  # a bucket gone counts as empty
        self.sample_due = now + min(every, SAMPLE_SECONDS)
        gained = tally(self.seen, read, forget_before=slot - OLDEST_BUCKETS)
        if self.last_slot is None:  # the first read only learns where the counts stand
            self.last_slot, self.line_started = slot, now
            return None
        self.last_slot = slot
        for name in OUTCOMES:
            self.counted[name] += gained[name]
        if now - self.line_started < every:
            return None
        fields = progress_fields(self.counted, seconds=now - self.line_started, waiting=waiting)
        self.counted, self.line_started = dict.fromkeys(OUTCOMES, 0), now
        return fields
