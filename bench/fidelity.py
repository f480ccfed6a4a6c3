"""What the JPEG settings and colour management cost and buy, in one process.

    for each of the throughput bench's sizes, two frames: a photo and a page
    of coloured text (cv2.putText on a coloured background)
      -> encode at JPEG_QUALITY 80 with each setting (4:2:0 / 4:4:4, baseline /
         progressive, and libjpeg's optimized Huffman tables, JPEG_OPTIMIZE's
         candidate) -> bytes, PSNR, PSNR on the text's edges, CPU per image
    then, at 1024x1024: what decode_image costs a URL image with a Display P3
    profile, with alpha, and with neither (the header walk's own cost apart).

Everything runs on one thread (cv2.setNumThreads(1)), as a worker does, and
CPU is thread time: the median of --rounds rounds, each timing --repeat
encodes. Nothing is asserted; the Markdown tables are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import cv2
import numpy as np

from harness import icc
from harness.photos import photo_of_size
from shared.imaging import colour
from shared.imaging.images import decode_image, encode_pixels
from shared.imaging.rendering import Rendering

cv2.setNumThreads(1)  # one core per worker, as worker_main sets it

QUALITY = 80  # JPEG_QUALITY's default, as bench.py encodes
SIZES = (("512x512", 512, 512), ("1024x1024", 1024, 1024), ("3840x2160", 2160, 3840))
# (label, Rendering, extra cv2 parameters): JPEG_OPTIMIZE is measured as a
# candidate through OpenCV directly, since the pool has no such setting.
VARIANTS = (
    ("4:2:0 baseline (default)", Rendering(quality=QUALITY), ()),
    ("4:2:0 baseline, optimized Huffman", Rendering(quality=QUALITY), (cv2.IMWRITE_JPEG_OPTIMIZE, 1)),
    ("4:2:0 progressive", Rendering(quality=QUALITY, progressive=True), ()),
    ("4:4:4 baseline", Rendering(quality=QUALITY, subsampling="444"), ()),
    ("4:4:4 baseline, optimized Huffman", Rendering(quality=QUALITY, subsampling="444"), (cv2.IMWRITE_JPEG_OPTIMIZE, 1)),
    ("4:4:4 progressive", Rendering(quality=QUALITY, subsampling="444", progressive=True), ()),
)
# Colours of a rendered page: dark red and blue text on a pale yellow ground.
PAGE, INKS = (200, 245, 255), ((20, 20, 170), (160, 60, 20), (30, 110, 30))


def text_page(height: int, width: int) -> np.ndarray:
    """A frame of translated text as the pipeline renders it: coloured lines of
    Hershey text, about 14 px high on a 512 px frame, scaled with the frame."""
    page = np.full((height, width, 3), PAGE, np.uint8)
    scale = max(0.5, width / 1024)
    line_height = int(28 * scale)
    words = "The quick brown fox jumps over the lazy dog 0123456789 ÀÉÎ"
    for number, y in enumerate(range(line_height, height - 4, line_height)):
        cv2.putText(page, words * 4, (8, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, INKS[number % 3],
                    max(1, int(scale)), cv2.LINE_AA)
    return page


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    diff = a.astype(np.float64) - b.astype(np.float64)
    squared = diff**2 if mask is None else (diff**2)[mask]
    mse = float(np.mean(squared))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def edge_mask(frame: np.ndarray) -> np.ndarray:
    """Pixels within 2 px of a text edge: where chroma subsampling smears."""
    edges = cv2.Canny(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), 50, 150)
    return cv2.dilate(edges, np.ones((5, 5), np.uint8)) > 0


def cpu_us(action: Callable[[], object], *, rounds: int, repeat: int) -> float:
    samples = []
    for _ in range(rounds):
        started = time.thread_time()
        for _ in range(repeat):
            action()
        samples.append((time.thread_time() - started) / repeat * 1e6)
    return statistics.median(samples)


def encoder(frame: np.ndarray, rendering: Rendering, extra: Sequence[int]) -> Callable[[], bytes]:
    if not extra:
        return lambda: encode_pixels(frame, rendering=rendering).jpeg
    params = [*rendering.encode_params, *extra]
    return lambda: cv2.imencode(".jpg", frame, params)[1].tobytes()


def settings_table(sizes: Sequence[tuple[str, int, int]], *, rounds: int, repeat: int) -> list[str]:
    lines = [
        "| size | setting | photo: KB / PSNR dB / CPU ms | text page: KB / PSNR dB / edge PSNR dB / CPU ms |",
        "|---|---|---|---|",
    ]
    for label, height, width in sizes:
        photo, page = photo_of_size(height, width), text_page(height, width)
        edges = edge_mask(page)
        scaled_repeat = max(2, repeat * 512 * 512 // (height * width))
        for name, rendering, extra in VARIANTS:
            cells = []
            for frame in (photo, page):
                encode = encoder(frame, rendering, extra)
                jpeg = encode()
                decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
                ms = cpu_us(encode, rounds=rounds, repeat=scaled_repeat) / 1000
                figures = [f"{len(jpeg) / 1000:,.0f}", f"{psnr(decoded, frame):.2f}"]
                if frame is page:
                    figures.append(f"{psnr(decoded, frame, edges):.2f}")
                cells.append(" / ".join([*figures, f"{ms:.2f}"]))
            lines.append(f"| {label} | {name} | {cells[0]} | {cells[1]} |")
    return lines


def colour_table(*, rounds: int, repeat: int) -> list[str]:
    """decode_image on a 1024x1024 URL image: plain, with a P3 profile, with alpha."""
    photo = photo_of_size(1024, 1024)
    png = cv2.imencode(".png", photo)[1].tobytes()
    jpeg = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    rgba = cv2.cvtColor(photo, cv2.COLOR_BGR2BGRA)
    rgba[:, : 512, 3] = 128
    cases = (
        ("JPEG, no profile (the default path)", jpeg, "JPEG"),
        ("JPEG, sRGB profile (probed once, then left alone)", icc.embedded_jpeg(jpeg, icc.srgb_v2_tables()), "JPEG"),
        ("JPEG, Display P3 profile", icc.embedded_jpeg(jpeg, icc.display_p3()), "JPEG"),
        ("PNG, no profile", png, "PNG"),
        ("PNG, Display P3 profile", icc.embedded_png(png, icc.display_p3()), "PNG"),
        ("PNG with alpha (decode + composite over white)", cv2.imencode(".png", rgba)[1].tobytes(), "PNG"),
    )
    rendering = Rendering(quality=QUALITY)
    lines = ["| 1024x1024 URL image | header walk µs | decode (+ conversion) ms | + encode ms |", "|---|---|---|---|"]
    for name, data, found in cases:
        walk = cpu_us(lambda d=data, f=found: colour.read_header(d, f), rounds=rounds, repeat=repeat * 20)
        decode_ms = cpu_us(lambda d=data: decode_image(d, max_pixels=25_000_000), rounds=rounds, repeat=repeat) / 1000
        frame = decode_image(data, max_pixels=25_000_000)
        encode_ms = cpu_us(lambda f=frame: encode_pixels(f, rendering=rendering), rounds=rounds, repeat=repeat) / 1000
        lines.append(f"| {name} | {walk:.1f} | {decode_ms:.2f} | {encode_ms:.2f} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/fidelity.py", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure, median shown (default 3)")
    parser.add_argument("--repeat", type=int, default=20, help="encodes per round at 512x512, fewer for larger (default 20)")
    parser.add_argument("--sizes", default=",".join(s[0] for s in SIZES), help="comma-separated subset of the sizes")
    args = parser.parse_args(argv)
    wanted = set(args.sizes.split(","))
    sizes = [s for s in SIZES if s[0] in wanted]
    print(f"quality {QUALITY}, one thread, OpenCV {cv2.__version__}, rounds {args.rounds}, repeat {args.repeat}\n")
    print("\n".join(settings_table(sizes, rounds=args.rounds, repeat=args.repeat)))
    print()
    print("\n".join(colour_table(rounds=args.rounds, repeat=max(3, args.repeat // 4))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
