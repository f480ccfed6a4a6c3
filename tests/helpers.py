"""Helpers that several test modules share: pushing tasks, waiting for the pool,
asserting on its output, running operator commands.

What starts and reads real things (the pool, /proc, segments, photos,
results.json, an HTTP server) is the harness (harness/), which the benchmark,
the soak and the demo use too; the fixtures in conftest.py own the lifetimes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import redis

from harness import REPO_ROOT
from harness.photos import photo_of_size
from harness.pool import Pool, environment_without
from harness.results import read_results
from harness.segments import SegmentTracker
from image_result_client.protocol import RESULTS_NAME, QueueKeys, awaiting_publication

# ---------------------------------------------------------------- images


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for 8-bit images; inf when identical."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if mse == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(255.0**2 / mse))


# ---------------------------------------------------------------- Redis and waits


def push(client: redis.Redis, queue: str, message: Mapping[str, Any] | list[Any] | str | bytes) -> int:
    """RPUSH a message (dicts and lists as JSON, str/bytes as given); returns the list length."""
    payload = message if isinstance(message, (str, bytes)) else json.dumps(message)
    return int(client.rpush(queue, payload))


def dead_letters(client: redis.Redis, queue: str, *, junk: bool = False) -> list[dict[str, Any]]:
    """The JSON entries of '{queue}:dead' (or, with junk, of '{queue}:dead:junk', where
    those of messages without a request_id go), oldest first."""
    keys = QueueKeys(queue)
    return [json.loads(raw) for raw in client.lrange(keys.dead_junk if junk else keys.dead, 0, -1)]


def wait_for_records(
    output_dir: Path, count: int, timeout: float = 60.0, *, pool: Pool | None = None
) -> list[dict[str, Any]]:
    """Poll results.json until it holds at least count records, and every
    completed one's JPEG has its final name (docs/formats.md); returns them all.

    With pool given, fails at once (with its stderr tail) if the pool exits.
    """
    deadline = time.monotonic() + timeout
    records: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        records = read_results(output_dir)
        if len(records) >= count and not any(awaiting_publication(Path(output_dir), r) for r in records):
            return records
        if pool is not None and pool.poll() is not None:
            raise AssertionError(
                f"pool exited with {pool.poll()} after {len(records)} of {count} records\n{pool.stderr_tail()}"
            )
        time.sleep(0.1)
    seen = f"; the pool: {pool.describe()}" if pool is not None else ""
    raise AssertionError(
        f"saw {len(records)} of {count} records in {Path(output_dir) / RESULTS_NAME} after {timeout}s{seen}"
    )


def wait_for_queue_drained(client: redis.Redis, queue: str, timeout: float = 30.0) -> None:
    """Poll until the queue and every processing list of it are empty: the
    redeliveries after a crash have been taken and acknowledged, not only the
    records written."""
    prefix = QueueKeys(queue).prefix

    def lists() -> dict[str, int]:
        return {key.decode(): client.llen(key) for key in [queue.encode(), *client.keys(f"{prefix}:processing:*")]}

    try:
        wait_until(lambda: not any(lists().values()), timeout, "")
    except AssertionError:
        held = {key: n for key, n in lists().items() if n}
        raise AssertionError(f"after {timeout}s these lists of {queue} still hold tasks: {held}") from None


def wait_until(predicate: Callable[[], Any], timeout: float, message: str, interval: float = 0.05) -> Any:
    """Poll until predicate() is truthy and return its value; AssertionError(message) on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{message} (waited {timeout}s)")


# ---------------------------------------------------------------- shared by several test modules


def push_photos(
    client: redis.Redis,
    queue: str,
    segments: SegmentTracker,
    count: int,
    *,
    size: tuple[int, int],
    request_images: int | None = None,
) -> list[str]:
    """Push `count` SHM tasks of a real photo; returns their request ids. With
    request_images, each message declares it (docs/formats.md)."""
    frame = photo_of_size(*size)
    request_ids = []
    for index in range(count):
        request_id = f"req_{index:04d}"
        message = segments.message(request_id, f"image_{index:04d}", frame)
        if request_images is not None:
            message["request_images"] = request_images
        push(client, queue, message)
        request_ids.append(request_id)
    return request_ids


def worker_pids(pool: Pool) -> list[int]:
    return [pid for pid, role in pool.children_by_role().items() if role == "worker"]


def assert_exactly_once(output_dir: Path, request_ids: list[str], client: redis.Redis, queue: str) -> list[dict]:
    """One record per task, one file per completed record, no leftovers anywhere."""
    records = read_results(output_dir)
    counts = Counter(record["request_id"] for record in records)
    assert sorted(counts) == sorted(request_ids), "a task is missing from results.json"
    assert max(counts.values()) == 1, f"doubled: {[k for k, v in counts.items() if v > 1]}"
    files = sorted(p.name for p in output_dir.glob("*.jpg"))
    recorded = sorted(Path(r["file_path"]).name for r in records if r["status"] == "completed")
    assert files == recorded, "files on disk and completed records differ"
    assert list((output_dir / ".partial").iterdir()) == [], "stray partial files"
    assert client.llen(queue) == 0
    for key in client.keys(f"{QueueKeys(queue).prefix}:processing:*"):
        assert client.llen(key) == 0, f"{key!r} still holds tasks"
    return records


def operator_env(*, redis_url: str, queue: str, output_dir: Path) -> dict[str, str]:
    """The environment of an operator's command: only these settings."""
    env = environment_without()
    env.update(REDIS_URL=redis_url, HOSTING_TASKS_QUEUE=queue, OUTPUT_DIR=str(output_dir))
    return env


def operator_command(*args: str, redis_url: str, queue: str, output_dir: Path) -> subprocess.CompletedProcess:
    """`python supervisor.py ARGS` as an operator runs it, with only these settings from the environment."""
    env = operator_env(redis_url=redis_url, queue=queue, output_dir=output_dir)
    return subprocess.run(
        [sys.executable, "supervisor.py", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30
    )


def command(pool: Pool, *args: str, redis_url: str | None = None) -> subprocess.CompletedProcess:
    return operator_command(*args, redis_url=redis_url or pool.redis_url, queue=pool.queue, output_dir=pool.output_dir)
