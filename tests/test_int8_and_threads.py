"""Issue 17, items 0 and 1: no spinning inference threads (configurable), and the INT8 models
(reproducible bytes, accuracy and cosine gates on an LFW dev subset)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest

from edgeid.models.build import _int8_up_to_date, build_models, expected_checksums
from edgeid.models.quantise import pins_apply
from edgeid.runtime.config.settings import ConfigError, InferenceSettings, load_settings
from edgeid.runtime.inference import onnx_backend
from edgeid.runtime.inference.onnx_backend import SPINNING_KEY
from edgeid.runtime.inference.pipeline import FacePipeline
from edgeid.runtime.inference.precision import (
    DEFAULT_PRECISION,
    INT8_SUFFIX,
    QUANTISED_MODELS,
    precision_model,
)

MTCNN = ("mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet")
INT8_NAMES = [n + INT8_SUFFIX for n in QUANTISED_MODELS]


def _sessions(pipeline: FacePipeline) -> list[Any]:
    """Every ONNX Runtime session of a loaded CPU pipeline (detector nets and embedder)."""
    inner = pipeline.detector._detector  # type: ignore[attr-defined]
    found = [
        getattr(inner, n) for n in ("_pnet", "_rnet", "_onet", "_session") if hasattr(inner, n)
    ]
    assert pipeline.embedder is not None
    found.append(pipeline.embedder._session)
    return found


@pytest.mark.parametrize("detector", ["mtcnn", "mmod"])
def test_spinning_is_off_on_every_session_unless_configured(
    models_dir: Path, detector: str
) -> None:
    default = _sessions(FacePipeline.load(models_dir, detector, threads=1, backend="cpu"))
    assert len(default) == (4 if detector == "mtcnn" else 2)
    assert {s.get_session_options().get_session_config_entry(SPINNING_KEY) for s in default} == {
        "0"
    }
    spinning = FacePipeline.load(models_dir, detector, threads=1, backend="cpu", spinning=True)
    assert {
        s.get_session_options().get_session_config_entry(SPINNING_KEY) for s in _sessions(spinning)
    } == {"1"}


def test_spinning_and_precision_are_edgeid_toml_settings(tmp_path: Path) -> None:
    defaults = InferenceSettings()
    # The settings module imports no inference code; its defaults must match the measured ones.
    assert defaults.spinning is onnx_backend.DEFAULT_SPINNING is False
    assert defaults.precision == DEFAULT_PRECISION
    (tmp_path / "edgeid.toml").write_text('[inference]\nspinning = true\nprecision = "int8"\n')
    chosen = load_settings(tmp_path).inference
    assert (chosen.spinning, chosen.precision) == (True, "int8")
    (tmp_path / "edgeid.toml").write_text('[inference]\nprecision = "int8-embedder"\n')
    assert load_settings(tmp_path).inference.precision == "int8-embedder"
    (tmp_path / "edgeid.toml").write_text('[inference]\nprecision = "int4"\n')
    with pytest.raises(ConfigError, match="precision"):
        load_settings(tmp_path)


def test_precision_names_the_int8_twin_only_where_one_exists() -> None:
    assert [precision_model(n, "int8") for n in QUANTISED_MODELS] == [
        n + INT8_SUFFIX for n in QUANTISED_MODELS
    ]
    assert precision_model("dlib_mmod", "int8") == "dlib_mmod"
    assert precision_model("dlib_resnet_v1", "fp32") == "dlib_resnet_v1"
    # int8-embedder: the INT8 embedder behind the FP32 MTCNN nets.
    assert [precision_model(n, "int8-embedder") for n in QUANTISED_MODELS] == [
        *MTCNN,
        "dlib_resnet_v1" + INT8_SUFFIX,
    ]


def test_int8_mtcnn_rebuilds_byte_identical_to_the_pinned_build(
    tmp_path: Path, models_dir: Path, data_dir: Path
) -> None:
    """Same photos in the same order, same FP32 nets: the bytes pinned by an earlier build
    (the embedder's twin is checked the same way by the build itself, below)."""
    from edgeid.models.quantise import quantise_all

    pinned = expected_checksums()
    converted, _ = quantise_all(models_dir, data_dir, tmp_path, MTCNN)
    digests = {
        c.name: hashlib.sha256((tmp_path / c.filename).read_bytes()).hexdigest() for c in converted
    }
    if pins_apply():
        assert digests == {n + INT8_SUFFIX: pinned[n + INT8_SUFFIX] for n in MTCNN}
    else:  # another CPU kind: ONNX Runtime's kernels differ, so the same bytes twice here
        (tmp_path / "again").mkdir()
        again, _ = quantise_all(models_dir, data_dir, tmp_path / "again", MTCNN)
        assert digests == {
            c.name: hashlib.sha256((tmp_path / "again" / c.filename).read_bytes()).hexdigest()
            for c in again
        }


@pytest.fixture(scope="session")
def int8_models(models_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with the INT8 twins: the box's own when built (`make setup` does where
    the shared data is), else built once here beside copies of the FP32 models."""
    if _int8_up_to_date(models_dir, QUANTISED_MODELS, expected_checksums()):
        return models_dir
    folder = tmp_path_factory.mktemp("int8") / "models"
    shutil.copytree(models_dir, folder, ignore=shutil.ignore_patterns(".staging-*"))
    build_models(
        folder, folder.parent / "wheelhouse", only=INT8_NAMES, precision="int8", data_dir=data_dir
    )
    return folder


def test_int8_build_is_pinned_and_up_to_date_after(int8_models: Path) -> None:
    """The build checks each twin against checksums.json (a differing byte fails the build)."""
    assert _int8_up_to_date(int8_models, QUANTISED_MODELS, expected_checksums())
    manifests = build_models(
        int8_models, int8_models.parent / "wheelhouse", only=INT8_NAMES, precision="int8"
    )
    if pins_apply():
        assert {m.name: m.sha256 for m in manifests} == {
            n + INT8_SUFFIX: expected_checksums()[n + INT8_SUFFIX] for n in QUANTISED_MODELS
        }


def test_int8_gates_hold_on_an_lfw_subset(int8_models: Path, data_dir: Path) -> None:
    """Cosine of every INT8 embedding to its FP32 twin >= 0.99; accuracy within the issue's
    bars for both INT8 configurations (on 60 pairs, a coarse but failing check: a broken
    quantisation drops far). The full run is in the README."""
    from benchmarks.int8_gates import run

    report = run(data_dir, int8_models, limit=30, threads=1)
    assert report["images"] >= 100
    assert report["embedder_cosine"]["below_gate"] == 0, report["embedder_cosine"]
    assert report["embedder_cosine"]["min"] >= 0.99
    for name in ("int8", "int8-embedder"):
        assert report["configurations"][name]["accuracy_drop_points"] <= 2.0, report
        assert report[name]["accuracy"] >= 0.95  # 1 pair in 60 is 1.7 points
    assert report["configurations"]["int8-embedder"]["detector"] == "fp32"
    # The mixed configuration's pipeline finds exactly the FP32 pipeline's faces.
    assert report["int8-embedder"]["no_face"] == report["fp32"]["no_face"]


def test_embedder_is_calibrated_on_scene_photos_not_on_the_lfw_it_is_scored_on(
    models_dir: Path, data_dir: Path
) -> None:
    from edgeid.models.quantise import (
        EMBEDDER,
        MIN_SCENE_CHIPS,
        calibration_digest,
        collect_calibration,
        scene_images,
    )

    calibration = collect_calibration(models_dir, data_dir, [EMBEDDER])
    assert list(calibration.feeds) == [EMBEDDER]
    scenes = scene_images(data_dir)
    assert all("lfw" not in p.parts for p in scenes)
    assert calibration.photos[EMBEDDER] == (calibration_digest(scenes), len(scenes))
    assert len(calibration.feeds[EMBEDDER]) >= MIN_SCENE_CHIPS


def test_folding_the_affine_keeps_the_fp32_embedder_and_drops_its_mul_add(
    models_dir: Path, data_dir: Path
) -> None:
    import numpy as np
    import onnx

    from edgeid.models.quantise import EMBEDDER, collect_calibration, fold_affine
    from edgeid.runtime.inference.manifest import read_verified_model
    from edgeid.runtime.inference.onnx_backend import create_cpu_session

    _, fp32 = read_verified_model(models_dir, EMBEDDER)
    folded = fold_affine(fp32)
    ops = [n.op_type for n in onnx.load_from_string(folded).graph.node]
    before = [n.op_type for n in onnx.load_from_string(fp32).graph.node]
    assert before.count("Conv") == ops.count("Conv") == 29
    assert before.count("Mul") - ops.count("Mul") == 29  # one affine per convolution
    assert fold_affine(fp32) == folded  # deterministic bytes
    feeds = collect_calibration(models_dir, data_dir, [EMBEDDER]).feeds[EMBEDDER][:8]
    chips = np.concatenate([f["chips"] for f in feeds])
    original = create_cpu_session(fp32, 1).run(None, {"chips": chips})[0]
    after = create_cpu_session(folded, 1).run(None, {"chips": chips})[0]
    assert np.allclose(original, after, atol=1e-4), np.abs(original - after).max()


def test_the_int8_embedder_keeps_its_most_sensitive_layers_fp32(int8_models: Path) -> None:
    """The first convolution and the final FC read FP32 weights; every other conv INT8."""
    import onnx

    from edgeid.models.quantise import EMBEDDER_KEPT_FP32

    graph = onnx.load(str(int8_models / "dlib_resnet_v1_int8.onnx")).graph
    initializers = {i.name for i in graph.initializer}
    float_weights = {
        n.name for n in graph.node if n.op_type in ("Conv", "MatMul") and n.input[1] in initializers
    }
    assert float_weights == set(EMBEDDER_KEPT_FP32)
    assert sum(n.op_type == "Conv" for n in graph.node) == 29


def test_each_precision_has_its_own_shipped_calibration(tmp_path: Path) -> None:
    """Thresholds measured on the INT8 pipeline, not borrowed from FP32 (the gallery service
    refuses an embedder without a calibration)."""
    from edgeid.runtime.gallery.thresholds import model_calibration

    fp32 = model_calibration(tmp_path, "dlib_resnet_v1")
    int8 = model_calibration(tmp_path, precision_model("dlib_resnet_v1", "int8"))
    assert int8.model_id == "dlib_resnet_v1_int8"
    assert fp32.model_id == "dlib_resnet_v1"
    assert int8.data.model_dump()["bands"]["adult"] != fp32.data.model_dump()["bands"]["adult"]


def test_precision_ab_interleaves_two_pipelines_on_the_same_faces(
    int8_models: Path, data_dir: Path
) -> None:
    from benchmarks.precision_ab import run

    report = run(data_dir / "lfw-dev" / "images", int8_models, limit=4, rounds=1, threads=1)
    fp32, mixed = report["precisions"]["fp32"], report["precisions"]["int8-embedder"]
    assert report["images"] == 4
    assert fp32["faces"] == mixed["faces"] >= 4  # the same FP32 detector
    assert fp32["images_per_s"] > 0 and mixed["cpu_ms_per_image"] > 0
