"""ICC profiles built from published numbers, for the tests and the bench: no
profile file of anyone's is shipped or fetched.

- display_p3(): Display P3 as phones and Macs embed it (a v4 matrix/TRC
  display profile: the D50-adapted primaries and the sRGB tone curve).
- srgb_v2_tables(): sRGB as cameras embed it (v2, tabulated tone curves).
- linear_gray(): a gray profile whose tone curve is linear (gamma 1.0), so
  that its grays differ from the same numbers read as sRGB.
- press_cmyk(): a v2 input profile for CMYK, a 2-point lut16 CLUT to Lab whose
  corners are given as sRGB colours: a real press's cyan is not (0, 255, 255).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence
from itertools import product

from harness.hostile_images import png_chunk

# Display P3's primaries adapted to D50 and its white (as in Apple's profile).
P3_RED = (0.515121, 0.241196, -0.001053)
P3_GREEN = (0.291977, 0.692245, 0.041885)
P3_BLUE = (0.157104, 0.066574, 0.784073)
D50 = (0.964203, 1.0, 0.824905)
# sRGB's tone curve as ICC parametric curve type 3: g, a, b, c, d.
SRGB_CURVE = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)
# A press cyan, magenta and yellow as sRGB shows them (about ISO Coated's).
PRESS_INKS = {"cyan": (0, 160, 227), "magenta": (229, 0, 126), "yellow": (255, 237, 0)}


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(values: Sequence[float]) -> bytes:
    return b"XYZ \x00\x00\x00\x00" + b"".join(_s15(v) for v in values)


def _para(params: Sequence[float]) -> bytes:
    kind = {1: 0, 5: 3}[len(params)]
    return b"para\x00\x00\x00\x00" + struct.pack(">HH", kind, 0) + b"".join(_s15(p) for p in params)


def _mluc(text: str) -> bytes:
    encoded = text.encode("utf-16-be")
    return b"mluc\x00\x00\x00\x00" + struct.pack(">II2s2sII", 1, 12, b"en", b"US", len(encoded), 28) + encoded


def _desc_v2(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\x00"
    return b"desc\x00\x00\x00\x00" + struct.pack(">I", len(ascii_text)) + ascii_text + bytes(4 + 4 + 2 + 1 + 67)


def profile_bytes(
    *, version: int, device_class: bytes, space: bytes, pcs: bytes, tags: Sequence[tuple[bytes, bytes]]
) -> bytes:
    """A whole ICC profile: header, tag table, then each tag 4-byte aligned."""
    table_size = 4 + 12 * len(tags)
    offset = 128 + table_size
    entries, data = [], b""
    for signature, body in tags:
        entries.append(struct.pack(">4sII", signature, offset + len(data), len(body)))
        data += body + bytes(-len(body) % 4)
    size = 128 + table_size + len(data)
    header = (
        struct.pack(">I4sI4s4s4s", size, b"lcms", version, device_class, space, pcs)
        + struct.pack(">6H", 2026, 12, 7, 0, 0, 0)
        + b"acsp"
        + bytes(4 + 4 + 4 + 4 + 8)
        + struct.pack(">I", 0)
        + b"".join(_s15(v) for v in D50)
        + bytes(4 + 16 + 28)
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + b"".join(entries) + data


def display_p3() -> bytes:
    curve = _para(SRGB_CURVE)
    return profile_bytes(
        version=0x04300000, device_class=b"mntr", space=b"RGB ", pcs=b"XYZ ",
        tags=[
            (b"desc", _mluc("Display P3 (built for tests)")), (b"cprt", _mluc("No copyright, use freely")),
            (b"wtpt", _xyz(D50)), (b"rXYZ", _xyz(P3_RED)), (b"gXYZ", _xyz(P3_GREEN)), (b"bXYZ", _xyz(P3_BLUE)),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve),
        ],
    )


def srgb_v2_tables() -> bytes:
    """sRGB as cameras and exporters embed it ("sRGB IEC61966-2.1"): a v2
    profile, the D50-adapted primaries (SRGB_TO_XYZ_D50's columns) and
    1024-entry tone curves."""
    steps = [i / 1023 for i in range(1024)]
    table = [v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4 for v in steps]
    curve = b"curv\x00\x00\x00\x00" + struct.pack(">I", 1024) + b"".join(struct.pack(">H", round(v * 65535)) for v in table)
    columns = list(zip(*SRGB_TO_XYZ_D50, strict=True))
    return profile_bytes(
        version=0x02100000, device_class=b"mntr", space=b"RGB ", pcs=b"XYZ ",
        tags=[
            (b"desc", _desc_v2("sRGB IEC61966-2.1 (built for tests)")), (b"wtpt", _xyz(D50)),
            (b"rXYZ", _xyz(columns[0])), (b"gXYZ", _xyz(columns[1])), (b"bXYZ", _xyz(columns[2])),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve),
        ],
    )


def linear_gray() -> bytes:
    return profile_bytes(
        version=0x04300000, device_class=b"mntr", space=b"GRAY", pcs=b"XYZ ",
        tags=[
            (b"desc", _mluc("Linear gray (built for tests)")), (b"cprt", _mluc("No copyright, use freely")),
            (b"wtpt", _xyz(D50)), (b"kTRC", _para((1.0,))),
        ],
    )


def press_cmyk() -> bytes:
    """Each corner of the CMYK cube (inks 0 or 100%) maps to the Lab of an sRGB
    colour: the inks' mixes multiply as filters, black ink makes black."""
    grid = []
    for c, m, y, k in product((0, 1), repeat=4):
        rgb = [255.0, 255.0, 255.0]
        for on, ink in ((c, "cyan"), (m, "magenta"), (y, "yellow")):
            if on:
                rgb = [a * b / 255 for a, b in zip(rgb, PRESS_INKS[ink], strict=True)]
        if k:
            rgb = [0.0, 0.0, 0.0]
        lab = srgb_to_lab(tuple(round(v) for v in rgb))
        grid.append((lab[0] / 100 * 0xFF00, (lab[1] + 128) * 256, (lab[2] + 128) * 256))
    identity_in = b"".join(struct.pack(">H", v) for v in (0, 0xFFFF)) * 4
    identity_out = b"".join(struct.pack(">H", v) for v in (0, 0xFFFF)) * 3
    clut = b"".join(struct.pack(">3H", *(min(0xFFFF, max(0, round(v))) for v in lab)) for lab in grid)
    matrix = b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    lut = b"mft2\x00\x00\x00\x00" + struct.pack(">BBBB", 4, 3, 2, 0) + matrix + struct.pack(">HH", 2, 2)
    lut += identity_in + clut + identity_out
    return profile_bytes(
        version=0x02100000, device_class=b"scnr", space=b"CMYK", pcs=b"Lab ",
        tags=[(b"desc", _desc_v2("Press CMYK (built for tests)")), (b"wtpt", _xyz(D50)), (b"A2B0", lut)],
    )


# sRGB's primaries to XYZ, Bradford-adapted to D50 (Lindbloom's table).
SRGB_TO_XYZ_D50 = (
    (0.4360747, 0.3850649, 0.1430804),
    (0.2225045, 0.7168786, 0.0606169),
    (0.0139322, 0.0971045, 0.7141733),
)


def srgb_to_lab(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    """An sRGB colour as CIE Lab against D50, the ICC connection space."""
    linear = [v / 255 / 12.92 if v / 255 <= 0.04045 else ((v / 255 + 0.055) / 1.055) ** 2.4 for v in rgb]
    xyz = [sum(m * c for m, c in zip(row, linear, strict=True)) / white for row, white in zip(SRGB_TO_XYZ_D50, D50, strict=True)]
    f = [t ** (1 / 3) if t > 216 / 24389 else (24389 / 27 * t + 16) / 116 for t in xyz]
    return 116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])


def embedded_png(png: bytes, profile: bytes) -> bytes:
    """`png` with an iCCP chunk holding `profile` after its IHDR."""
    chunk = png_chunk(b"iCCP", b"test\x00\x00" + zlib.compress(profile))
    ihdr_end = 8 + 8 + 13 + 4
    return png[:ihdr_end] + chunk + png[ihdr_end:]


def embedded_jpeg(jpeg: bytes, profile: bytes, *, chunk_size: int = 65519, reverse: bool = False) -> bytes:
    """`jpeg` with `profile` in APP2 ICC_PROFILE chunks after its SOI (in
    reverse order if asked: readers must order them by sequence number)."""
    pieces = [profile[i : i + chunk_size] for i in range(0, len(profile), chunk_size)]
    segments = [
        b"\xff\xe2" + struct.pack(">H", 2 + 14 + len(piece)) + b"ICC_PROFILE\x00" + bytes((n, len(pieces))) + piece
        for n, piece in enumerate(pieces, 1)
    ]
    if reverse:
        segments.reverse()
    return jpeg[:2] + b"".join(segments) + jpeg[2:]


def as_bytes(image: object, format_name: str, **options: object) -> bytes:
    """A Pillow image saved to bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format_name, **options)  # type: ignore[attr-defined]
    return buffer.getvalue()
