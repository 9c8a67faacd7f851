"""Pixels in, case faces out: detect, assess quality, align and embed every face of an image
or video frame, keeping each aligned chip as a JPEG thumbnail."""

from __future__ import annotations

import io

from PIL import Image

from edgeid.runtime.cases.store import NewFace
from edgeid.runtime.inference.image_decode import WorkingImage
from edgeid.runtime.inference.pipeline import Face, FacePipeline
from edgeid.runtime.inference.types import RGBImage

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
    return _described(pipeline, faces, pipeline.chips(image, faces), frame, time_s)


def analyse_working(
    pipeline: FacePipeline, work: WorkingImage, *, max_faces: int
) -> tuple[list[NewFace], int]:
    """A photo's faces as the search path finds them: detection on the photo reduced to the
    working size, chips cut at full resolution, at most ``max_faces`` (the most confident);
    with how many more were found but not analysed. Bounds a seized 50-megapixel photo's
    memory as an uploaded one's."""
    faces, chips, skipped = pipeline.detect_working(work, max_faces=max_faces)
    if not faces:
        return [], skipped
    return _described(pipeline, faces, chips, None, None), skipped


def _described(
    pipeline: FacePipeline,
    faces: list[Face],
    chips: list[RGBImage],
    frame: int | None,
    time_s: float | None,
) -> list[NewFace]:
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


def failure_reason(exc: Exception) -> str:
    """What a case records for a file that could not be analysed: the error's first line,
    without the placeholder name ("image: ") the decoder was given. The owning box and a
    cluster node both record it, so a file fails the same way wherever it was analysed."""
    text = str(exc).removeprefix("image: ")
    return text.splitlines()[0] if text else type(exc).__name__
