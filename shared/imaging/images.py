"""Pixels in, JPEG bytes out: shared-memory attach, URL image decode, encode.

Hazards handled here:
- Attaching must not involve multiprocessing.shared_memory: on 3.11/3.12 its
  resource tracker would unlink a segment we merely read, and warn at exit.
  We open /dev/shm/NAME read-only ourselves (through shared.imaging.segments, which
  decides whether a message may name it) and map it.
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

import cv2
import numpy as np

from shared.imaging import colour, decode_limits
from shared.imaging.decode_limits import DecodeRefused
from shared.imaging.rendering import Rendering
from shared.imaging.segments import SegmentAccess, SegmentRefused, open_segment
from shared.messages import SegmentRef

# Rows of a float frame converted to uint8 at a time.
FLOAT_BAND_ROWS = 64


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


def encode_segment(ref: SegmentRef, *, rendering: Rendering, access: SegmentAccess) -> EncodedImage:
    """Encode the frame in shared-memory segment `ref` without copying its pixels.
    Only a segment `access` allows is opened (shared.imaging.segments)."""
    try:
        fd, real_size = open_segment(ref.name, access)
    except FileNotFoundError:
        raise ImageError(f"shared memory segment {ref.name!r} does not exist") from None
    except SegmentRefused as exc:
        raise ImageError(str(exc)) from None
    except OSError as exc:
        raise ImageError(f"cannot open shared memory segment {ref.name!r}: {exc.strerror}") from None
    try:
        _check_fits(ref, real_size)
        mapping = mmap.mmap(fd, ref.nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        pixels = np.frombuffer(mapping, dtype=ref.dtype, count=ref.nbytes // np.dtype(ref.dtype).itemsize)
        encoded = encode_pixels(pixels.reshape(ref.shape), rendering=rendering)
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


def encode_pixels(pixels: np.ndarray, *, rendering: Rendering) -> EncodedImage:
    """JPEG-encode a BGR, BGRA or grayscale frame of any supported dtype."""
    frame = _as_uint8(pixels)
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame.reshape(frame.shape[:2])
    elif frame.ndim == 3 and frame.shape[2] == 4:
        # JPEG has no alpha: transparent pixels show the page's background.
        frame = colour.composite(frame, rendering.background)
    try:
        ok, buffer = cv2.imencode(".jpg", frame, rendering.encode_params)
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
        # In bands of rows: each step on a whole float64 frame would make a
        # full-size copy, several times the frame, where the pool reads it in place.
        frame = np.empty(pixels.shape, np.uint8)
        for start in range(0, pixels.shape[0], FLOAT_BAND_ROWS):
            band = np.nan_to_num(pixels[start : start + FLOAT_BAND_ROWS], nan=0.0, posinf=1.0, neginf=0.0)
            band *= 255.0
            frame[start : start + FLOAT_BAND_ROWS] = np.clip(band, 0, 255, out=band)
        return frame
    raise ImageError(f"dtype {pixels.dtype} is not supported")


# What a hosting stage is handed by URL. Every other format OpenCV decodes
# (TIFF, JPEG 2000, AVIF, GIF, BMP, PNM, HDR, Sun Raster, ...) is a parser
# that only an attacker would feed us, so it never sees the bytes.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WebP")
_EXPECTED = "expected JPEG, PNG or WebP"

# Leading bytes of each format some OpenCV build decodes (its decoders'
# checkSignature), and a few it does not, to name them; first match wins.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "BigTIFF"),
    (b"MM\x00+", "BigTIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),  # JP2 file
    (b"\xff\x4f\xff\x51", "JPEG 2000"),  # bare J2K codestream
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\xff\x0a", "JPEG XL"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"#?RADIANCE", "Radiance HDR"),
    (b"#?RGBE", "Radiance HDR"),
    (b"v/1\x01", "OpenEXR"),
    (b"\x59\xa6\x6a\x95", "Sun Raster"),
    (b"qoif", "QOI"),
)
# Netpbm: "P", a type character, then whitespace.
_NETPBM = {
    b"1": "PBM", b"4": "PBM", b"2": "PGM", b"5": "PGM", b"3": "PPM", b"6": "PPM",
    b"7": "PAM", b"F": "PFM", b"f": "PFM",
}
_WHITESPACE = b" \t\n\v\f\r"
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"})


def image_format(data: bytes) -> str | None:
    """The image format `data` starts like, from our fixed list of names;
    None when it starts like none (text, HTML, empty, truncated)."""
    if data[4:8] == b"ftyp":
        # First: OpenCV tries its AVIF decoder before JPEG and WebP, and an
        # ISO box ("ftyp" at offset 4) fits behind a JPEG or RIFF start, so
        # such bytes would reach libavif even though they "start like a JPEG".
        return _iso_media_format(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    if data[:1] == b"P" and len(data) > 2 and data[2] in _WHITESPACE:
        return _NETPBM.get(data[1:2])
    if data[128:132] == b"DICM":
        return "DICOM"
    return None


def _iso_media_format(data: bytes) -> str:
    """AVIF, HEIF or other ISO base media (MP4, MOV), by the ftyp box's brands."""
    box_end = min(int.from_bytes(data[:4], "big"), len(data), 256)
    brands = {data[8:12]} | {data[i : i + 4] for i in range(16, box_end - 3, 4)}
    if brands & _AVIF_BRANDS:
        return "AVIF"
    if brands & _HEIF_BRANDS:
        return "HEIF"
    return "ISO media"


def decodable(data: bytes) -> tuple[str, bytes | bytearray]:
    """The format of downloaded bytes and the bytes to hand the decoder: the
    one gate in front of OpenCV's decoders, for the worker and the dashboard
    alike. Formats other than JPEG, PNG and WebP are refused by their leading
    bytes; the accepted ones within the caps of shared.imaging.decode_limits (JPEG
    scans; an animation decoded as one still frame)."""
    found = image_format(data)
    if found is None:
        raise ImageError(f"downloaded data is not a decodable image: it starts like no image format; {_EXPECTED}")
    if found not in ACCEPTED_FORMATS:
        raise ImageError(f"image format {found} is not accepted; {_EXPECTED}")
    try:
        return found, decode_limits.limit(data, found)
    except DecodeRefused as exc:
        raise ImageError(f"{found} image refused: {exc}") from None


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode downloaded JPEG, PNG or WebP bytes, through `decodable`, to sRGB
    BGR, or BGRA when they have transparency (shared.imaging.colour). OpenCV refuses
    frames above MAX_PIXELS before allocating them (the supervisor sets
    OPENCV_IO_MAX_IMAGE_PIXELS)."""
    found, data = decodable(data)
    source = _read_colour(data, found, max_pixels)
    try:
        # The binding copies the decoded Mat into a numpy array, so the frame
        # is held twice for a moment: about 6 bytes a pixel, 9 for a progressive
        # 4:4:4 JPEG. MAX_PIXELS' default is sized for that (bench/decode_memory.py).
        frame = cv2.imdecode(np.frombuffer(data, np.uint8), source.imread_flags)
    except cv2.error:
        raise ImageError(f"{found} image is corrupt or has more than MAX_PIXELS={max_pixels} pixels") from None
    if frame is None:
        raise ImageError(f"downloaded data is not a decodable image: a corrupt or truncated {found}")
    if frame.shape[0] * frame.shape[1] > max_pixels:
        raise ImageError(f"image has more than MAX_PIXELS={max_pixels} pixels")
    try:
        return colour.to_srgb(frame, source, data)
    except colour.ColourError as exc:
        raise ImageError(str(exc)) from None


def _read_colour(data: bytes, found: str, max_pixels: int) -> colour.SourceColour:
    try:
        return colour.read_header(data, found, max_pixels=max_pixels)
    except colour.ColourError as exc:
        raise ImageError(str(exc)) from None
