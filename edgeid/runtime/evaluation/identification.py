"""Open-set 1:N identification in NIST FRVT 1:N's terms, measured through the product's search.

Vocabulary (NIST IR 8271, FRVT Part 2):

- A **mated** search is a probe of a person enrolled in the gallery; a **non-mated** search is a
  probe of a person who is not.
- **CMC** (hit rate at rank r): the share of mated searches whose person is among the first r
  subjects returned, whatever the score; how an investigator who reviews a list uses the box.
- **FPIR(T)**: the share of non-mated searches whose best candidate scores at least T.
- **FNIR(T)**: the share of mated searches whose mate is not returned within the first
  ``RANK_LIMIT`` subjects with a score of at least T. "FNIR at FPIR p" takes the lowest T
  whose FPIR is at most p. With n non-mated searches FPIR moves in steps of 1/n (its
  resolution): a p below 1/n is met only by FPIR 0 on those searches, and is flagged.

The protocol (``plan_identification``, seeded, so a run is reproducible):

- Persons of the labelled set are left out of the gallery (a count, or a share of them, drawn
  with the seed); every image of theirs is a non-mated probe.
- Each other person gives one probe image (drawn per person from the seed and the person's
  name, so the same probe is used whichever enrolment is measured) and enrols one other image
  (``enrol="1"``) or all their other images (``enrol="all-but-one"``).
- Distractors are people enrolled only to make the gallery larger, one image each or all of
  them under the same rule; a distractor folder named like a person of the set is the same
  person and is skipped.

The search is the product's own (``GalleryService.search``) over a temporary encrypted gallery
(a key file and the store in a private temporary folder, removed afterwards): candidates are
faces ranked by exact cosine score, a subject ranks by its best face. The service lists at most
``MAX_TOP_K`` faces; where those hold fewer than ``RANK_LIMIT`` subjects and not the mate, the
mate's rank is not known within the limit: it counts as a miss and the report counts it in
``ranks_unresolved``. Every image is embedded once (``TemplateCache``), its most central face
(as ``eval lfw`` does); a probe with no face found is a miss (mated) or returns nobody
(non-mated). The enrolment quality gate is not applied: every face found is enrolled.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import math
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from edgeid.runtime.errors import BadInputError, EdgeidError
from edgeid.runtime.evaluation.labelled_set import LabelledSet, Person
from edgeid.runtime.evaluation.lfw import central_face_embedder
from edgeid.runtime.gallery import index as gallery_index
from edgeid.runtime.gallery.age_bands import MEASURED_BANDS, MeasuredBand, bands_of_age
from edgeid.runtime.gallery.records import NewFace, NewSubject
from edgeid.runtime.gallery.service import MAX_TOP_K, GalleryService, Probe, ProbeFace
from edgeid.runtime.gallery.store import GalleryStore
from edgeid.runtime.gallery.thresholds import Calibration, CalibrationError, load_calibration
from edgeid.runtime.inference.pipeline import EMBEDDER_MODEL, FacePipeline
from edgeid.runtime.inference.types import FloatArray
from edgeid.runtime.vault.keys import KeyFileProvider

EnrolMode = Literal["1", "all-but-one"]
ENROL_MODES: tuple[EnrolMode, ...] = ("1", "all-but-one")
# FRVT 1:N's usual CMC points; the last is also the candidate list length of FNIR (RANK_LIMIT).
REPORTED_RANKS: tuple[int, ...] = (1, 10, 50)
# FRVT 1:N's identification-mode operating points.
REPORTED_FPIRS: tuple[float, ...] = (1e-2, 1e-3)
# Below any cosine: the best score of a search that returned nobody (no face in the probe).
NO_SCORE = -2.0
# A threshold sits this far above the non-mated score it must exclude (as lfw.tar_at_fmr).
THRESHOLD_EPSILON = 1e-9
# Subjects written per store call: enroll_many takes at most 65,535 records in one frame.
ENROL_BATCH = 2000
EVAL_GALLERY = "identification-evaluation"
# Images a person of the labelled set needs: one probe and at least one to enrol.
MIN_IMAGES = 2
# Persons left out by default: half gives non-mated searches as many as mated ones (or more).
DEFAULT_LEFT_OUT = 0.5


@dataclass(frozen=True)
class IdentProtocol:
    """How the labelled set is split into a gallery and probes (see the module docstring)."""

    enrol: EnrolMode = "1"
    # Persons left out of the gallery: a whole count (>= 1), a share (0 < x < 1), or 0.
    left_out: float = DEFAULT_LEFT_OUT
    seed: int = 0
    ranks: tuple[int, ...] = REPORTED_RANKS
    fpirs: tuple[float, ...] = REPORTED_FPIRS

    def __post_init__(self) -> None:
        if self.enrol not in ENROL_MODES:
            raise BadInputError(f"--enrol must be one of {', '.join(ENROL_MODES)}")
        if not self.ranks or min(self.ranks) < 1 or not self.fpirs:
            raise BadInputError("ranks must be 1 or more and at least one FPIR given")
        if not all(0 < p < 1 for p in self.fpirs):
            raise BadInputError("every FPIR must be between 0 and 1")

    @property
    def rank_limit(self) -> int:
        return max(self.ranks)


@dataclass(frozen=True)
class PlannedProbe:
    image: Path
    person: str
    mated: bool


@dataclass(frozen=True)
class IdentPlan:
    """Who is enrolled with which images, and which images are searched."""

    enrolled: tuple[tuple[str, tuple[Path, ...]], ...]  # person, images; mated ones first
    probes: tuple[PlannedProbe, ...]
    mated_persons: int
    left_out_persons: int
    distractor_persons: int
    distractors_skipped: int  # distractor folders named like a person of the set


def left_out_count(left_out: float, persons: int) -> int:
    """How many of ``persons`` a ``left_out`` count or share means; at least one stays in."""
    if left_out < 0 or not math.isfinite(left_out):
        raise BadInputError(f"--left-out {left_out:g}: give a count of persons or a share < 1")
    if 0 < left_out < 1:
        count = max(1, round(left_out * persons))
    elif left_out != int(left_out):
        raise BadInputError(f"--left-out {left_out:g}: a count of persons is a whole number")
    else:
        count = int(left_out)
    if count >= persons:
        raise BadInputError(
            f"--left-out {left_out:g} leaves {count} of {persons} persons out of the gallery; "
            "at least one must be enrolled"
        )
    return count


def _person_rng(seed: int, name: str) -> np.random.Generator:
    """A generator of one person's draws: the same whichever other persons the set holds."""
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def plan_identification(
    images: LabelledSet, protocol: IdentProtocol, distractors: LabelledSet | None = None
) -> IdentPlan:
    """The seeded split of ``images`` (and ``distractors``) into a gallery and probes."""
    persons = images.persons
    count = left_out_count(protocol.left_out, len(persons))
    order = np.random.default_rng(protocol.seed).permutation(len(persons))
    out = {int(i) for i in order[:count]}
    enrolled: list[tuple[str, tuple[Path, ...]]] = []
    probes: list[PlannedProbe] = []
    for i, person in enumerate(persons):
        if i in out:
            probes += [PlannedProbe(image, person.name, mated=False) for image in person.images]
            continue
        if len(person.images) < 2:
            raise BadInputError(
                f"person {person.name} has {len(person.images)} image; a mated person needs a "
                "probe and at least one image to enrol"
            )
        rng = _person_rng(protocol.seed, person.name)
        probe_at = int(rng.integers(len(person.images)))
        rest = person.images[:probe_at] + person.images[probe_at + 1 :]
        keep_at = int(rng.integers(len(rest)))  # drawn under both modes: same later draws
        chosen = rest if protocol.enrol == "all-but-one" else (rest[keep_at],)
        enrolled.append((person.name, chosen))
        probes.append(PlannedProbe(person.images[probe_at], person.name, mated=True))
    skipped = 0
    if distractors is not None:
        names = images.names()
        for person in distractors.persons:
            if person.name in names:
                skipped += 1
                continue
            enrolled.append((person.name, _distractor_images(person, protocol)))
    return IdentPlan(
        enrolled=tuple(enrolled),
        probes=tuple(probes),
        mated_persons=len(persons) - count,
        left_out_persons=count,
        distractor_persons=len(enrolled) - (len(persons) - count),
        distractors_skipped=skipped,
    )


def _distractor_images(person: Person, protocol: IdentProtocol) -> tuple[Path, ...]:
    if protocol.enrol == "all-but-one" or len(person.images) == 1:
        return person.images
    at = int(_person_rng(protocol.seed, person.name).integers(len(person.images)))
    return (person.images[at],)


class TemplateCache:
    """Each image's template, embedded once (None: no face found); reused across protocols."""

    def __init__(self, embed: Callable[[Path], FloatArray | None]) -> None:
        self._embed = embed
        self._templates: dict[Path, FloatArray | None] = {}
        self._seconds = 0.0

    def fill(
        self, paths: Iterable[Path], progress: Callable[[int, int], None] | None = None
    ) -> None:
        todo = [p for p in dict.fromkeys(paths) if p not in self._templates]
        started = time.perf_counter()
        for done, path in enumerate(todo, start=1):
            self._templates[path] = self._embed(path)
            if progress:
                progress(done, len(todo))
        self._seconds += time.perf_counter() - started

    def __getitem__(self, path: Path) -> FloatArray | None:
        if path not in self._templates:
            self.fill([path])
        return self._templates[path]

    def __len__(self) -> int:
        return len(self._templates)

    @property
    def ms_per_image(self) -> float:
        return 1000 * self._seconds / max(len(self._templates), 1)


@dataclass(frozen=True)
class ProbeOutcome:
    """One search: where the probe's mate ranked (subjects, by their best face)."""

    image: Path
    person: str
    mated: bool
    face_found: bool
    top_score: float  # the best candidate's score; NO_SCORE when nobody was returned
    mate_rank: int | None  # 1-based subject rank; None: not in the list
    mate_score: float | None
    rank_resolved: bool  # False: mate not listed, list too short to say it is past the limit


@dataclass(frozen=True)
class FnirAtFpir:
    target_fpir: float
    fnir: float | None  # None: no mated or no non-mated searches
    threshold: float | None
    measured_fpir: float | None
    resolved: bool  # target_fpir >= 1 / non-mated searches

    def to_json(self) -> dict[str, object]:
        return {
            "fpir": self.target_fpir,
            "fnir": _rounded(self.fnir),
            "threshold": _rounded(self.threshold),
            "measured_fpir": _rounded(self.measured_fpir, 6),
            "resolved": self.resolved,
        }


@dataclass(frozen=True)
class IdentFigures:
    mated_searches: int
    non_mated_searches: int
    hit_rates: dict[int, float | None]  # rank -> CMC value; None without mated searches
    cmc: tuple[float, ...]  # hit rate at rank 1 .. rank limit
    fnir_at_fpir: tuple[FnirAtFpir, ...]
    ranks_unresolved: int

    @property
    def fpir_resolution(self) -> float | None:
        return 1 / self.non_mated_searches if self.non_mated_searches else None

    def to_json(self) -> dict[str, object]:
        return {
            "mated_searches": self.mated_searches,
            "non_mated_searches": self.non_mated_searches,
            "hit_rate": {str(r): _rounded(v) for r, v in self.hit_rates.items()},
            "fnir_at_fpir": [f.to_json() for f in self.fnir_at_fpir],
            # FPIR moves in steps of 1/non-mated searches: a lower target means "none seen".
            "fpir_resolution": _rounded(self.fpir_resolution, 6),
            "ranks_unresolved": self.ranks_unresolved,
            "cmc": [round(v, 4) for v in self.cmc],
        }


@dataclass(frozen=True)
class IdentReport:
    model_id: str
    protocol: IdentProtocol
    plan: IdentPlan = field(repr=False)
    gallery_subjects: int
    gallery_faces: int
    enrolled_without_face: int  # persons none of whose enrolled images showed a face
    images_embedded: int
    no_face_images: int
    ms_per_image: float
    overall: IdentFigures
    by_age_band: dict[MeasuredBand, IdentFigures]
    outcomes: tuple[ProbeOutcome, ...] = field(repr=False)

    def to_json(self) -> dict[str, object]:
        return {
            "model_id": self.model_id,
            "enrol": self.protocol.enrol,
            "seed": self.protocol.seed,
            "search": "the product's gallery search; a subject ranks by its best face",
            "rank_limit": self.protocol.rank_limit,
            "gallery_subjects": self.gallery_subjects,
            "gallery_faces": self.gallery_faces,
            "mated_persons": self.plan.mated_persons,
            "left_out_persons": self.plan.left_out_persons,
            "distractor_persons": self.plan.distractor_persons,
            "distractors_skipped_same_name": self.plan.distractors_skipped,
            "enrolled_without_face": self.enrolled_without_face,
            "images_embedded": self.images_embedded,
            "no_face_images": self.no_face_images,
            "ms_per_image": round(self.ms_per_image, 1),
            **self.overall.to_json(),
            "by_age_band": {band: f.to_json() for band, f in self.by_age_band.items()},
        }


def evaluate_identification(
    pipeline: FacePipeline,
    images: LabelledSet,
    protocol: IdentProtocol | None = None,
    *,
    distractors: LabelledSet | None = None,
    ages: Mapping[Path, float] | None = None,
    templates: TemplateCache | None = None,
    progress: Callable[[int, int], None] | None = None,
    work_dir: Path | None = None,
) -> IdentReport:
    """Open-set 1:N figures of ``pipeline``'s embedder on ``images`` (see the module docstring).

    Pass one ``templates`` cache to several calls (e.g. both enrolments) to embed each image
    once; it must come from the same pipeline. ``ages`` (years, per image of ``images``) adds
    every figure per age band. The temporary gallery lives under ``work_dir`` (default: the
    system's temporary folder) and is removed on return.
    """
    protocol = protocol or IdentProtocol()
    if pipeline.embedder is None:
        raise EdgeidError("the pipeline was loaded without an embedder; 1:N search needs one")
    model_id = pipeline.embedder.model_id
    plan = plan_identification(images, protocol, distractors)
    unaged = [p.image.name for p in plan.probes if ages is not None and p.image not in ages]
    if unaged:
        raise BadInputError(f"no age given for probe {unaged[0]} ({len(unaged)} in all)")
    cache = templates if templates is not None else TemplateCache(central_face_embedder(pipeline))
    needed = [p.image for p in plan.probes] + [i for _, paths in plan.enrolled for i in paths]
    cache.fill(needed, progress)
    with (
        tempfile.TemporaryDirectory(prefix="edgeid-ident-", dir=work_dir) as tmp,
        _quiet_index_rebuild(),
    ):
        home = Path(tmp)
        store = GalleryStore(home, KeyFileProvider(home / "keys"))
        with GalleryService(store, pipeline, _search_calibration(model_id)) as service:
            subject_of, faces, without_face = _enrol(service, plan, cache, model_id)
            outcomes = tuple(
                _search(service, probe, cache[probe.image], subject_of, model_id, protocol)
                for probe in plan.probes
            )
    by_band: dict[MeasuredBand, list[ProbeOutcome]] = {}
    for outcome in outcomes:
        for band in bands_of_age(ages[outcome.image]) if ages is not None else ():
            by_band.setdefault(band, []).append(outcome)
    return IdentReport(
        model_id=model_id,
        protocol=protocol,
        plan=plan,
        gallery_subjects=len(subject_of),
        gallery_faces=faces,
        enrolled_without_face=without_face,
        images_embedded=len(set(needed)),
        no_face_images=sum(1 for p in dict.fromkeys(needed) if cache[p] is None),
        ms_per_image=cache.ms_per_image,
        overall=identification_figures(outcomes, protocol),
        by_age_band={
            band: identification_figures(by_band[band], protocol)
            for band in MEASURED_BANDS
            if band in by_band
        },
        outcomes=outcomes,
    )


@contextlib.contextmanager
def _quiet_index_rebuild() -> Iterator[None]:
    """A new temporary gallery has no index file, by design: its "rebuilding (missing)"
    warning says nothing to whoever runs an evaluation."""
    index_logger = logging.getLogger(gallery_index.__name__)
    level = index_logger.level
    index_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        index_logger.setLevel(level)


def _search_calibration(model_id: str) -> Calibration:
    """The calibration the service bands candidates with. Thresholds play no part in these
    figures (only scores and ranks do), so a model not calibrated yet (one being calibrated
    from these figures) borrows the shipped model's, under its own id."""
    try:
        return load_calibration(model_id)
    except CalibrationError:
        shipped = load_calibration(EMBEDDER_MODEL)
        return Calibration(shipped.data.model_copy(update={"model_id": model_id}))


@functools.cache
def _placeholder_jpeg() -> bytes:
    """The stored "aligned chip" of an evaluation face: the store requires one, nobody views
    it, and the gallery is removed with its folder; a real chip would cost a JPEG a face."""
    out = io.BytesIO()
    Image.new("L", (8, 8), 128).save(out, format="JPEG")
    return out.getvalue()


def _enrol(
    service: GalleryService, plan: IdentPlan, cache: TemplateCache, model_id: str
) -> tuple[dict[str, str], int, int]:
    """Enrol the plan's gallery; returns person -> subject id, faces enrolled, and how many
    persons had no face in any image to enrol (they are not enrolled)."""
    service.create_gallery(EVAL_GALLERY, "temporary: edgeid eval ident")
    gallery = service.gallery(EVAL_GALLERY)
    pending: list[tuple[str, NewSubject, list[NewFace]]] = []
    without_face = 0
    for n, (person, paths) in enumerate(plan.enrolled, start=1):
        faces = [
            NewFace(template, 1.0, model_id, _sha256(path), _placeholder_jpeg())
            for path in paths
            if (template := cache[path]) is not None
        ]
        if not faces:
            without_face += 1
            continue
        subject = NewSubject(f"person {n}", "evaluation", "edgeid eval ident")
        pending.append((person, subject, faces))
    subject_of: dict[str, str] = {}
    for start in range(0, len(pending), ENROL_BATCH):
        chunk = pending[start : start + ENROL_BATCH]
        done = gallery.enroll_many([(subject, faces) for _, subject, faces in chunk])
        for (person, _, _), enrolment in zip(chunk, done, strict=True):
            subject_of[person] = enrolment.subject.subject_id
    return subject_of, sum(len(faces) for _, _, faces in pending), without_face


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _search(
    service: GalleryService,
    probe: PlannedProbe,
    template: FloatArray | None,
    subject_of: Mapping[str, str],
    model_id: str,
    protocol: IdentProtocol,
) -> ProbeOutcome:
    if template is None or not subject_of:
        return ProbeOutcome(probe.image, probe.person, probe.mated, template is not None,
                            NO_SCORE, None, None, rank_resolved=True)  # fmt: skip
    face = ProbeFace(0, (0, 0, 0, 0), 1.0, 1.0, "size", enrollable=False)
    query = Probe("0" * 64, 0, 0, (face,), model_id, np.asarray(template)[None, :], ())
    result = service.search(query, 0, [EVAL_GALLERY], k=MAX_TOP_K)
    best: dict[str, tuple[int, float]] = {}  # subject -> (rank, best face's score)
    for candidate in result.candidates:  # best first: a subject's first face is its best
        if candidate.subject_id not in best:
            best[candidate.subject_id] = (len(best) + 1, candidate.score)
    top = result.candidates[0].score if result.candidates else NO_SCORE
    mate = subject_of.get(probe.person) if probe.mated else None
    if mate is not None and mate in best:
        rank, score = best[mate]
        return ProbeOutcome(probe.image, probe.person, probe.mated, True, top, rank, score, True)
    complete = len(result.candidates) < MAX_TOP_K  # the whole gallery was listed
    # Known to be a miss within the limit: nothing left unlisted, the limit's worth of subjects
    # listed, or no mate enrolled at all (none of its photos showed a face).
    resolved = complete or len(best) >= protocol.rank_limit or mate is None
    return ProbeOutcome(probe.image, probe.person, probe.mated, True, top, None, None, resolved)


def fpir_threshold(non_mated_top: Sequence[float], fpir: float) -> float:
    """The lowest threshold at which at most ``fpir`` of these non-mated searches return a
    candidate (their best scores)."""
    ordered = np.sort(np.asarray(non_mated_top, dtype=np.float64))[::-1]
    allowed = math.floor(fpir * len(ordered))  # false positives we may accept
    if allowed >= len(ordered):
        return -math.inf
    return float(ordered[allowed] + THRESHOLD_EPSILON)


def identification_figures(
    outcomes: Sequence[ProbeOutcome], protocol: IdentProtocol
) -> IdentFigures:
    """CMC and FNIR at each FPIR of ``protocol`` over these searches."""
    mated = [o for o in outcomes if o.mated]
    non_mated_top = [o.top_score for o in outcomes if not o.mated]
    limit = protocol.rank_limit
    ranks = np.array([o.mate_rank or limit + 1 for o in mated], dtype=np.int64)
    cmc = tuple(float(np.mean(ranks <= r)) for r in range(1, limit + 1)) if mated else ()
    operating = []
    for target in protocol.fpirs:
        if not mated or not non_mated_top:
            operating.append(FnirAtFpir(target, None, None, None, resolved=False))
            continue
        threshold = fpir_threshold(non_mated_top, target)
        missed = [
            o.mate_rank is None
            or o.mate_rank > limit
            or o.mate_score is None
            or o.mate_score < threshold
            for o in mated
        ]
        measured = float(np.mean(np.asarray(non_mated_top) >= threshold))
        resolved = target >= 1 / len(non_mated_top)
        operating.append(FnirAtFpir(target, float(np.mean(missed)), threshold, measured, resolved))
    return IdentFigures(
        mated_searches=len(mated),
        non_mated_searches=len(non_mated_top),
        hit_rates={r: (cmc[r - 1] if cmc else None) for r in protocol.ranks},
        cmc=cmc,
        fnir_at_fpir=tuple(operating),
        ranks_unresolved=sum(1 for o in mated if not o.rank_resolved),
    )


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)
