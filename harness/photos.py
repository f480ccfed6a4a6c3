"""Real photos, from the data directory scikit-image ships, for frames that
compress like a camera's rather than like noise or a flat colour."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

import cv2
import numpy as np


def skimage_data_dir() -> Path:
    # find_spec locates the package without paying for its import.
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise RuntimeError("scikit-image is not installed (requirements-dev.txt; every make target installs it)")
    return Path(spec.origin).parent / "data"


@cache
def read_photo(name: str) -> np.ndarray:
    """skimage's data/<name>, BGR uint8 (camera.png 2-D grayscale); read-only,
    since every caller shares it: copy before changing."""
    path = skimage_data_dir() / name
    flags = cv2.IMREAD_GRAYSCALE if name == "camera.png" else cv2.IMREAD_COLOR
    image = cv2.imread(str(path), flags)
    if image is None:
        raise RuntimeError(f"cv2 could not read {path}")
    image.flags.writeable = False
    return image


def load_photos() -> dict[str, np.ndarray]:
    """astronaut, chelsea, coffee (BGR uint8) and camera (2-D grayscale); read-only."""
    return {name: read_photo(f"{name}.png") for name in ("astronaut", "chelsea", "coffee", "camera")}


def photo_of_size(height: int, width: int) -> np.ndarray:
    """A writable BGR uint8 photo of any size, resized from astronaut and coffee side by side."""
    astronaut = read_photo("astronaut.png")
    coffee = read_photo("coffee.png")
    coffee = cv2.resize(coffee, (coffee.shape[1] * astronaut.shape[0] // coffee.shape[0], astronaut.shape[0]))
    mosaic = np.hstack([astronaut, coffee])
    shrinking = height * width < mosaic.shape[0] * mosaic.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    return cv2.resize(mosaic, (width, height), interpolation=interpolation)
