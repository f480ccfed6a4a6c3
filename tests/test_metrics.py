"""Prometheus metrics and /healthz, scraped over real HTTP from a running pool."""

from __future__ import annotations

import os
import re
import signal
import urllib.error
import urllib.request

from tests.helpers import push, wait_for_records, wait_until
from tests.test_reliability import push_photos, worker_pids
from tools.local_redis import free_port


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format, or None."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if found == labels or (labels and all(found.get(k) == v for k, v in labels.items()) and len(found) == len(labels)):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_count_tasks_phases_restarts_and_queue(pool_factory, redis_client, queue_name, segments):
    port = free_port()
    pool = pool_factory(workers=2, env={"METRICS_PORT": str(port), "METRICS_ADDRESS": "127.0.0.1"})
    pool.wait_ready()
    assert scrape(port, "/healthz") == (200, "ok\n")
    push_photos(redis_client, queue_name, segments, 4, size=(256, 256))
    push(redis_client, queue_name, b"not json")
    wait_for_records(pool.output_dir, 5, pool=pool)

    def counted() -> str | None:
        text = scrape(port)[1]
        done = sample(text, "image_result_tasks_total", status="completed", source="shm") == 4
        done = done and sample(text, "image_result_tasks_total", status="failed", source="none") == 1
        # The queue's figures are read from Redis every QUEUE_REFRESH_SECONDS.
        return text if done and sample(text, "image_result_dead_letters") == 1 else None

    text = wait_until(counted, 10, "metrics never counted the tasks")
    assert sample(text, "image_result_task_phase_seconds_count", phase="encode") == 4
    assert sample(text, "image_result_task_phase_seconds_count", phase="ledger") == 5
    assert sample(text, "image_result_task_phase_seconds_count", phase="write") == 4
    assert sample(text, "image_result_queue_depth") == 0
    assert sample(text, "image_result_dead_letters") == 1
    assert sample(text, "image_result_workers") == 2

    os.kill(worker_pids(pool)[0], signal.SIGKILL)
    wait_until(
        lambda: sample(scrape(port)[1], "image_result_child_restarts_total", role="worker") == 1,
        10,
        "the restart was not counted",
    )
    assert scrape(port, "/nowhere")[0] == 404
    assert pool.stop() == 0


def test_counts_survive_a_ledger_restart(pool_factory, redis_client, queue_name, segments):
    """Each ledger's counts are cumulative since its start; the supervisor banks
    them when it is replaced, so counters never go backwards."""
    port = free_port()
    pool = pool_factory(workers=1, env={"METRICS_PORT": str(port), "METRICS_ADDRESS": "127.0.0.1"})
    pool.wait_ready()
    push_photos(redis_client, queue_name, segments, 3, size=(256, 256))
    wait_for_records(pool.output_dir, 3, pool=pool)
    completed = lambda: sample(scrape(port)[1], "image_result_tasks_total", status="completed", source="shm")  # noqa: E731
    wait_until(lambda: completed() == 3, 10, "first ledger's counts never arrived")
    (ledger,) = [pid for pid, title in pool.children_by_title().items() if title.endswith(": ledger")]
    os.kill(ledger, signal.SIGKILL)
    wait_until(lambda: scrape(port, "/healthz")[0] == 200 and pool.events("ledger_started")[1:], 15, "no new ledger")
    push_photos(redis_client, queue_name, segments, 2, size=(256, 256))
    wait_for_records(pool.output_dir, 5, pool=pool)
    wait_until(lambda: completed() == 5, 10, "counts went wrong across the ledger restart")
    assert pool.stop() == 0
