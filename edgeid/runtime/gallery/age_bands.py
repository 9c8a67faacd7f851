"""The probe's stated age band: which thresholds, score bands and wording a search uses.

Faces of children are told apart far less reliably than adults' (for the shipped model, at the
adult default threshold 43% of pairs of different children aged 0-5 score as a match), so every
calibration holds thresholds per age band and a search uses the band its investigator states.
``unknown`` is not measured: it takes the strictest band the box has (``Calibration.for_age``).
"""

from __future__ import annotations

from typing import Literal

AgeBand = Literal["unknown", "adult", "teen", "child", "child_6_12", "child_0_5"]
MeasuredBand = Literal["adult", "teen", "child", "child_6_12", "child_0_5"]

# The order the search form and the CLI offer them in: "not known" first (the default).
AGE_BANDS: tuple[AgeBand, ...] = ("unknown", "adult", "teen", "child", "child_6_12", "child_0_5")
MEASURED_BANDS: tuple[MeasuredBand, ...] = ("adult", "teen", "child", "child_6_12", "child_0_5")

# Ages in whole years at the photo, [first, last]; None: no upper limit. "child" is 0-12 as a
# whole, for a child whose age is not known more closely; it overlaps the two child bands.
AGE_RANGES: dict[MeasuredBand, tuple[int, int | None]] = {
    "adult": (18, None),
    "teen": (13, 17),
    "child": (0, 12),
    "child_6_12": (6, 12),
    "child_0_5": (0, 5),
}

AGE_BAND_LABELS: dict[AgeBand, str] = {
    "unknown": "Not known",
    "adult": "Adult (18+)",
    "teen": "Teenager (13-17)",
    "child": "Child under 13, age not known more closely",
    "child_6_12": "Child aged 6-12",
    "child_0_5": "Young child aged 0-5",
}

# How a sentence names the people of a band: "pairs of different {people}".
AGE_BAND_PEOPLE: dict[MeasuredBand, str] = {
    "adult": "adults",
    "teen": "teenagers aged 13-17",
    "child": "children aged 0-12",
    "child_6_12": "children aged 6-12",
    "child_0_5": "children aged 0-5",
}

CHILD_BANDS: frozenset[MeasuredBand] = frozenset({"child", "child_6_12", "child_0_5"})


def check_age_band(value: str) -> AgeBand:
    """``value`` as an age band; ValueError naming the choices when it is none."""
    for band in AGE_BANDS:
        if value == band:
            return band
    raise ValueError(f"the age band must be one of {', '.join(AGE_BANDS)}")


def bands_of_age(age: float) -> tuple[MeasuredBand, ...]:
    """Every measured band an age in years falls in (a child is in "child" and one sub-band)."""
    years = int(age)
    found = []
    for band in MEASURED_BANDS:
        first, last = AGE_RANGES[band]
        if years >= first and (last is None or years <= last):
            found.append(band)
    return tuple(found)
