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

from edgeid.runtime.errors import StorageWriteError
from edgeid.runtime.gallery.errors import (
    CorruptGalleryError,
    DecryptionError,
    GalleryBusyError,
    GalleryError,
    GalleryExistsError,
    GalleryNotFoundError,
    InvalidRecordError,
)
from edgeid.runtime.gallery.records import (
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
from edgeid.runtime.storage.durable import (
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
from edgeid.runtime.vault.crypto import (
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
from edgeid.runtime.vault.errors import CorruptDataError, UnknownKeyError, VaultError
from edgeid.runtime.vault.framed_log import (
    BATCHED_LOG_FORMAT,
    FRAME_HEAD_BYTES,
    HEADER_BYTES,
    ID_BYTES,
    LOG_FORMAT_VERSION,
    MAX_ENTRIES_PER_FRAME,
    MAX_FRAME_BYTES,
    DamagedSpan,
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
    salvage_frames,
    scan_frames,
)
from edgeid.runtime.vault.key_choice import GALLERIES_DIR, KEYRING_FILE
from edgeid.runtime.vault.keys import KekProvider, Keyring

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
RECORDS_LOG = "records.log"
STAGED_SUFFIX = ".new"  # a compaction's output before its commit
RETIRED_SUFFIX = ".retired"  # a hard link to the pre-compaction log, zero-filled after commit
RECORDS_LOG_FORMATS = (LOG_FORMAT_VERSION, BATCHED_LOG_FORMAT)
# Subjects and faces per batch record: a batch is one frame, so one flipped byte costs at
# most its members (a repair names them and keeps every other batch). Opening 200k faces
# cost 1.5x the CPU time of 16k per batch (per-batch work); bounded damage is worth that.
BATCH_SUBJECTS = 256
BATCH_FACES = 1024
BATCH_BYTES = 32 << 20  # and a cap for subjects with long notes or large embeddings
THUMBS_FLUSH_BYTES = 8 << 20  # a compaction writes re-sealed thumbnails in pieces this large
LOST_THUMBNAIL = {"lost": True}  # the head of a thumbnail frame standing in for a damaged one
# What opening a damaged gallery or reading a damaged file can raise: contained, never fatal.
DAMAGE_ERRORS = (CorruptDataError, DecryptionError, VaultError, OSError, ValueError)


def thumbs_log_name(key_id: str) -> str:
    return f"thumbs-{key_id}.log"


@dataclass(frozen=True)
class DamagedGallery:
    """A gallery that failed to open: its id, its name when its own record still reads, and
    what is wrong. Every other gallery opens as usual."""

    gallery_id: str
    name: str
    problem: str
    unreadable: bool = False  # a record failed authentication (not a checksum or a format)

    @property
    def label(self) -> str:
        return repr(self.name) if self.name else f"gallery {self.gallery_id}"


class DamagedGalleryError(CorruptGalleryError):
    """The gallery asked for is damaged: it names the repair."""


class UnreadableGalleryError(DamagedGalleryError, DecryptionError):
    """The gallery asked for holds a record that fails authentication: it names the repair."""

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)


@dataclass(frozen=True)
class RepairReport:
    """What a repair kept and what it could not: counts and record ids, never content."""

    gallery_id: str
    subjects: int
    faces: int
    lost_records: tuple[str, ...]  # ids of subjects, faces and batches that were lost
    lost_thumbnails: tuple[str, ...]  # face ids kept without their thumbnail
    damaged_spans: int  # stretches of a log that held no whole frame
    lost_subjects: int = 0  # subjects known to be lost (a batch's count, when it read)

    @property
    def clean(self) -> bool:
        return not (self.lost_records or self.lost_thumbnails or self.damaged_spans)

    def summary(self) -> str:
        lost = (
            f"lost {len(self.lost_records)} record(s), {len(self.lost_thumbnails)} "
            f"thumbnail(s), {self.damaged_spans} damaged stretch(es)"
            if not self.clean
            else "nothing lost"
        )
        return f"kept {self.subjects} subjects and {self.faces} faces; {lost}"


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
        salvage: bool = False,
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
        self.lost_records: list[str] = []
        self.lost_thumbnails: list[str] = []
        self.damaged_spans = 0
        self.lost_subjects = 0
        if salvage:
            self._salvage()
        else:
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
        # Later versions of batch subjects (an edit): they stand in for the batch's row.
        self._edited: dict[str, Subject] = {}
        self._faces: dict[str, Face] = {}
        self._thumbs: dict[str, _ThumbRef] = {}
        self._by_subject: dict[str, list[str]] = {}  # also for batch subjects given faces later
        # Latest version of each id: single records, batches, deleted batch members. A batch
        # member not listed has version 1.
        self._versions: dict[bytes, int] = {}
        self._thumbs_end = HEADER_BYTES
        self.torn_bytes = 0
        self.pending_erasures = 0  # tombstones after the batches: an unfinished erasure

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
                    self.pending_erasures += entry.kind is RecordKind.TOMBSTONE
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

    # -- salvage (repair) ------------------------------------------------------------------

    def _salvage(self) -> None:
        """Load whatever still authenticates, going on past damage, for ``repair()``: a
        batch, record or thumbnail that fails is skipped and named by its id, and
        ``compact()`` then writes the rest as a fresh gallery under a new key."""
        self._reset()
        path = self.directory / RECORDS_LOG
        with open(path, "rb") as stream:
            self._key_id = self._salvage_key_id(stream)
            self._data_key = self._keyring.data_key(self.gallery_id, self._key_id)
            self._cipher = RecordCipher(self._data_key, self._gid, random=self._random)
            items = list(salvage_frames(stream))
        rest = self._salvage_gallery_record(items)
        counts = self._batch_counts
        lead = 0
        for item in rest:
            if not (isinstance(item, DamagedSpan) or _is_batch(item)):
                break
            lead += 1
        batches = counts[0] if counts is not None else lead
        for position, item in enumerate(rest):
            if isinstance(item, DamagedSpan):
                self.damaged_spans += 1
                self._salvage_damaged(item)
            elif position < batches and _is_batch(item):
                self._salvage_batch(item, position, batches)
            else:
                for entry in item.entries:
                    self._salvage_entry(entry, item.offset)
        if counts is not None:
            self.lost_subjects = max(0, counts[1] - len(self._subjects))
        self._salvage_thumbnails()
        self._records = LogAppender(path, path.stat().st_size, self.log_name, self._writer)

    def _salvage_key_id(self, stream: BinaryIO) -> str:
        try:
            return read_header(stream, self.where, formats=RECORDS_LOG_FORMATS).key_id.hex()
        except CorruptDataError:
            self.damaged_spans += 1
            keys = self._keyring.key_ids(self.gallery_id)
            if len(keys) != 1:
                raise CorruptGalleryError(
                    f"{self.where}: {RECORDS_LOG} has a damaged header and no one key to try; "
                    "restore the gallery from a backup"
                ) from None
            return keys[0]

    def _salvage_gallery_record(
        self, items: list[Frame | DamagedSpan]
    ) -> list[Frame | DamagedSpan]:
        """Apply the gallery's own record (the first frame); return what follows it."""
        first = items[0] if items else None
        if isinstance(first, Frame) and [e.kind for e in first.entries] == [RecordKind.GALLERY]:
            entry = first.entries[0]
            try:
                self._apply(entry, self._open(entry, first.offset))
                return items[1:]
            except DAMAGE_ERRORS:
                pass
        # Its own record is lost: the gallery keeps its id under a recovered name.
        self._reset()
        self.name = f"recovered-{self.gallery_id[:8]}"
        self.created_at = self._clock()
        self.lost_records.append(self.gallery_id)
        gallery_frame = isinstance(first, Frame) and first.entries[0].kind is RecordKind.GALLERY
        return items[1:] if isinstance(first, DamagedSpan) or gallery_frame else items

    def _salvage_batch(self, frame: Frame, index: int, count: int) -> None:
        batch_id = frame.entries[0].record_id
        try:
            columns, embeddings = (
                open_sealed(
                    self._data_key,
                    e.nonce,
                    e.ciphertext,
                    batch_aad(self._gid, e.kind, batch_id, index, count),
                )
                for e in frame.entries
            )
            batch = decode_batch(columns, embeddings, self.where)
            table = BatchTable(len(batch.subject_id), len(batch.face_id))
            table.add(batch)
            table.finish(HEADER_BYTES)
        except (*DAMAGE_ERRORS, GalleryError):
            logger.warning("%s: batch at byte %d is lost", self.log_name, frame.offset)
            self.lost_records.append(batch_id.hex())
            return
        for subject in table.subjects_at(range(table.subjects), keep=False):
            self._subjects[subject.subject_id] = subject
            self._by_subject.setdefault(subject.subject_id, [])
            self._versions[bytes.fromhex(subject.subject_id)] = BATCH_VERSION
        for face in table.faces_at(range(table.faces), keep=False):
            self._faces[face.face_id] = face
            self._by_subject.setdefault(face.subject_id, []).append(face.face_id)
            self._versions[bytes.fromhex(face.face_id)] = BATCH_VERSION

    def _salvage_damaged(self, span: DamagedSpan) -> None:
        """A frame that fails its checksum: what it held is lost, named by the ids it
        carries in the clear; a tombstone among them is still honoured (erasing is safe)."""
        for entry in span.entries:
            if entry.kind is RecordKind.TOMBSTONE:
                with contextlib.suppress(ValueError, KeyError):
                    self._forget(entry.record_id.hex())
            elif entry.record_id.hex() not in self.lost_records:
                self.lost_records.append(entry.record_id.hex())

    def _salvage_entry(self, entry: Entry, offset: int) -> None:
        """One single record (enrolment, tombstone), kept only if it authenticates; a
        tombstone is honoured even if it does not, since erasing is the safe side."""
        rid = entry.record_id.hex()
        if entry.kind is RecordKind.TOMBSTONE:
            with contextlib.suppress(ValueError, KeyError):
                self._forget(rid)
            self._versions[entry.record_id] = entry.version
            return
        if entry.version <= self._versions.get(entry.record_id, 0):
            return  # an old version of what is already known: a replay adds nothing
        try:
            self._apply(entry, self._open(entry, offset))
        except (*DAMAGE_ERRORS, GalleryError):
            logger.warning("%s: record %s at byte %d is lost", self.log_name, rid, offset)
            self.lost_records.append(rid)

    def _salvage_thumbnails(self) -> None:
        """Where each known face's thumbnail frame is, found by its id in the clear; a face
        whose frame is missing keeps no reference and is re-sealed without its thumbnail."""
        self._thumbs = {}
        self._thumbs_path = self.directory / thumbs_log_name(self._key_id)
        self._thumb_appender = None
        if not self._thumbs_path.exists():
            return
        with open(self._thumbs_path, "rb") as stream:
            for item in salvage_frames(stream):
                if isinstance(item, DamagedSpan):
                    self.damaged_spans += 1
                    continue
                fid = item.entries[0].record_id.hex()
                if len(item.entries) == 1 and fid in self._faces:
                    self._thumbs[fid] = _ThumbRef(item.offset, item.size)

    def check_thumbnails(self) -> list[str]:
        """Read and authenticate every thumbnail (salvage mode, for scrub); return the face
        ids whose thumbnail is damaged or missing. Writes nothing."""
        lost: list[str] = []
        with contextlib.ExitStack() as stack:
            stream = (
                stack.enter_context(open(self._thumbs_path, "rb"))
                if self._thumbs_path.exists()
                else None
            )
            for face_id in sorted(self._faces):
                head, _ = self._salvaged_thumbnail(stream, face_id, self._thumbs.get(face_id))
                if head.get("lost"):
                    lost.append(face_id)
        self.lost_thumbnails = []
        return lost

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
                subject = subject_from(rid, entry.version, head)
                if rid not in self._subjects and self._base.live_subject(rid) is not None:
                    self._edited[rid] = subject  # an edit of a batch subject
                else:
                    self._subjects[rid] = subject
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
            self._edited.pop(rid, None)
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
            edited = self._edited
            if edited:
                base = [edited.get(s.subject_id, s) for s in base]
            return base + list(self._subjects.values())

    def subject(self, subject_id: str) -> Subject:
        with self._lock:
            found = self._subjects.get(subject_id) or self._edited.get(subject_id)
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
        try:
            frame = read_frame(stream, ref.offset, f"{self.where}, {self._thumbs_path.name}")
        except CorruptDataError as exc:
            raise CorruptGalleryError(
                f"{exc}; the photo of face {face_id} cannot be shown; run `edgeid gallery "
                f"repair {self.gallery_id}` to keep everything that still authenticates"
            ) from None
        if len(frame.entries) != 1 or frame.size != ref.size:
            raise CorruptGalleryError(f"{self.where}: thumbnail frame is not where it was put")
        entry = frame.entries[0]
        if entry.kind is not RecordKind.THUMBNAIL or entry.record_id.hex() != face_id:
            raise CorruptGalleryError(f"{self.where}: thumbnail frame belongs to another face")
        head, jpeg = unpack(self._open(entry, ref.offset), self.where)
        if head.get("lost"):
            raise CorruptGalleryError(
                f"{self.where}: the thumbnail of face {face_id} was lost to damage (the face "
                "is kept); add the photo again to have one"
            )
        return jpeg

    def _salvaged_thumbnail(
        self, stream: BinaryIO | None, face_id: str, ref: _ThumbRef | None
    ) -> tuple[dict[str, Any], bytes]:
        """A thumbnail's head and JPEG for a compaction; a damaged or missing one becomes a
        marked stand-in, so damage in the thumbnail log never blocks an erasure."""
        if stream is not None and ref is not None:
            try:
                frame = read_frame(stream, ref.offset, self.where)
                entry = frame.entries[0]
                if (
                    len(frame.entries) == 1
                    and frame.size == ref.size
                    and entry.kind is RecordKind.THUMBNAIL
                    and entry.record_id.hex() == face_id
                ):
                    return unpack(self._open(entry, ref.offset), self.where)
            except (CorruptDataError, DecryptionError):
                pass
        logger.warning(
            "%s: the thumbnail of face %s is damaged; kept without it", self.log_name, face_id
        )
        self.lost_thumbnails.append(face_id)
        return LOST_THUMBNAIL, b""

    def expired_subjects(self, today: date | None = None) -> list[Subject]:
        """Subjects whose retention date has passed (to review and delete)."""
        today = today or self._clock().date()
        with self._lock:
            base = self._base.subjects_at(self._base.expired(today))
            base = [s for s in base if s.subject_id not in self._edited]
            loose = [
                s
                for s in (*self._subjects.values(), *self._edited.values())
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
        # Views, not slices: an index blob of a 1M-face gallery is about a gigabyte.
        view = memoryview(blob)
        if bytes(view[:ID_BYTES]).hex() != self._key_id:
            raise DecryptionError()
        nonce = bytes(view[ID_BYTES : ID_BYTES + NONCE_BYTES])
        return self._cipher.open(
            RecordKind.INDEX, name.encode(), version, nonce, view[ID_BYTES + NONCE_BYTES :]
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
                    face.age_at_capture,
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

    def edit_subject(
        self,
        subject_id: str,
        *,
        display_name: str,
        notes: str,
        legal_basis: str,
        retention_until: date | None,
    ) -> Subject:
        """A subject's name, notes, legal basis and retention replaced, durably: a new version
        of its record (who enrolled it and when stay). The old version stays in the log until
        the next ``compact()``, as any superseded record does."""
        with self._lock:
            old = self.subject(subject_id)
            new = NewSubject(display_name, legal_basis, old.enrolled_by, notes, retention_until)
            check_subject(new)
            head = pack(subject_head(new, old.enrolled_at))
            sid = bytes.fromhex(subject_id)
            self._write([(RecordKind.SUBJECT, sid, old.version + 1, head)], [])
            return self.subject(subject_id)

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
                    NewFace(
                        face.embedding,
                        face.quality,
                        face.model_id,
                        face.source_sha256,
                        jpeg,
                        face.age_at_capture,
                    )
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
                        face.age_at_capture,
                    )
                )
            head = subject_head(subject, subject.enrolled_at)
            self._write([(RecordKind.SUBJECT, sid, 1, pack(head))], drafts)

    def delete_subject(self, subject_id: str, *, compact: bool = True) -> None:
        """Tombstone a subject and its faces; then (by default) ``compact()``, which erases them.

        Pass ``compact=False`` to delete several and compact once.
        """
        with self._lock:
            self._erase(self.subject(subject_id).version, subject_id, compact)

    def delete_face(self, face_id: str, *, compact: bool = True) -> None:
        with self._lock:
            self._erase(self.face(face_id).version, face_id, compact)

    def _erase(self, version: int, rid: str, compact: bool) -> None:
        """A tombstone, then the compaction that makes it real, all or nothing: if the
        compaction fails the tombstone is taken back and the gallery is as it was (a crash
        in between is finished when the gallery is next opened: ``pending_erasures``)."""
        before, key_id = self._records.valid_end, self._key_id
        self._tombstone(version, rid)
        if not compact:
            return
        try:
            self.compact()
        except (GalleryError, VaultError, StorageWriteError, OSError):
            if self._committed_key() == key_id:  # not committed: take the tombstone back
                self._records.roll_back_to(before)
                self._load()
            raise

    def _committed_key(self) -> str | None:
        """The key id the records log on disk names (None if unreadable)."""
        try:
            with open(self.directory / RECORDS_LOG, "rb") as stream:
                header = read_header(stream, self.where, formats=RECORDS_LOG_FORMATS)
                return header.key_id.hex()
        except (OSError, CorruptDataError):
            return None

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
            self.lost_thumbnails = []
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
            if batch and (
                len(batch) >= BATCH_SUBJECTS
                or batch_faces + count > BATCH_FACES
                or batch_bytes + size > BATCH_BYTES
            ):
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
            members.append((self._edited.get(subject.subject_id, subject), own))
        members += [(self._subjects[ref], []) for ref in refs if isinstance(ref, str)]
        for subject, own in members:
            for face_id in self._by_subject.get(subject.subject_id, []):
                own.append((self._faces[face_id], self._thumbs.get(face_id, _NO_THUMB)))
        return members

    def _reseal_thumbnails(
        self,
        members: list[tuple[Subject, list[tuple[Face, _ThumbRef]]]],
        old_thumbs: BinaryIO | None,
        cipher: RecordCipher,
        thumbs_fd: int,
    ) -> list[int]:
        """Append the members' thumbnails, read from the old log and sealed under the new
        key, to the new thumbnail log; return the size of each frame. A damaged thumbnail is
        replaced by a marked stand-in (``lost_thumbnails`` names its face)."""
        pending: list[bytes] = []
        pending_bytes = 0
        sizes = []
        for _, own in members:
            for face, ref in own:
                head, jpeg = self._salvaged_thumbnail(old_thumbs, face.face_id, ref)
                fid = bytes.fromhex(face.face_id)
                thumb = _seal_entry(cipher, RecordKind.THUMBNAIL, fid, 1, pack(head, jpeg))
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
            old_thumbs = (
                stack.enter_context(open(self._thumbs_path, "rb"))
                if faces and self._thumbs_path.exists()
                else None
            )
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
        self._damaged: dict[str, DamagedGallery] = {}
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
                try:
                    self._tidy(directory)
                except (CorruptDataError, OSError) as exc:  # reported when it is opened
                    logger.warning("gallery %s: not tidied: %s", directory.name, exc)
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
        """Every gallery that opens; one that does not is set aside as damaged (named by
        ``damaged_galleries``), so it never blocks the others."""
        if self._keyring is None:
            return []
        for gid in self._keyring.gallery_ids():
            if gid not in self._galleries and gid not in self._damaged:
                self._open_one(gid)
        return list(self._galleries.values())

    def _open_one(self, gid: str) -> None:
        try:
            gallery = self._gallery(gid)
            if gallery.pending_erasures:
                # A crash came between an erasure's tombstone and its compaction: finish it.
                logger.warning("gallery %s: finishing an interrupted erasure", gid)
                gallery.compact()
        except (*DAMAGE_ERRORS, GalleryError, StorageWriteError) as exc:
            problem = str(exc) or type(exc).__name__
            if isinstance(exc, UnknownKeyError):
                problem = f"gallery {gid}: its data key is not in the keyring"
            elif isinstance(exc, DecryptionError | ValueError):
                problem = f"gallery {gid}: a record or its wrapped key fails authentication"
            logger.warning("gallery %s is damaged and set aside", gid)
            unreadable = isinstance(exc, DecryptionError)
            self._damaged[gid] = DamagedGallery(gid, self._peek_name(gid), problem, unreadable)
            return
        self._galleries[gid] = gallery

    def _gallery(self, gid: str, *, salvage: bool = False) -> Gallery:
        return Gallery(
            self.root / gid,
            gid,
            self.keyring,
            clock=self._clock,
            random=self._random,
            writer=self._writer,
            salvage=salvage,
        )

    def _peek_name(self, gid: str) -> str:
        """A damaged gallery's name, if its own record (the first frame) still reads."""
        try:
            with open(self.root / gid / RECORDS_LOG, "rb") as stream:
                try:
                    key_id = read_header(stream, gid, formats=RECORDS_LOG_FORMATS).key_id.hex()
                except CorruptDataError:  # a damaged header: the gallery's one key may do
                    key_id = self.keyring.key_ids(gid)[0]
                key = self.keyring.data_key(gid, key_id)
                frame = next(salvage_frames(stream))
            entry = frame.entries[0] if isinstance(frame, Frame) else None
            if entry is None or entry.kind is not RecordKind.GALLERY:
                return ""
            cipher = RecordCipher(key, bytes.fromhex(gid), random=self._random)
            plain = cipher.open(
                entry.kind, entry.record_id, entry.version, entry.nonce, entry.ciphertext
            )
            return str(unpack(plain, gid)[0]["name"])
        except (*DAMAGE_ERRORS, GalleryError, StopIteration, KeyError, IndexError):
            return ""

    def gallery_ids(self) -> list[str]:
        """Every gallery's id, damaged or not."""
        return self._keyring.gallery_ids() if self._keyring is not None else []

    def check(self, gid: str) -> tuple[str | None, Gallery]:
        """For scrub: the strict load's problem (None when it opens), and the gallery as a
        salvage reads it. Writes nothing (an unfinished erasure is not finished here)."""
        problem = None
        try:
            self._gallery(gid)
        except (*DAMAGE_ERRORS, GalleryError) as exc:
            problem = str(exc) or type(exc).__name__
        return problem, self._gallery(gid, salvage=True)

    def list_galleries(self) -> list[GalleryInfo]:
        """The galleries that open (see ``damaged_galleries`` for the rest)."""
        return sorted((g.info() for g in self._all()), key=lambda info: info.name)

    def damaged_galleries(self) -> list[DamagedGallery]:
        """Galleries that failed to open, with what is wrong: to repair or delete."""
        self._all()
        return sorted(self._damaged.values(), key=lambda d: (d.name, d.gallery_id))

    def _find_damaged(self, name: str) -> DamagedGallery | None:
        """A damaged gallery by its name, or by its id when its name is unreadable."""
        for damaged in self.damaged_galleries():
            if name in (damaged.name, damaged.gallery_id):
                return damaged
        return None

    def open_gallery(self, name: str) -> Gallery:
        for gallery in self._all():
            if gallery.name == name:
                return gallery
        damaged = self._find_damaged(name)
        if damaged is not None:
            error = UnreadableGalleryError if damaged.unreadable else DamagedGalleryError
            raise error(
                f"{damaged.problem}; the other galleries are unaffected; run `edgeid gallery "
                f"repair {damaged.name or damaged.gallery_id}` to keep what still "
                "authenticates, or delete the gallery"
            )
        raise GalleryNotFoundError(f"no gallery named {name!r}; list them with edgeid gallery list")

    def gallery_id_of(self, name: str) -> str:
        """The id of a gallery by name, damaged or not (to delete or repair it)."""
        damaged = self._find_damaged(name)
        return damaged.gallery_id if damaged else self.open_gallery(name).gallery_id

    def repair_gallery(self, name: str) -> RepairReport:
        """Rewrite a gallery from everything in it that still authenticates, under a new
        data key (the old one is erased with the old files); report what was lost."""
        gid = self.gallery_id_of(name)
        self._galleries.pop(gid, None)
        salvaged = self._gallery(gid, salvage=True)
        report_lost = (tuple(salvaged.lost_records), salvaged.damaged_spans)
        lost_subjects = salvaged.lost_subjects
        salvaged.compact()  # a fresh, strict load of the new files ends it
        self._damaged.pop(gid, None)
        self._galleries[gid] = salvaged
        info = salvaged.info()
        logger.info("gallery %s repaired", gid)
        return RepairReport(
            gid,
            info.subjects,
            info.faces,
            report_lost[0],
            tuple(salvaged.lost_thumbnails),
            report_lost[1],
            lost_subjects,
        )

    def create_gallery(self, name: str, *, description: str = "") -> Gallery:
        """A new, empty gallery with its own data key."""
        check_text(name, "name", required=True)
        check_text(description, "description", required=False)
        if any(g.name == name for g in self._all()) or self._find_damaged(name):
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
        gallery = self._gallery(gid)
        self._galleries[gid] = gallery
        logger.info("created gallery %s", gid)
        return gallery

    def delete_gallery(self, name: str) -> None:
        """Erase a gallery (a damaged one too): forget its data keys, then zero-fill and
        unlink its files."""
        gid = self.gallery_id_of(name)
        gallery = self._galleries.get(gid)
        with gallery._lock if gallery else contextlib.nullcontext():
            self.keyring.retain_only(gid, [])  # crypto-erase first, then bytes
            self._galleries.pop(gid, None)
            self._damaged.pop(gid, None)
            shred_tree(self.root / gid)
        logger.info("deleted gallery %s", gid)

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


_NO_THUMB = _ThumbRef(0, 0)  # a salvaged face whose thumbnail frame was not found


def _is_batch(frame: Frame | DamagedSpan) -> bool:
    """A frame shaped as a batch record (its two entries, one id, version 1)."""
    if not isinstance(frame, Frame):
        return False
    entries = frame.entries
    return (
        [e.kind for e in entries] == [RecordKind.SUBJECT, RecordKind.FACE]
        and entries[0].record_id == entries[1].record_id
        and all(e.version == BATCH_VERSION for e in entries)
    )


def _face_bytes(face: Face) -> int:
    """A face's share of a batch record."""
    return FACE_COLUMN_BYTES + 4 * face.embedding.size
