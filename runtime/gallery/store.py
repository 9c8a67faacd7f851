"""Named, encrypted, durable galleries of subjects and their faces under one state directory.

Layout under ``<state_dir>/galleries/``::

    keyring.json                  wrapped data keys (see keys.py)
    .lock                         one writer process at a time
    <gallery_id>/records.log      gallery metadata, subjects, faces, tombstones
    <gallery_id>/thumbs-<key_id>.log   thumbnails, read one at a time, never at open

Both logs use the frame format of ``log.py``; every record is sealed with the gallery's data
key, bound to gallery, kind, record id and version. Names, notes, legal basis, embeddings and
thumbnails exist only as ciphertext; only random ids, kinds, versions and sizes are visible.

The records log starts with the gallery's own record. ``compact()`` writes the rest as batch
records (header format 2): the gallery record then also counts the batches, subjects and faces
that follow, and the next frames are exactly that many batches, one frame each, holding whole
subjects with all their faces as columns (``records.py``): an entry of kind SUBJECT with the
columns and one of kind FACE with the embeddings, both under the batch's random id, version 1,
and bound by their associated data to their place among the batches as well. Opening then
decrypts a few large records instead of one per face and builds subjects and faces only when
they are read (``records.BatchTable``). A batch that is missing, moved, repeated or altered
fails to open, and the file ending inside the batches is damage, not a torn tail. Single
records (enrolments, tombstones) follow the batches; a tombstone deletes a batch member by
its id as it deletes any record.

An enrolment is acknowledged (the call returns) only after its thumbnails and then its one
records frame are written and fsynced, file and folder. Deleting writes a tombstone;
``compact()`` then rewrites both logs under a new data key without the deleted records,
commits by one atomic rename, zero-fills the old files before unlinking them, and drops the
old data key from the keyring, so deleted data is gone from the files and crypto-erased
wherever old blocks survive.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np

from runtime.errors import StorageWriteError
from runtime.gallery.errors import (
    CorruptGalleryError,
    DecryptionError,
    GalleryBusyError,
    GalleryError,
    GalleryExistsError,
    GalleryNotFoundError,
    InvalidRecordError,
)
from runtime.gallery.records import (
    BATCH_VERSION,
    FACE_COLUMN_BYTES,
    ID_HEX,
    SUBJECT_COLUMN_BYTES,
    TEXT_FIELDS,
    BatchTable,
    Embedding,
    Enrolment,
    Face,
    FaceDraft,
    GalleryInfo,
    NewFace,
    NewSubject,
    Subject,
    batch_aad,
    check_face,
    check_subject,
    check_text,
    decode_batch,
    encode_batch,
    face_from,
    face_head,
    pack,
    parse_id,
    subject_from,
    subject_head,
    unpack,
)
from runtime.storage.durable import (
    PRIVATE_FILE_MODE,
    FileWriter,
    OsFileWriter,
    fsync_directory,
    lock_exclusively,
    make_private_dir,
    shred_and_unlink,
    shred_tree,
    write_all,
    write_error,
)
from runtime.vault.crypto import (
    NONCE_BYTES,
    Clock,
    RandomSource,
    RecordCipher,
    RecordKind,
    open_sealed,
    seal,
    system_random,
    utc_now,
)
from runtime.vault.errors import VaultError
from runtime.vault.framed_log import (
    BATCHED_LOG_FORMAT,
    FRAME_HEAD_BYTES,
    HEADER_BYTES,
    ID_BYTES,
    LOG_FORMAT_VERSION,
    MAX_ENTRIES_PER_FRAME,
    MAX_FRAME_BYTES,
    Entry,
    Frame,
    LogAppender,
    LogHeader,
    ScanState,
    create_log,
    encode_frame,
    encode_header,
    read_frame,
    read_header,
    scan_frames,
)
from runtime.vault.key_choice import GALLERIES_DIR, KEYRING_FILE
from runtime.vault.keys import KekProvider, Keyring

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
RECORDS_LOG = "records.log"
STAGED_SUFFIX = ".new"  # a compaction's output before its commit
RETIRED_SUFFIX = ".retired"  # a hard link to the pre-compaction log, zero-filled after commit
RECORDS_LOG_FORMATS = (LOG_FORMAT_VERSION, BATCHED_LOG_FORMAT)
# Faces per batch record (about 10 MB at 128-d): opening 200k faces cost the same CPU time
# with 4k or 16k per batch, 1.5x more with 1k (per-batch work) or 64k (buffers outgrow the
# caches); a compaction holds one batch's objects in memory at a time.
BATCH_FACES = 16384
BATCH_BYTES = 32 << 20  # and a cap for subjects with long notes or large embeddings
THUMBS_FLUSH_BYTES = 8 << 20  # a compaction writes re-sealed thumbnails in pieces this large


def thumbs_log_name(key_id: str) -> str:
    return f"thumbs-{key_id}.log"


@dataclass(frozen=True)
class _ThumbRef:
    """Where a face's thumbnail frame sits in the thumbnail log."""

    offset: int
    size: int


# -- one gallery ---------------------------------------------------------------------------


class Gallery:
    """One open gallery: its records decrypted in memory, thumbnails read on demand."""

    def __init__(
        self,
        directory: Path,
        gallery_id: str,
        keyring: Keyring,
        *,
        clock: Clock,
        random: RandomSource,
        writer: FileWriter,
    ) -> None:
        self.directory = directory
        self.gallery_id = gallery_id
        self._gid = bytes.fromhex(gallery_id)
        self._keyring = keyring
        self._clock = clock
        self._random = random
        self._writer = writer
        self._lock = threading.RLock()
        self.name = ""
        self._load()

    # -- loading ---------------------------------------------------------------------------

    @property
    def where(self) -> str:
        """How errors name this gallery: its id and name, never its content."""
        return f"gallery {self.gallery_id}" + (f" ({self.name!r})" if self.name else "")

    @property
    def log_name(self) -> str:
        """How the service log (and the log files' appenders, which log) name it: the id."""
        return f"gallery {self.gallery_id}"

    @property
    def key_id(self) -> str:
        """The data key now sealing this gallery; it changes at every ``compact()``."""
        return self._key_id

    def _reset(self) -> None:
        self.name = ""
        self.description = ""
        self.created_at = datetime.min
        self._batch_counts: tuple[int, int, int] | None = None  # batches, subjects, faces
        self._base = BatchTable()  # the members of the batch records
        # The single records that follow the batches:
        self._subjects: dict[str, Subject] = {}
        self._faces: dict[str, Face] = {}
        self._thumbs: dict[str, _ThumbRef] = {}
        self._by_subject: dict[str, list[str]] = {}  # also for batch subjects given faces later
        # Latest version of each id: single records, batches, deleted batch members. A batch
        # member not listed has version 1.
        self._versions: dict[bytes, int] = {}
        self._thumbs_end = HEADER_BYTES
        self.torn_bytes = 0

    def _load(self) -> None:
        self._reset()
        path = self.directory / RECORDS_LOG
        where = self.where
        with open(path, "rb") as stream:
            header = read_header(stream, where, formats=RECORDS_LOG_FORMATS)
            if header.scope_id != self._gid:
                raise CorruptGalleryError(f"{where}: {RECORDS_LOG} belongs to another gallery")
            self._key_id = header.key_id.hex()
            self._data_key = self._keyring.data_key(self.gallery_id, self._key_id)
            self._cipher = RecordCipher(self._data_key, self._gid, random=self._random)
            state = ScanState()
            frames = scan_frames(stream, where, state)
            first = next(frames, None)
            if first is not None:
                for entry in first.entries:
                    self._apply(entry, self._open(entry, first.offset))
                if not self.name:
                    raise CorruptGalleryError(f"{where}: first record is not the gallery's own")
                self._load_batches(frames, header.format, where)
            for frame in frames:
                for entry in frame.entries:
                    self._check_new(entry)  # before decrypting: a replay is named as one
                    self._apply(entry, self._open(entry, frame.offset))
        if not self.name:
            raise CorruptGalleryError(f"{where}: {RECORDS_LOG} holds no gallery record")
        self.torn_bytes = state.torn_bytes
        self._records = LogAppender(path, state.valid_end, self.log_name, self._writer)
        self._thumbs_path = self.directory / thumbs_log_name(self._key_id)
        self._thumb_appender: LogAppender | None = None

    def _load_batches(self, frames: Iterator[Frame], log_format: int, where: str) -> None:
        """Read the batch records the gallery record announces, straight after it."""
        counts = self._batch_counts
        if (log_format == BATCHED_LOG_FORMAT) != (counts is not None):
            raise CorruptGalleryError(f"{where}: header and gallery record disagree on the format")
        if counts is None:
            return
        batches, subjects, faces = counts
        table = BatchTable(subjects, faces)
        try:
            for index in range(batches):
                frame = next(frames, None)
                if frame is None:
                    raise CorruptGalleryError(
                        f"{where}: {RECORDS_LOG} ends before its last batch record; restore "
                        "the gallery from a backup"
                    )
                columns, embeddings = self._open_batch(frame, index, batches)
                table.add(decode_batch(columns, embeddings, where))
            table.finish(HEADER_BYTES)
            if any(table.locate(rid) is not None for rid in self._versions):  # gallery, batches
                raise ValueError("an id appears twice")
        except ValueError as exc:
            raise CorruptGalleryError(f"{where}: inconsistent batch records ({exc})") from None
        self._base = table
        self._thumbs_end = table.thumbs_end

    def _open_batch(self, frame: Frame, index: int, count: int) -> tuple[bytes, bytes]:
        entries = frame.entries
        if (
            [e.kind for e in entries] != [RecordKind.SUBJECT, RecordKind.FACE]
            or entries[0].record_id != entries[1].record_id
            or any(e.version != BATCH_VERSION for e in entries)
        ):
            raise CorruptGalleryError(f"{self.where}: frame at byte {frame.offset} is no batch")
        batch_id = entries[0].record_id
        self._check_new(entries[0])
        self._versions[batch_id] = BATCH_VERSION
        try:
            columns, embeddings = (
                open_sealed(
                    self._data_key,
                    e.nonce,
                    e.ciphertext,
                    batch_aad(self._gid, e.kind, batch_id, index, count),
                )
                for e in entries
            )
            return columns, embeddings
        except DecryptionError:
            logger.warning(
                "%s: record at byte %d failed authentication", self.log_name, frame.offset
            )
            raise

    def _open(self, entry: Entry, offset: int) -> bytes:
        try:
            return self._cipher.open(
                entry.kind, entry.record_id, entry.version, entry.nonce, entry.ciphertext
            )
        except DecryptionError:
            logger.warning("%s: record at byte %d failed authentication", self.log_name, offset)
            raise

    def _version_of(self, rid: bytes) -> int:
        """The latest version of a record id in this gallery; 0 for an unknown id."""
        known = self._versions.get(rid)
        if known is None:
            return BATCH_VERSION if self._base.locate(rid) is not None else 0
        return known

    def _check_new(self, entry: Entry) -> None:
        """Refuse a record that is not newer than what the gallery holds for its id."""
        if entry.version <= self._version_of(entry.record_id):
            raise CorruptGalleryError(
                f"{self.where}: a record reappears with an old version (replayed or "
                "reordered); restore the gallery from a backup"
            )

    def _apply(self, entry: Entry, plain: bytes) -> None:
        """Fold one decrypted record into the in-memory state (while loading and appending)."""
        where = self.where
        self._check_new(entry)
        self._versions[entry.record_id] = entry.version
        head, tail = unpack(plain, where)
        rid = entry.record_id.hex()
        try:
            if entry.kind is RecordKind.GALLERY:
                if entry.record_id != self._gid:
                    raise ValueError("gallery record of another gallery")
                self.name = str(head["name"])
                self.description = str(head["description"])
                self.created_at = datetime.fromisoformat(head["created_at"])
                if "batches" in head:
                    counts = int(head["batches"]), int(head["subjects"]), int(head["faces"])
                    if min(counts) < 0:
                        raise ValueError("negative count")
                    self._batch_counts = counts
            elif entry.kind is RecordKind.SUBJECT:
                self._subjects[rid] = subject_from(rid, entry.version, head)
                self._by_subject.setdefault(rid, [])
            elif entry.kind is RecordKind.FACE:
                self._apply_face(rid, entry.version, head, tail)
            elif entry.kind is RecordKind.TOMBSTONE:
                self._forget(rid)
            else:
                raise ValueError(f"unexpected record kind {entry.kind.name}")
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptGalleryError(f"{where}: inconsistent record ({exc})") from None

    def _apply_face(self, rid: str, version: int, head: dict[str, Any], tail: bytes) -> None:
        face = face_from(rid, version, head, tail)
        offset, size = int(head["thumb"][0]), int(head["thumb"][1])
        self._thumbs_end = max(self._thumbs_end, offset + size)
        if not self._has_subject(face.subject_id):
            raise ValueError("face of an unknown subject")
        self._faces[rid] = face
        self._thumbs[rid] = _ThumbRef(offset, size)
        faces = self._by_subject.setdefault(face.subject_id, [])
        if rid not in faces:
            faces.append(rid)

    def _has_subject(self, subject_id: str) -> bool:
        return subject_id in self._subjects or self._base.live_subject(subject_id) is not None

    def _forget(self, rid: str) -> None:
        if rid in self._subjects:
            del self._subjects[rid]
            self._forget_faces_of(rid)
        elif rid in self._faces:
            face = self._faces.pop(rid)
            self._thumbs.pop(rid, None)
            self._by_subject[face.subject_id].remove(rid)
        elif (row := self._base.live_subject(rid)) is not None:
            self._base.forget_subject(row)
            self._forget_faces_of(rid)
        elif (row := self._base.live_face(rid)) is not None:
            self._base.forget_face(row)
        else:
            raise ValueError("tombstone of an unknown record")

    def _forget_faces_of(self, subject_id: str) -> None:
        """Drop the single-record faces of a deleted subject."""
        for face_id in self._by_subject.pop(subject_id, []):
            self._faces.pop(face_id, None)
            self._thumbs.pop(face_id, None)

    # -- reading ---------------------------------------------------------------------------

    def subjects(self) -> list[Subject]:
        with self._lock:
            base = self._base.subjects_at(self._base.live_subjects())
            return base + list(self._subjects.values())

    def subject(self, subject_id: str) -> Subject:
        with self._lock:
            found = self._subjects.get(subject_id)
            if found is not None:
                return found
            row = self._base.live_subject(subject_id)
            if row is None:
                raise GalleryNotFoundError(f"no subject {subject_id} in {self.where}")
            return self._base.subjects_at([row])[0]

    def faces(self, subject_id: str | None = None) -> list[Face]:
        with self._lock:
            if subject_id is None:
                base = self._base.faces_at(self._base.live_faces())
                return base + list(self._faces.values())
            self.subject(subject_id)
            row = None if subject_id in self._subjects else self._base.live_subject(subject_id)
            base = [] if row is None else self._base.faces_at(self._base.live_faces(row))
            return base + [self._faces[f] for f in self._by_subject.get(subject_id, [])]

    def face(self, face_id: str) -> Face:
        with self._lock:
            found = self._faces.get(face_id)
            if found is not None:
                return found
            row = self._base.live_face(face_id)
            if row is None:
                raise GalleryNotFoundError(f"no face {face_id} in {self.where}")
            return self._base.faces_at([row])[0]

    def embeddings(self, model_id: str) -> tuple[list[str], Embedding]:
        """Face ids and their embeddings (one row each) for one model: the index's input."""
        with self._lock:
            ids, matrix = self._base.embeddings(model_id)
            faces = [f for f in self._faces.values() if f.model_id == model_id]
        if faces:
            loose = np.stack([f.embedding for f in faces])
            ids += [f.face_id for f in faces]
            matrix = loose if matrix is None else np.concatenate([matrix, loose])
        if matrix is None:
            return [], np.zeros((0, 0), dtype=np.float32)
        return ids, matrix

    def _thumb_ref(self, face_id: str) -> _ThumbRef:
        ref = self._thumbs.get(face_id)  # a live face of a single record
        if ref is None:
            row = self._base.live_face(face_id)
            if row is None:
                raise GalleryNotFoundError(f"no face {face_id} in {self.where}")
            ref = _ThumbRef(*self._base.thumb(row))
        return ref

    def thumbnail(self, face_id: str) -> bytes:
        """The JPEG of a face's aligned chip, read and authenticated now."""
        with self._lock:
            ref = self._thumb_ref(face_id)
            with open(self._thumbs_path, "rb") as stream:
                return self._read_thumbnail(stream, face_id, ref)

    def _read_thumbnail(self, stream: BinaryIO, face_id: str, ref: _ThumbRef) -> bytes:
        frame = read_frame(stream, ref.offset, self.where)
        if len(frame.entries) != 1 or frame.size != ref.size:
            raise CorruptGalleryError(f"{self.where}: thumbnail frame is not where it was put")
        entry = frame.entries[0]
        if entry.kind is not RecordKind.THUMBNAIL or entry.record_id.hex() != face_id:
            raise CorruptGalleryError(f"{self.where}: thumbnail frame belongs to another face")
        _, jpeg = unpack(self._open(entry, ref.offset), self.where)
        return jpeg

    def expired_subjects(self, today: date | None = None) -> list[Subject]:
        """Subjects whose retention date has passed (to review and delete)."""
        today = today or self._clock().date()
        with self._lock:
            base = self._base.subjects_at(self._base.expired(today))
            loose = [
                s
                for s in self._subjects.values()
                if s.retention_until is not None and s.retention_until < today
            ]
        return base + loose

    def info(self) -> GalleryInfo:
        with self._lock:
            subjects, faces = self._base.counts()
            return GalleryInfo(
                self.gallery_id,
                self.name,
                self.description,
                self.created_at,
                subjects + len(self._subjects),
                faces + len(self._faces),
            )

    # -- sealing blobs for other gallery files (the search index) ----------------------------

    def seal_blob(self, name: str, data: bytes, version: int = 1) -> bytes:
        """Seal a file's bytes (e.g. an index) under this gallery's current data key.

        The result names its key; after ``compact()`` that key is erased and ``open_blob``
        fails with ``DecryptionError``: rebuild the file from the store.
        """
        sealed = self._cipher.seal(RecordKind.INDEX, name.encode(), version, data)
        return bytes.fromhex(self._key_id) + sealed.nonce + sealed.ciphertext

    def open_blob(self, name: str, blob: bytes, version: int = 1) -> bytes:
        key_id, rest = blob[:ID_BYTES], blob[ID_BYTES:]
        if key_id.hex() != self._key_id:
            raise DecryptionError()
        return self._cipher.open(
            RecordKind.INDEX, name.encode(), version, rest[:NONCE_BYTES], rest[NONCE_BYTES:]
        )

    # -- writing ---------------------------------------------------------------------------

    def _taken(self, rid: bytes) -> bool:
        return rid == self._gid or rid in self._versions or self._base.locate(rid) is not None

    def _new_id(self, drawn: set[bytes]) -> bytes:
        """A random id no record of this gallery has, nor any in ``drawn`` (which gains it)."""
        while True:
            rid = self._random(ID_BYTES)
            if rid not in drawn and not self._taken(rid):
                drawn.add(rid)
                return rid

    def _thumbs_appender(self) -> LogAppender:
        if self._thumb_appender is None:
            if not self._thumbs_path.exists():
                header = LogHeader(self._gid, bytes.fromhex(self._key_id))
                create_log(self._thumbs_path, header, self._writer, self.where)
            self._thumb_appender = LogAppender(
                self._thumbs_path, self._thumbs_end, self.log_name, self._writer
            )
        return self._thumb_appender

    def _write(
        self, records: list[tuple[RecordKind, bytes, int, bytes]], drafts: Sequence[FaceDraft]
    ) -> None:
        """Durably write thumbnails, then one records frame; only then update memory.

        A failure rolls both logs back to what they were, so the gallery is unchanged.
        """
        if len(records) + len(drafts) > MAX_ENTRIES_PER_FRAME:
            raise InvalidRecordError(
                f"one enrolment holds at most {MAX_ENTRIES_PER_FRAME} subjects and faces; split it"
            )
        entries = [_seal_entry(self._cipher, *record) for record in records]
        plains = [record[3] for record in records]
        appender = self._thumbs_appender() if drafts else None
        thumbs_before = appender.valid_end if appender else 0
        thumbs = []
        offset = thumbs_before
        for draft in drafts:
            fid = draft.face_id
            frame = encode_frame(
                [_seal_entry(self._cipher, RecordKind.THUMBNAIL, fid, 1, pack({}, draft.jpeg))]
            )
            plain = pack(face_head(draft, (offset, len(frame))), draft.embedding.tobytes())
            entries.append(_seal_entry(self._cipher, RecordKind.FACE, fid, 1, plain))
            plains.append(plain)
            thumbs.append(frame)
            offset += len(frame)
        records_frame = _one_frame(entries)
        if appender:
            appender.append(b"".join(thumbs))
        try:
            self._records.append(records_frame)
        except (GalleryError, VaultError, StorageWriteError):
            if appender:
                appender.roll_back_to(thumbs_before)  # thumbnails no record points to
            raise
        for entry, plain in zip(entries, plains, strict=True):
            self._apply(entry, plain)

    def _drafts(
        self, subject_id: str, faces: Sequence[NewFace], now: datetime, drawn: set[bytes]
    ) -> list[FaceDraft]:
        drafts = []
        for face in faces:
            vector = check_face(face)
            drafts.append(
                FaceDraft(
                    self._new_id(drawn),
                    subject_id,
                    vector,
                    float(face.quality),
                    face.model_id,
                    face.source_sha256,
                    now,
                    face.thumbnail_jpeg,
                )
            )
        return drafts

    def enroll(self, subject: NewSubject, faces: Sequence[NewFace] = ()) -> Enrolment:
        """Add a subject with its faces, all or nothing; returns once it is durable."""
        return self.enroll_many([(subject, faces)])[0]

    def enroll_many(
        self, enrolments: Sequence[tuple[NewSubject, Sequence[NewFace]]]
    ) -> list[Enrolment]:
        """Add many subjects with their faces in one durable write, all or nothing: a bulk
        enrolment, far faster than one ``enroll`` each. They share one records frame, so a
        call holds at most ``MAX_ENTRIES_PER_FRAME`` subjects and faces together (and at most
        ``MAX_FRAME_BYTES``); a larger one is refused before anything is written."""
        for subject, _ in enrolments:
            check_subject(subject)
        with self._lock:
            now = self._clock()
            drawn: set[bytes] = set()
            records: list[tuple[RecordKind, bytes, int, bytes]] = []
            drafts: list[FaceDraft] = []
            for subject, faces in enrolments:
                sid = self._new_id(drawn)
                records.append((RecordKind.SUBJECT, sid, 1, pack(subject_head(subject, now))))
                drafts += self._drafts(sid.hex(), faces, now, drawn)
            if records:
                self._write(records, drafts)
            return [
                Enrolment(self._subjects[rid], tuple(self.faces(rid)))
                for rid in (record[1].hex() for record in records)
            ]

    def add_faces(self, subject_id: str, faces: Sequence[NewFace]) -> list[Face]:
        """Add faces to an enrolled subject, all or nothing."""
        with self._lock:
            self.subject(subject_id)
            drafts = self._drafts(subject_id, faces, self._clock(), set())
            if drafts:
                self._write([], drafts)
            return [self._faces[d.face_id.hex()] for d in drafts]

    def restore(self, subject: Subject, faces: Sequence[tuple[Face, bytes]]) -> None:
        """Write a subject and its faces (with thumbnails) keeping their ids and times: import."""
        with self._lock:
            sid = parse_id(subject.subject_id, "subject")
            ids = [sid] + [parse_id(f.face_id, "face") for f, _ in faces]
            if len(set(ids)) != len(ids) or any(self._taken(i) for i in ids):
                raise InvalidRecordError(f"{self.where} already holds a record with that id")
            drafts = []
            for face, jpeg in faces:
                vector = check_face(
                    NewFace(face.embedding, face.quality, face.model_id, face.source_sha256, jpeg)
                )
                drafts.append(
                    FaceDraft(
                        bytes.fromhex(face.face_id),
                        subject.subject_id,
                        vector,
                        face.quality,
                        face.model_id,
                        face.source_sha256,
                        face.enrolled_at,
                        jpeg,
                    )
                )
            head = subject_head(subject, subject.enrolled_at)
            self._write([(RecordKind.SUBJECT, sid, 1, pack(head))], drafts)

    def delete_subject(self, subject_id: str, *, compact: bool = True) -> None:
        """Tombstone a subject and its faces; then (by default) ``compact()``, which erases them.

        Pass ``compact=False`` to delete several and compact once.
        """
        with self._lock:
            self._tombstone(self.subject(subject_id).version, subject_id)
            if compact:
                self.compact()

    def delete_face(self, face_id: str, *, compact: bool = True) -> None:
        with self._lock:
            self._tombstone(self.face(face_id).version, face_id)
            if compact:
                self.compact()

    def _tombstone(self, version: int, rid: str) -> None:
        plain = pack({"deleted_at": self._clock().isoformat()})
        self._write([(RecordKind.TOMBSTONE, bytes.fromhex(rid), version + 1, plain)], [])

    # -- compaction ------------------------------------------------------------------------

    def compact(self) -> None:
        """Rewrite the gallery under a new data key without deleted records; erase the old.

        Steps: new data key in the keyring; new logs written and fsynced beside the old ones;
        a hard link keeps the old records log reachable; one rename commits; the old files are
        zero-filled and unlinked; the old data key leaves the keyring. A crash at any step
        leaves either the old or the new gallery, and ``GalleryStore`` tidies the rest.
        """
        with self._lock:
            old_key_id, old_thumbs = self._key_id, self._thumbs_path
            key_id, key = self._keyring.new_data_key(self.gallery_id)
            staged = self.directory / (RECORDS_LOG + STAGED_SUFFIX)
            retired = self.directory / (RECORDS_LOG + RETIRED_SUFFIX)
            thumbs_path = self.directory / thumbs_log_name(key_id)
            try:
                self._write_compacted(staged, thumbs_path, key, bytes.fromhex(key_id))
                os.link(self.directory / RECORDS_LOG, retired)
                fsync_directory(self.directory)
                os.replace(staged, self.directory / RECORDS_LOG)  # the commit point
            except (OSError, GalleryError, VaultError, StorageWriteError) as exc:
                self._abandon_compaction(staged, retired, thumbs_path, old_key_id)
                if isinstance(exc, GalleryError | VaultError | StorageWriteError):
                    raise
                raise write_error(f"compacting {self.where}", str(self.directory), exc) from exc
            self._finish_compaction(retired, old_thumbs, key_id)
            logger.info("%s: compacted; the previous data key is erased", self.log_name)
            self._load()

    def _finish_compaction(self, retired: Path, old_thumbs: Path, key_id: str) -> None:
        """After the commit: erase the old files and key. A failure here loses nothing; the
        next ``GalleryStore`` open finishes the job."""
        try:
            fsync_directory(self.directory)
            shred_and_unlink(retired)
            shred_and_unlink(old_thumbs)
            self._keyring.retain_only(self.gallery_id, [key_id])
        except (OSError, GalleryError, VaultError, StorageWriteError) as exc:
            logger.warning(
                "%s: compacted, but erasing the old files is unfinished: %s", self.log_name, exc
            )

    def _abandon_compaction(
        self, staged: Path, retired: Path, thumbs_path: Path, old_key_id: str
    ) -> None:
        """Undo a compaction that failed before its commit; the old gallery stays as it was."""
        retired.unlink(missing_ok=True)  # still the live log's inode: never zero-fill it
        shred_and_unlink(staged)
        shred_and_unlink(thumbs_path)
        try:
            self._keyring.retain_only(self.gallery_id, [old_key_id])
        except (GalleryError, VaultError, StorageWriteError) as exc:
            # e.g. still no space: the next open drops the unused key
            logger.warning("%s: could not drop an unused data key yet: %s", self.log_name, exc)

    def _compaction_plan(self) -> list[list[int | str]]:
        """The live subjects (a batch row, or a single record's id) cut into batches of whole
        subjects, each within ``BATCH_FACES`` faces and ``BATCH_BYTES`` unless one subject
        alone is larger."""
        rows = self._base.live_subjects()
        faces, sizes = self._base.plan_sizes(rows)
        place = {row: i for i, row in enumerate(rows)} if len(self._by_subject) else {}
        for subject_id, face_ids in self._by_subject.items():  # later faces of batch subjects
            row = None if subject_id in self._subjects else self._base.live_subject(subject_id)
            if row is not None and face_ids:
                faces[place[row]] += len(face_ids)
                sizes[place[row]] += sum(_face_bytes(self._faces[f]) for f in face_ids)
        items: list[tuple[int | str, int, int]] = list(zip(rows, faces, sizes, strict=True))
        for subject_id, subject in self._subjects.items():
            own = [self._faces[f] for f in self._by_subject.get(subject_id, [])]
            text = sum(len(str(getattr(subject, name)).encode()) for name in TEXT_FIELDS)
            size = SUBJECT_COLUMN_BYTES + text + sum(_face_bytes(f) for f in own)
            items.append((subject_id, len(own), size))
        plan: list[list[int | str]] = []
        batch: list[int | str] = []
        batch_faces = batch_bytes = 0
        for ref, count, size in items:
            if batch and (batch_faces + count > BATCH_FACES or batch_bytes + size > BATCH_BYTES):
                plan.append(batch)
                batch, batch_faces, batch_bytes = [], 0, 0
            batch.append(ref)
            batch_faces += count
            batch_bytes += size
        if batch:
            plan.append(batch)
        return plan

    def _members(self, refs: list[int | str]) -> list[tuple[Subject, list[tuple[Face, _ThumbRef]]]]:
        """The subjects of one planned batch with their faces and where their thumbnails are;
        built without keeping them, so a compaction holds one batch in memory at a time."""
        rows = [ref for ref in refs if isinstance(ref, int)]  # batch rows come first, in order
        groups = self._base.faces_of(rows)
        faces = iter(self._base.faces_at([f for group in groups for f in group], keep=False))
        members = []
        for subject, group in zip(self._base.subjects_at(rows, keep=False), groups, strict=True):
            own = [(next(faces), _ThumbRef(*self._base.thumb(row))) for row in group]
            members.append((subject, own))
        members += [(self._subjects[ref], []) for ref in refs if isinstance(ref, str)]
        for subject, own in members:
            for face_id in self._by_subject.get(subject.subject_id, []):
                own.append((self._faces[face_id], self._thumbs[face_id]))
        return members

    def _reseal_thumbnails(
        self,
        members: list[tuple[Subject, list[tuple[Face, _ThumbRef]]]],
        old_thumbs: BinaryIO | None,
        cipher: RecordCipher,
        thumbs_fd: int,
    ) -> list[int]:
        """Append the members' thumbnails, read from the old log and sealed under the new
        key, to the new thumbnail log; return the size of each frame."""
        pending: list[bytes] = []
        pending_bytes = 0
        sizes = []
        for _, own in members:
            for face, ref in own:
                assert old_thumbs is not None  # there are faces, so there is a thumbnail log
                jpeg = self._read_thumbnail(old_thumbs, face.face_id, ref)
                fid = bytes.fromhex(face.face_id)
                thumb = _seal_entry(cipher, RecordKind.THUMBNAIL, fid, 1, pack({}, jpeg))
                frame = encode_frame([thumb])
                pending.append(frame)
                sizes.append(len(frame))
                pending_bytes += len(frame)
                if pending_bytes >= THUMBS_FLUSH_BYTES:
                    write_all(self._writer, thumbs_fd, b"".join(pending))
                    pending, pending_bytes = [], 0
        write_all(self._writer, thumbs_fd, b"".join(pending))
        return sizes

    def _write_compacted(self, staged: Path, thumbs_path: Path, key: bytes, key_id: bytes) -> None:
        cipher = RecordCipher(key, self._gid, random=self._random)
        plan = self._compaction_plan()
        subjects, faces = self._base.counts()
        subjects += len(self._subjects)
        faces += len(self._faces)
        meta = {
            "name": self.name,
            "description": self.description,
            "created_at": self.created_at.isoformat(),
            "batches": len(plan),
            "subjects": subjects,
            "faces": faces,
        }
        drawn: set[bytes] = set()
        with contextlib.ExitStack() as stack:
            thumbs_fd = stack.enter_context(_durable_file(thumbs_path, self._writer))
            records_fd = stack.enter_context(_durable_file(staged, self._writer))
            old_thumbs = stack.enter_context(open(self._thumbs_path, "rb")) if faces else None
            write_all(self._writer, thumbs_fd, encode_header(LogHeader(self._gid, key_id)))
            header = LogHeader(self._gid, key_id, BATCHED_LOG_FORMAT)
            write_all(self._writer, records_fd, encode_header(header))
            gallery = _seal_entry(cipher, RecordKind.GALLERY, self._gid, 1, pack(meta))
            write_all(self._writer, records_fd, encode_frame([gallery]))
            for index, refs in enumerate(plan):
                members = self._members(refs)
                faces_of = [[face for face, _ in own] for _, own in members]
                sizes = self._reseal_thumbnails(members, old_thumbs, cipher, thumbs_fd)
                columns, embeddings = encode_batch(
                    [subject for subject, _ in members], faces_of, sizes
                )
                batch_id = self._new_id(drawn)
                entries = []
                for kind, plain in ((RecordKind.SUBJECT, columns), (RecordKind.FACE, embeddings)):
                    aad = batch_aad(self._gid, kind, batch_id, index, len(plan))
                    sealed = seal(key, plain, aad, random=self._random)
                    entries.append(
                        Entry(kind, batch_id, BATCH_VERSION, sealed.nonce, sealed.ciphertext)
                    )
                frame = encode_frame(entries)
                if len(frame) - FRAME_HEAD_BYTES > MAX_FRAME_BYTES:
                    raise GalleryError(
                        f"{self.where}: a subject holds too many faces to compact; delete some"
                    )
                write_all(self._writer, records_fd, frame)
        fsync_directory(self.directory)


# -- the galleries of one box --------------------------------------------------------------


class GalleryStore:
    """Every gallery under ``<state_dir>/galleries``, opened by one process at a time.

    ``clock``, ``random`` and ``writer`` are injectable for tests (expiry, deterministic ids,
    a full disk).
    """

    def __init__(
        self,
        state_dir: Path,
        provider: KekProvider,
        *,
        clock: Clock = utc_now,
        random: RandomSource = system_random,
        writer: FileWriter | None = None,
    ) -> None:
        self.root = Path(state_dir) / GALLERIES_DIR
        self._provider = provider
        self._clock = clock
        self._random = random
        self._writer = writer or OsFileWriter()
        self._galleries: dict[str, Gallery] = {}
        make_private_dir(self.root)
        self._lock_fd: int | None = lock_exclusively(
            self.root / LOCK_FILE,
            lambda: GalleryBusyError(
                f"the galleries under {self.root} are already open (edgeid serve?); stop it first"
            ),
        )
        try:
            path = self.root / KEYRING_FILE
            self._keyring = (
                Keyring.open(path, provider, random=random, clock=clock, writer=self._writer)
                if path.exists()
                else None
            )
            self._recover()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> GalleryStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the store's lock; galleries opened from it must not be used afterwards."""
        self._galleries.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def keyring(self) -> Keyring:
        if self._keyring is None:
            self._keyring = Keyring.create(
                self.root / KEYRING_FILE,
                self._provider,
                random=self._random,
                clock=self._clock,
                writer=self._writer,
            )
        return self._keyring

    # -- recovery after a crash ------------------------------------------------------------

    def _recover(self) -> None:
        """Finish or undo what a crash interrupted: creates, compactions, deletes."""
        folders = [
            d for d in sorted(self.root.iterdir()) if d.is_dir() and ID_HEX.fullmatch(d.name)
        ]
        if self._keyring is None:
            if folders:
                raise CorruptGalleryError(
                    f"{self.root} holds galleries but no {KEYRING_FILE}; restore the keyring "
                    "from the box's backup (without it the galleries cannot be opened)"
                )
            return
        known = set(self._keyring.gallery_ids())
        for directory in folders:
            if directory.name not in known or not (directory / RECORDS_LOG).exists():
                # The keyring drops a gallery before its files go, and gains it before they
                # come: a folder it lacks, or a folder without a log, is a half-done delete
                # or create, and its ciphertext is unreadable without the key.
                logger.warning("removing %s: an interrupted create or delete", directory.name)
                shred_tree(directory)
            else:
                self._tidy(directory)
        for gid in known:
            if not (self.root / gid / RECORDS_LOG).exists():
                logger.warning("forgetting the key of gallery %s: it has no files", gid)
                self.keyring.retain_only(gid, [])

    def _tidy(self, directory: Path) -> None:
        records = directory / RECORDS_LOG
        retired = directory / (RECORDS_LOG + RETIRED_SUFFIX)
        if retired.exists():
            if os.path.samefile(retired, records):
                retired.unlink()  # the crash came before the commit: this is the live log
            else:
                shred_and_unlink(retired)
        shred_and_unlink(directory / (RECORDS_LOG + STAGED_SUFFIX))
        with open(records, "rb") as stream:
            where = f"gallery {directory.name}"
            key_id = read_header(stream, where, formats=RECORDS_LOG_FORMATS).key_id.hex()
        for thumbs in directory.glob(thumbs_log_name("*")):
            if thumbs.name != thumbs_log_name(key_id):
                shred_and_unlink(thumbs)
        for leftover in directory.glob("*.tmp"):
            shred_and_unlink(leftover)
        if self.keyring.key_ids(directory.name) != [key_id]:
            self.keyring.retain_only(directory.name, [key_id])

    # -- galleries -------------------------------------------------------------------------

    def _all(self) -> list[Gallery]:
        if self._keyring is None:
            return []
        for gid in self._keyring.gallery_ids():
            if gid not in self._galleries:
                self._galleries[gid] = Gallery(
                    self.root / gid,
                    gid,
                    self._keyring,
                    clock=self._clock,
                    random=self._random,
                    writer=self._writer,
                )
        return list(self._galleries.values())

    def list_galleries(self) -> list[GalleryInfo]:
        return sorted((g.info() for g in self._all()), key=lambda info: info.name)

    def open_gallery(self, name: str) -> Gallery:
        for gallery in self._all():
            if gallery.name == name:
                return gallery
        raise GalleryNotFoundError(f"no gallery named {name!r}; list them with edgeid gallery list")

    def create_gallery(self, name: str, *, description: str = "") -> Gallery:
        """A new, empty gallery with its own data key."""
        check_text(name, "name", required=True)
        check_text(description, "description", required=False)
        if any(g.name == name for g in self._all()):
            raise GalleryExistsError(f"a gallery named {name!r} exists; choose another name")
        gid = self._random(ID_BYTES).hex()
        key_id, key = self.keyring.new_data_key(gid)
        directory = self.root / gid
        try:
            make_private_dir(directory)
            meta = {
                "name": name,
                "description": description,
                "created_at": self._clock().isoformat(),
            }
            cipher = RecordCipher(key, bytes.fromhex(gid), random=self._random)
            first = _seal_entry(cipher, RecordKind.GALLERY, bytes.fromhex(gid), 1, pack(meta))
            header = LogHeader(bytes.fromhex(gid), bytes.fromhex(key_id))
            create_log(
                directory / RECORDS_LOG,
                header,
                self._writer,
                f"gallery {gid}",
                frames=encode_frame([first]),
            )
        except (GalleryError, VaultError, StorageWriteError):
            if directory.exists():
                shred_tree(directory)
            self.keyring.retain_only(gid, [])
            raise
        gallery = Gallery(
            directory,
            gid,
            self.keyring,
            clock=self._clock,
            random=self._random,
            writer=self._writer,
        )
        self._galleries[gid] = gallery
        logger.info("created gallery %s", gid)
        return gallery

    def delete_gallery(self, name: str) -> None:
        """Erase a gallery: zero-fill and unlink its files, then forget its data keys."""
        gallery = self.open_gallery(name)
        with gallery._lock:
            self.keyring.retain_only(gallery.gallery_id, [])  # crypto-erase first, then bytes
            del self._galleries[gallery.gallery_id]
            shred_tree(gallery.directory)
        logger.info("deleted gallery %s", gallery.gallery_id)

    def rotate_kek(self, new_provider: KekProvider) -> None:
        """Re-wrap every gallery's data key under a new KEK; the old one opens nothing after."""
        self.keyring.rotate(new_provider)
        self._provider = new_provider


@contextlib.contextmanager
def _durable_file(path: Path, writer: FileWriter) -> Iterator[int]:
    """A new private file that is fsynced before it is closed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
    try:
        yield fd
        writer.fsync(fd)
    finally:
        os.close(fd)


def _seal_entry(
    cipher: RecordCipher, kind: RecordKind, rid: bytes, version: int, plain: bytes
) -> Entry:
    sealed = cipher.seal(kind, rid, version, plain)
    return Entry(kind, rid, version, sealed.nonce, sealed.ciphertext)


def _one_frame(entries: list[Entry]) -> bytes:
    """One enrolment's records frame, refused before anything is written if it is too large."""
    frame = encode_frame(entries)
    if len(frame) - FRAME_HEAD_BYTES > MAX_FRAME_BYTES:
        raise InvalidRecordError(
            f"one enrolment is at most {MAX_FRAME_BYTES >> 20} MiB when sealed; split it"
        )
    return frame


def _face_bytes(face: Face) -> int:
    """A face's share of a batch record."""
    return FACE_COLUMN_BYTES + 4 * face.embedding.size
