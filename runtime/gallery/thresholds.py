"""Open-set decisions: calibrated thresholds, score bands, and "no match" as an answer.

A threshold is only meaningful with the false-match rate it was set for. Each embedding model
ships a calibration (``calibration/<model_id>.json``, written by
``python -m benchmarks.calibrate_thresholds``) holding the cosine score at which a stated share
of **non-mated** comparisons (two images of different people) still score at or above it, the
number of comparisons it was computed from, and the **mated** score distribution, so a reader
can see how often a true mate clears each threshold.

Every candidate gets a band from those thresholds; a search whose candidates all fall below the
operating threshold answers "no match". In 1:N search every probe meets every enrolled face, so
the false positive identification rate (FPIR) of a probe whose person is not enrolled grows with
the gallery: ``fpir_bound`` and ``operating_fmr_for_fpir`` turn one into the other.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from runtime.errors import EdgeidError

logger = logging.getLogger(__name__)

# False-match rates a calibration must state a threshold for: one per band edge, plus 1e-5 for
# galleries large enough that 1e-4 per comparison is too lenient (see operating_fmr_for_fpir).
CALIBRATED_FMRS: tuple[float, ...] = (1e-2, 1e-3, 1e-4, 1e-5)
# The operating point of "match / no match" in 1:1 verification and small galleries: one false
# match in a thousand non-mated comparisons still accepts 94.5% of LFW's 983 mated pairs
# (dlib_resnet_v1.json); larger galleries need a stricter one (operating_fmr_for_fpir).
DEFAULT_OPERATING_FMR = 1e-3
CALIBRATION_DIR = Path(__file__).resolve().parent / "calibration"


class CalibrationError(EdgeidError):
    """A model has no calibration, or its calibration file is unreadable or inconsistent."""


class ScoreBand(enum.StrEnum):
    """How strongly a score argues for the same person, by the FMR of the threshold it clears."""

    STRONG = "strong"
    MODERATE = "moderate"
    WEAK = "weak"
    BELOW_THRESHOLD = "below threshold"


# The lower edge of each band, strongest first: the score at that false-match rate.
BAND_EDGES: tuple[tuple[ScoreBand, float], ...] = (
    (ScoreBand.STRONG, 1e-4),
    (ScoreBand.MODERATE, 1e-3),
    (ScoreBand.WEAK, 1e-2),
)


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
    non_mated_at_or_above: int = Field(ge=0)
    tar: float = Field(ge=0, le=1)


class AgeBandReliability(_Strict):
    """How often the model accepts the same person across years, for one age band."""

    verification_rate: float = Field(ge=0, le=1)
    source: str


class CalibrationData(_Strict):
    model_id: str
    score: str
    generated: str
    generated_by: str
    method: str
    data: dict[str, object]
    non_mated: ScoreDistribution
    mated: ScoreDistribution
    thresholds: list[CalibratedThreshold] = Field(min_length=1)
    caveats: list[str] = Field(default_factory=list)
    # Shown beside every search result for the probe's apparent age (children are verified
    # far less reliably); keys: adult, teen, child. A band without an entry is "not measured".
    age_bands: dict[str, AgeBandReliability] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _monotonic(self) -> CalibrationData:
        ordered = sorted(self.thresholds, key=lambda t: -t.fmr)
        scores = [t.score for t in ordered]
        if scores != sorted(scores):
            raise ValueError("a lower false-match rate must have a higher threshold score")
        missing = set(CALIBRATED_FMRS) - {t.fmr for t in self.thresholds}
        if missing:
            raise ValueError(f"no threshold for fmr {sorted(missing)}")
        return self


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
            "operating_fmr": self.operating_fmr,
            "threshold": round(self.threshold, 4),
            "no_match": self.no_match,
            "candidates": [c.to_json() for c in self.candidates],
        }


class Calibration:
    """A model's calibrated thresholds and score distributions (see the module docstring)."""

    def __init__(self, data: CalibrationData) -> None:
        self.data = data
        self.model_id = data.model_id
        self._by_fmr = {t.fmr: t for t in data.thresholds}

    def threshold(self, fmr: float) -> float:
        """The score at which the non-mated false-match rate is ``fmr`` (a calibrated rate)."""
        try:
            return self._by_fmr[fmr].score
        except KeyError:
            calibrated = ", ".join(f"{f:g}" for f in sorted(self._by_fmr))
            raise CalibrationError(
                f"model {self.model_id} has no threshold for fmr {fmr:g}; calibrated: {calibrated}"
            ) from None

    def tar(self, fmr: float) -> float:
        """Share of mated calibration comparisons at or above the ``fmr`` threshold."""
        self.threshold(fmr)
        return self._by_fmr[fmr].tar

    def band(self, score: float) -> ScoreBand:
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
            BandedCandidate(c.face_id, c.score, self.band(c.score), c.score >= threshold)
            for c in candidates
        )
        return Decision(banded, self.model_id, operating_fmr, threshold)


def calibration_path(model_id: str) -> Path:
    return CALIBRATION_DIR / f"{model_id}.json"


def parse_calibration(text: str, source: str) -> Calibration:
    try:
        return Calibration(CalibrationData.model_validate(json.loads(text)))
    except (ValueError, ValidationError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CalibrationError(
            f"calibration {source} is unusable ({first_line}); regenerate it with "
            "`python -m benchmarks.calibrate_thresholds`"
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
            "calibrate it with `python -m benchmarks.calibrate_thresholds` before searching"
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
