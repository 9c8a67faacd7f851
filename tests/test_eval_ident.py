"""`edgeid eval ident`: open-set 1:N figures through the product's gallery search, checked
against a brute-force reference computed here with numpy over the same templates."""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeid.cli import main
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.evaluation.identification import (
    IdentPlan,
    IdentProtocol,
    IdentReport,
    TemplateCache,
    evaluate_identification,
    plan_identification,
)
from edgeid.runtime.evaluation.labelled_set import LabelledSet, read_labelled_set
from edgeid.runtime.evaluation.lfw import central_face_embedder
from edgeid.runtime.inference.pipeline import FacePipeline
from edgeid.runtime.inference.types import FloatArray

PERSONS = 10  # LFW dev people with 3+ images (sorted: the same every run)
DISTRACTORS = 16  # LFW dev people with one image
LEFT_OUT = 3
# A coarse FPIR (floor(0.25 n) non-mated searches may score above the threshold) checks the
# threshold rule where it accepts some; 1e-2 is below this set's resolution (none may).
FPIRS = (0.25, 1e-2)


@dataclass(frozen=True)
class SmallSet:
    images: Path
    distractors: Path


@pytest.fixture(scope="module")
def small_set(lfw_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SmallSet:
    """Links to LFW dev folders: PERSONS people with 3+ images, DISTRACTORS with one."""
    root = tmp_path_factory.mktemp("ident")
    (root / "images").mkdir()
    (root / "distractors").mkdir()
    several = single = 0
    for folder in sorted((lfw_dir / "images").iterdir()):
        count = len(list(folder.glob("*.jpg")))
        if count >= 3 and several < PERSONS:
            (root / "images" / folder.name).symlink_to(folder)
            several += 1
        elif count == 1 and single < DISTRACTORS:
            (root / "distractors" / folder.name).symlink_to(folder)
            single += 1
    assert several == PERSONS and single == DISTRACTORS
    return SmallSet(root / "images", root / "distractors")


@pytest.fixture(scope="module")
def pipeline(models_dir: Path) -> FacePipeline:
    return FacePipeline.load(models_dir)


# Per-coordinate noise added to the noisy templates (norm about 0.57 against the template's
# 1): with it, mates of this small set fall to rank 2-3 and below non-mated scores, so ranks
# and FNIR have something to get wrong (real LFW templates put every mate first, FNIR 0).
NOISE = 0.05


@dataclass(frozen=True)
class Runs:
    images: LabelledSet
    distractors: LabelledSet
    caches: dict[str, TemplateCache]  # "real", "noisy"
    reports: dict[tuple[str, str], IdentReport]  # (templates, enrolment)


def noisy(cache: TemplateCache) -> TemplateCache:
    """The real templates plus fixed noise per image (seeded by its name), unit length."""

    def embed(path: Path) -> FloatArray | None:
        template = cache[path]
        if template is None:
            return None
        rng = np.random.default_rng(zlib.crc32(path.name.encode()))
        moved = template + rng.normal(0, NOISE, template.shape).astype(np.float32)
        unit: FloatArray = moved / np.linalg.norm(moved)
        return unit

    return TemplateCache(embed)


@pytest.fixture(scope="module")
def runs(small_set: SmallSet, pipeline: FacePipeline) -> Runs:
    """Both enrolments on the same probes, with real and noisy templates, each image embedded
    once."""
    images = read_labelled_set(small_set.images, min_images=2)
    distractors = read_labelled_set(small_set.distractors, option="--distractors")
    real = TemplateCache(central_face_embedder(pipeline))
    caches = {"real": real, "noisy": noisy(real)}
    reports = {
        (kind, mode): evaluate_identification(
            pipeline,
            images,
            IdentProtocol(mode, LEFT_OUT, seed=7, fpirs=FPIRS),
            distractors=distractors,
            templates=cache,
        )
        for kind, cache in caches.items()
        for mode in ("1", "all-but-one")
    }
    return Runs(images, distractors, caches, reports)


# -- the brute-force reference ---------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    ranks: list[int | None]  # per mated probe, in plan order
    mate_scores: list[float | None]
    tops: list[float]  # per probe, in plan order
    cmc: list[float]
    fnir: dict[float, float]


def reference(plan: IdentPlan, cache: TemplateCache, fpirs: Sequence[float]) -> Reference:
    """Every probe scored against every enrolled face; a subject ranks by its best face."""
    owners, rows = [], []
    for person, paths in plan.enrolled:
        for path in paths:
            template = cache[path]
            if template is not None:
                owners.append(person)
                rows.append(template)
    gallery = np.stack(rows).astype(np.float64)
    owner = np.array(owners)
    ranks: list[int | None] = []
    mate_scores: list[float | None] = []
    tops: list[float] = []
    for probe in plan.probes:
        template = cache[probe.image]
        assert template is not None  # the small set's images all show a face
        scores = np.clip(gallery @ template.astype(np.float64), -1.0, 1.0)
        best = {p: float(scores[owner == p].max()) for p in set(owners)}
        tops.append(float(scores.max()))
        if probe.mated:
            ordered = sorted(best, key=lambda p: -best[p])
            ranks.append(ordered.index(probe.person) + 1 if probe.person in best else None)
            mate_scores.append(best.get(probe.person))
    non_mated = np.array([t for t, p in zip(tops, plan.probes, strict=True) if not p.mated])
    limit = 50
    cmc = [float(np.mean([r is not None and r <= k for r in ranks])) for k in range(1, limit + 1)]
    fnir = {}
    for fpir in fpirs:
        # The lowest threshold whose FPIR is at most the target: try every candidate.
        candidates = [-math.inf] + [float(s) + 1e-9 for s in non_mated]
        threshold = min(t for t in candidates if np.mean(non_mated >= t) <= fpir)
        fnir[fpir] = float(
            np.mean(
                [
                    not (r is not None and r <= limit and s is not None and s >= threshold)
                    for r, s in zip(ranks, mate_scores, strict=True)
                ]
            )
        )
    return Reference(ranks, mate_scores, tops, cmc, fnir)


@pytest.mark.parametrize("kind", ["real", "noisy"])
@pytest.mark.parametrize("mode", ["1", "all-but-one"])
def test_figures_equal_a_brute_force_search_over_the_same_templates(
    runs: Runs, kind: str, mode: str
) -> None:
    report = runs.reports[kind, mode]
    ref = reference(report.plan, runs.caches[kind], FPIRS)
    if kind == "noisy":  # the comparison has ranks and misses to get wrong
        assert any(rank != 1 for rank in ref.ranks) and 0 < ref.fnir[FPIRS[0]] < 1
    mated = [o for o in report.outcomes if o.mated]
    assert [o.mate_rank for o in mated] == ref.ranks
    # hnswlib keeps each template re-normalised in float32: scores agree to ~1e-7.
    assert [o.mate_score for o in mated] == pytest.approx(ref.mate_scores, abs=1e-6)
    assert [o.top_score for o in report.outcomes] == pytest.approx(ref.tops, abs=1e-6)
    assert list(report.overall.cmc) == ref.cmc
    assert report.overall.hit_rates == {r: ref.cmc[r - 1] for r in (1, 10, 50)}
    for point in report.overall.fnir_at_fpir:
        assert point.fnir == pytest.approx(ref.fnir[point.target_fpir], abs=1e-12)
        assert point.measured_fpir is not None and point.measured_fpir <= point.target_fpir
    assert report.overall.ranks_unresolved == 0
    non_mated = report.overall.non_mated_searches
    assert [p.resolved for p in report.overall.fnir_at_fpir] == [f >= 1 / non_mated for f in FPIRS]
    # A real search, not a trivial one: the gallery holds every mated person and distractor.
    assert report.gallery_subjects == PERSONS - LEFT_OUT + DISTRACTORS
    assert report.overall.mated_searches == PERSONS - LEFT_OUT
    assert non_mated >= 3 * LEFT_OUT


def test_enrolments_share_probes_and_keep_probes_and_left_out_persons_out_of_the_gallery(
    runs: Runs,
) -> None:
    one, all_but_one = runs.reports["real", "1"].plan, runs.reports["real", "all-but-one"].plan
    assert one.probes == all_but_one.probes
    persons = {p.name: p for p in runs.images.persons}
    left_out = {p.person for p in one.probes if not p.mated}
    assert len(left_out) == LEFT_OUT
    for plan in (one, all_but_one):
        enrolled = dict(plan.enrolled)
        assert not left_out & set(enrolled)
        for probe in (p for p in plan.probes if p.mated):
            assert probe.image not in enrolled[probe.person]
    for person, images in all_but_one.enrolled:
        if person in persons:
            assert len(images) == len(persons[person].images) - 1
            assert len(dict(one.enrolled)[person]) == 1
            assert set(dict(one.enrolled)[person]) <= set(images)
    faces = {mode: runs.reports["real", mode].gallery_faces for mode in ("1", "all-but-one")}
    assert faces["all-but-one"] > faces["1"]


def test_the_split_is_seeded(runs: Runs) -> None:
    protocol = IdentProtocol("1", LEFT_OUT, seed=7)
    again = plan_identification(runs.images, protocol, runs.distractors)
    assert again == runs.reports["real", "1"].plan
    other = plan_identification(runs.images, IdentProtocol("1", LEFT_OUT, seed=8))
    assert other.probes != again.probes


def test_a_distractor_named_like_a_person_of_the_set_is_skipped(runs: Runs) -> None:
    """The same person enrolled as a distractor would be a mate the figures do not know."""
    plan = plan_identification(runs.images, IdentProtocol("1", LEFT_OUT), runs.images)
    assert plan.distractors_skipped == PERSONS and plan.distractor_persons == 0


def test_every_figure_per_age_band(runs: Runs, pipeline: FacePipeline) -> None:
    """Ages given per image: each band's figures are those of its own probes."""
    names = [p.name for p in runs.images.persons]
    ages = {
        image: (4.0 if names.index(p.name) % 2 else 30.0)
        for p in runs.images.persons
        for image in p.images
    }
    protocol = IdentProtocol("all-but-one", LEFT_OUT, seed=7, fpirs=FPIRS)
    report = evaluate_identification(
        pipeline, runs.images, protocol, distractors=runs.distractors, ages=ages,
        templates=runs.caches["noisy"],
    )  # fmt: skip
    assert set(report.by_age_band) == {"adult", "child", "child_0_5"}
    mated_children = [o for o in report.outcomes if o.mated and ages[o.image] < 18]
    child = report.by_age_band["child_0_5"]
    assert child.mated_searches == len(mated_children)
    assert child.non_mated_searches == sum(
        1 for o in report.outcomes if not o.mated and ages[o.image] < 18
    )
    expected = [
        float(np.mean([o.mate_rank is not None and o.mate_rank <= r for o in mated_children]))
        for r in (1, 10, 50)
    ]
    assert [child.hit_rates[r] for r in (1, 10, 50)] == expected
    assert report.by_age_band["child"] == child  # 0-12 holds the same probes here
    assert report.overall == runs.reports["noisy", "all-but-one"].overall


def test_eval_ident_cli_reports_both_enrolments_and_draws_the_cmc(
    runs: Runs,
    small_set: SmallSet,
    models_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    png = tmp_path / "cmc.png"
    code = main(
        [
            "eval", "ident", "--images", str(small_set.images),
            "--distractors", str(small_set.distractors), "--enrol", "1",
            "--enrol", "all-but-one", "--left-out", str(LEFT_OUT), "--seed", "7",
            "--cmc", str(png), "--home", str(models_dir.parent), "--json",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    payload = json.loads(out)
    assert set(payload["enrolments"]) == {"1", "all-but-one"}
    for mode in ("1", "all-but-one"):
        report = runs.reports["real", mode]
        got = payload["enrolments"][mode]
        hit_rates = report.overall.hit_rates.items()
        assert got["hit_rate"] == {str(r): round(v or 0, 4) for r, v in hit_rates}
        assert got["gallery_subjects"] == report.gallery_subjects
        assert got["gallery_faces"] == report.gallery_faces
        assert got["fnir_at_fpir"][0]["fpir"] == 1e-2
        assert got["fpir_resolution"] == round(1 / report.overall.non_mated_searches, 6)
        assert got["rank_limit"] == 50 and len(got["cmc"]) == 50
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 100


# -- refusals: one line, exit 2, before any model loads ---------------------------------------


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeid: error:") and "\n" not in err
    return err


def test_a_person_with_one_image_is_refused_under_all_but_one(
    small_set: SmallSet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    err = _refused(
        ["eval", "ident", "--images", str(small_set.distractors), "--enrol", "all-but-one",
         "--home", str(home)],
        capsys,
    )  # fmt: skip
    assert "fewer than 2 images" in err and "--min-images 2" in err


@pytest.mark.parametrize(
    ("rows", "says"),
    [
        ("image,age\nNobody/Nobody_0001.jpg,30\n", "not found under"),
        ("{first},thirty\n", "is not a number of years"),
        ("{first},30\n", "no age for"),
        ("{first},-4\n", "is not between 0 and"),
    ],
    ids=["unknown-image", "non-numeric", "image-without-age", "negative"],
)
def test_a_wrong_ages_file_is_refused(
    small_set: SmallSet,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    rows: str,
    says: str,
) -> None:
    first = sorted(small_set.images.iterdir())[0]
    ages = tmp_path / "ages.csv"
    ages.write_text(rows.format(first=f"{first.name}/{sorted(first.iterdir())[0].name}"))
    home = tmp_path / "home"
    home.mkdir()
    err = _refused(
        ["eval", "ident", "--images", str(small_set.images), "--ages", str(ages),
         "--home", str(home)],
        capsys,
    )  # fmt: skip
    assert says in err and "--ages" in err


def test_leaving_everyone_out_is_refused(
    small_set: SmallSet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    err = _refused(
        ["eval", "ident", "--images", str(small_set.images), "--left-out", str(PERSONS),
         "--home", str(home)],
        capsys,
    )  # fmt: skip
    assert "at least one must be enrolled" in err


def test_min_images_skips_the_persons_it_would_refuse(small_set: SmallSet) -> None:
    """The folders --min-images skips are those refused without it, and only those."""
    with pytest.raises(BadInputError, match="fewer than 4 images"):
        read_labelled_set(small_set.images, min_images=4)
    kept = read_labelled_set(small_set.images, min_images=4, skip_fewer=True)
    counts = [len(list(folder.iterdir())) for folder in small_set.images.iterdir()]
    assert len(kept.persons) == sum(1 for c in counts if c >= 4) > 0
    assert kept.skipped == sum(1 for c in counts if c < 4) > 0
