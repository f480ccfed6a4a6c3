"""`python supervisor.py status|check|dead ...` against a real pool and Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from shared.redis_queue import QueueKeys
from tests.helpers import POOL_ENV_VARS, REPO_ROOT, Pool, push, wait_for_records, wait_until
from tests.test_reliability import push_photos, worker_pids


def operator_command(*args: str, redis_url: str, queue: str, output_dir: Path) -> subprocess.CompletedProcess:
    """`python supervisor.py ARGS` as an operator runs it, with only these settings from the environment."""
    env = {k: v for k, v in os.environ.items() if k not in POOL_ENV_VARS}
    env.update(REDIS_URL=redis_url, HOSTING_TASKS_QUEUE=queue, OUTPUT_DIR=str(output_dir))
    return subprocess.run(
        [sys.executable, "supervisor.py", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30
    )


def command(pool: Pool, *args: str, redis_url: str | None = None) -> subprocess.CompletedProcess:
    return operator_command(*args, redis_url=redis_url or pool.redis_url, queue=pool.queue, output_dir=pool.output_dir)


def test_status_reports_queue_workers_and_recent_outcomes(pool_factory, redis_client, queue_name, segments):
    pool = pool_factory(workers=2, env={"LEASE_TTL": "3"})
    pool.wait_ready()
    push_photos(redis_client, queue_name, segments, 5, size=(256, 256))
    push(redis_client, queue_name, b"not json")
    wait_for_records(pool.output_dir, 6, pool=pool)
    report = wait_until(
        lambda: (r := json.loads(command(pool, "status", "--json").stdout))["supervisors"]
        and r["supervisors"][0]["ready"] and r,
        10,
        "status never showed the ready supervisor",
    )
    assert report["queue_depth"] == 0 and report["in_flight"] == 0 and report["dead_letters"] == 1
    assert report["last_minute"] == {"completed": 5, "failed": 1, "retried": 0}
    (supervisor,) = report["supervisors"]
    assert len(supervisor["workers"]) == 2 and supervisor["ledger"]["pid"] > 0
    assert all(worker["heartbeat_age"] < 10 for worker in supervisor["workers"])
    text = command(pool, "status")
    assert text.returncode == 0 and "0 waiting" in text.stdout and "worker 1" in text.stdout
    assert pool.stop() == 0
    redis_client.rpush(queue_name, b"{}")
    after = json.loads(command(pool, "status", "--json").stdout)
    assert after["queue_depth"] == 1 and after["supervisors"] == []


def test_check_is_healthy_only_while_the_pool_serves(pool_factory, redis_server):
    pool = pool_factory(workers=1)
    pool.wait_ready()
    healthy = wait_until(lambda: (done := command(pool, "check")).returncode == 0 and done, 10, "never healthy")
    assert healthy.stdout.strip() == "healthy"
    down = command(pool, "check", redis_url="redis://127.0.0.1:1/0")
    assert down.returncode == 1 and len(down.stderr.strip().splitlines()) == 1 and "Traceback" not in down.stderr
    assert pool.stop() == 0
    stopped = command(pool, "check")
    assert stopped.returncode == 1 and "not running" in stopped.stderr


def test_dead_letters_can_be_listed_requeued_and_purged(pool_factory, redis_client, queue_name):
    pool = pool_factory(workers=1)
    pool.wait_ready()
    for index in range(3):
        push(redis_client, queue_name, {"request_id": f"bad_{index}", "image_id": "x"})
    wait_for_records(pool.output_dir, 3, pool=pool)
    wait_until(lambda: redis_client.llen(QueueKeys(queue_name).dead) == 3, 10, "dead letters missing")
    listing = command(pool, "dead", "list", "--json")
    entries = [json.loads(line) for line in listing.stdout.splitlines()]
    assert [e["request_id"] for e in entries] == ["bad_0", "bad_1", "bad_2"]
    requeued = command(pool, "dead", "requeue", "--limit", "2")
    assert requeued.returncode == 0 and "requeued 2" in requeued.stdout
    # The replayed messages run again (and fail again, being still bad): new records, new dead letters.
    wait_for_records(pool.output_dir, 5, pool=pool)
    wait_until(lambda: redis_client.llen(QueueKeys(queue_name).dead) == 3, 10, "replayed tasks not dead-lettered")
    purged = command(pool, "dead", "purge")
    assert purged.returncode == 0 and redis_client.llen(QueueKeys(queue_name).dead) == 0
    assert pool.stop() == 0


def test_watchdog_pings_reach_systemd(pool_factory):
    pool = pool_factory(workers=1, env={"WATCHDOG_USEC": "30000000"})
    pool.wait_ready()
    wait_until(lambda: "WATCHDOG=1" in pool.notifications(), 10, "no WATCHDOG=1")
    assert pool.stop() == 0


def test_unknown_subcommand_is_a_one_line_usage_error(pool_factory):
    pool = pool_factory(workers=1)
    done = command(pool, "dead", "resurrect")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


def test_sighup_rereads_settings_and_replaces_workers_without_losing_tasks(
    pool_factory, redis_client, queue_name, segments, tmp_path
):
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / ".env").write_text("WORKERS=1\nJPEG_QUALITY=20\n")
    pool = pool_factory(workers=None, cwd=workdir)
    pool.wait_ready()
    before = worker_pids(pool)
    assert len(before) == 1
    push_photos(redis_client, queue_name, segments, 20, size=(512, 512))
    (workdir / ".env").write_text("WORKERS=2\nJPEG_QUALITY=95\n")
    pool.send_signal(signal.SIGHUP)
    wait_until(lambda: len(pids := worker_pids(pool)) == 2 and not set(pids) & set(before), 15, "workers not replaced")
    push_photos(redis_client, queue_name, segments, 1, size=(512, 512))  # after the reload
    records = wait_for_records(pool.output_dir, 21, pool=pool)
    assert sorted(r["request_id"] for r in records) == sorted([f"req_{i:04d}" for i in range(20)] + ["req_0000"])
    assert all(r["status"] == "completed" for r in records)
    # The same photo: first at quality 20 (before the reload), last at 95.
    first, last = sorted((r for r in records if r["request_id"] == "req_0000"), key=lambda r: r["timestamp"])
    assert last["bytes"] > 1.5 * first["bytes"]
    (workdir / ".env").write_text("JPEG_QUALITY=500\n")
    pool.send_signal(signal.SIGHUP)
    wait_until(lambda: pool.events("reload_refused"), 10, "a bad reload was not refused")
    assert len(worker_pids(pool)) == 2
    assert pool.stop() == 0
