"""A producer client for upstream stages: hand frames to image-result-worker.

    import numpy as np
    from pathlib import Path
    from image_result_client import Producer

    with Producer.from_url("redis://localhost:6379", queue="hosting_tasks") as producer:
        frame = np.zeros((720, 1280, 3), np.uint8)               # BGR uint8, or any supported frame
        a = producer.submit_array(frame, image_id="page_001")     # through POSIX shared memory
        b = producer.submit_url("https://example.com/p.jpg", image_id="page_002")
        records = producer.wait([a, b], output_dir=Path("output/translated"), timeout=60)
        for record in records:                                    # results.json records, in order
            print(record["status"], record["file_path"] or record["error"])

Data flow:

    frame -> new segment /dev/shm/<prefix><uuid4> (copy, mapping closed)
          -> RPUSH the seed's JSON message onto the queue -> the pool encodes,
             records, and unlinks the segment -> a line in OUTPUT_DIR/results.json
          -> wait() finds it by request_id

Hazards handled here:
- On 3.11/3.12 `SharedMemory(create=True)` registers the segment with the
  resource tracker, which unlinks it when this process exits, possibly before
  the pool has read it. The segment's ownership passes to the pool, so it is
  unregistered at once (3.13+: created with track=False).
- When the RPUSH fails (Redis down, a timeout, Ctrl-C), the segment is unlinked
  before the error rises: a pool that never saw the message cannot free it.
  Nothing is retried: a retried RPUSH whose first attempt did land would
  deliver the task twice.
- With several hosts, a task for a host no pool serves would wait in that
  host's queue. Given a fallback URL, one script looks at the host's live key
  and pushes in the same step: to the host's queue, or to the shared queue
  without shm_info (its segment name means nothing on another host), and then
  nobody will read the segment, so it is unlinked here.
- That script is the pool's to load (with every lease renewal): a producer may
  only run a cached script (EVALSHA), since one that could load its own could
  freeze Redis for everyone with a loop. So this client never loads it, and
  does not use redis-py's Script, which would on NOSCRIPT. NOSCRIPT means no
  pool has renewed its lease since Redis lost its scripts (a restart, SCRIPT
  FLUSH, a failover), so none has said since that it serves a host: the task
  goes to the shared queue without shm_info, as the script sends it for a host
  not served. Never a wrong place: a pool on any host can download it.
- wait() reads results.json while the ledger appends to it: only complete
  lines are parsed, and the offset already scanned is kept, so each poll reads
  only what was appended since (image_result_client.results_files follows it).

Depends on redis, numpy and the standard library (the wire format's names and
limits are in image_result_client.protocol, which the pool imports too); no OpenCV.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import urlsplit

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from image_result_client.flow import ROOM_POLL_SECONDS, FlowLimits, PushRefused, create_segment, reserve_segment
from image_result_client.protocol import (
    DEFAULT_QUEUE,
    DEFAULT_RESULTS_STREAM,
    DEFAULT_SEGMENT_PREFIX,
    MAX_DIMENSION,
    MAX_ID_LENGTH,
    MAX_REQUEST_IMAGES,
    MAX_URL_LENGTH,
    PUSH_FOR_HOST_SCRIPT,
    REQUESTS_NAME,
    RESULTS_NAME,
    SEGMENT_NAME,
    SHM_DIR,
    SUPPORTED_DTYPES,
    QueueKeys,
    awaiting_publication,
    is_unicode,
)
from image_result_client.results_files import ResultsFollower

DEFAULT_PREFIX = DEFAULT_SEGMENT_PREFIX
URL_SCHEMES = ("http", "https")
CONNECT_TIMEOUT = 5.0
SOCKET_TIMEOUT = 10.0
POLL_SECONDS = 0.05

Progress = Callable[[list[dict[str, Any]], int], None]

# What EVALSHA names the producers' script by; the pool loads it (see _push_where_served).
PUSH_FOR_HOST_SHA = hashlib.sha1(PUSH_FOR_HOST_SCRIPT.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Submission:
    request_id: str
    image_id: str
    source: Literal["shm", "url"]  # how the pool gets the pixels: "url" also when a fallback was taken
    segment: str | None  # the segment's name, for "shm"
    queue: str | None = None  # the Redis list it was pushed onto


class WaitTimeout(TimeoutError):
    """Not every submission has a record yet; `records` holds those that do."""

    def __init__(self, message: str, *, records: list[dict[str, Any]], missing: list[str]) -> None:
        super().__init__(message)
        self.records = records
        self.missing = missing


class Producer:
    """Submits hosting tasks onto one queue; waits for their results.json records.

    `limits` (default: FlowLimits.from_settings(), i.e. SHM_BUDGET_BYTES,
    PUSH_WAIT, MAX_QUEUE_LENGTH and SHM_NAME_PREFIX from the environment) is
    what a submission waits for room under, and raises PushRefused past.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        queue: str = DEFAULT_QUEUE,
        host_id: str | None = None,
        results_stream: str = DEFAULT_RESULTS_STREAM,
        limits: FlowLimits | None = None,
    ) -> None:
        self.client = client
        self.queue = queue
        self.limits = FlowLimits.from_settings() if limits is None else limits
        self.host_id = host_id or None
        self.results_stream = results_stream
        # The stream's last entry before our first submission: wait() reads after it.
        self._stream_start: bytes | None = None
        # With several hosts on one Redis, shared-memory tasks must reach a pool on
        # the host that holds the segment: its own queue (pools with HOST_QUEUE=true).
        self._keys = QueueKeys(queue)
        self.shm_queue = self._keys.host(self.host_id) if self.host_id else queue
        self._owns_client = False
        self._readers: dict[Path, ResultsReader] = {}

    @classmethod
    def from_url(
        cls,
        redis_url: str,
        *,
        queue: str = DEFAULT_QUEUE,
        host_id: str | None = None,
        results_stream: str = DEFAULT_RESULTS_STREAM,
        limits: FlowLimits | None = None,
    ) -> Producer:
        """A producer with its own client; close() (or `with`) releases it."""
        client = redis.Redis.from_url(
            redis_url,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=SOCKET_TIMEOUT,
            # No retries: an RPUSH retried after a lost reply may deliver a task twice.
            retry=Retry(NoBackoff(), 0),
        )
        producer = cls(client, queue=queue, host_id=host_id, results_stream=results_stream, limits=limits)
        producer._owns_client = True
        return producer

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- submitting ----------------------------------------------------------

    def submit_array(
        self,
        frame: np.ndarray,
        *,
        request_id: str | None = None,
        image_id: str,
        prefix: str = DEFAULT_PREFIX,
        fallback_url: str | None = None,
        request_images: int | None = None,
        expires_in: float | None = None,
    ) -> Submission:
        """Copy `frame` into a new shared-memory segment and queue it.

        The pool unlinks the segment once the task is recorded. With
        `fallback_url` (where the same image can be downloaded) the message
        carries it too, and the pool uses it if the segment cannot be read.
        With a host_id as well, the task goes to the host's queue only while a
        pool serves it (see host_is_served); else it goes to the shared queue as
        a URL task, for a pool on any host, and the segment is unlinked at once:
        the Submission then says source "url" and names no segment. So it does
        too while Redis lacks the pool's script (no pool has renewed its lease
        since Redis restarted or flushed its scripts).

        With `request_images` (how many distinct images the request has; the
        same on each of its submissions), the pool appends one request record
        once that many are recorded: see wait_request.

        With `expires_in` (seconds), the message carries a `deadline` that
        many seconds from now: the pool fails the task as expired rather than
        start it later.

        Before the segment is made, waits up to PUSH_WAIT seconds while the
        queue holds MAX_QUEUE_LENGTH tasks (the host's queue counted too) or
        the frame would take this host's segments over SHM_BUDGET_BYTES
        (image_result_client.flow), then raises PushRefused: nothing of this
        frame is left behind, and what was submitted before stays queued.

        Raises ValueError for a frame, id, prefix, URL, count or expires_in the
        pool would refuse, and redis errors when the message could not be pushed
        (the segment is unlinked first).
        """
        dtype, shape = validate_frame(frame)
        request_id = _new_or_checked_id(request_id, "request_id")
        _check_id(image_id, "image_id")
        _check_request_images(request_images)
        if fallback_url is not None:
            check_url(fallback_url)
        name = prefix + uuid.uuid4().hex
        if not SEGMENT_NAME.fullmatch(name):
            raise ValueError(f"prefix {prefix!r} does not make a valid segment name (letters, digits, _ . -)")
        nbytes = int(frame.nbytes)
        expiry = _deadline_in(expires_in)
        room_deadline = time.monotonic() + self.limits.push_wait
        self._wait_for_queue_room(self._queues_of_shm_tasks(), deadline=room_deadline)
        message: dict[str, Any] = {
            "request_id": request_id,
            "image_id": image_id,
            "shm_info": {"shm_name": name, "shape": list(shape), "dtype": dtype.name, "size": nbytes},
        }
        if fallback_url is not None:
            message["image_url"] = fallback_url
        if request_images is not None:
            message["request_images"] = request_images
        if expiry is not None:
            message["deadline"] = expiry
        segment = reserve_segment(name, nbytes, self.limits, deadline=room_deadline)
        try:
            _fill_segment(segment, name, frame, dtype)
            if fallback_url is not None and self.host_id is not None:
                queue = self._push_where_served(message)
            else:
                queue = self._push(message, queue=self.shm_queue)
        except BaseException:
            # The pool never saw the message (a failed copy, a failed push,
            # Ctrl-C): nobody else will ever free this segment.
            unlink_segment(name)
            raise
        if queue != self.shm_queue:
            # Sent without shm_info: nobody will ever read this segment.
            unlink_segment(name)
            return Submission(request_id, image_id, "url", None, queue)
        return Submission(request_id, image_id, "shm", name, queue)

    def submit_url(
        self,
        url: str,
        *,
        request_id: str | None = None,
        image_id: str,
        request_images: int | None = None,
        expires_in: float | None = None,
    ) -> Submission:
        """Queue a task whose pixels the pool downloads from an http(s) URL.
        `request_images`, `expires_in` and MAX_QUEUE_LENGTH as for submit_array
        (PushRefused)."""
        check_url(url)
        request_id = _new_or_checked_id(request_id, "request_id")
        _check_id(image_id, "image_id")
        _check_request_images(request_images)
        expiry = _deadline_in(expires_in)
        self._wait_for_queue_room([self.queue], deadline=time.monotonic() + self.limits.push_wait)
        message: dict[str, Any] = {"request_id": request_id, "image_id": image_id, "image_url": url}
        if request_images is not None:
            message["request_images"] = request_images
        if expiry is not None:
            message["deadline"] = expiry
        queue = self._push(message, queue=self.queue)
        return Submission(request_id, image_id, "url", None, queue)

    def queue_length(self, queues: Sequence[str]) -> int:
        """The tasks waiting in `queues`, as MAX_QUEUE_LENGTH counts them."""
        return sum(int(self.client.llen(queue)) for queue in queues)

    def _queues_of_shm_tasks(self) -> list[str]:
        """The shared queue, and the host's own where shared-memory tasks go."""
        return [self.queue] if self.shm_queue == self.queue else [self.queue, self.shm_queue]

    def _wait_for_queue_room(self, queues: Sequence[str], *, deadline: float) -> None:
        """Return once fewer than MAX_QUEUE_LENGTH tasks wait in `queues`;
        PushRefused if they still do at `deadline` (time.monotonic()). A check,
        then a push: producers that race may each add one past the limit."""
        limit = self.limits.max_queue_length
        if limit == 0:
            return
        while (length := self.queue_length(queues)) >= limit:
            if time.monotonic() >= deadline:
                raise PushRefused(
                    f"MAX_QUEUE_LENGTH={limit} reached: {length} tasks wait in {' + '.join(queues)} "
                    f"after PUSH_WAIT={self.limits.push_wait:g}s",
                    limit="MAX_QUEUE_LENGTH",
                )
            time.sleep(min(ROOM_POLL_SECONDS, max(0.0, deadline - time.monotonic())))

    def host_is_served(self) -> bool:
        """Whether a pool serves this producer's host queue: a supervisor with
        HOST_QUEUE=true and this HOST_ID renewed its lease within its LEASE_TTL.
        True without a host_id (the shared queue is every pool's)."""
        if self.host_id is None:
            return True
        return bool(self.client.exists(self._keys.live_host(self.host_id)))

    def _push(self, message: dict[str, Any], *, queue: str) -> str:
        self._note_stream_start()
        self.client.rpush(queue, json.dumps(message))
        return queue

    def _push_where_served(self, message: dict[str, Any]) -> str:
        """Push onto the host's queue while a pool serves it, else onto the
        shared queue without shm_info, in one script; returns the queue."""
        self._note_stream_start()
        without_segment = json.dumps({key: value for key, value in message.items() if key != "shm_info"})
        keys = [self._keys.live_host(self.host_id), self.shm_queue, self.queue]
        try:
            to_host = self.client.evalsha(PUSH_FOR_HOST_SHA, len(keys), *keys, json.dumps(message), without_segment)
        except redis.exceptions.NoScriptError:
            # No pool has renewed its lease since Redis lost its scripts, so
            # none has said since that it serves this host. Never load it from
            # here (the producer user may not): send it as for a host not served.
            self.client.rpush(self.queue, without_segment)
            return self.queue
        return self.shm_queue if to_host else self.queue

    def _note_stream_start(self) -> None:
        if self._stream_start is None:
            last = self.client.xrevrange(self.results_stream, count=1)
            self._stream_start = last[0][0] if last else b"0-0"

    # -- waiting -------------------------------------------------------------

    def wait(
        self,
        submissions: Sequence[Submission],
        *,
        output_dir: Path | None = None,
        timeout: float,
        on_progress: Progress | None = None,
    ) -> list[dict[str, Any]]:
        """The record of each submission, in submission order: read from
        OUTPUT_DIR/results.json when `output_dir` is given (the pool's host),
        else from the pool's RESULTS_STREAM in Redis (any host).

        Matches by request_id and image_id, and takes the first record of
        each, so each request_id must be unique (the default uuid4 ids are):
        a record of another message with the same request_id that comes
        later, or names another image, is not taken for this one. `on_progress(records_so_far, total)` is called once at the start
        and whenever more records have appeared. Raises WaitTimeout (a
        TimeoutError) naming how many are missing.
        """
        reader = self._reader(Path(output_dir)) if output_dir is not None else self._stream_reader()
        wanted = [s.request_id for s in submissions]
        image_ids = {s.request_id: s.image_id for s in submissions}
        deadline = time.monotonic() + timeout
        reported = -1
        while True:
            found = reader.find(wanted, image_ids=image_ids)
            if on_progress is not None and len(found) != reported:
                reported = len(found)
                on_progress(list(found.values()), len(set(wanted)))
            missing = [request_id for request_id in wanted if request_id not in found]
            if not missing:
                return [found[request_id] for request_id in wanted]
            if time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"{len(missing)} of {len(wanted)} submissions have no record in {reader.path} "
                    f"after {timeout:g}s",
                    records=[found[request_id] for request_id in wanted if request_id in found],
                    missing=missing,
                )
            time.sleep(POLL_SECONDS)

    def wait_request(self, request_id: str, *, output_dir: Path | None = None, timeout: float) -> dict[str, Any]:
        """The request record of a request whose submissions carried
        request_images: from OUTPUT_DIR/requests.json with `output_dir` (only
        if this host recorded the request's last image), else from the results
        stream (any host). Its `status` is completed, failed, partial, or
        incomplete (REQUEST_TTL ran out). Raises WaitTimeout."""
        _check_id(request_id, "request_id")
        if output_dir is not None:
            reader: ResultsReader | StreamReader = self._reader(Path(output_dir), REQUESTS_NAME)
        else:
            reader = self._stream_reader(field=b"request")
        deadline = time.monotonic() + timeout
        while True:
            found = reader.find([request_id])
            if request_id in found:
                return found[request_id]
            if time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"request {request_id} has no request record in {reader.path} after {timeout:g}s",
                    records=[],
                    missing=[request_id],
                )
            time.sleep(POLL_SECONDS)

    def _stream_reader(self, *, field: bytes = b"record") -> StreamReader:
        return StreamReader(self.client, self.results_stream, after=self._stream_start or b"0-0", field=field)

    def _reader(self, output_dir: Path, name: str = RESULTS_NAME) -> ResultsReader:
        path = output_dir.resolve() / name
        if path not in self._readers:
            self._readers[path] = ResultsReader(path)
        return self._readers[path]


class StreamReader:
    """Records from the pool's results stream, after a given entry id: task
    records (field "record") or, with field=b"request", request records."""

    def __init__(self, client: redis.Redis, stream: str, *, after: bytes, field: bytes = b"record") -> None:
        self.client = client
        self._field = field
        self.path = f"the Redis stream {stream}"
        self._stream = stream
        self._last = after
        self._records: dict[str, dict[str, Any]] = {}

    def find(
        self, request_ids: Iterable[str], *, image_ids: Mapping[str, str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """The first record seen for each request id (of that image, with `image_ids`)."""
        wanted = set(request_ids)
        for _, entries in self.client.xread({self._stream: self._last}, count=1000, block=int(POLL_SECONDS * 1000)) or []:
            for entry_id, fields in entries:
                self._last = entry_id
                try:
                    record = json.loads(fields.get(self._field, b""))
                except ValueError:
                    continue
                if isinstance(record, dict) and _is_for(record, wanted, image_ids):
                    self._records.setdefault(record["request_id"], record)
        return {k: v for k, v in self._records.items() if k in wanted}


def _is_for(record: dict[str, Any], wanted: set[str], image_ids: Mapping[str, str] | None) -> bool:
    """Whether `record` is a wanted request's, and of the image it submitted."""
    request_id = record.get("request_id")
    if not isinstance(request_id, str) or request_id not in wanted:
        return False
    return image_ids is None or request_id not in image_ids or record.get("image_id") == image_ids[request_id]


class ResultsReader:
    """The records of wanted requests in results.json (or requests.json), followed
    as the ledger appends to it (image_result_client.results_files.ResultsFollower)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._follower = ResultsFollower(path)
        self._by_request: dict[str, dict[str, Any]] = {}
        self._wanted: set[str] = set()
        self._published: set[str] = set()  # request ids whose record find() may hand out
        self._image_ids: dict[str, str] = {}

    def find(
        self, request_ids: Iterable[str], *, image_ids: Mapping[str, str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Records seen so far for these request ids (the first record of each,
        of that image with `image_ids`), a completed one only once its JPEG has
        its final name."""
        self._wanted.update(request_ids)
        self._image_ids.update(image_ids or {})
        self._scan()
        found = {}
        for rid in self._wanted:
            record = self._by_request.get(rid)
            if record is None:
                continue
            if rid not in self._published:  # once published, a file is not looked at again
                if awaiting_publication(self.path.parent, record):
                    continue
                self._published.add(rid)
            found[rid] = record
        return found

    def _scan(self) -> None:
        for record in self._follower.records():
            self._keep(record)

    def _keep(self, record: dict[str, Any]) -> None:
        request_id = record.get("request_id")
        if isinstance(request_id, int) and not isinstance(request_id, bool):
            request_id = str(request_id)  # the pool accepts integer ids and records them as given
        if isinstance(request_id, str) and _is_for({**record, "request_id": request_id}, self._wanted, self._image_ids):
            self._by_request.setdefault(request_id, record)


# -- validation and segments --------------------------------------------------


def validate_frame(frame: np.ndarray) -> tuple[np.dtype, tuple[int, ...]]:
    """The frame's dtype (native byte order) and shape; ValueError (TypeError for a
    non-array) saying what the pool would refuse."""
    if not isinstance(frame, np.ndarray):
        raise TypeError(f"frame must be a numpy array, got {type(frame).__name__}")
    if frame.dtype.name not in SUPPORTED_DTYPES:
        raise ValueError(f"frame dtype {frame.dtype} is not supported; expected one of {', '.join(SUPPORTED_DTYPES)}")
    shape = tuple(int(d) for d in frame.shape)
    if not (frame.ndim == 2 or (frame.ndim == 3 and shape[2] in (1, 3, 4))):
        raise ValueError(f"frame shape {shape} is not (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    if not (0 < shape[0] <= MAX_DIMENSION and 0 < shape[1] <= MAX_DIMENSION):
        raise ValueError(f"frame shape {shape} has a dimension outside 1..{MAX_DIMENSION}")
    return np.dtype(frame.dtype.name), shape


def check_url(url: str) -> None:
    """ValueError unless url is an http(s) URL the pool would accept."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise ValueError(f"url must be a string of 1..{MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"url {url[:80]!r} is not a valid URL: {exc}") from None
    if parts.scheme.lower() not in URL_SCHEMES:
        raise ValueError(f"url {url[:80]!r} has scheme {parts.scheme!r}; expected http or https")
    if not parts.hostname:
        raise ValueError(f"url {url[:80]!r} has no host")


def unlink_segment(name: str) -> bool:
    """Remove a segment by name; False when it was already gone.

    Not SharedMemory.unlink(): that also tells the resource tracker, which no
    longer knows the name and would print a KeyError traceback.
    """
    try:
        os.unlink(SHM_DIR / name)
    except FileNotFoundError:
        return False
    return True


def write_segment(name: str, frame: np.ndarray, dtype: np.dtype | None = None) -> None:
    """Create segment `name` holding frame's pixels (C order; as `dtype`, frame's
    own by default), owned by whoever will unlink it, not by this process: the
    way producers hand frames to the pool. No budget is looked at (submit_array does)."""
    _fill_segment(create_segment(name, int(frame.nbytes)), name, frame, dtype)


def _fill_segment(shm: SharedMemory, name: str, frame: np.ndarray, dtype: np.dtype | None) -> None:
    """Copy frame's pixels into a segment just created for them, and close it;
    the segment is unlinked if the copy fails."""
    dtype = frame.dtype if dtype is None else dtype
    try:
        view: np.ndarray = np.ndarray(frame.shape, dtype=dtype, buffer=shm.buf)
        view[...] = frame
        del view  # a live view keeps shm.buf exported and close() would fail
    except BaseException:
        shm.close()
        unlink_segment(name)
        raise
    shm.close()


def _deadline_in(expires_in: float | None) -> float | None:
    """The message's `deadline` for a task that expires `expires_in` seconds from now."""
    if expires_in is None:
        return None
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or not 0 < expires_in < 1e9:
        raise ValueError(f"expires_in must be a number of seconds above 0, got {expires_in!r}")
    return round(time.time() + expires_in, 3)


def _new_or_checked_id(value: str | None, field: str) -> str:
    if value is None:
        return uuid.uuid4().hex
    _check_id(value, field)
    return value


def _check_request_images(value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_REQUEST_IMAGES):
        raise ValueError(f"request_images must be an integer 1..{MAX_REQUEST_IMAGES}")


def _check_id(value: object, field: str) -> None:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID_LENGTH:
        raise ValueError(f"{field} must be a string of 1..{MAX_ID_LENGTH} characters")
    if not value.isascii() and not is_unicode(value):
        # The pool refuses it too: no record could name it (docs/formats.md).
        raise ValueError(f"{field} holds a lone surrogate, which is not valid Unicode")
