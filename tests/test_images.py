"""Encoding frames straight from shared memory: formats, bad declarations, no leaks."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.images import EncodedImage, ImageError, encode_segment
from shared.messages import LEGACY_SHAPE, SegmentRef
from tests.helpers import REPO_ROOT, SegmentTracker, photo_of_size, psnr, segment_exists


def decode(encoded: EncodedImage) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(encoded.jpeg, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None, "not a decodable JPEG"
    return image


def encode_array(segments: SegmentTracker, array: np.ndarray) -> np.ndarray:
    name = segments.make(array)
    encoded = encode_segment(SegmentRef(name, array.shape, str(array.dtype)), quality=90)
    assert (encoded.height, encoded.width) == array.shape[:2]
    return decode(encoded)


def test_photo_segment_round_trips(segments: SegmentTracker) -> None:
    photo = photo_of_size(480, 640)
    decoded = encode_array(segments, photo)
    assert decoded.shape == photo.shape
    assert psnr(decoded, photo) > 30


def test_grayscale_segment(segments: SegmentTracker, photos: dict[str, np.ndarray]) -> None:
    camera = photos["camera"]
    assert psnr(encode_array(segments, camera), camera) > 30


def test_single_channel_segment(segments: SegmentTracker, photos: dict[str, np.ndarray]) -> None:
    camera = photos["camera"]
    decoded = encode_array(segments, camera[:, :, np.newaxis])
    assert decoded.shape == camera.shape
    assert psnr(decoded, camera) > 30


def test_bgra_segment_drops_alpha(segments: SegmentTracker) -> None:
    photo = photo_of_size(240, 320)
    bgra = cv2.cvtColor(photo, cv2.COLOR_BGR2BGRA)
    bgra[..., 3] = 0  # fully transparent: must not blank the picture
    decoded = encode_array(segments, bgra)
    assert decoded.shape == photo.shape
    assert psnr(decoded, photo) > 30


def test_uint16_segment_keeps_high_byte(segments: SegmentTracker) -> None:
    photo = photo_of_size(240, 320)
    decoded = encode_array(segments, photo.astype(np.uint16) << 8)
    assert psnr(decoded, photo) > 30


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_segment_in_unit_range(segments: SegmentTracker, dtype: type) -> None:
    photo = photo_of_size(240, 320)
    decoded = encode_array(segments, photo.astype(dtype) / 255.0)
    assert psnr(decoded, photo) > 30


def test_declared_shape_larger_than_segment_is_refused(segments: SegmentTracker) -> None:
    name = segments.make(photo_of_size(10, 10))
    with pytest.raises(ImageError, match="holds only 300"):
        encode_segment(SegmentRef(name, (1000, 1000, 3), "uint8"), quality=80)


def test_legacy_ref_on_full_size_segment_encodes(segments: SegmentTracker) -> None:
    name = segments.make(photo_of_size(1024, 1024))
    encoded = encode_segment(SegmentRef(name, LEGACY_SHAPE, "uint8", legacy=True), quality=80)
    assert decode(encoded).shape == LEGACY_SHAPE


@pytest.mark.parametrize("shape", [(1000, 1000, 3), (1024, 1025, 3)])
def test_legacy_ref_needs_exactly_a_1024_frame(segments: SegmentTracker, shape: tuple[int, ...]) -> None:
    """A bare name promises 3145728 bytes; a bigger segment means another layout."""
    name = segments.make(photo_of_size(*shape[:2]))
    with pytest.raises(ImageError, match="3145728 bytes"):
        encode_segment(SegmentRef(name, LEGACY_SHAPE, "uint8", legacy=True), quality=80)


def test_missing_segment_is_named() -> None:
    name = "img_shm_missing_" + uuid.uuid4().hex
    with pytest.raises(ImageError, match=name):
        encode_segment(SegmentRef(name, (2, 2, 3), "uint8"), quality=80)


def test_encoding_does_not_register_with_resource_tracker(segments: SegmentTracker) -> None:
    """multiprocessing's tracker would unlink a segment we only read, and warn at exit."""
    name = segments.make(photo_of_size(64, 64))
    script = (
        "from shared.images import encode_segment\n"
        "from shared.messages import SegmentRef\n"
        f"encode_segment(SegmentRef({name!r}, (64, 64, 3), 'uint8'), quality=80)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "resource_tracker" not in result.stderr
    assert segment_exists(name)


def test_no_mapping_of_the_segment_stays_open(segments: SegmentTracker) -> None:
    name = segments.make(photo_of_size(64, 64))
    encode_segment(SegmentRef(name, (64, 64, 3), "uint8"), quality=80)
    assert name not in Path("/proc/self/maps").read_text()
