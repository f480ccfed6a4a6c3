"""Bad input of every kind, pushed into one real pool among good tasks: each bad task
ends as exactly one failed record and one dead letter, the good ones complete, and
no worker dies on the way.
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import redis

from harness.http_server import HttpServer
from harness.pool import Pool
from harness.segments import SegmentTracker, segment_exists
from tests.conftest import PoolFactory
from tests.helpers import dead_letters, push, wait_for_records, wait_until

WAIT = 60.0
URL_MAX_BYTES = 200_000
MAX_PIXELS = 1_000_000
MAX_MESSAGE_BYTES = 4096
LIMITS = {
    "URL_MAX_BYTES": str(URL_MAX_BYTES),
    "MAX_PIXELS": str(MAX_PIXELS),
    "URL_READ_TIMEOUT": "2",
    "MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES),
    "URL_MAX_REDIRECTS": "3",
    # Transient failures (HTTP 500, the trickle's timeout) fail at the first
    # attempt here; test_retries.py covers their retries.
    "MAX_ATTEMPTS": "1",
}
WORKER_TITLE = re.compile(r": worker \d+$")


@dataclass(frozen=True)
class Bad:
    name: str
    raw: bytes
    error: str  # a regular expression the record's error must match

    @property
    def kept(self) -> bytes:
        """What the dead letter keeps: the message, cut at MAX_MESSAGE_BYTES."""
        return self.raw[:MAX_MESSAGE_BYTES]


def encode(image: np.ndarray, ext: str) -> bytes:
    ok, buffer = cv2.imencode(ext, image)
    assert ok
    return buffer.tobytes()


def as_json(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


def worker_pids(pool: Pool) -> set[int]:
    return {pid for pid, title in pool.children_by_title().items() if WORKER_TITLE.search(title)}


def dead_letter_body(entry: dict[str, Any]) -> bytes:
    if "message" in entry:
        return entry["message"].encode()
    return base64.b64decode(entry["message_base64"])


def still_present(segments_by_task: dict[str, str], timeout: float = 10.0) -> list[str]:
    """The tasks whose segment is still in /dev/shm once `timeout` has passed (or none is)."""
    deadline = time.monotonic() + timeout
    while (left := sorted(t for t, name in segments_by_task.items() if segment_exists(name))) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    return left


def start(pool_factory: PoolFactory, **kwargs: Any) -> Pool:
    pool = pool_factory(**kwargs)
    pool.wait_ready()
    return pool


def test_bad_input_fails_alone_and_the_pool_keeps_serving(
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
    queue_name: str,
    photos: dict[str, np.ndarray],
    http_server: HttpServer,
    segments: SegmentTracker,
) -> None:
    pool = start(pool_factory, workers=2, env=LIMITS)
    workers_at_start = worker_pids(pool)
    assert len(workers_at_start) == 2, pool.children_by_title()

    astronaut, chelsea, coffee = photos["astronaut"], photos["chelsea"], photos["coffee"]
    good_jpeg = http_server.add("/good.jpg", encode(chelsea, ".jpg"))
    assert len(encode(chelsea, ".jpg")) < URL_MAX_BYTES
    # A real photo blown up with nearest-neighbour: 1.44 Mpx, yet a small PNG,
    # so MAX_PIXELS (not URL_MAX_BYTES) is what refuses it.
    huge = cv2.resize(
        cv2.resize(astronaut, (60, 60), interpolation=cv2.INTER_AREA), (1200, 1200), interpolation=cv2.INTER_NEAREST
    )
    ok, buffer = cv2.imencode(".png", huge, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert ok
    huge_png = buffer.tobytes()
    assert len(huge_png) < URL_MAX_BYTES
    tiny = cv2.resize(astronaut, (64, 64), interpolation=cv2.INTER_AREA)
    big_body = bytes(300_000)

    def url_task(name: str, url: str) -> bytes:
        return as_json({"request_id": f"bad-{name}", "image_id": f"bad-{name}", "image_url": url})

    def shm_task(name: str, shm_info: Any) -> bytes:
        return as_json({"request_id": f"bad-{name}", "image_id": f"bad-{name}", "shm_info": shm_info})

    short_segment = segments.make(tiny)  # 64x64x3, declared below as 512x512x3
    oversized_message = {"request_id": "bad-oversized", "image_id": "bad-oversized", "image_url": good_jpeg}
    oversized_message["padding"] = "p" * (10_000 - len(as_json(oversized_message)) - len(', "padding": ""'))
    bad = [
        Bad("malformed", b"{not json", r"not valid JSON"),
        Bad("not-utf8", b"\xff\xfe", r"not valid JSON"),
        Bad("array", b'["bad-array", "img"]', r"JSON list, expected an object"),
        Bad("number", b"42", r"JSON int, expected an object"),
        Bad("no-request-id", as_json({"image_id": "bad-no-request-id", "image_url": good_jpeg}), r"request_id"),
        Bad("no-image-id", as_json({"request_id": "bad-no-image-id", "image_url": good_jpeg}), r"image_id"),
        Bad("no-source", as_json({"request_id": "bad-no-source", "image_id": "bad-no-source"}), r"neither"),
        Bad(
            "missing-segment",
            shm_task(
                "missing-segment",
                {
                    "shm_name": "img_shm_" + uuid.uuid4().hex,
                    "shape": [64, 64, 3],
                    "dtype": "uint8",
                    "size": 64 * 64 * 3,
                },
            ),
            r"does not exist",
        ),
        Bad(
            "size-mismatch",
            shm_task(
                "size-mismatch", {"shm_name": segments.make(tiny), "shape": [64, 64, 3], "dtype": "uint8", "size": 1234}
            ),
            r"size 1234 does not match",
        ),
        Bad(
            "short-segment",
            shm_task("short-segment", {"shm_name": short_segment, "shape": [512, 512, 3], "dtype": "uint8"}),
            r"needs 786432 bytes .* holds only 12288",
        ),
        Bad(
            "int64",
            shm_task(
                "int64", {"shm_name": segments.make(tiny.astype(np.int64)), "shape": [64, 64, 3], "dtype": "int64"}
            ),
            r"dtype 'int64' is not supported",
        ),
        Bad(
            "five-channels",
            shm_task(
                "five-channels",
                {"shm_name": segments.make(np.zeros((8, 8, 5), np.uint8)), "shape": [8, 8, 5], "dtype": "uint8"},
            ),
            r"5 channels",
        ),
        Bad(
            "traversal",
            shm_task("traversal", {"shm_name": "../etc/passwd", "shape": [8, 8, 3], "dtype": "uint8"}),
            r"not a valid segment name",
        ),
        Bad("ftp", url_task("ftp", "ftp://127.0.0.1/image.jpg"), r"scheme 'ftp' is not allowed"),
        Bad("file", url_task("file", "file:///etc/passwd"), r"scheme 'file' is not allowed"),
        Bad("404", url_task("404", http_server.url("/nothing-here.jpg")), r"HTTP 404"),
        Bad("500", url_task("500", http_server.add("/broken.jpg", b"oops", status=500)), r"HTTP 500"),
        Bad(
            "not-image",
            url_task("not-image", http_server.add("/text.jpg", b"this is not a picture\n" * 50)),
            r"not a decodable image",
        ),
        Bad("too-big", url_task("too-big", http_server.add("/big.jpg", big_body)), r"URL_MAX_BYTES"),
        Bad(
            "too-big-unsized",
            url_task(
                "too-big-unsized", http_server.add("/big-unsized.jpg", big_body, headers={"Content-Length": None})
            ),
            r"larger than URL_MAX_BYTES",
        ),
        Bad(
            "redirect-loop",
            url_task("redirect-loop", http_server.redirect("/loop-a", http_server.url("/loop-b"))),
            r"more than URL_MAX_REDIRECTS=3 redirects",
        ),
        Bad(
            "redirect-ftp",
            url_task("redirect-ftp", http_server.redirect("/to-ftp", "ftp://127.0.0.1/image.jpg")),
            r"scheme 'ftp' is not allowed",
        ),
        Bad(
            "too-many-pixels",
            url_task("too-many-pixels", http_server.add("/huge.png", huge_png, content_type="image/png")),
            r"MAX_PIXELS=1000000",
        ),
        Bad(
            "trickle",
            url_task("trickle", http_server.trickle("/slow.jpg", interval=0.3, headers={"Content-Length": None})),
            r"URL_READ_TIMEOUT|timed out",
        ),
        Bad(
            "request-images-bool",
            as_json({"request_id": "bad-ri-bool", "image_id": "bad-ri-bool", "image_url": good_jpeg, "request_images": True}),
            r"request_images must be an integer 1\.\.10000, got bool",
        ),
        Bad(
            "request-images-cap",
            as_json({"request_id": "bad-ri-cap", "image_id": "bad-ri-cap", "image_url": good_jpeg, "request_images": 10**6}),
            r"request_images must be an integer 1\.\.10000, got 1000000",
        ),
        Bad("oversized", as_json(oversized_message), r"MAX_MESSAGE_BYTES"),
    ]
    http_server.redirect("/loop-b", http_server.url("/loop-a"))
    assert len(bad[-1].raw) == 10_000

    good_messages = [
        segments.message("good-0", "good-0", astronaut),
        {"request_id": "good-1", "image_id": "good-1", "image_url": good_jpeg},
        segments.message("good-2", "good-2", chelsea),
        segments.message("good-3", "good-3", coffee),
        {"request_id": "good-4", "image_id": "good-4", "image_url": good_jpeg},
        segments.message("good-5", "good-5", tiny),
    ]
    # Interleave: a good task after every few bad ones, the last good ones at the very end.
    pushed = 0
    for index, case in enumerate(bad):
        push(redis_client, queue_name, case.raw)
        pushed += 1
        if index % 5 == 4:
            push(redis_client, queue_name, good_messages[index // 5])
            pushed += 1
    for message in good_messages[len(bad) // 5 :]:
        push(redis_client, queue_name, message)
        pushed += 1
    assert pushed == len(bad) + len(good_messages)

    records = wait_for_records(pool.output_dir, pushed, WAIT, pool=pool)
    def all_dead_letters() -> list[dict[str, Any]]:
        return dead_letters(redis_client, queue_name) + dead_letters(redis_client, queue_name, junk=True)

    wait_until(lambda: len(all_dead_letters()) >= len(bad), 10, "dead letters missing")

    assert len(records) == pushed, records
    assert len({r["task_id"] for r in records}) == pushed
    # Good tasks: all completed, so the pool kept serving around the bad ones.
    completed = {r["request_id"]: r for r in records if r["status"] == "completed"}
    assert sorted(completed) == sorted(m["request_id"] for m in good_messages), records
    for record in completed.values():
        assert Path(record["file_path"]).is_file(), record
    # Bad tasks: one dead letter each, holding the message as sent (cut at MAX_MESSAGE_BYTES),
    # and one failed record with a readable reason.
    letters = all_dead_letters()
    assert len(letters) == len(bad), letters
    # Those without a request_id are junk, capped apart so that a flood of it keeps the others.
    assert all(letter["request_id"] is None for letter in dead_letters(redis_client, queue_name, junk=True))
    records_by_task = {r["task_id"]: r for r in records}
    problems, failed = [], {}
    for case in bad:
        matching = [entry for entry in letters if dead_letter_body(entry) == case.kept]
        if len(matching) != 1:
            problems.append(f"{case.name}: {len(matching)} dead letters")
            continue
        (letter,) = matching
        record = failed[case.name] = records_by_task.get(letter["task_id"], {})
        if record.get("status") != "failed" or record.get("file_path", "") is not None:
            problems.append(f"{case.name}: record {record}")
        elif not re.search(case.error, record["error"]) or letter["error"] != record["error"]:
            problems.append(f"{case.name}: error {record['error']!r} does not match {case.error!r}")
        elif (letter["request_id"], letter["image_id"]) != (record["request_id"], record["image_id"]):
            problems.append(f"{case.name}: dead letter {letter} vs record {record}")
    assert not problems, "\n".join(problems)
    assert failed["no-request-id"]["image_id"] == "bad-no-request-id"
    assert failed["no-image-id"]["request_id"] == "bad-no-image-id"
    assert failed["trickle"]["duration_ms"] < 8000, failed["trickle"]
    # No worker died on the way.
    assert not pool.events("child_died"), pool.events("child_died")
    assert worker_pids(pool) == workers_at_start
    assert list((pool.output_dir / ".partial").iterdir()) == []


@pytest.fixture
def tiny_photo(photos: dict[str, np.ndarray]) -> np.ndarray:
    """A real photo small enough that a wrong shape or size is cheap to make."""
    return cv2.resize(photos["astronaut"], (64, 64), interpolation=cv2.INTER_AREA)


def test_a_task_that_failed_for_good_unlinks_its_segment(
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
    queue_name: str,
    tiny_photo: np.ndarray,
    segments: SegmentTracker,
) -> None:
    """The segment is there but cannot be used as declared: the task fails, and since
    nothing will ever read the segment again, it must not stay in /dev/shm."""
    pool = start(pool_factory)
    short = segments.make(tiny_photo)
    legacy_wrong_size = segments.make(tiny_photo)
    push(
        redis_client,
        queue_name,
        {
            "request_id": "short",
            "image_id": "short",
            "shm_info": {"shm_name": short, "shape": [512, 512, 3], "dtype": "uint8"},
        },
    )
    push(redis_client, queue_name, {"request_id": "legacy", "image_id": "legacy", "shm_info": legacy_wrong_size})

    records = wait_for_records(pool.output_dir, 2, WAIT, pool=pool)

    assert [r["status"] for r in records] == ["failed", "failed"], records
    left = still_present({"short": short, "legacy": legacy_wrong_size})
    assert not left, f"segments still in /dev/shm for tasks {left}"


def test_a_message_with_unusable_shm_info_unlinks_the_segment_it_names(
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
    queue_name: str,
    tiny_photo: np.ndarray,
    http_server: HttpServer,
    segments: SegmentTracker,
) -> None:
    """shm_info names a real segment but its shape, size or dtype is refused: nothing
    will ever read that segment, so the one the producer handed over must be unlinked,
    whether the task then fails or completes from its image_url."""
    pool = start(pool_factory)
    url = http_server.add("/tiny.png", encode(tiny_photo, ".png"), content_type="image/png")
    cases = {
        "size-mismatch": ({"shape": [64, 64, 3], "dtype": "uint8", "size": 1234}, {}),
        "int64": ({"shape": [64, 64, 3], "dtype": "int64"}, {}),
        "five-channels": ({"shape": [64, 64, 5], "dtype": "uint8"}, {}),
        "size-mismatch-with-url": ({"shape": [64, 64, 3], "dtype": "uint8", "size": 1234}, {"image_url": url}),
    }
    names = {}
    for request_id, (info, extra) in cases.items():
        names[request_id] = segments.make(tiny_photo)
        shm_info = {"shm_name": names[request_id], **info}
        push(
            redis_client, queue_name, {"request_id": request_id, "image_id": request_id, "shm_info": shm_info, **extra}
        )

    records = {r["request_id"]: r for r in wait_for_records(pool.output_dir, len(cases), WAIT, pool=pool)}

    assert [records[r]["status"] for r in cases] == ["failed", "failed", "failed", "completed"], records
    assert records["size-mismatch-with-url"]["source"] == "url"
    left = still_present(names)
    assert not left, f"segments still in /dev/shm for tasks {left}"


def test_a_message_that_is_not_json_still_frees_the_segment_it_names(
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
    queue_name: str,
    tiny_photo: np.ndarray,
    segments: SegmentTracker,
) -> None:
    """A producer that dies mid-write, or a message longer than MAX_MESSAGE_BYTES,
    leaves text that is not JSON but still names its ids and its segment. The task
    fails with the ids the producer waits on, and the segment it handed over is
    unlinked; a segment named twice is a guess too far, and is left alone."""
    pool = start(pool_factory, env=LIMITS)
    cut, long, ambiguous_a, ambiguous_b = (segments.make(tiny_photo) for _ in range(4))
    info = '"shape": [64, 64, 3], "dtype": "uint8"'
    push(
        redis_client,
        queue_name,
        f'{{"request_id": "cut", "image_id": "cut-img", "shm_info": {{"shm_name": "{cut}", {info}'.encode(),
    )
    padding = "p" * MAX_MESSAGE_BYTES
    push(
        redis_client,
        queue_name,
        f'{{"request_id": "long", "image_id": "long-img", "shm_info": {{"shm_name": "{long}", {info}}}, '
        f'"padding": "{padding}"}}'.encode(),
    )
    push(
        redis_client,
        queue_name,
        f'{{"request_id": "ambiguous", "image_id": "ambiguous", "shm_info": {{"shm_name": "{ambiguous_a}"}}, '
        f'"copy": {{"shm_name": "{ambiguous_b}"'.encode(),
    )

    records = {r["request_id"]: r for r in wait_for_records(pool.output_dir, 3, WAIT, pool=pool)}

    assert sorted(records) == ["ambiguous", "cut", "long"], records
    assert records["cut"]["status"] == "failed" and "not valid JSON" in records["cut"]["error"], records
    assert records["cut"]["image_id"] == "cut-img"
    assert records["long"]["status"] == "failed" and "MAX_MESSAGE_BYTES" in records["long"]["error"], records
    assert records["long"]["image_id"] == "long-img"
    left = still_present({"cut": cut, "long": long})
    assert not left, f"segments still in /dev/shm for tasks {left}"
    assert segment_exists(ambiguous_a) and segment_exists(ambiguous_b)
