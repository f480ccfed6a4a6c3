"""Image files built to cost a decoder more than their size says, byte by
byte from real encoders' output: for the tests and bench/decode_memory.py.

    scan_bomb        a progressive JPEG with its first AC scan repeated
    apng_16bit       a 16-bit RGBA animated PNG, dispose=previous
    animated_webp    an animated WebP of the frames given
"""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each marker segment of a JPEG, a scan's entropy-coded data included."""
    segments, position = [], 2
    while position < len(data):
        marker = data[position + 1]
        if marker == 0xD9:
            segments.append((marker, position, position + 2))
            break
        end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:  # up to the next marker that is not a restart or a stuffed FF 00
            end = data.index(b"\xff", end)
            while data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end = data.index(b"\xff", end + 2)
        segments.append((marker, position, end))
        position = end
    return segments


def progressive_jpeg(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_QUALITY, 75])
    if not ok:
        raise RuntimeError("OpenCV could not write a progressive JPEG")
    return buffer.tobytes()


def scan_bomb(image: np.ndarray, scans: int) -> bytes:
    """A progressive JPEG whose first AC scan, with the Huffman table before it,
    is there `scans` times over: every copy is decoded over the whole image."""
    data = progressive_jpeg(image)
    segments = jpeg_segments(data)
    second_scan = [i for i, (marker, _, _) in enumerate(segments) if marker == 0xDA][1]
    table = segments[second_scan - 1]
    start = table[1] if table[0] == 0xC4 else segments[second_scan][1]
    repeated = data[start : segments[second_scan][2]]
    extra = scans - data.count(b"\xff\xda")
    return data[:start] + repeated * extra + data[start:]


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def apng_16bit(width: int, height: int, *, frames: int = 3, first_row: int = 0x8000) -> bytes:
    """A 16-bit RGBA animated PNG, dispose=previous, each frame full-canvas: OpenCV
    composites it in canvas-sized buffers at 16 bits. The still image is flat
    `first_row` grey; the later frames are white."""

    def frame_data(level: int) -> bytes:
        pixel = struct.pack(">HHHH", level, level, level, 0xFFFF)
        row = b"\x00" + pixel * width
        packer = zlib.compressobj(9)
        return b"".join(packer.compress(row) for _ in range(height)) + packer.flush()

    def control(sequence: int) -> bytes:
        return png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", sequence, width, height, 0, 0, 1, 10, 2, 0))

    parts = [
        b"\x89PNG\r\n\x1a\n",
        png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)),
        png_chunk(b"acTL", struct.pack(">II", frames, 0)),
        control(0),
        png_chunk(b"IDAT", frame_data(first_row)),
    ]
    later = frame_data(0xFFFF)
    for frame in range(1, frames):
        parts += [control(2 * frame - 1), png_chunk(b"fdAT", struct.pack(">I", 2 * frame) + later)]
    return b"".join(parts + [png_chunk(b"IEND", b"")])


def animated_webp(frames: list[np.ndarray]) -> bytes:
    animation = cv2.Animation()
    animation.frames = frames
    animation.durations = [100] * len(frames)
    ok, buffer = cv2.imencodeanimation(".webp", animation, [cv2.IMWRITE_WEBP_QUALITY, 90])
    data = buffer.tobytes()
    if not ok or data[12:16] != b"VP8X" or not data[20] & 0x02:
        raise RuntimeError("OpenCV did not write an animated WebP (identical frames are merged)")
    return data
