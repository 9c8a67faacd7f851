"""`edgeid eval lfw` end to end on a slice of the real LFW dev pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from edgeid.cli import main

CONTRACT_KEYS = {
    "accuracy", "accuracy_std", "folds", "pairs", "images", "no_face", "ms_per_image",
    "tar_at_far_1e-3",
}  # fmt: skip


def test_eval_lfw_json_and_roc(
    tmp_path: Path, models_dir: Path, lfw_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = (lfw_dir / "pairsDevTest.txt").read_text().splitlines()[1:]
    mated, non_mated = lines[:500][:15], lines[500:][:15]
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("\n".join(["15", *mated, *non_mated]) + "\n")
    roc = tmp_path / "roc.png"
    argv = ["eval", "lfw", "--pairs", str(pairs), "--images", str(lfw_dir / "images")]
    code = main([*argv, "--roc", str(roc), "--home", str(models_dir.parent), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= CONTRACT_KEYS
    assert report["pairs"] == 30 and report["folds"] == 1
    assert report["no_face"] == 0
    # Thirty easy LFW pairs: the real pipeline separates nearly all of them.
    assert report["accuracy"] >= 0.9
    with Image.open(roc) as image:
        assert image.format == "PNG" and image.size[0] > 100


def test_eval_lfw_bad_pairs_file_is_bad_input(
    tmp_path: Path, models_dir: Path, lfw_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("not a header\n")
    argv = ["eval", "lfw", "--pairs", str(pairs), "--images", str(lfw_dir / "images")]
    assert main([*argv, "--home", str(models_dir.parent)]) == 2
    assert "first line must be" in capsys.readouterr().err
