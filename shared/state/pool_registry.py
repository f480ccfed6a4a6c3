"""What the pool keeps about itself in Redis, beside the task path
(shared.state.redis_queue): how deep every list is, the host queues, the processing
lists whose owner died, and the operator's moves on a lost host's queue.

    {Q}:host:<HOST_ID>  list: read here (host_queues), drained here (drain_host_entry)
    {Q}:redelivery      hash: the identity a requeued message keeps (identity_left)

The registry holds the owners of the rest, so that a caller asks the one
registry it has (`registry.dead_letters.page(...)`):

    leases             {Q}:lease:<instance>, {Q}:live_host:<HOST_ID>  (shared.state.leases)
    stats              {Q}:stats:<slot>                             (shared.state.stats)
    dead_letters       {Q}:dead, {Q}:dead:trimmed                   (shared.state.dead_letters)
    junk_dead_letters  {Q}:dead:junk                                (shared.state.dead_letters)
    task_lists         reads of {Q}, {Q}:host:*, {Q}:processing[:*],
                       {Q}:delayed, {Q}:committing                  (shared.state.task_lists)
    snapshots          the dashboard's batch of them all            (shared.state.snapshot)

Each supervisor renews its lease every LEASE_TTL/3; the processing lists of an
instance whose lease expired (the whole tree was killed) are requeued by
whichever supervisor notices first (with ReliableQueue.requeue).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass, field

import redis

from image_result_client.protocol import QueueKeys
from shared.state.dead_letters import DeadLetters, trimmed_counts
from shared.state.leases import Leases
from shared.state.reading import scan_prefix
from shared.state.redis_queue import DRAIN_ENTRY_SCRIPT
from shared.state.snapshot import SnapshotReader
from shared.state.stats import OutcomeStats
from shared.state.task_lists import TaskLists


@dataclass(frozen=True, slots=True)
class QueueDepths:
    waiting: int
    in_flight_by_list: dict[str, int]
    delayed: int
    dead: int
    junk: int = 0  # dead letters of messages without a request id, in their own list
    trimmed: dict[str, int] = field(default_factory=dict)  # dead letters pushed out by the caps, by kind

    @property
    def in_flight(self) -> int:
        return sum(self.in_flight_by_list.values())


# Producers may create any host queue (their ACL allows `{Q}:host:*`): what
# status, task and the dashboard read and show of them is bounded, whatever
# their number. Each SCAN call is COUNT HOST_SCAN_COUNT.
HOST_SCAN_CALLS = 200
HOST_SCAN_COUNT = 1000
HOST_QUEUES_LISTED = 20
# Depths read (LLEN, pipelined) beyond the served hosts': reading 100,000 took
# the command line seconds of CPU. Past these, queues are counted by name.
HOST_DEPTHS_READ = 1000


@dataclass(frozen=True, slots=True)
class HostQueues:
    """The host queues with tasks: those of served hosts and the fullest
    others up to a limit, each with its depth; the rest only counted."""

    listed: dict[str, int]  # host id -> tasks waiting in its queue
    others: int  # host queues that are not listed (none of them served)
    others_waiting: int | None  # tasks waiting in them; None if not all their depths were read
    complete: bool  # SCAN saw the whole keyspace: there are no more than these

    def unlisted_json(self) -> dict:
        return {"queues": self.others, "waiting": self.others_waiting, "complete": self.complete}


class PoolRegistry:
    """The pool's bookkeeping, on one client."""

    def __init__(self, client: redis.Redis, keys: QueueKeys) -> None:
        self.client = client
        self.keys = keys
        self.leases = Leases(client, keys)
        self.stats = OutcomeStats(client, keys)
        self.dead_letters = DeadLetters(client, keys)
        self.junk_dead_letters = DeadLetters(client, keys, junk=True)
        self.task_lists = TaskLists(client, keys)
        self.snapshots = SnapshotReader(client, keys)
        self._drain_entry = client.register_script(DRAIN_ENTRY_SCRIPT)

    def depths(self) -> QueueDepths:
        """How many tasks wait, run, wait for a retry and lie dead: for `status`
        and metrics. Two round trips, however many processing lists there are:
        the counts with the registry set, then each listed processing list's length."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.smembers(self.keys.registry)
            pipe.llen(self.keys.queue)
            pipe.zcard(self.keys.delayed)
            pipe.llen(self.dead_letters.key)
            pipe.llen(self.junk_dead_letters.key)
            pipe.hgetall(self.keys.dead_trimmed)
            registered, waiting, delayed, dead, junk, trimmed = pipe.execute()
        lists = sorted(registered)
        in_flight = {key.decode(): length for key, length in zip(lists, self.task_lists.lengths(lists), strict=True)}
        return QueueDepths(
            waiting=int(waiting),
            in_flight_by_list=in_flight,
            delayed=int(delayed),
            dead=int(dead),
            junk=int(junk),
            trimmed=trimmed_counts(trimmed),
        )

    def drain_host_entry(self, host_queue: str, entry: bytes, *, target: str, value: bytes, keep: int = 0) -> bool:
        """Move one entry of a lost host's queue as `value` to the tail of
        `target` (the shared queue, or the dead letters, trimmed to `keep`),
        with its identity, and drop its committing mark; False if it was no
        longer there."""
        keys = [host_queue, target, self.keys.committing, self.keys.redelivery]
        to_queue = "0" if target == self.keys.dead else "1"
        return bool(self._drain_entry(keys=keys, args=[entry, value, keep, to_queue]))

    def identity_left(self, source: str, message: bytes) -> tuple[str, int] | None:
        """The task id and deliveries a message that went back to `source` keeps, if any."""
        field = f"{source} {hashlib.sha1(message).hexdigest()}".encode()
        held = (self.client.hget(self.keys.redelivery, field) or b"").split(b" ")[0]
        task_id, _, deliveries = held.decode(errors="replace").partition(":")
        return (task_id, int(deliveries)) if task_id and deliveries.isascii() and deliveries.isdigit() else None

    def host_queues(
        self, *, served: Collection[str] = (), listed: int = HOST_QUEUES_LISTED, scan_calls: int = HOST_SCAN_CALLS
    ) -> HostQueues:
        """The host queues holding tasks: every `served` host's (those a live
        supervisor serves: as many as leases, which producers cannot make) and
        the `listed` fullest others; the rest counted. Bounded: `scan_calls` SCAN calls, and the depths pipelined."""
        prefix = self.keys.host("")
        served = set(served)
        names, complete = scan_prefix(self.client, prefix, max_calls=scan_calls, count=HOST_SCAN_COUNT)
        # Producers can make any key here: a name that is not UTF-8 is shown, escaped, not fatal.
        found = {name.decode(errors="backslashreplace")[len(prefix) :]: name for name in names}
        # A served host's queue is read whether or not a SCAN cut short came upon it.
        key_of = {**found, **{host_id: self.keys.host(host_id).encode() for host_id in served}}
        unserved = [host_id for host_id in found if host_id not in served]
        to_read = sorted(served) + unserved[:HOST_DEPTHS_READ]
        depths: dict[str, int] = {}
        for start in range(0, len(to_read), HOST_SCAN_COUNT):
            batch = to_read[start : start + HOST_SCAN_COUNT]
            with self.client.pipeline(transaction=False) as pipe:
                for host_id in batch:
                    pipe.llen(key_of[host_id])
                answers = pipe.execute(raise_on_error=False)
            for host_id, depth in zip(batch, answers, strict=True):
                if isinstance(depth, int) and depth:  # not gone since the SCAN, nor a key of another type
                    depths[host_id] = depth
        fullest_first = sorted(depths, key=lambda host_id: (-depths[host_id], host_id))
        others = [host_id for host_id in fullest_first if host_id not in served]
        shown = [host_id for host_id in fullest_first if host_id in served] + others[:listed]
        rest = others[listed:]
        not_read = len(unserved) - len(unserved[:HOST_DEPTHS_READ])
        waiting = sum(depths[host_id] for host_id in rest) if not not_read else None
        return HostQueues({host_id: depths[host_id] for host_id in shown}, len(rest) + not_read, waiting, complete)

    def orphaned_lists(self) -> list[str]:
        """Processing lists whose owner's lease has expired."""
        orphans = []
        for raw_key in self.task_lists.processing_lists():
            key = raw_key.decode()
            instance = self.keys.instance_of(key)
            if instance is None or not self.leases.held(instance):
                orphans.append(key)
        return orphans
