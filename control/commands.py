"""Operator commands: `python supervisor.py status|check|dead|host ...`.

They read what the pool keeps in Redis: the queue, the processing lists, the
delayed retries, the dead letters, the per-10-second counts the ledger adds
with each acknowledgement, and each supervisor's lease, whose value is its
state as of its last renewal (children, how recently each beat, the task each
worker has in hand). They ask PoolRegistry and the owners it holds
(shared/state/), never the Redis client. `dead requeue|purge` and `host
drain` (control/drain.py) change the queue; none touches results.json. `dead
purge` asks first on a terminal and, without one, refuses unless given --yes.

Everything printed for a person goes through image_result_client.terminal: host ids, list
names, ids and errors come from Redis, where whoever can write may put terminal
control sequences; `--json` output is escaped by json.dumps.

Exit codes: 0 fine (also Ctrl-C ending `status --watch`), 1 unhealthy
(`check`), a refused drain, a purge declined, no such dead letter or Redis
unreachable, 2 usage or configuration error (a purge without --yes and
without a terminal), always with one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from control.drain import HostStillServed, drain_host
from control.lookup import dead_letter_message
from image_result_client.protocol import QueueKeys
from image_result_client.terminal import printable, say
from shared import exitcodes
from shared.cli import OneLineParser, complain
from shared.config import ConfigError, Settings
from shared.process import LEDGER_STALE_SECONDS
from shared.state.dead_letters import DeadLetters
from shared.state.pool_registry import PoolRegistry
from shared.state.reading import json_object
from shared.state.redis_queue import REDIS_ERRORS, ReliableQueue, connect
from shared.storage.files import LOCK_NAME

UNHEALTHY = 1
# Home the cursor and clear the screen: `status --watch` draws each refresh anew.
CLEAR_SCREEN = "\x1b[H\x1b[2J"


class Unhealthy(Exception):
    """`check` found a reason the pool is not healthy."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="supervisor.py", description="Inspect and repair a running pool.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = _subcommand(commands, "status", "queue depth, in-flight tasks, each worker's task, recent outcomes")
    status.add_argument("--json", action="store_true", help="one JSON object, for scripts (one a line with --watch)")
    status.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    status.add_argument(
        "--interval", type=_interval, default=2.0, metavar="S", help="seconds between refreshes with --watch (default 2)"
    )
    _subcommand(commands, "check", "exit 0 when healthy, 1 with the reason otherwise")
    dead = _subcommand(commands, "dead", "list, show, replay or delete dead letters")
    dead_commands = dead.add_subparsers(dest="dead_command", required=True, metavar="ACTION")
    listing = _subcommand(dead_commands, "list", "print dead letters, oldest first, each with its number")
    listing.add_argument("--limit", type=_count, default=50, metavar="N", help="at most N (default 50)")
    listing.add_argument("--error", metavar="TEXT", help="only those whose error contains TEXT, in any case")
    listing.add_argument(
        "--older-than", type=_age_limit, metavar="AGE", help="only those that failed more than AGE ago: 90s, 15m, 1h, 2d"
    )
    listing.add_argument("--newer-than", type=_age_limit, metavar="AGE", help="only those that failed less than AGE ago")
    listing.add_argument("--json", action="store_true", help="one JSON entry per line, as stored")
    show = _subcommand(dead_commands, "show", "print one dead letter whole, its message included")
    show.add_argument("index", type=int, metavar="N", help="its number in `dead list` (0: the oldest, -1: the newest)")
    show.add_argument("--json", action="store_true", help="the entry as stored, as one JSON object")
    requeue = _subcommand(dead_commands, "requeue", "push dead letters' messages back onto the queue, oldest first")
    requeue.add_argument("--limit", type=_count, default=None, metavar="N", help="at most N, oldest first")
    purge = _subcommand(dead_commands, "purge", "delete every dead letter (asks first on a terminal)")
    purge.add_argument("--yes", action="store_true", help="do not ask; needed without a terminal")
    for action in (listing, show, requeue, purge):
        action.add_argument(
            "--junk", action="store_true",
            help="the dead letters of junk, messages without a request_id ({Q}:dead:junk), capped apart",
        )
    host = _subcommand(commands, "host", "let go of what a host that is gone for good holds")
    host_commands = host.add_subparsers(dest="host_command", required=True, metavar="ACTION")
    drain = _subcommand(
        host_commands, "drain", "its URL tasks to the shared queue, its shared-memory tasks to the dead letters"
    )
    drain.add_argument("host_id", metavar="HOST_ID", help="the lost host's HOST_ID, as `status` lists it")
    return parser


def _subcommand(commands: argparse._SubParsersAction, name: str, text: str) -> argparse.ArgumentParser:
    """A subcommand whose one line of help is also what its own --help opens with."""
    return commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")


def _interval(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0.1 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not an interval; expected 0.1..3600 seconds")
    return seconds


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count; expected 1 or more")
    return int(text)


_AGE = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _age_limit(text: str) -> float:
    """An age in seconds, from 90, 90s, 15m, 1.5h or 2d."""
    match = _AGE.fullmatch(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age; expected e.g. 90s, 15m, 1h or 2d")
    return float(match.group(1)) * _AGE_UNITS[match.group(2)]


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        complain(exc)
        return exitcodes.CONFIG_ERROR
    registry = PoolRegistry(connect(settings), QueueKeys(settings.queue))
    handler: Callable[[argparse.Namespace, Settings, PoolRegistry], int] = {
        "status": status,
        "check": check,
        "dead": dead,
        "host": host,
    }[args.command]
    try:
        return handler(args, settings, registry)
    except REDIS_ERRORS as exc:
        complain(printable(f"Redis at {settings.redacted_redis_url()} is unreachable: {exc}"))
        return UNHEALTHY


# -- status ------------------------------------------------------------------


def collect_status(registry: PoolRegistry, *, now: float) -> dict:
    keys = registry.keys
    supervisors = list(registry.leases.states().values())
    depths = registry.depths()
    hosts = registry.host_queues(served={str(supervisor.get("host_id")) for supervisor in supervisors})
    return {
        "collected_at": now,
        "queue": keys.queue,
        "queue_depth": depths.waiting,
        "in_flight": depths.in_flight,
        "in_flight_by_list": depths.in_flight_by_list,
        "delayed_retries": depths.delayed,
        "dead_letters": depths.dead,
        "junk_dead_letters": depths.junk,
        "dead_letters_trimmed": depths.trimmed,
        "host_queues": hosts.listed,
        "host_queues_unlisted": hosts.unlisted_json(),
        "committing": registry.task_lists.committing_count(),
        "last_minute": registry.stats.last_minute(now),
        "supervisors": supervisors,
    }


def status(args: argparse.Namespace, settings: Settings, registry: PoolRegistry) -> int:
    if args.watch:
        return _watch(args, settings, registry)
    report = collect_status(registry, now=time.time())
    if args.json:
        print(json.dumps(report, sort_keys=True))
        return exitcodes.OK
    for line in render_status(report):
        say(line)
    return exitcodes.OK


def render_status(report: dict) -> list[str]:
    """The report as lines for a person, not yet made printable (say() does that).

    Each supervisor's part is its state as of its last lease renewal, which
    it says; the ages in it are from now."""
    lines = [
        f"queue {report['queue']}: {report['queue_depth']} waiting, {report['in_flight']} in flight, "
        f"{report['delayed_retries']} delayed retries, {report['dead_letters']} dead letters"
    ]
    trimmed = report.get("dead_letters_trimmed") or {}
    if report.get("junk_dead_letters") or any(trimmed.values()):
        lines.append(
            f"{report.get('junk_dead_letters', 0)} dead letters of junk without a request_id (`dead list --junk`); "
            f"pushed out by DEAD_LETTER_MAX so far: {trimmed.get('failed', 0)} dead letters, "
            f"{trimmed.get('junk', 0)} of junk"
        )
    served = {supervisor.get("host_id") for supervisor in report["supervisors"]}
    for host_id, depth in sorted(report["host_queues"].items()):
        whose = "" if host_id in served else "  (no supervisor: `host drain` it if the host is gone for good)"
        lines.append(f"host {host_id}: {depth} waiting in its own queue{whose}")
    unlisted = report["host_queues_unlisted"]
    if unlisted["queues"] or not unlisted["complete"]:
        waiting = "" if unlisted["waiting"] is None else f", {unlisted['waiting']} tasks in them"
        more = "" if unlisted["complete"] else " (SCAN stopped early: there may be more)"
        lines.append(f"and {unlisted['queues']} more host queues with no supervisor{waiting}{more}")
    if report["committing"]:
        lines.append(f"{report['committing']} records being committed")
    minute = report["last_minute"]
    expired = f" ({minute['expired']} expired)" if minute.get("expired") else ""
    lines.append(
        f"last minute: {minute['completed']} completed, {minute['failed']} failed{expired}, {minute['retried']} retried"
    )
    if not report["supervisors"]:
        lines.append("no supervisor is running on this queue")
    for supervisor in report["supervisors"]:
        lines.extend(_render_supervisor(supervisor, report["in_flight_by_list"], now=report["collected_at"]))
    return lines


def _render_supervisor(state: dict, in_flight_by_list: dict[str, int], *, now: float) -> list[str]:
    updated_at = state.get("updated_at", now)
    stale = max(0.0, now - updated_at)  # what the ages in the state are older by now
    condition = " (stopping)" if state.get("stopping") else "" if state["ready"] else " (starting)"
    lines = [
        f"supervisor {state['instance']} on {state['host']} pid {state['pid']}, "
        f"{len(state['workers'])}/{state['desired_workers']} workers{condition}, "
        f"as of {time.strftime('%H:%M:%S', time.localtime(updated_at))} ({_duration(stale)} ago)"
    ]
    shm = state.get("shm")  # a supervisor of an older version, or without /dev/shm, does not say
    if isinstance(shm, dict):
        lines.append(f"  shared memory  {_shm_usage(shm)}")
    ledger = state["ledger"]
    if ledger:
        lines.append(f"  ledger     pid {ledger['pid']:>7}  last beat {_ago(ledger['heartbeat_age'], stale)}")
    for worker in state["workers"]:
        tasks = in_flight_by_list.get(worker["processing_list"], 0)
        line = (
            f"  worker {worker['slot']:<3} pid {worker['pid']:>7}  last beat {_ago(worker['heartbeat_age'], stale)}"
            f"  in flight {tasks}"
        )
        if "task" in worker:  # a supervisor of an older version does not say
            line += "  " + _render_task(worker["task"], stale)
        lines.append(line)
    return lines


def _shm_usage(shm: dict) -> str:
    """`12.6 MB of frames waiting, 2% of SHM_BUDGET_BYTES (629.1 MB)`."""
    waiting, budget = shm.get("waiting_bytes"), shm.get("budget_bytes")
    if not isinstance(waiting, int) or not isinstance(budget, int):
        return "not reported"
    text = f"{waiting / 1e6:.1f} MB of frames waiting"
    if budget <= 0:
        return text + " (no SHM_BUDGET_BYTES)"
    return text + f", {100 * waiting // budget}% of SHM_BUDGET_BYTES ({budget / 1e6:.1f} MB)"


def _render_task(task: dict | None, stale: float) -> str:
    if task is None:
        return "idle"
    text = f"{task['phase']} for {_duration(task['age'] + stale)}"
    if "task_id" in task:
        text += f": request {_cut(_shown(task.get('request_id')))}, image {_cut(_shown(task.get('image_id')))}"
        if task.get("attempt", 1) > 1:
            text += f", attempt {task['attempt']}"
    return text


def _watch(args: argparse.Namespace, settings: Settings, registry: PoolRegistry) -> int:
    """`status` again every --interval until Ctrl-C, which exits 0. On a
    terminal each refresh clears the screen and draws anew; otherwise (or with
    --json) the refreshes follow one another."""
    redraw = sys.stdout.isatty() and not args.json
    try:
        while True:
            now = time.time()
            try:
                report = collect_status(registry, now=now)
            except REDIS_ERRORS as exc:  # Redis may come back: keep watching
                report, lines = None, [f"Redis at {settings.redacted_redis_url()} is unreachable: {exc}"]
            else:
                lines = render_status(report)
            if args.json:
                if report is not None:
                    print(json.dumps(report, sort_keys=True))
                else:
                    say(lines[0], file=sys.stderr)
            else:
                if redraw:
                    sys.stdout.write(CLEAR_SCREEN)
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
                say(f"every {args.interval:g}s, Ctrl-C to stop: {stamp}")
                for line in lines:
                    say(line)
                if not redraw:
                    print()
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return exitcodes.OK
    except BrokenPipeError:  # `status --watch | head`: the reader is gone, so are we
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return exitcodes.OK


def _ago(seconds: float | None, stale: float = 0.0) -> str:
    return "never" if seconds is None else f"{_duration(seconds + stale)} ago"


def _duration(seconds: float) -> str:
    """4.2s, 12m05s, 3h04m, 2d03h."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _shown(value: object) -> str:
    """A value for a line of text: "-" when missing (never "None")."""
    return "-" if value is None or value == "" else str(value)


def _cut(text: str, width: int = 64) -> str:
    """An id in a line of `status`: at most `width` characters, cut with an ellipsis."""
    return text if len(text) <= width else text[: width - 1] + "\u2026"


# -- check -------------------------------------------------------------------


def check(args: argparse.Namespace, settings: Settings, registry: PoolRegistry) -> int:
    try:
        instance = _holder_of(settings.output_dir)
        _check_supervisor(registry, instance)
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


def _check_supervisor(registry: PoolRegistry, instance: str) -> None:
    state = registry.leases.state(instance)
    if state is None:
        raise Unhealthy(f"supervisor {instance} has not renewed its lease in Redis")
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


def host(args: argparse.Namespace, settings: Settings, registry: PoolRegistry) -> int:
    live_host_ids = {state.get("host_id") for state in registry.leases.states().values()}
    try:
        requeuer = ReliableQueue(registry.client, registry.keys, max_message_bytes=settings.max_message_bytes)
        report = drain_host(
            registry, requeuer, args.host_id, live_host_ids=live_host_ids, dead_letter_max=settings.dead_letter_max
        )
    except HostStillServed as exc:
        complain(printable(str(exc)))
        return UNHEALTHY
    if report.requeued_lists:
        say(f"requeued {report.requeued_lists} processing lists of stopped supervisors")
    say(f"host {args.host_id}: {report.to_shared_queue} tasks to the shared queue {registry.keys.queue}, "
         f"{report.dead_lettered} shared-memory tasks to the dead letters")
    if report.left:
        say(f"{report.left} tasks arrived meanwhile and wait in {registry.keys.host(args.host_id)}: "
             "drain again once producers no longer send to this host")
    return exitcodes.OK


# -- dead letters ------------------------------------------------------------


def dead(args: argparse.Namespace, settings: Settings, registry: PoolRegistry) -> int:
    # Every action works on either list the same way.
    letters = registry.junk_dead_letters if args.junk else registry.dead_letters
    if args.dead_command == "list":
        return _list_dead(args, letters)
    if args.dead_command == "show":
        return _show_dead(args, letters)
    if args.dead_command == "purge":
        return _purge_dead(args, letters)
    return _requeue_dead(letters, limit=args.limit)


def _list_dead(args: argparse.Namespace, letters: DeadLetters) -> int:
    """Oldest first, those that pass the filters, each with its number for `dead show`."""
    keep = _dead_filter(args, now=time.time())
    shown = 0
    for index, entry in _dead_entries(letters):
        if shown >= args.limit:
            break
        if not keep(entry):
            continue
        shown += 1
        if args.json:
            print(json.dumps(entry, sort_keys=True))
        else:
            say(f"{index:>5}  {_shown(entry.get('failed_at'))}  {_shown(entry.get('request_id'))}  "
                f"{_shown(entry.get('image_id'))}  attempts={_shown(entry.get('attempts'))}  "
                f"{_shown(entry.get('error'))}")
    if not shown and not args.json:
        total = letters.count()
        say(f"no dead letters in {letters.key}" if not total else
            f"none of the {total} dead letters in {letters.key} match")
    return exitcodes.OK


DEAD_PAGE = 500


def _dead_entries(letters: DeadLetters) -> Iterator[tuple[int, dict]]:
    """(number, entry), oldest first, a page at a time. The list may change
    meanwhile (new dead letters at its end, the oldest trimmed): numbers are
    positions as each page was read."""
    for index, raw in letters.entries(page_size=DEAD_PAGE):
        yield index, _dead_entry(raw)


def _dead_entry(raw: bytes) -> dict:
    """An entry as the ledger wrote it, or what can be shown of one that is not."""
    try:
        entry = json.loads(raw)
    except ValueError:
        entry = None
    return entry if isinstance(entry, dict) else {"unreadable": raw.decode(errors="backslashreplace")}


def _dead_filter(args: argparse.Namespace, *, now: float) -> Callable[[dict], bool]:
    text = args.error.casefold() if args.error else None
    ages = args.older_than is not None or args.newer_than is not None

    def keep(entry: dict) -> bool:
        if text is not None and text not in str(entry.get("error") or "").casefold():
            return False
        if not ages:
            return True
        failed_at = _epoch(entry.get("failed_at"))
        if failed_at is None:
            return False  # no telling its age
        age = now - failed_at
        return (args.older_than is None or age > args.older_than) and (
            args.newer_than is None or age < args.newer_than
        )

    return keep


def _epoch(text: object) -> float | None:
    """failed_at as seconds since the epoch; one without a zone is the local time
    (the ledger writes its host's local time)."""
    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return None


def _show_dead(args: argparse.Namespace, letters: DeadLetters) -> int:
    raw = letters.at(args.index)
    if raw is None:
        complain(printable(f"no dead letter {args.index}: {letters.key} holds {letters.count()}"))
        return UNHEALTHY
    entry = _dead_entry(raw)
    if args.json:
        print(json.dumps(entry, sort_keys=True))
        return exitcodes.OK
    say(f"dead letter {args.index} of {letters.key}")
    for name in ("failed_at", "task_id", "request_id", "image_id", "attempts", "error"):
        say(f"{name:<11} {_shown(entry.get(name))}")
    for name in sorted(set(entry) - {"failed_at", "task_id", "request_id", "image_id", "attempts", "error"}):
        if name != "message":
            say(f"{name:<11} {entry[name]}")
    if "message" in entry:
        for line in _message_lines(str(entry["message"])):
            say(line)
    return exitcodes.OK


def _message_lines(message: str) -> list[str]:
    """The producer's message: indented JSON when it is JSON, else as it is."""
    try:
        parsed = json.loads(message)
    except (ValueError, RecursionError):
        return [f"message     {message}"]
    shown = json.dumps(parsed, indent=2, ensure_ascii=False, sort_keys=True).splitlines()
    return [f"message     {shown[0]}", *(" " * 12 + line for line in shown[1:])]


def _purge_dead(args: argparse.Namespace, letters: DeadLetters) -> int:
    """Delete every dead letter; a person at a terminal says yes first, a
    script says --yes."""
    count = letters.count()
    if not count:
        say(f"no dead letters in {letters.key}")
        return exitcodes.OK
    if not args.yes:
        if not sys.stdin.isatty():
            complain(printable(f"dead purge would delete {count} dead letters from {letters.key}; "
                               "without a terminal to ask on, pass --yes"))
            return exitcodes.CONFIG_ERROR
        if not _confirm(f"delete {count} dead letters from {letters.key}? [y/N] "):
            say("nothing deleted")
            return UNHEALTHY
    removed = letters.purge()
    say(f"purged {removed} dead letters")
    return exitcodes.OK


def _confirm(question: str) -> bool:
    """Ask on the terminal; only y or yes is a yes (Ctrl-C and Ctrl-D are a no)."""
    sys.stderr.write(printable(question))
    sys.stderr.flush()
    try:
        answer = sys.stdin.readline()
    except KeyboardInterrupt:
        answer = ""
    if not answer.endswith("\n"):
        sys.stderr.write("\n")
    return answer.strip().lower() in ("y", "yes")


def _requeue_dead(letters: DeadLetters, *, limit: int | None) -> int:
    """Oldest first; each message goes back as the producer sent it, once."""
    moved = unreadable = 0
    end = -1 if limit is None else limit - 1  # LRANGE is inclusive; -1: to the end
    for raw in letters.page(0, end):
        # Anyone who may write the list may have put anything there: such an
        # entry stays, for `dead show` to look at, and the rest go on.
        message = dead_letter_message(json_object(raw) or {})
        if message is None:
            unreadable += 1
            continue
        moved += letters.requeue(raw, message)
    say(f"requeued {moved} dead letters")
    if unreadable:
        complain(f"{unreadable} entries hold no message the pool wrote and stay in the list (see `dead list`)")
        return UNHEALTHY
    return exitcodes.OK
