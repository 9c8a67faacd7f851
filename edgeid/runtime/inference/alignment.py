"""Aligned face chips, cut exactly as dlib's ``get_face_chip`` / ``get_face_chips`` cut them.

dlib's ResNet embedder was trained on such chips, so we follow dlib's geometry step by step
(written from its documented behaviour and source, not its code):

1. ``get_face_chip_details``: a least-squares similarity transform from a fixed 5-point
   template (padded by ``padding`` on every side, scaled to ``size``) to the landmarks gives the
   chip's rotation angle and its (rotated) rectangle in the image.
2. ``extract_image_chips``: when the chip is much smaller than that rectangle, bilinear sampling
   would skip pixels, so dlib first builds a ``pyramid_down<2>`` pyramid (a 5x5 binomial filter
   in integer arithmetic, then 2:1 decimation) of the image region around all chips, and samples
   the level whose rectangle, halved once more, would no longer be larger than the chip.
3. bilinear interpolation in float64, truncated to uint8, black outside the image.

Integer arithmetic (pyramid) and float64 expressions (bilinear weights) follow dlib's term for
term. The one thing we do not copy is dlib's SVD: we use the closed forms of the same fits,
which agree to ~1e-13 px. That noise could move a truncated value across an integer (one grey
level) in principle; on ~60 million test pixels against dlib it never did.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edgeid.runtime.errors import BadInputError
from edgeid.runtime.inference.types import FloatArray, RGBImage

logger = logging.getLogger(__name__)

Float64Array = npt.NDArray[np.float64]
# An RGB image as three channel planes (3, rows, cols).
PlanarImage = npt.NDArray[np.uint16]

# Where dlib's 5 landmarks land in an unpadded unit chip (dlib's get_face_chip_details).
FACE_TEMPLATE_5 = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ],
    dtype=np.float64,
)
# pyramid_down<2> maps a point p of a level to p / 2 - offset in the next (dlib's convention).
_PYRAMID_OFFSET_X = 1.25
_PYRAMID_OFFSET_Y = 0.75
# pyramid_down<2>'s separable 5-tap binomial kernel; 2-D weights sum to 16 * 16 = 256.
_BINOMIAL = (1, 4, 6, 4, 1)
_BINOMIAL_NORM = 256
# pyramid_down<2> returns an empty image for inputs this small or smaller in either dimension.
_PYRAMID_MIN_SIDE = 8
# Margin (pixels) dlib keeps around the chip region at level 0; it doubles (+2) per level.
_BASE_MARGIN = 2.0
# Coordinates beyond this (pixels) are nonsense; bounding them keeps the region loops finite.
_MAX_COORD = 1e6


@dataclass(frozen=True)
class ChipDetails:
    """dlib's ``chip_details``: a rotated rectangle in the image and the chip's pixel size.

    ``rect`` is dlib's ``drectangle`` (left, top, right, bottom), right/bottom inclusive.
    """

    rect: tuple[float, float, float, float]
    angle: float
    rows: int
    cols: int


def face_chip(
    image: RGBImage, landmarks: FloatArray, size: int = 150, padding: float = 0.25
) -> RGBImage:
    """The (size, size, 3) chip ``dlib.get_face_chip(image, shape, size, padding)`` returns."""
    return face_chips(image, [landmarks], size, padding)[0]


def face_chips(
    image: RGBImage,
    landmarks: Sequence[FloatArray] | FloatArray,
    size: int = 150,
    padding: float = 0.25,
) -> list[RGBImage]:
    """Chips of several faces of one image, as ``dlib.get_face_chips`` cuts them.

    dlib builds one pyramid over the region around all the chips, so a chip that needs the
    pyramid (a face much larger than ``size``) can differ slightly from the same face cut alone
    by ``face_chip`` (dlib itself: up to 12 grey levels on a few pixels); faces that need no
    pyramid come out identical either way.
    """
    details = [face_chip_details(points, size, padding) for points in landmarks]
    return extract_image_chips(image, details)


def face_chip_details(landmarks: FloatArray, size: int = 150, padding: float = 0.25) -> ChipDetails:
    """dlib's ``get_face_chip_details`` for 5-point landmarks."""
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != FACE_TEMPLATE_5.shape or not (np.abs(points) <= _MAX_COORD).all():
        raise BadInputError(
            f"alignment: expected finite (5, 2) landmarks in dlib's order, got {points.shape}"
        )
    if size < 1 or not (math.isfinite(padding) and padding >= 0):
        raise BadInputError(f"alignment: bad chip size {size} or padding {padding}")
    # dlib's Python binding takes padding as a C++ float, so its value is float32-rounded.
    pad = float(np.float32(padding))
    template = (pad + FACE_TEMPLATE_5) / (2 * pad + 1) * float(size)
    m, t = _similarity(template, points)
    # chip_details(from, to, dims): the transform's scale and rotation give the chip's angle
    # and size in the image; its image of the chip centre gives the rectangle's centre.
    cx, cy = (float(v) for v in m @ np.array([size / 2.0, size / 2.0]) + t)
    cos_scaled, sin_scaled = float(m[0, 0]), float(m[1, 0])
    angle = math.atan2(sin_scaled, cos_scaled)
    scale = math.sqrt(cos_scaled * cos_scaled + sin_scaled * sin_scaled)
    # centered_drect(centre, w, h) spans w - 1 between its inclusive edges.
    half = (size * scale - 1) / 2
    return ChipDetails((cx - half, cy - half, cx + half, cy + half), angle, size, size)


def extract_image_chips(image: RGBImage, details: Sequence[ChipDetails]) -> list[RGBImage]:
    """dlib's ``extract_image_chips`` with bilinear interpolation."""
    _check_image(image)
    for chip in details:
        if not all(abs(v) <= _MAX_COORD for v in chip.rect) or min(chip.rows, chip.cols) < 1:
            raise BadInputError(f"alignment: unusable chip {chip}")
    height, width = image.shape[:2]
    max_depth = 0
    region = _EMPTY_RECT
    for chip in details:
        # How many pyramid levels make the region no larger than the chip, and the margin
        # (growing with depth) that keeps the pyramid filter's borders away from it.
        depth, margin = 0, _BASE_MARGIN
        rect = _rect_down(chip.rect)
        while _area(rect) > chip.rows * chip.cols:
            rect = _rect_down(rect)
            depth += 1
            margin = margin * 2 + 2
        xs, ys = _rotated_corners(chip.rect, chip.angle, (0, 1, 2, 3))
        grown = (min(xs) - margin, min(ys) - margin, max(xs) + margin, max(ys) + margin)
        clipped = (
            max(grown[0], 0.0),
            max(grown[1], 0.0),
            min(grown[2], width - 1.0),
            min(grown[3], height - 1.0),
        )
        region = _union(region, _lround_rect(clipped))
        max_depth = max(max_depth, depth)

    left, top, right, bottom = region
    # The region as channel planes (3, rows, cols): every filter and gather below then runs
    # along contiguous rows; uint16 holds the pyramid's integer sums exactly.
    crop = image[top : bottom + 1, left : right + 1] if left <= right and top <= bottom else None
    base: PlanarImage = (
        np.zeros((3, 0, 0), dtype=np.uint16)
        if crop is None
        else np.moveaxis(crop, 2, 0).astype(np.uint16, order="C")
    )
    levels = [base]
    for _ in range(max_depth):
        levels.append(_pyramid_down(levels[-1]))
    if max_depth:
        logger.debug("face chips from a %d-level pyramid of %s", max_depth, region)

    chips = []
    for chip in details:
        cl, ct, cr, cb = chip.rect
        if chip.angle == 0 and chip.rows == cb - ct + 1 and chip.cols == cr - cl + 1:
            chips.append(_copy_chip(image, _lround_rect(chip.rect)))
            continue
        level = 0
        rect = (cl - left, ct - top, cr - left, cb - top)
        while _area(_rect_down(rect)) > chip.rows * chip.cols:
            level += 1
            rect = _rect_down(rect)
        chips.append(_sample_chip(levels[level], rect, chip))
    return chips


# --- dlib geometry helpers --------------------------------------------------------------

Rect = tuple[float, float, float, float]
IntRect = tuple[int, int, int, int]
# dlib's default (empty) rectangle.
_EMPTY_RECT: IntRect = (0, 0, -1, -1)


def _similarity(src: Float64Array, dst: Float64Array) -> tuple[Float64Array, Float64Array]:
    """Least-squares scaled rotation + translation taking ``src`` points onto ``dst``.

    The closed form of the Umeyama fit dlib computes with an SVD: for 2-D points the optimal
    ``c R`` is [[a, -b], [b, a]] with a, b below.
    """
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - src_mean, dst - dst_mean
    spread = float((s * s).sum())
    if spread == 0.0:  # dlib keeps c = 1 when the source points coincide
        spread = 1.0
    a = float((s[:, 0] * d[:, 0] + s[:, 1] * d[:, 1]).sum()) / spread
    b = float((s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum()) / spread
    m = np.array([[a, -b], [b, a]])
    return m, dst_mean - m @ src_mean


def _rect_down(rect: Rect) -> Rect:
    """pyramid_down<2>::rect_down: both corners mapped to the next level."""
    x0, y0 = rect[0] / 2.0 - _PYRAMID_OFFSET_X, rect[1] / 2.0 - _PYRAMID_OFFSET_Y
    x1, y1 = rect[2] / 2.0 - _PYRAMID_OFFSET_X, rect[3] / 2.0 - _PYRAMID_OFFSET_Y
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def _area(rect: Rect) -> float:
    """drectangle::area: inclusive width times height, 0 when empty."""
    x0, y0, x1, y1 = rect
    if y0 > y1 or x0 > x1:
        return 0.0
    return (x1 - x0 + 1) * (y1 - y0 + 1)


def _rotated_corners(
    rect: Rect, angle: float, which: tuple[int, ...]
) -> tuple[list[float], list[float]]:
    """Corners (0=tl, 1=tr, 2=bl, 3=br) of ``rect`` rotated by ``angle`` about its centre."""
    x0, y0, x1, y1 = rect
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    corners = ((x0, y0), (x1, y0), (x0, y1), (x1, y1))
    xs, ys = [], []
    for i in which:
        dx, dy = corners[i][0] - cx, corners[i][1] - cy
        xs.append(cos_a * dx - sin_a * dy + cx)
        ys.append(sin_a * dx + cos_a * dy + cy)
    return xs, ys


def _lround(value: float) -> int:
    """C's lround: nearest integer, halves away from zero."""
    magnitude = abs(value)
    whole = math.floor(magnitude)
    rounded = whole + 1 if magnitude - whole >= 0.5 else whole
    return int(math.copysign(rounded, value))


def _lround_rect(rect: Rect) -> IntRect:
    """drectangle -> rectangle conversion."""
    return (_lround(rect[0]), _lround(rect[1]), _lround(rect[2]), _lround(rect[3]))


def _union(a: IntRect, b: IntRect) -> IntRect:
    """rectangle + rectangle: the bounding box, ignoring empty operands."""
    if b[0] > b[2] or b[1] > b[3]:
        return a
    if a[0] > a[2] or a[1] > a[3]:
        return b
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


# --- pixels -----------------------------------------------------------------------------


def _pyramid_down(planes: PlanarImage) -> PlanarImage:
    """pyramid_down<2> on RGB planes: 5x5 binomial filter in integers, keep every other pixel.

    Output pixel (r, c) filters the 5x5 input block whose top-left is (2r, 2c); the sum is
    divided by 256 with truncation, as dlib's uint16 arithmetic does (the largest sum, 65280,
    fits uint16; the order of additions is irrelevant for integers).
    """
    rows, cols = planes.shape[1:]
    if rows <= _PYRAMID_MIN_SIDE or cols <= _PYRAMID_MIN_SIDE:
        return np.zeros((3, 0, 0), dtype=np.uint16)
    out_rows, out_cols = (rows - 3) // 2, (cols - 3) // 2
    taps = [planes[:, i : i + 2 * out_rows : 2] for i in range(len(_BINOMIAL))]
    vertical = _binomial(taps)
    taps = [vertical[:, :, i : i + 2 * out_cols : 2] for i in range(len(_BINOMIAL))]
    down = _binomial(taps)
    down //= np.uint16(_BINOMIAL_NORM)
    return down


def _binomial(taps: list[PlanarImage]) -> PlanarImage:
    """1*t0 + 4*t1 + 6*t2 + 4*t3 + 1*t4 in place-friendly uint16 steps."""
    total = taps[0] + taps[4]
    total += (taps[1] + taps[3]) * np.uint16(_BINOMIAL[1])
    total += taps[2] * np.uint16(_BINOMIAL[2])
    return total


def _sample_chip(source: PlanarImage, rect: Rect, chip: ChipDetails) -> RGBImage:
    """transform_image with bilinear interpolation over ``rect`` rotated by ``chip.angle``."""
    rows, cols = chip.rows, chip.cols
    # The affine map sending chip pixels (0,0), (cols-1,0), (0,rows-1) to the rectangle's
    # rotated top-left, top-right and bottom-left corners (dlib solves it with pinv; with these
    # axis-aligned points the exact solution is a difference quotient).
    xs, ys = _rotated_corners(rect, chip.angle, (0, 1, 2))
    bx, by = xs[0], ys[0]
    m00 = (xs[1] - bx) / (cols - 1) if cols > 1 else 0.0
    m10 = (ys[1] - by) / (cols - 1) if cols > 1 else 0.0
    m01 = (xs[2] - bx) / (rows - 1) if rows > 1 else 0.0
    m11 = (ys[2] - by) / (rows - 1) if rows > 1 else 0.0
    c = np.arange(cols, dtype=np.float64)[None, :]
    r = np.arange(rows, dtype=np.float64)[:, None]
    x = m00 * c + m01 * r + bx
    y = m10 * c + m11 * r + by
    return _bilinear(source, x, y)


def _bilinear(planes: PlanarImage, x: Float64Array, y: Float64Array) -> RGBImage:
    """dlib's interpolate_bilinear at (x, y): float64 weights, truncation, black outside."""
    src_rows, src_cols = planes.shape[1:]
    left, top = np.floor(x.reshape(-1)), np.floor(y.reshape(-1))
    valid = (left >= 0) & (top >= 0) & (left < src_cols - 1) & (top < src_rows - 1)
    if not valid.any():
        return np.zeros((*x.shape, 3), dtype=np.uint8)
    flat = planes.reshape(3, -1)
    # Flat index of each top-left neighbour; points outside read pixel 0 and are blanked below.
    index = np.where(valid, top * src_cols + left, 0).astype(np.intp)
    # float64 up front: mixed integer/float ufunc loops are several times slower.
    tl = np.take(flat, index, axis=1, mode="clip").astype(np.float64)
    tr = np.take(flat, index + 1, axis=1, mode="clip").astype(np.float64)
    bl = np.take(flat, index + src_cols, axis=1, mode="clip").astype(np.float64)
    br = np.take(flat, index + (src_cols + 1), axis=1, mode="clip").astype(np.float64)
    lr = x.reshape(-1) - left
    tb = y.reshape(-1) - top
    lr_c, tb_c = 1 - lr, 1 - tb
    # dlib's expression, term for term.
    value = tb_c * (lr_c * tl + lr * tr) + tb * (lr_c * bl + lr * br)
    truncated = value.astype(np.uint8)  # static_cast: truncation toward zero
    truncated[:, ~valid] = 0
    chip: RGBImage = np.ascontiguousarray(truncated.T).reshape(*x.shape, 3)
    return chip


def _copy_chip(image: RGBImage, rect: IntRect) -> RGBImage:
    """basic_extract_image_chip: an unscaled, unrotated crop, zero where it leaves the image."""
    left, top, right, bottom = rect
    chip = np.zeros((max(bottom - top + 1, 0), max(right - left + 1, 0), 3), dtype=np.uint8)
    rows, cols = image.shape[:2]
    y0, y1 = max(top, 0), min(bottom, rows - 1)
    x0, x1 = max(left, 0), min(right, cols - 1)
    if y0 <= y1 and x0 <= x1:
        chip[y0 - top : y1 - top + 1, x0 - left : x1 - left + 1] = image[y0 : y1 + 1, x0 : x1 + 1]
    return chip


def _check_image(image: RGBImage) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise BadInputError(
            f"alignment: expected an RGB uint8 image (h, w, 3), got {image.dtype} {image.shape}"
        )


# Public names for other chip geometries (edgeid/runtime/inference/chip_input.py).
similarity = _similarity
bilinear = _bilinear
