"""What a frame's pixels mean, made explicit before it is encoded: embedded
ICC profiles converted to sRGB, transparency composited over ALPHA_BACKGROUND,
and EXIF orientation applied where OpenCV does not apply it.

    downloaded bytes --read_header (headers only, no pixels)--> SourceColour
      -> OpenCV decodes (shared.imaging.images), keeping alpha only if the header has some
      -> to_srgb: littleCMS through Pillow's ImageCms, only if a profile is embedded
      -> composite (shared.imaging.images.encode_pixels): every 4-channel frame, the
         BGRA frames of shared memory included, over the background

Hazards handled here:
- Header bytes are hostile: the walk never reads past the data, stops at the
  first image data, and what it cannot follow it leaves to the decoder, which
  names a corrupt file.
- Profile bytes are hostile: a profile larger than MAX_PROFILE_BYTES is refused
  before JPEG chunks are joined or a PNG's is inflated, and a profile littleCMS
  refuses, or one made for another colour model than the image's, fails the
  task with an error that says so (ColourError), never a traceback.
- An image whose header shows no profile and no alpha costs the walk only: no
  copy of its pixels and no conversion.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

# Display P3 and sRGB profiles are 0.5-4 KB; print (CMYK) profiles run to
# about 2 MB. More is no profile a camera, phone or press would embed.
MAX_PROFILE_BYTES = 4 * 1024 * 1024
# Transforms are built once per profile and kept, for profiles of this size or
# less (the matrix profiles phones and cameras embed, over and over).
CACHED_PROFILE_BYTES = 64 * 1024
_JPEG_ICC = b"ICC_PROFILE\x00"
_EXIF_PREFIX = b"Exif\x00\x00"
ORIENTATION_TAG = 0x0112
# Decoding keeps a 16-bit PNG's alpha only at 16 bits a channel: 16 bytes a
# pixel at the peak (OpenCV's frame and the binding's copy of it; measured
# 16.2), where MAX_PIXELS is sized for 6 to 9. Such images get the share of
# MAX_PIXELS that fits in 9.
WIDE_ALPHA_BYTES_PER_PIXEL, MAX_PIXELS_BYTES_PER_PIXEL = 16, 9
# Header segments (JPEG markers, PNG or WebP chunks) walked at most: files
# cameras and exporters write have tens; 48 MB of empty ones took the walk
# 12 s of CPU.
MAX_HEADER_SEGMENTS = 1024
# Rows converted to sRGB, or composited, at a time.
CONVERT_BAND_ROWS = 128


class ColourError(Exception):
    """The embedded profile cannot be used; the message says why, for the failed record."""


@dataclass(frozen=True, slots=True)
class SourceColour:
    """What a downloaded image's headers say about its pixels."""

    profile: bytes | None = None  # the embedded ICC profile
    alpha: bool = False  # it has transparency, so OpenCV must keep the alpha channel
    cmyk: bool = False  # a JPEG of four components (CMYK or YCCK)
    gray: bool = False  # one colour channel (a gray profile applies to it)
    orientation: int = 1  # EXIF orientation; read only where OpenCV does not apply it

    @property
    def imread_flags(self) -> int:
        # IMREAD_COLOR drops alpha; IMREAD_UNCHANGED keeps it but also keeps 16
        # bits and ignores EXIF orientation, which to_srgb then takes care of.
        return cv2.IMREAD_UNCHANGED if self.alpha else cv2.IMREAD_COLOR

    @property
    def plain(self) -> bool:
        """sRGB already, opaque, turned: what OpenCV decoded is what is hosted."""
        return self.profile is None and not self.alpha


PLAIN = SourceColour()


# ---------------------------------------------------------------- headers


def read_header(data: bytes, image_format: str, *, max_pixels: int | None = None) -> SourceColour:
    """What `data`'s headers say (JPEG, PNG or WebP); ColourError for a profile
    that is too large or whose chunks do not fit together, and for a 16-bit PNG
    with alpha too large to decode within `max_pixels`' memory."""
    if image_format == "PNG":
        return _png_header(data, max_pixels)
    if image_format == "JPEG":
        return _jpeg_header(data, max_pixels)
    if image_format == "WebP":
        return _webp_header(data)
    return PLAIN


def _png_header(data: bytes, max_pixels: int | None) -> SourceColour:
    at, alpha, gray, profile, exif, pixels, depth = 8, False, False, None, None, 0, 8
    for _ in _segments("PNG"):
        if at + 12 > len(data):
            break
        length = int.from_bytes(data[at : at + 4], "big")
        kind = data[at + 4 : at + 8]
        if kind == b"IDAT" or not kind.isalpha():
            break  # the image data, or not a chunk at all: the decoder says it is corrupt
        body = data[at + 8 : at + 8 + length]
        if kind == b"IHDR" and len(body) >= 10:
            pixels = int.from_bytes(body[0:4], "big") * int.from_bytes(body[4:8], "big")
            depth, colour_type = body[8], body[9]
            alpha = alpha or colour_type in (4, 6)
            gray = colour_type in (0, 4)
        elif kind == b"tRNS":
            alpha = True
        elif kind == b"iCCP":
            profile = _inflate_profile(body)
        elif kind == b"eXIf":
            exif = body
        at += 12 + length
    if alpha and depth == 16 and max_pixels is not None:
        _check_wide_decode(pixels, max_pixels, "a 16-bit PNG with transparency")
    orientation = _orientation(exif) if alpha and exif else 1
    return SourceColour(profile=profile, alpha=alpha, gray=gray, orientation=orientation)


def _inflate_profile(body: bytes) -> bytes:
    """iCCP: a name of 1..79 bytes, NUL, method 0, then the zlib-compressed profile."""
    name_end = body.find(b"\x00", 0, 80)
    if name_end < 1 or body[name_end + 1 : name_end + 2] != b"\x00":
        raise ColourError("the PNG's ICC profile chunk (iCCP) is malformed")
    inflater = zlib.decompressobj()
    try:
        profile = inflater.decompress(body[name_end + 2 :], MAX_PROFILE_BYTES + 1)
    except zlib.error:
        raise ColourError("the PNG's ICC profile chunk (iCCP) does not inflate") from None
    _check_size(len(profile))
    return profile


def _jpeg_header(data: bytes, max_pixels: int | None) -> SourceColour:
    at, chunks, cmyk, gray, total, pixels = 2, {}, False, False, 0, 0
    for _ in _segments("JPEG"):
        if at + 4 > len(data) or data[at] != 0xFF:
            break
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            at += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan
            break
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        body = data[at + 4 : at + 2 + length]
        if marker == 0xE2 and body.startswith(_JPEG_ICC) and len(body) >= 14:
            total += len(body) - 14
            _check_size(total)
            chunks[body[12]] = (body[13], body[14:])
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and len(body) >= 6:
            cmyk, gray = body[5] == 4, body[5] == 1
            pixels = int.from_bytes(body[1:3], "big") * int.from_bytes(body[3:5], "big")
        at += 2 + length
    if cmyk and chunks and max_pixels is not None:
        # Its inks are decoded a second time (_decode_cmyk) beside OpenCV's frame:
        # a progressive one peaked at 15.6 bytes a pixel.
        _check_wide_decode(pixels, max_pixels, "a CMYK JPEG with an ICC profile is decoded twice, and")
    return SourceColour(profile=_join_icc_chunks(chunks) if chunks else None, cmyk=cmyk, gray=gray)


def _check_wide_decode(pixels: int, max_pixels: int, what: str) -> None:
    """Refuse an image whose decode takes WIDE_ALPHA_BYTES_PER_PIXEL above what
    MAX_PIXELS is sized for (MAX_PIXELS_BYTES_PER_PIXEL), from its header."""
    allowed = max_pixels * MAX_PIXELS_BYTES_PER_PIXEL // WIDE_ALPHA_BYTES_PER_PIXEL
    if pixels > allowed:
        raise ColourError(
            f"{what} takes {WIDE_ALPHA_BYTES_PER_PIXEL} bytes a pixel to decode; "
            f"at most {allowed} pixels (MAX_PIXELS x {MAX_PIXELS_BYTES_PER_PIXEL}/{WIDE_ALPHA_BYTES_PER_PIXEL})"
        )


def _join_icc_chunks(chunks: dict[int, tuple[int, bytes]]) -> bytes:
    """APP2 ICC_PROFILE chunks carry their sequence number (1..count) and the
    count; they are joined in sequence order, whatever their order in the file."""
    counts = {count for count, _ in chunks.values()}
    if len(counts) != 1 or sorted(chunks) != list(range(1, counts.pop() + 1)):
        raise ColourError("the JPEG's ICC profile chunks (APP2) are incomplete or numbered inconsistently")
    return b"".join(chunks[sequence][1] for sequence in sorted(chunks))


def _webp_header(data: bytes) -> SourceColour:
    at, alpha, profile, exif = 12, False, None, None
    for _ in _segments("WebP"):
        if at + 8 > len(data):
            break
        kind = data[at : at + 4]
        if not kind.replace(b" ", b"A").isalnum():
            break  # not a chunk's FourCC: the decoder says it is corrupt
        size = int.from_bytes(data[at + 4 : at + 8], "little")
        body = data[at + 8 : at + 8 + size]
        if kind == b"VP8X" and body:
            alpha = bool(body[0] & 0x10)
        elif kind == b"ICCP":
            _check_size(size)
            profile = body
        elif kind == b"ALPH":
            alpha = True
        elif kind == b"VP8L" and len(body) >= 5:
            alpha = alpha or bool(int.from_bytes(body[1:5], "little") >> 28 & 1)
        elif kind == b"EXIF":
            exif = body
        at += 8 + size + (size & 1)
    orientation = _orientation(exif) if alpha and exif else 1
    return SourceColour(profile=profile, alpha=alpha, orientation=orientation)


def _segments(image_format: str) -> Iterator[int]:
    """Turns of a header walk: at most MAX_HEADER_SEGMENTS, then ColourError."""
    yield from range(MAX_HEADER_SEGMENTS)
    raise ColourError(f"the {image_format} has more than {MAX_HEADER_SEGMENTS} header segments before its image data")


def _check_size(size: int) -> None:
    if size > MAX_PROFILE_BYTES:
        raise ColourError(f"the embedded ICC profile is larger than {MAX_PROFILE_BYTES // (1024 * 1024)} MiB")


def _orientation(exif: bytes) -> int:
    """Tag 0x0112 of a TIFF-structured EXIF block's first IFD; 1 when absent or unreadable."""
    tiff = exif.removeprefix(_EXIF_PREFIX)
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    count = int.from_bytes(tiff[ifd : ifd + 2], order)
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        if int.from_bytes(tiff[entry : entry + 2], order) == ORIENTATION_TAG:
            value = int.from_bytes(tiff[entry + 8 : entry + 10], order)
            return value if 1 <= value <= 8 else 1
    return 1


# ---------------------------------------------------------------- pixels


def to_srgb(frame: np.ndarray, source: SourceColour, data: bytes) -> np.ndarray:
    """The decoded frame as 8-bit sRGB BGR, or BGRA (straight alpha) when it has
    transparency, turned as its EXIF orientation says. `data` is read again
    only for a CMYK JPEG with a profile, whose ink values OpenCV does not return."""
    if source.plain:
        return frame
    if source.alpha:
        if frame.dtype == np.uint16:
            np.right_shift(frame, 8, out=frame)  # in place: the decoder's array is ours
            frame = frame.astype(np.uint8)
        frame = _orient(frame, source.orientation)
    if source.profile is None:
        return frame
    return _convert(frame, source, data)


# cv2 operations that turn a frame as EXIF orientations 2..8 say (1: as stored).
_ORIENT = {
    2: lambda f: cv2.flip(f, 1),
    3: lambda f: cv2.rotate(f, cv2.ROTATE_180),
    4: lambda f: cv2.flip(f, 0),
    5: lambda f: cv2.transpose(f),
    6: lambda f: cv2.rotate(f, cv2.ROTATE_90_CLOCKWISE),
    7: lambda f: cv2.flip(cv2.transpose(f), -1),
    8: lambda f: cv2.rotate(f, cv2.ROTATE_90_COUNTERCLOCKWISE),
}


def _orient(frame: np.ndarray, orientation: int) -> np.ndarray:
    turn = _ORIENT.get(orientation)
    return frame if turn is None else turn(frame)


def composite(bgra: np.ndarray, background_rgb: tuple[int, int, int]) -> np.ndarray:
    """A BGRA frame with straight (not premultiplied) alpha, over an opaque
    background: c * a + background * (1 - a), rounded. Opaque pixels keep
    their exact values. An alpha channel of 0 everywhere is padding (BGRX, as
    Cairo and X11 leave the fourth byte), not a picture of nothing: ignored."""
    alpha = bgra[:, :, 3]
    if alpha.min() == 255 or alpha.max() == 0:
        return cv2.cvtColor(bgra, cv2.COLOR_BGRA2BGR)
    height, width = alpha.shape
    mixed = np.empty((height, width, 3), np.uint8)
    background = np.empty((min(height, CONVERT_BAND_ROWS), width, 3), np.uint8)
    background[:] = background_rgb[::-1]
    # In bands, as _convert: a BGRA segment is read in place, and its float
    # weights for the whole frame would be 8 bytes a pixel more.
    for top in range(0, height, CONVERT_BAND_ROWS):
        rows = bgra[top : top + CONVERT_BAND_ROWS]
        weight = rows[:, :, 3].astype(np.float32)
        weight *= 1 / 255
        # OpenCV's blend, in float: a third of the CPU of the same sum in numpy.
        mixed[top : top + CONVERT_BAND_ROWS] = cv2.blendLinear(
            cv2.cvtColor(rows, cv2.COLOR_BGRA2BGR), background[: rows.shape[0]], weight, 1 - weight
        )
    return mixed


def _convert(frame: np.ndarray, source: SourceColour, data: bytes) -> np.ndarray:
    """Convert in place, band by band: a worker holds the frame and one band's
    copies (Pillow's image, its result), not several whole frames."""
    from PIL import Image  # only images with a profile pay for Pillow's import

    if frame.ndim == 2:
        frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    transform = _transform_for(source.profile, "CMYK" if source.cmyk else "L" if source.gray else "RGB")
    if transform is None:  # an sRGB profile: the pixels are sRGB already
        return frame
    inks = _decode_cmyk(data, frame.shape[:2]) if source.cmyk else None
    for top in range(0, frame.shape[0], CONVERT_BAND_ROWS):
        rows = frame[top : top + CONVERT_BAND_ROWS]
        if inks is not None:
            band = inks.crop((0, top, inks.width, top + rows.shape[0]))
        elif source.gray:
            band = Image.fromarray(np.ascontiguousarray(rows[:, :, 0]))
        else:
            band = Image.fromarray(cv2.cvtColor(np.ascontiguousarray(rows[:, :, :3]), cv2.COLOR_BGR2RGB))
        try:
            converted = transform.apply(band)
        except Exception as exc:  # littleCMS's own refusal, whatever Pillow wraps it in
            raise ColourError(f"the embedded ICC profile could not be applied: {exc}") from None
        rows[:, :, :3] = cv2.cvtColor(np.asarray(converted), cv2.COLOR_RGB2BGR)
    return frame


def _decode_cmyk(data: bytes, shape: tuple[int, ...]) -> Any:
    """The ink values of a CMYK JPEG (Pillow undoes Adobe's inversion), turned
    by their EXIF orientation as OpenCV turned its own decode of the same bytes,
    which has already proved them within MAX_PIXELS."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode != "CMYK":
                raise ColourError(f"a four-component JPEG that Pillow reads as {image.mode}, not CMYK")
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ColourError(f"the CMYK JPEG could not be decoded for its profile: {exc}") from None
    if (image.height, image.width) != shape:
        raise ColourError("the CMYK JPEG's inks and its decoded frame differ in size")
    return image


def _transform_for(profile: bytes, mode: str) -> Any | None:
    """The transform to sRGB; None for an RGB profile that is sRGB in all but
    name (what cameras and exporters embed most), which then costs nothing."""
    if len(profile) <= CACHED_PROFILE_BYTES:
        return _cached_transform(profile, mode)
    return _build_transform(profile, mode)


@lru_cache(maxsize=16)
def _cached_transform(profile: bytes, mode: str) -> Any | None:
    return _build_transform(profile, mode)


# The colour model a profile's header names, by the image mode it fits.
_PROFILE_SPACE = {"RGB": "RGB ", "L": "GRAY", "CMYK": "CMYK"}


def _build_transform(profile: bytes, mode: str) -> Any | None:
    from PIL import ImageCms

    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        space = source.profile.xcolor_space  # Pillow decodes the header's four bytes as ASCII
    except (OSError, ValueError, TypeError, ImageCms.PyCMSError) as exc:
        raise ColourError(f"the embedded ICC profile is malformed: {exc}") from None
    if space != _PROFILE_SPACE[mode]:
        named = space.strip() if space.strip().isalnum() else "an unknown colour model"
        raise ColourError(f"the embedded ICC profile is for {named} but the image is {mode.replace('L', 'GRAY')}")
    try:
        # Relative colorimetric with black point compensation: in-gamut colours
        # keep their values; the rest are clipped (what browsers and imgproxy do).
        transform = ImageCms.buildTransform(
            source,
            ImageCms.createProfile("sRGB"),
            mode,
            "RGB",
            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
            flags=ImageCms.Flags.BLACKPOINTCOMPENSATION,
        )
        return None if mode == "RGB" and _maps_to_itself(transform) else transform
    except (OSError, ValueError, TypeError, ImageCms.PyCMSError) as exc:
        raise ColourError(f"the embedded ICC profile could not be used: {exc}") from None


def _probe_colours() -> np.ndarray:
    """A 16-level cube of colours and a full ramp of each primary and of gray."""
    levels = np.arange(0, 256, 17, dtype=np.uint8)
    cube = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    ramp = np.arange(256, dtype=np.uint8)
    zero = np.zeros(256, np.uint8)
    ramps = [np.stack(channels, axis=-1) for channels in
             ((ramp, zero, zero), (zero, ramp, zero), (zero, zero, ramp), (ramp, ramp, ramp))]
    return np.concatenate([cube, *ramps])[np.newaxis]


def _maps_to_itself(transform: Any) -> bool:
    """Whether every probe colour comes back within one level (littleCMS's own
    rounding): the profile is sRGB, and converting would only cost."""
    from PIL import Image

    probe = _probe_colours()
    converted = np.asarray(transform.apply(Image.fromarray(probe)))
    return int(np.abs(converted.astype(np.int16) - probe).max()) <= 1
