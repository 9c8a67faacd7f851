"""Leads for a cluster: its best faces searched against the galleries, every search audited.

A cluster is searched with its ``PROBE_FACES`` best-quality faces, each an ordinary 1:N search
(``GalleryService.search``), so every score keeps its calibrated meaning: the band and the
threshold are those of one face against one enrolled face, for the age band the cluster is
searched as (``unknown`` when the case may hold children: nobody stated this cluster's age, so
the strictest band applies; ``adult`` for a case of adults only). A subject found by several
probe faces keeps its best score. The search is appended to the audit log under the case, with its
reason, before its leads are kept; if the audit log refuses the record, the leads are not
kept and the error stops the run (a search that cannot be accounted for shows nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

import numpy as np

from edgeid.runtime.audit.events import AuditAction, AuditEvent
from edgeid.runtime.audit.events import Candidate as AuditCandidate
from edgeid.runtime.cases.records import CaseFace, ClusterSearch, Lead
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.gallery.service import DEFAULT_TOP_K, AgeBand, GalleryService, Probe, ProbeFace
from edgeid.runtime.gallery.thresholds import DEFAULT_OPERATING_FMR
from edgeid.runtime.gallery.wording import threshold_note

# Faces of a cluster searched: the best few by quality. More adds searches (and audit
# records) while the best face usually carries the score.
PROBE_FACES = 3
MAX_GALLERY_FIELD_CHARS = 200  # the audit log's limit for its gallery field


class AuditSink(Protocol):
    """Where searches are recorded: ``edgeid.runtime.audit.log.AuditLog`` (or the web's
    state.audit)."""

    def append(self, event: AuditEvent) -> object: ...


class Actor(Protocol):
    @property
    def user(self) -> str: ...

    @property
    def role(self) -> str: ...


def probe_faces(faces: Sequence[CaseFace], count: int = PROBE_FACES) -> list[CaseFace]:
    """The faces a cluster is searched with: highest quality, then detector score."""
    return sorted(faces, key=lambda f: (-f.quality, -f.score, f.face_id))[:count]


def _probe(service: GalleryService, faces: Sequence[CaseFace]) -> Probe:
    """A probe holding case faces' templates (no pixels: the chips stay in the case)."""
    described = tuple(
        ProbeFace(
            index=i,
            box=face.box,
            score=face.score,
            quality=face.quality,
            quality_limiting=face.quality_limiting,
            enrollable=False,
        )
        for i, face in enumerate(faces)
    )
    return Probe(
        image_sha256=faces[0].file_sha256,
        width=0,
        height=0,
        faces=described,
        model_id=service.model_id,
        _templates=np.stack([face.embedding for face in faces]),
        _chips=(),
    )


def search_cluster(
    service: GalleryService,
    faces: Sequence[CaseFace],
    galleries: Sequence[str],
    *,
    audit: AuditSink,
    actor: Actor,
    case_number: str,
    reason: str,
    detail: str,
    now: datetime,
    k: int = DEFAULT_TOP_K,
    fmr: float = DEFAULT_OPERATING_FMR,
    age_band: AgeBand = "unknown",
) -> ClusterSearch:
    """Search a cluster's best faces over ``galleries`` as ``age_band``; audited; leads
    ranked by score."""
    if not faces:
        raise BadInputError("a cluster without faces cannot be searched")
    probes = probe_faces(faces)
    probe = _probe(service, probes)
    best: dict[tuple[str, str], Lead] = {}
    applied = service.calibration.for_age(age_band)
    threshold = applied.threshold(fmr)
    note = service.reliability(age_band).note
    for index, face in enumerate(probes):
        result = service.search(probe, index, galleries, k=k, fmr=fmr, age_band=age_band)
        threshold, note, applied = result.threshold, result.reliability.note, result.calibration
        for c in result.candidates:
            key = (c.gallery, c.subject_id)
            if key not in best or c.score > best[key].score:
                best[key] = Lead(
                    rank=0,
                    gallery=c.gallery,
                    subject_id=c.subject_id,
                    display_name=c.display_name,
                    face_id=c.face_id,
                    probe_face_id=face.face_id,
                    score=float(c.score),
                    band=c.band.value,
                    above_threshold=c.above_threshold,
                )
    ranked = sorted(best.values(), key=lambda lead: (-lead.score, lead.gallery, lead.subject_id))
    leads = tuple(
        Lead(**{**vars(lead), "rank": rank}) for rank, lead in enumerate(ranked[:k], start=1)
    )
    detail = f"{detail}; age band {age_band} (thresholds of {applied.band})"
    audit.append(_event(actor, case_number, reason, galleries, probes, leads, detail, age_band))
    return ClusterSearch(
        galleries=tuple(dict.fromkeys(galleries)),
        operating_fmr=fmr,
        threshold=float(threshold),
        probe_faces=tuple(f.face_id for f in probes),
        leads=leads,
        reliability_note=note,
        searched_at=now,
        age_band=age_band,
        band_used=applied.band,
        threshold_note=threshold_note(applied, fmr),
    )


def _event(
    actor: Actor,
    case_number: str,
    reason: str,
    galleries: Sequence[str],
    probes: Sequence[CaseFace],
    leads: Sequence[Lead],
    detail: str,
    age_band: AgeBand,
) -> AuditEvent:
    names = ", ".join(dict.fromkeys(galleries))
    if len(names) > MAX_GALLERY_FIELD_CHARS:
        detail = f"{detail}; galleries: {names}"
        names = f"{len(set(galleries))} galleries (listed in detail)"
    probe_ids = ", ".join(f.face_id for f in probes)
    return AuditEvent(
        user=actor.user,
        role=actor.role,
        action=AuditAction.SEARCH,
        case=case_number,
        reason=reason,
        gallery=names,
        probe_sha256=probes[0].file_sha256,
        candidates=tuple(
            AuditCandidate(lead.subject_id, lead.face_id, lead.score, lead.band, lead.rank)
            for lead in leads
        ),
        age_band=age_band,
        detail=f"{detail}; probe case faces: {probe_ids}",
    )
