"""dlib's tiled image pyramid and the geometry that maps boxes in and out of it.

dlib's ``input_rgb_image_pyramid<pyramid_down<N>>`` packs an image and all its downscaled
copies into one padded canvas (a "tiled pyramid") so a fully convolutional detector scans every
scale in a single pass. This module rebuilds that canvas and the coordinate mappings bit for bit
where it matters (tile placement, level sizes, the bilinear resampling dlib's input layer uses,
and its rounding rules), written from dlib's documented behaviour and source, without its code.

Conventions: ``Rect`` is dlib's integer rectangle, inclusive on all four sides. Float boxes are
``(left, top, right, bottom)`` rows of an ``(n, 4)`` float64 array, also in dlib's inclusive
convention, so they can go through dlib's mappings unchanged.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

from edgeid.runtime.inference.types import RGBImage

logger = logging.getLogger(__name__)

Float32Array = npt.NDArray[np.float32]
Float64Array = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
_ArrayT = TypeVar("_ArrayT", bound=npt.NDArray[Any])

# dlib stops adding pyramid levels once a level would be shorter than this many rows.
MIN_LEVEL_HEIGHT = 5
# dlib's pyramid_down<2> (used by pyramid_up for upsampling) maps p_up = (p + offset) * 2.
PYRAMID_2_OFFSET_X = 1.25
PYRAMID_2_OFFSET_Y = 0.75
# Generic pyramid_down<N> maps p_up = p * N/(N-1) + 0.3 (and the inverse for p_down).
PYRAMID_N_OFFSET = 0.3
# dlib's SIMD resize handles four output columns per step; the lanes' float32 rounding depends on
# that grouping, so we reproduce it.
SIMD_LANES = 4
# Resampling plans depend only on sizes; a camera's frames repeat the same ~30 level sizes.
PLAN_CACHE_SIZE = 256


class Rect(NamedTuple):
    """dlib's ``rectangle``: integer corners, right and bottom inclusive."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return 0 if self.is_empty else self.right - self.left + 1

    @property
    def height(self) -> int:
        return 0 if self.is_empty else self.bottom - self.top + 1

    @property
    def is_empty(self) -> bool:
        return self.top > self.bottom or self.left > self.right

    def intersect(self, other: Rect) -> Rect:
        return Rect(
            max(self.left, other.left),
            max(self.top, other.top),
            min(self.right, other.right),
            min(self.bottom, other.bottom),
        )


@dataclass(frozen=True)
class TiledPyramidLayout:
    """Where each pyramid level sits in the tiled canvas (level 0 is the input image)."""

    rects: tuple[Rect, ...]
    height: int
    width: int


# --------------------------------------------------------------------------------------------
# Rounding rules dlib uses when it turns doubles into integer coordinates


def lround(values: Float64Array) -> IntArray:
    """C's ``std::lround``: nearest integer, halves away from zero, with no float error."""
    whole = np.trunc(values)
    frac = values - whole  # exact for doubles
    return (whole + np.where(np.abs(frac) >= 0.5, np.sign(values), 0.0)).astype(np.int64)


def floor_half_up(values: Float64Array) -> IntArray:
    """dlib's vector<double> -> vector<long> conversion: ``floor(x + 0.5)``, float add included."""
    return np.floor(values + 0.5).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Layout


def pyramid_level_sizes(rows: int, cols: int, downsampling: int) -> list[tuple[int, int]]:
    """Sizes (rows, cols) of every level dlib builds for pyramid_down<downsampling>."""
    if rows * cols == 0:
        return []
    rate = (downsampling - 1.0) / downsampling
    sizes = [(rows, cols)]
    while True:
        rows, cols = math.floor(rate * rows), math.floor(rate * cols)
        if rows * cols == 0 or rows < MIN_LEVEL_HEIGHT:
            return sizes
        sizes.append((rows, cols))


def tiled_pyramid_layout(
    rows: int, cols: int, downsampling: int, padding: int, outer_padding: int
) -> TiledPyramidLayout:
    """Place the pyramid levels as dlib does: one column down the left, then back up the right.

    Levels go top to bottom under the full-size image until the next one fits beside the
    previous and the first column holds about half the total height; the rest stack bottom-up
    along the right edge, stopping before any would overlap the full-size image.
    """
    sizes = pyramid_level_sizes(rows, cols, downsampling)
    if not sizes:
        return TiledPyramidLayout((), 0, 0)
    first_h, first_w = sizes[0]

    total_height = sum(h + padding for h, _ in sizes) - 2 * padding
    column_height = 0
    prev_width = 0
    for h, w in sizes:
        fits_beside = w <= first_w - prev_width - padding
        if fits_beside and (column_height - first_h) * 2 >= total_height - first_h:
            break
        column_height += h + padding
        prev_width = w
    column_height -= padding

    canvas_h = column_height + 2 * outer_padding
    canvas_w = first_w + 2 * outer_padding

    rects: list[Rect] = []
    y = outer_padding
    i = 0
    while y < column_height + outer_padding and i < len(sizes):
        h, w = sizes[i]
        rects.append(Rect(outer_padding, y, outer_padding + w - 1, y + h - 1))
        y += h + padding
        i += 1
    y -= padding
    while i < len(sizes):
        h, w = sizes[i]
        right, bottom = outer_padding + first_w - 1, y - 1
        rect = Rect(right - (w - 1), bottom - (h - 1), right, bottom)
        if not rects[0].intersect(rect).is_empty:
            break  # dlib drops the levels that would overlap the full-size image
        rects.append(rect)
        y -= h + padding
        i += 1
    return TiledPyramidLayout(tuple(rects), canvas_h, canvas_w)


# --------------------------------------------------------------------------------------------
# Bilinear resampling, as dlib's resize_image(..., interpolate_bilinear) computes it


def _frozen(array: _ArrayT) -> _ArrayT:
    """Plans are cached and shared between calls, so make their arrays immutable."""
    array.flags.writeable = False
    return array


@dataclass(frozen=True)
class _Axis:
    """Sample positions along one axis: source indices and blend weights per output index."""

    low: IntArray
    high: IntArray
    frac: Float64Array


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _row_axis(in_size: int, out_size: int) -> _Axis:
    """Rows: dlib steps a double ``y`` by the scale, so positions carry accumulated error."""
    scale = (in_size - 1) / max(out_size - 1, 1)
    steps = np.full(out_size + 1, scale, dtype=np.float64)
    steps[0] = -scale
    y = np.cumsum(steps)[1:]  # sequential adds, like dlib's loop
    low = np.floor(y).astype(np.int64)
    return _Axis(_frozen(low), _frozen(np.minimum(low + 1, in_size - 1)), _frozen(y - low))


@dataclass(frozen=True)
class _ColumnPlan:
    """Columns: the first ``simd`` go through dlib's float32 4-lane path, the rest double."""

    simd: int
    left: IntArray
    frac32: Float32Array
    tail_left: IntArray
    tail_right: IntArray
    tail_frac: Float64Array


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _column_plan(in_size: int, out_size: int) -> _ColumnPlan:
    scale = (in_size - 1) / max(out_size - 1, 1)
    start = -SIMD_LANES * scale
    groups = out_size // SIMD_LANES + 2
    lanes = np.empty((groups + 1, SIMD_LANES), dtype=np.float32)
    lanes[0] = np.array([start + j * scale for j in range(SIMD_LANES)], dtype=np.float64)
    lanes[1:] = np.float32(SIMD_LANES * scale)
    x32 = np.cumsum(lanes, axis=0, dtype=np.float32)[1:]  # float32 sequential, like the lanes
    left = x32.astype(np.int64)  # truncation, as the SIMD float->int conversion does
    # dlib leaves the SIMD loop at the first group whose last lane would read past the edge.
    stop = np.nonzero(left[:, -1] + 1 >= in_size)[0]
    simd_groups = int(stop[0]) if stop.size else groups
    simd = min(simd_groups * SIMD_LANES, out_size)
    left_simd = left[:simd_groups].reshape(-1)[:simd]
    frac32 = (x32[:simd_groups].reshape(-1)[:simd] - left_simd.astype(np.float32)).astype(
        np.float32
    )

    # The scalar tail restarts from a double x and steps it column by column.
    tail_x: list[float] = []
    x = -scale + simd * scale
    for _ in range(simd, out_size):
        x += scale
        tail_x.append(x)
    tx = np.array(tail_x, dtype=np.float64)
    tail_left = np.floor(tx).astype(np.int64)
    return _ColumnPlan(
        simd=simd,
        left=_frozen(left_simd),
        frac32=_frozen(frac32),
        tail_left=_frozen(tail_left),
        tail_right=_frozen(np.minimum(tail_left + 1, in_size - 1)),
        tail_frac=_frozen(tx - tail_left),
    )


def _blend_simd(
    tl: Float32Array,
    tr: Float32Array,
    bl: Float32Array,
    br: Float32Array,
    rows: _Axis,
    cols: _ColumnPlan,
) -> Float32Array:
    """dlib's 4-lane float32 blend: the four corner weights are float32 products, summed in
    dlib's order ((tl + tr) + bl) + br. Corner arrays are (C, out_rows, simd columns)."""
    tb = rows.frac.astype(np.float32)[:, None]
    inv_tb = (1.0 - rows.frac).astype(np.float32)[:, None]
    lr = cols.frac32[None, :]
    inv_lr = np.float32(1.0) - lr
    out = np.multiply(inv_tb * inv_lr, tl)
    scratch = np.multiply(inv_tb * lr, tr)
    out += scratch
    np.multiply(tb * inv_lr, bl, out=scratch)
    out += scratch
    np.multiply(tb * lr, br, out=scratch)
    out += scratch
    return out


def resize_bilinear_planes(
    src: Float32Array, out_rows: int, out_cols: int, out: Float32Array | None = None
) -> Float32Array:
    """Resize float32 planes (C, H, W) as dlib's input layer resizes each tensor channel.

    ``out`` may be a (C, out_rows, out_cols) view to write into (e.g. a tile of the canvas).
    """
    channels, in_rows, in_cols = src.shape
    if out is None:
        out = np.empty((channels, out_rows, out_cols), dtype=np.float32)
    if out.size == 0 or src.size == 0:
        return out
    rows = _row_axis(in_rows, out_rows)
    cols = _column_plan(in_cols, out_cols)
    n = cols.simd
    if n:
        # Gather columns once for all source rows, then pick whole rows: far cheaper in numpy
        # than gathering each corner element by element.
        lefts = np.take(src, cols.left, axis=2).reshape(channels * in_rows, n)
        rights = np.take(src, cols.left + 1, axis=2).reshape(channels * in_rows, n)
        plane_base = np.arange(channels)[:, None] * in_rows
        top_rows = (plane_base + rows.low[None, :]).reshape(-1)
        bottom_rows = (plane_base + rows.high[None, :]).reshape(-1)
        shape = (channels, out_rows, n)
        out[:, :, :n] = _blend_simd(
            lefts[top_rows].reshape(shape),
            rights[top_rows].reshape(shape),
            lefts[bottom_rows].reshape(shape),
            rights[bottom_rows].reshape(shape),
            rows,
            cols,
        )
    if n < out_cols:
        # Scalar tail: blend along x in float32, along y in double, then store as float32.
        top, bottom = src[:, rows.low, :], src[:, rows.high, :]
        lr = cols.tail_frac.astype(np.float32)[None, :]
        inv_lr = np.float32(1.0) - lr
        lft, rgt = cols.tail_left, cols.tail_right
        upper = inv_lr * top[:, :, lft] + lr * top[:, :, rgt]
        lower = inv_lr * bottom[:, :, lft] + lr * bottom[:, :, rgt]
        tb64 = rows.frac[:, None]
        out[:, :, n:] = (1.0 - tb64) * upper.astype(np.float64) + tb64 * lower.astype(np.float64)
    return out


def resize_bilinear_rgb(image: RGBImage, out_rows: int, out_cols: int) -> RGBImage:
    """Resize an 8-bit RGB image as dlib's rgb_pixel bilinear resize does (truncating)."""
    in_rows, in_cols, _ = image.shape
    out = np.empty((out_rows, out_cols, 3), dtype=np.uint8)
    if out.size == 0 or image.size == 0:
        return out
    rows = _row_axis(in_rows, out_rows)
    cols = _column_plan(in_cols, out_cols)
    planes = np.moveaxis(image, 2, 0).astype(np.float32)
    top, bottom = planes[:, rows.low, :], planes[:, rows.high, :]

    if cols.simd:
        lft, rgt = cols.left, cols.left + 1
        blended = _blend_simd(
            top[:, :, lft], top[:, :, rgt], bottom[:, :, lft], bottom[:, :, rgt], rows, cols
        )
        out[:, : cols.simd, :] = np.moveaxis(blended.astype(np.int64).astype(np.uint8), 0, 2)
    if cols.simd < out_cols:
        # Scalar tail: all in double, truncated to unsigned char.
        top64, bottom64 = top.astype(np.float64), bottom.astype(np.float64)
        lr64 = cols.tail_frac[None, :]
        lft, rgt = cols.tail_left, cols.tail_right
        tb64 = rows.frac[:, None]
        blended64 = (1.0 - tb64) * ((1.0 - lr64) * top64[:, :, lft] + lr64 * top64[:, :, rgt]) + (
            tb64 * ((1.0 - lr64) * bottom64[:, :, lft] + lr64 * bottom64[:, :, rgt])
        )
        out[:, cols.simd :, :] = np.moveaxis(blended64.astype(np.int64).astype(np.uint8), 0, 2)
    return out


def pyramid_up_size(rows: int, cols: int) -> tuple[int, int]:
    """Output size of dlib's pyramid_up with pyramid_down<2>: its rounded rect_up of the image."""
    bottom = lround(np.array([(rows - 1 + PYRAMID_2_OFFSET_Y) * 2]))[0]
    right = lround(np.array([(cols - 1 + PYRAMID_2_OFFSET_X) * 2]))[0]
    return int(bottom) + 1, int(right) + 1


def pyramid_up(image: RGBImage) -> RGBImage:
    """Upsample about 2x as dlib's pyramid_up(image) does (what upsample_num_times applies)."""
    rows, cols = pyramid_up_size(image.shape[0], image.shape[1])
    return resize_bilinear_rgb(image, rows, cols)


def rect_down_2(boxes: Float64Array, levels: int) -> Float64Array:
    """Map boxes from an image upsampled ``levels`` times back down (pyramid_down<2>)."""
    out = boxes.copy()
    for _ in range(levels):
        out[:, 0::2] = out[:, 0::2] / 2.0 - PYRAMID_2_OFFSET_X
        out[:, 1::2] = out[:, 1::2] / 2.0 - PYRAMID_2_OFFSET_Y
    return out


# --------------------------------------------------------------------------------------------
# The canvas and mapping out of it


def build_tiled_pyramid(
    image: RGBImage, layout: TiledPyramidLayout, background: tuple[float, float, float]
) -> Float32Array:
    """The (3, H, W) float32 canvas of raw RGB values that the converted network takes.

    Each level is resampled from the previous one, as dlib does. dlib tiles values already
    normalised to (pixel - mean) / 256 on a zero background; our ONNX graph normalises itself, so
    we tile raw values on a background of the mean colour, which the graph maps to that same 0.
    Resampling is linear, so the two orders differ only by float32 rounding (~1e-7 relative).
    """
    canvas = np.empty((3, layout.height, layout.width), dtype=np.float32)
    canvas[:] = np.array(background, dtype=np.float32)[:, None, None]
    if not layout.rects:
        return canvas
    first = layout.rects[0]
    canvas[:, first.top : first.bottom + 1, first.left : first.right + 1] = np.moveaxis(image, 2, 0)
    for prev, rect in zip(layout.rects, layout.rects[1:], strict=False):
        src = canvas[:, prev.top : prev.bottom + 1, prev.left : prev.right + 1]
        dest = canvas[:, rect.top : rect.bottom + 1, rect.left : rect.right + 1]
        resize_bilinear_planes(src, rect.height, rect.width, out=dest)
    return canvas


def _nearest_level(layout: TiledPyramidLayout, points: IntArray) -> IntArray:
    """Index of the level tile containing, else nearest to, each integer point (first on ties)."""
    rects = np.array(layout.rects, dtype=np.int64)  # (L, 4)
    px, py = points[:, 0:1], points[:, 1:2]
    dx = np.clip(px, rects[None, :, 0], rects[None, :, 2]) - px
    dy = np.clip(py, rects[None, :, 1], rects[None, :, 3]) - py
    nearest: IntArray = np.argmin(dx * dx + dy * dy, axis=1).astype(np.int64)
    return nearest


def tiled_pyramid_to_image(
    layout: TiledPyramidLayout, downsampling: int, boxes: Float64Array
) -> Float64Array:
    """Map boxes on the canvas to the input image: pick the tile nearest the box centre, take
    the box relative to that tile, and scale it up by that tile's number of pyramid levels."""
    if boxes.shape[0] == 0:
        return boxes.copy()
    centres = np.stack(
        [(boxes[:, 0] + boxes[:, 2]) / 2.0, (boxes[:, 1] + boxes[:, 3]) / 2.0], axis=1
    )
    level = _nearest_level(layout, floor_half_up(centres))
    origins = np.array([(r.left, r.top) for r in layout.rects], dtype=np.float64)[level]
    out: Float64Array = boxes - np.concatenate([origins, origins], axis=1)
    ratio = downsampling / (downsampling - 1.0)
    for step in range(1, int(level.max()) + 1):
        rows = level >= step
        out[rows] = out[rows] * ratio + PYRAMID_N_OFFSET
    return out
