"""Images the pages show: the probe photo re-encoded for display, faces as JPEG responses."""

from __future__ import annotations

import io

from PIL import Image
from starlette.responses import Response

from edgeid.runtime.inference.image_decode import decode_image

# Large enough to see a face of 40 px in a 4000 px photo at its box; small enough to send fast.
DISPLAY_MAX_SIDE = 2048
DISPLAY_JPEG_QUALITY = 90


def display_jpeg(data: bytes) -> bytes:
    """The photo as a JPEG a browser shows, upright (EXIF applied) as the boxes expect.

    Decoded again through the same safe decoder (limits checked on the header); the pixels
    live only for this call.
    """
    pixels = decode_image(data, name="the photo")
    image = Image.fromarray(pixels)
    image.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=DISPLAY_JPEG_QUALITY)
    return out.getvalue()


def jpeg_response(data: bytes) -> Response:
    return Response(data, media_type="image/jpeg")
