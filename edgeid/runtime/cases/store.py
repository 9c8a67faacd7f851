"""Cases on disk: encrypted like galleries, under ``<home>/cases/<random id>/``.

Layout of one case (the folder name is random; the case number exists only as ciphertext)::

    records.log    source files and faces: the frame log of edgeid/runtime/gallery/log.py
    thumbs.log     each face's aligned chip (JPEG), read one at a time
    case.sealed    case number, retention, ingest runs and counts (replaced atomically)
    results.sealed the latest clusters and leads, derived from records.log (replaced atomically)

Every record and blob is AES-256-GCM under the case's own data key, held in the device
keyring (the galleries' ``keyring.json``) under the scope ``case-<id>``, and bound to the
case, its kind, id and version. Purging a case drops that key first (crypto-erase), then
zero-fills and unlinks the files; a crash in between is finished on the next open.

The results (leads name gallery subjects) are sealed under a key of their own, scope
``leads-<id>``: erasing a subject from the galleries rewrites every case's results without it
under a new results key and drops the old one (``CaseStore.erase_subjects``), so the old
ciphertext is unreadable wherever a copy of it survives. Results written before that scope
existed are under the case key; their file is zero-filled when first rewritten.

A source file and its faces are written as one unit: thumbnails first, then the faces and,
last, the file's own record; a file whose record never landed (a kill mid-write) has its
faces ignored on load and is read again on resume. So a resumed ingest neither loses nor
duplicates faces.

Record kinds: the log format names gallery kinds; a case reuses them by analogy (the case's
own record as GALLERY, a source file as SUBJECT, faces and thumbnails as themselves, the
results snapshot as INDEX), and each plaintext also says ``type``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeid.runtime.audit.justification import check_case
from edgeid.runtime.cases.errors import CaseBusyError, CaseNotFoundError, CorruptCaseError
from edgeid.runtime.cases.records import CaseFace, CaseMeta, CaseResults, ClusterSearch, SourceFile
from edgeid.runtime.errors import BadInputError, StorageWriteError
from edgeid.runtime.gallery.errors import GalleryError
from edgeid.runtime.gallery.records import ID_HEX, among, pack, unpack
from edgeid.runtime.inference.types import FloatArray
from edgeid.runtime.storage.durable import (
    FileWriter,
    OsFileWriter,
    fsync_directory,
    lock_exclusively,
    make_private_dir,
    shred_and_unlink,
    shred_tree,
    write_file_atomically,
)
from edgeid.runtime.vault.crypto import (
    NONCE_BYTES,
    Clock,
    RandomSource,
    RecordCipher,
    RecordKind,
    system_random,
    utc_now,
)
from edgeid.runtime.vault.errors import (
    CorruptDataError,
    DecryptionError,
    UnknownKeyError,
    VaultError,
)
from edgeid.runtime.vault.framed_log import (
    ID_BYTES,
    Entry,
    LogAppender,
    LogHeader,
    ScanState,
    create_log,
    encode_frame,
    read_frame_at,
    read_header,
    scan_frames,
)
from edgeid.runtime.vault.keys import Keyring

if TYPE_CHECKING:
    from edgeid.runtime.cases.repair import SalvagedCase

logger = logging.getLogger(__name__)

CASES_DIR = "cases"
LOCK_FILE = ".lock"
RECORDS_LOG = "records.log"
THUMBS_LOG = "thumbs.log"
META_FILE = "case.sealed"
RESULTS_FILE = "results.sealed"
KEY_SCOPE_PREFIX = "case-"  # not a gallery scope: GalleryStore's recovery leaves it alone
RESULTS_SCOPE_PREFIX = "leads-"  # the results' own key, rotated when a subject is erased
RETIRED_RESULTS = RESULTS_FILE + ".retired"  # the replaced results, zero-filled after commit
# Faces per records frame: keeps a frame small (a crowded video can hold tens of thousands of
# faces) and far below the log's 65,535 entries per frame.
FACES_PER_FRAME = 1000
MAX_TEXT_CHARS = 1000

_FILE_KIND = RecordKind.SUBJECT
_FACE_KIND = RecordKind.FACE
_THUMB_KIND = RecordKind.THUMBNAIL
_META_KIND = RecordKind.GALLERY
_RESULTS_KIND = RecordKind.INDEX
_RESULTS_ID = b"case-results"


def key_scope(case_id: str) -> str:
    return KEY_SCOPE_PREFIX + case_id


def results_scope(case_id: str) -> str:
    return RESULTS_SCOPE_PREFIX + case_id


def without_subjects(
    results: CaseResults, gallery: str, subject_ids: frozenset[str]
) -> CaseResults | None:
    """``results`` without the leads of these subjects of ``gallery``; None if none held."""

    def keep(search: ClusterSearch | None) -> ClusterSearch | None:
        if search is None:
            return None
        leads = tuple(
            lead
            for lead in search.leads
            if not (lead.gallery == gallery and among(lead.subject_id, subject_ids))
        )
        return search if len(leads) == len(search.leads) else replace(search, leads=leads)

    clusters = tuple(replace(c, search=keep(c.search)) for c in results.clusters)
    if all(new.search is old.search for new, old in zip(clusters, results.clusters, strict=True)):
        return None
    return replace(results, clusters=clusters)


def case_key(keyring: Keyring, case_id: str, key_id: str) -> bytes:
    """A case's data key, or ``CorruptCaseError`` saying truly why not: missing from the
    keyring, or present but damaged there (it fails authentication)."""
    where = f"case {case_id}"
    try:
        return keyring.data_key(key_scope(case_id), key_id)
    except UnknownKeyError:
        raise CorruptCaseError(
            f"{where}: its key is not in the keyring (purged, or the keyring is from another "
            "box); restore the keyring from the box's backup"
        ) from None
    except (DecryptionError, ValueError):  # altered bytes, or hex that is no longer hex
        raise CorruptCaseError(
            f"{where}: its wrapped key in the keyring is damaged (it fails authentication); "
            "nothing of this case can be read; restore the keyring from the box's backup or "
            "purge the case; other cases are unaffected"
        ) from None


class DamagedCaseError(CorruptCaseError):
    """The case asked for is damaged: the message names it and the repair."""


def repair_hint(case_id: str) -> str:
    """Named by id: an error message never carries the case number (it may be logged)."""
    return (
        f"; other cases are unaffected; run `edgeid case repair {case_id}` to keep what still "
        "authenticates"
    )


def check_case_number(number: str) -> str:
    """The case number trimmed, or ``BadInputError`` naming what is wrong with it (the one
    rule every door uses: ``edgeid.runtime.audit.justification``)."""
    return check_case(number if isinstance(number, str) else None)


def check_text(value: str, what: str) -> str:
    text = value.strip() if isinstance(value, str) else ""
    if not text:
        raise BadInputError(f"give the {what}")
    if len(text) > MAX_TEXT_CHARS:
        raise BadInputError(f"the {what} is longer than {MAX_TEXT_CHARS} characters")
    if any(not ch.isprintable() and ch not in "\n\t" for ch in text):
        raise BadInputError(f"the {what} contains control characters; remove them")
    return text


@dataclass(frozen=True)
class NewFace:
    """A face to add with its source file: template, where it is, and its aligned chip."""

    embedding: FloatArray
    box: tuple[int, int, int, int]
    score: float
    quality: float
    quality_limiting: str
    chip_jpeg: bytes
    frame: int | None = None
    time_s: float | None = None


class FileWrite:
    """A source file being written (see ``Case.writing``)."""

    def __init__(self, case: Case, file: SourceFile) -> None:
        self._case = case
        self.file = file
        self.faces: dict[str, CaseFace] = {}

    def add_faces(self, faces: Sequence[NewFace]) -> None:
        for start in range(0, len(faces), FACES_PER_FRAME):
            chunk = faces[start : start + FACES_PER_FRAME]
            self.faces.update(self._case._write_faces(self.file, chunk))


# -- one case --------------------------------------------------------------------------------


class Case:
    """One open case: files and faces decrypted in memory, thumbnails read on demand."""

    def __init__(
        self,
        directory: Path,
        case_id: str,
        keyring: Keyring,
        *,
        clock: Clock,
        random: RandomSource,
        writer: FileWriter,
    ) -> None:
        self.directory = directory
        self.case_id = case_id
        self._cid = bytes.fromhex(case_id)
        self._keyring = keyring
        self._clock = clock
        self._random = random
        self._writer = writer
        self.lock = threading.RLock()  # guards the in-memory state; held briefly
        self._write_lock = threading.RLock()  # one writer of the files at a time
        self._ingesting = threading.Lock()  # one ingest (or purge) at a time per case
        self.where = f"case {case_id}"
        self.erased: set[tuple[str, str]] = set()  # (gallery, subject id); CaseStore's own
        self._load()

    # -- loading -----------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            self._read_logs()
        except CorruptDataError as exc:
            message = str(exc).replace("restore it from", "restore the case from")
            raise CorruptCaseError(message) from None
        self.meta = self._read_meta()

    def _read_logs(self) -> None:
        with open(self.directory / RECORDS_LOG, "rb") as stream:
            header = read_header(stream, self.where)
            if header.scope_id != self._cid:
                raise CorruptCaseError(f"{self.where}: {RECORDS_LOG} belongs to another case")
            self._key_id = header.key_id.hex()
            key = case_key(self._keyring, self.case_id, self._key_id)
            self._cipher = RecordCipher(key, self._cid, random=self._random)
            files: dict[str, SourceFile] = {}
            faces: dict[str, CaseFace] = {}
            state = ScanState()
            for frame in scan_frames(stream, self.where, state):
                for entry in frame.entries:
                    self._apply(entry, files, faces)
        self._files = files
        self._faces = {fid: f for fid, f in faces.items() if f.file_record in files}
        self._by_sha = {f.sha256: f for f in files.values() if f.sha256}
        self._refused = {n for f in files.values() if f.sha256 is None for n in f.names}
        self._records = LogAppender(
            self.directory / RECORDS_LOG, state.valid_end, self.where, self._writer
        )
        # Thumbnails past the last one a face points to belong to a file that never landed.
        thumbs_end = max((sum(f.thumb) for f in self._faces.values()), default=0)
        with open(self.directory / THUMBS_LOG, "rb") as stream:
            if read_header(stream, self.where).scope_id != self._cid:
                raise CorruptCaseError(f"{self.where}: {THUMBS_LOG} belongs to another case")
            thumbs_end = max(thumbs_end, stream.tell())
        self._thumbs = LogAppender(
            self.directory / THUMBS_LOG, thumbs_end, self.where, self._writer
        )

    def _open_entry(self, entry: Entry) -> tuple[dict[str, Any], bytes]:
        try:
            plain = self._cipher.open(
                entry.kind, entry.record_id, entry.version, entry.nonce, entry.ciphertext
            )
            return unpack(plain, self.where)
        except DecryptionError:
            raise CorruptCaseError(
                f"{self.where}: a record fails authentication (altered or moved); restore the "
                "case from a backup"
            ) from None
        except (GalleryError, VaultError) as exc:
            raise CorruptCaseError(f"{self.where}: {exc}") from None

    def _apply(
        self, entry: Entry, files: dict[str, SourceFile], faces: dict[str, CaseFace]
    ) -> None:
        head, tail = self._open_entry(entry)
        rid = entry.record_id.hex()
        if entry.kind is _FILE_KIND and head.get("type") == "file":
            known = files.get(rid)
            if known is not None and entry.version <= known.version:
                raise CorruptCaseError(
                    f"{self.where}: a file record reappears with an old version (replayed)"
                )
            files[rid] = SourceFile.from_head(rid, entry.version, head)
        elif entry.kind is _FACE_KIND and head.get("type") == "face":
            faces[rid] = CaseFace.from_head(rid, head, tail)
        else:
            raise CorruptCaseError(f"{self.where}: unexpected record kind {entry.kind.name}")

    @contextlib.contextmanager
    def ingest_exclusively(self) -> Iterator[None]:
        """Hold the case for one ingest or purge; refuse a second one at once (readers are
        never blocked by a running ingest)."""
        if not self._ingesting.acquire(blocking=False):
            raise CaseBusyError(
                "an ingest of this case is running; wait for it to finish or stop it first"
            )
        try:
            yield
        finally:
            self._ingesting.release()

    # -- reading -----------------------------------------------------------------------------

    def files(self) -> list[SourceFile]:
        with self.lock:
            return sorted(self._files.values(), key=lambda f: (f.names[0], f.record_id))

    def file_by_sha(self, sha256: str) -> SourceFile | None:
        with self.lock:
            return self._by_sha.get(sha256)

    def is_refused(self, name: str) -> bool:
        """True when an entry of this name was recorded as failed before it was read."""
        with self.lock:
            return name in self._refused

    def faces(self) -> list[CaseFace]:
        with self.lock:
            return list(self._faces.values())

    def face(self, face_id: str) -> CaseFace:
        with self.lock:
            try:
                return self._faces[face_id]
            except KeyError:
                raise BadInputError(f"no face {face_id} in this case") from None

    def thumbnail(self, face_id: str) -> bytes:
        """The JPEG of a face's aligned chip, read and authenticated now."""
        face = self.face(face_id)
        frame = read_frame_at(self.directory / THUMBS_LOG, face.thumb[0], self.where)
        if len(frame.entries) != 1 or frame.size != face.thumb[1]:
            raise CorruptCaseError(f"{self.where}: a thumbnail is not where it was put")
        entry = frame.entries[0]
        if entry.kind is not _THUMB_KIND or entry.record_id.hex() != face_id:
            raise CorruptCaseError(f"{self.where}: a thumbnail belongs to another face")
        head, jpeg = self._open_entry(entry)
        if head.get("lost"):
            raise CorruptCaseError(
                f"{self.where}: the thumbnail of face {face_id} was lost to damage"
            )
        return jpeg

    # -- writing -----------------------------------------------------------------------------

    def _new_id(self) -> bytes:
        while True:
            rid = self._random(ID_BYTES)
            hexed = rid.hex()
            if hexed not in self._files and hexed not in self._faces and rid != self._cid:
                return rid

    def _entry(self, kind: RecordKind, rid: bytes, version: int, plain: bytes) -> Entry:
        sealed = self._cipher.seal(kind, rid, version, plain)
        return Entry(kind, rid, version, sealed.nonce, sealed.ciphertext)

    @contextlib.contextmanager
    def writing(self, file: SourceFile) -> Iterator[FileWrite]:
        """Write a source file: add its faces to the yielded ``FileWrite`` as they are found
        (set ``FileWrite.file`` to the final record); the file's record is written on exit.

        Until then nothing is visible; an exception (or a kill) leaves the case as before,
        and the file is read again on resume.
        """
        with self._write_lock:  # readers (self.lock) are not held up by a long video
            if file.sha256 and self.file_by_sha(file.sha256):
                raise BadInputError("this file is already in the case; add its name instead")
            rid = self._new_id()
            records_start, thumbs_start = self._records.valid_end, self._thumbs.valid_end
            session = FileWrite(self, replace(file, record_id=rid.hex(), version=1))
            try:
                yield session
                stored = replace(session.file, record_id=rid.hex(), faces=len(session.faces))
                self._records.append(encode_frame([self._file_entry(stored, rid)]))
            except BaseException:
                self._records.roll_back_to(records_start)
                self._thumbs.roll_back_to(thumbs_start)
                raise
        with self.lock:
            self._files[stored.record_id] = stored
            if stored.sha256:
                self._by_sha[stored.sha256] = stored
            else:
                self._refused.update(stored.names)
            self._faces.update(session.faces)

    def add_file(self, file: SourceFile, faces: Sequence[NewFace] = ()) -> SourceFile:
        """Write a source file with its faces, all or nothing; returns once durable."""
        with self.writing(file) as session:
            session.add_faces(faces)
        return self._files[session.file.record_id]

    def _file_entry(self, file: SourceFile, rid: bytes) -> Entry:
        head = {"type": "file", **file.to_head()}
        return self._entry(_FILE_KIND, rid, file.version, pack(head))

    def _write_faces(self, file: SourceFile, chunk: Sequence[NewFace]) -> dict[str, CaseFace]:
        """Thumbnails, then one records frame of faces (durable; not yet visible)."""
        offset = self._thumbs.valid_end
        thumbs: list[bytes] = []
        entries: list[Entry] = []
        written: dict[str, CaseFace] = {}
        for new in chunk:
            fid = self._new_id()
            while fid.hex() in written:
                fid = self._new_id()
            frame = encode_frame([self._entry(_THUMB_KIND, fid, 1, pack({}, new.chip_jpeg))])
            face = CaseFace(
                face_id=fid.hex(),
                file_record=file.record_id,
                file_sha256=file.sha256 or "",
                box=new.box,
                score=float(new.score),
                quality=float(new.quality),
                quality_limiting=new.quality_limiting,
                embedding=np.asarray(new.embedding, dtype=np.float32),
                thumb=(offset, len(frame)),
                frame=new.frame,
                time_s=new.time_s,
            )
            head = {"type": "face", **face.to_head()}
            entries.append(self._entry(_FACE_KIND, fid, 1, pack(head, face.embedding.tobytes())))
            written[face.face_id] = face
            thumbs.append(frame)
            offset += len(frame)
        self._thumbs.append(b"".join(thumbs))
        self._records.append(encode_frame(entries))
        return written

    def add_name(self, sha256: str, name: str) -> SourceFile:
        """Record another name under which a file already in the case was seen."""
        with self._write_lock:
            known = self.file_by_sha(sha256)
            if known is None:
                raise BadInputError("no such file in this case")
            if name in known.names:
                return known
            updated = replace(known, names=(*known.names, name), version=known.version + 1)
            rid = bytes.fromhex(known.record_id)
            self._records.append(encode_frame([self._file_entry(updated, rid)]))
        with self.lock:
            self._files[updated.record_id] = updated
            self._by_sha[sha256] = updated
            return updated

    # -- metadata and results (sealed blobs, replaced atomically) ---------------------------

    def _seal_blob(self, kind: RecordKind, rid: bytes, head: dict[str, Any]) -> bytes:
        sealed = self._cipher.seal(kind, rid, 1, pack(head))
        return bytes.fromhex(self._key_id) + sealed.nonce + sealed.ciphertext

    def _open_blob(self, kind: RecordKind, rid: bytes, blob: bytes) -> dict[str, Any]:
        return _unseal(self._cipher, self._key_id, kind, rid, blob, self.where)

    def _read_meta(self) -> CaseMeta:
        try:
            blob = (self.directory / META_FILE).read_bytes()
        except OSError as exc:
            raise CorruptCaseError(
                f"{self.where}: {META_FILE} unreadable ({exc.strerror})"
            ) from None
        meta = CaseMeta.from_head(self._open_blob(_META_KIND, self._cid, blob))
        if meta.case_id != self.case_id:
            raise CorruptCaseError(f"{self.where}: {META_FILE} belongs to another case")
        return meta

    def save_meta(self, meta: CaseMeta) -> None:
        with self._write_lock:
            if meta.case_id != self.case_id:
                raise BadInputError("metadata of another case")
            blob = self._seal_blob(_META_KIND, self._cid, meta.to_head())
            write_file_atomically(
                self.directory / META_FILE, blob, writer=self._writer, action="writing the case"
            )
            self.meta = meta

    def results(self) -> CaseResults | None:
        results = self._stored_results()
        # An erasure in this process reaches results written by a run that searched before it.
        for gallery, subject_ids in self._erased_by_gallery().items():
            if results is not None:
                results = without_subjects(results, gallery, subject_ids) or results
        return results

    def _stored_results(self) -> CaseResults | None:
        path = self.directory / RESULTS_FILE
        if not path.exists():
            return None
        blob = path.read_bytes()
        key_id = blob[:ID_BYTES].hex()
        if key_id == self._key_id:  # written before results had a key of their own
            head = self._open_blob(_RESULTS_KIND, _RESULTS_ID, blob)
        else:
            cipher = self._results_cipher(key_id)
            head = _unseal(cipher, key_id, _RESULTS_KIND, _RESULTS_ID, blob, self.where)
        return CaseResults.from_head(head)

    def save_results(self, results: CaseResults) -> None:
        with self._write_lock:
            for gallery, subject_ids in self._erased_by_gallery().items():
                results = without_subjects(results, gallery, subject_ids) or results
            self._write_results(results, self._results_key_id())

    # -- erasure of gallery subjects from the leads -------------------------------------------

    def erase_leads(self, gallery: str, subject_ids: frozenset[str]) -> bool:
        """Rewrite the results without these subjects' leads under a new results key, then
        zero-fill the old file and drop the old key. True if any lead was removed; a repeat
        (after a crash) finishes the tidying and changes nothing else."""
        with self._write_lock:
            self._tidy_results()
            path = self.directory / RESULTS_FILE
            if not path.exists():
                return False
            current = self._stored_results()
            cleaned = None if current is None else without_subjects(current, gallery, subject_ids)
            blob = path.read_bytes()
            if cleaned is None and blob[:ID_BYTES].hex() != self._key_id:
                return False
            # Rewritten even when nothing matched if still under the case key (the old layout):
            # its file then holds no erased lead, but other erasures may need its key gone.
            cleaned = cleaned or current
            assert cleaned is not None
            key_id = self._keyring.new_data_key(results_scope(self.case_id))[0]
            retired = self.directory / RETIRED_RESULTS
            os.link(path, retired)
            fsync_directory(self.directory)
            try:
                self._write_results(cleaned, key_id)  # the commit point
            except BaseException:
                retired.unlink(missing_ok=True)  # still the live file's inode: never zero-fill
                raise
            self._tidy_results()
            return cleaned is not current

    def _tidy_results(self) -> None:
        """Zero-fill the results file a rewrite replaced, and keep only the key of the live
        one (finishing a rewrite a crash interrupted)."""
        path = self.directory / RESULTS_FILE
        retired = self.directory / RETIRED_RESULTS
        if retired.exists():
            if path.exists() and os.path.samefile(retired, path):
                retired.unlink()  # the crash came before the commit: this is the live file
            else:
                shred_and_unlink(retired)
        live = path.read_bytes()[:ID_BYTES].hex() if path.exists() else None
        scope = results_scope(self.case_id)
        keep = [k for k in self._keyring.key_ids(scope) if k == live]
        if self._keyring.key_ids(scope) != keep:
            self._keyring.retain_only(scope, keep)

    def _results_key_id(self) -> str:
        """The results key now in use, or a new one."""
        path = self.directory / RESULTS_FILE
        keys = self._keyring.key_ids(results_scope(self.case_id))
        live = path.read_bytes()[:ID_BYTES].hex() if path.exists() else None
        if live in keys:
            return str(live)
        if keys:
            return keys[0]
        return self._keyring.new_data_key(results_scope(self.case_id))[0]

    def _results_cipher(self, key_id: str) -> RecordCipher:
        try:
            key = self._keyring.data_key(results_scope(self.case_id), key_id)
        except (GalleryError, VaultError):
            raise CorruptCaseError(
                f"{self.where}: the key of its results is not in the keyring (erased, or the "
                "keyring is from another box); ingest the case again to rebuild its results"
            ) from None
        return RecordCipher(key, self._cid, random=self._random)

    def _write_results(self, results: CaseResults, key_id: str) -> None:
        cipher = self._results_cipher(key_id)
        sealed = cipher.seal(_RESULTS_KIND, _RESULTS_ID, 1, pack(results.to_head()))
        write_file_atomically(
            self.directory / RESULTS_FILE,
            bytes.fromhex(key_id) + sealed.nonce + sealed.ciphertext,
            writer=self._writer,
            action="writing the case results",
        )

    def _erased_by_gallery(self) -> dict[str, frozenset[str]]:
        grouped: dict[str, set[str]] = {}
        for gallery, subject_id in self.erased:
            grouped.setdefault(gallery, set()).add(subject_id)
        return {g: frozenset(ids) for g, ids in grouped.items()}


# -- every case of the box -------------------------------------------------------------------


def _problem(case_id: str, exc: BaseException) -> str:
    """What is wrong with a case, as one line naming it by id (never its content)."""
    if isinstance(exc, DecryptionError):
        return f"case {case_id}: a record fails authentication (altered or damaged)"
    text = str(exc).replace("restore it from", "restore the case from") or type(exc).__name__
    return text if text.startswith(f"case {case_id}") else f"case {case_id}: {text}"


def _unseal(
    cipher: RecordCipher, key_id: str, kind: RecordKind, rid: bytes, blob: bytes, where: str
) -> dict[str, Any]:
    """Open a sealed blob: ``key_id || nonce || ciphertext``."""
    if blob[:ID_BYTES].hex() != key_id:
        raise CorruptCaseError(f"{where}: a sealed file is under another key")
    rest = blob[ID_BYTES:]
    try:
        plain = cipher.open(kind, rid, 1, rest[:NONCE_BYTES], rest[NONCE_BYTES:])
        return unpack(plain, where)[0]
    except DecryptionError:
        raise CorruptCaseError(
            f"{where}: a sealed file fails authentication; restore it from a backup"
        ) from None
    except (GalleryError, VaultError) as exc:
        raise CorruptCaseError(f"{where}: {exc}") from None


class CaseStore:
    """Every case under ``<home>/cases``, opened by one process at a time.

    ``keyring`` is the device keyring (``GalleryService.store.keyring``), whose store lock the
    caller holds; ``clock``, ``random`` and ``writer`` are injectable for tests.
    """

    def __init__(
        self,
        home: Path,
        keyring: Keyring,
        *,
        clock: Clock = utc_now,
        random: RandomSource = system_random,
        writer: FileWriter | None = None,
    ) -> None:
        self.root = Path(home) / CASES_DIR
        self._keyring = keyring
        self._clock = clock
        self._random = random
        self._writer = writer or OsFileWriter()
        self._open: dict[str, Case] = {}
        self._erased: set[tuple[str, str]] = set()  # subjects erased while this store is open
        self._damaged: dict[str, str] = {}  # case id -> what is wrong (its meta unreadable)
        self._mutex = threading.RLock()
        make_private_dir(self.root)
        self._lock_fd: int | None = lock_exclusively(
            self.root / LOCK_FILE,
            lambda: CaseBusyError(
                f"the cases under {self.root} are open in another process (edgeid serve?); "
                "stop it first"
            ),
        )
        try:
            self._recover()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> CaseStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._open.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- recovery ----------------------------------------------------------------------------

    def _scoped(self) -> set[str]:
        """Case ids that hold a key in the keyring."""
        return {
            scope[len(KEY_SCOPE_PREFIX) :]
            for scope in self._keyring.wrapped_keys()
            if scope.startswith(KEY_SCOPE_PREFIX)
        }

    def _recover(self) -> None:
        """Finish what a crash interrupted: a purge (key gone, files left) or a create (key
        or folder without all its files)."""
        keyed = self._scoped()
        for directory in sorted(self.root.iterdir()):
            if not directory.is_dir() or not ID_HEX.fullmatch(directory.name):
                continue
            complete = all((directory / f).exists() for f in (RECORDS_LOG, THUMBS_LOG, META_FILE))
            if directory.name not in keyed or not complete:
                logger.warning("removing case %s: an interrupted create or purge", directory.name)
                shred_tree(directory)
                continue
            for leftover in directory.glob("*.tmp"):
                shred_and_unlink(leftover)
        for case_id in keyed:
            if not (self.root / case_id).is_dir():
                logger.warning("forgetting the key of case %s: it has no files", case_id)
                self._keyring.retain_only(key_scope(case_id), [])

    # -- cases -------------------------------------------------------------------------------

    def _case(self, case_id: str) -> Case:
        """An open case; a damaged one is named with its repair, and blocks no other."""
        with self._mutex:
            if case_id not in self._open:
                try:
                    case = Case(
                        self.root / case_id,
                        case_id,
                        self._keyring,
                        clock=self._clock,
                        random=self._random,
                        writer=self._writer,
                    )
                except (CorruptDataError, CorruptCaseError, VaultError, OSError, ValueError) as exc:
                    logger.warning("case %s is damaged", case_id)
                    raise DamagedCaseError(
                        f"{_problem(case_id, exc)}{repair_hint(case_id)}"
                    ) from None
                case.erased = self._erased
                self._open[case_id] = case
            return self._open[case_id]

    def _ids(self) -> list[str]:
        keyed = self._scoped()
        return sorted(
            d.name
            for d in self.root.iterdir()
            if d.is_dir() and ID_HEX.fullmatch(d.name) and d.name in keyed
        )

    def list_cases(self) -> list[CaseMeta]:
        """Every case's metadata (only the small sealed file of each is read)."""
        metas = []
        for case_id in self._ids():
            with self._mutex:
                case = self._open.get(case_id)
            try:
                metas.append(case.meta if case else self._peek_meta(case_id))
            except (CorruptDataError, CorruptCaseError, VaultError, OSError, ValueError) as exc:
                # Its number is unreadable: named by id in damaged_cases(), never blocking.
                self._damaged[case_id] = _problem(case_id, exc)
                continue
            self._damaged.pop(case_id, None)
        return sorted(metas, key=lambda m: m.created_at)

    def damaged_cases(self) -> dict[str, str]:
        """Cases whose own record cannot be read, by id, with what is wrong."""
        self.list_cases()
        return dict(sorted(self._damaged.items()))

    def _peek_meta(self, case_id: str) -> CaseMeta:
        directory = self.root / case_id
        blob = (directory / META_FILE).read_bytes()
        # The blob names its key (its first bytes), so damage to the records log's header
        # does not hide the case's number; the whole case is checked when it is opened.
        key_id = blob[:ID_BYTES].hex()
        key = case_key(self._keyring, case_id, key_id)
        cipher = RecordCipher(key, bytes.fromhex(case_id))
        head = _unseal(cipher, key_id, _META_KIND, bytes.fromhex(case_id), blob, f"case {case_id}")
        return CaseMeta.from_head(head)

    def find(self, number: str) -> Case:
        """The case with this number; ``CaseNotFoundError`` when there is none."""
        wanted = check_case_number(number)
        for meta in self.list_cases():
            if meta.number == wanted:
                return self._case(meta.case_id)
        if self._damaged:  # it may be one whose number can no longer be read
            ids = ", ".join(self._damaged)
            raise DamagedCaseError(
                f"no readable case {wanted!r}; the number of damaged case(s) {ids} cannot be "
                "read (it may be one of them): see edgeid case list, run `edgeid case repair "
                "ID`"
            )
        raise CaseNotFoundError(f"no case {wanted!r} on this box; list them with edgeid case list")

    def case_id_of(self, ref: str) -> str:
        """A case's id by its number, or by its id (a damaged case may have no number)."""
        if ID_HEX.fullmatch(ref) and ref in self._ids():
            return ref
        wanted = check_case_number(ref)
        for meta in self.list_cases():
            if meta.number == wanted:
                return meta.case_id
        raise CaseNotFoundError(f"no case {wanted!r} on this box; list them with edgeid case list")

    def repair(self, ref: str) -> SalvagedCase:
        """Rewrite a case from what of it still authenticates, under a new key."""
        from edgeid.runtime.cases.repair import repair_case  # the repair needs this module's names

        with self._mutex:
            case_id = self.case_id_of(ref)
            case = self._open.pop(case_id, None)
            with case.ingest_exclusively() if case else contextlib.nullcontext():
                salvaged = repair_case(
                    self.root / case_id, self._keyring, random=self._random, writer=self._writer
                )
            self._damaged.pop(case_id, None)
        logger.info("repaired case %s", case_id)
        return salvaged

    def exists(self, number: str) -> bool:
        wanted = check_case_number(number)
        return any(meta.number == wanted for meta in self.list_cases())

    def create(
        self,
        number: str,
        *,
        created_by: str,
        model_id: str,
        retention_until: date | None = None,
        may_include_children: bool = True,
    ) -> Case:
        """A new, empty case with its own data key ("faces may include children" on unless
        the creator says it holds adults only)."""
        number = check_case_number(number)
        with self._mutex:
            if self.exists(number):
                raise BadInputError(f"case {number!r} exists already")
            case_id = self._random(ID_BYTES).hex()
            key_id, key = self._keyring.new_data_key(key_scope(case_id))
            directory = self.root / case_id
            try:
                make_private_dir(directory)
                header = LogHeader(bytes.fromhex(case_id), bytes.fromhex(key_id))
                for name in (RECORDS_LOG, THUMBS_LOG):
                    create_log(directory / name, header, self._writer, f"case {case_id}")
                meta = CaseMeta(
                    case_id=case_id,
                    number=number,
                    created_at=self._clock(),
                    created_by=created_by,
                    model_id=model_id,
                    retention_until=retention_until,
                    may_include_children=may_include_children,
                )
                cipher = RecordCipher(key, bytes.fromhex(case_id), random=self._random)
                sealed = cipher.seal(_META_KIND, bytes.fromhex(case_id), 1, pack(meta.to_head()))
                write_file_atomically(
                    directory / META_FILE,
                    bytes.fromhex(key_id) + sealed.nonce + sealed.ciphertext,
                    writer=self._writer,
                    action="writing the case",
                )
            except (GalleryError, VaultError, StorageWriteError, OSError):
                if directory.exists():
                    shred_tree(directory)
                self._keyring.retain_only(key_scope(case_id), [])
                raise
            logger.info("created case %s", case_id)
            return self._case(case_id)

    def open_or_create(
        self,
        number: str,
        *,
        created_by: str,
        model_id: str,
        retention_until: date | None = None,
        may_include_children: bool = True,
    ) -> Case:
        """The case with this number, created (empty) if there is none."""
        with self._mutex:
            if self.exists(number):
                return self.find(number)
            return self.create(
                number,
                created_by=created_by,
                model_id=model_id,
                retention_until=retention_until,
                may_include_children=may_include_children,
            )

    def purge(self, number: str) -> CaseMeta:
        """Erase a case as a unit: its key leaves the keyring (crypto-erase), then its files
        are zero-filled and unlinked."""
        case = self.find(number)
        with case.ingest_exclusively(), case.lock, self._mutex:
            meta = case.meta
            self._keyring.retain_only(key_scope(case.case_id), [])
            self._keyring.retain_only(results_scope(case.case_id), [])
            self._open.pop(case.case_id, None)
            shred_tree(case.directory)
        logger.info("purged case %s", case.case_id)
        return meta

    def erase_subjects(self, gallery: str, subject_ids: frozenset[str]) -> int:
        """A gallery erasure reaches the cases: every case's leads of these subjects are
        removed and the results re-sealed under a new key (``Case.erase_leads``), and results
        saved later by a run that searched before the erasure leave them out. Returns the
        number of cases changed; a case that cannot be opened raises (the erasure stays
        pending and is retried)."""
        with self._mutex:
            self._erased.update((gallery, s) for s in subject_ids)
        self._forget_orphan_result_keys()
        return sum(1 for cid in self._ids() if self._case(cid).erase_leads(gallery, subject_ids))

    def _forget_orphan_result_keys(self) -> None:
        """Results keys of cases that are gone (a purge interrupted between its two keys)."""
        keyed = self._scoped()
        for scope in self._keyring.wrapped_keys():
            case_id = scope[len(RESULTS_SCOPE_PREFIX) :]
            if scope.startswith(RESULTS_SCOPE_PREFIX) and case_id not in keyed:
                self._keyring.retain_only(scope, [])

    def expired(self, today: date | None = None) -> list[CaseMeta]:
        """Cases whose retention date has passed (to review and purge)."""
        today = today or self._clock().date()
        return [m for m in self.list_cases() if m.retention_until and m.retention_until < today]
