"""Nothing lost, nothing doubled: real processes killed, real Redis taken away.

Each test drives `python supervisor.py` as an operator would (signals, kill -9)
and then checks what a user would: every pushed task has exactly one record
and, when completed, exactly one file; nothing is left in Redis or .partial.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import redis

from harness.photos import photo_of_size
from harness.pool import Pool
from harness.procfs import CLOCK_TICKS, cpu_ticks, pid_alive
from harness.results import read_results
from harness.segments import segment_exists
from image_result_client.protocol import QueueKeys
from tests.helpers import (
    assert_exactly_once,
    push,
    push_photos,
    wait_for_queue_drained,
    wait_for_records,
    wait_until,
    worker_pids,
)


def ledger_pid(pool: Pool) -> int | None:
    pids = [pid for pid, title in pool.children_by_title().items() if title.endswith(": ledger")]
    return pids[0] if pids else None


def tree_cpu_seconds(pool: Pool) -> float:
    """User and system CPU of the supervisor and its live children so far."""
    return cpu_ticks(pool.tree_pids()) / CLOCK_TICKS


def test_worker_killed_mid_load_loses_and_doubles_nothing(pool_factory, redis_client, queue_name, segments):
    # Queued before the pool starts: pushing while it runs, it would keep up.
    request_ids = push_photos(redis_client, queue_name, segments, 600, size=(1024, 1024))
    pool = pool_factory(workers=2)
    pool.wait_ready()
    rng = random.Random(7)
    kills = 0
    while kills < 6 and len(read_results(pool.output_dir)) < len(request_ids) - 10:
        victims = worker_pids(pool)
        if victims:
            os.kill(rng.choice(victims), signal.SIGKILL)
            kills += 1
        time.sleep(0.1)
    wait_for_records(pool.output_dir, len(request_ids), pool=pool)
    wait_for_queue_drained(redis_client, queue_name)  # redelivered duplicates acknowledged too
    assert pool.stop() == 0
    assert kills >= 3, "the load finished before the test could kill enough workers"
    records = assert_exactly_once(pool.output_dir, request_ids, redis_client, queue_name)
    assert all(record["status"] == "completed" for record in records)
    assert [name for name in segments.names if segment_exists(name)] == []
    assert len(pool.events("child_died")) == kills
    assert pool.events("tasks_requeued"), "no killed worker had a task in flight"


def test_ledger_killed_mid_load_keeps_results_valid_and_complete(pool_factory, redis_client, queue_name, segments):
    # Queued before the pool starts, and many: the ledger commits dozens of
    # records at a time under a backlog.
    request_ids = push_photos(redis_client, queue_name, segments, 1500, size=(512, 512))
    pool = pool_factory(workers=2)
    pool.wait_ready()
    kills = 0
    while kills < 3 and len(read_results(pool.output_dir)) < len(request_ids) - 150:
        if len(read_results(pool.output_dir)) > 150 * (kills + 1):
            victim = wait_until(lambda: ledger_pid(pool), 10, "no ledger running")
            os.kill(victim, signal.SIGKILL)
            kills += 1
            wait_until(lambda victim=victim: ledger_pid(pool) not in (None, victim), 10, "ledger not replaced")
        time.sleep(0.05)
    wait_for_records(pool.output_dir, len(request_ids), pool=pool)
    wait_for_queue_drained(redis_client, queue_name)  # redelivered duplicates acknowledged too
    assert pool.stop() == 0
    assert kills >= 1
    with open(pool.output_dir / "results.json") as results:
        json.load(results)  # valid JSON, not just readable with retries
    assert_exactly_once(pool.output_dir, request_ids, redis_client, queue_name)


def test_sigterm_finishes_in_flight_work_and_exits_zero(pool_factory, redis_client, queue_name, segments):
    request_ids = push_photos(redis_client, queue_name, segments, 40, size=(2160, 3840))
    pool = pool_factory(workers=2)
    pool.wait_ready()
    wait_for_records(pool.output_dir, 2, pool=pool)
    assert pool.stop(signal.SIGTERM) == 0
    assert "STOPPING=1" in "\n".join(pool.notifications())
    done = {record["request_id"] for record in read_results(pool.output_dir)}
    assert 2 <= len(done) < len(request_ids)
    assert redis_client.llen(queue_name) == len(request_ids) - len(done), "a task is neither done nor queued"
    for key in redis_client.keys(f"{QueueKeys(queue_name).prefix}:processing:*"):
        assert redis_client.llen(key) == 0
    # A new pool finishes the rest, and nothing is done twice.
    second = pool_factory(workers=2)
    wait_for_records(second.output_dir, len(request_ids), pool=second)
    assert second.stop() == 0
    assert_exactly_once(pool.output_dir, request_ids, redis_client, queue_name)


def test_idle_pool_stops_without_waiting_out_its_blocking_waits(pool_factory, redis_client, queue_name, segments):
    """Idle workers sit in a BLMOVE of BLOCK_SECONDS (2 s) and the ledger in a
    select of 1 s; a stop interrupts both instead of waiting them out (it took
    3.3 s before), and leaves nothing behind in Redis."""
    pool = pool_factory(workers=2)
    pool.wait_ready()
    time.sleep(0.3)  # every worker is in its blocking wait by now
    started = time.monotonic()
    assert pool.stop(signal.SIGTERM) == 0, pool.stderr_tail()
    # Well under the 2 s a worker's wait would have taken; a slow machine only adds a little.
    assert time.monotonic() - started < 1.5, pool.stderr_tail()
    assert pool.events("worker_stopped") and pool.events("ledger_stopped")
    for key in redis_client.keys(f"{QueueKeys(queue_name).prefix}:processing:*"):
        assert redis_client.llen(key) == 0
    # The queue still works as before for the next pool.
    request_ids = push_photos(redis_client, queue_name, segments, 3, size=(256, 256))
    second = pool_factory(workers=2)
    wait_for_records(second.output_dir, len(request_ids), pool=second)
    assert second.stop() == 0
    assert_exactly_once(second.output_dir, request_ids, redis_client, queue_name)


def pool_busy_with_a_slow_download(pool_factory, redis_client, queue_name, http_server, env) -> Pool:
    """A one-worker pool whose worker is stuck in a download that trickles bytes."""
    http_server.trickle("/slow.png", interval=0.2)
    push(redis_client, queue_name, {"request_id": "slow", "image_id": "slow", "image_url": http_server.url("/slow.png")})
    pool = pool_factory(workers=1, env={**env, "LOG_LEVEL": "DEBUG"})
    pool.wait_ready()
    wait_until(lambda: pool.events("task_started"), 10, "task never started")
    return pool


def test_grace_period_over_puts_unfinished_task_back(pool_factory, redis_client, queue_name, http_server):
    """A task still running when SHUTDOWN_GRACE ends is killed and requeued, not lost."""
    env = {"SHUTDOWN_GRACE": "1", "URL_READ_TIMEOUT": "120"}
    pool = pool_busy_with_a_slow_download(pool_factory, redis_client, queue_name, http_server, env)
    started = time.monotonic()
    assert pool.stop(signal.SIGTERM, timeout=30) == 0
    assert time.monotonic() - started < 15
    assert read_results(pool.output_dir) == []
    assert redis_client.llen(queue_name) == 1
    assert json.loads(redis_client.lindex(queue_name, 0))["request_id"] == "slow"  # the producer's bytes


def test_second_signal_stops_at_once(pool_factory, redis_client, queue_name, http_server):
    env = {"SHUTDOWN_GRACE": "300", "URL_READ_TIMEOUT": "300"}
    pool = pool_busy_with_a_slow_download(pool_factory, redis_client, queue_name, http_server, env)
    pool.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    pool.send_signal(signal.SIGINT)
    assert pool.wait_exit(timeout=20) == 0
    assert pool.events("shutdown_hurried")
    assert redis_client.llen(queue_name) == 1


def blocked_signals(pid: int) -> set[signal.Signals]:
    """The signals `pid` holds pending, from the SigBlk mask in /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            mask = int(line.split()[1], 16)
            return {sig for sig in signal.Signals if mask >> (sig - 1) & 1}
    return set()


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_stop_signal_during_start_up_exits_cleanly(pool_factory, redis_client, queue_name, segments, signal_name):
    """systemd may stop a unit that is still starting, and an operator may press
    Ctrl-C at once. A signal that comes while the supervisor imports and boots
    (most of its first second) used to kill it by the default action: exit -15,
    or a KeyboardInterrupt traceback. Now it waits for the loop: exit 0, no child
    forked, and the tasks queued meanwhile are still queued for the next pool."""
    request_ids = push_photos(redis_client, queue_name, segments, 2, size=(64, 64))
    pool = pool_factory(workers=2)
    wait_until(
        lambda: signal.SIGTERM in blocked_signals(pool.pid) or pool.poll() is not None,
        10,
        "the supervisor never held stop signals during start-up",
        interval=0.005,
    )
    assert pool.stop(signal.Signals[signal_name], before_ready=True) == 0, pool.stderr_tail()
    assert "Traceback" not in pool.stderr_tail()
    assert not pool.events("child_started")
    assert redis_client.llen(queue_name) == len(request_ids)


def test_supervisor_killed_children_do_not_outlive_it(pool_factory):
    pool = pool_factory(workers=2)
    pool.wait_ready()
    children = pool.child_pids()
    assert len(children) == 3
    os.kill(pool.pid, signal.SIGKILL)
    pool.proc.wait(timeout=10)
    wait_until(lambda: not any(pid_alive(pid) for pid in children), 10, "children outlived the supervisor")


def test_whole_tree_killed_then_restarted_recovers_in_flight_tasks(pool_factory, redis_client, queue_name, segments, tmp_path):
    """A host that loses power mid-task: the whole tree dies at once, with tasks
    claimed and a JPEG half-way to its record. The next pool on the same Redis
    finds the dead instance's lists and ends every task exactly once."""
    request_ids = push_photos(redis_client, queue_name, segments, 40, size=(1024, 1024))
    env = {"LEASE_TTL": "2"}
    # The first worker to write a partial JPEG takes the whole process group down
    # with it, so a task is in flight when the tree dies, however fast the pool is.
    power_cut = {"IRW_CRASH_AT": "worker_after_partial", "IRW_CRASH_HOST": "true",
                 "IRW_CRASH_MARKER": str(tmp_path / "power_cut")}
    first = pool_factory(workers=2, env={**env, **power_cut})
    assert first.wait_exit(timeout=60) == -signal.SIGKILL
    first.kill_all()  # the children, if any outlived the group kill
    processing = redis_client.keys(f"{QueueKeys(queue_name).prefix}:processing:*")
    stranded = sum(redis_client.llen(key) for key in processing)
    assert stranded > 0, "the power cut left nothing in flight: the test tests no recovery"
    second = pool_factory(workers=2, env=env)
    second.wait_ready()
    wait_for_records(second.output_dir, len(request_ids), timeout=90, pool=second)
    wait_for_queue_drained(redis_client, queue_name)
    assert second.stop() == 0
    assert_exactly_once(second.output_dir, request_ids, redis_client, queue_name)
    # Recovered by the orphan scan, not by luck: each stranded list was found and requeued.
    found = {e["processing_list"] for e in second.events("orphaned_list_found")}
    assert found >= {key.decode() for key in processing}
    assert sum(e["tasks"] for e in second.events("tasks_requeued")) >= stranded


def test_task_that_hangs_is_killed_and_given_up_after_max_attempts(pool_factory, redis_client, queue_name, http_server, segments):
    """TASK_TIMEOUT kills a stuck worker; the task is redelivered, and after
    MAX_ATTEMPTS deliveries it is recorded as failed and dead-lettered."""
    http_server.trickle("/forever.png", interval=0.2)
    push(redis_client, queue_name, {"request_id": "stuck", "image_id": "stuck", "image_url": http_server.url("/forever.png")})
    good = push_photos(redis_client, queue_name, segments, 3, size=(512, 512))
    env = {"TASK_TIMEOUT": "3", "MAX_ATTEMPTS": "2", "URL_READ_TIMEOUT": "600"}
    pool = pool_factory(workers=2, env=env)
    records = wait_for_records(pool.output_dir, 4, timeout=60, pool=pool)
    assert pool.stop() == 0
    by_request = {record["request_id"]: record for record in records}
    assert all(by_request[r]["status"] == "completed" for r in good)
    # Claimed together with the stuck task, but never started when it hung.
    assert [by_request[r]["attempts"] for r in good] == [1, 1, 1]
    stuck = by_request["stuck"]
    assert stuck["status"] == "failed" and "gave up after 2 deliveries" in stuck["error"]
    # At least the two deliveries of the stuck task; on a loaded machine an idle
    # worker may also miss a 3 s deadline, which costs nothing but a respawn.
    assert len(pool.events("worker_hung")) >= 2
    assert all("killed by the supervisor" in e["cause"] for e in pool.events("child_died"))
    (dead,) = [json.loads(entry) for entry in redis_client.lrange(QueueKeys(queue_name).dead, 0, -1)]
    assert json.loads(dead["message"])["request_id"] == "stuck"


def test_redis_down_at_start_then_up(pool_factory, redis_server, redis_client, queue_name, segments):
    redis_server.stop()
    try:
        password_url = redis_server.url.replace("redis://", "redis://:s3cret-pw@")
        pool = pool_factory(workers=1, env={"REDIS_URL": password_url})
        wait_until(lambda: len(pool.events("redis_unavailable")) >= 2, 20, "no redis_unavailable log")
        assert not any("READY=1" in n for n in pool.notifications())
        assert pool.poll() is None, "the pool gave up while Redis was down"
        assert "s3cret-pw" not in pool.stderr_text()
    finally:
        redis_server.start()
    # With a password the private server does not expect, the pool keeps
    # failing to authenticate; the point above was the redaction. Start a
    # clean pool for the recovery half.
    pool.kill_all()
    redis_server.stop()
    try:
        pool = pool_factory(workers=1)
        wait_until(lambda: pool.events("redis_unavailable"), 20, "no redis_unavailable log")
    finally:
        redis_server.start()
    pool.wait_ready(timeout=30)
    request_ids = push_photos(redis.Redis.from_url(redis_server.url), queue_name, segments, 3, size=(512, 512))
    wait_for_records(pool.output_dir, 3, pool=pool)
    assert pool.stop() == 0
    assert {r["request_id"] for r in read_results(pool.output_dir)} == set(request_ids)


def test_redis_restarted_mid_run_pool_carries_on(pool_factory, redis_server, redis_client, queue_name, segments):
    pool = pool_factory(workers=2)
    pool.wait_ready()
    first = push_photos(redis_client, queue_name, segments, 5, size=(512, 512))
    wait_for_records(pool.output_dir, 5, pool=pool)
    redis_server.stop()
    cpu_before = tree_cpu_seconds(pool)
    time.sleep(3)  # long enough for every process to notice
    spent = tree_cpu_seconds(pool) - cpu_before
    redis_server.start()
    assert spent < 0.5, f"the pool burned {spent:.2f} s of CPU in 3 s without Redis"
    client = redis.Redis.from_url(redis_server.url)
    frame = photo_of_size(512, 512)
    for index in range(5):
        push(client, queue_name, segments.message(f"after_{index}", f"after_{index}", frame))
    wait_for_records(pool.output_dir, 10, timeout=60, pool=pool)
    assert pool.stop() == 0
    assert pool.events("redis_reconnected")
    assert not pool.events("child_died"), "a process died instead of reconnecting"
    assert sorted(r["request_id"] for r in read_results(pool.output_dir)) == sorted(
        first + [f"after_{i}" for i in range(5)]
    )


def test_children_are_named_by_role(pool_factory):
    pool = pool_factory(workers=3)
    pool.wait_ready()
    titles = sorted(pool.children_by_title().values())
    assert titles == ["image-result-worker: ledger"] + [f"image-result-worker: worker {n}" for n in range(3)]
    assert pool.stop() == 0


def test_systemd_notifications_in_order(pool_factory):
    pool = pool_factory(workers=1, env={"WATCHDOG_USEC": "30000000"})
    pool.wait_ready()
    wait_until(lambda: "WATCHDOG=1" in pool.notifications(), 10, "no WATCHDOG=1")
    assert pool.stop() == 0
    lines = [line for datagram in pool.notifications() for line in datagram.splitlines()]
    assert lines.index("READY=1") < lines.index("WATCHDOG=1") < lines.index("STOPPING=1")
    assert any(line.startswith("STATUS=") for line in lines)


def test_second_supervisor_on_same_output_dir_refuses(pool_factory):
    first = pool_factory(workers=1)
    first.wait_ready()
    second = pool_factory(workers=1)
    assert second.wait_exit(timeout=20) == 6
    assert "in use by another supervisor" in second.stderr_text()
    assert first.stop() == 0


@pytest.mark.parametrize("signal_name", ["SIGTTIN", "SIGTTOU"])
def test_live_scaling(pool_factory, signal_name):
    pool = pool_factory(workers=2)
    pool.wait_ready()
    pool.send_signal(getattr(signal, signal_name))
    expected = 3 if signal_name == "SIGTTIN" else 1
    wait_until(lambda: len(worker_pids(pool)) == expected, 15, f"worker count did not become {expected}")
    assert pool.stop() == 0
