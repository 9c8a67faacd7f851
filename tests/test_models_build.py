"""`edgeid models build`: pinned sources in, reproducible models and honest manifests out."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from edgeid.cli import main
from edgeid.models.build import STEPS, build_models, expected_checksums
from edgeid.models.sources import sha256_file
from edgeid.runtime.errors import ModelError, ModelIntegrityError
from edgeid.runtime.inference.manifest import list_manifests, read_verified_model
from edgeid.runtime.inference.precision import INT8_SUFFIX, QUANTISED_MODELS

ALL_MODELS = {name for step in STEPS for name in step.outputs}
# Built by `edgeid models build --precision int8` (tests/test_int8_and_threads.py).
INT8_MODELS = {name + INT8_SUFFIX for name in QUANTISED_MODELS}


def test_every_model_is_built_with_its_pinned_checksum(models_dir: Path) -> None:
    manifests = {m.name: m for m in list_manifests(models_dir)}
    assert ALL_MODELS <= set(manifests) <= ALL_MODELS | INT8_MODELS
    pinned = expected_checksums()
    assert set(pinned) == ALL_MODELS | INT8_MODELS, "models/checksums.json must pin every model"
    for name, manifest in manifests.items():
        assert manifest.sha256 == pinned[name]
        assert sha256_file(models_dir / manifest.file) == manifest.sha256
        assert manifest.source.licence in {"CC0-1.0", "MIT"}
        assert manifest.inputs and manifest.outputs


def test_small_models_rebuild_byte_identical(tmp_path: Path, edgeid_home: Path) -> None:
    """A second conversion gives the same bytes (no timestamps, stable names)."""
    small = ["dlib_mmod", "dlib_sp5", "mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet"]
    wheelhouse = edgeid_home / "wheelhouse"
    first = build_models(tmp_path / "a", wheelhouse, only=small)
    second = build_models(tmp_path / "b", wheelhouse, only=small, force=True)
    assert [m.sha256 for m in first] == [m.sha256 for m in second]
    for manifest in first:
        a = (tmp_path / "a" / manifest.file).read_bytes()
        assert a == (tmp_path / "b" / manifest.file).read_bytes()


def test_up_to_date_build_is_a_no_op(models_dir: Path) -> None:
    messages: list[str] = []
    before = {p.name: p.stat().st_mtime_ns for p in models_dir.iterdir()}
    build_models(models_dir, models_dir.parent / "wheelhouse", progress=messages.append)
    assert all(m.endswith("up to date") for m in messages)
    assert before == {p.name: p.stat().st_mtime_ns for p in models_dir.iterdir()}


def test_altered_model_bytes_are_refused(tmp_path: Path, models_dir: Path) -> None:
    copy = tmp_path / "models"
    shutil.copytree(models_dir, copy)
    target = copy / "dlib_mmod.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="does not match its manifest"):
        read_verified_model(copy, "dlib_mmod")


def test_cli_verify_and_detect_refuse_an_altered_model(
    tmp_path: Path, models_dir: Path, lfw_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    shutil.copytree(models_dir, home / "models")
    assert main(["models", "verify", "--home", str(home)]) == 0
    onnx = home / "models" / "dlib_resnet_v1.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-10])
    capsys.readouterr()
    assert main(["models", "verify", "--home", str(home)]) == 1
    image = next((lfw_dir / "images").rglob("*.jpg"))
    assert main(["embed", str(image), "--home", str(home)]) == 1
    err = capsys.readouterr().err
    assert "dlib_resnet_v1.onnx does not match its manifest" in err
    assert "Traceback" not in err


def test_missing_wheel_names_the_fix(tmp_path: Path) -> None:
    fix = re.escape("pip download --no-deps facenet-pytorch==2.6.0")
    with pytest.raises(ModelError, match=fix):
        build_models(tmp_path / "models", tmp_path / "empty-wheelhouse", only=["mtcnn_pnet"])
