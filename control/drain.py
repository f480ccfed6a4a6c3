"""`supervisor.py host drain <HOST_ID>`: let go of the tasks a lost host holds.

A host's own queue, `{Q}:host:<HOST_ID>`, holds what only that host can do:
shared-memory tasks (the segment is in its memory) and tasks whose records its
ledger was committing (the record may be on its disk). When the host dies they
wait there for it to come back. When it never will, its memory and disk are
gone with it, and each task can still end once elsewhere:

- a task that also has an `image_url` goes to the shared queue without its
  `shm_info` (a segment of that name on another host would be another image);
- any other entry the pool could not run elsewhere either (a shared-memory
  task without a URL) becomes a dead letter saying why, for `dead list`;
- anything else (a URL task, a message no host could parse) goes to the shared
  queue as it is, where it ends as any task does.

The host's queue holds producers' bytes only; a task that was requeued there
left its identity (task id, deliveries) in Redis, which goes with it.

First it does what a running supervisor would: requeue the processing lists of
supervisors whose lease expired, so the host's claimed tasks are in its queue.
It refuses while a supervisor with that HOST_ID holds a lease.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from shared.ipc.records import dead_letter_entry
from shared.messages import salvage
from shared.state.pool_registry import PoolRegistry
from shared.state.redis_queue import ReliableQueue

SHARED, DEAD = "shared queue", "dead letter"


class HostStillServed(Exception):
    """A live supervisor serves the host: draining would take its work away."""


@dataclass(frozen=True, slots=True)
class Disposal:
    """Where one entry of the host's queue goes, and as what."""

    target: str  # SHARED or DEAD
    value: bytes


@dataclass(frozen=True, slots=True)
class DrainReport:
    requeued_lists: int
    to_shared_queue: int
    dead_lettered: int
    left: int  # entries that arrived during the drain, or that the host took back


def drain_host(
    registry: PoolRegistry, queue: ReliableQueue, host_id: str, *, live_host_ids: set[str], dead_letter_max: int
) -> DrainReport:
    """Move every entry of `host_id`'s queue to where it can still end."""
    if host_id in live_host_ids:
        raise HostStillServed(f"host {host_id} has a running supervisor; stop it (or wait LEASE_TTL) first")
    orphans = registry.orphaned_lists()
    for key in orphans:
        queue.requeue(key)
    keys, lists = registry.keys, registry.task_lists
    host_queue = keys.host(host_id)
    moved = {SHARED: 0, DEAD: 0}
    # A snapshot: what producers push meanwhile is reported as left, not chased forever.
    for entry in lists.all_entries(host_queue):
        task_id, deliveries = registry.identity_left(host_queue, entry) or (None, 0)
        disposal = dispose(entry, host_id=host_id, task_id=task_id, deliveries=deliveries, now=datetime.now())
        target = keys.queue if disposal.target == SHARED else keys.dead
        keep = dead_letter_max if disposal.target == DEAD else 0
        if registry.drain_host_entry(host_queue, entry, target=target, value=disposal.value, keep=keep):
            moved[disposal.target] += 1
    return DrainReport(len(orphans), moved[SHARED], moved[DEAD], lists.length(host_queue))


def dispose(entry: bytes, *, host_id: str, task_id: str | None, deliveries: int, now: datetime) -> Disposal:
    """Decide one entry's fate; `task_id` and `deliveries` are the identity it
    left behind if it was requeued there (for its dead letter)."""
    try:
        message = json.loads(entry)
    except (ValueError, RecursionError):
        message = None
    if not isinstance(message, dict) or "shm_info" not in message:
        return Disposal(SHARED, entry)
    if isinstance(message.get("image_url"), str):
        del message["shm_info"]
        # ASCII: a message can carry a lone surrogate ("\\ud800"), which UTF-8 cannot encode.
        return Disposal(SHARED, json.dumps(message, ensure_ascii=True).encode())
    found = salvage(entry)
    error = (
        f"host {host_id} was drained: its shared-memory segment {found.segment_name or '(unnamed)'} "
        "went with it and the task has no image_url"
    )
    letter = dead_letter_entry(
        failed_at=now,
        task_id=task_id,
        request_id=found.request_id,
        image_id=found.image_id,
        attempts=deliveries,
        error=error,
        message=entry,
    )
    return Disposal(DEAD, letter)
