"""What one downloaded image may cost: a JPEG's scans, an animation's frames,
a decode's CPU. The hostile files are built byte by byte from real encoders'
output (harness/hostile_images.py) and served by a real HTTP server to a real pool."""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis

from harness import icc
from harness.hostile_images import animated_webp, apng_16bit, png_chunk, progressive_jpeg, scan_bomb
from harness.http_server import HttpServer
from harness.photos import photo_of_size
from shared.imaging import decode_limits
from shared.imaging.decode_limits import MAX_CHUNKS_BEFORE_IMAGE, MAX_JPEG_SCANS, DecodeRefused, jpeg_scan_count
from shared.imaging.images import ImageError, decodable, decode_image
from tests.conftest import PoolFactory
from tests.helpers import dead_letters, push, wait_for_records, worker_pids


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return photo_of_size(256, 384)


# -- the decisions, in-process --------------------------------------------------------


@pytest.mark.fast
def test_scans_are_counted_as_encoders_write_them(photo: np.ndarray) -> None:
    assert jpeg_scan_count(cv2.imencode(".jpg", photo)[1].tobytes()) == 1
    assert jpeg_scan_count(progressive_jpeg(photo)) == 10  # libjpeg's script for YCbCr
    assert jpeg_scan_count(progressive_jpeg(cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY))) == 6
    assert jpeg_scan_count(scan_bomb(photo, 5000)) == 5000


@pytest.mark.fast
def test_fill_bytes_before_a_scan_marker_do_not_hide_it(photo: np.ndarray) -> None:
    """FF FF ... DA is a scan marker too; libjpeg skips the fill."""
    data = scan_bomb(photo, MAX_JPEG_SCANS + 1)
    padded = data.replace(b"\xff\xda", b"\xff\xff\xff\xda")
    assert cv2.imdecode(np.frombuffer(padded, np.uint8), cv2.IMREAD_COLOR) is not None
    assert jpeg_scan_count(padded) == MAX_JPEG_SCANS + 1


@pytest.mark.fast
def test_a_scan_bomb_is_refused_before_decoding(photo: np.ndarray) -> None:
    assert decode_image(scan_bomb(photo, MAX_JPEG_SCANS), max_pixels=10**7).shape == photo.shape
    with pytest.raises(ImageError, match=rf"JPEG has {MAX_JPEG_SCANS + 1} scans, more than the {MAX_JPEG_SCANS}"):
        decode_image(scan_bomb(photo, MAX_JPEG_SCANS + 1), max_pixels=10**7)


@pytest.mark.fast
def test_an_animated_png_decodes_as_its_still_image() -> None:
    data = apng_16bit(64, 48, first_row=0x4000)
    found, still = decodable(data)
    assert found == "PNG" and b"acTL" not in still and len(still) == len(data)
    frame = decode_image(data, max_pixels=10**6)
    # BGRA: its alpha is composited over ALPHA_BACKGROUND when it is encoded.
    assert frame.shape == (48, 64, 4) and frame.dtype == np.uint8
    assert np.all(frame[..., :3] == 0x40), "the still image (the first frame), not a later one"


@pytest.mark.fast
def test_an_acTL_after_the_image_data_is_left_alone(photo: np.ndarray) -> None:
    """Not an animation (acTL must come first), and only an APNG decoder reads it."""
    data = cv2.imencode(".png", photo)[1].tobytes()
    late = data[:-12] + png_chunk(b"acTL", struct.pack(">II", 2, 0)) + data[-12:]
    assert decodable(late)[1] == late


@pytest.mark.fast
def test_a_png_with_thousands_of_chunks_before_its_animation_is_refused(photo: np.ndarray) -> None:
    data = cv2.imencode(".png", photo)[1].tobytes()
    header_end = 8 + 25  # signature, IHDR
    filler = png_chunk(b"teXt", b"") * MAX_CHUNKS_BEFORE_IMAGE
    hostile = data[:header_end] + filler + png_chunk(b"acTL", struct.pack(">II", 2, 0)) + data[header_end:]
    with pytest.raises(DecodeRefused, match=f"more than {MAX_CHUNKS_BEFORE_IMAGE} chunks"):
        decode_limits.limit(hostile, "PNG")


@pytest.mark.fast
def test_an_animated_webp_decodes_as_its_first_frame(photo: np.ndarray) -> None:
    bright = np.full_like(photo, 240)
    data = animated_webp([photo, bright, photo // 2])
    found, still = decodable(data)
    assert found == "WebP" and b"ANMF" not in still and not still[20] & 0x02
    frame = decode_image(data, max_pixels=10**6)
    assert frame.shape == photo.shape
    assert np.abs(frame.astype(int) - photo).mean() < 8, "the first frame"


@pytest.mark.fast
def test_a_still_webp_is_untouched(photo: np.ndarray) -> None:
    data = cv2.imencode(".webp", photo)[1].tobytes()
    assert decodable(data)[1] is data


# -- end to end: a real pool, a real HTTP server ---------------------------------------


def test_a_scan_bomb_by_url_fails_once_and_the_next_task_is_served(
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
    queue_name: str,
    http_server: HttpServer,
) -> None:
    pool = pool_factory(workers=1, env={"URL_ALLOW_LOOPBACK": "true"})
    pool.wait_ready()
    workers = worker_pids(pool)
    # 2 MP with 3,000 copies of its first AC scan: 140 kB, and about 2 s of CPU to decode.
    flat = np.full((1000, 2000, 3), 128, np.uint8)
    bomb = http_server.add("/bomb.jpg", scan_bomb(flat, 3000))
    good = http_server.add("/photo.jpg", cv2.imencode(".jpg", photo_of_size(480, 640))[1].tobytes())
    push(redis_client, queue_name, {"request_id": "bomb", "image_id": "bomb", "image_url": bomb})
    push(redis_client, queue_name, {"request_id": "good", "image_id": "good", "image_url": good})

    records = wait_for_records(pool.output_dir, 2, 60, pool=pool)

    assert [r["request_id"] for r in records] == ["bomb", "good"], records
    refused, served = records
    assert refused["status"] == "failed" and refused["attempts"] == 1, refused
    assert refused["error"].startswith(f"JPEG image refused: JPEG has 3000 scans, more than the {MAX_JPEG_SCANS}")
    assert served["status"] == "completed", served
    assert [d["request_id"] for d in dead_letters(redis_client, queue_name)] == ["bomb"]
    assert worker_pids(pool) == workers and not pool.events("child_died")


def test_a_decode_past_its_cpu_budget_fails_once_and_is_not_run_again(
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
    queue_name: str,
    http_server: HttpServer,
) -> None:
    """Under the scan cap, yet slow: the worker cannot stop the decoder, so it
    fails the task, exits, and is replaced; the task is not redelivered."""
    pool = pool_factory(workers=1, env={"URL_ALLOW_LOOPBACK": "true", "DECODE_CPU_SECONDS": "0.05"})
    pool.wait_ready()
    first_worker = worker_pids(pool)
    slow = scan_bomb(np.full((2000, 3000, 3), 128, np.uint8), MAX_JPEG_SCANS)  # about 0.5 s of CPU
    slow_url = http_server.add("/slow.jpg", slow)
    good = http_server.add("/photo.jpg", cv2.imencode(".jpg", photo_of_size(240, 320))[1].tobytes())
    push(redis_client, queue_name, {"request_id": "slow", "image_id": "slow", "image_url": slow_url})
    push(redis_client, queue_name, {"request_id": "good", "image_id": "good", "image_url": good})

    # A redelivery would go back to the head of the queue, before "good", so by
    # the time "good" is recorded it would have fetched /slow.jpg again.
    records = wait_for_records(pool.output_dir, 2, 60, pool=pool)

    assert [r["request_id"] for r in records] == ["slow", "good"], records
    failed, served = records
    assert failed["status"] == "failed" and failed["attempts"] == 1, failed
    assert "took more than 0.05 s of CPU (DECODE_CPU_SECONDS=0.05)" in failed["error"], failed
    assert served["status"] == "completed" and served["attempts"] == 1, served
    assert http_server.hits("/slow.jpg") == 1
    exits = pool.events("child_died")
    assert [(e["pid"], e["exit_code"]) for e in exits] == [(first_worker[0], 7)], exits
    assert [e["acknowledged"] for e in pool.events("decode_overran")] == [True]
    assert len(read_all(pool.output_dir)) == 2


def test_a_16_bit_apng_costs_a_worker_no_more_than_a_still_png(
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
    queue_name: str,
    http_server: HttpServer,
) -> None:
    """Composited, it took about 30 bytes a pixel. As its still image it takes 16
    (it keeps its alpha, at 16 bits until it is reduced), and such a PNG may have
    only 9/16 of MAX_PIXELS: whatever the file, a decode stays within about 10
    bytes for each pixel MAX_PIXELS allows."""
    width, height = 3000, 2000
    max_pixels = 11_000_000  # 9/16 of it just admits the 6 MP image
    pool = pool_factory(workers=1, env={"URL_ALLOW_LOOPBACK": "true", "MAX_PIXELS": str(max_pixels)})
    pool.wait_ready()
    [worker] = worker_pids(pool)
    peak_before = peak_rss_bytes(worker)
    url = http_server.add("/anim.png", apng_16bit(width, height), content_type="image/png")
    push(redis_client, queue_name, {"request_id": "apng", "image_id": "apng", "image_url": url})

    [record] = wait_for_records(pool.output_dir, 1, 60, pool=pool)

    assert record["status"] == "completed", record
    assert (record["width"], record["height"]) == (width, height)
    grown = peak_rss_bytes(worker) - peak_before
    assert grown < 10 * max_pixels, f"{grown / max_pixels:.1f} bytes for each pixel MAX_PIXELS allows"
    assert not pool.events("child_died")


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def read_all(output_dir: Path) -> list[dict]:
    from harness.results import read_results

    return read_results(output_dir)


# -- the dashboard's thumbnails: the same gate ---------------------------------------------


@pytest.mark.parametrize(
    ("ext", "name"),
    [
        (".tiff", "TIFF"),
        (".jp2", "JPEG 2000"),
        (".gif", "GIF"),
        (".bmp", "BMP"),
        (".hdr", "Radiance HDR"),
        (".pfm", "PFM"),
        (".ras", "Sun Raster"),
        (".avif", "AVIF"),
    ],
)
@pytest.mark.fast
def test_a_thumbnail_is_never_made_by_a_refused_decoder(tmp_path: Path, photo: np.ndarray, ext: str, name: str) -> None:
    """A file in OUTPUT_DIR named like the pool's JPEG may be anything."""
    from control.dashboard import Refused, Thumbnails

    pixels = photo.astype(np.float32) / 255 if ext in (".hdr", ".pfm") else photo
    ok, written = cv2.imencode(ext, pixels)
    assert ok and cv2.imdecode(written, cv2.IMREAD_REDUCED_COLOR_8) is not None, "OpenCV decodes it"
    (tmp_path / "frame_1.jpg").write_bytes(written.tobytes())
    with pytest.raises(Refused) as refused:
        Thumbnails(tmp_path).get("frame_1.jpg")
    assert refused.value.status == 404 and f"image format {name} is not accepted" in str(refused.value)


@pytest.mark.fast
def test_a_thumbnail_of_a_scan_bomb_is_refused_and_of_a_jpeg_made(tmp_path: Path, photo: np.ndarray) -> None:
    from control.dashboard import Refused, Thumbnails

    (tmp_path / "bomb_1.jpg").write_bytes(scan_bomb(photo, MAX_JPEG_SCANS + 1))
    (tmp_path / "photo_1.jpg").write_bytes(cv2.imencode(".jpg", photo)[1].tobytes())
    thumbnails = Thumbnails(tmp_path)
    with pytest.raises(Refused, match="scans"):
        thumbnails.get("bomb_1.jpg")
    assert thumbnails.get("photo_1.jpg").startswith(b"\xff\xd8")


@pytest.mark.fast
@pytest.mark.parametrize("offset", [(1 << 20) - 2, (1 << 20) - 1, 1 << 20, 3 << 20])
def test_a_scan_marker_is_counted_wherever_it_falls(offset: int) -> None:
    """The count goes in blocks; a marker across a block's end counts once."""
    data = bytearray(4 << 20)
    data[offset : offset + 2] = b"\xff\xda"
    assert jpeg_scan_count(bytes(data)) == 1


@pytest.mark.fast
def test_an_animated_png_with_two_acTL_chunks_decodes_as_a_still() -> None:
    """OpenCV takes the last acTL it meets; each one is renamed."""
    data = apng_16bit(64, 48, first_row=0x4000)
    at = data.index(b"acTL") - 4
    twice = data[:at] + data[at : at + 20] + data[at:]
    still = decodable(twice)[1]
    assert b"acTL" not in still and len(still) == len(twice)
    assert np.all(decode_image(twice, max_pixels=10**6)[..., :3] == 0x40)


@pytest.mark.fast
def test_an_animated_webps_first_frame_keeps_the_colour_profile(photo: np.ndarray) -> None:
    data = animated_webp([photo, np.full_like(photo, 240)])
    icc_profile = icc.display_p3()
    profile = b"ICCP" + struct.pack("<I", len(icc_profile)) + icc_profile + b"\0" * (len(icc_profile) & 1)
    vp8x_end = 12 + 8 + 10
    with_profile = bytearray(data[:vp8x_end] + profile + data[vp8x_end:])
    with_profile[20] |= 0x20
    with_profile[4:8] = struct.pack("<I", len(with_profile) - 8)
    still = decodable(bytes(with_profile))[1]
    assert still[20] & 0x20 and still[30 : 30 + len(profile)] == profile
    assert decode_image(bytes(with_profile), max_pixels=10**6).shape[:2] == photo.shape[:2]
