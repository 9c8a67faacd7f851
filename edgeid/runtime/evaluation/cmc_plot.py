"""CMC curves (hit rate by rank) as a PNG, drawn with Pillow like the ROC plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 640, 480, 60
COLOURS = ("navy", "darkorange", "forestgreen", "firebrick", "purple", "black")
RANK_TICKS = (1, 10, 20, 30, 40, 50)


def write_cmc_png(curves: Mapping[str, Sequence[float]], path: Path, title: str) -> None:
    """One line per labelled curve; ``curve[r - 1]`` is the hit rate at rank r."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN, MARGIN // 2, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    draw.rectangle([left, top, right, bottom], outline="black")
    max_rank = max((len(c) for c in curves.values()), default=1)

    def to_xy(rank: float, hit_rate: float) -> tuple[float, float]:
        x = left + (right - left) * (rank - 1) / max(max_rank - 1, 1)
        return x, bottom - (bottom - top) * hit_rate

    for rank in (r for r in RANK_TICKS if r <= max_rank):
        x, _ = to_xy(rank, 0)
        draw.line([x, bottom, x, bottom + 5], fill="black")
        draw.text((x - 6, bottom + 8), str(rank), fill="black")
    for t in range(0, 11, 2):
        _, y = to_xy(1, t / 10)
        draw.line([left - 5, y, left, y], fill="black")
        draw.text((left - 30, y - 5), f"{t / 10:.1f}", fill="black")
    draw.text((left, 5), title, fill="black")
    draw.text(((left + right) // 2 - 20, HEIGHT - 20), "rank", fill="black")
    draw.text((5, top), "hit rate", fill="black")
    for n, (label, curve) in enumerate(curves.items()):
        colour = COLOURS[n % len(COLOURS)]
        points = [to_xy(rank, rate) for rank, rate in enumerate(curve, start=1)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        elif points:
            x, y = points[0]
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((right - 200, bottom - 20 - 15 * n), label, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
