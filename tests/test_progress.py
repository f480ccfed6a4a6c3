"""Progress lines: the tally of the stats buckets (in-process and on a real
Redis), and a real pool that logs them under a backlog and not when idle."""

from __future__ import annotations

import time

import cv2
import pytest

from control.progress import ProgressMeter, progress_fields, tally
from harness.photos import photo_of_size
from image_result_client.protocol import STATS_BUCKET_SECONDS, QueueKeys
from shared.state.stats import OutcomeStats
from tests.helpers import push, wait_for_records, wait_until


@pytest.mark.fast
def test_tally_counts_what_each_bucket_gained_and_forgets_old_ones():
    seen = {10: {"completed": 5, "failed": 1, "retried": 0}}
    gained = tally(seen, {10: {"completed": 7, "failed": 1, "retried": 0}, 11: {"completed": 2}}, forget_before=0)
    assert gained == {"completed": 4, "failed": 0, "retried": 0}
    # A bucket that expired reads empty: nothing is taken back, nothing counted twice.
    assert tally(seen, {10: {}, 11: {"completed": 2}}, forget_before=11) == {"completed": 0, "failed": 0, "retried": 0}
    assert list(seen) == [11]


@pytest.mark.fast
def test_progress_fields_say_rate_and_eta_and_nothing_when_idle():
    idle = {"completed": 0, "failed": 0, "retried": 0}
    assert progress_fields(idle, seconds=30, waiting=0) is None
    stalled = progress_fields(idle, seconds=30, waiting=12)
    assert stalled is not None and stalled["rate_per_s"] == 0 and stalled["eta_s"] is None
    busy = progress_fields({"completed": 57, "failed": 3, "retried": 4}, seconds=30, waiting=600)
    assert busy == {"completed": 57, "failed": 3, "retried": 4, "rate_per_s": 2.0, "waiting": 600, "eta_s": 300,
                    "over_s": 30.0}
    assert progress_fields({"completed": 0, "failed": 0, "retried": 1}, seconds=30, waiting=0)["eta_s"] is None


def test_meter_reads_the_buckets_the_ledger_counts_into(redis_client, queue_name):
    keys = QueueKeys(queue_name)
    meter = ProgressMeter()
    stats = OutcomeStats(redis_client, keys)
    wall = 1_000_000.0 * STATS_BUCKET_SECONDS  # the start of a bucket

    def step(at: float):
        return meter.step(stats, every=30, waiting_lists=(queue_name,), now=at, wall_now=wall + at)

    redis_client.hincrby(keys.stats(wall), "completed", 100)  # before the first read: not ours to report
    assert step(0) is None
    redis_client.hincrby(keys.stats(wall), "completed", 10)
    assert step(5) is None  # not yet due: no read
    assert step(10) is None  # read, but no line before 30 s
    redis_client.hincrby(keys.stats(wall + 15), "completed", 20)
    redis_client.hincrby(keys.stats(wall + 15), "failed", 5)
    redis_client.hincrby(keys.stats(wall + 9), "completed", 5)  # a late count into an older bucket
    redis_client.rpush(queue_name, *[b"{}"] * 70)
    assert step(20) is None
    line = step(30)
    assert line == {"completed": 35, "failed": 5, "retried": 0, "rate_per_s": round(40 / 30, 2), "waiting": 70,
                    "eta_s": round(70 / (40 / 30)), "over_s": 30.0}
    redis_client.delete(queue_name)
    for at in (40, 50, 60):
        assert step(at) is None  # idle: nothing done, nothing waiting


def test_a_pool_logs_progress_under_a_backlog_and_none_when_idle(pool_factory, redis_client, queue_name, http_server):
    pool = pool_factory(workers=2, env={"PROGRESS_SECONDS": "1"})
    pool.wait_ready()
    time.sleep(2)
    assert pool.events("progress") == []  # idle since start
    # A backlog of a few seconds: downloads, decodes and encodes of a real photo.
    url = http_server.add("/photo.jpg", cv2.imencode(".jpg", photo_of_size(768, 768))[1].tobytes())
    total = 800
    for index in range(total):
        push(redis_client, queue_name, {"request_id": f"req_{index}", "image_id": f"img_{index}", "image_url": url})
    wait_for_records(pool.output_dir, total, pool=pool)
    # The last line counts what was done since the one before it.
    wait_until(lambda: sum(line["completed"] for line in pool.events("progress")) == total, 10,
               f"progress lines never added up to {total}: {pool.events('progress')}")
    lines = pool.events("progress")
    assert len(lines) >= 2, lines
    assert all(line["level"] == "info" and line["role"] == "supervisor" for line in lines)
    assert all(line["failed"] == 0 and 0.5 < line["over_s"] < 3 for line in lines), lines
    # over_s is rounded to a tenth
    assert all(line["rate_per_s"] == pytest.approx(line["completed"] / line["over_s"], rel=0.1) for line in lines), lines
    backlog = [line for line in lines if line["waiting"] > 0]
    assert backlog and all(0 < line["waiting"] < total for line in backlog), lines
    assert all(line["eta_s"] == round(line["waiting"] / line["rate_per_s"]) for line in backlog if line["rate_per_s"])
    settled = len(lines)
    time.sleep(3)
    assert len(pool.events("progress")) == settled  # idle again: silent
    assert pool.stop() == 0
