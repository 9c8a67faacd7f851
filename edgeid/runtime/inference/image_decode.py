"""Safe image decoding: the only way image bytes enter the pipeline.

Limits are checked on the header before any pixel is decoded, so a decompression bomb is
refused without allocating its pixels; truncated and non-image bytes are refused, not guessed at.
High-bit-depth pixels (16-bit and 32-bit greyscale, float) are scaled to 8 bits, never clipped.

``decode_working`` bounds what detection costs: a large photo is reduced to at most
``max_working_pixels`` for the detector, and faces are then cut from the full-resolution image
(``WorkingImage.region``), so a 50-megapixel photo costs its pixels once, not the detector's
image pyramid over 50 megapixels.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from edgeid.runtime.errors import BadInputError
from edgeid.runtime.inference.types import RGBImage

# A 50 MB upload covers any camera JPEG; larger is almost certainly not a photo.
MAX_IMAGE_BYTES = 50 * 1024 * 1024
# 50 megapixels: above the largest phone sensors, below what would exhaust a 4 GB box.
MAX_IMAGE_PIXELS = 50_000_000
# What the detector sees at most: a 12-megapixel phone photo reduced by 2 in each direction
# (faces of 40 px and more in the original are still found); see README "Speed and limits".
MAX_WORKING_PIXELS = 3_000_000
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "TIFF", "MPO"})
# Largest 8-bit and 16-bit sample values.
_MAX_8 = 255
_MAX_16 = 65535


def decode_image(
    data: bytes,
    *,
    name: str = "image",
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> RGBImage:
    """RGB uint8 pixels (height, width, 3), EXIF orientation applied."""
    with _opened(data, name, max_bytes, max_pixels) as img:
        rgb = _upright_rgb(img)
    return np.asarray(rgb, dtype=np.uint8)


@dataclass(frozen=True)
class Region:
    """A crop of the full-resolution image: ``pixels`` shows the full-resolution rectangle
    starting at ``origin`` (x, y), resampled by ``scale`` (region pixels per full pixel)."""

    pixels: RGBImage
    origin: tuple[float, float]
    scale: float


@dataclass(frozen=True)
class WorkingImage:
    """A decoded photo as detection sees it: ``pixels`` at most the working size, ``scale``
    working pixels per full-resolution pixel (1.0: not reduced, ``pixels`` is the photo)."""

    pixels: RGBImage
    scale: float
    full_size: tuple[int, int]  # (width, height) of the photo
    _full: Image.Image | None = field(default=None, repr=False)

    @property
    def reduced(self) -> bool:
        return self._full is not None

    def region(self, x0: float, y0: float, x1: float, y1: float, max_side: int) -> Region:
        """The full-resolution rectangle, clipped to the photo, shrunk to ``max_side`` pixels on
        its longer side if it is bigger (a face filling the photo needs no 5000-px chip)."""
        width, height = self.full_size
        left, top = max(0, math.floor(x0)), max(0, math.floor(y0))
        right, bottom = min(width, math.ceil(x1)), min(height, math.ceil(y1))
        right, bottom = max(right, left + 1), max(bottom, top + 1)
        source = Image.fromarray(self.pixels) if self._full is None else self._full
        crop = source.crop((left, top, right, bottom))
        longer = max(crop.size)
        scale = 1.0
        if longer > max_side:
            scale = max_side / longer
            size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
            crop = crop.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
            scale = crop.width / (right - left)
        pixels = np.asarray(crop, dtype=np.uint8)
        return Region(pixels=pixels, origin=(float(left), float(top)), scale=scale)


def decode_working(
    data: bytes,
    *,
    name: str = "image",
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_working_pixels: int = MAX_WORKING_PIXELS,
) -> WorkingImage:
    """The photo for detection: at most ``max_working_pixels`` (reduced by a whole factor,
    box-filtered), with the full-resolution image kept as one Pillow image for ``region``."""
    with _opened(data, name, max_bytes, max_pixels) as img:
        full = _upright_rgb(img)
    pixels_now = full.width * full.height
    if pixels_now <= max_working_pixels:
        return WorkingImage(pixels=np.asarray(full, dtype=np.uint8), scale=1.0, full_size=full.size)
    factor = math.ceil(math.sqrt(pixels_now / max_working_pixels))
    while (full.width // factor) * (full.height // factor) > max_working_pixels:
        factor += 1
    small = full.reduce(factor)
    return WorkingImage(
        pixels=np.asarray(small, dtype=np.uint8),
        scale=small.width / full.width,
        full_size=full.size,
        _full=full,
    )


def declared_pixels(data: bytes) -> int:
    """Width x height as the header states it (0 if unreadable; decoding then says why):
    read before admission, so a large photo waits for a large-photo slot."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return 0
    return width * height


@contextmanager
def _opened(data: bytes, name: str, max_bytes: int, max_pixels: int) -> Iterator[Image.Image]:
    """The image with its pixels loaded, after the byte, format and pixel limits; every decoding
    failure becomes one ``BadInputError`` naming ``name``."""
    if len(data) > max_bytes:
        raise BadInputError(
            f"{name} is {len(data)} bytes, over the {max_bytes}-byte limit for one image; "
            "use a smaller copy of it"
        )
    if not data:
        raise BadInputError(f"{name} is an empty file; use a complete copy of it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Not closed on exit: the caller may keep the decoded pixels (a BytesIO holds no
            # file descriptor to leak).
            img = Image.open(io.BytesIO(data))
            if img.format not in ALLOWED_FORMATS:
                raise BadInputError(
                    f"{name} is a {img.format} image: {img.format} images are not accepted; "
                    f"convert it to one of {', '.join(sorted(ALLOWED_FORMATS))}"
                )
            width, height = img.size
            if width < 1 or height < 1 or width * height > max_pixels:
                raise BadInputError(
                    f"{name} is {width}x{height} pixels, over the {max_pixels}-pixel limit; "
                    "use a smaller copy of it"
                )
            img.load()
            yield img
    except BadInputError:
        raise
    except UnidentifiedImageError as exc:
        raise BadInputError(
            f"{name} is not an image this box can read (it reads "
            f"{', '.join(sorted(ALLOWED_FORMATS))}); check that the file is a photo"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadInputError(
            f"{name} is refused as a decompression bomb (it would unpack to more than the "
            f"{max_pixels}-pixel limit); use an ordinary photo"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Pillow reports truncated or corrupt data as OSError/SyntaxError/ValueError; its own
        # words ("image file is truncated (5 bytes not processed)") help no user.
        raise BadInputError(
            f"{name} is damaged or incomplete (part of the file is missing or corrupt) and "
            "cannot be read; use a complete copy of the photo"
        ) from exc


def _upright_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB, EXIF orientation applied; high-bit-depth greyscale scaled, not clipped."""
    upright = ImageOps.exif_transpose(img) if _rotated(img) else img
    eight_bit = _to_eight_bit(upright)
    return eight_bit if eight_bit.mode == "RGB" else eight_bit.convert("RGB")


def _rotated(img: Image.Image) -> bool:
    return img.getexif().get(ExifTags.Base.Orientation, 1) not in (0, 1)


def _to_eight_bit(img: Image.Image) -> Image.Image:
    """Pillow's convert() clips "I;16", "I" and "F" samples at 255 (a 16-bit photo turns almost
    white); scale them by their bit depth instead."""
    if img.mode.startswith("I;16"):
        wide: npt.NDArray[np.generic] = np.asarray(img)
        return _grey(np.right_shift(wide.astype(np.uint16, copy=False), 8))
    if img.mode in ("I", "F"):
        values = np.nan_to_num(np.asarray(img), nan=0.0, posinf=0.0, neginf=0.0)
        top = float(values.max(initial=0))
        if img.mode == "F" and top <= 1.0:
            return _grey(np.clip(values, 0.0, 1.0) * _MAX_8)
        if top <= _MAX_8:  # 8-bit samples in a wide mode
            return _grey(np.clip(values, 0, _MAX_8))
        # 16-bit samples (most 32-bit files); wider: scaled by their own maximum.
        ceiling = _MAX_16 if top <= _MAX_16 else top
        return _grey(np.clip(values, 0, None) * (_MAX_8 / ceiling))
    return img


def _grey(values: npt.NDArray[np.generic]) -> Image.Image:
    samples = np.asarray(values)
    if samples.dtype.kind == "f":
        samples = np.rint(samples)
    return Image.fromarray(samples.astype(np.uint8), mode="L")


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
