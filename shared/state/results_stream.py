"""The results stream, read backwards.

    RESULTS_STREAM  stream (with RESULTS_STREAM_MAXLEN > 0): one entry per
                    final task record (field "record") and per ended request
                    (field "request"); added to by the ledger's acknowledgement
                    (shared/state/lua/ack.lua, shared/state/lua/requests.lua) and capped there

Read here by `task` (a record not in a local results.json); the dashboard reads
its newest records within its batch (shared.state.snapshot).
"""

from __future__ import annotations

import redis

StreamEntry = tuple[bytes, dict[bytes, bytes]]


class ResultsStream:
    """One results stream, on one client."""

    def __init__(self, client: redis.Redis, name: str) -> None:
        self.client = client
        self.name = name

    def newest(self, count: int, *, before: bytes | None = None) -> list[StreamEntry]:
        """Up to `count` entries, newest first, older than the entry id `before`
        (None: from the newest). A key that is not a stream raises ResponseError."""
        newest = "+" if before is None else "(" + before.decode()
        return self.client.xrevrange(self.name, max=newest, min="-", count=count)
