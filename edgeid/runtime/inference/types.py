"""Value types shared by the detectors, the landmark predictor, alignment and the embedder.

Images are ``uint8`` arrays of shape (height, width, 3) in RGB order. Coordinates are pixels in
that image, x to the right and y down, as floats.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

RGBImage = npt.NDArray[np.uint8]
FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Box:
    """An axis-aligned box, corners inclusive of x0/y0 and exclusive of x1/y1."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    def as_list(self) -> list[float]:
        return [self.x0, self.y0, self.x1, self.y1]


@dataclass(frozen=True)
class Detection:
    """One face found by a detector, before landmark refinement."""

    box: Box
    score: float
    # Landmarks the detector itself predicts (MTCNN: eyes, nose, mouth corners), shape (5, 2).
    landmarks: FloatArray | None = field(default=None, compare=False)
