"""The decisions of the supervisor, the ledger and the worker, taken in-process
in milliseconds (`make test-fast`): a slow end-to-end test proves the whole, a
fast one names the broken step.

The supervisor's children here are stand-ins for multiprocessing's Process
objects (what `reap` reads is the exit code), or real `sleep` processes where
the decision is a signal that must arrive.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from control.drain import DEAD, SHARED, dispose
from shared import exitcodes
from shared.config import Settings
from shared.ipc.records import COMPLETED, FAILED, RETRY, CompletionRecord
from supervisor import Child, Supervisor
from workers.ledger import Ledger, RecordedTasks
from workers.worker import OUTBOX_BYTES, OUTBOX_SECONDS, Outbox

pytestmark = pytest.mark.fast


# ------------------------------------------------------------ the supervisor


@dataclass
class ExitedProcess:
    """What reap() reads of a child: its exit code (None while it runs)."""

    exitcode: int | None

    def join(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def supervisor(tmp_path: Path) -> Supervisor:
    settings = Settings.from_env(
        {"REDIS_URL": "redis://127.0.0.1:1", "OUTPUT_DIR": str(tmp_path / "out"), "WORKERS": "3", "TASK_TIMEOUT": "5"},
        dotenv_path=None,
    )
    return Supervisor(settings, instance="test")


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen]]:
    """Real processes for the supervisor to signal; all gone at teardown."""
    processes: list[subprocess.Popen] = []
    try:
        yield processes
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=10)


def worker(slot: int, *, exitcode: int | None = None, pid: int = 0, heartbeat: float = 1.0, unstarted: int = 0) -> Child:
    return Child(
        "worker", slot, ExitedProcess(exitcode), pid or 40_000 + slot,
        multiprocessing.Value("d", heartbeat), processing_key=f"{{q}}:processing:test:w{slot}",
        unstarted=multiprocessing.Value("i", unstarted),
    )


def sleeping_worker(slot: int, sleepers: list[subprocess.Popen], **options: float) -> Child:
    process = subprocess.Popen(["sleep", "60"])
    sleepers.append(process)
    return worker(slot, pid=process.pid, **options)


def test_a_worker_killed_from_outside_is_reaped_as_perhaps_out_of_memory_and_its_list_requeued(supervisor):
    supervisor.workers = {0: worker(0, exitcode=-signal.SIGKILL, unstarted=3), 1: worker(1)}
    with capture_logs() as logs:
        supervisor.reap()
    (died,) = [e for e in logs if e["event"] == "child_died"]
    assert "out-of-memory" in died["cause"] and died["slot"] == 0
    assert list(supervisor.workers) == [1]
    assert supervisor.upkeep.lists_to_requeue == [("{q}:processing:test:w0", 3)]  # three never started


def test_a_worker_the_supervisor_killed_says_why(supervisor):
    child = worker(0, exitcode=-signal.SIGKILL)
    child.killed_because = "it was silent longer than TASK_TIMEOUT"
    supervisor.workers = {0: child}
    with capture_logs() as logs:
        supervisor.reap()
    assert [e["cause"] for e in logs if e["event"] == "child_died"] == [
        "killed by the supervisor because it was silent longer than TASK_TIMEOUT"
    ]


def test_a_clean_exit_is_no_death(supervisor):
    supervisor.workers = {0: worker(0, exitcode=exitcodes.OK)}
    with capture_logs() as logs:
        supervisor.reap()
    assert [e["event"] for e in logs] == ["child_exited"]
    assert supervisor.boot_failures == 0


def test_a_dead_ledger_recycles_every_worker(supervisor, sleepers):
    """Records it had not acknowledged died with it: every worker's list must be requeued."""
    supervisor.workers = {slot: sleeping_worker(slot, sleepers) for slot in range(2)}
    supervisor.ledger = Child("ledger", 0, ExitedProcess(-signal.SIGKILL), 40_100, multiprocessing.Value("d", 1.0))
    supervisor.reap()
    assert supervisor.ledger is None
    assert [p.wait(timeout=5) for p in sleepers] == [-signal.SIGTERM, -signal.SIGTERM]


def test_children_that_die_before_booting_back_off_and_a_booted_one_resets(supervisor):
    delays = []
    for _ in range(4):
        supervisor.workers = {0: worker(0, exitcode=exitcodes.BOOT_FAILED, heartbeat=0.0)}
        with capture_logs() as logs:
            supervisor.reap()
        assert [e["event"] for e in logs if e["event"] == "respawn_throttled"]
        delays.append(supervisor.respawn_not_before - time.monotonic())
    assert delays == sorted(delays) and delays[0] < 1.0 and delays[-1] > 2.0
    supervisor.workers = {0: worker(0, exitcode=-signal.SIGKILL, heartbeat=5.0)}  # had booted
    supervisor.reap()
    assert supervisor.boot_failures == 0


def test_a_silent_worker_is_killed_after_task_timeout_and_a_beating_one_is_not(supervisor, sleepers):
    silent = sleeping_worker(0, sleepers, heartbeat=time.monotonic() - 6)
    silent.started_at = time.monotonic() - 6
    beating = sleeping_worker(1, sleepers, heartbeat=time.monotonic())
    supervisor.workers = {0: silent, 1: beating}
    with capture_logs() as logs:
        supervisor.kill_hung_workers()
    assert [e["worker"] for e in logs if e["event"] == "worker_hung"] == [0]
    assert sleepers[0].wait(timeout=5) == -signal.SIGKILL
    assert sleepers[1].poll() is None
    assert silent.killed_because and beating.killed_because is None


def test_signals_are_acted_on_by_the_loop_in_the_order_they_came(supervisor):
    """A handler only writes the signal's number to the wakeup pipe (set_wakeup_fd);
    the loop's wait reads them and the loop dispatches each."""
    os.write(supervisor.wakeup_w, bytes([signal.SIGTTIN, signal.SIGTTIN, signal.SIGUSR1, signal.SIGTERM]))
    assert supervisor.wait_for_wakeup(0) == [signal.SIGTTIN, signal.SIGTTIN, signal.SIGTERM]  # not ours: left out
    assert supervisor.wait_for_wakeup(0) == []  # each is read once
    assert not supervisor.stopping
    os.write(supervisor.wakeup_w, bytes([signal.SIGTTOU, signal.SIGTERM, signal.SIGTERM]))
    supervisor.sleep(0)
    assert supervisor.desired == 2
    assert supervisor.stopping and supervisor.fast_stop  # a second TERM hurries the shutdown


def test_ttou_retires_the_highest_slot_gracefully_and_ttin_adds_one(supervisor, sleepers):
    supervisor.workers = {slot: sleeping_worker(slot, sleepers) for slot in range(3)}
    supervisor.ledger = Child("ledger", 0, ExitedProcess(None), 40_100, multiprocessing.Value("d", 1.0))
    supervisor.handle_ttou()
    assert supervisor.desired == 2
    supervisor.scale_workers()
    assert sleepers[2].wait(timeout=5) == -signal.SIGTERM  # graceful: TERM, not KILL
    assert sleepers[0].poll() is None and sleepers[1].poll() is None
    supervisor.handle_ttin()
    assert supervisor.desired == 3


# ------------------------------------------------------------ the ledger


def record(task_id: str | None, status: str = COMPLETED, *, delivery: int = 1, error: str | None = None) -> CompletionRecord:
    return CompletionRecord(
        task_id=task_id, delivery=delivery, envelope=b"irw2 %s %d 2 s\n{}" % ((task_id or "x").encode(), delivery),
        processing_key="{q}:processing:test:w0", request_id="r", image_id="i", status=status,
        finished_at=datetime(2026, 12, 2), error=error,
    )


def test_duplicates_are_tasks_recorded_before_or_twice_in_a_batch_but_not_retries():
    recorded = RecordedTasks()
    recorded.learn_from_last_run([{"task_id": "old", "status": COMPLETED}, {"task_id": 7, "status": FAILED}])
    batch = [record("old"), record("new"), record("new"), record("later", RETRY), record("later"), record(None)]
    fresh, duplicates = recorded.split_duplicates(batch)
    assert [r.task_id for r in fresh] == ["new", "later", "later", None]
    assert [r.task_id for r in duplicates] == ["old", "new"]


def test_recorded_ids_are_forgotten_oldest_first_past_the_limit(monkeypatch):
    monkeypatch.setattr("workers.ledger.REMEMBERED_IDS", 3)
    recorded = RecordedTasks()
    for task_id in "abcd":
        recorded.remember(task_id, COMPLETED)
    assert [recorded.status_of(t) for t in "abcd"] == [None, COMPLETED, COMPLETED, COMPLETED]


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    settings = Settings.from_env({"OUTPUT_DIR": str(tmp_path / "out")}, dotenv_path=None)
    return Ledger(settings, instance="test", heartbeat=multiprocessing.Value("d", 0.0))


def test_what_each_record_asks_of_redis(ledger: Ledger):
    """A fresh final record is announced with the line results.json got; a
    retry is scheduled; a duplicate of a recorded task announces that record
    (its dead letter too, if it failed); one of an unknown outcome only lets go."""
    completed = record("t1")
    completed.results_json = b'{"line": 1}'
    assert (ledger._acknowledgement(completed).kind, ledger._acknowledgement(completed).event) == ("final", b'{"line": 1}')

    retry = record("t2", RETRY)
    retry.retry_at = 123.0
    assert (ledger._acknowledgement(retry).kind, ledger._acknowledgement(retry).retry_at) == ("retry", 123.0)

    failed = record("t3", FAILED, error="bad")
    ack = ledger._acknowledgement(failed)
    assert ack.kind == "final" and b'"error": "bad"' in ack.dead_letter

    ledger.recorded.remember("t4", FAILED)
    again = record("t4", COMPLETED, delivery=2)
    again.duplicate = True
    ack = ledger._acknowledgement(again)
    assert ack.kind == "final" and ack.dead_letter and b'"status": "failed"' in ack.event

    unknown = record("t5", RETRY, delivery=2)
    unknown.duplicate = True
    assert ledger._acknowledgement(unknown).kind == "ack"


# ------------------------------------------------------------ the worker's outbox


def test_without_a_backlog_each_record_goes_at_once():
    outbox = Outbox(backlog=False)
    assert [len(outbox.add(record(f"t{n}"), more_coming=True, now=0.0)) for n in range(3)] == [1, 1, 1]


def test_under_a_backlog_records_wait_for_the_last_of_the_claim_or_the_deadline():
    outbox = Outbox(backlog=True)
    assert outbox.add(record("a"), more_coming=True, now=0.0) == []
    assert outbox.add(record("b"), more_coming=True, now=OUTBOX_SECONDS / 2) == []
    assert [r.task_id for r in outbox.add(record("c"), more_coming=False, now=OUTBOX_SECONDS / 2)] == ["a", "b", "c"]
    assert outbox.add(record("d"), more_coming=True, now=1.0) == []
    assert [r.task_id for r in outbox.add(record("e"), more_coming=True, now=1.0 + 2 * OUTBOX_SECONDS)] == ["d", "e"]
    assert outbox.take() == []


def test_under_a_backlog_a_full_outbox_goes_before_its_deadline():
    outbox = Outbox(backlog=True)
    big = record("big")
    big.envelope = b"x" * OUTBOX_BYTES
    assert outbox.add(record("a"), more_coming=True, now=0.0) == []
    assert [r.task_id for r in outbox.add(big, more_coming=True, now=0.0)] == ["a", "big"]


# ------------------------------------------------------------ host drain


def test_drain_sends_a_task_with_a_url_on_without_its_segment_whatever_its_text():
    """A lone surrogate in a message once made every drain of that host die."""
    entry = b'{"request_id": "\\ud800", "image_id": "x", "shm_info": "img_shm_gone", "image_url": "http://h/a"}'
    disposal = dispose(entry, host_id="lost", task_id=None, deliveries=0, now=datetime(2026, 12, 2))
    assert disposal.target == SHARED
    assert disposal.value == b'{"request_id": "\\ud800", "image_id": "x", "image_url": "http://h/a"}'


def test_drain_dead_letters_a_shared_memory_task_without_url_with_its_identity():
    entry = b'{"request_id": "r", "image_id": "i", "shm_info": "img_shm_gone"}'
    disposal = dispose(entry, host_id="lost", task_id="abc", deliveries=2, now=datetime(2026, 12, 2))
    assert disposal.target == DEAD
    letter = json.loads(disposal.value)
    assert (letter["task_id"], letter["attempts"], letter["message"]) == ("abc", 2, entry.decode())
    assert "host lost was drained" in letter["error"]
