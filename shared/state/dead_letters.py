"""The dead letters: tasks that failed for good, kept for an operator.

    {Q}:dead          list, oldest first: one JSON entry per failed task
                      (shared.ipc.records.dead_letter_entry), its producer's
                      message inside; capped at DEAD_LETTER_MAX
    {Q}:dead:junk     list, the same for messages without a request_id,
                      capped apart so a flood of junk cannot push out the rest
    {Q}:dead:trimmed  hash: how many entries the caps pushed out so far,
                      field "failed" (of {Q}:dead) and "junk"

Entries are pushed, and trimmed and counted, by the ledger's acknowledgement
(shared/state/lua/ack.lua, run by ReliableQueue) and by `host drain`
(shared/state/lua/drain_entry.lua, run by PoolRegistry). Everything else, reading
them (`status`, `dead`, `task`, the dashboard's actions, the ledger's log of the
trimmed) and the operator's requeue and purge, is here; the dashboard's Overview
reads the count and the newest entries within its batch (shared.state.snapshot). One DeadLetters works on one of
the two lists (`junk`), the same way.
"""

from __future__ import annotations

from collections.abc import Iterator

import redis

from image_result_client.protocol import QueueKeys
from shared.state.reading import LIST_PAGE, list_pages
from shared.state.redis_queue import REQUEUE_DEAD_SCRIPT


def trimmed_counts(reply: dict[bytes, bytes]) -> dict[str, int]:
    """{Q}:dead:trimmed's HGETALL as counts by kind; a count that is not a
    number raises ValueError."""
    return {kind.decode(): int(count) for kind, count in reply.items()}


class DeadLetters:
    """One dead-letter list ({Q}:dead, or {Q}:dead:junk with `junk`), on one client."""

    def __init__(self, client: redis.Redis, keys: QueueKeys, *, junk: bool = False) -> None:
        self.client = client
        self.keys = keys
        self.key = keys.dead_junk if junk else keys.dead
        self._requeue = client.register_script(REQUEUE_DEAD_SCRIPT)

    # -- reading -----------------------------------------------------------------

    def count(self) -> int:
        return int(self.client.llen(self.key))

    def at(self, index: int) -> bytes | None:
        """The entry at `index` (0: the oldest, -1: the newest); None past the end."""
        return self.client.lindex(self.key, index)

    def page(self, start: int, stop: int) -> list[bytes]:
        """The entries from `start` to `stop` inclusive, oldest first, as LRANGE
        counts (negative: from the newest, -1 the newest)."""
        return self.client.lrange(self.key, start, stop)

    def entries(
        self, *, limit: int | None = None, newest_first: bool = False, page_size: int = LIST_PAGE
    ) -> Iterator[tuple[int, bytes]]:
        """(index, entry), a page at a time, up to `limit` entries (None: all);
        newest first with negative indexes when `newest_first`."""
        return list_pages(self.client, self.key, limit=limit, newest_first=newest_first, page_size=page_size)

    def trimmed(self) -> dict[str, int]:
        """How many entries the caps have pushed out so far, by kind ("failed",
        "junk"); a count that is not a number raises ValueError."""
        return trimmed_counts(self.client.hgetall(self.keys.dead_trimmed))

    # -- the operator's changes --------------------------------------------------------

    def requeue(self, entry: bytes, message: bytes) -> bool:
        """Push `message` back onto the queue and remove `entry`, atomically;
        False if the entry was no longer there."""
        return bool(self._requeue(keys=[self.key, self.keys.queue], args=[entry, message]))

    def purge(self, *, in_background: bool = False) -> int:
        """Delete every entry; returns how many there were. `in_background`:
        UNLINK, Redis frees a long list after answering."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.llen(self.key)
            if in_background:
                pipe.unlink(self.key)
            else:
                pipe.delete(self.key)
            removed, _ = pipe.execute()
        return int(removed)
