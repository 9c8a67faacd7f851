"""Encrypted gallery storage: round trip, keys, durability, erasure, rotation, export/import,
and the batch records compaction writes.

Everything runs on real files in tmp_path; the only fake is a writer that reports a full disk
(and, where this machine lets us mount one, a real tiny tmpfs does the same).
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from edgeid.runtime.compat import UTC
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.gallery.backup import export_gallery, import_gallery
from edgeid.runtime.gallery.errors import (
    BackupError,
    DecryptionError,
    GalleryBusyError,
    GalleryExistsError,
    InvalidRecordError,
    KeyProviderError,
    StorageFullError,
)
from edgeid.runtime.gallery.records import (
    BatchTable,
    Face,
    NewFace,
    NewSubject,
    Subject,
    decode_batch,
    encode_batch,
)
from edgeid.runtime.gallery.store import (
    GALLERIES_DIR,
    KEYRING_FILE,
    RECORDS_LOG,
    RETIRED_SUFFIX,
    Gallery,
    GalleryStore,
)
from edgeid.runtime.vault.crypto import RecordCipher, RecordKind, unwrap_key
from edgeid.runtime.vault.errors import CorruptDataError
from edgeid.runtime.vault.framed_log import (
    HEADER_BYTES,
    MAX_ENTRIES_PER_FRAME,
    Entry,
    LogHeader,
    ScanState,
    encode_frame,
    encode_header,
    read_header,
    scan_frames,
)
from edgeid.runtime.vault.keys import (
    KeyFileProvider,
    PassphraseProvider,
    SystemdCredsProvider,
    Tpm2Provider,
    read_keyring,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
FAST_SCRYPT = 10  # log2(n): the minimum we accept, so tests stay fast; production uses 17
DIM = 128


def _face(rng: np.random.Generator, *, thumb_bytes: int = 2000) -> NewFace:
    vector = rng.standard_normal(DIM).astype(np.float32)
    vector /= np.linalg.norm(vector)
    return NewFace(
        embedding=vector,
        quality=float(rng.uniform(0.5, 1.0)),
        model_id="dlib_resnet_v1",
        source_sha256=rng.bytes(32).hex(),
        thumbnail_jpeg=b"\xff\xd8\xff\xe0" + rng.bytes(thumb_bytes),
    )


def _subject(name: str, **extra: object) -> NewSubject:
    return NewSubject(
        display_name=name,
        legal_basis="case 2024/117, warrant 55",
        enrolled_by="officer-7",
        **extra,  # type: ignore[arg-type]
    )


def _store(state: Path, **kwargs: object) -> GalleryStore:
    return GalleryStore(state, KeyFileProvider(state / "keys"), **kwargs)  # type: ignore[arg-type]


def _log(store: GalleryStore, gallery: Gallery) -> Path:
    return store.root / gallery.gallery_id / RECORDS_LOG


def _frames(path: Path) -> list[tuple[int, int, tuple[Entry, ...]]]:
    with open(path, "rb") as stream:
        return [(f.offset, f.size, f.entries) for f in scan_frames(stream, "t", ScanState())]


# -- round trip ------------------------------------------------------------------------------


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    clock_now = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)
    with _store(tmp_path, clock=lambda: clock_now) as store:
        gallery = store.create_gallery("missing persons", description="unit B")
        store.create_gallery("second")
        faces = [_face(rng), _face(rng)]
        made = gallery.enroll(
            _subject("Ana Lima", notes="scar left cheek", retention_until=date(2025, 1, 1)),
            faces,
        )
        added = _face(rng)
        extra = gallery.add_faces(made.subject.subject_id, [added])
        other = gallery.enroll(_subject("Ben Okafor"))
    with _store(tmp_path) as store:
        assert [g.name for g in store.list_galleries()] == ["missing persons", "second"]
        gallery = store.open_gallery("missing persons")
        assert gallery.description == "unit B"
        subject = gallery.subject(made.subject.subject_id)
        assert subject == made.subject
        assert (subject.display_name, subject.notes) == ("Ana Lima", "scar left cheek")
        assert subject.enrolled_at == clock_now and subject.retention_until == date(2025, 1, 1)
        assert gallery.subject(other.subject.subject_id).display_name == "Ben Okafor"
        stored = gallery.faces(made.subject.subject_id)
        assert [f.face_id for f in stored] == [f.face_id for f in (*made.faces, *extra)]
        for given, face in zip([*faces, added], stored, strict=True):
            assert face.embedding.dtype == np.float32 and not face.embedding.flags.writeable
            assert face.embedding.tobytes() == np.asarray(given.embedding).tobytes()
            assert gallery.thumbnail(face.face_id) == given.thumbnail_jpeg
            assert (face.source_sha256, face.model_id) == (given.source_sha256, given.model_id)
            assert face.quality == pytest.approx(given.quality)
        ids, matrix = gallery.embeddings("dlib_resnet_v1")
        assert len(ids) == 3 and matrix.shape == (3, DIM)
        assert gallery.expired_subjects(date(2025, 6, 1)) == [subject]


def test_invalid_input_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    with _store(tmp_path) as store:
        gallery = store.create_gallery("g")
        size = _log(store, gallery).stat().st_size
        good = _face(rng)
        bad_faces = [
            NewFace(np.array([np.nan] * DIM), 0.9, "m", good.source_sha256, good.thumbnail_jpeg),
            NewFace(good.embedding, 0.9, "m", good.source_sha256, b"\x89PNG not a jpeg"),
            NewFace(good.embedding, 0.9, "m", "not-a-hash", good.thumbnail_jpeg),
        ]
        for face in bad_faces:
            with pytest.raises(InvalidRecordError):
                gallery.enroll(_subject("X"), [face])
        with pytest.raises(BadInputError):
            gallery.enroll(_subject("   "))
        with pytest.raises(GalleryExistsError):
            store.create_gallery("g")
        assert _log(store, gallery).stat().st_size == size and gallery.subjects() == []


def test_second_process_is_refused_while_the_store_is_open(tmp_path: Path) -> None:
    with _store(tmp_path), pytest.raises(GalleryBusyError):
        _store(tmp_path)


# -- keys and decryption failures ------------------------------------------------------------


def _assert_opaque(error: DecryptionError) -> None:
    assert str(error) == DecryptionError.MESSAGE
    assert error.__cause__ is None and error.__context__ is None
    assert "tag" not in repr(error).lower()


def test_wrong_passphrase_or_key_file_is_one_opaque_error(tmp_path: Path) -> None:
    with GalleryStore(tmp_path / "p", PassphraseProvider("correct horse", log2_n=FAST_SCRYPT)):
        pass
    store = GalleryStore(tmp_path / "p", PassphraseProvider("correct horse", log2_n=FAST_SCRYPT))
    store.create_gallery("g").enroll(_subject("Ana Lima"))
    store.close()
    with pytest.raises(DecryptionError) as caught:
        GalleryStore(tmp_path / "p", PassphraseProvider("wrong horse", log2_n=FAST_SCRYPT))
    _assert_opaque(caught.value)

    with _store(tmp_path / "k") as store:
        store.create_gallery("g")
    (key_file,) = (tmp_path / "k" / "keys").iterdir()
    key_file.write_bytes(os.urandom(32))
    with pytest.raises(DecryptionError) as caught:
        _store(tmp_path / "k")
    _assert_opaque(caught.value)

    key_file.chmod(0o644)
    with pytest.raises(KeyProviderError, match="chmod 600"):
        _store(tmp_path / "k")
    with pytest.raises(KeyProviderError, match="passphrase KEK"):
        GalleryStore(tmp_path / "p", KeyFileProvider(tmp_path / "keys"))


def test_associated_data_binds_gallery_kind_record_and_version() -> None:
    key = os.urandom(32)
    gallery_a, gallery_b, record, other = (os.urandom(16) for _ in range(4))
    sealed = RecordCipher(key, gallery_a).seal(RecordKind.SUBJECT, record, 1, b"Ana Lima")
    assert (
        RecordCipher(key, gallery_a).open(
            RecordKind.SUBJECT, record, 1, sealed.nonce, sealed.ciphertext
        )
        == b"Ana Lima"
    )
    moved = [
        (gallery_b, RecordKind.SUBJECT, record, 1),
        (gallery_a, RecordKind.FACE, record, 1),
        (gallery_a, RecordKind.SUBJECT, other, 1),
        (gallery_a, RecordKind.SUBJECT, record, 2),
    ]
    for scope, kind, rid, version in moved:
        with pytest.raises(DecryptionError) as caught:
            RecordCipher(key, scope).open(kind, rid, version, sealed.nonce, sealed.ciphertext)
        _assert_opaque(caught.value)


def test_record_moved_to_another_id_or_gallery_fails_to_open(tmp_path: Path) -> None:
    """The frame checksums are recomputed, so only the AEAD binding can catch the move."""
    rng = np.random.default_rng(3)
    with _store(tmp_path) as store:
        first, second = store.create_gallery("a"), store.create_gallery("b")
        first.enroll(_subject("Ana Lima"), [_face(rng)])
        second.enroll(_subject("Ben Okafor"))
        log_a, log_b = _log(store, first), _log(store, second)
    offset, size, entries = _frames(log_a)[-1]
    renamed = [Entry(e.kind, os.urandom(16), e.version, e.nonce, e.ciphertext) for e in entries]
    original = log_a.read_bytes()
    frame = encode_frame(renamed)
    assert len(frame) == size
    log_a.write_bytes(original[:offset] + frame + original[offset + size :])
    with _store(tmp_path) as store, pytest.raises(DecryptionError):
        store.open_gallery("a")

    log_a.write_bytes(original)
    with open(log_b, "ab") as out:
        out.write(original[offset : offset + size])  # a whole frame of gallery a, appended to b
    with _store(tmp_path) as store, pytest.raises(DecryptionError):
        store.open_gallery("b")


# -- durability ------------------------------------------------------------------------------


def test_torn_tail_is_dropped_with_a_warning_and_then_overwritten(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(4)
    with _store(tmp_path) as store:
        gallery = store.create_gallery("g")
        kept = [gallery.enroll(_subject(f"person {i}"), [_face(rng)]) for i in range(2)]
        gallery.enroll(_subject("torn one"), [_face(rng)])
        log = _log(store, gallery)
    offset, size, _ = _frames(log)[-1]
    with open(log, "r+b") as out:
        out.truncate(offset + size // 2)
    with caplog.at_level(logging.WARNING), _store(tmp_path) as store:
        gallery = store.open_gallery("g")
        assert {s.subject_id for s in gallery.subjects()} == {e.subject.subject_id for e in kept}
        assert gallery.torn_bytes == size // 2
        assert "torn tail" in caplog.text and "torn one" not in caplog.text
        later = gallery.enroll(_subject("after the crash"), [_face(rng)])
    with open(log, "ab") as out:
        out.write(bytes(4096))  # a power cut: the file grew but its data never landed
    caplog.clear()
    with caplog.at_level(logging.WARNING), _store(tmp_path) as store:
        gallery = store.open_gallery("g")
        assert len(gallery.subjects()) == 3
        assert gallery.subject(later.subject.subject_id).display_name == "after the crash"
        assert gallery.thumbnail(later.faces[0].face_id).startswith(b"\xff\xd8")
        assert "torn tail of 4096 bytes" in caplog.text


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np
    from edgeid.runtime.vault.keys import KeyFileProvider
    from edgeid.runtime.gallery.store import GalleryStore, NewFace, NewSubject

    state = Path(sys.argv[1])
    store = GalleryStore(state, KeyFileProvider(state / "keys"))
    names = [g.name for g in store.list_galleries()]
    gallery = store.open_gallery("g") if "g" in names else store.create_gallery("g")
    rng = np.random.default_rng(int(sys.argv[2]))
    print("ready", flush=True)
    while True:
        face = NewFace(rng.standard_normal(128).astype(np.float32), 0.9, "m", "ab" * 32,
                       b"\\xff\\xd8\\xff" + rng.bytes(int(rng.integers(100, 60000))))
        made = gallery.enroll(NewSubject("n", "basis", "tech"), [face, face])
        print(made.subject.subject_id, flush=True)
    """
)


def test_every_acknowledged_enrolment_survives_kill_9(tmp_path: Path) -> None:
    acknowledged: list[str] = []
    for round_ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path), str(round_)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 20
        seen = 0
        while seen < 10 + 7 * round_ and time.monotonic() < deadline:
            line = child.stdout.readline().strip()
            if line:
                acknowledged.append(line)
                seen += 1
        time.sleep(0.003 * round_)  # land the kill at different points of the write path
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate(timeout=20)
        acknowledged += [line for line in rest.split() if line]
        assert child.returncode == -signal.SIGKILL
        assert seen >= 10, "the child enrolled too slowly to test anything"
        with _store(tmp_path) as store:
            present = {s.subject_id for s in store.open_gallery("g").subjects()}
        missing = set(acknowledged) - present
        assert not missing, f"round {round_}: {len(missing)} acknowledged enrolments lost"
        # At most one enrolment in flight at each kill so far: durable, never acknowledged.
        assert len(present) - len(acknowledged) <= round_ + 1


def test_bit_flip_is_an_error_naming_the_gallery_not_its_content(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    with _store(tmp_path) as store:
        gallery = store.create_gallery("g")
        gallery.enroll(_subject("Ana Lima"), [_face(rng)])
        made = gallery.enroll(_subject("Ben Okafor"), [_face(rng)])
        gid, log = gallery.gallery_id, _log(store, gallery)
        thumbs = store.root / gid / f"thumbs-{gallery.key_id}.log"
    original = log.read_bytes()
    frames = _frames(log)
    spots = {
        "ciphertext of a middle frame": frames[1][0] + frames[1][1] - 20,
        "ciphertext of the last frame": frames[-1][0] + frames[-1][1] - 5,
        "length field of a frame": frames[1][0] + 6,
        "file header": 20,
    }
    for what, spot in spots.items():
        damaged = bytearray(original)
        damaged[spot] ^= 0x10
        log.write_bytes(bytes(damaged))
        with pytest.raises(CorruptDataError) as caught, _store(tmp_path) as store:
            store.open_gallery("g")
        message = str(caught.value)
        assert gid in message, what
        assert "Ana" not in message and "Ben" not in message
    log.write_bytes(original)

    damaged = bytearray(thumbs.read_bytes())
    damaged[-10] ^= 0x01
    thumbs.write_bytes(bytes(damaged))
    with _store(tmp_path) as store:
        gallery = store.open_gallery("g")
        with pytest.raises(CorruptDataError, match=gid):
            gallery.thumbnail(made.faces[0].face_id)


class FullDisk:
    """A FileWriter that writes part of the n-th write, then reports ENOSPC."""

    def __init__(self) -> None:
        self.fail_at: int | None = None
        self.writes = 0

    def write(self, fd: int, data: bytes) -> int:
        self.writes += 1
        if self.fail_at is not None and self.writes >= self.fail_at:
            if len(data) > 1 and self.writes == self.fail_at:
                return os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def arm(self, nth: int) -> None:
        self.writes, self.fail_at = 0, nth


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("nth", "stage"), [(1, "thumbnail log"), (2, "records log")])
def test_full_disk_fails_the_enrolment_and_leaves_the_gallery_as_it_was(
    tmp_path: Path, nth: int, stage: str
) -> None:
    rng = np.random.default_rng(6)
    disk = FullDisk()
    with _store(tmp_path, writer=disk) as store:
        gallery = store.create_gallery("g")
        gallery.enroll(_subject("Ana Lima"), [_face(rng)])
        before = _snapshot(store.root)
        disk.arm(nth)
        with pytest.raises(StorageFullError, match="disk full"):
            gallery.enroll(_subject("Cleo Park"), [_face(rng), _face(rng)])
        assert len(gallery.subjects()) == 1
        assert _snapshot(store.root) == before, f"the failed {stage} write left bytes behind"
        disk.fail_at = None  # space freed
        later = gallery.enroll(_subject("Dan Roe"), [_face(rng)])
    with _store(tmp_path) as store:
        gallery = store.open_gallery("g")
        assert len(gallery.subjects()) == 2 and gallery.torn_bytes == 0
        assert gallery.thumbnail(later.faces[0].face_id).startswith(b"\xff\xd8")


@pytest.mark.parametrize(("nth", "stage"), [(1, "keyring"), (4, "rewritten logs")])
def test_full_disk_during_compaction_keeps_the_old_gallery(
    tmp_path: Path, nth: int, stage: str
) -> None:
    rng = np.random.default_rng(6)
    disk = FullDisk()
    with _store(tmp_path, writer=disk) as store:
        gallery = store.create_gallery("g")
        gone = gallery.enroll(_subject("Ana Lima"), [_face(rng)])
        kept = gallery.enroll(_subject("Ben Okafor"), [_face(rng)])
        gallery.delete_subject(gone.subject.subject_id, compact=False)
        logs = {k: v for k, v in _snapshot(store.root).items() if k.endswith(".log")}
        disk.arm(nth)
        with pytest.raises(StorageFullError):
            gallery.compact()
        after = {k: v for k, v in _snapshot(store.root).items() if not k.endswith(".json")}
        assert {k: v for k, v in after.items() if k.endswith(".log")} == logs, stage
        assert not [k for k in after if k.endswith((".new", ".tmp", RETIRED_SUFFIX))]
        assert [s.subject_id for s in gallery.subjects()] == [kept.subject.subject_id]
        assert gallery.thumbnail(kept.faces[0].face_id).startswith(b"\xff\xd8")
    with _store(tmp_path) as store:  # the disk has room again
        gallery = store.open_gallery("g")
        _, wrapped = read_keyring(store.root / KEYRING_FILE)
        assert list(wrapped[gallery.gallery_id]) == [gallery.key_id]
        gallery.compact()
        assert [s.subject_id for s in gallery.subjects()] == [kept.subject.subject_id]


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the FileWriter test covers ENOSPC")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_real_full_disk_on_a_tiny_tmpfs(tiny_tmpfs: Path) -> None:
    rng = np.random.default_rng(7)
    acknowledged = []
    with _store(tiny_tmpfs) as store:
        gallery = store.create_gallery("g")
        with pytest.raises(StorageFullError):
            for i in range(100):
                made = gallery.enroll(_subject(f"p{i}"), [_face(rng, thumb_bytes=20_000)])
                acknowledged.append(made.subject.subject_id)
        assert len(acknowledged) >= 3
        assert [s.subject_id for s in gallery.subjects()] == acknowledged
    with _store(tiny_tmpfs) as store:
        gallery = store.open_gallery("g")
        assert [s.subject_id for s in gallery.subjects()] == acknowledged
        assert gallery.torn_bytes == 0
        for face in gallery.faces():
            assert gallery.thumbnail(face.face_id).startswith(b"\xff\xd8")


# -- erasure ---------------------------------------------------------------------------------


def _b64_cores(data: bytes) -> list[bytes]:
    """The parts of base64(data) that stay the same wherever ``data`` sits in a longer string:
    one per alignment, without the characters shared with neighbouring bytes."""
    cores = []
    for lead in range(3):
        encoded = base64.b64encode(bytes(lead) + data)
        cores.append(encoded[-(-lead * 8 // 6) : -4])
    return cores


def _text_needles(text: str) -> dict[str, bytes]:
    utf8 = text.encode("utf-8")
    needles = {
        "utf-8": utf8,
        "utf-16-le": text.encode("utf-16-le"),
        "utf-16-be": text.encode("utf-16-be"),
        "json-ascii": json.dumps(text)[1:-1].encode(),
        "hex": utf8.hex().encode(),
    }
    for lead, core in enumerate(_b64_cores(utf8)):
        needles[f"base64+{lead}"] = core
    return needles


def _embedding_needles(vector: np.ndarray) -> dict[str, bytes]:
    raw = vector.astype("<f4").tobytes()
    needles = {
        "float32-le": raw[:32],
        "float32-le-mid": raw[200:232],
        "float32-be": vector.astype(">f4").tobytes()[:32],
        "float64-le": vector.astype("<f8").tobytes()[:32],
        "hex": raw[:32].hex().encode(),
        "json": ", ".join(repr(float(x)) for x in vector[:3]).encode(),
        "json-compact": ",".join(repr(float(x)) for x in vector[:3]).encode(),
    }
    for lead, core in enumerate(_b64_cores(raw[:48])):
        needles[f"base64+{lead}"] = core
    return needles


def _hits(root: Path, needles: dict[str, bytes]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{name} in {path.name}" for name, n in needles.items() if n in data]
    return found


def test_b64_cores_find_text_at_any_offset() -> None:
    for lead in range(5):
        encoded = base64.b64encode(b"x" * lead + "Žofie Canary".encode() + b"tail")
        assert any(core in encoded for core in _b64_cores("Žofie Canary".encode()))


def test_erasure_leaves_no_trace_of_deleted_canaries(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    canaries = {
        "Quintessa Marrowbyte-Canary": "canary note: velvet periwinkle 4471",
        "Žofie Ærøskøbing Kanárek": "kanárek poznámka: fialová 9902",
    }
    with _store(tmp_path) as store:
        gallery = store.create_gallery("g")
        keeper = gallery.enroll(_subject("Keeper Subject"), [_face(rng)])
        before = _snapshot(tmp_path)
        made = []
        for name, notes in canaries.items():
            faces = [_face(rng, thumb_bytes=4000), _face(rng, thumb_bytes=4000)]
            made.append(gallery.enroll(_subject(name, notes=notes), faces))
        needles: dict[str, bytes] = {}
        for name, notes in canaries.items():
            needles |= {f"{name[:6]} {k}": v for k, v in _text_needles(name).items()}
            needles |= {f"note {k}": v for k, v in _text_needles(notes).items()}
        for enrolment in made:
            for face in enrolment.faces:
                needles |= {
                    f"{face.face_id[:6]} {k}": v
                    for k, v in _embedding_needles(face.embedding).items()
                }
                jpeg = gallery.thumbnail(face.face_id)
                needles[f"{face.face_id[:6]} thumbnail"] = jpeg[100:140]
        assert not _hits(tmp_path, needles), "plaintext biometric data on disk before deletion"

        # The canaries' ciphertext as written, to prove the old bytes are gone too.
        after = _snapshot(tmp_path)
        for rel, data in after.items():
            if rel.endswith(".log") and rel in before:
                grown = data[len(before[rel]) :]
                needles |= {
                    f"old ciphertext {rel[-20:]}@{i}": grown[i : i + 32]
                    for i in range(64, len(grown) - 32, 257)
                }
        old_key = gallery.key_id
        for enrolment in made:
            gallery.delete_subject(enrolment.subject.subject_id, compact=False)
        gallery.compact()
        assert gallery.key_id != old_key
        hits = _hits(tmp_path, needles)
        assert not hits, f"deleted data still on disk: {hits[:5]}"
    _, wrapped = read_keyring(tmp_path / GALLERIES_DIR / KEYRING_FILE)
    assert list(wrapped[gallery.gallery_id]) == [gallery.key_id]  # the old data key is erased
    with _store(tmp_path) as store:
        gallery = store.open_gallery("g")
        assert [s.subject_id for s in gallery.subjects()] == [keeper.subject.subject_id]
        assert gallery.thumbnail(keeper.faces[0].face_id).startswith(b"\xff\xd8")


def test_interrupted_compaction_is_tidied_on_open(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    with _store(tmp_path) as store:
        gallery = store.create_gallery("g")
        made = gallery.enroll(_subject("Ana Lima"), [_face(rng)])
        log = _log(store, gallery)
        directory = log.parent
    os.link(log, directory / (RECORDS_LOG + RETIRED_SUFFIX))  # crashed before the commit
    (directory / (RECORDS_LOG + ".new")).write_bytes(b"half a compaction")
    (directory / "thumbs-0123456789abcdef0123456789abcdef.log").write_bytes(b"orphan")
    with _store(tmp_path) as store:
        gallery = store.open_gallery("g")
        assert gallery.subject(made.subject.subject_id).display_name == "Ana Lima"
        assert gallery.thumbnail(made.faces[0].face_id).startswith(b"\xff\xd8")
        assert sorted(p.name for p in directory.iterdir()) == sorted(
            [RECORDS_LOG, f"thumbs-{gallery.key_id}.log"]
        )


def test_half_done_create_and_delete_are_cleaned_and_a_lost_keyring_refused(
    tmp_path: Path,
) -> None:
    with _store(tmp_path) as store:
        kept = store.create_gallery("kept")
        half_deleted = store.root / ("ab" * 16)
        half_deleted.mkdir()
        (half_deleted / RECORDS_LOG).write_bytes(b"ciphertext whose key is gone")
        half_created = store.keyring.new_data_key("cd" * 16)
    with _store(tmp_path) as store:
        assert not half_deleted.exists()
        assert store.keyring.gallery_ids() == [kept.gallery_id]
        assert half_created[0] not in json.dumps(store.keyring.wrapped_keys(), default=str)
    keyring = tmp_path / GALLERIES_DIR / KEYRING_FILE
    keyring.rename(tmp_path / "elsewhere.json")
    with pytest.raises(CorruptDataError, match="restore the keyring"):
        _store(tmp_path)
    (tmp_path / "elsewhere.json").rename(keyring)
    with _store(tmp_path) as store:
        assert [g.name for g in store.list_galleries()] == ["kept"]


def test_delete_gallery_erases_its_files_and_keys(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        gallery = store.create_gallery("g")
        gallery.enroll(_subject("Ana Lima"), [_face(np.random.default_rng(10))])
        store.create_gallery("other")
        store.delete_gallery("g")
        assert not (store.root / gallery.gallery_id).exists()
        assert [g.name for g in store.list_galleries()] == ["other"]
    _, wrapped = read_keyring(tmp_path / GALLERIES_DIR / KEYRING_FILE)
    assert gallery.gallery_id not in wrapped


# -- key rotation ----------------------------------------------------------------------------


def _kek(state: Path, provider: PassphraseProvider | KeyFileProvider) -> tuple[str, bytes]:
    info, _ = read_keyring(state / GALLERIES_DIR / KEYRING_FILE)
    kek_id, params = str(info["kek_id"]), info["params"]
    assert isinstance(params, dict)
    return kek_id, provider.load(kek_id, params)


def _assert_opens_nothing(state: Path, old_kek: bytes) -> None:
    info, wrapped = read_keyring(state / GALLERIES_DIR / KEYRING_FILE)
    assert wrapped, "nothing to test against"
    for gid, keys in wrapped.items():
        for key_id, blob in keys.items():
            context = f"edgeid/keyring/v1/{info['kek_id']}/{gid}/{key_id}".encode()
            with pytest.raises(DecryptionError):
                unwrap_key(old_kek, bytes.fromhex(blob), context)


def test_rotation_rewraps_every_data_key_and_the_old_kek_opens_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    old = PassphraseProvider("old passphrase", log2_n=FAST_SCRYPT)
    new = PassphraseProvider("new passphrase", log2_n=FAST_SCRYPT)
    with GalleryStore(tmp_path, old) as store:
        made = [store.create_gallery(n).enroll(_subject(n), [_face(rng)]) for n in ("a", "b")]
    old_id, old_kek = _kek(tmp_path, old)
    with GalleryStore(tmp_path, old) as store:
        store.rotate_kek(new)
        assert store.open_gallery("a").subject(made[0].subject.subject_id).display_name == "a"
    _assert_opens_nothing(tmp_path, old_kek)
    with pytest.raises(DecryptionError):
        GalleryStore(tmp_path, old)

    new_id, new_kek = _kek(tmp_path, new)
    keys = KeyFileProvider(tmp_path / "keys")
    with GalleryStore(tmp_path, new) as store:
        assert store.open_gallery("b").subject(made[1].subject.subject_id).display_name == "b"
        store.rotate_kek(keys)
    _assert_opens_nothing(tmp_path, new_kek)
    key_id, _ = _kek(tmp_path, keys)
    with _store(tmp_path) as store:
        store.rotate_kek(KeyFileProvider(tmp_path / "keys"))
        assert len(store.list_galleries()) == 2
    assert not keys.path(key_id).exists()  # the retired key file is zero-filled and unlinked
    assert len({old_id, new_id, key_id}) == 3


# -- export / import -------------------------------------------------------------------------


def test_export_import_round_trip_and_refusals(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    backup = tmp_path / "gallery.edgeid-export"
    with _store(tmp_path / "box1") as store:
        gallery = store.create_gallery("missing persons", description="unit B")
        made = [
            gallery.enroll(_subject(n, notes="n"), [_face(rng), _face(rng)])
            for n in ("Ana Lima", "Ben Okafor")
        ]
        export_gallery(store, "missing persons", backup, "export secret", log2_n=FAST_SCRYPT)
        with pytest.raises(BackupError, match="exists"):
            export_gallery(store, "missing persons", backup, "x", log2_n=FAST_SCRYPT)
        thumbs = {f.face_id: gallery.thumbnail(f.face_id) for f in gallery.faces()}
        originals = {f.face_id: f for f in gallery.faces()}
    assert b"Ana Lima" not in backup.read_bytes() and b"missing persons" not in backup.read_bytes()

    box2 = tmp_path / "box2"
    with GalleryStore(box2, PassphraseProvider("box2", log2_n=FAST_SCRYPT)) as store:
        with pytest.raises(DecryptionError):
            import_gallery(store, backup, "wrong secret")
        assert store.list_galleries() == []
        copy = import_gallery(store, backup, "export secret")
        assert (copy.name, copy.description) == ("missing persons", "unit B")
        for enrolment in made:
            assert copy.subject(enrolment.subject.subject_id) == enrolment.subject
        for face in copy.faces():
            assert face.embedding.tobytes() == originals[face.face_id].embedding.tobytes()
            assert face.enrolled_at == originals[face.face_id].enrolled_at
            assert copy.thumbnail(face.face_id) == thumbs[face.face_id]
        with pytest.raises(GalleryExistsError):
            import_gallery(store, backup, "export secret")

        data = backup.read_bytes()
        damaged = tmp_path / "damaged"
        for name, broken in {
            "truncated": data[: len(data) - 50],
            "bit flip": data[:-300] + bytes([data[-300] ^ 4]) + data[-299:],
            "end dropped": data[: _export_end_offset(backup)],
        }.items():
            damaged.write_bytes(broken)
            with pytest.raises(BackupError):
                import_gallery(store, damaged, "export secret", name=name)
            assert [g.name for g in store.list_galleries()] == ["missing persons"], name
    with GalleryStore(box2, PassphraseProvider("box2", log2_n=FAST_SCRYPT)) as store:
        assert len(store.open_gallery("missing persons").faces()) == 4


def _export_end_offset(path: Path) -> int:
    """Where the export's last frame (its end record) starts."""
    data = path.read_bytes()
    start = 12 + int.from_bytes(data[8:12], "big") + HEADER_BYTES
    with open(path, "rb") as stream:
        offsets = [f.offset for f in scan_frames(stream, "t", ScanState(), start=start)]
    return offsets[-1]


# -- sealed KEK providers --------------------------------------------------------------------


def test_systemd_creds_provider(tmp_path: Path) -> None:
    provider = SystemdCredsProvider(tmp_path / "creds")
    if not provider.available():
        pytest.skip("systemd-creds is missing or cannot encrypt on this machine")
    with GalleryStore(tmp_path / "state", provider) as store:
        made = store.create_gallery("g").enroll(_subject("Ana Lima"))
    with GalleryStore(tmp_path / "state", SystemdCredsProvider(tmp_path / "creds")) as store:
        assert store.open_gallery("g").subject(made.subject.subject_id).display_name == "Ana Lima"
        (cred,) = (tmp_path / "creds").iterdir()
        store.rotate_kek(KeyFileProvider(tmp_path / "keys"))
    assert not cred.exists()
    assert SystemdCredsProvider(tmp_path, binary="no-such-systemd-creds").available() is False


def _free_port_pair() -> int:
    """A loopback port whose successor is free too: the swtpm TCTI expects the control
    channel on the server port + 1."""
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    pytest.skip("no pair of free loopback ports for swtpm")


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[str]:
    """A software TPM on loopback; yields its TCTI string."""
    if shutil.which("swtpm") is None or shutil.which("tpm2_createprimary") is None:
        pytest.skip(
            "swtpm or tpm2-tools not installed (apt-get install swtpm swtpm-tools tpm2-tools)"
        )
    state = tmp_path / "tpm-state"
    state.mkdir()
    port = _free_port_pair()
    process = subprocess.Popen(
        [
            "swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
            "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
            "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
            "--flags", "not-need-init,startup-clear",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            pytest.skip("swtpm did not start")
        yield f"swtpm:host=127.0.0.1,port={port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_tpm2_provider_against_swtpm(tmp_path: Path, swtpm: str) -> None:
    provider = Tpm2Provider(tmp_path / "tpm-keys", tcti=swtpm)
    assert provider.available()
    with GalleryStore(tmp_path / "state", provider) as store:
        made = store.create_gallery("g").enroll(_subject("Ana Lima"))
    again = Tpm2Provider(tmp_path / "tpm-keys", tcti=swtpm)
    with GalleryStore(tmp_path / "state", again) as store:
        assert store.open_gallery("g").subject(made.subject.subject_id).display_name == "Ana Lima"
    blobs = sorted((tmp_path / "tpm-keys").iterdir())
    assert [b.suffix for b in blobs] == [".priv", ".pub"]

    assert Tpm2Provider(tmp_path, tcti="swtpm:host=127.0.0.1,port=1").available() is False

    with GalleryStore(tmp_path / "state", again) as store:
        store.rotate_kek(KeyFileProvider(tmp_path / "keys"))
    assert not any(b.exists() for b in blobs)


def test_tpm2_blobs_do_not_open_on_another_tpm(tmp_path: Path, swtpm: str) -> None:
    with GalleryStore(tmp_path / "state", Tpm2Provider(tmp_path / "k", tcti=swtpm)) as store:
        store.create_gallery("g")
    # Wipe the TPM's persistent state so its owner seed (and so the sealing parent) is new.
    tpm_state = tmp_path / "tpm-state"
    subprocess.run(["tpm2_clear", "-c", "p"], env={**os.environ, "TPM2TOOLS_TCTI": swtpm},
                   capture_output=True, check=True)  # fmt: skip
    assert tpm_state.exists()
    with pytest.raises(DecryptionError):
        GalleryStore(tmp_path / "state", Tpm2Provider(tmp_path / "k", tcti=swtpm))


def test_clock_drives_expiry(tmp_path: Path) -> None:
    now = [datetime(2025, 1, 1, tzinfo=UTC)]
    with _store(tmp_path, clock=lambda: now[0]) as store:
        gallery = store.create_gallery("g")
        made = gallery.enroll(_subject("Ana Lima", retention_until=date(2025, 2, 1)))
        assert gallery.expired_subjects() == []
        now[0] += timedelta(days=40)
        assert gallery.expired_subjects() == [made.subject]


# -- batch records (compaction) --------------------------------------------------------------

OTHER_MODEL, OTHER_DIM = "other_model_v2", 64
BATCH_FACES = "edgeid.runtime.gallery.store.BATCH_FACES"


def _other_face(rng: np.random.Generator) -> NewFace:
    """A face of a second embedder with another embedding size."""
    vector = rng.standard_normal(OTHER_DIM).astype(np.float32)
    return NewFace(vector, 0.25, OTHER_MODEL, rng.bytes(32).hex(), b"\xff\xd8\xff" + rng.bytes(99))


def _contents(gallery: Gallery, today: date = date(2026, 1, 1)) -> dict[str, object]:
    """Everything a caller can read from a gallery, in comparable form (times with their
    offsets, embeddings as bytes, thumbnails decrypted)."""
    subjects = gallery.subjects()
    faces = gallery.faces()
    return {
        "info": gallery.info(),
        "subjects": subjects,
        "subject_times": [s.enrolled_at.isoformat() for s in subjects],
        "faces": [
            (
                f.face_id,
                f.subject_id,
                f.embedding.dtype.str,
                f.embedding.tobytes(),
                f.quality,
                f.model_id,
                f.source_sha256,
                f.enrolled_at.isoformat(),
                f.version,
            )
            for f in faces
        ],
        "faces_by_subject": {
            s.subject_id: [f.face_id for f in gallery.faces(s.subject_id)] for s in subjects
        },
        "thumbnails": {f.face_id: gallery.thumbnail(f.face_id) for f in faces},
        "embeddings": {
            model: (ids, matrix.dtype.str, matrix.shape, matrix.tobytes())
            for model in ("dlib_resnet_v1", OTHER_MODEL, "no such model")
            for ids, matrix in [gallery.embeddings(model)]
        },
        "expired": gallery.expired_subjects(today),
    }


def _varied_gallery(store: GalleryStore, now: list[datetime]) -> Gallery:
    """Subjects with every kind of field: time zones and none, retention or not, long and
    non-ASCII text, no faces, faces of two embedders of different sizes."""
    rng = np.random.default_rng(20)
    gallery = store.create_gallery("varied", description="unit C")
    gallery.enroll_many(
        [
            (_subject("Ana Lima", notes="scar 🙂 left", retention_until=date(2025, 2, 1)),
             [_face(rng), _other_face(rng), _face(rng)]),
            (_subject("Žofie Ærø", notes="x" * 5000), []),
            (_subject("Ben Okafor", retention_until=date(2027, 5, 5)), [_face(rng)]),
        ]
    )  # fmt: skip
    now[0] = datetime(2025, 6, 1, 8, 0, 0, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    gallery.enroll(_subject("Cleo Park", notes=""), [_other_face(rng), _face(rng)])
    now[0] = datetime(2001, 2, 3, 4, 5, 6, 7)  # a clock without a time zone
    gallery.enroll(_subject("Dan Roe", retention_until=date(2001, 1, 1)), [_face(rng)])
    for i in range(4):
        gallery.enroll(_subject(f"person {i}"), [_face(rng) for _ in range(i % 3)])
    return gallery


def _frame_bytes(path: Path) -> tuple[bytes, list[bytes]]:
    """A log's header and its frames, as bytes."""
    data = path.read_bytes()
    return data[:HEADER_BYTES], [data[o : o + n] for o, n, _ in _frames(path)]


def test_compaction_writes_batches_that_open_to_the_same_gallery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(BATCH_FACES, 3)  # several batches from a few faces
    now = [datetime(2025, 3, 1, 9, 30, tzinfo=UTC)]
    with _store(tmp_path, clock=lambda: now[0]) as store:
        gallery = _varied_gallery(store, now)
        before = _contents(gallery)
        gallery.compact()
        assert _contents(gallery) == before
        face_id = gallery.faces()[0].face_id
        assert gallery.face(face_id) is gallery.face(face_id) is gallery.faces()[0]
        log = _log(store, gallery)
    with _store(tmp_path) as store:
        gallery = store.open_gallery("varied")
        assert _contents(gallery) == before
        assert all(f.version == 1 for f in gallery.faces())
        embedding = gallery.faces()[0].embedding
        assert not embedding.flags.writeable
        with pytest.raises(ValueError):
            embedding.flags.writeable = True

    with open(log, "rb") as stream:
        assert read_header(stream, "t", formats=(1, 2)).format == 2
    frames = _frames(log)
    kinds = [[e.kind for e in entries] for _, _, entries in frames]
    assert kinds[0] == [RecordKind.GALLERY]
    assert kinds[1:] == [[RecordKind.SUBJECT, RecordKind.FACE]] * (len(frames) - 1)
    assert len(frames) - 1 >= 4  # 11 faces in batches of at most 3 faces (whole subjects)
    assert len({entries[0].record_id for _, _, entries in frames}) == len(frames)
    with open(log, "rb") as stream, pytest.raises(CorruptDataError, match="log format 2"):
        read_header(stream, "t")  # a reader of format 1 only refuses it by its header


def test_single_records_and_tombstones_after_the_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(21)
    now = [datetime(2025, 3, 1, 9, 30, tzinfo=UTC)]
    with _store(tmp_path, clock=lambda: now[0]) as store:
        gallery = _varied_gallery(store, now)
        gallery.compact()
        ana, _, ben, cleo, *_ = gallery.subjects()
        later = gallery.enroll(_subject("Eve Stone"), [_face(rng)])
        added = gallery.add_faces(ben.subject_id, [_face(rng), _other_face(rng)])
        gallery.delete_face(gallery.faces(ana.subject_id)[1].face_id, compact=False)
        gallery.delete_subject(cleo.subject_id, compact=False)
        gallery.delete_face(added[0].face_id, compact=False)
        with pytest.raises(InvalidRecordError, match="already holds"):
            gallery.restore(ben, [])  # the id of a batch member is taken
        expected = _contents(gallery)
        assert [s.display_name for s in gallery.subjects()][-1] == "Eve Stone"
        assert [f.face_id for f in gallery.faces(ben.subject_id)][-1] == added[1].face_id
        assert len(gallery.faces(ana.subject_id)) == 2
        assert cleo.subject_id not in expected["faces_by_subject"]  # type: ignore[operator]
    with _store(tmp_path) as store:
        # The tombstones were left without their compaction (as a crash would leave them):
        # opening finishes the erasure, so the gallery comes back compacted.
        gallery = store.open_gallery("varied")
        assert gallery.pending_erasures == 0
        reopened = _contents(gallery)
        assert reopened["subjects"] == expected["subjects"]
        assert reopened["faces_by_subject"] == expected["faces_by_subject"]
        gallery.compact()
        compacted = _contents(gallery)
        assert compacted["subjects"] == expected["subjects"]
        assert compacted["faces_by_subject"] == expected["faces_by_subject"]
        assert compacted["thumbnails"] == expected["thumbnails"]
        assert gallery.thumbnail(later.faces[0].face_id).startswith(b"\xff\xd8")
        backup = tmp_path / "varied.export"
        export_gallery(store, "varied", backup, "secret", log2_n=FAST_SCRYPT)
    with _store(tmp_path / "box2") as store:
        copy = import_gallery(store, backup, "secret")
        assert copy.subjects() == compacted["subjects"]
        assert {f.face_id: copy.thumbnail(f.face_id) for f in copy.faces()} == compacted[
            "thumbnails"
        ]


def test_batches_moved_repeated_dropped_or_altered_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Frame checksums are recomputed, so only the batch's own binding can catch each one."""
    monkeypatch.setattr(BATCH_FACES, 2)
    rng = np.random.default_rng(22)
    with _store(tmp_path) as store:
        gallery = store.create_gallery("g")
        gallery.enroll_many([(_subject(f"Ana {i}"), [_face(rng), _face(rng)]) for i in range(4)])
        gallery.compact()
        gallery.enroll(_subject("Ben Okafor"), [_face(rng)])  # a single record after them
        gid, log = gallery.gallery_id, _log(store, gallery)
    original = log.read_bytes()
    header, frames = _frame_bytes(log)
    first, b0, b1, b2, b3, single = frames
    _, _, (columns, embeddings) = _frames(log)[2]
    flipped = bytes([embeddings.ciphertext[0] ^ 1]) + embeddings.ciphertext[1:]
    e = embeddings
    altered = encode_frame([columns, Entry(e.kind, e.record_id, e.version, e.nonce, flipped)])
    with open(log, "rb") as stream:
        read = read_header(stream, "t", formats=(1, 2))
    format_1 = encode_header(LogHeader(read.scope_id, read.key_id))
    corrupt, opaque = CorruptDataError, DecryptionError
    cases: dict[str, tuple[list[bytes], type[Exception], str | None]] = {
        "swapped": ([first, b1, b0, b2, b3, single], opaque, None),
        "repeated in place": ([first, b0, b0, b2, b3, single], corrupt, "reappears"),
        "replayed at the end": ([first, b0, b1, b2, b3, single, b1], corrupt, "reappears"),
        "last dropped": ([first, b0, b1, b2], corrupt, "ends before its last batch"),
        "dropped": ([first, b0, b2, b3, single], opaque, None),
        "cut inside": ([first, b0, b1[:40]], corrupt, "ends before its last batch"),
        "bit flip": ([first, b0, altered, b2, b3, single], opaque, None),
        "single record moved in": ([first, single, b0, b1, b2, b3], corrupt, "is no batch"),
    }
    for what, (parts, error, message) in cases.items():
        log.write_bytes(header + b"".join(parts))
        with pytest.raises(error, match=message) as caught, _store(tmp_path) as store:
            store.open_gallery("g")
        if error is CorruptDataError:
            assert gid in str(caught.value), what
        assert "Ana" not in str(caught.value), what
    log.write_bytes(format_1 + original[HEADER_BYTES:])
    with pytest.raises(CorruptDataError, match="disagree on the format"), _store(tmp_path) as s:
        s.open_gallery("g")

    log.write_bytes(original + single[: len(single) // 2])  # a torn single record stays torn
    with caplog.at_level(logging.WARNING), _store(tmp_path) as store:
        gallery = store.open_gallery("g")
        assert len(gallery.subjects()) == 5 and gallery.torn_bytes == len(single) // 2
        assert "torn tail" in caplog.text


def test_erasure_of_batch_members_leaves_no_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the erasure test above, for canaries that sit in batch records when deleted."""
    monkeypatch.setattr(BATCH_FACES, 2)
    rng = np.random.default_rng(23)
    canaries = {"Quintessa Marrowbyte-Canary": "canary note: velvet periwinkle 4471"}
    with _store(tmp_path) as store:
        gallery = store.create_gallery("g")
        keeper = gallery.enroll(_subject("Keeper Subject"), [_face(rng)])
        made = [
            gallery.enroll(_subject(name, notes=notes), [_face(rng, thumb_bytes=4000)] * 3)
            for name, notes in canaries.items()
        ]
        gallery.enroll(_subject("Later Keeper"), [_face(rng)])
        gallery.compact()  # the canaries are now batch members, beside the keepers
        needles: dict[str, bytes] = {}
        for name, notes in canaries.items():
            needles |= {f"name {k}": v for k, v in _text_needles(name).items()}
            needles |= {f"note {k}": v for k, v in _text_needles(notes).items()}
        for face in made[0].faces:
            stored = gallery.face(face.face_id)
            needles |= {
                f"{k} {face.face_id[:6]}": v
                for k, v in _embedding_needles(stored.embedding).items()
            }
            needles[f"thumbnail {face.face_id[:6]}"] = gallery.thumbnail(face.face_id)[100:140]
        assert not _hits(tmp_path, needles), "plaintext biometric data on disk"
        for rel, data in _snapshot(tmp_path).items():  # the batches' ciphertext as written
            if rel.endswith(".log"):
                needles |= {
                    f"old {rel[-12:]}@{i}": data[i : i + 32] for i in range(64, len(data) - 32, 97)
                }
        old_key = gallery.key_id
        gallery.delete_subject(made[0].subject.subject_id)
        assert gallery.key_id != old_key
        assert not _hits(tmp_path, needles), "deleted batch members still on disk"
    _, wrapped = read_keyring(tmp_path / GALLERIES_DIR / KEYRING_FILE)
    assert list(wrapped[gallery.gallery_id]) == [gallery.key_id]
    with _store(tmp_path) as store:
        gallery = store.open_gallery("g")
        assert [s.display_name for s in gallery.subjects()] == ["Keeper Subject", "Later Keeper"]
        assert gallery.thumbnail(keeper.faces[0].face_id).startswith(b"\xff\xd8")


@pytest.mark.parametrize("nth", [5, 6, 9])
def test_full_disk_while_compacting_batches_keeps_the_old_gallery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nth: int
) -> None:
    """Writes 5.. are the new logs' batches (thumbnails, then the batch frame, per batch)."""
    monkeypatch.setattr(BATCH_FACES, 2)
    rng = np.random.default_rng(24)
    disk = FullDisk()
    with _store(tmp_path, writer=disk) as store:
        gallery = store.create_gallery("g")
        gallery.enroll_many([(_subject(f"p{i}"), [_face(rng), _face(rng)]) for i in range(4)])
        gallery.compact()
        gallery.delete_subject(gallery.subjects()[1].subject_id, compact=False)
        expected = _contents(gallery)
        logs = {k: v for k, v in _snapshot(store.root).items() if k.endswith(".log")}
        disk.arm(nth)
        with pytest.raises(StorageFullError):
            gallery.compact()
        after = {k: v for k, v in _snapshot(store.root).items() if not k.endswith(".json")}
        assert {k: v for k, v in after.items() if k.endswith(".log")} == logs
        assert not [k for k in after if k.endswith((".new", ".tmp", RETIRED_SUFFIX))]
        assert _contents(gallery) == expected
    with _store(tmp_path) as store:
        assert _contents(store.open_gallery("g")) == expected


CHILD_COMPACTING = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np
    import edgeid.runtime.gallery.store as store_module
    from edgeid.runtime.vault.keys import KeyFileProvider
    from edgeid.runtime.gallery.store import GalleryStore, NewFace, NewSubject

    store_module.BATCH_FACES = 4
    state = Path(sys.argv[1])
    store = GalleryStore(state, KeyFileProvider(state / "keys"))
    gallery = store.open_gallery("g")
    rng = np.random.default_rng(int(sys.argv[2]))
    print("ready", flush=True)
    while True:
        face = NewFace(rng.standard_normal(128).astype(np.float32), 0.9, "m", "ab" * 32,
                       b"\\xff\\xd8\\xff" + rng.bytes(int(rng.integers(100, 20000))))
        made = gallery.enroll(NewSubject("n", "basis", "tech"), [face, face])
        print(made.subject.subject_id, flush=True)
        gallery.compact()
    """
)


def test_every_acknowledged_enrolment_survives_kill_9_during_compactions(tmp_path: Path) -> None:
    rng = np.random.default_rng(25)
    with _store(tmp_path) as store:
        gallery = store.create_gallery("g")
        made = gallery.enroll_many([(_subject(f"p{i}"), [_face(rng)] * 3) for i in range(6)])
        acknowledged = [m.subject.subject_id for m in made]
    for round_ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD_COMPACTING, str(tmp_path), str(round_)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        for _ in range(3 + 2 * round_):
            acknowledged.append(child.stdout.readline().strip())
        time.sleep(0.005 * round_)  # land the kill at different points of a compaction
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate(timeout=20)
        acknowledged += [line for line in rest.split() if line]
        with _store(tmp_path) as store:
            gallery = store.open_gallery("g")
            present = {s.subject_id for s in gallery.subjects()}
            assert set(acknowledged) <= present, f"round {round_}: acknowledged enrolments lost"
            # At most one enrolment in flight at each kill so far: durable, never acknowledged.
            assert len(present) - len(acknowledged) <= round_ + 1
            for face in gallery.faces():
                assert gallery.thumbnail(face.face_id).startswith(b"\xff\xd8")
            assert sorted(p.name for p in gallery.directory.iterdir()) == sorted(
                [RECORDS_LOG, f"thumbs-{gallery.key_id}.log"]
            )


def test_enroll_many_is_all_or_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(26)
    with _store(tmp_path) as store:
        gallery = store.create_gallery("g")
        made = gallery.enroll_many([(_subject("Ana Lima"), [_face(rng)]), (_subject("Ben"), [])])
        assert [m.subject.display_name for m in made] == ["Ana Lima", "Ben"]
        assert [len(m.faces) for m in made] == [1, 0]
        size = _log(store, gallery).stat().st_size
        bad = NewFace(np.array([np.nan] * DIM), 0.9, "m", "ab" * 32, b"\xff\xd8\xff")
        with pytest.raises(InvalidRecordError):
            gallery.enroll_many([(_subject("Cleo"), [_face(rng)]), (_subject("Dan"), [bad])])
        too_many = [(_subject(f"p{i}"), []) for i in range(MAX_ENTRIES_PER_FRAME + 1)]
        with pytest.raises(InvalidRecordError, match="split it"):
            gallery.enroll_many(too_many)
        assert _log(store, gallery).stat().st_size == size
        assert [s.display_name for s in gallery.subjects()] == ["Ana Lima", "Ben"]
        assert len(_frames(_log(store, gallery))) == 2  # the gallery's, and one for both


def test_batch_plaintexts_are_checked_when_decoded() -> None:
    """A batch authenticates as a whole; these checks catch a bug of ours, not an attacker."""
    when = datetime(2025, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=-3)))
    subject = Subject("ab" * 16, "Ana", "", "basis", "tech", when, None, 1)
    vector = np.arange(4, dtype=np.float32)
    face = Face("cd" * 16, subject.subject_id, vector, 0.5, "m", "ef" * 32, when, 1)
    columns, embeddings = encode_batch([subject], [[face, face]], [70, 80])
    batch = decode_batch(columns, embeddings, "t")
    assert batch.face_thumb_size.tolist() == [70, 80] and batch.models == ("m",)
    table = BatchTable(1, 2)
    table.add(batch)
    with pytest.raises(ValueError, match="appears twice"):
        table.finish(HEADER_BYTES)  # the same face twice
    broken = {
        "short": (columns[:-16], embeddings),
        "embeddings short": (columns, embeddings[:-4]),
        "not a batch": (columns.replace(b"edgeid-batch/1", b"edgeid-batch/9"), embeddings),
    }
    for what, (data, values) in broken.items():
        with pytest.raises(CorruptDataError, match="malformed batch"):
            decode_batch(data, values, "t")
        assert what
    table = BatchTable(1, 1)
    table.add(decode_batch(*encode_batch([subject], [[face]], [70]), "t"))
    table.finish(HEADER_BYTES)
    (built,) = table.faces_at([0])
    assert built.enrolled_at.isoformat() == when.isoformat() and built.embedding.tolist() == [
        0,
        1,
        2,
        3,
    ]
    assert table.subjects_at([0]) == [subject] and table.thumb(0) == (HEADER_BYTES, 70)
