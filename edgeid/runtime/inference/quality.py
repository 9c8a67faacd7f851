"""Face-image quality: how useful one detected face is likely to be for recognition.

In the spirit of ISO/IEC 29794-5 (face image quality), each component is a measured quantity
(the *native* measure, reported as is) mapped to a score in [0, 1] by a monotone ramp whose two
ends are named constants below:

- **size**: the inter-ocular distance (IOD) in image pixels, between the eye centres (the
  midpoints of dlib's landmark pairs 0-1 and 2-3). Scored on a log scale because each halving of
  resolution costs recognition about the same, from a floor where the landmarks become guesses
  up to the IOD the embedder's chip has anyway (more pixels than that are downsampled away).
- **sharpness**: variance of the Laplacian of the grey aligned chip over the face itself (the
  chip's unpadded template square, so background texture cannot make a blurred face look sharp),
  divided by the grey-level variance of the same region: the share of high-frequency energy, so
  a dim or low-contrast face is not mistaken for a blurred one. Log scale as well.
- **pose**: yaw estimated from the nose's offset from the eye midpoint along the eye line,
  divided by the IOD (a rigid head turned by yaw ``t`` moves the nose ``depth * sin t`` while
  the eyes close up to ``IOD * cos t``, so the ratio is ``(depth / IOD) * tan t``); roll is the
  eye line's angle. The pose score is the lower of the two angle scores.

The overall score is the **geometric mean** of the three components. It is zero whenever any
component is zero (a 2-pixel face or a profile is unusable however sharp it is, so defects do
not buy each other back at the extremes), yet unlike the minimum it still moves when a second
component degrades: two mildly weak components rank below one. ``limiting`` names the lowest
component, which is what an operator can act on ("closer", "steadier", "facing the camera").

These are physically motivated measures, not a learned quality predictor (ISO/IEC 29794-5's
unified score is learned); the constants are stated and checked on real data in
``tests/test_quality.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgeid.runtime.errors import BadInputError
from edgeid.runtime.inference.alignment import FACE_TEMPLATE_5
from edgeid.runtime.inference.types import FloatArray, RGBImage

# Below this IOD the eye corners are only a few pixels apart: the 5 landmarks, and so the
# alignment, are guesses (dlib's predictor and MTCNN both work down to ~20 px faces, IOD ~8 px).
IOD_MIN_PX = 8.0
# The size score saturates at the IOD of the aligned chip itself (52.5 px for dlib's 150 px chip
# with 0.25 padding): above it the chip is downsampled, so the embedder sees no extra detail.
# Computed from the chip geometry by ``native_inter_ocular``, not a constant.

# Sharpness (Laplacian variance / grey variance) at or below which the face counts as blurred:
# a Gaussian blur of sigma 2 px on the 150 px chip of a sharp LFW face lands around 0.004.
SHARPNESS_BLURRED = 0.004
# Sharpness at or above which the face counts as sharp: roughly the lower quartile of LFW's
# (sharp, JPEG) faces, so ordinary press photos score 1 and only softer images lose points.
SHARPNESS_SHARP = 0.02
# Below this grey-level variance the face region is flat (black padding, a blank chip):
# there is no structure to be sharp or blurred, so sharpness is 0.
MIN_GREY_VARIANCE = 1.0
# ITU-R BT.601 luma weights: the grey image the Laplacian is taken on.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# Depth of the nose base (dlib point 4, the subnasale) in front of the eye corners, as a
# fraction of the IOD, for a generic adult head (~15 mm in front, eyes ~62 mm apart). Only
# scales yaw degrees; the ordering of faces by yaw does not depend on it.
NOSE_DEPTH_IOD = 0.25
# Yaw up to which the pose score is full: recognisers trained on web photos (dlib's ResNet
# included) see many faces within +-15 degrees and lose little there.
YAW_FULL_DEG = 15.0
# Yaw at which the pose score reaches 0: beyond ~60 degrees the far eye is hidden by the nose,
# so the 5 landmarks (and the alignment built on them) are no longer defined.
YAW_ZERO_DEG = 60.0
# Roll up to which the pose score is full: alignment rotates the face upright, and the landmark
# cascade, which starts from an upright mean shape, still converges at this tilt.
ROLL_FULL_DEG = 20.0
# Roll at which the pose score reaches 0: the detectors and the upright-initialised landmark
# cascade are not trained on faces tilted this far, so their landmarks are not trusted.
ROLL_ZERO_DEG = 60.0

COMPONENTS = ("size", "sharpness", "pose")


@dataclass(frozen=True)
class FaceQuality:
    """Component scores and overall score in [0, 1] (1 is best), with their native measures."""

    overall: float
    size: float
    sharpness: float
    pose: float
    inter_ocular_px: float  # native measure of size
    sharpness_ratio: float  # native measure of sharpness: var(Laplacian) / var(grey)
    yaw_deg: float  # positive: the face turns towards the image's right
    roll_deg: float  # positive: the eye line tilts clockwise in the image (y down)

    @property
    def limiting(self) -> str:
        """The lowest component: what would most improve this face."""
        scores = {"size": self.size, "sharpness": self.sharpness, "pose": self.pose}
        return min(COMPONENTS, key=lambda name: scores[name])

    def to_json(self) -> dict[str, object]:
        return {
            "overall": round(self.overall, 4),
            "size": round(self.size, 4),
            "sharpness": round(self.sharpness, 4),
            "pose": round(self.pose, 4),
            "limiting": self.limiting,
            "inter_ocular_px": round(self.inter_ocular_px, 2),
            "sharpness_ratio": round(self.sharpness_ratio, 5),
            "yaw_deg": round(self.yaw_deg, 1),
            "roll_deg": round(self.roll_deg, 1),
        }


def linear_ramp(value: float, zero: float, full: float) -> float:
    """0 at or below ``zero``, 1 at or above ``full``, linear between (either order)."""
    if not math.isfinite(value):
        return 0.0
    return min(1.0, max(0.0, (value - zero) / (full - zero)))


def log_ramp(value: float, zero: float, full: float) -> float:
    """``linear_ramp`` on a log scale; ``zero`` and ``full`` must be positive."""
    if not value > 0:
        return 0.0
    return linear_ramp(math.log(value), math.log(zero), math.log(full))


def _eye_centres(landmarks: FloatArray) -> tuple[FloatArray, FloatArray]:
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (5, 2) or not np.isfinite(points).all():
        raise BadInputError(
            f"quality: expected finite (5, 2) landmarks in dlib's order, got {points.shape}"
        )
    # dlib's 5 points: 0-1 the corners of the eye on the image's right, 2-3 the other eye's.
    right = ((points[0] + points[1]) / 2).astype(np.float64)
    left = ((points[2] + points[3]) / 2).astype(np.float64)
    return left, right


def inter_ocular_distance(landmarks: FloatArray) -> float:
    """Pixels between the two eye centres."""
    left, right = _eye_centres(landmarks)
    return float(np.hypot(*(right - left)))


def head_pose(landmarks: FloatArray) -> tuple[float, float]:
    """(yaw, roll) in degrees from the 5 landmarks; see the module docstring for the model."""
    left, right = _eye_centres(landmarks)
    eye_line = right - left
    iod = float(np.hypot(*eye_line))
    roll = math.degrees(math.atan2(float(eye_line[1]), float(eye_line[0])))
    if iod < 1e-6:  # both eyes on one point: a profile or a broken landmark set
        return 90.0, roll
    nose = np.asarray(landmarks, dtype=np.float64)[4]
    offset = float(np.dot(nose - (left + right) / 2, eye_line / iod)) / iod
    return math.degrees(math.atan(offset / NOSE_DEPTH_IOD)), roll


def native_inter_ocular(chip_size: int, padding: float) -> float:
    """The IOD, in chip pixels, of a face aligned into a ``chip_size`` chip with ``padding``."""
    right = FACE_TEMPLATE_5[0:2].mean(axis=0)
    left = FACE_TEMPLATE_5[2:4].mean(axis=0)
    return float(np.hypot(*(right - left))) / (1 + 2 * padding) * chip_size


def chip_sharpness(chip: RGBImage, padding: float) -> float:
    """var(Laplacian) / var(grey) over the face square of an aligned chip (0 when flat)."""
    if chip.ndim != 3 or chip.shape[2] != 3 or chip.shape[0] != chip.shape[1]:
        raise BadInputError(f"quality: expected a square RGB chip, got {chip.shape}")
    size = chip.shape[0]
    # The unpadded template square: where the face is, whatever the padding shows around it.
    lo = round(size * padding / (1 + 2 * padding))
    hi = size - lo
    grey = chip[lo:hi, lo:hi].astype(np.float32) @ np.asarray(LUMA_WEIGHTS, dtype=np.float32)
    if min(grey.shape) < 3:
        return 0.0
    grey_var = float(grey.var())
    if grey_var < MIN_GREY_VARIANCE:
        return 0.0
    # 4-neighbour Laplacian over the interior pixels.
    laplacian = (
        grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4 * grey[1:-1, 1:-1]
    )
    return float(laplacian.var()) / grey_var


def assess(landmarks: FloatArray, chip: RGBImage, *, padding: float = 0.25) -> FaceQuality:
    """Quality of one face from its image landmarks and its aligned chip (cut with ``padding``)."""
    iod = inter_ocular_distance(landmarks)
    yaw, roll = head_pose(landmarks)
    ratio = chip_sharpness(chip, padding)
    size = log_ramp(iod, IOD_MIN_PX, native_inter_ocular(chip.shape[0], padding))
    sharpness = log_ramp(ratio, SHARPNESS_BLURRED, SHARPNESS_SHARP)
    pose = min(
        linear_ramp(abs(yaw), YAW_ZERO_DEG, YAW_FULL_DEG),
        linear_ramp(abs(roll), ROLL_ZERO_DEG, ROLL_FULL_DEG),
    )
    overall = (size * sharpness * pose) ** (1 / 3)
    return FaceQuality(
        overall=overall,
        size=size,
        sharpness=sharpness,
        pose=pose,
        inter_ocular_px=iod,
        sharpness_ratio=ratio,
        yaw_deg=yaw,
        roll_deg=roll,
    )
