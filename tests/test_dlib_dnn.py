"""dlib DNN .dat parsing and ONNX conversion, checked against dlib itself.

dlib (the ``dlib-bin`` wheel) is a test-only reference: the parity tests make face chips and
descriptors with dlib and compare our ONNX output on the very same chips.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from edgeid.models.conversion import ConvertedModel
from edgeid.models.dlib_dnn import (
    AffineLayer,
    ConLayer,
    PoolLayer,
    load_network,
    mmod_architecture,
    parse_network,
    resnet_architecture,
)
from edgeid.models.dlib_onnx import convert_dlib_mmod, convert_dlib_resnet
from edgeid.models.dlib_serialization import DlibReader
from edgeid.runtime.errors import ModelError

ort = pytest.importorskip("onnxruntime")

MMOD_DAT = "mmod_human_face_detector.dat"
RESNET_DAT = "dlib_face_recognition_resnet_model_v1.dat"
SHAPE5_DAT = "shape_predictor_5_face_landmarks.dat"

# The acceptance bar for descriptor parity with dlib.
MIN_COSINE = 0.9999
# ONNX batch for the embedder; large enough to amortise per-run overhead on 2 cores.
ONNX_BATCH = 64
# The box dlib's frontal detector would roughly give on a 250x250 LFW image; used when it finds
# nothing, so every image still yields a chip.
LFW_FALLBACK_BOX = (75, 75, 175, 175)
# Quick parity set: the first N LFW images in sorted order.
QUICK_IMAGES = 8
# dlib's MMOD scores are float32; ours differ only by summation order.
MMOD_SCORE_TOLERANCE = 1e-4


# --------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def mmod_dat(dlib_weights_dir: Path) -> Path:
    return dlib_weights_dir / MMOD_DAT


@pytest.fixture(scope="module")
def resnet_dat(dlib_weights_dir: Path) -> Path:
    return dlib_weights_dir / RESNET_DAT


@pytest.fixture(scope="module")
def mmod(mmod_dat: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ConvertedModel, Path]:
    """The converted detector and the path of its ONNX file."""
    dest = tmp_path_factory.mktemp("mmod")
    converted = convert_dlib_mmod(mmod_dat, dest)
    return converted, dest / converted.filename


@pytest.fixture(scope="module")
def resnet_session(resnet_dat: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    dest = tmp_path_factory.mktemp("resnet")
    started = time.perf_counter()
    converted = convert_dlib_resnet(resnet_dat, dest)
    print(f"\nresnet conversion: {time.perf_counter() - started:.2f} s")
    return _session(dest / converted.filename)


def _session(path: Path) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------
# Serialization primitives (bytes written by hand from dlib's documented format).


def _int(value: int) -> bytes:
    magnitude = abs(value).to_bytes(max(1, (abs(value).bit_length() + 7) // 8), "little")
    return bytes([len(magnitude) | (0x80 if value < 0 else 0)]) + magnitude


def _string(value: str) -> bytes:
    return _int(len(value)) + value.encode()


def test_reader_primitives() -> None:
    # 1.0 = 16 * 2**-4 as dlib writes it; inf uses the reserved exponent 32000.
    data = (
        _int(0) + _int(-300) + b"1" + _string("con_4") + _int(16) + _int(-4) + _int(0) + _int(32000)
    )
    reader = DlibReader(data, "test")
    assert reader.read_int() == 0
    assert reader.read_int() == -300
    assert reader.read_bool() is True
    assert reader.read_string() == "con_4"
    assert reader.read_float() == 1.0
    assert reader.read_float() == math.inf
    assert reader.at_end()
    with pytest.raises(ModelError, match="truncated"):
        DlibReader(_int(70000)[:-1], "test").read_int()
    with pytest.raises(ModelError, match="unsigned"):
        DlibReader(_int(-1), "test").read_uint()


def test_float_array_matches_dlib_matrix_bytes() -> None:
    """read_matrix on bytes dlib itself wrote (a pickled dlib.vector is its serialization)."""
    dlib = pytest.importorskip("dlib")
    rng = np.random.default_rng(0)
    values = rng.normal(size=5000) * 10.0 ** rng.integers(-30, 30, 5000)
    values = np.concatenate([values, [0.0, 1.0, -2.5, 1e308, 5e-324, math.inf, -math.inf]])
    state = dlib.vector(values.tolist()).__getstate__()[0]
    reader = DlibReader(bytes(state), "dlib.vector")
    decoded = reader.read_matrix()
    assert reader.at_end()
    assert decoded.shape == (values.size, 1)
    np.testing.assert_array_equal(decoded.ravel(), values)


# --------------------------------------------------------------------------------------------
# Parsing.


def test_parse_mmod(mmod_dat: Path) -> None:
    network = load_network(mmod_dat, mmod_architecture())
    cons = [layer for layer in network.layers if isinstance(layer, ConLayer)]
    assert [c.num_filters for c in cons] == [16, 32, 32, 45, 45, 45, 1]
    assert all(isinstance(layer, AffineLayer) for layer in network.layers[1::3][:6])
    assert network.input.pyramid_down == 6


def test_parse_resnet(resnet_dat: Path) -> None:
    network = load_network(resnet_dat, resnet_architecture())
    cons = [layer for layer in network.layers if isinstance(layer, ConLayer)]
    assert len(cons) == 29
    pools = [layer for layer in network.layers if isinstance(layer, PoolLayer)]
    assert pools[-1].kernel == (0, 0)  # avg_pool_everything
    assert network.input.size == (150, 150)


# --------------------------------------------------------------------------------------------
# MMOD.


def test_mmod_parameters_come_from_the_file(mmod: tuple[ConvertedModel, Path]) -> None:
    params = mmod[0].parameters
    assert params["detector_windows"] == [{"width": 80, "height": 80, "label": ""}]
    nms = params["loss_mmod"]["overlaps_nms"]
    assert nms["iou_thresh"] == pytest.approx(0.33828, abs=1e-5)
    assert nms["percent_covered_thresh"] == 1.0
    inp = params["input_layer"]
    assert inp["avg_rgb"] == pytest.approx([122.782, 117.001, 104.298], abs=1e-4)
    assert (inp["pyramid_padding"], inp["pyramid_outer_padding"]) == (10, 11)
    assert [(g["kernel"], g["stride"], g["padding"]) for g in params["layers"]] == (
        [([5, 5], [2, 2], [0, 0])] * 3 + [([5, 5], [1, 1], [2, 2])] * 3 + [([9, 9], [1, 1], [4, 4])]
    )
    assert params["output_to_input"] == {"scale_xy": [8, 8], "offset_xy": [14, 14]}


def _expected_map_size(size: int, geometry: list[dict[str, Any]], axis: int) -> int:
    for layer in geometry:
        size = (
            1 + (size + 2 * layer["padding"][axis] - layer["kernel"][axis]) // layer["stride"][axis]
        )
    return size


def test_mmod_runs_on_a_real_image(mmod: tuple[ConvertedModel, Path], scenes_dir: Path) -> None:
    from PIL import Image

    converted, path = mmod
    image = np.asarray(Image.open(scenes_dir / "dlib-faces" / "2009_004587.jpg").convert("RGB"))
    tensor = image.astype(np.float32).transpose(2, 0, 1)[None]
    (scores,) = _session(path).run(None, {"image": tensor})
    geometry = converted.parameters["layers"]
    expected = (
        1,
        len(converted.parameters["detector_windows"]),
        _expected_map_size(image.shape[0], geometry, 0),
        _expected_map_size(image.shape[1], geometry, 1),
    )
    assert scores.shape == expected
    assert np.isfinite(scores).all()


def _tiled_pyramid_rects(
    rows: int, cols: int, down: int, padding: int, outer: int
) -> tuple[list[tuple[int, int, int, int]], int, int]:
    """dlib's compute_tiled_image_pyramid_details: (left, top, width, height) per level."""
    sizes = [(cols, rows)]
    while True:
        rows = math.floor((down - 1.0) / down * rows)
        cols = math.floor((down - 1.0) / down * cols)
        if rows * cols == 0 or rows < 5:
            break
        sizes.append((cols, rows))
    total = sum(h + padding for _, h in sizes) - 2 * padding
    height, prev_width = 0, 0
    for w, h in sizes:
        if w <= sizes[0][0] - prev_width - padding and (height - sizes[0][1]) * 2 >= (
            total - sizes[0][1]
        ):
            break
        height += h + padding
        prev_width = w
    height -= padding
    width = sizes[0][0]
    rects: list[tuple[int, int, int, int]] = []
    y = outer
    while y < height + outer and len(rects) < len(sizes):
        w, h = sizes[len(rects)]
        rects.append((outer, y, w, h))
        y += h + padding
    y -= padding
    while len(rects) < len(sizes):
        w, h = sizes[len(rects)]
        x1, y1 = outer + width - 1, y - 1
        x0, y0 = x1 - w + 1, y1 - h + 1
        l0, t0, w0, h0 = rects[0]
        if not (x0 > l0 + w0 - 1 or x1 < l0 or y0 > t0 + h0 - 1 or y1 < t0):
            break
        rects.append((x0, y0, w, h))
        y -= h + padding
    return rects, height + 2 * outer, width + 2 * outer


def _resize_bilinear(src: npt.NDArray[np.float32], rows: int, cols: int) -> npt.NDArray[np.float32]:
    """dlib's resize_image: bilinear with the corner pixels aligned."""
    in_rows, in_cols = src.shape[1:]
    y = np.arange(rows) * ((in_rows - 1) / max(rows - 1, 1))
    x = np.arange(cols) * ((in_cols - 1) / max(cols - 1, 1))
    top, left = np.floor(y).astype(int), np.floor(x).astype(int)
    bottom, right = np.minimum(top + 1, in_rows - 1), np.minimum(left + 1, in_cols - 1)
    fy, fx = (y - top)[:, None], (x - left)[None, :]
    rows_t, rows_b = src[:, top], src[:, bottom]
    upper = (1 - fx) * rows_t[:, :, left] + fx * rows_t[:, :, right]
    lower = (1 - fx) * rows_b[:, :, left] + fx * rows_b[:, :, right]
    resized: npt.NDArray[np.float32] = ((1 - fy) * upper + fy * lower).astype(np.float32)
    return resized


def _dlib_pyramid_tensor(image: npt.NDArray[np.uint8], params: dict[str, Any]) -> Any:
    """The tiled pyramid dlib's input layer builds, as raw pixel values (background = avg)."""
    inp = params["input_layer"]
    avg = np.array(inp["avg_rgb"], np.float32)[:, None, None]
    rects, rows, cols = _tiled_pyramid_rects(
        image.shape[0],
        image.shape[1],
        inp["pyramid_down"],
        inp["pyramid_padding"],
        inp["pyramid_outer_padding"],
    )
    tensor = np.zeros((3, rows, cols), np.float32) + avg
    left, top, width, height = rects[0]
    tensor[:, top : top + height, left : left + width] = image.transpose(2, 0, 1)
    for prev, rect in itertools.pairwise(rects):
        pl, pt, pw, ph = prev
        left, top, width, height = rect
        # dlib resizes the normalised tensor; resizing raw values commutes up to rounding.
        level = _resize_bilinear(tensor[:, pt : pt + ph, pl : pl + pw] - avg, height, width)
        tensor[:, top : top + height, left : left + width] = level + avg
    return tensor[None]


@pytest.mark.parametrize("name", ["2008_001322.jpg", "2009_004587.jpg"])
def test_mmod_scores_match_dlib_detections(
    mmod: tuple[ConvertedModel, Path], mmod_dat: Path, scenes_dir: Path, name: str
) -> None:
    """Each detection dlib reports has its confidence somewhere in our raw score map."""
    dlib = pytest.importorskip("dlib")
    image = dlib.load_rgb_image(str(scenes_dir / "dlib-faces" / name))
    detections = dlib.cnn_face_detection_model_v1(str(mmod_dat))(image, 0)
    assert len(detections) > 0
    converted, path = mmod
    tensor = _dlib_pyramid_tensor(image, converted.parameters)
    (scores,) = _session(path).run(None, {"image": tensor})
    for detection in detections:
        assert np.min(np.abs(scores - detection.confidence)) < MMOD_SCORE_TOLERANCE


def test_conversion_is_reproducible(mmod_dat: Path, tmp_path: Path) -> None:
    first = convert_dlib_mmod(mmod_dat, tmp_path / "a")
    second = convert_dlib_mmod(mmod_dat, tmp_path / "b")
    assert first == second
    a = (tmp_path / "a" / first.filename).read_bytes()
    b = (tmp_path / "b" / second.filename).read_bytes()
    assert a == b


# --------------------------------------------------------------------------------------------
# Corrupt sources.


def _parse_mmod_bytes(data: bytes) -> None:
    parse_network(data, mmod_architecture(), "mmod.dat")


@pytest.mark.parametrize("keep", [0, 5, 1000, 0.5, -1])
def test_truncated_mmod_raises(mmod_dat: Path, tmp_path: Path, keep: float) -> None:
    data = mmod_dat.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(data[:cut])
    with pytest.raises(ModelError, match=r"byte offset \d+"):
        convert_dlib_mmod(truncated, tmp_path / "out")
    assert not (tmp_path / "out" / "dlib_mmod.onnx").exists()


def test_wrong_layer_tag_names_the_layer(mmod_dat: Path) -> None:
    data = mmod_dat.read_bytes().replace(b"con_4", b"con_9", 1)
    with pytest.raises(ModelError, match=r"'con_9'.*layer 1/19 from the input \(con\)"):
        _parse_mmod_bytes(data)


def test_wrong_version_raises(mmod_dat: Path) -> None:
    data = bytearray(mmod_dat.read_bytes())
    assert data[:2] == b"\x01\x01"  # add_loss_layer version 1
    data[1] = 7
    with pytest.raises(ModelError, match="add_loss_layer version 7"):
        _parse_mmod_bytes(bytes(data))


def test_trailing_bytes_raise(mmod_dat: Path) -> None:
    with pytest.raises(ModelError, match="unexpected bytes"):
        _parse_mmod_bytes(mmod_dat.read_bytes() + b"\x00")


def test_resnet_file_is_not_an_mmod(resnet_dat: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="loss tag"):
        convert_dlib_mmod(resnet_dat, tmp_path)


def test_missing_source_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read"):
        convert_dlib_resnet(tmp_path / "absent.dat", tmp_path)


# --------------------------------------------------------------------------------------------
# Embedder parity with dlib.


def _lfw_images(lfw_dir: Path) -> list[Path]:
    images = sorted((lfw_dir / "images").glob("*/*.jpg"))
    assert images, f"no LFW images under {lfw_dir}"
    return images


def _dlib_chips_and_descriptors(
    paths: list[Path], weights: Path
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float64], int]:
    dlib = pytest.importorskip("dlib")
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(weights / SHAPE5_DAT))
    recogniser = dlib.face_recognition_model_v1(str(weights / RESNET_DAT))
    chips, descriptors, fallbacks = [], [], 0
    for path in paths:
        image = dlib.load_rgb_image(str(path))
        found = detector(image, 0)
        if len(found):
            box = max(found, key=lambda r: r.area())
        else:
            box = dlib.rectangle(*LFW_FALLBACK_BOX)
            fallbacks += 1
        chip = dlib.get_face_chip(image, predictor(image, box), size=150, padding=0.25)
        chips.append(chip)
        descriptors.append(np.asarray(recogniser.compute_face_descriptor(chip)))
    return np.stack(chips), np.stack(descriptors), fallbacks


def _onnx_descriptors(session: Any, chips: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    outputs = [
        session.run(None, {"chips": chips[i : i + ONNX_BATCH]})[0]
        for i in range(0, len(chips), ONNX_BATCH)
    ]
    return np.concatenate(outputs)


def _cosines(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    cosines: npt.NDArray[np.float64] = np.sum(a64 * b64, axis=1) / norms
    return cosines


def _check_parity(session: Any, paths: list[Path], weights: Path) -> None:
    started = time.perf_counter()
    chips, reference, fallbacks = _dlib_chips_and_descriptors(paths, weights)
    dlib_seconds = time.perf_counter() - started
    started = time.perf_counter()
    ours = _onnx_descriptors(session, chips)
    onnx_seconds = time.perf_counter() - started
    assert ours.shape == reference.shape == (len(paths), 128)
    cosines = _cosines(ours, reference)
    print(
        f"\n{len(paths)} chips ({fallbacks} fallback boxes): cosine min {cosines.min():.10f} "
        f"(1 - min = {1 - cosines.min():.1e}) mean {cosines.mean():.10f}; "
        f"max |diff| {np.abs(ours - reference).max():.2e}; "
        f"dlib {dlib_seconds:.1f} s, onnx {onnx_seconds:.1f} s"
    )
    worst = paths[int(np.argmin(cosines))]
    assert cosines.min() >= MIN_COSINE, f"worst image {worst}: cosine {cosines.min()}"


def test_resnet_parity_quick(resnet_session: Any, lfw_dir: Path, dlib_weights_dir: Path) -> None:
    _check_parity(resnet_session, _lfw_images(lfw_dir)[:QUICK_IMAGES], dlib_weights_dir)


@pytest.mark.slow
def test_resnet_parity_all_lfw_dev(
    resnet_session: Any, lfw_dir: Path, dlib_weights_dir: Path
) -> None:
    _check_parity(resnet_session, _lfw_images(lfw_dir), dlib_weights_dir)
