"""The MMOD CNN face detector against dlib's own ``cnn_face_detection_model_v1``.

The bar: on the same image and upsample count every box dlib finds is found by ours with
IoU >= 0.9, ours finds nothing dlib does not, and scores agree closely. dlib's CNN is slow on CPU
(about 4 s for a 500x375 photo upsampled once, 2 minutes for bald_guys.jpg), so its answers are
kept in pytest's cache, keyed by dlib's version, the weights and the image bytes; run with
``--cache-clear`` to recompute them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
from PIL import Image

from edgeid.runtime.errors import BadInputError, ModelError
from edgeid.runtime.evaluation.detection import iou as box_iou
from edgeid.runtime.inference.image_pyramid import (
    Rect,
    lround,
    pyramid_level_sizes,
    pyramid_up_size,
    resize_bilinear_planes,
    resize_bilinear_rgb,
    tiled_pyramid_layout,
    tiled_pyramid_to_image,
)
from edgeid.runtime.inference.manifest import read_verified_model
from edgeid.runtime.inference.mmod_detector import MmodDetector, _non_max_suppression
from edgeid.runtime.inference.onnx_backend import create_cpu_session
from edgeid.runtime.inference.types import Box, Detection

MIN_IOU = 0.9
# Ours and dlib differ only in float summation order inside the convolutions (~1e-6).
MAX_SCORE_DIFF = 1e-3
LFW_SAMPLE_SIZE = 100
# Images in scenes/dlib-faces where dlib needs over half a minute each with upsample 1.
LARGE_DLIB_FACES = ("bald_guys.jpg", "dogs.jpg")
ORT_THREADS = 2


@pytest.fixture(scope="module")
def mmod_verified(models_dir: Path) -> tuple[dict[str, Any], bytes]:
    manifest, data = read_verified_model(models_dir, "dlib_mmod")
    return dict(manifest.parameters), data


@pytest.fixture(scope="module")
def mmod_session(mmod_verified: tuple[dict[str, Any], bytes]) -> onnxruntime.InferenceSession:
    return create_cpu_session(mmod_verified[1], ORT_THREADS)


@pytest.fixture(scope="module")
def mmod_parameters(mmod_verified: tuple[dict[str, Any], bytes]) -> dict[str, Any]:
    return mmod_verified[0]


@pytest.fixture(scope="module")
def mmod_detector(
    mmod_session: onnxruntime.InferenceSession, mmod_parameters: dict[str, Any]
) -> MmodDetector:
    return MmodDetector(mmod_session, mmod_parameters)


@pytest.fixture(scope="module")
def dlib_mmod(dlib_weights_dir: Path) -> Any:
    dlib = pytest.importorskip("dlib")
    return dlib.cnn_face_detection_model_v1(str(dlib_weights_dir / "mmod_human_face_detector.dat"))


def _load(path: Path) -> np.ndarray[Any, np.dtype[np.uint8]]:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# --------------------------------------------------------------------------------------------
# Comparison against dlib


@dataclass
class Comparison:
    images: int = 0
    dlib_boxes: int = 0
    missing: int = 0
    extra: int = 0
    min_iou: float = 1.0
    max_score_diff: float = 0.0
    ours_s: float = 0.0
    dlib_s: float = 0.0
    dlib_cached: int = 0

    def summary(self, label: str) -> str:
        return (
            f"{label}: {self.images} images, {self.dlib_boxes} dlib boxes, "
            f"missing {self.missing}, extra {self.extra}, min IoU {self.min_iou:.4f}, "
            f"max |score diff| {self.max_score_diff:.2e}, ours {self.ours_s:.1f} s, "
            f"dlib {self.dlib_s:.1f} s ({self.dlib_cached} answers from cache)"
        )


def _dlib_detect(
    pytestconfig: pytest.Config, dlib_mmod: Any, path: Path, upsample: int
) -> tuple[list[Detection], bool]:
    """dlib's detections (boxes in our x1/y1-exclusive convention), and whether cached."""
    import dlib

    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    key = f"edgeid/mmod_dlib/{dlib.__version__}/{digest}/{upsample}"
    cache = getattr(pytestconfig, "cache", None)
    stored = cache.get(key, None) if cache is not None else None
    if stored is None:
        stored = [
            [d.rect.left(), d.rect.top(), d.rect.right() + 1, d.rect.bottom() + 1, d.confidence]
            for d in dlib_mmod(_load(path), upsample)
        ]
        if cache is not None:
            cache.set(key, stored)
        cached = False
    else:
        cached = True
    return [Detection(Box(*map(float, row[:4])), float(row[4])) for row in stored], cached


def _compare(
    pytestconfig: pytest.Config,
    detector: MmodDetector,
    dlib_mmod: Any,
    paths: Sequence[Path],
    upsample: int,
) -> tuple[Comparison, list[str]]:
    result = Comparison()
    problems: list[str] = []
    for path in paths:
        image = _load(path)
        start = time.perf_counter()
        ours = detector.detect(image, upsample=upsample)
        result.ours_s += time.perf_counter() - start
        start = time.perf_counter()
        theirs, cached = _dlib_detect(pytestconfig, dlib_mmod, path, upsample)
        result.dlib_s += time.perf_counter() - start
        result.dlib_cached += cached
        result.images += 1
        result.dlib_boxes += len(theirs)

        unmatched = list(range(len(ours)))
        for ref in theirs:
            best = max(unmatched, key=lambda i: box_iou(ref.box, ours[i].box), default=None)
            overlap = 0.0 if best is None else box_iou(ref.box, ours[best].box)
            result.min_iou = min(result.min_iou, overlap)
            if overlap < MIN_IOU or best is None:
                result.missing += 1
                problems.append(f"{path.name}: dlib box {ref} not found (best IoU {overlap:.3f})")
                continue
            unmatched.remove(best)
            diff = abs(ours[best].score - ref.score)
            result.max_score_diff = max(result.max_score_diff, diff)
        for i in unmatched:
            result.extra += 1
            problems.append(f"{path.name}: extra box {ours[i]}")
    return result, problems


def _check(
    label: str, outcome: tuple[Comparison, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    result, problems = outcome
    with capsys.disabled():
        print("\n" + result.summary(label))
    assert not problems, "\n".join(problems)
    assert result.max_score_diff <= MAX_SCORE_DIFF, result.summary(label)


def _dlib_faces(scenes_dir: Path, large: bool) -> list[Path]:
    paths = sorted((scenes_dir / "dlib-faces").glob("*.jpg"))
    return [p for p in paths if (p.name in LARGE_DLIB_FACES) == large]


def test_matches_dlib_on_dlib_faces_upsampled(
    pytestconfig: pytest.Config,
    mmod_detector: MmodDetector,
    dlib_mmod: Any,
    scenes_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    paths = _dlib_faces(scenes_dir, large=False)
    assert paths
    outcome = _compare(pytestconfig, mmod_detector, dlib_mmod, paths, upsample=1)
    _check("dlib-faces, upsample 1", outcome, capsys)
    assert outcome[0].dlib_boxes > 0


@pytest.mark.slow
def test_matches_dlib_on_large_dlib_faces_upsampled(
    pytestconfig: pytest.Config,
    mmod_detector: MmodDetector,
    dlib_mmod: Any,
    scenes_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    paths = _dlib_faces(scenes_dir, large=True)
    assert paths
    outcome = _compare(pytestconfig, mmod_detector, dlib_mmod, paths, upsample=1)
    _check("dlib-faces large (bald_guys, dogs), upsample 1", outcome, capsys)


def test_matches_dlib_on_group_scenes(
    pytestconfig: pytest.Config,
    mmod_detector: MmodDetector,
    dlib_mmod: Any,
    scenes_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    paths = sorted((scenes_dir / "group").glob("bbt*.jpg"))
    assert paths
    outcome = _compare(pytestconfig, mmod_detector, dlib_mmod, paths, upsample=0)
    _check("group scenes bbt*, upsample 0", outcome, capsys)
    assert outcome[0].dlib_boxes > 0


def test_matches_dlib_on_lfw_sample(
    pytestconfig: pytest.Config,
    mmod_detector: MmodDetector,
    dlib_mmod: Any,
    lfw_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    paths = sorted((lfw_dir / "images").glob("*/*.jpg"))
    sample = paths[:: max(1, len(paths) // LFW_SAMPLE_SIZE)][:LFW_SAMPLE_SIZE]
    assert len(sample) == LFW_SAMPLE_SIZE
    outcome = _compare(pytestconfig, mmod_detector, dlib_mmod, sample, upsample=0)
    _check(f"LFW sample of {len(sample)}, upsample 0", outcome, capsys)


def test_matches_dlib_upsampled_twice(
    pytestconfig: pytest.Config,
    mmod_detector: MmodDetector,
    dlib_mmod: Any,
    lfw_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Two levels compound pyramid_up's odd output size and the rect_down rounding.
    paths = sorted((lfw_dir / "images").glob("*/*.jpg"))[:1]
    outcome = _compare(pytestconfig, mmod_detector, dlib_mmod, paths, upsample=2)
    _check("LFW image, upsample 2", outcome, capsys)
    assert outcome[0].dlib_boxes > 0


# --------------------------------------------------------------------------------------------
# Behaviour of the detector itself


def test_detections_are_sorted_and_respect_threshold(
    mmod_detector: MmodDetector, scenes_dir: Path
) -> None:
    image = _load(scenes_dir / "group" / "bbt2.jpg")
    default = mmod_detector.detect(image)
    assert default, "expected faces in bbt2.jpg"
    scores = [d.score for d in default]
    assert scores == sorted(scores, reverse=True)
    assert all(s > 0.0 for s in scores)

    strict = mmod_detector.detect(image, threshold=scores[0])
    assert strict == []
    # NMS visits boxes best first, so lowering the threshold only appends candidates: every
    # default detection survives.
    loose = mmod_detector.detect(image, threshold=-0.5)
    assert set(default) <= set(loose)
    assert all(d.score > -0.5 for d in loose)


def test_upsample_finds_small_faces(mmod_detector: MmodDetector, scenes_dir: Path) -> None:
    image = _load(scenes_dir / "dlib-faces" / "2008_002470.jpg")
    plain = mmod_detector.detect(image, upsample=0)
    upsampled = mmod_detector.detect(image, upsample=1)
    assert len(upsampled) > len(plain)
    rows, cols = image.shape[:2]
    for det in upsampled:  # boxes come back in the original image's coordinates
        assert -det.box.width < det.box.x0 < cols and -det.box.height < det.box.y0 < rows


def test_tiny_image_gives_no_detections(mmod_detector: MmodDetector) -> None:
    # dlib itself throws on images this small; we answer "no faces".
    for size in (1, 5, 12):
        assert mmod_detector.detect(np.zeros((size, size, 3), dtype=np.uint8)) == []


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((20, 20), dtype=np.uint8),
        np.zeros((20, 20, 4), dtype=np.uint8),
        np.zeros((20, 20, 3), dtype=np.float32),
        np.zeros((0, 20, 3), dtype=np.uint8),
    ],
)
def test_rejects_bad_images(mmod_detector: MmodDetector, image: np.ndarray[Any, Any]) -> None:
    with pytest.raises(BadInputError):
        mmod_detector.detect(image)


def test_rejects_bad_upsample(mmod_detector: MmodDetector) -> None:
    with pytest.raises(BadInputError):
        mmod_detector.detect(np.zeros((20, 20, 3), dtype=np.uint8), upsample=-1)


def test_rejects_malformed_parameters(
    mmod_session: onnxruntime.InferenceSession, mmod_parameters: dict[str, Any]
) -> None:
    params = mmod_parameters
    for broken in (
        {k: v for k, v in params.items() if k != "layers"},
        {**params, "output_to_input": {"scale_xy": [4, 4], "offset_xy": [14, 14]}},
        {**params, "loss_mmod": {**params["loss_mmod"], "use_bounding_box_regression": True}},
    ):
        with pytest.raises(ModelError):
            MmodDetector(mmod_session, broken)


# --------------------------------------------------------------------------------------------
# The pyramid and geometry, against dlib's primitives where its Python API exposes them


@pytest.fixture(scope="module")
def dlib_module() -> Any:
    return pytest.importorskip("dlib")


def _random_sizes(rng: np.random.Generator, count: int) -> Iterator[tuple[int, int, int, int]]:
    for _ in range(count):
        rows, cols = (int(v) for v in rng.integers(2, 90, size=2))
        if rng.random() < 0.5:  # the pyramid's own 5/6 steps
            out_rows, out_cols = int(rows * 5 / 6), int(cols * 5 / 6)
        else:
            out_rows = max(1, int(rows * rng.uniform(0.4, 2.5)))
            out_cols = max(1, int(cols * rng.uniform(0.4, 2.5)))
        if out_rows and out_cols:
            yield rows, cols, out_rows, out_cols


def test_float_resize_is_bit_exact_with_dlib(dlib_module: Any) -> None:
    rng = np.random.default_rng(1)
    for rows, cols, out_rows, out_cols in _random_sizes(rng, 200):
        plane = (rng.standard_normal((rows, cols)) * 60).astype(np.float32)
        expected = dlib_module.resize_image(plane, out_rows, out_cols)
        ours = resize_bilinear_planes(plane[None], out_rows, out_cols)[0]
        np.testing.assert_array_equal(
            ours, expected, err_msg=f"{rows}x{cols}->{out_rows}x{out_cols}"
        )


def test_rgb_resize_is_bit_exact_with_dlib(dlib_module: Any) -> None:
    rng = np.random.default_rng(2)
    for rows, cols, out_rows, out_cols in _random_sizes(rng, 200):
        image = rng.integers(0, 256, size=(rows, cols, 3), dtype=np.uint8)
        expected = dlib_module.resize_image(image, out_rows, out_cols)
        ours = resize_bilinear_rgb(image, out_rows, out_cols)
        np.testing.assert_array_equal(
            ours, expected, err_msg=f"{rows}x{cols}->{out_rows}x{out_cols}"
        )


def test_pyramid_up_size_matches_dlib(dlib_module: Any) -> None:
    pyr = dlib_module.pyramid_down(2)
    for rows, cols in [(1, 1), (250, 250), (375, 500), (768, 1366), (17, 3)]:
        up = pyr.rect_up(dlib_module.rectangle(0, 0, cols - 1, rows - 1))
        assert pyramid_up_size(rows, cols) == (up.bottom() + 1, up.right() + 1)


def test_level_sizes_follow_pyramid_down_6() -> None:
    sizes = pyramid_level_sizes(250, 250, 6)
    assert sizes[:4] == [(250, 250), (208, 208), (173, 173), (144, 144)]
    assert sizes[-1][0] >= 5 and int(sizes[-1][0] * 5 / 6) < 5


@pytest.mark.parametrize(
    "rows, cols", [(250, 250), (768, 1366), (375, 500), (1000, 120), (40, 900)]
)
def test_layout_tiles_fit_and_do_not_overlap(rows: int, cols: int) -> None:
    layout = tiled_pyramid_layout(rows, cols, 6, 10, 11)
    canvas = Rect(0, 0, layout.width - 1, layout.height - 1)
    assert layout.rects[0] == Rect(11, 11, 11 + cols - 1, 11 + rows - 1)
    assert layout.width == cols + 22
    sizes = pyramid_level_sizes(rows, cols, 6)
    for i, rect in enumerate(layout.rects):
        assert (rect.height, rect.width) == sizes[i]
        assert canvas.intersect(rect) == rect
        for other in layout.rects[:i]:
            assert other.intersect(rect).is_empty


def test_layout_of_lfw_sized_image() -> None:
    # Regression values from the layout that reproduces dlib's detections exactly.
    layout = tiled_pyramid_layout(250, 250, 6, 10, 11)
    assert (layout.height, layout.width) == (957, 272)
    assert layout.rects[1] == Rect(11, 271, 218, 478)


def test_canvas_boxes_map_back_through_their_level() -> None:
    layout = tiled_pyramid_layout(250, 250, 6, 10, 11)
    level1 = layout.rects[1]
    box = np.array([[level1.left + 10.0, level1.top + 20.0, level1.left + 89.0, level1.top + 99.0]])
    mapped = tiled_pyramid_to_image(layout, 6, box)
    # One pyramid_down<6> level up: p * 6/5 + 0.3.
    np.testing.assert_allclose(
        mapped, [[10 * 1.2 + 0.3, 20 * 1.2 + 0.3, 89 * 1.2 + 0.3, 99 * 1.2 + 0.3]]
    )


def test_lround_rounds_halves_away_from_zero() -> None:
    values = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 2.4999999999999996, 3.49])
    assert lround(values).tolist() == [1, 2, 3, -1, -2, 2, 3]


def test_nms_uses_dlibs_bounding_box_overlap() -> None:
    # 80x80 boxes shifted by 40 px: intersection 40*80 = 3200, bounding box 120*80 = 9600, so
    # dlib's ratio is 1/3 (true IoU would be 0.5). Threshold 0.338 keeps both; 0.3 drops one.
    rects = np.array([[0, 0, 79, 79], [40, 0, 119, 79]], dtype=np.int64)
    assert _non_max_suppression(rects, 0.3382761351109955, 1.0) == [0, 1]
    assert _non_max_suppression(rects, 0.3, 1.0) == [0]
    # A box inside another is suppressed through percent_covered_thresh.
    nested = np.array([[0, 0, 99, 99], [10, 10, 29, 29]], dtype=np.int64)
    assert _non_max_suppression(nested, 0.9, 0.5) == [0]
    assert _non_max_suppression(nested, 0.9, 1.0) == [0, 1]
