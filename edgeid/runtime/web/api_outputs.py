"""Typed shapes of the API's case, ingest-job, audit and health answers (what OpenAPI shows).

The dictionaries stay built where they always were (``cases.views``, ``case_operations.
job_json``, ``AuditRecord.to_json``, ``health_summary``: one source for the CLI's JSON and the
API's); these models validate and document them. They allow extra keys, so a field added to
one of those builders still reaches clients (undocumented until it is added here) rather than
vanishing or failing the request.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from edgeid.runtime.web.api_models import ProbeFaceOut


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- enrolment refusals with more than a sentence ----------------------------------------------


class FacesFoundOut(_Out):
    """422 from enrolment when the photo holds several faces and no ``face_index`` came."""

    error: str
    faces: list[ProbeFaceOut] = Field(
        default_factory=list, description="the faces found; send the index of the one meant"
    )


class DuplicateMatchOut(_Out):
    rank: int
    subject_id: str
    face_id: str
    score: float
    band: str


class DuplicateOut(_Out):
    """409 from enrolment: the face already matches enrolled subjects."""

    error: str
    candidates: list[DuplicateMatchOut] = Field(default_factory=list)


# -- health ------------------------------------------------------------------------------------


class HealthOut(_Out):
    state: Literal["ready"]
    version: str
    backend: str = Field(description="the inference backend in use (cpu, cuda, tensorrt)")
    detector: str
    models: list[str]
    uptime_s: float = Field(description="seconds since the service started")


# -- audit -------------------------------------------------------------------------------------


class AuditCandidateOut(_Out):
    subject_id: str
    face_id: str
    score: float
    band: str | None = None
    rank: int | None = None


class AuditRecordOut(_Out):
    seq: int = Field(description="position in the hash-chained log, from 1")
    time: str = Field(description="UTC, ISO 8601")
    user: str
    role: str
    action: str
    case: str | None
    reason: str | None
    gallery: str | None
    probe_sha256: str | None
    candidates: list[AuditCandidateOut]
    decision: str | None
    subject_id: str | None
    detail: str | None
    age_band: str | None = None


# -- case ingest jobs --------------------------------------------------------------------------


class JobOut(_Out):
    job_id: str
    case: str
    case_id: str | None = Field(description="known once the ingest has opened the case")
    state: Literal["pending", "running", "complete", "stopped", "failed"]
    error: str | None
    phase: str
    files_total: int
    files_seen: int
    files_new: int
    files_duplicate: int
    files_already_done: int
    files_failed: int
    faces_new: int
    video_frames: int
    clusters: int
    clusters_searched: int


# -- cases -------------------------------------------------------------------------------------


class CaseRunOut(_Out):
    number: int
    status: str
    started_at: str
    finished_at: str | None
    user: str
    reason: str
    source: str
    frame_interval_s: float
    galleries: list[str]
    detector: str
    note: str | None = None
    children: bool | None = None


class CaseMetaOut(_Out):
    case: str = Field(description="the case number")
    case_id: str = Field(description="the case's random id, used in its URLs")
    created_at: str
    created_by: str
    model_id: str
    retention_until: str | None
    last_run: CaseRunOut | None
    may_include_children: bool
    files: int
    failed_files: int
    faces: int
    clusters: int
    leads_above_threshold: int = Field(description="clusters with a candidate above threshold")


class CaseLeadOut(_Out):
    rank: int
    gallery: str
    subject_id: str
    display_name: str
    face_id: str
    probe_face_id: str
    score: float
    band: str
    above_threshold: bool


class ClusterSearchOut(_Out):
    galleries: list[str]
    operating_fmr: float
    threshold: float
    no_match: bool
    probe_faces: list[str]
    searched_at: str
    error: str | None
    age_band: str | None = None
    band_used: str | None = None
    threshold_note: str
    reliability_note: str | None = None
    leads: list[CaseLeadOut]


class BestFaceOut(_Out):
    face_id: str
    quality: float
    quality_limiting: str
    box: list[int]
    time_s: float | None


class AppearanceOut(_Out):
    names: list[str]
    faces: int
    times_s: list[float]


class ClusterOut(_Out):
    cluster: int
    faces: int
    best_faces: list[BestFaceOut]
    files: list[AppearanceOut]
    search: ClusterSearchOut | None


class ClusteringOut(_Out):
    method: str
    fmr: float
    threshold: float
    computed_at: str
    faces: int
    stale: bool
    age_band: str | None = None
    band_used: str | None = None
    threshold_note: str


class SourceFileOut(_Out):
    names: list[str]
    sha256: str | None = Field(description="null: refused before it was read (unsafe path, link)")
    media: str
    status: str
    reason: str | None
    faces: int
    frames: int | None = None
    width: int | None = None
    height: int | None = None
    duration_s: float | None = None


class FileProblemOut(_Out):
    names: list[str]
    reason: str | None


class CaseOut(_Out):
    """A case as its page shows it: the meta, then its clusters and files (``faces`` and
    ``failed_files`` here are the full lists' counts and entries, not the summary's)."""

    case: str = Field(description="the case number")
    case_id: str
    created_at: str
    created_by: str
    model_id: str
    retention_until: str | None
    last_run: CaseRunOut | None
    may_include_children: bool
    files: int
    faces: int
    leads_above_threshold: int
    runs: list[CaseRunOut]
    clustering: ClusteringOut | None
    clusters: list[ClusterOut]
    source_files: list[SourceFileOut]
    failed_files: list[FileProblemOut]
    partial_files: list[FileProblemOut]
