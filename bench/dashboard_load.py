"""Watchers for `make bench BENCH_ARGS="--dashboard-clients 20"`: does a watched
pool go as fast as an unwatched one?

    bench round: `supervisor.py dashboard` on the round's Redis, queue and
        OUTPUT_DIR (a child of the bench, so its CPU is ours, not "foreign")
        + N threads, each a browser tab: GET /api/overview every 2 s, and the
          thumbnails the page would load
    --> the pool's images/s, compared with a run without --dashboard-clients

The dashboard shares one read of Redis per second among all its clients
(control/dashboard_data.Overview), so N clients should cost the pool what one
does: the throughput rows of the two runs should agree within their usual
spread.

Hazards handled here: the dashboard is started, and listening, before the
pool, so its start-up is not in the timed window; it is always killed (its
own session) and its threads stopped, also when the round fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
POLL_SECONDS = 2.0  # as the page does
START_TIMEOUT = 20.0


class Watchers:
    """What the clients did, for the round's report."""

    def __init__(self) -> None:
        self.requests = 0
        self.failures = 0
        self._lock = threading.Lock()

    def count(self, ok: bool) -> None:
        with self._lock:
            self.requests += 1
            self.failures += 0 if ok else 1


@contextlib.contextmanager
def dashboard_clients(
    *, redis_url: str, queue: str, output_dir: Path, clients: int, workdir: Path, env_drop: tuple[str, ...] = ()
) -> Iterator[Watchers | None]:
    """The dashboard and `clients` polling threads while the block runs; nothing when clients is 0."""
    if clients <= 0:
        yield None
        return
    workdir.mkdir(parents=True, exist_ok=True)
    env = {name: value for name, value in os.environ.items() if name not in env_drop}
    env.update(REDIS_URL=redis_url, HOSTING_TASKS_QUEUE=queue, OUTPUT_DIR=str(output_dir), LOG_FORMAT="json")
    stderr_path = workdir / "dashboard.stderr"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "supervisor.py"), "dashboard", "--port", "0"],
            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=True,
        )
    stop = threading.Event()
    watchers = Watchers()
    threads: list[threading.Thread] = []
    try:
        url = _wait_listening(proc, stderr_path)
        for number in range(clients):
            thread = threading.Thread(target=_watch, args=(url, stop, watchers, number / clients), daemon=True)
            thread.start()
            threads.append(thread)
        yield watchers
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_listening(proc: subprocess.Popen[bytes], stderr_path: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the dashboard exited with {proc.returncode}: {stderr_path.read_text()[-2000:]}")
        for line in stderr_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") == "dashboard_listening":
                    return event["url"].rstrip("/")
        time.sleep(0.05)
    raise RuntimeError(f"the dashboard did not listen within {START_TIMEOUT:.0f}s")


def _watch(url: str, stop: threading.Event, watchers: Watchers, phase: float) -> None:
    """One browser tab: the overview every POLL_SECONDS, and each new thumbnail once."""
    seen: set[str] = set()
    stop.wait(phase * POLL_SECONDS)  # tabs opened at different moments
    while not stop.is_set():
        overview = _get(url + "/api/overview", watchers)
        if overview is not None:
            for record in json.loads(overview).get("records", {}).get("items", []):
                name = record.get("thumb")
                if name and name not in seen:
                    seen.add(name)
                    _get(f"{url}/thumb?name={urllib.request.quote(name)}", watchers)
        stop.wait(POLL_SECONDS)


def _get(url: str, watchers: Watchers) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
    except OSError:
        watchers.count(False)
        return None
    watchers.count(True)
    return body
