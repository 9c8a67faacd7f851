"""Thresholds per age band: the calibration file, its writer, ``unknown``, re-scoring, and
wording that never states a false-match rate a band's measurement does not support."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgeid.runtime.errors import BadInputError
from edgeid.runtime.evaluation.calibration import (
    MIN_BAND_NON_MATED_PAIRS,
    LabelledTemplates,
    Source,
    calibrate_bands,
    calibration_data,
    pair_scores,
    resolution_for,
)
from edgeid.runtime.gallery.age_bands import AGE_BANDS, MEASURED_BANDS, bands_of_age
from edgeid.runtime.gallery.service import Candidate, Reliability, SearchResult, reliability_of
from edgeid.runtime.gallery.thresholds import (
    CALIBRATED_FMRS,
    DEFAULT_OPERATING_FMR,
    Calibration,
    CalibrationError,
    ScoreBand,
    load_calibration,
    parse_calibration,
)
from edgeid.runtime.gallery.wording import (
    one_in,
    reliability_note,
    strength_lines,
    threshold_note,
)
from edgeid.runtime.inference.pipeline import EMBEDDER_MODEL

VECTORS = Path(__file__).resolve().parent / "vectors" / "calibration"
# The figures of issue 21, measured outside this product: thresholds that give FMR 1e-2,
# 1e-3 and 1e-4, the non-mated pairs, and the share at the adult 1e-2/1e-3/1e-4 thresholds.
OUTSIDE = {
    "child_0_5": ((0.959, 0.967, 0.972), 25_991, (0.75, 0.43, 0.175)),
    "child_6_12": ((0.945, 0.955, 0.961), 30_197, (0.40, 0.13, 0.027)),
    "child": ((0.952, 0.962, 0.969), 112_302, (0.50, 0.21, 0.065)),
    "teen": ((0.930, 0.945, 0.953), 12_429, (0.11, 0.020, 0.0029)),
}


@pytest.fixture(scope="module")
def shipped() -> Calibration:
    return load_calibration(EMBEDDER_MODEL)


def band_file(thresholds: dict[str, tuple[float, float, float]], pairs: int = 100_000) -> str:
    """A calibration file (format 2) holding the given bands' FMR 1e-2/1e-3/1e-4 thresholds."""
    bands = {
        name: {
            "provenance": {
                "data_set": f"synthetic {name} set",
                "non_mated_pairs": pairs,
                "date": "2026-12-06",
                "measured_by": "tests/test_thresholds.py",
                "in_product": True,
                "pairs": "both images in the band",
            },
            "resolution_fmr": resolution_for(pairs),
            "thresholds": [
                {"fmr": fmr, "score": score}
                for fmr, score in zip((1e-2, 1e-3, 1e-4), scores, strict=True)
            ],
        }
        for name, scores in thresholds.items()
    }
    return json.dumps(
        {
            "format": 2,
            "model_id": "test_model",
            "score": "cosine",
            "generated": "2026-12-06",
            "generated_by": "test",
            "method": "test",
            "bands": bands,
        }
    )


def candidate(rank: int, score: float) -> Candidate:
    return Candidate(
        rank, "g", f"{rank:032x}", f"subject {rank}", f"{rank:032x}", score,
        ScoreBand.BELOW_THRESHOLD, False,
    )  # fmt: skip


# -- the shipped file --------------------------------------------------------------------------


def test_shipped_file_carries_the_outside_figures_for_children_and_teens_and_lfw_for_adults(
    shipped: Calibration,
) -> None:
    assert shipped.bands == MEASURED_BANDS
    for name, (scores, pairs, shares) in OUTSIDE.items():
        band = shipped.data.bands[name]  # type: ignore[index]
        assert [t.score for t in band.thresholds] == list(scores)
        assert [t.fmr for t in band.thresholds] == [1e-2, 1e-3, 1e-4]
        assert band.provenance.non_mated_pairs == pairs
        assert band.provenance.in_product is False
        assert "82 people" in band.provenance.data_set
        assert any("cannot ship" in c for c in band.caveats)
        assert [s.share for s in band.at_adult_thresholds] == list(shares)
        assert [s.score for s in band.at_adult_thresholds] == [0.907, 0.925, 0.939]
        assert band.resolution_fmr == resolution_for(pairs) >= 3 / pairs
    adult = shipped.data.bands["adult"]
    assert adult.provenance.in_product is True and "LFW" in adult.provenance.data_set
    assert adult.provenance.non_mated_pairs == 1_197_943
    assert [t.score for t in adult.thresholds] == [0.906956, 0.925374, 0.939, 0.950829]
    assert any("64,177" in c and "0.56%" in c for c in adult.caveats)  # the 18+ cross-check


def test_unknown_uses_the_strictest_band_and_says_so(shipped: Calibration) -> None:
    unknown = shipped.for_age("unknown")
    assert shipped.strictest() == "child_0_5"
    assert unknown.band == "child_0_5" and unknown.stated == "unknown"
    assert unknown.data == shipped.band("child_0_5").data
    for fmr in (1e-2, 1e-3, 1e-4):
        assert unknown.threshold(fmr) == max(shipped.band(b).threshold(fmr) for b in shipped.bands)
    assert unknown.substitution is not None and "strictest" in unknown.substitution
    assert "Age not stated" in threshold_note(unknown, DEFAULT_OPERATING_FMR)
    assert "Age not stated" in reliability_note(shipped, unknown)
    assert shipped.for_age("child_0_5").substitution is None


def test_strictest_is_chosen_by_thresholds_not_by_name() -> None:
    calibration = parse_calibration(
        band_file({"adult": (0.90, 0.92, 0.94), "teen": (0.95, 0.96, 0.97)}), "test"
    )
    unknown = calibration.for_age("unknown")
    assert unknown.band == "teen" and unknown.threshold(1e-3) == 0.96
    # Measured on teenagers only: for a younger probe the rates said are too low; it says so.
    assert unknown.substitution is not None and "younger person" in unknown.substitution


def test_a_band_the_model_lacks_uses_the_strictest_and_warns_for_younger_probes() -> None:
    """An operator's calibration without ages holds adults only: a child probe gets the adult
    thresholds, and the wording says their rates do not hold for children."""
    calibration = parse_calibration(band_file({"adult": (0.90, 0.92, 0.94)}), "test")
    applied = calibration.for_age("child_0_5")
    assert applied.band == "adult" and applied.threshold(1e-3) == 0.92
    assert applied.substitution is not None
    assert "not calibrated" in applied.substitution and "younger person" in applied.substitution
    assert calibration.for_age("adult").substitution is None


# -- the band decides -------------------------------------------------------------------------


def test_the_same_scores_clear_different_thresholds_as_the_band_changes() -> None:
    calibration = parse_calibration(
        band_file(
            {
                "adult": (0.907, 0.925, 0.939),
                "teen": (0.930, 0.945, 0.953),
                "child": (0.952, 0.962, 0.969),
                "child_6_12": (0.945, 0.955, 0.961),
                "child_0_5": (0.959, 0.967, 0.972),
            }
        ),
        "test",
    )
    scores = [candidate(i, s) for i, s in enumerate([0.968, 0.958, 0.950, 0.930, 0.920], 1)]
    above = {
        band: [c.score for c in calibration.for_age(band).decide(scores).matches]
        for band in AGE_BANDS
    }
    assert above == {
        "adult": [0.968, 0.958, 0.950, 0.930],
        "teen": [0.968, 0.958, 0.950],
        "child_6_12": [0.968, 0.958],
        "child": [0.968],
        "child_0_5": [0.968],
        "unknown": [0.968],
    }
    bands = {
        b: [c.band for c in calibration.for_age(b).decide(scores).candidates] for b in AGE_BANDS
    }
    assert bands["adult"][0] is ScoreBand.STRONG and bands["child_0_5"][0] is ScoreBand.MODERATE
    assert bands["adult"][3] is ScoreBand.MODERATE and bands["teen"][3] is ScoreBand.WEAK


def _result(calibration: Calibration, scores: list[float], band: str) -> SearchResult:
    applied = calibration.for_age(band)  # type: ignore[arg-type]
    threshold = applied.threshold(DEFAULT_OPERATING_FMR)
    raw = [candidate(i, s) for i, s in enumerate(scores, 1)]
    decided = applied.decide(raw)
    candidates = tuple(
        replace(c, band=d.band, above_threshold=d.above_threshold)
        for c, d in zip(raw, decided.candidates, strict=True)
    )
    return SearchResult(
        model_id=calibration.model_id,
        galleries=("g",),
        operating_fmr=DEFAULT_OPERATING_FMR,
        threshold=threshold,
        candidates=candidates,
        reliability=reliability_of(calibration, applied),
        searched_faces=len(scores),
        calibration=applied,
    )


def test_rescoring_judges_the_same_candidates_for_another_band_without_searching(
    shipped: Calibration,
) -> None:
    adult = _result(shipped, [0.97, 0.95, 0.93, 0.90], "adult")
    assert [c.above_threshold for c in adult.candidates] == [True, True, True, False]
    child = adult.rescored("child_0_5", shipped)
    assert [(c.rank, c.face_id, c.score) for c in child.candidates] == [
        (c.rank, c.face_id, c.score) for c in adult.candidates
    ]
    assert [c.above_threshold for c in child.candidates] == [True, False, False, False]
    assert child.threshold == 0.967 and child.age_band == "child_0_5"
    assert child.reliability.age_band == "child_0_5" and "43%" in child.reliability.note
    assert child.to_json()["calibration"]["age_band_used"] == "child_0_5"  # type: ignore[index]
    back = child.rescored("adult", shipped)
    assert back.candidates == adult.candidates and back.threshold == adult.threshold
    unknown = adult.rescored("unknown", shipped)
    assert unknown.threshold == child.threshold and unknown.calibration.band == "child_0_5"
    other = parse_calibration(band_file({"adult": (0.9, 0.92, 0.94)}), "other")
    with pytest.raises(CalibrationError, match="cannot be re-scored"):
        adult.rescored("adult", other)


# -- refusals ---------------------------------------------------------------------------------


def test_old_format_calibration_is_refused_with_a_message_naming_the_fix() -> None:
    text = (VECTORS / "format1_single_band.json").read_text(encoding="utf-8")
    with pytest.raises(CalibrationError) as refused:
        parse_calibration(text, "dlib_resnet_v1.json")
    message = str(refused.value)
    assert "old single-band format" in message and "adults only" in message
    assert "python -m benchmarks.calibrate_thresholds" in message
    newer = json.loads(band_file({"adult": (0.9, 0.92, 0.94)})) | {"format": 3}
    with pytest.raises(CalibrationError, match=r"format 3.*reads format 2"):
        parse_calibration(json.dumps(newer), "future.json")


def test_a_resolution_finer_than_the_pairs_support_is_refused() -> None:
    raw = json.loads(band_file({"teen": (0.93, 0.945, 0.953)}, pairs=12_429))
    raw["bands"]["teen"]["resolution_fmr"] = 1e-4  # 3 / 12,429 is 2.4e-4
    with pytest.raises(CalibrationError, match=r"resolution_fmr.*finer than 12429"):
        parse_calibration(json.dumps(raw), "test")
    raw["bands"]["teen"]["thresholds"].pop()  # no 1e-4: the strong band has no edge
    raw["bands"]["teen"]["resolution_fmr"] = 2.42e-4
    with pytest.raises(CalibrationError, match="no threshold for fmr"):
        parse_calibration(json.dumps(raw), "test")


# -- wording ----------------------------------------------------------------------------------


def test_one_in_rounds_down_so_the_rate_said_is_never_rarer_than_measured() -> None:
    assert one_in(1e-2) == "1 in 100" and one_in(1e-3) == "1 in 1,000"
    assert one_in(1e-4) == "1 in 10,000" and one_in(1e-5) == "1 in 100,000"
    assert one_in(3 / 25_991) == "1 in 8,600"  # 8,663
    assert one_in(resolution_for(12_429)) == "1 in 4,100"  # 4,132


def test_strength_wording_for_each_band_comes_from_its_own_figures(shipped: Calibration) -> None:
    for name in shipped.bands:
        applied = shipped.band(name)
        lines = strength_lines(applied)
        assert [line.band for line in lines] == list(ScoreBand)
        for line, fmr in zip(lines, (1e-4, 1e-3, 1e-2), strict=False):
            assert line.from_score == applied.threshold(fmr)
            assert f"{applied.threshold(fmr):.4f}" in line.text and applied.people in line.text
    strong = {name: strength_lines(shipped.band(name))[0].text for name in shipped.bands}
    assert "about 1 in 10,000 pairs of different adults" in strong["adult"]
    assert "about 1 in 10,000" in strong["child_6_12"]  # 30,197 pairs support 1e-4
    assert "about 1 in 10,000" in strong["child"]
    # 25,991 and 12,429 pairs cannot support 1e-4: the rarest rate they support is said.
    assert "1 in 10,000" not in strong["child_0_5"] and "1 in 8,600" in strong["child_0_5"]
    assert "25,991" in strong["child_0_5"]
    assert "1 in 10,000" not in strong["teen"] and "1 in 4,100" in strong["teen"]


def _stated_rates(text: str) -> list[float]:
    return [1 / int(n.replace(",", "")) for n in re.findall(r"1 in ([\d,]+)", text)]


@pytest.mark.parametrize("stated", AGE_BANDS)
def test_no_text_states_a_rate_finer_than_its_band_supports(
    shipped: Calibration, stated: str
) -> None:
    applied = shipped.for_age(stated)  # type: ignore[arg-type]
    texts = [reliability_note(shipped, applied)] + [line.text for line in strength_lines(applied)]
    texts += [threshold_note(applied, t.fmr) for t in applied.data.thresholds]
    rates = [rate for text in texts for rate in _stated_rates(text)]
    assert rates, "no rate stated: this check would be vacuous"
    assert min(rates) >= applied.resolution_fmr * (1 - 1e-9), (stated, texts)


def test_reliability_for_each_band_uses_its_figures(shipped: Calibration) -> None:
    notes = {b: reliability_of(shipped, shipped.for_age(b)) for b in AGE_BANDS}
    assert isinstance(notes["adult"], Reliability)
    assert "43%" in notes["child_0_5"].note and "13%" in notes["child_6_12"].note
    assert "21%" in notes["child"].note and "2%" in notes["teen"].note
    assert notes["child"].verification_rate == 0.81 and notes["adult"].verification_rate == 0.96
    assert "81%" in notes["child"].note and "rank order" in notes["child_0_5"].note
    assert notes["unknown"].band_used == "child_0_5"


# -- the writer -------------------------------------------------------------------------------


def synthetic_set(seed: int = 3) -> LabelledTemplates:
    """30 young children and 30 adults with two photos each, and two unaged photos. Children
    share a common component, so different children score higher than different adults."""
    rng = np.random.default_rng(seed)
    dim = 32
    common = rng.normal(size=dim)
    vectors, people, ages = [], [], []
    for person in range(60):
        child = person < 30
        centre = rng.normal(size=dim) + (2.5 * common if child else 0)
        for photo in range(2):
            vectors.append(centre + 0.4 * rng.normal(size=dim))
            people.append(f"p{person}")
            ages.append(float(2 + photo) if child else 30.0 + photo)
    for extra in range(2):
        vectors.append(rng.normal(size=dim))
        people.append(f"unaged{extra}")
        ages.append(None)
    unit = np.asarray(vectors, dtype=np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    return LabelledTemplates(unit, people, ages)


SOURCE = Source("synthetic set", "tests/test_thresholds.py", "2026-12-06")


def test_writer_measures_every_band_with_ages_and_the_file_it_writes_loads() -> None:
    templates = synthetic_set()
    bands = calibrate_bands(templates, SOURCE)
    assert set(bands) == {"adult", "child", "child_0_5"}  # no teen, no 6-12 in this set
    for name, band in bands.items():
        rows = [i for i, a in enumerate(templates.ages or ()) if a is not None
                and name in bands_of_age(a)]  # fmt: skip
        _, non_mated = pair_scores(templates.vectors[rows], [templates.people[i] for i in rows])
        assert band.provenance.non_mated_pairs == len(non_mated) == 30 * 29 * 2
        assert band.provenance.images == 60 and band.provenance.mated_pairs == 30
        assert band.resolution_fmr == resolution_for(len(non_mated)) >= 3 / len(non_mated)
        assert [t.fmr for t in band.thresholds] == [f for f in CALIBRATED_FMRS if f >= 1e-4]
        for entry in band.thresholds:  # at most floor(fmr * n) strangers at or above it
            above = int(np.sum(non_mated >= entry.score))
            assert above == entry.non_mated_at_or_above <= int(entry.fmr * len(non_mated))
    assert bands["child_0_5"].thresholds[0].score > bands["adult"].thresholds[0].score
    data = calibration_data("synthetic_model", bands, generated="2026-12-06", generated_by="t")
    loaded = parse_calibration(json.dumps(data.model_dump(mode="json")), "written")
    assert loaded.bands == ("adult", "child", "child_0_5")
    assert loaded.for_age("unknown").band == "child_0_5"
    assert loaded.for_age("teen").band == "child_0_5"  # not measured: the strictest, said so


def test_writer_without_ages_calibrates_one_stated_band_and_keeps_other_bands(
    shipped: Calibration,
) -> None:
    templates = synthetic_set()
    unaged = LabelledTemplates(templates.vectors, templates.people)
    bands = calibrate_bands(unaged, SOURCE)
    assert set(bands) == {"adult"}
    assert bands["adult"].provenance.pairs == "every pair of images of the set"
    with pytest.raises(BadInputError, match="no ages"):
        calibrate_bands(unaged, SOURCE, unaged=None)
    kept = dict(shipped.data.bands)
    data = calibration_data("m", bands, generated="d", generated_by="t", keep=kept)
    assert data.bands["adult"] == bands["adult"]  # measured now replaces the kept one
    assert data.bands["child_0_5"] == shipped.data.bands["child_0_5"]


def test_writer_skips_bands_with_too_few_pairs() -> None:
    templates = synthetic_set()
    few = LabelledTemplates(templates.vectors[:20], templates.people[:20], templates.ages[:20])  # type: ignore[index]
    assert MIN_BAND_NON_MATED_PAIRS > 20 * 19 // 2
    assert calibrate_bands(few, SOURCE) == {}
    with pytest.raises(BadInputError, match="label more people"):
        calibration_data("m", {}, generated="d", generated_by="t")
    with pytest.raises(BadInputError, match="one person"):
        LabelledTemplates(templates.vectors, templates.people[:3])


def test_ages_fall_in_their_bands() -> None:
    assert bands_of_age(0) == ("child", "child_0_5")
    assert bands_of_age(5.9) == ("child", "child_0_5")
    assert bands_of_age(6) == ("child", "child_6_12")
    assert bands_of_age(12.9) == ("child", "child_6_12")
    assert bands_of_age(13) == ("teen",) and bands_of_age(17.5) == ("teen",)
    assert bands_of_age(18) == ("adult",) and bands_of_age(80) == ("adult",)


def test_regenerating_the_shipped_file_keeps_the_bands_measured_outside(
    shipped: Calibration, tmp_path: Path
) -> None:
    """``benchmarks.calibrate_thresholds`` re-measures adults only (LFW holds no children):
    the child and teen bands, and the adult band's outside cross-checks, stay as shipped."""
    from benchmarks.calibrate_thresholds import LfwEmbeddings, calibrate, kept_bands

    templates = synthetic_set()
    lfw = LfwEmbeddings(templates.vectors, list(templates.people), [], 0, 0.0)
    shipped_file = tmp_path / "dlib_resnet_v1.json"
    shipped_file.write_text(shipped.data.model_dump_json(), encoding="utf-8")
    data = calibrate(lfw, EMBEDDER_MODEL, "mtcnn", kept_bands(shipped_file))
    loaded = parse_calibration(json.dumps(data.model_dump(mode="json")), "regenerated")
    assert loaded.bands == shipped.bands
    for name in ("teen", "child", "child_6_12", "child_0_5"):
        assert loaded.data.bands[name] == shipped.data.bands[name]  # type: ignore[index]
    adult = loaded.data.bands["adult"]
    assert adult.provenance.non_mated_pairs == 122 * 121 // 2 - 60  # this set, not LFW's
    assert adult.clustering == shipped.data.bands["adult"].clustering
    assert sum("64,177" in c for c in adult.caveats) == 1
    old = tmp_path / "old.json"
    old.write_text((VECTORS / "format1_single_band.json").read_text(encoding="utf-8"))
    assert kept_bands(old) == {}  # an old file keeps nothing: its adult figures are re-measured
