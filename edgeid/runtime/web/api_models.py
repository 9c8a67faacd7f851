"""The JSON shapes of ``/api/v1`` (what OpenAPI documents). Requests forbid unknown keys."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from edgeid.runtime.audit.justification import (
    CASE_NUMBER_PATTERN,
    MAX_CASE_CHARS,
    MAX_REASON_CHARS,
    MIN_REASON_CHARS,
)
from edgeid.runtime.gallery.age_bands import AgeBand, MeasuredBand
from edgeid.runtime.gallery.records import Face, GalleryInfo, Subject
from edgeid.runtime.gallery.service import Candidate, Probe, SearchResult
from edgeid.runtime.gallery.wording import StrengthLine, calibration_json
from edgeid.runtime.services.proposals import Proposal
from edgeid.runtime.services.search_history import StoredSearch

AgeBandName = AgeBand
ResultMode = Literal["identification", "investigation"]
MODE_HELP = (
    "identification (default): only candidates at or above the threshold of the age band, "
    "with names; none: no match. investigation: the top k in rank order for a person to "
    "review, none a match claim, names withheld until the candidate is opened "
    "(GET /search-history/{id}/candidates/{face_id}, recorded). The mode is recorded."
)
AGE_BAND_HELP = (
    "apparent age of the person in the photo: it chooses the thresholds, score bands and "
    "wording; unknown uses the strictest band the box holds (child_0_5 for the shipped model)"
)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchStart(_In):
    case: str = Field(
        max_length=MAX_CASE_CHARS,
        pattern=CASE_NUMBER_PATTERN,
        description="the case number this search is for",
    )
    reason: str = Field(
        min_length=MIN_REASON_CHARS,
        max_length=MAX_REASON_CHARS,
        description="why this photo is searched, for the audit",
    )
    age_band: AgeBandName = Field(default="unknown", description=AGE_BAND_HELP)
    galleries: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="galleries to search; empty: every gallery this user may search",
    )
    mode: ResultMode = Field(default="identification", description=MODE_HELP)


class SearchCreated(BaseModel):
    search_id: str
    case: str
    galleries: list[str]
    age_band: AgeBandName
    mode: ResultMode
    expires_after_idle_s: float


class ProbeFaceOut(BaseModel):
    index: int
    box: list[int] = Field(description="x0, y0, x1, y1 in pixels of the upright photo")
    score: float = Field(description="detector confidence")
    quality: float = Field(description="face image quality, 0-1 (size, sharpness, pose)")
    quality_limiting: str
    enrollable: bool = Field(description="passes the enrolment quality gate")


class ProbeOut(BaseModel):
    search_id: str
    image_sha256: str
    width: int
    height: int
    faces: list[ProbeFaceOut]
    faces_not_analysed: int = Field(
        default=0,
        description="faces found beyond the per-photo cap (the least confident), not analysed",
    )

    @classmethod
    def of(cls, search_id: str, probe: Probe) -> ProbeOut:
        return cls(
            search_id=search_id,
            image_sha256=probe.image_sha256,
            width=probe.width,
            height=probe.height,
            faces=[
                ProbeFaceOut(
                    index=f.index,
                    box=list(f.box),
                    score=f.score,
                    quality=f.quality,
                    quality_limiting=f.quality_limiting,
                    enrollable=f.enrollable,
                )
                for f in probe.faces
            ],
            faces_not_analysed=probe.faces_not_analysed,
        )


class CandidatesRequest(_In):
    k: int = Field(default=10, ge=1, le=100, description="how many candidates, in rank order")


class RescoreRequest(_In):
    age_band: AgeBandName = Field(description=AGE_BAND_HELP)


class MatchedPhotoOut(BaseModel):
    face_id: str = Field(description="the subject's photo that matched best")
    number: int = Field(description="which of the subject's photos, 1-based, enrolment order")
    of: int = Field(description="how many photos the subject has")
    age_at_capture: int | None = Field(description="the photo's age at capture, if given")


class CandidateOut(BaseModel):
    """A subject, ranked by its best-matching photo."""

    rank: int
    gallery: str
    subject_id: str
    display_name: str | None = Field(
        description="the subject's name; null in investigation mode until the candidate is opened"
    )
    face_id: str = Field(description="the subject's best-matching photo (as matched_photo)")
    score: float = Field(description="cosine similarity of the templates")
    band: str = Field(
        description="strong, moderate, weak or below threshold, by the age band's thresholds"
    )
    above_threshold: bool
    matched_photo: MatchedPhotoOut

    @classmethod
    def of(cls, c: Candidate, *, named: bool = True) -> CandidateOut:
        return cls(
            rank=c.rank,
            gallery=c.gallery,
            subject_id=c.subject_id,
            display_name=c.display_name if named else None,
            face_id=c.face_id,
            score=round(c.score, 4),
            band=c.band.value,
            above_threshold=c.above_threshold,
            matched_photo=MatchedPhotoOut(
                face_id=c.face_id,
                number=c.photo_number,
                of=c.photos,
                age_at_capture=c.face_age_at_capture,
            ),
        )


class ReliabilityOut(BaseModel):
    age_band: AgeBandName = Field(description="as stated")
    band_used: MeasuredBand = Field(description="the band whose thresholds applied")
    verification_rate: float | None = Field(
        description="same person across years verified, for this band; null: not measured"
    )
    note: str


class StrengthOut(BaseModel):
    band: str
    from_score: float | None = Field(description="lower edge; null: below the weakest edge")
    text: str

    @classmethod
    def of(cls, line: StrengthLine) -> StrengthOut:
        return cls(band=line.band.value, from_score=line.from_score, text=line.text)


class CalibrationOut(BaseModel):
    """The thresholds a result used, and what may honestly be said of them."""

    age_band_used: MeasuredBand
    label: str
    substitution: str | None = Field(
        description="why another band's thresholds apply (unknown age, band not calibrated)"
    )
    threshold_note: str = Field(description="the threshold in words, as every door shows it")
    fmr_supported: bool = Field(
        description="whether the band's pairs can support operating_fmr (rule of three)"
    )
    stated_fmr: float = Field(
        description="the finest false-match rate that may be stated for this threshold"
    )
    resolution_fmr: float = Field(description="3 / non_mated_pairs, rounded up")
    non_mated_pairs: int
    data_set: str
    measured_by: str
    measured_in_product: bool = Field(
        description="false: measured outside this product on data that cannot ship"
    )
    date: str
    strength: list[StrengthOut] = Field(description="what each score band means for this band")


class SearchResultOut(BaseModel):
    model_id: str
    galleries: list[str]
    age_band: AgeBandName = Field(description="the probe's apparent age, as stated")
    operating_fmr: float = Field(
        description=(
            "the calibrated false-match rate the threshold was set for within the age band; "
            "where calibration.fmr_supported is false, only calibration.stated_fmr may be said"
        )
    )
    threshold: float
    no_match: bool = Field(description="no candidate scored above the threshold")
    searched_faces: int
    calibration: CalibrationOut
    reliability: ReliabilityOut
    candidates: list[CandidateOut] = Field(description="leads in rank order, not identifications")
    mode: ResultMode = Field(default="identification", description=MODE_HELP)
    history_id: str | None = Field(
        default=None,
        description="this result in the user's search history (/search-history/{history_id})",
    )
    strength: list[str] = Field(
        default_factory=list,
        description="per candidate, in rank order: how often a stranger scores this high",
    )

    @classmethod
    def of(cls, r: SearchResult, kept: StoredSearch | None = None) -> SearchResultOut:
        investigation = kept is not None and kept.mode == "investigation"
        return cls(
            mode="investigation" if investigation else "identification",
            history_id=kept.search_id if kept else None,
            strength=[c.strength for c in kept.candidates] if kept else [],
            model_id=r.model_id,
            galleries=list(r.galleries),
            age_band=r.age_band,
            operating_fmr=r.operating_fmr,
            threshold=round(r.threshold, 4),
            no_match=r.no_match,
            searched_faces=r.searched_faces,
            calibration=CalibrationOut.model_validate(
                calibration_json(r.calibration, r.operating_fmr)
            ),
            reliability=ReliabilityOut(
                age_band=r.reliability.age_band,
                band_used=r.reliability.band_used,
                verification_rate=r.reliability.verification_rate,
                note=r.reliability.note,
            ),
            candidates=[CandidateOut.of(c, named=not investigation) for c in r.candidates],
        )


class DecisionIn(_In):
    decision: Literal["confirmed", "rejected"]
    note: str = Field(
        default="",
        max_length=1000,
        description=(
            "what was compared and why; required (10 characters or more) to confirm a "
            "candidate below the threshold"
        ),
    )


class DecisionOut(BaseModel):
    recorded: str
    rank: int
    subject_id: str
    by: str
    at: datetime
    note: str


class KeptCandidateOut(BaseModel):
    rank: int
    gallery: str
    subject_id: str
    face_id: str
    score: float = Field(description="cosine similarity of the templates")
    band: str
    above_threshold: bool
    strength: str = Field(description="how often a stranger of the age band scores this high")
    decision: str | None = Field(description="the latest decision recorded on it, if any")


class KeptSearchOut(BaseModel):
    """A search kept in its user's history: no names (open a candidate for its name)."""

    history_id: str
    case: str
    mode: ResultMode
    age_band: str
    created_at: datetime
    no_match: bool
    searched_faces: int
    threshold: float
    threshold_note: str
    candidates: list[KeptCandidateOut]

    @classmethod
    def of(cls, s: StoredSearch) -> KeptSearchOut:
        def latest(face_id: str) -> str | None:
            d = s.decision(face_id)
            return d.decision if d else None

        return cls(
            history_id=s.search_id,
            case=s.case,
            mode="investigation" if s.mode == "investigation" else "identification",
            age_band=s.age_band,
            created_at=s.created_at,
            no_match=s.no_match,
            searched_faces=s.searched_faces,
            threshold=round(s.threshold, 4),
            threshold_note=s.threshold_sentence,
            candidates=[
                KeptCandidateOut(
                    rank=c.rank,
                    gallery=c.gallery,
                    subject_id=c.subject_id,
                    face_id=c.face_id,
                    score=round(c.score, 4),
                    band=c.band,
                    above_threshold=c.above_threshold,
                    strength=c.strength,
                    decision=latest(c.face_id),
                )
                for c in s.candidates
            ],
        )


class ComparisonOut(BaseModel):
    """A candidate opened (recorded): the name and every enrolled photo's face id."""

    history_id: str
    rank: int
    gallery: str
    subject_id: str
    display_name: str
    face_ids: list[str] = Field(
        description="every enrolled photo (GET /galleries/{gallery}/faces/{face_id}/thumbnail.jpg)"
    )
    above_threshold: bool
    strength: str


class GalleryIn(_In):
    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=2000)


class GalleryOut(BaseModel):
    name: str
    description: str
    created_at: datetime
    subjects: int
    faces: int

    @classmethod
    def of(cls, g: GalleryInfo) -> GalleryOut:
        return cls(
            name=g.name,
            description=g.description,
            created_at=g.created_at,
            subjects=g.subjects,
            faces=g.faces,
        )


class FaceOut(BaseModel):
    face_id: str
    quality: float
    model_id: str
    enrolled_at: datetime
    age_at_capture: int | None = Field(
        default=None, description="the subject's age when the photo was taken, if given"
    )

    @classmethod
    def of(cls, f: Face) -> FaceOut:
        return cls(
            face_id=f.face_id,
            quality=f.quality,
            model_id=f.model_id,
            enrolled_at=f.enrolled_at,
            age_at_capture=f.age_at_capture,
        )


class SubjectOut(BaseModel):
    gallery: str
    subject_id: str
    display_name: str
    notes: str
    legal_basis: str
    enrolled_by: str
    enrolled_at: datetime
    retention_until: date | None
    faces: list[FaceOut] | None = None

    @classmethod
    def of(cls, gallery: str, s: Subject, faces: list[Face] | None = None) -> SubjectOut:
        return cls(
            gallery=gallery,
            subject_id=s.subject_id,
            display_name=s.display_name,
            notes=s.notes,
            legal_basis=s.legal_basis,
            enrolled_by=s.enrolled_by,
            enrolled_at=s.enrolled_at,
            retention_until=s.retention_until,
            faces=[FaceOut.of(f) for f in faces] if faces is not None else None,
        )


class EraseIn(_In):
    reason: str = Field(min_length=MIN_REASON_CHARS, max_length=MAX_REASON_CHARS)


CHANGE_REASON = (
    "why: needed (with two-person rule on) to make an admin or add galleries, which then wait "
    "for a second person's approval"
)


class UserIn(_In):
    username: str = Field(max_length=32)
    role: Literal["investigator", "supervisor", "admin", "technician"]
    galleries: list[str] = Field(default_factory=list, max_length=256)
    reason: str | None = Field(default=None, max_length=1000, description=CHANGE_REASON)


class UserPatch(_In):
    role: Literal["investigator", "supervisor", "admin", "technician"] | None = None
    galleries: list[str] | None = Field(default=None, max_length=256)
    disabled: bool | None = None
    reason: str | None = Field(default=None, max_length=1000, description=CHANGE_REASON)


class UserOut(BaseModel):
    username: str
    role: str
    galleries: list[str]
    disabled: bool
    must_change_password: bool
    created_at: datetime


class ProposalOut(BaseModel):
    """A change waiting for (or decided by) a second person under the two-person rule."""

    proposal_id: str
    kind: str
    summary: str
    proposer: str
    reason: str
    created_at: datetime
    expires_at: datetime
    status: str

    @classmethod
    def of(cls, proposal: Proposal, ttl: timedelta) -> ProposalOut:
        return cls(
            proposal_id=proposal.proposal_id,
            kind=proposal.kind.value,
            summary=proposal.summary(),
            proposer=proposal.proposer,
            reason=proposal.reason,
            created_at=proposal.created_at,
            expires_at=proposal.expires_at(ttl),
            status=proposal.status.value,
        )


class UserCreated(BaseModel):
    user: UserOut | None = Field(description="None while a new admin waits for approval")
    one_time_password: str | None = Field(description="shown once; must be changed at first login")
    waiting: list[ProposalOut] = Field(
        default_factory=list, description="what waits for a second person's approval"
    )


class UserChanged(UserOut):
    waiting: list[ProposalOut] = Field(
        default_factory=list, description="what waits for a second person's approval"
    )


class ApprovalOut(BaseModel):
    proposal: ProposalOut
    summary: str
    one_time_password: str | None = Field(
        default=None, description="a new admin's, shown once to the approver"
    )


class OneTimePassword(BaseModel):
    one_time_password: str


class TokenOut(BaseModel):
    token_id: str
    username: str
    name: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None


class MeOut(BaseModel):
    username: str
    role: str
    scopes: list[str]
    galleries: list[str]
    token_id: str | None
