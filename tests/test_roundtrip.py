"""End-to-end round trips through the real pool: `python supervisor.py` on a private
redis-server, real photos in real /dev/shm segments and on a loopback HTTP server.

Each test starts one pool, pushes all of its cases at once and waits for the records.
"""

from __future__ import annotations

import re
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import redis

from harness.http_server import HttpServer
from harness.photos import photo_of_size
from harness.pool import Pool
from harness.segments import SegmentTracker, segment_exists
from image_result_client.protocol import QueueKeys
from tests.conftest import PoolFactory
from tests.helpers import psnr, push, wait_for_records, wait_until

WAIT = 60.0


def start(pool_factory: PoolFactory, **kwargs: Any) -> Pool:
    pool = pool_factory(**kwargs)
    pool.wait_ready()
    return pool


def by_request(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Records keyed by request_id; each request_id must appear exactly once."""
    keyed: dict[str, dict[str, Any]] = {}
    for record in records:
        assert record["request_id"] not in keyed, f"two records for {record['request_id']}: {records}"
        keyed[record["request_id"]] = record
    return keyed


def assert_completed(record: dict[str, Any], output_dir: Path, *, source: str, height: int, width: int) -> Path:
    """The fields every completed record must have; returns its JPEG's path."""
    assert record["status"] == "completed", record
    assert "error" not in record, record
    assert record["source"] == source, record
    assert (record["width"], record["height"]) == (width, height), record
    datetime.fromisoformat(record["timestamp"])
    path = Path(record["file_path"])
    assert path.is_absolute(), record
    assert path.parent == output_dir.resolve(), record
    assert path.is_file(), record
    assert record["bytes"] == path.stat().st_size, record
    return path


def assert_file_name(record: dict[str, Any]) -> None:
    """`{image_id}_{YYYYMMDD_HHMMSS}.jpg`, the stamp being the record's own time."""
    name = Path(record["file_path"]).name
    assert re.fullmatch(rf"{re.escape(record['image_id'])}_\d{{8}}_\d{{6}}\.jpg", name), name
    stamp = datetime.fromisoformat(record["timestamp"]).strftime("%Y%m%d_%H%M%S")
    assert name == f"{record['image_id']}_{stamp}.jpg", (name, record["timestamp"])


def read_jpeg(path: Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    image = cv2.imread(str(path), flags)
    assert image is not None, f"{path} does not decode"
    return image


def processing_entries(client: redis.Redis, queue: str) -> int:
    """Elements held by every processing list of this queue."""
    return sum(client.llen(key) for key in client.scan_iter(match=f"{QueueKeys(queue).prefix}:processing:*"))


def png(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", image)
    assert ok
    return buffer.tobytes()


def jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buffer.tobytes()


# ---------------------------------------------------------------- shared memory


def test_shm_round_trip_of_real_photos(
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
    queue_name: str,
    photos: dict[str, np.ndarray],
    segments: SegmentTracker,
) -> None:
    pool = start(pool_factory)
    frames = {
        "astronaut": photos["astronaut"],
        "big": photo_of_size(1024, 1024),
        "chelsea": photos["chelsea"],  # 300x451, not square
    }
    messages = {name: segments.message(f"req-{name}", f"img-{name}", frame) for name, frame in frames.items()}
    for message in messages.values():
        push(redis_client, queue_name, message)

    records = by_request(wait_for_records(pool.output_dir, len(frames), WAIT, pool=pool))

    for name, frame in frames.items():
        record = records[f"req-{name}"]
        assert record["image_id"] == f"img-{name}"
        path = assert_completed(record, pool.output_dir, source="shm", height=frame.shape[0], width=frame.shape[1])
        assert_file_name(record)
        saved = read_jpeg(path)
        assert saved.shape == frame.shape
        assert psnr(saved, frame) > 30, name
    names = [message["shm_info"]["shm_name"] for message in messages.values()]
    wait_until(lambda: not any(segment_exists(n) for n in names), 10, f"segments still in /dev/shm: {names}")
    assert not pool.events("crash_point_armed"), "a pool without IRW_CRASH_AT has no test hook armed"


def test_unlink_shm_false_keeps_the_segment(
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
    queue_name: str,
    photos: dict[str, np.ndarray],
    segments: SegmentTracker,
) -> None:
    pool = start(pool_factory, env={"UNLINK_SHM": "false"})
    message = segments.message("req-keep", "img-keep", photos["astronaut"])
    push(redis_client, queue_name, message)

    (record,) = wait_for_records(pool.output_dir, 1, WAIT, pool=pool)
    assert_completed(record, pool.output_dir, source="shm", height=512, width=512)
    # The segment would be unlinked right after the acknowledgement: wait for that, then a little more.
    wait_until(lambda: processing_entries(redis_client, queue_name) == 0, 10, "task never acknowledged")
    time.sleep(0.5)
    assert segment_exists(message["shm_info"]["shm_name"])


# ---------------------------------------------------------------- URL


def test_url_round_trip_of_a_png(
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
    queue_name: str,
    photos: dict[str, np.ndarray],
    http_server: HttpServer,
) -> None:
    pool = start(pool_factory)
    source = photos["astronaut"]
    url = http_server.add("/photos/astronaut.png", png(source), content_type="image/png")
    push(redis_client, queue_name, {"request_id": "req-url", "image_id": "img-url", "image_url": url})

    (record,) = wait_for_records(pool.output_dir, 1, WAIT, pool=pool)
    assert record["request_id"] == "req-url"
    path = assert_completed(record, pool.output_dir, source="url", height=512, width=512)
    assert_file_name(record)
    assert psnr(read_jpeg(path), source) > 30
    assert http_server.hits("/photos/astronaut.png") == 1


def test_shm_first_then_url_fallback(
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
    queue_name: str,
    photos: dict[str, np.ndarray],
    http_server: HttpServer,
    segments: SegmentTracker,
) -> None:
    pool = start(pool_factory)
    chelsea, coffee = photos["chelsea"], photos["coffee"]
    # The segment is gone (never made): the URL is the fallback.
    fallback_url = http_server.add("/fallback.png", png(chelsea), content_type="image/png")
    missing = {
        "request_id": "req-missing",
        "image_id": "img-missing",
        "shm_info": {"shm_name": "img_shm_" + uuid.uuid4().hex, "shape": [300, 451, 3], "dtype": "uint8"},
        "image_url": fallback_url,
    }
    # The segment is there: the URL (serving another photo) must not even be fetched.
    unused_url = http_server.add("/unused.png", png(chelsea), content_type="image/png")
    present = segments.message("req-present", "img-present", coffee) | {"image_url": unused_url}
    push(redis_client, queue_name, missing)
    push(redis_client, queue_name, present)

    records = by_request(wait_for_records(pool.output_dir, 2, WAIT, pool=pool))

    path = assert_completed(records["req-missing"], pool.output_dir, source="url", height=300, width=451)
    assert psnr(read_jpeg(path), chelsea) > 30
    assert http_server.hits("/fallback.png") == 1
    path = assert_completed(
        records["req-present"], pool.output_dir, source="shm", height=coffee.shape[0], width=coffee.shape[1]
    )
    assert psnr(read_jpeg(path), coffee) > 30
    assert http_server.hits("/unused.png") == 0


def test_legacy_bare_string_shm_info(
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
    queue_name: str,
    photos: dict[str, np.ndarray],
    segments: SegmentTracker,
) -> None:
    pool = start(pool_factory)
    frame = photo_of_size(1024, 1024)
    legacy = segments.make(frame)
    wrong_size = segments.make(photos["astronaut"])  # 512x512x3: not what a bare name means
    push(redis_client, queue_name, {"request_id": "req-legacy", "image_id": "img-legacy", "shm_info": legacy})
    push(redis_client, queue_name, {"request_id": "req-wrong", "image_id": "img-wrong", "shm_info": wrong_size})

    records = by_request(wait_for_records(pool.output_dir, 2, WAIT, pool=pool))

    path = assert_completed(records["req-legacy"], pool.output_dir, source="shm", height=1024, width=1024)
    assert psnr(read_jpeg(path), frame) > 30
    failed = records["req-wrong"]
    assert failed["status"] == "failed", failed
    assert failed["file_path"] is None, failed
    assert "1024x1024x3" in failed["error"] and wrong_size in failed["error"], failed["error"]
    assert str(photos["astronaut"].nbytes) in failed["error"], failed["error"]


def test_frames_of_every_supported_layout_and_dtype(
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
    queue_name: str,
    photos: dict[str, np.ndarray],
    segments: SegmentTracker,
) -> None:
    pool = start(pool_factory)
    camera, astronaut, chelsea = photos["camera"], photos["astronaut"], photos["chelsea"]
    # name -> (frame sent, what the JPEG should look like, imread flags)
    cases = {
        "gray2d": (camera, camera, cv2.IMREAD_GRAYSCALE),
        "gray3d": (camera[:, :, np.newaxis], camera, cv2.IMREAD_GRAYSCALE),
        "bgra": (cv2.cvtColor(chelsea, cv2.COLOR_BGR2BGRA), chelsea, cv2.IMREAD_COLOR),
        "uint16": (astronaut.astype(np.uint16) * 257, astronaut, cv2.IMREAD_COLOR),
        "float32": (astronaut.astype(np.float32) / 255.0, astronaut, cv2.IMREAD_COLOR),
    }
    for name, (frame, _, _) in cases.items():
        push(redis_client, queue_name, segments.message(f"req-{name}", f"img-{name}", frame))

    records = by_request(wait_for_records(pool.output_dir, len(cases), WAIT, pool=pool))

    for name, (frame, expected, flags) in cases.items():
        height, width = frame.shape[:2]
        path = assert_completed(records[f"req-{name}"], pool.output_dir, source="shm", height=height, width=width)
        assert psnr(read_jpeg(path, flags), expected) > 30, name


# ---------------------------------------------------------------- file names


def test_colliding_and_hostile_image_ids_stay_inside_output_dir(
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
    queue_name: str,
    photos: dict[str, np.ndarray],
    segments: SegmentTracker,
) -> None:
    pool = start(pool_factory)
    small = cv2.resize(photos["astronaut"], (64, 64), interpolation=cv2.INTER_AREA)
    image_ids = {"dup-1": "same", "dup-2": "same", "dotdot": "../../etc/passwd", "slash": "a/b", "abs": "/abs"}
    for request_id, image_id in image_ids.items():
        push(redis_client, queue_name, segments.message(request_id, image_id, small))

    records = by_request(wait_for_records(pool.output_dir, len(image_ids), WAIT, pool=pool))

    paths = {}
    for request_id, image_id in image_ids.items():
        record = records[request_id]
        assert record["image_id"] == image_id, record
        paths[request_id] = assert_completed(record, pool.output_dir, source="shm", height=64, width=64)
        assert paths[request_id].resolve().parent == pool.output_dir.resolve()
    assert paths["dup-1"] != paths["dup-2"]
    for request_id in ("dup-1", "dup-2"):
        assert re.fullmatch(r"same_\d{8}_\d{6}(_\d+)?\.jpg", paths[request_id].name), paths[request_id]
    jpegs = sorted(pool.output_dir.glob("*.jpg"))
    assert sorted(paths.values()) == jpegs


# ---------------------------------------------------------------- the seed's own examples


def test_the_seed_example_messages(
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
    queue_name: str,
    photos: dict[str, np.ndarray],
    http_server: HttpServer,
    segments: SegmentTracker,
) -> None:
    pool = start(pool_factory)
    shm_name = segments.make(photo_of_size(1024, 1024))
    url = http_server.add("/image.jpg", jpeg(photos["chelsea"]))
    push(
        redis_client,
        queue_name,
        f'{{"request_id": "req_001", "image_id": "image_001",\n'
        f' "shm_info": {{"shm_name": "{shm_name}", "shape": [1024, 1024, 3],\n'
        f'              "dtype": "uint8", "size": 3145728}}}}',
    )
    push(
        redis_client,
        queue_name,
        f'{{"request_id": "req_002", "image_id": "image_002",\n "image_url": "{url}"}}',
    )

    records = by_request(wait_for_records(pool.output_dir, 2, WAIT, pool=pool))

    assert sorted(records) == ["req_001", "req_002"]
    for request_id, image_id in (("req_001", "image_001"), ("req_002", "image_002")):
        record = records[request_id]
        assert list(record)[:5] == ["timestamp", "request_id", "image_id", "file_path", "status"]
        assert record["image_id"] == image_id
        assert record["status"] == "completed"
        assert_file_name(record)
    assert_completed(records["req_001"], pool.output_dir, source="shm", height=1024, width=1024)
    assert_completed(records["req_002"], pool.output_dir, source="url", height=300, width=451)
    assert sorted(p.name for p in pool.output_dir.glob("*.jpg")) == sorted(
        Path(r["file_path"]).name for r in records.values()
    )


# ---------------------------------------------------------------- queue behaviour


def test_one_worker_consumes_in_push_order(
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
    queue_name: str,
    photos: dict[str, np.ndarray],
    segments: SegmentTracker,
) -> None:
    pool = start(pool_factory, workers=1)
    sizes = [(256, 256), (64, 96), (512, 512), (32, 32), (300, 200), (128, 128), (480, 640), (16, 16)]
    request_ids = [f"req-{i}" for i in range(len(sizes))]
    for i, (height, width) in enumerate(sizes):
        push(redis_client, queue_name, segments.message(request_ids[i], request_ids[i], photo_of_size(height, width)))

    records = wait_for_records(pool.output_dir, len(sizes), WAIT, pool=pool)

    assert [r["request_id"] for r in records] == request_ids
    assert all(r["status"] == "completed" for r in records), records


def test_nothing_is_left_behind_when_the_queue_drains(
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
    queue_name: str,
    photos: dict[str, np.ndarray],
    http_server: HttpServer,
    segments: SegmentTracker,
) -> None:
    pool = start(pool_factory)
    url = http_server.add("/coffee.jpg", jpeg(photos["coffee"]))
    push(redis_client, queue_name, segments.message("req-shm", "img-shm", photos["astronaut"]))
    push(redis_client, queue_name, {"request_id": "req-url", "image_id": "img-url", "image_url": url})
    push(redis_client, queue_name, {"request_id": "req-404", "image_id": "img-404", "image_url": url + ".missing"})
    push(redis_client, queue_name, segments.message("req-shm2", "img-shm2", photos["chelsea"]))

    records = by_request(wait_for_records(pool.output_dir, 4, WAIT, pool=pool))

    assert [records[r]["status"] for r in ("req-shm", "req-url", "req-404", "req-shm2")] == [
        "completed",
        "completed",
        "failed",
        "completed",
    ]
    wait_until(lambda: processing_entries(redis_client, queue_name) == 0, 10, "processing lists never emptied")
    assert redis_client.llen(queue_name) == 0
    assert list((pool.output_dir / ".partial").iterdir()) == []
    wait_until(lambda: segments.leftovers() == [], 10, "segments of finished tasks were not unlinked")
    assert len(list(pool.output_dir.glob("*.jpg"))) == 3
