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

import csv
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
from edgeid.runtime.gallery.age_bands import MeasuredBand
from edgeid.runtime.gallery.thresholds import (
    DEFAULT_OPERATING_FMR,
    AgeBandReliability,
    BandData,
    CalibrationData,
)
from edgeid.runtime.inference.types import FloatArray

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MIN_IMAGES_PER_PERSON = 1
GENERATED_BY = "edgeid models calibrate"


@dataclass(frozen=True)
class LabelledImage:
    person: str
    path: Path
    age: float | None = None


def labelled_images(images_dir: Path, ages_file: Path | None = None) -> list[LabelledImage]:
    """Every image of ``images_dir/<person>/``; with ``ages_file`` (CSV ``image,age``, image
    as a path relative to ``images_dir`` or a bare file name) the age at each photo."""
    if not images_dir.is_dir():
        raise BadInputError(f"{images_dir}: not a folder (one folder of images per person)")
    found = [
        LabelledImage(person.name, image)
        for person in sorted(p for p in images_dir.iterdir() if p.is_dir())
        for image in sorted(person.iterdir())
        if image.suffix.lower() in IMAGE_SUFFIXES
    ]
    people = {item.person for item in found}
    if len(people) < 2:
        raise BadInputError(f"{images_dir}: needs folders of at least two people")
    if not any(sum(1 for i in found if i.person == p) > 1 for p in people):
        raise BadInputError(f"{images_dir}: no person has two images, so no mated pair")
    if ages_file is None:
        return found
    ages = read_ages(ages_file)
    aged = []
    for item in found:
        relative = str(item.path.relative_to(images_dir))
        age = ages.get(relative, ages.get(item.path.name))
        aged.append(LabelledImage(item.person, item.path, age))
    if not any(item.age is not None for item in aged):
        raise BadInputError(f"{ages_file}: names none of the images of {images_dir}")
    return aged


def read_ages(path: Path) -> dict[str, float]:
    """``image,age`` rows (a header row is allowed); BadInputError naming the bad line."""
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: cannot read the ages file ({exc})") from exc
    ages: dict[str, float] = {}
    for line, row in enumerate(rows, start=1):
        if not row or (line == 1 and row[-1].strip().lower() == "age"):
            continue
        try:
            image, age = row[0].strip(), float(row[1])
        except (IndexError, ValueError):
            raise BadInputError(f"{path} line {line}: expected 'image,age'") from None
        if not 0 <= age <= 130:
            raise BadInputError(f"{path} line {line}: age {age} is not an age in years")
        ages[image] = age
    return ages


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
) -> CalibrationRun:
    """The calibration file's content for ``model_id`` from the operator's labelled images."""
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
    # HOOK(eval-ident): once `edgeid eval ident` (edgeid/runtime/evaluation/identification.py)
    # is merged, run it here on the same templates and people (1:N: CMC at rank 1/10/50, FNIR
    # at FPIR 1e-2 and 1e-3, per age band where ages are given) and keep its figures in each
    # band's provenance details, e.g. bands[name].provenance.details["identification"].
    # The lead wires it after merging; until then the file holds the 1:1 pair figures only.
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
