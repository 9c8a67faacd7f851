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
  ``mantissa * 2**exponent``; exponents 32000/32001/32002 mean +inf/-inf/nan.
* ``std::string``: an unsigned length then the bytes.
* ``resizable_tensor`` (version 2): four shape integers then raw little-endian float32 values.
* ``alias_tensor`` (version 1): four shape integers, no data.
* ``dlib::matrix``: two (negated) dimension integers then one ``float_details`` per element.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import numpy.typing as npt

from runtime.errors import ModelError

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

# Bytes one encoded integer can take: a control byte and up to 8 magnitude bytes.
_MAX_ENCODED_INT = 1 + _MAX_INT_BYTES
# Values decoded per vectorised pass; bounds the index arrays to ~100 MB however big the matrix.
_FLOAT_CHUNK = 1 << 20
# Exponents past this already over/underflow float64, and ldexp needs a bounded int.
_EXP_CLIP = 4000

# Refuse absurd lengths from a corrupt length field before allocating anything.
_MAX_STRING_BYTES = 1 << 20

FloatArray = npt.NDArray[np.float32]


class DlibReader:
    """A cursor over the bytes of a dlib-serialized object."""

    def __init__(self, data: bytes, source: str = "<bytes>") -> None:
        self._data = data
        self._view = memoryview(data)
        self.pos = 0
        self.source = source
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
        return ModelError(f"{self.source}: {message} at byte offset {at} (while reading {where})")

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

    def read_float_array(self, count: int, what: str = "float array") -> npt.NDArray[np.float64]:
        """``count`` consecutive ``float_details`` values, decoded without a per-value loop."""
        parts: list[npt.NDArray[np.float64]] = []
        done = 0
        while done < count:
            chunk = min(count - done, _FLOAT_CHUNK)
            parts.append(self._read_float_chunk(chunk, what))
            done += chunk
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)

    def _read_float_chunk(self, count: int, what: str) -> npt.NDArray[np.float64]:
        """Each value is two variable-length integers, so the position of value i depends on
        every value before it. We find all control-byte positions at once by pointer doubling:
        for each byte b, ``jump[b]`` is where the following integer would start if b were a
        control byte; squaring ``jump`` doubles how far it reaches, so extending the known chain
        of positions by 2**k per step takes log2(2*count) numpy gathers instead of a Python loop
        over millions of integers.
        """
        start = self.pos
        n_ints = 2 * count
        window = np.frombuffer(
            self._data,
            dtype=np.uint8,
            count=min(len(self._data), start + _MAX_ENCODED_INT * n_ints) - start,
            offset=start,
        )
        length = window.size
        # Index ``length`` is a sentinel meaning "ran off the end"; it maps to itself.
        jump = np.arange(1, length + 2, dtype=np.int32)
        jump[:length] += window & _SIZE_MASK
        np.minimum(jump, length, out=jump)
        positions = np.zeros(1, dtype=np.int32)
        while positions.size < n_ints:
            positions = np.concatenate([positions, jump[positions]])
            if positions.size < n_ints:
                jump = jump[jump]
        del jump
        positions = positions[:n_ints]
        if positions[-1] >= length:
            raise self.error(f"file truncated inside {what} ({count} values)")
        controls = window[positions]
        sizes = controls & _SIZE_MASK
        bad = (sizes == 0) | (sizes > _MAX_INT_BYTES) | ((controls & _RESERVED_BITS) != 0)
        if bad.any():
            first = int(np.argmax(bad))
            raise self.error(f"bad integer control byte in {what}", start + int(positions[first]))
        end = int(positions[-1]) + 1 + int(sizes[-1])
        if end > length:
            raise self.error(f"file truncated inside {what} ({count} values)")
        padded = np.concatenate([window[:end], np.zeros(_MAX_INT_BYTES, dtype=np.uint8)])
        magnitude = np.zeros(n_ints, dtype=np.uint64)
        for i in range(_MAX_INT_BYTES):
            byte = padded[positions + 1 + i].astype(np.uint64)
            byte[sizes <= i] = 0
            magnitude |= byte << np.uint64(8 * i)
        # Mantissas are int64 and so exact in float64 when they came from a float or double.
        value = magnitude.astype(np.float64)
        value[(controls & _SIGN_BIT) != 0] *= -1.0
        mantissa, exponent = value[0::2], value[1::2]
        with np.errstate(over="ignore"):
            result = np.ldexp(mantissa, np.clip(exponent, -_EXP_CLIP, _EXP_CLIP).astype(np.int32))
        result[exponent == _EXP_INF] = np.inf
        result[exponent == _EXP_NINF] = -np.inf
        result[exponent == _EXP_NAN] = np.nan
        self.pos = start + end
        return result

    # -- strings ---------------------------------------------------------------------------

    def read_string(self, what: str = "string") -> str:
        start = self.pos
        size = self.read_uint(what + " length")
        if size > _MAX_STRING_BYTES:
            raise self.error(f"implausible {what} length {size}", start)
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


def _compose_float(mantissa: int, exponent: int) -> float:
    if exponent == _EXP_INF:
        return float("inf")
    if exponent == _EXP_NINF:
        return float("-inf")
    if exponent == _EXP_NAN:
        return float("nan")
    try:
        return float(np.ldexp(float(mantissa), exponent))
    except OverflowError:
        return float("inf") if mantissa > 0 else float("-inf")
