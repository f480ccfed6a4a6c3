"""Operator commands: `python supervisor.py status|check|dead|host ...`.

They read what the pool keeps in Redis: the queue, the processing lists, the
delayed retries, the dead letters, the per-10-second counts the ledger adds
with each acknowledgement, and each supervisor's lease, whose value is its
state (children and how recently each beat). `dead requeue|purge` and `host
drain` (control/drain.py) change the queue; none touches results.json.

Everything printed for a person goes through shared.terminal: host ids, list
names, ids and errors come from Redis, where whoever can write may put terminal
control sequences; `--json` output is escaped by json.dumps.

Exit codes: 0 fine, 1 unhealthy (`check`), a refused drain or Redis
unreachable, 2 usage or configuration error, always with one line on stderr,
never a traceback.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis

from control.drain import HostStillServed, drain_host
from shared import exitcodes
from shared.cli import OneLineParser, complain
from shared.config import ConfigError, Settings
from shared.output import LOCK_NAME
from shared.process import LEDGER_STALE_SECONDS
from shared.redis_queue import (
    REDIS_ERRORS,
    STATS_BUCKET_SECONDS,
    QueueKeys,
    ReliableQueue,
    connect,
)
from shared.terminal import printable, say

UNHEALTHY = 1


class Unhealthy(Exception):
    """`check` found a reason the pool is not healthy."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="supervisor.py", description="Inspect and repair a running pool.")
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="queue depth, in-flight tasks, workers, recent outcomes")
    status.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    commands.add_parser("check", help="exit 0 when healthy, 1 with the reason otherwise")
    dead = commands.add_parser("dead", help="inspect and replay dead letters")
    dead_commands = dead.add_subparsers(dest="dead_command", required=True)
    listing = dead_commands.add_parser("list", help="print dead letters, oldest first")
    listing.add_argument("--limit", type=int, default=50, metavar="N")
    listing.add_argument("--json", action="store_true", help="one JSON entry per line")
    requeue = dead_commands.add_parser("requeue", help="push dead letters' messages back onto the queue")
    requeue.add_argument("--limit", type=int, default=None, metavar="N", help="at most N, oldest first")
    dead_commands.add_parser("purge", help="delete every dead letter")
    host = commands.add_parser("host", help="let go of what a host that is gone for good holds")
    host_commands = host.add_subparsers(dest="host_command", required=True)
    drain = host_commands.add_parser(
        "drain", help="its URL tasks to the shared queue, its shared-memory tasks to the dead letters"
    )
    drain.add_argument("host_id", metavar="HOST_ID", help="the lost host's HOST_ID, as `status` lists it")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        complain(exc)
        return exitcodes.CONFIG_ERROR
    queue = ReliableQueue(connect(settings), QueueKeys(settings.queue), max_message_bytes=settings.max_message_bytes)
    handler: Callable[[argparse.Namespace, Settings, ReliableQueue], int] = {
        "status": status,
        "check": check,
        "dead": dead,
        "host": host,
    }[args.command]
    try:
        return handler(args, settings, queue)
    except REDIS_ERRORS as exc:
        complain(printable(f"Redis at {settings.redacted_redis_url()} is unreachable: {exc}"))
        return UNHEALTHY


# -- status ------------------------------------------------------------------


def collect_status(queue: ReliableQueue, *, now: float) -> dict:
    keys, client = queue.keys, queue.client
    supervisors = [json.loads(raw) for raw in _lease_values(client, keys)]
    depths = queue.depths()
    return {
        "queue": keys.queue,
        "queue_depth": depths.waiting,
        "in_flight": depths.in_flight,
        "in_flight_by_list": depths.in_flight_by_list,
        "delayed_retries": depths.delayed,
        "dead_letters": depths.dead,
        "host_queues": queue.host_queues(),
        "committing": client.hlen(keys.committing),
        "last_minute": _last_minute(client, keys, now),
        "supervisors": supervisors,
    }


def status(args: argparse.Namespace, settings: Settings, queue: ReliableQueue) -> int:
    report = collect_status(queue, now=time.time())
    if args.json:
        print(json.dumps(report, sort_keys=True))
        return exitcodes.OK
    say(f"queue {report['queue']}: {report['queue_depth']} waiting, {report['in_flight']} in flight, "
         f"{report['delayed_retries']} delayed retries, {report['dead_letters']} dead letters")
    served = {supervisor.get("host_id") for supervisor in report["supervisors"]}
    for host_id, depth in sorted(report["host_queues"].items()):
        whose = "" if host_id in served else "  (no supervisor: `host drain` it if the host is gone for good)"
        say(f"host {host_id}: {depth} waiting in its own queue{whose}")
    if report["committing"]:
        say(f"{report['committing']} records being committed")
    minute = report["last_minute"]
    say(f"last minute: {minute['completed']} completed, {minute['failed']} failed, {minute['retried']} retried")
    if not report["supervisors"]:
        say("no supervisor is running on this queue")
    for supervisor in report["supervisors"]:
        say(f"supervisor {supervisor['instance']} on {supervisor['host']} pid {supervisor['pid']}, "
             f"{len(supervisor['workers'])}/{supervisor['desired_workers']} workers"
             f"{'' if supervisor['ready'] else ' (starting)'}")
        ledger = supervisor["ledger"]
        if ledger:
            say(f"  ledger  pid {ledger['pid']:>7}  last beat {_age(ledger['heartbeat_age'])}")
        for worker in supervisor["workers"]:
            tasks = report["in_flight_by_list"].get(worker["processing_list"], 0)
            say(f"  worker {worker['slot']:<2} pid {worker['pid']:>7}  last beat {_age(worker['heartbeat_age'])}"
                 f"  in flight {tasks}")
    return exitcodes.OK


def _lease_values(client: redis.Redis, keys: QueueKeys) -> list[bytes]:
    lease_keys = list(client.scan_iter(match=keys.lease("*"), count=100))
    return [value for value in client.mget(lease_keys) if value] if lease_keys else []


def _last_minute(client: redis.Redis, keys: QueueKeys, now: float) -> dict[str, int]:
    totals = {"completed": 0, "failed": 0, "retried": 0}
    for back in range(60 // STATS_BUCKET_SECONDS):
        counts = client.hgetall(keys.stats(now - back * STATS_BUCKET_SECONDS))
        for name in totals:
            totals[name] += int(counts.get(name.encode(), 0))
    return totals


def _age(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.1f}s ago"


# -- check -------------------------------------------------------------------


def check(args: argparse.Namespace, settings: Settings, queue: ReliableQueue) -> int:
    try:
        instance = _holder_of(settings.output_dir)
        _check_supervisor(queue, instance)
    except Unhealthy as exc:
        say(f"unhealthy: {exc}", file=sys.stderr)
        return UNHEALTHY
    say("healthy")
    return exitcodes.OK


def _holder_of(output_dir: Path) -> str:
    """The instance holding OUTPUT_DIR's lock, which must be a live process."""
    try:
        holder = json.loads((output_dir / LOCK_NAME).read_text())
    except (OSError, ValueError):
        raise Unhealthy(f"no supervisor has run with OUTPUT_DIR {output_dir}") from None
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        raise Unhealthy(f"the supervisor (pid {holder['pid']}) is not running") from None
    except PermissionError:
        pass  # alive, another user's
    return holder["instance"]


def _check_supervisor(queue: ReliableQueue, instance: str) -> None:
    raw = queue.client.get(queue.keys.lease(instance))
    if raw is None:
        raise Unhealthy(f"supervisor {instance} has not renewed its lease in Redis")
    state = json.loads(raw)
    if not state["ready"]:
        raise Unhealthy("the pool is still starting")
    ledger = state["ledger"]
    if ledger is None or ledger["heartbeat_age"] is None or ledger["heartbeat_age"] > LEDGER_STALE_SECONDS:
        raise Unhealthy("the ledger is not writing")
    stale = [w["slot"] for w in state["workers"] if w["heartbeat_age"] is None or w["heartbeat_age"] > state["task_timeout"]]
    if stale:
        raise Unhealthy(f"workers {stale} have not beaten within TASK_TIMEOUT")
    if not state["workers"]:
        raise Unhealthy("no worker is running")


# -- host drain ----------------------------------------------------------------


def host(args: argparse.Namespace, settings: Settings, queue: ReliableQueue) -> int:
    live_host_ids = {json.loads(raw).get("host_id") for raw in _lease_values(queue.client, queue.keys)}
    try:
        report = drain_host(
            queue, args.host_id, live_host_ids=live_host_ids, dead_letter_max=settings.dead_letter_max
        )
    except HostStillServed as exc:
        complain(printable(str(exc)))
        return UNHEALTHY
    if report.requeued_lists:
        say(f"requeued {report.requeued_lists} processing lists of stopped supervisors")
    say(f"host {args.host_id}: {report.to_shared_queue} tasks to the shared queue {queue.keys.queue}, "
         f"{report.dead_lettered} shared-memory tasks to the dead letters")
    if report.left:
        say(f"{report.left} tasks arrived meanwhile and wait in {queue.keys.host(args.host_id)}: "
             "drain again once producers no longer send to this host")
    return exitcodes.OK


# -- dead letters ------------------------------------------------------------


def dead(args: argparse.Namespace, settings: Settings, queue: ReliableQueue) -> int:
    keys, client = queue.keys, queue.client
    if args.dead_command == "list":
        for raw in client.lrange(keys.dead, 0, max(0, args.limit) - 1):
            entry = json.loads(raw)
            if args.json:
                print(json.dumps(entry, sort_keys=True))
            else:
                say(f"{entry['failed_at']}  {entry['request_id']}  {entry['image_id']}  "
                     f"attempts={entry['attempts']}  {entry['error']}")
        return exitcodes.OK
    if args.dead_command == "purge":
        removed = client.llen(keys.dead)
        client.delete(keys.dead)
        say(f"purged {removed} dead letters")
        return exitcodes.OK
    return _requeue_dead(queue, limit=args.limit)


def _requeue_dead(queue: ReliableQueue, *, limit: int | None) -> int:
    """Oldest first; each message goes back as the producer sent it, once."""
    moved = 0
    end = -1 if limit is None else max(0, limit) - 1
    for raw in queue.client.lrange(queue.keys.dead, 0, end):
        entry = json.loads(raw)
        message = (
            base64.b64decode(entry["message_base64"]) if "message_base64" in entry else entry["message"].encode()
        )
        moved += queue.requeue_dead_letter(raw, message)
    say(f"requeued {moved} dead letters")
    return exitcodes.OK
