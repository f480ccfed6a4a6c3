"""Deadlines against a real pool: a task whose `deadline` has passed when a
worker would start it ends as exactly one failed record whose error starts
with "expired", with no fetch, no decode and no JPEG, and its segment released;
at the first delivery, at a retry that comes due, and at a redelivery after a
crash. A `deadline` that is not a finite number is bad input: a failed record.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np

from harness.segments import SegmentTracker, make_segment, segment_exists
from image_result_client.protocol import QueueKeys
from tests.helpers import assert_exactly_once, dead_letters, push, wait_for_records, wait_until

WAIT = 60.0


def png_of(photo: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", photo)
    assert ok
    return encoded.tobytes()


def url_task(request_id: str, url: str, **fields: object) -> dict:
    return {"request_id": request_id, "image_id": request_id, "image_url": url, **fields}


def no_jpegs(output_dir: Path) -> bool:
    return not list(output_dir.glob("*.jpg")) and not list((output_dir / ".partial").glob("*"))


def unreadable_segment_task(request_id: str, url: str, deadline: float) -> tuple[dict, str]:
    """A shared-memory task whose segment is there but smaller than its shape
    says, so the worker falls back to its URL: a segment task that can be retried."""
    name = make_segment(np.zeros((8, 8, 3), np.uint8))
    message = {
        "request_id": request_id,
        "image_id": request_id,
        "shm_info": {"shm_name": name, "shape": [64, 64, 3], "dtype": "uint8", "size": 64 * 64 * 3},
        "image_url": url,
        "deadline": deadline,
    }
    return message, name


def test_expired_at_first_delivery_is_one_failed_record_without_fetch_or_jpeg(
    pool_factory, redis_client, queue_name, http_server, photos, segments: SegmentTracker
):
    url = http_server.add("/late.png", png_of(photos["astronaut"]), content_type="image/png")
    fresh_url = http_server.add("/fresh.png", png_of(photos["chelsea"]), content_type="image/png")
    past = time.time() - 1
    expired_shm = segments.message("late_shm", "late_shm", photos["coffee"])
    expired_shm["deadline"] = past
    push(redis_client, queue_name, expired_shm)
    push(redis_client, queue_name, url_task("late_url", url, deadline=past))
    push(redis_client, queue_name, url_task("fresh_url", fresh_url, deadline=time.time() + 3600))
    pool = pool_factory(workers=1)
    records = {r["request_id"]: r for r in wait_for_records(pool.output_dir, 3, timeout=WAIT, pool=pool)}
    assert pool.stop() == 0
    assert_exactly_once(pool.output_dir, ["late_shm", "late_url", "fresh_url"], redis_client, queue_name)
    assert records["fresh_url"]["status"] == "completed"
    for request_id in ("late_shm", "late_url"):
        record = records[request_id]
        assert record["status"] == "failed" and record["error"].startswith("expired"), record
        assert record["file_path"] is None and record["attempts"] == 1
    assert http_server.hits("/late.png") == 0
    assert encoded_by(pool) == 1  # the fresh one only: nothing of the expired ones was encoded
    assert sorted(p.name for p in pool.output_dir.glob("*.jpg")) == [Path(records["fresh_url"]["file_path"]).name]
    assert not segment_exists(expired_shm["shm_info"]["shm_name"]), "the expired task's segment was not released"
    assert sorted(d["request_id"] for d in dead_letters(redis_client, queue_name)) == ["late_shm", "late_url"]


def test_expired_when_its_retry_comes_due(pool_factory, redis_client, queue_name, http_server, photos):
    """The retry is scheduled before the deadline; by the time it comes due
    (the pool was stopped meanwhile) the deadline has passed: one failed record,
    and the server saw only the first attempt's request."""
    url = http_server.add("/busy.png", b"busy", status=503, headers={"Retry-After": "1"})
    backup = http_server.add("/busy_shm.png", b"busy", status=503, headers={"Retry-After": "1"})
    deadline = time.time() + 6
    push(redis_client, queue_name, url_task("retried_url", url, deadline=deadline))
    shm_message, segment = unreadable_segment_task("retried_shm", backup, deadline)
    push(redis_client, queue_name, shm_message)
    keys = QueueKeys(queue_name)
    pool = pool_factory(workers=1)
    pool.wait_ready()
    wait_until(lambda: redis_client.zcard(keys.delayed) == 2, 30, "both tasks should wait for a retry")
    assert pool.stop() == 0
    assert read_nothing(pool.output_dir)
    # Now the images are there; had anything fetched them after the deadline, it would complete.
    http_server.add("/busy.png", png_of(photos["astronaut"]), content_type="image/png")
    http_server.add("/busy_shm.png", png_of(photos["astronaut"]), content_type="image/png")
    wait_until(lambda: time.time() > deadline, 10, "the deadline should pass")
    pool = pool_factory(workers=1)
    records = {r["request_id"]: r for r in wait_for_records(pool.output_dir, 2, timeout=WAIT, pool=pool)}
    assert pool.stop() == 0
    assert_exactly_once(pool.output_dir, ["retried_url", "retried_shm"], redis_client, queue_name)
    for record in records.values():
        assert record["status"] == "failed" and record["error"].startswith("expired"), record
        assert record["attempts"] == 2
    assert http_server.hits("/busy.png") == 1 and http_server.hits("/busy_shm.png") == 1
    assert encoded_by(pool) == 0
    assert no_jpegs(pool.output_dir)
    assert not segment_exists(segment), "the expired task's segment was not released"
    assert redis_client.zcard(keys.delayed) == 0


def test_deadline_before_the_retry_ends_the_task_then(pool_factory, redis_client, queue_name, http_server):
    """A retry that would come due after the deadline is not waited for, nor
    tried up to MAX_ATTEMPTS: the task fails at once."""
    url = http_server.add("/slow.png", b"slow down", status=429, headers={"Retry-After": "60"})
    push(redis_client, queue_name, url_task("too_late", url, deadline=time.time() + 20))
    pool = pool_factory(workers=1)
    (record,) = wait_for_records(pool.output_dir, 1, timeout=WAIT, pool=pool)
    assert pool.stop() == 0
    assert record["status"] == "failed" and record["error"].startswith("expired"), record
    assert "429" in record["error"] and record["attempts"] == 1
    assert redis_client.zcard(QueueKeys(queue_name).delayed) == 0
    assert http_server.hits("/slow.png") == 1


def test_expired_at_redelivery_after_a_crash(
    pool_factory, redis_client, queue_name, http_server, photos, segments: SegmentTracker, tmp_path
):
    """The whole pool dies with the tasks claimed; they come back after the
    deadline passed, to a new pool, and end expired without being fetched."""
    url = http_server.add("/crash.png", png_of(photos["astronaut"]), content_type="image/png")
    crash = {"IRW_CRASH_AT": "worker_after_claim", "IRW_CRASH_HOST": "true",
             "IRW_CRASH_MARKER": str(tmp_path / "crashed"), "LEASE_TTL": "2"}
    pool = pool_factory(workers=1, env=crash)
    pool.wait_ready()
    deadline = time.time() + 4
    shm = segments.message("crash_shm", "crash_shm", photos["coffee"])
    shm["deadline"] = deadline
    push(redis_client, queue_name, shm)
    push(redis_client, queue_name, url_task("crash_url", url, deadline=deadline))
    pool.wait_exit(timeout=30)
    assert (tmp_path / "crashed").exists()
    wait_until(lambda: time.time() > deadline, 10, "the deadline should pass")
    pool = pool_factory(workers=1, env={"LEASE_TTL": "2"})
    records = {r["request_id"]: r for r in wait_for_records(pool.output_dir, 2, timeout=WAIT, pool=pool)}
    assert pool.stop() == 0
    assert_exactly_once(pool.output_dir, ["crash_shm", "crash_url"], redis_client, queue_name)
    for record in records.values():
        assert record["status"] == "failed" and record["error"].startswith("expired"), record
    assert max(record["attempts"] for record in records.values()) == 2  # the one in hand at the crash
    assert http_server.hits("/crash.png") == 0
    assert no_jpegs(pool.output_dir)
    assert not segment_exists(shm["shm_info"]["shm_name"])


def test_bad_deadline_is_a_failed_record(pool_factory, redis_client, queue_name, http_server, photos):
    url = http_server.add("/ok.png", png_of(photos["astronaut"]), content_type="image/png")
    bad = {"string": b'"tomorrow"', "nan": b"NaN", "inf": b"Infinity", "list": b"[1700000000]", "huge": b"1e400"}
    for name, raw in bad.items():
        head = json.dumps(url_task(name, url))[:-1]
        redis_client.rpush(queue_name, head.encode() + b', "deadline": ' + raw + b"}")
    segment = make_segment(photos["coffee"])
    shm = {"request_id": "bad_shm", "image_id": "bad_shm", "deadline": "now",
           "shm_info": {"shm_name": segment, "shape": list(photos["coffee"].shape), "dtype": "uint8"}}
    push(redis_client, queue_name, shm)
    pool = pool_factory(workers=1)
    records = wait_for_records(pool.output_dir, len(bad) + 1, timeout=WAIT, pool=pool)
    assert pool.stop() == 0
    assert_exactly_once(pool.output_dir, [*bad, "bad_shm"], redis_client, queue_name)
    for record in records:
        assert record["status"] == "failed" and "deadline" in record["error"], record
    assert http_server.hits("/ok.png") == 0
    assert not segment_exists(segment)


def encoded_by(pool) -> int:
    """Frames the pool's workers encoded, as each says when it stops."""
    stopped = pool.events("worker_stopped")
    assert stopped, "no worker said what it encoded"
    return sum(event["encoded"] for event in stopped)


def read_nothing(output_dir: Path) -> bool:
    """No record yet: a task waiting for its retry has none."""
    results = output_dir / "results.json"
    return not results.exists() or json.loads(results.read_text() or "[]") == []
