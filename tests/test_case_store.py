"""The encrypted case store: round trips, all-or-nothing writes, tampering, the keyring scope
beside the galleries', crash recovery and purge. Real AES-GCM, real files, no models."""

from __future__ import annotations

import errno
import io
import os
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeid.runtime.cases.errors import CaseBusyError, CaseNotFoundError, CorruptCaseError
from edgeid.runtime.cases.records import (
    CaseMeta,
    CaseResults,
    Cluster,
    ClusterSearch,
    IngestRun,
    Lead,
    SourceFile,
)
from edgeid.runtime.cases.store import (
    CASES_DIR,
    META_FILE,
    RECORDS_LOG,
    Case,
    CaseStore,
    NewFace,
    key_scope,
)
from edgeid.runtime.cases.views import clustering_note, search_note
from edgeid.runtime.compat import UTC
from edgeid.runtime.errors import BadInputError, DiskFullError
from edgeid.runtime.gallery.store import GalleryStore
from edgeid.runtime.vault.framed_log import (
    FRAME_HEAD_BYTES,
    Frame,
    ScanState,
    read_header,
    scan_frames,
)
from edgeid.runtime.vault.keys import KeyFileProvider

NUMBER = "VID-2024/0173"
NAME = "victim_jane_doe_bedroom.jpg"


def chip(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (150, 150, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


def face(seed: int, **kwargs: object) -> NewFace:
    rng = np.random.default_rng(seed)
    vector = rng.normal(size=128).astype(np.float32)
    fields: dict[str, object] = {
        "embedding": vector / np.linalg.norm(vector),
        "box": (10, 20, 110, 140),
        "score": 0.99,
        "quality": 0.8,
        "quality_limiting": "pose",
        "chip_jpeg": chip(seed),
    }
    fields.update(kwargs)
    return NewFace(**fields)  # type: ignore[arg-type]


def source(sha: str | None, name: str = NAME, **kwargs: object) -> SourceFile:
    fields: dict[str, object] = {
        "record_id": "",
        "sha256": sha,
        "names": (name,),
        "media": "image",
        "status": "done",
        "reason": None,
        "faces": 0,
        "run": 1,
    }
    fields.update(kwargs)
    return SourceFile(**fields)  # type: ignore[arg-type]


class FullDisk:
    """A FileWriter that fails every write from the n-th on with ENOSPC (after half of it)."""

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


@contextmanager
def opened(home: Path, **kwargs: object) -> Iterator[CaseStore]:
    with (
        GalleryStore(home, KeyFileProvider(home / "keys")) as galleries,
        CaseStore(home, galleries.keyring, **kwargs) as store,  # type: ignore[arg-type]
    ):
        yield store


def new_case(store: CaseStore, number: str = NUMBER) -> Case:
    return store.create(number, created_by="investigator1", model_id="dlib_resnet_v1")


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_round_trip_of_files_faces_names_meta_and_results(tmp_path: Path) -> None:
    sha = "ab" * 32
    with opened(tmp_path) as store:
        case = new_case(store)
        stored = case.add_file(source(sha), [face(1), face(2, frame=3, time_s=12.5)])
        case.add_name(sha, "copy/of/it.jpg")
        case.add_file(source(None, "evil.lnk", media="other", status="failed", reason="link"))
        run = IngestRun(
            1, datetime(2024, 5, 1, tzinfo=UTC), "inv1", "why", "/m", 1.0, ("g",), "mtcnn"
        )
        case.save_meta(case.meta.with_run(run))
        face_id = case.faces()[0].face_id
        lead = Lead(1, "g", "s" * 32, "Name", "f" * 32, face_id, 0.95, "strong", True)
        search = ClusterSearch(("g",), 1e-3, 0.925, (face_id,), (lead,), "note", run.started_at)
        results = CaseResults("average_linkage", 1e-4, 0.939, run.started_at, 2,
                              (Cluster(1, (face_id,), search),))  # fmt: skip
        case.save_results(results)
        thumbs = {f.face_id: case.thumbnail(f.face_id) for f in case.faces()}
    with opened(tmp_path) as store:
        case = store.find(f"  {NUMBER} ")
        assert case.meta.number == NUMBER and case.meta.runs == (run,)
        (image, refused) = sorted(case.files(), key=lambda f: f.sha256 is None)
        assert image.names == (NAME, "copy/of/it.jpg") and image.faces == 2
        assert image.record_id == stored.record_id and image.version == 2
        assert refused.sha256 is None and case.is_refused("evil.lnk")
        faces = sorted(case.faces(), key=lambda f: f.time_s or 0)
        assert [f.time_s for f in faces] == [None, 12.5] and faces[1].frame == 3
        np.testing.assert_array_equal(faces[0].embedding, face(1).embedding)
        assert {f.face_id: case.thumbnail(f.face_id) for f in faces} == thumbs
        assert case.results() == results
        assert store.list_cases()[0].number == NUMBER


def test_nothing_identifying_is_stored_in_the_clear(tmp_path: Path) -> None:
    with opened(tmp_path) as store:
        case = new_case(store)
        case.add_file(source("cd" * 32), [face(3)])
        folder = case.directory
    assert folder.parent == tmp_path / CASES_DIR and NUMBER not in str(folder)
    blob = b"".join(snapshot(tmp_path / CASES_DIR).values())
    for secret in (NUMBER.encode(), NAME.encode(), b"investigator1", b"\xff\xd8\xff"):
        assert secret not in blob
    assert face(3).embedding.tobytes()[:16] not in blob
    assert all(os.stat(p).st_mode & 0o077 == 0 for p in folder.iterdir())


@pytest.mark.parametrize("nth", [1, 2, 3])
def test_full_disk_mid_file_leaves_the_case_as_it_was(tmp_path: Path, nth: int) -> None:
    """The thumbnails, the faces frame or the file record fails: no face of the file stays."""
    disk = FullDisk()
    with opened(tmp_path, writer=disk) as store:
        case = new_case(store)
        case.add_file(source("01" * 32), [face(1)])
        before = snapshot(case.directory)
        disk.arm(nth)
        with pytest.raises(DiskFullError):
            case.add_file(source("02" * 32), [face(2), face(3)])
        assert len(case.faces()) == 1 and case.file_by_sha("02" * 32) is None
        assert snapshot(case.directory) == before
        disk.fail_at = None
        case.add_file(source("02" * 32), [face(2), face(3)])
    with opened(tmp_path) as store:
        case = store.find(NUMBER)
        assert len(case.faces()) == 3 and len(case.files()) == 2


def test_a_file_whose_record_never_landed_has_its_faces_ignored(tmp_path: Path) -> None:
    """A kill between a video's face frames and its file record: on reopen the faces are not
    the case's, and the file can be written again without duplicates."""
    with opened(tmp_path) as store:
        case = new_case(store)
        with pytest.raises(KeyboardInterrupt), case.writing(source("03" * 32)) as session:
            session.add_faces([face(1), face(2)])
            records = (case.directory / RECORDS_LOG).read_bytes()
            raise KeyboardInterrupt
        assert case.faces() == []
        (case.directory / RECORDS_LOG).write_bytes(records)  # as a kill -9 would leave it
    with opened(tmp_path) as store:
        case = store.find(NUMBER)
        assert case.faces() == [] and case.files() == []
        case.add_file(source("03" * 32), [face(1), face(2)])
    with opened(tmp_path) as store:
        assert len(store.find(NUMBER).faces()) == 2


def last_frame(path: Path) -> Frame:
    with open(path, "rb") as stream:
        read_header(stream, "test")
        return list(scan_frames(stream, "test", ScanState()))[-1]


@pytest.mark.parametrize("checksums", ["stale", "recomputed"])
def test_tampered_records_are_refused_naming_the_case_id_only(
    tmp_path: Path, checksums: str
) -> None:
    """A flipped byte fails the frame checksum; with the checksums forged as well, it fails
    AES-GCM authentication. Either way: refused, naming the random case id, nothing else."""
    with opened(tmp_path) as store:
        case = new_case(store)
        case.add_file(source("04" * 32), [face(1)])
        path, case_id = case.directory / RECORDS_LOG, case.case_id
    frame = last_frame(path)
    data = bytearray(path.read_bytes())
    body_at = frame.offset + FRAME_HEAD_BYTES
    data[frame.offset + frame.size - 20] ^= 0x01  # inside the last entry's ciphertext
    if checksums == "recomputed":
        body = bytes(data[body_at : frame.offset + frame.size])
        struct.pack_into(">I", data, frame.offset + 8, zlib.crc32(body))
        head = bytes(data[frame.offset : frame.offset + 12])
        struct.pack_into(">I", data, frame.offset + 12, zlib.crc32(head))
    path.write_bytes(bytes(data))
    with opened(tmp_path) as store, pytest.raises(CorruptCaseError) as caught:
        store.find(NUMBER)
    message = str(caught.value)
    assert case_id in message and "restore the case" in message
    assert NAME not in message and NUMBER not in message
    if checksums == "recomputed":
        assert "authentication" in message


def test_case_key_survives_the_gallery_store_and_kek_rotation(tmp_path: Path) -> None:
    """The case key lives in the galleries' keyring under its own scope: reopening the gallery
    store (whose recovery forgets keys of galleries without files) keeps it, and a KEK
    rotation re-wraps it."""
    with opened(tmp_path) as store:
        new_case(store).add_file(source("05" * 32), [face(1)])
    with GalleryStore(tmp_path, KeyFileProvider(tmp_path / "keys")) as galleries:
        galleries.create_gallery("g")
        galleries.rotate_kek(KeyFileProvider(tmp_path / "keys"))
    with opened(tmp_path) as store:
        assert len(store.find(NUMBER).faces()) == 1


def test_second_process_is_refused(tmp_path: Path) -> None:
    with (
        GalleryStore(tmp_path, KeyFileProvider(tmp_path / "keys")) as galleries,
        CaseStore(tmp_path, galleries.keyring),
        pytest.raises(CaseBusyError),
    ):
        CaseStore(tmp_path, galleries.keyring)


def test_purge_erases_files_and_key_and_leaves_other_cases(tmp_path: Path) -> None:
    with opened(tmp_path) as store:
        case = new_case(store)
        case.add_file(source("06" * 32), [face(1)])
        other = new_case(store, "OTHER-1")
        other.add_file(source("07" * 32), [face(2)])
        folder, scope = case.directory, key_scope(case.case_id)
        purged = store.purge(NUMBER)
        assert purged.number == NUMBER and not folder.exists()
        with pytest.raises(CaseNotFoundError):
            store.find(NUMBER)
    with GalleryStore(tmp_path, KeyFileProvider(tmp_path / "keys")) as galleries:
        assert scope not in galleries.keyring.wrapped_keys()
        assert key_scope(other.case_id) in galleries.keyring.wrapped_keys()
    with opened(tmp_path) as store:
        assert [m.number for m in store.list_cases()] == ["OTHER-1"]


def test_recovery_finishes_an_interrupted_purge_and_create(tmp_path: Path) -> None:
    with opened(tmp_path) as store:
        purged = new_case(store, "A")  # key dropped, files left: a purge cut short
        half_made = new_case(store, "B")  # files incomplete: a create cut short
        kept = new_case(store, "C")
    with GalleryStore(tmp_path, KeyFileProvider(tmp_path / "keys")) as galleries:
        galleries.keyring.retain_only(key_scope(purged.case_id), [])
    (half_made.directory / META_FILE).unlink()
    with opened(tmp_path) as store:
        assert [m.number for m in store.list_cases()] == ["C"]
        assert not purged.directory.exists() and not half_made.directory.exists()
    with GalleryStore(tmp_path, KeyFileProvider(tmp_path / "keys")) as galleries:
        scopes = set(galleries.keyring.wrapped_keys())
    assert scopes == {key_scope(kept.case_id)}


def test_retention_and_bad_case_numbers(tmp_path: Path) -> None:
    with opened(tmp_path) as store:
        store.create("OLD", created_by="a", model_id="m", retention_until=date(2020, 1, 1))
        store.create("NEW", created_by="a", model_id="m", retention_until=date(2999, 1, 1))
        assert [m.number for m in store.expired(date(2024, 1, 1))] == ["OLD"]
        with pytest.raises(BadInputError, match="exists"):
            new_case(store, "OLD")
        for bad in ("A\x1b[2J", "x" * 65, "-leading", "a<b>"):
            with pytest.raises(BadInputError, match="at most 64 characters"):
                new_case(store, bad)
        with pytest.raises(BadInputError, match="already in the case"):
            case = store.find("NEW")
            case.add_file(source("08" * 32))
            case.add_file(source("08" * 32))


def test_records_from_before_age_bands_load_and_say_what_their_threshold_was() -> None:
    """Case records written before thresholds per age band lack the age fields: they load as
    what they were (adult thresholds, no children setting) and their wording says so."""
    when = datetime(2024, 5, 1, tzinfo=UTC)
    new_search = ClusterSearch(("g",), 1e-3, 0.925, (), (), "note", when)
    old_search = {
        k: v
        for k, v in new_search.to_head().items()
        if k not in ("age_band", "band_used", "threshold_note")
    }
    search = ClusterSearch.from_head(old_search)
    assert (search.age_band, search.band_used, search.threshold_note) == ("adult", "adult", "")
    assert "from before thresholds per age band" in search_note(search)
    assert "1 in 1,000 pairs of different adults" in search_note(search)
    results_head = CaseResults("average_linkage", 1e-4, 0.939, when, 0, ()).to_head()
    for key in ("age_band", "band_used", "threshold_note"):
        del results_head[key]
    results = CaseResults.from_head(results_head)
    assert results.age_band == "adult" and "1 in 10,000" in clustering_note(results)
    meta = CaseMeta("0" * 32, NUMBER, when, "inv1", "dlib_resnet_v1")
    head = meta.to_head()
    del head["may_include_children"]
    assert CaseMeta.from_head(head).may_include_children is False
    head["may_include_children"] = "yes"
    with pytest.raises(CorruptCaseError):
        CaseMeta.from_head(head)
