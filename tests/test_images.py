"""Encoding frames straight from shared memory: formats, bad declarations, no leaks.
Decoding downloaded images: only JPEG, PNG and WebP reach a decoder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis

from harness import REPO_ROOT
from harness.http_server import HttpServer
from harness.photos import photo_of_size
from harness.segments import SegmentTracker, segment_exists
from shared.imaging.images import ACCEPTED_FORMATS, EncodedImage, ImageError, decode_image, encode_segment, image_format
from shared.imaging.rendering import Rendering
from shared.imaging.segments import SegmentAccess
from shared.messages import LEGACY_SHAPE, SegmentRef
from tests.conftest import PoolFactory
from tests.helpers import psnr, push, wait_for_records

# The pipeline's segments, as the pool's settings allow them by default.
ACCESS = SegmentAccess("img_shm_", frozenset({os.getuid()}))
RENDERING = Rendering()  # the pool's defaults


def decode(encoded: EncodedImage) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(encoded.jpeg, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None, "not a decodable JPEG"
    return image


def encode_array(segments: SegmentTracker, array: np.ndarray) -> np.ndarray:
    name = segments.make(array)
    encoded = encode_segment(SegmentRef(name, array.shape, str(array.dtype)), rendering=Rendering(quality=90), access=ACCESS)
    assert (encoded.height, encoded.width) == array.shape[:2]
    return decode(encoded)


@pytest.mark.fast
def test_photo_segment_round_trips(segments: SegmentTracker) -> None:
    photo = photo_of_size(480, 640)
    decoded = encode_array(segments, photo)
    assert decoded.shape == photo.shape
    assert psnr(decoded, photo) > 30


@pytest.mark.fast
def test_grayscale_segment(segments: SegmentTracker, photos: dict[str, np.ndarray]) -> None:
    camera = photos["camera"]
    assert psnr(encode_array(segments, camera), camera) > 30


@pytest.mark.fast
def test_single_channel_segment(segments: SegmentTracker, photos: dict[str, np.ndarray]) -> None:
    camera = photos["camera"]
    decoded = encode_array(segments, camera[:, :, np.newaxis])
    assert decoded.shape == camera.shape
    assert psnr(decoded, camera) > 30


@pytest.mark.fast
def test_bgra_segment_with_zero_alpha_everywhere_is_taken_as_bgrx(segments: SegmentTracker) -> None:
    photo = photo_of_size(240, 320)
    bgra = cv2.cvtColor(photo, cv2.COLOR_BGR2BGRA)
    bgra[..., 3] = 0  # a padding byte (BGRX), not transparency: must not blank the picture
    decoded = encode_array(segments, bgra)
    assert decoded.shape == photo.shape
    assert psnr(decoded, photo) > 30


@pytest.mark.fast
def test_uint16_segment_keeps_high_byte(segments: SegmentTracker) -> None:
    photo = photo_of_size(240, 320)
    decoded = encode_array(segments, photo.astype(np.uint16) << 8)
    assert psnr(decoded, photo) > 30


@pytest.mark.fast
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_segment_in_unit_range(segments: SegmentTracker, dtype: type) -> None:
    photo = photo_of_size(240, 320)
    decoded = encode_array(segments, photo.astype(dtype) / 255.0)
    assert psnr(decoded, photo) > 30


@pytest.mark.fast
def test_declared_shape_larger_than_segment_is_refused(segments: SegmentTracker) -> None:
    name = segments.make(photo_of_size(10, 10))
    with pytest.raises(ImageError, match="holds only 300"):
        encode_segment(SegmentRef(name, (1000, 1000, 3), "uint8"), rendering=RENDERING, access=ACCESS)


@pytest.mark.fast
def test_legacy_ref_on_full_size_segment_encodes(segments: SegmentTracker) -> None:
    name = segments.make(photo_of_size(1024, 1024))
    encoded = encode_segment(SegmentRef(name, LEGACY_SHAPE, "uint8", legacy=True), rendering=RENDERING, access=ACCESS)
    assert decode(encoded).shape == LEGACY_SHAPE


@pytest.mark.fast
@pytest.mark.parametrize("shape", [(1000, 1000, 3), (1024, 1025, 3)])
def test_legacy_ref_needs_exactly_a_1024_frame(segments: SegmentTracker, shape: tuple[int, ...]) -> None:
    """A bare name promises 3145728 bytes; a bigger segment means another layout."""
    name = segments.make(photo_of_size(*shape[:2]))
    with pytest.raises(ImageError, match="3145728 bytes"):
        encode_segment(SegmentRef(name, LEGACY_SHAPE, "uint8", legacy=True), rendering=RENDERING, access=ACCESS)


@pytest.mark.fast
def test_missing_segment_is_named() -> None:
    name = "img_shm_missing_" + uuid.uuid4().hex
    with pytest.raises(ImageError, match=name):
        encode_segment(SegmentRef(name, (2, 2, 3), "uint8"), rendering=RENDERING, access=ACCESS)


def test_encoding_does_not_register_with_resource_tracker(segments: SegmentTracker) -> None:
    """multiprocessing's tracker would unlink a segment we only read, and warn at exit."""
    name = segments.make(photo_of_size(64, 64))
    script = (
        "import os\n"
        "from shared.imaging.images import encode_segment\n"
        "from shared.messages import SegmentRef\n"
        "from shared.imaging.rendering import Rendering\n"
        "from shared.imaging.segments import SegmentAccess\n"
        "access = SegmentAccess('img_shm_', frozenset({os.getuid()}))\n"
        f"encode_segment(SegmentRef({name!r}, (64, 64, 3), 'uint8'), rendering=Rendering(), access=access)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "resource_tracker" not in result.stderr
    assert segment_exists(name)


@pytest.mark.fast
def test_no_mapping_of_the_segment_stays_open(segments: SegmentTracker) -> None:
    name = segments.make(photo_of_size(64, 64))
    encode_segment(SegmentRef(name, (64, 64, 3), "uint8"), rendering=RENDERING, access=ACCESS)
    assert name not in Path("/proc/self/maps").read_text()


# ---------------------------------------------------------------- downloaded images: which formats

MAX_PIXELS = 25_000_000
REFUSED = "is not accepted; expected JPEG, PNG or WebP"


def iso_media(major: bytes, *compatible: bytes) -> bytes:
    """The first box of an ISO base media file (AVIF, HEIF, MP4): ftyp and its brands."""
    box = b"ftyp" + major + bytes(4) + b"".join(compatible)
    return (len(box) + 4).to_bytes(4, "big") + box + b"\x00\x00\x00\x08meta"


SIGNATURES = [
    ("jpeg-jfif", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "JPEG"),
    ("jpeg-exif", b"\xff\xd8\xff\xe1\x12\x34Exif\x00\x00", "JPEG"),
    ("jpeg-bare", b"\xff\xd8\xff\xdb\x00\x43\x00", "JPEG"),
    ("png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "PNG"),
    ("webp-lossy", b"RIFF\x24\x00\x00\x00WEBPVP8 ", "WebP"),
    ("webp-lossless", b"RIFF\x24\x00\x00\x00WEBPVP8L", "WebP"),
    ("webp-extended", b"RIFF\x24\x00\x00\x00WEBPVP8X", "WebP"),
    ("tiff-intel", b"II*\x00\x08\x00\x00\x00", "TIFF"),
    ("tiff-motorola", b"MM\x00*\x00\x00\x00\x08", "TIFF"),
    ("bigtiff-intel", b"II+\x00\x08\x00\x00\x00", "BigTIFF"),
    ("bigtiff-motorola", b"MM\x00+\x00\x08\x00\x00", "BigTIFF"),
    ("jp2", b"\x00\x00\x00\x0cjP  \r\n\x87\n\x00\x00\x00\x14ftypjp2 ", "JPEG 2000"),
    ("j2k-codestream", b"\xff\x4f\xff\x51\x00\x2f", "JPEG 2000"),
    ("jxl-container", b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    ("jxl-codestream", b"\xff\x0a\xfa\x7f", "JPEG XL"),
    ("gif87a", b"GIF87a\x40\x00", "GIF"),
    ("gif89a", b"GIF89a\x40\x00", "GIF"),
    ("bmp", b"BM6H\x00\x00\x00\x00", "BMP"),
    ("pbm-ascii", b"P1\n96 64\n", "PBM"),
    ("pbm", b"P4\n96 64\n", "PBM"),
    ("pgm-ascii", b"P2\n96 64\n", "PGM"),
    ("pgm", b"P5 96 64 255\n", "PGM"),
    ("ppm-ascii", b"P3\r\n96 64\n", "PPM"),
    ("ppm", b"P6\t96 64\n", "PPM"),
    ("pam", b"P7\nWIDTH 96\n", "PAM"),
    ("pfm-color", b"PF\n96 64\n-1\n", "PFM"),
    ("pfm-gray", b"Pf\n96 64\n-1\n", "PFM"),
    ("hdr-radiance", b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n", "Radiance HDR"),
    ("hdr-rgbe", b"#?RGBE\nFORMAT=32-bit_rle_rgbe\n", "Radiance HDR"),
    ("openexr", b"v/1\x01\x02\x00\x00\x00", "OpenEXR"),
    ("sun-raster", b"\x59\xa6\x6a\x95\x00\x00\x00\x60", "Sun Raster"),
    ("qoi", b"qoif\x00\x00\x00\x60", "QOI"),
    ("dicom", bytes(128) + b"DICM\x02\x00", "DICOM"),
    ("avif", iso_media(b"avif", b"avif", b"mif1", b"miaf"), "AVIF"),
    ("avif-sequence", iso_media(b"avis", b"avis", b"msf1"), "AVIF"),
    ("avif-by-compatible-brand", iso_media(b"mif1", b"mif1", b"avif"), "AVIF"),
    ("heic", iso_media(b"heic", b"mif1", b"heic"), "HEIF"),
    ("heif", iso_media(b"mif1", b"mif1"), "HEIF"),
    ("mp4", iso_media(b"isom", b"isom", b"avc1"), "ISO media"),
    # OpenCV tries AVIF before JPEG and WebP: these would reach libavif.
    ("avif-behind-jpeg-start", b"\xff\xd8\xff\xe0" + iso_media(b"avif", b"avif")[4:], "AVIF"),
    ("avif-behind-webp-start", b"RIFFftypWEBP" + bytes(4) + b"avif", "AVIF"),
    ("empty", b"", None),
    ("jpeg-cut-short", b"\xff\xd8", None),
    ("png-cut-short", b"\x89PNG", None),
    ("text", b"this is not a picture\n", None),
    ("text-starting-with-p", b"Photos moved to /new\n", None),
    ("html", b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title>", None),
    ("html-bare", b"<html><body>Access denied</body></html>", None),
    ("json", b'{"error": "not found"}', None),
    ("svg", b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', None),
    ("pdf", b"%PDF-1.7\n", None),
    ("riff-wave", b"RIFF\x24\x00\x00\x00WAVEfmt ", None),
    ("gzip", b"\x1f\x8b\x08\x00\x00\x00\x00\x00", None),
    ("zeros", bytes(200), None),
]


@pytest.mark.fast
@pytest.mark.parametrize(("data", "expected"), [(d, e) for _, d, e in SIGNATURES], ids=[n for n, _, _ in SIGNATURES])
def test_image_format_by_signature(data: bytes, expected: str | None) -> None:
    assert image_format(data) == expected


# Every format OpenCV reads, as OpenCV writes it when this build can.
WRITABLE = [
    (".jpg", "JPEG"), (".png", "PNG"), (".webp", "WebP"),
    (".tiff", "TIFF"), (".jp2", "JPEG 2000"), (".bmp", "BMP"), (".pbm", "PBM"), (".pgm", "PGM"),
    (".ppm", "PPM"), (".pam", "PAM"), (".pfm", "PFM"), (".hdr", "Radiance HDR"), (".exr", "OpenEXR"),
    (".ras", "Sun Raster"), (".gif", "GIF"), (".avif", "AVIF"), (".jxl", "JPEG XL"),
]


@pytest.fixture(scope="module")
def small_photo() -> np.ndarray:
    return photo_of_size(64, 96)


def written(ext: str, photo: np.ndarray, params: tuple[int, ...] = ()) -> bytes:
    if not cv2.haveImageWriter("image" + ext):
        pytest.skip(f"this OpenCV build cannot write {ext}")
    image = photo
    if ext in (".pfm", ".hdr", ".exr"):
        image = photo.astype(np.float32) / 255.0
    elif ext in (".pbm", ".pgm"):
        image = cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY)
    ok, buffer = cv2.imencode(ext, image, list(params))
    assert ok, ext
    return buffer.tobytes()


@pytest.mark.fast
@pytest.mark.parametrize(("ext", "name"), [w for w in WRITABLE if w[1] in ACCEPTED_FORMATS])
def test_accepted_formats_decode(ext: str, name: str, small_photo: np.ndarray) -> None:
    data = written(ext, small_photo)
    assert image_format(data) == name
    frame = decode_image(data, max_pixels=MAX_PIXELS)
    assert frame.shape == small_photo.shape and frame.dtype == np.uint8
    assert psnr(frame, small_photo) > 30


@pytest.mark.fast
@pytest.mark.parametrize(("ext", "name"), [w for w in WRITABLE if w[1] not in ACCEPTED_FORMATS])
def test_other_formats_are_refused_by_name(ext: str, name: str, small_photo: np.ndarray) -> None:
    data = written(ext, small_photo)
    assert image_format(data) == name
    # OpenCV would decode it: the refusal is ours, not a decoder's failure.
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None
    with pytest.raises(ImageError, match=f"^image format {re.escape(name)} {REFUSED}$") as refused:
        decode_image(data, max_pixels=MAX_PIXELS)
    assert not refused.value.transient


@pytest.mark.fast
def test_an_avif_box_behind_a_jpeg_start_never_reaches_a_decoder(
    small_photo: np.ndarray, capfd: pytest.CaptureFixture[str]
) -> None:
    """OpenCV picks its AVIF decoder for these bytes (it says so on stderr);
    decode_image names AVIF and calls no decoder, so OpenCV says nothing."""
    avif = written(".avif", small_photo)
    crafted = b"\xff\xd8\xff\xe0" + avif[4:]
    assert cv2.imdecode(np.frombuffer(crafted, np.uint8), cv2.IMREAD_COLOR) is None
    assert "grfmt_avif" in capfd.readouterr().err
    with pytest.raises(ImageError, match=f"^image format AVIF {REFUSED}$"):
        decode_image(crafted, max_pixels=MAX_PIXELS)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize(
    ("ext", "params", "channels"),
    [
        (".jpg", (cv2.IMWRITE_JPEG_PROGRESSIVE, 1), 3),
        (".jpg", (), 1),
        (".png", (), 4),
        (".png", (), 1),
        (".webp", (cv2.IMWRITE_WEBP_QUALITY, 80), 4),
    ],
    ids=["progressive-jpeg", "grayscale-jpeg", "png-with-alpha", "grayscale-png", "lossy-webp-with-alpha"],
)
@pytest.mark.fast
def test_what_pipelines_write_decodes_to_bgr_or_bgra(
    ext: str, params: tuple[int, ...], channels: int, small_photo: np.ndarray
) -> None:
    image = {
        1: cv2.cvtColor(small_photo, cv2.COLOR_BGR2GRAY),
        3: small_photo,
        4: cv2.cvtColor(small_photo, cv2.COLOR_BGR2BGRA),
    }[channels]
    frame = decode_image(written(ext, image, params), max_pixels=MAX_PIXELS)
    # An alpha channel is kept, for the encoder to composite (shared.imaging.colour);
    # OpenCV's WebP encoder leaves out one that is opaque everywhere.
    kept = 4 if ext == ".png" and channels == 4 else 3
    assert frame.shape == (*small_photo.shape[:2], kept) and frame.dtype == np.uint8


@pytest.mark.fast
def test_sixteen_bit_png_decodes_to_eight_bit_bgr(small_photo: np.ndarray) -> None:
    frame = decode_image(written(".png", small_photo.astype(np.uint16) << 8), max_pixels=MAX_PIXELS)
    assert frame.dtype == np.uint8
    assert psnr(frame, small_photo) > 40


@pytest.mark.fast
@pytest.mark.parametrize("data", [b"this is not a picture\n" * 50, b"<!DOCTYPE html>\n<html></html>", b""])
def test_data_like_no_image_is_not_decodable(data: bytes) -> None:
    with pytest.raises(ImageError, match="^downloaded data is not a decodable image: it starts like no image format"):
        decode_image(data, max_pixels=MAX_PIXELS)


@pytest.mark.fast
@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp"])
def test_an_accepted_format_that_is_corrupt_is_named(ext: str, small_photo: np.ndarray) -> None:
    data = written(ext, small_photo)
    corrupt = data[:16] + bytes(len(data) - 16)
    name = image_format(data)
    with pytest.raises(ImageError, match=f"not a decodable image: a corrupt or truncated {name}$"):
        decode_image(corrupt, max_pixels=MAX_PIXELS)


@pytest.mark.fast
def test_more_pixels_than_max_pixels_is_refused(small_photo: np.ndarray) -> None:
    with pytest.raises(ImageError, match=r"more than MAX_PIXELS=6143 pixels"):
        decode_image(written(".png", small_photo), max_pixels=64 * 96 - 1)
    assert decode_image(written(".png", small_photo), max_pixels=64 * 96).shape == small_photo.shape


def test_a_tiff_by_url_fails_naming_its_format_and_the_next_task_is_served(
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
    queue_name: str,
    http_server: HttpServer,
    photos: dict[str, np.ndarray],
) -> None:
    pool = pool_factory(workers=1, env={"URL_ALLOW_LOOPBACK": "true"})
    pool.wait_ready()
    chelsea = photos["chelsea"]
    tiff = http_server.add("/scan.tiff", written(".tiff", chelsea), content_type="image/tiff")
    jpeg = http_server.add("/photo.jpg", written(".jpg", chelsea))
    push(redis_client, queue_name, {"request_id": "tiff", "image_id": "tiff", "image_url": tiff})
    push(redis_client, queue_name, {"request_id": "jpeg", "image_id": "jpeg", "image_url": jpeg})

    records = wait_for_records(pool.output_dir, 2, 60, pool=pool)

    assert [r["request_id"] for r in records] == ["tiff", "jpeg"], records
    refused, served = records
    assert refused["status"] == "failed" and refused["attempts"] == 1, refused
    assert refused["error"] == f"image format TIFF {REFUSED}", refused
    assert served["status"] == "completed", served
    assert (served["height"], served["width"]) == chelsea.shape[:2]
    assert not pool.events("child_died")


@pytest.mark.fast
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_frames_convert_in_bands_exactly_as_whole(dtype: type) -> None:
    """The conversion goes band by band to bound a worker's memory; every band
    boundary must give what the whole-frame formula gives, NaN and inf included."""
    from shared.imaging.images import FLOAT_BAND_ROWS, _as_uint8

    rng = np.random.default_rng(7)
    frame = (rng.random((FLOAT_BAND_ROWS * 3 + 5, 33, 3)) * 1.4 - 0.2).astype(dtype)
    frame[0, 0, 0], frame[FLOAT_BAND_ROWS, 1, 1], frame[-1, 2, 2] = np.nan, np.inf, -np.inf
    whole = np.clip(np.nan_to_num(frame, nan=0.0, posinf=1.0, neginf=0.0) * 255.0, 0, 255).astype(np.uint8)
    assert np.array_equal(_as_uint8(frame), whole)
