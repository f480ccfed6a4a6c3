"""Where a task is now: `python supervisor.py task REQUEST_ID [--json]`.

    producers' lists (the queue, host queues)  -> queued: which list, position
    {Q}:processing:<instance>:<worker>          -> in flight: host, instance, worker, since when
    {Q}:delayed (scored by due time)            -> delayed: due when
    {Q}:dead                                    -> dead: error, attempts
    OUTPUT_DIR/results.json, else RESULTS_STREAM -> recorded: the record and its file
    {Q}:request:<id>, {Q}:requests_ended        -> its request: "7 of 12 recorded", or ended
    OUTPUT_DIR/requests.json                    -> its request record (shared.state.request_state)

`find_task` looks in every one of them (a task may be in two at once: a failed
record and its dead letter) and returns plain dicts, which the CLI prints and
the dashboard (control/dashboard.py) sends as JSON. A request id matches the
message's `request_id`; a task id (as `dead list` or a record shows it)
matches too.

Hazards handled here:
- Every message is a producer's bytes and may be anything: it is read with
  shared.messages.salvage, which never raises, and only after a cheap byte
  test says the id could be in it (JSON without a backslash holds its strings
  as they are, so an id absent from the bytes cannot be in such a message).
- Reads are bounded: lists are read in pages (LRANGE with limits), the results
  stream in pages (XREVRANGE with COUNT), results.json from its end in chunks;
  with `Budget`, each stops after so many entries or bytes and the answer says
  what was not searched. The CLI searches everything; the dashboard does not.
- Ids, errors and list names are printed through image_result_client.terminal.printable:
  whoever can write to Redis chooses them.
- The places are read one after another while the pool works: a task that
  moves meanwhile (claimed, acknowledged, promoted) can be seen in two places,
  or, for an instant, in none (also while BLMOVE holds it in a worker's
  incoming list, between two commands). Asking again settles it.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import redis

from image_result_client.protocol import REQUESTS_NAME, RESULTS_NAME, QueueKeys
from image_result_client.results_files import encoded_field, lines_from_end, parse_line
from image_result_client.terminal import printable, say
from shared import exitcodes
from shared.cli import OneLineParser, complain
from shared.config import ConfigError, Settings
from shared.messages import Envelope, InvalidMessage, parse_envelope, salvage
from shared.state.pool_registry import HOST_SCAN_CALLS, PoolRegistry
from shared.state.redis_queue import REDIS_ERRORS, connect
from shared.state.request_state import RequestState
from shared.state.results_stream import ResultsStream

NOT_FOUND = 1
PAGE = 1000
# Host queues `task` searches beside the served hosts': the fullest (producers
# can make any number of them; the rest are counted, not read).
HOST_QUEUES_SEARCHED = 200
# A dead letter's message and a record's fields are shown, not stored: keep them short.
MESSAGE_SHOWN = 2048


@dataclass(frozen=True, slots=True)
class Budget:
    """How much one search may read; None: everything (the CLI)."""

    list_entries: int | None = None  # per list
    file_bytes: int | None = None  # of results.json, from its end
    stream_entries: int | None = None
    scan_calls: int | None = None  # per SCAN of the keyspace (leases, host queues), COUNT 1000 each


EVERYTHING = Budget()
# The dashboard's: about 20 ms of Redis time per list at most.
DASHBOARD_BUDGET = Budget(list_entries=20_000, file_bytes=64 << 20, stream_entries=20_000, scan_calls=100)


@dataclass(frozen=True, slots=True)
class Search:
    """What one search found, and what it left out (a budget ran out)."""

    request_id: str
    found: list[dict]
    not_searched: list[str]

    def as_json(self) -> dict:
        return {"request_id": self.request_id, "found": self.found, "not_searched": self.not_searched}


# -- where records and messages are ----------------------------------------------


def results_path(settings: Settings) -> Path | None:
    """results.json, if this host can read it (the pool's host, or a shared mount)."""
    path = settings.output_dir / RESULTS_NAME
    return path if path.is_file() and os.access(path, os.R_OK) else None


def dead_letter_message(entry: dict) -> bytes | None:
    """The producer's message a dead letter keeps (`dead requeue` replays it)."""
    if isinstance(entry.get("message_base64"), str):
        try:
            return base64.b64decode(entry["message_base64"], validate=True)
        except (binascii.Error, ValueError):
            return None
    message = entry.get("message")
    return message.encode("utf-8", errors="surrogatepass") if isinstance(message, str) else None


# -- matching -----------------------------------------------------------------------


class _Matcher:
    """Whether a producer's message, a dead letter or a record is the task asked for."""

    def __init__(self, wanted: str) -> None:
        self.wanted = wanted
        self.raw = wanted.encode("utf-8", errors="surrogatepass")
        # What our own JSON lines (records and dead letters, encoded alike) hold for the id.
        self.in_ours = (encoded_field("request_id", wanted), encoded_field("task_id", wanted))

    def message(self, body: bytes) -> bool:
        """A producer's message: it may be anything."""
        if self.raw not in body and b"\\" not in body:
            return False
        return salvage(body).request_id == self.wanted

    def ours(self, line: bytes) -> dict | None:
        """A record or a dead letter, written by the pool: the dict, if it matches."""
        if not any(needle in line for needle in self.in_ours):
            return None
        record = parse_line(line)
        if record is None:
            return None
        return record if self.wanted in (record.get("request_id"), record.get("task_id")) else None


# -- the search -----------------------------------------------------------------------


def find_task(
    client: redis.Redis,
    settings: Settings,
    request_id: str,
    *,
    budget: Budget = EVERYTHING,
    now: float | None = None,
) -> Search:
    """Every place the task with this request id (or task id) is now."""
    now = time.time() if now is None else now
    registry = PoolRegistry(client, QueueKeys(settings.queue))
    matcher = _Matcher(request_id)
    found: list[dict] = []
    not_searched: list[str] = []
    states = registry.leases.states(max_calls=budget.scan_calls)
    found += _in_flight(registry, matcher, states, now)
    served = {str(state.get("host_id")) for state in states.values()}
    found += _queued(registry, matcher, budget, not_searched, served)
    found += _delayed(registry, matcher, budget, not_searched, now)
    found += _dead(registry, matcher, budget, not_searched, now)
    found += _recorded(client, settings, matcher, budget, not_searched)
    found += _request(client, settings, request_id, budget, not_searched, now)
    return Search(request_id, found, not_searched)


def _request(
    client: redis.Redis, settings: Settings, request_id: str, budget: Budget, skipped: list[str], now: float
) -> list[dict]:
    """The request this id names, if its messages declared request_images: open
    (its count), ended lately, and its record in this host's requests.json."""
    state = RequestState(client, QueueKeys(settings.queue), request_ttl=settings.request_ttl)
    found: list[dict] = []
    progress = state.progress(request_id)
    if progress is not None:
        expires_in = None if progress.expires is None else round(max(0.0, progress.expires - now), 1)
        found.append({"state": "request_open", "request_images": progress.declared, "recorded": progress.recorded,
                      "completed": progress.completed, "failed": progress.failed,
                      "mismatched_declarations": progress.mismatched, "expires_in": expires_in})
    path = settings.output_dir / REQUESTS_NAME
    if path.is_file() and os.access(path, os.R_OK):
        try:
            for line in lines_from_end(path, limit=budget.file_bytes):
                record = parse_line(line)
                if record is not None and record.get("request_id") == request_id:
                    found.append({"state": "request_ended", "source": str(path), "record": _request_summary(record)})
        except OSError as exc:
            skipped.append(f"{path}: {exc.strerror or exc}")
    if not any(place["state"] == "request_ended" for place in found):
        ended_at = state.ended_at(request_id)
        if ended_at is not None:
            found.append({"state": "request_ended", "source": None, "ended_at": ended_at})
    return found


def _request_summary(record: dict) -> dict:
    """A request record without its list of images (`--json` readers get the counts)."""
    return {key: record.get(key) for key in ("timestamp", "status", "images", "completed", "failed",
                                             "request_images", "record_id")}


def _queued(
    registry: PoolRegistry, matcher: _Matcher, budget: Budget, skipped: list[str], served: set[str]
) -> list[dict]:
    found, keys, lists = [], registry.keys, registry.task_lists
    scan_calls = HOST_SCAN_CALLS if budget.scan_calls is None else min(budget.scan_calls, HOST_SCAN_CALLS)
    hosts = registry.host_queues(served=served, listed=HOST_QUEUES_SEARCHED, scan_calls=scan_calls)
    if hosts.others:
        skipped.append(f"{hosts.others} host queues with no supervisor, beyond the {HOST_QUEUES_SEARCHED} fullest")
    if not hosts.complete:
        skipped.append(f"host queues beyond the first {scan_calls} SCAN calls")
    for name in [keys.queue, *(keys.host(host_id) for host_id in hosts.listed)]:
        read = 0
        for index, message in lists.entries(name, limit=budget.list_entries):
            read += 1
            if matcher.message(message):
                found.append({"state": "queued", "list": name, "position": index, **_ids(message)})
        if budget.list_entries is not None and read >= budget.list_entries:
            skipped.append(f"{name} beyond its first {budget.list_entries} entries")
    if found:
        lengths = dict(zip([f["list"] for f in found], lists.lengths([f["list"] for f in found]), strict=True))
        for place in found:
            place["length"] = lengths[place["list"]]
    return found


def _in_flight(registry: PoolRegistry, matcher: _Matcher, states: dict, now: float) -> list[dict]:
    found, keys, lists = [], registry.keys, registry.task_lists
    workers = _workers_by_list(states)
    for raw_key in lists.processing_lists():
        name = raw_key.decode(errors="backslashreplace")  # shown; Redis is asked by the key's bytes
        for index, entry in lists.entries(raw_key, limit=None):
            try:
                envelope = parse_envelope(entry)
            except InvalidMessage:
                continue
            if _matches(matcher, envelope.task_id, envelope.body):
                found.append(_flight(name, index, envelope, keys, states, workers.get(name), now))
    return found


def _matches(matcher: _Matcher, task_id: str, body: bytes) -> bool:
    """An envelope's task: by its task id, or its message's request id."""
    return task_id == matcher.wanted or matcher.message(body)


def _flight(name: str, index: int, envelope: Envelope, keys: QueueKeys, states: dict, worker: dict | None, now: float) -> dict:
    instance = keys.instance_of(name)
    state = states.get(instance or "", {})
    place = {
        "state": "in_flight",
        "list": name,
        "position": index,
        "task_id": envelope.task_id,
        "deliveries": envelope.deliveries,
        "instance": instance,
        "host": state.get("host"),
        "host_id": state.get("host_id"),
        "supervisor_alive": bool(state),
        "worker": _worker_summary(worker),
        **_ids(envelope.body),
    }
    current = _current_task(worker)
    if current is not None and current.get("task_id") == envelope.task_id:
        place["current"] = current
        started = current.get("started_at")
        if isinstance(started, int | float) and not isinstance(started, bool):
            place["since"] = started
            place["age"] = round(max(0.0, now - started), 1)
    return place


def _delayed(registry: PoolRegistry, matcher: _Matcher, budget: Budget, skipped: list[str], now: float) -> list[dict]:
    found, read, keys = [], 0, registry.keys
    while budget.list_entries is None or read < budget.list_entries:
        size = PAGE if budget.list_entries is None else min(PAGE, budget.list_entries - read)
        page = registry.task_lists.delayed_page(read, size)
        for entry, due in page:
            try:
                envelope = parse_envelope(entry)
            except InvalidMessage:
                continue
            if _matches(matcher, envelope.task_id, envelope.body):
                found.append({
                    "state": "delayed",
                    "list": keys.delayed,
                    "task_id": envelope.task_id,
                    "deliveries": envelope.deliveries,
                    "due_at": due,
                    "due_in": round(due - now, 1),
                    **_ids(envelope.body),
                })
        read += len(page)
        if len(page) < size:
            return found
    skipped.append(f"{keys.delayed} beyond its first {budget.list_entries} entries")
    return found


def _dead(registry: PoolRegistry, matcher: _Matcher, budget: Budget, skipped: list[str], now: float) -> list[dict]:
    found, read, letters = [], 0, registry.dead_letters
    for index, raw in letters.entries(limit=budget.list_entries, newest_first=True):
        read += 1
        entry = matcher.ours(raw)
        if entry is not None:
            found.append({"state": "dead", "list": letters.key, "position": index, **dead_letter_view(raw, entry, now)})
    if budget.list_entries is not None and read >= budget.list_entries:
        skipped.append(f"{letters.key} beyond its newest {budget.list_entries} entries")
    return found


def dead_letter_view(raw: bytes, entry: dict, now: float) -> dict:
    """A dead letter as the CLI and the dashboard show it; `id` names it for a requeue."""
    message = dead_letter_message(entry)
    shown = None if message is None else message[:MESSAGE_SHOWN].decode("utf-8", errors="replace")
    return {
        "id": hashlib.sha1(raw).hexdigest(),
        "task_id": _text(entry.get("task_id")),
        "request_id": _text(entry.get("request_id")),
        "image_id": _text(entry.get("image_id")),
        "attempts": entry.get("attempts") if isinstance(entry.get("attempts"), int) else None,
        "error": _text(entry.get("error")),
        "failed_at": _text(entry.get("failed_at")),
        "age": _age_of(entry.get("failed_at"), now),
        "message": shown,
        "message_bytes": None if message is None else len(message),
    }


def _recorded(client: redis.Redis, settings: Settings, matcher: _Matcher, budget: Budget, skipped: list[str]) -> list[dict]:
    found = []
    path = results_path(settings)
    if path is not None:
        try:
            found = _in_results_file(path, matcher, budget, skipped)
        except OSError as exc:
            skipped.append(f"{path}: {exc.strerror or exc}")
    if not found and settings.results_stream_maxlen:
        found = _in_stream(client, settings.results_stream, matcher, budget, skipped)
    for place in found:
        place.update(file_of(place["record"], settings.output_dir))
    return found


def _in_results_file(path: Path, matcher: _Matcher, budget: Budget, skipped: list[str]) -> list[dict]:
    found, read = [], 0
    for line in lines_from_end(path, limit=budget.file_bytes):
        read += len(line) + 1
        record = matcher.ours(line)
        if record is not None:
            found.append({"state": "recorded", "source": str(path), "record": record})
    if budget.file_bytes is not None and read >= budget.file_bytes and path.stat().st_size > budget.file_bytes:
        skipped.append(f"{path} before its last {budget.file_bytes >> 20} MiB")
    return found


def _in_stream(client: redis.Redis, stream: str, matcher: _Matcher, budget: Budget, skipped: list[str]) -> list[dict]:
    found, read, last = [], 0, None
    while budget.stream_entries is None or read < budget.stream_entries:
        size = PAGE if budget.stream_entries is None else min(PAGE, budget.stream_entries - read)
        try:
            page = ResultsStream(client, stream).newest(size, before=last)
        except redis.exceptions.ResponseError:
            return found  # not a stream (WRONGTYPE): nothing recorded there
        for entry_id, fields in page:
            record = matcher.ours(fields.get(b"record", b""))
            if record is not None:
                found.append({"state": "recorded", "source": f"stream {stream} entry {entry_id.decode()}", "record": record})
        read += len(page)
        if len(page) < size:
            return found
        last = page[-1][0]
    skipped.append(f"stream {stream} before its newest {budget.stream_entries} entries")
    return found


def file_of(record: dict, output_dir: Path) -> dict:
    """The record's JPEG: its name and whether it is in OUTPUT_DIR here."""
    file_path = record.get("file_path")
    if not isinstance(file_path, str) or not file_path:
        return {"file": None, "file_here": False}
    name = os.path.basename(file_path)
    here = output_dir / name
    return {"file": file_path, "file_here": bool(name) and here.is_file() and not here.is_symlink()}


# -- small helpers ------------------------------------------------------------------


def _ids(body: bytes) -> dict:
    ids = salvage(body)
    return {"request_id": ids.request_id, "image_id": ids.image_id}


def _workers_by_list(states: dict) -> dict[str, dict]:
    by_list = {}
    for state in states.values():
        workers = state.get("workers")
        for worker in workers if isinstance(workers, list) else []:
            if isinstance(worker, dict) and isinstance(worker.get("processing_list"), str):
                by_list[worker["processing_list"]] = worker
    return by_list


def _worker_summary(worker: dict | None) -> dict | None:
    if worker is None:
        return None
    return {key: worker.get(key) for key in ("slot", "pid", "heartbeat_age")}


def _current_task(worker: dict | None) -> dict | None:
    """The task a worker's state says it is doing, if the state says (newer
    supervisors put it there); under whichever of these names it comes."""
    if worker is None:
        return None
    for key in ("current", "task", "current_task"):
        value = worker.get(key)
        if isinstance(value, dict):
            return value
    return None


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _age_of(iso: object, now: float) -> float | None:
    if not isinstance(iso, str):
        return None
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # the ledger writes local time without a zone
    return round(max(0.0, now - moment.timestamp()), 1)


# -- the command ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="supervisor.py task", description="Say where a task is now.")
    parser.add_argument("request_id", metavar="REQUEST_ID", help="the message's request_id (or a task id)")
    parser.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv[1:] if argv and argv[0] == "task" else argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        complain(exc)
        return exitcodes.CONFIG_ERROR
    client = connect(settings)
    try:
        search = find_task(client, settings, args.request_id)
    except REDIS_ERRORS as exc:
        complain(printable(f"Redis at {settings.redacted_redis_url()} is unreachable: {exc}"))
        return NOT_FOUND
    finally:
        client.close()
    if args.json:
        print(json.dumps(search.as_json(), sort_keys=True, default=str))
    else:
        for line in describe(search, now=time.time()):
            say(line)
    return exitcodes.OK if search.found else NOT_FOUND


def describe(search: Search, *, now: float) -> list[str]:
    """The search as lines for a person (made printable by `say`)."""
    if not search.found:
        lines = [f"no task with request id {search.request_id} is queued, in flight, delayed, dead or recorded"]
    else:
        lines = [f"request {search.request_id}:"]
        lines += ["  " + _describe_place(place, now) for place in search.found]
    lines += [f"  not searched: {what}" for what in search.not_searched]
    return lines


def _describe_place(place: dict, now: float) -> str:
    state = place["state"]
    image = f"image {place.get('image_id')}"
    if state == "queued":
        return f"queued in {place['list']} at position {place['position']} of {place.get('length', '?')} ({image})"
    if state == "in_flight":
        worker = place.get("worker") or {}
        who = (f"worker {worker.get('slot')} pid {worker.get('pid')}" if worker else "no live worker")
        where = f"on {place.get('host')} ({place.get('host_id')})" if place.get("supervisor_alive") else (
            "of a supervisor whose lease has expired (its list will be requeued)"
        )
        since = f", started {place['age']:.1f}s ago" if "age" in place else ""
        phase = place.get("current", {}).get("phase")
        doing = f", {phase}" if isinstance(phase, str) else ""
        return (f"in flight {where}: instance {place.get('instance')}, {who}, list {place['list']}, "
                f"task {place['task_id']} delivery {place['deliveries']}{since}{doing} ({image})")
    if state == "delayed":
        due = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(place["due_at"]))
        when = f"in {place['due_in']:.1f}s" if place["due_in"] > 0 else "now (the next supervisor pass moves it)"
        return f"delayed retry: task {place['task_id']} delivery {place['deliveries']}, due {when}, at {due} ({image})"
    if state == "request_open":
        counts = f"{place['completed']} completed, {place['failed']} failed"
        expiry = "" if place["expires_in"] is None else (
            f"; ends incomplete in {place['expires_in']:.0f}s unless another image is recorded")
        return f"request: {place['recorded']} of {place['request_images']} recorded ({counts}){expiry}"
    if state == "request_ended":
        if place["source"] is None:
            return ("request ended at " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(place["ended_at"]))
                    + "; its record is in the requests.json of the host that ended it, and on the results stream")
        record = place["record"]
        return (f"request record {record.get('status')}: {record.get('images')} of {record.get('request_images')} "
                f"images ({record.get('completed')} completed, {record.get('failed')} failed) at "
                f"{record.get('timestamp')} in {place['source']}")
    if state == "dead":
        return (f"dead letter: {place.get('error')} (task {place.get('task_id')}, {place.get('attempts')} attempts, "
                f"failed at {place.get('failed_at')}, {image})")
    record = place["record"]
    error = f": {record.get('error')}" if record.get("error") is not None else ""
    if place.get("file"):
        file = f", file {place['file']}{'' if place.get('file_here') else ' (not on this host)'}"
    else:
        file = ""
    return (f"recorded {record.get('status')}{error} at {record.get('timestamp')} in {place['source']} "
            f"(task {record.get('task_id')}, {record.get('attempts')} attempts, image {record.get('image_id')}{file})")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
