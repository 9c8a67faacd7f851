"""The self-test's known image and pinned reference, and `edgeid provision selftest`.

The reference is checked against dlib itself (dlib-bin, the test-only reference
implementation), against the CPU pipeline of this checkout, and each failure the self-test must
catch is made for real: altered reference, altered image, missing keys, a broken config.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgeid.cli import main
from edgeid.models.build import build_models
from edgeid.models.selftest_image import (
    IMAGE_MEMBER,
    REFERENCE_FILE,
    SKIMAGE_WHEEL,
    ReferenceFace,
    Tolerance,
    install_selftest,
    load_reference,
    pinned_reference,
    record_reference,
    reference_bytes,
)
from edgeid.provisioning.report import Outcome
from edgeid.provisioning.selftest import compare_faces
from edgeid.runtime.errors import ModelError
from edgeid.runtime.evaluation.detection import iou
from edgeid.runtime.inference.image_decode import load_image
from edgeid.runtime.inference.pipeline import Face
from edgeid.runtime.inference.types import Box

MIN_DLIB_COSINE = 0.9999  # the bar README's parity table holds the embedder to
# Same code, same models: only float reordering across CPUs may move the result.
SAME_MACHINE = Tolerance(min_cosine=0.99999, min_box_iou=0.999, max_landmark_px=0.0)


@pytest.fixture
def home(tmp_path: Path, models_dir: Path) -> Path:
    state = tmp_path / "home"
    shutil.copytree(models_dir, state / "models")
    return state


def provision(home: Path, wheelhouse: Path) -> None:
    argv = ["provision", "init", "--home", str(home), "--json", "--device-id", "box-07"]
    argv += ["--site", "lab-a", "--key-provider", "keyfile", "--self-signed", "--no-selftest"]
    assert main([*argv, "--wheelhouse", str(wheelhouse)]) == 0


def selftest(home: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, str], str]:
    capsys.readouterr()
    code = main(["provision", "selftest", "--home", str(home), "--json"])
    out = json.loads(capsys.readouterr().out)
    return code, {c["check"]: c["result"] for c in out["checks"]}, json.dumps(out["checks"])


# -- the reference itself ----------------------------------------------------------------------


def test_the_pinned_reference_is_what_dlib_itself_finds(
    models_dir: Path, dlib_weights_dir: Path
) -> None:
    dlib = pytest.importorskip("dlib")
    reference = load_reference(models_dir)
    assert reference == pinned_reference()
    image = load_image(models_dir / reference.image_file)
    assert image.shape == (reference.height, reference.width, 3)

    detector = dlib.cnn_face_detection_model_v1(
        str(dlib_weights_dir / "mmod_human_face_detector.dat")
    )
    (found,) = detector(image, 0)
    rect = found.rect
    (expected,) = reference.detectors["mmod"]
    dlib_box = Box(rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1)
    assert iou(dlib_box, Box(*expected.box)) >= 0.99

    predictor = dlib.shape_predictor(str(dlib_weights_dir / "shape_predictor_5_face_landmarks.dat"))
    shape = predictor(image, rect)
    points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
    assert np.abs(points - np.array(expected.landmarks)).max() <= 0.5

    recogniser = dlib.face_recognition_model_v1(
        str(dlib_weights_dir / "dlib_face_recognition_resnet_model_v1.dat")
    )
    for detector_name, faces in reference.detectors.items():
        (face,) = faces
        parts = [dlib.point(round(x), round(y)) for x, y in face.landmarks]
        detection = dlib.full_object_detection(rect, parts)
        descriptor = np.array(recogniser.compute_face_descriptor(image, detection))
        ours = np.array(face.embedding)
        cosine = descriptor @ ours / (np.linalg.norm(descriptor) * np.linalg.norm(ours))
        assert cosine >= MIN_DLIB_COSINE, detector_name


def test_the_cpu_pipeline_of_this_checkout_reproduces_the_pinned_reference(
    models_dir: Path, edgeid_home: Path
) -> None:
    """Guards against drift: a change to the pipeline that moves the result must re-record."""
    recorded = record_reference(models_dir, edgeid_home / "wheelhouse")
    pinned = pinned_reference()
    assert recorded.models == pinned.models and recorded.image_sha256 == pinned.image_sha256
    assert set(recorded.detectors) == set(pinned.detectors) == {"mmod", "mtcnn"}
    for name, faces in pinned.detectors.items():
        got = [_face(f) for f in recorded.detectors[name]]
        outcome, detail = compare_faces(got, faces, SAME_MACHINE)
        assert outcome is Outcome.PASS, f"{name}: {detail}"


def _face(ref: ReferenceFace) -> Face:
    return Face(
        box=Box(*ref.box),
        score=1.0,
        landmarks=np.array(ref.landmarks, dtype=np.float32),
        embedding=np.array(ref.embedding, dtype=np.float32),
    )


def test_compare_faces_holds_each_bar() -> None:
    """Known-bad inputs: each tolerance is enforced on its own."""
    reference = pinned_reference()
    expected = reference.detectors["mtcnn"]
    tolerance = reference.tolerance
    good = _face(expected[0])
    assert compare_faces([good], expected, tolerance)[0] is Outcome.PASS
    assert "bit-identical" in compare_faces([good], expected, tolerance)[1]

    assert compare_faces([], expected, tolerance) == (
        Outcome.FAIL,
        "found 0 face(s), the reference has 1",
    )
    moved = replace(good, landmarks=good.landmarks + np.float32(tolerance.max_landmark_px + 0.5))
    assert compare_faces([moved], expected, tolerance)[0] is Outcome.FAIL
    x0, y0, x1, y1 = good.box.as_list()
    shifted = replace(good, box=Box(x0 + 10, y0 + 10, x1 + 10, y1 + 10))  # IoU about 0.7
    assert compare_faces([shifted], expected, tolerance)[0] is Outcome.FAIL
    assert good.embedding is not None
    noise = np.random.default_rng(3).standard_normal(good.embedding.shape).astype(np.float32)
    nudged = good.embedding + 0.02 * noise / np.linalg.norm(noise)  # cosine about 0.9998
    within = compare_faces([replace(good, embedding=nudged)], expected, tolerance)
    assert within[0] is Outcome.PASS and "bit-identical" not in within[1]
    pushed = good.embedding + 0.1 * noise / np.linalg.norm(noise)  # cosine about 0.995
    assert compare_faces([replace(good, embedding=pushed)], expected, tolerance)[0] is Outcome.FAIL


# -- written at build time ---------------------------------------------------------------------


def test_models_build_writes_the_image_and_reference_once(
    tmp_path: Path, models_dir: Path, edgeid_home: Path
) -> None:
    folder = tmp_path / "models"
    shutil.copytree(models_dir, folder)
    reference = pinned_reference()
    (folder / reference.image_file).unlink()
    (folder / REFERENCE_FILE).unlink()
    messages: list[str] = []
    build_models(folder, edgeid_home / "wheelhouse", progress=messages.append)
    assert messages[-1].endswith(": written")
    assert (folder / REFERENCE_FILE).read_bytes() == reference_bytes(reference)
    assert load_reference(folder) == reference
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    messages.clear()
    build_models(folder, edgeid_home / "wheelhouse", progress=messages.append)
    assert all(m.endswith("up to date") for m in messages)
    assert before == {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_a_missing_or_wrong_wheel_names_the_fix(tmp_path: Path, models_dir: Path) -> None:
    folder = tmp_path / "models"
    shutil.copytree(models_dir, folder)
    (folder / pinned_reference().image_file).unlink()
    wheels = tmp_path / "wheelhouse"
    wheels.mkdir()
    with pytest.raises(ModelError, match=r"pip download .*scikit-image==0\.25\.2"):
        install_selftest(folder, wheels)
    (wheels / SKIMAGE_WHEEL).write_bytes(b"not the wheel")
    with pytest.raises(ModelError, match="does not have the pinned sha256"):
        install_selftest(folder, wheels)
    (wheels / SKIMAGE_WHEEL).unlink()
    with zipfile.ZipFile(wheels / "scikit_image-0.25.2-cp312-cp312-win_amd64.whl", "w") as z:
        z.writestr(IMAGE_MEMBER, b"\x89PNG another picture")
    with pytest.raises(ModelError, match=r"no wheel .* holds skimage/data/astronaut\.png"):
        install_selftest(folder, wheels)
    assert not (folder / pinned_reference().image_file).exists()


# -- the self-test command -------------------------------------------------------------------


def test_selftest_passes_then_names_each_thing_broken(
    home: Path, edgeid_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    provision(home, edgeid_home / "wheelhouse")
    code, checks, _ = selftest(home, capsys)
    assert code == 0
    assert checks["pipeline (cpu)"] == checks["gallery keys"] == checks["storage"] == "PASS"
    assert checks["pipeline (tensorrt)"] in ("SKIP", "PASS")  # SKIP: no GPU answers here

    ref_path = home / "models" / REFERENCE_FILE
    original = ref_path.read_bytes()
    data = json.loads(original)
    face = data["detectors"]["mtcnn"][0]
    face["embedding"] = face["embedding"][::-1]  # another unit vector: a wrong result
    ref_path.write_text(json.dumps(data))
    code, checks, text = selftest(home, capsys)
    assert code == 1 and checks["pipeline (cpu)"] == "FAIL" and "embedding cosine" in text
    assert checks["device key"] == checks["gallery keys"] == "PASS"  # the others still ran
    ref_path.write_bytes(original)

    image = home / "models" / pinned_reference().image_file
    pixels = image.read_bytes()
    image.write_bytes(pixels + b"\0")
    code, checks, text = selftest(home, capsys)
    assert code == 1 and checks["pipeline (cpu)"] == "FAIL" and "not the pinned image" in text
    image.write_bytes(pixels)

    (kek,) = (home / "keys").iterdir()
    kek.rename(home / "elsewhere.key")
    (home / "identity" / "device-ed25519.pem").rename(home / "device.pem")
    (home / "edgeid.toml").write_text((home / "edgeid.toml").read_text() + "\n[nonsense]\nx = 1\n")
    code, checks, text = selftest(home, capsys)
    assert code == 1
    assert checks["gallery keys"] == checks["device key"] == checks["configuration"] == "FAIL"
    assert "key file" in text and "no device key" in text and "nonsense" in text
    assert checks["pipeline (cpu)"] == "PASS"
