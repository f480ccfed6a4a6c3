"""Faults of the machine around the pool: a full disk, children that cannot
boot, and a second supervisor on the same queue."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path

import cv2
import pytest

from harness.photos import photo_of_size
from harness.results import read_results
from shared.storage.results_file import ResultsFile
from tests.helpers import assert_exactly_once, push, push_photos, wait_for_records, wait_until, worker_pids


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MiB tmpfs: a real file system that really fills up (needs root)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory: Path) -> Path:
    """Take every free byte of the file system that holds `directory`."""
    filler = directory / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for block_size in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * block_size)
            except OSError:
                continue  # full at this block size; try smaller ones
    finally:
        os.close(fd)
    return filler


def test_full_disk_slows_the_pool_down_and_loses_nothing(pool_factory, redis_client, queue_name, segments, small_disk):
    output_dir = small_disk / "out"
    pool = pool_factory(workers=2, output_dir=output_dir)
    pool.wait_ready()
    filler = fill(small_disk)
    request_ids = push_photos(redis_client, queue_name, segments, 6, size=(512, 512))
    wait_until(lambda: len(pool.events("jpeg_write_failed")) >= 2, 20, "workers never hit the full disk")
    assert read_results(output_dir) == [], "a record was written although its JPEG could not be"
    assert not pool.events("task_failed")
    filler.unlink()
    wait_for_records(output_dir, len(request_ids), timeout=60, pool=pool)
    assert pool.stop() == 0
    records = assert_exactly_once(output_dir, request_ids, redis_client, queue_name)
    assert all(record["status"] == "completed" for record in records)


def test_workers_that_cannot_boot_are_respawned_with_backoff(pool_factory, redis_client, queue_name, segments, tmp_path):
    output_dir = tmp_path / "out"
    pool = pool_factory(workers=1, output_dir=output_dir)
    pool.wait_ready()
    # A file where the partial-file folder should be: a new worker cannot boot.
    shutil.rmtree(output_dir / ".partial")
    (output_dir / ".partial").write_bytes(b"in the way")
    (victim,) = worker_pids(pool)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(pool.events("respawn_throttled")) >= 3, 30, "no respawn backoff")
    delays = [event["retry_in"] for event in pool.events("respawn_throttled")]
    assert delays[2] > delays[0], "the backoff did not grow"
    assert len(pool.events("worker_boot_failed")) < 10, "respawning at full speed"
    (output_dir / ".partial").unlink()
    push(redis_client, queue_name, segments.message("after", "after", photo_of_size(256, 256)))
    (record,) = wait_for_records(output_dir, 1, timeout=60, pool=pool)
    assert record["status"] == "completed"
    assert pool.stop() == 0


def test_two_supervisors_on_one_queue_share_it_without_stealing(pool_factory, redis_client, queue_name, segments, tmp_path):
    env = {"LEASE_TTL": "2"}  # orphan scans every 2 s: any theft would show
    first = pool_factory(workers=1, env=env, output_dir=tmp_path / "out-a")
    second = pool_factory(workers=1, env=env, output_dir=tmp_path / "out-b")
    first.wait_ready()
    second.wait_ready()
    request_ids = push_photos(redis_client, queue_name, segments, 300, size=(1024, 1024))
    wait_until(
        lambda: len(read_results(tmp_path / "out-a")) + len(read_results(tmp_path / "out-b")) >= len(request_ids),
        120,
        "the two pools did not finish the queue",
    )
    assert first.stop() == 0 and second.stop() == 0
    records = read_results(tmp_path / "out-a") + read_results(tmp_path / "out-b")
    counts = Counter(record["request_id"] for record in records)
    assert sorted(counts) == sorted(request_ids) and max(counts.values()) == 1
    assert read_results(tmp_path / "out-a") and read_results(tmp_path / "out-b"), "one pool did all the work"
    assert not first.events("orphaned_list_found") and not second.events("orphaned_list_found")


def test_record_durable_but_file_unpublished_is_published_at_start(pool_factory, tmp_path, photos):
    """The ledger died between its commit point (the record) and publishing the
    JPEG: the next ledger finishes the publication from the record."""
    output_dir = tmp_path / "out"
    (output_dir / ".partial").mkdir(parents=True)
    ok, jpeg = cv2.imencode(".jpg", photos["astronaut"])
    (output_dir / ".partial" / "0123abcd-1-0.2.jpg").write_bytes(jpeg.tobytes())
    final = output_dir / "image_001_20241201_143022.jpg"
    record = {
        "timestamp": "2024-12-01T14:30:22.123456", "request_id": "req_001", "image_id": "image_001",
        "file_path": str(final), "status": "completed", "task_id": "0123abcd-1-0", "attempts": 2,
    }
    (output_dir / "results.json").write_text("[\n" + json.dumps(record) + "\n]\n")
    pool = pool_factory(workers=1, output_dir=output_dir)
    pool.wait_ready()
    assert pool.stop() == 0
    assert final.read_bytes() == jpeg.tobytes()
    assert list((output_dir / ".partial").iterdir()) == []
    assert read_results(output_dir) == [record]


def test_results_append_on_a_full_disk_fails_cleanly_and_resumes(small_disk):
    """ENOSPC mid-append: the append raises, the file stays valid JSON with every
    earlier record, and once space returns the next append works."""
    results = ResultsFile(small_disk / "results.json")
    results.open()
    results.append([{"request_id": "before", "padding": "x" * 100}])
    filler = fill(small_disk)
    big_batch = [{"request_id": f"r{i}", "padding": "x" * 1000} for i in range(200)]
    with pytest.raises(OSError):
        results.append(big_batch)
    assert [r["request_id"] for r in json.loads((small_disk / "results.json").read_text())] == ["before"]
    filler.unlink()
    results.append([{"request_id": "after"}])
    assert [r["request_id"] for r in json.loads((small_disk / "results.json").read_text())] == ["before", "after"]
    results.close()
