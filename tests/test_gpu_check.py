"""firmware/gpu_check.py's own logic on this GPU-less machine: the exit status and report without
TensorRT, and the parity and throughput checks with ONNX Runtime standing in for TensorRT (so
the bars are shown to pass for equal backends and to fail for unequal ones). Only make gpu-check
on a GPU proves TensorRT itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from edgeid.runtime.inference.backends import ModelSession
from edgeid.runtime.inference.backends import tensorrt_backend as trtb
from edgeid.runtime.inference.manifest import read_verified_model
from edgeid.runtime.inference.onnx_backend import create_cpu_session
from edgeid.runtime.inference.pipeline import EMBEDDER_MODEL
from firmware import gpu_check


def _no_tensorrt_here() -> None:
    try:
        trtb.probe()
    except trtb.TensorRTUnavailableError:
        return
    pytest.skip("this machine has TensorRT and a GPU: make gpu-check runs the real thing")


def test_without_a_gpu_it_exits_2_and_says_so_in_the_report(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_tensorrt_here()
    report = tmp_path / "out" / "gpu-check.json"
    assert gpu_check.main(["--data", str(data_dir), "--report", str(report)]) == 2
    assert "nothing was checked" in capsys.readouterr().err
    document = json.loads(report.read_text())
    assert document["status"] == "no-gpu" and document["checks"] == []
    assert "TensorRT" in document["figures"]["unavailable"]


class _Skewed:
    """An embedder session whose vectors are rotated a little: cosine about 0.99 < 0.999."""

    def __init__(self, inner: ModelSession) -> None:
        self.inner = inner

    def get_inputs(self) -> Any:
        return self.inner.get_inputs()

    def get_outputs(self) -> Any:
        return self.inner.get_outputs()

    def run(self, names: Any, feeds: Any, /) -> list[npt.NDArray[Any]]:
        out = self.inner.run(names, feeds)
        vectors = out[0]
        noise = np.random.default_rng(0).normal(size=vectors.shape).astype(vectors.dtype)
        scale = 0.15 * np.linalg.norm(vectors, axis=1, keepdims=True) / np.sqrt(vectors.shape[1])
        return [vectors + noise * scale, *out[1:]]


@pytest.fixture(scope="module")
def cpu_sessions(models_dir: Path) -> dict[str, ModelSession]:
    return {
        name: create_cpu_session(read_verified_model(models_dir, name)[1], 1)
        for name in gpu_check.MODELS
    }


def test_parity_passes_for_equal_backends_and_fails_for_a_skewed_embedder(
    data_dir: Path, models_dir: Path, cpu_sessions: dict[str, ModelSession]
) -> None:
    everything = gpu_check.find_images(data_dir, 2)
    images = gpu_check.Images(everything.lfw[:2], everything.scenes[:1])
    standing_in = dict(cpu_sessions) | {EMBEDDER_MODEL: _Skewed(cpu_sessions[EMBEDDER_MODEL])}
    report = gpu_check.Report()
    chips = gpu_check.check_parity(images, models_dir, cpu_sessions, standing_in, report)
    assert chips
    outcome = {c["check"]: c["ok"] for c in report.checks}
    for label in ("1 thread", "8 threads"):
        assert outcome[f"embedder parity, {label}"] is False
        for detector in ("MMOD (upsample 0)", "MMOD (upsample 1)", "MTCNN"):
            assert outcome[f"{detector} parity, {label}"] is True
    faces = report.figures["parity"]["8 threads"]["embedder"]["faces"]
    assert faces == len(chips) and report.figures["parity"]["1 thread"]["MTCNN"]["min_iou"] == 1.0


def test_throughput_bar_fails_when_the_gpu_is_no_faster(
    cpu_sessions: dict[str, ModelSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu_check, "THROUGHPUT_RUNS", 1)
    monkeypatch.setattr(gpu_check, "WARMUP_RUNS", 0)
    monkeypatch.setattr(gpu_check, "THROUGHPUT_BATCHES", (1, 2))
    report = gpu_check.Report()
    session = cpu_sessions[EMBEDDER_MODEL]
    gpu_check.check_throughput(session, session, [], report)
    (check,) = report.checks
    assert check["check"] == "embedder throughput" and check["ok"] is False
    figures = report.figures["throughput_faces_per_s"]
    assert set(figures["tensorrt"]) == set(figures["onnxruntime_cpu"]) == {"1", "2"}


def test_memory_check_needs_engines() -> None:
    report = gpu_check.Report()
    gpu_check.check_memory_after_open({}, report)
    assert report.failures == ["GPU memory"]
