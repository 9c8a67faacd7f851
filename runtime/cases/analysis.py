"""Pixels in, case faces out: detect, assess quality, align and embed every face of an image
or video frame, keeping each aligned chip as a JPEG thumbnail."""

from __future__ import annotations

import io

from PIL import Image

from runtime.cases.store import NewFace
from runtime.inference.pipeline import FacePipeline
from runtime.inference.types import RGBImage

THUMBNAIL_JPEG_QUALITY = 92  # as the galleries' thumbnails: chips stay comparable side by side


def chip_jpeg(chip: RGBImage) -> bytes:
    out = io.BytesIO()
    Image.fromarray(chip).save(out, format="JPEG", quality=THUMBNAIL_JPEG_QUALITY)
    return out.getvalue()


def analyse_pixels(
    pipeline: FacePipeline,
    image: RGBImage,
    *,
    frame: int | None = None,
    time_s: float | None = None,
) -> list[NewFace]:
    """Every face of ``image`` with its template, quality and chip (in detection order)."""
    faces = pipeline.detect(image)
    if not faces:
        return []
    chips = pipeline.chips(image, faces)
    templates = pipeline.embed_chips(chips)
    found = []
    for face, chip, template in zip(faces, chips, templates, strict=True):
        x0, y0, x1, y1 = (round(v) for v in face.box.as_list())
        quality = face.quality
        found.append(
            NewFace(
                embedding=template,
                box=(x0, y0, x1, y1),
                score=float(face.score),
                quality=float(quality.overall) if quality else 0.0,
                quality_limiting=quality.limiting if quality else "size",
                chip_jpeg=chip_jpeg(chip),
                frame=frame,
                time_s=time_s,
            )
        )
    return found
