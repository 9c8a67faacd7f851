"""hnswlib's in-memory state as flat arrays: how a sealed index is written and loaded (format 2).

hnswlib's own ``load_index`` reads a file: the plaintext had to be copied into a memfd first,
and the loader then walks every element with a seek and a size check before reading it again.
At 1M faces that open took 4.5-7.8 s, against 1.6-2.2 s from the state below
(``benchmarks/index_open_steps.py``). hnswlib's pickling
state (``Index.__getstate__`` / ``__setstate__``) holds the same graph as five arrays and a few
numbers; ``__setstate__`` copies the arrays into a new index once, from buffers it is handed.
Here those buffers are views into the authenticated plaintext, so the graph is copied once,
with no file and no per-element reads.

The arrays are checked against the numbers before hnswlib sees them (sizes, levels, the label
map's ids): hnswlib copies by those numbers without checking, so an inconsistent state would
read past a buffer. The neighbour lists inside the graph are not walked: the plaintext has
already passed AES-GCM, so only a bug of ours could make them wrong.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import hnswlib
import numpy as np
import numpy.typing as npt

# The state's arrays in the order they are written, with the dtype hnswlib gives each.
ARRAYS: tuple[tuple[str, type[np.generic]], ...] = (
    ("label_lookup_external", np.uint64),
    ("label_lookup_internal", np.uint32),
    ("element_levels", np.int32),
    ("link_lists", np.int8),
    ("data_level0", np.int8),
)
# Each array starts at a multiple of this (its widest element), so views need no copy.
ALIGNMENT = 8
# hnswlib's state version this reader knows (``ser_version``).
SERIALISATION_VERSION = 1
_ARRAY_NAMES = frozenset(name for name, _ in ARRAYS)
_SCALAR_TYPES = (bool, int, float, str)


class StateError(ValueError):
    """The numbers and arrays of a persisted state do not describe one consistent graph."""


def aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def extent(lengths: list[int]) -> int:
    """Bytes that arrays of these lengths take when laid out from an aligned offset."""
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in lengths):
        raise StateError("the array lengths are malformed")
    return _placed(lengths)[1]


def _placed(lengths: list[int]) -> tuple[list[int], int]:
    """Where arrays of these lengths begin when laid out from an aligned offset (each padded
    to the next multiple of ``ALIGNMENT``), and where the last one ends."""
    starts: list[int] = []
    end = 0
    for length in lengths:
        starts.append(aligned(end))
        end = starts[-1] + length
    return starts, end


def export(hnsw: Any) -> tuple[dict[str, Any], list[npt.NDArray[Any]]]:
    """The index's numbers (JSON-ready) and its arrays in ``ARRAYS`` order."""
    (state,) = hnsw.__getstate__()
    scalars = {k: v for k, v in state.items() if k not in _ARRAY_NAMES}
    if not all(isinstance(v, _SCALAR_TYPES) for v in scalars.values()):
        raise StateError("hnswlib's state holds a value that is not a number or a string")
    arrays = [np.ascontiguousarray(state[name], dtype=dtype) for name, dtype in ARRAYS]
    return scalars, arrays


def layout(arrays: list[npt.NDArray[Any]], start: int) -> list[bytes | memoryview]:
    """The array section as byte runs to follow ``start`` bytes of plaintext: each array,
    the first included, padded to begin at a multiple of ``ALIGNMENT``."""
    runs: list[bytes | memoryview] = []
    offset = start
    for array in arrays:
        pad = aligned(offset) - offset
        if pad:
            runs.append(b"\x00" * pad)
        runs.append(array.view(np.uint8).data)
        offset += pad + array.nbytes
    return runs


def restore(
    scalars: Mapping[str, Any], lengths: list[int], section: memoryview, *, space: str, dim: int
) -> Any:
    """A new hnswlib index from a state written by ``export``/``layout``; ``StateError`` when
    the numbers and the arrays disagree."""
    arrays = _views(lengths, section)
    _check(scalars, arrays, space=space, dim=dim)
    hnsw = hnswlib.Index.__new__(hnswlib.Index)  # what pickle does before __setstate__
    try:
        hnsw.__setstate__(({**scalars, **arrays},))
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise StateError(f"hnswlib refused the state: {exc}") from exc
    # The state carries the writing machine's thread count; use this one's, as hnswlib's own
    # constructor does (the index may have been restored from another box's backup).
    hnsw.set_num_threads(os.cpu_count() or 1)
    return hnsw


def _views(lengths: list[int], section: memoryview) -> dict[str, npt.NDArray[Any]]:
    if len(lengths) != len(ARRAYS) or not all(isinstance(n, int) and n >= 0 for n in lengths):
        raise StateError("the array lengths are malformed")
    starts, end = _placed(lengths)
    arrays: dict[str, npt.NDArray[Any]] = {}
    for (name, dtype), length, start in zip(ARRAYS, lengths, starts, strict=True):
        size = np.dtype(dtype).itemsize
        if length % size or start + length > len(section):
            raise StateError(f"{name} runs past the index or splits an element")
        array = np.frombuffer(section, dtype=dtype, count=length // size, offset=start)
        # A plaintext buffer that is not itself 8-aligned: copy the (small) wide arrays.
        arrays[name] = array if array.flags.aligned else array.copy()
    if end != len(section):
        raise StateError("bytes follow the last array")
    return arrays


def _check(
    scalars: Mapping[str, Any], arrays: Mapping[str, npt.NDArray[Any]], *, space: str, dim: int
) -> None:
    def number(key: str) -> int:
        value = scalars.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise StateError(f"{key} is missing or not a count")
        return value

    if scalars.get("ser_version") != SERIALISATION_VERSION:
        raise StateError(f"hnswlib state version {scalars.get('ser_version')!r} is unknown")
    if scalars.get("space") != space or scalars.get("dim") != dim:
        raise StateError(f"the state is not a {space} index of dimension {dim}")
    if scalars.get("index_inited") is not True or scalars.get("allow_replace_deleted") is not False:
        raise StateError("the state is not an initialised index without slot reuse")
    count, capacity = number("cur_element_count"), number("max_elements")
    per_element = number("size_data_per_element")
    links_per_element = number("size_links_per_element")
    levels = arrays["element_levels"]
    if count > capacity or len(levels) != capacity:
        raise StateError("element count, capacity and levels disagree")
    labels, internal = arrays["label_lookup_external"], arrays["label_lookup_internal"]
    if len(labels) != count or len(internal) != count:
        raise StateError("the label map does not hold one entry an element")
    if len(arrays["data_level0"]) != count * per_element:
        raise StateError("level 0 is not one record an element")
    top = scalars.get("max_level")  # -1 until the first element
    if not isinstance(top, int) or isinstance(top, bool) or top < (0 if count else -1):
        raise StateError("max_level is missing or out of range")
    if len(levels) and (int(levels.min()) < 0 or int(levels.max()) > max(top, 0)):
        raise StateError("an element's level is out of range")
    if levels[count:].any():
        raise StateError("an unused slot has upper levels")
    if len(arrays["link_lists"]) != links_per_element * int(levels.sum(dtype=np.int64)):
        raise StateError("the upper-level links do not match the levels")
    if count and (int(internal.max()) >= count or number("enterpoint_node") >= count):
        raise StateError("an internal id is out of range")
