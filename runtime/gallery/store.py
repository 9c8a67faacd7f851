"""Named, encrypted, durable galleries of subjects and their faces under one state directory.

Layout under ``<state_dir>/galleries/``::

    keyring.json                  wrapped data keys (see keys.py)
    .lock                         one writer process at a time
    <gallery_id>/records.log      gallery metadata, subjects, faces, tombstones
    <gallery_id>/thumbs-<key_id>.log   thumbnails, read one at a time, never at open

Both logs use the frame format of ``log.py``; every record is sealed with the gallery's data
key, bound to gallery, kind, record id and version. Names, notes, legal basis, embeddings and
thumbnails exist only as ciphertext; only random ids, kinds, versions and sizes are visible.

An enrolment is acknowledged (the call returns) only after its thumbnails and then its one
records frame are written and fsynced, file and folder. Deleting writes a tombstone;
``compact()`` then rewrites both logs under a new data key without the deleted records,
commits by one atomic rename, zero-fills the old files before unlinking them, and drops the
old data key from the keyring, so deleted data is gone from the files and crypto-erased
wherever old blocks survive.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from runtime.errors import StorageWriteError
from runtime.gallery.crypto import (
    NONCE_BYTES,
    Clock,
    RandomSource,
    RecordCipher,
    RecordKind,
    system_random,
    utc_now,
)
from runtime.gallery.errors import (
    CorruptGalleryError,
    DecryptionError,
    GalleryBusyError,
    GalleryError,
    GalleryExistsError,
    GalleryNotFoundError,
    InvalidRecordError,
)
from runtime.gallery.keys import KekProvider, Keyring
from runtime.gallery.log import (
    HEADER_BYTES,
    ID_BYTES,
    Entry,
    LogAppender,
    LogHeader,
    ScanState,
    create_log,
    encode_frame,
    encode_header,
    read_frame_at,
    read_header,
    scan_frames,
)
from runtime.gallery.records import (
    ID_HEX,
    Embedding,
    Enrolment,
    Face,
    FaceDraft,
    GalleryInfo,
    NewFace,
    NewSubject,
    Subject,
    check_face,
    check_subject,
    check_text,
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
    make_private_dir,
    shred_and_unlink,
    write_all,
    write_error,
)

logger = logging.getLogger(__name__)

GALLERIES_DIR = "galleries"
KEYRING_FILE = "keyring.json"
LOCK_FILE = ".lock"
RECORDS_LOG = "records.log"
STAGED_SUFFIX = ".new"  # a compaction's output before its commit
RETIRED_SUFFIX = ".retired"  # a hard link to the pre-compaction log, zero-filled after commit


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
        """How errors and logs name this gallery: its id and name, never its content."""
        return f"gallery {self.gallery_id}" + (f" ({self.name!r})" if self.name else "")

    @property
    def key_id(self) -> str:
        """The data key now sealing this gallery; it changes at every ``compact()``."""
        return self._key_id

    def _reset(self) -> None:
        self.name = ""
        self.description = ""
        self.created_at = datetime.min
        self._subjects: dict[str, Subject] = {}
        self._faces: dict[str, Face] = {}
        self._thumbs: dict[str, _ThumbRef] = {}
        self._by_subject: dict[str, list[str]] = {}
        self._versions: dict[bytes, int] = {}
        self._thumbs_end = HEADER_BYTES
        self.torn_bytes = 0

    def _load(self) -> None:
        self._reset()
        path = self.directory / RECORDS_LOG
        where = self.where
        with open(path, "rb") as stream:
            header = read_header(stream, where)
            if header.scope_id != self._gid:
                raise CorruptGalleryError(f"{where}: {RECORDS_LOG} belongs to another gallery")
            self._key_id = header.key_id.hex()
            self._cipher = RecordCipher(
                self._keyring.data_key(self.gallery_id, self._key_id),
                self._gid,
                random=self._random,
            )
            state = ScanState()
            for frame in scan_frames(stream, where, state):
                for entry in frame.entries:
                    self._apply(entry, self._open(entry, frame.offset))
                if not self.name:
                    raise CorruptGalleryError(f"{where}: first record is not the gallery's own")
        if not self.name:
            raise CorruptGalleryError(f"{where}: {RECORDS_LOG} holds no gallery record")
        self.torn_bytes = state.torn_bytes
        self._records = LogAppender(path, state.valid_end, self.where, self._writer)
        self._thumbs_path = self.directory / thumbs_log_name(self._key_id)
        self._thumb_appender: LogAppender | None = None

    def _open(self, entry: Entry, offset: int) -> bytes:
        try:
            return self._cipher.open(
                entry.kind, entry.record_id, entry.version, entry.nonce, entry.ciphertext
            )
        except DecryptionError:
            logger.warning("%s: record at byte %d failed authentication", self.where, offset)
            raise

    def _apply(self, entry: Entry, plain: bytes) -> None:
        """Fold one decrypted record into the in-memory state (while loading and appending)."""
        where = self.where
        known = self._versions.get(entry.record_id, 0)
        if entry.version <= known:
            raise CorruptGalleryError(
                f"{where}: a record reappears with an old version (replayed or reordered); "
                "restore the gallery from a backup"
            )
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
        if face.subject_id not in self._subjects:
            raise ValueError("face of an unknown subject")
        self._faces[rid] = face
        self._thumbs[rid] = _ThumbRef(offset, size)
        faces = self._by_subject[face.subject_id]
        if rid not in faces:
            faces.append(rid)

    def _forget(self, rid: str) -> None:
        if rid in self._subjects:
            del self._subjects[rid]
            for face_id in self._by_subject.pop(rid, []):
                self._faces.pop(face_id, None)
                self._thumbs.pop(face_id, None)
        elif rid in self._faces:
            face = self._faces.pop(rid)
            self._thumbs.pop(rid, None)
            self._by_subject[face.subject_id].remove(rid)
        else:
            raise ValueError("tombstone of an unknown record")

    # -- reading ---------------------------------------------------------------------------

    def subjects(self) -> list[Subject]:
        with self._lock:
            return list(self._subjects.values())

    def subject(self, subject_id: str) -> Subject:
        with self._lock:
            try:
                return self._subjects[subject_id]
            except KeyError:
                raise GalleryNotFoundError(f"no subject {subject_id} in {self.where}") from None

    def faces(self, subject_id: str | None = None) -> list[Face]:
        with self._lock:
            if subject_id is None:
                return list(self._faces.values())
            self.subject(subject_id)
            return [self._faces[f] for f in self._by_subject[subject_id]]

    def face(self, face_id: str) -> Face:
        with self._lock:
            try:
                return self._faces[face_id]
            except KeyError:
                raise GalleryNotFoundError(f"no face {face_id} in {self.where}") from None

    def embeddings(self, model_id: str) -> tuple[list[str], Embedding]:
        """Face ids and their embeddings (one row each) for one model: the index's input."""
        with self._lock:
            faces = [f for f in self._faces.values() if f.model_id == model_id]
        if not faces:
            return [], np.zeros((0, 0), dtype=np.float32)
        return [f.face_id for f in faces], np.stack([f.embedding for f in faces])

    def thumbnail(self, face_id: str) -> bytes:
        """The JPEG of a face's aligned chip, read and authenticated now."""
        with self._lock:
            self.face(face_id)
            ref = self._thumbs[face_id]
            frame = read_frame_at(self._thumbs_path, ref.offset, self.where)
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
        return [
            s
            for s in self.subjects()
            if s.retention_until is not None and s.retention_until < today
        ]

    def info(self) -> GalleryInfo:
        with self._lock:
            return GalleryInfo(
                self.gallery_id,
                self.name,
                self.description,
                self.created_at,
                len(self._subjects),
                len(self._faces),
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

    def _new_id(self) -> bytes:
        while True:
            rid = self._random(ID_BYTES)
            if rid not in self._versions and rid != self._gid:
                return rid

    def _thumbs_appender(self) -> LogAppender:
        if self._thumb_appender is None:
            if not self._thumbs_path.exists():
                header = LogHeader(self._gid, bytes.fromhex(self._key_id))
                create_log(self._thumbs_path, header, self._writer, self.where)
            self._thumb_appender = LogAppender(
                self._thumbs_path, self._thumbs_end, self.where, self._writer
            )
        return self._thumb_appender

    def _write(
        self, records: list[tuple[RecordKind, bytes, int, bytes]], drafts: Sequence[FaceDraft]
    ) -> None:
        """Durably write thumbnails, then one records frame; only then update memory.

        A failure rolls both logs back to what they were, so the gallery is unchanged.
        """
        entries = [_seal_entry(self._cipher, *record) for record in records]
        plains = [record[3] for record in records]
        appender = self._thumbs_appender() if drafts else None
        thumbs_before = appender.valid_end if appender else 0
        if appender:
            offset, thumbs = appender.valid_end, []
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
            appender.append(b"".join(thumbs))
        try:
            self._records.append(encode_frame(entries))
        except (GalleryError, StorageWriteError):
            if appender:
                appender.roll_back_to(thumbs_before)  # thumbnails no record points to
            raise
        for entry, plain in zip(entries, plains, strict=True):
            self._apply(entry, plain)

    def _drafts(self, subject_id: str, faces: Sequence[NewFace], now: datetime) -> list[FaceDraft]:
        drafts = []
        taken: set[bytes] = set()
        for face in faces:
            vector = check_face(face)
            fid = self._new_id()
            while fid in taken:
                fid = self._new_id()
            taken.add(fid)
            drafts.append(
                FaceDraft(
                    fid,
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
        check_subject(subject)
        with self._lock:
            now = self._clock()
            sid = self._new_id()
            drafts = self._drafts(sid.hex(), faces, now)
            if any(d.face_id == sid for d in drafts):
                return self.enroll(subject, faces)  # a 2**-128 collision; draw again
            head = subject_head(subject, now)
            self._write([(RecordKind.SUBJECT, sid, 1, pack(head))], drafts)
            rid = sid.hex()
            return Enrolment(self._subjects[rid], tuple(self.faces(rid)))

    def add_faces(self, subject_id: str, faces: Sequence[NewFace]) -> list[Face]:
        """Add faces to an enrolled subject, all or nothing."""
        with self._lock:
            self.subject(subject_id)
            drafts = self._drafts(subject_id, faces, self._clock())
            if drafts:
                self._write([], drafts)
            return [self._faces[d.face_id.hex()] for d in drafts]

    def restore(self, subject: Subject, faces: Sequence[tuple[Face, bytes]]) -> None:
        """Write a subject and its faces (with thumbnails) keeping their ids and times: import."""
        with self._lock:
            sid = parse_id(subject.subject_id, "subject")
            ids = [sid] + [parse_id(f.face_id, "face") for f, _ in faces]
            if len(set(ids)) != len(ids) or any(i in self._versions or i == self._gid for i in ids):
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
            cipher = RecordCipher(key, self._gid, random=self._random)
            staged = self.directory / (RECORDS_LOG + STAGED_SUFFIX)
            retired = self.directory / (RECORDS_LOG + RETIRED_SUFFIX)
            thumbs_path = self.directory / thumbs_log_name(key_id)
            try:
                self._write_compacted(staged, thumbs_path, cipher, bytes.fromhex(key_id))
                os.link(self.directory / RECORDS_LOG, retired)
                fsync_directory(self.directory)
                os.replace(staged, self.directory / RECORDS_LOG)  # the commit point
            except (OSError, GalleryError, StorageWriteError) as exc:
                self._abandon_compaction(staged, retired, thumbs_path, old_key_id)
                if isinstance(exc, GalleryError | StorageWriteError):
                    raise
                raise write_error(f"compacting {self.where}", str(self.directory), exc) from exc
            self._finish_compaction(retired, old_thumbs, key_id)
            logger.info("%s: compacted; the previous data key is erased", self.where)
            self._load()

    def _finish_compaction(self, retired: Path, old_thumbs: Path, key_id: str) -> None:
        """After the commit: erase the old files and key. A failure here loses nothing; the
        next ``GalleryStore`` open finishes the job."""
        try:
            fsync_directory(self.directory)
            shred_and_unlink(retired)
            shred_and_unlink(old_thumbs)
            self._keyring.retain_only(self.gallery_id, [key_id])
        except (OSError, GalleryError, StorageWriteError) as exc:
            logger.warning(
                "%s: compacted, but erasing the old files is unfinished: %s", self.where, exc
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
        except (GalleryError, StorageWriteError) as exc:
            # e.g. still no space: the next open drops the unused key
            logger.warning("%s: could not drop an unused data key yet: %s", self.where, exc)

    def _write_compacted(
        self, staged: Path, thumbs_path: Path, cipher: RecordCipher, key_id: bytes
    ) -> None:
        header = encode_header(LogHeader(self._gid, key_id))
        meta = {
            "name": self.name,
            "description": self.description,
            "created_at": self.created_at.isoformat(),
        }
        with (
            _durable_file(thumbs_path, self._writer) as thumbs_fd,
            _durable_file(staged, self._writer) as records_fd,
        ):
            write_all(self._writer, thumbs_fd, header)
            write_all(self._writer, records_fd, header)
            gallery = _seal_entry(cipher, RecordKind.GALLERY, self._gid, 1, pack(meta))
            write_all(self._writer, records_fd, encode_frame([gallery]))
            offset = HEADER_BYTES
            for subject in self._subjects.values():
                sid = bytes.fromhex(subject.subject_id)
                head = subject_head(subject, subject.enrolled_at)
                entries = [_seal_entry(cipher, RecordKind.SUBJECT, sid, 1, pack(head))]
                for face in self.faces(subject.subject_id):
                    fid = bytes.fromhex(face.face_id)
                    jpeg = pack({}, self.thumbnail(face.face_id))
                    thumb = encode_frame([_seal_entry(cipher, RecordKind.THUMBNAIL, fid, 1, jpeg)])
                    write_all(self._writer, thumbs_fd, thumb)
                    plain = pack(face_head(face, (offset, len(thumb))), face.embedding.tobytes())
                    entries.append(_seal_entry(cipher, RecordKind.FACE, fid, 1, plain))
                    offset += len(thumb)
                write_all(self._writer, records_fd, encode_frame(entries))
        fsync_directory(self.directory)


# -- the galleries of one box --------------------------------------------------------------


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise GalleryBusyError(
            f"the galleries under {path.parent} are already open (edgeid serve?); stop it first"
        ) from None
    return fd


def _shred_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            shred_and_unlink(path)
    directory.rmdir()
    fsync_directory(directory.parent)


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
        self._lock_fd: int | None = _lock(self.root / LOCK_FILE)
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
                _shred_tree(directory)
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
            key_id = read_header(stream, f"gallery {directory.name}").key_id.hex()
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
        except (GalleryError, StorageWriteError):
            if directory.exists():
                _shred_tree(directory)
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
            _shred_tree(gallery.directory)
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
