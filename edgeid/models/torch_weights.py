"""Read a PyTorch ``state_dict`` file into numpy arrays without importing torch.

A ``.pt`` file is a pickle, and unpickling runs whatever callables the pickle names. We use a
restricted ``pickle.Unpickler`` whose ``find_class`` resolves only the handful of globals a
``state_dict`` needs (``collections.OrderedDict``, torch's tensor-rebuild functions and the typed
storage classes, the last two mapped to our own stand-ins); any other global raises
``ModelError`` before anything is called. Storages come in through ``persistent_load`` and end up
as numpy arrays.

Two container formats exist, both handled:

* zip (torch >= 1.6): ``<archive>/data.pkl`` plus one raw little-endian file per storage,
  ``<archive>/data/<key>``.
* legacy (torch < 1.6; facenet-pytorch's MTCNN weights): five pickles in a row (magic number,
  protocol version, system info, the object, the list of storage keys), then for each key an
  int64 element count followed by the storage's raw bytes.
"""

from __future__ import annotations

import io
import logging
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeid.runtime.errors import ModelError

logger = logging.getLogger(__name__)

# torch.serialization's constants for the legacy format.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# Bytes of a zip local-file header; torch >= 1.6 files start with it.
_ZIP_MAGIC = b"PK\x03\x04"
# Refuse absurd storages from a corrupt count before allocating (4 GiB of float32 is far beyond
# any model we convert).
_MAX_STORAGE_ELEMENTS = 1 << 30

# Typed storage classes torch pickles by name, and the numpy dtype of their raw bytes (little
# endian, the only byte order we accept). BFloat16 has no numpy dtype, so it is refused.
_STORAGE_DTYPES: dict[str, np.dtype[Any]] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` & co.: only names a dtype, cannot be called."""

    name: str
    dtype: np.dtype[Any]


@dataclass(frozen=True)
class _StorageRef:
    """A storage named by the pickle; its bytes are read after unpickling (legacy format)."""

    key: str
    dtype: np.dtype[Any]
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    """A tensor view into a storage, materialised once all storages are read."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _as_int_tuple(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ModelError(f"torch weights: tensor {what} is not a tuple of non-negative ints")
    return value


def _rebuild_tensor(
    storage: object, storage_offset: object, size: object, stride: object, *_ignored: object
) -> _TensorRef:
    """Our ``torch._utils._rebuild_tensor(_v2)``: requires_grad, hooks and metadata are moot."""
    if not isinstance(storage, _StorageRef):
        raise ModelError("torch weights: tensor rebuilt from something that is not a storage")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise ModelError("torch weights: tensor storage offset is not a non-negative int")
    shape = _as_int_tuple(size, "size")
    strides = _as_int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise ModelError("torch weights: tensor size and stride differ in length")
    return _TensorRef(storage, storage_offset, shape, strides)


# The complete allow-list: (module, name) -> what the pickle gets instead.
_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals; storages become ``_StorageRef``."""

    def __init__(self, file: io.BytesIO, storages: dict[str, _StorageRef]) -> None:
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ModelError(
                f"torch weights: refusing to unpickle global {module}.{name} "
                "(not a plain state_dict; the file may be hostile)"
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        # Zip format: ('storage', type, key, location, numel); legacy adds view_metadata (None).
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
            raise ModelError(f"torch weights: unsupported persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        if len(pid) == 6 and pid[5] is not None:
            raise ModelError("torch weights: storage views (torch < 0.4 files) are not supported")
        if not isinstance(storage_type, _StorageType):
            raise ModelError(f"torch weights: storage type {storage_type!r:.80} is not supported")
        if not isinstance(key, str) or not isinstance(numel, int):
            raise ModelError("torch weights: malformed storage key or element count")
        if not 0 <= numel <= _MAX_STORAGE_ELEMENTS:
            raise ModelError(f"torch weights: storage {key} claims {numel} elements")
        ref = _StorageRef(key, storage_type.dtype, numel)
        known = self._storages.setdefault(key, ref)
        if known != ref:
            raise ModelError(f"torch weights: storage {key} is declared twice, differently")
        return known


def _unpickle(data: io.BytesIO, storages: dict[str, _StorageRef]) -> Any:
    try:
        return _RestrictedUnpickler(data, storages).load()
    except ModelError:
        raise
    except Exception as exc:  # a corrupt pickle raises anything from EOFError to TypeError
        raise ModelError(f"torch weights: unreadable pickle ({type(exc).__name__}: {exc})") from exc


def _storage_array(ref: _StorageRef, raw: bytes) -> npt.NDArray[Any]:
    if len(raw) != ref.numel * ref.dtype.itemsize:
        raise ModelError(
            f"torch weights: storage {ref.key} has {len(raw)} bytes, "
            f"expected {ref.numel} x {ref.dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=ref.dtype)


def _materialise(tensor: _TensorRef, arrays: dict[str, npt.NDArray[Any]]) -> npt.NDArray[Any]:
    buffer = arrays[tensor.storage.key]
    if 0 in tensor.shape:
        return np.zeros(tensor.shape, dtype=buffer.dtype)
    extent = zip(tensor.shape, tensor.stride, strict=True)
    last = tensor.offset + sum((n - 1) * s for n, s in extent)
    if last >= buffer.size:
        raise ModelError(
            f"torch weights: tensor view reaches element {last} of storage {tensor.storage.key}"
            f" which has {buffer.size}"
        )
    view = np.lib.stride_tricks.as_strided(
        buffer[tensor.offset :],
        shape=tensor.shape,
        strides=tuple(s * buffer.itemsize for s in tensor.stride),
        writeable=False,
    )
    # Native byte order and an owned, contiguous copy: the caller may keep it past the file.
    return np.ascontiguousarray(view, dtype=buffer.dtype.newbyteorder("="))


def _as_state_dict(obj: object, arrays: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
    if not isinstance(obj, dict):
        raise ModelError(f"torch weights: top-level object is a {type(obj).__name__}, not a dict")
    state: dict[str, npt.NDArray[Any]] = {}
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, _TensorRef):
            raise ModelError(f"torch weights: entry {name!r:.60} is not a named tensor")
        state[name] = _materialise(value, arrays)
    return state


def _load_zip(data: bytes) -> dict[str, npt.NDArray[Any]]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except zipfile.BadZipFile as exc:
        raise ModelError(f"torch weights: corrupt zip container ({exc})") from exc
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise ModelError("torch weights: zip container has no single <archive>/data.pkl")
    prefix = pickles[0].removesuffix("data.pkl")
    byteorder = prefix + "byteorder"
    if byteorder in names and archive.read(byteorder).strip() != b"little":
        raise ModelError("torch weights: big-endian files are not supported")
    storages: dict[str, _StorageRef] = {}
    obj = _unpickle(io.BytesIO(archive.read(pickles[0])), storages)
    arrays: dict[str, npt.NDArray[Any]] = {}
    for key, ref in storages.items():
        try:
            raw = archive.read(f"{prefix}data/{key}")
        except KeyError:
            raise ModelError(f"torch weights: storage data/{key} missing from the zip") from None
        arrays[key] = _storage_array(ref, raw)
    return _as_state_dict(obj, arrays)


def _load_legacy(data: bytes) -> dict[str, npt.NDArray[Any]]:
    stream = io.BytesIO(data)
    storages: dict[str, _StorageRef] = {}
    if _unpickle(stream, storages) != _LEGACY_MAGIC:
        raise ModelError("torch weights: not a torch file (bad magic number)")
    if _unpickle(stream, storages) != _LEGACY_PROTOCOL:
        raise ModelError("torch weights: unsupported legacy protocol version")
    sys_info = _unpickle(stream, storages)
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise ModelError("torch weights: big-endian or malformed legacy file")
    obj = _unpickle(stream, storages)
    keys = _unpickle(stream, storages)
    if not isinstance(keys, list) or sorted(keys) != sorted(storages):
        raise ModelError("torch weights: storage key list does not match the pickled tensors")
    arrays: dict[str, npt.NDArray[Any]] = {}
    for key in keys:
        ref = storages[key]
        header = stream.read(8)
        if len(header) != 8:
            raise ModelError(f"torch weights: truncated before storage {key}")
        (numel,) = struct.unpack("<q", header)
        if numel != ref.numel:
            raise ModelError(
                f"torch weights: storage {key} has {numel} elements, pickle says {ref.numel}"
            )
        arrays[key] = _storage_array(ref, stream.read(numel * ref.dtype.itemsize))
    if stream.read(1):
        raise ModelError("torch weights: trailing bytes after the last storage")
    return _as_state_dict(obj, arrays)


def load_state_dict(data: bytes) -> dict[str, npt.NDArray[Any]]:
    """Parse the bytes of a torch ``state_dict`` file (zip or legacy) into named numpy arrays.

    Raises ``ModelError`` for anything that is not a plain state_dict of CPU-representable
    tensors, including pickles that name any callable outside the allow-list.
    """
    loader: Callable[[bytes], dict[str, npt.NDArray[Any]]]
    loader = _load_zip if data.startswith(_ZIP_MAGIC) else _load_legacy
    state = loader(data)
    logger.debug("read %d tensors from a torch state_dict", len(state))
    return state


def load_state_dict_file(path: Path) -> dict[str, npt.NDArray[Any]]:
    """``load_state_dict`` on a file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"torch weights: cannot read {path}: {exc.strerror}") from exc
    return load_state_dict(data)
