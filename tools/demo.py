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

import importlib.util
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as `python tools/demo.py`: make the repo importable

import cv2
import redis

from image_result_client.__main__ import ProgressBar, record_line
from image_result_client.producer import Producer, Submission, WaitTimeout, unlink_segment
from tools.local_redis import LocalRedis

QUEUE = "demo"
WORKERS = 2
OUTPUT_DIR = REPO / "output" / "demo"
SHM_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "camera.png", "rocket.jpg")
URL_PHOTO = "motorcycle_left.png"
READY_TIMEOUT = 30.0
WAIT_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# The pool's settings that the demo decides; every other one comes from the
# environment or .env as usual.
POOL_ENV = {
    "HOSTING_TASKS_QUEUE": QUEUE,
    "OUTPUT_DIR": str(OUTPUT_DIR),
    "LOG_FORMAT": "json",
    "UNLINK_SHM": "true",
    "URL_ALLOWED_HOSTS": "",  # a .env allowlist must not refuse our loopback server
    "URL_ALLOW_LOOPBACK": "true",  # which the pool refuses by default
    "PYTHONUNBUFFERED": "1",
}


class DemoError(Exception):
    """Something the demo needs did not work; the message says what."""


def say(message: str) -> None:
    print(f"demo: {message}", flush=True)


def skimage_data_dir() -> Path:
    # find_spec finds the photos without paying for scikit-image's import.
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise DemoError("scikit-image is not installed (make demo installs requirements-dev.txt)")
    return Path(spec.origin).parent / "data"


def read_photo(path: Path):
    flags = cv2.IMREAD_GRAYSCALE if path.name == "camera.png" else cv2.IMREAD_COLOR
    frame = cv2.imread(str(path), flags)
    if frame is None:
        raise DemoError(f"cannot read {path}")
    return frame


class PhotoServer:
    """One file on http://127.0.0.1:<free port>/<name>, from a daemon thread."""

    def __init__(self, path: Path) -> None:
        body, route = path.read_bytes(), "/" + path.name
        content_type = "image/png" if path.suffix == ".png" else "image/jpeg"

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                found = self.path == route
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", content_type if found else "text/plain")
                self.send_header("Content-Length", str(len(body) if found else 0))
                self.end_headers()
                if found:
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="photo-server", daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}{route}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class DemoPool:
    """`python supervisor.py` in its own session, with a notify socket we own."""

    def __init__(self, *, redis_url: str, run_dir: Path) -> None:
        self.redis_url = redis_url
        self.log_path = run_dir / "pool.log"
        self.notify_path = run_dir / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.notify.bind(str(self.notify_path))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WATCHDOG_", "LISTEN_"))}
        env.update(POOL_ENV, REDIS_URL=self.redis_url, NOTIFY_SOCKET=str(self.notify_path))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "supervisor.py", "--workers", str(WORKERS)],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # our Ctrl-C must not reach it: we stop it ourselves, in order
            )

    def wait_ready(self, timeout: float) -> None:
        assert self.proc is not None, "pool not started"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoError(f"the pool exited with {self.proc.returncode} before READY=1\n{self.log_tail()}")
            readable, _, _ = select.select([self.notify], [], [], 0.1)
            if readable and "READY=1" in self.notify.recv(65536).decode(errors="replace").splitlines():
                return
        raise DemoError(f"the pool sent no READY=1 within {timeout:g}s\n{self.log_tail()}")

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, then SIGKILL to the whole session; returns the exit code."""
        self.notify.close()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: pgid == pid
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "--- pool log (tail) ---\n" + "\n".join(text.splitlines()[-lines:])


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

    photo_server = PhotoServer(data / URL_PHOTO)
    stack.callback(photo_server.stop)
    say(f"serving {URL_PHOTO} at {photo_server.url}")

    submissions: list[Submission] = []
    # Runs after the pool has stopped: unlink what it did not consume (nothing, after a clean run).
    stack.callback(unlink_unconsumed, submissions)
    pool = DemoPool(redis_url=redis_server.url, run_dir=run_dir)
    stack.callback(lambda: say(f"stopped the pool (exit {pool.stop(STOP_TIMEOUT)})"))
    pool.start()
    pool.wait_ready(READY_TIMEOUT)
    say(f"pool ready: {WORKERS} workers on queue {QUEUE!r}, OUTPUT_DIR={OUTPUT_DIR}")

    producer = stack.enter_context(Producer.from_url(redis_server.url, queue=QUEUE))
    for name in SHM_PHOTOS:
        frame = read_photo(data / name)
        submission = producer.submit_array(frame, image_id=Path(name).stem)
        submissions.append(submission)
        shape = "x".join(map(str, frame.shape))
        say(f"queued {name:<14} {shape:<9} {frame.dtype} through /dev/shm/{submission.segment}")
    submissions.append(producer.submit_url(photo_server.url, image_id=Path(URL_PHOTO).stem))
    say(f"queued {URL_PHOTO} by URL")

    bar = ProgressBar(len(submissions), stream=sys.stdout)
    try:
        records = producer.wait(submissions, output_dir=OUTPUT_DIR, timeout=WAIT_TIMEOUT, on_progress=bar.on_progress)
    except WaitTimeout as exc:
        bar.finish()
        raise DemoError(f"{exc}\n{pool.log_tail()}") from None
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
    except (DemoError, RuntimeError, redis.RedisError) as exc:  # RuntimeError: Redis could not start
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted; cleaned up", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
