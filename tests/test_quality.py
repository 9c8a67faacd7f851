"""Face-image quality: the component measures, their mapping, and their behaviour on real faces.

The real-data checks take sharp, near-frontal LFW faces and degrade one thing at a time: a
Gaussian blur of the aligned chip (sharpness), a 4x downscale of the photo (size, and the
sharpness the upsampled chip loses), a nose moved off the eye midpoint or a tilted landmark set
(pose), and a mirrored photo (the yaw estimate must change sign).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from edgeid.runtime.errors import BadInputError
from edgeid.runtime.evaluation.lfw import central_index
from edgeid.runtime.inference.alignment import FACE_TEMPLATE_5, face_chip
from edgeid.runtime.inference.image_decode import load_image
from edgeid.runtime.inference.pipeline import CHIP_PADDING, CHIP_SIZE, Face, FacePipeline
from edgeid.runtime.inference.quality import (
    IOD_MIN_PX,
    ROLL_FULL_DEG,
    YAW_FULL_DEG,
    FaceQuality,
    assess,
    chip_sharpness,
    head_pose,
    inter_ocular_distance,
    linear_ramp,
    log_ramp,
    native_inter_ocular,
)
from edgeid.runtime.inference.types import FloatArray, RGBImage

# Evenly spaced LFW images: many people and conditions, a few seconds of detection.
LFW_SAMPLE = 40
# sigma 2 px on a 150 px chip: clearly soft to the eye, the blur of a missed focus.
BLUR_SIGMA_PX = 2.0
# 250 px LFW photos shrink to 62 px: eyes ~10 px apart, a face at the back of a crowd.
DOWNSCALE = 4
# A mirrored photo's yaw is the negative of the original's, up to the detector and landmarks
# refitting the mirror: whole-pixel landmarks on a ~40 px IOD, one pixel of nose offset is ~6
# degrees near frontal, and both photos carry that noise (measured: at most 10 on this sample).
MIRROR_YAW_TOLERANCE_DEG = 12.0
# Yaw against the mirror's negated yaw over the sample (measured: 0.986).
MIN_MIRROR_YAW_CORRELATION = 0.95
# An in-plane tilt well past ROLL_FULL_DEG, short of ROLL_ZERO_DEG.
TILT_DEG = 45.0


def _template_landmarks(
    iod_px: float = 60.0, centre: tuple[float, float] = (200, 200)
) -> FloatArray:
    """dlib's 5-point template scaled to a frontal face with the given IOD."""
    unit_iod = float(
        np.hypot(*(FACE_TEMPLATE_5[0:2].mean(axis=0) - FACE_TEMPLATE_5[2:4].mean(axis=0)))
    )
    points = (FACE_TEMPLATE_5 - 0.5) * (iod_px / unit_iod) + np.asarray(centre)
    return points.astype(np.float32)


def _rotate(points: FloatArray, degrees: float) -> FloatArray:
    angle = math.radians(degrees)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    centre = points.mean(axis=0)
    return ((points - centre) @ rotation.T + centre).astype(np.float32)


def _shift_nose(points: FloatArray, fraction_of_iod: float) -> FloatArray:
    """Move the nose along the eye line: what a head turn does to the 5 landmarks."""
    moved = points.copy()
    right, left = points[0:2].mean(axis=0), points[2:4].mean(axis=0)
    moved[4] += (right - left) * fraction_of_iod
    return moved


# ---- the measures and their mapping, on synthetic input ---------------------------------------


def test_ramps_are_clamped_monotone_and_refuse_nonsense() -> None:
    assert linear_ramp(5, 0, 10) == 0.5
    assert linear_ramp(-1, 0, 10) == 0.0 and linear_ramp(11, 0, 10) == 1.0
    assert linear_ramp(30, 60, 15) == pytest.approx(2 / 3)  # falling ramp (angles)
    assert linear_ramp(float("nan"), 0, 10) == 0.0
    assert log_ramp(4, 2, 8) == pytest.approx(0.5)
    assert log_ramp(0, 2, 8) == 0.0 and log_ramp(-3, 2, 8) == 0.0


def test_native_iod_is_the_chip_template_eye_distance() -> None:
    # dlib's template puts the eye centres 0.5255 of the unpadded square apart: 52.5 px of 150.
    assert native_inter_ocular(150, 0.25) == pytest.approx(52.55, abs=0.01)
    assert inter_ocular_distance(_template_landmarks(60.0)) == pytest.approx(60.0)


def test_frontal_template_has_no_yaw_or_roll() -> None:
    yaw, roll = head_pose(_template_landmarks())
    assert abs(yaw) < 1.0 and abs(roll) < 0.1


def test_roll_follows_the_eye_line_and_yaw_the_nose() -> None:
    points = _template_landmarks()
    assert head_pose(_rotate(points, 30))[1] == pytest.approx(30, abs=0.1)
    assert head_pose(_rotate(points, 30))[0] == pytest.approx(head_pose(points)[0], abs=0.01)
    yaws = [head_pose(_shift_nose(points, f))[0] for f in (-0.4, -0.1, 0.0, 0.1, 0.4)]
    assert yaws == sorted(yaws) and yaws[0] < -45 < 45 < yaws[-1]
    mirrored = points.copy()
    mirrored[:, 0] = 400 - mirrored[:, 0]
    mirrored = mirrored[[2, 3, 0, 1, 4]]  # a mirror swaps which eye is on the image's right
    assert head_pose(mirrored)[0] == pytest.approx(-head_pose(points)[0], abs=0.01)


def test_pose_score_full_when_frontal_and_zero_in_profile() -> None:
    chip = np.random.default_rng(0).integers(0, 256, (CHIP_SIZE, CHIP_SIZE, 3), dtype=np.uint8)
    points = _template_landmarks()
    assert assess(points, chip).pose == 1.0
    assert assess(_rotate(points, ROLL_FULL_DEG - 1), chip).pose == 1.0
    assert assess(_rotate(points, 70), chip).pose == 0.0
    profile = assess(_shift_nose(points, 1.0), chip)
    assert profile.pose == 0.0 and profile.overall == 0.0 and profile.limiting == "pose"


def test_size_score_from_floor_to_chip_resolution() -> None:
    chip = np.random.default_rng(0).integers(0, 256, (CHIP_SIZE, CHIP_SIZE, 3), dtype=np.uint8)
    assert assess(_template_landmarks(IOD_MIN_PX), chip).size == 0.0
    native = native_inter_ocular(CHIP_SIZE, 0.25)
    assert assess(_template_landmarks(native), chip).size == pytest.approx(1.0)
    assert assess(_template_landmarks(200.0), chip).size == 1.0
    assert 0 < assess(_template_landmarks(20.0), chip).size < 1


def test_flat_chip_has_no_sharpness_and_bad_input_is_refused() -> None:
    flat = np.full((CHIP_SIZE, CHIP_SIZE, 3), 128, dtype=np.uint8)
    assert chip_sharpness(flat, 0.25) == 0.0
    with pytest.raises(BadInputError):
        chip_sharpness(np.zeros((150, 100, 3), dtype=np.uint8), 0.25)
    with pytest.raises(BadInputError):
        assess(np.zeros((68, 2), dtype=np.float32), flat)
    with pytest.raises(BadInputError):
        inter_ocular_distance(np.full((5, 2), np.nan, dtype=np.float32))


def test_quality_is_frozen_and_serialises() -> None:
    chip = np.random.default_rng(1).integers(0, 256, (CHIP_SIZE, CHIP_SIZE, 3), dtype=np.uint8)
    quality = assess(_template_landmarks(), chip)
    with pytest.raises(dataclasses.FrozenInstanceError):
        quality.overall = 0.0  # type: ignore[misc]
    payload = json.loads(json.dumps(quality.to_json()))
    assert set(payload) >= {"overall", "size", "sharpness", "pose", "limiting"}
    assert set(payload) >= {"inter_ocular_px", "sharpness_ratio", "yaw_deg", "roll_deg"}
    for key in ("overall", "size", "sharpness", "pose"):
        assert 0.0 <= payload[key] <= 1.0
    # Overall is the geometric mean: a zero anywhere is zero, otherwise between min and max.
    parts = (quality.size, quality.sharpness, quality.pose)
    assert min(parts) <= quality.overall <= max(parts)
    assert quality.overall == pytest.approx(math.prod(parts) ** (1 / 3))


# ---- real faces ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RealFace:
    image: RGBImage
    face: Face

    @property
    def quality(self) -> FaceQuality:
        assert self.face.quality is not None
        return self.face.quality


def _central(pipeline: FacePipeline, image: RGBImage) -> Face | None:
    faces = pipeline.detect(image)
    if not faces:
        return None
    boxes = [(f.box.x0, f.box.y0, f.box.x1, f.box.y1) for f in faces]
    return faces[central_index(boxes, image.shape[1], image.shape[0])]


@pytest.fixture(scope="module")
def detector_only(models_dir: Path) -> FacePipeline:
    return FacePipeline.load(models_dir, with_embedder=False)


@pytest.fixture(scope="module")
def lfw_faces(lfw_dir: Path, detector_only: FacePipeline) -> list[RealFace]:
    paths = sorted((lfw_dir / "images").rglob("*.jpg"))
    step = max(1, len(paths) // LFW_SAMPLE)
    faces = []
    for path in paths[::step][:LFW_SAMPLE]:
        image = load_image(path)
        face = _central(detector_only, image)
        if face is not None:
            faces.append(RealFace(image, face))
    assert len(faces) >= LFW_SAMPLE - 2  # LFW: a face in (nearly) every image
    return faces


def _chip(image: RGBImage, landmarks: FloatArray) -> RGBImage:
    return face_chip(image, landmarks, CHIP_SIZE, CHIP_PADDING)


def test_detected_faces_carry_their_quality(lfw_faces: list[RealFace]) -> None:
    for real in lfw_faces:
        recomputed = assess(real.face.landmarks, _chip(real.image, real.face.landmarks))
        assert real.quality == recomputed
    overall = np.array([r.quality.overall for r in lfw_faces])
    assert np.median(overall) > 0.7  # LFW: press photos, mostly sharp and near-frontal


def test_blurred_chips_score_lower(lfw_faces: list[RealFace]) -> None:
    sharp, blurred = [], []
    for real in lfw_faces:
        chip = _chip(real.image, real.face.landmarks)
        soft = np.asarray(Image.fromarray(chip).filter(ImageFilter.GaussianBlur(BLUR_SIGMA_PX)))
        after = assess(real.face.landmarks, soft)
        assert after.sharpness_ratio < real.quality.sharpness_ratio  # every face, not on average
        assert after.size == real.quality.size and after.pose == real.quality.pose
        sharp.append(real.quality)
        blurred.append(after)
    assert np.mean([q.sharpness for q in blurred]) < np.mean([q.sharpness for q in sharp]) - 0.5
    assert np.mean([q.overall for q in blurred]) < np.mean([q.overall for q in sharp]) - 0.3


def test_tiny_faces_score_lower(lfw_faces: list[RealFace]) -> None:
    full, tiny = [], []
    for real in lfw_faces:
        height, width = real.image.shape[:2]
        small = np.asarray(
            Image.fromarray(real.image).resize(
                (width // DOWNSCALE, height // DOWNSCALE), Image.Resampling.BILINEAR
            )
        )
        points = real.face.landmarks / DOWNSCALE
        after = assess(points, _chip(small, points))
        assert after.inter_ocular_px == pytest.approx(real.quality.inter_ocular_px / DOWNSCALE)
        assert after.size < real.quality.size
        full.append(real.quality)
        tiny.append(after)
    assert np.mean([q.size for q in tiny]) < np.mean([q.size for q in full]) - 0.5
    assert np.mean([q.overall for q in tiny]) < np.mean([q.overall for q in full]) - 0.3
    assert np.mean([q.sharpness for q in tiny]) < np.mean([q.sharpness for q in full])


def test_profile_ish_and_tilted_landmarks_score_lower_on_pose(lfw_faces: list[RealFace]) -> None:
    before, turned, tilted = [], [], []
    for real in lfw_faces:
        points = real.face.landmarks
        chip = _chip(real.image, points)
        yaw, _ = head_pose(points)
        # Turn the head further the way it already faces, by half the IOD at the nose.
        turn = assess(_shift_nose(points, 0.5 if yaw >= 0 else -0.5), chip)
        tilt = assess(_rotate(points, TILT_DEG), chip)
        assert abs(turn.yaw_deg) > abs(yaw)
        assert turn.pose < real.quality.pose or real.quality.pose == 0.0
        # Pose is the lower of yaw and roll: a tilt lowers it unless yaw already limits more.
        assert tilt.pose <= real.quality.pose + 1e-6
        before.append(real.quality.pose)
        turned.append(turn.pose)
        tilted.append(tilt.pose)
    assert np.mean(turned) < np.mean(before) - 0.4
    assert np.mean(tilted) < np.mean(before) - 0.4
    frontal = [r.quality.pose for r in lfw_faces if abs(r.quality.yaw_deg) <= YAW_FULL_DEG]
    assert len(frontal) >= len(lfw_faces) // 3 and min(frontal) > 0.8


def test_mirrored_photo_flips_the_yaw_sign(
    lfw_faces: list[RealFace], detector_only: FacePipeline
) -> None:
    original, mirrored = [], []
    for real in lfw_faces:
        flipped = np.ascontiguousarray(real.image[:, ::-1])
        face = _central(detector_only, flipped)
        assert face is not None and face.quality is not None
        assert face.quality.yaw_deg == pytest.approx(
            -real.quality.yaw_deg, abs=MIRROR_YAW_TOLERANCE_DEG
        )
        if abs(real.quality.yaw_deg) > MIRROR_YAW_TOLERANCE_DEG:
            assert np.sign(face.quality.yaw_deg) == -np.sign(real.quality.yaw_deg)
        original.append(real.quality.yaw_deg)
        mirrored.append(face.quality.yaw_deg)
    assert sum(abs(y) > MIRROR_YAW_TOLERANCE_DEG for y in original) >= 5  # some turned faces
    assert np.corrcoef(original, -np.asarray(mirrored))[0, 1] > MIN_MIRROR_YAW_CORRELATION
