"""Flow control against a real pool, Redis and /dev/shm: producers stop at the
shared-memory budget (SHM_BUDGET_BYTES) and the queue limit (MAX_QUEUE_LENGTH)
with PushRefused or exit 75, never leave a segment without its message, and
whatever they queued drains once the pool can work, exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from control.dashboard_data import Overview
from harness import REPO_ROOT
from harness.pool import POOL_ENV_VARS
from harness.results import read_results
from image_result_client import FlowLimits, Producer, PushRefused
from image_result_client.flow import EX_TEMPFAIL
from image_result_client.producer import write_segment
from image_result_client.protocol import SHM_DIR, QueueKeys
from shared.config import Settings
from tests.helpers import assert_exactly_once, command, wait_for_records, wait_until
from tools.local_redis import free_port

WAIT = 90.0
CLI_TIMEOUT = 60.0


def segments_under(prefix: str) -> set[str]:
    return {name for name in os.listdir(SHM_DIR) if name.startswith(prefix)}


def queued_segments(client: redis.Redis, *queues: str) -> set[str]:
    names = set()
    for queue in queues:
        for raw in client.lrange(queue, 0, -1):
            names.add(json.loads(raw)["shm_info"]["shm_name"])
    return names


def shm_bytes_held(prefix: str) -> int:
    """The memory the segments under `prefix` hold in /dev/shm (tmpfs pages)."""
    total = 0
    with os.scandir(SHM_DIR) as entries:
        for entry in entries:
            try:
                if entry.name.startswith(prefix):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


class ShmWatcher:
    """Samples the memory held under a prefix in /dev/shm as fast as it can,
    from a thread: the most it ever saw is what the budget must bound."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.most = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, shm_bytes_held(self.prefix))
            self.samples += 1

    @contextmanager
    def running(self) -> Iterator[ShmWatcher]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


def push_until_refused(redis_url: str, queue: str, frame: np.ndarray, limits: FlowLimits, prefix: str,
                       label: str, outcome: dict[str, object]) -> None:
    """A producer that pushes frames forever; notes how many went and what stopped it."""
    count = 0
    with Producer.from_url(redis_url, queue=queue, limits=limits) as producer:
        try:
            while count < 10_000:
                producer.submit_array(frame, request_id=f"{label}_{count:05d}", image_id=f"{label}_{count:05d}",
                                      prefix=prefix)
                count += 1
        except PushRefused as exc:
            outcome[label] = (count, exc.limit, str(exc))
            return
    outcome[label] = (count, None, "never refused")


def fill_producers(redis_url: str, queue: str, frame: np.ndarray, limits: FlowLimits, prefix: str,
                   producers: int = 3) -> dict[str, tuple]:
    outcome: dict[str, object] = {}
    threads = [
        threading.Thread(target=push_until_refused, args=(redis_url, queue, frame, limits, prefix, f"p{i}", outcome))
        for i in range(producers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT)
    assert not any(thread.is_alive() for thread in threads), "a producer never stopped"
    return outcome  # type: ignore[return-value]


def test_producers_pushing_forever_stop_at_the_budget_and_everything_drains_once_the_pool_starts(
    pool_factory, redis_server, redis_client, queue_name, photos, shm_prefix
):
    frame = photos["astronaut"]
    budget = 12 * frame.nbytes + frame.nbytes // 2  # room for 12 frames, not 13
    limits = FlowLimits(shm_budget_bytes=budget, push_wait=2.0, shm_name_prefix=shm_prefix)
    with ShmWatcher(shm_prefix).running() as watcher:
        outcome = fill_producers(redis_server.url, queue_name, frame, limits, shm_prefix)
    assert all(limit == "SHM_BUDGET_BYTES" for _, limit, _ in outcome.values()), outcome
    assert all("SHM_BUDGET_BYTES" in text for _, _, text in outcome.values())
    queued = sum(count for count, _, _ in outcome.values())
    assert queued == 12, outcome
    assert watcher.samples > 10 and watcher.most <= budget, (watcher.most, budget)
    # Every segment has its message, and every message its segment.
    assert segments_under(shm_prefix) == queued_segments(redis_client, queue_name)

    pool = pool_factory(workers=2)
    request_ids = [f"{label}_{n:05d}" for label, (count, _, _) in outcome.items() for n in range(count)]
    wait_for_records(pool.output_dir, queued, timeout=WAIT, pool=pool)
    assert pool.stop() == 0
    records = assert_exactly_once(pool.output_dir, request_ids, redis_client, queue_name)
    assert all(record["status"] == "completed" for record in records)
    assert segments_under(shm_prefix) == set()


def test_a_full_output_disk_holds_producers_at_the_budget_until_it_has_room(
    pool_factory, redis_server, redis_client, queue_name, photos, shm_prefix, tmp_path
):
    """The pool runs but cannot write a JPEG (its OUTPUT_DIR is a full tmpfs):
    frames wait in /dev/shm, producers stop at the budget; room on the disk
    again, and everything drains."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "small_disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    pool = None
    try:
        output_dir = disk / "out"
        pool = pool_factory(workers=2, output_dir=output_dir)
        pool.wait_ready()
        filler = disk / "filler"
        with filler.open("wb") as out:
            try:
                while True:
                    out.write(b"\0" * 65536)
                    out.flush()
            except OSError:
                pass  # full
        frame = photos["chelsea"]
        budget = 8 * frame.nbytes + frame.nbytes // 2
        limits = FlowLimits(shm_budget_bytes=budget, push_wait=1.0, shm_name_prefix=shm_prefix)
        with ShmWatcher(shm_prefix).running() as watcher:
            outcome = fill_producers(redis_server.url, queue_name, frame, limits, shm_prefix, producers=2)
        assert all(limit == "SHM_BUDGET_BYTES" for _, limit, _ in outcome.values()), outcome
        assert watcher.most <= budget, (watcher.most, budget)
        queued = sum(count for count, _, _ in outcome.values())
        assert queued == 8, outcome
        assert pool.events("jpeg_write_failed"), "the pool should have met the full disk"
        assert read_results(output_dir) == []

        filler.unlink()
        request_ids = [f"{label}_{n:05d}" for label, (count, _, _) in outcome.items() for n in range(count)]
        wait_for_records(output_dir, queued, timeout=WAIT, pool=pool)
        assert pool.stop() == 0
        records = assert_exactly_once(output_dir, request_ids, redis_client, queue_name)
        assert all(record["status"] == "completed" for record in records)
        assert segments_under(shm_prefix) == set()
    finally:
        if pool is not None:
            pool.kill_all()  # before the unmount: nothing of ours may hold it
        subprocess.run(["umount", str(disk)], check=False)


# ---------------------------------------------------------------- the command line


def run_cli(args: list[str], *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {name: value for name, value in os.environ.items() if name not in POOL_ENV_VARS}
    for name in ("PUSH_WAIT", "MAX_QUEUE_LENGTH", "SHM_BUDGET_BYTES"):
        clean.pop(name, None)
    clean.update(env, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-m", "image_result_client", *args],
        check=False, cwd=cwd, env=clean, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=CLI_TIMEOUT,
    )


def test_cli_stops_at_the_budget_with_exit_75_and_one_line(
    pool_factory, redis_server, redis_client, queue_name, photos, shm_prefix, tmp_path
):
    image = tmp_path / "astronaut.png"
    cv2.imwrite(str(image), photos["astronaut"])
    frame_bytes = photos["astronaut"].nbytes
    env = {
        "REDIS_URL": redis_server.url, "HOSTING_TASKS_QUEUE": queue_name, "OUTPUT_DIR": str(tmp_path / "out"),
        "SHM_BUDGET_BYTES": str(3 * frame_bytes + 100), "PUSH_WAIT": "0.3", "SHM_NAME_PREFIX": shm_prefix,
    }
    done = run_cli(["enqueue", "--shm-prefix", shm_prefix, *[str(image)] * 6], cwd=tmp_path, env=env)
    assert done.returncode == EX_TEMPFAIL, done.stdout + done.stderr
    (line,) = done.stderr.splitlines()
    assert "SHM_BUDGET_BYTES" in line and line.endswith("(3 queued)"), line
    assert redis_client.llen(queue_name) == 3
    assert segments_under(shm_prefix) == queued_segments(redis_client, queue_name)

    room = run_cli(["room", "--bytes", str(frame_bytes)], cwd=tmp_path, env=env)
    assert room.returncode == EX_TEMPFAIL and room.stdout.startswith("room      100 bytes"), room.stdout + room.stderr

    pool = pool_factory(workers=1)
    wait_for_records(pool.output_dir, 3, timeout=WAIT, pool=pool)
    assert pool.stop() == 0
    assert segments_under(shm_prefix) == set()
    room = run_cli(["room", "--bytes", str(frame_bytes)], cwd=tmp_path, env=env)
    assert room.returncode == 0, room.stdout + room.stderr


def test_cli_stops_at_the_queue_limit_with_exit_75(redis_server, redis_client, queue_name, tmp_path):
    env = {"REDIS_URL": redis_server.url, "HOSTING_TASKS_QUEUE": queue_name, "MAX_QUEUE_LENGTH": "3",
           "PUSH_WAIT": "0.2"}
    urls = [f"http://images.example/{n}.jpg" for n in range(5)]
    done = run_cli(["enqueue", "--expires-in", "60", *urls], cwd=tmp_path, env=env)
    assert done.returncode == EX_TEMPFAIL, done.stdout + done.stderr
    (line,) = done.stderr.splitlines()
    assert "MAX_QUEUE_LENGTH=3" in line and line.endswith("(3 queued)"), line
    messages = [json.loads(raw) for raw in redis_client.lrange(queue_name, 0, -1)]
    assert [m["image_url"] for m in messages] == urls[:3]
    assert all(time.time() + 50 < m["deadline"] <= time.time() + 60 for m in messages)


def test_a_bad_flow_setting_is_a_usage_error(redis_server, queue_name, tmp_path):
    env = {"REDIS_URL": redis_server.url, "HOSTING_TASKS_QUEUE": queue_name, "SHM_BUDGET_BYTES": "lots"}
    done = run_cli(["enqueue", "http://images.example/a.jpg"], cwd=tmp_path, env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "SHM_BUDGET_BYTES" in done.stderr


# ---------------------------------------------------------------- the queue limit in the library


def test_queue_limit_counts_the_hosts_queue_for_frames(redis_server, redis_client, queue_name, photos, shm_prefix):
    limits = FlowLimits(shm_budget_bytes=0, push_wait=0.2, max_queue_length=3, shm_name_prefix=shm_prefix)
    with Producer.from_url(redis_server.url, queue=queue_name, host_id="h1", limits=limits) as producer:
        producer.submit_url("http://images.example/a.jpg", image_id="a")
        producer.submit_array(photos["camera"], image_id="b", prefix=shm_prefix)
        producer.submit_array(photos["camera"], image_id="c", prefix=shm_prefix)
        with pytest.raises(PushRefused) as refused:
            producer.submit_array(photos["camera"], image_id="d", prefix=shm_prefix)
        assert refused.value.limit == "MAX_QUEUE_LENGTH"
        # A URL task counts only the shared queue, which holds one.
        producer.submit_url("http://images.example/e.jpg", image_id="e")
    assert len(segments_under(shm_prefix)) == 2


# ---------------------------------------------------------------- what the operator sees


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def sample(text: str, name: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name:
                return found.value
    return None


def test_frames_waiting_against_the_budget_and_expired_tasks_are_shown(
    pool_factory, redis_client, queue_name, photos, shm_prefix, http_server
):
    """Metrics, `status` and the dashboard's data show the bytes of frames in
    /dev/shm under SHM_NAME_PREFIX against SHM_BUDGET_BYTES; the metrics count
    expired tasks on their own."""
    frame = photos["astronaut"]
    budget = 10 * frame.nbytes
    port = free_port()
    env = {"METRICS_PORT": str(port), "METRICS_ADDRESS": "127.0.0.1", "SHM_NAME_PREFIX": shm_prefix,
           "SHM_BUDGET_BYTES": str(budget), "LEASE_TTL": "3"}
    for index in range(2):  # frames a producer made, not yet queued
        write_segment(f"{shm_prefix}waiting_{index}", frame)
    url = http_server.add("/late.png", b"never fetched")
    redis_client.rpush(queue_name, json.dumps({"request_id": "late", "image_id": "late", "image_url": url,
                                               "deadline": time.time() - 5}))
    pool = pool_factory(workers=1, env=env)
    pool.wait_ready()
    wait_for_records(pool.output_dir, 1, timeout=WAIT, pool=pool)

    def figures() -> tuple | None:
        text = scrape(port)
        found = (sample(text, "image_result_shm_waiting_bytes"), sample(text, "image_result_shm_budget_bytes"),
                 sample(text, "image_result_tasks_expired_total"))
        return found if found == (2 * frame.nbytes, budget, 1) else None

    wait_until(figures, 20, "the metrics should show 2 frames waiting of the budget and 1 expired task")

    def status_text() -> str | None:
        done = command(pool, "status")
        lines = [line for line in done.stdout.splitlines() if "shared memory" in line]
        return done.stdout if lines and "20%" in lines[0] else None

    text = wait_until(status_text, 20, "status should show the frames waiting")
    assert f"shared memory  {2 * frame.nbytes / 1e6:.1f} MB of frames waiting, 20% of SHM_BUDGET_BYTES" in text, text
    assert "last minute: 0 completed, 1 failed (1 expired), 0 retried" in text, text
    settings = Settings.from_env({"REDIS_URL": pool.redis_url, "HOSTING_TASKS_QUEUE": queue_name}, dotenv_path=None)
    overview = json.loads(Overview(redis_client, settings, refresh_seconds=0).get())
    (supervisor,) = overview["supervisors"]
    assert supervisor["shm"] == {"waiting_bytes": 2 * frame.nbytes, "budget_bytes": budget}
    assert pool.stop() == 0


# ---------------------------------------------------------------- the order of queues


def test_a_full_host_queue_does_not_starve_the_shared_queue(
    pool_factory, redis_client, queue_name, segments, http_server, photos
):
    """120 frames wait in the host's queue and 4 URL tasks in the shared one:
    the URL tasks are done among the first claims, not after every frame."""
    frame = np.ascontiguousarray(photos["astronaut"][:64, :64])
    host_queue = QueueKeys(queue_name).host("h1")
    for index in range(120):
        redis_client.rpush(host_queue, json.dumps(segments.message(f"frame_{index:03d}", f"frame_{index:03d}", frame)))
    ok, png = cv2.imencode(".png", frame)
    url = http_server.add("/shared.png", png.tobytes(), content_type="image/png")
    for index in range(4):
        redis_client.rpush(queue_name, json.dumps({"request_id": f"url_{index}", "image_id": f"url_{index}",
                                                   "image_url": url}))
    pool = pool_factory(workers=1, env={"HOST_ID": "h1", "HOST_QUEUE": "true"})
    records = wait_for_records(pool.output_dir, 124, timeout=WAIT, pool=pool)
    assert pool.stop() == 0
    order = [record["request_id"] for record in records]
    assert all(record["status"] == "completed" for record in records)
    shared_at = [order.index(f"url_{index}") for index in range(4)]
    assert max(shared_at) < 40, shared_at  # one claim in CLAIM_CYCLE goes to the shared queue first
