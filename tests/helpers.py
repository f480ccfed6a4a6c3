"""Helpers for tests that drive the real pool: photos, shared memory, HTTP, processes.

Everything here talks to real things (a private redis-server, POSIX shared memory in
/dev/shm, a loopback HTTP server, `python supervisor.py` in its own session); the
fixtures in conftest.py own their lifetimes so a failing test leaves nothing behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import redis

from image_result_client.producer import write_segment
from image_result_client.protocol import RESULTS_NAME, awaiting_publication
from shared.redis_queue import QueueKeys
from shared.segments import SHM_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent

# Settings the pool reads from its environment; a developer's shell or a systemd
# session must not leak any of them into a test.
POOL_ENV_VARS = (
    "REDIS_URL", "HOSTING_TASKS_QUEUE", "OUTPUT_DIR", "JPEG_QUALITY", "LOG_LEVEL",
    "LOG_FORMAT", "WORKERS", "SHUTDOWN_GRACE", "UNLINK_SHM", "MAX_ATTEMPTS",
    "TASK_TIMEOUT", "DEAD_LETTER_MAX", "MAX_MESSAGE_BYTES", "MAX_PIXELS",
    "URL_CONNECT_TIMEOUT", "URL_READ_TIMEOUT", "URL_MAX_BYTES", "URL_MAX_REDIRECTS",
    "LEASE_TTL", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
    "LISTEN_PID", "LISTEN_FDNAMES",
)


# ---------------------------------------------------------------- photos


def skimage_data_dir() -> Path:
    # find_spec locates the package without paying for its import.
    spec = importlib.util.find_spec("skimage")
    assert spec is not None and spec.origin is not None, "scikit-image is not installed"
    return Path(spec.origin).parent / "data"


@lru_cache(maxsize=None)
def _read_photo(name: str) -> np.ndarray:
    path = skimage_data_dir() / name
    flags = cv2.IMREAD_GRAYSCALE if name == "camera.png" else cv2.IMREAD_COLOR
    image = cv2.imread(str(path), flags)
    assert image is not None, f"cv2 could not read {path}"
    image.flags.writeable = False  # shared by every caller; copy before changing
    return image


def load_photos() -> dict[str, np.ndarray]:
    """Real photos, BGR uint8 (camera is 2-D grayscale); read-only arrays."""
    return {
        "astronaut": _read_photo("astronaut.png"),
        "chelsea": _read_photo("chelsea.png"),
        "coffee": _read_photo("coffee.png"),
        "camera": _read_photo("camera.png"),
    }


def photo_of_size(height: int, width: int) -> np.ndarray:
    """A writable BGR uint8 photo of any size, resized from astronaut and coffee side by side."""
    astronaut = _read_photo("astronaut.png")
    coffee = _read_photo("coffee.png")
    coffee = cv2.resize(coffee, (coffee.shape[1] * astronaut.shape[0] // coffee.shape[0], astronaut.shape[0]))
    mosaic = np.hstack([astronaut, coffee])
    shrinking = height * width < mosaic.shape[0] * mosaic.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    return cv2.resize(mosaic, (width, height), interpolation=interpolation)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for 8-bit images; inf when identical."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if mse == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(255.0**2 / mse))


# ---------------------------------------------------------------- shared memory

_created_segments: set[str] = set()


def make_segment(array: np.ndarray) -> str:
    """Create a POSIX segment holding array, the way producers do; returns its name."""
    name = "img_shm_" + uuid.uuid4().hex
    write_segment(name, array)
    _created_segments.add(name)
    return name


def segment_exists(name: str) -> bool:
    return (SHM_DIR / name.lstrip("/")).exists()


def unlink_segment(name: str) -> None:
    """Remove a segment if it is still there."""
    try:
        os.unlink(SHM_DIR / name.lstrip("/"))
    except FileNotFoundError:
        pass


def read_segment(name: str, shape: Iterable[int], dtype: str | np.dtype) -> np.ndarray:
    """Copy a segment's contents without attaching SharedMemory (which, on 3.11,
    would register it with our resource tracker and unlink it at exit)."""
    data = (SHM_DIR / name.lstrip("/")).read_bytes()
    count = int(np.prod(tuple(shape)))
    return np.frombuffer(data, dtype=dtype, count=count).reshape(tuple(shape)).copy()


def created_segments() -> set[str]:
    """Names made by make_segment in this process that have not been forgotten."""
    return set(_created_segments)


def forget_segments(names: Iterable[str]) -> None:
    _created_segments.difference_update(names)


def shm_message(request_id: str, image_id: str, array: np.ndarray) -> dict[str, Any]:
    """A seed message for array, with its segment already created."""
    return {
        "request_id": request_id,
        "image_id": image_id,
        "shm_info": {
            "shm_name": make_segment(array),
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "size": int(array.nbytes),
        },
    }


class SegmentTracker:
    """The segments made during one test; cleanup() unlinks whatever is left."""

    def __init__(self) -> None:
        self._before = created_segments()

    @property
    def names(self) -> set[str]:
        return created_segments() - self._before

    def make(self, array: np.ndarray) -> str:
        return make_segment(array)

    def message(self, request_id: str, image_id: str, array: np.ndarray) -> dict[str, Any]:
        return shm_message(request_id, image_id, array)

    def leftovers(self) -> list[str]:
        """Names still present in /dev/shm (the worker did not unlink them)."""
        return sorted(name for name in self.names if segment_exists(name))

    def cleanup(self) -> None:
        names = self.names
        for name in names:
            unlink_segment(name)
        forget_segments(names)


# ---------------------------------------------------------------- Redis and results


def push(client: redis.Redis, queue: str, message: Mapping[str, Any] | list[Any] | str | bytes) -> int:
    """RPUSH a message (dicts and lists as JSON, str/bytes as given); returns the list length."""
    payload = message if isinstance(message, (str, bytes)) else json.dumps(message)
    return int(client.rpush(queue, payload))


def dead_letters(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The JSON entries of '{queue}:dead', oldest first."""
    return [json.loads(raw) for raw in client.lrange(QueueKeys(queue).dead, 0, -1)]


def read_results(output_dir: Path, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Parse OUTPUT_DIR/results.json; [] when missing.

    Retries while the ledger is mid-write and a reader sees a torn tail.
    """
    path = Path(output_dir) / RESULTS_NAME
    deadline = time.monotonic() + timeout
    while True:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            records = json.loads(raw)  # ValueError covers a torn UTF-8 sequence too
        except ValueError as exc:
            if time.monotonic() >= deadline:
                raise AssertionError(f"{path} stayed unparsable for {timeout}s: {exc}; tail: {raw[-200:]!r}") from exc
            time.sleep(0.02)
            continue
        assert isinstance(records, list), f"{path} holds {type(records).__name__}, not a JSON array"
        return records


def wait_for_records(
    output_dir: Path, count: int, timeout: float = 60.0, *, pool: Pool | None = None
) -> list[dict[str, Any]]:
    """Poll results.json until it holds at least count records, and every
    completed one's JPEG has its final name (docs/formats.md); returns them all.

    With pool given, fails at once (with its stderr tail) if the pool exits.
    """
    deadline = time.monotonic() + timeout
    records: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        records = read_results(output_dir)
        if len(records) >= count and not any(awaiting_publication(Path(output_dir), r) for r in records):
            return records
        if pool is not None and pool.poll() is not None:
            raise AssertionError(
                f"pool exited with {pool.poll()} after {len(records)} of {count} records\n{pool.stderr_tail()}"
            )
        time.sleep(0.1)
    seen = f"; the pool: {pool.describe()}" if pool is not None else ""
    raise AssertionError(
        f"saw {len(records)} of {count} records in {Path(output_dir) / RESULTS_NAME} after {timeout}s{seen}"
    )


def wait_for_queue_drained(client: redis.Redis, queue: str, timeout: float = 30.0) -> None:
    """Poll until the queue and every processing list of it are empty: the
    redeliveries after a crash have been taken and acknowledged, not only the
    records written."""
    prefix = QueueKeys(queue).prefix

    def lists() -> dict[str, int]:
        return {key.decode(): client.llen(key) for key in [queue.encode(), *client.keys(f"{prefix}:processing:*")]}

    try:
        wait_until(lambda: not any(lists().values()), timeout, "")
    except AssertionError:
        held = {key: n for key, n in lists().items() if n}
        raise AssertionError(f"after {timeout}s these lists of {queue} still hold tasks: {held}") from None


def wait_until(predicate: Callable[[], Any], timeout: float, message: str, interval: float = 0.05) -> Any:
    """Poll until predicate() is truthy and return its value; AssertionError(message) on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{message} (waited {timeout}s)")


# ---------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class _Route:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    trickle_chunk: bytes | None = None
    trickle_interval: float = 0.5


class _Handler(BaseHTTPRequestHandler):
    server: HttpServer._Server

    def do_GET(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler naming
        owner = self.server.owner
        owner._record(self.path)
        route = owner._route_for(self.path)
        if route is None:
            self._send(404, b"not found\n", [("Content-Type", "text/plain")])
        elif route.trickle_chunk is not None:
            self._trickle(route)
        else:
            self._send(route.status, route.body, list(route.headers))

    def _send(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _trickle(self, route: _Route) -> None:
        self.send_response(route.status)
        for name, value in route.headers:
            self.send_header(name, value)
        self.end_headers()
        stopping = self.server.owner._stopping
        # Waiting on the stop event rather than sleeping lets shutdown end us at once.
        while not stopping.is_set():
            try:
                self.wfile.write(route.trickle_chunk or b"x")
                self.wfile.flush()
            except OSError:
                return  # the client gave up, which is what a timeout test wants
            stopping.wait(route.trickle_interval)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - inherited name
        pass


class HttpServer:
    """A loopback HTTP server whose routes a test fills in; unknown paths 404."""

    class _Server(ThreadingHTTPServer):
        daemon_threads = True  # a trickling handler must never block interpreter exit
        owner: HttpServer

        def handle_error(self, request: Any, client_address: Any) -> None:
            # Clients that hang up mid-response are the point of several tests.
            if not isinstance(sys.exc_info()[1], OSError):
                super().handle_error(request, client_address)

    def __init__(self) -> None:
        self._routes: dict[str, _Route] = {}
        self._lock = threading.Lock()
        self._requests: list[str] = []
        self._stopping = threading.Event()
        self._server = self._Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="http-server", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> HttpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def add(
        self,
        path: str,
        body: bytes,
        status: int = 200,
        content_type: str = "image/jpeg",
        headers: Mapping[str, str | None] | None = None,
    ) -> str:
        """Serve body at path; a header given as None is left out (e.g. Content-Length)."""
        defaults = {"Content-Type": content_type, "Content-Length": str(len(body))}
        self._set(path, _Route(status, body, _merge_headers(defaults, headers)))
        return self.url(path)

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        self._set(path, _Route(status, b"", (("Location", location), ("Content-Length", "0"))))
        return self.url(path)

    def trickle(
        self,
        path: str,
        chunk: bytes = b"x",
        interval: float = 0.5,
        headers: Mapping[str, str | None] | None = None,
    ) -> str:
        """Send headers, then chunk every interval until the client leaves or we stop."""
        defaults = {"Content-Type": "image/jpeg", "Content-Length": str(10 * 1024 * 1024)}
        route = _Route(200, b"", _merge_headers(defaults, headers), chunk, interval)
        self._set(path, route)
        return self.url(path)

    def hits(self, path: str) -> int:
        """How many GET requests reached path (query string included if given)."""
        with self._lock:
            return sum(1 for seen in self._requests if seen == path or seen.split("?", 1)[0] == path)

    def _set(self, path: str, route: _Route) -> None:
        with self._lock:
            self._routes[path] = route

    def _record(self, path: str) -> None:
        with self._lock:
            self._requests.append(path)

    def _route_for(self, path: str) -> _Route | None:
        with self._lock:
            return self._routes.get(path) or self._routes.get(path.split("?", 1)[0])


def _merge_headers(defaults: Mapping[str, str], overrides: Mapping[str, str | None] | None) -> tuple[tuple[str, str], ...]:
    merged: dict[str, tuple[str, str | None]] = {name.lower(): (name, value) for name, value in defaults.items()}
    for name, value in (overrides or {}).items():
        merged[name.lower()] = (name, value)
    return tuple((name, value) for name, value in merged.values() if value is not None)


# ---------------------------------------------------------------- the pool process


def _proc_stat_fields(pid: int) -> list[str] | None:
    # Fields after "(comm)": comm may itself hold spaces and parentheses.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def _all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def pid_alive(pid: int) -> bool:
    """True unless pid is gone or a zombie (orphans may wait a while for init to reap them)."""
    fields = _proc_stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def _session_members(sid: int) -> list[int]:
    members = []
    for pid in _all_pids():
        fields = _proc_stat_fields(pid)
        # fields: state, ppid, pgrp, session, ...
        if fields is not None and fields[0] != "Z" and int(fields[3]) == sid:
            members.append(pid)
    return members


@dataclass
class Pool:
    """`python supervisor.py` in its own session, with its logs and sd_notify datagrams."""

    workdir: Path
    output_dir: Path
    redis_url: str
    queue: str
    workers: int | None = 2
    env: Mapping[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    script: str = "supervisor.py"
    cwd: Path | None = None  # where it runs, and so which .env it reads; default the repo
    python: str = sys.executable  # another install's interpreter (make install's venv)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _datagrams: list[str] = field(default_factory=list, init=False)
    _notify: socket.socket | None = field(default=None, init=False)
    _notify_dir: Path | None = field(default=None, init=False)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "pool not started"
        return self.proc.pid

    @property
    def stdout_path(self) -> Path:
        return self.workdir / "pool.stdout"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "pool.stderr"

    @property
    def notify_path(self) -> Path:
        assert self._notify_dir is not None, "pool not started"
        return self._notify_dir / "notify.sock"

    def start(self) -> Pool:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._open_notify_socket()
        command = [self.python, str(REPO_ROOT / self.script), *self._worker_args(), *self.args]
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                command,
                cwd=self.cwd or REPO_ROOT,
                env=self._child_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                # Its own session: signals we send reach only the pool, Ctrl-C on
                # pytest does not, and teardown can find every descendant by sid.
                start_new_session=True,
            )
        return self

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def send_signal(self, sig: int) -> None:
        """Signal the supervisor only, as systemd's KillMode=mixed does first."""
        os.kill(self.pid, sig)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for a READY=1 datagram; fail with the stderr tail if the pool exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any("READY=1" in datagram.splitlines() for datagram in self.notifications()):
                return
            if self.poll() is not None:
                raise AssertionError(f"pool exited with {self.poll()} before READY=1\n{self.stderr_tail()}")
            self._receive(timeout=0.1)
        raise AssertionError(f"no READY=1 within {timeout}s\n{self.stderr_tail()}")

    def notifications(self) -> list[str]:
        """Every datagram received so far, decoded, oldest first."""
        self._receive(timeout=0)
        return list(self._datagrams)

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the supervisor to exit by itself; returns its exit code."""
        assert self.proc is not None, "pool not started"
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"pool still running after {timeout}s\n{self.stderr_tail()}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send sig to the supervisor and wait for it; returns its exit code
        (negative for a signal death). Kills everything and fails on timeout."""
        if self.poll() is None:
            self.send_signal(sig)
        return self.wait_exit(timeout)

    def child_pids(self) -> list[int]:
        """Live processes whose parent is the supervisor."""
        children = []
        for pid in _all_pids():
            fields = _proc_stat_fields(pid)
            if fields is not None and fields[0] != "Z" and int(fields[1]) == self.pid:
                children.append(pid)
        return sorted(children)

    def children_by_title(self) -> dict[int, str]:
        """pid -> /proc/PID/cmdline as text (shows what setproctitle set)."""
        titles = {}
        for pid in self.child_pids():
            try:
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue  # exited between listing and reading
            titles[pid] = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        return titles

    def session_pids(self) -> list[int]:
        """Every live process in the pool's session (the supervisor and all descendants)."""
        return _session_members(self.pid)

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr_tail(self, lines: int = 40) -> str:
        return "--- pool stderr (tail) ---\n" + "\n".join(self.stderr_text().splitlines()[-lines:])

    def log_lines(self) -> list[dict[str, Any]]:
        """JSON log lines from stderr, skipping anything that is not a JSON object."""
        lines = []
        for line in self.stderr_text().splitlines():
            try:
                parsed = json.loads(line)
            except ValueError:
                continue
            if isinstance(parsed, dict):
                lines.append(parsed)
        return lines

    def events(self, name: str) -> list[dict[str, Any]]:
        """Log lines whose "event" is name."""
        return [line for line in self.log_lines() if line.get("event") == name]

    def describe(self) -> str:
        """What a wait that timed out saw: where the tasks are in Redis, and the
        children's deaths and requeues the log tells of."""
        keys = QueueKeys(self.queue)
        try:
            client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
            with client:
                in_flight = {key.decode().rsplit(":", 1)[-1]: client.llen(key) for key in client.smembers(keys.registry)}
                per_list = ", ".join(f"{worker}: {n}" for worker, n in in_flight.items()) or "no lists"
                where = (
                    f"queue {client.llen(keys.queue)}, in flight {sum(in_flight.values())} ({per_list}), "
                    f"delayed {client.zcard(keys.delayed)}, dead {client.llen(keys.dead)}"
                )
        except redis.exceptions.RedisError as exc:
            where = f"Redis unreadable ({exc})"
        lines = self.log_lines()
        deaths = [f"{e.get('role')} {e.get('slot')}: {e.get('cause')}" for e in lines if e.get("event") == "child_died"]
        requeued = sum(e.get("tasks", 0) for e in lines if e.get("event") == "tasks_requeued")
        return (
            f"{where}; {len(deaths)} children died ({'; '.join(deaths[-3:]) or 'none'}); "
            f"{requeued} tasks requeued; exit code {self.poll()}"
        )

    def kill_all(self, timeout: float = 10.0) -> None:
        """SIGKILL the whole session and reap; safe to call at any time, repeatedly."""
        if self.proc is not None:
            self._kill_session()
            self.proc.wait(timeout=timeout)
            # Orphans are reaped by init, not us: wait until they are gone.
            deadline = time.monotonic() + timeout
            while self.session_pids() and time.monotonic() < deadline:
                self._kill_session()
                time.sleep(0.05)
        self._close_notify_socket()

    def _kill_session(self) -> None:
        # killpg covers the process group; the session scan also catches
        # descendants that moved to a group of their own.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in _session_members(self.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _worker_args(self) -> list[str]:
        return [] if self.workers is None else ["--workers", str(self.workers)]

    def _child_env(self) -> dict[str, str]:
        env = {name: value for name, value in os.environ.items() if name not in POOL_ENV_VARS}
        env.update(
            REDIS_URL=self.redis_url,
            HOSTING_TASKS_QUEUE=self.queue,
            OUTPUT_DIR=str(self.output_dir),
            LOG_FORMAT="json",
            LOG_LEVEL="INFO",
            NOTIFY_SOCKET=str(self.notify_path),
            PYTHONUNBUFFERED="1",
            URL_ALLOW_LOOPBACK="true",  # the tests' HTTP servers listen on 127.0.0.1
        )
        env.update(self.env)
        return env

    def _open_notify_socket(self) -> None:
        # AF_UNIX paths are capped at 107 bytes; pytest's tmp paths can be longer.
        self._notify_dir = self.workdir
        if len(str(self.notify_path)) > 100:
            self._notify_dir = Path(tempfile.mkdtemp(prefix="pool-notify-"))
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(self.notify_path))
        self._notify.setblocking(False)

    def _close_notify_socket(self) -> None:
        if self._notify is None:
            return
        self._receive(timeout=0)
        self._notify.close()
        self._notify = None
        self.notify_path.unlink(missing_ok=True)
        if self._notify_dir != self.workdir:
            self._notify_dir.rmdir()  # type: ignore[union-attr]

    def _receive(self, timeout: float) -> None:
        if self._notify is None:
            return
        readable, _, _ = select.select([self._notify], [], [], timeout)
        while readable:
            try:
                self._datagrams.append(self._notify.recv(65536).decode(errors="replace"))
            except BlockingIOError:
                return


# ---------------------------------------------------------------- shared by several test modules


def push_photos(client: redis.Redis, queue: str, segments, count: int, *, size: tuple[int, int]) -> list[str]:
    """Push `count` SHM tasks of a real photo; returns their request ids."""
    frame = photo_of_size(*size)
    request_ids = []
    for index in range(count):
        request_id = f"req_{index:04d}"
        push(client, queue, segments.message(request_id, f"image_{index:04d}", frame))
        request_ids.append(request_id)
    return request_ids


def worker_pids(pool: Pool) -> list[int]:
    # Titles are "image-result-worker: worker N" and "image-result-worker: ledger".
    return [pid for pid, title in pool.children_by_title().items() if ": worker " in title]


def assert_exactly_once(output_dir: Path, request_ids: list[str], client: redis.Redis, queue: str) -> list[dict]:
    """One record per task, one file per completed record, no leftovers anywhere."""
    records = read_results(output_dir)
    counts = Counter(record["request_id"] for record in records)
    assert sorted(counts) == sorted(request_ids), "a task is missing from results.json"
    assert max(counts.values()) == 1, f"doubled: {[k for k, v in counts.items() if v > 1]}"
    files = sorted(p.name for p in output_dir.glob("*.jpg"))
    recorded = sorted(Path(r["file_path"]).name for r in records if r["status"] == "completed")
    assert files == recorded, "files on disk and completed records differ"
    assert list((output_dir / ".partial").iterdir()) == [], "stray partial files"
    assert client.llen(queue) == 0
    for key in client.keys(f"{QueueKeys(queue).prefix}:processing:*"):
        assert client.llen(key) == 0, f"{key!r} still holds tasks"
    return records


def operator_env(*, redis_url: str, queue: str, output_dir: Path) -> dict[str, str]:
    """The environment of an operator's command: only these settings."""
    env = {k: v for k, v in os.environ.items() if k not in POOL_ENV_VARS}
    env.update(REDIS_URL=redis_url, HOSTING_TASKS_QUEUE=queue, OUTPUT_DIR=str(output_dir))
    return env


def operator_command(*args: str, redis_url: str, queue: str, output_dir: Path) -> subprocess.CompletedProcess:
    """`python supervisor.py ARGS` as an operator runs it, with only these settings from the environment."""
    env = operator_env(redis_url=redis_url, queue=queue, output_dir=output_dir)
    return subprocess.run(
        [sys.executable, "supervisor.py", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30
    )


def command(pool: Pool, *args: str, redis_url: str | None = None) -> subprocess.CompletedProcess:
    return operator_command(*args, redis_url=redis_url or pool.redis_url, queue=pool.queue, output_dir=pool.output_dir)
