"""A reader for dlib's portable serialization primitives (``dlib/serialize.h``).

Written from the format, not from dlib's code. Every read checks bounds and raises
``ModelError`` naming the byte offset and the section being read (set by the caller through
``DlibReader.section``), so a corrupt or truncated ``.dat`` fails with a message a person can act
on instead of an ``IndexError`` deep in numpy.

Formats handled:

* integers: one control byte (bit 7 = negative, low 4 bits = byte count 1..8) followed by the
  magnitude, little endian. Unsigned integers reject the sign bit.
* bool: the ASCII byte ``'1'`` or ``'0'``.
* floating point (``float_details``): an integer mantissa then an integer exponent, value
  ``mantissa * 2**exponent``; exponents 32000/32001 mean +inf/-inf, 32002 and above nan.
* ``std::string``: an unsigned length then the bytes.
* ``std::vector``: an ``unsigned long`` length (``read_length``) then the elements.
* runs of records made only of integers and floats (``read_records``): e.g. a shape predictor's
  regression trees, decoded in one vectorised pass rather than one value at a time.
* ``resizable_tensor`` (version 2): four shape integers then raw little-endian float32 values.
* ``alias_tensor`` (version 1): four shape integers, no data.
* ``dlib::matrix``: two (negated) dimension integers then one ``float_details`` per element.

A ``float_details`` is an ``int64`` mantissa and an ``int16`` exponent; deserializing it into a
``float`` computes ``ldexp((float)mantissa, exponent)`` in single precision, into a ``double`` in
double precision, and ``read_records`` does the same for its ``'f'`` and ``'d'`` fields.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edgeid.runtime.errors import ModelError

logger = logging.getLogger(__name__)

# Control-byte layout of dlib's integers: the sign flag and the byte-count field.
_SIGN_BIT = 0x80
_SIZE_MASK = 0x0F
# Bits 4..6 are never set by dlib's writer; the unsigned reader ignores them, the float reader
# uses them to tell its binary format from the pre-2013 ASCII one, which we refuse.
_RESERVED_BITS = 0x70
# dlib stores at most 8 magnitude bytes (int64).
_MAX_INT_BYTES = 8

# float_details' special exponents (dlib/float_details.h).
_EXP_INF = 32000
_EXP_NINF = 32001
_EXP_NAN = 32002

# Versions written by dlib for tensors and alias tensors (dlib/cuda/tensor.h).
_TENSOR_VERSION = 2
_ALIAS_TENSOR_VERSION = 1

# float_details' fields are an int64 mantissa and an int16 exponent (2 bytes at most).
_INT64_MAX = (1 << 63) - 1
_INT16_MAX = (1 << 15) - 1
_INT16_BYTES = 2

# Bytes one encoded integer can take: a control byte and up to 8 magnitude bytes.
_MAX_ENCODED_INT = 1 + _MAX_INT_BYTES
# Integers decoded per vectorised pass; bounds the index arrays to ~100 MB however big the run.
_INT_CHUNK = 1 << 21
# Exponents past this already over/underflow float64, and ldexp needs a bounded int.
_EXP_CLIP = 4000

# Refuse absurd lengths from a corrupt length field before allocating anything.
_MAX_STRING_BYTES = 1 << 20

# Field kinds of a ``read_records`` layout: signed / unsigned integer, float / double.
_RECORD_FIELDS = "iufd"
# What each integer of a record is, for the checks that depend on it.
_ROLE_SIGNED, _ROLE_UNSIGNED, _ROLE_MANTISSA, _ROLE_EXPONENT = range(4)

FloatArray = npt.NDArray[np.float32]
Int64Array = npt.NDArray[np.int64]
Float64Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class DlibRecords:
    """``count`` records of one layout (see ``DlibReader.read_records``), one row per record.

    ``ints`` holds the layout's ``'i'``/``'u'`` fields and ``floats`` its ``'f'``/``'d'`` fields,
    each kind in layout order; an ``'f'`` value is a float32 held exactly in float64. The offset
    arrays give the byte offset where each field starts, for error messages.
    """

    ints: Int64Array
    floats: Float64Array
    int_offsets: Int64Array
    float_offsets: Int64Array


@dataclass(frozen=True)
class _IntRun:
    """Consecutive integers located by ``DlibReader._scan_ints``; only framing is checked."""

    offsets: Int64Array  # byte offset of each control byte
    controls: npt.NDArray[np.uint8]
    magnitudes: npt.NDArray[np.uint64]
    end: int  # byte offset just past the last integer
    problem: tuple[int, str] | None  # (offset, message) of what ended the run early, if anything


class DlibReader:
    """A cursor over the bytes of a dlib-serialized object."""

    def __init__(self, data: bytes, source: str = "<bytes>", advice: str = "") -> None:
        """``advice``, if given, ends every error message (what a person should do about it)."""
        self._data = data
        self._view = memoryview(data)
        self.pos = 0
        self.source = source
        self.advice = advice
        self._sections: list[str] = []

    # -- error reporting -------------------------------------------------------------------

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Name what is being read, so errors say e.g. 'layer 7 (con)' as well as the offset."""
        self._sections.append(name)
        try:
            yield
        finally:
            self._sections.pop()

    def error(self, message: str, offset: int | None = None) -> ModelError:
        where = " / ".join(self._sections) if self._sections else "top level"
        at = self.pos if offset is None else offset
        tail = f"; {self.advice}" if self.advice else ""
        return ModelError(
            f"{self.source}: {message} at byte offset {at} (while reading {where}){tail}"
        )

    @property
    def remaining(self) -> int:
        return len(self._data) - self.pos

    def at_end(self) -> bool:
        return self.pos >= len(self._data)

    def _take(self, count: int, what: str) -> memoryview:
        if count < 0 or self.pos + count > len(self._data):
            raise self.error(
                f"file truncated: {what} needs {count} bytes but only {self.remaining} remain"
            )
        start = self.pos
        self.pos += count
        return self._view[start : self.pos]

    # -- integers and bools ----------------------------------------------------------------

    def _read_int_raw(self, what: str) -> tuple[int, bool]:
        start = self.pos
        control = self._take(1, what)[0]
        size = control & _SIZE_MASK
        if size == 0 or size > _MAX_INT_BYTES:
            raise self.error(f"bad integer control byte 0x{control:02x} for {what}", start)
        magnitude = int.from_bytes(self._take(size, what), "little")
        return magnitude, bool(control & _SIGN_BIT)

    def read_int(self, what: str = "integer") -> int:
        """A signed integer (int, long, int64 ...)."""
        magnitude, negative = self._read_int_raw(what)
        return -magnitude if negative else magnitude

    def read_uint(self, what: str = "unsigned integer") -> int:
        """An unsigned integer (unsigned long, size_t, uint8 ...); the sign flag is an error."""
        start = self.pos
        magnitude, negative = self._read_int_raw(what)
        if negative:
            raise self.error(f"negative value where {what} must be unsigned", start)
        return magnitude

    def read_length(self, what: str, limit: int) -> int:
        """A container size (``unsigned long``: std::vector, std::string ...), at most ``limit``
        so that a corrupt length fails here instead of allocating gigabytes."""
        start = self.pos
        size = self.read_uint(what)
        if size > limit:
            raise self.error(f"implausible {what} {size}", start)
        return size

    def read_byte(self, what: str = "byte") -> int:
        """A char / uint8_t: dlib writes these as one raw byte, not as an integer."""
        return int(self._take(1, what)[0])

    def read_bool(self, what: str = "bool") -> bool:
        start = self.pos
        byte = self._take(1, what)[0]
        if byte == ord("1"):
            return True
        if byte == ord("0"):
            return False
        raise self.error(f"bad bool byte 0x{byte:02x} for {what}", start)

    def expect_int(self, allowed: tuple[int, ...], what: str) -> int:
        """A version integer that must be one of ``allowed``."""
        start = self.pos
        value = self.read_int(what)
        if value not in allowed:
            raise self.error(f"unexpected {what} {value} (expected one of {list(allowed)})", start)
        return value

    # -- floats ----------------------------------------------------------------------------

    def read_float(self, what: str = "float") -> float:
        """One ``float_details`` value, returned as a Python float (float64)."""
        start = self.pos
        if self.at_end():
            raise self.error(f"file truncated: {what} missing")
        if self._data[self.pos] & _RESERVED_BITS:
            raise self.error(f"{what} uses dlib's obsolete ASCII float format", start)
        mantissa = self.read_int(what + " mantissa")
        exponent = self.read_int(what + " exponent")
        return _compose_float(mantissa, exponent)

    def read_float_array(self, count: int, what: str = "float array") -> Float64Array:
        """``count`` consecutive ``float_details`` values as doubles, decoded without a loop."""
        return self.read_records(count, "d", what).floats[:, 0]

    # -- runs of records -------------------------------------------------------------------

    def read_records(self, count: int, layout: str, what: str = "records") -> DlibRecords:
        """``count`` consecutive records whose fields are all integers and floats.

        ``layout`` spells one record, a character per field: ``'i'`` a signed integer, ``'u'``
        an unsigned one, ``'f'`` a ``float_details`` read into a float, ``'d'`` into a double.
        A ``std::vector<matrix<float,0,1>>`` element of n values is ``"ii" + "f" * n``, for
        instance. The whole run is decoded in vectorised passes; every value is checked as the
        scalar readers check it, and the first bad one (in file order) raises with its offset.
        """
        if not layout or set(layout) - set(_RECORD_FIELDS):
            raise ValueError(f"bad record layout {layout!r}")
        if count < 0:
            raise self.error(f"negative {what} count {count}")
        roles: list[int] = []
        for kind in layout:
            if kind in "fd":
                roles += [_ROLE_MANTISSA, _ROLE_EXPONENT]
            else:
                roles.append(_ROLE_SIGNED if kind == "i" else _ROLE_UNSIGNED)
        per_record = len(roles)
        role = np.array(roles, dtype=np.int8)
        values: list[Int64Array] = []
        offsets: list[Int64Array] = []
        done = 0
        while done < count:
            chunk = min(count - done, max(1, _INT_CHUNK // per_record))
            run = self._scan_ints(chunk * per_record, what, per_record, done, count)
            values.append(self._check_ints(run, np.tile(role, chunk), what).reshape(chunk, -1))
            offsets.append(run.offsets.reshape(chunk, -1))
            self.pos = run.end
            done += chunk
        empty = np.zeros((0, per_record), dtype=np.int64)
        ints = np.concatenate(values) if values else empty
        starts = np.concatenate(offsets) if offsets else empty

        int_cols = np.flatnonzero(role <= _ROLE_UNSIGNED)
        mantissa_cols = np.flatnonzero(role == _ROLE_MANTISSA)
        single = np.array([kind == "f" for kind in layout if kind in "fd"], dtype=bool)
        floats = np.empty((count, mantissa_cols.size), dtype=np.float64)
        for mask, dtype in ((single, np.float32), (~single, np.float64)):
            cols = mantissa_cols[mask]
            floats[:, mask] = _compose_floats(ints[:, cols], ints[:, cols + 1], dtype)
        return DlibRecords(
            ints=ints[:, int_cols],
            floats=floats,
            int_offsets=starts[:, int_cols],
            float_offsets=starts[:, mantissa_cols],
        )

    def _check_ints(self, run: _IntRun, role: npt.NDArray[np.int8], what: str) -> Int64Array:
        """The run's signed values, after the checks their roles call for. The first failure in
        file order raises: a value check, or else the framing problem that ended the run."""
        controls, magnitudes = run.controls, run.magnitudes
        role = role[: magnitudes.size]
        negative = (controls & _SIGN_BIT) != 0
        is_exponent = role == _ROLE_EXPONENT
        problems = (
            # dlib's float reader takes these bits in a mantissa for its obsolete ASCII format.
            ((role == _ROLE_MANTISSA) & ((controls & _RESERVED_BITS) != 0), "bad float encoding"),
            ((role == _ROLE_UNSIGNED) & negative, "negative value where unsigned expected"),
            (~is_exponent & (magnitudes > np.uint64(_INT64_MAX)), "integer out of int64 range"),
            (
                is_exponent
                & (((controls & _SIZE_MASK) > _INT16_BYTES) | (magnitudes > np.uint64(_INT16_MAX))),
                "float exponent out of int16 range",
            ),
        )
        first: tuple[int, str] | None = None
        for bad, message in problems:
            if bad.any():
                index = int(np.argmax(bad))
                if first is None or index < first[0]:
                    first = (index, message)
        if first is not None:
            index, message = first
            raise self.error(
                f"{message} (control byte 0x{int(controls[index]):02x}) in {what}",
                int(run.offsets[index]),
            )
        if run.problem is not None:
            offset, message = run.problem
            raise self.error(message, offset)
        signed = magnitudes.astype(np.int64)
        np.negative(signed, out=signed, where=negative)
        return signed

    def _scan_ints(
        self, count: int, what: str, per_item: int, item_base: int, items: int
    ) -> _IntRun:
        """Locate and decode ``count`` integers at the cursor, without moving it.

        Each integer's length is in its control byte, so where integer i starts depends on every
        integer before it. We find all the starts at once by pointer doubling: for each byte b,
        ``jump[b]`` is where the following integer would start if b were a control byte;
        squaring ``jump`` doubles how far it reaches, so extending the known chain of starts by
        2**k per step takes log2(count) numpy gathers instead of a Python loop over millions of
        integers. A bad control byte or the end of the data stops the run early and is recorded
        as its ``problem``. ``per_item``, ``item_base`` and ``items`` only number records in
        messages.
        """
        start = self.pos
        window = np.frombuffer(
            self._data,
            dtype=np.uint8,
            count=min(len(self._data), start + _MAX_ENCODED_INT * count) - start,
            offset=start,
        )
        length = window.size
        # Index ``length`` is a sentinel meaning "ran off the end"; it maps to itself.
        jump = np.arange(1, length + 2, dtype=np.int32)
        jump[:length] += window & _SIZE_MASK
        np.minimum(jump, length, out=jump)
        positions = np.zeros(1, dtype=np.int32)
        while positions.size < count:
            positions = np.concatenate([positions, jump[positions]])
            if positions.size < count:
                jump = jump[jump]
        del jump
        positions = positions[:count]
        # Starts increase until the first one that runs off the end, then stay at the sentinel.
        found = int(np.searchsorted(positions, length))
        controls = window[positions[:found]]
        sizes = controls & _SIZE_MASK
        bad = (sizes == 0) | (sizes > _MAX_INT_BYTES)
        problem: tuple[int, str] | None = None
        usable = count
        if bad.any():
            usable = int(np.argmax(bad))
            message = f"bad integer control byte 0x{int(controls[usable]):02x} in {what}"
            problem = (start + int(positions[usable]), message)
        else:
            cut_short = bool(found) and int(positions[found - 1]) + 1 + int(sizes[-1]) > length
            if found < count or cut_short:
                # The first integer that does not fit: the last one found if it is cut short.
                usable = found - 1 if cut_short else found
                offset = start + (int(positions[usable]) if cut_short else length)
                item = item_base + usable // per_item
                problem = (offset, f"file truncated inside {what} (item {item + 1} of {items})")
        positions, controls, sizes = positions[:usable], controls[:usable], sizes[:usable]
        end = int(positions[-1]) + 1 + int(sizes[-1]) if usable else 0
        padded = np.concatenate([window[:end], np.zeros(_MAX_INT_BYTES, dtype=np.uint8)])
        magnitudes = np.zeros(usable, dtype=np.uint64)
        for i in range(_MAX_INT_BYTES):
            byte = padded[positions + 1 + i].astype(np.uint64)
            byte[sizes <= i] = 0
            magnitudes |= byte << np.uint64(8 * i)
        offsets = start + positions.astype(np.int64)
        return _IntRun(offsets, controls, magnitudes, start + end, problem)

    # -- strings ---------------------------------------------------------------------------

    def read_string(self, what: str = "string") -> str:
        start = self.pos
        size = self.read_length(what + " length", _MAX_STRING_BYTES)
        raw = bytes(self._take(size, what))
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.error(f"{what} is not ASCII: {raw[:32]!r}", start) from None

    def expect_string(self, allowed: tuple[str, ...], what: str) -> str:
        """A version tag that must be one of ``allowed`` (dlib's per-type version strings)."""
        start = self.pos
        value = self.read_string(what)
        if value not in allowed:
            raise self.error(
                f"unexpected {what} {value!r} (expected one of {list(allowed)})", start
            )
        return value

    def peek_string(self) -> str | None:
        """The string at the cursor if one plausibly starts here, without consuming it."""
        saved = self.pos
        try:
            return self.read_string()
        except ModelError:
            return None
        finally:
            self.pos = saved

    # -- tensors and matrices --------------------------------------------------------------

    def read_tensor(self, what: str = "tensor") -> FloatArray:
        """A ``resizable_tensor``: returns a float32 array of shape (num_samples, k, nr, nc)."""
        self.expect_int((_TENSOR_VERSION,), what + " version")
        shape = tuple(self.read_int(what + " dimension") for _ in range(4))
        if any(d < 0 for d in shape):
            raise self.error(f"negative {what} shape {shape}")
        count = int(np.prod(shape, dtype=np.int64))
        raw = self._take(4 * count, f"{what} data ({count} floats)")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)

    def read_alias_tensor(self, what: str = "alias tensor") -> tuple[int, int, int, int]:
        """An ``alias_tensor``: only the shape of a view into a layer's parameter tensor."""
        self.expect_int((_ALIAS_TENSOR_VERSION,), what + " version")
        n, k, nr, nc = (self.read_int(what + " dimension") for _ in range(4))
        if min(n, k, nr, nc) < 0:
            raise self.error(f"negative {what} shape {(n, k, nr, nc)}")
        return n, k, nr, nc

    def read_matrix(self, what: str = "matrix") -> npt.NDArray[np.float64]:
        """A floating-point ``dlib::matrix`` (float or double elements); returns float64."""
        nr = abs(self.read_int(what + " rows"))
        nc = abs(self.read_int(what + " columns"))
        return self.read_float_array(nr * nc, what).reshape(nr, nc)


def _compose_floats(
    mantissa: Int64Array, exponent: Int64Array, dtype: npt.DTypeLike
) -> Float64Array:
    """``ldexp((T)mantissa, exponent)`` computed in ``dtype`` as dlib's deserializer does, then
    widened (exactly) to float64; exponents from 32000 on are dlib's inf/-inf/nan markers."""
    with np.errstate(over="ignore"):
        values = np.ldexp(
            mantissa.astype(dtype), np.clip(exponent, -_EXP_CLIP, _EXP_CLIP).astype(np.int32)
        )
    result: Float64Array = values.astype(np.float64)
    result[exponent == _EXP_INF] = np.inf
    result[exponent == _EXP_NINF] = -np.inf
    result[exponent >= _EXP_NAN] = np.nan
    return result


def _compose_float(mantissa: int, exponent: int) -> float:
    if exponent == _EXP_INF:
        return float("inf")
    if exponent == _EXP_NINF:
        return float("-inf")
    if exponent >= _EXP_NAN:
        return float("nan")
    try:
        return float(np.ldexp(float(mantissa), exponent))
    except OverflowError:
        return float("inf") if mantissa > 0 else float("-inf")
