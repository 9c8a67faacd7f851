"""Searches as every door must run them: a mode chosen and recorded, the result kept in the
user's sealed history, a candidate's subject revealed only when opened, and decisions only
through that comparison, with who, when and why.

Two modes. *Identification* (the default) reveals only the candidates at or above the
operating threshold of the probe's age band: for a stranger, "no match in N enrolled faces"
and nothing else. *Investigation* ranks the top k for a person to review: each row is a face
and the strength of its score in words, never a match claim; a subject's name and enrolled
photos are shown only when that candidate is opened (a ``subject_viewed`` record).

A decision needs the candidate opened first, in this search; confirming a candidate below the
threshold needs a note saying why. Both rules live here, so the web, the API and anything
later obey them alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from edgeid.runtime.accounts.roles import Permission
from edgeid.runtime.audit.events import AuditAction
from edgeid.runtime.audit.events import Candidate as AuditCandidate
from edgeid.runtime.audit.justification import Justification
from edgeid.runtime.audit.recorder import Recorder
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.gallery.age_bands import check_age_band
from edgeid.runtime.gallery.records import Face
from edgeid.runtime.gallery.service import DEFAULT_TOP_K, AgeBand, Probe, SearchResult
from edgeid.runtime.gallery.wording import stranger_odds
from edgeid.runtime.services.caller import Caller, same_person
from edgeid.runtime.services.cases import AccountableCases
from edgeid.runtime.services.galleries import AccountableGalleries, gallery_field
from edgeid.runtime.services.search_history import (
    CONFIRMED,
    IDENTIFICATION,
    INVESTIGATION,
    MODES,
    REJECTED,
    SearchHistory,
    SearchNotFoundError,
    StoredCandidate,
    StoredDecision,
    StoredSearch,
    new_search_id,
)

DECISIONS = {"confirmed": CONFIRMED, "rejected": REJECTED}
MAX_NOTE_CHARS = 1000
# A note must say something: "ok" is not a reason to act on a weak score.
MIN_NOTE_CHARS = 10


def check_mode(value: str | None) -> str:
    mode = (value or IDENTIFICATION).strip()
    if mode not in MODES:
        raise BadInputError(f"the result mode is one of {', '.join(MODES)}")
    return mode


@dataclass(frozen=True)
class Opened:
    """A candidate opened for comparison: the subject's name and every enrolled photo."""

    search: StoredSearch
    candidate: StoredCandidate
    display_name: str
    faces: tuple[Face, ...]


def justification_of(search: StoredSearch) -> Justification:
    return Justification(search.case, search.reason)


class AccountableSearches:
    """See the module docstring. ``galleries`` searches and records; ``history`` keeps."""

    def __init__(
        self, history: SearchHistory, galleries: AccountableGalleries, recorder: Recorder
    ) -> None:
        self.history = history
        self.galleries = galleries
        self.recorder = recorder

    # -- searching ---------------------------------------------------------------------------

    def search(
        self,
        caller: Caller,
        justification: Justification,
        probe: Probe,
        face_index: int,
        galleries: Sequence[str],
        *,
        mode: str,
        k: int = DEFAULT_TOP_K,
        age_band: AgeBand = "unknown",
        where: str = "search",
        workspace_id: str = "",
    ) -> tuple[StoredSearch, SearchResult]:
        """Search in ``mode`` (recorded in the search's record), keep the result in the
        caller's history and return it, kept and whole (for a re-score while the photo is
        held; an identification's holds only the candidates above the threshold)."""
        mode = check_mode(mode)
        search_id = new_search_id()
        result = self.galleries.search(
            caller,
            justification,
            probe,
            face_index,
            galleries,
            k=k,
            age_band=age_band,
            where=where,
            detail=f"mode {mode}; search {search_id}",
            matches_only=mode == IDENTIFICATION,
        )
        stored = self._stored(
            search_id, caller, justification, probe, face_index, result, mode, workspace_id
        )
        self.history.put(stored)
        return stored, result

    def rescore(
        self,
        caller: Caller,
        search_id: str,
        probe: Probe,
        result: SearchResult,
        age_band: AgeBand,
        *,
        where: str,
    ) -> tuple[StoredSearch, SearchResult]:
        """An investigation's candidates judged for another age band (recorded like a search
        by the core); the kept search takes the new threshold and bands, decisions stay."""
        search = self.get(caller, search_id, where=where)
        if search.mode != INVESTIGATION:
            raise BadInputError(
                "an identification is judged for another age band by searching again"
            )
        rescored = self.galleries.rescore(
            caller,
            justification_of(search),
            probe,
            search.face_index,
            result,
            age_band,
            where=where,
        )
        fresh = self._stored(
            search_id,
            caller,
            justification_of(search),
            probe,
            search.face_index,
            rescored,
            search.mode,
            search.workspace_id,
        )
        kept = replace(
            fresh, created_at=search.created_at, decisions=search.decisions, opened=search.opened
        )
        self.history.put(kept)
        return kept, rescored

    # -- the history -------------------------------------------------------------------------

    def get(self, caller: Caller, search_id: str, *, where: str) -> StoredSearch:
        """The caller's own search; another's is refused and recorded."""
        search = self.history.get(search_id)
        if search is None:
            raise SearchNotFoundError(
                "no such search in your history (it may have passed the history's retention)"
            )
        if not same_person(search.user, caller.actor.user):
            raise self.recorder.refused(
                caller.actor,
                "this search is another investigator's; open it from your own search history",
                where=where,
                resource=f"search {search_id}",
                why="the search belongs to another user",
            )
        return search

    def mine(self, caller: Caller) -> list[StoredSearch]:
        """The caller's searches, newest first: cases, modes, counts and decisions (no names,
        no faces: nothing is revealed, so nothing is recorded)."""
        return self.history.of_user(caller.actor.user)

    def of_case(self, case: str) -> list[StoredSearch]:
        """A case's searches by everyone, for its case page (which the caller was allowed to
        open and which recorded the view): who searched, when, in which mode, what was
        decided. Names and faces stay in each search, for its own investigator."""
        return self.history.of_case(case)

    def reopen(self, caller: Caller, search_id: str, *, where: str) -> StoredSearch:
        """The caller's search shown again. In the session that was shown it, nothing new
        is revealed; in another (after signing in again) its candidates' faces are revealed
        again, so it is recorded like a search (not searched again) first."""
        search = self.get(caller, search_id, where=where)
        covered = all(
            self.galleries.revealed.covers(caller.session_key, c.gallery, c.face_id)
            for c in search.candidates
        )
        if covered:
            return search
        for gallery in dict.fromkeys(search.galleries):  # access may have been withdrawn
            self.galleries.require(
                caller,
                Permission.SEARCH,
                gallery,
                where=where,
                justification=justification_of(search),
            )
        shown = (
            f"shown again from the search history, not searched again: search "
            f"{search.search_id}; mode {search.mode}; {len(search.candidates)} candidate(s)"
        )
        if search.origin:  # a case lead's review: the case's evidence, shown again
            self.recorder.record(
                caller.actor,
                AuditAction.CASE_VIEWED,
                justification=justification_of(search),
                detail=f"{shown}; {search.origin}",
            )
        else:
            self.recorder.record(
                caller.actor,
                AuditAction.SEARCH,
                justification=justification_of(search),
                gallery=gallery_field(search.galleries)[0],
                probe_sha256=search.probe_sha256,
                age_band=search.age_band,
                detail=shown,
            )
        for c in search.candidates:
            self.galleries.revealed.note(caller.session_key, c.gallery, [c.face_id])
        return search

    def names_shown(self, search: StoredSearch) -> dict[str, str]:
        """The names a search's page shows with it, by face id: an identification's matches
        (revealed, and recorded, with the search); none for an investigation, whose names
        are revealed one by one in the comparison view."""
        if search.mode != IDENTIFICATION:
            return {}
        inner = self.galleries.galleries
        return {
            c.face_id: inner.subject(c.gallery, c.subject_id).display_name
            for c in search.candidates
            if c.above_threshold
        }

    def review_case_lead(
        self,
        caller: Caller,
        cases: AccountableCases,
        case_ref: str,
        cluster: int,
        face_id: str,
        reason: str,
        *,
        where: str,
    ) -> StoredSearch:
        """A case lead brought to the comparison view: the caller's review of it (found again
        or kept now) holds the case face that scored and the lead, so the lead is confirmed or
        rejected exactly as a search's candidate is. The case must be the caller's; the lead
        one they may see (galleries they may search)."""
        case = cases.open(caller, case_ref, where=where)
        why = Justification.of(case.meta.number, reason)
        origin = f"case {case.meta.case_id} cluster {cluster} lead {face_id}"
        for kept in self.history.of_user(caller.actor.user):
            if kept.origin == origin:
                return kept
        view = cases.visible_view(caller, case)
        found = next((c for c in view.clusters if c.number == cluster), None)
        search = found.search if found is not None else None
        lead = next((x for x in search.leads if x.face_id == face_id), None) if search else None
        if search is None or lead is None:
            raise SearchNotFoundError("no such lead in this case")
        inner = self.galleries.galleries
        applied = inner.calibration.for_age(check_age_band(search.age_band))
        stored = StoredSearch(
            search_id=new_search_id(),
            user=caller.actor.user,
            case=why.case,
            reason=why.reason,
            mode=INVESTIGATION,  # a ranked lead for review, never a match claim
            age_band=search.age_band,
            band_used=search.band_used,
            galleries=tuple(search.galleries),
            created_at=self.history.now(),
            probe_sha256="",
            face_index=0,
            model_id=inner.model_id,
            threshold=search.threshold,
            searched_faces=0,
            threshold_sentence=search.threshold_note,
            reliability_note=search.reliability_note,
            candidates=(
                StoredCandidate(
                    rank=lead.rank,
                    gallery=lead.gallery,
                    subject_id=lead.subject_id,
                    face_id=lead.face_id,
                    score=lead.score,
                    band=lead.band,
                    above_threshold=lead.above_threshold,
                    strength=stranger_odds(applied, lead.score),
                ),
            ),
            probe_chip=case.thumbnail(lead.probe_face_id),
            origin=origin,
        )
        self.history.put(stored)
        return stored

    # -- comparison and decisions ------------------------------------------------------------

    def open_candidate(self, caller: Caller, search_id: str, face_id: str, *, where: str) -> Opened:
        """One candidate opened for comparison: the subject's name and every enrolled photo,
        recorded as ``subject_viewed`` before they are returned (not again to the session
        that was shown them, while the reveal ledger covers every photo)."""
        search = self.get(caller, search_id, where=where)
        candidate = _candidate(search, face_id)
        self.galleries.require(
            caller,
            Permission.SEARCH,
            candidate.gallery,
            where=where,
            justification=justification_of(search),
        )
        inner = self.galleries.galleries
        subject = inner.subject(candidate.gallery, candidate.subject_id)
        faces = tuple(inner.faces(candidate.gallery, candidate.subject_id))
        shown_already = face_id in search.opened and all(
            self.galleries.revealed.covers(caller.session_key, candidate.gallery, f.face_id)
            for f in faces
        )
        if shown_already:  # the same session again (a reload, a toggle): nothing new shown
            return Opened(search, candidate, subject.display_name, faces)
        self.recorder.record(
            caller.actor,
            AuditAction.SUBJECT_VIEWED,
            justification=justification_of(search),
            gallery=candidate.gallery,
            subject_id=candidate.subject_id,
            age_band=search.age_band,
            detail=(
                f"candidate opened for comparison: search {search.search_id}; mode "
                f"{search.mode}; rank {candidate.rank}; {len(faces)} enrolled photo(s) shown"
            ),
        )
        self.galleries.revealed.note(
            caller.session_key, candidate.gallery, [f.face_id for f in faces]
        )
        if face_id not in search.opened:
            search = replace(search, opened=(*search.opened, face_id))
            self.history.put(search)
        return Opened(search, candidate, subject.display_name, faces)

    def decide(
        self,
        caller: Caller,
        search_id: str,
        face_id: str,
        decision: str,
        note: str = "",
        *,
        where: str,
    ) -> StoredDecision:
        """Record a lead confirmed or rejected, with who, when and why. Refused unless the
        candidate was opened for comparison in this search; a confirmation below the
        threshold is refused without a note. Never fed back into anything that learns."""
        if decision not in DECISIONS:
            raise BadInputError("a decision is 'confirmed' or 'rejected'")
        note = " ".join(note.split())
        if len(note) > MAX_NOTE_CHARS:
            raise BadInputError(f"keep the note under {MAX_NOTE_CHARS} characters")
        search = self.get(caller, search_id, where=where)
        candidate = _candidate(search, face_id)
        if face_id not in search.opened:
            raise BadInputError(
                "open this candidate's comparison (the probe beside every enrolled photo) "
                "before recording a decision"
            )
        if decision == "confirmed" and not candidate.above_threshold and len(note) < MIN_NOTE_CHARS:
            raise BadInputError(
                "this candidate scored below the threshold: say in the note (at least "
                f"{MIN_NOTE_CHARS} characters) what, beyond the score, confirms the lead"
            )
        self.galleries.require(
            caller,
            Permission.SEARCH,
            candidate.gallery,
            where=where,
            justification=justification_of(search),
        )
        made = StoredDecision(
            face_id, DECISIONS[decision], note, caller.actor.user, self.history.now()
        )
        position = "above" if candidate.above_threshold else "below"
        self.recorder.record(
            caller.actor,
            AuditAction.DECISION,
            justification=justification_of(search),
            gallery=candidate.gallery,
            subject_id=candidate.subject_id,
            probe_sha256=search.probe_sha256 or None,
            candidates=audit_candidates_of(candidate),
            decision=made.decision,
            age_band=search.age_band,
            detail=(
                f"search {search.search_id}; mode {search.mode}; rank {candidate.rank}; "
                f"{position} the threshold"
                + (f"; {search.origin}" if search.origin else "")
                + (f"; note: {note}" if note else "")
            ),
        )
        self.history.put(replace(search, decisions=(*search.decisions, made)))
        return made

    # -- internals ---------------------------------------------------------------------------

    def _stored(
        self,
        search_id: str,
        caller: Caller,
        justification: Justification,
        probe: Probe,
        face_index: int,
        result: SearchResult,
        mode: str,
        workspace_id: str,
    ) -> StoredSearch:
        cal = result.calibration
        return StoredSearch(
            search_id=search_id,
            user=caller.actor.user,
            case=justification.case,
            reason=justification.reason,
            mode=mode,
            age_band=result.age_band,
            band_used=cal.band,
            galleries=tuple(result.galleries),
            created_at=self.history.now(),
            probe_sha256=probe.image_sha256,
            face_index=face_index,
            model_id=result.model_id,
            threshold=result.threshold,
            searched_faces=result.searched_faces,
            threshold_sentence=result.threshold_sentence,
            reliability_note=result.reliability.note,
            candidates=tuple(
                StoredCandidate(
                    rank=c.rank,
                    gallery=c.gallery,
                    subject_id=c.subject_id,
                    face_id=c.face_id,
                    score=c.score,
                    band=c.band.value,
                    above_threshold=c.above_threshold,
                    strength=stranger_odds(cal, c.score),
                    photo_number=c.photo_number,
                    photos=c.photos,
                    age_at_capture=c.face_age_at_capture,
                )
                for c in result.candidates
            ),
            probe_chip=probe.chip_jpeg(face_index),
            workspace_id=workspace_id,
            strength_legend=tuple(line.text for line in result.strength),
        )


def _candidate(search: StoredSearch, face_id: str) -> StoredCandidate:
    found = search.candidate(face_id)
    if found is None:
        raise SearchNotFoundError("that candidate is not among this search's results")
    return found


def audit_candidates_of(candidate: StoredCandidate) -> tuple[AuditCandidate, ...]:
    """The audit log's form of one kept candidate (ids, score and band; never a name)."""
    c = candidate
    return (AuditCandidate(c.subject_id, c.face_id, c.score, c.band, c.rank),)
