"""Galleries as the investigator uses them: photos in, banded candidates out.

``GalleryService`` joins the encrypted store, one search index per gallery and the face
pipeline. It owns the store's process lock, so one process (``edgeid serve``, or one CLI
command while the service is stopped) works on the galleries at a time.

Indexes are kept in memory and persisted sealed (``index-<model>.sealed`` in the gallery's
folder) on ``flush()`` and ``close()``. The store is the source of truth: on open, an index is
reconciled with the store's live faces (faces enrolled after the last flush are added, faces
deleted since are removed), and one that fails authentication (e.g. after a compaction erased
its key) or is missing is rebuilt from the store.

Because the store is the source of truth, the index file is a cache: a change is acknowledged
once the store holds it, and an index that cannot be written (a full disk) is only a warning,
kept in memory and written later, or rebuilt at the next open. So an enrolment is never reported
failed after it became durable, and a search (a read) never fails for want of disk space.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from pathlib import Path
from types import TracebackType

import numpy as np
from PIL import Image

from edgeid.runtime.config.settings import Settings, load_settings
from edgeid.runtime.errors import BadInputError, EdgeidError, StorageWriteError
from edgeid.runtime.gallery.age_bands import AGE_BANDS as AGE_BANDS
from edgeid.runtime.gallery.age_bands import AgeBand as AgeBand
from edgeid.runtime.gallery.age_bands import MeasuredBand
from edgeid.runtime.gallery.errors import DecryptionError, GalleryNotFoundError
from edgeid.runtime.gallery.index import MAX_K as MAX_INDEX_K
from edgeid.runtime.gallery.index import GalleryIndex, load_or_rebuild
from edgeid.runtime.gallery.records import (
    Face,
    GalleryInfo,
    NewFace,
    NewSubject,
    Subject,
    check_age,
)
from edgeid.runtime.gallery.store import DamagedGallery, Gallery, GalleryStore, RepairReport
from edgeid.runtime.gallery.thresholds import (
    DEFAULT_OPERATING_FMR,
    BandCalibration,
    Calibration,
    CalibrationError,
    ScoreBand,
    model_calibration,
)
from edgeid.runtime.gallery.wording import (
    StrengthLine,
    calibration_json,
    reliability_note,
    strength_lines,
    threshold_note,
    threshold_sentence,
    verification_rate,
)
from edgeid.runtime.inference.activity import InferenceActivity, InferenceLimits
from edgeid.runtime.inference.image_decode import declared_pixels, decode_image, decode_working
from edgeid.runtime.inference.model_home import models_dir
from edgeid.runtime.inference.pipeline import EMBEDDER_MODEL, FacePipeline
from edgeid.runtime.inference.types import FloatArray, RGBImage
from edgeid.runtime.storage.durable import FileWriter, shred_and_unlink, write_file_atomically
from edgeid.runtime.vault.key_choice import provider_for

logger = logging.getLogger(__name__)

# Enrolment refuses faces below this overall quality (geometric mean of size, sharpness and
# pose, edgeid/runtime/inference/quality.py): a poor template raises every later search's error
# rates for that subject. Probes are never refused for quality; it is shown beside them.
ENROL_MIN_QUALITY = 0.5
# A quality component scoring below this is named where faces are shown ("limited by: pose"):
# above it, the component costs recognition little and naming it only alarms.
COMPONENT_LIMITS = 0.8
THUMBNAIL_JPEG_QUALITY = 92
INDEX_FILE = "index-{model}.sealed"
DEFAULT_TOP_K = 10
MAX_TOP_K = 100
# Enrolment's duplicate check uses the adult thresholds, the most lenient the shipped model
# holds: a duplicate missed is worse than one the operator checks and enrols anyway.
DUPLICATE_CHECK_BAND: AgeBand = "adult"


class QualityGateError(BadInputError):
    """The face is too poor to enrol (small, blurred or turned away)."""


class DuplicateSubjectError(BadInputError):
    """The face already matches another enrolled subject above the operating threshold."""

    def __init__(self, message: str, candidates: tuple[Candidate, ...]) -> None:
        super().__init__(message)
        self.candidates = candidates


class ModelChangedError(BadInputError):
    """The gallery's templates come from another model than the one this box embeds with."""


# -- what callers get ------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeFace:
    index: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels
    score: float
    quality: float
    quality_limiting: str  # the weakest of size, sharpness, pose
    enrollable: bool  # passes the enrolment quality gate
    # Each component's score (size, sharpness, pose), where the pipeline assessed them.
    quality_components: tuple[tuple[str, float], ...] = ()

    @property
    def limited_by(self) -> tuple[tuple[str, float], ...]:
        """The components that hold this face back, worst first: those scoring below
        ``COMPONENT_LIMITS``, or the weakest one of a face the enrolment gate refuses. Empty
        for a good face, so no "weakest: size" is shown beside a 0.96-quality face."""
        low = sorted((c for c in self.quality_components if c[1] < COMPONENT_LIMITS), key=_score)
        if not low and not self.enrollable:
            weakest = sorted(self.quality_components, key=_score)[:1]
            return tuple(weakest) or ((self.quality_limiting, self.quality),)
        return tuple(low)


def _score(component: tuple[str, float]) -> float:
    return component[1]


@dataclass(frozen=True, eq=False)
class Probe:
    """An analysed photo: its faces, their templates and aligned chips (kept in memory only)."""

    image_sha256: str
    width: int
    height: int
    faces: tuple[ProbeFace, ...]
    model_id: str
    _templates: FloatArray = field(repr=False)
    _chips: tuple[RGBImage, ...] = field(repr=False)
    # Faces found beyond the per-photo cap (the least confident), counted but not analysed.
    faces_not_analysed: int = 0

    def face(self, index: int) -> ProbeFace:
        if not 0 <= index < len(self.faces):
            raise BadInputError(
                f"the photo has {len(self.faces)} face(s); face {index} does not exist"
            )
        return self.faces[index]

    def template(self, index: int) -> FloatArray:
        self.face(index)
        row: FloatArray = self._templates[index]
        return row

    def left_to_right(self) -> tuple[ProbeFace, ...]:
        """The faces in reading order (by the centre of their box, left to right; top to
        bottom on a tie): how a person numbers the faces of a group photo. ``index`` stays
        the detection order that every other call takes."""
        return tuple(sorted(self.faces, key=lambda f: (f.box[0] + f.box[2], f.box[1], f.index)))

    def chip_jpeg(self, index: int) -> bytes:
        """The aligned face as the embedder saw it, for side-by-side comparison."""
        self.face(index)
        return _jpeg(self._chips[index])


@dataclass(frozen=True)
class Candidate:
    """A subject, ranked by its best-matching enrolled face: ``face_id`` is that photo."""

    rank: int  # 1-based, by score over every searched gallery
    gallery: str
    subject_id: str
    display_name: str
    face_id: str  # the subject's photo that matched best
    score: float  # cosine similarity of the templates
    band: ScoreBand
    above_threshold: bool
    face_age_at_capture: int | None = None  # the matched photo's age at capture, if given
    photo_number: int = 1  # which of the subject's photos matched (1-based, enrolment order)
    photos: int = 1  # how many photos the subject has

    def to_json(self) -> dict[str, object]:
        return {
            "rank": self.rank,
            "gallery": self.gallery,
            "subject_id": self.subject_id,
            "display_name": self.display_name,
            "face_id": self.face_id,
            "score": round(self.score, 4),
            "band": self.band.value,
            "above_threshold": self.above_threshold,
            "matched_photo": {
                "face_id": self.face_id,
                "number": self.photo_number,
                "of": self.photos,
                "age_at_capture": self.face_age_at_capture,
            },
        }


@dataclass(frozen=True)
class Reliability:
    """How far this model's answers can be trusted for a probe of this apparent age."""

    age_band: AgeBand  # as stated
    band_used: MeasuredBand  # whose thresholds apply (the strictest one for "unknown")
    verification_rate: float | None  # same person across years, accepted; None = not measured
    note: str

    def to_json(self) -> dict[str, object]:
        return {
            "age_band": self.age_band,
            "band_used": self.band_used,
            "verification_rate": self.verification_rate,
            "note": self.note,
        }


def reliability_of(calibration: Calibration, applied: BandCalibration) -> Reliability:
    return Reliability(
        applied.stated,
        applied.band,
        verification_rate(applied),
        reliability_note(calibration, applied),
    )


@dataclass(frozen=True)
class SearchResult:
    model_id: str
    galleries: tuple[str, ...]
    operating_fmr: float  # the calibrated FMR the threshold was set for in its age band
    threshold: float
    candidates: tuple[Candidate, ...]  # the top k in rank order, above threshold or not
    reliability: Reliability
    searched_faces: int
    calibration: BandCalibration  # the stated age band and the thresholds applied to it

    @property
    def age_band(self) -> AgeBand:
        return self.calibration.stated

    @property
    def matches(self) -> tuple[Candidate, ...]:
        return tuple(c for c in self.candidates if c.above_threshold)

    @property
    def no_match(self) -> bool:
        """The open-set answer: nobody scored above the calibrated threshold."""
        return not self.matches

    @property
    def fmr_supported(self) -> bool:
        """Whether the age band's measurement has pairs enough to state ``operating_fmr``."""
        return self.calibration.supports(self.operating_fmr)

    @property
    def threshold_note(self) -> str:
        return threshold_note(self.calibration, self.operating_fmr)

    @property
    def threshold_sentence(self) -> str:
        """The threshold note without why another band applies (the reliability note says)."""
        return threshold_sentence(self.calibration, self.operating_fmr)

    @property
    def strength(self) -> tuple[StrengthLine, ...]:
        return strength_lines(self.calibration)

    def rescored(self, age_band: AgeBand, calibration: Calibration) -> SearchResult:
        """The same candidates and scores judged for another stated age band: threshold,
        score bands, "no match" and wording from that band. Nothing is searched again; the
        caller records the re-score like a search, since it reveals a new answer."""
        if calibration.model_id != self.model_id:
            raise CalibrationError(
                f"a search by {self.model_id} cannot be re-scored with the calibration of "
                f"{calibration.model_id}"
            )
        applied = calibration.for_age(age_band)
        threshold = applied.threshold(self.operating_fmr)
        candidates = tuple(
            replace(c, band=applied.score_band(c.score), above_threshold=c.score >= threshold)
            for c in self.candidates
        )
        return replace(
            self,
            threshold=threshold,
            candidates=candidates,
            reliability=reliability_of(calibration, applied),
            calibration=applied,
        )

    def to_json(self) -> dict[str, object]:
        return {
            "model_id": self.model_id,
            "galleries": list(self.galleries),
            "age_band": self.age_band,
            "operating_fmr": self.operating_fmr,
            "threshold": round(self.threshold, 4),
            "no_match": self.no_match,
            "searched_faces": self.searched_faces,
            "calibration": calibration_json(self.calibration, self.operating_fmr),
            "reliability": self.reliability.to_json(),
            "candidates": [c.to_json() for c in self.candidates],
        }


@dataclass(frozen=True)
class Enrolled:
    gallery: str
    subject: Subject
    faces: tuple[Face, ...]


@dataclass(frozen=True)
class VerifyResult:
    score: float
    band: ScoreBand
    same_person: bool  # at the operating false-match rate of the age band
    operating_fmr: float
    threshold: float
    calibration: BandCalibration

    @property
    def age_band(self) -> AgeBand:
        return self.calibration.stated

    @property
    def threshold_note(self) -> str:
        return threshold_note(self.calibration, self.operating_fmr)

    def to_json(self) -> dict[str, object]:
        return {
            "score": round(self.score, 4),
            "band": self.band.value,
            "same_person": self.same_person,
            "age_band": self.age_band,
            "operating_fmr": self.operating_fmr,
            "threshold": round(self.threshold, 4),
            "calibration": calibration_json(self.calibration, self.operating_fmr),
        }


# -- the service -----------------------------------------------------------------------------


class GalleryService:
    """Every gallery of the box, searchable; see the module docstring."""

    def __init__(
        self,
        store: GalleryStore,
        pipeline: FacePipeline,
        calibration: Calibration,
        activity: InferenceActivity | None = None,
        *,
        writer: FileWriter | None = None,
    ) -> None:
        self.store = store
        self._writer = writer  # for the index files (tests inject a full disk)
        self.pipeline = pipeline
        self.activity = activity or InferenceActivity()
        self.model_id = calibration.model_id
        self.calibration = calibration
        self._indexes: dict[str, GalleryIndex] = {}  # by gallery id
        self._dirty: set[str] = set()
        self._lock = threading.RLock()

    @classmethod
    def open(
        cls,
        home: Path,
        settings: Settings | None = None,
        *,
        pipeline: FacePipeline | None = None,
        passphrase: str | None = None,
        activity: InferenceActivity | None = None,
    ) -> GalleryService:
        settings = settings or load_settings(home)
        if pipeline is None:
            pipeline = FacePipeline.load(
                models_dir(home),
                settings.inference.detector,
                threads=settings.inference.threads,
                backend=settings.inference.backend,
                spinning=settings.inference.spinning,
                precision=settings.inference.precision,
            )
        store = GalleryStore(home, provider_for(home, settings.keys, passphrase=passphrase))
        try:
            activity = activity or InferenceActivity(limits=InferenceLimits.of(settings.inference))
            model = pipeline.embedder.model_id if pipeline.embedder else EMBEDDER_MODEL
            return cls(store, pipeline, model_calibration(models_dir(home), model), activity)
        except BaseException:
            store.close()
            raise

    @property
    def writer(self) -> FileWriter | None:
        """The file writer for what sits beside the store (indexes, notes); None: the OS."""
        return self._writer

    def __enter__(self) -> GalleryService:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.store.close()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """No enrolment, erasure or index write runs in this block (a scrub reads here)."""
        with self._lock:
            yield

    def flush(self) -> None:
        """Persist every index changed since it was loaded (sealed; atomic replace). One that
        cannot be written stays changed in memory (see the module docstring)."""
        with self._lock:
            for gid in sorted(self._dirty):
                try:
                    gallery = self._gallery_by_id(gid)
                except GalleryNotFoundError:
                    self._dirty.discard(gid)
                    continue
                self._persist(gallery, self._indexes[gid])

    # -- galleries ---------------------------------------------------------------------------

    def list_galleries(self) -> list[GalleryInfo]:
        return self.store.list_galleries()

    def create_gallery(self, name: str, description: str = "") -> GalleryInfo:
        with self._lock:
            return self.store.create_gallery(name, description=description).info()

    def delete_gallery(self, name: str) -> None:
        with self._lock:
            gid = self.store.gallery_id_of(name)  # a damaged gallery can be deleted too
            self._indexes.pop(gid, None)
            self._dirty.discard(gid)
            self.store.delete_gallery(name)

    def gallery_info(self, name: str) -> GalleryInfo:
        """A gallery's info; a damaged one's has its id and name and no counts."""
        for damaged in self.store.damaged_galleries():
            if name in (damaged.name, damaged.gallery_id):
                return GalleryInfo(damaged.gallery_id, name, "", datetime.min, 0, 0)
        return self.store.open_gallery(name).info()

    def damaged_galleries(self) -> list[DamagedGallery]:
        return self.store.damaged_galleries()

    def repair_gallery(self, name: str) -> RepairReport:
        """Rewrite a gallery from what still authenticates (store ``repair_gallery``), and
        rebuild its index under the new key."""
        with self._lock:
            gid = self.store.gallery_id_of(name)
            self._indexes.pop(gid, None)
            self._dirty.discard(gid)
            report = self.store.repair_gallery(name)
            gallery = self._gallery_by_id(gid)
            self._index(gallery)
            self._persist(gallery, self._indexes[gid])
            return report

    def gallery(self, name: str) -> Gallery:
        return self.store.open_gallery(name)

    # -- photos ------------------------------------------------------------------------------

    def analyse(self, image_bytes: bytes, *, name: str = "the photo") -> Probe:
        """Decode (with size and pixel limits), detect, assess and embed every face.

        Bounded by the activity's limits: admitted or refused (503) before decoding, detection
        on the photo reduced to the working size, at most ``max_faces`` faces analysed."""
        limits = self.activity.limits
        large = declared_pixels(image_bytes) > limits.max_working_pixels
        with self.activity.job(large=large):
            work = decode_working(
                image_bytes, name=name, max_working_pixels=limits.max_working_pixels
            )
            faces, chips, skipped = self.pipeline.detect_working(work, max_faces=limits.max_faces)
            templates = (
                self.pipeline.embed_chips(chips) if chips else np.zeros((0, 0), dtype=np.float32)
            )
            width, height = work.full_size
            del work  # the full-resolution pixels go before the memory is handed back
        if skipped:
            logger.info(
                "analysed the %d most confident faces; %d not analysed", len(faces), skipped
            )
        described = []
        for i, face in enumerate(faces):
            quality = face.quality
            x0, y0, x1, y1 = (round(v) for v in face.box.as_list())
            overall = quality.overall if quality else 0.0
            described.append(
                ProbeFace(
                    index=i,
                    box=(x0, y0, x1, y1),
                    score=float(face.score),
                    quality=float(overall),
                    quality_limiting=quality.limiting if quality else "size",
                    enrollable=overall >= ENROL_MIN_QUALITY,
                    quality_components=(
                        (
                            ("size", float(quality.size)),
                            ("sharpness", float(quality.sharpness)),
                            ("pose", float(quality.pose)),
                        )
                        if quality
                        else ()
                    ),
                )
            )
        return Probe(
            image_sha256=hashlib.sha256(image_bytes).hexdigest(),
            width=width,
            height=height,
            faces=tuple(described),
            model_id=self.model_id,
            _templates=templates,
            _chips=tuple(chips),
            faces_not_analysed=skipped,
        )

    # -- search ------------------------------------------------------------------------------

    def search(
        self,
        probe: Probe,
        face_index: int,
        galleries: Sequence[str],
        *,
        k: int = DEFAULT_TOP_K,
        fmr: float = DEFAULT_OPERATING_FMR,
        age_band: AgeBand = "unknown",
    ) -> SearchResult:
        """The top ``k`` candidates over ``galleries``, banded with the thresholds of the
        probe's stated age band; "no match" is an answer."""
        if not galleries:
            raise BadInputError("choose at least one gallery to search")
        if not 1 <= k <= MAX_TOP_K:
            raise BadInputError(f"top-k must be between 1 and {MAX_TOP_K}, got {k}")
        if age_band not in AGE_BANDS:
            raise BadInputError(f"age band must be one of {', '.join(AGE_BANDS)}")
        self._check_probe_model(probe)
        template = probe.template(face_index)
        applied = self.calibration.for_age(age_band)
        threshold = applied.threshold(fmr)
        scored: list[tuple[float, str, str, Gallery]] = []
        searched = 0
        with self._lock:
            for name in dict.fromkeys(galleries):
                gallery = self.store.open_gallery(name)
                index = self._searchable_index(gallery)
                searched += len(index)
                for score, face_id in _best_face_per_subject(
                    gallery, index, template, k, self.model_id
                ):
                    scored.append((score, name, face_id, gallery))
            scored.sort(key=lambda item: -item[0])
            candidates = []
            for rank, (score, name, face_id, gallery) in enumerate(scored[:k], start=1):
                face = gallery.face(face_id)
                subject = gallery.subject(face.subject_id)
                photos = [f.face_id for f in gallery.faces(subject.subject_id)]
                candidates.append(
                    Candidate(
                        rank=rank,
                        gallery=name,
                        subject_id=subject.subject_id,
                        display_name=subject.display_name,
                        face_id=face_id,
                        score=score,
                        band=applied.score_band(score),
                        above_threshold=score >= threshold,
                        face_age_at_capture=face.age_at_capture,
                        photo_number=photos.index(face_id) + 1,
                        photos=len(photos),
                    )
                )
        return SearchResult(
            model_id=self.model_id,
            galleries=tuple(dict.fromkeys(galleries)),
            operating_fmr=fmr,
            threshold=threshold,
            candidates=tuple(candidates),
            reliability=reliability_of(self.calibration, applied),
            searched_faces=searched,
            calibration=applied,
        )

    def verify(
        self,
        probe: Probe,
        face_index: int,
        gallery_name: str,
        subject_id: str,
        *,
        fmr: float = DEFAULT_OPERATING_FMR,
        age_band: AgeBand = "unknown",
    ) -> VerifyResult:
        """1:1: the probe face against a subject's best-matching enrolled face, judged with
        the thresholds of the probe's stated age band."""
        if age_band not in AGE_BANDS:
            raise BadInputError(f"age band must be one of {', '.join(AGE_BANDS)}")
        self._check_probe_model(probe)
        applied = self.calibration.for_age(age_band)
        template = probe.template(face_index)
        with self._lock:
            gallery = self.store.open_gallery(gallery_name)
            index = self._searchable_index(gallery)
            faces = [f for f in gallery.faces(subject_id) if f.model_id == self.model_id]
            if not faces:
                raise BadInputError(
                    f"subject {subject_id} has no face embedded with {self.model_id}"
                )
            score = max(index.verify(template, f.face_id, self.model_id) for f in faces)
        threshold = applied.threshold(fmr)
        return VerifyResult(
            score, applied.score_band(score), score >= threshold, fmr, threshold, applied
        )

    def reliability(self, age_band: AgeBand) -> Reliability:
        return reliability_of(self.calibration, self.calibration.for_age(age_band))

    def rescore(self, result: SearchResult, age_band: AgeBand) -> SearchResult:
        """``result`` judged for another stated age band, without searching again."""
        if age_band not in AGE_BANDS:
            raise BadInputError(f"age band must be one of {', '.join(AGE_BANDS)}")
        return result.rescored(age_band, self.calibration)

    # -- enrolment and erasure ---------------------------------------------------------------

    def enroll(
        self,
        gallery_name: str,
        *,
        display_name: str,
        legal_basis: str,
        enrolled_by: str,
        image_bytes: bytes,
        face_index: int | None = None,
        notes: str = "",
        retention_until: date | None = None,
        allow_duplicate: bool = False,
        age_at_capture: int | None = None,
    ) -> Enrolled:
        """A new subject from one photo's face, after the quality gate and duplicate check."""
        probe = self.analyse(image_bytes)
        index = self._pick_face(probe, face_index)
        new_face = self._new_face(probe, index, image_bytes, age_at_capture)
        with self._lock:
            gallery = self.store.open_gallery(gallery_name)
            if not allow_duplicate:
                self._refuse_duplicate(probe, index, gallery_name)
            enrolment = gallery.enroll(
                NewSubject(display_name, legal_basis, enrolled_by, notes, retention_until),
                [new_face],
            )
            self._index_faces(gallery, enrolment.faces)
        return Enrolled(gallery_name, enrolment.subject, enrolment.faces)

    def add_face(
        self,
        gallery_name: str,
        subject_id: str,
        image_bytes: bytes,
        *,
        face_index: int | None = None,
        age_at_capture: int | None = None,
    ) -> Face:
        probe = self.analyse(image_bytes)
        index = self._pick_face(probe, face_index)
        new_face = self._new_face(probe, index, image_bytes, age_at_capture)
        with self._lock:
            gallery = self.store.open_gallery(gallery_name)
            faces = gallery.add_faces(subject_id, [new_face])
            self._index_faces(gallery, faces)
        return faces[0]

    def edit_subject(
        self,
        gallery_name: str,
        subject_id: str,
        *,
        display_name: str,
        notes: str,
        legal_basis: str,
        retention_until: date | None,
    ) -> Subject:
        """Replace a subject's name, notes, legal basis and retention date (store
        ``edit_subject``); its photos and templates are untouched."""
        with self._lock:
            return self.store.open_gallery(gallery_name).edit_subject(
                subject_id,
                display_name=display_name,
                notes=notes,
                legal_basis=legal_basis,
                retention_until=retention_until,
            )

    def delete_subject(self, gallery_name: str, subject_id: str) -> None:
        """Erase a subject: store compaction under a new key, index rebuilt without it and
        re-sealed under that key, so no file keeps its template, name or thumbnail."""
        self.erase_subject(gallery_name, subject_id)

    def erase_subject(
        self, gallery_name: str, subject_id: str, *, key_before: str | None = None
    ) -> None:
        """Erase a subject, or finish its erasure where a crash or a failure left it (a
        tombstone without the compaction that makes it real): a repeat does what is left.
        ``key_before`` is the gallery's data key when the erasure began; while it still
        seals the gallery, the compaction has not happened."""
        with self._lock:
            gallery = self.store.open_gallery(gallery_name)
            index = self._index(gallery)
            try:
                if any(s.subject_id == subject_id for s in gallery.subjects()):
                    gallery.delete_subject(subject_id, compact=True)
                elif key_before is not None and gallery.key_id == key_before:
                    gallery.compact()
            finally:  # a tombstone written before a failed compaction hides the faces too
                live = set(gallery.embeddings(self.model_id)[0])
                gone = [f for f in index.face_ids() if f not in live]
                if gone:
                    index.delete(gone, compact_when_due=False)
                index.compact()
                if not self._persist(gallery, index):
                    # The file left is sealed under the erased key: unreadable, but not kept.
                    shred_and_unlink(self._index_path(gallery))

    def delete_face(self, gallery_name: str, face_id: str) -> None:
        """Erase one face (store compaction under a new key, index re-sealed without it)."""
        with self._lock:
            gallery = self.store.open_gallery(gallery_name)
            index = self._index(gallery)
            gallery.delete_face(face_id, compact=True)
            if face_id in index:
                index.delete([face_id], compact_when_due=False)
            index.compact()
            if not self._persist(gallery, index):
                shred_and_unlink(self._index_path(gallery))

    # -- reading -----------------------------------------------------------------------------

    def subjects(self, gallery_name: str) -> list[Subject]:
        return self.store.open_gallery(gallery_name).subjects()

    def subject(self, gallery_name: str, subject_id: str) -> Subject:
        return self.store.open_gallery(gallery_name).subject(subject_id)

    def faces(self, gallery_name: str, subject_id: str) -> list[Face]:
        return self.store.open_gallery(gallery_name).faces(subject_id)

    def thumbnail(self, gallery_name: str, face_id: str) -> bytes:
        return self.store.open_gallery(gallery_name).thumbnail(face_id)

    # -- model changes -----------------------------------------------------------------------

    def re_embed(
        self, gallery_name: str, progress: Callable[[int, int], None] | None = None
    ) -> int:
        """Re-embed every face of another model from its encrypted aligned thumbnail, then
        erase the old templates. Returns the number of faces re-embedded.

        The thumbnails are the aligned chips the old model saw (JPEG), so no source photo is
        needed; the new templates differ slightly from ones made from the original photos.
        """
        with self._lock:
            gallery = self.store.open_gallery(gallery_name)
            stale = [f for f in gallery.faces() if f.model_id != self.model_id]
            for done, face in enumerate(stale, start=1):
                chip = decode_image(gallery.thumbnail(face.face_id), name="thumbnail")
                template = self.pipeline.embed_chips([chip])[0]
                new = NewFace(
                    template,
                    face.quality,
                    self.model_id,
                    face.source_sha256,
                    _jpeg(chip),
                    face.age_at_capture,
                )
                added = gallery.add_faces(face.subject_id, [new])
                gallery.delete_face(face.face_id, compact=False)
                self._index_faces(gallery, added)
                if progress:
                    progress(done, len(stale))
            if stale:
                gallery.compact()
                if not self._persist(gallery, self._index(gallery)):
                    shred_and_unlink(self._index_path(gallery))
        return len(stale)

    # -- internals ---------------------------------------------------------------------------

    def _check_probe_model(self, probe: Probe) -> None:
        if probe.model_id != self.model_id:
            raise ModelChangedError(
                f"the probe was embedded with {probe.model_id}, the galleries are searched "
                f"with {self.model_id}; analyse the photo again"
            )

    def _pick_face(self, probe: Probe, face_index: int | None) -> int:
        if not probe.faces:
            raise BadInputError("no face found in the photo; use a clearer, frontal photo")
        if face_index is None:
            if len(probe.faces) > 1:
                raise BadInputError(
                    f"the photo has {len(probe.faces)} faces; choose one with its face number"
                )
            face_index = 0
        face = probe.face(face_index)
        if not face.enrollable:
            raise QualityGateError(
                f"face {face_index} is too poor to enrol (quality {face.quality:.2f}, below "
                f"{ENROL_MIN_QUALITY}; weakest: {face.quality_limiting}); use a larger, "
                "sharper, more frontal photo"
            )
        return face_index

    def _new_face(
        self, probe: Probe, index: int, image_bytes: bytes, age_at_capture: int | None
    ) -> NewFace:
        return NewFace(
            probe.template(index),
            probe.faces[index].quality,
            self.model_id,
            hashlib.sha256(image_bytes).hexdigest(),
            probe.chip_jpeg(index),
            check_age(age_at_capture),
        )

    def _refuse_duplicate(self, probe: Probe, index: int, gallery_name: str) -> None:
        result = self.search(probe, index, [gallery_name], k=3, age_band=DUPLICATE_CHECK_BAND)
        if result.matches:
            raise DuplicateSubjectError(
                "this face already matches enrolled subject(s) "
                f"{', '.join(c.subject_id for c in result.matches)} above the calibrated "
                "threshold; add it to that subject, or enrol anyway if you have checked they "
                "are different people",
                result.matches,
            )

    def _index_faces(self, gallery: Gallery, faces: Sequence[Face]) -> None:
        """Add new faces to the index (a first load may already have taken them from the
        store by reconciliation)."""
        index = self._index(gallery)
        mine = [f for f in faces if f.model_id == self.model_id and f.face_id not in index]
        if mine:
            index.add(
                [f.face_id for f in mine], np.stack([f.embedding for f in mine]), self.model_id
            )
            self._dirty.add(gallery.gallery_id)

    def _index_path(self, gallery: Gallery) -> Path:
        return gallery.directory / INDEX_FILE.format(model=self.model_id)

    def _searchable_index(self, gallery: Gallery) -> GalleryIndex:
        """The index, refused while the gallery holds another model's templates."""
        index = self._index(gallery)
        if len(index) < gallery.info().faces:
            raise ModelChangedError(
                f"gallery {gallery.name!r} holds templates of another model; this box embeds "
                f"with {self.model_id}: run `edgeid gallery re-embed {gallery.name}`"
            )
        return index

    def _index(self, gallery: Gallery) -> GalleryIndex:
        """The gallery's index, loaded (and reconciled with the store) on first use."""
        gid = gallery.gallery_id
        if gid in self._indexes:
            return self._indexes[gid]
        path = self._index_path(gallery)
        sealed = path.read_bytes() if path.exists() else None
        blob = f"index:{self.model_id}"
        face_ids, vectors = gallery.embeddings(self.model_id)
        loaded = load_or_rebuild(
            sealed,
            lambda data: gallery.open_blob(blob, data),
            lambda: (face_ids, vectors),
            model_id=self.model_id,
            dim=_dim(vectors, self.pipeline),
            open_errors=(DecryptionError,),
        )
        index = loaded.index
        changed = loaded.rebuilt or _reconcile(index, face_ids, vectors, self.model_id)
        self._indexes[gid] = index
        if changed:
            # Written at the next flush: a search or an enrolment never waits on (or fails
            # for) this cache; a rebuild on every open costs time, not correctness.
            self._dirty.add(gid)
        return index

    def _persist(self, gallery: Gallery, index: GalleryIndex) -> bool:
        """Write the index sealed; False (with a warning) when it cannot be written now. It
        stays changed in memory and the store still holds everything it is made from."""
        blob = f"index:{self.model_id}"
        try:
            sealed = index.seal_with(lambda data: gallery.seal_blob(blob, data))
            write_file_atomically(
                self._index_path(gallery), sealed, writer=self._writer, action="writing the index"
            )
        except StorageWriteError as exc:
            self._dirty.add(gallery.gallery_id)
            logger.warning(
                "gallery %s: the search index is not saved (%s); nothing is lost, it is "
                "rebuilt from the store when next opened",
                gallery.gallery_id,
                exc,
            )
            return False
        self._dirty.discard(gallery.gallery_id)
        return True

    def _gallery_by_id(self, gallery_id: str) -> Gallery:
        for info in self.store.list_galleries():
            if info.gallery_id == gallery_id:
                return self.store.open_gallery(info.name)
        raise GalleryNotFoundError(f"gallery {gallery_id} no longer exists")


def _best_face_per_subject(
    gallery: Gallery, index: GalleryIndex, template: FloatArray, k: int, model_id: str
) -> list[tuple[float, str]]:
    """The ``k`` best subjects of one gallery, each as (score, face id) of its best face.

    A subject with several photos (across ages, say) is one candidate, ranked by the photo
    closest to the probe, so extra photos raise its rank instead of crowding others out. The
    index ranks faces: ask it for more until ``k`` subjects are among them or none are left."""
    wanted = k
    while True:
        hits = index.search(template, model_id, k=min(wanted, MAX_INDEX_K))
        best: dict[str, tuple[float, str]] = {}
        for hit in hits:  # best first: the first face seen of a subject is its best
            subject_id = gallery.face(hit.face_id).subject_id
            best.setdefault(subject_id, (hit.score, hit.face_id))
        exhausted = len(hits) < wanted or wanted >= MAX_INDEX_K
        if len(best) >= k or exhausted:
            return list(best.values())[:k]
        wanted *= 4


def _reconcile(
    index: GalleryIndex, face_ids: Sequence[str], vectors: FloatArray, model_id: str
) -> bool:
    """Make the index hold exactly the store's live faces; True if it changed."""
    indexed = set(index.face_ids())
    live = set(face_ids)
    missing = [i for i, f in enumerate(face_ids) if f not in indexed]
    extra = sorted(indexed - live)
    if extra:
        index.delete(extra, compact_when_due=False)
        index.compact()
    if missing:
        index.add([face_ids[i] for i in missing], vectors[missing], model_id)
    if missing or extra:
        # Routine, not a warning: the index is written lazily, so the next process to open a
        # gallery (after any CLI enrol or delete, or a crash) brings it up to date here.
        logger.info(
            "search index reconciled with the store: %d added, %d removed", len(missing), len(extra)
        )
    return bool(missing or extra)


def _dim(vectors: FloatArray, pipeline: FacePipeline) -> int:
    if vectors.ndim == 2 and vectors.shape[0]:
        return int(vectors.shape[1])
    if pipeline.embedder is None:
        raise EdgeidError("the pipeline was loaded without an embedder; galleries need one")
    return pipeline.embedder.dim


def _jpeg(chip: RGBImage) -> bytes:
    out = io.BytesIO()
    Image.fromarray(chip).save(out, format="JPEG", quality=THUMBNAIL_JPEG_QUALITY)
    return out.getvalue()
