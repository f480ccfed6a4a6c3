"""What is hosted looks like what was made: embedded ICC profiles converted to
sRGB, transparency over ALPHA_BACKGROUND, EXIF orientation applied, and the
JPEG settings, read back from the written file's own frame header. The
profiles are built here from published numbers (harness/icc.py)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from harness import icc
from harness.http_server import HttpServer
from harness.photos import photo_of_size
from harness.segments import SegmentTracker
from shared.imaging import colour
from shared.imaging.images import ImageError, decode_image, encode_pixels, image_format
from shared.imaging.rendering import Rendering
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
    if not env:  # the defaults: the bytes the seed wrote for this frame, from either source
        seed = cv2_bytes(".jpg", photo, (cv2.IMWRITE_JPEG_QUALITY, 80))
        assert all(Path(r["file_path"]).read_bytes() == seed for r in records)


# ---------------------------------------------------------------- colour: what goes in

# A flat Display P3 colour and what it is in sRGB (computed by hand: P3 decoded,
# the P3-to-sRGB matrix, sRGB encoded): 15, 7 and 19 levels off if read as sRGB.
P3_RGB, P3_AS_SRGB = (200, 100, 50), (215, 93, 31)
# 128 on a linear gray is 188 in sRGB.
LINEAR_GRAY, LINEAR_GRAY_AS_SRGB = 128, 188
# Flat colours survive JPEG at this setting to within a level or two.
EXACT_JPEG = {"JPEG_QUALITY": "95", "JPEG_SUBSAMPLING": "444"}
TOLERANCE = 3


def flat_bgr(rgb: tuple[int, int, int], size: int = 64) -> np.ndarray:
    return np.full((size, size, 3), rgb[::-1], np.uint8)


def cv2_bytes(ext: str, image: np.ndarray, params: tuple[int, ...] = ()) -> bytes:
    ok, buffer = cv2.imencode(ext, image, list(params))
    assert ok
    return buffer.tobytes()


def hosted_rgb(record: dict, at: tuple[int, int] | None = None) -> tuple[int, ...]:
    """The RGB of the hosted JPEG at (row, column), its centre by default."""
    assert record["status"] == "completed", record
    image = cv2.imread(record["file_path"], cv2.IMREAD_COLOR)
    row, column = at if at is not None else (image.shape[0] // 2, image.shape[1] // 2)
    return tuple(int(v) for v in image[row, column][::-1])


def near(actual: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return max(abs(a - e) for a, e in zip(actual, expected, strict=True)) <= TOLERANCE


def profiled_inputs() -> dict[str, tuple[bytes, tuple[int, int, int]]]:
    """name -> (file bytes, the sRGB colour it must be hosted as)."""
    from PIL import Image

    p3 = icc.display_p3()
    p3_bgr = flat_bgr(P3_RGB)
    cmyk_profile = icc.press_cmyk()
    return {
        "p3.png": (icc.embedded_png(cv2_bytes(".png", p3_bgr), p3), P3_AS_SRGB),
        # Small chunks in reverse order: a reader must join them by sequence number.
        "p3.jpg": (
            icc.embedded_jpeg(
                cv2_bytes(".jpg", p3_bgr, (cv2.IMWRITE_JPEG_QUALITY, 100, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                                           cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444)),
                p3, chunk_size=200, reverse=True,
            ),
            P3_AS_SRGB,
        ),
        "srgb.jpg": (
            icc.embedded_jpeg(cv2_bytes(".jpg", p3_bgr, (cv2.IMWRITE_JPEG_QUALITY, 100)), icc.srgb_v2_tables()),
            P3_RGB,
        ),
        "p3.webp": (icc.as_bytes(Image.new("RGB", (64, 64), P3_RGB), "WEBP", lossless=True, icc_profile=p3), P3_AS_SRGB),
        "gray.png": (
            icc.embedded_png(cv2_bytes(".png", np.full((64, 64), LINEAR_GRAY, np.uint8)), icc.linear_gray()),
            (LINEAR_GRAY_AS_SRGB,) * 3,
        ),
        # Adobe CMYK (Pillow stores the inks inverted, as Photoshop does), 100% cyan, on a press profile.
        "press-cyan.jpg": (
            icc.as_bytes(Image.new("CMYK", (64, 64), (255, 0, 0, 0)), "JPEG", quality=100, icc_profile=cmyk_profile),
            icc.PRESS_INKS["cyan"],
        ),
        # Without a profile, CMYK is read naively: magenta + yellow is red.
        "plain-red-cmyk.jpg": (icc.as_bytes(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG", quality=100), (255, 0, 0)),
    }


def test_embedded_profiles_are_converted_to_srgb(
    pool_factory: PoolFactory, redis_client: redis.Redis, queue_name: str, http_server: HttpServer
) -> None:
    inputs = profiled_inputs()
    pool = pool_factory(workers=1, env={"URL_ALLOW_LOOPBACK": "true", **EXACT_JPEG})
    pool.wait_ready()
    for name, (data, _) in inputs.items():
        push(redis_client, queue_name, {"request_id": name, "image_id": name, "image_url": http_server.add(f"/{name}", data)})

    records = {r["request_id"]: r for r in wait_for_records(pool.output_dir, len(inputs), 60, pool=pool)}

    hosted = {name: hosted_rgb(records[name]) for name in inputs}
    wrong = {name: (hosted[name], expected) for name, (_, expected) in inputs.items() if not near(hosted[name], expected)}
    assert not wrong, wrong
    for record in records.values():
        segments = [marker for marker, _ in jpeg_segments(Path(record["file_path"]).read_bytes())]
        assert 0xE2 not in segments, f"{record['request_id']}: the output carries a profile"


def test_a_hostile_profile_fails_its_task_and_the_next_is_served(
    pool_factory: PoolFactory, redis_client: redis.Redis, queue_name: str, http_server: HttpServer
) -> None:
    png = cv2_bytes(".png", flat_bgr(P3_RGB))
    jpeg = cv2_bytes(".jpg", flat_bgr(P3_RGB))
    bad = {
        "garbage.png": (icc.embedded_png(png, b"not a profile" * 40), "the embedded ICC profile is malformed"),
        "huge.jpg": (icc.embedded_jpeg(jpeg, bytes(colour.MAX_PROFILE_BYTES + 1)), "larger than 4 MiB"),
        "cmyk-profile-on-rgb.png": (
            icc.embedded_png(png, icc.press_cmyk()), "profile is for CMYK but the image is RGB"
        ),
    }
    pool = pool_factory(workers=1, env={"URL_ALLOW_LOOPBACK": "true"})
    pool.wait_ready()
    for name, (data, _) in bad.items():
        push(redis_client, queue_name, {"request_id": name, "image_id": name, "image_url": http_server.add(f"/{name}", data)})
    push(redis_client, queue_name, {"request_id": "fine", "image_id": "fine", "image_url": http_server.add("/fine.png", png)})

    records = {r["request_id"]: r for r in wait_for_records(pool.output_dir, len(bad) + 1, 60, pool=pool)}

    for name, (_, error) in bad.items():
        assert records[name]["status"] == "failed" and error in records[name]["error"], records[name]
        assert records[name]["attempts"] == 1, records[name]
    assert records["fine"]["status"] == "completed", records["fine"]
    assert not pool.events("child_died")
    assert "Traceback" not in pool.stderr_tail()


# ---------------------------------------------------------------- transparency


def transparent_bgra() -> np.ndarray:
    """Left half alpha 0 over black pixels (what most files hold there), right
    half 50% alpha over pure red, a top-left corner of opaque green."""
    bgra = np.zeros((64, 64, 4), np.uint8)
    bgra[:, 32:] = (0, 0, 255, 128)
    bgra[:16, :16] = (0, 255, 0, 255)
    return bgra


def over(background: tuple[int, int, int]) -> dict[tuple[int, int], tuple[int, int, int]]:
    """What transparent_bgra() must look like over `background`, at sample points."""
    half_red = tuple(round((255 * 128 + b * 127) / 255) if i == 0 else round(b * 127 / 255) for i, b in enumerate(background))
    return {(32, 10): background, (32, 50): half_red, (8, 8): (0, 255, 0)}


@pytest.mark.parametrize("background", [None, "#336699"], ids=["default-white", "blue"])
def test_transparent_pixels_show_alpha_background(
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
    queue_name: str,
    http_server: HttpServer,
    segments: SegmentTracker,
    background: str | None,
) -> None:
    from PIL import Image

    bgra = transparent_bgra()
    rgba = Image.fromarray(cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGBA))
    inputs = {
        "rgba.png": cv2_bytes(".png", bgra),
        "rgba.webp": icc.as_bytes(rgba, "WEBP", lossless=True, exact=True),
        "lossy-alpha.webp": icc.as_bytes(rgba, "WEBP", quality=100),
        "rgba16.png": cv2_bytes(".png", bgra.astype(np.uint16) * 257),
    }
    env = {"URL_ALLOW_LOOPBACK": "true", **EXACT_JPEG}
    if background is not None:
        env["ALPHA_BACKGROUND"] = background
    pool = pool_factory(workers=1, env=env)
    pool.wait_ready()
    for name, data in inputs.items():
        push(redis_client, queue_name, {"request_id": name, "image_id": name, "image_url": http_server.add(f"/{name}", data)})
    push(redis_client, queue_name, segments.message("bgra-frame", "bgra-frame", bgra))

    records = wait_for_records(pool.output_dir, len(inputs) + 1, 60, pool=pool)

    expected = over((51, 102, 153) if background else (255, 255, 255))
    hosted = {r["request_id"]: {at: hosted_rgb(r, at) for at in expected} for r in records}
    wrong = {
        name: {at: (got, expected[at]) for at, got in points.items() if not near(got, expected[at])}
        for name, points in hosted.items()
    }
    assert not any(wrong.values()), wrong


# ---------------------------------------------------------------- the decisions, in process


@pytest.mark.fast
def test_a_plain_opaque_image_is_left_as_decoded() -> None:
    """No profile, no alpha: the colour step takes nothing and copies nothing."""
    photo = photo_of_size(48, 64)
    for ext in (".jpg", ".png", ".webp"):
        source = colour.read_header(cv2_bytes(ext, photo), image_format(cv2_bytes(ext, photo)))
        assert source == colour.PLAIN and source.imread_flags == cv2.IMREAD_COLOR, ext
    assert colour.to_srgb(photo, colour.PLAIN, b"") is photo


@pytest.mark.fast
def test_an_srgb_profile_is_taken_as_srgb_without_a_conversion() -> None:
    """What cameras embed most is sRGB itself: found so by probing its
    transform once, then the pixels are left as decoded."""
    from PIL import ImageCms

    for profile in (icc.srgb_v2_tables(), ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()):
        assert colour._transform_for(profile, "RGB") is None
    assert colour._transform_for(icc.display_p3(), "RGB") is not None
    photo = photo_of_size(48, 64)
    plain = cv2_bytes(".jpg", photo)
    tagged = icc.embedded_jpeg(plain, icc.srgb_v2_tables())
    assert np.array_equal(decode_image(tagged, max_pixels=10**6), decode_image(plain, max_pixels=10**6))


@pytest.mark.fast
def test_jpeg_profile_chunks_are_joined_by_sequence_number() -> None:
    profile = icc.display_p3()
    jpeg = icc.embedded_jpeg(cv2_bytes(".jpg", flat_bgr(P3_RGB)), profile, chunk_size=100, reverse=True)
    assert colour.read_header(jpeg, "JPEG").profile == profile


@pytest.mark.fast
def test_profiles_are_found_in_png_and_webp() -> None:
    from PIL import Image

    profile = icc.display_p3()
    png = icc.embedded_png(cv2_bytes(".png", flat_bgr(P3_RGB)), profile)
    webp = icc.as_bytes(Image.new("RGB", (8, 8)), "WEBP", icc_profile=profile)
    assert colour.read_header(png, "PNG").profile == profile
    assert colour.read_header(webp, "WebP").profile == profile


@pytest.mark.fast
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: cv2_bytes(".png", np.zeros((8, 8, 4), np.uint8)), True),
        (lambda: icc.as_bytes(_palette_with_transparency(), "PNG"), True),
        (lambda: cv2_bytes(".png", np.zeros((8, 8, 3), np.uint8)), False),
        (lambda: cv2_bytes(".webp", np.zeros((8, 8, 4), np.uint8), (cv2.IMWRITE_WEBP_QUALITY, 101)), True),
        (lambda: cv2_bytes(".webp", np.zeros((8, 8, 3), np.uint8)), False),
    ],
    ids=["rgba-png", "palette-png-with-trns", "rgb-png", "lossless-webp-with-alpha", "lossy-webp"],
)
def test_transparency_is_found_in_the_header(make: object, expected: bool) -> None:
    data = make()  # type: ignore[operator]
    assert colour.read_header(data, image_format(data)).alpha is expected


def _palette_with_transparency() -> object:
    from PIL import Image

    image = Image.new("P", (8, 8))
    image.putpalette([255, 0, 0, 0, 255, 0])
    image.info["transparency"] = 0
    return image


@pytest.mark.fast
def test_a_profile_too_large_is_refused_before_it_is_joined_or_inflated() -> None:
    jpeg = cv2_bytes(".jpg", flat_bgr(P3_RGB))
    png = cv2_bytes(".png", flat_bgr(P3_RGB))
    assert colour.read_header(icc.embedded_jpeg(jpeg, bytes(colour.MAX_PROFILE_BYTES)), "JPEG").profile is not None
    for data, found in [
        (icc.embedded_jpeg(jpeg, bytes(colour.MAX_PROFILE_BYTES + 1)), "JPEG"),
        # 4 MiB + 1 of zeros inflates from a few KB: the bomb is caught while inflating.
        (icc.embedded_png(png, bytes(colour.MAX_PROFILE_BYTES + 1)), "PNG"),
    ]:
        with pytest.raises(colour.ColourError, match="larger than 4 MiB"):
            colour.read_header(data, found)


@pytest.mark.fast
def test_missing_profile_chunks_are_named() -> None:
    jpeg = icc.embedded_jpeg(cv2_bytes(".jpg", flat_bgr(P3_RGB)), icc.display_p3(), chunk_size=100)
    second = jpeg.index(b"ICC_PROFILE\x00\x02")
    without_second = jpeg[: second - 4] + jpeg[second - 4 + 2 + int.from_bytes(jpeg[second - 2 : second], "big") :]
    with pytest.raises(ImageError, match="ICC profile chunks \\(APP2\\) are incomplete"):
        decode_image(without_second, max_pixels=10**6)


@pytest.mark.fast
def test_compositing_uses_straight_alpha_and_keeps_opaque_pixels_exact() -> None:
    bgra = np.array([[[10, 20, 30, 255], [10, 20, 250, 0], [0, 0, 200, 51]]], np.uint8)
    # Blue background (RGB 0, 0, 255): in BGR (255, 0, 0).
    assert colour.composite(bgra, (0, 0, 255)).tolist() == [[[10, 20, 30], [255, 0, 0], [204, 0, 40]]]
    photo = photo_of_size(32, 32)
    opaque = cv2.cvtColor(photo, cv2.COLOR_BGR2BGRA)
    assert encode_pixels(opaque, rendering=Rendering()).jpeg == encode_pixels(photo, rendering=Rendering()).jpeg


@pytest.mark.fast
@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_transparent_image_is_turned_as_opencv_turns_an_opaque_one(orientation: int) -> None:
    """IMREAD_UNCHANGED (kept for alpha) ignores EXIF orientation; we apply it
    the way OpenCV's IMREAD_COLOR does."""
    from PIL import Image

    rng = np.random.default_rng(orientation)
    rgba = rng.integers(0, 256, (24, 40, 4), np.uint8)
    rgba[:, :, 3] = 255
    rgba[0, 0, 3] = 254  # some transparency, or the WebP encoder leaves alpha out
    exif = Image.Exif()
    exif[colour.ORIENTATION_TAG] = orientation
    for options in ({"format": "PNG"}, {"format": "WEBP", "lossless": True, "exact": True}):
        data = icc.as_bytes(Image.fromarray(rgba), options.pop("format"), exif=exif, **options)
        bgra = decode_image(data, max_pixels=10**6)
        assert bgra.shape[2] == 4
        assert np.array_equal(bgra[:, :, :3], cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))


# ---------------------------------------------------------------- orientation


def test_exif_orientation_is_applied_and_not_carried_over(
    pool_factory: PoolFactory, redis_client: redis.Redis, queue_name: str, http_server: HttpServer
) -> None:
    """Stored 64 wide and 32 high with a red block top left, tagged "turn 90°
    clockwise" (6): hosted 32 wide and 64 high, the block top right."""
    from PIL import Image

    stored = np.full((32, 64, 4), (0, 0, 255, 255), np.uint8)  # blue, opaque
    stored[:16, :16] = (255, 0, 0, 255)
    stored[20:, 40:, 3] = 200  # some transparency, so the PNG and WebP keep alpha
    exif = Image.Exif()
    exif[colour.ORIENTATION_TAG] = 6
    picture = Image.fromarray(stored)
    # The same on press CMYK with its profile (decoded by Pillow, turned by
    # us): red ink (magenta + yellow) on blue ink (cyan + magenta).
    inks = np.zeros((32, 64, 4), np.uint8)
    inks[:, :] = (255, 255, 0, 0)
    inks[:16, :16] = (0, 255, 255, 0)
    press_red, press_blue = (229, 0, 0), (0, 0, 112)
    inputs = {
        "turned.jpg": icc.as_bytes(picture.convert("RGB"), "JPEG", quality=95, exif=exif),
        "turned-rgba.png": icc.as_bytes(picture, "PNG", exif=exif),
        "turned-rgba.webp": icc.as_bytes(picture, "WEBP", lossless=True, exact=True, exif=exif),
        "turned-press.jpg": icc.as_bytes(
            Image.fromarray(inks, "CMYK"), "JPEG", quality=100, exif=exif, icc_profile=icc.press_cmyk()
        ),
    }
    pool = pool_factory(workers=1, env={"URL_ALLOW_LOOPBACK": "true", **EXACT_JPEG})
    pool.wait_ready()
    for name, data in inputs.items():
        push(redis_client, queue_name, {"request_id": name, "image_id": name, "image_url": http_server.add(f"/{name}", data)})

    records = wait_for_records(pool.output_dir, len(inputs), 60, pool=pool)

    for record in records:
        red, blue = (press_red, press_blue) if record["request_id"] == "turned-press.jpg" else ((255, 0, 0), (0, 0, 255))
        assert (record["width"], record["height"]) == (32, 64), record
        assert near(hosted_rgb(record, (4, 28)), red), (record, hosted_rgb(record, (4, 28)))  # top right
        assert near(hosted_rgb(record, (4, 4)), blue), (record, hosted_rgb(record, (4, 4)))  # top left
        markers = [marker for marker, _ in jpeg_segments(Path(record["file_path"]).read_bytes())]
        assert 0xE1 not in markers, f"{record['request_id']}: the hosted JPEG carries EXIF"


@pytest.mark.fast
def test_a_sixteen_bit_png_with_alpha_gets_the_share_of_max_pixels_its_memory_allows() -> None:
    """Its alpha is decoded at 16 bits (16 bytes a pixel against the 6 to 9
    MAX_PIXELS is sized for): refused above MAX_PIXELS x 9/16, named."""
    data = cv2_bytes(".png", np.zeros((40, 50, 4), np.uint16))
    assert decode_image(data, max_pixels=40 * 50 * 16 // 9 + 1).shape == (40, 50, 4)
    with pytest.raises(ImageError, match="16-bit PNG with transparency takes 16 bytes a pixel"):
        decode_image(data, max_pixels=40 * 50 * 16 // 9 - 1)
    # Eight bits, or no alpha: MAX_PIXELS itself.
    assert decode_image(cv2_bytes(".png", np.zeros((40, 50, 4), np.uint8)), max_pixels=40 * 50).shape == (40, 50, 4)
    assert decode_image(cv2_bytes(".png", np.zeros((40, 50, 3), np.uint16)), max_pixels=40 * 50).shape == (40, 50, 3)


@pytest.mark.fast
def test_a_cmyk_jpeg_with_a_profile_gets_the_share_of_max_pixels_its_memory_allows() -> None:
    """Its inks are decoded a second time, beside OpenCV's frame: a progressive
    one peaked at 15.6 bytes a pixel. Refused above MAX_PIXELS x 9/16, named;
    without a profile (one decode), MAX_PIXELS itself."""
    inks = Image.new("CMYK", (50, 40), (9, 9, 9, 9))
    profiled = icc.as_bytes(inks, "JPEG", icc_profile=icc.press_cmyk(), progressive=True)
    assert decode_image(profiled, max_pixels=40 * 50 * 16 // 9 + 1).shape == (40, 50, 3)
    with pytest.raises(ImageError, match="CMYK JPEG with an ICC profile is decoded twice, and takes 16 bytes a pixel"):
        decode_image(profiled, max_pixels=40 * 50 * 16 // 9 - 1)
    assert decode_image(icc.as_bytes(inks, "JPEG"), max_pixels=40 * 50).shape == (40, 50, 3)


def _profiled_file(kind: int, profile: bytes) -> bytes:
    from PIL import Image

    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, 8:, 3] = 255
    if kind == 0:
        return icc.embedded_png(cv2_bytes(".png", rgba), profile)
    if kind == 1:
        return icc.embedded_jpeg(cv2_bytes(".jpg", flat_bgr(P3_RGB, 16)), profile, chunk_size=150)
    if kind == 2:
        return icc.as_bytes(Image.fromarray(rgba), "WEBP", lossless=True, icc_profile=profile)
    return icc.as_bytes(Image.new("CMYK", (16, 16), (9, 9, 9, 9)), "JPEG", icc_profile=profile)


PROFILES = (icc.display_p3(), icc.display_p3(), icc.display_p3(), icc.press_cmyk())
BYTE_EDITS = st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), max_size=4)


def _edited(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    changed = bytearray(data)
    for at, value in edits:
        if at < len(changed):
            changed[at] = value
    return bytes(changed)


@pytest.mark.fast
@settings(max_examples=300, deadline=None)
@given(kind=st.integers(0, 3), profile_edits=BYTE_EDITS, file_edits=BYTE_EDITS, cut=st.integers(16, 3000))
def test_damaged_headers_and_profiles_end_in_an_image_or_an_image_error(
    kind: int, profile_edits: list[tuple[int, int]], file_edits: list[tuple[int, int]], cut: int
) -> None:
    """A profile with bytes changed, in a file with bytes changed or cut
    short: a frame or an ImageError, never another exception."""
    data = _edited(_profiled_file(kind, _edited(PROFILES[kind], profile_edits)), file_edits)[:cut]
    try:
        frame = decode_image(data, max_pixels=10**6)
    except ImageError:
        return
    assert frame.dtype == np.uint8 and frame.ndim in (2, 3)


@pytest.mark.fast
@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_a_header_of_too_many_segments_is_refused_before_it_costs(image_format: str) -> None:
    """Empty segments by the million would keep the header walk busy for
    seconds; files that cameras and exporters write have tens."""
    import struct
    import zlib

    photo = photo_of_size(16, 16)

    def padded(count: int) -> bytes:
        if image_format == "JPEG":
            jpeg = cv2_bytes(".jpg", photo)
            return jpeg[:2] + b"\xff\xef\x00\x02" * count + jpeg[2:]
        png = cv2_bytes(".png", photo)
        chunk = struct.pack(">I", 0) + b"teXt" + struct.pack(">I", zlib.crc32(b"teXt"))
        return png[:33] + chunk * count + png[33:]

    assert decode_image(padded(colour.MAX_HEADER_SEGMENTS - 10), max_pixels=10**6).shape == photo.shape
    with pytest.raises(ImageError, match=f"^the {image_format} has more than 1024 header segments"):
        decode_image(padded(colour.MAX_HEADER_SEGMENTS), max_pixels=10**6)
