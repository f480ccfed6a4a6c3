"""`image-result-client enqueue` (or `python -m image_result_client enqueue`):
submit image files or URLs from the shell.

    image-result-client enqueue photo.jpg scans/*.png https://example.com/a.jpg
    image-result-client enqueue --wait --timeout 60 photo.jpg     # progress bar, then one line per record
    image-result-client enqueue --request book-7 p1.png p2.png    # one request of 2 images (request_images)
    image-result-client wait-request --timeout 600 book-7         # its request record, from the results stream
    image-result-client enqueue --expires-in 60 photo.jpg  # the pool fails it as expired after a minute
    image-result-client room --bytes 6220800                 # exit 0 if a 1080p frame fits SHM_BUDGET_BYTES
    image-result-client --version

A file is read with OpenCV and handed over through shared memory (image_id =
the file's stem); an http(s) URL is queued as a URL task. REDIS_URL,
HOSTING_TASKS_QUEUE, RESULTS_STREAM and OUTPUT_DIR come from the environment,
then `.env`, as for the pool; the options override them. --wait follows the
pool's results stream in Redis, which works from any host; with --output-dir
(or RESULTS_STREAM_MAXLEN=0: the pool keeps no stream) it reads
OUTPUT_DIR/results.json instead, which only the pool's host can. Where neither
shows a record yet (no stream in Redis, no results.json in the directory), a
note says so at once rather than leaving a silent wait. OpenCV (for files) and python-dotenv
(for a `.env`) come with the `cli` extra and are imported only when needed, so
URLs can be queued without them; when one is needed and missing, that is a
usage error naming the extra.

Every argument is checked before anything is queued, so a typo queues nothing.
Exit status: 0 all records completed (or, without --wait, all queued; for
wait-request, the request completed), 1 a task failed (a request did not
complete), the wait timed out or Redis is unreachable, 2 a usage error, 75
(EX_TEMPFAIL) SHM_BUDGET_BYTES or MAX_QUEUE_LENGTH left no room within PUSH_WAIT:
one line says which and how many were queued before, which stay queued.

Before each file's segment is made, the budget SHM_BUDGET_BYTES and the queue
limit MAX_QUEUE_LENGTH are waited on for up to PUSH_WAIT seconds (settings read
as the others; docs/operations.md#flow-control).

Records and errors carry ids and texts that came through the queue; every line
for a person goes through terminal.say, so control characters in them are
shown as escapes, never sent to the terminal.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import IO, Any, NoReturn
from urllib.parse import urlsplit

import redis

from image_result_client import __version__
from image_result_client.flow import EX_TEMPFAIL, FlowLimits, PushRefused, shm_budget_room
from image_result_client.producer import DEFAULT_PREFIX, Producer, Submission, WaitTimeout, check_url
from image_result_client.protocol import (
    DEFAULT_OUTPUT_DIR,
    DEFAULT_QUEUE,
    DEFAULT_REDIS_URL,
    DEFAULT_RESULTS_STREAM,
    MAX_ID_LENGTH,
    MAX_REQUEST_IMAGES,
    RESULTS_NAME,
    check_list_name,
    is_unicode,
)
from image_result_client.redact import redact_url
from image_result_client.settings_file import SettingsFileError
from image_result_client.settings_file import read_dotenv as read_settings_file
from image_result_client.terminal import say

PROG = "image-result-client"
USAGE_ERROR = 2
FAILED = 1
DEFAULT_TIMEOUT = 300.0
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
CLI_EXTRA = "pip install 'image-result-client[cli]'"
# Redis not answering, as opposed to answering with an error.
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)


class UsageError(Exception):
    """Shown as one line; exit 2."""


class RedisUnreachable(Exception):
    """Shown as one line; exit 1."""


class NoRoom(Exception):
    """A budget or queue limit refused; shown as one line, exit EX_TEMPFAIL."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        say(f"{PROG}: {message}; see --help", file=sys.stderr)
        sys.exit(USAGE_ERROR)


@dataclass(frozen=True, slots=True)
class Target:
    """Where tasks go and records appear: the pool's settings of those names."""

    redis_url: str
    queue: str
    output_dir: Path | None  # where --wait reads results.json; None: follow results_stream
    limits: FlowLimits
    results_stream: str = DEFAULT_RESULTS_STREAM


@dataclass(frozen=True, slots=True)
class Item:
    argument: str
    url: str | None = None
    path: Path | None = None


class ProgressBar:
    """`[#####-----] 5/10 done, 1 failed` on a stream: redrawn in place with \\r
    on a terminal, one line per change otherwise (logs, CI)."""

    def __init__(self, total: int, *, stream: IO[str] | None = None, width: int = 20) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.interactive = self.stream.isatty()
        self._last: str | None = None

    def update(self, done: int, failed: int) -> None:
        filled = self.width * done // self.total if self.total else self.width
        line = f"[{'#' * filled}{'-' * (self.width - filled)}] {done}/{self.total} done, {failed} failed"
        if line == self._last:
            return
        self._last = line
        self.stream.write(f"\r{line}" if self.interactive else f"{line}\n")
        self.stream.flush()

    def on_progress(self, records: list[dict[str, Any]], total: int) -> None:
        """A Producer.wait on_progress callback."""
        self.update(len(records), sum(1 for record in records if record.get("status") != "completed"))

    def finish(self) -> None:
        if self.interactive and self._last is not None:
            self.stream.write("\n")
            self.stream.flush()


def record_line(record: dict[str, Any]) -> str:
    """`completed <request_id> <file_path>` or `failed <request_id> <error>`."""
    status = record.get("status")
    detail = record.get("file_path") if status == "completed" else record.get("error")
    return f"{status:<9} {record.get('request_id')} {detail}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog=PROG, description="Submit images to image-result-worker.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    enqueue = commands.add_parser("enqueue", help="queue image files (through shared memory) and http(s) URLs")
    enqueue.add_argument("--redis-url", help="default: REDIS_URL (environment, then .env)")
    enqueue.add_argument("--queue", help="default: HOSTING_TASKS_QUEUE")
    enqueue.add_argument("--wait", action="store_true", help="show progress until every record is in results.json")
    enqueue.add_argument(
        "--output-dir", help="--wait reads this OUTPUT_DIR's results.json (on the pool's host) instead of the results stream"
    )
    enqueue.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds --wait waits (default: %(default)g)")
    enqueue.add_argument("--shm-prefix", default=DEFAULT_PREFIX, help="segment name prefix (default: %(default)s)")
    enqueue.add_argument("--request", metavar="REQUEST_ID",
                         help="queue the inputs as one request of that id (request_images: their number)")
    enqueue.add_argument("--expires-in", type=float, metavar="SECONDS", help="the pool fails a task not started by then")
    enqueue.add_argument("inputs", nargs="+", metavar="PATH_OR_URL")
    waiting = commands.add_parser("wait-request", help="wait for a request's record (messages with request_images)")
    waiting.add_argument("--redis-url", help="default: REDIS_URL (environment, then .env)")
    waiting.add_argument("--queue", help="default: HOSTING_TASKS_QUEUE")
    waiting.add_argument("--stream", help="the pool's RESULTS_STREAM (default: RESULTS_STREAM, environment, then .env)")
    waiting.add_argument("--output-dir", help="read OUTPUT_DIR/requests.json instead of the stream (this host's only)")
    waiting.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait (default: %(default)g)")
    waiting.add_argument("request_id", metavar="REQUEST_ID")
    waiting.set_defaults(expires_in=None)
    room = commands.add_parser("room", help="how many bytes of frames SHM_BUDGET_BYTES still has room for")
    room.add_argument("--bytes", type=int, default=1, help="exit 75 unless this many fit (default: %(default)s)")
    room.set_defaults(redis_url=None, queue=None, output_dir=None, timeout=DEFAULT_TIMEOUT, expires_in=None)
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.expires_in is not None and not 0 < args.expires_in < 1e9:
        parser.error("--expires-in must be positive seconds")
    return args


def load_settings(args: argparse.Namespace, *, dotenv_path: Path = Path(".env")) -> Target:
    """REDIS_URL, HOSTING_TASKS_QUEUE, RESULTS_STREAM and OUTPUT_DIR as the pool
    reads them (the environment over `.env`, empty means the default), the
    options over both. OUTPUT_DIR counts only with --output-dir or without a
    stream (RESULTS_STREAM_MAXLEN=0): relative to where the client runs, it
    names the pool's directory only by luck."""
    values = read_dotenv(dotenv_path)
    values.update(os.environ)
    overrides = {"REDIS_URL": args.redis_url, "HOSTING_TASKS_QUEUE": args.queue, "OUTPUT_DIR": args.output_dir}
    values.update({name: value for name, value in overrides.items() if value is not None})
    redis_url = values.get("REDIS_URL", "").strip() or DEFAULT_REDIS_URL
    queue = values.get("HOSTING_TASKS_QUEUE", "").strip() or DEFAULT_QUEUE
    results_stream = values.get("RESULTS_STREAM", "").strip() or DEFAULT_RESULTS_STREAM
    output_dir = values.get("OUTPUT_DIR", "").strip()
    for name, value in (("HOSTING_TASKS_QUEUE", queue), ("RESULTS_STREAM", results_stream)):
        try:
            check_list_name(value)
        except ValueError as exc:
            raise UsageError(f"{name}={value!r}: {exc}") from None
    if "\0" in output_dir:
        raise UsageError("OUTPUT_DIR contains a NUL byte; expected a directory path")
    try:
        limits = FlowLimits.from_settings(values)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.output_dir is None and values.get("RESULTS_STREAM_MAXLEN", "").strip() != "0":
        return Target(redis_url, queue, None, limits, results_stream)
    resolved = (Path(output_dir).expanduser() if output_dir else DEFAULT_OUTPUT_DIR).resolve()
    return Target(redis_url, queue, resolved, limits, results_stream)


def read_dotenv(path: Path) -> dict[str, str]:
    """The settings in a `.env` file, read as the pool reads it; none without one."""
    try:
        return read_settings_file(path)
    except ImportError:
        raise UsageError(f"reading {path} needs python-dotenv: {CLI_EXTRA}") from None
    except SettingsFileError as exc:
        raise UsageError(str(exc)) from None


def opencv() -> ModuleType:
    """cv2, imported only to read image files: `import image_result_client` never needs it."""
    try:
        import cv2
    except ImportError as exc:
        raise UsageError(f"reading image files needs OpenCV ({CLI_EXTRA}): {exc}") from None
    return cv2


def classify(arguments: Sequence[str]) -> list[Item]:
    """Each argument as a URL or a readable image file; UsageError otherwise."""
    cv2 = None
    items = []
    for argument in arguments:
        if SCHEME.match(argument):
            try:
                check_url(argument)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            items.append(Item(argument, url=argument))
            continue
        path = Path(argument)
        if not is_unicode(argument):
            # OpenCV takes the name as UTF-8: the undecodable bytes Python keeps as
            # surrogates crash it (a segfault), so such a name is refused first.
            raise UsageError(f"cannot read {argument!r}: its name is not UTF-8; rename the file")
        if not path.is_file() or not os.access(path, os.R_OK):
            raise UsageError(f"cannot read {argument!r}: not a readable file")
        cv2 = cv2 or opencv()
        if not cv2.haveImageReader(str(path)):
            raise UsageError(f"cannot read {argument!r}: not an image format OpenCV knows")
        items.append(Item(argument, path=path))
    return items


def url_image_id(url: str) -> str:
    """The URL's file stem (https://x/a/photo.jpg -> photo), else its host."""
    parts = urlsplit(url)
    return PurePosixPath(parts.path).stem or parts.hostname or "image"


def image_id_of(item: Item) -> str:
    return url_image_id(item.url) if item.url is not None else item.path.stem


def request_of(request_id: str | None, items: list[Item]) -> dict[str, Any]:
    """submit()'s options for --request: every input in that request, which
    declares their number; its image ids must differ, or it never completes."""
    if request_id is None:
        return {}
    if not 1 <= len(request_id) <= MAX_ID_LENGTH:
        raise UsageError(f"--request must be 1..{MAX_ID_LENGTH} characters")
    if len(items) > MAX_REQUEST_IMAGES:
        raise UsageError(f"a request has at most {MAX_REQUEST_IMAGES} images, not {len(items)}")
    ids = [image_id_of(item) for item in items]
    if len(set(ids)) != len(ids):
        doubled = sorted({image_id for image_id in ids if ids.count(image_id) > 1})
        raise UsageError(f"--request needs a distinct image id per input; these repeat: {', '.join(doubled)}")
    return {"request_id": request_id, "request_images": len(items)}


def submit(
    producer: Producer,
    item: Item,
    *,
    prefix: str,
    request: dict[str, Any] | None = None,
    expires_in: float | None = None,
) -> Submission:
    request = request or {}
    if item.url is not None:
        return producer.submit_url(item.url, image_id=url_image_id(item.url), expires_in=expires_in, **request)
    cv2 = opencv()
    # ANYCOLOR: grayscale stays one channel (a third of the segment); EXIF rotation applies.
    frame = cv2.imread(str(item.path), cv2.IMREAD_ANYCOLOR)
    if frame is None:
        raise UsageError(f"cannot read {item.argument!r}: OpenCV could not decode it")
    try:
        return producer.submit_array(frame, image_id=item.path.stem, prefix=prefix, expires_in=expires_in, **request)
    except ValueError as exc:
        raise UsageError(f"cannot queue {item.argument!r}: {exc}") from None


def enqueue(args: argparse.Namespace, settings: Target) -> int:
    items = classify(args.inputs)
    request = request_of(args.request, items)
    submissions: list[Submission] = []
    try:
        producer = Producer.from_url(
            settings.redis_url, queue=settings.queue, results_stream=settings.results_stream, limits=settings.limits
        )
    except ValueError as exc:  # redis-py's word on the URL: scheme, port, query
        raise UsageError(f"REDIS_URL={redact_url(settings.redis_url)!r} is not a Redis URL: {exc}") from None
    with producer:
        try:
            producer.client.ping()  # before reading any file: fail at once when Redis is away
            for item in items:
                submissions.append(
                    submit(producer, item, prefix=args.shm_prefix, request=request, expires_in=args.expires_in)
                )
        except PushRefused as exc:
            # Nothing of the refused one is left; those before it stay queued.
            raise NoRoom(f"{exc} ({len(submissions)} queued)") from None
        except redis.RedisError as exc:
            # submit_array unlinked the segment of the message that did not go out.
            problem = "cannot reach Redis" if isinstance(exc, UNREACHABLE) else "Redis refused the request"
            queued = f" ({len(submissions)} already queued)" if submissions else ""
            raise RedisUnreachable(f"{problem} at {redact_url(settings.redis_url)}: {exc}{queued}") from None
        except UsageError as exc:
            if submissions:
                raise UsageError(f"{exc} ({len(submissions)} already queued)") from None
            raise
        if not args.wait:
            for submission, item in zip(submissions, items, strict=True):
                say(f"queued    {submission.request_id} {item.argument}")
            return 0
        note_unseen_results(producer, settings)
        return wait_and_report(producer, submissions, output_dir=settings.output_dir, timeout=args.timeout)


def note_unseen_results(producer: Producer, settings: Target) -> None:
    """Say at once when --wait has nowhere to see a record yet: a wrong
    directory or a pool without a stream otherwise looks like a slow pool
    until the timeout."""
    if settings.output_dir is not None:
        if not (settings.output_dir / RESULTS_NAME).is_file():
            say(
                f"{PROG}: no {RESULTS_NAME} in {settings.output_dir} (not the pool's OUTPUT_DIR on this host, "
                "or the pool has not started there); waiting for it",
                file=sys.stderr,
            )
        return
    try:
        exists = producer.client.exists(settings.results_stream)
    except redis.RedisError:
        return  # the wait itself reports what Redis says
    if not exists:
        say(
            f"{PROG}: no results stream {settings.results_stream!r} in Redis yet (the pool creates it with its "
            "first record; with RESULTS_STREAM_MAXLEN=0 it keeps none: use --output-dir on its host); waiting",
            file=sys.stderr,
        )


def wait_and_report(
    producer: Producer, submissions: list[Submission], *, output_dir: Path | None, timeout: float
) -> int:
    bar = ProgressBar(len(submissions))
    try:
        records = producer.wait(submissions, output_dir=output_dir, timeout=timeout, on_progress=bar.on_progress)
    except WaitTimeout as exc:
        bar.finish()
        for record in exc.records:
            say(record_line(record))
        say(f"{PROG}: {exc}", file=sys.stderr)
        return FAILED
    except redis.RedisError as exc:  # following the results stream
        bar.finish()
        raise RedisUnreachable(f"lost Redis while waiting for records: {exc}") from None
    bar.finish()
    for record in records:
        say(record_line(record))
    return 0 if all(record.get("status") == "completed" for record in records) else FAILED


def wait_request(args: argparse.Namespace, settings: Target) -> int:
    """Print the request's record as one line; 0 if it completed."""
    values = read_dotenv(Path(".env"))
    values.update(os.environ)
    stream = args.stream or values.get("RESULTS_STREAM", "").strip() or DEFAULT_RESULTS_STREAM
    try:
        check_list_name(stream)
        producer = Producer.from_url(settings.redis_url, queue=settings.queue, results_stream=stream)
    except ValueError as exc:
        raise UsageError(f"cannot wait for {args.request_id!r}: {exc}") from None
    output_dir = settings.output_dir if args.output_dir is not None else None
    with producer:
        try:
            record = producer.wait_request(args.request_id, output_dir=output_dir, timeout=args.timeout)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        except WaitTimeout as exc:
            say(f"{PROG}: {exc}", file=sys.stderr)
            return FAILED
        except redis.RedisError as exc:
            raise RedisUnreachable(f"cannot read the results stream at {redact_url(settings.redis_url)}: {exc}") from None
    say(request_line(record))
    return 0 if record.get("status") == "completed" else FAILED


def request_line(record: dict[str, Any]) -> str:
    """`partial   <request_id> 10 of 12 images (9 completed, 1 failed)`."""
    return (f"{record.get('status')!s:<9} {record.get('request_id')} {record.get('images')} of "
            f"{record.get('request_images')} images ({record.get('completed')} completed, {record.get('failed')} failed)")


def room(args: argparse.Namespace, settings: Target) -> int:
    """One line: the budget's room; exit 0 when `--bytes` fit, else EX_TEMPFAIL."""
    limits = settings.limits
    left = shm_budget_room(limits)
    if left is None:
        say("room      unlimited (SHM_BUDGET_BYTES=0)")
        return 0
    waiting = limits.shm_budget_bytes - left
    say(f"room      {max(0, left)} bytes (SHM_BUDGET_BYTES={limits.shm_budget_bytes}, {waiting} waiting"
        f" under {limits.shm_name_prefix!r} in /dev/shm)")
    return 0 if left >= args.bytes else EX_TEMPFAIL


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = load_settings(args)
        if args.command == "wait-request":
            return wait_request(args, settings)
        if args.command == "room":
            return room(args, settings)
        return enqueue(args, settings)
    except NoRoom as exc:
        say(f"{PROG}: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except UsageError as exc:
        say(f"{PROG}: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except RedisUnreachable as exc:
        say(f"{PROG}: {exc}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        # Whatever was queued stays queued; a progress bar may be mid-line.
        print(f"\n{PROG}: interrupted" if sys.stderr.isatty() else f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
