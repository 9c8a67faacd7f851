"""A case as the investigator reads it: each cluster with its best faces, the files it appears
in (with video timestamps) and its leads; the source files with what came of each.

``case_view`` is what ``edgeid case show``, the report and the web pages render; ``view_json``
is its JSON (ids, names, scores and counts; never a template or an image).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeid.runtime.cases.records import (
    CaseFace,
    CaseMeta,
    CaseResults,
    ClusterSearch,
    IngestRun,
    SourceFile,
)
from edgeid.runtime.cases.store import Case
from edgeid.runtime.gallery.service import ENROL_MIN_QUALITY
from edgeid.runtime.gallery.wording import one_in

BEST_FACES = 6  # thumbnails shown per cluster: enough to judge it, few enough to print
# A cluster's "best" faces pass the same quality gate as an enrolment photo: a blurred or
# tiny face (quality 0.00) shown as a cluster's best misleads whoever judges the cluster.
BEST_MIN_QUALITY = ENROL_MIN_QUALITY


@dataclass(frozen=True)
class Appearance:
    """Where a cluster appears: one source file, how many of its faces, and when (videos)."""

    file: SourceFile
    faces: int
    times_s: tuple[float, ...]


@dataclass(frozen=True)
class ClusterView:
    number: int
    faces: tuple[CaseFace, ...]  # best quality first
    appearances: tuple[Appearance, ...]
    search: ClusterSearch | None

    @property
    def best(self) -> tuple[CaseFace, ...]:
        """The clearest faces above the quality gate, clearest first (none if none passes)."""
        clear = [f for f in self.faces if f.quality >= BEST_MIN_QUALITY]
        return tuple(sorted(clear, key=_clearest_first)[:BEST_FACES])

    @property
    def below_gate(self) -> int:
        """How many of its faces are under the quality gate (never shown as its best)."""
        return sum(1 for f in self.faces if f.quality < BEST_MIN_QUALITY)

    @property
    def clearest(self) -> CaseFace | None:
        """Its clearest face, shown for reference only when no face passes the gate."""
        if self.best or not self.faces:
            return None
        return min(self.faces, key=_clearest_first)

    @property
    def search_note(self) -> str:
        return search_note(self.search) if self.search else ""


@dataclass(frozen=True)
class CaseView:
    meta: CaseMeta
    files: tuple[SourceFile, ...]
    faces: int
    results: CaseResults | None
    clusters: tuple[ClusterView, ...]

    @property
    def failed(self) -> tuple[SourceFile, ...]:
        return tuple(f for f in self.files if f.status == "failed")

    @property
    def partial(self) -> tuple[SourceFile, ...]:
        return tuple(f for f in self.files if f.status == "partial")

    @property
    def clustering_note(self) -> str:
        return clustering_note(self.results) if self.results else ""

    @property
    def stale(self) -> bool:
        """Faces were added after the clusters were computed (a run stopped before them)."""
        return self.results is None or self.results.faces != self.faces


def _clearest_first(face: CaseFace) -> tuple[float, float, str]:
    return (-face.quality, -face.score, face.face_id)


def case_view(case: Case) -> CaseView:
    files = case.files()
    by_record = {f.record_id: f for f in files}
    faces = {f.face_id: f for f in case.faces()}
    results = case.results()
    clusters = []
    for item in results.clusters if results else ():
        members = tuple(faces[fid] for fid in item.face_ids if fid in faces)
        clusters.append(
            ClusterView(item.number, members, _appearances(members, by_record), item.search)
        )
    return CaseView(case.meta, tuple(files), len(faces), results, tuple(clusters))


def _appearances(
    members: tuple[CaseFace, ...], files: dict[str, SourceFile]
) -> tuple[Appearance, ...]:
    grouped: dict[str, list[CaseFace]] = {}
    for face in members:
        grouped.setdefault(face.file_record, []).append(face)
    found = []
    for record, faces in grouped.items():
        if record in files:
            times = sorted({f.time_s for f in faces if f.time_s is not None})
            found.append(Appearance(files[record], len(faces), tuple(times)))
    return tuple(sorted(found, key=lambda a: (-a.faces, a.file.names[0])))


# -- thresholds in words -----------------------------------------------------------------------

# Records from before thresholds per age band hold no note; they were made with the adult
# thresholds measured on LFW (1.2 million non-mated pairs: the rates below are supported).
_BEFORE_BANDS = (
    "from before thresholds per age band: the adult threshold measured on LFW, which about "
    "{rate} pairs of different adults reach; pairs of different children reach it far more often"
)


def clustering_note(results: CaseResults) -> str:
    """The threshold the clusters were computed with, for whom, and what it costs."""
    if results.threshold_note:
        return results.threshold_note
    return f"Threshold {results.threshold:.4f}, " + _BEFORE_BANDS.format(rate=one_in(results.fmr))


def search_note(search: ClusterSearch) -> str:
    """The threshold a cluster's leads were judged with, for whom, measured on what."""
    if search.threshold_note or search.error:
        return search.threshold_note
    return f"Threshold {search.threshold:.4f}, " + _BEFORE_BANDS.format(
        rate=one_in(search.operating_fmr)
    )


# -- JSON ----------------------------------------------------------------------------------------


def run_json(run: IngestRun) -> dict[str, object]:
    return {
        "number": run.number,
        "status": run.status,
        "started_at": run.started_at.isoformat(),
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "user": run.user,
        "reason": run.reason,
        "source": run.source,
        "frame_interval_s": run.frame_interval_s,
        "galleries": list(run.galleries),
        "detector": run.detector,
        "note": run.note,
        "children": run.children,
    }


def meta_json(meta: CaseMeta) -> dict[str, object]:
    return {
        "case": meta.number,
        "case_id": meta.case_id,
        "created_at": meta.created_at.isoformat(),
        "created_by": meta.created_by,
        "model_id": meta.model_id,
        "retention_until": meta.retention_until.isoformat() if meta.retention_until else None,
        "last_run": run_json(meta.last_run) if meta.last_run else None,
        "may_include_children": meta.may_include_children,
        **vars(meta.summary),
    }


def file_json(file: SourceFile) -> dict[str, object]:
    return {
        "names": list(file.names),
        "sha256": file.sha256,
        "media": file.media,
        "status": file.status,
        "reason": file.reason,
        "faces": file.faces,
        "frames": file.frames,
        "width": file.width,
        "height": file.height,
        "duration_s": file.duration_s,
    }


def search_json(search: ClusterSearch | None) -> dict[str, object] | None:
    if search is None:
        return None
    return {
        "galleries": list(search.galleries),
        "operating_fmr": search.operating_fmr,
        "threshold": round(search.threshold, 4),
        "no_match": not search.matches,
        "probe_faces": list(search.probe_faces),
        "searched_at": search.searched_at.isoformat(),
        "error": search.error,
        "age_band": search.age_band,
        "band_used": search.band_used,
        "threshold_note": search_note(search),
        "reliability_note": search.reliability_note,
        "leads": [
            {
                "rank": lead.rank,
                "gallery": lead.gallery,
                "subject_id": lead.subject_id,
                "display_name": lead.display_name,
                "face_id": lead.face_id,
                "probe_face_id": lead.probe_face_id,
                "score": round(lead.score, 4),
                "band": lead.band,
                "above_threshold": lead.above_threshold,
            }
            for lead in search.leads
        ],
    }


def view_json(view: CaseView) -> dict[str, object]:
    results = view.results
    return {
        **meta_json(view.meta),
        "runs": [run_json(r) for r in view.meta.runs],
        "faces": view.faces,
        "clustering": (
            {
                "method": results.method,
                "fmr": results.fmr,
                "threshold": round(results.threshold, 4),
                "computed_at": results.computed_at.isoformat(),
                "faces": results.faces,
                "stale": view.stale,
                "age_band": results.age_band,
                "band_used": results.band_used,
                "threshold_note": clustering_note(results),
            }
            if results
            else None
        ),
        "clusters": [
            {
                "cluster": c.number,
                "faces": len(c.faces),
                "best_faces": [
                    {
                        "face_id": f.face_id,
                        "quality": round(f.quality, 4),
                        "quality_limiting": f.quality_limiting,
                        "box": list(f.box),
                        "time_s": f.time_s,
                    }
                    for f in c.best
                ],
                "files": [
                    {"names": list(a.file.names), "faces": a.faces, "times_s": list(a.times_s)}
                    for a in c.appearances
                ],
                "search": search_json(c.search),
            }
            for c in view.clusters
        ],
        "source_files": [file_json(f) for f in view.files],
        "failed_files": [{"names": list(f.names), "reason": f.reason} for f in view.failed],
        "partial_files": [{"names": list(f.names), "reason": f.reason} for f in view.partial],
    }
