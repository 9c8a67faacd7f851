"""The accountable core itself (edgeid/runtime/services), without a front end: records written
before
data is returned or a change acknowledged, nothing revealed or changed when the record cannot
be written, refusals recorded and rate-limited, one justification rule for every door."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from web_support import OFFICE, OTHER, PEOPLE, central_face, lfw_image, populate

from edgeid.runtime.accounts.roles import GALLERY_SCOPED, Permission
from edgeid.runtime.audit import AuditAction, AuditEvent
from edgeid.runtime.audit.actor import Actor
from edgeid.runtime.audit.events import check_event
from edgeid.runtime.audit.justification import Justification, JustificationError
from edgeid.runtime.audit.recorder import DENIALS_PER_WINDOW, Recorder
from edgeid.runtime.config.settings import Settings
from edgeid.runtime.errors import AccessDeniedError, BadInputError, StorageWriteError
from edgeid.runtime.gallery.service import DuplicateSubjectError, GalleryService
from edgeid.runtime.inference.pipeline import FacePipeline
from edgeid.runtime.services.galleries import AccountableGalleries, ErasureUnfinishedError

WHY = Justification.of("2026/0042", "identify the child in the seized photos")


class RefusingLog(StorageWriteError):
    """What a full disk under the audit log looks like to the core."""


@dataclass
class ListSink:
    """An audit log in memory that checks each event as the real one does, and can refuse."""

    events: list[AuditEvent] = field(default_factory=list)
    refuse: bool = False

    def append(self, event: AuditEvent) -> object:
        if self.refuse:
            raise RefusingLog("the audit log cannot be written (disk full)")
        self.events.append(check_event(event))
        return event

    def actions(self) -> list[AuditAction]:
        return [e.action for e in self.events]


@dataclass(frozen=True)
class Investigator:
    """A caller allowed to use OFFICE only."""

    session_key: str = "session-1"

    @property
    def actor(self) -> Actor:
        return Actor("ivy", "investigator")

    def may(self, permission: Permission) -> bool:
        return permission in GALLERY_SCOPED

    def may_use_gallery(self, permission: Permission, gallery: str) -> bool:
        return permission in GALLERY_SCOPED and gallery == OFFICE


@dataclass
class Core:
    service: GalleryService
    sink: ListSink
    core: AccountableGalleries
    subjects: dict[str, str]
    lfw_dir: Path

    def probe(self, number: int = 0) -> bytes:
        person, _, probe = PEOPLE[number]
        return lfw_image(self.lfw_dir, person, probe).read_bytes()


@pytest.fixture(scope="module")
def pipeline(models_dir: Path) -> FacePipeline:
    return FacePipeline.load(models_dir)


@pytest.fixture
def box(tmp_path: Path, lfw_dir: Path, pipeline: FacePipeline) -> Iterator[Core]:
    with GalleryService.open(tmp_path, Settings(), pipeline=pipeline) as service:
        subjects, _ = populate(service, lfw_dir)
        sink = ListSink()
        clock = [0.0]
        recorder = Recorder(sink, clock=lambda: clock[0])
        yield Core(service, sink, AccountableGalleries(service, recorder), subjects, lfw_dir)


def test_a_search_is_recorded_before_its_candidates_are_returned(box: Core) -> None:
    probe = box.core.analyse(box.probe())
    result = box.core.search(Investigator(), WHY, probe, 0, [OFFICE], where="test")
    assert result.candidates and box.sink.actions() == [AuditAction.SEARCH]
    event = box.sink.events[0]
    assert (event.user, event.case, event.reason) == ("ivy", WHY.case, WHY.reason)
    assert event.probe_sha256 == probe.image_sha256 and event.age_band == "unknown"
    assert [c.subject_id for c in event.candidates] == [c.subject_id for c in result.candidates]
    assert "Subject" not in repr(event)  # ids and scores only, never a name


def test_nothing_is_revealed_when_the_record_cannot_be_written(box: Core) -> None:
    probe = box.core.analyse(box.probe())
    box.sink.refuse = True
    with pytest.raises(RefusingLog):
        box.core.search(Investigator(), WHY, probe, 0, [OFFICE], where="test")
    with pytest.raises(RefusingLog):
        box.core.subjects(Investigator(), WHY, OFFICE, where="test")
    subject = next(iter(box.subjects.values()))
    with pytest.raises(RefusingLog):
        box.core.subject(Investigator(), WHY, OFFICE, subject, where="test")
    face = box.service.faces(OFFICE, subject)[0].face_id
    with pytest.raises(RefusingLog):
        box.core.thumbnail(Investigator(), WHY, OFFICE, face, where="test")


def test_an_enrolment_that_cannot_be_recorded_is_undone(box: Core) -> None:
    image = lfw_image(box.lfw_dir, "AJ_Lamas", 1).read_bytes()
    before = {s.subject_id for s in box.service.subjects(OFFICE)}
    box.sink.refuse = True
    with pytest.raises(RefusingLog):
        box.core.enroll(
            Investigator(),
            OFFICE,
            display_name="Never kept",
            legal_basis="court order 1/2026",
            image_bytes=image,
            face_index=central_face(box.service, image),
            where="test",
        )
    assert {s.subject_id for s in box.service.subjects(OFFICE)} == before


def test_an_erasure_is_recorded_first_and_a_failure_after_it_too(
    box: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    subject = box.subjects[PEOPLE[0][0]]

    def broken(gallery: str, subject_id: str, *, key_before: str | None = None) -> None:
        raise StorageWriteError("the disk failed mid-erasure")

    monkeypatch.setattr(box.service, "erase_subject", broken)
    with pytest.raises(ErasureUnfinishedError, match="unfinished"):
        box.core.delete_subject(
            Investigator(), OFFICE, subject, reason="erasure ordered by the court", where="t"
        )
    assert box.sink.actions() == [AuditAction.DELETE_SUBJECT, AuditAction.OPERATION_FAILED]
    failed = box.sink.events[1]
    assert failed.subject_id == subject and "delete_subject failed" in (failed.detail or "")
    assert box.sink.events[0].reason == "erasure ordered by the court"


def test_a_duplicate_warning_is_recorded_since_it_shows_who_matched(box: Core) -> None:
    person, enrolled, _ = PEOPLE[0]
    image = lfw_image(box.lfw_dir, person, enrolled).read_bytes()
    with pytest.raises(DuplicateSubjectError) as caught:
        box.core.enroll(
            Investigator(),
            OFFICE,
            display_name="Again",
            legal_basis="court order 2/2026",
            image_bytes=image,
            face_index=central_face(box.service, image),
            where="test",
        )
    assert box.sink.actions() == [AuditAction.DUPLICATE_FOUND]
    shown = {c.subject_id for c in caught.value.candidates}
    assert {c.subject_id for c in box.sink.events[0].candidates} == shown
    # the enrolled photos of the matches are now viewable by this session without a new record
    face = caught.value.candidates[0].face_id
    box.core.thumbnail(Investigator(), None, OFFICE, face, where="test")
    assert box.sink.actions() == [AuditAction.DUPLICATE_FOUND]


def test_refusals_are_recorded_then_rate_limited_and_counted(box: Core) -> None:
    for _ in range(DENIALS_PER_WINDOW + 5):
        with pytest.raises(AccessDeniedError) as caught:
            box.core.subjects(Investigator(), WHY, OTHER, where="test")
        assert caught.value.recorded
    assert box.sink.actions() == [AuditAction.ACCESS_DENIED] * DENIALS_PER_WINDOW
    assert all(OTHER in (e.detail or "") for e in box.sink.events)
    box.core.recorder._clock = lambda: 1e6  # a new window: the suppressed ones are reported
    with pytest.raises(AccessDeniedError):
        box.core.subjects(Investigator(), WHY, OTHER, where="test")
    assert "5 earlier refusal(s)" in (box.sink.events[-1].detail or "")


def test_a_photo_shown_on_a_recorded_page_is_free_only_to_that_session(box: Core) -> None:
    subject = box.subjects[PEOPLE[1][0]]
    shown = box.core.subject(Investigator(), WHY, OFFICE, subject, where="test")
    face = shown.faces[0].face_id
    box.core.thumbnail(Investigator(), None, OFFICE, face, where="test")
    assert box.sink.actions() == [AuditAction.SUBJECT_VIEWED]
    other = Investigator(session_key="session-2")
    with pytest.raises(BadInputError, match="state the case"):
        box.core.thumbnail(other, None, OFFICE, face, where="test")
    box.core.thumbnail(other, WHY, OFFICE, face, where="test")
    assert box.sink.actions()[-1] is AuditAction.FACE_VIEWED


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        (None, "identify the child in the photo"),
        ("2026/1", None),
        ("2026/1", "short"),
        ("-starts-with-a-dash", "identify the child in the photo"),
        ("C" * 65, "identify the child in the photo"),
        ("2026/1", "identify\x1b[2J the child"),
    ],
)
def test_one_rule_for_case_numbers_and_reasons(case: str | None, reason: str | None) -> None:
    with pytest.raises(JustificationError):
        Justification.of(case, reason)
    with pytest.raises(JustificationError):
        Justification(case or "", reason or "")  # no way around the rule
