"""The soak: N mixed tasks through the real pool while a chaos loop breaks it (`make soak`).

    producer thread: photos -> one /dev/shm segment per SHM task, made as producers do
        --RPUSH, paced--> soak (private redis-server, appendonly)
        --> `python supervisor.py --workers W` (its own session)
        --> OUTPUT_DIR/results.json + one JPEG per completed task
    main thread: every --kill-every seconds SIGKILL a random worker (every 4th
        time the ledger); once, half-way, take Redis down for ~2 s
    then: wait for N records, SIGTERM the supervisor (exit 0 expected), verify:
        exactly one record per task, one decodable file per completed record,
        no orphan or partial files, no segment left in /dev/shm, Redis drained.

The mix: ~70% SHM (256x256 and 512x512), ~25% URL (PNG and JPEG photos from a
loopback server), ~5% bad (malformed JSON, a missing segment, a 404, a 500 that
is retried up to MAX_ATTEMPTS and then fails). request_id is soak_<i>.

Hazards handled here:
- /dev/shm must stay bounded: the producer keeps the queue under a cap, so only
  that many segments wait at once.
- An RPUSH whose reply is lost while Redis goes down may or may not have run;
  pushing again could double a task and blame the pool. The producer holds a
  lock around each push, and the Redis restart takes the same lock.
- A malformed message has no readable request_id, so its record has none; the
  dead letter (same task_id) carries the raw text, which names soak_<i>.
- results.json is read while the ledger appends: a torn tail is retried.
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
from dataclasses import dataclass, field
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
from harness.results import read_results
from harness.segments import SegmentTracker
from shared.redis_queue import QueueKeys
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
SOAK_ID = re.compile(r"soak_\d+")


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

    @property
    def request_id(self) -> str:
        return f"soak_{self.index}"

    @property
    def status(self) -> str:
        return "failed" if self.kind in BAD_KINDS else "completed"


def plan_tasks(count: int, rng: random.Random, photo_sizes: dict[str, tuple[int, int]]) -> list[Planned]:
    plan = []
    for index in range(count):
        draw = rng.random()
        if draw < SHM_SHARE:
            plan.append(Planned(index, "shm", size=rng.choice(SHM_SIZES)))
        elif draw < SHM_SHARE + URL_SHARE:
            name, ext = rng.choice(URL_PHOTOS)
            plan.append(Planned(index, "url", size=photo_sizes[name], photo=name + ext))
        else:
            plan.append(Planned(index, rng.choice(BAD_KINDS)))
    return plan


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
    request_id, image_id = task.request_id, f"img_{task.index}"
    if task.kind == "bad_json":
        # Cut short: the pool cannot parse it, but the dead letter keeps the text.
        return f'{{"request_id": "{request_id}", "image_id": "{image_id}", "shm_info": {{"shm_name": '.encode()
    message: dict[str, Any] = {"request_id": request_id, "image_id": image_id}
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
        self.stop_pool()
        report = self.verify()
        report.print(time.monotonic() - started, self.throughput())
        return report.ok

    def print_header(self) -> None:
        kinds = Counter(task.kind for task in self.plan)
        bad = sum(kinds[k] for k in BAD_KINDS)
        s = self.settings
        print(f"soak: tasks={s.tasks} (shm={kinds['shm']} url={kinds['url']} bad={bad}: "
              + " ".join(f"{k[4:]}={kinds[k]}" for k in BAD_KINDS)
              + f") workers={s.workers} kill_every={s.kill_every:g}s seed={s.seed}", flush=True)

    def start_pool(self) -> None:
        # Its own session: our Ctrl-C does not reach it, and cleanup kills it whole.
        self.pool = Pool(workdir=self.workdir, output_dir=self.output_dir, redis_url=self.redis.url, queue=QUEUE,
                         workers=self.settings.workers, env={"MAX_ATTEMPTS": str(MAX_ATTEMPTS)})
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
        try:
            records = (self.output_dir / "results.json").read_bytes().count(b"\n{")
        except FileNotFoundError:
            records = 0
        kills = self.chaos.kills
        print(f"  [{phase}] pushed={self.producer.pushed} records={records} "
              f"kills: workers={kills['worker']} ledger={kills['ledger']}", flush=True)

    def throughput(self) -> tuple[float, float] | None:
        if self.last_record_at is None or self.producer.first_push_at is None:
            return None
        seconds = self.last_record_at - self.producer.first_push_at
        return self.settings.tasks / seconds, seconds

    # -- verification --------------------------------------------------

    def verify(self) -> Report:
        records = read_results(self.output_dir)
        events = self.pool.log_lines()
        client = redis.Redis.from_url(self.redis.url)
        try:
            dead = [json.loads(raw) for raw in client.lrange(QueueKeys(QUEUE).dead, 0, -1)]
            leftovers_in_redis = {
                "queue": client.llen(QUEUE),
                "processing": sum(client.llen(key) for key in client.scan_iter(f"{QueueKeys(QUEUE).prefix}:processing:*")),
                "delayed": client.zcard(QueueKeys(QUEUE).delayed),
            }
        finally:
            client.close()
        report = Report(settings=self.settings, failures=list(self.failures), kills=self.chaos.kills,
                        redis_restarts=self.chaos.redis_restarts, pushed=self.producer.pushed,
                        records=records, dead=dead, pool_exit=self.pool_exit, log_path=self.log_path)
        planned = {task.request_id: task for task in self.plan[:self.producer.pushed]}
        report.check_exactly_once(planned, dead, events)
        report.check_outcomes(planned)
        report.check_files(planned, self.output_dir)
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
    by_request: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def check_exactly_once(self, planned: dict[str, Planned], dead: list[dict], events: list[dict]) -> None:
        """lost: planned tasks without a record; duplicated: with more than one."""
        by_request: dict[str, list[dict]] = defaultdict(list)
        # A malformed message's record has no request_id; its dead letter names it.
        named_by_dead_letter = {}
        for entry in dead:
            found = SOAK_ID.search(entry.get("message") or "")
            if entry.get("task_id") and found:
                named_by_dead_letter[entry["task_id"]] = found.group(0)
        unnamed = []
        for record in self.records:
            request_id = record.get("request_id") or named_by_dead_letter.get(record.get("task_id"))
            if request_id is None:
                unnamed.append(record)
            else:
                by_request[request_id].append(record)
        missing = [rid for rid in planned if rid not in by_request]
        missing_malformed = [rid for rid in missing if planned[rid].kind == "bad_json"]
        # An unnamed record can only be a malformed task whose dead letter is missing.
        absorbed = min(len(unnamed), len(missing_malformed))
        self.lost = [rid for rid in missing if rid not in missing_malformed[:absorbed]]
        self.duplicated = sorted((rid for rid, recs in by_request.items() if len(recs) > 1), key=_index)
        self.duplicated += [f"<unnamed task {r.get('task_id')}>" for r in unnamed[absorbed:]]
        self.by_request = by_request
        strangers = sorted(set(by_request) - set(planned))
        task_ids = Counter(r.get("task_id") for r in self.records if r.get("task_id"))
        doubled_task_ids = [tid for tid, n in task_ids.items() if n > 1]
        if unnamed:
            self.lines.append(f"  note: {len(unnamed)} malformed-task record(s) had no dead letter to name them")
        if self.lost:
            self.fail(f"lost {len(self.lost)}: {_sample(self.lost)}")
            self.lines += [f"  evidence {rid}: {_story(rid, events)}" for rid in self.lost[:3]]
        if self.duplicated:
            self.fail(f"duplicated {len(self.duplicated)}: {_sample(self.duplicated)}")
            self.lines += [f"  evidence {rid}: {_story(rid, events)}" for rid in self.duplicated[:3]]
        if strangers:
            self.fail(f"records for unknown request ids: {_sample(strangers)}")
        if doubled_task_ids:
            self.fail(f"task ids recorded more than once: {_sample(doubled_task_ids)}")

    def check_outcomes(self, planned: dict[str, Planned]) -> None:
        """Good tasks complete at their size; bad ones fail (the 500 after MAX_ATTEMPTS)."""
        wrong = []
        for rid, recs in self.by_request.items():
            task = planned.get(rid)
            if task is None:
                continue
            record = recs[0]
            if record.get("status") != task.status:
                wrong.append(f"{rid} ({task.kind}) {record.get('status')}: {str(record.get('error'))[:100]}")
            elif task.status == "completed" and (record.get("height"), record.get("width")) != task.size:
                wrong.append(f"{rid} record says {record.get('width')}x{record.get('height')}, expected {task.size}")
            elif task.kind == "bad_500" and "gave up after" not in (record.get("error") or ""):
                wrong.append(f"{rid} (bad_500) failed without its retries: {record.get('error')}")
        if wrong:
            self.fail(f"{len(wrong)} task(s) with the wrong outcome: " + "; ".join(wrong[:3]))
        failed = sum(1 for r in self.records if r.get("status") == "failed")
        if len(self.dead) != failed:
            self.fail(f"dead letters {len(self.dead)} != failed records {failed}")

    def check_files(self, planned: dict[str, Planned], output_dir: Path) -> None:
        completed = [r for r in self.records if r.get("status") == "completed"]
        recorded_paths: set[Path] = set()
        bad = []
        for record in completed:
            path = Path(record.get("file_path") or "")
            recorded_paths.add(path)
            task = planned.get(record.get("request_id") or "")
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
        print(f"lost={len(self.lost)} duplicated={len(self.duplicated)}", flush=True)


def _index(request_id: str) -> int:
    return int(request_id.rsplit("_", 1)[1]) if SOAK_ID.fullmatch(request_id) else -1


def _sample(items: Sequence[str], count: int = 5) -> str:
    more = f" (+{len(items) - count} more)" if len(items) > count else ""
    return ", ".join(items[:count]) + more


def _story(request_id: str, events: list[dict]) -> str:
    """The pool's log events for one task, in order, compressed to one line."""
    mine = [e for e in events if e.get("request_id") == request_id]
    task_ids = {e.get("task_id") for e in mine if e.get("task_id")}
    mine = [e for e in events if e.get("request_id") == request_id or (e.get("task_id") in task_ids)]
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
