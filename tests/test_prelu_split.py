"""The PRelu rewrite every CPU session gets (issue 17 item 2): same numbers, same faces.

The reference is the as-built graph (``rewrite_prelu=False``), run in the same process on the
same inputs: the MTCNN nets' outputs must be bit-identical on the real pyramid levels and crops
of LFW dev and the multi-face scenes, and the detector must find the same faces there.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from edgeid.runtime.inference.manifest import read_verified_model
from edgeid.runtime.inference.mtcnn_detector import MODEL_NAMES, MtcnnDetector
from edgeid.runtime.inference.onnx_backend import create_cpu_session
from edgeid.runtime.inference.prelu_split import prelu_count, split_prelu
from edgeid.runtime.inference.types import Detection

# LFW dev images (first by path) run through both detectors; all scene photos run too.
LFW_IMAGES = 120
# The brief for the faster path: boxes within a pixel, landmarks and scores within these.
BOX_TOLERANCE_PX = 1.0
LANDMARK_TOLERANCE_PX = 0.5
SCORE_TOLERANCE = 1e-4


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def photos(lfw_dir: Path, scenes_dir: Path) -> list[tuple[str, np.ndarray]]:
    lfw = sorted((lfw_dir / "images").rglob("*.jpg"))[:LFW_IMAGES]
    scenes = sorted(scenes_dir.rglob("*.jpg"))
    assert len(lfw) == LFW_IMAGES and scenes
    return [(p.name, _rgb(p)) for p in [*lfw, *scenes]]


def _detector(models_dir: Path, *, rewrite: bool, wrap: Any = None) -> MtcnnDetector:
    """The detector on the models as built (or rewritten), each level and crop batch whole as
    before issue 17 item 2 (256 crops per run was the old cap)."""
    sessions = []
    for name in MODEL_NAMES:
        session = create_cpu_session(
            read_verified_model(models_dir, name)[1], 1, rewrite_prelu=rewrite
        )
        sessions.append(wrap(name, session) if wrap else session)
    parameters = MtcnnDetector.load(models_dir).parameters
    return MtcnnDetector(*sessions, parameters, crop_batches=(256, 256), pnet_tile=None)


class _Recording:
    """A session that keeps every input it runs on."""

    def __init__(self, name: str, inner: ort.InferenceSession, seen: dict[str, list[np.ndarray]]):
        self._name, self._inner, self._seen = name, inner, seen

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> Any:
        self._seen[self._name].append(feeds["image"])
        return self._inner.run(names, feeds)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._inner, attr)


def test_mtcnn_nets_give_bit_identical_outputs(
    models_dir: Path, photos: list[tuple[str, np.ndarray]]
) -> None:
    seen: dict[str, list[np.ndarray]] = defaultdict(list)
    recorder = _detector(models_dir, rewrite=False, wrap=lambda n, s: _Recording(n, s, seen))
    for _, image in photos[::4]:  # every level and crop the cascade runs on these photos
        recorder.detect(image)
    for name in MODEL_NAMES:
        built = read_verified_model(models_dir, name)[1]
        rewritten = split_prelu(built)
        assert prelu_count(built) >= 3 and prelu_count(rewritten) == 0
        onnx.checker.check_model(onnx.load_from_string(rewritten))
        before = create_cpu_session(built, 1, rewrite_prelu=False)
        after = create_cpu_session(built, 1)
        outputs = [o.name for o in before.get_outputs()]
        assert len(seen[name]) >= 10, name
        for data in seen[name]:
            for a, b in zip(
                before.run(outputs, {"image": data}),
                after.run(outputs, {"image": data}),
                strict=True,
            ):
                assert np.array_equal(a, b), name


def _same_faces(name: str, old: list[Detection], new: list[Detection]) -> None:
    assert len(old) == len(new), name
    for a, b in zip(old, new, strict=True):
        assert (
            np.abs(np.array(a.box.as_list()) - np.array(b.box.as_list())).max() <= BOX_TOLERANCE_PX
        )
        assert np.abs(a.landmarks - b.landmarks).max() <= LANDMARK_TOLERANCE_PX, name
        assert abs(a.score - b.score) <= SCORE_TOLERANCE, name


def test_detector_finds_the_same_faces(
    models_dir: Path, photos: list[tuple[str, np.ndarray]]
) -> None:
    reference = _detector(models_dir, rewrite=False)
    product = MtcnnDetector.load(models_dir, threads=1)  # the default path: rewritten
    faces = exact = 0
    for name, image in photos:
        old, new = reference.detect(image), product.detect(image)
        _same_faces(name, old, new)
        faces += len(old)
        exact += old == new
    assert faces >= LFW_IMAGES + 40  # one face per LFW photo, dozens in the scenes
    assert exact == len(photos)  # measured: every detection equal to the last bit


# --- the rewriter on small graphs --------------------------------------------------------------


def _model(nodes: list[onnx.NodeProto], inits: list[TensorProto], shape: list[int]) -> bytes:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return bytes(model.SerializeToString())


def _run(model: bytes, x: np.ndarray, *, rewrite: bool) -> np.ndarray:
    session = create_cpu_session(model, 1, rewrite_prelu=rewrite)
    result: np.ndarray = session.run(["y"], {"x": x})[0]
    return result


@pytest.mark.parametrize(
    ("slopes", "ops"),
    [
        ([-1.5, -0.25, 0.0, 0.3, 1.0, 1.3], ["Relu", "Sub", "Mul", "Add"]),  # mixed
        ([-1.5, -0.25, 0.0, 0.3, 1.0, 0.999], ["Mul", "Max"]),  # all <= 1
        ([1.0, 1.3, 2.0, 7.5, 1.0001, 3.0], ["Mul", "Min"]),  # all >= 1
    ],
)
def test_rewrite_is_exact_for_any_slope(slopes: list[float], ops: list[str]) -> None:
    a = np.array(slopes, dtype=np.float32).reshape(6, 1, 1)
    model = _model(
        [helper.make_node("PRelu", ["x", "a"], ["y"])],
        [numpy_helper.from_array(a, "a")],
        [2, 6, 5, 7],
    )
    rng = np.random.default_rng(17)
    x = rng.normal(0, 50, (2, 6, 5, 7)).astype(np.float32)
    x[0, :, 0, 0] = 0.0
    x[1, :, 0, 0] = np.float32(3e-38)  # subnormal products
    x[1, :, 1, 1] = -np.float32(1e-40)
    x[1, :, 2, 2] = np.float32(-3e38)  # products that overflow to -inf
    rewritten = split_prelu(model)
    assert prelu_count(model) == 1 and prelu_count(rewritten) == 0
    assert [n.op_type for n in onnx.load_from_string(rewritten).graph.node] == ops
    with np.errstate(over="ignore"):
        expected = np.where(x >= 0, x, a * x)
    assert np.array_equal(_run(model, x, rewrite=False), expected)
    assert np.array_equal(_run(model, x, rewrite=True), expected)


def test_slopes_that_are_no_constant_take_the_general_form() -> None:
    model = _model(
        [
            helper.make_node("Identity", ["a0"], ["a"]),
            helper.make_node("PRelu", ["x", "a"], ["y"]),
        ],
        [numpy_helper.from_array(np.full((3, 1, 1), 0.5, dtype=np.float32), "a0")],
        [1, 3, 4, 4],
    )
    rewritten = split_prelu(model)
    assert [n.op_type for n in onnx.load_from_string(rewritten).graph.node] == [
        "Identity",
        "Relu",
        "Sub",
        "Mul",
        "Add",
    ]
    x = np.random.default_rng(3).normal(0, 1, (1, 3, 4, 4)).astype(np.float32)
    assert np.array_equal(_run(model, x, rewrite=True), _run(model, x, rewrite=False))


def test_graphs_it_must_not_touch_come_back_unchanged(models_dir: Path) -> None:
    embedder = read_verified_model(models_dir, "dlib_resnet_v1")[1]
    assert split_prelu(embedder) is embedder  # no PRelu at all
    scale = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, dtype=np.uint8), "z")
    slope = numpy_helper.from_array(np.full((3, 1, 1), 0.2, dtype=np.float32), "a")
    quantised = _model(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
            helper.make_node("PRelu", ["d", "a"], ["y"]),
        ],
        [scale, zero, slope],
        [1, 3, 4, 4],
    )
    assert split_prelu(quantised) is quantised  # ONNX Runtime fuses QDQ patterns itself
    for garbage in (b"PRelu", b"\x3a\xff\xff\xff\xff\x0fPRelu", b"\x0bPRelu"):
        assert split_prelu(garbage) is garbage
    plain = _model([helper.make_node("PRelu", ["x", "a"], ["y"])], [slope], [1, 3, 4, 4])
    once = split_prelu(plain)
    assert once != plain and split_prelu(once) is once  # never rewritten twice


# --- P-Net in tiles ----------------------------------------------------------------------------


@pytest.mark.parametrize("tile", [24, 26, 64, 192])
def test_pnet_tiles_give_the_whole_level_maps(models_dir: Path, tile: int) -> None:
    whole = MtcnnDetector.load(models_dir, threads=1)
    tiled = MtcnnDetector(whole._pnet, whole._rnet, whole._onet, whole.parameters, pnet_tile=tile)
    untiled = MtcnnDetector(whole._pnet, whole._rnet, whole._onet, whole.parameters, pnet_tile=None)
    rng = np.random.default_rng(tile)
    for height, width in [(12, 12), (13, 200), (193, 194), (205, 431), (37, 36)]:
        pixels = rng.integers(0, 256, (1, 3, height, width)).astype(np.float32)
        level = tiled._normalise(pixels)
        for a, b in zip(tiled._run_pnet(level), untiled._run_pnet(level), strict=True):
            assert a.shape == b.shape and np.array_equal(a, b), (tile, height, width)


def test_tiles_cover_each_cell_once() -> None:
    from edgeid.runtime.inference.mtcnn_detector import _tiles

    for size in range(12, 400):
        for tile in (24, 26, 64, 192):
            runs = _tiles(size, tile, 12, 2)
            cells = [c for _, _, first, n in runs for c in range(first, first + n)]
            assert cells == list(range(-(-(size - 2) // 2) - 4))
            assert runs[-1][1] == size and all(e - s >= 11 for s, e, _, _ in runs)
            assert all(s % 2 == 0 and (e - s == tile) for s, e, _, _ in runs[:-1])


def test_bad_batches_and_tiles_are_refused(models_dir: Path) -> None:
    from edgeid.runtime.errors import ModelError

    d = MtcnnDetector.load(models_dir, threads=1)
    for kwargs in ({"crop_batches": (0, 8)}, {"pnet_tile": 23}, {"pnet_tile": 12}):
        with pytest.raises(ModelError):
            MtcnnDetector(d._pnet, d._rnet, d._onet, d.parameters, **kwargs)  # type: ignore[arg-type]


def test_runs_are_sized_by_each_nets_real_backend(models_dir: Path, photos: Any) -> None:
    """Tiles and small batches wherever a net runs on the CPU, a wrapper around an ONNX Runtime
    session included (INT8 calibration's recorder is one); whole levels and GPU_CROP_BATCH crops
    for a TensorRT engine, net by net, or for any session when asked (``runs="whole"``)."""
    from edgeid.runtime.inference.backends.tensorrt_backend import TensorRTSession
    from edgeid.runtime.inference.mtcnn_detector import (
        GPU_CROP_BATCH,
        ONET_BATCH,
        PNET_TILE,
        RNET_BATCH,
    )

    class Engine(TensorRTSession):  # a TensorRT engine's type, ONNX Runtime's numbers
        def __init__(self, inner: Any) -> None:
            self.run = inner.run
            self.get_inputs, self.get_outputs = inner.get_inputs, inner.get_outputs

    def wrapped(name: str, sha256: str, data: bytes) -> Any:
        return _Recording(name, create_cpu_session(data, 1), defaultdict(list))

    def pnet_on_gpu(name: str, sha256: str, data: bytes) -> Any:
        session = create_cpu_session(data, 1)
        return Engine(session) if name == "mtcnn_pnet" else session

    def all_on_gpu(name: str, sha256: str, data: bytes) -> Any:
        return Engine(create_cpu_session(data, 1))

    def sizing(d: MtcnnDetector) -> tuple[int | None, tuple[int, int]]:
        return d._pnet_tile, d._crop_batches

    cpu = (PNET_TILE, (RNET_BATCH, ONET_BATCH))
    whole = (None, (GPU_CROP_BATCH, GPU_CROP_BATCH))
    detectors = {
        "cpu": (MtcnnDetector.load(models_dir, threads=1), cpu),
        "wrapped": (MtcnnDetector.load(models_dir, open_model=wrapped), cpu),
        "pnet on gpu": (
            MtcnnDetector.load(models_dir, open_model=pnet_on_gpu),
            (None, (RNET_BATCH, ONET_BATCH)),
        ),
        "all on gpu": (MtcnnDetector.load(models_dir, open_model=all_on_gpu), whole),
        "asked whole": (MtcnnDetector.load(models_dir, threads=1, runs="whole"), whole),
    }
    for label, (detector, expected) in detectors.items():
        assert sizing(detector) == expected, label
    # However the runs are sized, the same faces (a scene photo: several faces, many crops).
    name, image = photos[-1]
    found = {label: d.detect(image) for label, (d, _) in detectors.items()}
    assert len(found["cpu"]) > 1, name
    for label, faces in found.items():
        assert faces == found["cpu"], label
