"""Known-answer vectors for the sealed on-disk formats: the vault kernel, galleries, the audit
log and cases.

    PYTHONPATH=. .venv/bin/python tests/vectors/make_vectors.py [OUT]

rewrites ``OUT/{vault,gallery,audit,cases}`` (``OUT`` defaults to this script's folder; the
update vectors beside them are left alone). Everything is deterministic: keys, nonces and ids
come from ``FixedRandom`` (SHAKE-256 of a label and a call counter), every clock reads
``MOMENT``, and ed25519 signatures are deterministic. ``tests/test_vectors_sealed.py``
regenerates the set into a temporary folder and compares it byte for byte with the committed
copy, so the test fails whenever the code's output drifts from the stored bytes. Run this
script only on purpose, when a format (or the order in which a store draws randomness)
changes, and say so in the commit.

A store's vector is a flat copy of the files it wrote under a state directory (``home``);
``expected.json`` maps each flat name to its path under ``home`` and says what the files hold,
including the keys needed to open them (test data: the keys protect nothing).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import sys
import tempfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeid.runtime.audit.events import AuditAction, AuditEvent, Candidate, event_to_json
from edgeid.runtime.audit.frames import FrameKind
from edgeid.runtime.audit.frames import ScanState as AuditScanState
from edgeid.runtime.audit.frames import encode_frame as encode_audit_frame
from edgeid.runtime.audit.frames import scan_frames as scan_audit_frames
from edgeid.runtime.audit.layout import AUDIT_KEY_SCOPE, HEAD_FILE, LOG_FILE
from edgeid.runtime.audit.log import AuditLog
from edgeid.runtime.cases.records import (
    CaseResults,
    CaseSummary,
    Cluster,
    ClusterSearch,
    IngestRun,
    Lead,
    SourceFile,
)
from edgeid.runtime.cases.store import CASES_DIR, CaseStore, key_scope
from edgeid.runtime.cases.store import NewFace as CaseNewFace
from edgeid.runtime.compat import UTC
from edgeid.runtime.gallery.records import NewFace, NewSubject
from edgeid.runtime.gallery.store import RECORDS_LOG, GalleryStore, thumbs_log_name
from edgeid.runtime.identity.device_key import fingerprint
from edgeid.runtime.vault.crypto import (
    RECORD_FORMAT_VERSION,
    RecordCipher,
    RecordKind,
    ScryptParams,
    derive_key,
    record_aad,
    seal,
    wrap_key,
)
from edgeid.runtime.vault.framed_log import (
    FRAME_MAGIC,
    LOG_MAGIC,
    Entry,
    LogHeader,
    encode_frame,
    encode_header,
)
from edgeid.runtime.vault.key_choice import GALLERIES_DIR, KEYRING_FILE, KEYS_DIR
from edgeid.runtime.vault.keys import KeyFileProvider, Keyring

HERE = Path(__file__).resolve().parent
DOMAINS = ("vault", "gallery", "gallery_photos", "audit", "cases")
MOMENT = datetime(2024, 5, 1, 9, 30, tzinfo=UTC)  # what every injected clock reads
EXPECTED = "expected.json"
KEK_FILE = "kek.key"
KEYRING_PATH = f"{GALLERIES_DIR}/{KEYRING_FILE}"  # where the service keeps the device keyring

# An 8x8 grey JPEG, made once with Pillow and frozen here: an input, so that a JPEG encoder
# of another version cannot change the vectors.
THUMBNAIL_JPEG = bytes.fromhex(
    "ffd8ffe000104a46494600010100000100010000ffdb004300100b0c0e0c0a100e0d0e1211101318281a18"
    "1616183123251d283a333d3c3933383740485c4e404457453738506d51575f626768673e4d71797064785c"
    "656763ffc0000b080008000801011100ffc4001f0000010501010101010100000000000000000102030405"
    "060708090a0bffc400b5100002010303020403050504040000017d01020300041105122131410613516107"
    "227114328191a1082342b1c11552d1f02433627282090a161718191a25262728292a3435363738393a4344"
    "45464748494a535455565758595a636465666768696a737475767778797a838485868788898a9293949596"
    "9798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3"
    "e4e5e6e7e8e9eaf1f2f3f4f5f6f7f8f9faffda0008010100003f004f0543feaf8affd9"
)
MODEL_ID = "vectors-128d"
SOURCE_SHA256 = hashlib.sha256(b"edgeid test vector: the enrolment photo").hexdigest()


def fixed_bytes(label: str, size: int) -> bytes:
    return hashlib.shake_256(b"edgeid/vectors/" + label.encode()).digest(size)


class FixedRandom:
    """A ``RandomSource`` that gives the same bytes on every run, call after call."""

    def __init__(self, label: str) -> None:
        self._label = label
        self.calls = 0

    def __call__(self, size: int) -> bytes:
        self.calls += 1
        return fixed_bytes(f"{self._label}/{self.calls}", size)


def fixed_clock() -> datetime:
    return MOMENT


def embedding() -> np.ndarray[Any, np.dtype[np.float32]]:
    """128 distinct multiples of 1/128: exact in float32, so nothing can round them otherwise."""
    return np.array([((i * 37) % 128 - 64) / 128 for i in range(128)], dtype=np.float32)


def _dump(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def _flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :]


def _constant(value: bytes) -> Callable[[int], bytes]:
    """A random source that returns ``value``: to seal under a nonce the vector names."""

    def source(size: int) -> bytes:
        assert size == len(value), (size, len(value))
        return value

    return source


def _snapshot(home: Path, files: Mapping[str, str], out: Path) -> None:
    """Copy the files named in ``files`` (flat name -> path under ``home``) to ``out``.

    Every file under ``home`` but the lock files must be named, so that a new file a store
    starts writing cannot slip past the vectors.
    """
    present = sorted(
        p.relative_to(home).as_posix() for p in home.rglob("*") if p.is_file() and p.name != ".lock"
    )
    if present != sorted(files.values()):
        raise RuntimeError(f"{out.name}: the store wrote {present}, the vector names {files}")
    out.mkdir(parents=True, exist_ok=True)
    for flat, relative in files.items():
        shutil.copyfile(home / relative, out / flat)


def _keyring(home: Path, random: FixedRandom) -> Keyring:
    provider = KeyFileProvider(home / KEYS_DIR, random=random)
    return Keyring.create(home / KEYRING_PATH, provider, random=random, clock=fixed_clock)


def _kek_facts(home: Path, keyring: Keyring) -> tuple[dict[str, str], str]:
    """The KEK (hex, with its id) and its file's path under ``home``."""
    path = f"{KEYS_DIR}/kek-{keyring.kek_id}.key"
    return {"kek_id": keyring.kek_id, "kek": (home / path).read_bytes().hex()}, path


# -- the vault kernel ----------------------------------------------------------------------


def _record(
    name: str,
    key: bytes,
    scope: bytes,
    kind: RecordKind,
    rid: bytes,
    version: int,
    plaintext: bytes,
) -> dict[str, Any]:
    nonce = fixed_bytes(f"vault/nonce/{name}", 12)
    sealed = RecordCipher(key, scope, random=_constant(nonce)).seal(kind, rid, version, plaintext)
    return {
        "name": name,
        "key": key.hex(),
        "scope_id": scope.hex(),
        "kind": kind.name,
        "record_id": rid.hex(),
        "version": version,
        "plaintext": plaintext.hex(),
        "aad": record_aad(scope, kind, rid, version).hex(),
        "nonce": nonce.hex(),
        "ciphertext": sealed.ciphertext.hex(),
    }


def _bad(base: dict[str, Any], name: str, fault: str, **changes: object) -> dict[str, Any]:
    out = {k: v for k, v in base.items() if k not in ("name", "plaintext", "aad")}
    out.update(changes, name=name, fault=fault, error="DecryptionError")
    return out


def _frame_of(body: bytes) -> bytes:
    """A frame around any body, checksums right: for frames ``encode_frame`` will not make."""
    head = struct.pack(">4sII", FRAME_MAGIC, len(body), zlib.crc32(body))
    return head + struct.pack(">I", zlib.crc32(head)) + body


def _header_of(fmt: int, scope: bytes, key_id: bytes) -> bytes:
    head = struct.pack(">8sH16s16s", LOG_MAGIC, fmt, scope, key_id)
    return head + struct.pack(">I", zlib.crc32(head))


def vault_vectors(out: Path) -> None:
    key = fixed_bytes("vault/data-key", 32)
    scope = fixed_bytes("vault/scope", 16)
    subject_id, face_id = fixed_bytes("vault/subject", 16), fixed_bytes("vault/face", 16)
    records = [
        _record("gallery", key, scope, RecordKind.GALLERY, scope, 1, b'{"name":"vectors"}'),
        _record("subject", key, scope, RecordKind.SUBJECT, subject_id, 1, b'{"n":"Test"}'),
        _record("face", key, scope, RecordKind.FACE, face_id, 3, embedding().tobytes()[:64]),
        _record("tombstone", key, scope, RecordKind.TOMBSTONE, subject_id, 2, b""),
    ]
    subject = records[1]
    ct = bytes.fromhex(subject["ciphertext"])
    future_aad = (
        b"edgeid/record"
        + struct.pack(">HBI", RECORD_FORMAT_VERSION + 1, int(RecordKind.SUBJECT), 1)
        + struct.pack(">I", 16)
        + scope
        + struct.pack(">I", 16)
        + subject_id
    )
    future = seal(
        key, b'{"n":"Test"}', future_aad, random=_constant(bytes.fromhex(subject["nonce"]))
    )
    bad_records = [
        _bad(subject, "tag-byte-flipped", "the last byte of the GCM tag flipped",
             ciphertext=_flip(ct, len(ct) - 1).hex()),
        _bad(subject, "ciphertext-byte-flipped", "the first ciphertext byte flipped",
             ciphertext=_flip(ct, 0, 0x80).hex()),
        _bad(subject, "truncated-tag", "the last 4 bytes of the tag cut off",
             ciphertext=ct[:-4].hex()),
        _bad(subject, "shorter-than-tag", "10 bytes: less than a tag",
             ciphertext=ct[:10].hex()),
        _bad(subject, "nonce-changed", "another nonce",
             nonce=_flip(bytes.fromhex(subject["nonce"]), 5).hex()),
        _bad(subject, "wrong-key", "opened under another data key",
             key=fixed_bytes("vault/other-key", 32).hex()),
        _bad(subject, "record-version-changed", "sealed as version 1, presented as version 2",
             version=2),
        _bad(subject, "aad-format-version-2",
             "sealed with associated data of record format 2, read by format 1",
             ciphertext=future.ciphertext.hex(), sealed_aad=future_aad.hex()),
        _bad(subject, "moved-to-another-scope", "presented in another gallery",
             scope_id=fixed_bytes("vault/other-scope", 16).hex()),
        _bad(subject, "kind-swapped", "a subject presented as a face", kind="FACE"),
        _bad(subject, "record-id-changed", "presented under the face's id",
             record_id=face_id.hex()),
    ]  # fmt: skip

    kek = fixed_bytes("vault/kek", 32)
    data_key = fixed_bytes("vault/wrapped-data-key", 32)
    kek_id, key_id = fixed_bytes("vault/kek-id", 16).hex(), fixed_bytes("vault/key-id", 16).hex()
    context = f"edgeid/keyring/v1/{kek_id}/{scope.hex()}/{key_id}".encode()
    wrap_nonce = fixed_bytes("vault/wrap-nonce", 12)
    wrapped = wrap_key(kek, data_key, context, random=_constant(wrap_nonce))
    wrapped_keys = [
        {
            "name": "keyring-data-key",
            "kek": kek.hex(),
            "key": data_key.hex(),
            "context": context.decode(),
            "aad": (b"edgeid/wrap" + struct.pack(">I", len(context)) + context).hex(),
            "nonce": wrap_nonce.hex(),
            "wrapped": wrapped.hex(),
        }
    ]
    other_context = f"edgeid/keyring/v1/{kek_id}/{'00' * 16}/{key_id}"
    bad_wrapped = [
        {"name": "tag-byte-flipped", "kek": kek.hex(), "context": context.decode(),
         "wrapped": _flip(wrapped, len(wrapped) - 1).hex(), "error": "DecryptionError"},
        {"name": "other-context", "kek": kek.hex(), "context": other_context,
         "wrapped": wrapped.hex(), "error": "DecryptionError"},
        {"name": "wrong-kek", "kek": fixed_bytes("vault/other-kek", 32).hex(),
         "context": context.decode(), "wrapped": wrapped.hex(), "error": "DecryptionError"},
        {"name": "truncated", "kek": kek.hex(), "context": context.decode(),
         "wrapped": wrapped[:-1].hex(), "error": "DecryptionError"},
    ]  # fmt: skip

    scrypt = []
    for name, passphrase, log2_n, r, p in (
        ("ascii", "correct horse battery staple", 10, 8, 1),
        ("unicode", "Pässwörd ✓ 2024", 11, 4, 2),
    ):
        params = ScryptParams(log2_n, r, p, fixed_bytes(f"vault/scrypt-salt/{name}", 16))
        scrypt.append(
            {
                "name": name,
                "passphrase": passphrase,
                **params.to_json(),
                "key": derive_key(passphrase, params).hex(),
            }
        )
    salt = fixed_bytes("vault/scrypt-salt/ascii", 16).hex()
    bad_scrypt = [
        {"name": "log2-n-too-small", "passphrase": "x", "log2_n": 9, "r": 8, "p": 1,
         "salt": salt, "error": "VaultError"},
        {"name": "log2-n-too-large", "passphrase": "x", "log2_n": 21, "r": 8, "p": 1,
         "salt": salt, "error": "VaultError"},
        {"name": "r-too-large", "passphrase": "x", "log2_n": 10, "r": 17, "p": 1,
         "salt": salt, "error": "VaultError"},
        {"name": "p-too-large", "passphrase": "x", "log2_n": 10, "r": 8, "p": 5,
         "salt": salt, "error": "VaultError"},
        {"name": "salt-too-short", "passphrase": "x", "log2_n": 10, "r": 8, "p": 1,
         "salt": salt[:30], "error": "VaultError"},
        {"name": "empty-passphrase", "passphrase": "", "log2_n": 10, "r": 8, "p": 1,
         "salt": salt, "error": "VaultError"},
    ]  # fmt: skip

    out.mkdir(parents=True, exist_ok=True)
    logs = _framed_logs(out, records, scope, bytes.fromhex(key_id))
    _dump(
        out / "vectors.json",
        {
            "records": records,
            "bad_records": bad_records,
            "wrapped_keys": wrapped_keys,
            "bad_wrapped_keys": bad_wrapped,
            "scrypt": scrypt,
            "bad_scrypt": bad_scrypt,
            "logs": logs,
        },
    )


def _entry(record: Mapping[str, Any]) -> Entry:
    return Entry(
        RecordKind[record["kind"]],
        bytes.fromhex(record["record_id"]),
        record["version"],
        bytes.fromhex(record["nonce"]),
        bytes.fromhex(record["ciphertext"]),
    )


def _framed_logs(
    out: Path, records: list[dict[str, Any]], scope: bytes, key_id: bytes
) -> dict[str, Any]:
    """``framed.log`` (a header and two frames) and the ways it can be damaged."""
    by_name = {r["name"]: r for r in records}
    layout = [["gallery"], ["subject", "face"]]
    header = encode_header(LogHeader(scope, key_id))
    frames = [encode_frame([_entry(by_name[n]) for n in names]) for names in layout]
    good = header + b"".join(frames)
    offsets = [len(header), len(header) + len(frames[0])]
    head = {"format": 1, "scope_id": scope.hex(), "key_id": key_id.hex()}
    listed = [
        {"offset": o, "size": len(f), "entries": names}
        for o, f, names in zip(offsets, frames, layout, strict=True)
    ]
    second = offsets[1]
    cut = 7
    entries_body = frames[0][16:]  # a one-entry body: count, entry
    variants: dict[str, tuple[bytes, dict[str, Any]]] = {
        "framed.log": (good, {"header": head, "frames": listed, "torn_bytes": 0}),
        "framed-zero-tail.log": (
            good + bytes(32),
            {"header": head, "frames": listed, "torn_bytes": 32,
             "fault": "32 zero bytes after the last frame (a preallocated block after a crash)"},
        ),
        "framed-truncated.log": (
            good[:-cut],
            {"header": head, "frames": listed[:1], "torn_bytes": len(frames[1]) - cut,
             "read_frame_at": {"offset": second, "error": "CorruptDataError"},
             "fault": f"the last {cut} bytes cut off: a torn tail, dropped by a scan"},
        ),
        "framed-bad-body-crc.log": (
            _flip(good, len(good) - 1),
            {"header": head, "frames": listed[:1], "error": "CorruptDataError",
             "read_frame_at": {"offset": second, "error": "CorruptDataError"},
             "fault": "the last byte of the second frame's body flipped"},
        ),
        "framed-bad-frame-head-crc.log": (
            _flip(good, second + 12),
            {"header": head, "frames": listed[:1], "error": "CorruptDataError",
             "read_frame_at": {"offset": second, "error": "CorruptDataError"},
             "fault": "a byte of the second frame's head checksum flipped"},
        ),
        "framed-bad-frame-magic.log": (
            _flip(good, second),
            {"header": head, "frames": listed[:1], "error": "CorruptDataError",
             "fault": "the second frame's magic altered"},
        ),
        "framed-trailing-bytes.log": (
            header + frames[0] + _frame_of(entries_body + b"\x00"),
            {"header": head, "frames": listed[:1], "error": "CorruptDataError",
             "fault": "a second frame with a byte after its last entry, checksums right"},
        ),
        "framed-entry-overrun.log": (
            header + frames[0] + _frame_of(entries_body[:-1]),
            {"header": head, "frames": listed[:1], "error": "CorruptDataError",
             "fault": "a second frame whose entry claims one byte more than the body holds"},
        ),
        "framed-bad-header-crc.log": (
            _flip(good, 12),
            {"header_error": "CorruptDataError", "fault": "a byte of the scope id flipped"},
        ),
        "framed-truncated-header.log": (
            good[:40],
            {"header_error": "CorruptDataError", "fault": "the file ends inside its header"},
        ),
        "framed-format-3.log": (
            _header_of(3, scope, key_id) + good[len(header) :],
            {"header_error": "CorruptDataError",
             "fault": "a header of format 3 (checksum right): a future format"},
        ),
    }  # fmt: skip
    for name, (data, _) in variants.items():
        (out / name).write_bytes(data)
    return {name: facts for name, (_, facts) in variants.items()}


# -- galleries -----------------------------------------------------------------------------

GALLERY_NAME = "vectors"
GALLERY_DESCRIPTION = "known-answer test vector"
SUBJECT = NewSubject(
    display_name="Test Subject Zero",
    legal_basis="Warrant 2024/0042 (test vector)",
    enrolled_by="os:vectors",
    notes="fixed test data, no real person",
    retention_until=date(2030, 1, 1),
)


def _gallery_files(home: Path, store: GalleryStore, gallery_id: str, key_id: str) -> dict[str, str]:
    _, kek_path = _kek_facts(home, store.keyring)
    return {
        "records.log": f"{GALLERIES_DIR}/{gallery_id}/{RECORDS_LOG}",
        "thumbs.log": f"{GALLERIES_DIR}/{gallery_id}/{thumbs_log_name(key_id)}",
        "keyring.json": KEYRING_PATH,
        KEK_FILE: kek_path,
    }


def gallery_vectors(out: Path) -> None:
    """One gallery of one subject with one face, as enrolled and after ``compact()``."""
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        random = FixedRandom("gallery")
        provider = KeyFileProvider(home / KEYS_DIR, random=random)
        with GalleryStore(home, provider, clock=fixed_clock, random=random) as store:
            gallery = store.create_gallery(GALLERY_NAME, description=GALLERY_DESCRIPTION)
            face = NewFace(embedding(), 0.875, MODEL_ID, SOURCE_SHA256, THUMBNAIL_JPEG)
            enrolment = gallery.enroll(SUBJECT, [face])
            states = {}
            for state, log_format in (("enrolled", 1), ("compacted", 2)):
                if state == "compacted":
                    gallery.compact()
                files = _gallery_files(home, store, gallery.gallery_id, gallery.key_id)
                _snapshot(home, files, out / state)
                states[state] = {
                    "files": files,
                    "key_id": gallery.key_id,
                    "data_key": store.keyring.data_key(gallery.gallery_id, gallery.key_id).hex(),
                    "records_format": log_format,
                }
            kek, _ = _kek_facts(home, store.keyring)
        subject, (stored_face,) = enrolment.subject, enrolment.faces
        _dump(
            out / EXPECTED,
            {
                "gallery": {
                    "gallery_id": gallery.gallery_id,
                    "name": GALLERY_NAME,
                    "description": GALLERY_DESCRIPTION,
                    "created_at": MOMENT.isoformat(),
                },
                "subject": {
                    "subject_id": subject.subject_id,
                    "display_name": subject.display_name,
                    "notes": subject.notes,
                    "legal_basis": subject.legal_basis,
                    "enrolled_by": subject.enrolled_by,
                    "enrolled_at": subject.enrolled_at.isoformat(),
                    "retention_until": str(subject.retention_until),
                    "version": subject.version,
                },
                "face": {
                    "face_id": stored_face.face_id,
                    "subject_id": stored_face.subject_id,
                    "quality": stored_face.quality,
                    "model_id": stored_face.model_id,
                    "source_sha256": stored_face.source_sha256,
                    "enrolled_at": stored_face.enrolled_at.isoformat(),
                    "version": stored_face.version,
                    "embedding_f32le": embedding().tobytes().hex(),
                    "thumbnail_jpeg": THUMBNAIL_JPEG.hex(),
                },
                "kek": kek,
                "states": states,
            },
        )


PHOTOS_AGES = (6, None)  # the first photo's age at capture is given, the second's is not
EDITED = {
    "display_name": "Test Subject Zero (renamed)",
    "notes": "edited test data, no real person",
    "legal_basis": "Warrant 2024/0043 (test vector)",
    "retention_until": "2031-06-30",
}


def gallery_photos_vectors(out: Path) -> None:
    """One subject with two photos, the first with an age at capture, then edited (a second
    version of its record): as written, and after ``compact()`` (the batch's age column)."""
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        random = FixedRandom("gallery-photos")
        provider = KeyFileProvider(home / KEYS_DIR, random=random)
        with GalleryStore(home, provider, clock=fixed_clock, random=random) as store:
            gallery = store.create_gallery(GALLERY_NAME, description=GALLERY_DESCRIPTION)
            faces = [
                NewFace(embedding(), 0.875, MODEL_ID, SOURCE_SHA256, THUMBNAIL_JPEG, age)
                for age in PHOTOS_AGES
            ]
            enrolment = gallery.enroll(SUBJECT, faces[:1])
            sid = enrolment.subject.subject_id
            added = gallery.add_faces(sid, faces[1:])
            gallery.edit_subject(
                sid,
                display_name=EDITED["display_name"],
                notes=EDITED["notes"],
                legal_basis=EDITED["legal_basis"],
                retention_until=date.fromisoformat(EDITED["retention_until"]),
            )
            states = {}
            for state, log_format in (("edited", 1), ("compacted", 2)):
                if state == "compacted":
                    gallery.compact()
                files = _gallery_files(home, store, gallery.gallery_id, gallery.key_id)
                _snapshot(home, files, out / state)
                states[state] = {
                    "files": files,
                    "key_id": gallery.key_id,
                    "data_key": store.keyring.data_key(gallery.gallery_id, gallery.key_id).hex(),
                    "records_format": log_format,
                    "subject_version": gallery.subject(sid).version,
                }
            kek, _ = _kek_facts(home, store.keyring)
        _dump(
            out / EXPECTED,
            {
                "gallery": {"gallery_id": gallery.gallery_id, "name": GALLERY_NAME},
                "subject": {"subject_id": sid, **EDITED, "enrolled_by": SUBJECT.enrolled_by},
                "faces": [
                    {"face_id": f.face_id, "age_at_capture": f.age_at_capture}
                    for f in (*enrolment.faces, *added)
                ],
                "kek": kek,
                "states": states,
            },
        )


# -- the audit log -------------------------------------------------------------------------

CASE = "2024/0042"
REASON = "Burglary at the depot: suspect seen on camera 3 (test vector)"
AUDIT_EVENTS = (
    AuditEvent(user="officer-7", role="investigator", action=AuditAction.LOGIN, detail="web"),
    AuditEvent(
        user="officer-7",
        role="investigator",
        action=AuditAction.SEARCH,
        case=CASE,
        reason=REASON,
        gallery=GALLERY_NAME,
        probe_sha256=hashlib.sha256(b"edgeid test vector: the probe").hexdigest(),
        candidates=(
            Candidate(
                fixed_bytes("audit/subject", 16).hex(),
                fixed_bytes("audit/face", 16).hex(),
                0.71875,
                "strong",
                1,
            ),
        ),
        age_band="adult",
    ),
    AuditEvent(
        user="officer-7",
        role="investigator",
        action=AuditAction.SUBJECT_VIEWED,
        case=CASE,
        reason=REASON,
        gallery=GALLERY_NAME,
        subject_id=fixed_bytes("audit/subject", 16).hex(),
    ),
)
# Hand-written: what ``verify_chain`` must say of each tampered copy (files replaced).
AUDIT_TAMPERED: dict[str, dict[str, object]] = {
    "flipped-byte": {
        "fault": "one ciphertext byte of record 2 flipped",
        "status": "tampered", "reason": "checksum", "first_bad_seq": 2,
    },
    "chain-rebuilt": {
        "fault": "record 2 altered with its checksums and every later link rebuilt (no key)",
        "status": "tampered", "reason": "bad_checkpoint", "first_bad_seq": 1,
    },
    "truncated": {
        "fault": "record 3 and the last checkpoint cut off the end",
        "status": "tampered", "reason": "truncated", "first_bad_seq": 3,
    },
    "stale-head": {
        "fault": "head.json replaced by the copy signed after record 1",
        "status": "tampered", "reason": "stale_head", "first_bad_seq": 2,
    },
    "torn-tail": {
        "fault": "the first 40 bytes of a frame after the last: an append cut by a crash",
        "status": "torn_tail", "reason": None, "first_bad_seq": None,
    },
}  # fmt: skip


def _audit_frames(log: bytes) -> list[tuple[int, int, FrameKind, int, bytes, bytes]]:
    """(offset, size, kind, seq, prev_hash, payload) of each frame of an audit log."""
    with tempfile.NamedTemporaryFile() as tmp:
        tmp.write(log)
        tmp.flush()
        with open(tmp.name, "rb") as stream:
            state = AuditScanState()
            return [
                (f.offset, f.size, f.kind, f.seq, f.prev_hash, f.payload)
                for f in scan_audit_frames(stream, state)
            ]


def _tampered_audit(log: bytes, first_head: bytes) -> dict[str, dict[str, bytes]]:
    """The files each tampered copy puts in place of the intact ones."""
    frames = _audit_frames(log)
    record_2, record_3 = frames[1], frames[3]  # frames: e1, e2, checkpoint, e3, checkpoint
    rebuilt, prev = log[: record_2[0]], record_2[4]
    for index, (_, _, kind, seq, _, payload) in enumerate(frames[1:]):
        altered = _flip(payload, len(payload) - 1) if index == 0 else payload
        frame, prev = encode_audit_frame(kind, seq, prev, altered)
        rebuilt += frame
    return {
        "flipped-byte": {LOG_FILE: _flip(log, record_2[0] + record_2[1] - 1)},
        "chain-rebuilt": {LOG_FILE: rebuilt},
        "truncated": {LOG_FILE: log[: record_3[0]]},
        "stale-head": {HEAD_FILE: first_head},
        "torn-tail": {LOG_FILE: log + log[record_3[0] : record_3[0] + 40]},
    }


def audit_vectors(out: Path) -> None:
    """Three records, a checkpoint after the second and one on close, and tampered copies."""
    signer = Ed25519PrivateKey.from_private_bytes(fixed_bytes("audit/device-key", 32))
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        random = FixedRandom("audit")
        keyring = _keyring(home, random)
        heads = []
        with AuditLog.open(
            home, keyring, signer=signer, clock=fixed_clock, random=random, checkpoint_every=2
        ) as log:
            records = []
            for event in AUDIT_EVENTS:
                records.append(log.append(event))
                heads.append((home / "audit" / HEAD_FILE).read_bytes())
            log_id = log.log_id
        kek, kek_path = _kek_facts(home, keyring)
        (key_id,) = keyring.key_ids(AUDIT_KEY_SCOPE)
        files = {
            LOG_FILE: f"audit/{LOG_FILE}",
            HEAD_FILE: f"audit/{HEAD_FILE}",
            "keyring.json": KEYRING_PATH,
            KEK_FILE: kek_path,
        }
        _snapshot(home, files, out)
        stored = (out / LOG_FILE).read_bytes()
    tampered = _tampered_audit(stored, heads[0])
    for name, replaced in tampered.items():
        (out / "tampered" / name).mkdir(parents=True)
        for file, data in replaced.items():
            (out / "tampered" / name / file).write_bytes(data)
    public = signer.public_key()
    _dump(
        out / EXPECTED,
        {
            "files": files,
            "kek": kek,
            "device_public_key": public.public_bytes_raw().hex(),
            "device_fingerprint": fingerprint(public),
            "log_id": log_id,
            "key_id": key_id,
            "data_key": keyring.data_key(AUDIT_KEY_SCOPE, key_id).hex(),
            "frames": 5,
            "checkpoints": 2,
            "chain_hash": _chain_hash(stored),
            "records": [
                {
                    "seq": r.seq,
                    "time": r.time.isoformat(),
                    "chain_hash": r.chain_hash,
                    **event_to_json(r.event),
                }
                for r in records
            ],
            "tampered": {
                name: {**facts, "replaces": sorted(tampered[name])}
                for name, facts in AUDIT_TAMPERED.items()
            },
        },
    )


def _chain_hash(log: bytes) -> str:
    offset, size = _audit_frames(log)[-1][:2]
    return hashlib.sha256(log[offset + 16 : offset + size]).hexdigest()


# -- cases ---------------------------------------------------------------------------------


def cases_vectors(out: Path) -> None:
    """One case of one source file with one face, its metadata and its results."""
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        random = FixedRandom("cases")
        keyring = _keyring(home, random)
        with CaseStore(home, keyring, clock=fixed_clock, random=random) as store:
            case = store.create(
                CASE, created_by="os:vectors", model_id=MODEL_ID, retention_until=date(2031, 1, 1)
            )
            source = SourceFile(
                record_id="",
                sha256=hashlib.sha256(b"edgeid test vector: camera 3, frame 1812").hexdigest(),
                names=("camera-3/frame-1812.jpg",),
                media="image",
                status="done",
                reason=None,
                faces=0,
                run=1,
                width=640,
                height=480,
            )
            new_face = CaseNewFace(
                embedding=embedding(),
                box=(200, 120, 264, 184),
                score=0.9375,
                quality=0.8125,
                quality_limiting="blur",
                chip_jpeg=THUMBNAIL_JPEG,
            )
            stored = case.add_file(source, [new_face])
            (face,) = case.faces()
            run = IngestRun(
                number=1,
                started_at=MOMENT,
                user="os:vectors",
                reason=REASON,
                source="/evidence/2024-0042",
                frame_interval_s=0.5,
                galleries=(GALLERY_NAME,),
                detector="scrfd-10g",
                status="complete",
                finished_at=MOMENT,
            )
            summary = CaseSummary(files=1, faces=1, clusters=1, leads_above_threshold=1)
            case.save_meta(replace(case.meta.with_run(run), summary=summary))
            lead = Lead(
                1,
                GALLERY_NAME,
                fixed_bytes("cases/subject", 16).hex(),
                "Test Subject Zero",
                fixed_bytes("cases/face", 16).hex(),
                face.face_id,
                0.71875,
                "strong",
                True,
            )
            search = ClusterSearch(
                (GALLERY_NAME,), 0.001, 0.5, (face.face_id,), (lead,), "one face only", MOMENT
            )
            results = CaseResults(
                "vectors", 0.001, 0.5, MOMENT, 1, (Cluster(1, (face.face_id,), search),)
            )
            case.save_results(results)
            case_dir = f"{CASES_DIR}/{case.case_id}"
            kek, kek_path = _kek_facts(home, keyring)
            files = {
                "records.log": f"{case_dir}/records.log",
                "thumbs.log": f"{case_dir}/thumbs.log",
                "case.sealed": f"{case_dir}/case.sealed",
                "results.sealed": f"{case_dir}/results.sealed",
                "keyring.json": KEYRING_PATH,
                KEK_FILE: kek_path,
            }
            _snapshot(home, files, out)
            (key_id,) = keyring.key_ids(key_scope(case.case_id))
            _dump(
                out / EXPECTED,
                {
                    "files": files,
                    "kek": kek,
                    "case_id": case.case_id,
                    "number": CASE,
                    "key_id": key_id,
                    "data_key": keyring.data_key(key_scope(case.case_id), key_id).hex(),
                    "meta": case.meta.to_head(),
                    "file": {
                        "record_id": stored.record_id,
                        "version": stored.version,
                        **stored.to_head(),
                    },
                    "face": {
                        "face_id": face.face_id,
                        **face.to_head(),
                        "embedding_f32le": embedding().tobytes().hex(),
                        "thumbnail_jpeg": THUMBNAIL_JPEG.hex(),
                    },
                    "results": results.to_head(),
                },
            )


GENERATORS: dict[str, Callable[[Path], None]] = {
    "vault": vault_vectors,
    "gallery": gallery_vectors,
    "gallery_photos": gallery_photos_vectors,
    "audit": audit_vectors,
    "cases": cases_vectors,
}


def generate(out: Path, domains: tuple[str, ...] = DOMAINS) -> None:
    """Write the vectors of ``domains`` under ``out``, replacing what was there."""
    for domain in domains:
        target = out / domain
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        GENERATORS[domain](target)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
