"""Every string the pool writes is valid Unicode, whatever a message spells.

JSON lets a message spell a lone surrogate ("\\ud800"), which no UTF-8 can hold;
jq and serde_json refuse a file that holds one. results.json is append-only, so
one such id would leave it unreadable to them for good. A real pool takes
messages with every spelling of one, in every field it writes back, beside
messages that must still work; then results.json, the dead letters and the
results stream are read with strict parsers (UTF-8, no lone surrogate, and jq).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import redis

from harness.http_server import HttpServer
from harness.results import read_results
from harness.segments import SegmentTracker, segment_exists
from image_result_client.protocol import RESULTS_NAME, QueueKeys
from shared.messages import Envelope, InvalidMessage, parse_task, salvage
from tests.conftest import PoolFactory
from tests.helpers import wait_for_records

WAIT = 60.0


def strict_json(data: bytes) -> Any:
    """Parse as serde_json and jq do: UTF-8 only, and no lone surrogate in any string."""
    value = json.loads(data.decode("utf-8"))  # strict UTF-8
    json.dumps(value, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    return value


def test_no_message_spelling_puts_a_lone_surrogate_in_what_the_pool_writes(
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
    queue_name: str,
    http_server: HttpServer,
    segments: SegmentTracker,
    photos: dict[str, np.ndarray],
    tmp_path: Path,
) -> None:
    photo = photos["coffee"][:64, :64].copy()
    _, jpeg = cv2.imencode(".jpg", photo)
    url = http_server.add("/photo.jpg", jpeg.tobytes())
    tag = uuid.uuid4().hex[:6]
    # (message bytes, its request_id as the failed record must name it, its image_id likewise)
    refused: list[tuple[bytes, str | None, str | None]] = []

    def refuse(raw: bytes, request_id: str | None, image_id: str | None) -> None:
        refused.append((raw, request_id, image_id))

    refuse(b'{"request_id": "x\\ud800", "image_id": "a-%s", "image_url": "%s"}' % (tag.encode(), url.encode()),
           None, f"a-{tag}")
    refuse(b'{"request_id": "b-%s", "image_id": "y\\uDC00", "image_url": "%s"}' % (tag.encode(), url.encode()),
           f"b-{tag}", None)
    # A reversed pair is two lone surrogates.
    refuse(b'{"request_id": "c-%s", "image_id": "\\udc00\\ud800", "image_url": "%s"}' % (tag.encode(), url.encode()),
           f"c-{tag}", None)
    # The raw UTF-8-style bytes of a surrogate: Python's JSON reader takes them too.
    refuse(b'{"request_id": "d-%s\xed\xa0\x80", "image_id": "d-%s", "image_url": "%s"}'
           % (tag.encode(), tag.encode(), url.encode()), None, f"d-{tag}")
    refuse(b'{"request_id": "e-%s", "image_id": "e-%s", "image_url": "%s?\\udbff"}'
           % (tag.encode(), tag.encode(), url.encode()), f"e-{tag}", f"e-{tag}")
    # Not JSON (cut short): the ids are read from the text, and a lone surrogate there is no id.
    refuse(b'{"request_id": "f\\ud800", "image_id": "f-%s", "image_url": "%s' % (tag.encode(), url.encode()),
           None, f"f-{tag}")
    # Nested: a segment name and a dtype are echoed in the error, which must stay valid too.
    segment = segments.make(photo)
    refuse(b'{"request_id": "g-%s", "image_id": "g-%s", "shm_info": {"shm_name": "%s\\ud800", '
           b'"shape": [64, 64, 3], "dtype": "uint8\\ud800"}}' % (tag.encode(), tag.encode(), segment.encode()),
           f"g-{tag}", f"g-{tag}")
    # Valid Unicode still works: a real pair, and a lone surrogate in a field the pool ignores.
    good = [
        (b'{"request_id": "h-%s-\\ud83d\\ude00", "image_id": "h-%s-\\ud83d\\ude00", "image_url": "%s"}'
         % (tag.encode(), tag.encode(), url.encode()), f"h-{tag}-\U0001f600"),
        (b'{"request_id": "i-%s", "image_id": "i-%s", "image_url": "%s", "note": "\\ud800"}'
         % (tag.encode(), tag.encode(), url.encode()), f"i-{tag}"),
    ]
    stream = f"results-{tag}"
    pool = pool_factory(workers=1, env={"RESULTS_STREAM": stream, "MAX_ATTEMPTS": "1"})
    pool.wait_ready()
    for raw, *_ in refused:
        redis_client.rpush(queue_name, raw)
    for raw, _ in good:
        redis_client.rpush(queue_name, raw)
    total = len(refused) + len(good)
    wait_for_records(pool.output_dir, total, timeout=WAIT, pool=pool)

    results_path = pool.output_dir / RESULTS_NAME
    records = strict_json(results_path.read_bytes())
    assert len(records) == total
    if shutil.which("jq"):
        jq = subprocess.run(["jq", "-c", ".[]", str(results_path)], capture_output=True, timeout=30)
        assert jq.returncode == 0, jq.stderr.decode(errors="replace")

    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == len(refused), records
    named = {(r["request_id"], r["image_id"]) for r in failed}
    assert named == {(request_id, image_id) for _, request_id, image_id in refused}
    for record in failed:
        assert "not valid Unicode" in record["error"] or "not valid JSON" in record["error"] or (
            "shm_name" in record["error"]
        ), record
    completed = {r["request_id"]: r for r in records if r["status"] == "completed"}
    assert set(completed) == {request_id for _, request_id in good}
    for record in completed.values():
        assert Path(record["file_path"]).is_file()
    assert segment_exists(segment), "a name that is not the segment's names nothing to unlink"

    keys = QueueKeys(queue_name)
    # A message whose request_id could not be written has none, so its dead letter is junk's.
    dead = redis_client.lrange(keys.dead, 0, -1) + redis_client.lrange(keys.dead_junk, 0, -1)
    letters = [strict_json(entry) for entry in dead]
    assert len(letters) == len(refused)
    # The dead letter keeps the message as it came, so `dead requeue` replays it exactly.
    kept = {letter.get("message", "").encode() for letter in letters if "message" in letter}
    assert {raw for raw, *_ in refused if raw.isascii()} <= kept

    events = redis_client.xrange(stream)
    assert len(events) == total
    for _, fields in events:
        strict_json(fields[b"record"])
    assert read_results(pool.output_dir) == records


# ---------------------------------------------------------------- the decision, in-process


def envelope(body: bytes) -> Envelope:
    return Envelope("t" * 24, 1, body, False, b"")


@pytest.mark.fast
@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"request_id": "\\ud800", "image_id": "a", "image_url": "http://h/"}', "request_id"),
        (b'{"request_id": "a", "image_id": "\\uDFFF", "image_url": "http://h/"}', "image_id"),
        (b'{"request_id": "a", "image_id": "b", "image_url": "http://h/\\ud800"}', "image_url"),
        (b'{"request_id": "a\xed\xb0\x80", "image_id": "b", "image_url": "http://h/"}', "request_id"),
    ],
)
def test_a_lone_surrogate_in_a_field_that_is_written_back_refuses_the_message(body: bytes, field: str) -> None:
    with pytest.raises(InvalidMessage, match=f"{field} is not valid Unicode"):
        parse_task(envelope(body), max_pixels=10**6)


@pytest.mark.fast
def test_salvage_names_no_id_it_cannot_write_as_sent() -> None:
    found = salvage(b'{"request_id": "x\\ud800", "image_id": "ok"}')
    assert (found.request_id, found.image_id) == (None, "ok")
    found = salvage(b'{"request_id": 7, "image_id": "y\\udc00", "shm_info": "img_shm_1"')
    assert (found.request_id, found.image_id, found.segment_name) == ("7", None, "img_shm_1")
    task = parse_task(envelope(b'{"request_id": "\\ud83d\\ude00", "image_id": 5, "image_url": "http://h/"}'),
                      max_pixels=10**6)
    assert (task.request_id, task.image_id) == ("\U0001f600", "5")
