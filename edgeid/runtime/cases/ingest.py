"""Case ingest: a folder or archive of seized media in, clustered faces and ranked leads out.

One run, in order:

1. **Read** every entry of the source (``media.py``). Each file is hashed; a hash the case
   already holds is not read again (a duplicate under another name gets its name added; the
   same name is a file finished by an earlier, stopped run). New images are decoded with the
   size and pixel limits, videos sampled every ``frame_interval_s`` seconds; every face is
   detected, quality-scored, aligned and embedded, and the file is written with its faces as
   one durable unit. A damaged, unsupported or refused file is recorded with its reason and
   the run goes on.
2. **Cluster** every face of the case (``clustering.py``) at the calibrated threshold of the
   case's age setting: a case whose faces may include children (the default for a new case)
   is clustered with the child band's threshold, stricter than the adult one (more, smaller
   clusters, but different children are not merged); a case of adults only with the adult one.
3. **Search** each cluster's best faces in the galleries the user may search (``leads.py``),
   each search audited under the case and its reason, with its age band: ``unknown`` (the
   strictest band) when the case may include children, ``adult`` otherwise.

With a farm (``--cluster``, ``farmed.py``) step 1 is split: the owning box still reads,
hashes and deduplicates every file, and still samples videos itself; a new image's bytes go to
the farm, whose nodes decode, detect, assess, align and embed it, and the image is written with
its faces here when they come back (in the order they finish). A video's sampled frames go to
the farm as pixels; their faces are written into the video's file in frame order (as locally)
and the video is finished when its last frame is back; images that come back meanwhile are
written after it (a file being written is one durable unit). Clustering, searches and the
audit log stay here. A stopped run loses only what was in flight. Without a cluster, the same
split runs on this box (``local_farm.py``): ``inference.ingest_streams`` threads analyse that
many photos or frames at once over the box's pipeline, and their results come back in the
order they were sent.

Progress is reported as counts only (with a farm, also its nodes: id, address, backend,
rate). ``stop`` (a ``threading.Event``) ends the run between files or video frames; the file
in hand is dropped whole and read again by the next run.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from threading import Event
from typing import IO, Literal

import numpy as np

from edgeid.runtime.audit.errors import AuditError
from edgeid.runtime.audit.events import AuditAction, AuditEvent, check_event
from edgeid.runtime.cases.analysis import analyse_pixels, analyse_working, failure_reason
from edgeid.runtime.cases.clustering import DEFAULT_METHOD, Method, cluster, groups
from edgeid.runtime.cases.errors import CaseModelError
from edgeid.runtime.cases.farmed import FrameJob, ImageFarm, ImageJob, ImageResult
from edgeid.runtime.cases.leads import AuditSink, search_cluster
from edgeid.runtime.cases.local_farm import LocalFarm
from edgeid.runtime.cases.media import (
    READ_ERRORS,
    MediaEntry,
    head_of,
    open_source,
    read_limited,
    sniff,
)
from edgeid.runtime.cases.records import (
    CaseFace,
    CaseResults,
    CaseSummary,
    Cluster,
    ClusterSearch,
    FileStatus,
    IngestRun,
    RunStatus,
    SourceFile,
)
from edgeid.runtime.cases.store import Case, CaseStore, FileWrite, NewFace, check_text
from edgeid.runtime.cases.video import (
    DEFAULT_FRAME_INTERVAL_S,
    VideoFrame,
    VideoSummary,
    sample_frames,
)
from edgeid.runtime.errors import BadInputError, EdgeidError, StorageWriteError
from edgeid.runtime.gallery.service import AgeBand, GalleryService
from edgeid.runtime.gallery.wording import cluster_note
from edgeid.runtime.inference.image_decode import MAX_IMAGE_BYTES, decode_working
from edgeid.runtime.vault.crypto import Clock, utc_now

logger = logging.getLogger(__name__)

# Faces are clustered at the calibrated threshold of this false-match rate: on LFW dev it
# gave average linkage its best pairwise and BCubed F1 (benchmarks/cluster_bench.py). A
# case of 10,000 faces holds 5e7 pairs, so a laxer rate would link thousands of strangers.
CLUSTER_FMR = 1e-4
# The age band whose threshold clusters a case, by its "faces may include children" setting:
# at the adult FMR 1e-4 threshold different children were merged (pairwise precision 0.375 on
# children against 0.998 on adults, measured outside this product; see the calibration file).
CLUSTER_BANDS: dict[bool, AgeBand] = {True: "child", False: "adult"}
# The age band a cluster's leads are judged with: nobody states a cluster's age, so a case
# that may hold children takes the strictest band ("unknown").
LEAD_BANDS: dict[bool, AgeBand] = {True: "unknown", False: "adult"}
HASH_CHUNK_BYTES = 1 << 20  # videos are hashed in 1 MiB reads: bounded memory
VIDEO_FLUSH_FACES = 200  # a video's faces are written in batches of this many (bounded memory)

Phase = Literal["listing", "reading", "clustering", "searching", "done", "stopped"]


@dataclass
class IngestProgress:
    """Counts only: no names, no faces. Sent to the progress callback as the run goes."""

    phase: Phase = "listing"
    files_total: int = 0
    files_seen: int = 0
    files_new: int = 0  # read and analysed by this run
    files_duplicate: int = 0  # same content as a file already in the case: name added
    files_already_done: int = 0  # finished by an earlier run (resume)
    files_failed: int = 0  # damaged, unsupported or refused, recorded by this run
    faces_new: int = 0
    video_frames: int = 0
    clusters: int = 0
    clusters_searched: int = 0
    # With a farm: per node its id, address, backend, images and frames done and rate (no
    # names).
    nodes: list[dict[str, object]] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {**vars(self), "nodes": [dict(n) for n in self.nodes]}


ProgressCallback = Callable[[IngestProgress], None]


@dataclass(frozen=True)
class Requester:
    """Who runs the ingest, as the audit log records them."""

    user: str
    role: str = "investigator"


@dataclass(frozen=True)
class IngestRequest:
    source: Path
    case_number: str
    reason: str
    requester: Requester
    galleries: tuple[str, ...] | None = None  # None: every gallery on the box
    frame_interval_s: float = DEFAULT_FRAME_INTERVAL_S
    retention_until: date | None = None  # for a new case, or to change an existing one's
    # What the run records as its source when ``source`` is a temporary copy (a web upload).
    source_label: str | None = None
    # "Faces may include children": None keeps the case's setting (on for a new case).
    children: bool | None = None


@dataclass(frozen=True)
class IngestOutcome:
    case: Case
    run: IngestRun
    progress: IngestProgress
    results: CaseResults | None
    failed: tuple[SourceFile, ...] = field(default=())  # every failed file of the case


class CaseIngest:
    """Runs ingests into the cases of ``store`` with the gallery service's pipeline."""

    def __init__(
        self,
        store: CaseStore,
        service: GalleryService,
        audit: AuditSink,
        *,
        detector: str,
        clock: Clock = utc_now,
        method: Method = DEFAULT_METHOD,
    ) -> None:
        self.store = store
        self.service = service
        self.audit = audit
        self.detector = detector
        self._clock = clock
        self.method = method

    def ingest(
        self,
        request: IngestRequest,
        *,
        progress: ProgressCallback | None = None,
        stop: Event | None = None,
        farm: ImageFarm | None = None,
    ) -> IngestOutcome:
        """``farm``: hand the images' analysis to a cluster (see the module docstring).
        Without one, ``inference.ingest_streams`` over 1 analyses that many photos or frames
        at once on this box (``local_farm.py``); 1 analyses one at a time."""
        limits = self.service.activity.limits
        if farm is not None or limits.ingest_streams <= 1:
            return self._ingest(request, progress, stop, farm)
        local = LocalFarm.on_this_box(self.service.pipeline, limits)
        try:
            return self._ingest(request, progress, stop, local)
        finally:
            local.close()

    def _ingest(
        self,
        request: IngestRequest,
        progress: ProgressCallback | None,
        stop: Event | None,
        farm: ImageFarm | None,
    ) -> IngestOutcome:
        reason = check_text(request.reason, "reason for this ingest (--reason)")
        if not request.frame_interval_s > 0:
            raise BadInputError("the frame interval must be a positive number of seconds")
        galleries = self._galleries(request.galleries)
        if galleries:
            _check_auditable(request, reason, galleries)
        stop = stop or Event()
        counts = IngestProgress()
        told = progress or (lambda _: None)
        farmed = _Farmed(farm) if farm is not None else None
        if farm is not None:
            farm.forget()

        def report(counts: IngestProgress) -> None:
            if farmed is not None:
                counts.nodes = farmed.farm.nodes()
            told(counts)

        with open_source(request.source) as source:
            case = self._case(request)
            with case.ingest_exclusively():
                children = self._children(case, request)
                previous = case.meta.last_run
                run = IngestRun(
                    number=(previous.number + 1) if previous else 1,
                    started_at=self._clock(),
                    user=request.requester.user,
                    reason=reason,
                    source=request.source_label or str(request.source),
                    frame_interval_s=request.frame_interval_s,
                    galleries=galleries,
                    detector=self.detector,
                    children=children,
                )
                meta = replace(case.meta.with_run(run), may_include_children=children)
                if request.retention_until is not None:
                    meta = replace(meta, retention_until=request.retention_until)
                case.save_meta(meta)
                try:
                    results = self._run(
                        case, run, source.entries, request, counts, report, stop, farmed
                    )
                except BaseException as exc:
                    stopped = isinstance(exc, KeyboardInterrupt)
                    note = "interrupted" if stopped else f"failed: {type(exc).__name__}"
                    self._finish(case, run, "stopped" if stopped else "failed", note)
                    raise
                if results is None:
                    counts.phase = "stopped"
                    run = self._finish(case, run, "stopped", "stopped on request; run again")
                else:
                    counts.phase = "done"
                    run = self._finish(case, run, "complete", "")
                report(counts)
        failed = tuple(f for f in case.files() if f.status == "failed")
        return IngestOutcome(case, run, counts, results or case.results(), failed)

    # -- set-up ------------------------------------------------------------------------------

    def _galleries(self, asked: tuple[str, ...] | None) -> tuple[str, ...]:
        known = [info.name for info in self.service.list_galleries()]
        if asked is None:
            return tuple(known)
        missing = [name for name in asked if name not in known]
        if missing:
            raise BadInputError(
                f"no gallery named {missing[0]!r}; list them with edgeid gallery list"
            )
        return tuple(dict.fromkeys(asked))

    def _case(self, request: IngestRequest) -> Case:
        case = self.store.open_or_create(
            request.case_number,
            created_by=request.requester.user,
            model_id=self.service.model_id,
            retention_until=request.retention_until,
            may_include_children=request.children is not False,
        )
        if case.meta.model_id != self.service.model_id:
            raise CaseModelError(
                f"case {case.meta.number!r} holds faces embedded with {case.meta.model_id}; "
                f"this box embeds with {self.service.model_id}: start a new case"
            )
        return case

    @staticmethod
    def _children(case: Case, request: IngestRequest) -> bool:
        """The case's "faces may include children" setting for this run."""
        if request.children is None:
            return case.meta.may_include_children
        return request.children

    def _finish(self, case: Case, run: IngestRun, status: RunStatus, note: str) -> IngestRun:
        done = replace(run, status=status, finished_at=self._clock(), note=note)
        try:
            case.save_meta(replace(case.meta.with_run(done), summary=_summary(case)))
        except (EdgeidError, OSError) as exc:
            logger.warning("could not record the end of ingest run %d: %s", run.number, exc)
        return done

    # -- the run -----------------------------------------------------------------------------

    def _run(
        self,
        case: Case,
        run: IngestRun,
        entries: Sequence[MediaEntry],
        request: IngestRequest,
        counts: IngestProgress,
        report: ProgressCallback,
        stop: Event,
        farmed: _Farmed | None = None,
    ) -> CaseResults | None:
        counts.phase, counts.files_total = "reading", len(entries)
        report(counts)
        for entry in entries:
            if stop.is_set():
                return None
            try:
                sent = self._entry(
                    case, run, entry, request.frame_interval_s, counts, report, stop, farmed
                )
            except _Stopped:
                return None
            if not sent:  # an image sent to the farm is seen when its faces are written
                counts.files_seen += 1
            report(counts)
        if farmed is not None:
            for result in farmed.farm.drain():
                if stop.is_set():
                    return None
                self._farmed_results(case, run, farmed, [result], counts)
                report(counts)
        if stop.is_set():
            return None
        counts.phase = "clustering"
        report(counts)
        results = self._cluster(case, bool(run.children))
        case.save_results(results)
        counts.clusters = len(results.clusters)
        counts.phase = "searching"
        report(counts)
        return self._search(case, run, results, request, counts, report, stop)

    def _entry(
        self,
        case: Case,
        run: IngestRun,
        entry: MediaEntry,
        interval_s: float,
        counts: IngestProgress,
        report: ProgressCallback,
        stop: Event,
        farmed: _Farmed | None = None,
    ) -> bool:
        """Reads one entry; True when it went to the farm (written when its faces return)."""
        if entry.refused is not None:
            self._refuse(case, run, entry.name, entry.refused, counts)
            return False
        if case.is_refused(entry.name):
            counts.files_already_done += 1
            return False
        try:
            with entry.open() as stream:
                kind, why = sniff(head_of(stream), entry.name)
                if kind == "image" and farmed is not None:
                    return self._image_farmed(case, run, entry.name, stream, counts, farmed)
                if kind == "image":
                    self._image(case, run, entry.name, stream, counts)
                elif kind == "video":
                    self._video(
                        case, run, entry.name, stream, interval_s, counts, report, stop, farmed
                    )
                else:
                    self._refuse(case, run, entry.name, why or "unsupported file", counts)
        except _Stopped:
            raise
        except StorageWriteError:
            raise  # the disk, not the file: the run cannot go on
        except BadInputError as exc:
            self._refuse(case, run, entry.name, failure_reason(exc), counts)
        except OSError as exc:
            self._refuse(case, run, entry.name, f"cannot be read ({exc.strerror or exc})", counts)
        except READ_ERRORS:
            reason = (
                "this file is damaged inside the archive (a bad checksum or a cut-off stream) "
                "and was not read; copy the archive again from the original media"
            )
            self._refuse(case, run, entry.name, reason, counts)
        return False

    def _refuse(
        self, case: Case, run: IngestRun, name: str, reason: str, counts: IngestProgress
    ) -> None:
        if case.is_refused(name):
            counts.files_already_done += 1
            return
        case.add_file(SourceFile("", None, (name,), "other", "failed", reason, 0, run.number))
        counts.files_failed += 1

    def _known(self, case: Case, sha256: str, name: str, counts: IngestProgress) -> bool:
        """True when the content is already in the case (its name is recorded if new)."""
        known = case.file_by_sha(sha256)
        if known is None:
            return False
        if name in known.names:
            counts.files_already_done += 1
        else:
            case.add_name(sha256, name)
            counts.files_duplicate += 1
        return True

    def _image(
        self, case: Case, run: IngestRun, name: str, stream: IO[bytes], counts: IngestProgress
    ) -> None:
        data = read_limited(stream, MAX_IMAGE_BYTES)
        sha256 = hashlib.sha256(data).hexdigest()
        if self._known(case, sha256, name, counts):
            return
        base = SourceFile("", sha256, (name,), "image", "done", None, 0, run.number)
        limits = self.service.activity.limits
        try:
            work = decode_working(
                data, name="this image", max_working_pixels=limits.max_working_pixels
            )
        except BadInputError as exc:
            _write_failed(case, base, failure_reason(exc), counts)
            return
        faces, skipped = analyse_working(self.service.pipeline, work, max_faces=limits.max_faces)
        width, height = work.full_size
        del work  # the full-resolution pixels go before the next file is read
        sized = replace(base, width=int(width), height=int(height))
        _write_analysed(case, sized, faces, skipped, counts)

    def _image_farmed(
        self,
        case: Case,
        run: IngestRun,
        name: str,
        stream: IO[bytes],
        counts: IngestProgress,
        farmed: _Farmed,
    ) -> bool:
        """As ``_image`` up to the analysis, which the farm does; True when sent."""
        data = read_limited(stream, MAX_IMAGE_BYTES)
        sha256 = hashlib.sha256(data).hexdigest()
        if sha256 in farmed.by_sha:  # the same content is on its way: a duplicate when back
            farmed.by_sha[sha256].append(name)
            return True
        if self._known(case, sha256, name, counts):
            return False
        key = farmed.new_key()
        farmed.waiting[key] = sha256
        farmed.by_sha[sha256] = [name]
        self._farmed_results(case, run, farmed, farmed.farm.submit(ImageJob(key, data)), counts)
        return True

    def _farmed_results(
        self,
        case: Case,
        run: IngestRun,
        farmed: _Farmed,
        results: list[ImageResult],
        counts: IngestProgress,
    ) -> None:
        """Results from the farm: a frame of the video being written goes into it; an image
        waits while a video is being written (its file is one unit), else is written."""
        for result in results:
            video = farmed.video
            if video is not None and result.key in video.frames:
                video.back(result, counts)
            elif video is not None:
                farmed.held.append(result)
            else:
                self._farmed_image(case, run, farmed, result, counts)

    def _farmed_image(
        self,
        case: Case,
        run: IngestRun,
        farmed: _Farmed,
        result: ImageResult,
        counts: IngestProgress,
    ) -> None:
        """Writes an image whose faces came back as ``_image`` writes one analysed here."""
        sha256 = farmed.waiting.pop(result.key)
        name, *later = farmed.by_sha.pop(sha256)
        base = SourceFile("", sha256, (name,), "image", "done", None, 0, run.number)
        if result.failed is not None:
            _write_failed(case, base, result.failed, counts)
        else:
            sized = replace(base, width=result.width, height=result.height)
            _write_analysed(case, sized, result.faces, result.skipped, counts)
        counts.files_seen += 1
        for other in later:
            self._known(case, sha256, other, counts)
            counts.files_seen += 1

    def _video(
        self,
        case: Case,
        run: IngestRun,
        name: str,
        stream: IO[bytes],
        interval_s: float,
        counts: IngestProgress,
        report: ProgressCallback,
        stop: Event,
        farmed: _Farmed | None = None,
    ) -> None:
        sha256 = _hash_stream(stream)
        if self._known(case, sha256, name, counts):
            return
        stream.seek(0)
        summary = VideoSummary()
        base = SourceFile("", sha256, (name,), "video", "done", None, 0, run.number)
        with case.writing(base) as session:
            if farmed is None:
                problem = self._frames(session, stream, interval_s, summary, counts, report, stop)
            else:
                problem = self._frames_farmed(
                    case, run, session, stream, interval_s, summary, counts, report, stop, farmed
                )
            status: FileStatus = "done"
            if problem is not None:
                status = "partial" if summary.samples else "failed"
            elif summary.truncated:
                status, problem = "partial", f"only the first {summary.samples} frames sampled"
            session.file = replace(
                session.file,
                status=status,
                reason=problem,
                width=summary.width,
                height=summary.height,
                frames=summary.samples,
                duration_s=summary.duration_s,
            )
        if status == "failed":
            counts.files_failed += 1
        else:
            counts.files_new += 1
        if farmed is not None:  # the images that came back while the video was written
            held, farmed.held = farmed.held, []
            self._farmed_results(case, run, farmed, held, counts)

    def _frames(
        self,
        session: FileWrite,
        stream: IO[bytes],
        interval_s: float,
        summary: VideoSummary,
        counts: IngestProgress,
        report: ProgressCallback,
        stop: Event,
    ) -> str | None:
        """Sample, analyse and write a video's faces; the problem that cut it short, if any."""
        faces = _FaceBuffer(session)

        def analyse(frame: VideoFrame) -> None:
            found = analyse_pixels(
                self.service.pipeline, frame.pixels, frame=frame.index, time_s=frame.time_s
            )
            counts.video_frames += 1
            faces.add(found, counts)
            report(counts)

        problem = _each_frame(stream, interval_s, summary, stop, analyse)
        faces.flush(counts)
        return problem

    def _frames_farmed(
        self,
        case: Case,
        run: IngestRun,
        session: FileWrite,
        stream: IO[bytes],
        interval_s: float,
        summary: VideoSummary,
        counts: IngestProgress,
        report: ProgressCallback,
        stop: Event,
        farmed: _Farmed,
    ) -> str | None:
        """As ``_frames``, with each sampled frame's analysis done by the farm; returns once
        every frame sent is back and written."""
        video = _FarmedVideo(_FaceBuffer(session))
        farmed.video = video

        def send(frame: VideoFrame) -> None:
            key = farmed.new_key()
            video.frames[key] = (frame.index, frame.time_s)
            job = FrameJob(key, frame.pixels)
            self._farmed_results(case, run, farmed, farmed.farm.submit(job), counts)
            report(counts)

        try:
            problem = _each_frame(stream, interval_s, summary, stop, send)
            self._farmed_results(case, run, farmed, farmed.farm.drain(), counts)
            if video.frames:  # the farm's drain returns every result or raises
                raise EdgeidError(f"{len(video.frames)} video frames did not come back")
            video.faces.flush(counts)
        finally:
            farmed.video = None
        return problem

    # -- clusters and leads ------------------------------------------------------------------

    def _cluster(self, case: Case, children: bool) -> CaseResults:
        faces = case.faces()
        applied = self.service.calibration.for_age(CLUSTER_BANDS[children])
        threshold = applied.threshold(CLUSTER_FMR)
        clusters: list[Cluster] = []
        if faces:
            vectors = np.stack([f.embedding for f in faces])
            labels = cluster(vectors, threshold, self.method)
            for number, members in enumerate(groups(labels), start=1):
                chosen = sorted(
                    (faces[i] for i in members), key=lambda f: (-f.quality, -f.score, f.face_id)
                )
                clusters.append(Cluster(number, tuple(f.face_id for f in chosen)))
        return CaseResults(
            method=self.method,
            fmr=CLUSTER_FMR,
            threshold=threshold,
            computed_at=self._clock(),
            faces=len(faces),
            clusters=tuple(clusters),
            age_band=applied.stated,
            band_used=applied.band,
            threshold_note=cluster_note(applied, CLUSTER_FMR, children=children),
        )

    def _search(
        self,
        case: Case,
        run: IngestRun,
        results: CaseResults,
        request: IngestRequest,
        counts: IngestProgress,
        report: ProgressCallback,
        stop: Event,
    ) -> CaseResults | None:
        if not run.galleries:
            return results
        faces = {f.face_id: f for f in case.faces()}
        searched: list[Cluster] = []
        try:
            for item in results.clusters:
                if stop.is_set():
                    return None
                members = [faces[fid] for fid in item.face_ids]
                files = len({f.file_record for f in members})
                detail = (
                    f"case ingest run {run.number}: cluster {item.number} of "
                    f"{len(results.clusters)}, {len(members)} faces in {files} files"
                )
                search = self._search_one(members, run, request, detail)
                searched.append(replace(item, search=search))
                counts.clusters_searched += 1
                report(counts)
        finally:
            done = {c.number: c for c in searched}
            merged = tuple(done.get(c.number, c) for c in results.clusters)
            results = replace(results, clusters=merged)
            case.save_results(results)
        return results

    def _search_one(
        self,
        members: list[CaseFace],
        run: IngestRun,
        request: IngestRequest,
        detail: str,
    ) -> ClusterSearch:
        try:
            return search_cluster(
                self.service,
                members,
                run.galleries,
                audit=self.audit,
                actor=request.requester,
                case_number=request.case_number.strip(),
                reason=run.reason,
                detail=detail,
                now=self._clock(),
                age_band=LEAD_BANDS[bool(run.children)],
            )
        except AuditError:
            raise  # a search that cannot be accounted for stops the run
        except BadInputError as exc:
            # e.g. a gallery holding another model's templates: this cluster has no leads
            # and says why.
            return ClusterSearch(
                galleries=run.galleries,
                operating_fmr=0.0,
                threshold=0.0,
                probe_faces=(),
                leads=(),
                reliability_note="",
                searched_at=self._clock(),
                error=str(exc),
                age_band=LEAD_BANDS[bool(run.children)],
                band_used="",
            )


@dataclass
class _Farmed:
    """A run's images in the farm: key -> content hash, hash -> its names (the first is the
    file sent; the others are duplicates recorded when it is written)."""

    farm: ImageFarm
    next_key: int = 0
    waiting: dict[int, str] = field(default_factory=dict)
    by_sha: dict[str, list[str]] = field(default_factory=dict)
    video: _FarmedVideo | None = None  # the video being written, if any
    held: list[ImageResult] = field(default_factory=list)  # images back while it is written

    def new_key(self) -> int:
        self.next_key += 1
        return self.next_key - 1


@dataclass
class _FaceBuffer:
    """A video's faces on their way into its file write, VIDEO_FLUSH_FACES at a time."""

    session: FileWrite
    pending: list[NewFace] = field(default_factory=list)

    def add(self, faces: Sequence[NewFace], counts: IngestProgress) -> None:
        self.pending.extend(faces)
        if len(self.pending) >= VIDEO_FLUSH_FACES:
            self.flush(counts)

    def flush(self, counts: IngestProgress) -> None:
        if self.pending:
            self.session.add_faces(self.pending)
            counts.faces_new += len(self.pending)
            self.pending = []


@dataclass
class _FarmedVideo:
    """A video's frames in the farm: key -> (sample number, time). Faces are written in
    sample order, as the local ingest writes them, whatever order the frames come back in."""

    faces: _FaceBuffer
    frames: dict[int, tuple[int, float]] = field(default_factory=dict)
    done: dict[int, list[NewFace]] = field(default_factory=dict)  # back, not yet in order
    next_index: int = 0

    def back(self, result: ImageResult, counts: IngestProgress) -> None:
        index, time_s = self.frames.pop(result.key)
        self.done[index] = [replace(f, frame=index, time_s=time_s) for f in result.faces]
        counts.video_frames += 1
        while self.next_index in self.done:
            self.faces.add(self.done.pop(self.next_index), counts)
            self.next_index += 1


class _Stopped(Exception):
    """The stop event was set while a file was in hand; it is dropped whole."""


def _each_frame(
    stream: IO[bytes],
    interval_s: float,
    summary: VideoSummary,
    stop: Event,
    handle: Callable[[VideoFrame], None],
) -> str | None:
    """Hand each sampled frame of a video to ``handle`` until the stop event is set (raises
    ``_Stopped``); the problem that cut the video short, if it is damaged part way or refused
    (the frames sampled before it are kept)."""
    try:
        for frame in sample_frames(stream, interval_s, summary=summary):
            if stop.is_set():
                raise _Stopped()
            handle(frame)
    except BadInputError as exc:
        return failure_reason(exc)
    return None


def _check_auditable(request: IngestRequest, reason: str, galleries: Sequence[str]) -> None:
    """Refuse, before any file is read, what the audit log would refuse at the first search."""
    check_event(
        AuditEvent(
            user=request.requester.user,
            role=request.requester.role,
            action=AuditAction.SEARCH,
            case=request.case_number.strip(),
            reason=reason,
            gallery="check",
            probe_sha256="0" * 64,
        )
    )


def _hash_stream(stream: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(HASH_CHUNK_BYTES):
        digest.update(chunk)
    return digest.hexdigest()


def _write_analysed(
    case: Case, file: SourceFile, faces: Sequence[NewFace], skipped: int, counts: IngestProgress
) -> None:
    """Records an analysed image, wherever it was analysed (here or on a cluster node)."""
    note = f"{skipped} more faces found but not analysed (the least confident)" if skipped else None
    case.add_file(replace(file, reason=note), faces)
    counts.files_new += 1
    counts.faces_new += len(faces)


def _write_failed(case: Case, file: SourceFile, reason: str, counts: IngestProgress) -> None:
    case.add_file(replace(file, status="failed", reason=reason))
    counts.files_failed += 1


def _summary(case: Case) -> CaseSummary:
    files = case.files()
    results = case.results()
    return CaseSummary(
        files=len(files),
        failed_files=sum(1 for f in files if f.status == "failed"),
        faces=len(case.faces()),
        clusters=len(results.clusters) if results else 0,
        leads_above_threshold=(
            sum(1 for c in results.clusters if c.search and c.search.matches) if results else 0
        ),
    )
