"""image-result-worker: the supervisor, parent of the worker pool and the ledger.

    producers --RPUSH--> HOSTING_TASKS_QUEUE (Redis)
        --claim--> worker N's processing list --> worker N (encode, partial JPEG)
        --records over worker N's socket--> ledger (sync JPEGs, results.json,
                                                    publish, ack, unlink)

The supervisor only forks, signals, reaps and reconciles. Each wakeup of its
loop (a signal, a child's death, or a tick) is one reconcile pass: reap the
dead, kill the hung, do the pass's chores in Redis (control/upkeep.py: renew
this instance's lease, whose value is the state `status` shows, requeue dead
workers' lists and those orphaned by a dead instance, move due retries back
onto the queue, log progress while there is work), restart the ledger if
needed, and bring the workers to the desired count (with backoff when they
keep dying at boot). With METRICS_PORT, each pass ends by publishing a view of
the pool for the metrics thread (control/metrics.py), which answers HTTP
clients so that the loop never waits on one.

Hazards handled here:
- Signals are only recorded (the wakeup pipe); the loop acts on them.
- Signals are blocked around fork so a child never runs our handler, and
  in the metrics thread for good: they are the loop's.
- Fork with the metrics thread running: every fork happens with that thread
  quiesced (holding no lock a child could need), and the child closes the
  metrics sockets and the ledger's stats pipe before anything else (fork
  copies every descriptor; close-on-exec needs an exec).
- Ctrl-C reaches the whole process group: children ignore SIGINT, we decide.
- A dead worker's tasks go back to the queue; a dead ledger takes the records
  it had not acknowledged with it, so all workers are recycled and their
  lists requeued (the new ledger drops any duplicate that had been recorded).
- Shutdown order: workers first (they finish in-flight tasks within
  SHUTDOWN_GRACE), then the ledger (it makes every record durable and
  acknowledges it), then whatever is still unfinished goes back to the queue.
"""

from __future__ import annotations

import signal

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)

# Importing and booting take about a second, and a stop signal in that window
# would kill us by its default action (exit -15 to systemd, a traceback for
# Ctrl-C). Held pending instead, it is delivered once the loop's handlers exist
# (install_signal_handlers) and the pool stops cleanly before forking anything.
# Only when run as a program: importing this module leaves a caller's mask alone.
if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    from shared.cli import explain_a_missing_package  # standard library only

    explain_a_missing_package()

import argparse
import contextlib
import dataclasses
import fcntl
import json
import multiprocessing
import multiprocessing.connection
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import Synchronized

import structlog

from control.metrics import MetricsEndpoint
from control.upkeep import PoolUpkeep
from image_result_client import __version__
from image_result_client.protocol import QueueKeys
from shared import crash_points, exitcodes
from shared.backoff import compute_backoff
from shared.cli import PROGRAM, OneLineParser, complain, unknown_command
from shared.config import ConfigError, Settings, misspelt_settings
from shared.imaging.shm_usage import ShmMeter
from shared.ipc.sdnotify import Notifier
from shared.ipc.task_board import TaskBoard
from shared.logs import configure_logging
from shared.process import LEDGER_STALE_SECONDS
from shared.state.pool_registry import PoolRegistry
from shared.state.redis_queue import REDIS_ERRORS, RedisRefused, ReliableQueue, connect, is_refusal
from shared.storage.files import LOCK_NAME, open_state_file
from shared.storage.output_dir import check_output_dir

LOOP_SECONDS = 1.0
LEDGER_STOP_TIMEOUT = 15.0
# Settings a SIGHUP cannot change: the ledger, the lease and the metrics socket hang on them.
RESTART_ONLY_SETTINGS = ("redis_url", "queue", "output_dir", "metrics_port", "metrics_address", "lease_ttl")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="supervisor.py",
        description="Run the image-result worker pool.",
        epilog="Operator commands (each with --help): supervisor.py status [--json] [--watch] | check"
        " | dead list|show|requeue|purge | host drain ID | task REQUEST_ID [--json] | dashboard [--port N] [--address A]",
    )
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {__version__}")
    parser.add_argument(
        "--workers", metavar="N", type=int, help="worker processes, 1..256 (default: WORKERS, else CPU count)"
    )
    return parser.parse_args(argv)




OPERATOR_COMMANDS = ("status", "check", "dead", "host", "task", "dashboard")


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Hold our signals pending in this thread; a child forked or a thread
    started meanwhile inherits the blocked mask."""
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in OPERATOR_COMMANDS:
        # A one-shot command has no loop: Ctrl-C and SIGTERM act at once, as usual.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        if argv[0] == "task":
            from control.lookup import main as run_command
        elif argv[0] == "dashboard":
            from control.dashboard import main as run_command
        else:
            from control.commands import main as run_command

        return run_command(argv)
    if argv and not argv[0].startswith("-"):
        # The pool itself takes options only: a word is a mistyped command.
        complain(unknown_command(argv[0], OPERATOR_COMMANDS))
        return exitcodes.CONFIG_ERROR
    args = parse_args(argv)
    try:
        settings = Settings.from_env(workers_override=args.workers)
        misspelt = misspelt_settings()
        # Before any fork: a wrong OUTPUT_DIR is a bad setting (exit 2, no restart loop).
        created = check_output_dir(settings.output_dir, allow_shared=settings.output_dir_allow_shared)
    except ConfigError as exc:
        complain(exc)
        return exitcodes.CONFIG_ERROR
    # OpenCV reads its decode pixel limit once, when it loads: set it before the
    # Supervisor imports the worker modules (once, so that every fork shares them).
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(settings.max_pixels)
    configure_logging(settings, role="supervisor")
    for unknown in misspelt:
        # A warning, not a refusal: the pool runs, but with the default where a setting was meant.
        structlog.get_logger().warning(
            "unknown_setting", name=unknown.name, source=unknown.source, did_you_mean=unknown.did_you_mean
        )
    if crash_points.ARMED_POINT:
        structlog.get_logger().warning("crash_point_armed", point=crash_points.ARMED_POINT, purpose="fault-injection tests")
    if created:
        structlog.get_logger().info("output_dir_created", directories=[str(path) for path in created])
    instance = uuid.uuid4().hex[:12]
    try:
        lock_fd = lock_output_dir(settings, instance)
    except OSError as exc:
        complain(exc)
        return exitcodes.OUTPUT_DIR_BUSY if isinstance(exc, BlockingIOError) else exitcodes.BOOT_FAILED
    try:
        return Supervisor(settings, instance=instance, workers_override=args.workers).run()
    finally:
        os.close(lock_fd)


def lock_output_dir(settings: Settings, instance: str) -> int:
    """Hold OUTPUT_DIR for this supervisor: results.json must have one writer.
    The lock file names the holder, which is how `check` finds its supervisor.
    The children inherit the descriptor (fork, no exec), and with it the lock:
    should the supervisor die first, no new one starts while its ledger may
    still be writing results.json."""
    fd = open_state_file(settings.output_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BlockingIOError(f"OUTPUT_DIR {settings.output_dir} is in use by another supervisor") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"instance": instance, "pid": os.getpid()}).encode(), 0)
    return fd


@dataclass(eq=False)
class Child:
    role: str
    slot: int
    process: BaseProcess
    pid: int
    heartbeat: Synchronized
    started_at: float = field(default_factory=time.monotonic)
    processing_key: str | None = None
    unstarted: Synchronized | None = None  # a worker's claimed but not started tasks
    board: TaskBoard | None = None  # a worker's task in hand, for `status`
    killed_because: str | None = None  # set when we SIGKILL it, for the exit log

    @property
    def booted(self) -> bool:
        return self.heartbeat.value > 0.0


class Supervisor:
    def __init__(self, settings: Settings, *, instance: str, workers_override: int | None = None) -> None:
        # Imported here, not at the top: they load OpenCV, which must see
        # OPENCV_IO_MAX_IMAGE_PIXELS first (set in main()).
        from workers.ledger import ledger_main
        from workers.worker import processing_name, worker_main

        self.settings = settings
        self.workers_override = workers_override
        self.log = structlog.get_logger()
        self.context = multiprocessing.get_context("fork")
        self.instance = instance
        self.started_at = time.time()
        self.watchdog = "WATCHDOG_USEC" in os.environ
        self.keys = QueueKeys(settings.queue)
        self.queue = ReliableQueue(
            connect(settings),
            self.keys,
            max_message_bytes=settings.max_message_bytes,
            replicated_claims=bool(settings.redis_sentinels),
            min_replicas=settings.claim_min_replicas,
        )
        self.registry = PoolRegistry(self.queue.client, self.keys)
        self.notifier = Notifier()
        self.upkeep = PoolUpkeep(
            settings, instance=instance, queue=self.queue, registry=self.registry, notifier=self.notifier
        )
        self.worker_main, self.ledger_main, self.processing_name = worker_main, ledger_main, processing_name
        self.desired = settings.workers
        self.shm_meter = ShmMeter()
        # Wake often enough to renew the lease several times within its TTL.
        self.loop_seconds = min(LOOP_SECONDS, settings.lease_ttl / 4)
        self.workers: dict[int, Child] = {}
        self.ledger: Child | None = None
        self.stopping = False
        self.fast_stop = False
        self.ready = False
        self.boot_failures = 0
        self.respawn_not_before = 0.0
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.metrics: MetricsEndpoint | None = None
        self.metrics_pipe: int | None = None
        self.signal_methods = {
            signal.SIGTERM: self.handle_term,
            signal.SIGINT: self.handle_term,
            signal.SIGQUIT: self.handle_quit,
            signal.SIGHUP: self.handle_hup,
            signal.SIGTTIN: self.handle_ttin,
            signal.SIGTTOU: self.handle_ttou,
        }

    # -- the loop ----------------------------------------------------------

    def run(self) -> int:
        self.install_signal_handlers()
        self.sleep(0)  # act on a stop signal that came during start-up, before forking anything
        if self.settings.metrics_port is not None:
            try:
                self.metrics = MetricsEndpoint(
                    address=self.settings.metrics_address,
                    port=self.settings.metrics_port,
                    registry=self.registry,
                    queue=self.queue,
                )
            except OSError as exc:
                # In use by another program, an address not of this host, a port below
                # 1024: settings to correct, so exit 2 (systemd does not restart-loop).
                complain(
                    f"METRICS_PORT={self.settings.metrics_port} on METRICS_ADDRESS={self.settings.metrics_address!r}"
                    f" cannot be listened on: {os.strerror(exc.errno) if exc.errno else exc}"
                )
                return exitcodes.CONFIG_ERROR
            with signals_blocked():  # signals are the loop's, never the metrics thread's
                self.metrics.start()
        self.log.info(
            "supervisor_starting",
            workers=self.desired,
            queue=self.settings.queue,
            redis=self.settings.redacted_redis_url(),
            output_dir=str(self.settings.output_dir),
            instance=self.instance,
        )
        try:
            self.wait_for_redis()
            while not self.stopping:
                self.reconcile()
                # Only the first pass, whose chores run before any child is forked,
                # stops the start on a refusal; from then on it is logged and retried.
                self.upkeep.refusals_fatal = False
                self.announce_ready_once()
                self.ping_watchdog()
                self.publish_metrics()
                # Until READY, look again soon: the children boot in milliseconds.
                self.sleep(self.loop_seconds if self.ready else 0.02)
        except RedisRefused as exc:
            complain(f"REDIS_URL={self.settings.redacted_redis_url()!r}: Redis refused the pool: {exc}")
            if self.metrics is not None:
                self.metrics.close()
            return exitcodes.CONFIG_ERROR
        self.shutdown()
        return exitcodes.OK

    def reconcile(self) -> None:
        self.reap()
        self.kill_hung_workers()
        self.renew_lease()
        self.upkeep.watch_replicas()
        self.upkeep.requeue_lists()
        self.upkeep.recover_orphaned_lists()
        self.upkeep.promote_due_retries()
        self.upkeep.expire_requests()
        self.upkeep.report_progress()
        self.ensure_ledger()
        self.scale_workers()

    # -- signals -----------------------------------------------------------

    def install_signal_handlers(self) -> None:
        # The handler does nothing: set_wakeup_fd writes the signal number to
        # our pipe, and the loop reads and dispatches it.
        signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, lambda *_: None)
        # Those held pending since start-up (see the top of this file) arrive now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)

    def sleep(self, seconds: float) -> None:
        """Wait for a signal, a child's death or the timeout; then act on the signals."""
        for sig in self.wait_for_wakeup(seconds):
            self.signal_methods[sig]()

    def wait_for_wakeup(self, seconds: float) -> list[signal.Signals]:
        """The signals that came, in order; none when a child's death or the
        timeout ended the wait."""
        waitables = [self.wakeup_r, *(child.process.sentinel for child in self.children())]
        multiprocessing.connection.wait(waitables, timeout=seconds)
        try:
            received = os.read(self.wakeup_r, 64)
        except BlockingIOError:
            return []
        return [signal.Signals(number) for number in received if number in self.signal_methods]

    def handle_term(self) -> None:
        if self.stopping:
            self.log.warning("shutdown_hurried")
            self.fast_stop = True
        self.stopping = True

    def handle_quit(self) -> None:
        self.stopping = self.fast_stop = True

    def handle_hup(self) -> None:
        """Re-read settings as at start (environment, then .env) and replace the
        workers gracefully with ones that use them. What only a restart can
        change (where the queue, Redis, output and metrics are) is kept, and so
        is the worker count SIGTTIN/SIGTTOU set, unless WORKERS itself changed."""
        try:
            fresh = Settings.from_env(workers_override=self.workers_override)
        except ConfigError as exc:
            self.log.error("reload_refused", reason=str(exc))
            return
        fixed = [name for name in RESTART_ONLY_SETTINGS if getattr(fresh, name) != getattr(self.settings, name)]
        if fixed:
            self.log.warning("reload_needs_restart", settings=fixed)
            fresh = dataclasses.replace(fresh, **{name: getattr(self.settings, name) for name in fixed})
        workers_changed = fresh.workers != self.settings.workers
        self.settings = fresh
        self.upkeep.reload(fresh)
        if workers_changed:
            self.desired = fresh.workers
        self.log.info("settings_reloaded", workers=self.desired, workers_from="WORKERS" if workers_changed else "kept")
        self.state_changed()
        for child in self.workers.values():
            self.signal_child(child, signal.SIGTERM)

    def handle_ttin(self) -> None:
        self.desired = min(256, self.desired + 1)
        self.log.info("workers_scaled", desired=self.desired)
        self.state_changed()

    def handle_ttou(self) -> None:
        self.desired = max(1, self.desired - 1)
        self.log.info("workers_scaled", desired=self.desired)
        self.state_changed()

    # -- reconcile steps ---------------------------------------------------

    def reap(self) -> None:
        for child in list(self.children()):
            code = child.process.exitcode
            if code is None:
                continue
            child.process.join()
            child.process.close()
            self.log_exit(child, code)
            self.note_boot_outcome(child, code)
            self.state_changed()
            if self.metrics is not None and not self.stopping:
                self.metrics.child_restarted(child.role)
            if child.role == "ledger":
                self.on_ledger_exit()
            else:
                del self.workers[child.slot]
                self.upkeep.requeue_later(child.processing_key, child.unstarted.value)

    def on_ledger_exit(self) -> None:
        self.ledger = None
        if self.metrics is not None:
            self.read_ledger_stats()  # its last words
            self.metrics.ledger_replaced()
        if self.stopping:
            return
        # Records the ledger had not acknowledged died with it; recycle every
        # worker so their processing lists are requeued.
        for child in self.workers.values():
            self.signal_child(child, signal.SIGTERM)

    def note_boot_outcome(self, child: Child, code: int) -> None:
        """Back off respawning while children die before they ever get going
        (OUTPUT_DIR unwritable, say); a child that had booted resets the count."""
        if self.stopping or (child.booted and code != exitcodes.BOOT_FAILED):
            self.boot_failures = 0
            return
        self.boot_failures += 1
        delay = compute_backoff(self.boot_failures, base=0.5, cap=30.0)
        self.respawn_not_before = time.monotonic() + delay
        self.log.warning("respawn_throttled", failures=self.boot_failures, retry_in=round(delay, 2))

    def kill_hung_workers(self) -> None:
        now = time.monotonic()
        for child in self.workers.values():
            last_sign = max(child.heartbeat.value, child.started_at)
            if now - last_sign > self.settings.task_timeout:
                self.log.error("worker_hung", worker=child.slot, pid=child.pid, silent_for=round(now - last_sign, 1))
                self.kill_child(child, because="it was silent longer than TASK_TIMEOUT")

    def renew_lease(self) -> None:
        self.upkeep.renew_lease(self.state, serving_host=self.serving_host())

    def state_changed(self) -> None:
        self.upkeep.state_changed()

    def serving_host(self) -> str | None:
        """The host whose live key our lease renewal keeps, for producers that
        send shared-memory tasks with a URL fallback: with HOST_QUEUE, until we
        start stopping (from then on our workers fetch nothing more)."""
        return self.settings.host_id if self.settings.host_queue and not self.stopping else None

    def ensure_ledger(self) -> None:
        if self.ledger is not None or time.monotonic() < self.respawn_not_before:
            return
        if self.metrics is None:
            self.ledger = self.spawn("ledger", 0, self.ledger_main)
            return
        # The ledger's stats snapshots come back over a pipe of its own. Its read
        # end is in metrics_pipe before the fork, so that the child closes it.
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.metrics_pipe is not None:
            os.close(self.metrics_pipe)  # the last ledger's last words were read when it was reaped
        self.metrics_pipe = read_end
        self.ledger = self.spawn("ledger", 0, self.ledger_main, metrics_fd=write_end)
        os.close(write_end)

    def scale_workers(self) -> None:
        if self.ledger is None or time.monotonic() < self.respawn_not_before:
            return
        for slot in range(self.desired):
            if slot not in self.workers:
                child = self.spawn("worker", slot, self.worker_main)
                child.processing_key = self.keys.processing(self.instance, self.processing_name(child.pid))
                self.workers[slot] = child
        for slot in [s for s in self.workers if s >= self.desired]:
            self.signal_child(self.workers[slot], signal.SIGTERM)

    def publish_metrics(self) -> None:
        """Give the metrics thread a fresh view: the ledger's latest stats,
        health and counts. It reads nothing else of ours, so it needs no lock."""
        if self.metrics is None:
            return
        if self.metrics.failure is not None:
            self.log.error("metrics_thread_failed", error=repr(self.metrics.failure))
            with signals_blocked():
                self.metrics.start()
        self.read_ledger_stats()
        self.metrics.publish(
            healthy=self.healthy(), live_workers=len(self.workers), shm=self.shm_meter.read(self.settings)
        )

    def read_ledger_stats(self) -> None:
        """The ledger's newest stats snapshot, from its pipe; anything else there is dropped and logged."""
        if self.metrics is not None and self.metrics_pipe is not None:
            refused = self.metrics.read_snapshots(self.metrics_pipe)
            if refused:
                self.log.warning("metrics_snapshot_refused", snapshots=refused)

    def healthy(self) -> bool:
        """Ready, and the ledger beating: what /healthz and the watchdog report."""
        ledger = self.ledger
        return (
            self.ready
            and not self.stopping
            and ledger is not None
            and time.monotonic() - ledger.heartbeat.value < LEDGER_STALE_SECONDS
        )

    def ping_watchdog(self) -> None:
        """WATCHDOG=1 for systemd, only while the loop turns and the ledger is alive
        and beating: a wedged supervisor or ledger gets the service restarted."""
        if self.watchdog and self.healthy():
            self.notifier.notify("WATCHDOG=1")

    def state(self) -> bytes:
        """What `status` and `check` read from the lease: who runs, how recently
        each child beat, and the task each worker has in hand (None: idle)."""
        now = time.monotonic()
        tasks = self.upkeep.tasks_in_hand(self.workers, now)
        shm = self.shm_meter.read(self.settings)

        def describe(child: Child) -> dict:
            beat = child.heartbeat.value
            age = round(now - beat, 2) if beat > 0 else None
            return {"slot": child.slot, "pid": child.pid, "heartbeat_age": age, "processing_list": child.processing_key}

        return json.dumps(
            {
                "instance": self.instance,
                "host": socket.gethostname(),
                "host_id": self.settings.host_id,
                "pid": os.getpid(),
                "started_at": self.started_at,
                "updated_at": time.time(),
                "ready": self.ready,
                "stopping": self.stopping,
                "desired_workers": self.desired,
                "task_timeout": self.settings.task_timeout,
                "lease_ttl": self.settings.lease_ttl,
                "workers": [
                    {**describe(child), "task": tasks.get(child.slot)}
                    for child in sorted(self.workers.values(), key=lambda c: c.slot)
                ],
                "ledger": describe(self.ledger) if self.ledger else None,
                "shm": shm.as_dict() if shm else None,
            }
        ).encode()

    def announce_ready_once(self) -> None:
        if self.ready or self.ledger is None or not self.ledger.booted:
            return
        if len(self.workers) < self.desired or not all(c.booted for c in self.workers.values()):
            return
        self.ready = True
        self.log.info("pool_ready", workers=len(self.workers))
        self.publish_metrics()  # so that /healthz says ok by the time READY=1 is out
        self.state_changed()
        self.renew_lease()  # and `status` says ready
        self.notifier.notify("READY=1", f"STATUS=serving {self.settings.queue} with {len(self.workers)} workers")

    # -- shutdown ----------------------------------------------------------

    def shutdown(self) -> None:
        self.notifier.notify("STOPPING=1", "STATUS=draining")
        self.publish_metrics()  # /healthz: unhealthy from now on
        self.state_changed()
        self.renew_lease()  # `status`: stopping
        self.log.info("shutdown_started", grace=self.settings.shutdown_grace, fast=self.fast_stop)
        for child in self.workers.values():
            self.signal_child(child, signal.SIGTERM)
        self.wait_for_children(lambda: not self.workers or self.fast_stop, self.settings.shutdown_grace)
        # Past the grace period (or on a second signal) unfinished tasks are killed;
        # their processing lists are requeued below.
        for child in self.workers.values():
            self.kill_child(child, because="shutdown could not wait any longer")
        self.wait_for_children(lambda: not self.workers, None)
        if self.ledger is not None:
            self.signal_child(self.ledger, signal.SIGTERM)
            if not self.wait_for_children(lambda: self.ledger is None, LEDGER_STOP_TIMEOUT):
                self.kill_child(self.ledger, because="it did not stop in time")
                self.wait_for_children(lambda: self.ledger is None, None)
        self.upkeep.requeue_lists()
        self.upkeep.drop_lease()
        if self.metrics is not None:
            self.metrics.close()
        self.log.info("shutdown_complete", left_for_next_start=len(self.upkeep.lists_to_requeue))

    def wait_for_children(self, done, timeout: float | None) -> bool:
        """Reap until done() or the timeout (None: no limit), still renewing the
        lease so that no other supervisor takes our lists for orphans meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            left = self.loop_seconds if deadline is None else min(self.loop_seconds, deadline - time.monotonic())
            if left <= 0:
                return False
            self.sleep(left)
            self.reap()
            self.renew_lease()
            self.publish_metrics()
        return True

    # -- helpers -----------------------------------------------------------

    def children(self) -> list[Child]:
        return [*self.workers.values(), *([self.ledger] if self.ledger else [])]

    def spawn(self, role: str, slot: int, target, **extra) -> Child:
        heartbeat = self.context.Value("d", 0.0, lock=False)
        kwargs = {"instance": self.instance, "heartbeat": heartbeat, **extra}
        if role == "worker":
            kwargs["slot"] = slot
            kwargs["unstarted"] = self.context.Value("i", 0, lock=False)
            kwargs["board"] = TaskBoard(self.context)
        # daemon=True: should the supervisor itself fail, multiprocessing's exit hook
        # terminates the children instead of waiting on them forever.
        process = self.context.Process(
            target=self.child_main, args=(target, self.settings), kwargs=kwargs, name=f"{role}-{slot}", daemon=True
        )
        # The metrics thread quiesced: a child gets no lock of it copied held.
        quiesced = self.metrics.quiesced() if self.metrics is not None else contextlib.nullcontext()
        with signals_blocked(), quiesced:
            process.start()
        child = Child(
            role, slot, process, process.pid, heartbeat, unstarted=kwargs.get("unstarted"), board=kwargs.get("board")
        )
        self.log.info("child_started", role=role, slot=slot, pid=child.pid)
        self.state_changed()
        return child

    def child_main(self, target: Callable[..., None], settings: Settings, **kwargs) -> None:
        """First thing in a forked child: close what is the supervisor's alone.
        A worker holding the metrics listener would keep the port bound, and
        one holding a client's connection would keep it open, after we let go."""
        if self.metrics is not None:
            self.metrics.close_in_child()
        if self.metrics_pipe is not None:
            os.close(self.metrics_pipe)
        target(settings, **kwargs)

    def signal_child(self, child: Child, sig: signal.Signals) -> None:
        try:
            os.kill(child.pid, sig)
        except ProcessLookupError:
            pass

    def kill_child(self, child: Child, *, because: str) -> None:
        child.killed_because = because
        self.signal_child(child, signal.SIGKILL)

    def log_exit(self, child: Child, code: int) -> None:
        fields = {"role": child.role, "slot": child.slot, "pid": child.pid, "exit_code": code}
        if code < 0:
            name = signal.Signals(-code).name
            if child.killed_because:
                cause = f"killed by the supervisor because {child.killed_because}"
            elif -code == signal.SIGKILL:
                cause = "killed by SIGKILL from outside (the out-of-memory killer, if no operator sent it)"
            else:
                cause = f"killed by {name}"
            self.log.error("child_died", cause=cause, **fields)
        elif code == exitcodes.OK:
            self.log.info("child_exited", cause=exitcodes.describe(code), **fields)
        else:
            self.log.error("child_died", cause=exitcodes.describe(code), **fields)

    def wait_for_redis(self) -> None:
        """Block start-up until Redis answers, with capped backoff; a stop signal
        ends the wait. A permanent refusal raises RedisRefused."""
        attempt = 0
        while not self.stopping:
            try:
                self.queue.ping()
            except REDIS_ERRORS as exc:
                if is_refusal(exc):  # credentials, ACL, database: no wait changes the answer
                    raise RedisRefused(str(exc)) from None
                attempt += 1
                delay = compute_backoff(attempt, base=0.2, cap=10.0)
                self.log.warning(
                    "redis_unavailable",
                    error=str(exc),
                    redis=self.settings.redacted_redis_url(),
                    attempt=attempt,
                    retry_in=round(delay, 2),
                )
                self.notifier.notify(f"STATUS=waiting for Redis at {self.settings.redacted_redis_url()}")
                self.sleep(delay)
                continue
            if attempt:
                self.log.info("redis_reconnected", after_attempts=attempt)
            return


if __name__ == "__main__":
    sys.exit(main())
