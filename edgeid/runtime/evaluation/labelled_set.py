"""A labelled image set for 1:N evaluation: one folder per person (LFW's layout), and ages.

``read_labelled_set`` lists ``DIR/<person>/<image>`` (JPEG or PNG, sorted, so every run sees
the same order). ``read_ages`` reads a CSV of ``image,age`` rows (an optional header), the
image named by its path under DIR (``Name/Name_0001.jpg``) or, where unique, its file name.
Every error is a ``BadInputError`` whose one line names the row or folder and the fix.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from edgeid.runtime.errors import BadInputError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
# How many offending names an error message lists before "and N more".
NAMES_SHOWN = 3
# Oldest age accepted: a larger number is a typo (or a year of birth), not an age.
MAX_AGE_YEARS = 130


@dataclass(frozen=True)
class Person:
    name: str  # the folder's name: the person's label, never written to logs
    images: tuple[Path, ...]


@dataclass(frozen=True)
class LabelledSet:
    root: Path
    persons: tuple[Person, ...]
    # Person folders left out for having fewer than ``min_images`` images.
    skipped: int = 0

    @property
    def images(self) -> tuple[Path, ...]:
        return tuple(image for person in self.persons for image in person.images)

    def names(self) -> frozenset[str]:
        return frozenset(person.name for person in self.persons)


def _images_of(folder: Path) -> tuple[Path, ...]:
    return tuple(
        sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    )


def read_labelled_set(
    root: Path, *, min_images: int = 1, skip_fewer: bool = False, option: str = "--images"
) -> LabelledSet:
    """The persons of ``root``. A folder with fewer than ``min_images`` images is refused, or
    left out when ``skip_fewer`` (and counted in ``skipped``)."""
    if not root.is_dir():
        raise BadInputError(f"{option} {root}: not a folder (one folder of images per person)")
    persons: list[Person] = []
    short: list[str] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = _images_of(folder)
        if len(images) < min_images:
            short.append(f"{folder.name} ({len(images)})")
            continue
        persons.append(Person(folder.name, images))
    if short and not skip_fewer:
        raise BadInputError(
            f"{option} {root}: {_listed(short)} hold(s) fewer than {min_images} images, which "
            f"this evaluation needs per person; remove them or pass --min-images {min_images} "
            "to skip them"
        )
    if not persons:
        raise BadInputError(f"{option} {root}: no person folder with {min_images}+ images")
    return LabelledSet(root, tuple(persons), skipped=len(short))


def read_ages(path: Path, images: LabelledSet) -> dict[Path, float]:
    """The age in years of every image of ``images``, from a CSV of ``image,age`` rows."""
    by_relative = {image.relative_to(images.root).as_posix(): image for image in images.images}
    by_name: dict[str, list[Path]] = {}
    for image in images.images:
        by_name.setdefault(image.name, []).append(image)
    try:
        with path.open(encoding="utf-8", newline="") as stream:
            rows = list(csv.reader(stream))
    except OSError as exc:
        raise BadInputError(f"--ages {path}: cannot read ({exc.strerror})") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise BadInputError(f"--ages {path}: not a UTF-8 CSV file of image,age rows") from exc
    ages: dict[Path, float] = {}
    unknown: list[str] = []
    for line_no, row in enumerate(rows, start=1):
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue
        if len(cells) != 2:
            raise BadInputError(f"--ages {path} line {line_no}: expected 'image,age'")
        name, text = cells
        known = name in by_relative or name in by_name
        if line_no == 1 and not known and not _is_number(text):
            continue  # a header row ("image,age"): neither an image nor an age
        age = _age(text, f"--ages {path} line {line_no}")
        named = by_name.get(name, [])
        found = by_relative.get(name) or (named[0] if len(named) == 1 else None)
        if found is None:
            unknown.append(name)
            continue
        if found in ages:
            raise BadInputError(f"--ages {path} line {line_no}: a second age for {name}")
        ages[found] = age
    if unknown:
        raise BadInputError(
            f"--ages {path}: {_listed(unknown)} not found under {images.root} (give the path "
            "under that folder, e.g. Name/Name_0001.jpg)"
        )
    missing = [i.relative_to(images.root).as_posix() for i in images.images if i not in ages]
    if missing:
        raise BadInputError(
            f"--ages {path}: no age for {_listed(missing)}; give one 'image,age' row per image"
        )
    return ages


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _age(text: str, where: str) -> float:
    try:
        age = float(text)
    except ValueError:
        raise BadInputError(f"{where}: age {text!r} is not a number of years") from None
    if not math.isfinite(age) or not 0 <= age <= MAX_AGE_YEARS:
        raise BadInputError(f"{where}: age {text!r} is not between 0 and {MAX_AGE_YEARS}")
    return age


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    more = len(names) - NAMES_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown
