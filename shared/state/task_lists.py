"""Reads of the places a task waits or runs, for those who only look.

    {Q} (HOSTING_TASKS_QUEUE)  list: producers' messages, waiting
    {Q}:host:<HOST_ID>         list: a host's own queue (shared-memory tasks)
    {Q}:processing             set: the names of the workers' processing lists
    {Q}:processing:<instance>:<worker>
                               list: the envelopes a worker has claimed
    {Q}:delayed                sorted set: retries' envelopes, by due time
    {Q}:committing             hash: task id -> host queue, while a ledger commits

Every move of a task between them is a Lua script run by ReliableQueue
(shared/state/redis_queue.py); what PoolRegistry keeps about them (depths, host
queues, orphaned lists) is in shared/state/pool_registry.py. Here are the plain
reads `task`, `status`, `host drain` and the supervisor's task board make.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TypeVar

import redis

from image_result_client.protocol import QueueKeys
from shared.state.reading import list_pages

K = TypeVar("K")


class TaskLists:
    """The queue's lists, sets and hash as read by those who look, on one client."""

    def __init__(self, client: redis.Redis, keys: QueueKeys) -> None:
        self.client = client
        self.keys = keys

    # -- lists: the queue, host queues, processing lists ------------------------------

    def length(self, key: str | bytes) -> int:
        return int(self.client.llen(key))

    def lengths(self, keys: Sequence[str | bytes]) -> list[int]:
        """The length of each list, in one round trip."""
        with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.llen(key)
            return [int(n) for n in pipe.execute()]

    def all_entries(self, key: str | bytes) -> list[bytes]:
        """Every entry of a list, head first, as of one moment."""
        return self.client.lrange(key, 0, -1)

    def entries(
        self, key: str | bytes, *, limit: int | None, newest_first: bool = False
    ) -> Iterator[tuple[int, bytes]]:
        """(index, entry) of a list, a page at a time, up to `limit` (None: all)."""
        return list_pages(self.client, key, limit=limit, newest_first=newest_first)

    def processing_lists(self) -> list[bytes]:
        """The workers' processing lists, as registered (names as Redis has them), sorted."""
        return sorted(self.client.smembers(self.keys.registry))

    def entries_at(self, wanted: Mapping[K, tuple[str, int]]) -> dict[K, bytes | None]:
        """Each (processing list, index) wanted, read in one round trip
        (shared/ipc/task_board.py: the task a worker has in hand)."""
        if not wanted:
            return {}
        with self.client.pipeline(transaction=True) as pipe:
            for key, index in wanted.values():
                pipe.lindex(key, index)
            return dict(zip(wanted, pipe.execute(), strict=True))

    # -- the delayed retries ---------------------------------------------------------

    def delayed_count(self) -> int:
        return int(self.client.zcard(self.keys.delayed))

    def delayed_page(self, start: int, size: int) -> list[tuple[bytes, float]]:
        """(envelope, due time) of `size` delayed retries from `start`, soonest first."""
        return self.client.zrange(self.keys.delayed, start, start + size - 1, withscores=True)

    # -- records being committed --------------------------------------------------------

    def committing_count(self) -> int:
        """Tasks whose records a ledger is committing (ReliableQueue.mark_committing)."""
        return int(self.client.hlen(self.keys.committing))
