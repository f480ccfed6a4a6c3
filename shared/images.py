"""Pixels in, JPEG bytes out: shared-memory attach, URL image decode, encode.

Hazards handled here:
- Attaching must not involve multiprocessing.shared_memory: on 3.11/3.12 its
  resource tracker would unlink a segment we merely read, and warn at exit.
  We open /dev/shm/NAME read-only ourselves and map it.
- A declared shape larger than the real segment would read out of bounds:
  the mapping is sized from the declaration only after fstat proves it fits.
- The pixels stay in the mapping all the way into the encoder (a read-only
  numpy view, no copy), except when a dtype conversion is required.
- A numpy view pins the mapping; every view is dropped before the mapping is
  closed, inside `encode_segment`, so no reference escapes.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from shared.messages import SegmentRef

SHM_DIR = Path("/dev/shm")


class ImageError(Exception):
    """The image could not be loaded or encoded; the message says why.

    `transient` errors (timeouts, connection resets, HTTP 5xx and 429) may
    succeed later and are retried; the others fail the task at once.
    `retry_after` is a server's Retry-After, in seconds, when it gave one.
    """

    def __init__(self, message: str, *, transient: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class EncodedImage:
    jpeg: bytes
    width: int
    height: int


def segment_path(name: str) -> Path:
    return SHM_DIR / name


def encode_segment(ref: SegmentRef, *, quality: int) -> EncodedImage:
    """Encode the frame in shared-memory segment `ref` without copying its pixels."""
    try:
        fd = os.open(segment_path(ref.name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageError(f"shared memory segment {ref.name!r} does not exist") from None
    except OSError as exc:
        raise ImageError(f"cannot open shared memory segment {ref.name!r}: {exc.strerror}") from None
    try:
        real_size = os.fstat(fd).st_size
        _check_fits(ref, real_size)
        mapping = mmap.mmap(fd, ref.nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        pixels = np.frombuffer(mapping, dtype=ref.dtype, count=ref.nbytes // np.dtype(ref.dtype).itemsize)
        encoded = encode_pixels(pixels.reshape(ref.shape), quality=quality)
        del pixels
    finally:
        mapping.close()
    return encoded


def _check_fits(ref: SegmentRef, real_size: int) -> None:
    if ref.legacy and real_size != ref.nbytes:
        raise ImageError(
            f"shm_info is a bare segment name, which means a 1024x1024x3 uint8 frame "
            f"({ref.nbytes} bytes), but segment {ref.name!r} holds {real_size} bytes"
        )
    if ref.nbytes > real_size:
        raise ImageError(
            f"shape {list(ref.shape)} of {ref.dtype} needs {ref.nbytes} bytes "
            f"but segment {ref.name!r} holds only {real_size}"
        )


def encode_pixels(pixels: np.ndarray, *, quality: int) -> EncodedImage:
    """JPEG-encode a BGR, BGRA or grayscale frame of any supported dtype."""
    frame = _as_uint8(pixels)
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame.reshape(frame.shape[:2])
    elif frame.ndim == 3 and frame.shape[2] == 4:
        # JPEG has no alpha; drop it explicitly rather than rely on codec defaults.
        frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    try:
        ok, buffer = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    except cv2.error as exc:
        raise ImageError(f"JPEG encoder refused the frame: {exc.msg if hasattr(exc, 'msg') else exc}") from None
    if not ok:
        raise ImageError("JPEG encoder failed")
    return EncodedImage(buffer.tobytes(), width=frame.shape[1], height=frame.shape[0])


def _as_uint8(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.uint16:
        return (pixels >> 8).astype(np.uint8)
    if pixels.dtype.kind == "f":
        # Float frames are taken as 0..1 intensities, the usual convention upstream.
        scaled = np.nan_to_num(pixels, nan=0.0, posinf=1.0, neginf=0.0) * 255.0
        return np.clip(scaled, 0, 255).astype(np.uint8)
    raise ImageError(f"dtype {pixels.dtype} is not supported")


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode downloaded bytes to BGR. OpenCV refuses frames above MAX_PIXELS
    before allocating them (the supervisor sets OPENCV_IO_MAX_IMAGE_PIXELS)."""
    try:
        frame = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        raise ImageError(f"image is corrupt or has more than MAX_PIXELS={max_pixels} pixels") from None
    if frame is None:
        raise ImageError("downloaded data is not a decodable image")
    if frame.shape[0] * frame.shape[1] > max_pixels:
        raise ImageError(f"image has more than MAX_PIXELS={max_pixels} pixels")
    return frame


def unlink_segment(name: str) -> bool:
    """Remove a segment; False when it was already gone."""
    try:
        os.unlink(segment_path(name))
    except FileNotFoundError:
        return False
    return True
