"""`make demo`: the whole pipeline on this machine, in about ten seconds.

    private redis-server (free port, temp dir)      loopback HTTP server (one photo)
                 \\                                    /
    image_result_client.Producer --RPUSH--> queue "demo" --> python supervisor.py --workers 2
        5 photos through /dev/shm, 1 URL               --> output/demo/*.jpg, results.json
                 \\__________ wait(): progress bar until every record is there

It never touches a Redis it did not start (6379 included) and needs nothing
running beforehand. Hazards handled here:
- Everything started is stopped in `finally`, in reverse order, also on Ctrl-C
  or SIGTERM (turned into SystemExit so the `finally` runs): the pool and Redis
  run in sessions of their own and would otherwise outlive us.
- The pool gets SIGTERM (drain, exit 0); if it does not exit in time, its whole
  session is SIGKILLed.
- Segments the pool did not consume (it failed to start, say) are unlinked.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as `python tools/demo.py`: make the repo importable

import redis

from harness import PoolFailed
from harness.http_server import HttpServer
from harness.photos import read_photo, skimage_data_dir
from harness.pool import Pool
from image_result_client.__main__ import ProgressBar, record_line
from image_result_client.producer import Producer, Submission, WaitTimeout, unlink_segment
from tools.local_redis import LocalRedis

QUEUE = "demo"
WORKERS = 2
OUTPUT_DIR = REPO / "output" / "demo"
SHM_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "camera.png", "rocket.jpg")
URL_PHOTO, URL_PHOTO_TYPE = "motorcycle_left.png", "image/png"
READY_TIMEOUT = 30.0
WAIT_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# The pool's settings that the demo decides, beside the harness's (Redis, queue,
# OUTPUT_DIR, JSON logs, loopback URLs allowed); every other one comes from the
# environment or .env as usual.
POOL_SETTINGS = {
    "UNLINK_SHM": "true",
    "URL_ALLOWED_HOSTS": "",  # a .env allowlist must not refuse our loopback server
}


class DemoError(Exception):
    """Something the demo needs did not work; the message says what."""


def say(message: str) -> None:
    print(f"demo: {message}", flush=True)


def stop_pool(pool: Pool) -> None:
    """SIGTERM (drain, exit 0); past STOP_TIMEOUT the harness SIGKILLs its whole session."""
    if pool.proc is None:
        return  # it never started
    try:
        code = pool.stop(timeout=STOP_TIMEOUT)
    except PoolFailed:
        code = pool.poll()
    say(f"stopped the pool (exit {code})")


def stop_on_sigterm() -> None:
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def ignore_interrupts() -> None:
    """Cleanup is bounded (STOP_TIMEOUT); a second Ctrl-C must not cut it short."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def run_demo(run_dir: Path, stack: ExitStack) -> int:
    """Start each piece, registering its stop on `stack` (run in reverse order)."""
    data = skimage_data_dir()
    redis_server = LocalRedis(data_dir=run_dir / "redis")
    # Each stop is registered before its start: a signal in between must not leak a process.
    stack.callback(say, "stopped Redis")
    stack.callback(redis_server.stop)
    redis_server.start()
    say(f"started a private Redis at {redis_server.url} (data in {run_dir})")

    photo_server = HttpServer().start()
    stack.callback(photo_server.stop)
    photo_url = photo_server.add("/" + URL_PHOTO, (data / URL_PHOTO).read_bytes(), content_type=URL_PHOTO_TYPE)
    say(f"serving {URL_PHOTO} at {photo_url}")

    submissions: list[Submission] = []
    # Runs after the pool has stopped: unlink what it did not consume (nothing, after a clean run).
    stack.callback(unlink_unconsumed, submissions)
    pool = Pool(
        workdir=run_dir, output_dir=OUTPUT_DIR, redis_url=redis_server.url, queue=QUEUE, workers=WORKERS,
        env=POOL_SETTINGS, inherit_settings=True,
    )
    stack.callback(pool.kill_all)  # whatever stop_pool left, and the notify socket
    stack.callback(stop_pool, pool)
    pool.start()
    pool.wait_ready(READY_TIMEOUT)
    say(f"pool ready: {WORKERS} workers on queue {QUEUE!r}, OUTPUT_DIR={OUTPUT_DIR}")

    producer = stack.enter_context(Producer.from_url(redis_server.url, queue=QUEUE))
    for name in SHM_PHOTOS:
        frame = read_photo(name)
        submission = producer.submit_array(frame, image_id=Path(name).stem)
        submissions.append(submission)
        shape = "x".join(map(str, frame.shape))
        say(f"queued {name:<14} {shape:<9} {frame.dtype} through /dev/shm/{submission.segment}")
    submissions.append(producer.submit_url(photo_url, image_id=Path(URL_PHOTO).stem))
    say(f"queued {URL_PHOTO} by URL")

    bar = ProgressBar(len(submissions), stream=sys.stdout)
    try:
        records = producer.wait(submissions, output_dir=OUTPUT_DIR, timeout=WAIT_TIMEOUT, on_progress=bar.on_progress)
    except WaitTimeout as exc:
        bar.finish()
        raise DemoError(f"{exc}\n{pool.stderr_tail()}") from None
    bar.finish()
    for record in records:
        print(record_line(record))
    completed = [r for r in records if r.get("status") == "completed"]
    say(f"{len(completed)} of {len(records)} JPEGs are in {OUTPUT_DIR}/")
    say(f"their records are in {OUTPUT_DIR / 'results.json'} (one JSON record per line)")
    return 0 if len(completed) == len(records) else 1


def unlink_unconsumed(submissions: list[Submission]) -> None:
    for submission in submissions:
        if submission.segment and unlink_segment(submission.segment):
            say(f"unlinked {submission.segment}, which the pool did not consume")


def main() -> int:
    stop_on_sigterm()
    try:
        with ExitStack() as stack:
            run_dir = Path(tempfile.mkdtemp(prefix="irw-demo-"))
            stack.callback(shutil.rmtree, run_dir, ignore_errors=True)
            try:
                return run_demo(run_dir, stack)
            finally:
                ignore_interrupts()  # before the stack unwinds: cleanup is bounded, let it finish
    # RuntimeError: Redis could not start, or no photos; PoolFailed: the pool did not start or stop.
    except (DemoError, PoolFailed, RuntimeError, redis.RedisError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted; cleaned up", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
