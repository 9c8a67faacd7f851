"""The LFW protocol arithmetic: pairs parsing, held-out thresholds, TAR at a fixed FMR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeid.runtime.errors import BadInputError
from edgeid.runtime.evaluation.lfw import (
    NO_FACE_SCORE,
    best_threshold,
    evaluate,
    parse_pairs,
    tar_at_fmr,
)


def test_parses_view1_pairs(lfw_dir: Path) -> None:
    pairs = parse_pairs(lfw_dir / "pairsDevTest.txt")
    assert len(pairs.folds) == 1
    all_pairs = pairs.all_pairs()
    assert len(all_pairs) == 1000
    assert sum(p.mated for p in all_pairs) == 500


def test_parses_view2_header(tmp_path: Path) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text("2 1\nA 1 2\nA 1 B 1\nC 1 2\nC 1 D 3\n")
    pairs = parse_pairs(path)
    assert [len(f) for f in pairs.folds] == [2, 2]
    assert pairs.folds[1][1].second == ("D", 3)


def test_header_mismatch_is_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text("3\nA 1 2\n")
    with pytest.raises(BadInputError, match="promises 6 pairs"):
        parse_pairs(path)


def test_best_threshold_separates_clean_scores() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    mated = np.array([True, True, True, False, False, False])
    threshold = best_threshold(scores, mated)
    assert 0.3 < threshold < 0.7


def test_tar_at_fmr_counts_allowed_false_matches() -> None:
    non_mated = np.linspace(0.0, 0.5, 1000)
    mated_scores = np.array([0.45, 0.6, 0.7, 0.8])
    scores = np.concatenate([mated_scores, non_mated])
    mated = np.concatenate([np.ones(4, bool), np.zeros(1000, bool)])
    tar, threshold = tar_at_fmr(scores, mated, 1e-3)
    # One false match allowed out of 1000: the threshold sits just above the second highest.
    assert non_mated[-2] < threshold <= non_mated[-1]
    assert tar == 0.75


def test_threshold_is_held_out_and_missing_faces_count_as_rejections(tmp_path: Path) -> None:
    """Accuracy uses thresholds chosen on other splits; a no-face image scores as 'different'."""
    lines = ["10"]
    lines += [f"P{i} 1 2" for i in range(10)]
    lines += [f"P{i} 1 P{(i + 1) % 10} 1" for i in range(10)]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    pairs = parse_pairs(tmp_path / "pairs.txt")
    rng = np.random.default_rng(0)
    identity = {f"P{i}": rng.normal(size=8) for i in range(10)}

    def embed(path: Path) -> np.ndarray | None:
        name, index = path.stem.rsplit("_", 1)
        if name == "P0" and index == "0002":
            return None  # no face found in this image
        vec = identity[name] + 0.05 * rng.normal(size=8)
        return (vec / np.linalg.norm(vec)).astype(np.float32)

    report = evaluate(pairs, tmp_path, embed)
    assert report.no_face == 1
    assert report.images == 20
    assert report.splits == 10
    assert NO_FACE_SCORE in report.scores
    # Every mated pair but the no-face one is separable; one error in 20 pairs at most.
    assert report.accuracy >= 0.95
