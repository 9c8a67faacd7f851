"""Safe image decoding: the only way image bytes enter the pipeline.

Limits are checked on the header before any pixel is decoded, so a decompression bomb is
refused without allocating its pixels; truncated and non-image bytes are refused, not guessed at.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from runtime.errors import BadInputError
from runtime.inference.types import RGBImage

# A 50 MB upload covers any camera JPEG; larger is almost certainly not a photo.
MAX_IMAGE_BYTES = 50 * 1024 * 1024
# 50 megapixels: above the largest phone sensors, below what would exhaust a 4 GB box.
MAX_IMAGE_PIXELS = 50_000_000
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "TIFF", "MPO"})


def decode_image(
    data: bytes,
    *,
    name: str = "image",
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> RGBImage:
    """RGB uint8 pixels (height, width, 3), EXIF orientation applied."""
    if len(data) > max_bytes:
        raise BadInputError(f"{name}: {len(data)} bytes is over the {max_bytes}-byte limit")
    if not data:
        raise BadInputError(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.format not in ALLOWED_FORMATS:
                    raise BadInputError(
                        f"{name}: {img.format} images are not accepted "
                        f"(use one of {', '.join(sorted(ALLOWED_FORMATS))})"
                    )
                width, height = img.size
                if width < 1 or height < 1 or width * height > max_pixels:
                    raise BadInputError(
                        f"{name}: {width}x{height} pixels is over the {max_pixels}-pixel limit"
                    )
                img.load()
                upright = ImageOps.exif_transpose(img)
                rgb = upright.convert("RGB")
    except BadInputError:
        raise
    except UnidentifiedImageError as exc:
        raise BadInputError(f"{name}: not an image (unrecognised format)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadInputError(
            f"{name}: refused as a decompression bomb (over the {max_pixels}-pixel limit)"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Pillow reports truncated or corrupt data as OSError/SyntaxError/ValueError.
        raise BadInputError(f"{name}: damaged or truncated image ({exc})") from exc
    return np.asarray(rgb, dtype=np.uint8)


def load_image(path: Path, *, max_bytes: int = MAX_IMAGE_BYTES) -> RGBImage:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise BadInputError(f"{path}: {size} bytes is over the {max_bytes}-byte limit")
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise BadInputError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise BadInputError(f"{path}: is a directory, not an image") from exc
    except PermissionError as exc:
        raise BadInputError(f"{path}: permission denied") from exc
    return decode_image(data, name=str(path), max_bytes=max_bytes)
