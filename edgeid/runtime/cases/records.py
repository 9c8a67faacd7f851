"""What a case holds: its metadata and ingest runs, its source files, its faces, and the
latest clusters with their leads. Each type turns into the JSON head of a sealed record and
back; ``from_head`` raises ``CorruptCaseError`` on a layout it does not know.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date, datetime
from typing import Any, Literal, TypeVar

import numpy as np

from edgeid.runtime.cases.errors import CorruptCaseError
from edgeid.runtime.inference.types import FloatArray

FileStatus = Literal["done", "partial", "failed"]
MediaType = Literal["image", "video", "other"]
RunStatus = Literal["running", "complete", "stopped", "failed"]
T = TypeVar("T")


@dataclass(frozen=True)
class IngestRun:
    """One ``case ingest``: who, why, from what, and how it ended."""

    number: int  # 1, 2, ... within the case
    started_at: datetime
    user: str
    reason: str
    source: str  # the folder or archive as given
    frame_interval_s: float
    galleries: tuple[str, ...]
    detector: str
    status: RunStatus = "running"
    finished_at: datetime | None = None
    note: str = ""  # why it stopped or failed, in one line
    # The case's "faces may include children" setting this run clustered and searched with
    # (None: a run from before the setting existed, which used the adult thresholds).
    children: bool | None = None

    def to_head(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "started_at": self.started_at.isoformat(),
            "user": self.user,
            "reason": self.reason,
            "source": self.source,
            "frame_interval_s": self.frame_interval_s,
            "galleries": list(self.galleries),
            "detector": self.detector,
            "status": self.status,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "note": self.note,
            "children": self.children,
        }

    @classmethod
    def from_head(cls, head: dict[str, Any]) -> IngestRun:
        return _build(
            lambda: cls(
                number=int(head["number"]),
                started_at=datetime.fromisoformat(head["started_at"]),
                user=str(head["user"]),
                reason=str(head["reason"]),
                source=str(head["source"]),
                frame_interval_s=float(head["frame_interval_s"]),
                galleries=tuple(str(g) for g in head["galleries"]),
                detector=str(head["detector"]),
                status=head["status"],
                finished_at=_time(head["finished_at"]),
                note=str(head["note"]),
                children=_optional_bool(head.get("children")),
            )
        )


@dataclass(frozen=True)
class CaseSummary:
    """Counts as of the last save (``edgeid case list`` reads only this)."""

    files: int = 0
    failed_files: int = 0
    faces: int = 0
    clusters: int = 0
    leads_above_threshold: int = 0  # clusters with at least one candidate above threshold


@dataclass(frozen=True)
class CaseMeta:
    case_id: str  # random; the folder name. The case number exists only as ciphertext.
    number: str
    created_at: datetime
    created_by: str
    model_id: str
    retention_until: date | None = None
    runs: tuple[IngestRun, ...] = ()
    summary: CaseSummary = CaseSummary()
    # Faces may include children: clustered with the child band's threshold, leads judged as
    # of unknown age (the strictest band). New cases start with it on (CaseStore.create); a
    # case from before the setting existed reads as off, as it was clustered.
    may_include_children: bool = False

    @property
    def last_run(self) -> IngestRun | None:
        return self.runs[-1] if self.runs else None

    def with_run(self, run: IngestRun) -> CaseMeta:
        """This meta with ``run`` added, or replacing the run of the same number."""
        runs = [r for r in self.runs if r.number != run.number]
        return replace(self, runs=tuple(sorted([*runs, run], key=lambda r: r.number)))

    def to_head(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "number": self.number,
            "created_at": self.created_at.isoformat(),
            "created_by": self.created_by,
            "model_id": self.model_id,
            "retention_until": self.retention_until.isoformat() if self.retention_until else None,
            "runs": [r.to_head() for r in self.runs],
            "summary": vars(self.summary),
            "may_include_children": self.may_include_children,
        }

    @classmethod
    def from_head(cls, head: dict[str, Any]) -> CaseMeta:
        return _build(
            lambda: cls(
                case_id=str(head["case_id"]),
                number=str(head["number"]),
                created_at=datetime.fromisoformat(head["created_at"]),
                created_by=str(head["created_by"]),
                model_id=str(head["model_id"]),
                retention_until=(
                    date.fromisoformat(head["retention_until"]) if head["retention_until"] else None
                ),
                runs=tuple(IngestRun.from_head(r) for r in head["runs"]),
                summary=CaseSummary(**{k: int(v) for k, v in head["summary"].items()}),
                may_include_children=bool(_optional_bool(head.get("may_include_children"))),
            )
        )


@dataclass(frozen=True)
class SourceFile:
    """A file of the case's media, by content: every name it was seen under, and what came of
    reading it. A file refused before it was read (unsafe path, link) has no sha256."""

    record_id: str
    sha256: str | None
    names: tuple[str, ...]
    media: MediaType
    status: FileStatus
    reason: str | None  # why it failed, or what was lost of a partial video
    faces: int
    run: int
    width: int = 0
    height: int = 0
    frames: int = 0  # frames sampled from a video
    duration_s: float | None = None
    version: int = 1

    def to_head(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "names": list(self.names),
            "media": self.media,
            "status": self.status,
            "reason": self.reason,
            "faces": self.faces,
            "run": self.run,
            "width": self.width,
            "height": self.height,
            "frames": self.frames,
            "duration_s": self.duration_s,
        }

    @classmethod
    def from_head(cls, record_id: str, version: int, head: dict[str, Any]) -> SourceFile:
        return _build(
            lambda: cls(
                record_id=record_id,
                sha256=head["sha256"],
                names=tuple(str(n) for n in head["names"]),
                media=head["media"],
                status=head["status"],
                reason=head["reason"],
                faces=int(head["faces"]),
                run=int(head["run"]),
                width=int(head["width"]),
                height=int(head["height"]),
                frames=int(head["frames"]),
                duration_s=None if head["duration_s"] is None else float(head["duration_s"]),
                version=version,
            )
        )


@dataclass(frozen=True)
class CaseFace:
    """One face found in the case's media (its aligned chip is in the thumbnail log)."""

    face_id: str
    file_record: str  # the SourceFile record it belongs to
    file_sha256: str
    box: tuple[int, int, int, int]
    score: float
    quality: float
    quality_limiting: str
    embedding: FloatArray
    thumb: tuple[int, int]  # offset and size of its frame in the thumbnail log
    frame: int | None = None  # sample number within a video
    time_s: float | None = None  # timestamp within a video

    def to_head(self) -> dict[str, Any]:
        return {
            "file_record": self.file_record,
            "file_sha256": self.file_sha256,
            "box": list(self.box),
            "score": self.score,
            "quality": self.quality,
            "quality_limiting": self.quality_limiting,
            "thumb": list(self.thumb),
            "frame": self.frame,
            "time_s": self.time_s,
            "dim": int(self.embedding.shape[0]),
        }

    @classmethod
    def from_head(cls, face_id: str, head: dict[str, Any], tail: bytes) -> CaseFace:
        def build() -> CaseFace:
            embedding = np.frombuffer(tail, dtype=np.float32).copy()
            if embedding.shape != (int(head["dim"]),):
                raise ValueError("embedding length")
            x0, y0, x1, y1 = (int(v) for v in head["box"])
            offset, size = (int(v) for v in head["thumb"])
            return cls(
                face_id=face_id,
                file_record=str(head["file_record"]),
                file_sha256=str(head["file_sha256"]),
                box=(x0, y0, x1, y1),
                score=float(head["score"]),
                quality=float(head["quality"]),
                quality_limiting=str(head["quality_limiting"]),
                embedding=embedding,
                thumb=(offset, size),
                frame=None if head["frame"] is None else int(head["frame"]),
                time_s=None if head["time_s"] is None else float(head["time_s"]),
            )

        return _build(build)


@dataclass(frozen=True)
class Lead:
    """A gallery candidate for a cluster: the best score any of its searched faces got."""

    rank: int
    gallery: str
    subject_id: str
    display_name: str
    face_id: str  # the enrolled face that scored
    probe_face_id: str  # the case face that scored it
    score: float
    band: str
    above_threshold: bool

    def to_head(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_head(cls, head: dict[str, Any]) -> Lead:
        return _build(lambda: cls(**head))


@dataclass(frozen=True)
class ClusterSearch:
    """How a cluster was searched and what came back; ``error`` when the search failed."""

    galleries: tuple[str, ...]
    operating_fmr: float
    threshold: float
    probe_faces: tuple[str, ...]
    leads: tuple[Lead, ...]
    reliability_note: str
    searched_at: datetime
    error: str | None = None
    # The stated age band of the cluster's faces, the band whose thresholds applied, and the
    # threshold in words; searches from before age bands used the adult (LFW) thresholds.
    age_band: str = "adult"
    band_used: str = "adult"
    threshold_note: str = ""

    @property
    def matches(self) -> tuple[Lead, ...]:
        return tuple(lead for lead in self.leads if lead.above_threshold)

    def to_head(self) -> dict[str, Any]:
        return {
            "galleries": list(self.galleries),
            "operating_fmr": self.operating_fmr,
            "threshold": self.threshold,
            "probe_faces": list(self.probe_faces),
            "leads": [lead.to_head() for lead in self.leads],
            "reliability_note": self.reliability_note,
            "searched_at": self.searched_at.isoformat(),
            "error": self.error,
            "age_band": self.age_band,
            "band_used": self.band_used,
            "threshold_note": self.threshold_note,
        }

    @classmethod
    def from_head(cls, head: dict[str, Any]) -> ClusterSearch:
        return _build(
            lambda: cls(
                galleries=tuple(head["galleries"]),
                operating_fmr=float(head["operating_fmr"]),
                threshold=float(head["threshold"]),
                probe_faces=tuple(head["probe_faces"]),
                leads=tuple(Lead.from_head(lead) for lead in head["leads"]),
                reliability_note=str(head["reliability_note"]),
                searched_at=datetime.fromisoformat(head["searched_at"]),
                error=head["error"],
                age_band=str(head.get("age_band", "adult")),
                band_used=str(head.get("band_used", "adult")),
                threshold_note=str(head.get("threshold_note", "")),
            )
        )


@dataclass(frozen=True)
class Cluster:
    number: int  # 1 = the largest
    face_ids: tuple[str, ...]  # best quality first
    search: ClusterSearch | None = None

    def to_head(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "face_ids": list(self.face_ids),
            "search": self.search.to_head() if self.search else None,
        }

    @classmethod
    def from_head(cls, head: dict[str, Any]) -> Cluster:
        return _build(
            lambda: cls(
                number=int(head["number"]),
                face_ids=tuple(str(f) for f in head["face_ids"]),
                search=ClusterSearch.from_head(head["search"]) if head["search"] else None,
            )
        )


@dataclass(frozen=True)
class CaseResults:
    """The case's clusters and leads as computed at ``computed_at`` over ``faces`` faces."""

    method: str
    fmr: float
    threshold: float
    computed_at: datetime
    faces: int
    clusters: tuple[Cluster, ...]
    # The age band whose threshold grouped the faces ("child" when the case may include
    # children), the band whose figures applied, and the threshold and its cost in words.
    # Results from before age bands were clustered with the adult (LFW) threshold.
    age_band: str = "adult"
    band_used: str = "adult"
    threshold_note: str = ""

    def to_head(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "fmr": self.fmr,
            "threshold": self.threshold,
            "computed_at": self.computed_at.isoformat(),
            "faces": self.faces,
            "clusters": [c.to_head() for c in self.clusters],
            "age_band": self.age_band,
            "band_used": self.band_used,
            "threshold_note": self.threshold_note,
        }

    @classmethod
    def from_head(cls, head: dict[str, Any]) -> CaseResults:
        return _build(
            lambda: cls(
                method=str(head["method"]),
                fmr=float(head["fmr"]),
                threshold=float(head["threshold"]),
                computed_at=datetime.fromisoformat(head["computed_at"]),
                faces=int(head["faces"]),
                clusters=tuple(Cluster.from_head(c) for c in head["clusters"]),
                age_band=str(head.get("age_band", "adult")),
                band_used=str(head.get("band_used", "adult")),
                threshold_note=str(head.get("threshold_note", "")),
            )
        )


def _optional_bool(value: object) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise ValueError("expected true, false or null")


def _time(value: object) -> datetime | None:
    return None if value is None else datetime.fromisoformat(str(value))


def _build(make: Callable[[], T]) -> T:
    try:
        built = make()
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptCaseError(f"a case record has an unexpected layout ({exc})") from None
    return built
