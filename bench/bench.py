"""The throughput benchmark: the pool against the raw encode limit (`make bench`).

What one run measures, on a private redis-server and fresh temp directories:

    photos (scikit-image) -> one /dev/shm segment per task, made as producers do
      limit: W forked processes: attach + encode + write/fdatasync + unlink,
             no Redis, no ledger                                   -> images/s, CPU/task
      pool:  the same tasks RPUSHed before `python supervisor.py --workers W`
             starts; READY=1 .. the Nth record in results.json       -> images/s, CPU/task
    then: push-to-durable-record latency at half the pool's peak rate, the
    ledger's ResultsFile alone, a worker's anonymous memory on 3840x2160
    frames, start-up to READY with 8 workers, and the idle pool's CPU.

Hazards handled here:
- Every segment, temp directory, pool process tree and the private Redis is
  released in a `finally`, on Ctrl-C and SIGTERM too. The pool runs in its own
  session, so Ctrl-C reaches only us and we stop it; limit children ignore
  SIGINT and are terminated by us.
- results.json is read while the ledger appends to it: only lines that end in a
  newline are counted, and the bytes before the last counted record never
  change, so each poll reads just the new tail.
- The machine is noisy: limit and pool rounds alternate and medians are shown.
  Each timed window also measures the CPU other processes took (a test suite
  of another checkout, say); a round disturbed beyond --max-foreign is redone.
- OpenCV must not have started its thread pool before we fork (see below).
- A run with wrong records or files exits 1; missed targets are only reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.process import BaseProcess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import cv2
import numpy as np
import redis
from dashboard_load import dashboard_clients  # bench/dashboard_load.py, beside this file

from harness import PoolFailed, procfs
from harness.photos import photo_of_size
from harness.pool import Pool
from harness.results import read_requests, read_results, read_results_file
from harness.segments import SegmentTracker, still_present
from image_result_client.producer import unlink_segment
from image_result_client.protocol import RESULTS_NAME, SHM_DIR, QueueKeys
from image_result_client.results_files import ResultsFollower, encode_file, encode_line
from shared.config import Settings
from shared.imaging.images import encode_segment
from shared.imaging.rendering import Rendering
from shared.imaging.segments import SegmentAccess
from shared.ipc.records import COMPLETED, CompletionRecord
from shared.messages import SegmentRef
from shared.storage.files import write_durably
from shared.storage.results_file import ResultsFile
from tools.local_redis import LocalRedis

# OpenCV starts a thread pool on its first parallel call (cv2.resize of the
# photos, here); a child forked after that deadlocks in cv2.setNumThreads() on
# the pool's lock, and signals may land on a pool thread instead of ours. One
# thread from the start, as in the supervisor, which never calls cv2 before fork.
cv2.setNumThreads(1)

WORKERS = 2
QUALITY = 80
# (label, height, width, share of --tasks): about the same encode time per size.
SIZES = (("512x512", 512, 512, 2.5), ("1024x1024", 1024, 1024, 1.0), ("3840x2160", 2160, 3840, 0.16))
LATENCY_SIZE = "1024x1024"
STARTUP_WORKERS = 8
# results.json is polled every 20 ms while timing throughput, every 2 ms once
# 90% of the records are in (the poll competes with the pool for the cores, and
# only the last record's time matters), and every 2 ms in the latency run.
THROUGHPUT_POLL_SECONDS = 0.02
POLL_SECONDS = 0.002
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0
LEDGER_BATCH = 256
# A round during which other processes kept more than --max-foreign % of the
# CPUs busy is run again, at most this many times per round.
MAX_REDOS = 2
SECTIONS = ("memory", "ledger", "throughput", "latency", "startup", "idle")
# The baselines read the bench's own segments with the pool's checks.
SEGMENT_ACCESS = SegmentAccess(prefix="", owner_uids=frozenset({os.getuid()}))
# The pool's settings the bench decides (the harness sets Redis, queue, OUTPUT_DIR, logs).
POOL_SETTINGS = {"JPEG_QUALITY": str(QUALITY), "UNLINK_SHM": "true"}
# The limit encodes as the pool does, from the same settings, so that their ratio stays a ratio.
RENDERING = Rendering.from_settings(Settings.from_env(POOL_SETTINGS, dotenv_path=None))


class CheckFailed(Exception):
    """Records, files or exit codes were wrong: the run is not valid."""


# ---------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class BenchSettings:
    rounds: int
    tasks: int
    latency_seconds: float
    idle_seconds: float
    append_samples: int
    big_ledger_records: int
    sections: tuple[str, ...]
    sizes: tuple[str, ...]
    max_foreign: float
    tmp_base: Path | None
    dashboard_clients: int = 0  # `supervisor.py dashboard` and N polling clients beside each pool round
    request_images: int = 0  # >0: the tasks go in requests of this many images (docs/formats.md#requestsjson)

    def tasks_for(self, share: float) -> int:
        # Even, so the limit's W=2 processes get the same number of tasks.
        return max(WORKERS * 4, int(self.tasks * share) // WORKERS * WORKERS)


def parse_args(argv: Sequence[str] | None) -> BenchSettings:
    parser = argparse.ArgumentParser(prog="bench/bench.py", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute (1 round, fewer tasks)")
    parser.add_argument("--rounds", type=int, metavar="N", help="rounds per figure, medians shown (default 3, quick 1)")
    parser.add_argument(
        "--tasks", type=int, metavar="N",
        help="tasks per round at 1024x1024 (default 600, quick 200); 512x512 gets 2.5x, 3840x2160 0.16x",
    )
    parser.add_argument("--latency-seconds", type=float, metavar="S", help="length of the half-load run (default 5)")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), metavar="LIST", help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    parser.add_argument(
        "--sizes", default=",".join(s[0] for s in SIZES), metavar="LIST",
        help="comma-separated subset of the frame sizes of the throughput section",
    )
    parser.add_argument(
        "--max-foreign", type=float, default=10.0, metavar="PCT",
        help=f"run a throughput round or the latency run again (up to {MAX_REDOS} times) when other processes "
        "used more than PCT%% of the CPUs during it (default 10)",
    )
    parser.add_argument(
        "--tmp", type=Path, metavar="DIR",
        help="where OUTPUT_DIRs go (default: the system temp dir); use the disk you deploy on",
    )
    parser.add_argument(
        "--dashboard-clients", type=int, default=0, metavar="N",
        help="run the web dashboard beside each pool round, with N clients polling it as the page does "
        "(compare the pool's throughput with a run without it)",
    )
    parser.add_argument(
        "--request-images", type=int, default=0, metavar="N",
        help="every message declares request_images: the tasks go in requests of N images each, "
        "and the pool counts them and writes requests.json (compare with a run without it)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.request_images <= 10_000:
        parser.error("--request-images takes 0..10000")
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; expected {', '.join(SECTIONS)}")
    sizes = tuple(s.strip() for s in args.sizes.split(",") if s.strip())
    if not sizes or any(size not in {s[0] for s in SIZES} for size in sizes):
        parser.error(f"--sizes takes a subset of {','.join(s[0] for s in SIZES)}")
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    tasks = args.tasks if args.tasks is not None else (200 if args.quick else 600)
    if rounds < 1 or tasks < 1:
        parser.error("--rounds and --tasks must be at least 1")
    return BenchSettings(
        rounds=rounds,
        tasks=tasks,
        latency_seconds=args.latency_seconds or (2.0 if args.quick else 5.0),
        idle_seconds=2.0 if args.quick else 5.0,
        append_samples=100 if args.quick else 200,
        big_ledger_records=1_000_000,
        sections=sections,
        sizes=sizes,
        max_foreign=args.max_foreign,
        tmp_base=args.tmp,
        dashboard_clients=max(0, args.dashboard_clients),
        request_images=args.request_images,
    )


# ---------------------------------------------------------------- shared memory and tasks


@dataclass(frozen=True, slots=True)
class BenchTask:
    request_id: str  # the task's identity: its record's image_id (and request_id, unless in a request)
    segment: str
    shape: tuple[int, int, int]
    request: tuple[str, int] | None = None  # (request id, request_images) with --request-images

    def message(self) -> bytes:
        height, width, channels = self.shape
        message = {
            "request_id": self.request[0] if self.request else self.request_id,
            "image_id": self.request_id,
            "shm_info": {
                "shm_name": self.segment,
                "shape": [height, width, channels],
                "dtype": "uint8",
                "size": height * width * channels,
            },
        }
        if self.request:
            message["request_images"] = self.request[1]
        return json.dumps(message).encode()


def natural_frames(height: int, width: int) -> list[np.ndarray]:
    """Four real photos of one size (the mosaic and its mirror images), BGR uint8."""
    base = photo_of_size(height, width)
    return [base, *(np.ascontiguousarray(view) for view in (base[:, ::-1], base[::-1], base[::-1, ::-1]))]


def make_tasks(
    segments: SegmentTracker, frames: list[np.ndarray], count: int, label: str, *, request_images: int = 0
) -> list[BenchTask]:
    run = uuid.uuid4().hex[:8]
    return [
        BenchTask(
            f"{label}-{run}-{i}",
            segments.make(frames[i % len(frames)]),
            frames[i % len(frames)].shape,
            _request_of(f"{label}-{run}", i, count, request_images),
        )
        for i in range(count)
    ]


def _request_of(prefix: str, index: int, count: int, size: int) -> tuple[str, int] | None:
    """Task `index` of `count` in requests of `size` consecutive tasks (the last one may be smaller)."""
    if size <= 0:
        return None
    first = index // size * size
    return f"{prefix}-request-{index // size}", min(size, count - first)


# ---------------------------------------------------------------- CPU accounting


class ForeignLoad:
    """CPU taken from this run between start() and percent(): by processes
    outside it (not our descendants, not kernel threads), and by the hypervisor
    for other virtual machines (steal time). Another job on a shared machine
    skews every figure, so each timed window says how busy the others were."""

    def __init__(self) -> None:
        self._before: dict[int, int] = {}
        self._steal_before = 0
        self._started = 0.0

    def start(self) -> ForeignLoad:
        self._before = self._foreign_ticks()
        self._steal_before = self._steal_ticks()
        self._started = time.perf_counter()
        return self

    def percent(self) -> float:
        """Share of all CPUs, in %, taken by foreign processes and steal since start()."""
        elapsed = time.perf_counter() - self._started
        after = self._foreign_ticks()
        ticks = sum(total - self._before.get(pid, 0) for pid, total in after.items())
        ticks += self._steal_ticks() - self._steal_before
        return 100.0 * ticks / procfs.CLOCK_TICKS / max(elapsed, 1e-6) / (os.cpu_count() or 1)

    @staticmethod
    def _steal_ticks() -> int:
        """All CPUs' steal time so far, in clock ticks (the 8th figure of /proc/stat's cpu line)."""
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
            return int(fields[8])
        except (OSError, IndexError, ValueError):
            return 0

    @staticmethod
    def _foreign_ticks() -> dict[int, int]:
        parents, ticks = {}, {}
        for pid in procfs.all_pids():
            stat = procfs.read_stat(pid)
            if stat is not None:
                parents[pid], ticks[pid] = stat.ppid, stat.cpu_ticks
        ours = os.getpid()

        def foreign(pid: int) -> bool:
            seen = 0
            while pid > 2 and seen < 64:
                if pid == ours:
                    return False
                pid, seen = parents.get(pid, 0), seen + 1
            return pid != 2  # pid 2 is kthreadd: its children are kernel threads

        return {pid: total for pid, total in ticks.items() if pid != 2 and foreign(pid)}


def children_rusage_ns() -> int:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return int((usage.ru_utime + usage.ru_stime) * 1e9)


# ---------------------------------------------------------------- the limit


@dataclass(frozen=True, slots=True)
class LimitResult:
    images_per_s: float
    cpu_us_per_task: float
    encode_us_per_task: float  # CPU inside encode_segment
    wall_s: float
    foreign_load: float


def receive(conn: multiprocessing.connection.Connection, process: BaseProcess, timeout: float) -> object:
    """The child's next message; CheckFailed if it dies or stays silent. Waits in
    short slices so that Ctrl-C and SIGTERM are acted on at once."""
    deadline = time.monotonic() + timeout
    while not conn.poll(0.2):
        if not process.is_alive() and not conn.poll(0):
            raise CheckFailed(f"{process.name} exited with {process.exitcode} without reporting")
        if time.monotonic() > deadline:
            raise CheckFailed(f"{process.name} reported nothing within {timeout:.0f}s")
    return conn.recv()


def write_plainly(path: Path, data: bytes) -> None:
    """The limit's write: a new file, no fsync (the pool pays for durability itself)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _limit_child(
    share: list[BenchTask], outdir: Path, durable: bool, go_fd: int, conn: multiprocessing.connection.Connection
) -> None:
    """One limit process: attach + encode + write + unlink, nothing else (with
    `durable`, each file is fdatasync'ed too: the reference for one-at-a-time
    durable writing)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides, as the supervisor does
    cv2.setNumThreads(1)
    try:
        conn.send("ready")
        os.read(go_fd, 1)
        cpu_start = time.process_time_ns()
        encode_ns = 0
        for task in share:
            encode_started = time.thread_time_ns()
            image = encode_segment(
                SegmentRef(task.segment, task.shape, "uint8"), rendering=RENDERING, access=SEGMENT_ACCESS
            )
            encode_ns += time.thread_time_ns() - encode_started
            (write_durably if durable else write_plainly)(outdir / f"{task.request_id}.jpg", image.jpeg)
            unlink_segment(task.segment)
        ended = time.perf_counter()
        conn.send(("ok", ended, time.process_time_ns() - cpu_start, encode_ns))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        conn.send(("error", repr(exc), 0, 0))
    finally:
        conn.close()


def run_limit(tasks: list[BenchTask], outdir: Path, *, durable: bool = False) -> LimitResult:
    context = multiprocessing.get_context("fork")
    outdir.mkdir(parents=True)
    go_r, go_w = os.pipe()
    processes, connections = [], []
    try:
        for k in range(WORKERS):
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=_limit_child, args=(tasks[k::WORKERS], outdir, durable, go_r, sender), daemon=True)
            process.start()
            sender.close()
            processes.append(process)
            connections.append(receiver)
        for conn, process in zip(connections, processes, strict=True):  # all forked and waiting: the clock starts now
            if receive(conn, process, 30) != "ready":
                raise CheckFailed("limit child did not start")
        others = ForeignLoad().start()
        started = time.perf_counter()
        os.write(go_w, b"g" * WORKERS)
        reports = [receive(conn, process, 60 + len(tasks)) for conn, process in zip(connections, processes, strict=True)]
        for process in processes:
            process.join()
        foreign = others.percent()
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
        os.close(go_r)
        os.close(go_w)
    errors = [detail for status, detail, *_ in reports if status != "ok"]
    if errors:
        raise CheckFailed(f"limit process failed: {errors[0]}")
    written = list(outdir.glob("*.jpg"))
    if len(written) != len(tasks) or any(path.stat().st_size == 0 for path in written):
        raise CheckFailed(f"limit wrote {len(written)} files for {len(tasks)} tasks")
    left = still_present(t.segment for t in tasks)
    if left:
        raise CheckFailed(f"limit left {len(left)} segments")
    wall = max(ended for _, ended, _, _ in reports) - started
    cpu_ns = sum(cpu for _, _, cpu, _ in reports)
    encode_ns = sum(encode for _, _, _, encode in reports)
    return LimitResult(len(tasks) / wall, cpu_ns / 1000 / len(tasks), encode_ns / 1000 / len(tasks), wall, foreign)


# ---------------------------------------------------------------- the pool process


def bench_pool(
    workdir: Path, *, redis_url: str, queue: str, workers: int = WORKERS, wrapper: Sequence[str] = ()
) -> Pool:
    """`supervisor.py --workers W` on this queue, writing into workdir/out, as the bench runs it."""
    return Pool(
        workdir=workdir, output_dir=workdir / "out", redis_url=redis_url, queue=queue, workers=workers,
        env=POOL_SETTINGS, wrapper=tuple(wrapper),
    )


@contextlib.contextmanager
def running_pool(pool: Pool) -> Iterator[Pool]:
    try:
        yield pool.start()
    finally:
        pool.kill_all()


def figure_role(pool: Pool, pid: int) -> str:
    """"workers", "ledger" or "supervisor", as the figures name them; a child
    without a role's title (not set yet, or gone) counts with the workers."""
    role = pool.role_of(pid)
    return "workers" if role in ("worker", None) else str(role)


def encode_cpu_us(pool: Pool) -> tuple[int, float]:
    """(tasks encoded, their encoder CPU in us), summed over the workers'
    `worker_stopped` log lines; read it after stop()."""
    stopped = pool.events("worker_stopped")
    encoded = sum(int(event.get("encoded", 0)) for event in stopped)
    return encoded, sum(float(event.get("encode_cpu_s", 0.0)) for event in stopped) * 1e6


class ResultsTail:
    """Counts the records in results.json as the ledger appends them, with the
    client's ResultsFollower; on_record gets each record line, unparsed, and the
    time of the poll that found it."""

    def __init__(self, path: Path, *, on_record: Callable[[bytes, float], None] | None = None) -> None:
        self.path = path
        self.on_record = on_record
        self._follower = ResultsFollower(path)

    @property
    def count(self) -> int:
        return self._follower.count

    def poll(self) -> int:
        now = time.perf_counter()
        if self.on_record is None:
            for _ in self._follower.poll():
                pass
        else:
            for line in self._follower.poll():
                self.on_record(line, now)
        return self._follower.count


def verify_pool_output(pool: Pool, tasks: list[BenchTask], client: redis.Redis, exit_code: int) -> None:
    """Exactly one completed record and one published JPEG per task; nothing left behind."""
    problems = []
    if exit_code != 0:
        problems.append(f"supervisor exited with {exit_code} after SIGTERM")
    records = read_results(pool.output_dir)
    expected = {task.request_id: task for task in tasks}
    seen: dict[str, dict] = {}
    for record in records:
        rid = record.get("image_id")
        if rid in seen:
            problems.append(f"duplicate record for {rid}")
        seen[rid] = record
        task = expected.get(rid)
        if task is None:
            problems.append(f"record for unknown request {rid!r}")
            continue
        if record.get("status") != COMPLETED:
            problems.append(f"{rid}: status {record.get('status')!r} ({record.get('error')})")
            continue
        path = Path(record.get("file_path") or "")
        if path.parent != pool.output_dir or not path.is_file():
            problems.append(f"{rid}: file {path} missing")
        elif path.stat().st_size != record.get("bytes"):
            problems.append(f"{rid}: {path} holds {path.stat().st_size} bytes, record says {record.get('bytes')}")
        if (record.get("height"), record.get("width")) != task.shape[:2]:
            problems.append(f"{rid}: record says {record.get('width')}x{record.get('height')}")
    if len(records) != len(tasks):
        problems.append(f"results.json holds {len(records)} records for {len(tasks)} tasks")
    missing = sorted(set(expected) - set(seen))
    if missing:
        problems.append(f"{len(missing)} tasks have no record, e.g. {missing[0]}")
    requests = sorted({task.request[0] for task in tasks if task.request})
    ended = sorted(r.get("request_id") for r in read_requests(pool.output_dir)) if requests else []
    if ended != requests:
        problems.append(f"requests.json holds {len(ended)} request records for {len(requests)} requests")
    jpegs = list(pool.output_dir.glob("*.jpg"))
    if len(jpegs) != len(tasks):
        problems.append(f"OUTPUT_DIR holds {len(jpegs)} JPEGs for {len(tasks)} tasks")
    partials = list((pool.output_dir / ".partial").iterdir())
    if partials:
        problems.append(f"{len(partials)} files left in .partial")
    for path in (jpegs[:1] + jpegs[-1:]):
        frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if frame is None or frame.shape[:2] != tasks[0].shape[:2]:
            problems.append(f"{path} does not decode to a {tasks[0].shape[1]}x{tasks[0].shape[0]} image")
    left = still_present(t.segment for t in tasks)
    if left:
        problems.append(f"{len(left)} segments not unlinked, e.g. {left[0]}")
    queue = pool.queue
    if client.llen(queue):
        problems.append(f"{client.llen(queue)} messages still queued")
    if client.llen(QueueKeys(queue).dead):
        problems.append(f"{client.llen(QueueKeys(queue).dead)} dead letters")
    held = sum(client.llen(key) for key in client.scan_iter(match=f"{QueueKeys(queue).prefix}:processing:*"))
    if held:
        problems.append(f"{held} messages left in processing lists")
    if problems:
        raise CheckFailed("pool output is wrong:\n  " + "\n  ".join(problems[:10]) + "\n" + pool.stderr_tail())


# ---------------------------------------------------------------- the run's shared state


@dataclass
class Bench:
    settings: BenchSettings
    tmp: Path
    redis_server: LocalRedis
    client: redis.Redis
    segments: SegmentTracker
    failures: list[str] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)

    def fresh_dir(self, label: str) -> Path:
        """A new directory under the run's temp dir. Nothing in it is removed
        before the run ends: on ext4 without a journal, inodes freed in the last
        30 s slow down every file creation, and the next round would pay for
        this one's clean-up."""
        return Path(tempfile.mkdtemp(prefix=f"{label}-", dir=self.tmp))

    def queue_name(self, label: str) -> str:
        return f"bench:{label}:{uuid.uuid4().hex[:10]}"

    def pool(self, workdir: Path, queue: str, *, workers: int = WORKERS) -> contextlib.AbstractContextManager[Pool]:
        """`supervisor.py` on this run's Redis and queue, writing into workdir/out; killed on the way out."""
        return running_pool(bench_pool(workdir, redis_url=self.redis_server.url, queue=queue, workers=workers))

    def forget_queue(self, queue: str) -> None:
        keys = list(self.client.scan_iter(match=f"{queue}*"))
        if keys:
            self.client.delete(*keys)

    def redis_cpu_ns(self) -> int:
        return procfs.cpu_ns(self.redis_server.pid or 0)

    def note(self, text: str) -> None:
        self.details.append(text)
        print("  " + text, flush=True)


# ---------------------------------------------------------------- throughput: limit vs pool


@dataclass(frozen=True, slots=True)
class PoolResult:
    images_per_s: float
    window_s: float
    cpu_us_per_task: float  # first claim (or READY) .. last record, whole tree
    whole_run_cpu_us_per_task: float  # spawn .. exit, RUSAGE_CHILDREN
    redis_us_per_task: float
    role_us_per_task: dict[str, float]
    encode_us_per_task: float | None  # CPU inside the encoder; None if a worker did not say
    claimed_before_ready: int
    stop_s: float
    foreign_load: float


@dataclass(frozen=True, slots=True)
class WindowStart:
    """The clock and CPU counters when the pool's timed window opened."""

    at: float
    cpu_by_pid: dict[int, int]
    redis_ns: int
    bench_ns: int


class FirstClaim:
    """Opens the window at the pool's first claim (the queue first holding fewer
    than all the tasks), which can come before READY: workers start at once."""

    def __init__(self, bench: Bench, pool: Pool, queue: str, count: int) -> None:
        self.bench, self.pool, self.queue, self.count = bench, pool, queue, count
        self.start: WindowStart | None = None

    def look(self) -> None:
        if self.start is None and self.bench.client.llen(self.queue) < self.count:
            self.start = self.snapshot()

    def snapshot(self) -> WindowStart:
        cpu_by_pid = {pid: procfs.cpu_ns(pid) for pid in self.pool.tree_pids()}
        return WindowStart(time.perf_counter(), cpu_by_pid, self.bench.redis_cpu_ns(), time.process_time_ns())


def run_pool_batch(bench: Bench, tasks: list[BenchTask], label: str) -> PoolResult:
    """Tasks already in their segments; push them, start the pool, time its first claim (or READY) .. Nth record."""
    queue = bench.queue_name(label)
    workdir = bench.fresh_dir(f"pool-{label}")
    with bench.client.pipeline(transaction=False) as pipe:
        for task in tasks:
            pipe.rpush(queue, task.message())
        pipe.execute()
    rusage_before = children_rusage_ns()
    watched = dashboard_clients(
        redis_url=bench.redis_server.url, queue=queue, output_dir=workdir / "out", workdir=workdir / "dashboard",
        clients=bench.settings.dashboard_clients,
    )
    try:
        with watched as watchers, bench.pool(workdir, queue) as pool:
            first_claim = FirstClaim(bench, pool, queue, len(tasks))
            pool.wait_ready(READY_TIMEOUT, on_tick=first_claim.look)
            # The window opens at the first claim, or at READY if none came before.
            start = first_claim.start or first_claim.snapshot()
            pids = pool.tree_pids()
            others = ForeignLoad().start()
            unclaimed = int(bench.client.llen(queue))
            tail = ResultsTail(pool.output_dir / RESULTS_NAME)
            deadline = time.monotonic() + 60 + len(tasks) * 0.2
            while tail.poll() < len(tasks):
                if pool.poll() is not None:
                    raise CheckFailed(
                        f"pool exited with {pool.poll()} after {tail.count} records\n{pool.stderr_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise CheckFailed(
                        f"pool stalled: {tail.count} of {len(tasks)} records, "
                        f"{bench.client.llen(queue)} still queued\n"
                        + pool.stderr_tail()
                    )
                time.sleep(THROUGHPUT_POLL_SECONDS if tail.count < 0.9 * len(tasks) else POLL_SECONDS)
            done_at = time.perf_counter()
            role_ns = dict.fromkeys(("workers", "ledger", "supervisor"), 0)
            for pid in pids:
                # A child forked after the window opened counts whole (its boot takes ms).
                role_ns[figure_role(pool, pid)] += procfs.cpu_ns(pid) - start.cpu_by_pid.get(pid, 0)
            cpu_window = sum(role_ns.values())
            redis_window = bench.redis_cpu_ns() - start.redis_ns
            foreign = others.percent()
            bench_ns = time.process_time_ns() - start.bench_ns
            if pool.tree_pids() != pids:
                bench.failures.append(
                    f"{label}: the pool's processes changed during the run: {pids} -> {pool.tree_pids()}"
                )
            if watchers is not None and (watchers.failures or not watchers.requests):
                bench.failures.append(f"{label}: dashboard clients: {watchers.failures} of {watchers.requests} requests failed")
            stop_started = time.perf_counter()
            code = pool.stop(timeout=STOP_TIMEOUT)
            stop_s = time.perf_counter() - stop_started
        whole_run_ns = children_rusage_ns() - rusage_before
        encoded, encode_us = encode_cpu_us(pool)
        verify_pool_output(pool, tasks, bench.client, code)
    finally:
        bench.forget_queue(queue)
    window = done_at - start.at
    in_window = len(tasks)
    return PoolResult(
        images_per_s=len(tasks) / window,
        window_s=window,
        cpu_us_per_task=cpu_window / 1000 / in_window,
        whole_run_cpu_us_per_task=whole_run_ns / 1000 / len(tasks),
        redis_us_per_task=redis_window / 1000 / in_window,
        role_us_per_task={role: ns / 1000 / in_window for role, ns in {**role_ns, "bench": bench_ns}.items()},
        encode_us_per_task=encode_us / encoded if encoded == len(tasks) else None,
        claimed_before_ready=len(tasks) - unclaimed,
        stop_s=stop_s,
        foreign_load=foreign,
    )


def run_round(
    bench: Bench, frames: list[np.ndarray], count: int, label: str
) -> tuple[LimitResult, LimitResult, PoolResult]:
    """The limit, the limit with an fdatasync per file, then the pool, each on
    fresh segments of the same frames."""
    limits = []
    for durable in (False, True):
        outdir = bench.fresh_dir(f"limit-{label}")
        try:
            tasks = make_tasks(bench.segments, frames, count, label, request_images=bench.settings.request_images)
            limits.append(run_limit(tasks, outdir / "out", durable=durable))
        finally:
            bench.segments.cleanup()
    try:
        pool = run_pool_batch(bench, make_tasks(bench.segments, frames, count, label, request_images=bench.settings.request_images), label)
    finally:
        bench.segments.cleanup()
    return limits[0], limits[1], pool


def measure_throughput(bench: Bench) -> None:
    print(f"\n# throughput, W={WORKERS}, {bench.settings.rounds} round(s), limit and pool interleaved", flush=True)
    for label, height, width, share in SIZES:
        if label not in bench.settings.sizes:
            continue
        frames = natural_frames(height, width)
        count = bench.settings.tasks_for(share)
        limits: list[LimitResult] = []
        durable_limits: list[LimitResult] = []
        pools: list[PoolResult] = []
        redone = 0
        for round_number in range(1, bench.settings.rounds + 1):
            for attempt in range(1 + MAX_REDOS):
                limit, durable_limit, pool = run_round(bench, frames, count, label)
                disturbed = max(limit.foreign_load, pool.foreign_load) > bench.settings.max_foreign
                print(
                    f"  {label} round {round_number}: limit {limit.images_per_s:7.1f}/s"
                    f"  pool {pool.images_per_s:7.1f}/s  ratio {pool.images_per_s / limit.images_per_s:.3f}"
                    f"  (N={count}, {pool.claimed_before_ready} claimed before READY, stop {pool.stop_s:.2f}s,"
                    f" others busy {limit.foreign_load:.0f}%"
                    f" / {pool.foreign_load:.0f}%{', disturbed: again' if disturbed and attempt < MAX_REDOS else ''})",
                    flush=True,
                )
                if not disturbed or attempt == MAX_REDOS:
                    break
                redone += 1
            limits.append(limit)
            durable_limits.append(durable_limit)
            pools.append(pool)
        bench.figures[f"redone {label}"] = redone
        limit_rate = statistics.median(r.images_per_s for r in limits)
        pool_rate = statistics.median(r.images_per_s for r in pools)
        limit_cpu = statistics.median(r.cpu_us_per_task for r in limits)
        pool_cpu = statistics.median(r.cpu_us_per_task for r in pools)
        whole_cpu = statistics.median(r.whole_run_cpu_us_per_task for r in pools)
        bench.figures[f"limit {label}"] = limit_rate
        bench.figures[f"durable limit {label}"] = statistics.median(r.images_per_s for r in durable_limits)
        bench.figures[f"cpu durable limit {label}"] = statistics.median(r.cpu_us_per_task for r in durable_limits)
        bench.figures[f"pool {label}"] = pool_rate
        bench.figures[f"ratio {label}"] = statistics.median(
            pool.images_per_s / limit.images_per_s for limit, pool in zip(limits, pools, strict=True)
        )
        bench.figures[f"cpu limit {label}"] = limit_cpu
        bench.figures[f"cpu pool {label}"] = pool_cpu
        bench.figures[f"cpu beyond {label}"] = pool_cpu - limit_cpu
        bench.figures[f"cpu beyond whole {label}"] = whole_cpu - limit_cpu
        # The encoder's own speed swings by a tenth between rounds on these
        # machines, more than the whole budget; taking each run's own encoder
        # CPU out leaves what the rest of the work costs.
        if all(r.encode_us_per_task is not None for r in pools):
            bench.figures[f"limit encode {label}"] = statistics.median(r.encode_us_per_task for r in limits)
            bench.figures[f"pool encode {label}"] = statistics.median(r.encode_us_per_task for r in pools)
            bench.figures[f"cpu beyond non-encode {label}"] = statistics.median(
                (pool.cpu_us_per_task - pool.encode_us_per_task) - (limit.cpu_us_per_task - limit.encode_us_per_task)
                for limit, pool in zip(limits, pools, strict=True)
            )
        bench.figures[f"redis cpu {label}"] = statistics.median(r.redis_us_per_task for r in pools)
        for role in ("workers", "ledger", "supervisor", "bench"):
            bench.figures[f"{role} cpu {label}"] = statistics.median(r.role_us_per_task[role] for r in pools)
        bench.figures[f"tasks {label}"] = count
        bench.figures[f"claimed before ready {label}"] = statistics.median(r.claimed_before_ready for r in pools)
        bench.figures[f"stop {label}"] = statistics.median(r.stop_s for r in pools)
        bench.figures[f"foreign {label}"] = max(r.foreign_load for r in [*limits, *pools])


# ---------------------------------------------------------------- latency at half load


def measure_latency(bench: Bench) -> None:
    peak = bench.figures.get(f"pool {LATENCY_SIZE}")
    label, height, width, _ = next(s for s in SIZES if s[0] == LATENCY_SIZE)
    frames = natural_frames(height, width)
    if peak is None:  # throughput not run: find the peak with one short batch
        try:
            tasks = make_tasks(bench.segments, frames, bench.settings.tasks_for(1.0), label, request_images=bench.settings.request_images)
            peak = run_pool_batch(bench, tasks, label).images_per_s
        finally:
            bench.segments.cleanup()
    rate = peak / 2
    count = max(10, int(rate * bench.settings.latency_seconds))
    print(f"\n# latency at half load: {label}, {rate:.0f} tasks/s for {count / rate:.1f}s ({count} tasks)", flush=True)
    for attempt in range(1 + MAX_REDOS):
        latencies, foreign = latency_run(bench, frames, rate, count)
        disturbed = foreign > bench.settings.max_foreign
        bench.note(
            f"latency ms: p50 {np.percentile(latencies, 50):.2f}  p90 {np.percentile(latencies, 90):.2f}  "
            f"p99 {np.percentile(latencies, 99):.2f}  max {latencies.max():.2f}  (poll every "
            f"{POLL_SECONDS * 1000:.0f} ms; others busy {foreign:.0f}%"
            f"{', disturbed: again' if disturbed and attempt < MAX_REDOS else ''})"
        )
        if not disturbed:
            break
    bench.figures["latency p50"] = float(np.percentile(latencies, 50))
    bench.figures["latency p99"] = float(np.percentile(latencies, 99))
    bench.figures["latency rate"] = rate


def latency_run(bench: Bench, frames: list[np.ndarray], rate: float, count: int) -> tuple[np.ndarray, float]:
    """Push `count` tasks at `rate` into an idle pool; (push-to-record latencies in ms, others busy %)."""
    # The segments are made before the pool starts: making them is heavy and would
    # compete with the pool for the two cores.
    tasks = make_tasks(bench.segments, frames, count, "lat", request_images=bench.settings.request_images)
    pushed_at: dict[str, float] = {}
    seen_at: dict[str, float] = {}

    def on_record(line: bytes, now: float) -> None:
        seen_at.setdefault(json.loads(line)["image_id"], now)

    queue = bench.queue_name("latency")
    workdir = bench.fresh_dir("pool-latency")
    try:
        with bench.pool(workdir, queue) as pool:
            pool.wait_ready(READY_TIMEOUT)
            time.sleep(0.3)  # let the workers settle into their blocking wait
            tail = ResultsTail(pool.output_dir / RESULTS_NAME, on_record=on_record)
            interval = 1.0 / rate
            others = ForeignLoad().start()
            started = time.perf_counter()
            next_poll = started
            for index, task in enumerate(tasks):
                due = started + index * interval
                while (now := time.perf_counter()) < due:
                    if now >= next_poll:
                        tail.poll()
                        next_poll = now + POLL_SECONDS
                    time.sleep(max(0.0, min(due, next_poll) - time.perf_counter()))
                pushed_at[task.request_id] = time.perf_counter()
                bench.client.rpush(queue, task.message())
            deadline = time.monotonic() + 30
            while tail.poll() < count:
                if time.monotonic() > deadline or pool.poll() is not None:
                    raise CheckFailed(f"latency run: {tail.count} of {count} records\n{pool.stderr_tail()}")
                time.sleep(POLL_SECONDS)
            foreign = others.percent()
            code = pool.stop(timeout=STOP_TIMEOUT)
        verify_pool_output(pool, tasks, bench.client, code)
    finally:
        bench.forget_queue(queue)
        bench.segments.cleanup()
    return np.array([seen_at[rid] - pushed_at[rid] for rid in pushed_at]) * 1000, foreign


# ---------------------------------------------------------------- the ledger's file alone


def realistic_record(index: int, run: str) -> dict:
    record = CompletionRecord(
        task_id=f"{run}-{index}",
        delivery=1,
        envelope=b"",
        processing_key="{hosting_tasks}:processing:0123456789ab:w12345",
        request_id=f"req-{run}-{index}",
        image_id=f"camera-7/frame-{index:08d}",
        status=COMPLETED,
        finished_at=datetime.now(),
        source="shm",
        width=1024,
        height=1024,
        bytes=153_831,
        duration_ms=4.73,
        file_path=f"/srv/output/translated/camera-7_frame-{index:08d}_20250101_120000.jpg",
    )
    return record.results_line()


def write_results_file(path: Path, count: int) -> None:
    """A results.json of `count` records in the ledger's format, written directly."""
    template = encode_line(realistic_record(0, "RUN"))
    head, _, rest = template.partition(b"RUN-0")
    middle, _, tail = rest.partition(b"RUN-0")
    lines = [b"%sold-%d%sold-%d%s" % (head, i, middle, i, tail) for i in range(count)]
    with open(path, "wb") as out:
        out.write(encode_file(lines))
        out.flush()
        os.fsync(out.fileno())


def measure_ledger(bench: Bench) -> None:
    print("\n# ledger: ResultsFile alone", flush=True)
    directory = bench.fresh_dir("ledger")
    try:
        results = ResultsFile(directory / "sustained.json")
        results.open()
        run = uuid.uuid4().hex[:8]
        batches = [[realistic_record(b * LEDGER_BATCH + i, run) for i in range(LEDGER_BATCH)] for b in range(40)]
        appended = 0
        started = time.perf_counter()
        while time.perf_counter() - started < 2.0:
            for batch in batches:
                results.append(batch)
            appended += len(batches) * LEDGER_BATCH
        elapsed = time.perf_counter() - started
        results.close()
        bench.figures["ledger records/s"] = appended / elapsed
        bench.note(f"ledger: {appended} records in batches of {LEDGER_BATCH}: {appended / elapsed:,.0f} records/s")

        small_path, big_path = directory / "small.json", directory / "big.json"
        write_results_file(small_path, 1_000)
        build_started = time.perf_counter()
        write_results_file(big_path, bench.settings.big_ledger_records)
        build_s = time.perf_counter() - build_started
        small, big = ResultsFile(small_path), ResultsFile(big_path)
        small.open()
        big.open()
        costs: dict[str, list[float]] = {"small": [], "big": []}
        files = [("small", small), ("big", big)]
        for index in range(bench.settings.append_samples + 10):
            for name, results_file in files if index % 2 else files[::-1]:
                record = [realistic_record(index, f"{run}{name}")]
                begun = time.perf_counter()
                results_file.append(record)
                if index >= 10:  # the first appends warm up the page cache and the journal
                    costs[name].append(time.perf_counter() - begun)
        small.close()
        big.close()
        # The files must still be what the ledger promises: valid JSON arrays.
        if len(read_results_file(small_path)) != 1_000 + bench.settings.append_samples + 10:
            raise CheckFailed("small results file has the wrong number of records after appends")
        small_us = statistics.median(costs["small"]) * 1e6
        big_us = statistics.median(costs["big"]) * 1e6
        bench.figures["append small"] = small_us
        bench.figures["append big"] = big_us
        bench.note(
            f"append of 1 record: {small_us:.0f} us at 1,000 records, {big_us:.0f} us at "
            f"{bench.settings.big_ledger_records:,} ({big_path.stat().st_size / 1e6:.0f} MB, built in {build_s:.1f}s)"
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------- worker memory on 3840x2160 frames


def _rss_anon_kb() -> int:
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"RssAnon:"):
                return int(line.split()[1])
    return 0


def _peak_anon_growth_kb(action: Callable[[], object]) -> tuple[int, int]:
    """(peak, retained) growth of this process's anonymous memory while action runs,
    sampled by a thread every ~0.3 ms (OpenCV releases the GIL while it encodes)."""
    baseline = _rss_anon_kb()
    peak = baseline
    running = threading.Event()
    running.set()

    def sample() -> None:
        nonlocal peak
        while running.is_set():
            peak = max(peak, _rss_anon_kb())
            time.sleep(0.0003)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    time.sleep(0.002)
    try:
        action()
    finally:
        running.clear()
        sampler.join()
    peak = max(peak, _rss_anon_kb())
    return peak - baseline, _rss_anon_kb() - baseline


def _memory_child(names: list[str], shape: tuple[int, int, int], conn: multiprocessing.connection.Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)
    try:
        refs = [SegmentRef(name, shape, "uint8") for name in names]
        # The first frame includes one-time allocations (libjpeg, the output
        # buffer); it counts too, so the figure is an upper bound.
        shm_runs = [_peak_anon_growth_kb(lambda ref=ref: encode_segment(ref, rendering=RENDERING, access=SEGMENT_ACCESS)) for ref in refs]

        def encode_a_copy() -> None:
            import mmap

            from shared.imaging.images import encode_pixels

            with open(SHM_DIR / names[0], "rb") as segment:
                mapping = mmap.mmap(segment.fileno(), 0, prot=mmap.PROT_READ)
            pixels = np.frombuffer(mapping, np.uint8).reshape(shape).copy()
            encode_pixels(pixels, rendering=RENDERING)
            del pixels
            mapping.close()

        control = _peak_anon_growth_kb(encode_a_copy)
        conn.send(("ok", shm_runs, control))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        conn.send(("error", repr(exc), None))
    finally:
        conn.close()


def measure_memory(bench: Bench) -> None:
    print("\n# worker memory on 3840x2160 frames", flush=True)
    _, height, width, _ = next(s for s in SIZES if s[0] == "3840x2160")
    frames = natural_frames(height, width)
    names = [bench.segments.make(frames[i % len(frames)]) for i in range(6)]
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_memory_child, args=(names, frames[0].shape, sender), daemon=True)
    try:
        child.start()
        sender.close()
        status, shm_runs, control = receive(receiver, child, 120)
        child.join()
    finally:
        if child.is_alive():
            child.terminate()
        child.join()
        bench.segments.cleanup()
    if status != "ok":
        raise CheckFailed(f"memory probe failed: {shm_runs}")
    peak_mb = max(peak for peak, _ in shm_runs) / 1024
    bench.figures["memory peak"] = peak_mb
    bench.figures["memory control"] = control[0] / 1024
    bench.note(
        f"anonymous memory gained while encoding from the segment: peak {peak_mb:.2f} MB "
        f"(max of {len(shm_runs)} frames; "
        f"first {shm_runs[0][0] / 1024:.2f} MB, later {max(p for p, _ in shm_runs[1:]) / 1024:.2f} MB), "
        f"retained {max(kept for _, kept in shm_runs) / 1024:.1f} MB; "
        f"control with a copy of the pixels: {control[0] / 1024:.1f} MB"
    )


# ---------------------------------------------------------------- start-up and idle


def measure_startup(bench: Bench) -> None:
    print(f"\n# start-up to READY with {STARTUP_WORKERS} workers", flush=True)
    times, stops = [], []
    for _ in range(bench.settings.rounds):
        queue = bench.queue_name("startup")
        workdir = bench.fresh_dir("pool-startup")
        try:
            with bench.pool(workdir, queue, workers=STARTUP_WORKERS) as pool:
                ready_at = pool.wait_ready(READY_TIMEOUT)
                times.append(ready_at - pool.spawned_at)
                if len(pool.tree_pids()) != STARTUP_WORKERS + 2:
                    bench.failures.append(
                        f"start-up: expected {STARTUP_WORKERS + 2} processes, saw {len(pool.tree_pids())}"
                    )
                stop_started = time.perf_counter()
                code = pool.stop(timeout=STOP_TIMEOUT)
                stops.append(time.perf_counter() - stop_started)
                if code != 0:
                    raise CheckFailed(f"idle pool exited with {code} after SIGTERM\n{pool.stderr_tail()}")
        finally:
            bench.forget_queue(queue)
            shutil.rmtree(workdir, ignore_errors=True)
    bench.figures["startup"] = statistics.median(times)
    bench.figures["idle stop"] = statistics.median(stops)
    bench.note("start-up s: " + ", ".join(f"{t:.3f}" for t in times))
    bench.note("idle stop s: " + ", ".join(f"{t:.3f}" for t in stops))


def measure_idle(bench: Bench) -> None:
    print(f"\n# idle pool CPU, W={WORKERS}, over {bench.settings.idle_seconds:.0f}s", flush=True)
    queue = bench.queue_name("idle")
    workdir = bench.fresh_dir("pool-idle")
    try:
        with bench.pool(workdir, queue) as pool:
            pool.wait_ready(READY_TIMEOUT)
            time.sleep(1.0)  # past the boot: the first lease renewal and orphan scan
            pids = pool.tree_pids()
            roles = {pid: figure_role(pool, pid) for pid in pids}
            cpu_before = {pid: procfs.cpu_ns(pid) for pid in pids}
            ticks_before, redis_before = procfs.cpu_ticks(pids), bench.redis_cpu_ns()
            started = time.perf_counter()
            time.sleep(bench.settings.idle_seconds)
            elapsed = time.perf_counter() - started
            by_role = Counter()
            for pid in pids:
                by_role[roles[pid]] += procfs.cpu_ns(pid) - cpu_before[pid]
            cpu = sum(by_role.values())
            ticks = procfs.cpu_ticks(pids) - ticks_before
            redis_cpu = bench.redis_cpu_ns() - redis_before
            code = pool.stop(timeout=STOP_TIMEOUT)
            if code != 0:
                raise CheckFailed(f"idle pool exited with {code} after SIGTERM\n{pool.stderr_tail()}")
    finally:
        bench.forget_queue(queue)
        shutil.rmtree(workdir, ignore_errors=True)
    percent = cpu / 1e9 / elapsed * 100
    bench.figures["idle"] = percent
    bench.note(
        f"idle pool: {percent:.3f}% of one core ({len(pids)} processes; /proc/PID/stat ticks say "
        f"{ticks / procfs.CLOCK_TICKS / elapsed * 100:.2f}%); redis-server meanwhile {redis_cpu / 1e9 / elapsed * 100:.3f}%"
    )
    bench.note("  of which " + ", ".join(f"{role} {ns / 1e9 / elapsed * 100:.3f}%" for role, ns in sorted(by_role.items())))


# ---------------------------------------------------------------- report


def machine_lines(tmp: Path) -> list[str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    redis_version = subprocess.run(
        [LocalRedis(data_dir=tmp)._binary, "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    memory_gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    redis_v = next((word.split("=")[1] for word in redis_version if word.startswith("v=")), "?")
    return [
        f"date      {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        (
            f"machine   {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {model}, "
            f"{memory_gib:.0f} GiB, Linux {platform.release()}"
        ),
        (
            f"software  Python {platform.python_version()}, OpenCV {cv2.__version__}, numpy {np.__version__}, "
            f"redis-server {redis_v}"
        ),
        f"output    {tmp} ({filesystem_of(tmp)})",
    ]


def print_header(settings: BenchSettings, tmp: Path) -> None:
    print("# image-result-worker benchmark")
    for line in machine_lines(tmp):
        print(line)
    print(f"settings  W={WORKERS}, quality {QUALITY}, rounds {settings.rounds}, tasks at 1024x1024 {settings.tasks}")
    if settings.dashboard_clients:
        print(f"dashboard beside each pool round, {settings.dashboard_clients} clients polling it every 2 s")
    others = ForeignLoad().start()
    time.sleep(1.0)
    busy = others.percent()
    print(f"load      other processes used {busy:.1f}% of the CPUs in the second before the run")
    if busy > 5:
        print("WARNING   the machine is not idle: other processes will skew every figure below")
    sys.stdout.flush()


def filesystem_of(path: Path) -> str:
    best = ("?", "?", "")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype = line.split()[:3]
            if str(path).startswith(mount.rstrip("/") + "/") and len(mount) >= len(best[2]):
                best = (device, fstype, mount)
    return f"{best[1]} on {best[0]}"


def report(bench: Bench) -> None:
    f = bench.figures
    rows: list[tuple[str, str, str, bool | None]] = []

    def row(figure: str, key: str, fmt: str, target: str, met: Callable[[float], bool] | None) -> None:
        if key in f:
            rows.append((figure, fmt.format(f[key]), target, None if met is None else met(f[key])))

    for label, target in (("1024x1024", 0.90), ("3840x2160", 0.95), ("512x512", 0.80)):
        row(
            f"pool / limit at {label}", f"ratio {label}", "{:.3f}", f"at least {target:.2f}",
            lambda v, t=target: v >= t,
        )
    for label, *_ in SIZES:
        row(
            f"CPU per task beyond the limit, {label}", f"cpu beyond {label}", "{:,.0f} us", "at most 150 us",
            lambda v: v <= 150,
        )
        row("  the same, each run's encoder CPU taken out", f"cpu beyond non-encode {label}", "{:,.0f} us", "", None)
    row("latency p50 at half load, 1024x1024", "latency p50", "{:.2f} ms", "at most 10 ms", lambda v: v <= 10)
    row("latency p99 at half load, 1024x1024", "latency p99", "{:.2f} ms", "at most 50 ms", lambda v: v <= 50)
    row("ledger records/s (batches of 256)", "ledger records/s", "{:,.0f}", "at least 20,000", lambda v: v >= 20_000)
    if "append big" in f:
        f["append ratio"] = f["append big"] / f["append small"]
        row("append at 1,000,000 / at 1,000 records", "append ratio", "{:.2f}", "at most 1.20", lambda v: v <= 1.20)
    row("worker memory gained, 3840x2160", "memory peak", "{:.2f} MB", "under 8 MB", lambda v: v < 8)
    row("  control: same with a copy of the pixels", "memory control", "{:.1f} MB", "", None)
    row(f"start-up to READY, {STARTUP_WORKERS} workers", "startup", "{:.3f} s", "under 1 s", lambda v: v < 1)
    row("idle pool CPU", "idle", "{:.3f} % of a core", "under 1 %", lambda v: v < 1)
    row(f"  SIGTERM to exit, idle pool of {STARTUP_WORKERS}", "idle stop", "{:.3f} s", "", None)

    measured = [label for label, *_ in SIZES if f"pool {label}" in f]
    if measured:
        print("\n# throughput details (medians; 'others busy' is the worst window)")
        print(
            "| size | N | limit /s | limit with fdatasync /s | pool /s | ratio | claimed before READY "
            "| stop after SIGTERM | others busy | rounds redone |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for label in measured:
            print(
                f"| {label} | {f[f'tasks {label}']:.0f} | {f[f'limit {label}']:,.1f} "
                f"| {f[f'durable limit {label}']:,.1f} | {f[f'pool {label}']:,.1f} "
                f"| {f[f'ratio {label}']:.3f} | {f[f'claimed before ready {label}']:.0f} "
                f"| {f[f'stop {label}']:.2f} s | {f[f'foreign {label}']:.0f}% | {f[f'redone {label}']:.0f} |"
            )
        print("\n# CPU per task, microseconds (pool: first claim .. last record; redis-server is not in the pool's total)")
        print(
            "| size | limit | limit with fdatasync | pool | pool - limit | encoder: limit / pool "
            "| pool - limit, encoder excluded | pool workers | ledger | supervisor "
            "| redis-server | bench's poll | whole run - limit |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")

        def us(key: str) -> str:
            return f"{f[key]:,.0f}" if key in f else "?"

        for label in measured:
            print(
                f"| {label} | {us(f'cpu limit {label}')} | {us(f'cpu durable limit {label}')} "
                f"| {us(f'cpu pool {label}')} | {us(f'cpu beyond {label}')} "
                f"| {us(f'limit encode {label}')} / {us(f'pool encode {label}')} "
                f"| {us(f'cpu beyond non-encode {label}')} | {us(f'workers cpu {label}')} "
                f"| {us(f'ledger cpu {label}')} | {us(f'supervisor cpu {label}')} "
                f"| {us(f'redis cpu {label}')} | {us(f'bench cpu {label}')} "
                f"| {us(f'cpu beyond whole {label}')} |"
            )
    widths = [max(len(r[i]) for r in rows + [("figure", "value", "target", None)]) for i in range(3)]
    print("\n# targets (issue 4)")
    header = ("figure", "value", "target", "")
    print(f"| {header[0]:<{widths[0]}} | {header[1]:>{widths[1]}} | {header[2]:<{widths[2]}} | met     |")
    print(f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 2)}|{'-' * (widths[2] + 2)}|---------|")
    for figure, value, target, met in rows:
        mark = "" if met is None else ("met" if met else "NOT MET")
        print(f"| {figure:<{widths[0]}} | {value:>{widths[1]}} | {target:<{widths[2]}} | {mark:<7} |")


# ---------------------------------------------------------------- main


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


@dataclass(frozen=True, slots=True)
class PrivateRun:
    tmp: Path
    segments: SegmentTracker
    redis_server: LocalRedis
    client: redis.Redis


@contextlib.contextmanager
def private_run(prefix: str, base: Path | None) -> Iterator[PrivateRun]:
    """A fresh temp directory, a segment tracker and a private redis-server with
    a client, all released on the way out, on Ctrl-C and SIGTERM too."""
    # SIGTERM takes the same way out as Ctrl-C: through every finally.
    signal.signal(signal.SIGTERM, _interrupt)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=base or Path(tempfile.gettempdir())))
    segments = SegmentTracker(label="bench_")  # named as the pipeline names them, which the pool accepts
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, tmp, ignore_errors=True)
        cleanup.callback(segments.cleanup)
        server = LocalRedis(data_dir=tmp / "redis")
        server.start()
        cleanup.callback(server.stop)
        client = redis.Redis.from_url(server.url)
        cleanup.callback(client.close)
        yield PrivateRun(tmp, segments, server, client)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    started = time.perf_counter()
    with private_run("irw-bench-", settings.tmp_base) as run:
        bench = Bench(settings, run.tmp, run.redis_server, run.client, run.segments)
        print_header(settings, run.tmp)
        steps = {
            "memory": measure_memory,
            "ledger": measure_ledger,
            "throughput": measure_throughput,
            "latency": measure_latency,
            "startup": measure_startup,
            "idle": measure_idle,
        }
        try:
            for name in SECTIONS:
                if name in settings.sections:
                    try:
                        steps[name](bench)
                    except (CheckFailed, PoolFailed) as exc:
                        bench.failures.append(f"{name}: {exc}")
                        print(f"  FAILED: {exc}", flush=True)
        except KeyboardInterrupt:
            print("\ninterrupted; cleaning up", file=sys.stderr)
            return 130
        report(bench)
        print(f"\nwall time {time.perf_counter() - started:.0f} s")
        if bench.failures:
            print(f"\n{len(bench.failures)} correctness check(s) FAILED:")
            for failure in bench.failures:
                print("  - " + failure.replace("\n", "\n    "))
            return 1
        print("correctness: every record, file, segment and queue checked: OK")
        return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
