"""The soak: N mixed tasks through the real pool while a chaos loop breaks it (`make soak`).

    producer thread: photos -> one /dev/shm segment per SHM task, made as producers do
        --RPUSH, paced--> soak (private redis-server, appendonly)
        --> `python supervisor.py --workers W` (its own session)
        --> OUTPUT_DIR/results.json + one JPEG per completed task
    main thread: every --kill-every seconds SIGKILL a random worker (every 4th
        time the ledger); once, half-way, take Redis down for ~2 s
    then: wait for N records and a request record for every request declared,
        SIGTERM the supervisor (exit 0 expected), verify: exactly one record
        per message, one decodable file per completed record, no orphan or
        partial files, no segment left in /dev/shm, Redis drained; exactly one
        request record per declared request, in requests.json and on the
        results stream, agreeing with the task records; none for other ids;
        every task whose deadline had passed when pushed: one failed record
        whose error starts "expired", and no JPEG.

The mix: ~70% SHM (256x256 and 512x512), ~25% URL (PNG and JPEG photos from a
loopback server), ~5% bad (malformed JSON, a missing segment, a 404, a 500 that
is retried up to MAX_ATTEMPTS and then fails). image_id is img_<i>, unique per
message but for a duplicate (below).

Requests: ~80% of the messages belong to a request soakreq_<r> of 1..12 images
whose every message declares request_images. Some requests declare one image
more than is ever pushed: they end "incomplete" after the soak's REQUEST_TTL.
In some, one image is pushed twice (a copy of its message, same image_id): it
counts once. The other messages are lone tasks, request_id soak_<i>, without
request_images (a malformed message is always one). A share of the parseable
messages carries a deadline, half already past (expired at first delivery)
and half a day ahead (no effect).

Hazards handled here:
- /dev/shm must stay bounded: the producer keeps the queue under a cap, so only
  that many segments wait at once.
- An RPUSH whose reply is lost while Redis goes down may or may not have run;
  pushing again could double a task and blame the pool. The producer holds a
  lock around each push, and the Redis restart takes the same lock.
- A malformed message has no readable request_id, so its record has none; the
  dead letter (same task_id) carries the raw text, which names soak_<i>.
- results.json is read while the ledger appends: a torn tail is retried.
- REQUEST_TTL must outlast any silence inside a live request, or a request
  would end "incomplete" while its last image is merely late: a 500's retries
  (backoff 1+2+4+8 s, jitter), a ledger respawn, Redis away. It is set well
  above that, and the run waits that long at the end for the incomplete ones.
- Everything this run starts or makes (the pool's whole session, Redis, the
  HTTP server, segments, temp dirs) is released in a `finally`, on Ctrl-C and
  SIGTERM too; the pool log is copied to /tmp/soak-last.log first.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import cv2
import numpy as np
import redis

from harness import PoolFailed
from harness.http_server import HttpServer
from harness.photos import load_photos, photo_of_size
from harness.pool import Pool
from harness.results import read_requests, read_results
from harness.segments import SegmentTracker
from image_result_client.protocol import DEFAULT_RESULTS_STREAM, REQUESTS_NAME, RESULTS_NAME, QueueKeys
from image_result_client.results_files import ResultsFollower
from tools.local_redis import LocalRedis

QUEUE = "soak"
MAX_ATTEMPTS = 5
SHM_SIZES = ((256, 256), (512, 512))
# (photo, served as): PNG and JPEG bodies; camera is grayscale.
URL_PHOTOS = (("astronaut", ".png"), ("chelsea", ".jpg"), ("coffee", ".jpg"), ("camera", ".png"))
BAD_KINDS = ("bad_json", "bad_missing_segment", "bad_404", "bad_500")
SHM_SHARE, URL_SHARE = 0.70, 0.25
MAX_PENDING = 1000  # queue length the producer stays under (segments waiting in /dev/shm)
REDIS_DOWN_SECONDS = 2.0
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 120.0
PROGRESS_SECONDS = 15.0
LOG_COPY = Path("/tmp/soak-last.log")
IMAGE_ID_IN_TEXT = re.compile(r'"image_id": "(img_\d+)"')
REQUEST_TTL = 40.0  # seconds; see the hazards above
REQUEST_SHARE = 0.80  # of the messages, roughly
REQUEST_SIZES = (1, 12)
NEVER_COMES_SHARE = 0.12  # of the requests of 2 or more images: the last image is never pushed
DUPLICATE_SHARE = 0.15  # of the requests: one image pushed twice
DEADLINE_SHARE = 0.10  # of the parseable messages: half past, half far ahead
PAST_DEADLINE, FUTURE_DEADLINE = -600.0, 86_400.0  # seconds from the push


# ---------------------------------------------------------------- settings and plan


@dataclass(frozen=True, slots=True)
class SoakSettings:
    tasks: int
    workers: int
    kill_every: float
    seed: int
    timeout: float

    @property
    def max_pending(self) -> int:
        # A small run keeps a small queue so the producer, and with it the chaos, lasts a while.
        return min(MAX_PENDING, max(50, self.tasks // 10))

    @property
    def chunk(self) -> int:
        return max(1, min(100, self.max_pending // 4))


def parse_args(argv: Sequence[str] | None) -> SoakSettings:
    parser = argparse.ArgumentParser(prog="soak/soak.py", description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000, metavar="N", help="tasks to push (default 20000)")
    parser.add_argument("--workers", type=int, default=2, metavar="W", help="pool workers (default 2)")
    parser.add_argument("--kill-every", type=float, default=3.0, metavar="SECONDS", help="chaos period (default 3)")
    parser.add_argument("--seed", type=int, help="random seed for the mix and the chaos (default: random, printed)")
    parser.add_argument("--timeout", type=float, default=1800.0, metavar="SECONDS", help="whole run (default 1800)")
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.workers < 1 or args.kill_every <= 0 or args.timeout <= 0:
        parser.error("--tasks, --workers, --kill-every and --timeout must be positive")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    return SoakSettings(args.tasks, args.workers, args.kill_every, seed, args.timeout)


@dataclass(frozen=True, slots=True)
class Planned:
    """One task and the outcome it must have."""

    index: int
    kind: str  # shm, url, or one of BAD_KINDS
    size: tuple[int, int] | None = None  # (height, width) of a completed task's JPEG
    photo: str | None = None  # URL tasks: which served photo
    request_id: str = ""
    image_id: str = ""
    request_images: int | None = None  # declared on the message, for a task of a request
    deadline: str | None = None  # "past" or "future": seconds from the push, set when pushed

    @property
    def expired(self) -> bool:
        return self.deadline == "past"

    @property
    def status(self) -> str:
        return "failed" if self.kind in BAD_KINDS or self.expired else "completed"


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """A request and the request record it must end with."""

    request_id: str
    declared: int
    images: dict[str, str]  # image_id -> its planned status (a duplicate has its original's)
    duplicate: bool

    @property
    def never_comes(self) -> bool:
        return len(self.images) < self.declared

    @property
    def status(self) -> str:
        if self.never_comes:
            return "incomplete"
        completed = sum(1 for status in self.images.values() if status == "completed")
        return "completed" if completed == len(self.images) else "failed" if completed == 0 else "partial"


def draw_task(index: int, rng: random.Random, photo_sizes: dict[str, tuple[int, int]], *, parseable: bool) -> Planned:
    draw = rng.random()
    if draw < SHM_SHARE:
        task = Planned(index, "shm", size=rng.choice(SHM_SIZES))
    elif draw < SHM_SHARE + URL_SHARE:
        name, ext = rng.choice(URL_PHOTOS)
        task = Planned(index, "url", size=photo_sizes[name], photo=name + ext)
    else:
        task = Planned(index, rng.choice(BAD_KINDS[1:] if parseable else BAD_KINDS))
    if task.kind != "bad_json" and rng.random() < DEADLINE_SHARE:
        task = replace(task, deadline=rng.choice(("past", "future")))
    return task


def plan_tasks(count: int, rng: random.Random, photo_sizes: dict[str, tuple[int, int]]) -> list[Planned]:
    """`count` messages: lone tasks and requests, each request's messages pushed together."""
    plan: list[Planned] = []
    mean_request = sum(REQUEST_SIZES) / 2
    # The chance that the next unit is a request, so that ~REQUEST_SHARE of the messages are in one.
    request_odds = REQUEST_SHARE / (REQUEST_SHARE + (1 - REQUEST_SHARE) * mean_request)
    requests = 0
    while len(plan) < count:
        if rng.random() >= request_odds:
            index = len(plan)
            task = draw_task(index, rng, photo_sizes, parseable=False)
            plan.append(replace(task, request_id=f"soak_{index}", image_id=f"img_{index}"))
            continue
        request_id, declared = f"soakreq_{requests}", rng.randint(*REQUEST_SIZES)
        requests += 1
        pushed = declared - 1 if declared > 1 and rng.random() < NEVER_COMES_SHARE else declared
        members = []
        for _ in range(pushed):
            index = len(plan) + len(members)
            task = draw_task(index, rng, photo_sizes, parseable=True)
            members.append(replace(task, request_id=request_id, image_id=f"img_{index}", request_images=declared))
        if rng.random() < DUPLICATE_SHARE:
            original = rng.choice(members)
            members.insert(rng.randrange(len(members) + 1), replace(original, index=len(plan) + len(members)))
        plan.extend(members[:count - len(plan)])
    return plan


def plan_requests(plan: list[Planned]) -> dict[str, PlannedRequest]:
    """The requests of the tasks in `plan` (a request cut short by the end of the plan
    declares more than it pushed and so ends "incomplete")."""
    images: dict[str, dict[str, str]] = defaultdict(dict)
    copies: Counter = Counter()
    declared: dict[str, int] = {}
    for task in plan:
        if task.request_images is None:
            continue
        declared[task.request_id] = task.request_images
        images[task.request_id][task.image_id] = task.status
        copies[(task.request_id, task.image_id)] += 1
    duplicated = {rid for (rid, _), n in copies.items() if n > 1}
    return {rid: PlannedRequest(rid, declared[rid], images[rid], rid in duplicated) for rid in declared}


# ---------------------------------------------------------------- the pieces


@cache
def shm_frame(size: tuple[int, int]) -> np.ndarray:
    """The photo every SHM task of this (height, width) carries."""
    return photo_of_size(*size)


def serve_photos(http: HttpServer) -> dict[str, tuple[int, int]]:
    """Routes for every URL photo, a 404 and a 500; returns photo -> (height, width)."""
    sizes = {}
    for name, image in load_photos().items():
        sizes[name] = image.shape[:2]
        for ext, content_type in ((".png", "image/png"), (".jpg", "image/jpeg")):
            ok, body = cv2.imencode(ext, image)
            assert ok, f"cv2 could not encode {name}{ext}"
            http.add(f"/photos/{name}{ext}", body.tobytes(), content_type=content_type)
    http.add("/gone.jpg", b"not found\n", status=404, content_type="text/plain")
    http.add("/broken.jpg", b"internal error\n", status=500, content_type="text/plain")
    return sizes


def message_for(task: Planned, http: HttpServer, segments: SegmentTracker) -> bytes:
    request_id, image_id = task.request_id, task.image_id
    if task.kind == "bad_json":
        # Cut short: the pool cannot parse it, but the dead letter keeps the text.
        return f'{{"request_id": "{request_id}", "image_id": "{image_id}", "shm_info": {{"shm_name": '.encode()
    message: dict[str, Any] = {"request_id": request_id, "image_id": image_id}
    if task.request_images is not None:
        message["request_images"] = task.request_images
    if task.deadline is not None:
        message["deadline"] = time.time() + (PAST_DEADLINE if task.expired else FUTURE_DEADLINE)
    if task.kind == "shm":
        height, width = task.size  # type: ignore[misc]
        name = segments.make(shm_frame(task.size))  # type: ignore[arg-type]
        message["shm_info"] = {"shm_name": name, "shape": [height, width, 3], "dtype": "uint8", "size": height * width * 3}
    elif task.kind == "bad_missing_segment":
        never_made = "img_shm_" + uuid.uuid4().hex
        message["shm_info"] = {"shm_name": never_made, "shape": [256, 256, 3], "dtype": "uint8", "size": 256 * 256 * 3}
    elif task.kind == "url":
        message["image_url"] = http.url(f"/photos/{task.photo}")
    elif task.kind == "bad_404":
        message["image_url"] = http.url("/gone.jpg")
    elif task.kind == "bad_500":
        message["image_url"] = http.url("/broken.jpg")
    return json.dumps(message).encode()


class Producer(threading.Thread):
    """Pushes the plan in chunks, keeping the queue under max_pending."""

    def __init__(self, plan: list[Planned], *, url: str, settings: SoakSettings, http: HttpServer,
                 segments: SegmentTracker, redis_lock: threading.Lock) -> None:
        super().__init__(name="producer", daemon=True)
        self.plan, self.url, self.settings = plan, url, settings
        self.http, self.segments, self.redis_lock = http, segments, redis_lock
        self.pushed = 0
        self.first_push_at: float | None = None
        self.error: BaseException | None = None
        self.stop_requested = threading.Event()

    def run(self) -> None:
        client = redis.Redis.from_url(self.url)
        try:
            while self.pushed < len(self.plan) and not self.stop_requested.is_set():
                if not self._room_for_a_chunk(client):
                    time.sleep(0.05)
                    continue
                chunk = self.plan[self.pushed:self.pushed + self.settings.chunk]
                payloads = [message_for(task, self.http, self.segments) for task in chunk]
                with self.redis_lock:
                    client.rpush(QUEUE, *payloads)
                if self.first_push_at is None:
                    self.first_push_at = time.monotonic()
                self.pushed += len(chunk)
        except Exception as exc:  # noqa: BLE001 - the main thread reports it and fails the run
            self.error = exc
        finally:
            client.close()

    def _room_for_a_chunk(self, client: redis.Redis) -> bool:
        with self.redis_lock:
            return client.llen(QUEUE) + self.settings.chunk <= self.settings.max_pending

    @property
    def done(self) -> bool:
        return self.pushed >= len(self.plan) or self.error is not None or not self.is_alive()


# ---------------------------------------------------------------- the run


@dataclass
class Chaos:
    rng: random.Random
    kills: Counter = field(default_factory=Counter)
    redis_restarts: int = 0

    def kill_one(self, pool: Pool) -> None:
        """SIGKILL a random worker, or every 4th time the ledger; a miss (child
        between death and respawn) is tried again next period."""
        role = "ledger" if sum(self.kills.values()) % 4 == 3 else "worker"
        targets = [pid for pid, its_role in pool.children_by_role().items() if its_role == role]
        if not targets:
            return
        try:
            os.kill(self.rng.choice(targets), signal.SIGKILL)
        except ProcessLookupError:
            return
        self.kills[role] += 1


class Soak:
    def __init__(self, settings: SoakSettings, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        self.output_dir = workdir / "out"
        self.redis = LocalRedis(data_dir=workdir / "redis", persist=True)
        self.http = HttpServer()
        self.segments = SegmentTracker()
        self.redis_lock = threading.Lock()
        self.chaos = Chaos(random.Random(settings.seed + 1))
        self.pool: Pool | None = None
        self.producer: Producer | None = None
        self.plan: list[Planned] = []
        self.failures: list[str] = []
        self.pool_exit: int | None = None
        self.last_record_at: float | None = None
        # The records of results.json and requests.json, counted as they come.
        self.progress = (
            ResultsFollower(self.output_dir / RESULTS_NAME),
            ResultsFollower(self.output_dir / REQUESTS_NAME),
        )

    # -- phases --------------------------------------------------------

    def execute(self) -> bool:
        started = time.monotonic()
        deadline = started + self.settings.timeout
        self.redis.start()
        self.http.start()
        photo_sizes = serve_photos(self.http)
        self.plan = plan_tasks(self.settings.tasks, random.Random(self.settings.seed), photo_sizes)
        self.print_header()
        self.start_pool()
        self.wait_ready()
        self.producer = Producer(self.plan, url=self.redis.url, settings=self.settings, http=self.http,
                                 segments=self.segments, redis_lock=self.redis_lock)
        self.producer.start()
        self.run_chaos(deadline)
        self.wait_for_records(deadline)
        self.wait_for_request_records(deadline)
        self.stop_pool()
        report = self.verify()
        report.print(time.monotonic() - started, self.throughput())
        return report.ok

    def print_header(self) -> None:
        kinds = Counter(task.kind for task in self.plan)
        bad = sum(kinds[k] for k in BAD_KINDS)
        deadlines = Counter(task.deadline for task in self.plan)
        requests = plan_requests(self.plan)
        in_requests = sum(1 for task in self.plan if task.request_images is not None)
        s = self.settings
        print(f"soak: tasks={s.tasks} (shm={kinds['shm']} url={kinds['url']} bad={bad}: "
              + " ".join(f"{k[4:]}={kinds[k]}" for k in BAD_KINDS)
              + f") workers={s.workers} kill_every={s.kill_every:g}s seed={s.seed}", flush=True)
        print(f"      requests={len(requests)} holding {in_requests} tasks "
              f"(last image never comes: {sum(r.never_comes for r in requests.values())}, "
              f"an image pushed twice: {sum(r.duplicate for r in requests.values())}) "
              f"REQUEST_TTL={REQUEST_TTL:g}s; deadlines past={deadlines['past']} future={deadlines['future']}",
              flush=True)

    def start_pool(self) -> None:
        # Its own session: our Ctrl-C does not reach it, and cleanup kills it whole.
        self.pool = Pool(workdir=self.workdir, output_dir=self.output_dir, redis_url=self.redis.url, queue=QUEUE,
                         workers=self.settings.workers,
                         env={"MAX_ATTEMPTS": str(MAX_ATTEMPTS), "REQUEST_TTL": f"{REQUEST_TTL:g}"})
        self.pool.start()

    def wait_ready(self) -> None:
        self.pool.wait_ready(READY_TIMEOUT)

    @property
    def log_path(self) -> Path | None:
        return self.pool.stderr_path if self.pool is not None else None

    def run_chaos(self, deadline: float) -> None:
        """Kill children and restart Redis while the producer is still pushing."""
        next_kill = time.monotonic() + self.settings.kill_every
        next_progress = time.monotonic() + PROGRESS_SECONDS
        while not self.producer.done and time.monotonic() < deadline:
            self.check_alive()
            if not self.chaos.redis_restarts and self.producer.pushed >= self.settings.tasks / 2:
                self.restart_redis()
            if time.monotonic() >= next_kill:
                self.chaos.kill_one(self.pool)
                next_kill += self.settings.kill_every
            if time.monotonic() >= next_progress:
                self.print_progress("chaos")
                next_progress += PROGRESS_SECONDS
            time.sleep(0.05)
        if self.producer.error is not None:
            raise RuntimeError(f"producer failed: {self.producer.error!r}")
        if not self.producer.done:
            self.failures.append(f"timeout: only {self.producer.pushed} of {self.settings.tasks} tasks pushed")
            self.producer.stop_requested.set()
        self.print_progress("chaos over")

    def restart_redis(self) -> None:
        with self.redis_lock:  # no push is in flight while Redis is away
            self.redis.stop()
            time.sleep(REDIS_DOWN_SECONDS)
            self.redis.start()
        self.chaos.redis_restarts += 1
        print(f"  redis restarted after {self.producer.pushed} pushed", flush=True)

    def wait_for_records(self, deadline: float) -> None:
        next_progress = time.monotonic() + PROGRESS_SECONDS
        while time.monotonic() < deadline:
            self.check_alive()
            if len(read_results(self.output_dir)) >= self.producer.pushed:
                self.last_record_at = time.monotonic()
                return
            if time.monotonic() >= next_progress:
                self.print_progress("draining")
                next_progress += PROGRESS_SECONDS
            time.sleep(0.5)
        self.failures.append(f"timeout: fewer than {self.producer.pushed} records after {self.settings.timeout:g}s")

    def wait_for_request_records(self, deadline: float) -> None:
        """Until every declared request has a request record: the incomplete ones
        end REQUEST_TTL after their last image, plus an upkeep pass."""
        declared = set(plan_requests(self.plan[:self.producer.pushed]))
        give_up = min(deadline, time.monotonic() + REQUEST_TTL + 30.0)
        next_progress = time.monotonic() + PROGRESS_SECONDS
        while time.monotonic() < give_up:
            self.check_alive()
            request_records = read_requests(self.output_dir)
            if declared <= {r.get("request_id") for r in request_records}:
                return
            if time.monotonic() >= next_progress:
                print(f"  [requests ending] request records={len(request_records)} "
                      f"of {len(declared)}", flush=True)
                next_progress += PROGRESS_SECONDS
            time.sleep(0.5)
        # Not a failure of its own: check_requests names what is missing.

    def stop_pool(self) -> None:
        try:
            self.pool_exit = self.pool.stop(timeout=STOP_TIMEOUT)
        except PoolFailed:  # the harness killed it
            self.failures.append(f"supervisor still running {STOP_TIMEOUT:.0f}s after SIGTERM")
            return
        if self.pool_exit != 0:
            self.failures.append(f"supervisor exited with {self.pool_exit} after SIGTERM, not 0")

    def check_alive(self) -> None:
        if self.pool.poll() is not None:
            raise RuntimeError(f"supervisor exited with {self.pool.poll()} in the middle of the run")

    def print_progress(self, phase: str) -> None:
        for follower in self.progress:
            for _ in follower.poll():
                pass
        records, request_records = (follower.count for follower in self.progress)
        kills = self.chaos.kills
        print(f"  [{phase}] pushed={self.producer.pushed} records={records} request records={request_records} "
              f"kills: workers={kills['worker']} ledger={kills['ledger']}", flush=True)

    def throughput(self) -> tuple[float, float] | None:
        if self.last_record_at is None or self.producer.first_push_at is None:
            return None
        seconds = self.last_record_at - self.producer.first_push_at
        return self.settings.tasks / seconds, seconds

    # -- verification --------------------------------------------------

    def verify(self) -> Report:
        records = read_results(self.output_dir)
        request_records = read_requests(self.output_dir)
        events = self.pool.log_lines()
        keys = QueueKeys(QUEUE)
        client = redis.Redis.from_url(self.redis.url)
        try:
            dead = [json.loads(raw) for raw in client.lrange(keys.dead, 0, -1)]
            stream = client.xrange(DEFAULT_RESULTS_STREAM)
            leftovers_in_redis = {
                "queue": client.llen(QUEUE),
                "processing": sum(client.llen(key) for key in client.scan_iter(f"{keys.prefix}:processing:*")),
                "delayed": client.zcard(keys.delayed),
                "open requests": client.zcard(keys.open_requests)
                + sum(1 for _ in client.scan_iter(f"{keys.prefix}:request:*")),
                "unwritten request records": sum(
                    client.llen(key) for key in client.scan_iter(f"{keys.prefix}:requests_unwritten:*")),
            }
        finally:
            client.close()
        report = Report(settings=self.settings, failures=list(self.failures), kills=self.chaos.kills,
                        redis_restarts=self.chaos.redis_restarts, pushed=self.producer.pushed,
                        records=records, dead=dead, pool_exit=self.pool_exit, log_path=self.log_path)
        pushed = self.plan[:self.producer.pushed]
        report.check_exactly_once(pushed, dead, events)
        report.check_outcomes(pushed)
        report.check_files(pushed, self.output_dir)
        report.check_deadlines(pushed, self.output_dir)
        report.check_requests(plan_requests(pushed), request_records, stream, events)
        report.check_segments(self.segments.leftovers(), len(self.segments.names))
        report.check_redis(leftovers_in_redis)
        report.count_events(events)
        return report

    # -- teardown ------------------------------------------------------

    def cleanup(self) -> None:
        if self.producer is not None:
            self.producer.stop_requested.set()
            self.producer.join(timeout=10)
        if self.pool is not None:
            self.pool.kill_all()
        self.http.stop()
        self.redis.stop()
        self.segments.cleanup()


@dataclass
class Report:
    settings: SoakSettings
    failures: list[str]
    kills: Counter
    redis_restarts: int
    pushed: int
    records: list[dict[str, Any]]
    dead: list[dict[str, Any]]
    pool_exit: int | None
    log_path: Path
    lines: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    by_image: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    wrong_requests: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)  # the new counts, printed after the records line

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def check_exactly_once(self, planned: list[Planned], dead: list[dict], events: list[dict]) -> None:
        """Per image_id, as many records as messages pushed with it (two for an image
        pushed twice). lost: fewer; duplicated: more."""
        expected = Counter(task.image_id for task in planned)
        request_of = {task.image_id: task.request_id for task in planned}
        by_image: dict[str, list[dict]] = defaultdict(list)
        # A malformed message's record may lack its ids; its dead letter keeps the text, which names it.
        named_by_dead_letter = {}
        for entry in dead:
            found = IMAGE_ID_IN_TEXT.search(entry.get("message") or "")
            if entry.get("task_id") and found:
                named_by_dead_letter[entry["task_id"]] = found.group(1)
        unnamed = []
        for record in self.records:
            image_id = record.get("image_id") or named_by_dead_letter.get(record.get("task_id"))
            if image_id is None:
                unnamed.append(record)
            else:
                by_image[image_id].append(record)
        missing = [iid for iid in expected if len(by_image.get(iid, ())) < expected[iid]]
        missing_malformed = [iid for iid in missing if any(t.kind == "bad_json" for t in planned if t.image_id == iid)]
        # An unnamed record can only be a malformed task whose dead letter is missing.
        absorbed = min(len(unnamed), len(missing_malformed))
        self.lost = [iid for iid in missing if iid not in missing_malformed[:absorbed]]
        self.duplicated = sorted((iid for iid, recs in by_image.items() if len(recs) > expected.get(iid, 0) > 0),
                                 key=_index)
        self.duplicated += [f"<unnamed task {r.get('task_id')}>" for r in unnamed[absorbed:]]
        self.by_image = by_image
        strangers = sorted(set(by_image) - set(expected))
        wrong_request = sorted(iid for iid, recs in by_image.items() if iid in request_of and any(
            r.get("request_id") not in (None, request_of[iid]) for r in recs))
        task_ids = Counter(r.get("task_id") for r in self.records if r.get("task_id"))
        doubled_task_ids = [tid for tid, n in task_ids.items() if n > 1]
        if unnamed:
            self.lines.append(f"  note: {len(unnamed)} malformed-task record(s) had no dead letter to name them")
        if self.lost:
            self.fail(f"lost {len(self.lost)}: {_sample(self.lost)}")
            self.lines += [f"  evidence {iid}: {_story(iid, events)}" for iid in self.lost[:3]]
        if self.duplicated:
            self.fail(f"duplicated {len(self.duplicated)}: {_sample(self.duplicated)}")
            self.lines += [f"  evidence {iid}: {_story(iid, events)}" for iid in self.duplicated[:3]]
        if strangers:
            self.fail(f"records for unknown image ids: {_sample(strangers)}")
        if wrong_request:
            self.fail(f"records under another request id than pushed: {_sample(wrong_request)}")
        if doubled_task_ids:
            self.fail(f"task ids recorded more than once: {_sample(doubled_task_ids)}")

    def check_outcomes(self, planned: list[Planned]) -> None:
        """Good tasks complete at their size; bad ones fail (the 500 after MAX_ATTEMPTS)."""
        plan_of = {task.image_id: task for task in planned}  # a duplicate is a copy of its original
        wrong = []
        for iid, recs in self.by_image.items():
            task = plan_of.get(iid)
            if task is None:
                continue
            for record in recs:
                if record.get("status") != task.status:
                    wrong.append(f"{iid} ({task.kind}, deadline {task.deadline}) {record.get('status')}: "
                                 f"{str(record.get('error'))[:100]}")
                elif task.status == "completed" and (record.get("height"), record.get("width")) != task.size:
                    wrong.append(f"{iid} record says {record.get('width')}x{record.get('height')}, expected {task.size}")
                elif task.kind == "bad_500" and not task.expired and "gave up after" not in (record.get("error") or ""):
                    wrong.append(f"{iid} (bad_500) failed without its retries: {record.get('error')}")
        if wrong:
            self.fail(f"{len(wrong)} task(s) with the wrong outcome: " + "; ".join(wrong[:3]))
        failed = sum(1 for r in self.records if r.get("status") == "failed")
        if len(self.dead) != failed:
            self.fail(f"dead letters {len(self.dead)} != failed records {failed}")

    def check_files(self, planned: list[Planned], output_dir: Path) -> None:
        plan_of = {task.image_id: task for task in planned}
        completed = [r for r in self.records if r.get("status") == "completed"]
        recorded_paths: set[Path] = set()
        bad = []
        for record in completed:
            path = Path(record.get("file_path") or "")
            recorded_paths.add(path)
            task = plan_of.get(record.get("image_id") or "")
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED) if path.is_file() else None
            if path.parent != output_dir or image is None:
                bad.append(f"{record.get('request_id')}: {path} missing or undecodable")
            elif task is not None and image.shape[:2] != task.size:
                bad.append(f"{record.get('request_id')}: {path.name} is {image.shape[:2]}, expected {task.size}")
        jpegs = set(output_dir.glob("*.jpg"))
        orphans = sorted(p.name for p in jpegs - recorded_paths)
        partials = sorted(p.name for p in (output_dir / ".partial").iterdir()) if (output_dir / ".partial").is_dir() else []
        self.lines.append(f"files              {len(completed) - len(bad)}/{len(completed)} decode at the expected size; "
                          f"{len(jpegs)} .jpg in OUTPUT_DIR; orphans {len(orphans)}; .partial entries {len(partials)}")
        if bad:
            self.fail(f"{len(bad)} bad file(s): " + "; ".join(bad[:3]))
        if len(jpegs) != len(completed):
            self.fail(f".jpg files {len(jpegs)} != completed records {len(completed)}")
        if orphans:
            self.fail(f"orphan files: {_sample(orphans)}")
        if partials:
            self.fail(f"stray files in .partial: {_sample(partials)}")

    def check_deadlines(self, planned: list[Planned], output_dir: Path) -> None:
        """A task whose deadline had passed when it was pushed: every record of it
        failed with an error starting "expired", and no JPEG under its image id."""
        expired = [task for task in planned if task.expired]
        wrong = []
        for task in expired:
            for record in self.by_image.get(task.image_id, ()):
                if record.get("status") != "failed" or not str(record.get("error") or "").startswith("expired"):
                    wrong.append(f"{task.image_id}: {record.get('status')} {str(record.get('error'))[:80]}")
            wrong += [f"{task.image_id}: {path.name} written" for path in output_dir.glob(f"{task.image_id}_*.jpg")]
        expired_records = sum(1 for r in self.records if str(r.get("error") or "").startswith("expired"))
        future = sum(1 for task in planned if task.deadline == "future")
        self.summary.append(f"deadlines          past {len(expired)} -> {expired_records} records \"expired\", "
                            f"{len(wrong)} wrong; a day ahead {future}")
        if expired_records != len(expired):
            self.fail(f"{expired_records} records expired, {len(expired)} tasks pushed with a deadline past")
        if wrong:
            self.fail(f"{len(wrong)} expired task(s) with the wrong outcome: " + "; ".join(wrong[:3]))

    def check_requests(self, planned: dict[str, PlannedRequest], request_records: list[dict],
                       stream: list[tuple[bytes, dict[bytes, bytes]]], events: list[dict]) -> None:
        """One request record per declared request, in requests.json and on the stream,
        agreeing with the task records and with the plan; none for any other id.
        The stream's task records: one per task id, as many as results.json holds."""
        in_file = defaultdict(list)
        for record in request_records:
            in_file[record.get("request_id")].append(record)
        on_stream: Counter = Counter()
        stream_task_ids: Counter = Counter()
        for _, entry in stream:
            if b"request" in entry:
                on_stream[json.loads(entry[b"request"]).get("request_id")] += 1
            if b"record" in entry:
                stream_task_ids[json.loads(entry[b"record"]).get("task_id")] += 1
        wrong = self.wrong_requests
        for rid, plan in planned.items():
            records = in_file.get(rid, [])
            if len(records) != 1:
                wrong.append(f"{rid}: {len(records)} records in requests.json")
            if on_stream[rid] != 1:
                wrong.append(f"{rid}: {on_stream[rid]} request entries on the stream")
            if not records:
                continue
            record = records[0]
            # What a user checks against results.json: the distinct images recorded, and of them completed.
            recorded = {iid: recs for iid, recs in self.by_image.items() if iid in plan.images}
            completed = sum(1 for recs in recorded.values() if any(r.get("status") == "completed" for r in recs))
            counts = (record.get("images"), record.get("completed"), record.get("failed"))
            if counts != (len(recorded), completed, len(recorded) - completed):
                wrong.append(f"{rid}: images/completed/failed {counts}, results.json has "
                             f"{(len(recorded), completed, len(recorded) - completed)}")
            if record.get("status") != plan.status:
                wrong.append(f"{rid}: status {record.get('status')}, expected {plan.status} "
                             f"({len(plan.images)} of {plan.declared} images pushed)")
            if record.get("request_images") != plan.declared:
                wrong.append(f"{rid}: request_images {record.get('request_images')}, declared {plan.declared}")
        strangers = sorted((set(in_file) | set(on_stream)) - set(planned))
        if strangers:
            wrong.append(f"request records for ids that never declared request_images: {_sample(strangers)}")
        statuses = Counter(records[0].get("status") for rid, records in in_file.items() if rid in planned)
        self.summary.append(
            f"requests           declared {len(planned)} (never complete {sum(p.never_comes for p in planned.values())}, "
            f"an image twice {sum(p.duplicate for p in planned.values())}); request records {len(request_records)} "
            f"(completed {statuses['completed']}, partial {statuses['partial']}, failed {statuses['failed']}, "
            f"incomplete {statuses['incomplete']}); on the stream {sum(on_stream.values())}; wrong {len(wrong)}")
        doubled_on_stream = [str(tid) for tid, n in stream_task_ids.items() if n > 1]
        self.summary.append(f"results stream     {sum(stream_task_ids.values())} task records "
                            f"({len(stream_task_ids)} task ids, {len(doubled_on_stream)} twice)")
        if wrong:
            self.fail(f"{len(wrong)} wrong request record(s): " + "; ".join(wrong[:5]))
            self.lines += [f"  evidence {rid}: {_story(rid, events)}" for rid in
                           sorted({w.split(':', 1)[0] for w in wrong if w.startswith('soakreq_')})[:3]]
        if doubled_on_stream or set(stream_task_ids) != {r.get("task_id") for r in self.records}:
            self.fail(f"results stream: {len(doubled_on_stream)} task ids twice; its task ids and results.json's differ"
                      if set(stream_task_ids) != {r.get("task_id") for r in self.records}
                      else f"results stream: task ids twice: {_sample(doubled_on_stream)}")

    def check_segments(self, leftovers: list[str], created: int) -> None:
        self.lines.append(f"segments           {created} created, {len(leftovers)} still in /dev/shm")
        if leftovers:
            self.fail(f"leaked segments {len(leftovers)}: {_sample(leftovers)}")

    def check_redis(self, leftovers: dict[str, int]) -> None:
        self.lines.append("redis              " + ", ".join(f"{k} {v}" for k, v in leftovers.items()))
        if any(leftovers.values()):
            self.fail("Redis not drained: " + ", ".join(f"{k} {v}" for k, v in leftovers.items() if v))

    def count_events(self, events: list[dict]) -> None:
        names = Counter(e.get("event") for e in events)
        requeued = [e for e in events if e.get("event") == "tasks_requeued"]
        completed_again = sum(1 for r in self.records if r.get("status") == "completed" and (r.get("attempts") or 1) > 1)
        self.lines.insert(0, f"redeliveries       {completed_again} completed records with attempts>1; "
                             f"tasks_requeued events {len(requeued)} (tasks {sum(e.get('tasks', 0) for e in requeued)}); "
                             f"duplicate_dropped {names['duplicate_dropped']}")
        self.lines.insert(1, f"retries            task_retry_scheduled events {names['task_retry_scheduled']}")
        self.lines.insert(2, f"dead letters       {len(self.dead)}")
        trouble = {n: names[n] for n in ("task_crashed", "worker_hung", "publish_failed", "results_write_failed",
                                         "orphaned_list_found", "respawn_throttled") if names[n]}
        if trouble:
            self.lines.append("log events         " + ", ".join(f"{k}={v}" for k, v in trouble.items()))
        if names["task_crashed"]:
            self.fail(f"{names['task_crashed']} task_crashed event(s) (internal errors) in the log")

    def print(self, wall_seconds: float, throughput: tuple[float, float] | None) -> None:
        statuses = Counter(r.get("status") for r in self.records)
        print(f"tasks pushed       {self.pushed}")
        print(f"records            {len(self.records)} (completed {statuses['completed']}, failed {statuses['failed']})")
        for line in self.summary:
            print(line)
        print(f"kills              workers {self.kills['worker']}, ledger {self.kills['ledger']}")
        print(f"redis restarts     {self.redis_restarts}")
        for line in self.lines:
            print(line)
        print(f"supervisor exit    {self.pool_exit}")
        if throughput is not None:
            print(f"throughput         {throughput[0]:.1f} tasks/s ({self.pushed} tasks in {throughput[1]:.1f} s, "
                  "first push to last record)")
        print(f"wall time          {wall_seconds:.1f} s")
        for failure in self.failures:
            print(f"FAILED: {failure}")
        print(f"lost={len(self.lost)} duplicated={len(self.duplicated)} wrong_requests={len(self.wrong_requests)}",
              flush=True)


def _index(image_id: str) -> int:
    return int(image_id.rsplit("_", 1)[1]) if re.fullmatch(r"img_\d+", image_id) else -1


def _sample(items: Sequence[str], count: int = 5) -> str:
    more = f" (+{len(items) - count} more)" if len(items) > count else ""
    return ", ".join(items[:count]) + more


def _story(some_id: str, events: list[dict]) -> str:
    """The pool's log events for one image or request id, in order, compressed to one line."""
    key = "request_id" if some_id.startswith("soak") else "image_id"
    mine = [e for e in events if e.get(key) == some_id]
    task_ids = {e.get("task_id") for e in mine if e.get("task_id")}
    mine = [e for e in events if e.get(key) == some_id or (e.get("task_id") in task_ids)]
    steps = [f"{e.get('event')}(pid={e.get('pid')},attempt={e.get('attempt', '-')},task={e.get('task_id')})" for e in mine]
    return " -> ".join(steps[:12]) or "no log events"


# ---------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the finally below always runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    soak = Soak(settings, workdir)
    ok = False
    try:
        ok = soak.execute()
    except (RuntimeError, AssertionError, redis.RedisError) as exc:
        print(f"FAILED: {exc}", flush=True)
    finally:
        soak.cleanup()
        if soak.log_path is not None and soak.log_path.exists():
            shutil.copyfile(soak.log_path, LOG_COPY)
            if not ok:
                print(f"pool log: {LOG_COPY}", flush=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
