"""An operator's calibration of an embedding model, from a labelled set the agency holds.

``edgeid models calibrate NAME --images DIR`` embeds the most central face of every image of
``DIR`` (one folder per person, LFW layout) with the model, scores every pair (LFW-style 1:1
pairs, mated and non-mated) and writes the model's calibration file (format 2, the shipped
files' format) through the same ``calibrate_bands`` the shipped calibration uses: thresholds
per false-match rate, score distributions, and, where an ``--ages`` file gives the age at each
photo, each age band with enough pairs measured on its own. A band the set does not measure
is absent from the file, and every result then says so (``wording.py``).

Each measured band also records how often the model accepts two photos of the same person at
the default operating threshold (its mated pairs at or above it): the figure the reliability
note shown with every result reads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np

from edgeid.runtime.errors import BadInputError
from edgeid.runtime.evaluation.calibration import (
    LabelledTemplates,
    Source,
    calibrate_bands,
    calibration_data,
)
from edgeid.runtime.evaluation.labelled_set import read_ages, read_labelled_set
from edgeid.runtime.gallery.age_bands import MeasuredBand
from edgeid.runtime.gallery.thresholds import (
    DEFAULT_OPERATING_FMR,
    AgeBandReliability,
    BandData,
    CalibrationData,
)
from edgeid.runtime.inference.types import FloatArray

GENERATED_BY = "edgeid models calibrate"


@dataclass(frozen=True)
class LabelledImage:
    person: str
    path: Path
    age: float | None = None


def labelled_images(images_dir: Path, ages_file: Path | None = None) -> list[LabelledImage]:
    """Every image of ``images_dir/<person>/`` (read as ``edgeid eval ident`` reads a set);
    with ``ages_file`` (CSV ``image,age``, one row per image) the age at each photo."""
    labelled = read_labelled_set(images_dir)
    if len(labelled.persons) < 2:
        raise BadInputError(f"{images_dir}: needs folders of at least two people")
    if not any(len(person.images) > 1 for person in labelled.persons):
        raise BadInputError(f"{images_dir}: no person has two images, so no mated pair")
    ages = read_ages(ages_file, labelled) if ages_file is not None else {}
    return [
        LabelledImage(person.name, image, ages.get(image))
        for person in labelled.persons
        for image in person.images
    ]


@dataclass(frozen=True)
class CalibrationRun:
    data: CalibrationData
    images: int
    no_face: int


def calibrate_model(
    model_id: str,
    images: list[LabelledImage],
    embed: Callable[[Path], FloatArray | None],
    *,
    data_set: str,
    unaged: MeasuredBand = "adult",
    details: Mapping[str, object] | None = None,
    progress: Callable[[int, int], None] | None = None,
    today: date | None = None,
    identification: Mapping[str, Mapping[str, object]] | None = None,
) -> CalibrationRun:
    """The calibration file's content for ``model_id`` from the operator's labelled images;
    ``identification`` holds each band's 1:N figures (``IdentFigures.to_json()``) where the
    caller ran ``edgeid eval ident``'s protocol on the same images."""
    vectors, people, ages = [], [], []
    no_face = 0
    for done, item in enumerate(images, start=1):
        template = embed(item.path)
        if template is None:
            no_face += 1
        else:
            vectors.append(template)
            people.append(item.person)
            ages.append(item.age)
        if progress:
            progress(done, len(images))
    if len(vectors) < 2:
        raise BadInputError(f"{data_set}: faces found in {len(vectors)} image(s); need more")
    when = (today or date.today()).isoformat()
    source = Source(
        data_set=data_set,
        measured_by=GENERATED_BY,
        date=when,
        in_product=True,
        details={"no_face": no_face, "face": "the most central face of each image",
                 **(details or {})},
    )  # fmt: skip
    any_age = any(a is not None for a in ages)
    templates = LabelledTemplates(
        np.stack(vectors).astype(np.float32), people, ages if any_age else None
    )
    bands = {
        name: with_verification(band) for name, band in calibrate_bands(templates, source,
                                                                       unaged=unaged).items()
    }  # fmt: skip
    if identification is not None:  # 1:N figures (edgeid eval ident) beside the 1:1 pairs
        bands = {
            name: with_identification(band, identification.get(name))
            for name, band in bands.items()
        }
    caveats = [
        "Measured by the operator's own labelled set: the figures hold for people and photos "
        "like those of the set.",
    ]
    if not any_age:
        caveats.append(
            f"The set gave no ages: every pair was counted for the {unaged} band; other age "
            "bands are not measured."
        )
    data = calibration_data(
        model_id, bands, generated=when, generated_by=GENERATED_BY, caveats=caveats
    )
    return CalibrationRun(data, len(images), no_face)


def with_identification(band: BandData, figures: Mapping[str, object] | None) -> BandData:
    """``band`` with its 1:N search figures kept in its provenance (none: unchanged)."""
    if figures is None:
        return band
    details = {**band.provenance.details, "identification": dict(figures)}
    provenance = band.provenance.model_copy(update={"details": details})
    return band.model_copy(update={"provenance": provenance})


def with_verification(band: BandData) -> BandData:
    """``band`` with the share of its mated pairs at the default operating threshold."""
    tar = next(
        (t.tar for t in band.thresholds if t.fmr == DEFAULT_OPERATING_FMR and t.tar is not None),
        None,
    )
    if tar is None:
        return band
    return band.model_copy(
        update={
            "verification": AgeBandReliability(
                verification_rate=tar,
                source=f"{GENERATED_BY}: share of the band's "
                f"{band.provenance.mated_pairs} mated pairs at or above the threshold for a "
                f"false-match rate of {DEFAULT_OPERATING_FMR:g}",
            )
        }
    )
