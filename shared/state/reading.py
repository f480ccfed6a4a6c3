"""How the owners of the pool's keys read Redis in bounded steps, and how they
take a value that anyone with write access could have written.

- `scan_prefix`: the keys under a prefix, from a bounded number of SCAN calls
  (leases and host queues are found only by SCAN: producers may create any
  number of keys beside them).
- `list_pages`: a list read a page of LRANGE at a time, oldest or newest first,
  up to a limit: a list may hold millions of entries.
- `json_object`: a stored value as a JSON object, or None.

Nothing here names a key of the pool; the owners in this package pass theirs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import redis

SCAN_COUNT = 1000
LIST_PAGE = 1000


def glob_escape(text: str) -> str:
    """`text` matched literally by a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def scan_prefix(
    client: redis.Redis, prefix: str, *, max_calls: int | None, count: int = SCAN_COUNT
) -> tuple[list[bytes], bool]:
    """Keys starting with `prefix` (matched literally), and whether the whole
    keyspace was seen (False: `max_calls` SCAN calls of COUNT `count` ran out
    first; None: no limit)."""
    pattern = glob_escape(prefix) + "*"
    found: list[bytes] = []
    cursor, calls = 0, 0
    while max_calls is None or calls < max_calls:
        cursor, keys = client.scan(cursor, match=pattern, count=count)
        found.extend(keys)
        calls += 1
        if cursor == 0:
            return found, True
    return found, False


def list_pages(
    client: redis.Redis, key: str | bytes, *, limit: int | None, newest_first: bool = False, page_size: int = LIST_PAGE
) -> Iterator[tuple[int, bytes]]:
    """(index, entry) of a list, in pages of `page_size`, up to `limit` entries
    (None: all); from the tail when `newest_first` (negative indexes then, -1
    the newest). The list may change meanwhile: indexes are positions as each
    page was read."""
    read = 0
    while limit is None or read < limit:
        size = page_size if limit is None else min(page_size, limit - read)
        if newest_first:
            page = client.lrange(key, -(read + size), -(read + 1))
            entries = [(-(read + 1) - offset, entry) for offset, entry in enumerate(reversed(page))]
        else:
            page = client.lrange(key, read, read + size - 1)
            entries = [(read + offset, entry) for offset, entry in enumerate(page)]
        yield from entries
        read += len(page)
        if len(page) < size:
            return


def json_object(raw: bytes | str | None) -> dict | None:
    """`raw` as a JSON object, or None for anything else: what Redis holds may
    have been written by anyone who can write there."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
