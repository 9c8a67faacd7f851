"""The 5-point landmark predictor and face-chip alignment against dlib on real images.

dlib (``dlib-bin``) is the test-only reference: the same weights run through
``dlib.shape_predictor`` and ``dlib.get_face_chip(s)`` must give the same landmarks and chips as
``edgeid.runtime.inference.landmarks`` / ``edgeid.runtime.inference.alignment`` on the converted
ertree file.
"""

from __future__ import annotations

import hashlib
import random
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from edgeid.models.dlib_shape_predictor import (
    MODEL_NAME,
    OUTPUT_FILENAME,
    convert_shape_predictor,
    parse_shape_predictor,
)
from edgeid.runtime.errors import BadInputError, ModelError
from edgeid.runtime.inference.alignment import (
    ChipDetails,
    extract_image_chips,
    face_chip,
    face_chip_details,
    face_chips,
)
from edgeid.runtime.inference.landmarks import (
    ERTREE_FORMAT,
    ErtreeModel,
    ShapePredictor,
    decode_ertree,
    encode_ertree,
)
from edgeid.runtime.inference.types import Box

dlib = pytest.importorskip("dlib")

SP5_FILE = "shape_predictor_5_face_landmarks.dat"
# A fixed, seeded sample of LFW images: large enough to cover many faces, fast enough for CI.
LFW_SAMPLE = 300
LFW_SEED = 20240531
# dlib stores landmarks as whole pixels; ours match exactly, so half a pixel is a loose bound
# that only a real divergence (a different tree leaf somewhere in the cascade) can break.
MAX_LANDMARK_DIFF_PX = 0.5
# Chips: the only known divergence is float64 noise (SVD vs closed-form fits, ~1e-13 px) moving
# a truncated value across an integer, worth one grey level, and only rarely.
MAX_CHIP_DIFF = 1
MAX_CHIP_DIFF_FRACTION = 1e-3
# Upscaled copies of LFW make faces big enough (300-700 px) for dlib's chip pyramid (1-2 levels).
PYRAMID_SCALES = (3.0, 6.5)
PYRAMID_SAMPLE = 12


@dataclass(frozen=True)
class Face:
    image: np.ndarray
    rect: Any  # dlib.rectangle
    shape: Any  # dlib.full_object_detection from dlib's own predictor

    @property
    def box(self) -> Box:
        # dlib's rectangle is inclusive; our Box is exclusive on x1/y1.
        r = self.rect
        return Box(r.left(), r.top(), r.right() + 1, r.bottom() + 1)

    @property
    def points(self) -> np.ndarray:
        return np.array([[p.x, p.y] for p in self.shape.parts()], dtype=np.float32)


def _rgb(path: Path, scale: float = 1.0) -> np.ndarray:
    with Image.open(path) as img:
        rgb = img.convert("RGB")
        if scale != 1.0:
            size = (round(rgb.width * scale), round(rgb.height * scale))
            rgb = rgb.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)


def _faces(images: list[np.ndarray], rects: list[list[Any]], dlib_sp: Any) -> list[Face]:
    return [
        Face(img, r, dlib_sp(img, r)) for img, rs in zip(images, rects, strict=True) for r in rs
    ]


@pytest.fixture(scope="module")
def sp5_dat(dlib_weights_dir: Path) -> Path:
    path = dlib_weights_dir / SP5_FILE
    if not path.is_file():
        pytest.skip(f"{path} not installed")
    return path


@pytest.fixture(scope="module")
def ertree_path(sp5_dat: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("sp5")
    converted = convert_shape_predictor(sp5_dat, dest)
    return dest / converted.filename


@pytest.fixture(scope="module")
def predictor(ertree_path: Path) -> ShapePredictor:
    return ShapePredictor.load(ertree_path)


@pytest.fixture(scope="module")
def dlib_sp(sp5_dat: Path) -> Any:
    return dlib.shape_predictor(str(sp5_dat))


@pytest.fixture(scope="module")
def detector() -> Any:
    return dlib.get_frontal_face_detector()


@pytest.fixture(scope="module")
def lfw_files(lfw_dir: Path) -> list[Path]:
    files = sorted((lfw_dir / "images").glob("*/*.jpg"))
    assert len(files) >= LFW_SAMPLE
    return random.Random(LFW_SEED).sample(files, LFW_SAMPLE)


@pytest.fixture(scope="module")
def lfw_faces(lfw_files: list[Path], detector: Any, dlib_sp: Any) -> list[Face]:
    images = [_rgb(p) for p in lfw_files]
    # Upsampling once also finds the smaller, cut-off faces at LFW's image edges.
    faces = _faces(images, [list(detector(img, 1)) for img in images], dlib_sp)
    assert len(faces) >= LFW_SAMPLE * 0.9
    return faces


def _truth_boxes(scenes: Path) -> dict[str, list[Any]]:
    """Ground-truth boxes of dlib's imglab XML files, as dlib rectangles, by image name."""
    boxes: dict[str, list[Any]] = {}
    for xml in ("training.xml", "testing.xml"):
        for image in ET.parse(scenes / xml).getroot().iter("image"):
            for b in image.iter("box"):
                left, top = int(b.get("left", 0)), int(b.get("top", 0))
                width, height = int(b.get("width", 0)), int(b.get("height", 0))
                rect = dlib.rectangle(left, top, left + width - 1, top + height - 1)
                boxes.setdefault(Path(image.get("file", "")).name, []).append(rect)
    return boxes


@pytest.fixture(scope="module")
def scene_faces(scenes_dir: Path, detector: Any, dlib_sp: Any) -> list[Face]:
    folder = scenes_dir / "dlib-faces"
    truth = _truth_boxes(folder)
    files = sorted(folder.glob("*.jpg"))
    images = [_rgb(p) for p in files]
    rects = [
        list(detector(img, 1)) + truth.get(p.name, []) for p, img in zip(files, images, strict=True)
    ]
    faces = _faces(images, rects, dlib_sp)
    assert len(faces) >= 40
    return faces


def _landmark_report(name: str, faces: list[Face], predictor: ShapePredictor) -> None:
    rounded, subpixel = [], []
    for face in faces:
        ours = predictor.predict(face.image, face.box)
        fine = predictor.predict(face.image, face.box, subpixel=True)
        rounded.append(float(np.abs(ours - face.points).max()))
        subpixel.append(float(np.abs(fine - face.points).max()))
    print(
        f"\n{name}: {len(faces)} faces; landmark |ours - dlib| max {max(rounded):.3f} px, "
        f"mean {np.mean(rounded):.4f} px, exact {sum(d == 0 for d in rounded)}/{len(faces)}; "
        f"unrounded max {max(subpixel):.3f} mean {np.mean(subpixel):.3f} px"
    )
    assert max(rounded) <= MAX_LANDMARK_DIFF_PX
    # The unrounded points round to dlib's: within half a pixel (plus float32 slack).
    assert max(subpixel) <= 0.5 + 1e-3


def _chip_diffs(ours: list[np.ndarray], ref: list[np.ndarray]) -> np.ndarray:
    assert [c.shape for c in ours] == [c.shape for c in ref]
    return np.concatenate(
        [
            np.abs(a.astype(np.int16) - b.astype(np.int16)).ravel()
            for a, b in zip(ours, ref, strict=True)
        ]
    )


def _chip_report(name: str, diffs: np.ndarray) -> None:
    print(
        f"\n{name}: chip |ours - dlib| max {int(diffs.max())}, mean {diffs.mean():.6f}, "
        f"pixels differing {np.count_nonzero(diffs)}/{diffs.size}"
    )
    assert diffs.max() <= MAX_CHIP_DIFF
    assert np.count_nonzero(diffs) <= MAX_CHIP_DIFF_FRACTION * diffs.size


# --- conversion and the ertree format ---------------------------------------------------


def test_conversion_is_deterministic(sp5_dat: Path, ertree_path: Path, tmp_path: Path) -> None:
    """A second conversion (the module fixture made the first) gives the same bytes."""
    converted = convert_shape_predictor(sp5_dat, tmp_path)
    assert (converted.name, converted.filename) == (MODEL_NAME, OUTPUT_FILENAME)
    assert (converted.format, converted.task) == (ERTREE_FORMAT, "face-landmarks")
    assert converted.parameters["num_parts"] == 5
    data = (tmp_path / OUTPUT_FILENAME).read_bytes()
    assert data == ertree_path.read_bytes()
    print(f"\nertree: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}…")
    model = decode_ertree(data)
    assert encode_ertree(model) == data  # decode/encode round-trips to the same bytes
    assert (model.num_parts, model.tree_depth) == (5, 4)


@pytest.mark.parametrize("keep", [0, 1, 2, 100, 0.5, -1])
def test_truncated_dat_raises_model_error(sp5_dat: Path, tmp_path: Path, keep: float) -> None:
    data = sp5_dat.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    broken = tmp_path / "truncated.dat"
    broken.write_bytes(data[:cut])
    with pytest.raises(ModelError):
        convert_shape_predictor(broken, tmp_path)
    assert not (tmp_path / OUTPUT_FILENAME).exists()


def test_malformed_dat_raises_model_error(sp5_dat: Path, tmp_path: Path) -> None:
    data = sp5_dat.read_bytes()
    for name, blob in {
        "trailing": data + b"\x01\x00",
        "version": b"\x01\x02" + data[2:],
        "not-dlib": b"\x89PNG\r\n\x1a\n" + bytes(64),
    }.items():
        with pytest.raises(ModelError):
            parse_shape_predictor(blob, name)
    missing = tmp_path / "missing.dat"
    with pytest.raises(ModelError):
        convert_shape_predictor(missing, tmp_path)


def test_tampered_ertree_is_rejected(ertree_path: Path, tmp_path: Path) -> None:
    data = ertree_path.read_bytes()
    header_end = data.index(b"}") + 1
    variants = {
        "array byte": len(data) // 2,
        "header byte": header_end - 3,
        "digest byte": len(data) - 1,
        "magic byte": 0,
    }
    for name, offset in variants.items():
        tampered = bytearray(data)
        tampered[offset] ^= 0x01
        path = tmp_path / f"{name.replace(' ', '_')}.ertree"
        path.write_bytes(bytes(tampered))
        with pytest.raises(ModelError):
            ShapePredictor.load(path)
    for blob in (data[:-1], data[: len(data) // 3], b"", data + b"\x00"):
        with pytest.raises(ModelError):
            ShapePredictor.from_bytes(blob)
    with pytest.raises(ModelError):
        ShapePredictor.load(tmp_path / "absent.ertree")


def test_well_formed_but_hostile_ertree_is_rejected(ertree_path: Path) -> None:
    """A file with a valid digest but bad contents fails validation, not inference."""
    model = decode_ertree(ertree_path.read_bytes())
    pixels = model.pixels_per_level
    bad_index = model.split_idx1.copy()
    bad_index[3, 7, 2] = pixels  # one past the last feature pixel
    bad_anchor = model.anchor_idx.copy()
    bad_anchor[0, 0] = -1
    bad_leaf = model.leaf_values.copy()
    bad_leaf[1, 2, 3, 4] = np.nan
    hostile = [
        replace(model, split_idx1=bad_index),
        replace(model, anchor_idx=bad_anchor),
        replace(model, leaf_values=bad_leaf),
        replace(model, deltas=model.deltas[:, :-1]),
    ]
    for forged in hostile:
        with pytest.raises(ModelError):
            encode_ertree(forged)  # the writer refuses them too
    with pytest.MonkeyPatch.context() as patch:
        # Forge files with valid digests by skipping the writer's own validation.
        patch.setattr(ErtreeModel, "validate", lambda self: None)
        blobs = [encode_ertree(forged) for forged in hostile]
    for blob in blobs:
        with pytest.raises(ModelError):
            ShapePredictor.from_bytes(blob)


# --- landmarks --------------------------------------------------------------------------


def test_landmarks_match_dlib_on_lfw(lfw_faces: list[Face], predictor: ShapePredictor) -> None:
    _landmark_report("LFW sample", lfw_faces, predictor)


def test_landmarks_match_dlib_on_scenes(scene_faces: list[Face], predictor: ShapePredictor) -> None:
    _landmark_report("scenes/dlib-faces (detector + truth boxes)", scene_faces, predictor)


def test_landmarks_for_boxes_over_the_image_edge(
    lfw_files: list[Path], dlib_sp: Any, predictor: ShapePredictor
) -> None:
    """Feature pixels outside the image read 0, as in dlib."""
    images = [_rgb(p) for p in lfw_files[:20]]
    shifts = [(-90, 0), (0, -100), (120, 80), (-60, -60), (200, 200), (-300, 0)]
    rects = [[dlib.rectangle(70 + dx, 70 + dy, 180 + dx, 180 + dy) for dx, dy in shifts]] * 20
    _landmark_report("boxes over the edge", _faces(images, rects, dlib_sp), predictor)


def test_predict_many_equals_predict(scene_faces: list[Face], predictor: ShapePredictor) -> None:
    by_image: dict[int, list[Face]] = {}
    for face in scene_faces:
        by_image.setdefault(id(face.image), []).append(face)
    for faces in by_image.values():
        many = predictor.predict_many(faces[0].image, [f.box for f in faces])
        one = np.stack([predictor.predict(f.image, f.box) for f in faces])
        np.testing.assert_array_equal(many, one)
    empty = predictor.predict_many(scene_faces[0].image, [])
    assert empty.shape == (0, 5, 2)


def test_numpy_reduce_keeps_dlib_summation_order() -> None:
    """The predictor relies on add.reduce over a non-contiguous axis summing in sequence."""
    rng = np.random.default_rng(0)
    terms = rng.normal(size=(3, 501, 10)).astype(np.float32)
    terms[:, 1:] *= np.float32(1e-3)  # small increments: pairwise summation would round apart
    sequential = terms[:, 0].copy()
    for i in range(1, terms.shape[1]):
        sequential += terms[:, i]
    np.testing.assert_array_equal(np.add.reduce(terms, axis=1), sequential)


def test_bad_inputs_are_refused(lfw_faces: list[Face], predictor: ShapePredictor) -> None:
    face = lfw_faces[0]
    with pytest.raises(BadInputError):
        predictor.predict(face.image.astype(np.float32), face.box)
    with pytest.raises(BadInputError):
        predictor.predict(face.image[..., 0], face.box)
    with pytest.raises(BadInputError):
        predictor.predict(face.image, Box(float("nan"), 0, 10, 10))
    with pytest.raises(BadInputError):
        face_chip(face.image, face.points[:4])
    with pytest.raises(BadInputError):
        face_chip(face.image, face.points, size=0)
    with pytest.raises(BadInputError):
        face_chip(face.image, face.points, padding=-0.1)


# --- face chips -------------------------------------------------------------------------


def test_face_chips_match_dlib_on_lfw(lfw_faces: list[Face]) -> None:
    ours = [face_chip(f.image, f.points, 150, 0.25) for f in lfw_faces]
    ref = [dlib.get_face_chip(f.image, f.shape, 150, 0.25) for f in lfw_faces]
    _chip_report("LFW sample, 150 px / 0.25", _chip_diffs(ours, ref))


def test_face_chips_match_dlib_on_scenes(scene_faces: list[Face]) -> None:
    ours = [face_chip(f.image, f.points) for f in scene_faces]
    ref = [dlib.get_face_chip(f.image, f.shape) for f in scene_faces]
    _chip_report("scenes, 150 px / 0.25", _chip_diffs(ours, ref))


def test_face_chips_other_sizes_and_rotations(lfw_faces: list[Face], dlib_sp: Any) -> None:
    faces = lfw_faces[:30]
    ours, ref = [], []
    for f in faces:
        for size, padding in ((200, 0.3), (112, 0.0), (151, 0.1)):
            ours.append(face_chip(f.image, f.points, size, padding))
            ref.append(dlib.get_face_chip(f.image, f.shape, size, padding))
    # Rotated copies exercise the chip angle; 90 and 180 degrees hit exact trigonometry. The
    # landmarks are dlib's, rotated with the image (exactness is irrelevant: both sides get the
    # same points).
    for f in faces[:10]:
        for angle in (25, -40, 90, 180):
            rotated, points = _rotate(f.image, f.points, angle)
            parts = [dlib.point(int(x), int(y)) for x, y in points]
            shape = dlib.full_object_detection(dlib.rectangle(0, 0, 10, 10), parts)
            ours.append(face_chip(rotated, points))
            ref.append(dlib.get_face_chip(rotated, shape))
    _chip_report("other sizes, paddings and rotations", _chip_diffs(ours, ref))


def _rotate(image: np.ndarray, points: np.ndarray, degrees: float) -> tuple[np.ndarray, Any]:
    """The image turned counter-clockwise by ``degrees`` (canvas expanded), points with it."""
    pil = Image.fromarray(image)
    turned = pil.rotate(degrees, Image.Resampling.BILINEAR, expand=True)
    theta = np.deg2rad(degrees)
    # y points down, so a counter-clockwise turn on screen is (x, y) -> (x c + y s, -x s + y c).
    rotation = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    old_centre = np.array([pil.width, pil.height]) / 2
    new_centre = np.array([turned.width, turned.height]) / 2
    moved = (points - old_centre) @ rotation.T + new_centre
    return np.asarray(turned), np.round(moved).astype(np.float32)


def _upscaled_faces(files: list[Path], detector: Any, dlib_sp: Any) -> Iterator[Face]:
    for path in files:
        # The HOG detector on a 1600 px image is slow; find the faces at 1x and scale the boxes.
        rects = list(detector(_rgb(path), 0))
        for scale in PYRAMID_SCALES:
            image = _rgb(path, scale)
            for r in rects:
                corners = [round(v * scale) for v in (r.left(), r.top(), r.right(), r.bottom())]
                rect = dlib.rectangle(*corners)
                yield Face(image, rect, dlib_sp(image, rect))


def _pyramid_depth(details: ChipDetails) -> int:
    """How many pyramid_down<2> levels dlib builds before cutting this chip."""
    x0, y0, x1, y1 = details.rect
    depth = 0
    while True:
        x0, y0, x1, y1 = x0 / 2 - 1.25, y0 / 2 - 0.75, x1 / 2 - 1.25, y1 / 2 - 0.75
        if (x1 - x0 + 1) * (y1 - y0 + 1) <= details.rows * details.cols:
            return depth
        depth += 1


def test_face_chips_through_the_pyramid(
    lfw_files: list[Path], detector: Any, dlib_sp: Any, predictor: ShapePredictor
) -> None:
    """Faces far larger than the chip go through dlib's pyramid_down<2> first."""
    faces = list(_upscaled_faces(lfw_files[:PYRAMID_SAMPLE], detector, dlib_sp))
    depths = {_pyramid_depth(face_chip_details(f.points)) for f in faces}
    assert {1, 2} <= depths, depths  # one- and two-level pyramids are both covered
    ours = [face_chip(f.image, f.points) for f in faces]
    ref = [dlib.get_face_chip(f.image, f.shape) for f in faces]
    _chip_report(f"upscaled x{PYRAMID_SCALES} (pyramid)", _chip_diffs(ours, ref))
    _landmark_report("upscaled faces", faces, predictor)


def test_face_chips_batch_matches_dlib_get_face_chips(scenes_dir: Path, dlib_sp: Any) -> None:
    """Several faces share one pyramid in dlib's get_face_chips; face_chips does the same."""
    detector = dlib.get_frontal_face_detector()
    ours, ref = [], []
    for path in sorted((scenes_dir / "dlib-faces").glob("*.jpg")):
        small = _rgb(path)
        rects = list(detector(small, 1))
        if not rects:
            continue
        for scale in (1, 3):
            image = _rgb(path, scale)
            shapes = dlib.full_object_detections()
            for r in rects:
                scaled = dlib.rectangle(
                    r.left() * scale, r.top() * scale, r.right() * scale, r.bottom() * scale
                )
                shapes.append(dlib_sp(image, scaled))
            points = [np.array([[p.x, p.y] for p in s.parts()], np.float32) for s in shapes]
            ours.extend(face_chips(image, points))
            ref.extend(dlib.get_face_chips(image, shapes, 150, 0.25))
    _chip_report("scenes, batched (shared pyramid)", _chip_diffs(ours, ref))


def test_chip_details_match_dlib(lfw_faces: list[Face]) -> None:
    """Our closed-form fits agree with dlib's SVD fits to float64 noise."""
    worst_rect = worst_angle = 0.0
    for f in lfw_faces[:100]:
        ref = dlib.get_face_chip_details(f.shape, 150, 0.25)
        ours = face_chip_details(f.points, 150, 0.25)
        assert (ours.rows, ours.cols) == (ref.rows, ref.cols)
        want = (ref.rect.left(), ref.rect.top(), ref.rect.right(), ref.rect.bottom())
        worst_rect = max(worst_rect, *(abs(a - b) for a, b in zip(ours.rect, want, strict=True)))
        worst_angle = max(worst_angle, abs(ours.angle - ref.angle))
    print(f"\nchip details vs dlib: rect {worst_rect:.2e} px, angle {worst_angle:.2e} rad")
    assert worst_rect < 1e-9 and worst_angle < 1e-12


def test_extract_image_chips_matches_dlib(lfw_faces: list[Face]) -> None:
    """Generic chips, including dlib's plain-copy case (angle 0, chip size = rectangle size)."""
    image = lfw_faces[0].image
    cases = [
        ((10.0, 20.0, 109.0, 89.0), 0.0, 70, 100),  # plain copy
        ((-20.0, -30.0, 79.0, 69.0), 0.0, 100, 100),  # plain copy over the edge
        ((-20.5, 30.25, 200.75, 260.5), 0.3, 60, 80),
        ((-50.0, -50.0, 300.0, 300.0), 1.0, 40, 40),
        ((100.0, 100.0, 110.0, 105.0), -0.5, 200, 300),  # upsampling
        ((400.0, 400.0, 500.0, 500.0), 0.2, 50, 50),  # entirely outside: black
    ]
    ours, ref = [], []
    for rect, angle, rows, cols in cases:
        details = dlib.chip_details(dlib.drectangle(*rect), dlib.chip_dims(rows, cols), angle)
        ref.append(dlib.extract_image_chip(image, details))
        ours.extend(extract_image_chips(image, [ChipDetails(rect, angle, rows, cols)]))
    _chip_report("generic chip details", _chip_diffs(ours, ref))
