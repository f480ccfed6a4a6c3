"""A worker's peak memory on one downloaded image, by size and format: the
figure MAX_PIXELS is chosen from.

    .venv/bin/python bench/decode_memory.py                 # 12, 25, 42 (8192x5120), 50, 100 MP; 3 rounds
    .venv/bin/python bench/decode_memory.py --sizes 8192x5120,40 --formats png --rounds 5
    .venv/bin/python bench/decode_memory.py --budget 250     # MB a worker may peak at
    .venv/bin/python bench/decode_memory.py --sizes 25 --formats hostile   # the hostile files alone

One measurement:

    parent: a real photo (scikit-image) resized to WxH, with a little grain so
            it compresses like a camera's, encoded in FORMAT -> a temp file
    child:  a fresh `python` (one per size, format and round) that imports what
            a worker imports (workers.worker), with one OpenCV thread and
            OPENCV_IO_MAX_IMAGE_PIXELS set as the supervisor sets them;
            peak RSS so far -> baseline; read the file; decode_image;
            encode_pixels at JPEG_QUALITY 80, the input still held as the
            worker holds it; peak RSS -> peak

Formats: png; jpeg (baseline, 4:2:0, quality 90: what cameras and pipelines
write); jpeg-progressive (4:4:4 progressive: libjpeg keeps every coefficient of
the image until the last scan, the costliest JPEG per pixel, and anyone can
send one); webp (lossy, quality 90). And the hostile ones (harness/hostile_images.py),
"hostile" names all three: apng16 (a 16-bit RGBA animated PNG, three flat
full-canvas frames, dispose=previous: kilobytes that OpenCV would composite in
16-bit canvases); webp-animated (the photo, a brighter copy, the photo again);
jpeg-scans (the progressive JPEG with its first AC scan repeated up to
MAX_JPEG_SCANS, the most the gate lets through: its seconds are the CPU an
image may cost within the cap). Medians over the rounds are printed, and the
spread (largest - smallest peak) beside them, and the seconds the decode and
encode took.

Reading it: a BGR frame is 3 bytes a pixel, but cv2.imdecode returns a Mat
that the Python binding copies into a numpy array, so for a moment the frame
is there twice: about 6 bytes a pixel for every format. A progressive 4:4:4
JPEG also needs libjpeg's coefficients (2 bytes per sample) while it decodes:
about 9. The input and the JPEG written come on top.

What this leaves out: the download itself (the fetcher holds its bytearray and
a bytes copy of it for a moment, before decoding; at most 2 x URL_MAX_BYTES),
and frames from shared memory, which are encoded from the producer's mapping.

Hazards handled here:
- Peaks never go down, so each measurement is a fresh process, and its peak
  is VmHWM (/proc/self/status), the high-water mark of its own address space:
  getrusage's ru_maxrss would carry over the parent's peak through fork and
  exec (Linux folds the old address space's mark into it), so every child
  would report at least the parent's size, inputs and all.
- The temp directory is removed on every exit, Ctrl-C included; a child that
  hangs is killed at --timeout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

MB = 1_000_000
QUALITY = 80  # JPEG_QUALITY's default
DEFAULT_SIZES = "12,25,8192x5120,50,100"
FORMATS = ("png", "jpeg", "jpeg-progressive", "webp", "apng16", "webp-animated", "jpeg-scans")
HOSTILE = ("apng16", "webp-animated", "jpeg-scans")
GRAIN_SIGMA = 3.0  # grey levels of noise: a camera photo's, roughly
URL_MAX_BYTES = 50 * 1024 * 1024  # the setting's default; larger inputs never reach the decoder


@dataclass(frozen=True, slots=True)
class Size:
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True, slots=True)
class Sample:
    baseline_kb: int
    peak_kb: int
    input_bytes: int
    jpeg_bytes: int
    seconds: float


def parse_size(text: str) -> Size:
    """"8192x5120", or megapixels ("25") at a camera's 3:2."""
    width, sep, height = text.partition("x")
    if sep:
        return Size(int(width), int(height))
    pixels = float(text) * MB
    width_3_2 = round(math.sqrt(pixels * 3 / 2))
    return Size(width_3_2, round(pixels / width_3_2))


# ---------------------------------------------------------------- parent


def make_input(size: Size, fmt: str) -> bytes:
    import cv2
    import numpy as np

    from harness import hostile_images
    from harness.photos import photo_of_size
    from shared.imaging.decode_limits import MAX_JPEG_SCANS

    if fmt == "apng16":
        return hostile_images.apng_16bit(size.width, size.height)
    image = photo_of_size(size.height, size.width)
    # A band of grain repeated every 64 rows: too far apart for PNG's 32 KB
    # window to notice, so the file is as large as a grainy photo's.
    grain = np.random.default_rng(0).normal(0, GRAIN_SIGMA, (64, size.width, 3)).astype(np.int16)
    for top in range(0, size.height, 64):
        band = image[top : top + 64]
        band[...] = np.clip(band + grain[: band.shape[0]], 0, 255)
    params = {
        "png": (".png", []),
        "jpeg": (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90]),
        "jpeg-progressive": (
            ".jpg",
            [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_PROGRESSIVE, 1,
             cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444],
        ),
        "webp": (".webp", [cv2.IMWRITE_WEBP_QUALITY, 90]),
    }
    if fmt == "webp-animated":
        brighter = cv2.convertScaleAbs(image, alpha=1.0, beta=40)
        return hostile_images.animated_webp([image, brighter, image])
    if fmt == "jpeg-scans":
        return hostile_images.scan_bomb(image, MAX_JPEG_SCANS)
    ext, flags = params[fmt]
    ok, buffer = cv2.imencode(ext, image, flags)
    if not ok:
        raise RuntimeError(f"OpenCV could not write {fmt} at {size.label}")
    return buffer.tobytes()


def measure(path: Path, size: Size, timeout: float) -> Sample:
    env = dict(os.environ, OPENCV_IO_MAX_IMAGE_PIXELS=str(size.pixels), PYTHONHASHSEED="0")
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(path), "--pixels", str(size.pixels)]
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"child failed on {path.name} ({result.returncode}):\n{result.stderr[-2000:]}")
    return Sample(**json.loads(result.stdout.splitlines()[-1]))


def run(sizes: Sequence[Size], formats: Sequence[str], rounds: int, budget_mb: float, timeout: float) -> None:
    print(f"# a worker's peak RSS decoding + encoding one image (medians of {rounds} rounds, MB = 10^6 bytes)\n")
    print(f"python {sys.version.split()[0]}, OpenCV {_cv2_version()}, {os.cpu_count()} CPUs; budget {budget_mb:g} MB\n")
    print("| format | size | MP | input MB | baseline MB | peak MB | spread | peak - baseline | bytes/px beyond input | "
          f"<= {budget_mb:g} MB | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="decode-memory-") as tmp:
        for fmt in formats:
            for size in sizes:
                path = Path(tmp) / f"{size.label}.{fmt}"
                path.write_bytes(make_input(size, fmt))
                samples = [measure(path, size, timeout) for _ in range(rounds)]
                path.unlink()
                print(_row(fmt, size, samples, budget_mb), flush=True)
    print(f"\n* input larger than URL_MAX_BYTES' default ({URL_MAX_BYTES / MB:.1f} MB): the fetcher refuses it "
          "before decoding, so a worker never holds it; its row overstates.")
    print("Medians of the seconds each child took to decode and encode (its CPU, on one thread).")


def _row(fmt: str, size: Size, samples: Sequence[Sample], budget_mb: float) -> str:
    baseline = statistics.median(s.baseline_kb for s in samples) * 1024 / MB
    peak = statistics.median(s.peak_kb for s in samples) * 1024 / MB
    spread = (max(s.peak_kb for s in samples) - min(s.peak_kb for s in samples)) * 1024 / MB
    input_mb = samples[0].input_bytes / MB
    beyond_input = (peak - baseline - input_mb) * MB / size.pixels
    mark = "*" if samples[0].input_bytes > URL_MAX_BYTES else ""
    fits = "yes" if peak <= budget_mb else "no"
    seconds = statistics.median(s.seconds for s in samples)
    return (
        f"| {fmt} | {size.label} | {size.pixels / MB:.1f} | {input_mb:.1f}{mark} | {baseline:.0f} | {peak:.0f} | {spread:.0f} | "
        f"{peak - baseline:.0f} | {beyond_input:.2f} | {fits} | {seconds:.2f} |"
    )


def _cv2_version() -> str:
    import cv2

    return cv2.__version__


# ---------------------------------------------------------------- child


def child(path: Path, pixels: int) -> None:
    """Decode and encode one file as a worker would; print one JSON line."""
    import cv2

    import workers.worker  # noqa: F401 - everything a worker has loaded counts in its baseline
    from shared.imaging.images import decode_image, encode_pixels
    from shared.imaging.rendering import Rendering

    cv2.setNumThreads(1)  # as worker_main does
    baseline = _peak_rss_kb()
    started = time.process_time()
    body = path.read_bytes()
    frame = decode_image(body, max_pixels=pixels)
    encoded = encode_pixels(frame, rendering=Rendering(quality=QUALITY))
    seconds = time.process_time() - started
    peak = _peak_rss_kb()
    sample = Sample(baseline, peak, len(body), len(encoded.jpeg), seconds)
    print(json.dumps(asdict(sample)))


def _peak_rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/decode_memory.py", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated WxH or megapixels (3:2)")
    parser.add_argument(
        "--formats", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}; or hostile"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", type=float, default=250.0, help="MB a worker's peak may reach")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one child may take")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pixels", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.child, args.pixels)
        return 0
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    formats = [f for name in formats for f in (HOSTILE if name == "hostile" else (name,))]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or args.rounds < 1:
        parser.error(f"unknown formats {unknown}" if unknown else "--rounds must be at least 1")
    try:
        sizes = [parse_size(s.strip()) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes {args.sizes!r}: expected WxH or megapixels, comma-separated")
    try:
        run(sizes, formats, args.rounds, args.budget, args.timeout)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
