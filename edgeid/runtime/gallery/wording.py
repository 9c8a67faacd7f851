"""What a result says about its thresholds, in words every door shows (web, API, CLI, report).

One rule: a false-match rate is stated only as finely as the age band's measurement supports.
A rate at or above the band's resolution (3 / non-mated pairs) is said as "about 1 in N"; a
threshold set for a rarer rate is said as "at most about 1 in M", M from the resolution, with
the number of pairs that limits it. "1 in N" is rounded down to two significant figures, so the
rate said is never rarer than the one measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeid.runtime.gallery.age_bands import (
    AGE_BAND_PEOPLE,
    CHILD_BANDS,
    MEASURED_BANDS,
    MeasuredBand,
)
from edgeid.runtime.gallery.thresholds import (
    BAND_EDGES,
    DEFAULT_OPERATING_FMR,
    BandCalibration,
    Calibration,
    ScoreBand,
)


@dataclass(frozen=True)
class StrengthLine:
    """What one score band means for the probe's age band: its lower edge and its rate."""

    band: ScoreBand
    from_score: float | None  # None: below the weakest edge
    text: str

    def to_json(self) -> dict[str, object]:
        return {
            "band": self.band.value,
            "from_score": None if self.from_score is None else round(self.from_score, 4),
            "text": self.text,
        }


def one_in(rate: float) -> str:
    """``rate`` as "1 in N", N rounded down to two significant figures (1e-3: "1 in 1,000")."""
    n = round(1.0 / rate, 6)  # 1 / 1e-3 is 999.9999...
    step = 10 ** max(len(str(int(n))) - 2, 0)
    return f"1 in {int(n // step * step):,}"


def percent(share: float) -> str:
    return f"{share * 100:.3g}%"


def rate_text(cal: BandCalibration, fmr: float) -> str:
    """How often pairs of different people of the band reach the ``fmr`` threshold."""
    if cal.supports(fmr):
        return f"about {one_in(fmr)} pairs of different {cal.people} score at or above it"
    return (
        f"at most about {one_in(cal.resolution_fmr)} pairs of different {cal.people} score at "
        f"or above it (its {cal.non_mated_pairs:,} measured pairs cannot show a rarer rate)"
    )


def provenance_text(cal: BandCalibration) -> str:
    p = cal.data.provenance
    if p.in_product:
        return (
            f"Measured by this product on {p.data_set}: {p.non_mated_pairs:,} pairs of "
            f"different people (measured {p.date})."
        )
    return (
        f"Measured outside this product by {p.measured_by} on {p.data_set}, which cannot ship: "
        f"{p.non_mated_pairs:,} pairs of different people (recorded {p.date})."
    )


def threshold_sentence(cal: BandCalibration, fmr: float) -> str:
    """The operating threshold in words: for whom, how often strangers reach it, measured on
    what."""
    return (
        f"Threshold {cal.threshold(fmr):.4f} (cosine similarity), for {cal.people}: "
        f"{rate_text(cal, fmr)}. {provenance_text(cal)}"
    )


def threshold_note(cal: BandCalibration, fmr: float) -> str:
    """``threshold_sentence``, after why another band's thresholds apply when they do."""
    sentence = threshold_sentence(cal, fmr)
    return f"{cal.substitution} {sentence}" if cal.substitution else sentence


def strength_lines(cal: BandCalibration) -> tuple[StrengthLine, ...]:
    """Each score band's lower edge and what clearing it means, from the band's own figures."""
    lines = [
        StrengthLine(
            band,
            cal.threshold(fmr),
            f"{band.value}: {cal.threshold(fmr):.4f} or more; {rate_text(cal, fmr)}",
        )
        for band, fmr in BAND_EDGES
    ]
    weakest = BAND_EDGES[-1][1]
    lines.append(
        StrengthLine(
            ScoreBand.BELOW_THRESHOLD,
            None,
            f"{ScoreBand.BELOW_THRESHOLD.value}: under {cal.threshold(weakest):.4f}; more than "
            f"{one_in(cal.stated_fmr(weakest))} pairs of different {cal.people} score that high",
        )
    )
    return tuple(lines)


def calibration_json(cal: BandCalibration, fmr: float) -> dict[str, object]:
    """The thresholds a result used, for JSON (API and CLI)."""
    p = cal.data.provenance
    return {
        "age_band_used": cal.band,
        "label": cal.label,
        "substitution": cal.substitution,
        "threshold_note": threshold_note(cal, fmr),
        "fmr_supported": cal.supports(fmr),
        "stated_fmr": cal.stated_fmr(fmr),
        "resolution_fmr": cal.resolution_fmr,
        "non_mated_pairs": p.non_mated_pairs,
        "data_set": p.data_set,
        "measured_by": p.measured_by,
        "measured_in_product": p.in_product,
        "date": p.date,
        "strength": [line.to_json() for line in strength_lines(cal)],
    }


def verification_rate(cal: BandCalibration) -> float | None:
    """The band's own same-person-across-years rate, if measured."""
    return cal.data.verification.verification_rate if cal.data.verification else None


def _rate_of(calibration: Calibration, band: MeasuredBand) -> float | None:
    data = calibration.data.bands.get(band)
    return data.verification.verification_rate if data and data.verification else None


def _about(rate: float | None) -> str:
    return "not measured" if rate is None else f"about {rate:.0%}"


def reliability_note(calibration: Calibration, cal: BandCalibration) -> str:
    """How far to trust a result for the probe's age band, from the in-use model's own
    calibration; a figure its calibration does not hold is said to be not measured."""
    parts = [cal.substitution] if cal.substitution else []
    unmeasured = [b for b in MEASURED_BANDS if b not in calibration.data.bands]
    share = next(
        (s for s in cal.data.at_adult_thresholds if s.adult_fmr == DEFAULT_OPERATING_FMR), None
    )
    if share is not None:
        parts.append(
            f"At the adult default threshold ({share.score:.3f}), {percent(share.share)} of "
            f"pairs of different {cal.people} scored as a match, so this search uses the "
            f"thresholds measured for {cal.people}."
        )
    adult = _about(_rate_of(calibration, "adult"))
    # The probe's own age band decides the advice, even where another band's figures apply.
    if cal.band in CHILD_BANDS or cal.stated in CHILD_BANDS:
        child = _rate_of(calibration, "child")
        parts.append(
            "Review the candidates in rank order: each is a lead to check, and a missing "
            "match proves nothing. Enrol several photos of a child, taken at different ages."
        )
        if child is not None:
            parts.append(
                f"This model verifies the same child across years far less reliably than an "
                f"adult ({_about(child)} for children under 13, against {adult} for adults)."
            )
        else:
            parts.append(
                f"How reliably model {calibration.model_id} verifies the same child was not "
                "measured."
            )
    elif "teen" in (cal.band, cal.stated):
        parts.append(
            "Teenagers are told apart less reliably than adults: candidates are leads, not "
            "identifications."
        )
    elif _rate_of(calibration, "adult") is None:
        parts.append(
            f"How often model {calibration.model_id} verifies the same adult was not measured. "
            "Candidates are leads for a person to confirm."
        )
    else:
        parts.append(
            f"Adults: the same person across years is verified {adult} of the time by this "
            "model. Candidates are leads for a person to confirm."
        )
    if unmeasured:
        labels = ", ".join(AGE_BAND_PEOPLE[b] for b in unmeasured)
        parts.append(f"Model {calibration.model_id} was not measured on {labels}.")
    return " ".join(parts)


def cluster_note(cal: BandCalibration, fmr: float, *, children: bool) -> str:
    """A case's clustering threshold in words: for whom, how often strangers reach it, what
    the choice costs, and what was measured at such thresholds."""
    parts = [cal.substitution] if cal.substitution else []
    parts.append(
        f"Faces are grouped when their similarity reaches {cal.threshold(fmr):.4f}, the "
        f"threshold for {cal.people} at which {rate_text(cal, fmr)}."
    )
    if children:
        parts.append(
            "The case may hold children, whose faces look alike to this model: this stricter "
            "threshold keeps different children apart at a cost of more, smaller clusters. "
            "One person's faces may be split over several clusters: compare clusters by eye."
        )
    else:
        parts.append(
            "The case is set to adults only: if it holds children, different children may be "
            "merged into one cluster."
        )
    for m in cal.data.clustering:
        recall = "" if m.pairwise_recall is None else f", recall {m.pairwise_recall:.2g}"
        parts.append(
            f"Measured at {m.threshold:.3f}: pairwise precision {m.pairwise_precision:.3g}"
            f"{recall} ({m.source})."
        )
    parts.append(provenance_text(cal))
    return " ".join(parts)


def stranger_odds(cal: BandCalibration, score: float) -> str:
    """How often two different people of the band score this high, from the rarest
    calibrated rate whose threshold ``score`` clears (never finer than the band's
    measurement supports): the strength of a candidate in words, not a bare similarity."""
    entries = sorted(cal.data.thresholds, key=lambda t: t.fmr)
    cleared = [t.fmr for t in entries if score >= t.score]
    if not cleared:
        return (
            f"a stranger ({cal.people}) scores this high more often than "
            f"{one_in(entries[-1].fmr)} comparisons"
        )
    fmr = cleared[0]
    if cal.supports(fmr):
        return f"a stranger ({cal.people}) scores this high about {one_in(fmr)} comparisons"
    return (
        f"a stranger ({cal.people}) scores this high at most about {one_in(cal.resolution_fmr)} "
        f"comparisons (its {cal.non_mated_pairs:,} measured pairs cannot show a rarer rate)"
    )
