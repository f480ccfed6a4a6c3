"""What is hosted looks like what was made: the JPEG settings, read back from
the written file's own frame header."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest
import redis

from harness.http_server import HttpServer
from harness.photos import photo_of_size
from harness.segments import SegmentTracker
from shared.images import encode_pixels
from shared.rendering import Rendering
from tests.conftest import PoolFactory
from tests.helpers import push, wait_for_records

# ---------------------------------------------------------------- reading a JPEG's headers

SOF_BASELINE, SOF_PROGRESSIVE = 0xC0, 0xC2
# Markers without a length: TEM, RSTn, SOI, EOI.
_STANDALONE = {0x01, *range(0xD0, 0xDA)}


def jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, payload) of each header segment up to the first scan, read
    independently of the code under test."""
    assert data[:2] == b"\xff\xd8", "not a JPEG"
    segments, at = [], 2
    while at + 4 <= len(data):
        assert data[at] == 0xFF, f"no marker at {at}"
        marker = data[at + 1]
        if marker in _STANDALONE:
            at += 2
            continue
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        segments.append((marker, data[at + 4 : at + 2 + length]))
        if marker == 0xDA:
            break
        at += 2 + length
    return segments


def frame_header(data: bytes) -> tuple[int, list[tuple[int, int]]]:
    """The SOFn marker and each component's (horizontal, vertical) sampling factors."""
    marker, payload = next((m, p) for m, p in jpeg_segments(data) if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC))
    components = payload[5]
    return marker, [(payload[6 + 3 * i + 1] >> 4, payload[6 + 3 * i + 1] & 0x0F) for i in range(components)]


SAMPLING = {"420": [(2, 2), (1, 1), (1, 1)], "422": [(2, 1), (1, 1), (1, 1)], "444": [(1, 1), (1, 1), (1, 1)]}


# ---------------------------------------------------------------- JPEG settings


@pytest.mark.fast
def test_the_default_rendering_writes_the_seeds_bytes() -> None:
    """At the defaults the encoder is asked exactly what the seed asked it."""
    photo = photo_of_size(96, 128)
    ok, seed = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    assert encode_pixels(photo, rendering=Rendering()).jpeg == seed.tobytes()
    assert Rendering().encode_params == (cv2.IMWRITE_JPEG_QUALITY, 80)


@pytest.mark.fast
@pytest.mark.parametrize("subsampling", ["420", "422", "444"])
@pytest.mark.parametrize("progressive", [False, True])
def test_each_setting_shows_in_the_frame_header(subsampling: str, progressive: bool) -> None:
    encoded = encode_pixels(photo_of_size(64, 64), rendering=Rendering(subsampling=subsampling, progressive=progressive))
    marker, sampling = frame_header(encoded.jpeg)
    assert marker == (SOF_PROGRESSIVE if progressive else SOF_BASELINE)
    assert sampling == SAMPLING[subsampling]


@pytest.mark.parametrize(
    ("env", "marker", "subsampling"),
    [
        ({}, SOF_BASELINE, "420"),
        ({"JPEG_SUBSAMPLING": "444", "JPEG_PROGRESSIVE": "true"}, SOF_PROGRESSIVE, "444"),
        ({"JPEG_SUBSAMPLING": "422"}, SOF_BASELINE, "422"),
    ],
    ids=["defaults", "444-progressive", "422"],
)
def test_the_pool_writes_the_jpeg_its_settings_ask_for(
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
    queue_name: str,
    segments: SegmentTracker,
    http_server: HttpServer,
    env: dict[str, str],
    marker: int,
    subsampling: str,
) -> None:
    photo = photo_of_size(120, 160)
    pool = pool_factory(workers=1, env={"URL_ALLOW_LOOPBACK": "true", **env})
    pool.wait_ready()
    ok, png = cv2.imencode(".png", photo)
    assert ok
    push(redis_client, queue_name, segments.message("shm", "shm", photo))
    push(redis_client, queue_name, {"request_id": "url", "image_id": "url", "image_url": http_server.add("/p.png", png.tobytes())})

    records = wait_for_records(pool.output_dir, 2, 60, pool=pool)

    for record in records:
        assert record["status"] == "completed", record
        assert frame_header(Path(record["file_path"]).read_bytes()) == (marker, SAMPLING[subsampling]), record
