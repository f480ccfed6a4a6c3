"""What the dashboard shows, read from Redis (and OUTPUT_DIR where it is local), and
what it changes (dead letters).

    every client's GET /api/overview --> Overview.get() --(at most once a second,
        one thread at a time)--> refresh(): two pipelined round trips to Redis
        (shared.state.snapshot), the tail of results.json --> one JSON body,
        shared by every client

The pool must not notice the dashboard, however many browsers watch it:
- One refresh serves every client for REFRESH_SECONDS: twenty browsers cost
  Redis what one does. A refresh is a fixed set of O(1) commands (LLEN, ZCARD,
  HGETALL of a dozen stats buckets, MGET of the leases, LRANGE of the newest
  dead letters with a limit), pipelined: two round trips, well under a
  millisecond of Redis time, whatever the queue's depth. The open requests
  take two more: ZCARD and the first OPEN_REQUESTS_SHOWN of them, then one
  HMGET each (shared.state.request_state).
- Keys that only SCAN can find (the leases of supervisors with no worker yet,
  the host queues) are looked for every SCAN_SECONDS, at most SCAN_CALLS calls
  of COUNT 1000 each time; in between, supervisors are known by their workers'
  processing lists (the registry set).
- The stats buckets expire after two minutes in Redis: the charts' history is
  kept here, in memory, from the first refresh on.

Hazards handled here:
- Everything read from Redis was written by someone who could write to Redis:
  it is parsed defensively (a lease that is not a JSON object is skipped, a
  dead letter that is not one is shown as unreadable) and sent to the browser
  as JSON data only, which the page puts into the DOM as text.
- A refresh that fails (Redis away) keeps the last good figures and says when
  they were read, and the next attempt waits REFRESH_SECONDS too: an outage
  does not turn twenty clients into twenty reconnect loops.
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from control.lookup import (
    dead_letter_message,
    dead_letter_view,
    file_of,
    results_path,
)
from image_result_client.protocol import STATS_BUCKET_SECONDS, QueueKeys
from image_result_client.results_files import lines_from_end, parse_line
from shared.config import Settings
from shared.state.pool_registry import HostQueues, PoolRegistry
from shared.state.reading import json_object
from shared.state.redis_queue import REDIS_ERRORS
from shared.state.request_state import RequestState
from shared.state.results_stream import StreamEntry
from shared.state.stats import Counts

REFRESH_SECONDS = 1.0
SCAN_SECONDS = 15.0
SCAN_CALLS = 50  # of COUNT 1000 each (shared.state.reading.scan_prefix)
# Stats buckets live 120 s in Redis: read the ones that can still exist.
STATS_BUCKETS_READ = 120 // STATS_BUCKET_SECONDS + 1
HISTORY_SECONDS = 15 * 60
SAMPLE_SECONDS = 2.0
RECENT_RECORDS = 40
THUMBS_SHOWN = 8
RECENT_DEAD = 50
RESULTS_TAIL_BYTES = 512 * 1024
# Names of files the page may ask a thumbnail of: those of records it was sent.
THUMB_NAMES_KEPT = 2000
# One requeue-all request moves at most this many, so that it ends well within
# the connection's deadline; the page says how many are left.
REQUEUE_ALL_MAX = 2000
REQUEUE_ALL_SECONDS = 3.0
FIND_DEAD_LIMIT = 20_000
# Open requests listed: those whose REQUEST_TTL runs out first.
OPEN_REQUESTS_SHOWN = 20


@dataclass(frozen=True, slots=True)
class ActionResult:
    """The outcome of a change the dashboard made, as its API answers it."""

    ok: bool
    message: str
    moved: int = 0
    remaining: int = 0

    def as_json(self) -> dict:
        return {"ok": self.ok, "message": self.message, "moved": self.moved, "remaining": self.remaining}


class Overview:
    """The shared, cached view of the pool; `get()` is safe from any thread."""

    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        *,
        refresh_seconds: float = REFRESH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.settings = settings
        self.keys = QueueKeys(settings.queue)
        self.registry = PoolRegistry(client, self.keys)
        self.requests = RequestState(client, self.keys, request_ttl=settings.request_ttl)
        self.refresh_seconds = refresh_seconds
        self.clock, self.wall_clock = clock, wall_clock
        self.refreshes = 0  # how many times Redis was read, for tests and the bench
        self._lock = threading.Lock()  # one refresh at a time; the others share the last one
        self._thumb_lock = threading.Lock()
        self._body = b"{}"
        self._refreshed_at = -float("inf")
        self._last_good: dict | None = None
        self._scanned_at = -float("inf")
        self._scanned_leases: set[bytes] = set()
        self._hosts = HostQueues({}, 0, 0, True)  # as of the last scan; the listed ones' depths are read each refresh
        self._samples: collections.deque[list[float]] = collections.deque()
        self._throughput: dict[int, list[int]] = {}
        self._thumb_names: collections.OrderedDict[str, None] = collections.OrderedDict()

    def get(self) -> bytes:
        """The newest overview as JSON, read from Redis at most once per refresh_seconds."""
        if self.clock() - self._refreshed_at < self.refresh_seconds:
            return self._body
        # While one thread reads Redis, the others answer with the last body
        # (at most a refresh old) instead of queueing up behind it; only the
        # very first clients wait, there being nothing to show yet.
        if not self._lock.acquire(blocking=self._refreshed_at == -float("inf")):
            return self._body
        try:
            if self.clock() - self._refreshed_at >= self.refresh_seconds:  # nobody did it while we waited
                self._body = json.dumps(self._refresh(), default=str).encode()
                self._refreshed_at = self.clock()
            return self._body
        finally:
            self._lock.release()

    def thumbnail_allowed(self, name: str) -> bool:
        """Whether a record sent to a page names this file."""
        with self._thumb_lock:
            return name in self._thumb_names

    # -- one refresh ------------------------------------------------------------

    def _refresh(self) -> dict:
        now = self.wall_clock()
        self.refreshes += 1
        try:
            view = self._read(now)
        except REDIS_ERRORS as exc:
            stale = dict(self._last_good or {"queue": self.keys.queue, "writable": self.writable})
            stale.update(error=f"Redis at {self.settings.redacted_redis_url()} is unreachable: {exc}", now=now)
            return stale
        self._last_good = view
        return view

    @property
    def writable(self) -> bool:
        return self.settings.dashboard_token is not None

    def _read(self, now: float) -> dict:
        if self.clock() - self._scanned_at >= SCAN_SECONDS:
            self._scan()
        results = results_path(self.settings)
        slot = int(now) // STATS_BUCKET_SECONDS
        read_stream = results is None and self.settings.results_stream_maxlen
        snapshot = self.registry.snapshots.read(
            slot=slot,
            buckets=STATS_BUCKETS_READ,
            hosts=list(self._hosts.listed),
            known_leases=self._scanned_leases,
            newest_dead=RECENT_DEAD,
            stream=self.settings.results_stream if read_stream else None,
            stream_count=RECENT_RECORDS,
        )
        self._note_throughput(slot, snapshot.buckets)
        totals = {
            "waiting": snapshot.waiting,
            "in_flight": snapshot.in_flight_total,
            "delayed": snapshot.delayed,
            "dead": snapshot.dead,
            "committing": snapshot.committing,
        }
        self._note_sample(now, totals)
        return {
            "queue": self.keys.queue,
            "now": now,
            "read_at": now,
            "writable": self.writable,
            "totals": totals,
            "host_queues": snapshot.host_depths,
            "host_queues_unlisted": self._hosts.unlisted_json(),
            "next_retry_in": None if snapshot.next_due is None else round(snapshot.next_due - now, 1),
            "last_minute": self._last_minute(slot),
            "supervisors": [
                _supervisor(state, snapshot.in_flight, now) for state in sorted(snapshot.leases, key=_host_order)
            ],
            "history": {
                "bucket_seconds": STATS_BUCKET_SECONDS,
                "samples": list(self._samples),
                "throughput": [[s * STATS_BUCKET_SECONDS, *c] for s, c in sorted(self._throughput.items())],
            },
            "records": self._records(results, snapshot.stream_page),
            "dead_letters": [_dead_view(raw, now) for raw in snapshot.newest_dead],  # newest first
            "requests": self._open_requests(now),
        }

    def _open_requests(self, now: float) -> dict:
        total, shown = self.requests.open_requests(OPEN_REQUESTS_SHOWN)
        return {
            "open": total,
            "items": [
                {
                    "request_id": progress.request_id,
                    "recorded": progress.recorded,
                    "request_images": progress.declared,
                    "completed": progress.completed,
                    "failed": progress.failed,
                    "age": round(max(0.0, now - progress.opened), 1),
                    "expires_in": None if progress.expires is None else round(max(0.0, progress.expires - now), 1),
                }
                for progress in shown
            ],
        }

    def _scan(self) -> None:
        """The keys only SCAN finds: leases and host queues. Bounded: SCAN_CALLS
        calls of COUNT SCAN_COUNT each, whatever the size of the keyspace, and
        only the served hosts' and the fullest others' queues are listed."""
        found = self.registry.leases.found(max_calls=SCAN_CALLS)
        served = {str(state.get("host_id")) for state in self.registry.leases.states_at(found)}
        self._hosts = self.registry.host_queues(served=served, scan_calls=SCAN_CALLS)
        self._scanned_leases = set(found)
        self._scanned_at = self.clock()

    def _note_throughput(self, slot: int, buckets: dict[int, Counts]) -> None:
        """Keep the counts of the buckets still in Redis; the charts' older history is kept here."""
        for bucket, counts in buckets.items():
            self._throughput[bucket] = [counts[name] for name in ("completed", "failed", "retried")]
        oldest = slot - HISTORY_SECONDS // STATS_BUCKET_SECONDS
        for old in [s for s in self._throughput if s < oldest]:
            del self._throughput[old]

    def _note_sample(self, now: float, totals: dict) -> None:
        if self._samples and now - self._samples[-1][0] < SAMPLE_SECONDS:
            return
        self._samples.append([now, totals["waiting"], totals["in_flight"], totals["delayed"], totals["dead"]])
        while self._samples and self._samples[0][0] < now - HISTORY_SECONDS:
            self._samples.popleft()

    def _last_minute(self, slot: int) -> dict:
        counts = [self._throughput.get(slot - back, [0, 0, 0]) for back in range(60 // STATS_BUCKET_SECONDS)]
        return {name: sum(c[i] for c in counts) for i, name in enumerate(("completed", "failed", "retried"))}

    def _records(self, results: Path | None, stream_page: list[StreamEntry] | None) -> dict:
        """The newest records: from results.json here, else from the results stream."""
        lines: list[bytes] = []
        source = None
        if results is not None:
            source = str(results)
            try:
                for line in lines_from_end(results, limit=RESULTS_TAIL_BYTES):
                    lines.append(line)
                    if len(lines) >= RECENT_RECORDS:
                        break
            except OSError:
                lines, source = [], None
        elif stream_page is not None:
            source = f"stream {self.settings.results_stream}"
            lines = [fields.get(b"record", b"") for _, fields in stream_page]
        items = []
        for line in lines:
            record = parse_line(line)
            if record is None:
                continue
            item = {key: record.get(key) for key in (
                "timestamp", "request_id", "image_id", "status", "error", "task_id", "attempts", "source",
                "width", "height", "bytes", "duration_ms",
            )}
            item.update(file_of(record, self.settings.output_dir))
            # Thumbnails for the newest few only: each is a request from every
            # open page, and the dashboard shares the pool's host.
            wanted = item["file_here"] and len(items) < THUMBS_SHOWN
            item["thumb"] = item["file"].rsplit("/", 1)[-1] if wanted else None
            if item["thumb"]:
                self._allow_thumbnail(item["thumb"])
            items.append(item)
        return {"source": source, "items": items}

    def _allow_thumbnail(self, name: str) -> None:
        with self._thumb_lock:
            self._thumb_names[name] = None
            self._thumb_names.move_to_end(name)
            while len(self._thumb_names) > THUMB_NAMES_KEPT:
                self._thumb_names.popitem(last=False)


# -- changes: dead letters ---------------------------------------------------------------


def requeue_dead_letter(registry: PoolRegistry, letter_id: str) -> ActionResult:
    """Put one dead letter's message back onto the queue, named by its id
    (the SHA-1 of its entry, as the overview sends it)."""
    for _, raw in registry.dead_letters.entries(limit=FIND_DEAD_LIMIT, newest_first=True):
        if _letter_id(raw) != letter_id:
            continue
        message = dead_letter_message(json_object(raw) or {})
        if message is None:
            return ActionResult(False, "this dead letter holds no message that can be requeued")
        if registry.dead_letters.requeue(raw, message):
            return ActionResult(True, "requeued 1 dead letter", moved=1)
        break  # someone else moved it meanwhile
    return ActionResult(False, "no such dead letter (requeued or purged meanwhile?)")


def requeue_all_dead_letters(
    registry: PoolRegistry, *, limit: int = REQUEUE_ALL_MAX, seconds: float = REQUEUE_ALL_SECONDS
) -> ActionResult:
    """Oldest first, each message back once, as `dead requeue` does; stops
    after `limit` entries or `seconds` and says how many remain."""
    moved, unreadable, deadline = 0, 0, time.monotonic() + seconds
    skip = 0  # entries at the head we cannot requeue, left where they are
    while moved + unreadable < limit and time.monotonic() < deadline:
        page = registry.dead_letters.page(skip, skip + 99)
        if not page:
            break
        for raw in page:
            message = dead_letter_message(json_object(raw) or {})
            if message is None:
                unreadable += 1
                skip += 1
            elif registry.dead_letters.requeue(raw, message):
                moved += 1
            if moved + unreadable >= limit or time.monotonic() >= deadline:
                break
    remaining = registry.dead_letters.count()
    note = f"; {unreadable} hold no message and stay" if unreadable else ""
    return ActionResult(True, f"requeued {moved} dead letters{note}", moved=moved, remaining=remaining)


def purge_dead_letters(registry: PoolRegistry) -> ActionResult:
    """Delete every dead letter (UNLINK: Redis frees a long list in the background)."""
    removed = registry.dead_letters.purge(in_background=True)
    return ActionResult(True, f"purged {removed} dead letters", moved=removed)


# -- helpers -----------------------------------------------------------------------------


def _letter_id(raw: bytes) -> str:
    return hashlib.sha1(raw).hexdigest()


def _dead_view(raw: bytes, now: float) -> dict:
    entry = json_object(raw)
    if entry is None:
        return {"id": _letter_id(raw), "error": "(not a dead-letter entry)", "message": None, "unreadable": True}
    return dead_letter_view(raw, entry, now)


def _supervisor(state: dict, in_flight: dict[str, int], now: float) -> dict:
    updated = state.get("updated_at")
    workers = state.get("workers") if isinstance(state.get("workers"), list) else []
    return {
        "instance": _text(state.get("instance")),
        "host": _text(state.get("host")),
        "host_id": _text(state.get("host_id")),
        "pid": state.get("pid"),
        "ready": bool(state.get("ready")),
        "stopping": bool(state.get("stopping")),
        "desired_workers": state.get("desired_workers"),
        "beat_age": round(now - updated, 1) if isinstance(updated, int | float) else None,
        "ledger": _child(state.get("ledger"), in_flight),
        "workers": [_child(worker, in_flight) for worker in workers if isinstance(worker, dict)],
        "shm": _shm(state.get("shm")),
    }


def _shm(shm: object) -> dict | None:
    """The frames waiting in the supervisor's /dev/shm and its SHM_BUDGET_BYTES, when it says."""
    if not isinstance(shm, dict):
        return None
    figures = {key: shm.get(key) for key in ("waiting_bytes", "budget_bytes")}
    valid = all(isinstance(value, int) and not isinstance(value, bool) and value >= 0 for value in figures.values())
    return figures if valid else None


def _child(child: object, in_flight: dict[str, int]) -> dict | None:
    """A worker or the ledger as the lease state has it: the fields we know,
    and whatever else the state carries about it (the task in hand, its
    phase), as text."""
    if not isinstance(child, dict):
        return None
    known = ("slot", "pid", "heartbeat_age", "processing_list")
    view = {key: child.get(key) for key in known}
    view["in_flight"] = in_flight.get(child.get("processing_list"), 0) if isinstance(child.get("processing_list"), str) else None
    view["more"] = {str(key): value for key, value in child.items() if key not in known}
    return view


def _host_order(state: dict) -> tuple[str, str]:
    return (str(state.get("host_id")), str(state.get("instance")))


def _text(value: object) -> str | None:
    return None if value is None else str(value)

