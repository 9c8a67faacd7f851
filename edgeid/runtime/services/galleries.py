"""Galleries through the accountable layer: every door's search, verify, browse, enrol, erase,
export, import and re-embed.

Reveals (search, verify, subject list, subject record, enrolled photos, gallery export) need a
``Justification`` and are recorded before anything is returned. Changes are recorded before
they are acknowledged: an erasure (which cannot be undone) is recorded first, and a failure
after the record is recorded as ``operation_failed``; an enrolment is undone (erased) if its
record cannot be written.

A subject's erasure is one transaction everywhere: its gallery (store, index), every
``ErasureParticipant`` (each case's leads and reports, the web's held search results) and the
reveal ledger. It is noted durably first (``edgeid.runtime.services.erasures``) and rolls forward: a
step that fails leaves the note, the erasure is reported unfinished, and it is finished at the
next open or the next erasure.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

from edgeid.runtime.accounts.roles import Permission
from edgeid.runtime.audit.events import AuditAction
from edgeid.runtime.audit.events import Candidate as AuditCandidate
from edgeid.runtime.audit.justification import Justification, check_reason
from edgeid.runtime.audit.recorder import Recorder
from edgeid.runtime.errors import BadInputError, EdgeidError
from edgeid.runtime.gallery.backup import export_gallery, import_gallery
from edgeid.runtime.gallery.errors import GalleryNotFoundError
from edgeid.runtime.gallery.records import (
    ANY_SUBJECT,
    MAX_NAME_CHARS,
    Face,
    GalleryInfo,
    Subject,
    check_name,
)
from edgeid.runtime.gallery.service import (
    DEFAULT_TOP_K,
    AgeBand,
    Candidate,
    DuplicateSubjectError,
    Enrolled,
    GalleryService,
    Probe,
    SearchResult,
    VerifyResult,
)
from edgeid.runtime.gallery.store import DamagedGalleryError
from edgeid.runtime.gallery.thresholds import DEFAULT_OPERATING_FMR
from edgeid.runtime.services.caller import Caller
from edgeid.runtime.services.consent import ChangeKind, Consent, redeem
from edgeid.runtime.services.erasures import ErasureJournal, ErasureParticipant, Intent

logger = logging.getLogger(__name__)

MAX_GALLERY_FIELD_CHARS = 200  # the audit log's limit for its gallery field
# Faces shown on a recorded page (search results, a subject's record) stay viewable by the
# same session for this long without a record per photo: the page's record covers them.
REVEAL_TTL_S = 30 * 60
MAX_REVEALED_PER_SESSION = 2000
MAX_SESSIONS_TRACKED = 1000


def audit_candidates(candidates: Sequence[Candidate]) -> tuple[AuditCandidate, ...]:
    """Random ids, scores and bands only: never a name."""
    return tuple(
        AuditCandidate(c.subject_id, c.face_id, c.score, c.band.value, c.rank) for c in candidates
    )


def _folded(text: str) -> str:
    """Text as a name search compares it: case and accents folded ("Zoë" finds "zoe")."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def gallery_field(galleries: Sequence[str]) -> tuple[str, str | None]:
    """The audit record's gallery field, and the overflow for its detail when too long."""
    joined = ", ".join(dict.fromkeys(galleries))
    if len(joined) <= MAX_GALLERY_FIELD_CHARS:
        return joined, None
    return f"{len(set(galleries))} galleries (listed in detail)", f"galleries: {joined}"


@dataclass(frozen=True)
class SubjectRow:
    """One line of a subject list: the subject, its photo count and the face shown for it."""

    subject: Subject
    photos: int
    face_id: str | None  # its best-quality photo, the list's thumbnail


@dataclass(frozen=True)
class SubjectList:
    """One page of a gallery's subjects, in name order, filtered by a name search."""

    gallery: str
    rows: tuple[SubjectRow, ...]
    matching: int  # subjects the search matched, on every page
    total: int  # subjects in the gallery
    page: int  # 1-based
    pages: int
    query: str


SUBJECTS_PER_PAGE = 24
MAX_SUBJECTS_PER_PAGE = 200


@dataclass(frozen=True)
class SubjectRecord:
    """What a subject page shows: the subject and its enrolled faces."""

    gallery: str
    subject: Subject
    faces: tuple[Face, ...]


class ErasureUnfinishedError(EdgeidError):
    """An erasure was decided and begun but has not reached every place yet; it is noted and
    finished at the next open (or the next erasure)."""


@dataclass(frozen=True)
class GalleryErased:
    name: str
    subjects: int
    faces: int


class RevealLedger:
    """Which enrolled faces each session was shown on a recorded page, for a while."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: OrderedDict[str, OrderedDict[tuple[str, str], float]] = OrderedDict()
        self._lock = threading.Lock()

    def note(self, session_key: str, gallery: str, face_ids: Sequence[str]) -> None:
        with self._lock:
            seen = self._seen.setdefault(session_key, OrderedDict())
            self._seen.move_to_end(session_key)
            now = self._clock()
            for face_id in face_ids:
                seen[(gallery, face_id)] = now
                seen.move_to_end((gallery, face_id))
            while len(seen) > MAX_REVEALED_PER_SESSION:
                seen.popitem(last=False)
            while len(self._seen) > MAX_SESSIONS_TRACKED:
                self._seen.popitem(last=False)

    def covers(self, session_key: str, gallery: str, face_id: str) -> bool:
        with self._lock:
            seen = self._seen.get(session_key)
            when = seen.get((gallery, face_id)) if seen is not None else None
            return when is not None and self._clock() - when < REVEAL_TTL_S

    def forget_gallery(self, gallery: str) -> None:
        with self._lock:
            for seen in self._seen.values():
                for key in [k for k in seen if k[0] == gallery]:
                    del seen[key]

    def forget_faces(self, gallery: str, face_ids: Sequence[str]) -> None:
        """An erased subject's faces: no session keeps a right to see them."""
        gone = {(gallery, f) for f in face_ids}
        with self._lock:
            for seen in self._seen.values():
                for key in gone & seen.keys():
                    del seen[key]


class AccountableGalleries:
    """See the module docstring. ``galleries`` does the work; ``recorder`` accounts for it."""

    def __init__(
        self,
        galleries: GalleryService,
        recorder: Recorder,
        *,
        clock: Callable[[], float] = time.monotonic,
        participants: Sequence[ErasureParticipant] = (),
    ) -> None:
        self.galleries = galleries
        self.recorder = recorder
        self.revealed = RevealLedger(clock)
        self.participants: list[ErasureParticipant] = list(participants)
        self.erasures = ErasureJournal(
            galleries.store.root, lambda: galleries.store.keyring, writer=galleries.writer
        )

    def add_participant(self, participant: ErasureParticipant) -> None:
        """Something else that holds subjects (cases, web workspaces) erases with them."""
        self.participants.append(participant)

    def finish_pending(self) -> int:
        """Finish erasures a crash or a failure interrupted (at open, once every participant
        is wired); one still failing is logged and stays noted. Returns how many finished."""
        finished = 0
        try:
            pending = self.erasures.pending()
        except EdgeidError as exc:
            logger.error("erasures in progress cannot be finished: %s", exc)
            return 0
        by_gallery: dict[tuple[str, str], list[Intent]] = {}
        for intent in pending:
            by_gallery.setdefault((intent.gallery_id, intent.gallery), []).append(intent)
        for intents in by_gallery.values():
            try:
                self._finish(intents, ())
            except ErasureUnfinishedError as exc:  # one must not block the others, or open
                logger.error(  # ids only: the message may name a gallery
                    "%d erasure(s) still unfinished (%s); retried at the next erasure or open",
                    len(intents),
                    type(exc.__cause__).__name__,
                )
            else:
                finished += len(intents)
        return finished

    # -- access ------------------------------------------------------------------------------

    def require(
        self,
        caller: Caller,
        permission: Permission,
        gallery: str | None,
        *,
        where: str,
        justification: Justification | None = None,
    ) -> None:
        """Allow, or record an ``access_denied`` and raise ``AccessDeniedError``."""
        allowed = (
            caller.may(permission)
            if gallery is None
            else caller.may_use_gallery(permission, gallery)
        )
        if allowed:
            return
        what = f"gallery {gallery!r}" if gallery else "this"
        raise self.recorder.refused(
            caller.actor,
            f"you may not use {what} for {permission.value}; ask an admin for access",
            where=where,
            resource=f"gallery {gallery}" if gallery else None,
            why=f"needs {permission.value}",
            justification=justification,
        )

    def usable(self, caller: Caller, permission: Permission) -> list[str]:
        """The existing galleries this caller may use for ``permission`` (no record: names of
        galleries are not personal data)."""
        return [
            g.name
            for g in self.galleries.list_galleries()
            if caller.may_use_gallery(permission, g.name)
        ]

    def list_galleries(self) -> list[GalleryInfo]:
        return self.galleries.list_galleries()

    # -- reveals -----------------------------------------------------------------------------

    def analyse(self, image_bytes: bytes, *, name: str = "photo") -> Probe:
        """A probe's faces (the caller's own photo; nothing enrolled is revealed)."""
        return self.galleries.analyse(image_bytes, name=name)

    def search(
        self,
        caller: Caller,
        justification: Justification,
        probe: Probe,
        face_index: int,
        galleries: Sequence[str],
        *,
        k: int = DEFAULT_TOP_K,
        fmr: float = DEFAULT_OPERATING_FMR,
        age_band: AgeBand = "unknown",
        where: str = "search",
        detail: str | None = None,
        matches_only: bool = False,
    ) -> SearchResult:
        """Rank candidates, record the search, and only then return them. ``matches_only``
        (identification): only the candidates above the threshold are recorded, returned and
        viewable; the others are never revealed."""
        for name in dict.fromkeys(galleries):
            self.require(caller, Permission.SEARCH, name, where=where, justification=justification)
        result = self.galleries.search(
            probe, face_index, galleries, k=k, fmr=fmr, age_band=age_band
        )
        if matches_only:
            result = replace(result, candidates=result.matches)
        summary = (
            f"face {face_index + 1} of {len(probe.faces)}; top-k {k}; "
            f"age band {age_band} (thresholds of {result.calibration.band}); "
            f"fmr {result.operating_fmr:g}; threshold {result.threshold:.4f}; "
            f"no match {str(result.no_match).lower()}; model {result.model_id}"
        )
        self._record_search(caller, justification, probe, result, [detail, summary])
        return result

    def rescore(
        self,
        caller: Caller,
        justification: Justification,
        probe: Probe,
        face_index: int,
        result: SearchResult,
        age_band: AgeBand,
        *,
        where: str,
        matches_only: bool = False,
    ) -> SearchResult:
        """A search's candidates judged for another stated age band. Nothing is searched
        again, but a new answer (threshold, bands, "no match") is revealed: recorded first.
        ``matches_only`` as for ``search``."""
        for name in result.galleries:  # access may have been withdrawn since the search
            self.require(caller, Permission.SEARCH, name, where=where, justification=justification)
        rescored = self.galleries.rescore(result, age_band)
        if matches_only:
            rescored = replace(rescored, candidates=rescored.matches)
        change = (
            f"re-scored, not searched again: face {face_index + 1} of {len(probe.faces)}; "
            f"age band {result.age_band} -> {age_band} (thresholds of "
            f"{rescored.calibration.band}); fmr {rescored.operating_fmr:g}; "
            f"threshold {rescored.threshold:.4f}; no match {str(rescored.no_match).lower()}"
        )
        self._record_search(caller, justification, probe, rescored, [change])
        return rescored

    def verify(
        self,
        caller: Caller,
        justification: Justification,
        probe: Probe,
        face_index: int,
        gallery: str,
        subject_id: str,
        *,
        fmr: float = DEFAULT_OPERATING_FMR,
        age_band: AgeBand = "unknown",
        where: str = "verify",
    ) -> VerifyResult:
        self.require(caller, Permission.SEARCH, gallery, where=where, justification=justification)
        result = self.galleries.verify(
            probe, face_index, gallery, subject_id, fmr=fmr, age_band=age_band
        )
        self.recorder.record(
            caller.actor,
            AuditAction.VERIFY,
            justification=justification,
            gallery=gallery,
            subject_id=subject_id,
            probe_sha256=probe.image_sha256,
            age_band=age_band,
            detail=(
                f"face {face_index + 1}; score {result.score:.4f}; band {result.band.value}; "
                f"same person {str(result.same_person).lower()} at fmr {result.operating_fmr:g}"
            ),
        )
        return result

    def subjects(
        self, caller: Caller, justification: Justification, gallery: str, *, where: str
    ) -> list[Subject]:
        """A gallery's subject list (names, legal bases): recorded as ``subjects_listed``."""
        self.require(
            caller, Permission.SUBJECTS_READ, gallery, where=where, justification=justification
        )
        subjects = self.galleries.subjects(gallery)
        self.recorder.record(
            caller.actor,
            AuditAction.SUBJECTS_LISTED,
            justification=justification,
            gallery=gallery,
            detail=f"{len(subjects)} subjects shown",
        )
        return subjects

    def subject_list(
        self,
        caller: Caller,
        justification: Justification,
        gallery: str,
        *,
        query: str = "",
        page: int = 1,
        per_page: int = SUBJECTS_PER_PAGE,
        where: str,
    ) -> SubjectList:
        """One page of a gallery's subjects, found by name. Names are sealed, so the search
        runs here on the decrypted names (case- and accent-blind, any part of the name); the
        record says a search was made and what was shown, never what was searched for."""
        self.require(
            caller, Permission.SUBJECTS_READ, gallery, where=where, justification=justification
        )
        if not 1 <= per_page <= MAX_SUBJECTS_PER_PAGE:
            raise BadInputError(f"show from 1 to {MAX_SUBJECTS_PER_PAGE} subjects a page")
        if page < 1:
            raise BadInputError("pages are numbered from 1")
        query = " ".join(query.split())
        if len(query) > MAX_NAME_CHARS:
            raise BadInputError(f"search for at most {MAX_NAME_CHARS} characters of a name")
        everyone = self.galleries.subjects(gallery)
        wanted = _folded(query)
        found = sorted(
            (s for s in everyone if wanted in _folded(s.display_name)),
            key=lambda s: (_folded(s.display_name), s.subject_id),
        )
        pages = max(1, -(-len(found) // per_page))
        page = min(page, pages)
        shown = found[(page - 1) * per_page : page * per_page]
        rows = []
        for subject in shown:
            faces = self.galleries.faces(gallery, subject.subject_id)
            best = max(faces, key=lambda f: f.quality, default=None)
            rows.append(SubjectRow(subject, len(faces), best.face_id if best else None))
        self.recorder.record(
            caller.actor,
            AuditAction.SUBJECTS_LISTED,
            justification=justification,
            gallery=gallery,
            detail=(
                f"{len(rows)} subjects shown (page {page} of {pages}); "
                + (f"name search matched {len(found)} of {len(everyone)}" if query else "no search")
            ),
        )
        self.revealed.note(caller.session_key, gallery, [r.face_id for r in rows if r.face_id])
        return SubjectList(gallery, tuple(rows), len(found), len(everyone), page, pages, query)

    def subject(
        self,
        caller: Caller,
        justification: Justification,
        gallery: str,
        subject_id: str,
        *,
        where: str,
    ) -> SubjectRecord:
        """One subject's record and faces: recorded as ``subject_viewed``."""
        self.require(
            caller, Permission.SUBJECTS_READ, gallery, where=where, justification=justification
        )
        subject = self.galleries.subject(gallery, subject_id)
        faces = tuple(self.galleries.faces(gallery, subject_id))
        self.recorder.record(
            caller.actor,
            AuditAction.SUBJECT_VIEWED,
            justification=justification,
            gallery=gallery,
            subject_id=subject_id,
            detail=f"{len(faces)} photos",
        )
        self.revealed.note(caller.session_key, gallery, [f.face_id for f in faces])
        return SubjectRecord(gallery, subject, faces)

    def thumbnail(
        self,
        caller: Caller,
        justification: Justification | None,
        gallery: str,
        face_id: str,
        *,
        where: str,
    ) -> bytes:
        """An enrolled face's aligned photo. Free of a new record only when this session was
        shown that face on a recorded page; otherwise it needs a justification and is
        recorded as ``face_viewed``."""
        permission = Permission.SUBJECTS_READ
        if caller.may_use_gallery(Permission.SEARCH, gallery) and not caller.may_use_gallery(
            permission, gallery
        ):
            permission = Permission.SEARCH  # search results show candidates' photos
        self.require(caller, permission, gallery, where=where, justification=justification)
        if self.revealed.covers(caller.session_key, gallery, face_id):
            return self.galleries.thumbnail(gallery, face_id)
        if justification is None:
            raise BadInputError(
                "state the case and reason you are working on before opening enrolled photos"
            )
        jpeg = self.galleries.thumbnail(gallery, face_id)
        self.recorder.record(
            caller.actor,
            AuditAction.FACE_VIEWED,
            justification=justification,
            gallery=gallery,
            detail=f"face {face_id}",
        )
        return jpeg

    def export(
        self,
        caller: Caller,
        justification: Justification,
        gallery: str,
        out: Path,
        passphrase: str,
    ) -> None:
        """A passphrase-encrypted backup of a whole gallery: recorded before it is written."""
        self.require(caller, Permission.GALLERIES, None, where="gallery export")
        info = self.galleries.gallery(gallery).info()
        self.recorder.record(
            caller.actor,
            AuditAction.GALLERY_EXPORTED,
            justification=justification,
            gallery=gallery,
            detail=f"{info.subjects} subjects, {info.faces} faces to {out.name}",
        )
        with self._failure_recorded(caller, AuditAction.GALLERY_EXPORTED, gallery):
            export_gallery(self.galleries.store, gallery, out, passphrase)

    # -- changes -----------------------------------------------------------------------------

    def create_gallery(
        self, caller: Caller, name: str, description: str = "", *, where: str
    ) -> GalleryInfo:
        self.require(caller, Permission.GALLERIES, None, where=where)
        info = self.galleries.create_gallery(name, description)
        try:
            self.recorder.record(caller.actor, AuditAction.GALLERY_CREATED, gallery=info.name)
        except BaseException:
            self.galleries.delete_gallery(info.name)  # empty: nothing personal to lose
            raise
        return info

    def delete_gallery(
        self,
        caller: Caller,
        name: str,
        *,
        reason: str,
        where: str,
        consent: Consent | None,
        detail: str | None = None,
    ) -> GalleryErased:
        """Erase a whole gallery, recorded (with reason and counts) before the erasure.

        Cannot be undone, so it runs only with the two-person rule's ``consent`` for this
        gallery (``edgeid.runtime.services.approvals`` issues it); an approved consent carries the
        proposer's permission, checked when they proposed.
        """
        if consent is None or not consent.approved:
            self.require(caller, Permission.GALLERIES, None, where=where)
        reason = check_reason(reason)
        info = self.galleries.gallery_info(name)  # a damaged gallery can be erased too
        consent = redeem(consent, ChangeKind.ERASE_GALLERY, name, what="erasing a whole gallery")
        erased = GalleryErased(info.name, info.subjects, info.faces)
        counts = f"{erased.subjects} subjects, {erased.faces} faces erased"
        self.recorder.record(
            caller.actor,
            AuditAction.GALLERY_DELETED,
            gallery=name,
            reason=reason,
            detail="; ".join(p for p in (counts, consent.detail(), detail) if p),
        )
        with self._failure_recorded(caller, AuditAction.GALLERY_DELETED, name):
            try:
                gallery = self.galleries.gallery(name)
                intents = [
                    Intent(gallery.gallery_id, name, s.subject_id, gallery.key_id)
                    for s in gallery.subjects()
                ]
            except DamagedGalleryError:  # its subjects cannot all be read: every lead goes
                intents = [Intent(info.gallery_id, name, ANY_SUBJECT, "")]
            self.erasures.add(*intents)  # its subjects leave the cases' leads too
            self.galleries.delete_gallery(name)
            self.revealed.forget_gallery(name)
            self._finish(intents, ())
        return erased

    def enroll(
        self,
        caller: Caller,
        gallery: str,
        *,
        display_name: str,
        legal_basis: str,
        image_bytes: bytes,
        face_index: int | None = None,
        notes: str = "",
        retention_until: date | None = None,
        allow_duplicate: bool = False,
        age_at_capture: int | None = None,
        where: str,
        justification: Justification | None = None,
    ) -> Enrolled:
        """Enrol a subject; its record carries the legal basis. Undone if it cannot be
        recorded."""
        self.require(caller, Permission.ENROL, gallery, where=where, justification=justification)
        if not legal_basis.strip():
            raise BadInputError(
                "give the legal basis for holding this subject (law, warrant, case)"
            )
        try:
            enrolled = self.galleries.enroll(
                gallery,
                display_name=display_name,
                legal_basis=legal_basis,
                enrolled_by=caller.actor.user,
                image_bytes=image_bytes,
                face_index=face_index,
                notes=notes,
                retention_until=retention_until,
                allow_duplicate=allow_duplicate,
                age_at_capture=age_at_capture,
            )
        except DuplicateSubjectError as exc:
            # The refusal shows the enroller which subjects the face matches: a reveal.
            self.recorder.record(
                caller.actor,
                AuditAction.DUPLICATE_FOUND,
                justification=justification,
                gallery=gallery,
                candidates=audit_candidates(exc.candidates),
                detail="enrolment refused as a possible duplicate",
            )
            for candidate in exc.candidates:
                self.revealed.note(caller.session_key, candidate.gallery, [candidate.face_id])
            raise
        extra = ["enrolled despite a possible duplicate"] if allow_duplicate else []
        if retention_until:
            extra.append(f"retain until {retention_until.isoformat()}")
        if age_at_capture is not None:
            extra.append(f"age at capture {age_at_capture}")
        self._record_or_undo(
            caller,
            gallery,
            enrolled.subject.subject_id,
            lambda: self.recorder.record(
                caller.actor,
                AuditAction.ENROLL,
                justification=justification,
                gallery=gallery,
                subject_id=enrolled.subject.subject_id,
                probe_sha256=enrolled.faces[0].source_sha256 if enrolled.faces else None,
                detail="; ".join([f"legal basis: {legal_basis.strip()}", *extra]),
            ),
        )
        return enrolled

    def add_face(
        self,
        caller: Caller,
        gallery: str,
        subject_id: str,
        image_bytes: bytes,
        *,
        face_index: int | None = None,
        age_at_capture: int | None = None,
        where: str,
        justification: Justification | None = None,
    ) -> Face:
        """Another photo for an enrolled subject; removed again if it cannot be recorded."""
        self.require(caller, Permission.ENROL, gallery, where=where, justification=justification)
        self.galleries.subject(gallery, subject_id)
        face = self.galleries.add_face(
            gallery, subject_id, image_bytes, face_index=face_index, age_at_capture=age_at_capture
        )
        age = f"; age at capture {face.age_at_capture}" if face.age_at_capture is not None else ""
        try:
            self.recorder.record(
                caller.actor,
                AuditAction.FACE_ADDED,
                justification=justification,
                gallery=gallery,
                subject_id=subject_id,
                probe_sha256=face.source_sha256,
                detail=f"face {face.face_id}{age}",
            )
        except BaseException:
            self.galleries.delete_face(gallery, face.face_id)
            raise
        return face

    def edit_subject(
        self,
        caller: Caller,
        justification: Justification,
        gallery: str,
        subject_id: str,
        *,
        display_name: str,
        notes: str,
        legal_basis: str,
        retention_until: date | None,
        where: str,
        today: date | None = None,
    ) -> Subject:
        """Change a subject's name, notes, legal basis or retention date. Needs the case and
        reason like every reveal (the form shows the name) and is recorded before it is
        acknowledged; the record names which fields changed, never the name or notes."""
        self.require(caller, Permission.ENROL, gallery, where=where, justification=justification)
        if not justification.case or not justification.reason:
            raise BadInputError("give the case number and the reason for this change")
        if not legal_basis.strip():
            raise BadInputError(
                "give the legal basis for holding this subject (law, warrant, case)"
            )
        old = self.galleries.subject(gallery, subject_id)
        moved = retention_until is not None and retention_until != old.retention_until
        if moved and retention_until is not None and retention_until <= (today or date.today()):
            raise BadInputError("the retention date must be in the future")
        new = {
            "name": display_name.strip(),
            "notes": notes.strip(),
            "legal basis": legal_basis.strip(),
            "retention": retention_until,
        }
        before = {
            "name": old.display_name,
            "notes": old.notes,
            "legal basis": old.legal_basis,
            "retention": old.retention_until,
        }
        changed = [field for field in new if new[field] != before[field]]
        if not changed:
            raise BadInputError("nothing was changed")
        details = [f"changed: {', '.join(changed)}"]
        if "legal basis" in changed:
            details.append(f"legal basis: {new['legal basis']}")
        if "retention" in changed:
            details.append(
                f"retain until {old.retention_until or 'not set'} -> {retention_until or 'not set'}"
            )
        check_name(display_name.strip())  # refused before the record, not after
        self.recorder.record(
            caller.actor,
            AuditAction.SUBJECT_EDITED,
            justification=justification,
            gallery=gallery,
            subject_id=subject_id,
            detail="; ".join(details),
        )
        with self._failure_recorded(caller, AuditAction.SUBJECT_EDITED, gallery, subject_id):
            return self.galleries.edit_subject(
                gallery,
                subject_id,
                display_name=display_name.strip(),
                notes=notes.strip(),
                legal_basis=legal_basis.strip(),
                retention_until=retention_until,
            )

    def delete_subject(
        self,
        caller: Caller,
        gallery: str,
        subject_id: str,
        *,
        reason: str,
        where: str,
        by_retention: bool = False,
    ) -> None:
        """Erase a subject. Investigators erase in their galleries; holders of ``retention``
        erase subjects past their retention date in any gallery. Recorded first."""
        reason = check_reason(reason)
        self.finish_pending()  # an earlier erasure left unfinished goes first
        subject = self.galleries.subject(gallery, subject_id)
        expired = subject.retention_until is not None and subject.retention_until < date.today()
        if by_retention:
            self.require(caller, Permission.RETENTION, None, where=where)
            if not expired:
                raise BadInputError(
                    f"subject {subject_id} is not past its retention date; an investigator with "
                    "access to the gallery erases it"
                )
        else:
            self.require(caller, Permission.SUBJECTS_DELETE, gallery, where=where)
        faces = [f.face_id for f in self.galleries.faces(gallery, subject_id)]
        self.recorder.record(
            caller.actor,
            AuditAction.DELETE_SUBJECT,
            gallery=gallery,
            subject_id=subject_id,
            reason=reason,
            detail="; ".join(
                p
                for p in (f"{len(faces)} faces", "retention period over" if by_retention else None)
                if p
            ),
        )
        with self._failure_recorded(caller, AuditAction.DELETE_SUBJECT, gallery, subject_id):
            intent = Intent(
                self.galleries.gallery(gallery).gallery_id,
                gallery,
                subject_id,
                self.galleries.gallery(gallery).key_id,
            )
            self.erasures.add(intent)  # fails with nothing changed (e.g. a full disk)
            self._finish([intent], faces)

    def _finish(self, intents: Sequence[Intent], face_ids: Sequence[str]) -> None:
        """Erase noted subjects of one gallery everywhere (or what is left of them), then drop
        their notes."""
        if not intents:
            return
        name = intents[0].gallery
        try:
            for intent in intents:
                if intent.subject_id == ANY_SUBJECT:
                    continue  # a whole gallery: its own erasure removed it
                try:
                    if self.galleries.gallery(name).gallery_id == intent.gallery_id:
                        self.galleries.erase_subject(
                            name, intent.subject_id, key_before=intent.key_before
                        )
                except GalleryNotFoundError:
                    pass  # the whole gallery has been erased since
            subjects = frozenset(i.subject_id for i in intents)
            for participant in self.participants:
                participant.erase_subjects(name, subjects)
            self.revealed.forget_faces(name, face_ids)
            self.erasures.done(*intents)
        except (EdgeidError, OSError) as exc:
            which = (
                f"subject {intents[0].subject_id}"
                if len(intents) == 1
                else f"{len(intents)} subjects"
            )
            raise ErasureUnfinishedError(
                f"erasing {which} is unfinished ({exc}); it is noted and finished when the "
                "galleries are next opened, or retry after fixing the cause"
            ) from exc

    def import_gallery(
        self, caller: Caller, src: Path, passphrase: str, *, name: str | None, reason: str
    ) -> GalleryInfo:
        """Restore a gallery from a backup: recorded once its contents are known, and erased
        again if the record cannot be written."""
        self.require(caller, Permission.GALLERIES, None, where="gallery import")
        reason = check_reason(reason)
        info = import_gallery(self.galleries.store, src, passphrase, name=name).info()
        try:
            self.recorder.record(
                caller.actor,
                AuditAction.GALLERY_IMPORTED,
                gallery=info.name,
                reason=reason,
                detail=f"{info.subjects} subjects, {info.faces} faces from {src.name}",
            )
        except BaseException:
            self.galleries.delete_gallery(info.name)
            raise
        return info

    def re_embed(
        self,
        caller: Caller,
        gallery: str,
        *,
        progress: Callable[[int, int], None] | None = None,
        where: str = "gallery re-embed",
    ) -> int:
        """Re-embed a gallery with the box's model; recorded first (it rewrites templates)."""
        self.require(caller, Permission.GALLERIES, None, where=where)
        info = self.galleries.gallery(gallery).info()
        self.recorder.record(
            caller.actor,
            AuditAction.GALLERY_RE_EMBEDDED,
            gallery=gallery,
            detail=f"{info.faces} faces to {self.galleries.model_id}",
        )
        with self._failure_recorded(caller, AuditAction.GALLERY_RE_EMBEDDED, gallery):
            count = self.galleries.re_embed(gallery, progress)
        return count

    # -- internals ---------------------------------------------------------------------------

    def _record_search(
        self,
        caller: Caller,
        justification: Justification,
        probe: Probe,
        result: SearchResult,
        details: Sequence[str | None],
    ) -> None:
        """The search's record (ids, scores and bands of its candidates, never a name); its
        candidates' photos are then viewable by the same session."""
        field, overflow = gallery_field(result.galleries)
        self.recorder.record(
            caller.actor,
            AuditAction.SEARCH,
            justification=justification,
            gallery=field,
            probe_sha256=probe.image_sha256,
            candidates=audit_candidates(result.candidates),
            age_band=result.age_band,
            detail="; ".join(p for p in (*details, overflow) if p),
        )
        for candidate in result.candidates:
            self.revealed.note(caller.session_key, candidate.gallery, [candidate.face_id])

    def _record_or_undo(
        self, caller: Caller, gallery: str, subject_id: str, write: Callable[[], None]
    ) -> None:
        try:
            write()
        except BaseException:
            logger.error("an enrolment could not be recorded; erasing it again")
            self.galleries.delete_subject(gallery, subject_id)
            raise

    def _failure_recorded(
        self, caller: Caller, action: AuditAction, gallery: str, subject_id: str | None = None
    ) -> contextlib.AbstractContextManager[None]:
        return self.recorder.failure_recorded(
            caller.actor, action, gallery=gallery, subject_id=subject_id
        )
