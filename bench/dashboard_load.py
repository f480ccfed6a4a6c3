"""Watchers for `make bench BENCH_ARGS="--dashboard-clients 20"`: does a watched
pool go as fast as an unwatched one?

    bench round: `supervisor.py dashboard` on the round's Redis, queue and
        OUTPUT_DIR (a child of the bench, so its CPU is ours, not "foreign")
        + N threads in a child process of their own, each a browser tab: GET
          /api/overview every 2 s, and the thumbnails the page would load
    --> the pool's images/s, compared with a run without --dashboard-clients

The tabs stand for browsers on operators' machines, not on the pool's host:
their process runs at SCHED_IDLE, so that what is measured is what the
dashboard costs the pool's host, not what 20 browsers would. (As threads of
the bench itself they also took the GIL from the bench's poll of results.json,
which then saw the last record late.)

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
import multiprocessing
import multiprocessing.process
import multiprocessing.synchronize
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path

from harness import REPO_ROOT
from harness.pool import environment_without

POLL_SECONDS = 2.0  # as the page does
START_TIMEOUT = 20.0


class Watchers:
    """What the clients did, for the round's report; counted across processes."""

    def __init__(self) -> None:
        self._requests = multiprocessing.Value("q", 0)
        self._failures = multiprocessing.Value("q", 0)

    @property
    def requests(self) -> int:
        return self._requests.value

    @property
    def failures(self) -> int:
        return self._failures.value

    def count(self, ok: bool) -> None:
        with self._requests.get_lock():
            self._requests.value += 1
        if not ok:
            with self._failures.get_lock():
                self._failures.value += 1


@contextlib.contextmanager
def dashboard_clients(
    *, redis_url: str, queue: str, output_dir: Path, clients: int, workdir: Path
) -> Iterator[Watchers | None]:
    """The dashboard and `clients` polling threads while the block runs; nothing when clients is 0."""
    if clients <= 0:
        yield None
        return
    workdir.mkdir(parents=True, exist_ok=True)
    env = environment_without()  # none of the caller's pool settings
    env.update(REDIS_URL=redis_url, HOSTING_TASKS_QUEUE=queue, OUTPUT_DIR=str(output_dir), LOG_FORMAT="json")
    stderr_path = workdir / "dashboard.stderr"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "supervisor.py"), "dashboard", "--port", "0"],
            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=True,
        )
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    watchers = Watchers()
    browsers: multiprocessing.process.BaseProcess | None = None
    try:
        url = _wait_listening(proc, stderr_path)
        browsers = context.Process(target=_browsers, args=(url, clients, stop, watchers), daemon=True)
        browsers.start()
        yield watchers
    finally:
        stop.set()
        if browsers is not None:
            browsers.join(timeout=15)
            if browsers.is_alive():
                browsers.kill()
                browsers.join()
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


def _browsers(url: str, clients: int, stop: multiprocessing.synchronize.Event, watchers: Watchers) -> None:
    """The child process of the tabs, at SCHED_IDLE (see the module's docstring)."""
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tabs = [
        threading.Thread(target=_watch, args=(url, stop, watchers, number / clients), daemon=True)
        for number in range(clients)
    ]
    for tab in tabs:
        tab.start()
    for tab in tabs:
        tab.join()


def _watch(url: str, stop: multiprocessing.synchronize.Event, watchers: Watchers, phase: float) -> None:
    """One browser tab: the overview every POLL_SECONDS, and each new thumbnail once."""
    seen: set[str] = set()
    stop.wait(phase * POLL_SECONDS)  # tabs opened at different moments
    while not stop.is_set():
        overview = _get(url + "/api/overview", watchers)
        if overview is not None:
            for record in json.loads(overview).get("records", {}).get("items", []):
                name = record.get("thumb")
                if name and name not in seen and _get(f"{url}/thumb?name={urllib.request.quote(name)}", watchers):
                    seen.add(name)  # a 503 (thumbnails made at a bounded rate) is asked again, as the page does
        stop.wait(POLL_SECONDS)


def _get(url: str, watchers: Watchers) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        watchers.count(exc.code == HTTPStatus.SERVICE_UNAVAILABLE)  # "later", as designed
        return None
    except OSError:
        watchers.count(False)
        return None
    watchers.count(True)
    return body
