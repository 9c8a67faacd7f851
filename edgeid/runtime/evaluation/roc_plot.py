"""A ROC curve as a PNG, drawn with Pillow (no plotting library on the box)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 640, 480, 60
# Log-scaled FMR axis from 1e-4 to 1: the operating points that matter are at low FMR.
FMR_DECADES = 4


def write_roc_png(points: Iterable[tuple[float, float]], path: Path, title: str) -> None:
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN, MARGIN // 2, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    draw.rectangle([left, top, right, bottom], outline="black")

    def to_xy(fmr: float, tar: float) -> tuple[float, float]:
        decade = math.log10(max(fmr, 10.0**-FMR_DECADES)) + FMR_DECADES
        x = left + (right - left) * decade / FMR_DECADES
        y = bottom - (bottom - top) * tar
        return x, y

    for d in range(FMR_DECADES + 1):
        x, _ = to_xy(10.0 ** (d - FMR_DECADES), 0)
        draw.line([x, bottom, x, bottom + 5], fill="black")
        draw.text(
            (x - 14, bottom + 8), f"1e-{FMR_DECADES - d}" if d < FMR_DECADES else "1", fill="black"
        )
    for t in range(0, 11, 2):
        _, y = to_xy(1, t / 10)
        draw.line([left - 5, y, left, y], fill="black")
        draw.text((left - 30, y - 5), f"{t / 10:.1f}", fill="black")
    draw.text((left, 5), title, fill="black")
    draw.text(((left + right) // 2 - 60, HEIGHT - 20), "false match rate (FMR)", fill="black")
    draw.text((5, top), "TAR", fill="black")
    curve = [to_xy(fmr, tar) for fmr, tar in points]
    if len(curve) > 1:
        draw.line(curve, fill="navy", width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
