"""How a frame becomes the hosted JPEG: the encoder's settings and the colour
under transparent pixels (shared.imaging.colour composites), built once per worker
from Settings so that the per-task path only passes a ready list to OpenCV."""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2

from shared.config import Settings

SAMPLING_FACTORS = {
    "444": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
    "422": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
    "420": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
}


@dataclass(frozen=True, slots=True)
class Rendering:
    quality: int = 80
    subsampling: str = "420"  # JPEG_SUBSAMPLING: 444, 422 or 420
    progressive: bool = False
    background: tuple[int, int, int] = (255, 255, 255)  # ALPHA_BACKGROUND, RGB
    encode_params: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        params = [cv2.IMWRITE_JPEG_QUALITY, self.quality]
        # The defaults add nothing: libjpeg's own defaults are 4:2:0 and
        # baseline, so the seed's bytes come out unchanged.
        if self.subsampling != "420":
            params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, SAMPLING_FACTORS[self.subsampling]]
        if self.progressive:
            params += [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]
        object.__setattr__(self, "encode_params", tuple(params))

    @classmethod
    def from_settings(cls, settings: Settings) -> Rendering:
        return cls(
            quality=settings.jpeg_quality,
            subsampling=settings.jpeg_subsampling,
            progressive=settings.jpeg_progressive,
            background=settings.alpha_background,
        )
