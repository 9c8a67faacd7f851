"""Hostile and damaged images are refused with a clear BadInputError, never a crash."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeid.runtime.errors import BadInputError
from edgeid.runtime.inference.image_decode import decode_image, load_image


def _jpeg(width: int = 64, height: int = 48, exif_orientation: int | None = None) -> bytes:
    img = Image.new("RGB", (width, height), (200, 10, 10))
    img.paste((10, 200, 10), (0, 0, width // 2, height // 2))  # green top-left quadrant
    buf = io.BytesIO()
    if exif_orientation is None:
        img.save(buf, "JPEG", quality=95)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims huge dimensions: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decodes_rgb_pixels() -> None:
    pixels = decode_image(_jpeg())
    assert pixels.shape == (48, 64, 3) and pixels.dtype == np.uint8
    assert pixels[5, 5, 1] > 150 and pixels[40, 60, 0] > 150


def test_exif_orientation_is_applied() -> None:
    """Orientation 6 (rotate 90° clockwise to display) turns a 64x48 image into 48x64."""
    pixels = decode_image(_jpeg(exif_orientation=6))
    assert pixels.shape == (64, 48, 3)
    # The green quadrant was top-left; after a clockwise turn it is top-right.
    assert pixels[5, 40, 1] > 150 and pixels[5, 5, 0] > 150


def test_truncated_jpeg_is_refused_in_words_that_say_what_to_do() -> None:
    data = _jpeg(640, 480)
    with pytest.raises(BadInputError, match="damaged or incomplete") as refused:
        decode_image(data[: len(data) // 2], name="the photo")
    # Pillow's own words ("image file is truncated (5 bytes not processed)") help nobody.
    assert str(refused.value) == (
        "the photo is damaged or incomplete (part of the file is missing or corrupt) and "
        "cannot be read; use a complete copy of the photo"
    )


def test_non_image_bytes_are_refused() -> None:
    with pytest.raises(BadInputError, match="not an image"):
        decode_image(b"%PDF-1.7 this is not a photo" * 10)


def test_empty_file_is_refused() -> None:
    with pytest.raises(BadInputError, match="empty"):
        decode_image(b"")


def test_decompression_bomb_is_refused_before_decoding() -> None:
    with pytest.raises(BadInputError, match="pixel limit"):
        decode_image(_png_header_only(100_000, 100_000))


def test_oversize_upload_is_refused() -> None:
    with pytest.raises(BadInputError, match="byte limit"):
        decode_image(_jpeg(), max_bytes=100)


def test_unaccepted_format_is_refused() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "GIF")
    with pytest.raises(BadInputError, match="GIF images are not accepted"):
        decode_image(buf.getvalue())


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no such file"):
        load_image(tmp_path / "absent.jpg")
    with pytest.raises(BadInputError, match="is a directory"):
        load_image(tmp_path)
