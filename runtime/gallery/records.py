"""What a gallery holds: subjects and faces, their validation, and their sealed payloads.

A record's plaintext is a length-prefixed JSON head and a binary tail (the float32 embedding
of a face, the JPEG of a thumbnail); it exists only in memory and is sealed before any write.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import numpy as np
from numpy.typing import NDArray

from runtime.gallery.errors import CorruptGalleryError, GalleryNotFoundError, InvalidRecordError

MAX_TEXT_CHARS = 20_000  # notes longer than a few pages are a paste error, not a note
MAX_EMBEDDING_DIM = 4096  # larger than any face embedder we ship or expect
MAX_THUMBNAIL_BYTES = 1 << 20  # an aligned chip is a few KB; a megabyte is not a thumbnail
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


def check_text(value: str, field: str, *, required: bool) -> str:
    if not isinstance(value, str):
        raise InvalidRecordError(f"{field} must be text")
    if required and not value.strip():
        raise InvalidRecordError(f"{field} is empty; give a {field.replace('_', ' ')}")
    if len(value) > MAX_TEXT_CHARS:
        raise InvalidRecordError(f"{field} is longer than {MAX_TEXT_CHARS} characters")
    return value


def check_subject(subject: NewSubject) -> None:
    check_text(subject.display_name, "display_name", required=True)
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
    )
