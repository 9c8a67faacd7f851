"""Known-answer vectors for the sealed on-disk formats (tests/vectors/{vault,gallery,audit,cases}).

Two directions. Writing: ``make_vectors.py`` run now must produce exactly the committed bytes,
so any drift in a format (or in what a store writes) fails here until the vectors are
regenerated on purpose. Reading: today's code must open the committed bytes with the keys the
vectors name and get back what they hold, and must refuse each known-bad variant with the
error the vector names.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import shutil
import struct
import sys
import zlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from PIL import Image

from edgeid.runtime.audit.errors import AuditTamperedError
from edgeid.runtime.audit.events import AuditAction, AuditEvent, event_to_json
from edgeid.runtime.audit.frames import FrameKind
from edgeid.runtime.audit.frames import ScanState as AuditScanState
from edgeid.runtime.audit.frames import parse_header as parse_audit_header
from edgeid.runtime.audit.frames import scan_frames as scan_audit_frames
from edgeid.runtime.audit.layout import AUDIT_KEY_SCOPE, HEAD_FILE, LOG_FILE
from edgeid.runtime.audit.log import AuditLog
from edgeid.runtime.audit.sealing import open_event
from edgeid.runtime.audit.verify import VerifyStatus, verify_chain
from edgeid.runtime.cases.errors import CorruptCaseError
from edgeid.runtime.cases.store import CaseStore
from edgeid.runtime.gallery.records import batch_aad, unpack
from edgeid.runtime.gallery.store import GalleryStore
from edgeid.runtime.vault import errors as vault_errors
from edgeid.runtime.vault.crypto import (
    RecordCipher,
    RecordKind,
    ScryptParams,
    derive_key,
    open_sealed,
    record_aad,
    unwrap_key,
    wrap_key,
)
from edgeid.runtime.vault.errors import CorruptDataError, DecryptionError
from edgeid.runtime.vault.framed_log import (
    BATCHED_LOG_FORMAT,
    HEADER_BYTES,
    Entry,
    LogHeader,
    ScanState,
    encode_frame,
    encode_header,
    read_frame_at,
    read_header,
    scan_frames,
)
from edgeid.runtime.vault.key_choice import KEYS_DIR
from edgeid.runtime.vault.keys import KeyFileProvider, Keyring

VECTORS = Path(__file__).resolve().parent / "vectors"


def _load_generator() -> ModuleType:
    """tests/vectors is data, not a package: load its generator by path."""
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


make_vectors = _load_generator()


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


VAULT = _json(VECTORS / "vault" / "vectors.json")
GALLERY = _json(VECTORS / "gallery" / "expected.json")
PHOTOS = _json(VECTORS / "gallery_photos" / "expected.json")
AUDIT = _json(VECTORS / "audit" / "expected.json")
CASES = _json(VECTORS / "cases" / "expected.json")


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _install(vector: Path, files: dict[str, str], home: Path) -> Path:
    """Put a vector's flat files where a store looks for them under ``home`` (0600 each, as
    the stores make them; git keeps no such mode)."""
    for flat, relative in files.items():
        target = home / relative
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.copyfile(vector / flat, target)
        target.chmod(0o600)
    return home


def _keyring(home: Path) -> Keyring:
    return Keyring.open(home / make_vectors.KEYRING_PATH, KeyFileProvider(home / KEYS_DIR))


def _reseal_frame_at(log: bytes, offset: int, edit: int) -> bytes:
    """``log`` with the last ciphertext byte of entry ``edit`` of the frame at ``offset``
    flipped and the frame's checksums rebuilt: damage only the cipher can see."""
    (body_len,) = struct.unpack_from(">I", log, offset + 4)
    end = offset + 16 + body_len
    (count,) = struct.unpack_from(">H", log, offset + 16)
    entries, pos = [], offset + 18
    for _ in range(count):
        kind, rid, version, nonce, ct_len = struct.unpack_from(">B16sI12sI", log, pos)
        pos += 37
        entries.append(Entry(RecordKind(kind), rid, version, nonce, log[pos : pos + ct_len]))
        pos += ct_len
    target = entries[edit]
    flipped = target.ciphertext[:-1] + bytes([target.ciphertext[-1] ^ 1])
    entries[edit] = Entry(target.kind, target.record_id, target.version, target.nonce, flipped)
    return log[:offset] + encode_frame(entries) + log[end:]


# -- writing: the code makes exactly the stored bytes ------------------------------------------


@pytest.mark.parametrize("domain", make_vectors.DOMAINS)
def test_code_writes_exactly_the_stored_vectors(domain: str, tmp_path: Path) -> None:
    """A failure means the on-disk output changed. If that is deliberate (a new format), run
    tests/vectors/make_vectors.py and commit the new vectors with the format change."""
    make_vectors.generate(tmp_path, (domain,))
    committed, generated = _tree(VECTORS / domain), _tree(tmp_path / domain)
    assert sorted(generated) == sorted(committed)
    for name, data in committed.items():
        made = generated[name]
        if made != data:
            pairs = enumerate(zip(made, data, strict=False))
            at = next((i for i, (a, b) in pairs if a != b), min(len(made), len(data)))
            pytest.fail(
                f"{domain}/{name} drifted from the stored vector at byte {at} ({len(made)} "
                f"bytes made, {len(data)} stored)"
            )


def test_vectors_stay_small() -> None:
    """Each file a few KB: a vector is read by people when it fails, not only by the test."""
    for domain in make_vectors.DOMAINS:
        for name, data in _tree(VECTORS / domain).items():
            assert len(data) <= 16 << 10, f"{domain}/{name} is {len(data)} bytes"


# -- the vault kernel ----------------------------------------------------------------------


def _spec_record_aad(scope: bytes, kind: RecordKind, rid: bytes, version: int) -> bytes:
    """The associated data as crypto.py documents it, built here by hand."""
    return (
        b"edgeid/record"
        + struct.pack(">HBI", 1, int(kind), version)
        + struct.pack(">I", len(scope))
        + scope
        + struct.pack(">I", len(rid))
        + rid
    )


def _fields(v: dict[str, Any]) -> tuple[bytes, bytes, RecordKind, bytes, int, bytes, bytes]:
    return (
        bytes.fromhex(v["key"]),
        bytes.fromhex(v["scope_id"]),
        RecordKind[v["kind"]],
        bytes.fromhex(v["record_id"]),
        v["version"],
        bytes.fromhex(v["nonce"]),
        bytes.fromhex(v["ciphertext"]),
    )


@pytest.mark.parametrize("vector", VAULT["records"], ids=lambda v: v["name"])
def test_sealed_record_known_answer(vector: dict[str, Any]) -> None:
    key, scope, kind, rid, version, nonce, ciphertext = _fields(vector)
    plaintext, aad = bytes.fromhex(vector["plaintext"]), bytes.fromhex(vector["aad"])
    assert (
        record_aad(scope, kind, rid, version) == aad == _spec_record_aad(scope, kind, rid, version)
    )
    cipher = RecordCipher(key, scope, random=lambda size: nonce)
    sealed = cipher.seal(kind, rid, version, plaintext)
    assert (sealed.nonce, sealed.ciphertext) == (nonce, ciphertext)
    assert cipher.open(kind, rid, version, nonce, ciphertext) == plaintext
    # Plain AES-256-GCM with that associated data and a full 16-byte tag, nothing more.
    assert AESGCM(key).decrypt(nonce, ciphertext, aad) == plaintext
    assert len(ciphertext) == len(plaintext) + 16


@pytest.mark.parametrize("vector", VAULT["bad_records"], ids=lambda v: v["name"])
def test_bad_sealed_record_is_refused(vector: dict[str, Any]) -> None:
    key, scope, kind, rid, version, nonce, ciphertext = _fields(vector)
    error = getattr(vault_errors, vector["error"])
    with pytest.raises(error) as caught:
        RecordCipher(key, scope).open(kind, rid, version, nonce, ciphertext)
    # One opaque error, chained to nothing: no message or traceback says why it failed.
    assert str(caught.value) == DecryptionError.MESSAGE
    assert caught.value.__cause__ is None and caught.value.__context__ is None


@pytest.mark.parametrize("vector", VAULT["wrapped_keys"], ids=lambda v: v["name"])
def test_wrapped_key_known_answer(vector: dict[str, Any]) -> None:
    kek, key = bytes.fromhex(vector["kek"]), bytes.fromhex(vector["key"])
    context, nonce = vector["context"].encode(), bytes.fromhex(vector["nonce"])
    wrapped, aad = bytes.fromhex(vector["wrapped"]), bytes.fromhex(vector["aad"])
    assert aad == b"edgeid/wrap" + struct.pack(">I", len(context)) + context
    assert wrap_key(kek, key, context, random=lambda size: nonce) == wrapped
    assert wrapped[:12] == nonce and len(wrapped) == 12 + 32 + 16
    assert unwrap_key(kek, wrapped, context) == key
    assert AESGCM(kek).decrypt(nonce, wrapped[12:], aad) == key


@pytest.mark.parametrize("vector", VAULT["bad_wrapped_keys"], ids=lambda v: v["name"])
def test_bad_wrapped_key_is_refused(vector: dict[str, Any]) -> None:
    with pytest.raises(getattr(vault_errors, vector["error"])):
        unwrap_key(
            bytes.fromhex(vector["kek"]),
            bytes.fromhex(vector["wrapped"]),
            vector["context"].encode(),
        )


@pytest.mark.parametrize("vector", VAULT["scrypt"], ids=lambda v: v["name"])
def test_scrypt_known_answer(vector: dict[str, Any]) -> None:
    params = ScryptParams.from_json(vector)
    assert params.to_json() == {k: vector[k] for k in ("log2_n", "r", "p", "salt")}
    key = bytes.fromhex(vector["key"])
    assert derive_key(vector["passphrase"], params) == key
    # An independent scrypt (OpenSSL's, through hashlib) agrees: UTF-8 passphrase, 32 bytes.
    n, r, p = 2 ** vector["log2_n"], vector["r"], vector["p"]
    independent = hashlib.scrypt(
        vector["passphrase"].encode("utf-8"),
        salt=params.salt,
        n=n,
        r=r,
        p=p,
        maxmem=256 * n * r,
        dklen=32,
    )
    assert independent == key


@pytest.mark.parametrize("vector", VAULT["bad_scrypt"], ids=lambda v: v["name"])
def test_bad_scrypt_parameters_are_refused(vector: dict[str, Any]) -> None:
    with pytest.raises(getattr(vault_errors, vector["error"])):
        derive_key(vector["passphrase"], ScryptParams.from_json(vector))


def _spec_frame(entries: list[Entry]) -> bytes:
    """A frame as framed_log.py documents it, built here by hand."""
    body = struct.pack(">H", len(entries)) + b"".join(
        struct.pack(">B16sI12sI", int(e.kind), e.record_id, e.version, e.nonce, len(e.ciphertext))
        + e.ciphertext
        for e in entries
    )
    head = b"EGFR" + struct.pack(">II", len(body), zlib.crc32(body))
    return head + struct.pack(">I", zlib.crc32(head)) + body


def _record_entries(names: list[str]) -> list[Entry]:
    by_name = {v["name"]: v for v in VAULT["records"]}
    out = []
    for name in names:
        _, _, kind, rid, version, nonce, ciphertext = _fields(by_name[name])
        out.append(Entry(kind, rid, version, nonce, ciphertext))
    return out


def test_framed_log_known_answer() -> None:
    facts = VAULT["logs"]["framed.log"]
    scope, key_id = (
        bytes.fromhex(facts["header"]["scope_id"]),
        bytes.fromhex(facts["header"]["key_id"]),
    )
    frames = [_record_entries(f["entries"]) for f in facts["frames"]]
    spec_header = struct.pack(">8sH16s16s", b"EDGEIDLG", 1, scope, key_id)
    spec_header += struct.pack(">I", zlib.crc32(spec_header))
    stored = (VECTORS / "vault" / "framed.log").read_bytes()
    assert encode_header(LogHeader(scope, key_id)) == spec_header == stored[:HEADER_BYTES]
    assert b"".join(encode_frame(f) for f in frames) == stored[HEADER_BYTES:]
    assert b"".join(_spec_frame(f) for f in frames) == stored[HEADER_BYTES:]


@pytest.mark.parametrize("name", sorted(VAULT["logs"]))
def test_framed_log_vector_reads_as_stated(name: str, caplog: pytest.LogCaptureFixture) -> None:
    facts = VAULT["logs"][name]
    path = VECTORS / "vault" / name
    with open(path, "rb") as stream:
        if "header_error" in facts:
            with pytest.raises(getattr(vault_errors, facts["header_error"])):
                read_header(stream, name)
            return
        header = read_header(stream, name)
        assert (header.format, header.scope_id.hex(), header.key_id.hex()) == (
            facts["header"]["format"],
            facts["header"]["scope_id"],
            facts["header"]["key_id"],
        )
        state, frames = ScanState(), []
        if "error" in facts:
            with pytest.raises(getattr(vault_errors, facts["error"])):
                for frame in scan_frames(stream, name, state):
                    frames.append(frame)
        else:
            frames = list(scan_frames(stream, name, state))
            assert state.torn_bytes == facts["torn_bytes"]
            assert ("torn tail" in caplog.text) == bool(facts["torn_bytes"])
    assert [(f.offset, f.size) for f in frames] == [
        (f["offset"], f["size"]) for f in facts["frames"]
    ]
    for frame, listed in zip(frames, facts["frames"], strict=True):
        assert list(frame.entries) == _record_entries(listed["entries"])
    if "read_frame_at" in facts:
        with pytest.raises(getattr(vault_errors, facts["read_frame_at"]["error"])):
            read_frame_at(path, facts["read_frame_at"]["offset"], name)


def test_framed_log_entries_open_with_the_vector_key() -> None:
    by_name = {v["name"]: v for v in VAULT["records"]}
    with open(VECTORS / "vault" / "framed.log", "rb") as stream:
        header = read_header(stream, "framed.log")
        for frame in scan_frames(stream, "framed.log", ScanState()):
            for entry in frame.entries:
                vector = next(
                    v
                    for v in by_name.values()
                    if v["record_id"] == entry.record_id.hex() and v["version"] == entry.version
                )
                cipher = RecordCipher(bytes.fromhex(vector["key"]), header.scope_id)
                plain = cipher.open(
                    entry.kind, entry.record_id, entry.version, entry.nonce, entry.ciphertext
                )
                assert plain.hex() == vector["plaintext"]


# -- galleries -----------------------------------------------------------------------------

STATES = sorted(GALLERY["states"])


def _gallery_home(state: str, home: Path) -> Path:
    return _install(VECTORS / "gallery" / state, GALLERY["states"][state]["files"], home)


@pytest.mark.parametrize("state", STATES)
def test_gallery_vector_opens_with_the_known_key(state: str, tmp_path: Path) -> None:
    facts = GALLERY["states"][state]
    home = _gallery_home(state, tmp_path)
    kek_file = home / facts["files"]["kek.key"]
    assert kek_file.read_bytes().hex() == GALLERY["kek"]["kek"]
    with GalleryStore(home, KeyFileProvider(home / KEYS_DIR)) as store:
        gallery = store.open_gallery(GALLERY["gallery"]["name"])
        assert store.keyring.kek_id == GALLERY["kek"]["kek_id"]
        assert gallery.key_id == facts["key_id"]
        assert store.keyring.data_key(gallery.gallery_id, gallery.key_id).hex() == facts["data_key"]
        info = gallery.info()
        assert (info.gallery_id, info.name, info.description, info.created_at.isoformat()) == (
            GALLERY["gallery"]["gallery_id"],
            GALLERY["gallery"]["name"],
            GALLERY["gallery"]["description"],
            GALLERY["gallery"]["created_at"],
        )
        assert (info.subjects, info.faces) == (1, 1)
        (subject,) = gallery.subjects()
        expected = GALLERY["subject"]
        assert {
            "subject_id": subject.subject_id,
            "display_name": subject.display_name,
            "notes": subject.notes,
            "legal_basis": subject.legal_basis,
            "enrolled_by": subject.enrolled_by,
            "enrolled_at": subject.enrolled_at.isoformat(),
            "retention_until": str(subject.retention_until),
            "version": subject.version,
        } == expected
        (face,) = gallery.faces(subject.subject_id)
        want = GALLERY["face"]
        assert (face.face_id, face.subject_id, face.quality, face.model_id) == (
            want["face_id"],
            want["subject_id"],
            want["quality"],
            want["model_id"],
        )
        assert (face.source_sha256, face.enrolled_at.isoformat(), face.version) == (
            want["source_sha256"],
            want["enrolled_at"],
            want["version"],
        )
        assert face.embedding.astype("<f4").tobytes().hex() == want["embedding_f32le"]
        jpeg = gallery.thumbnail(face.face_id)
        assert jpeg.hex() == want["thumbnail_jpeg"]
        assert Image.open(io.BytesIO(jpeg)).size == (8, 8)  # a real JPEG, not just its magic
        ids, matrix = gallery.embeddings(want["model_id"])
        assert ids == [face.face_id] and matrix.shape == (1, 128)


@pytest.mark.parametrize("state", STATES)
def test_gallery_records_open_with_vault_primitives(state: str) -> None:
    """The records log read with the kernel alone (no GalleryStore) and the vector's data key."""
    facts = GALLERY["states"][state]
    gid = bytes.fromhex(GALLERY["gallery"]["gallery_id"])
    key = bytes.fromhex(facts["data_key"])
    path = VECTORS / "gallery" / state / "records.log"
    with open(path, "rb") as stream:
        if facts["records_format"] == BATCHED_LOG_FORMAT:
            with pytest.raises(CorruptDataError, match="update edgeid"):
                read_header(stream, state)  # a build that knows no batches refuses the file
            stream.seek(0)
        header = read_header(stream, state, formats=(1, BATCHED_LOG_FORMAT))
        assert header.format == facts["records_format"]
        assert (header.scope_id, header.key_id.hex()) == (gid, facts["key_id"])
        frames = list(scan_frames(stream, state, ScanState()))
    cipher = RecordCipher(key, gid)
    (gallery_entry,) = frames[0].entries
    assert (gallery_entry.kind, gallery_entry.record_id, gallery_entry.version) == (
        RecordKind.GALLERY,
        gid,
        1,
    )
    head, _ = unpack(
        cipher.open(RecordKind.GALLERY, gid, 1, gallery_entry.nonce, gallery_entry.ciphertext), ""
    )
    assert head["name"] == GALLERY["gallery"]["name"]
    assert len(frames) == 2
    entries = frames[1].entries
    assert [e.kind for e in entries] == [RecordKind.SUBJECT, RecordKind.FACE]
    if state == "enrolled":
        assert "batches" not in head
        subject_head, _ = unpack(cipher.open(*_where(entries[0])), "")
        assert subject_head["display_name"] == GALLERY["subject"]["display_name"]
        face_head, tail = unpack(cipher.open(*_where(entries[1])), "")
        assert tail.hex() == GALLERY["face"]["embedding_f32le"]
        assert face_head["subject_id"] == GALLERY["subject"]["subject_id"]
    else:
        assert (head["batches"], head["subjects"], head["faces"]) == (1, 1, 1)
        batch_id = entries[0].record_id
        embeddings = open_sealed(
            key,
            entries[1].nonce,
            entries[1].ciphertext,
            batch_aad(gid, RecordKind.FACE, batch_id, 0, 1),
        )
        assert embeddings.hex() == GALLERY["face"]["embedding_f32le"]
        with pytest.raises(DecryptionError):  # a batch never opens as a single record
            cipher.open(*_where(entries[1]))


def _where(entry: Entry) -> tuple[RecordKind, bytes, int, bytes, bytes]:
    return entry.kind, entry.record_id, entry.version, entry.nonce, entry.ciphertext


@pytest.mark.parametrize("state", sorted(PHOTOS["states"]))
def test_gallery_photos_vector_reads_ages_at_capture_and_the_edit(
    state: str, tmp_path: Path
) -> None:
    """Faces with and without an age at capture, and a subject's second record version, as
    single records and as a batch with its optional age column."""
    facts = PHOTOS["states"][state]
    home = _install(VECTORS / "gallery_photos" / state, facts["files"], tmp_path)
    with GalleryStore(home, KeyFileProvider(home / KEYS_DIR)) as store:
        gallery = store.open_gallery(PHOTOS["gallery"]["name"])
        assert gallery.key_id == facts["key_id"]
        (subject,) = gallery.subjects()
        want = PHOTOS["subject"]
        assert (subject.subject_id, subject.display_name, subject.notes) == (
            want["subject_id"],
            want["display_name"],
            want["notes"],
        )
        assert (subject.legal_basis, str(subject.retention_until), subject.enrolled_by) == (
            want["legal_basis"],
            want["retention_until"],
            want["enrolled_by"],
        )
        assert subject.version == facts["subject_version"]
        faces = gallery.faces(subject.subject_id)
        assert [{"face_id": f.face_id, "age_at_capture": f.age_at_capture} for f in faces] == (
            PHOTOS["faces"]
        )
        assert [gallery.thumbnail(f.face_id)[:3] for f in faces] == [b"\xff\xd8\xff"] * 2


def test_gallery_vector_tampered_is_refused(tmp_path: Path) -> None:
    """A flipped byte fails the checksum; with the checksums rebuilt it fails the cipher."""
    facts = GALLERY["states"]["enrolled"]
    stored = (VECTORS / "gallery" / "enrolled" / "records.log").read_bytes()
    second_frame = _frame_offsets(VECTORS / "gallery" / "enrolled" / "records.log")[1]
    for name, data, error in (
        ("flipped", stored[:-1] + bytes([stored[-1] ^ 1]), CorruptDataError),
        ("resealed", _reseal_frame_at(stored, second_frame, 0), DecryptionError),
    ):
        home = _gallery_home("enrolled", tmp_path / name)
        (home / facts["files"]["records.log"]).write_bytes(data)
        with GalleryStore(home, KeyFileProvider(home / KEYS_DIR)) as store, pytest.raises(error):
            store.open_gallery(GALLERY["gallery"]["name"])


def _frame_offsets(path: Path) -> list[int]:
    with open(path, "rb") as stream:
        read_header(stream, path.name, formats=(1, BATCHED_LOG_FORMAT))
        return [f.offset for f in scan_frames(stream, path.name, ScanState())]


# -- the audit log -------------------------------------------------------------------------


def _device_public_key() -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(AUDIT["device_public_key"]))


def test_stored_audit_log_verifies_intact() -> None:
    """verify_chain on the committed copy itself: no key, just the device's public key."""
    report = verify_chain(VECTORS / "audit", _device_public_key())
    assert report.status is VerifyStatus.OK, report.problem
    assert (report.records, report.checkpoints, report.head_seq) == (3, AUDIT["checkpoints"], 3)
    assert report.chain_hash == AUDIT["chain_hash"]
    assert report.log_id == AUDIT["log_id"]
    assert report.key_fingerprint == AUDIT["device_fingerprint"]
    assert (report.torn_tail_bytes, report.unsigned_records) == (0, 0)


def test_stored_audit_records_open_with_the_known_key(tmp_path: Path) -> None:
    home = _install(VECTORS / "audit", AUDIT["files"], tmp_path)
    data_key = _keyring(home).data_key(AUDIT_KEY_SCOPE, AUDIT["key_id"])
    assert data_key.hex() == AUDIT["data_key"]
    log = (VECTORS / "audit" / LOG_FILE).read_bytes()
    header = parse_audit_header(log)
    assert (header.log_id.hex(), header.key_id.hex()) == (AUDIT["log_id"], AUDIT["key_id"])
    with open(VECTORS / "audit" / LOG_FILE, "rb") as stream:
        frames = list(scan_audit_frames(stream, AuditScanState()))
    assert [f.kind for f in frames] == [
        FrameKind.EVENT,
        FrameKind.EVENT,
        FrameKind.CHECKPOINT,
        FrameKind.EVENT,
        FrameKind.CHECKPOINT,
    ]
    records = [open_event(data_key, header, f) for f in frames if f.kind == FrameKind.EVENT]
    assert [
        {
            "seq": r.seq,
            "time": r.time.isoformat(),
            "chain_hash": r.chain_hash,
            **event_to_json(r.event),
        }
        for r in records
    ] == AUDIT["records"]


def _signer() -> Ed25519PrivateKey:
    seed = make_vectors.fixed_bytes("audit/device-key", 32)
    signer = Ed25519PrivateKey.from_private_bytes(seed)
    assert signer.public_key().public_bytes_raw().hex() == AUDIT["device_public_key"]
    return signer


def test_stored_audit_log_is_continued_by_the_writer(tmp_path: Path) -> None:
    """Today's writer opens the stored log, reads it back and appends to its chain."""
    home = _install(VECTORS / "audit", AUDIT["files"], tmp_path)
    with AuditLog.open(home, _keyring(home), signer=_signer()) as log:
        assert log.log_id == AUDIT["log_id"] and log.last_seq == 3
        found = log.query()
        assert [r.seq for r in found] == [3, 2, 1]
        assert [r.chain_hash for r in reversed(found)] == [
            r["chain_hash"] for r in AUDIT["records"]
        ]
        log.append(AuditEvent(user="officer-7", role="investigator", action=AuditAction.LOGOUT))
    report = verify_chain(home / "audit", _device_public_key())
    assert report.status is VerifyStatus.OK, report.problem
    assert (report.records, report.checkpoints) == (4, 3)


@pytest.mark.parametrize("name", sorted(AUDIT["tampered"]))
def test_tampered_audit_copy_is_caught(name: str, tmp_path: Path) -> None:
    facts = AUDIT["tampered"][name]
    for file in (LOG_FILE, HEAD_FILE):
        shutil.copyfile(VECTORS / "audit" / file, tmp_path / file)
    for file in facts["replaces"]:
        shutil.copyfile(VECTORS / "audit" / "tampered" / name / file, tmp_path / file)
    report = verify_chain(tmp_path, _device_public_key())
    assert (str(report.status), report.reason, report.first_bad_seq) == (
        facts["status"],
        facts["reason"],
        facts["first_bad_seq"],
    ), report.problem
    assert report.ok == (facts["status"] == "torn_tail")


def test_audit_writer_refuses_a_tampered_copy(tmp_path: Path) -> None:
    home = _install(VECTORS / "audit", AUDIT["files"], tmp_path)
    tampered = VECTORS / "audit" / "tampered" / "chain-rebuilt" / LOG_FILE
    shutil.copyfile(tampered, home / AUDIT["files"][LOG_FILE])
    before = (home / AUDIT["files"][LOG_FILE]).read_bytes()
    with pytest.raises(AuditTamperedError, match="fails verification"):
        AuditLog.open(home, _keyring(home), signer=_signer())
    assert (home / AUDIT["files"][LOG_FILE]).read_bytes() == before  # nothing appended


# -- cases ---------------------------------------------------------------------------------


def test_case_vector_opens_with_the_known_key(tmp_path: Path) -> None:
    home = _install(VECTORS / "cases", CASES["files"], tmp_path)
    keyring = _keyring(home)
    assert keyring.data_key(f"case-{CASES['case_id']}", CASES["key_id"]).hex() == CASES["data_key"]
    with CaseStore(home, keyring) as store:
        case = store.find(CASES["number"])
        assert case.case_id == CASES["case_id"]
        assert case.meta.to_head() == CASES["meta"]
        (file,) = case.files()
        assert {"record_id": file.record_id, "version": file.version, **file.to_head()} == (
            CASES["file"]
        )
        (face,) = case.faces()
        want = dict(CASES["face"])
        embedding, jpeg = want.pop("embedding_f32le"), want.pop("thumbnail_jpeg")
        assert {"face_id": face.face_id, **face.to_head()} == want
        assert face.embedding.astype("<f4").tobytes().hex() == embedding
        assert case.thumbnail(face.face_id).hex() == jpeg
        results = case.results()
        assert results is not None and results.to_head() == CASES["results"]


@pytest.mark.parametrize("target", ["case.sealed", "results.sealed", "records.log"])
def test_tampered_case_vector_is_refused(target: str, tmp_path: Path) -> None:
    home = _install(VECTORS / "cases", CASES["files"], tmp_path)
    path = home / CASES["files"][target]
    data = path.read_bytes()
    if target == "records.log":  # checksums rebuilt: only the cipher can tell
        offsets = _frame_offsets(path)
        path.write_bytes(_reseal_frame_at(data, offsets[0], 0))
    else:
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with CaseStore(home, _keyring(home)) as store, pytest.raises(CorruptCaseError):
        case = store.find(CASES["number"])
        case.results()


def test_a_case_written_before_age_bands_still_opens_as_adults_only(tmp_path: Path) -> None:
    """The case format gained its age-band fields (may_include_children, the band its
    clusters were made with); a case sealed by the earlier version still opens, read as the
    adults-only case it was, and its results keep their leads."""
    old = VECTORS / "cases_before_age_bands"
    before = _json(old / "expected.json")
    home = _install(old, before["files"], tmp_path)
    with CaseStore(home, _keyring(home)) as store:
        case = store.find(before["number"])
        assert case.case_id == before["case_id"]
        assert case.meta.may_include_children is False
        results = case.results()
        assert results is not None and results.age_band == "adult"
        assert [c.number for c in results.clusters] == [
            c["number"] for c in before["results"]["clusters"]
        ]
