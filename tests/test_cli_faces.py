"""`edgeid detect` / `edgeid embed` on real photos and on bad input (exit 2, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeid.cli import main
from edgeid.runtime.inference.image_decode import load_image
from edgeid.runtime.inference.pipeline import STAGES, FacePipeline, StageTimer

# Mirror-image chips are the same face, slightly re-framed (dlib's template is not exactly
# symmetric): the flip-averaged template must stay close to the plain one.
MIN_TTA_COSINE = 0.95
TTA_SAMPLE = 6


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("detector", ["mmod", "mtcnn"])
def test_detect_json_on_a_real_photo(
    detector: str, models_dir: Path, lfw_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = lfw_dir / "images" / "Al_Pacino" / "Al_Pacino_0001.jpg"
    if not image.exists():
        image = next((lfw_dir / "images").rglob("*_0001.jpg"))
    home = str(models_dir.parent)
    code, out, _ = _run(
        capsys, "detect", str(image), "--detector", detector, "--home", home, "--json"
    )
    assert code == 0
    [entry] = json.loads(out)
    assert entry["image"] == str(image)
    central = min(entry["faces"], key=lambda f: abs(sum(f["box"][::2]) / 2 - 125))
    x0, y0, x1, y1 = central["box"]
    assert 60 < (x0 + x1) / 2 < 190 and 60 < (y0 + y1) / 2 < 190  # LFW centres the subject
    assert len(central["landmarks"]) == 5
    for x, y in central["landmarks"]:
        assert x0 - 5 <= x <= x1 + 5 and y0 - 5 <= y <= y1 + 5
    assert "embedding" not in central
    quality = central["quality"]
    assert {"overall", "size", "sharpness", "pose", "limiting", "inter_ocular_px"} <= set(quality)
    assert all(0.0 <= quality[k] <= 1.0 for k in ("overall", "size", "sharpness", "pose"))
    assert quality["inter_ocular_px"] > 20  # LFW: eyes ~40 px apart in a 250 px photo


def test_embed_gives_unit_vectors(
    models_dir: Path, lfw_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = sorted((lfw_dir / "images").rglob("*.jpg"))[:2]
    code, out, _ = _run(
        capsys, "embed", *map(str, images), "--home", str(models_dir.parent), "--json"
    )
    assert code == 0
    entries = json.loads(out)
    assert [e["image"] for e in entries] == [str(p) for p in images]
    for entry in entries:
        vec = np.array(entry["faces"][0]["embedding"])
        assert vec.shape == (128,)
        assert abs(np.linalg.norm(vec) - 1) < 1e-4


def test_bad_inputs_get_per_file_errors_and_exit_2(
    tmp_path: Path, models_dir: Path, scenes_dir: Path, lfw_dir: Path
) -> None:
    """Missing, truncated, non-image and faceless files: one clear line each, never a traceback."""
    good = next((lfw_dir / "images").rglob("*.jpg"))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:3000])
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("case notes, not a photo")
    dogs = scenes_dir / "dlib-faces" / "dogs.jpg"
    missing = tmp_path / "missing.jpg"
    env = os.environ | {"EDGEID_HOME": str(models_dir.parent)}
    args = [str(p) for p in (good, missing, truncated, not_image, dogs)]
    proc = subprocess.run(
        [sys.executable, "-m", "edgeid", "detect", *args, "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    entries = {e["image"]: e for e in json.loads(proc.stdout)}
    assert "error" not in entries[str(good)] and entries[str(good)]["faces"]
    assert "no such file" in entries[str(missing)]["error"]
    assert "damaged or incomplete" in entries[str(truncated)]["error"]
    assert "not an image" in entries[str(not_image)]["error"]
    assert "no face found" in entries[str(dogs)]["error"]
    assert len(proc.stderr.strip().splitlines()) == 4


def test_missing_models_say_how_to_build_them(
    tmp_path: Path, lfw_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = next((lfw_dir / "images").rglob("*.jpg"))
    code, _, err = _run(capsys, "detect", str(image), "--home", str(tmp_path))
    assert code == 1
    assert "run `edgeid models build`" in err


def test_flip_tta_stays_close_to_the_plain_template(models_dir: Path, lfw_dir: Path) -> None:
    plain = FacePipeline.load(models_dir)
    tta = FacePipeline(plain.detector, plain.landmarks, plain.embedder, flip_tta=True)
    assert FacePipeline.load(models_dir, flip_tta=True, with_embedder=True).flip_tta
    paths = sorted((lfw_dir / "images").rglob("*.jpg"))
    timer = StageTimer()
    cosines = []
    for path in paths[:: len(paths) // TTA_SAMPLE][:TTA_SAMPLE]:
        image = load_image(path)
        faces = plain.embed(image)
        flipped = tta.embed(image, timer=timer)
        assert len(faces) == len(flipped) > 0
        for a, b in zip(faces, flipped, strict=True):
            assert a.embedding is not None and b.embedding is not None
            assert abs(np.linalg.norm(b.embedding) - 1) < 1e-4
            assert b.quality == a.quality
            cosines.append(float(np.dot(a.embedding, b.embedding)))
    assert min(cosines) > MIN_TTA_COSINE
    assert max(cosines) < 0.99999  # the mirror really went through the embedder
    # Every pipeline stage was timed once per image (decode is the caller's to time).
    assert set(timer.calls) == set(STAGES) - {"decode"}
    assert timer.calls["detect"] == TTA_SAMPLE
    assert all(ms >= 0 for ms in timer.milliseconds().values())
