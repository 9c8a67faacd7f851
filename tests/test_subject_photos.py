"""Subjects with several photos, each with an optional age at capture, and subject edits:
sealed with the face (single records and compaction's batch records alike), kept by
export/import, and read back after every kind of reopen. Real files and keys in tmp_path."""

from __future__ import annotations

import dataclasses
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pytest

from edgeid.runtime.compat import UTC
from edgeid.runtime.gallery.backup import export_gallery, import_gallery
from edgeid.runtime.gallery.errors import InvalidRecordError
from edgeid.runtime.gallery.index import GalleryIndex
from edgeid.runtime.gallery.records import (
    Face,
    NewFace,
    NewSubject,
    Subject,
    decode_batch,
    encode_batch,
)
from edgeid.runtime.gallery.service import _best_face_per_subject
from edgeid.runtime.gallery.store import GalleryStore
from edgeid.runtime.vault.keys import KeyFileProvider

DIM = 128


def _face(rng: np.random.Generator, age: int | None = None) -> NewFace:
    vector = rng.standard_normal(DIM).astype(np.float32)
    vector /= np.linalg.norm(vector)
    return NewFace(
        embedding=vector,
        quality=float(rng.uniform(0.5, 1.0)),
        model_id="dlib_resnet_v1",
        source_sha256=rng.bytes(32).hex(),
        thumbnail_jpeg=b"\xff\xd8\xff\xe0" + rng.bytes(200),
        age_at_capture=age,
    )


def _subject(name: str, **extra: object) -> NewSubject:
    return NewSubject(name, "warrant 55", "officer-7", **extra)  # type: ignore[arg-type]


def _store(state: Path) -> GalleryStore:
    clock = lambda: datetime(2026, 3, 1, 9, 30, tzinfo=UTC)  # noqa: E731
    return GalleryStore(state, KeyFileProvider(state / "keys"), clock=clock)


def _ages(store: GalleryStore, subject_id: str) -> list[int | None]:
    return [f.age_at_capture for f in store.open_gallery("g").faces(subject_id)]


def test_ages_at_capture_survive_reopen_compaction_and_export(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    with _store(tmp_path / "a") as store:
        gallery = store.create_gallery("g")
        made = gallery.enroll(_subject("Mia"), [_face(rng, 4)])
        sid = made.subject.subject_id
        gallery.add_faces(sid, [_face(rng, 11), _face(rng)])
        other = gallery.enroll(_subject("Noor"), [_face(rng)]).subject.subject_id
        assert _ages(store, sid) == [4, 11, None]
    with _store(tmp_path / "a") as store:  # single records read back
        assert _ages(store, sid) == [4, 11, None]
        store.open_gallery("g").compact()
    with _store(tmp_path / "a") as store:  # the batch's optional column read back
        assert _ages(store, sid) == [4, 11, None]
        assert _ages(store, other) == [None]
        store.open_gallery("g").add_faces(sid, [_face(rng, 16)])  # a single record after it
        export_gallery(store, "g", tmp_path / "g.edgeid", "a long passphrase")
    with _store(tmp_path / "b") as store:
        import_gallery(store, tmp_path / "g.edgeid", "a long passphrase")
        assert _ages(store, sid) == [4, 11, None, 16]


def test_a_batch_without_ages_is_written_as_before_and_one_with_ages_lists_its_column() -> None:
    rng = np.random.default_rng(4)
    with_none = [_face(rng), _face(rng)]
    subject = _stored_subject()
    faces = [_stored(f, i) for i, f in enumerate(with_none)]
    columns, embeddings = encode_batch([subject], [faces], [10, 10])
    assert b'"extra"' not in columns[:200]  # byte for byte the format before ages existed
    assert decode_batch(columns, embeddings, "t").face_age.tolist() == [-1, -1]
    aged = [dataclasses.replace(faces[0], age_at_capture=7), faces[1]]
    columns, embeddings = encode_batch([subject], [aged], [10, 10])
    assert b'"extra":["face_age"]' in columns[:200]
    assert decode_batch(columns, embeddings, "t").face_age.tolist() == [7, -1]


def test_an_age_out_of_range_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    with _store(tmp_path) as store:
        gallery = store.create_gallery("g")
        for bad in (-1, 131, 1984):
            with pytest.raises(InvalidRecordError, match="age at capture"):
                gallery.enroll(_subject("Mia"), [_face(rng, bad)])
        assert gallery.info().subjects == 0


@pytest.mark.parametrize("compacted_first", [False, True])
def test_an_edit_replaces_the_subject_and_keeps_its_photos(
    tmp_path: Path, compacted_first: bool
) -> None:
    """An edit of a single-record subject and of a batch member (after compaction) alike."""
    rng = np.random.default_rng(6)
    with _store(tmp_path) as store:
        gallery = store.create_gallery("g")
        made = gallery.enroll(_subject("Mia", notes="old"), [_face(rng, 3), _face(rng, 9)])
        sid = made.subject.subject_id
        gallery.enroll(_subject("Noor"), [_face(rng)])
        if compacted_first:
            gallery.compact()
        edited = gallery.edit_subject(
            sid,
            display_name="Mia Jansen",
            notes="new notes",
            legal_basis="warrant 56",
            retention_until=date(2031, 1, 1),
        )
        assert edited.version == 2 and edited.enrolled_by == "officer-7"
        assert edited.enrolled_at == made.subject.enrolled_at
        again = gallery.edit_subject(
            sid, display_name="Mia J.", notes="", legal_basis="warrant 56", retention_until=None
        )
        assert again.version == 3
    for step in ("reopened", "compacted"):
        with _store(tmp_path) as store:
            gallery = store.open_gallery("g")
            if step == "compacted":
                gallery.compact()
            subjects = {s.subject_id: s for s in gallery.subjects()}
            assert len(subjects) == 2, step  # the edit stands in for the old version
            mine = gallery.subject(sid)
            assert (mine.display_name, mine.notes, mine.retention_until) == ("Mia J.", "", None)
            assert subjects[sid] == mine
            assert [f.age_at_capture for f in gallery.faces(sid)] == [3, 9]
            assert gallery.info().faces == 3
    with _store(tmp_path) as store:  # an edited subject erases like any other
        gallery = store.open_gallery("g")
        gallery.delete_subject(sid)
        assert [s.display_name for s in gallery.subjects()] == ["Noor"]
        assert gallery.info().faces == 1


def test_an_edit_past_retention_is_found_by_its_new_date(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    with _store(tmp_path) as store:
        gallery = store.create_gallery("g")
        sid = gallery.enroll(_subject("Mia", retention_until=date(2030, 1, 1)), [_face(rng)])
        gallery.compact()
        gallery.edit_subject(
            sid.subject.subject_id,
            display_name="Mia",
            notes="",
            legal_basis="warrant 55",
            retention_until=date(2026, 1, 1),
        )
        assert [s.retention_until for s in gallery.expired_subjects(date(2027, 1, 1))] == [
            date(2026, 1, 1)
        ]
        assert gallery.expired_subjects(date(2025, 1, 1)) == []


def test_an_edit_is_checked_like_an_enrolment(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    with _store(tmp_path) as store:
        gallery = store.create_gallery("g")
        sid = gallery.enroll(_subject("Mia"), [_face(rng)]).subject.subject_id
        for name, basis in (("", "warrant"), ("Mia\nForged", "warrant"), ("Mia", " ")):
            with pytest.raises(InvalidRecordError):
                gallery.edit_subject(
                    sid, display_name=name, notes="", legal_basis=basis, retention_until=None
                )
        assert gallery.subject(sid).version == 1


def _stored_subject() -> Subject:
    return Subject("ab" * 16, "Mia", "", "warrant", "officer", datetime(2026, 1, 1), None, 1)


def _stored(face: NewFace, i: int) -> Face:
    return Face(
        f"{i:032x}",
        "ab" * 16,
        face.embedding,
        face.quality,
        face.model_id,
        face.source_sha256,
        datetime(2026, 1, 1),
        1,
        face.age_at_capture,
    )


def test_search_ranks_subjects_by_their_best_face_however_many_faces_crowd_the_top(
    tmp_path: Path,
) -> None:
    """One subject with 40 photos all closer to the probe than anyone else: the top 3 are
    still 3 subjects, that one first by its closest photo, each with its own best photo."""
    rng = np.random.default_rng(9)
    probe = rng.standard_normal(DIM).astype(np.float32)
    probe /= np.linalg.norm(probe)

    def near(distance: float) -> NewFace:
        face = _face(rng)
        away = face.embedding - (face.embedding @ probe) * probe  # orthogonal to the probe
        vector = probe + distance * away / np.linalg.norm(away)  # cosine 1/sqrt(1+d**2)
        return dataclasses.replace(face, embedding=vector / np.linalg.norm(vector))

    with _store(tmp_path) as store:
        gallery = store.create_gallery("g")
        crowd = gallery.enroll(_subject("Crowd"), [near(0.2 + i / 100) for i in range(40)])
        others = [
            gallery.enroll(_subject(f"Other {i}"), [near(2.0), near(1.0 + i / 10)])
            for i in range(5)
        ]
        ids, vectors = gallery.embeddings("dlib_resnet_v1")
        index = GalleryIndex.build("dlib_resnet_v1", ids, vectors)
        best = _best_face_per_subject(gallery, index, probe, 3, "dlib_resnet_v1")
        names = [gallery.subject(gallery.face(f).subject_id).display_name for _, f in best]
    assert names == ["Crowd", "Other 0", "Other 1"]
    assert [f for _, f in best] == [
        crowd.faces[0].face_id,  # the closest of its 40
        others[0].faces[1].face_id,  # its second photo is its closer one
        others[1].faces[1].face_id,
    ]
    assert [score for score, _ in best] == sorted((score for score, _ in best), reverse=True)
