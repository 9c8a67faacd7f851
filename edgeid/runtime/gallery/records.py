"""What a gallery holds: subjects and faces, their validation, and their sealed payloads.

A record's plaintext is a length-prefixed JSON head and a binary tail (the float32 embedding
of a face, the JPEG of a thumbnail); it exists only in memory and is sealed before any write.

A batch (written by compaction) holds whole subjects with all their faces as columns, in two
plaintexts: its columns and its embeddings. The columns plaintext is a length-prefixed JSON
head ``{"format", "subjects": S, "faces": F, "text": T, "models": [...]}`` padded with spaces
to a multiple of 16 bytes, then these little-endian arrays, each padded to 16 bytes:

    subject_id (S,16) u1       subject_enrolled (S) i8    subject_utc_offset (S) i8
    subject_retention (S) i4   subject_faces (S) u4       subject_text_end (S,4) u8
    face_id (F,16) u1          face_source (F,32) u1      face_quality (F) f8
    face_model (F) u4          face_enrolled (F) i8       face_utc_offset (F) i8
    face_thumb_size (F) u4     face_dim (F) u4            text (T) u1

Subjects come in order and each is followed (in the face columns) by its ``subject_faces``
faces. Times are wall-clock microseconds since 1970-01-01 and the UTC offset in microseconds
(``NAIVE_OFFSET`` for none), so they come back exactly as given; a retention date is its
proleptic ordinal, 0 for none; ``face_model`` indexes the head's ``models``; ``text`` holds
each subject's display name, notes, legal basis and enrolling officer (UTF-8), ending where
``subject_text_end`` says; ``face_thumb_size`` is the size of each face's thumbnail frame,
the frames lying back to back in the thumbnail log. Every member of a batch has version 1.
The embeddings plaintext is every face's float32 values, in face order, and nothing else.

Optional columns follow ``text`` when the head lists them in ``"extra"`` (in this order), so a
batch written before they existed (no ``"extra"``) reads as before and one whose faces use
none of them is written byte for byte as before:

    face_age (F) i2     a face's age at capture in whole years, -1 for not given
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgeid.runtime.gallery.errors import (
    CorruptGalleryError,
    GalleryNotFoundError,
    InvalidRecordError,
)
from edgeid.runtime.vault.crypto import RecordKind, record_aad

MAX_TEXT_CHARS = 20_000  # notes longer than a few pages are a paste error, not a note
MAX_NAME_CHARS = 200  # a display name is a name, not a note: the web form's limit, for every door
# A name never holds a line break, escape or other control character: it would forge lines
# or rewrite the screen wherever it is printed.
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_EMBEDDING_DIM = 4096  # larger than any face embedder we ship or expect
MAX_THUMBNAIL_BYTES = 1 << 20  # an aligned chip is a few KB; a megabyte is not a thumbnail
MAX_AGE_YEARS = 130  # an age at capture above this is a typo (a year of birth, say)
JPEG_MAGIC = b"\xff\xd8\xff"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
ID_HEX = re.compile(r"[0-9a-f]{32}")

Embedding = NDArray[np.float32]


# -- what callers give and get ---------------------------------------------------------------


@dataclass(frozen=True)
class NewSubject:
    """A person to enrol. ``legal_basis`` names the law, warrant or case that allows holding it."""

    display_name: str
    legal_basis: str
    enrolled_by: str
    notes: str = ""
    retention_until: date | None = None


@dataclass(frozen=True, eq=False)
class NewFace:
    """One face of a subject: its embedding and the aligned chip it came from (JPEG)."""

    embedding: NDArray[Any]
    quality: float
    model_id: str
    source_sha256: str
    thumbnail_jpeg: bytes
    # The subject's age when the photo was taken, in whole years, if known: a child enrolled
    # across ages is found far more often (see the README), and the reviewer needs to know
    # which age a match came from.
    age_at_capture: int | None = None


# Stands for every subject of a gallery in an erasure that reaches outside it (a case's leads,
# a held search): used when a damaged gallery is erased whole and its subjects cannot all be
# read. Real subject ids are hex, so it matches no single subject.
ANY_SUBJECT = "*"


def among(subject_id: str, subject_ids: frozenset[str]) -> bool:
    """Whether ``subject_id`` is one of ``subject_ids`` (``ANY_SUBJECT`` holds them all)."""
    return subject_id in subject_ids or ANY_SUBJECT in subject_ids


@dataclass(frozen=True)
class Subject:
    subject_id: str
    display_name: str
    notes: str
    legal_basis: str
    enrolled_by: str
    enrolled_at: datetime
    retention_until: date | None
    version: int


@dataclass(frozen=True, eq=False)
class Face:
    face_id: str
    subject_id: str
    embedding: Embedding  # read-only float32
    quality: float
    model_id: str
    source_sha256: str
    enrolled_at: datetime
    version: int
    age_at_capture: int | None = None  # whole years when the photo was taken, if given


@dataclass(frozen=True)
class Enrolment:
    subject: Subject
    faces: tuple[Face, ...]


@dataclass(frozen=True)
class GalleryInfo:
    gallery_id: str
    name: str
    description: str
    created_at: datetime
    subjects: int
    faces: int


def pack(head: dict[str, Any], tail: bytes = b"") -> bytes:
    raw = json.dumps(head, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return struct.pack(">I", len(raw)) + raw + tail


def unpack(plain: bytes, where: str) -> tuple[dict[str, Any], bytes]:
    try:
        (size,) = struct.unpack_from(">I", plain, 0)
        head = json.loads(plain[4 : 4 + size].decode("utf-8"))
        if not isinstance(head, dict):
            raise ValueError("payload head is not an object")
    except (struct.error, ValueError) as exc:
        raise CorruptGalleryError(f"{where}: malformed record payload") from exc
    return head, plain[4 + size :]


def check_text(value: str, field: str, *, required: bool, max_chars: int = MAX_TEXT_CHARS) -> str:
    if not isinstance(value, str):
        raise InvalidRecordError(f"{field} must be text")
    if required and not value.strip():
        raise InvalidRecordError(f"{field} is empty; give a {field.replace('_', ' ')}")
    if len(value) > max_chars:
        raise InvalidRecordError(f"{field} is longer than {max_chars} characters")
    return value


def check_name(value: str, field: str = "display_name") -> str:
    check_text(value, field, required=True, max_chars=MAX_NAME_CHARS)
    if CONTROL_CHARS.search(value):
        raise InvalidRecordError(
            f"{field} holds a line break or control character; give the name on one line"
        )
    return value


def check_age(value: int | None) -> int | None:
    """An age at capture: None, or whole years from 0 to ``MAX_AGE_YEARS``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRecordError("the age at capture must be a whole number of years")
    if not 0 <= value <= MAX_AGE_YEARS:
        raise InvalidRecordError(
            f"the age at capture must be from 0 to {MAX_AGE_YEARS} years; leave it empty if "
            "it is not known"
        )
    return value


def check_subject(subject: NewSubject) -> None:
    check_name(subject.display_name)
    check_text(subject.legal_basis, "legal_basis", required=True)
    check_text(subject.enrolled_by, "enrolled_by", required=True)
    check_text(subject.notes, "notes", required=False)


def check_face(face: NewFace) -> Embedding:
    vector = np.asarray(face.embedding)
    if vector.ndim != 1 or not 0 < vector.size <= MAX_EMBEDDING_DIM:
        raise InvalidRecordError(f"an embedding is a vector of 1..{MAX_EMBEDDING_DIM} numbers")
    vector = vector.astype("<f4")
    if not np.isfinite(vector).all():
        raise InvalidRecordError("the embedding holds NaN or infinity")
    if not math.isfinite(face.quality):
        raise InvalidRecordError("quality must be a finite number")
    check_text(face.model_id, "model_id", required=True)
    if not SHA256_HEX.fullmatch(face.source_sha256):
        raise InvalidRecordError("source_sha256 must be 64 lowercase hex digits")
    thumb = face.thumbnail_jpeg
    if not (isinstance(thumb, bytes) and thumb.startswith(JPEG_MAGIC)):
        raise InvalidRecordError("the thumbnail must be JPEG bytes of the aligned face")
    if len(thumb) > MAX_THUMBNAIL_BYTES:
        raise InvalidRecordError(f"the thumbnail is over {MAX_THUMBNAIL_BYTES} bytes")
    check_age(face.age_at_capture)
    return vector


def frozen_embedding(vector: NDArray[Any]) -> Embedding:
    out: Embedding = np.array(vector, dtype=np.float32)
    out.flags.writeable = False
    return out


def parse_id(value: str, what: str) -> bytes:
    if not isinstance(value, str) or not ID_HEX.fullmatch(value):
        raise GalleryNotFoundError(f"{what} {value!r} is not a valid id")
    return bytes.fromhex(value)


@dataclass(frozen=True, eq=False)
class FaceDraft:
    """A validated face about to be written: its id is drawn, its thumbnail not yet placed."""

    face_id: bytes
    subject_id: str
    embedding: Embedding
    quality: float
    model_id: str
    source_sha256: str
    enrolled_at: datetime
    jpeg: bytes
    age_at_capture: int | None = None


def subject_head(subject: NewSubject | Subject, enrolled_at: datetime) -> dict[str, Any]:
    retention = subject.retention_until
    return {
        "display_name": subject.display_name,
        "notes": subject.notes,
        "legal_basis": subject.legal_basis,
        "enrolled_by": subject.enrolled_by,
        "enrolled_at": enrolled_at.isoformat(),
        "retention_until": retention.isoformat() if retention else None,
    }


def face_head(face: Face | FaceDraft, thumb: tuple[int, int] | None = None) -> dict[str, Any]:
    """A face's JSON head; ``thumb`` is where its thumbnail frame sits in the gallery."""
    head: dict[str, Any] = {
        "subject_id": face.subject_id,
        "quality": face.quality,
        "model_id": face.model_id,
        "source_sha256": face.source_sha256,
        "enrolled_at": face.enrolled_at.isoformat(),
    }
    if face.age_at_capture is not None:  # absent, not null: older faces' heads stay as they were
        head["age"] = face.age_at_capture
    if thumb is not None:
        head["thumb"] = list(thumb)
    return head


def subject_from(rid: str, version: int, head: dict[str, Any]) -> Subject:
    retention = head["retention_until"]
    return Subject(
        subject_id=rid,
        display_name=str(head["display_name"]),
        notes=str(head["notes"]),
        legal_basis=str(head["legal_basis"]),
        enrolled_by=str(head["enrolled_by"]),
        enrolled_at=datetime.fromisoformat(head["enrolled_at"]),
        retention_until=date.fromisoformat(retention) if retention else None,
        version=version,
    )


def face_from(rid: str, version: int, head: dict[str, Any], embedding: bytes) -> Face:
    return Face(
        face_id=rid,
        subject_id=str(head["subject_id"]),
        embedding=frozen_embedding(np.frombuffer(embedding, dtype="<f4")),
        quality=float(head["quality"]),
        model_id=str(head["model_id"]),
        source_sha256=str(head["source_sha256"]),
        enrolled_at=datetime.fromisoformat(head["enrolled_at"]),
        version=version,
        age_at_capture=check_age(head.get("age")),
    )


# -- batch records ---------------------------------------------------------------------------

BATCH_FORMAT = "edgeid-batch/1"
BATCH_VERSION = 1  # the version of a batch record and of every subject and face in it
BATCH_AAD_LABEL = b"edgeid/batch"
TEXT_FIELDS = ("display_name", "notes", "legal_basis", "enrolled_by")
NAIVE_OFFSET = -(2**63)  # the UTC offset stored for a time without a time zone
SUBJECT_COLUMN_BYTES = 16 + 8 + 8 + 4 + 4 + 4 * 8  # a subject's share of the columns, less text
FACE_COLUMN_BYTES = 16 + 32 + 8 + 4 + 8 + 8 + 4 + 4 + 2  # a face's share (with its age)
# The optional columns a batch may carry (module docstring), in their order: name, dtype.
EXTRA_COLUMNS = {"face_age": "<i2"}
NO_AGE = -1
_ALIGN = 16  # every array starts 16-byte aligned, so numpy reads it in place
_EPOCH = datetime(1970, 1, 1)
_MICROSECOND = timedelta(microseconds=1)
_MIN_WALL_US = (datetime.min - _EPOCH) // _MICROSECOND
_MAX_WALL_US = (datetime.max - _EPOCH) // _MICROSECOND
_MAX_OFFSET_US = 24 * 3600 * 10**6  # Python's bound on a UTC offset (exclusive)


def batch_aad(scope_id: bytes, kind: RecordKind, batch_id: bytes, index: int, count: int) -> bytes:
    """A batch record's associated data: a record's, then its place among the log's batches.

    So a batch opens only as the ``index``-th of ``count`` batches, as columns (SUBJECT) or as
    embeddings (FACE), in its gallery under its key; and never as a single record.
    """
    return (
        record_aad(scope_id, kind, batch_id, BATCH_VERSION)
        + BATCH_AAD_LABEL
        + struct.pack(">II", index, count)
    )


def _moments(values: Sequence[datetime]) -> tuple[list[int], list[int]]:
    walls, offsets = [], []
    for moment in values:
        offset = moment.utcoffset()
        walls.append((moment.replace(tzinfo=None) - _EPOCH) // _MICROSECOND)
        offsets.append(NAIVE_OFFSET if offset is None else offset // _MICROSECOND)
    return walls, offsets


@functools.lru_cache(maxsize=256)
def _epoch(offset_us: int) -> datetime:
    """1970-01-01 in the time zone of a stored offset: one per offset, not one per time."""
    if offset_us == NAIVE_OFFSET:
        return _EPOCH
    return _EPOCH.replace(tzinfo=timezone(timedelta(microseconds=offset_us)))


def moment_at(wall_us: int, offset_us: int) -> datetime:
    """A time from its stored wall clock and UTC offset (``_moments`` reversed)."""
    return _epoch(offset_us) + timedelta(microseconds=wall_us)


def _moments_at(walls: list[int], offsets: list[int]) -> list[datetime]:
    """``moment_at`` of many; one object per distinct time (an enrolment shares its time)."""
    seen: dict[tuple[int, int], datetime] = {}
    out = []
    for key in zip(walls, offsets, strict=True):
        moment = seen.get(key)
        if moment is None:
            moment = seen[key] = moment_at(*key)
        out.append(moment)
    return out


@dataclass(frozen=True, eq=False)
class BatchColumns:
    """One decoded batch: read-only arrays over its plaintexts (see the module docstring)."""

    subject_id: NDArray[np.uint8]
    subject_enrolled: NDArray[np.int64]
    subject_utc_offset: NDArray[np.int64]
    subject_retention: NDArray[np.int32]
    subject_faces: NDArray[np.uint32]
    subject_text_end: NDArray[np.uint64]
    face_id: NDArray[np.uint8]
    face_source: NDArray[np.uint8]
    face_quality: NDArray[np.float64]
    face_model: NDArray[np.uint32]
    face_enrolled: NDArray[np.int64]
    face_utc_offset: NDArray[np.int64]
    face_thumb_size: NDArray[np.uint32]
    face_dim: NDArray[np.uint32]
    text: NDArray[np.uint8]
    models: tuple[str, ...]
    embeddings: Embedding  # every face's values, flat
    face_age: NDArray[np.int16]  # NO_AGE throughout when the batch has no such column


def _layout(
    subjects: int, faces: int, text: int, extra: Sequence[str] = ()
) -> list[tuple[str, str, tuple[int, ...]]]:
    """Name, dtype and shape of each array of a batch's columns, in order."""
    return [
        ("subject_id", "u1", (subjects, 16)),
        ("subject_enrolled", "<i8", (subjects,)),
        ("subject_utc_offset", "<i8", (subjects,)),
        ("subject_retention", "<i4", (subjects,)),
        ("subject_faces", "<u4", (subjects,)),
        ("subject_text_end", "<u8", (subjects, len(TEXT_FIELDS))),
        ("face_id", "u1", (faces, 16)),
        ("face_source", "u1", (faces, 32)),
        ("face_quality", "<f8", (faces,)),
        ("face_model", "<u4", (faces,)),
        ("face_enrolled", "<i8", (faces,)),
        ("face_utc_offset", "<i8", (faces,)),
        ("face_thumb_size", "<u4", (faces,)),
        ("face_dim", "<u4", (faces,)),
        ("text", "u1", (text,)),
        *((name, EXTRA_COLUMNS[name], (faces,)) for name in extra),
    ]


def _padding(size: int) -> int:
    return -size % _ALIGN


def encode_batch(
    subjects: Sequence[Subject], faces: Sequence[Sequence[Face]], thumb_sizes: Sequence[int]
) -> tuple[bytes, bytes]:
    """The two plaintexts of a batch: its columns and its embeddings. ``faces`` holds each
    subject's faces; ``thumb_sizes`` the size of each face's thumbnail frame, in order."""
    members = [face for group in faces for face in group]
    if len(thumb_sizes) != len(members) or len(faces) != len(subjects):
        raise ValueError("a batch needs one face list per subject and one size per face")
    texts = [str(getattr(s, name)).encode("utf-8") for s in subjects for name in TEXT_FIELDS]
    models: dict[str, int] = {}
    subject_walls, subject_offsets = _moments([s.enrolled_at for s in subjects])
    face_walls, face_offsets = _moments([f.enrolled_at for f in members])
    text = b"".join(texts)
    arrays: dict[str, Any] = {
        "subject_id": b"".join(bytes.fromhex(s.subject_id) for s in subjects),
        "subject_enrolled": subject_walls,
        "subject_utc_offset": subject_offsets,
        "subject_retention": [
            s.retention_until.toordinal() if s.retention_until else 0 for s in subjects
        ],
        "subject_faces": [len(group) for group in faces],
        "subject_text_end": np.cumsum([len(t) for t in texts], dtype=np.uint64),
        "face_id": b"".join(bytes.fromhex(f.face_id) for f in members),
        "face_source": b"".join(bytes.fromhex(f.source_sha256) for f in members),
        "face_quality": [f.quality for f in members],
        "face_model": [models.setdefault(f.model_id, len(models)) for f in members],
        "face_enrolled": face_walls,
        "face_utc_offset": face_offsets,
        "face_thumb_size": list(thumb_sizes),
        "face_dim": [f.embedding.size for f in members],
        "text": text,
        "face_age": [NO_AGE if f.age_at_capture is None else f.age_at_capture for f in members],
    }
    head: dict[str, Any] = {
        "format": BATCH_FORMAT,
        "subjects": len(subjects),
        "faces": len(members),
        "text": len(text),
        "models": list(models),
    }
    extra = ["face_age"] if any(f.age_at_capture is not None for f in members) else []
    if extra:
        head["extra"] = extra
    raw = json.dumps(head, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    parts = [
        struct.pack(">I", len(raw) + _padding(4 + len(raw))),
        raw,
        b" " * _padding(4 + len(raw)),
    ]
    for name, dtype, _ in _layout(len(subjects), len(members), len(text), extra):
        value = arrays[name]
        data = value if isinstance(value, bytes) else np.asarray(value, dtype=dtype).tobytes()
        parts += [data, bytes(_padding(len(data)))]
    embeddings = b"".join(np.asarray(f.embedding, dtype="<f4").tobytes() for f in members)
    return b"".join(parts), embeddings


def decode_batch(columns: bytes, embeddings: bytes, where: str) -> BatchColumns:
    """Read a batch's authenticated plaintexts in place; check that they hang together."""
    try:
        (size,) = struct.unpack_from(">I", columns, 0)
        head = json.loads(columns[4 : 4 + size].decode("utf-8"))
        if not isinstance(head, dict) or head.get("format") != BATCH_FORMAT:
            raise ValueError("not a batch")
        counts = [head["subjects"], head["faces"], head["text"]]
        models = head["models"]
        extra = head.get("extra", [])
        if not all(isinstance(c, int) and c >= 0 for c in counts) or not (
            isinstance(models, list) and all(isinstance(m, str) for m in models)
        ):
            raise ValueError("bad batch head")
        if not isinstance(extra, list) or extra != [c for c in EXTRA_COLUMNS if c in extra]:
            raise ValueError("unknown or misordered optional columns")
        offset = 4 + size
        arrays: dict[str, Any] = {}
        for name, dtype, shape in _layout(counts[0], counts[1], counts[2], extra):
            if offset % _ALIGN:
                raise ValueError("misaligned column")
            count = math.prod(shape)
            array = np.frombuffer(columns, dtype=dtype, count=count, offset=offset)
            arrays[name] = array.reshape(shape)
            offset += array.nbytes + _padding(array.nbytes)
        if offset != len(columns):
            raise ValueError("batch columns have the wrong length")
        arrays["embeddings"] = np.frombuffer(embeddings, dtype="<f4")
        if "face_age" not in arrays:
            arrays["face_age"] = np.full(counts[1], NO_AGE, np.int16)
        batch = BatchColumns(models=tuple(models), **arrays)
        _check_batch(batch)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CorruptGalleryError(f"{where}: malformed batch record ({exc})") from None
    return batch


def _check_batch(batch: BatchColumns) -> None:
    """Checks whose failure means a bug, since the batch authenticated; cheap, in numpy."""
    subjects, faces = len(batch.subject_id), len(batch.face_id)
    if int(batch.subject_faces.sum(dtype=np.int64)) != faces:
        raise ValueError("faces do not add up")
    ends = batch.subject_text_end.ravel()
    if (ends[-1] if subjects else 0) != len(batch.text) or np.any(
        np.diff(ends.astype(np.int64)) < 0
    ):
        raise ValueError("text fields do not add up")
    if np.any(batch.face_model >= len(batch.models)) or np.any(batch.face_thumb_size == 0):
        raise ValueError("face column out of range")
    if np.any((batch.face_dim == 0) | (batch.face_dim > MAX_EMBEDDING_DIM)):
        raise ValueError("embedding size out of range")
    if int(batch.face_dim.sum(dtype=np.int64)) != len(batch.embeddings):
        raise ValueError("embeddings do not add up")
    if not np.isfinite(batch.face_quality).all():
        raise ValueError("quality is not finite")
    if np.any((batch.face_age < NO_AGE) | (batch.face_age > MAX_AGE_YEARS)):
        raise ValueError("age at capture out of range")
    if np.any((batch.subject_retention < 0) | (batch.subject_retention > date.max.toordinal())):
        raise ValueError("retention date out of range")
    for walls, offsets in (
        (batch.subject_enrolled, batch.subject_utc_offset),
        (batch.face_enrolled, batch.face_utc_offset),
    ):
        zoned = offsets != NAIVE_OFFSET
        if np.any((walls < _MIN_WALL_US) | (walls > _MAX_WALL_US)) or np.any(
            np.abs(offsets[zoned]) >= _MAX_OFFSET_US
        ):
            raise ValueError("time out of range")


def hex_ids(ids: NDArray[np.uint8]) -> list[str]:
    """Rows of 16 id bytes as the hex strings callers see."""
    text = ids.tobytes().hex()
    return [text[i : i + 32] for i in range(0, len(text), 32)]


class BatchTable:
    """The subjects and faces of a gallery's batch records, merged into one set of columns.

    Nothing per face is built at load: a ``Subject`` or ``Face`` is built on first access
    and then kept, so reading a face twice gives the same object, as it does for one loaded
    from a single record. A tombstone marks a row dead; only compaction removes it.
    """

    def __init__(self, subjects: int = 0, faces: int = 0) -> None:
        self.subjects, self.faces = subjects, faces
        self.subject_id = np.zeros((subjects, 16), np.uint8)
        self.subject_enrolled = np.zeros(subjects, np.int64)
        self.subject_utc_offset = np.zeros(subjects, np.int64)
        self.subject_retention = np.zeros(subjects, np.int32)
        self.subject_alive = np.ones(subjects, bool)
        self.face_start = np.zeros(subjects + 1, np.int64)  # a subject's faces: [start, next)
        self.text_bounds = np.zeros(len(TEXT_FIELDS) * subjects + 1, np.int64)
        self.face_id = np.zeros((faces, 16), np.uint8)
        self.face_source = np.zeros((faces, 32), np.uint8)
        self.face_quality = np.zeros(faces, np.float64)
        self.face_model = np.zeros(faces, np.uint32)
        self.face_enrolled = np.zeros(faces, np.int64)
        self.face_utc_offset = np.zeros(faces, np.int64)
        self.face_thumb = np.zeros(faces, np.int64)  # frame offsets, placed by finish()
        self.face_thumb_size = np.zeros(faces, np.uint32)
        self.face_dim = np.zeros(faces, np.uint32)
        self.face_age = np.full(faces, NO_AGE, np.int16)
        self.face_subject = np.zeros(faces, np.int64)
        self.face_segment = np.zeros(faces, np.int32)
        self.face_value_start = np.zeros(faces, np.int64)  # within its segment
        self.face_alive = np.ones(faces, bool)
        self.models: list[str] = []
        self.thumbs_end = 0
        self._model_codes: dict[str, int] = {}
        self._segments: list[Embedding] = []  # each batch's embeddings, read-only
        self._segment_dim: list[int] = []  # the one size of a segment's embeddings, else 0
        self._text_parts: list[bytes] = []
        self._text = b""
        self._filled = (0, 0, 0)  # subjects, faces, text bytes
        self._keys = np.zeros(0, np.uint64)  # sorted first 8 bytes of every id
        self._order = np.zeros(0, np.int64)  # their positions: subject rows, then faces
        self._subject_cache: dict[int, Subject] = {}
        self._face_cache: dict[int, Face] = {}

    # -- loading -----------------------------------------------------------------------------

    def add(self, batch: BatchColumns) -> None:
        """Copy one batch's columns in (its embeddings stay where they were decrypted)."""
        s0, f0, t0 = self._filled
        s1, f1 = s0 + len(batch.subject_id), f0 + len(batch.face_id)
        if s1 > self.subjects or f1 > self.faces:
            raise ValueError("the batches hold more than the gallery record says")
        self.subject_id[s0:s1] = batch.subject_id
        self.subject_enrolled[s0:s1] = batch.subject_enrolled
        self.subject_utc_offset[s0:s1] = batch.subject_utc_offset
        self.subject_retention[s0:s1] = batch.subject_retention
        self.face_start[s0 + 1 : s1 + 1] = f0 + np.cumsum(batch.subject_faces, dtype=np.int64)
        fields = len(TEXT_FIELDS)
        self.text_bounds[fields * s0 + 1 : fields * s1 + 1] = t0 + batch.subject_text_end.ravel()
        self._text_parts.append(batch.text.tobytes())
        self.face_id[f0:f1] = batch.face_id
        self.face_source[f0:f1] = batch.face_source
        self.face_quality[f0:f1] = batch.face_quality
        codes = [self._model_codes.setdefault(m, len(self._model_codes)) for m in batch.models]
        self.models = list(self._model_codes)
        self.face_model[f0:f1] = np.asarray(codes, np.uint32)[batch.face_model]
        self.face_enrolled[f0:f1] = batch.face_enrolled
        self.face_utc_offset[f0:f1] = batch.face_utc_offset
        self.face_thumb_size[f0:f1] = batch.face_thumb_size
        self.face_dim[f0:f1] = batch.face_dim
        self.face_age[f0:f1] = batch.face_age
        self.face_subject[f0:f1] = np.repeat(np.arange(s0, s1), batch.subject_faces)
        self.face_segment[f0:f1] = len(self._segments)
        starts = np.cumsum(batch.face_dim, dtype=np.int64) - batch.face_dim
        self.face_value_start[f0:f1] = starts
        dims = np.unique(batch.face_dim)
        self._segment_dim.append(int(dims[0]) if len(dims) == 1 else 0)
        self._segments.append(batch.embeddings)
        self._filled = (s1, f1, t0 + len(batch.text))

    def finish(self, thumbs_start: int) -> None:
        """After the last batch: check the counts, place thumbnails, index the ids.

        ``thumbs_start``: where the first batch face's thumbnail frame lies."""
        if self._filled[:2] != (self.subjects, self.faces):
            raise ValueError("the batches hold fewer than the gallery record says")
        self._text = b"".join(self._text_parts)
        self._text_parts = []
        sizes = self.face_thumb_size.astype(np.int64)
        ends = thumbs_start + np.cumsum(sizes)
        self.face_thumb = ends - sizes
        self.thumbs_end = int(ends[-1]) if self.faces else thumbs_start
        ids = np.concatenate([self.subject_id, self.face_id])
        keys = ids[:, :8].copy().view(">u8").ravel().astype(np.uint64)
        self._order = np.argsort(keys)
        self._keys = keys[self._order]
        shared = np.flatnonzero(self._keys[1:] == self._keys[:-1])
        if len(shared):  # first 8 bytes alike: rare (about n**2 / 2**65); compare whole ids
            rows = self._order[np.union1d(shared, shared + 1)]
            if len({ids[row].tobytes() for row in rows}) != len(rows):
                raise ValueError("an id appears twice")

    # -- finding -----------------------------------------------------------------------------

    def locate(self, rid: bytes) -> int | None:
        """Where an id is, dead or alive: a subject row, or ``subjects`` + a face row."""
        keys = self._keys
        if len(rid) != 16 or not len(keys):
            return None
        key = int.from_bytes(rid[:8], "big")
        i = int(keys.searchsorted(np.uint64(key)))  # a Python int could cast all the keys
        while i < len(keys) and int(keys[i]) == key:
            place = int(self._order[i])
            if place < self.subjects:
                found = self.subject_id[place].tobytes()
            else:
                found = self.face_id[place - self.subjects].tobytes()
            if found == rid:
                return place
            i += 1
        return None

    def live_subject(self, subject_id: str) -> int | None:
        place = self.locate(_id_bytes(subject_id))
        if place is None or place >= self.subjects or not self.subject_alive[place]:
            return None
        return place

    def live_face(self, face_id: str) -> int | None:
        place = self.locate(_id_bytes(face_id))
        if place is None or place < self.subjects:
            return None
        row = place - self.subjects
        return row if self.face_alive[row] else None

    def live_subjects(self) -> list[int]:
        return np.flatnonzero(self.subject_alive).tolist()

    def live_faces(self, subject: int | None = None) -> list[int]:
        if subject is None:
            return np.flatnonzero(self.face_alive).tolist()
        start, end = int(self.face_start[subject]), int(self.face_start[subject + 1])
        return (start + np.flatnonzero(self.face_alive[start:end])).tolist()

    def faces_of(self, subjects: Sequence[int]) -> list[list[int]]:
        """The live face rows of each of these live subject rows, which must run in order and
        be all the live subjects between the first and the last (a compaction's batch)."""
        if not subjects:
            return []
        start, end = int(self.face_start[subjects[0]]), int(self.face_start[subjects[-1] + 1])
        rows = start + np.flatnonzero(self.face_alive[start:end])
        owners = self.face_subject[rows]
        lefts = np.searchsorted(owners, subjects, "left").tolist()
        rights = np.searchsorted(owners, subjects, "right").tolist()
        return [rows[a:b].tolist() for a, b in zip(lefts, rights, strict=True)]

    def counts(self) -> tuple[int, int]:
        return int(np.count_nonzero(self.subject_alive)), int(np.count_nonzero(self.face_alive))

    def expired(self, today: date) -> list[int]:
        retention = self.subject_retention
        due = self.subject_alive & (retention > 0) & (retention < today.toordinal())
        return np.flatnonzero(due).tolist()

    # -- building objects --------------------------------------------------------------------

    def subjects_at(self, rows: Sequence[int], *, keep: bool = True) -> list[Subject]:
        """The subjects of these rows; those not built before are built together, and kept
        unless ``keep`` is false (a compaction reads each once)."""
        cache = self._subject_cache
        missing = [row for row in rows if row not in cache]
        built = dict(zip(missing, self._build_subjects(missing), strict=True))
        if keep:
            cache.update(built)
        return [built[row] if row in built else cache[row] for row in rows]

    def faces_at(self, rows: Sequence[int], *, keep: bool = True) -> list[Face]:
        """The faces of these rows, as ``subjects_at``."""
        cache = self._face_cache
        missing = [row for row in rows if row not in cache]
        built = dict(zip(missing, self._build_faces(missing), strict=True))
        if keep:
            cache.update(built)
        return [built[row] if row in built else cache[row] for row in rows]

    def _build_subjects(self, rows: Sequence[int]) -> list[Subject]:
        if not rows:
            return []
        index = np.asarray(rows, np.int64)
        fields = len(TEXT_FIELDS)
        bounds = self.text_bounds[fields * index[:, None] + np.arange(fields + 1)].tolist()
        text = self._text
        moments = _moments_at(
            self.subject_enrolled[index].tolist(), self.subject_utc_offset[index].tolist()
        )
        columns = zip(
            hex_ids(self.subject_id[index]),
            bounds,
            moments,
            self.subject_retention[index].tolist(),
            strict=True,
        )
        return [
            Subject(  # the text fields in TEXT_FIELDS' order
                subject_id=subject_id,
                display_name=text[b[0] : b[1]].decode("utf-8"),
                notes=text[b[1] : b[2]].decode("utf-8"),
                legal_basis=text[b[2] : b[3]].decode("utf-8"),
                enrolled_by=text[b[3] : b[4]].decode("utf-8"),
                enrolled_at=moment,
                retention_until=date.fromordinal(retention) if retention else None,
                version=BATCH_VERSION,
            )
            for subject_id, b, moment, retention in columns
        ]

    def _build_faces(self, rows: Sequence[int]) -> list[Face]:
        if not rows:
            return []
        index = np.asarray(rows, np.int64)
        sources = self.face_source[index].tobytes().hex()
        segments, models = self._segments, self.models
        columns = zip(
            hex_ids(self.face_id[index]),
            hex_ids(self.subject_id[self.face_subject[index]]),
            self.face_segment[index].tolist(),
            self.face_value_start[index].tolist(),
            self.face_dim[index].tolist(),
            self.face_quality[index].tolist(),
            self.face_model[index].tolist(),
            _moments_at(self.face_enrolled[index].tolist(), self.face_utc_offset[index].tolist()),
            self.face_age[index].tolist(),
            strict=True,
        )
        return [
            Face(
                face_id=face_id,
                subject_id=subject_id,
                embedding=segments[segment][start : start + dim],  # read-only: over bytes
                quality=quality,
                model_id=models[model],
                source_sha256=sources[64 * i : 64 * i + 64],
                enrolled_at=moment,
                version=BATCH_VERSION,
                age_at_capture=None if age == NO_AGE else age,
            )
            for i, (
                face_id,
                subject_id,
                segment,
                start,
                dim,
                quality,
                model,
                moment,
                age,
            ) in enumerate(columns)
        ]

    def thumb(self, row: int) -> tuple[int, int]:
        """Offset and size of a face's thumbnail frame."""
        return int(self.face_thumb[row]), int(self.face_thumb_size[row])

    def embeddings(self, model_id: str) -> tuple[list[str], Embedding | None]:
        """Live face ids of one model and their embeddings, copied into one new matrix."""
        code = self._model_codes.get(model_id)
        if code is None:
            return [], None
        rows = np.flatnonzero(self.face_alive & (self.face_model == code))
        if not len(rows):
            return [], None
        dims = self.face_dim[rows]
        dim = int(dims[0])
        if np.any(dims != dim):  # one model, several sizes: refused as np.stack refuses
            faces = self.faces_at(rows.tolist(), keep=False)
            return hex_ids(self.face_id[rows]), np.stack([f.embedding for f in faces])
        out: Embedding = np.empty((len(rows), dim), np.float32)
        segments = self.face_segment[rows]
        cuts = [0, *(np.flatnonzero(np.diff(segments)) + 1).tolist(), len(rows)]
        for a, b in itertools.pairwise(cuts):
            segment = int(segments[a])
            values, starts = self._segments[segment], self.face_value_start[rows[a:b]]
            if self._segment_dim[segment] == dim:
                np.take(values.reshape(-1, dim), starts // dim, axis=0, out=out[a:b])
            else:
                for i, start in enumerate(starts.tolist()):
                    out[a + i] = values[start : start + dim]
        return hex_ids(self.face_id[rows]), out

    def plan_sizes(self, rows: Sequence[int]) -> tuple[list[int], list[int]]:
        """Live faces and batch bytes of each subject row: for sizing a compaction's batches."""
        index = np.asarray(rows, np.int64)
        weights = self.face_alive * (FACE_COLUMN_BYTES + 4 * self.face_dim.astype(np.int64))
        alive = np.concatenate([[0], np.cumsum(self.face_alive, dtype=np.int64)])
        size = np.concatenate([[0], np.cumsum(weights)])
        start, end = self.face_start[index], self.face_start[index + 1]
        fields = len(TEXT_FIELDS)
        text = self.text_bounds[fields * index + fields] - self.text_bounds[fields * index]
        faces = alive[end] - alive[start]
        total = SUBJECT_COLUMN_BYTES + text + size[end] - size[start]
        return faces.tolist(), total.tolist()

    # -- deleting ----------------------------------------------------------------------------

    def forget_subject(self, row: int) -> None:
        start, end = int(self.face_start[row]), int(self.face_start[row + 1])
        self.subject_alive[row] = False
        self.face_alive[start:end] = False
        self._subject_cache.pop(row, None)
        for face in range(start, end):
            self._face_cache.pop(face, None)

    def forget_face(self, row: int) -> None:
        self.face_alive[row] = False
        self._face_cache.pop(row, None)


def _id_bytes(value: str) -> bytes:
    """An id's bytes, or b"" for text that is no id (it then matches nothing)."""
    try:
        return bytes.fromhex(value) if ID_HEX.fullmatch(value) else b""
    except (TypeError, ValueError):
        return b""
