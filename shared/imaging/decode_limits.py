"""What one downloaded image may cost to decode, decided from its bytes before
any decoder sees them.

    downloaded bytes (format already known: JPEG, PNG or WebP)
      -> limit(data, format) -> the bytes to decode, or DecodeRefused

The caps and what they stop:
- JPEG: at most MAX_JPEG_SCANS scans. libjpeg decodes every scan over the
  whole image, so a progressive JPEG with one small scan repeated thousands of
  times costs minutes of CPU from kilobytes (a 4.5 MB file, 88 s); OpenCV
  sets no scan limit of its own. What is counted is every SOS marker (FF DA)
  in the file, not a walk of its segments: inside entropy-coded data every FF
  is followed by 00 or a restart marker, and fill bytes (FF FF DA) still
  contain FF DA, so the count is never below the scans libjpeg sees, however
  the file is cut or padded. It may be above (an EXIF thumbnail, an MPF
  image after the end, FF DA by chance inside an APP segment), which only
  refuses sooner. Counted with numpy, it takes 35 us of CPU for a 1024x1024
  photo's 227 kB, whose decode takes 8.4 ms (0.4%); bytes.count took 250 us.
- PNG: an animated PNG (acTL before the image data) is decoded as its still
  image. OpenCV composites APNG frames in full-canvas buffers at the file's
  bit depth (16-bit RGBA: about 30 bytes a pixel, against 6 for the still);
  with the acTL chunk renamed to one no decoder knows, libpng reads the
  default image (IDAT, which is the first frame when it has a fcTL) and
  skips the frames. At most MAX_CHUNKS_BEFORE_IMAGE chunks are walked,
  here and in a WebP.
- WebP: an animated WebP is decoded as its first frame alone, rebuilt as a
  still WebP from that frame's own chunks. OpenCV's animation decoder keeps
  two RGBA canvases (about 10.5 bytes a pixel, against 6 to 7 for a still).

Nothing here decodes pixels; each check is one vectorised pass over the
bytes or a walk of a handful of chunk headers.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

# Scans a JPEG may have. The most a standard encoder writes is 18 (libjpeg,
# libjpeg-turbo and mozjpeg's progression for 4 components; 10 for YCbCr);
# 100 leaves room for hand-made scripts and an EXIF thumbnail's scan, and
# bounds the scan work at a few seconds for MAX_PIXELS' default.
MAX_JPEG_SCANS = 100
# Chunks walked looking for an APNG's acTL or a WebP's first frame; real
# files have a few dozen before their image data at most.
MAX_CHUNKS_BEFORE_IMAGE = 1000

_COUNT_BLOCK = 1 << 20  # even
_SOS_PAIR = 0xDAFF
_PNG_SIGNATURE_BYTES = 8
# A name no decoder knows, still an ancillary chunk (lowercase first letter),
# so libpng skips it; its CRC is computed again, as libpng checks it.
_ACTL_RENAMED = b"acTx"
_WEBP_ANIMATION_FLAG = 0x02
_WEBP_ALPHA_FLAG = 0x10
_WEBP_ICC_FLAG = 0x20


class DecodeRefused(Exception):
    """The image would cost more to decode than we allow; the message says why."""


def limit(data: bytes, image_format: str) -> bytes | bytearray:
    """The bytes to hand the decoder for an image of `image_format` (JPEG, PNG
    or WebP): `data` itself, or an animation reduced to one still frame.
    DecodeRefused when decoding it would cost more than the caps allow."""
    if image_format == "JPEG":
        check_jpeg_scans(data)
        return data
    if image_format == "PNG":
        return still_png(data)
    if image_format == "WebP":
        return still_webp(data)
    return data


def jpeg_scan_count(data: bytes) -> int:
    """Never fewer than the scans a JPEG decoder would read (see the module doc)."""
    view = memoryview(data)
    scans = 0
    # Each block read as byte pairs twice, from an even and from an odd offset:
    # FF DA is the little-endian pair 0xDAFF. A block is one byte longer than
    # its step, so a marker across its end is counted once. In blocks, because
    # whole-file temporaries of a 15 MB input grew a worker's peak by more
    # than their size (freed heap that the decode then did not reuse).
    for start in range(0, len(data), _COUNT_BLOCK):
        block = view[start : start + _COUNT_BLOCK + 1]
        even = np.frombuffer(block, "<u2", count=len(block) // 2)
        odd = np.frombuffer(block, "<u2", count=(len(block) - 1) // 2, offset=1)
        scans += int(np.count_nonzero(even == _SOS_PAIR)) + int(np.count_nonzero(odd == _SOS_PAIR))
    return scans


def check_jpeg_scans(data: bytes) -> None:
    scans = jpeg_scan_count(data)
    if scans > MAX_JPEG_SCANS:
        raise DecodeRefused(
            f"JPEG has {scans} scans, more than the {MAX_JPEG_SCANS} allowed (encoders write at most 18); "
            "each scan is decoded over the whole image, so it would take too long"
        )


def still_png(data: bytes) -> bytes | bytearray:
    """`data`, with an APNG's acTL chunks renamed so that it decodes as a still.
    Every acTL before the image data: OpenCV takes the last one it meets. The
    renamed copy is handed on as it is, a bytearray: one copy of the input
    beside the download, not two."""
    if b"acTL" not in data:  # most PNGs: no walk at all
        return data
    renamed: bytearray | None = None
    position = _PNG_SIGNATURE_BYTES
    for _ in range(MAX_CHUNKS_BEFORE_IMAGE):
        if position + 8 > len(data):
            break  # truncated before the image data: the decoder says so
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind == b"IDAT":
            break  # an acTL after the image data is not an animation
        if kind == b"acTL":
            renamed = renamed if renamed is not None else bytearray(data)
            body = data[position + 8 : position + 8 + length]
            renamed[position + 4 : position + 8] = _ACTL_RENAMED
            renamed[position + 8 + length : position + 12 + length] = struct.pack(
                ">I", zlib.crc32(_ACTL_RENAMED + body)
            )
        position += 12 + length
    else:
        raise DecodeRefused(f"PNG has more than {MAX_CHUNKS_BEFORE_IMAGE} chunks before its image data")
    return data if renamed is None else renamed


def still_webp(data: bytes) -> bytes:
    """`data`, or for an animated WebP a still WebP of its first frame alone,
    with the file's colour profile."""
    if data[12:16] != b"VP8X" or len(data) < 30 or not data[20] & _WEBP_ANIMATION_FLAG:
        return data
    chunks = _riff_chunks(memoryview(data), 12)
    frame = next((body for kind, body in chunks if kind == b"ANMF"), None)
    if frame is None or len(frame) < 16:
        raise DecodeRefused("animated WebP has no frame")
    width = 1 + int.from_bytes(frame[6:9], "little")
    height = 1 + int.from_bytes(frame[9:12], "little")
    parts = [(kind, body) for kind, body in _riff_chunks(frame, 16) if kind in (b"ALPH", b"VP8 ", b"VP8L")]
    if not any(kind in (b"VP8 ", b"VP8L") for kind, _ in parts):
        raise DecodeRefused("animated WebP's first frame has no image data")
    flags = _WEBP_ALPHA_FLAG if any(kind in (b"ALPH", b"VP8L") for kind, _ in parts) else 0
    # The colour profile is the file's, not the frame's: it goes with the frame.
    profile = [(kind, body) for kind, body in chunks if kind == b"ICCP"][:1]
    if profile:
        flags |= _WEBP_ICC_FLAG
        parts = profile + parts
    header = bytes([flags, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    pieces = [b"WEBP", *_riff_chunk(b"VP8X", header)]
    for kind, part in parts:
        pieces += _riff_chunk(kind, part)
    return b"".join([b"RIFF", struct.pack("<I", sum(map(len, pieces))), *pieces])


def _riff_chunks(data: memoryview, position: int) -> list[tuple[bytes, memoryview]]:
    """The chunks from `position` on, as far as they are whole: views on
    `data`, not copies. A WebP has a handful at its top level and in a frame;
    the walk stops at the first frame, so an animation of many frames costs
    no more."""
    chunks: list[tuple[bytes, memoryview]] = []
    while position + 8 <= len(data):
        if len(chunks) == MAX_CHUNKS_BEFORE_IMAGE:
            raise DecodeRefused(f"WebP has more than {MAX_CHUNKS_BEFORE_IMAGE} chunks before its first frame")
        kind, size = struct.unpack_from("<4sI", data, position)
        body = data[position + 8 : position + 8 + size]
        if len(body) < size:
            break
        chunks.append((kind, body))
        if kind == b"ANMF":
            break
        position += 8 + size + (size & 1)
    return chunks


def _riff_chunk(kind: bytes, body: bytes | memoryview) -> list[bytes | memoryview]:
    """A chunk's pieces, to be joined once."""
    return [kind, struct.pack("<I", len(body)), body, b"\x00" if len(body) & 1 else b""]
