"""Writing a calibration: thresholds per age band from labelled templates.

Given unit templates, the person of each and (when the labelled set has them) the age of each
at its photo, ``calibrate_bands`` measures every age band with enough pairs:

- a pair counts for a band when **both** its images fall in the band (a child probe searched
  among photos of children); "child" (0-12) also holds the pairs across 0-5 and 6-12;
- the threshold for a false-match rate ``fmr`` is the lowest score at which at most
  ``floor(fmr * n)`` of the band's n non-mated pairs score at or above it, rounded up;
- ``resolution_fmr`` is 3 / n rounded up (the rule of three): the finest rate the band's
  pairs can support. The runtime never states a rarer one (``edgeid/runtime/gallery/wording.py``).

A set without ages is calibrated as one band (``unaged``, "adult" for LFW's press photos).
``calibration_data`` assembles the file, keeping bands measured elsewhere (figures from data
that cannot ship) unless this run measured them. ``benchmarks/calibrate_thresholds.py`` writes
the shipped file with it; an operator's own calibration (``edgeid models calibrate``) is meant
to call the same two functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from edgeid.runtime.errors import BadInputError
from edgeid.runtime.gallery.age_bands import AGE_RANGES, MEASURED_BANDS, MeasuredBand, bands_of_age
from edgeid.runtime.gallery.thresholds import (
    CALIBRATED_FMRS,
    CALIBRATION_FORMAT,
    EDGE_FMRS,
    RULE_OF_THREE,
    BandData,
    CalibratedThreshold,
    CalibrationData,
    Provenance,
    ScoreDistribution,
)

# Percentiles reported for both distributions: enough to draw them, small enough to read.
PERCENTILES = (0.1, 1, 5, 25, 50, 75, 95, 99, 99.9)
# Digits kept for scores: float32 cosines carry about seven.
SCORE_DIGITS = 6
# A band needs this many non-mated pairs: 3 / 300 = 1e-2, the loosest score band edge, is
# then the finest rate it supports. Fewer pairs cannot say what even a "weak" score means.
MIN_BAND_NON_MATED_PAIRS = 300
METHOD = (
    "per age band, over the pairs whose two images both fall in the band: threshold(fmr) = "
    "the lowest score at which at most floor(fmr * n) of its n non-mated pairs score at or "
    "above it; tar = share of its mated pairs at or above it; resolution_fmr = 3 / n rounded "
    "up (rule of three), the finest false-match rate the band's pairs support"
)

Scores = npt.NDArray[np.float64]


@dataclass(frozen=True)
class LabelledTemplates:
    """Unit-length templates (rows), the person of each row and, if known, its age in years."""

    vectors: npt.NDArray[np.float32]
    people: Sequence[str]
    ages: Sequence[float | None] | None = None

    def __post_init__(self) -> None:
        rows = len(self.vectors)
        if len(self.people) != rows or (self.ages is not None and len(self.ages) != rows):
            raise BadInputError("one person (and one age, when ages are given) per template")


@dataclass(frozen=True)
class Source:
    """Where the templates come from: what a band's provenance says beside its pair counts."""

    data_set: str
    measured_by: str
    date: str
    in_product: bool = True
    details: Mapping[str, object] = field(default_factory=dict)


def pair_scores(vectors: npt.NDArray[np.float32], people: Sequence[str]) -> tuple[Scores, Scores]:
    """(mated, non-mated) cosine scores over every unordered pair of rows."""
    unit = np.asarray(vectors, dtype=np.float64)
    scores = unit @ unit.T
    ids = np.unique(np.asarray(people), return_inverse=True)[1]
    upper = np.triu_indices(len(ids), k=1)
    same = ids[upper[0]] == ids[upper[1]]
    flat = scores[upper]
    return flat[same], flat[~same]


def threshold_at(non_mated_desc: Scores, fmr: float) -> float:
    """Lowest score admitting at most floor(fmr * n) non-mated comparisons (scores >= it)."""
    allowed = int(np.floor(fmr * len(non_mated_desc)))
    return float(non_mated_desc[allowed] + 1e-9)


def resolution_for(non_mated_pairs: int) -> float:
    """3 / n rounded up to three significant figures."""
    exact = RULE_OF_THREE / non_mated_pairs
    scale = 10 ** (math.floor(math.log10(exact)) - 2)
    return float(f"{math.ceil(exact / scale - 1e-9) * scale:.3g}")


def score_stats(scores: Scores, people: int | None = None) -> ScoreDistribution:
    return ScoreDistribution(
        comparisons=len(scores),
        mean=round(float(scores.mean()), SCORE_DIGITS),
        std=round(float(scores.std()), SCORE_DIGITS),
        min=round(float(scores.min()), SCORE_DIGITS),
        max=round(float(scores.max()), SCORE_DIGITS),
        percentiles={
            str(p): round(float(np.percentile(scores, p)), SCORE_DIGITS) for p in PERCENTILES
        },
        people=people,
    )


def measure_band(
    vectors: npt.NDArray[np.float32], people: Sequence[str], source: Source, pairs: str
) -> BandData | None:
    """One band's thresholds from its images; None when it has too few non-mated pairs."""
    mated, non_mated = pair_scores(vectors, people)
    if len(non_mated) < MIN_BAND_NON_MATED_PAIRS:
        return None
    descending = np.sort(non_mated)[::-1]
    thresholds = []
    for fmr in CALIBRATED_FMRS:
        if fmr not in EDGE_FMRS and fmr * len(non_mated) < 1:
            continue  # 1e-5 is written only where at least one pair lies above it
        score = threshold_at(descending, fmr)
        thresholds.append(
            CalibratedThreshold(
                fmr=fmr,
                # Rounded up, so that the stored threshold never admits more than fmr.
                score=math.ceil(score * 10**SCORE_DIGITS) / 10**SCORE_DIGITS,
                non_mated_at_or_above=int(np.sum(non_mated >= score)),
                tar=round(float(np.mean(mated >= score)), 4) if len(mated) else None,
            )
        )
    repeated = _repeated(people)
    return BandData(
        provenance=Provenance(
            data_set=source.data_set,
            non_mated_pairs=len(non_mated),
            mated_pairs=len(mated),
            people=len(set(people)),
            images=len(people),
            date=source.date,
            measured_by=source.measured_by,
            in_product=source.in_product,
            pairs=pairs,
            details=dict(source.details),
        ),
        resolution_fmr=resolution_for(len(non_mated)),
        thresholds=thresholds,
        non_mated=score_stats(non_mated),
        mated=score_stats(mated, people=len(repeated)) if len(mated) else None,
    )


def calibrate_bands(
    templates: LabelledTemplates, source: Source, *, unaged: MeasuredBand | None = "adult"
) -> dict[MeasuredBand, BandData]:
    """Every band the templates measure. Without ages, all of them are the ``unaged`` band;
    with ages, an image without one takes part in no band."""
    vectors = np.asarray(templates.vectors, dtype=np.float32)
    people = list(templates.people)
    if templates.ages is None:
        if unaged is None:
            raise BadInputError("the labelled set has no ages: say which age band it shows")
        band = measure_band(vectors, people, source, "every pair of images of the set")
        return {unaged: band} if band else {}
    member = [
        set(bands_of_age(age)) if age is not None and age >= 0 else set() for age in templates.ages
    ]
    measured: dict[MeasuredBand, BandData] = {}
    for name in MEASURED_BANDS:
        rows = [i for i, bands in enumerate(member) if name in bands]
        first, last = AGE_RANGES[name]
        ages = f"{first}+" if last is None else f"{first}-{last}"
        band = measure_band(
            vectors[rows], [people[i] for i in rows], source, f"pairs whose two images both "
            f"show people aged {ages} at the photo",
        )  # fmt: skip
        if band is not None:
            measured[name] = band
    return measured


def calibration_data(
    model_id: str,
    bands: Mapping[MeasuredBand, BandData],
    *,
    generated: str,
    generated_by: str,
    caveats: Sequence[str] = (),
    keep: Mapping[MeasuredBand, BandData] | None = None,
) -> CalibrationData:
    """The calibration file's content: ``bands`` over the ``keep`` bands of an earlier file
    (measured elsewhere; a band measured now replaces the kept one)."""
    merged = {**(keep or {}), **bands}
    if not merged:
        raise BadInputError(
            f"no age band has {MIN_BAND_NON_MATED_PAIRS} non-mated pairs: label more people"
        )
    return CalibrationData(
        format=CALIBRATION_FORMAT,
        model_id=model_id,
        score="cosine similarity of the L2-normalised templates (1 = identical)",
        generated=generated,
        generated_by=generated_by,
        method=METHOD,
        bands={name: merged[name] for name in MEASURED_BANDS if name in merged},
        caveats=list(caveats),
    )


def _repeated(people: Sequence[str]) -> list[str]:
    counts: dict[str, int] = {}
    for person in people:
        counts[person] = counts.get(person, 0) + 1
    return [p for p, n in counts.items() if n > 1]
