"""Salvaging a damaged case: everything that still authenticates, rewritten under a new key.

``salvage_case`` reads a case's files past any damage (frames that fail their checksums are
skipped, records that fail authentication are named by their id) and writes nothing: scrub
uses it to check a case. ``repair_case`` then writes what was salvaged as a fresh case under
a new data key: each file is staged beside the old one and renamed over it, and only then is
the old key dropped. Every file names the key that sealed it, so a repair cut short by a
crash is simply run again.

A face whose source file's record is lost goes with it (a resumed ingest reads that file
again); a face whose thumbnail is lost is kept with a marked stand-in. Without its own record
(``case.sealed``) a case has no number and cannot be repaired, only purged or restored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgeid.runtime.cases.errors import CorruptCaseError
from edgeid.runtime.cases.records import CaseFace, CaseMeta, CaseResults, SourceFile
from edgeid.runtime.cases.store import (
    _FACE_KIND,
    _FILE_KIND,
    _META_KIND,
    _RESULTS_ID,
    _RESULTS_KIND,
    _THUMB_KIND,
    FACES_PER_FRAME,
    META_FILE,
    RECORDS_LOG,
    RESULTS_FILE,
    THUMBS_LOG,
    case_key,
    key_scope,
)
from edgeid.runtime.gallery.errors import GalleryError
from edgeid.runtime.gallery.records import pack, unpack
from edgeid.runtime.storage.durable import FileWriter, OsFileWriter, write_file_atomically
from edgeid.runtime.vault.crypto import NONCE_BYTES, RandomSource, RecordCipher, system_random
from edgeid.runtime.vault.errors import CorruptDataError, DecryptionError, VaultError
from edgeid.runtime.vault.framed_log import (
    HEADER_BYTES,
    ID_BYTES,
    DamagedSpan,
    Entry,
    LogHeader,
    encode_frame,
    encode_header,
    read_header,
    salvage_frames,
)
from edgeid.runtime.vault.keys import Keyring

logger = logging.getLogger(__name__)

LOST_THUMBNAIL = {"lost": True}
_DAMAGE = (CorruptDataError, CorruptCaseError, VaultError, GalleryError, ValueError, KeyError)


@dataclass
class SalvagedCase:
    """What of a case still authenticates, and what does not (ids and counts only)."""

    case_id: str
    meta: CaseMeta | None = None
    files: dict[str, SourceFile] = field(default_factory=dict)
    faces: dict[str, CaseFace] = field(default_factory=dict)
    thumbnails: dict[str, bytes] = field(default_factory=dict)  # face id -> JPEG
    results: CaseResults | None = None
    results_lost: bool = False
    lost_records: list[str] = field(default_factory=list)
    lost_thumbnails: list[str] = field(default_factory=list)
    orphaned_faces: int = 0  # faces whose file record was lost
    damaged_spans: int = 0

    @property
    def clean(self) -> bool:
        return not (
            self.lost_records
            or self.lost_thumbnails
            or self.orphaned_faces
            or self.damaged_spans
            or self.results_lost
            or self.meta is None
        )

    def summary(self) -> str:
        kept = f"kept {len(self.files)} files and {len(self.faces)} faces"
        if self.clean:
            return f"{kept}; nothing lost"
        lost = (
            f"lost {len(self.lost_records)} record(s), {self.orphaned_faces} face(s) of lost "
            f"files, {len(self.lost_thumbnails)} thumbnail(s), {self.damaged_spans} damaged "
            "stretch(es)"
        )
        if self.results_lost:
            lost += ", the clusters and leads (run the ingest again to rebuild them)"
        if self.meta is None:
            lost += ", the case's own record"
        return f"{kept}; {lost}"


def _key_id_of(path: Path, keyring: Keyring, case_id: str, salvaged: SalvagedCase) -> str:
    """The key a log names in its header; with a damaged header, the case's one key."""
    try:
        with open(path, "rb") as stream:
            return read_header(stream, f"case {case_id}").key_id.hex()
    except (CorruptDataError, OSError):
        salvaged.damaged_spans += 1
        keys = keyring.key_ids(key_scope(case_id))
        if len(keys) != 1:
            raise CorruptCaseError(
                f"case {case_id}: {path.name} has a damaged header and no one key to try; "
                "restore the case from a backup"
            ) from None
        return keys[0]


def _cipher(keyring: Keyring, case_id: str, key_id: str) -> RecordCipher:
    return RecordCipher(case_key(keyring, case_id, key_id), bytes.fromhex(case_id))


def _open_blob(keyring: Keyring, case_id: str, kind: Any, rid: bytes, path: Path) -> dict[str, Any]:
    """A sealed blob opened with the key it names (any key the case holds)."""
    blob = path.read_bytes()
    cipher = _cipher(keyring, case_id, blob[:ID_BYTES].hex())
    rest = blob[ID_BYTES:]
    plain = cipher.open(kind, rid, 1, rest[:NONCE_BYTES], rest[NONCE_BYTES:])
    return unpack(plain, f"case {case_id}")[0]


def salvage_case(directory: Path, keyring: Keyring) -> SalvagedCase:
    """Read a case past its damage; writes nothing. ``CorruptCaseError`` when its key
    cannot be had (nothing of it can then be read)."""
    case_id = directory.name
    cid = bytes.fromhex(case_id)
    salvaged = SalvagedCase(case_id)
    try:
        salvaged.meta = CaseMeta.from_head(
            _open_blob(keyring, case_id, _META_KIND, cid, directory / META_FILE)
        )
    except (*_DAMAGE, OSError):
        salvaged.lost_records.append(META_FILE)
    records = directory / RECORDS_LOG
    cipher = _cipher(keyring, case_id, _key_id_of(records, keyring, case_id, salvaged))
    faces: dict[str, CaseFace] = {}
    with open(records, "rb") as stream:
        for item in salvage_frames(stream):
            if isinstance(item, DamagedSpan):
                salvaged.damaged_spans += 1
                salvaged.lost_records += [e.record_id.hex() for e in item.entries]
                continue
            for entry in item.entries:
                _salvage_entry(cipher, entry, salvaged, faces)
    salvaged.faces = {fid: f for fid, f in faces.items() if f.file_record in salvaged.files}
    salvaged.orphaned_faces = len(faces) - len(salvaged.faces)
    _salvage_thumbnails(directory, keyring, case_id, salvaged)
    if (directory / RESULTS_FILE).exists():
        try:
            head = _open_blob(
                keyring, case_id, _RESULTS_KIND, _RESULTS_ID, directory / RESULTS_FILE
            )
            salvaged.results = CaseResults.from_head(head)
        except (*_DAMAGE, OSError):
            salvaged.results_lost = True
    return salvaged


def _salvage_entry(
    cipher: RecordCipher, entry: Entry, salvaged: SalvagedCase, faces: dict[str, CaseFace]
) -> None:
    rid = entry.record_id.hex()
    try:
        plain = cipher.open(
            entry.kind, entry.record_id, entry.version, entry.nonce, entry.ciphertext
        )
        head, tail = unpack(plain, f"case {salvaged.case_id}")
        if entry.kind is _FILE_KIND and head.get("type") == "file":
            known = salvaged.files.get(rid)
            if known is None or entry.version > known.version:
                salvaged.files[rid] = SourceFile.from_head(rid, entry.version, head)
        elif entry.kind is _FACE_KIND and head.get("type") == "face":
            faces[rid] = CaseFace.from_head(rid, head, tail)
        else:
            raise ValueError("unexpected record")
    except (*_DAMAGE, DecryptionError):
        logger.warning("case %s: record %s is lost", salvaged.case_id, rid)
        salvaged.lost_records.append(rid)


def _salvage_thumbnails(
    directory: Path, keyring: Keyring, case_id: str, salvaged: SalvagedCase
) -> None:
    path = directory / THUMBS_LOG
    try:
        cipher = _cipher(keyring, case_id, _key_id_of(path, keyring, case_id, salvaged))
        with open(path, "rb") as stream:
            for item in salvage_frames(stream):
                if isinstance(item, DamagedSpan):
                    salvaged.damaged_spans += 1
                    continue
                entry = item.entries[0]
                fid = entry.record_id.hex()
                if len(item.entries) != 1 or entry.kind is not _THUMB_KIND:
                    continue
                try:
                    plain = cipher.open(
                        entry.kind, entry.record_id, entry.version, entry.nonce, entry.ciphertext
                    )
                    salvaged.thumbnails[fid] = unpack(plain, f"case {case_id}")[1]
                except (*_DAMAGE, DecryptionError):
                    continue
    except (*_DAMAGE, OSError):
        pass
    salvaged.lost_thumbnails = sorted(set(salvaged.faces) - set(salvaged.thumbnails))


def repair_case(
    directory: Path,
    keyring: Keyring,
    *,
    random: RandomSource = system_random,
    writer: FileWriter | None = None,
) -> SalvagedCase:
    """Rewrite a case from what still authenticates, under a new key; the old key is
    dropped last (crypto-erasing whatever the old files held)."""
    writer = writer or OsFileWriter()
    salvaged = salvage_case(directory, keyring)
    case_id = salvaged.case_id
    if salvaged.meta is None:
        raise CorruptCaseError(
            f"case {case_id}: its own record ({META_FILE}) is damaged, so its number is lost; "
            "restore the case from a backup, or purge it"
        )
    cid = bytes.fromhex(case_id)
    scope = key_scope(case_id)
    old_keys = keyring.key_ids(scope)
    key_id, key = keyring.new_data_key(scope)
    cipher = RecordCipher(key, cid, random=random)
    header = encode_header(LogHeader(cid, bytes.fromhex(key_id)))

    def entry(kind: Any, rid: bytes, version: int, plain: bytes) -> Entry:
        sealed = cipher.seal(kind, rid, version, plain)
        return Entry(kind, rid, version, sealed.nonce, sealed.ciphertext)

    thumbs, records = [header], [header]
    offset = HEADER_BYTES
    by_file: dict[str, list[CaseFace]] = {}
    for face in salvaged.faces.values():
        by_file.setdefault(face.file_record, []).append(face)
    for file in salvaged.files.values():
        own = by_file.get(file.record_id, [])
        for start in range(0, len(own), FACES_PER_FRAME):
            face_entries = []
            for face in own[start : start + FACES_PER_FRAME]:
                jpeg = salvaged.thumbnails.get(face.face_id)
                head: dict[str, Any] = {} if jpeg is not None else LOST_THUMBNAIL
                fid = bytes.fromhex(face.face_id)
                frame = encode_frame([entry(_THUMB_KIND, fid, 1, pack(head, jpeg or b""))])
                thumbs.append(frame)
                placed = replace(face, thumb=(offset, len(frame)))
                offset += len(frame)
                plain = pack(
                    {"type": "face", **placed.to_head()},
                    np.asarray(placed.embedding, dtype=np.float32).tobytes(),
                )
                face_entries.append(entry(_FACE_KIND, fid, 1, plain))
            records.append(encode_frame(face_entries))
        head = {"type": "file", **file.to_head()}
        records.append(
            encode_frame(
                [entry(_FILE_KIND, bytes.fromhex(file.record_id), file.version, pack(head))]
            )
        )

    def blob(kind: Any, rid: bytes, head: dict[str, Any]) -> bytes:
        sealed = cipher.seal(kind, rid, 1, pack(head))
        return bytes.fromhex(key_id) + sealed.nonce + sealed.ciphertext

    staged = {
        THUMBS_LOG: b"".join(thumbs),
        RECORDS_LOG: b"".join(records),
        META_FILE: blob(_META_KIND, cid, salvaged.meta.to_head()),
    }
    if salvaged.results is not None:
        staged[RESULTS_FILE] = blob(_RESULTS_KIND, _RESULTS_ID, salvaged.results.to_head())
    # A crash part-way leaves files under the new key and files under the old: both keys stay
    # until a repair, run again, finishes.
    for name, data in staged.items():
        write_file_atomically(directory / name, data, writer=writer, action="repairing a case")
    if salvaged.results is None:
        (directory / RESULTS_FILE).unlink(missing_ok=True)
    keyring.retain_only(scope, [key_id])  # the old key goes last: crypto-erases old blocks
    logger.info("case %s repaired (%d old key(s) erased)", case_id, len(old_keys))
    return salvaged
