"""Damage is contained and repairable (issue 13, findings 3, 5 and 6, and the fault injection).

One damaged gallery or case never blocks another; the damaged one is named with what is
affected and the command that repairs it; a repair keeps everything that still authenticates
and is recorded; an erasure is never left half done by damage elsewhere in the gallery; scrub
reads every sealed file and names what is damaged. Small stores made with the store API and
random templates (no face pipeline) keep this quick; the CLI runs in-process.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgeid.cli import main
from edgeid.runtime.audit import AuditAction, AuditEvent, AuditLog
from edgeid.runtime.audit.actor import os_actor
from edgeid.runtime.cases.errors import CorruptCaseError
from edgeid.runtime.cases.records import SourceFile
from edgeid.runtime.cases.store import (
    META_FILE,
    RECORDS_LOG,
    THUMBS_LOG,
    CaseStore,
    NewFace,
    key_scope,
)
from edgeid.runtime.config.settings import load_settings
from edgeid.runtime.errors import EdgeidError
from edgeid.runtime.gallery.records import NewFace as GalleryFace
from edgeid.runtime.gallery.records import NewSubject
from edgeid.runtime.gallery.store import (
    BATCH_SUBJECTS,
    DamagedGalleryError,
    GalleryStore,
    thumbs_log_name,
)
from edgeid.runtime.inference.pipeline import EMBEDDER_MODEL
from edgeid.runtime.vault.errors import CorruptDataError
from edgeid.runtime.vault.framed_log import (
    FRAME_HEAD_BYTES,
    DamagedSpan,
    Frame,
    salvage_frames,
)
from edgeid.runtime.vault.key_choice import provider_for

DIM = 128
REASON = "the nightly scrub found damage"
CASE_A, CASE_B = "DMG-2025/0001", "DMG-2025/0002"
CANARY = "Canary Zebulon Quarrington"  # never printed by list, scrub or repair


# -- building small boxes -------------------------------------------------------------------------


def _home(tmp_path: Path, models_dir: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(models_dir)
    (home / "edgeid.toml").write_text("[security]\ndual_control = false\n")
    return home


def _galleries(home: Path) -> GalleryStore:
    return GalleryStore(home, provider_for(home, load_settings(home).keys))


def _face(rng: np.random.Generator) -> GalleryFace:
    vector = rng.standard_normal(DIM).astype(np.float32)
    return GalleryFace(
        vector / np.linalg.norm(vector),
        0.9,
        EMBEDDER_MODEL,
        rng.bytes(32).hex(),
        b"\xff\xd8\xff\xe0" + rng.bytes(300),
    )


def _fill(store: GalleryStore, name: str, subjects: int, *, seed: int = 0) -> list[str]:
    """A compacted gallery of ``subjects`` subjects with one face each; their ids."""
    rng = np.random.default_rng(seed)
    gallery = store.create_gallery(name)
    made = gallery.enroll_many(
        [
            (NewSubject(f"{CANARY} {i}", "warrant W-1", "officer-1"), [_face(rng)])
            for i in range(subjects)
        ]
    )
    gallery.compact()
    return [e.subject.subject_id for e in made]


def _frames(path: Path) -> list[Frame]:
    with open(path, "rb") as stream:
        items = list(salvage_frames(stream))
    assert not any(isinstance(i, DamagedSpan) for i in items)
    return [i for i in items if isinstance(i, Frame)]


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))


def _gallery_dir(store: GalleryStore, name: str) -> Path:
    return store.root / store.gallery_id_of(name)


def cli(capsys: pytest.CaptureFixture[str], home: Path, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*argv[:2], "--home", str(home), *argv[2:]])
    out, err = capsys.readouterr()
    return code, out, err


def records(home: Path) -> list[AuditEvent]:
    with _galleries(home) as store, AuditLog.open(home, store.keyring) as log:
        return [r.event for r in reversed(log.query(limit=10_000))]


def _case(store: CaseStore, number: str, files: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    case = store.create(number, created_by="os:tester", model_id=EMBEDDER_MODEL)
    for i in range(files):
        source = SourceFile(
            "", rng.bytes(32).hex(), (f"still-{i}.jpg",), "image", "done", None, 0, 1
        )
        faces = [
            NewFace(
                rng.standard_normal(DIM).astype(np.float32),
                (1, 2, 30, 40),
                0.99,
                0.8,
                "blur",
                b"\xff\xd8\xff\xe0" + rng.bytes(200),
            )
            for _ in range(2)
        ]
        case.add_file(source, faces)


def _case_dir(home: Path, store: CaseStore, number: str) -> Path:
    return home / "cases" / store.case_id_of(number)


# -- finding 5: one damaged gallery blocks every gallery ------------------------------------------


def test_finding_5_a_compacted_gallery_is_many_bounded_batches(tmp_path: Path) -> None:
    """After a compaction one flipped byte lost every subject: the log was one frame. Now a
    batch holds at most BATCH_SUBJECTS subjects, so one frame costs a bounded part."""
    with GalleryStore(tmp_path, provider_for(tmp_path, load_settings(tmp_path).keys)) as store:
        _fill(store, "big", 2 * BATCH_SUBJECTS + 10)
        log = _gallery_dir(store, "big") / "records.log"
    frames = _frames(log)
    assert len(frames) == 1 + 3  # the gallery's own record, then three batches
    assert all(f.size < 200_000 for f in frames)


def test_finding_5_one_damaged_gallery_blocks_no_other(
    tmp_path: Path, models_dir: Path, lfw_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flipped byte near the end of one gallery's records.log made `gallery list`, a search
    of another gallery, `gallery delete bad --yes` and import all exit 1."""
    home = _home(tmp_path, models_dir)
    with _galleries(home) as store:
        _fill(store, "good", 3, seed=1)
        _fill(store, "bad", BATCH_SUBJECTS + 5, seed=2)
        bad_log = _gallery_dir(store, "bad") / "records.log"
        bad_id = store.gallery_id_of("bad")
    _flip(bad_log, bad_log.stat().st_size - 30)

    code, out, err = cli(capsys, home, "gallery", "list")
    assert code == 0, err
    assert "good" in out and "bad" in out and "DAMAGED" in out and bad_id in out
    assert CANARY not in out + err
    code, out, err = cli(capsys, home, "gallery", "subjects", "good", "--case", CASE_A,
                         "--reason", REASON)  # fmt: skip
    assert code == 0, err
    code, out, err = cli(capsys, home, "gallery", "subjects", "bad", "--case", CASE_A,
                         "--reason", REASON)  # fmt: skip
    assert code == 1 and bad_id in err and "gallery repair bad" in err
    photo = str(sorted((lfw_dir / "images").glob("*/*.jpg"))[0])
    code, out, err = cli(capsys, home, "gallery", "search", photo, "--gallery", "good",
                         "--face", "0", "--case", CASE_A, "--reason", REASON)  # fmt: skip
    assert code == 0, err
    with _galleries(home) as store:
        store.open_gallery("good").enroll(NewSubject("Ana Lima", "warrant W-2", "officer-2"))
        store.create_gallery("new")
        with pytest.raises(DamagedGalleryError, match="other galleries are unaffected"):
            store.open_gallery("bad")
        assert [d.name for d in store.damaged_galleries()] == ["bad"]
    code, out, err = cli(capsys, home, "gallery", "delete", "bad", "--yes", "--reason", REASON)
    assert code == 0, err
    code, out, err = cli(capsys, home, "gallery", "list", "--json")
    assert sorted(g["name"] for g in json.loads(out)) == ["good", "new"]


def test_finding_5_gallery_repair_keeps_every_intact_batch_and_is_recorded(
    tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = _home(tmp_path, models_dir)
    with _galleries(home) as store:
        _fill(store, "bad", BATCH_SUBJECTS + 5, seed=3)
        directory = _gallery_dir(store, "bad")
    frames = _frames(directory / "records.log")
    lost_batch = frames[2].entries[0].record_id.hex()
    _flip(directory / "records.log", frames[2].offset + frames[2].size - 5)  # its tag
    before = len(records(home))

    code, out, err = cli(capsys, home, "gallery", "repair", "bad")
    assert code == 2 and "reason" in err  # the core rule: a reason, or nothing happens
    code, out, err = cli(capsys, home, "gallery", "repair", "bad", "--reason", REASON, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["subjects"] == BATCH_SUBJECTS and report["lost_subjects"] == 5
    assert report["lost_records"] == [lost_batch]
    assert CANARY not in out + err
    (event,) = records(home)[before:]
    assert event.action is AuditAction.STORE_REPAIRED
    assert event.user == os_actor().user and event.reason == REASON
    assert lost_batch in (event.detail or "")
    code, out, err = cli(capsys, home, "gallery", "list", "--json")
    assert [(g["name"], g["subjects"]) for g in json.loads(out)] == [("bad", BATCH_SUBJECTS)]
    code, out, err = cli(capsys, home, "scrub")
    assert code == 0, out


# -- finding 3: a damaged thumbnail log half-erased every subject deleted after it --------------


def test_finding_3_a_damaged_thumbnail_never_leaves_an_erasure_half_done(tmp_path: Path) -> None:
    """One flipped byte in the middle of the thumbnail log: `delete --subject S` exited 1 after
    its tombstone, S vanished while its data stayed under the live key, for every delete."""
    with GalleryStore(tmp_path, provider_for(tmp_path, load_settings(tmp_path).keys)) as store:
        ids = _fill(store, "g", 6)
        gallery = store.open_gallery("g")
        directory = gallery.directory
        victim_face = gallery.faces(ids[3])[0].face_id
        thumbs = directory / thumbs_log_name(gallery.key_id)
    frames = _frames(thumbs)
    middle = next(f for f in frames if f.entries[0].record_id.hex() == victim_face)
    _flip(thumbs, middle.offset + middle.size // 2)
    with GalleryStore(tmp_path, provider_for(tmp_path, load_settings(tmp_path).keys)) as store:
        gallery = store.open_gallery("g")
        old_key = gallery.key_id
        gallery.delete_subject(ids[0])  # succeeds: the erasure is whole
        assert ids[0] not in {s.subject_id for s in gallery.subjects()}
        assert gallery.key_id != old_key
        assert store.keyring.key_ids(gallery.gallery_id) == [gallery.key_id]
        assert not (directory / thumbs_log_name(old_key)).exists()
        assert gallery.pending_erasures == 0
        assert gallery.faces(ids[3])  # the damaged thumbnail costs its face nothing else
        with pytest.raises(CorruptDataError, match="lost"):
            gallery.thumbnail(victim_face)
        gallery.delete_subject(ids[1])  # and every later delete works too
        assert len(gallery.subjects()) == 4


class _FailingFsync:
    """A disk that fails every fsync once ``armed``: a compaction cannot complete."""

    def __init__(self) -> None:
        self.armed = False

    def write(self, fd: int, data: bytes | memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        if self.armed:
            raise OSError(28, "No space left on device")
        os.fsync(fd)


def test_finding_3_an_erasure_is_all_or_nothing_and_finished_at_next_open(tmp_path: Path) -> None:
    writer = _FailingFsync()
    provider = provider_for(tmp_path, load_settings(tmp_path).keys)
    with GalleryStore(tmp_path, provider, writer=writer) as store:  # type: ignore[arg-type]
        ids = _fill(store, "g", 4)
        gallery = store.open_gallery("g")
        old_key = gallery.key_id
        size = (gallery.directory / "records.log").stat().st_size
        writer.armed = True
        with pytest.raises(EdgeidError):
            gallery.delete_subject(ids[0])
        writer.armed = False
        # Failed whole: the subject is still there, no tombstone is left, the key unchanged.
        assert ids[0] in {s.subject_id for s in gallery.subjects()}
        assert (gallery.directory / "records.log").stat().st_size == size
        assert gallery.key_id == old_key and gallery.pending_erasures == 0
        gallery.delete_subject(ids[1], compact=False)  # a tombstone then a "crash"
    with GalleryStore(tmp_path, provider) as store:
        gallery = store.open_gallery("g")  # the open finishes the erasure
        assert gallery.pending_erasures == 0 and gallery.key_id != old_key
        assert ids[1] not in {s.subject_id for s in gallery.subjects()}
        assert store.keyring.key_ids(gallery.gallery_id) == [gallery.key_id]


# -- finding 6: one damaged case blocks every case ------------------------------------------------


def _two_cases(home: Path) -> None:
    with _galleries(home) as galleries, CaseStore(home, galleries.keyring) as cases:
        _case(cases, CASE_A, 2, seed=1)
        _case(cases, CASE_B, 1, seed=2)


def test_finding_6_one_damaged_case_blocks_no_other(
    tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flipped byte in one case's sealed file, or in its wrapped key, blocked `case list`,
    `case show` of other cases and new ingests, and the key message was wrong."""
    home = _home(tmp_path, models_dir)
    _two_cases(home)
    with _galleries(home) as galleries, CaseStore(home, galleries.keyring) as cases:
        a = _case_dir(home, cases, CASE_A)
    meta = a / META_FILE
    original = meta.read_bytes()
    _flip(meta, len(original) - 3)
    code, out, err = cli(capsys, home, "case", "list")
    assert code == 0, err
    assert CASE_B in out and "DAMAGED" in out and a.name in out
    code, out, err = cli(capsys, home, "case", "show", CASE_B, "--reason", REASON)
    assert code == 0, err
    with _galleries(home) as galleries, CaseStore(home, galleries.keyring) as cases:
        cases.create("DMG-2025/0003", created_by="os:tester", model_id=EMBEDDER_MODEL)
        assert a.name in cases.damaged_cases()
    meta.write_bytes(original)

    keyring = home / "galleries" / "keyring.json"
    document = json.loads(keyring.read_text())
    scope = document["galleries"][key_scope(a.name)]
    (key_id,) = scope
    wrapped = bytearray(bytes.fromhex(scope[key_id]))
    wrapped[20] ^= 1
    scope[key_id] = wrapped.hex()
    keyring.write_text(json.dumps(document))
    code, out, err = cli(capsys, home, "case", "list")
    assert code == 0 and CASE_B in out and "wrapped key in the keyring is damaged" in out
    assert "not in the keyring" not in out
    code, out, err = cli(capsys, home, "case", "show", CASE_B, "--reason", REASON)
    assert code == 0, err


def test_finding_6_case_repair_keeps_what_authenticates_and_is_recorded(
    tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = _home(tmp_path, models_dir)
    _two_cases(home)
    with _galleries(home) as galleries, CaseStore(home, galleries.keyring) as cases:
        a = _case_dir(home, cases, CASE_A)
    frames = _frames(a / RECORDS_LOG)  # file 1: faces, file; file 2: faces, file
    lost_file = frames[1].entries[0].record_id.hex()
    _flip(a / RECORDS_LOG, frames[1].offset + FRAME_HEAD_BYTES + 40)  # file 1's record
    code, out, err = cli(capsys, home, "case", "show", CASE_A, "--reason", REASON)
    assert code == 1 and "case repair" in err and a.name in err
    before = len(records(home))
    code, out, err = cli(capsys, home, "case", "repair", CASE_A, "--reason", REASON, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["files"], report["faces"]) == (1, 2)
    assert report["lost_records"] == [lost_file] and report["faces_of_lost_files"] == 2
    (event,) = records(home)[before:]
    assert event.action is AuditAction.STORE_REPAIRED and event.reason == REASON
    assert event.user == os_actor().user and lost_file in (event.detail or "")
    code, out, err = cli(capsys, home, "case", "show", CASE_A, "--reason", REASON)
    assert code == 0, err


# -- scrub ---------------------------------------------------------------------------------------


def test_scrub_names_each_damaged_object_and_exits_1(
    tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = _home(tmp_path, models_dir)
    _two_cases(home)
    with _galleries(home) as store:
        _fill(store, "g", 5)
        gallery = store.open_gallery("g")
        thumbs = gallery.directory / thumbs_log_name(gallery.key_id)
    code, out, _ = cli(capsys, home, "scrub", "--json")
    assert code == 0, out
    clean = json.loads(out)
    assert clean["damaged"] == 0
    assert {o["kind"] for o in clean["objects"]} >= {"gallery", "case", "audit"}
    _flip(thumbs, thumbs.stat().st_size - 20)
    code, out, _ = cli(capsys, home, "scrub")
    assert code == 1
    assert "DAMAGED  gallery" in out and "thumbnails of faces" in out and "gallery repair g" in out
    assert CANARY not in out and "objects checked, 1 damaged" in out


# -- fault injection -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    name: str
    damage: Callable[[Path], None]
    cut: int | None = None  # the frame a truncation starts at: it and all after it are gone


def _faults(path: Path) -> Iterator[Fault]:
    """Each byte position class of a sealed log, and a cut at each frame boundary."""
    frames = _frames(path)
    yield Fault("header", lambda p: _flip(p, 20))
    # Every frame of a short log; of a long one (a thumbnail per face) the first, second,
    # middle and last, so the test stays quick.
    chosen = sorted({0, 1, len(frames) // 2, len(frames) - 1} & set(range(len(frames))))
    for i, f in ((i, frames[i]) for i in chosen):
        yield Fault(f"frame {i} length", lambda p, f=f: _flip(p, f.offset + 5))
        yield Fault(f"frame {i} ciphertext", lambda p, f=f: _flip(p, f.offset + f.size // 2))
        yield Fault(f"frame {i} tag", lambda p, f=f: _flip(p, f.offset + f.size - 3))
        if i:
            yield Fault(f"cut at frame {i}", lambda p, f=f: os.truncate(p, f.offset), cut=i)


def test_fault_injection_every_damage_is_contained_named_and_repaired(tmp_path: Path) -> None:
    """Flip each position class in each sealed file kind, and cut at every frame boundary:
    the store opens, the other gallery and case work, the damaged one works or is named, and
    a repair keeps every subject and file outside the damaged frame."""
    base = tmp_path / "base"
    base.mkdir()
    with GalleryStore(base, provider_for(base, load_settings(base).keys)) as store:
        _fill(store, "other", 2, seed=9)
        _fill(store, "hit", BATCH_SUBJECTS + 3, seed=8)
        gallery = store.open_gallery("hit")
        rng = np.random.default_rng(7)
        gallery.enroll(NewSubject("Late Single", "warrant", "officer"), [_face(rng)])
        gid, key_id = gallery.gallery_id, gallery.key_id
    with (
        GalleryStore(base, provider_for(base, load_settings(base).keys)) as galleries,
        CaseStore(base, galleries.keyring) as cases,
    ):
        _case(cases, CASE_A, 3, seed=1)
        _case(cases, CASE_B, 1, seed=2)
        cid = cases.case_id_of(CASE_A)
    kinds = {
        "gallery records": (Path("galleries") / gid / "records.log", "gallery"),
        "gallery thumbnails": (Path("galleries") / gid / thumbs_log_name(key_id), "gallery"),
        "case records": (Path("cases") / cid / RECORDS_LOG, "case"),
        "case thumbnails": (Path("cases") / cid / THUMBS_LOG, "case"),
    }
    tried = 0
    for kind, (relative, domain) in kinds.items():
        for fault in _faults(base / relative):
            home = tmp_path / "run"
            shutil.rmtree(home, ignore_errors=True)
            shutil.copytree(base, home)
            fault.damage(home / relative)
            what = f"{kind}: {fault.name}"
            if domain == "gallery":
                _check_gallery_fault(home, gid, relative.name, fault, what)
            else:
                _check_case_fault(home, cid, relative.name, fault, what)
            tried += 1
    assert tried > 40


# Subjects in each frame of the "hit" records log: its own record, two batches, one enrolment.
HIT_FRAMES = (0, BATCH_SUBJECTS, 3, 1)


def _check_gallery_fault(home: Path, gid: str, file: str, fault: Fault, what: str) -> None:
    total = sum(HIT_FRAMES)
    with GalleryStore(home, provider_for(home, load_settings(home).keys)) as store:
        assert len(store.open_gallery("other").subjects()) == 2, what  # never blocked
        damaged = {d.gallery_id: d for d in store.damaged_galleries()}
        report = None
        if gid in damaged:
            ref = damaged[gid].name or gid  # by id when its own record is lost with its name
            with pytest.raises(DamagedGalleryError) as caught:
                store.open_gallery(ref)
            assert gid in str(caught.value) and "repair" in str(caught.value), what
            report = store.repair_gallery(ref)
        (info,) = [i for i in store.list_galleries() if i.gallery_id == gid]
        gallery = store.open_gallery(info.name)
        kept = len(gallery.subjects())
        if file == "records.log" and fault.cut is not None:
            assert kept == sum(HIT_FRAMES[: fault.cut]), what  # all before the cut
        elif file == "records.log":
            # At most one frame is lost: one batch (BATCH_SUBJECTS) or the single record.
            assert kept >= total - BATCH_SUBJECTS, what
            if report is None or (report.clean and not report.lost_subjects):
                assert kept == total, what
        else:
            assert kept == total, what  # thumbnails: no subject is lost, at most a thumbnail
            for face in gallery.faces()[:3]:
                try:
                    gallery.thumbnail(face.face_id)
                except CorruptDataError as exc:
                    assert gid in str(exc), what


def _check_case_fault(home: Path, cid: str, file: str, fault: Fault, what: str) -> None:
    """Case A's records log: a frame of faces, then its file's record, for each of 3 files."""
    with (
        GalleryStore(home, provider_for(home, load_settings(home).keys)) as galleries,
        CaseStore(home, galleries.keyring) as cases,
    ):
        assert cases.find(CASE_B).files(), what  # never blocked
        try:
            files = len(cases.find(CASE_A).files())
        except CorruptCaseError as exc:
            assert cid in str(exc), what
            salvaged = cases.repair(CASE_A)
            files = len(cases.find(CASE_A).files())
            assert files == len(salvaged.files), what
        if file == RECORDS_LOG and fault.cut is not None:
            assert files == fault.cut // 2, what  # every file whose record is before the cut
        else:
            assert files >= 2, what  # at most the file of the damaged frame is lost


def test_finding_17_a_damaged_thumbnail_names_its_file_and_the_repair(
    tmp_path: Path, models_dir: Path
) -> None:
    """Finding 17: a thumbnail checksum error named neither the file nor a remedy."""
    home = _home(tmp_path, models_dir)
    with _galleries(home) as store:
        (subject,) = _fill(store, "g", 1)
        gallery = store.open_gallery("g")
        (face,) = gallery.faces(subject)
        thumbs = next(gallery.directory.glob("thumbs*"))
        frame = _frames(thumbs)[0]
        _flip(thumbs, frame.offset + frame.size - 3)
        with pytest.raises(CorruptDataError) as caught:
            gallery.thumbnail(face.face_id)
    message = str(caught.value)
    assert thumbs.name in message and "edgeid gallery repair" in message
    assert CANARY not in message
