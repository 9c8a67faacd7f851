"""Open-set decisions per age band: calibrated thresholds, score bands, and "no match".

A threshold is only meaningful with the false-match rate it was set for, and that rate depends
on who is compared: pairs of different young children score far higher than pairs of different
adults. Each embedding model ships a calibration (``calibration/<model_id>.json``, format 2,
written by ``edgeid.runtime.evaluation.calibration``) holding, **per age band** (``age_bands.py``):

- its provenance: the data set, how many non-mated pairs (two images of different people),
  when, who measured, and whether this product measured it on data it holds;
- the cosine score at which each calibrated share of those non-mated pairs still scores at or
  above it, and the mated (same person) distribution where it was measured;
- the **resolution** it supports: with n non-mated pairs, a false-match rate below 3/n (the
  rule of three: none seen in n tries bounds the rate by 3/n at 95%) cannot be stated. A
  threshold below its band's resolution is still used, but the wording never states a finer
  rate than the resolution (``BandCalibration.stated_fmr``).

Every candidate gets a score band from its age band's thresholds; a search whose candidates
all fall below the operating threshold answers "no match". ``unknown`` (and a band this model
has no calibration for) uses the strictest band the calibration holds, and says so. In 1:N
search every probe meets every enrolled face, so the false positive identification rate (FPIR)
of a probe whose person is not enrolled grows with the gallery: ``fpir_bound`` and
``operating_fmr_for_fpir`` turn one into the other.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgeid.runtime.compat import StrEnum
from edgeid.runtime.errors import EdgeidError, first_line
from edgeid.runtime.gallery.age_bands import (
    AGE_BAND_LABELS,
    AGE_BAND_PEOPLE,
    AGE_RANGES,
    MEASURED_BANDS,
    AgeBand,
    MeasuredBand,
)
from edgeid.runtime.inference.embedders import calibration_file

logger = logging.getLogger(__name__)

# The calibration file layout this code reads. Format 1 held one set of thresholds, measured
# on adults only, and is refused: its rates are false for children.
CALIBRATION_FORMAT: Literal[2] = 2
# False-match rates a calibration writer states a threshold for: one per score band edge, plus
# 1e-5 for galleries large enough that 1e-4 per comparison is too lenient
# (operating_fmr_for_fpir). A band must hold the edges; 1e-5 where its data reaches it.
CALIBRATED_FMRS: tuple[float, ...] = (1e-2, 1e-3, 1e-4, 1e-5)
# The operating point of "match / no match" in 1:1 verification and small galleries: one false
# match in a thousand non-mated comparisons still accepts 94.5% of LFW's 983 adult mated pairs
# (dlib_resnet_v1.json); larger galleries need a stricter one (operating_fmr_for_fpir).
DEFAULT_OPERATING_FMR = 1e-3
# With n comparisons and no false match seen, the 95% upper bound of the rate is about 3/n: a
# measurement of n non-mated pairs cannot support a stated rate below that.
RULE_OF_THREE = 3.0
CALIBRATION_DIR = Path(__file__).resolve().parent / "calibration"
REGENERATE = "`python -m benchmarks.calibrate_thresholds`"


class CalibrationError(EdgeidError):
    """A model has no calibration, or its calibration file is unreadable or inconsistent."""


class ScoreBand(StrEnum):
    """How strongly a score argues for the same person, by the FMR of the threshold it clears
    within the probe's age band."""

    STRONG = "strong"
    MODERATE = "moderate"
    WEAK = "weak"
    BELOW_THRESHOLD = "below threshold"


# The lower edge of each score band, strongest first: the score at that false-match rate.
BAND_EDGES: tuple[tuple[ScoreBand, float], ...] = (
    (ScoreBand.STRONG, 1e-4),
    (ScoreBand.MODERATE, 1e-3),
    (ScoreBand.WEAK, 1e-2),
)
EDGE_FMRS: tuple[float, ...] = tuple(fmr for _, fmr in BAND_EDGES)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScoreDistribution(_Strict):
    comparisons: int = Field(ge=1)
    mean: float
    std: float = Field(ge=0)
    min: float
    max: float
    percentiles: dict[str, float]
    people: int | None = Field(default=None, ge=1)


class CalibratedThreshold(_Strict):
    fmr: float = Field(gt=0, lt=1)
    score: float = Field(ge=-1, le=1.000001)
    # Both are None where the measurement reported only the threshold.
    non_mated_at_or_above: int | None = Field(default=None, ge=0)
    tar: float | None = Field(default=None, ge=0, le=1)


class Provenance(_Strict):
    """Where a band's figures come from."""

    data_set: str
    non_mated_pairs: int = Field(ge=1)
    mated_pairs: int | None = Field(default=None, ge=0)
    people: int | None = Field(default=None, ge=1)
    images: int | None = Field(default=None, ge=1)
    date: str = Field(description="when the figures were measured or carried into this file")
    measured_by: str
    # True: this product's code measured it on data it holds, so it can be reproduced here.
    in_product: bool
    pairs: str = Field(description="which pairs of the data set count for this band")
    details: dict[str, object] = Field(default_factory=dict)


class AdultThresholdShare(_Strict):
    """The share of this band's non-mated pairs at or above one of the adult thresholds."""

    adult_fmr: float = Field(gt=0, lt=1)
    score: float
    share: float = Field(ge=0, le=1)


class ClusterMeasurement(_Strict):
    """Pairwise clustering quality at one threshold, on this band's people."""

    threshold: float
    pairwise_precision: float = Field(ge=0, le=1)
    pairwise_recall: float | None = Field(default=None, ge=0, le=1)
    source: str


class AgeBandReliability(_Strict):
    """How often the model accepts the same person across years, for one age band."""

    verification_rate: float = Field(ge=0, le=1)
    source: str


class BandData(_Strict):
    provenance: Provenance
    resolution_fmr: float = Field(gt=0, lt=1)
    thresholds: list[CalibratedThreshold] = Field(min_length=1)
    non_mated: ScoreDistribution | None = None
    mated: ScoreDistribution | None = None
    at_adult_thresholds: list[AdultThresholdShare] = Field(default_factory=list)
    clustering: list[ClusterMeasurement] = Field(default_factory=list)
    verification: AgeBandReliability | None = None
    caveats: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> BandData:
        ordered = sorted(self.thresholds, key=lambda t: -t.fmr)
        scores = [t.score for t in ordered]
        if scores != sorted(scores):
            raise ValueError("a lower false-match rate must have a higher threshold score")
        missing = set(EDGE_FMRS) - {t.fmr for t in self.thresholds}
        if missing:
            raise ValueError(f"no threshold for fmr {sorted(missing)}")
        # The resolution may be stated coarser than 3/n (rounded up), never finer.
        if self.resolution_fmr < RULE_OF_THREE / self.provenance.non_mated_pairs * (1 - 1e-9):
            raise ValueError(
                f"resolution_fmr {self.resolution_fmr:g} is finer than "
                f"{self.provenance.non_mated_pairs} non-mated pairs support (3/n)"
            )
        return self


class CalibrationData(_Strict):
    format: Literal[2]
    model_id: str
    score: str
    generated: str
    generated_by: str
    method: str
    bands: dict[MeasuredBand, BandData] = Field(min_length=1)
    caveats: list[str] = Field(default_factory=list)


class Scored(Protocol):
    """What ``decide`` needs of a search candidate: its face id and its cosine score."""

    @property
    def face_id(self) -> str: ...

    @property
    def score(self) -> float: ...


@dataclass(frozen=True)
class BandedCandidate:
    face_id: str
    score: float
    band: ScoreBand
    above_threshold: bool

    def to_json(self) -> dict[str, object]:
        return {
            "face_id": self.face_id,
            "score": round(self.score, 4),
            "band": self.band.value,
            "above_threshold": self.above_threshold,
        }


@dataclass(frozen=True)
class Decision:
    """Every candidate with its band, and the open-set answer at ``operating_fmr``."""

    candidates: tuple[BandedCandidate, ...]
    model_id: str
    age_band: MeasuredBand
    operating_fmr: float
    threshold: float

    @property
    def matches(self) -> tuple[BandedCandidate, ...]:
        return tuple(c for c in self.candidates if c.above_threshold)

    @property
    def no_match(self) -> bool:
        return not self.matches

    def to_json(self) -> dict[str, object]:
        return {
            "model_id": self.model_id,
            "age_band": self.age_band,
            "operating_fmr": self.operating_fmr,
            "threshold": round(self.threshold, 4),
            "no_match": self.no_match,
            "candidates": [c.to_json() for c in self.candidates],
        }


@dataclass(frozen=True)
class BandCalibration:
    """The thresholds one search applies: the stated age band, the measured band whose figures
    apply to it, and why another band's figures apply when they do."""

    model_id: str
    stated: AgeBand
    band: MeasuredBand
    data: BandData
    substitution: str | None = None

    @property
    def label(self) -> str:
        return AGE_BAND_LABELS[self.band]

    @property
    def people(self) -> str:
        return AGE_BAND_PEOPLE[self.band]

    @property
    def non_mated_pairs(self) -> int:
        return self.data.provenance.non_mated_pairs

    @property
    def resolution_fmr(self) -> float:
        return self.data.resolution_fmr

    def _entry(self, fmr: float) -> CalibratedThreshold:
        for entry in self.data.thresholds:
            if entry.fmr == fmr:
                return entry
        calibrated = ", ".join(f"{t.fmr:g}" for t in sorted(self.data.thresholds, key=_by_fmr))
        raise CalibrationError(
            f"model {self.model_id} has no threshold for fmr {fmr:g} in age band {self.band}; "
            f"calibrated: {calibrated}"
        )

    def threshold(self, fmr: float) -> float:
        """The score at which the band's non-mated false-match rate is ``fmr``."""
        return self._entry(fmr).score

    def tar(self, fmr: float) -> float | None:
        """Share of the band's mated comparisons at or above the ``fmr`` threshold, if known."""
        return self._entry(fmr).tar

    def supports(self, fmr: float) -> bool:
        """Whether the band's measurement has pairs enough to state ``fmr`` (rule of three)."""
        return fmr >= self.data.resolution_fmr

    def stated_fmr(self, fmr: float) -> float:
        """The finest rate that may be said of the ``fmr`` threshold: never below resolution."""
        return max(fmr, self.data.resolution_fmr)

    def score_band(self, score: float) -> ScoreBand:
        for band, fmr in BAND_EDGES:
            if score >= self.threshold(fmr):
                return band
        return ScoreBand.BELOW_THRESHOLD

    def decide(
        self, candidates: Sequence[Scored], operating_fmr: float = DEFAULT_OPERATING_FMR
    ) -> Decision:
        """Band every candidate (in the given order) and answer match / no match."""
        threshold = self.threshold(operating_fmr)
        banded = tuple(
            BandedCandidate(c.face_id, c.score, self.score_band(c.score), c.score >= threshold)
            for c in candidates
        )
        return Decision(banded, self.model_id, self.band, operating_fmr, threshold)


class Calibration:
    """A model's calibrated thresholds per age band (see the module docstring)."""

    def __init__(self, data: CalibrationData) -> None:
        self.data = data
        self.model_id = data.model_id

    @property
    def bands(self) -> tuple[MeasuredBand, ...]:
        """The measured bands this calibration holds, in ``MEASURED_BANDS`` order."""
        return tuple(b for b in MEASURED_BANDS if b in self.data.bands)

    def strictest(self) -> MeasuredBand:
        """The band with the highest threshold at the default operating FMR: its thresholds
        admit the fewest false matches whoever the probe is, at the cost of missing more true
        ones. On a tie, the band of the youngest, then the narrowest, ages (it is measured on
        the people whose false matches are the most frequent)."""

        def key(band: MeasuredBand) -> tuple[float, int, int]:
            first, last = AGE_RANGES[band]
            return (_edge_score(self.data.bands[band]), -first, first - (last or 150))

        return max(self.bands, key=key)

    def for_age(self, stated: AgeBand) -> BandCalibration:
        """The thresholds a probe of the stated age band is searched with."""
        if stated != "unknown" and stated in self.data.bands:
            return BandCalibration(self.model_id, stated, stated, self.data.bands[stated])
        band = self.strictest()
        people = AGE_BAND_PEOPLE[band]
        if stated == "unknown":
            why = (
                "Age not stated: the strictest thresholds this box holds are used, those "
                f"measured for {people}; state the age band for thresholds that fit the probe."
            )
        else:
            why = (
                f"{AGE_BAND_LABELS[stated]}: not calibrated for model {self.model_id}; the "
                f"strictest thresholds this box holds are used, those measured for {people}."
            )
        if not _covers(band, stated):
            why += (
                f" Their false-match rates were measured on {people} only: for a younger "
                "person they are higher than stated."
            )
        return BandCalibration(self.model_id, stated, band, self.data.bands[band], why)

    def band(self, band: MeasuredBand) -> BandCalibration:
        """A measured band's own calibration (CalibrationError when it is not held)."""
        if band not in self.data.bands:
            held = ", ".join(self.bands)
            raise CalibrationError(
                f"model {self.model_id} has no calibration for age band {band}; it holds {held}"
            )
        return BandCalibration(self.model_id, band, band, self.data.bands[band])


def _by_fmr(entry: CalibratedThreshold) -> float:
    return entry.fmr


def _edge_score(data: BandData) -> float:
    for entry in data.thresholds:
        if entry.fmr == DEFAULT_OPERATING_FMR:
            return entry.score
    return max(t.score for t in data.thresholds)  # unreachable: the edges are required


def _covers(band: MeasuredBand, stated: AgeBand) -> bool:
    """Whether ``band`` was measured on people as young as ``stated`` can be (the youngest have
    the most frequent false matches); "unknown" may be a newborn."""
    youngest = 0 if stated == "unknown" else AGE_RANGES[stated][0]
    return AGE_RANGES[band][0] <= youngest


def calibration_path(model_id: str) -> Path:
    return CALIBRATION_DIR / f"{model_id}.json"


def parse_calibration(text: str, source: str) -> Calibration:
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise CalibrationError(
            f"calibration {source} is not JSON ({exc}); regenerate it with {REGENERATE}"
        ) from exc
    if isinstance(raw, dict) and raw.get("format") != CALIBRATION_FORMAT:
        if "format" not in raw and "thresholds" in raw:
            raise CalibrationError(
                f"calibration {source} is in the old single-band format: its thresholds were "
                "measured on adults only, and their false-match rates are false for children. "
                f"Regenerate it with {REGENERATE} (format {CALIBRATION_FORMAT}, thresholds "
                "per age band), or install the calibration shipped with the model"
            )
        raise CalibrationError(
            f"calibration {source} has format {raw.get('format')!r}; this edgeid reads format "
            f"{CALIBRATION_FORMAT}: regenerate it with {REGENERATE}"
        )
    try:
        return Calibration(CalibrationData.model_validate(raw))
    except ValidationError as exc:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3]
        )
        raise CalibrationError(
            f"calibration {source} is unusable ({detail or first_line(exc)}); regenerate it with "
            f"{REGENERATE}"
        ) from exc


@functools.cache
def load_calibration(model_id: str) -> Calibration:
    """The shipped calibration of ``model_id`` (read once per process)."""
    path = calibration_path(model_id)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CalibrationError(
            f"model {model_id} has no calibrated thresholds ({path.name} is not shipped); "
            f"calibrate it with {REGENERATE} before searching"
        ) from None
    calibration = parse_calibration(text, path.name)
    if calibration.model_id != model_id:
        raise CalibrationError(
            f"calibration {path.name} is for model {calibration.model_id}, not {model_id}"
        )
    logger.debug("loaded calibration of %s", model_id)
    return calibration


def fpir_bound(fmr: float, gallery_size: int) -> float:
    """Upper estimate of the chance that a probe of a person not enrolled gets at least one
    candidate above the ``fmr`` threshold, if its comparisons were independent."""
    return float(1.0 - (1.0 - fmr) ** max(gallery_size, 0))


def operating_fmr_for_fpir(target_fpir: float, gallery_size: int) -> float:
    """The most lenient calibrated FMR whose FPIR bound for this gallery stays within the
    target, or the strictest calibrated one when none does (FPIR then exceeds the target)."""
    for fmr in sorted(CALIBRATED_FMRS, reverse=True):
        if fpir_bound(fmr, gallery_size) <= target_fpir:
            return fmr
    return min(CALIBRATED_FMRS)


def model_calibration(models_dir: Path, model_id: str) -> Calibration:
    """The calibration of ``model_id``: the one shipped with it, else the operator's own
    (``<model>.calibration.json`` beside the models, written by ``edgeid models calibrate``).
    Read afresh each time: a recalibration takes effect at the next open."""
    if calibration_path(model_id).exists():
        return load_calibration(model_id)
    path = operator_calibration_path(models_dir, model_id)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CalibrationError(
            f"model {model_id} has no calibration; run `edgeid models calibrate {model_id} "
            "--images DIR` first"
        ) from None
    except OSError as exc:
        raise CalibrationError(f"calibration {path} cannot be read ({exc.strerror})") from exc
    calibration = parse_calibration(text, path.name)
    if calibration.model_id != model_id:
        raise CalibrationError(
            f"calibration {path.name} is for model {calibration.model_id}, not {model_id}"
        )
    return calibration


def operator_calibration_path(models_dir: Path, model_id: str) -> Path:
    return calibration_file(models_dir, model_id)
