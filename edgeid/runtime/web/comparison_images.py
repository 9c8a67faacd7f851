"""Faces as the comparison view shows them: an aligned chip enlarged for a close look, and
optionally with the five points where alignment put the eyes' corners and the nose.

Every chip, probe or enrolled, is cut so those five landmarks land on the same template
points, so the marks show at a glance how two faces sit against one geometry (a face whose
features miss the marks was aligned badly, and its score means less). Rendered on the server:
the comparison needs no JavaScript.
"""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from edgeid.runtime.inference.alignment import FACE_TEMPLATE_5
from edgeid.runtime.inference.pipeline import CHIP_PADDING

# 150 px chips: 3x is a face as big as a passport photo on a tablet, 6x for a close look.
NORMAL_SCALE = 3
LARGE_SCALE = 6
JPEG_QUALITY = 92
MARK_COLOUR = (255, 210, 0)  # yellow reads on every skin tone and background
MARK_RADIUS_OF_SIDE = 0.012


def landmark_points(size: int) -> list[tuple[float, float]]:
    """Where alignment puts the five landmarks in a ``size`` px chip (dlib's template)."""
    pad = CHIP_PADDING
    return [
        (float((pad + x) / (2 * pad + 1) * size), float((pad + y) / (2 * pad + 1) * size))
        for x, y in FACE_TEMPLATE_5
    ]


def render_face(jpeg: bytes, *, large: bool = False, landmarks: bool = False) -> bytes:
    """The chip enlarged (Lanczos, which invents no detail but hides the pixel grid)."""
    with Image.open(io.BytesIO(jpeg)) as source:
        chip = source.convert("RGB")
    scale = LARGE_SCALE if large else NORMAL_SCALE
    side = chip.width * scale
    image = chip.resize((side, chip.height * scale), Image.Resampling.LANCZOS)
    if landmarks:
        draw = ImageDraw.Draw(image)
        radius = max(3.0, side * MARK_RADIUS_OF_SIDE)
        for x, y in landmark_points(chip.width):
            cx, cy = x * scale, y * scale
            draw.ellipse(
                (cx - radius, cy - radius, cx + radius, cy + radius),
                outline=MARK_COLOUR,
                width=max(2, scale // 2),
            )
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()
