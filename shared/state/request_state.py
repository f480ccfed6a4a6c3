"""The requests' state in Redis, with its scripts: the one owner of its keys.

    the ledger's acknowledgement: ack.lua and request_count.lua in one
    MULTI/EXEC, the round trip the acknowledgement makes anyway
        --> {Q}:request:<id> (hash: the request's distinct images recorded)
            {Q}:requests (the open requests, by when REQUEST_TTL runs out)
        the image that makes the count reach request_images ends the request, in
        the same step (shared/state/lua/requests.lua):
            --> RESULTS_STREAM, field "request" (a task record's field is "record")
            --> {Q}:requests_unwritten:<HOST_ID>:<OUTPUT_DIR's digest>
                --the ledger--> OUTPUT_DIR/requests.json,
                and then off that list
    the supervisor's upkeep --expire_due (request_expire.lua)--> the same end,
        status "incomplete", for a request with no image recorded for REQUEST_TTL
    `task REQUEST_ID`, the dashboard --progress, open_requests--> read only

Hazards handled here:
- A request id or image id is whatever a producer sent. It reaches Redis as a
  JSON string (ASCII), in key names too: no two ids share a key or a field,
  and no id is a byte sequence a reader cannot decode.
- Counting rides in the acknowledgement's transaction, so an image counts when
  its task is acknowledged, never in a pass of its own that could drift. The
  scripts go by EVALSHA (what the pool's Redis user may run); after a NOSCRIPT
  (Redis restarted, its script cache is empty) they are loaded and the
  transaction runs again. Counting is idempotent, so the part of a transaction
  that ran before the NOSCRIPT may run twice without harm.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from redis.client import Pipeline

from image_result_client.protocol import QueueKeys
from shared.config import Settings
from shared.state.redis_queue import LUA_DIR, ScriptCall

_SHARED = (LUA_DIR / "requests.lua").read_text()
COUNT_SCRIPT = _SHARED + "\n" + (LUA_DIR / "request_count.lua").read_text()
EXPIRE_SCRIPT = _SHARED + "\n" + (LUA_DIR / "request_expire.lua").read_text()
# Requests ended per call of the expiry; the rest wait for the next pass.
EXPIRE_BATCH = 100


@dataclass(frozen=True, slots=True)
class CountedImage:
    """One image's final outcome, to count for its request."""

    request_id: str
    image_id: str
    request_images: int
    completed: bool
    entry: bytes  # the image as the request record lists it (a JSON object)
    record_id: str  # the request record's id, should this image end the request


@dataclass(frozen=True, slots=True)
class RequestProgress:
    request_id: str
    declared: int  # request_images
    recorded: int
    completed: int
    failed: int
    mismatched: int  # images whose message declared another request_images
    opened: float  # epoch seconds
    expires: float | None  # when REQUEST_TTL runs out with no new image


def requests_writer(settings: Settings) -> str:
    """Whose unwritten list a pool's request records go on: its requests.json's,
    the same across restarts. Supervisors that share a HOST_ID (one host, two
    OUTPUT_DIRs) still each get their own, so neither writes the other's."""
    digest = hashlib.sha1(os.fsencode(settings.output_dir)).hexdigest()[:12]
    return f"{settings.host_id}:{digest}"


def id_json(value: str) -> str:
    """An id as it goes to Redis: a JSON string, ASCII only."""
    return json.dumps(value, ensure_ascii=True)


def new_record_id() -> str:
    return os.urandom(12).hex()


def record_id_of(line: bytes) -> str | None:
    """The record_id of a request record line; None if the line is not one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    record_id = record.get("record_id") if isinstance(record, dict) else None
    return record_id if isinstance(record_id, str) else None


def run_in_transaction(
    client: redis.Redis, calls: Sequence[ScriptCall], *, then: Callable[[Pipeline], object] | None = None
) -> list[Any]:
    """The calls (and `then`'s commands) in one MULTI/EXEC: one round trip,
    all or (after a NOSCRIPT) again."""
    for attempt in (1, 2):
        with client.pipeline(transaction=True) as pipe:
            for call in calls:
                pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
            if then is not None:
                then(pipe)
            try:
                return pipe.execute()
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
        for call in calls:
            call.script.sha = client.script_load(call.script.script)
    raise AssertionError("unreachable")


class RequestState:
    def __init__(
        self,
        client: redis.Redis,
        keys: QueueKeys,
        *,
        writer: str = "",
        request_ttl: float,
        stream: str = "",
        stream_maxlen: int = 0,
    ) -> None:
        self.client = client
        self.keys = keys
        self.unwritten_key = keys.unwritten_requests(writer)
        self.request_ttl = request_ttl
        self.stream = stream if stream and stream_maxlen > 0 else ""
        self.stream_maxlen = stream_maxlen if self.stream else 0
        self._count = client.register_script(COUNT_SCRIPT)
        self._expire = client.register_script(EXPIRE_SCRIPT)

    # -- ending requests (the ledger, the upkeep) ---------------------------------


    @classmethod
    def for_pool(cls, client: redis.Redis, keys: QueueKeys, settings: Settings) -> RequestState:
        """The state as a pool's ledger and upkeep use it: ending requests onto
        this pool's own unwritten list and the results stream."""
        return cls(
            client,
            keys,
            writer=requests_writer(settings),
            request_ttl=settings.request_ttl,
            stream=settings.results_stream,
            stream_maxlen=settings.results_stream_maxlen,
        )
    def count_with(
        self,
        acknowledgement: ScriptCall,
        images: Sequence[CountedImage],
        *,
        now: float,
        forget: Sequence[bytes] = (),
    ) -> list[bytes]:
        """Run the acknowledgement and count its images, atomically, in one round
        trip; returns the request records this ended (already on this host's
        unwritten list and the stream). The records in `forget` (written since
        the last time) leave the unwritten list in the same round trip."""
        keys, args = self._common(now)
        slots: dict[str, int] = {}  # request id (JSON) -> its hash's place in KEYS, from 1
        batch = []
        for image in images:
            request_id = id_json(image.request_id)
            if request_id not in slots:
                keys.append(self.keys.request(request_id))
                slots[request_id] = len(slots) + 1
            outcome = "c" if image.completed else "f"
            batch.append([slots[request_id], request_id, id_json(image.image_id), image.request_images, outcome,
                          image.entry.decode("ascii"), image.record_id])
        args.append(json.dumps(batch, ensure_ascii=True))
        calls = [acknowledgement, ScriptCall(self._count, keys, args)]
        replies = run_in_transaction(self.client, calls, then=lambda pipe: self._forget(pipe, forget))
        return list(replies[len(calls) - 1])

    def expire_due(self, now: float) -> list[bytes]:
        """End, as "incomplete", the requests whose REQUEST_TTL ran out; their
        records go onto this host's unwritten list (and the stream)."""
        due = self.client.zrangebyscore(self.keys.open_requests, "-inf", now, start=0, num=EXPIRE_BATCH)
        if not due:
            return []
        keys, args = self._common(now)
        for raw in due:
            request_id = raw.decode("ascii", errors="replace")
            keys.append(self.keys.request(request_id))
            args.extend([request_id, new_record_id()])
        return list(self._expire(keys=keys, args=args))

    def _common(self, now: float) -> tuple[list[str], list[Any]]:
        keys = [self.keys.open_requests, self.keys.ended_requests, self.unwritten_key, self.stream or self.unwritten_key]
        timestamp = datetime.fromtimestamp(now).isoformat()
        return keys, [repr(now), timestamp, self.request_ttl, self.stream_maxlen]

    # -- this host's records not yet written (the ledger) --------------------------

    def unwritten(self, limit: int = 100) -> list[bytes]:
        return list(self.client.lrange(self.unwritten_key, 0, limit - 1))

    def forget_written(self, records: Sequence[bytes]) -> None:
        if records:
            with self.client.pipeline(transaction=False) as pipe:
                self._forget(pipe, records)
                pipe.execute()

    def _forget(self, pipe: Pipeline, records: Sequence[bytes]) -> None:
        for record in records:
            pipe.lrem(self.unwritten_key, 1, record)

    # -- reading (the `task` command, the dashboard) ------------------------------

    def progress(self, request_id: str) -> RequestProgress | None:
        """An open request's count; None when it has none (never counted, or ended)."""
        request = id_json(request_id)
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hmget(self.keys.request(request), "declared", "recorded", "completed", "failed", "mismatched", "opened")
            pipe.zscore(self.keys.open_requests, request)
            fields, expires = pipe.execute()
        return _progress(request_id, fields, expires)

    def ended_at(self, request_id: str) -> float | None:
        """When the request ended, if within the last REQUEST_TTL."""
        return self.client.zscore(self.keys.ended_requests, id_json(request_id))

    def open_requests(self, limit: int = 50) -> tuple[int, list[RequestProgress]]:
        """How many requests are open, and the `limit` that expire first."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.open_requests)
            pipe.zrange(self.keys.open_requests, 0, limit - 1, withscores=True)
            total, members = pipe.execute()
        with self.client.pipeline(transaction=False) as pipe:
            for member, _ in members:
                pipe.hmget(self.keys.request(member.decode("ascii", errors="replace")),
                           "declared", "recorded", "completed", "failed", "mismatched", "opened")
            readings = pipe.execute() if members else []
        found = []
        for (member, expires), fields in zip(members, readings, strict=True):
            try:
                request_id = json.loads(member)
            except ValueError:
                continue
            progress = _progress(str(request_id), fields, expires)
            if progress is not None:
                found.append(progress)
        return int(total), found


def _progress(request_id: str, fields: list[bytes | None], expires: float | None) -> RequestProgress | None:
    if fields[0] is None:
        return None
    try:
        numbers = [int(value or 0) for value in fields[:5]]
        opened = float(fields[5] or 0)
    except ValueError:
        return None
    return RequestProgress(request_id, *numbers, opened=opened, expires=expires)
