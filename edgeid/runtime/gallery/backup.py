"""Export a gallery to one encrypted file, and import it on another box.

The file is a JSON preamble (format, export id, scrypt parameters: nothing identifying) and
then a log in the format of ``log.py`` whose records are sealed under a key derived from the
export passphrase, bound to the export id. Frames: the gallery's metadata, one frame per
subject with its faces and thumbnails, and an end record with the counts, so a truncated or
spliced file is refused. Deleted subjects are not exported; a backup made before a deletion
still holds them until it is destroyed.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any, BinaryIO

from edgeid.runtime.errors import StorageWriteError
from edgeid.runtime.gallery.errors import BackupError, GalleryError
from edgeid.runtime.gallery.records import (
    face_from,
    face_head,
    pack,
    subject_from,
    subject_head,
    unpack,
)
from edgeid.runtime.gallery.store import Gallery, GalleryStore
from edgeid.runtime.storage.durable import (
    PRIVATE_FILE_MODE,
    OsFileWriter,
    fsync_directory,
    write_all,
    write_error,
)
from edgeid.runtime.vault.crypto import (
    SCRYPT_DEFAULT_LOG2_N,
    Clock,
    RandomSource,
    RecordCipher,
    RecordKind,
    ScryptParams,
    derive_key,
    new_scrypt_params,
    system_random,
    utc_now,
)
from edgeid.runtime.vault.errors import CorruptDataError, VaultError
from edgeid.runtime.vault.framed_log import (
    ID_BYTES,
    Entry,
    Frame,
    LogHeader,
    ScanState,
    encode_frame,
    encode_header,
    read_header,
    scan_frames,
)

logger = logging.getLogger(__name__)

EXPORT_MAGIC = b"EDGEIDGX"
EXPORT_FORMAT = "edgeid-gallery-export"
EXPORT_VERSION = 1
MAX_PREAMBLE_BYTES = 64 << 10  # the preamble is a few hundred bytes; more is not our file
_NO_KEY_ID = bytes(ID_BYTES)  # an export has one key, derived from the passphrase


def export_gallery(
    store: GalleryStore,
    name: str,
    dest: Path,
    passphrase: str,
    *,
    log2_n: int = SCRYPT_DEFAULT_LOG2_N,
    clock: Clock = utc_now,
    random: RandomSource = system_random,
) -> None:
    """Write gallery ``name`` to ``dest``, encrypted under ``passphrase``."""
    gallery = store.open_gallery(name)
    if dest.exists():
        raise BackupError(f"{dest} exists; choose a new file name for the export")
    params = new_scrypt_params(log2_n=log2_n, random=random)
    export_id = random(ID_BYTES)
    cipher = RecordCipher(derive_key(passphrase, params), export_id, random=random)
    preamble = json.dumps(
        {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "export_id": export_id.hex(),
            "scrypt": params.to_json(),
        }
    ).encode()
    tmp = dest.with_name(dest.name + ".tmp")
    writer = OsFileWriter()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
        try:
            write_all(writer, fd, EXPORT_MAGIC + struct.pack(">I", len(preamble)) + preamble)
            write_all(writer, fd, encode_header(LogHeader(export_id, _NO_KEY_ID)))
            for frame in _frames(gallery, cipher, export_id, clock):
                write_all(writer, fd, frame)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
        fsync_directory(dest.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error("exporting the gallery", str(dest.parent), exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("exported gallery %s as export %s", gallery.gallery_id, export_id.hex())


def _entry(cipher: RecordCipher, kind: RecordKind, rid: bytes, plain: bytes) -> Entry:
    sealed = cipher.seal(kind, rid, 1, plain)
    return Entry(kind, rid, 1, sealed.nonce, sealed.ciphertext)


def _frames(
    gallery: Gallery, cipher: RecordCipher, export_id: bytes, clock: Clock
) -> Iterator[bytes]:
    meta = {
        "name": gallery.name,
        "description": gallery.description,
        "created_at": gallery.created_at.isoformat(),
        "exported_at": clock().isoformat(),
    }
    yield encode_frame([_entry(cipher, RecordKind.GALLERY, export_id, pack(meta))])
    subjects = faces = 0
    for subject in gallery.subjects():
        entries = [
            _entry(
                cipher,
                RecordKind.SUBJECT,
                bytes.fromhex(subject.subject_id),
                pack(subject_head(subject, subject.enrolled_at)),
            )
        ]
        for face in gallery.faces(subject.subject_id):
            fid = bytes.fromhex(face.face_id)
            head = face_head(face)
            entries.append(
                _entry(cipher, RecordKind.FACE, fid, pack(head, face.embedding.tobytes()))
            )
            thumb = gallery.thumbnail(face.face_id)
            entries.append(_entry(cipher, RecordKind.THUMBNAIL, fid, pack({}, thumb)))
            faces += 1
        subjects += 1
        yield encode_frame(entries)
    end = {"subjects": subjects, "faces": faces}
    yield encode_frame([_entry(cipher, RecordKind.EXPORT_END, export_id, pack(end))])


def _read_preamble(stream: BinaryIO, src: Path) -> tuple[bytes, ScryptParams]:
    magic = stream.read(len(EXPORT_MAGIC) + 4)
    if len(magic) != len(EXPORT_MAGIC) + 4 or not magic.startswith(EXPORT_MAGIC):
        raise BackupError(f"{src} is not an edgeid gallery export")
    (size,) = struct.unpack(">I", magic[len(EXPORT_MAGIC) :])
    if size > MAX_PREAMBLE_BYTES:
        raise BackupError(f"{src} is not an edgeid gallery export (preamble too large)")
    try:
        preamble = json.loads(stream.read(size))
        if (preamble["format"], preamble["version"]) != (EXPORT_FORMAT, EXPORT_VERSION):
            raise BackupError(
                f"{src} is export format {preamble['format']} v{preamble['version']}; this "
                f"build reads {EXPORT_FORMAT} v{EXPORT_VERSION}"
            )
        export_id = bytes.fromhex(preamble["export_id"])
        params = ScryptParams.from_json(preamble["scrypt"])
    except (ValueError, KeyError, TypeError, GalleryError, VaultError, StorageWriteError) as exc:
        if isinstance(exc, BackupError):
            raise
        raise BackupError(f"{src} has a malformed preamble: {exc}") from exc
    if len(export_id) != ID_BYTES:
        raise BackupError(f"{src} has a malformed export id")
    return export_id, params


def import_gallery(
    store: GalleryStore, src: Path, passphrase: str, *, name: str | None = None
) -> Gallery:
    """Create a gallery from an export; ids and enrolment times are kept, keys are new.

    A wrong passphrase is ``DecryptionError`` before anything is written; a damaged or
    truncated file is ``BackupError`` and the half-made gallery is erased.
    """
    where = f"export {src.name}"
    with open(src, "rb") as stream:
        export_id, params = _read_preamble(stream, src)
        header = read_header(stream, where)
        if header.scope_id != export_id:
            raise BackupError(f"{src}: preamble and log disagree; the file was altered")
        cipher = RecordCipher(derive_key(passphrase, params), export_id)
        state = ScanState()
        frames = _decrypted(scan_frames(stream, where, state, start=stream.tell()), cipher, where)
        try:
            entry, (head, _) = next(frames)[0]
        except StopIteration:
            raise BackupError(f"{src} is truncated; copy it again") from None
        except CorruptDataError as exc:
            raise BackupError(f"{src} is damaged: {exc}; make the export again") from exc
        if entry.kind is not RecordKind.GALLERY or entry.record_id != export_id:
            raise BackupError(f"{src} does not start with its gallery record")
        gallery = store.create_gallery(
            name or str(head["name"]), description=str(head["description"])
        )
        try:
            _import_subjects(gallery, frames)
            if state.torn_bytes:
                raise BackupError("the file ends inside a record")
        except (BackupError, CorruptDataError) as exc:
            store.delete_gallery(gallery.name)
            raise BackupError(
                f"{src} is damaged or truncated ({exc}); make the export again"
            ) from exc
        except BaseException:
            store.delete_gallery(gallery.name)
            raise
    logger.info("imported export %s as gallery %s", export_id.hex(), gallery.gallery_id)
    return gallery


_Plain = tuple[Entry, tuple[dict[str, Any], bytes]]


def _decrypted(frames: Iterator[Frame], cipher: RecordCipher, where: str) -> Iterator[list[_Plain]]:
    for frame in frames:
        yield [
            (e, unpack(cipher.open(e.kind, e.record_id, e.version, e.nonce, e.ciphertext), where))
            for e in frame.entries
        ]


def _date(value: object) -> date | None:
    return None if value is None else date.fromisoformat(str(value))


def _import_subjects(gallery: Gallery, frames: Iterator[list[_Plain]]) -> None:
    """Restore every subject frame; check the end record's counts and that nothing follows."""
    faces = 0
    for subjects, plains in enumerate(frames):
        entry, (head, _) = plains[0]
        if entry.kind is RecordKind.EXPORT_END:
            if (head.get("subjects"), head.get("faces")) != (subjects, faces):
                raise BackupError("the end record does not match the contents")
            if next(frames, None) is not None:
                raise BackupError("records follow the end record")
            return
        _restore_subject(gallery, plains)
        faces += (len(plains) - 1) // 2
    raise BackupError("no end record")


def _restore_subject(
    gallery: Gallery, plains: list[tuple[Entry, tuple[dict[str, Any], bytes]]]
) -> None:
    (entry, (head, _)), rest = plains[0], plains[1:]
    if entry.kind is not RecordKind.SUBJECT or len(rest) % 2:
        raise BackupError("export file holds a malformed subject frame")
    try:
        subject = subject_from(entry.record_id.hex(), 1, head)
        faces = []
        for (face_entry, (face, vector)), (thumb_entry, (_, jpeg)) in zip(
            rest[::2], rest[1::2], strict=True
        ):
            if (face_entry.kind, thumb_entry.kind) != (RecordKind.FACE, RecordKind.THUMBNAIL) or (
                face_entry.record_id != thumb_entry.record_id
            ):
                raise BackupError("export file holds a face without its thumbnail")
            if face["subject_id"] != subject.subject_id:
                raise BackupError("export file holds a face under the wrong subject")
            faces.append((face_from(face_entry.record_id.hex(), 1, face, vector), jpeg))
    except (KeyError, TypeError, ValueError) as exc:
        raise BackupError(f"export file holds a malformed record ({exc})") from None
    gallery.restore(subject, faces)
