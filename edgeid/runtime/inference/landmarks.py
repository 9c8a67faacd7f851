"""dlib's 5-point face landmark predictor (a cascade of regression trees), in numpy.

The model comes from ``shape_predictor_5_face_landmarks.dat`` (converted at build time by
``edgeid.models.dlib_shape_predictor``) and reproduces ``dlib.shape_predictor`` bit for bit where it
can: features are the grey levels ``(r + g + b) // 3`` of nearest pixels (0 outside the image),
located through a similarity transform from the mean shape to the current shape, and every
float32 operation (including the order in which tree outputs are summed) follows dlib's.

Point order is dlib's: 0/1 = outer/inner corner of the eye on the image's right (the subject's
left eye), 2/3 = outer/inner corner of the other eye, 4 = bottom of the nose.

The ``edgeid-ertree`` file format, defined here so writer and reader cannot drift apart::

    magic (8 bytes) | header length (uint32 LE) | header (UTF-8 JSON, space-padded to 4 bytes)
    | arrays (little endian, C order, in header order, no gaps) | sha256 of all previous bytes

The header names each array's dtype and shape; the trailing digest makes any changed byte a load
error, and the structural checks in ``ErtreeModel.validate`` keep a well-formed but hostile file
from indexing out of bounds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeid.runtime.errors import BadInputError, ModelError
from edgeid.runtime.inference.types import Box, FloatArray, RGBImage

logger = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int32]
IndexArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]
Float64Array = npt.NDArray[np.float64]

ERTREE_FORMAT = "edgeid-ertree"
ERTREE_VERSION = 1
# "\r\n" in the magic catches a file mangled by a text-mode copy, as PNG's magic does.
ERTREE_MAGIC = b"EIDERT\r\n"
_LENGTH = struct.Struct("<I")
_DIGEST_BYTES = 32  # sha256
# Header and arrays are 4-byte values, so keeping the header a multiple of 4 aligns them all.
_ALIGN = 4
# No legitimate header is anywhere near this; a corrupt length must not drive a huge read.
_MAX_HEADER_BYTES = 1 << 16
# Depth-4 trees (dlib's default) have 15 splits: a 32768-entry leaf table. Deeper trees would
# need 2**31 entries; no dlib model we ship uses them.
_MAX_TABLE_SPLITS = 15
# Face boxes beyond this (pixels) are nonsense and would overflow the pixel index arithmetic.
_MAX_BOX_COORD = 1e6
# Multiplier turning (b, a) into the second column (-b, a) of the similarity matrix.
_NEG_FIRST = np.array([-1.0, 1.0], dtype=np.float32)
# dlib's 5-point model, in its output order.
POINT_NAMES = (
    "eye_a_outer",  # image-right eye (subject's left), outer corner
    "eye_a_inner",
    "eye_b_outer",  # image-left eye (subject's right), outer corner
    "eye_b_inner",
    "nose_base",
)
# (name, dtype) of every array in the file, in file order.
_ARRAYS = (
    ("initial_shape", "<f4"),  # (parts, 2): mean shape in box-normalised units
    ("split_idx1", "<i4"),  # (levels, trees, splits): feature pixel pair of each split
    ("split_idx2", "<i4"),
    ("split_thresh", "<f4"),  # (levels, trees, splits): go left if f1 - f2 > thresh
    ("leaf_values", "<f4"),  # (levels, trees, leaves, 2 * parts): shape increments
    ("anchor_idx", "<i4"),  # (levels, pixels): mean-shape landmark each feature pixel hangs off
    ("deltas", "<f4"),  # (levels, pixels, 2): feature pixel offset from its anchor landmark
)


@dataclass(frozen=True)
class ErtreeModel:
    """The arrays of a regression-tree cascade; every tree is complete and of the same depth."""

    initial_shape: FloatArray
    split_idx1: IntArray
    split_idx2: IntArray
    split_thresh: FloatArray
    leaf_values: FloatArray
    anchor_idx: IntArray
    deltas: FloatArray

    @property
    def num_parts(self) -> int:
        return int(self.initial_shape.shape[0])

    @property
    def num_levels(self) -> int:
        return int(self.split_idx1.shape[0])

    @property
    def trees_per_level(self) -> int:
        return int(self.split_idx1.shape[1])

    @property
    def tree_depth(self) -> int:
        return int(self.split_idx1.shape[2] + 1).bit_length() - 1

    @property
    def pixels_per_level(self) -> int:
        return int(self.anchor_idx.shape[1])

    def validate(self) -> None:
        """Raise ModelError unless the arrays form a usable cascade (shapes, bounds, finiteness)."""
        p, s = self.initial_shape, self.split_idx1.shape
        if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] < 2 or len(s) != 3 or 0 in s:
            raise ModelError(f"ertree: bad shapes {p.shape} / {s}")
        levels, trees, splits = s
        leaves = splits + 1
        pixels = self.anchor_idx.shape[1] if self.anchor_idx.ndim == 2 else 0
        expected = {
            "split_idx2": (s, self.split_idx2.shape),
            "split_thresh": (s, self.split_thresh.shape),
            "leaf_values": ((levels, trees, leaves, 2 * p.shape[0]), self.leaf_values.shape),
            "anchor_idx": ((levels, pixels), self.anchor_idx.shape),
            "deltas": ((levels, pixels, 2), self.deltas.shape),
        }
        for name, (want, got) in expected.items():
            if tuple(want) != tuple(got):
                raise ModelError(f"ertree: {name} has shape {got}, expected {want}")
        if leaves & splits or pixels == 0:
            raise ModelError(f"ertree: {splits} splits per tree is not a complete binary tree")
        for name, idx, bound in (
            ("split_idx1", self.split_idx1, pixels),
            ("split_idx2", self.split_idx2, pixels),
            ("anchor_idx", self.anchor_idx, p.shape[0]),
        ):
            if idx.min() < 0 or idx.max() >= bound:
                raise ModelError(f"ertree: {name} holds an index outside 0..{bound - 1}")
        for name, values in (
            ("initial_shape", p),
            ("split_thresh", self.split_thresh),
            ("leaf_values", self.leaf_values),
            ("deltas", self.deltas),
        ):
            if not np.isfinite(values).all():
                raise ModelError(f"ertree: {name} holds non-finite values")


def encode_ertree(model: ErtreeModel) -> bytes:
    """The model as ``edgeid-ertree`` bytes; the same arrays always give the same bytes."""
    model.validate()
    arrays = [np.ascontiguousarray(getattr(model, name), dtype=dt) for name, dt in _ARRAYS]
    header: dict[str, Any] = {
        "format": ERTREE_FORMAT,
        "version": ERTREE_VERSION,
        "point_names": list(POINT_NAMES) if model.num_parts == len(POINT_NAMES) else [],
        "arrays": [
            {"name": name, "dtype": dt, "shape": list(a.shape)}
            for (name, dt), a in zip(_ARRAYS, arrays, strict=True)
        ],
    }
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(len(ERTREE_MAGIC) + _LENGTH.size + len(text)) % _ALIGN)
    body = b"".join([ERTREE_MAGIC, _LENGTH.pack(len(text)), text, *(a.tobytes() for a in arrays)])
    return body + hashlib.sha256(body).digest()


def decode_ertree(data: bytes, name: str = "ertree") -> ErtreeModel:
    """Parse and check ``edgeid-ertree`` bytes; any corruption raises ModelError."""
    fixed = len(ERTREE_MAGIC) + _LENGTH.size
    if len(data) < fixed + _DIGEST_BYTES or not data.startswith(ERTREE_MAGIC):
        raise ModelError(f"{name}: not an {ERTREE_FORMAT} file (bad magic or too short)")
    body, digest = data[:-_DIGEST_BYTES], data[-_DIGEST_BYTES:]
    if hashlib.sha256(body).digest() != digest:
        raise ModelError(f"{name}: checksum mismatch, the file is corrupt or was modified")
    (header_len,) = _LENGTH.unpack_from(body, len(ERTREE_MAGIC))
    if header_len > _MAX_HEADER_BYTES or fixed + header_len > len(body):
        raise ModelError(f"{name}: header length {header_len} is out of range")
    try:
        header = json.loads(body[fixed : fixed + header_len].decode("utf-8"))
        if header["format"] != ERTREE_FORMAT or header["version"] != ERTREE_VERSION:
            raise ModelError(
                f"{name}: {header['format']} v{header['version']} is not "
                f"{ERTREE_FORMAT} v{ERTREE_VERSION}; rebuild with `edgeid models build --force`"
            )
        specs = header["arrays"]
        if [(s["name"], s["dtype"]) for s in specs] != list(_ARRAYS):
            raise ModelError(f"{name}: unexpected array table in the header")
        shapes = [_shape(s["shape"]) for s in specs]
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise ModelError(f"{name}: unreadable header ({exc})") from exc
    offset = fixed + header_len
    arrays: dict[str, Any] = {}
    for (array_name, dtype), shape in zip(_ARRAYS, shapes, strict=True):
        count = math.prod(shape)  # Python ints: a corrupt shape cannot overflow
        nbytes = count * np.dtype(dtype).itemsize
        if offset + nbytes > len(body):
            raise ModelError(f"{name}: array {array_name} {shape} runs past the end of the file")
        native = np.dtype(dtype).newbyteorder("=")
        raw = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
        arrays[array_name] = raw.reshape(shape).astype(native)
        offset += nbytes
    if offset != len(body):
        raise ModelError(f"{name}: {len(body) - offset} unexpected bytes after the arrays")
    model = ErtreeModel(**arrays)
    model.validate()
    return model


def _shape(value: object) -> tuple[int, ...]:
    """An array shape from the header: a list of non-negative integers."""
    if not isinstance(value, list) or not all(type(d) is int and d >= 0 for d in value):
        raise ValueError(f"bad array shape {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class _Level:
    """One cascade level, laid out for gathers across all of its trees at once."""

    idx1: IndexArray  # (trees * splits,)
    idx2: IndexArray
    thresh: FloatArray  # (trees * splits,)
    leaves: FloatArray  # (trees * leaves, 2 * parts)
    anchor_xy: IndexArray  # (2, pixels): columns of each feature pixel's anchor x and y
    dx: FloatArray  # (pixels,) feature pixel offsets from their anchors
    dy: FloatArray


class ShapePredictor:
    """Predicts dlib's 5 landmarks inside a face box. Immutable after loading: thread-safe."""

    def __init__(self, model: ErtreeModel) -> None:
        model.validate()
        self._initial = np.ascontiguousarray(model.initial_shape, dtype=np.float32).reshape(-1)
        levels, trees, splits = model.split_idx1.shape
        self._trees = trees
        self._depth = model.tree_depth
        leaves = splits + 1
        if splits > _MAX_TABLE_SPLITS:
            raise ModelError(f"ertree: trees of depth {self._depth} are deeper than supported (4)")
        # Each tree's decisions are packed into one 8- or 16-bit code; padding splits (pixel 0
        # vs pixel 0, threshold +inf) never go left, so they leave the code's top bit clear.
        code_bits = 8 if splits < 8 else 16
        self._code_dtype = np.dtype(f"<u{code_bits // 8}")
        pad = ((0, 0), (0, code_bits - splits))
        self._levels = [
            _Level(
                idx1=np.pad(model.split_idx1[i], pad).reshape(-1).astype(np.intp),
                idx2=np.pad(model.split_idx2[i], pad).reshape(-1).astype(np.intp),
                thresh=np.pad(model.split_thresh[i], pad, constant_values=np.inf).reshape(-1),
                leaves=np.ascontiguousarray(model.leaf_values[i].reshape(trees * leaves, -1)),
                anchor_xy=np.stack([2 * model.anchor_idx[i], 2 * model.anchor_idx[i] + 1]).astype(
                    np.intp
                ),
                dx=np.ascontiguousarray(model.deltas[i, :, 0]),
                dy=np.ascontiguousarray(model.deltas[i, :, 1]),
            )
            for i in range(levels)
        ]
        # The similarity fit needs the mean shape centred; with it, a and b of the fitted
        # [[a, -b], [b, a]] are linear in the current shape's coordinates: shape @ fit.
        mean_shape = self._initial.reshape(-1, 2).astype(np.float64)
        centred = mean_shape - mean_shape.mean(axis=0)
        spread = float((centred**2).sum())
        fx, fy = centred[:, 0], centred[:, 1]
        self._fit = (
            np.stack([np.stack([fx, fy], 1).reshape(-1), np.stack([-fy, fx], 1).reshape(-1)], 1)
            / spread
        )
        # The leaf reached for every combination of a tree's split decisions: one lookup
        # replaces walking all trees level by level.
        self._leaf_table = _leaf_table(splits, code_bits)
        # Row of each tree's first leaf in the flattened per-level leaf array.
        self._tree_leaf_base = np.arange(trees, dtype=np.intp) * leaves
        logger.debug(
            "shape predictor: %d parts, %d levels x %d trees of depth %d",
            self.num_parts,
            levels,
            trees,
            self._depth,
        )

    @classmethod
    def load(cls, path: Path) -> ShapePredictor:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelError(f"cannot read landmark model {path} ({exc.strerror})") from exc
        return cls.from_bytes(data, name=str(path))

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "landmark model") -> ShapePredictor:
        return cls(decode_ertree(data, name))

    @property
    def num_parts(self) -> int:
        return int(self._initial.size // 2)

    def predict(self, image: RGBImage, box: Box, *, subpixel: bool = False) -> FloatArray:
        """Landmarks (parts, 2) as x, y image pixels, for the face in ``box``.

        The box maps to dlib's rectangle as left=x0, top=y0, right=x1-1, bottom=y1-1 (our x1/y1
        are exclusive, dlib's right/bottom inclusive). By default the points are rounded to whole
        pixels exactly as dlib's ``full_object_detection`` stores them, so chips cut from them
        match dlib's; ``subpixel=True`` returns the unrounded cascade output.
        """
        points: FloatArray = self.predict_many(image, [box], subpixel=subpixel)[0]
        return points

    def predict_many(
        self, image: RGBImage, boxes: Sequence[Box], *, subpixel: bool = False
    ) -> FloatArray:
        """Landmarks for several faces of one image at once, shape (faces, parts, 2)."""
        _check_image(image)
        if not boxes:
            return np.zeros((0, self.num_parts, 2), dtype=np.float32)
        rects = np.array([b.as_list() for b in boxes], dtype=np.float64)
        if not (np.abs(rects) <= _MAX_BOX_COORD).all():  # also refuses nan and inf
            raise BadInputError(f"landmarks: face box {rects.tolist()} is out of range")
        # dlib's unnormalizing transform maps (0,0) to the top-left and (1,1) to the
        # bottom-right pixel of the (inclusive) rectangle: (n, 2, 1) offsets and scales.
        origin = rects[:, 0:2, None]
        scale = rects[:, 2:4, None] - 1.0 - origin
        image_bytes = np.ascontiguousarray(image).reshape(-1)
        limits = np.array([[image.shape[1]], [image.shape[0]]], dtype=np.float64)
        shape = np.repeat(self._initial[None, :], len(boxes), axis=0)  # (n, 2 * parts)
        for level in self._levels:
            features = self._features(image_bytes, limits, level, shape, origin, scale)
            shape = self._run_forest(level, features, shape)
        points = origin + scale * shape.reshape(len(boxes), -1, 2).transpose(0, 2, 1)
        if not subpixel:
            points = np.floor(points + 0.5)
        result: FloatArray = points.transpose(0, 2, 1).astype(np.float32)
        return result

    def _features(
        self,
        image_bytes: RGBImage,
        limits: Float64Array,
        level: _Level,
        shape: FloatArray,
        origin: Float64Array,
        scale: Float64Array,
    ) -> FloatArray:
        """Grey levels (n, pixels) at this level's feature pixels, placed relative to ``shape``."""
        # Least-squares similarity (scaled rotation [[a, -b], [b, a]]) from the mean shape to
        # each current shape: the closed form of dlib's Umeyama/SVD fit. Both are float64 and
        # agree to a few ulps; the result is cast to float32 as dlib does.
        ab = np.einsum("nk,kj->nj", shape.astype(np.float64), self._fit).astype(np.float32)
        # float32 as dlib: tform * delta + anchor location, x and y stacked as (n, 2, pixels).
        col_dx = ab[:, :, None]  # (a, b)
        col_dy = (ab[:, ::-1] * _NEG_FIRST)[:, :, None]  # (-b, a)
        located = col_dx * level.dx + col_dy * level.dy + shape[:, level.anchor_xy]
        # Box-normalised -> image coordinates in float64, rounded to the nearest pixel as dlib's
        # vector -> point conversion does (floor(v + 0.5)); outside pixels read 0.
        pixel = np.floor(origin + scale * located + 0.5)
        inside = ((pixel >= 0) & (pixel < limits)).all(axis=1)
        red = np.where(inside, (pixel[:, 1] * limits[0] + pixel[:, 0]) * 3, 0).astype(np.intp)
        # dlib's rgb -> grey: the integer mean of the three channels.
        grey = np.take(image_bytes, red).astype(np.uint16)
        grey += np.take(image_bytes, red + 1)
        grey += np.take(image_bytes, red + 2)
        grey //= 3
        features: FloatArray = np.where(inside, grey, 0).astype(np.float32)
        return features

    def _run_forest(self, level: _Level, features: FloatArray, shape: FloatArray) -> FloatArray:
        """Shape after all trees of one level, every tree and face traversed together."""
        n = len(features)
        # Every split's decision up front (the differences of 0..255 values are exact in float32).
        go_left = (
            np.take(features, level.idx1, axis=1) - np.take(features, level.idx2, axis=1)
            > level.thresh
        )
        # Each tree's decisions packed into one integer (bit i = split i) index the leaf table.
        code = np.packbits(go_left.reshape(-1), bitorder="little").view(self._code_dtype)
        leaf = self._leaf_table[code.reshape(n, self._trees)]
        # dlib adds the trees' outputs to the shape one after another in float32. A reduction
        # along a non-contiguous axis runs in that order (numpy pairs terms up only along the
        # contiguous axis; tests pin this), so the rounding matches.
        terms = np.empty((n, self._trees + 1, shape.shape[1]), dtype=np.float32)
        terms[:, 0] = shape
        terms[:, 1:] = level.leaves[self._tree_leaf_base + leaf]
        result: FloatArray = np.add.reduce(terms, axis=1)
        return result


def _leaf_table(splits: int, code_bits: int) -> IndexArray:
    """Leaf index (0-based) reached for each decision code of a complete tree.

    Bit i set: split i goes left, to node 2i+1; clear: right, to 2i+2, as dlib walks its trees.
    Bits from ``splits`` up are padding and ignored.
    """
    codes = np.arange(1 << code_bits, dtype=np.int64)
    node = np.zeros_like(codes)
    while True:
        inner = node < splits
        if not inner.any():
            break
        go_left = (codes >> np.where(inner, node, 0)) & 1
        node = np.where(inner, 2 * node + 2 - go_left, node)
    table: IndexArray = (node - splits).astype(np.intp)
    return table


def _check_image(image: RGBImage) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
        raise BadInputError(
            f"landmarks: expected an RGB uint8 image (h, w, 3), got {image.dtype} {image.shape}"
        )
