"""`python supervisor.py` as the tests, the benchmark, the soak and the demo run it.

    Pool.start(): the caller's settings over the harness's (Redis, queue,
      OUTPUT_DIR, JSON logs at INFO, NOTIFY_SOCKET), in its own session
      --> workdir/pool.stdout, workdir/pool.stderr (the JSON log)
      --> READY=1 on the notify socket: wait_ready()
    stop(): a signal to the supervisor only, as systemd's KillMode=mixed does
      first, then a wait; kill_all(): SIGKILL to the whole session.

Hazards handled here:
- A developer's shell or a systemd session must not leak pool settings into
  the pool (POOL_ENV_VARS are dropped), unless the caller asks for them, as the
  demo does to honour the user's environment.
- Its own session: signals the caller sends reach only the pool, the caller's
  Ctrl-C does not, and kill_all() finds every descendant by session id, also
  those that left the process group. Orphans are reaped by init, not by us:
  kill_all() waits until the session is empty.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from harness import REPO_ROOT, PoolFailed, procfs
from harness.notify import NotifySocket
from image_result_client.protocol import QueueKeys
from shared.config import setting_names

# What systemd hands a service; the pool acts on each, so none may leak in from a caller's session.
SYSTEMD_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
# Every setting the pool reads from its environment, and systemd's.
POOL_ENV_VARS = (*setting_names(), *SYSTEMD_ENV_VARS)
# Titles the children set: "image-result-worker: worker 3", "image-result-worker: ledger".
WORKER_TITLE, LEDGER_TITLE = ": worker ", ": ledger"


def environment_without(names: Iterable[str] = POOL_ENV_VARS) -> dict[str, str]:
    """This process's environment less names (by default every pool setting)."""
    dropped = set(names)
    return {name: value for name, value in os.environ.items() if name not in dropped}


@dataclass
class Pool:
    """`python supervisor.py` in its own session, with its logs and sd_notify datagrams."""

    workdir: Path
    output_dir: Path
    redis_url: str
    queue: str
    workers: int | None = 2
    env: Mapping[str, str] = field(default_factory=dict)  # settings over the harness's
    args: tuple[str, ...] = ()
    script: str = "supervisor.py"
    cwd: Path | None = None  # where it runs, and so which .env it reads; default the repo
    python: str = sys.executable  # another install's interpreter (make install's venv)
    wrapper: tuple[str, ...] = ()  # a command to run it under (valgrind, for bench/instructions.py)
    inherit_settings: bool = False  # True: pool settings in our environment reach it (the demo)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    spawned_at: float = field(default=0.0, init=False)  # perf_counter() just before the spawn
    _notify: NotifySocket | None = field(default=None, init=False)

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

    def start(self) -> Pool:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._notify = NotifySocket(self.workdir)
        command = [*self.wrapper, self.python, str(REPO_ROOT / self.script), *self._worker_args(), *self.args]
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.spawned_at = time.perf_counter()
            self.proc = subprocess.Popen(
                command,
                cwd=self.cwd or REPO_ROOT,
                env=self._child_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        return self

    # -- readiness and notifications -----------------------------------

    def wait_ready(self, timeout: float = 30.0, *, on_tick: Callable[[], None] | None = None) -> float:
        """Wait for READY=1 and return the perf_counter() at which it came; PoolFailed,
        with the stderr tail, if the pool exits first or stays silent. on_tick(),
        when given, is called about every millisecond meanwhile."""
        assert self._notify is not None, "pool not started"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if on_tick is not None:
                on_tick()
            # Polled before reading: a READY=1 sent just before an exit still counts.
            exited = self.poll() is not None
            self._notify.receive(timeout=0 if exited else 0.1 if on_tick is None else 0.001)
            if self._notify.ready_at is not None:
                return self._notify.ready_at
            if exited:
                raise PoolFailed(f"pool exited with {self.poll()} before READY=1\n{self.stderr_tail()}")
        raise PoolFailed(f"no READY=1 within {timeout}s\n{self.stderr_tail()}")

    def notifications(self) -> list[str]:
        """Every datagram received so far, decoded, oldest first."""
        return self._notify.datagrams() if self._notify is not None else []

    # -- signals and exit ----------------------------------------------

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def send_signal(self, sig: int, *, before_ready: bool = False) -> None:
        """Signal the supervisor only, as systemd's KillMode=mixed does first.

        Waits for READY=1 first (PoolFailed if it never comes): a signal that lands
        before the supervisor has installed its handlers kills it by the kernel's
        default action, which tests nothing but the race. A test that means to
        signal a pool that is not ready (one waiting for Redis) says before_ready=True.
        """
        if not before_ready:
            self._require_ready(f"signal {signal.Signals(sig).name}")
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the supervisor to exit by itself; returns its exit code.
        Kills everything and raises PoolFailed on timeout."""
        assert self.proc is not None, "pool not started"
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise PoolFailed(f"pool still running after {timeout}s\n{self.stderr_tail()}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0, *, before_ready: bool = False) -> int:
        """Send sig to the supervisor (once it is ready, see send_signal) and wait
        for it; returns its exit code (negative for a signal death). Kills
        everything and raises PoolFailed on timeout."""
        if self.poll() is None:
            self.send_signal(sig, before_ready=before_ready)
        return self.wait_exit(timeout)

    def kill_all(self, timeout: float = 10.0) -> None:
        """SIGKILL the whole session and reap; safe to call at any time, repeatedly."""
        if self.proc is not None:
            self._kill_session()
            self.proc.wait(timeout=timeout)
            deadline = time.monotonic() + timeout
            while self.session_pids() and time.monotonic() < deadline:
                self._kill_session()
                time.sleep(0.05)
        if self._notify is not None:
            self._notify.close()

    # -- its processes -------------------------------------------------

    def child_pids(self) -> list[int]:
        """Live processes whose parent is the supervisor, sorted."""
        return procfs.children_of(self.pid)

    def tree_pids(self) -> list[int]:
        """The supervisor and its live children."""
        return [self.pid, *self.child_pids()]

    def session_pids(self) -> list[int]:
        """Every live process in the pool's session (the supervisor and all descendants)."""
        return procfs.session_members(self.pid)

    def children_by_title(self) -> dict[int, str]:
        """pid -> process title (what setproctitle set) of each live child."""
        titles = {pid: procfs.cmdline(pid) for pid in self.child_pids()}
        return {pid: title for pid, title in titles.items() if title is not None}  # None: exited meanwhile

    def role_of(self, pid: int) -> str | None:
        """"supervisor", "worker" or "ledger"; None for a child that has not set
        its title yet, or is gone."""
        if pid == self.pid:
            return "supervisor"
        title = procfs.cmdline(pid) or ""
        return "ledger" if LEDGER_TITLE in title else "worker" if WORKER_TITLE in title else None

    def children_by_role(self) -> dict[int, str | None]:
        return {pid: self.role_of(pid) for pid in self.child_pids()}

    # -- what it logged ------------------------------------------------

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
        """Log lines whose "event" is name, oldest first."""
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

    # -- internals -----------------------------------------------------

    def _require_ready(self, what: str, timeout: float = 30.0) -> None:
        assert self._notify is not None, "pool not started"
        if self._notify.ready_at is not None:
            return
        try:
            self.wait_ready(timeout)
        except PoolFailed as exc:
            raise PoolFailed(
                f"{what}: the pool never reached READY=1 (wait_ready() first, or pass "
                f"before_ready=True to mean it)\n{exc}"
            ) from None

    def _kill_session(self) -> None:
        # killpg covers the process group; the session scan also catches
        # descendants that moved to a group of their own.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in procfs.session_members(self.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _worker_args(self) -> list[str]:
        return [] if self.workers is None else ["--workers", str(self.workers)]

    def _child_env(self) -> dict[str, str]:
        assert self._notify is not None
        env = environment_without(SYSTEMD_ENV_VARS if self.inherit_settings else POOL_ENV_VARS)
        env.update(
            REDIS_URL=self.redis_url,
            HOSTING_TASKS_QUEUE=self.queue,
            OUTPUT_DIR=str(self.output_dir),
            LOG_FORMAT="json",  # what log_lines() and events() read
            LOG_LEVEL="INFO",  # the events waited for (pool_ready, child_died, ...) are INFO
            NOTIFY_SOCKET=str(self._notify.path),
            PYTHONUNBUFFERED="1",
            URL_ALLOW_LOOPBACK="true",  # the harness's HTTP server listens on 127.0.0.1
        )
        env.update(self.env)
        return env
