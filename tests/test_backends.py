"""Inference backends: the engine cache, profile planning, backend selection, TensorRT sessions.

Everything but the ``gpu`` tests runs without a GPU: engines are stood in for by bytes from a
fake builder. The ``gpu`` tests skip unless TensorRT 10, pycuda and an NVIDIA GPU are present
(``make gpu-check`` is the full check on such a machine).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from edgeid.runtime.errors import BadInputError, ModelError, ModelIntegrityError
from edgeid.runtime.inference.backends import ModelSession, TensorInfo, open_session
from edgeid.runtime.inference.backends import engine_cache as ec
from edgeid.runtime.inference.backends import tensorrt_backend as trtb
from edgeid.runtime.inference.backends.engine_cache import (
    EngineCache,
    EngineKey,
    EngineLoadError,
    atomic_write,
    atomic_write_bytes,
    open_cached_engine,
)
from edgeid.runtime.inference.embedder import Embedder
from edgeid.runtime.inference.manifest import read_verified_model
from edgeid.runtime.inference.onnx_backend import create_cpu_session

SHA_A = "a" * 64
SHA_B = "b" * 64
ORT_THREADS = 1
# fp16 engines against the fp32 reference: the make gpu-check bar.
MIN_COSINE = 0.999

KEY = EngineKey(
    model_sha256=SHA_A,
    trt_version="10.7.0",
    gpu_name="NVIDIA RTX A4000",
    compute_capability=(8, 6),
    precision="fp16",
    build_settings="settings-1",
    cuda_variant="cu12",
)
OTHER_FIELD_VALUES: dict[str, object] = {
    "model_sha256": SHA_B,
    "trt_version": "10.8.0",
    "gpu_name": "NVIDIA RTX A5000",
    "compute_capability": (8, 9),
    "precision": "fp32",
    "build_settings": "settings-2",
    "cuda_variant": "cu13",
}


class FakeBuilder:
    """Stands in for TensorRT: returns distinct engine bytes per call and counts the calls."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self) -> bytes:
        self.calls += 1
        if self.fail:
            raise trtb.EngineBuildError("fake builder failure")
        return f"engine-build-{self.calls}-".encode() * 1000


@pytest.fixture
def cache(tmp_path: Path) -> EngineCache:
    return EngineCache(tmp_path / "engines")


def _flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------------------------
# Keys


@pytest.mark.parametrize("field", sorted(OTHER_FIELD_VALUES))
def test_key_differs_when_any_field_differs(cache: EngineCache, field: str) -> None:
    other = dataclasses.replace(KEY, **{field: OTHER_FIELD_VALUES[field]})
    assert other != KEY
    assert other.digest != KEY.digest
    assert cache.engine_path(other) != cache.engine_path(KEY)
    assert cache.sidecar_path(other) != cache.sidecar_path(KEY)


def test_key_covers_every_field() -> None:
    assert set(OTHER_FIELD_VALUES) == {f.name for f in dataclasses.fields(EngineKey)}


def test_layout_is_per_trt_version_and_gpu(cache: EngineCache) -> None:
    path = cache.engine_path(KEY)
    assert path.parent == cache.root / "trt-10.7.0-cu12" / "nvidia-rtx-a4000-sm86"
    assert path.name.startswith(SHA_A[:16] + "-fp16-") and path.name.endswith(".engine")
    assert cache.timing_cache_path(KEY.platform).parent == path.parent


@pytest.mark.parametrize(
    "changes",
    [
        {"model_sha256": "not-a-sha"},
        {"model_sha256": SHA_A.upper()},
        {"precision": "int8"},
        {"gpu_name": " "},
        {"compute_capability": (8,)},
    ],
)
def test_invalid_key_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ec.EngineCacheError):
        dataclasses.replace(KEY, **changes)


# --------------------------------------------------------------------------------------------
# Engines: verification and rebuilds


def test_miss_builds_then_hit_loads(cache: EngineCache) -> None:
    builder = FakeBuilder()
    first = cache.get_or_build(KEY, builder)
    assert (first.source, builder.calls) == ("built", 1)
    second = cache.get_or_build(KEY, builder)
    assert (second.source, second.data, builder.calls) == ("cache", first.data, 1)
    sidecar = json.loads(cache.sidecar_path(KEY).read_text())
    assert sidecar["key"] == KEY.fields()
    assert sidecar["engine_sha256"] == ec.sha256_hex(first.data)
    assert sidecar["engine_size"] == len(first.data)


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_bit_flip_detected_and_rebuilt(cache: EngineCache, where: str) -> None:
    builder = FakeBuilder()
    original = cache.get_or_build(KEY, builder).data
    offset = {"start": 0, "middle": len(original) // 2, "end": len(original) - 1}[where]
    _flip_bit(cache.engine_path(KEY), offset)
    assert cache.check(KEY)[0] is None
    rebuilt = cache.get_or_build(KEY, builder)
    assert (rebuilt.source, builder.calls) == ("built", 2)
    assert rebuilt.replaced is not None and "corrupt" in rebuilt.replaced
    assert cache.get_or_build(KEY, builder).source == "cache"


@pytest.mark.parametrize("keep", [0, 1, 100])
def test_truncation_detected_and_rebuilt(cache: EngineCache, keep: int) -> None:
    builder = FakeBuilder()
    original = cache.get_or_build(KEY, builder).data
    cache.engine_path(KEY).write_bytes(original[:keep])
    rebuilt = cache.get_or_build(KEY, builder)
    assert (rebuilt.source, builder.calls) == ("built", 2)
    assert rebuilt.replaced is not None and "truncated" in rebuilt.replaced
    assert cache.engine_path(KEY).read_bytes() == rebuilt.data


@pytest.mark.parametrize(
    ("field", "words"),
    [
        ("gpu_name", "GPU"),
        ("compute_capability", "GPU"),
        ("trt_version", "TensorRT"),
        ("precision", "fp32"),
        ("build_settings", "settings"),
        ("cuda_variant", "cu13"),
    ],
)
def test_engine_from_another_platform_detected_and_rebuilt(
    cache: EngineCache, field: str, words: str
) -> None:
    """An engine copied in from another GPU or TensorRT version (or a clash of folder names)."""
    builder = FakeBuilder()
    foreign = dataclasses.replace(KEY, **{field: OTHER_FIELD_VALUES[field]})
    foreign_engine = cache.get_or_build(foreign, builder).data
    cache.engine_path(KEY).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cache.engine_path(foreign), cache.engine_path(KEY))
    shutil.copyfile(cache.sidecar_path(foreign), cache.sidecar_path(KEY))
    data, problem = cache.check(KEY)
    assert data is None and problem is not None and words in problem
    rebuilt = cache.get_or_build(KEY, builder)
    assert (rebuilt.source, builder.calls) == ("built", 2)
    assert rebuilt.data != foreign_engine
    assert json.loads(cache.sidecar_path(KEY).read_text())["key"] == KEY.fields()


@pytest.mark.parametrize(
    "damage",
    ["delete_sidecar", "garbage_sidecar", "old_schema", "delete_engine", "no_checksum"],
)
def test_damaged_entry_rebuilt(cache: EngineCache, damage: str) -> None:
    builder = FakeBuilder()
    cache.get_or_build(KEY, builder)
    sidecar = cache.sidecar_path(KEY)
    content = json.loads(sidecar.read_text())
    if damage == "delete_sidecar":
        sidecar.unlink()
    elif damage == "garbage_sidecar":
        sidecar.write_bytes(b"\x00{not json")
    elif damage == "old_schema":
        sidecar.write_text(json.dumps(content | {"schema": 0}))
    elif damage == "delete_engine":
        cache.engine_path(KEY).unlink()
    else:
        del content["engine_sha256"]
        sidecar.write_text(json.dumps(content))
    assert cache.check(KEY)[0] is None
    assert cache.get_or_build(KEY, builder).source == "built"
    assert builder.calls == 2


def test_build_failure_propagates_and_leaves_no_entry(cache: EngineCache) -> None:
    with pytest.raises(trtb.EngineBuildError):
        cache.get_or_build(KEY, FakeBuilder(fail=True))
    assert not cache.engine_path(KEY).exists()
    assert not cache.sidecar_path(KEY).exists()


def test_unwritable_cache_still_returns_the_engine(
    cache: EngineCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(path: Path, data: bytes) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ec, "atomic_write_bytes", refuse)
    builder = FakeBuilder()
    assert cache.get_or_build(KEY, builder).source == "built"
    assert cache.get_or_build(KEY, builder).source == "built"  # nothing cached: built again
    assert builder.calls == 2


# --------------------------------------------------------------------------------------------
# Engines that verify but do not load: rebuilt once


class FakeLoader:
    """Stands in for deserialisation: refuses the first ``failures`` engines it is given."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.seen: list[bytes] = []

    def __call__(self, data: bytes) -> str:
        self.seen.append(data)
        if len(self.seen) <= self.failures:
            raise EngineLoadError("fake deserialisation failure")
        return f"session over {len(data)} bytes"


def test_cached_engine_that_does_not_load_is_rebuilt_once(cache: EngineCache) -> None:
    builder = FakeBuilder()
    cache.get_or_build(KEY, builder)
    loader = FakeLoader(failures=1)
    session, entry = open_cached_engine(cache, KEY, builder, loader)
    assert session.startswith("session")
    assert (entry.source, builder.calls, len(loader.seen)) == ("built", 2, 2)
    assert entry.replaced is not None and "does not load" in entry.replaced


def test_rebuilt_engine_that_does_not_load_propagates(cache: EngineCache) -> None:
    builder = FakeBuilder()
    cache.get_or_build(KEY, builder)
    with pytest.raises(EngineLoadError):
        open_cached_engine(cache, KEY, builder, FakeLoader(failures=2))
    assert builder.calls == 2  # exactly one rebuild


def test_fresh_engine_that_does_not_load_is_not_rebuilt(cache: EngineCache) -> None:
    builder = FakeBuilder()
    with pytest.raises(EngineLoadError):
        open_cached_engine(cache, KEY, builder, FakeLoader(failures=1))
    assert builder.calls == 1


def test_corrupt_engine_with_failing_rebuild_propagates(cache: EngineCache) -> None:
    cache.get_or_build(KEY, FakeBuilder())
    _flip_bit(cache.engine_path(KEY), 10)
    with pytest.raises(trtb.EngineBuildError):
        open_cached_engine(cache, KEY, FakeBuilder(fail=True), FakeLoader(failures=0))


# --------------------------------------------------------------------------------------------
# Atomic writes


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(ec.TMP_PREFIX))


def test_atomic_write_leaves_no_partial_file_when_the_writer_raises(tmp_path: Path) -> None:
    target = tmp_path / "out" / "model.engine"

    def half_then_fail(handle: Any) -> None:
        handle.write(b"x" * 4096)
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_fail)
    assert not target.exists()
    assert _leftovers(target.parent) == []


def test_atomic_write_keeps_the_old_file_when_the_replacement_fails(tmp_path: Path) -> None:
    target = tmp_path / "model.engine"
    atomic_write_bytes(target, b"old engine")

    def fail(handle: Any) -> None:
        handle.write(b"new eng")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old engine"
    assert _leftovers(tmp_path) == []


def test_atomic_write_fsync_failure_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ec.os, "fsync", failing_fsync)
    target = tmp_path / "model.engine"
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"engine")
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_interrupted_store_is_not_taken_for_an_entry(
    cache: EngineCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine is written before its sidecar: a crash in between leaves no valid entry."""
    real = ec.atomic_write_bytes

    def crash_on_sidecar(path: Path, data: bytes) -> None:
        if path.name.endswith(ec.SIDECAR_SUFFIX):
            raise RuntimeError("power cut")
        real(path, data)

    monkeypatch.setattr(ec, "atomic_write_bytes", crash_on_sidecar)
    with pytest.raises(RuntimeError):
        cache.store(KEY, b"engine bytes")
    monkeypatch.undo()
    data, problem = cache.check(KEY)
    assert data is None and problem is not None and "sidecar" in problem


# --------------------------------------------------------------------------------------------
# Timing caches and pruning


def test_timing_cache_round_trip_and_corruption(cache: EngineCache) -> None:
    platform = KEY.platform
    assert cache.load_timing_cache(platform) is None
    cache.store_timing_cache(platform, b"tactics" * 50)
    assert cache.load_timing_cache(platform) == b"tactics" * 50
    _flip_bit(cache.timing_cache_path(platform), len(b"tactics" * 50))
    assert cache.load_timing_cache(platform) is None
    cache.timing_cache_path(platform).write_bytes(b"something else")
    assert cache.load_timing_cache(platform) is None


def test_prune_removes_stale_entries_only(cache: EngineCache) -> None:
    builder = FakeBuilder()
    other_model = dataclasses.replace(KEY, model_sha256=SHA_B)
    other_gpu = dataclasses.replace(KEY, gpu_name="Tesla T4", compute_capability=(7, 5))
    old_trt = dataclasses.replace(KEY, trt_version="10.0.1")
    for key in (KEY, other_model, other_gpu, old_trt):
        cache.get_or_build(key, builder)
        cache.store_timing_cache(key.platform, b"timings")
    folder = cache.engine_path(KEY).parent
    stale_tmp = folder / f"{ec.TMP_PREFIX}x.engine.abc"
    fresh_tmp = folder / f"{ec.TMP_PREFIX}y.engine.def"
    foreign = folder / "notes.txt"
    for path in (stale_tmp, fresh_tmp, foreign):
        path.write_bytes(b"...")
    now = 1_000_000_000.0
    os.utime(stale_tmp, (now - ec.STALE_TMP_SECONDS - 1, now - ec.STALE_TMP_SECONDS - 1))
    os.utime(fresh_tmp, (now - 1, now - 1))

    removed = cache.prune([KEY], now=now)

    assert cache.check(KEY)[0] is not None
    assert cache.load_timing_cache(KEY.platform) == b"timings"
    assert fresh_tmp.exists() and foreign.exists()
    assert stale_tmp in removed and not stale_tmp.exists()
    assert not cache.engine_path(other_model).exists()
    assert not cache.sidecar_path(other_model).exists()
    assert not cache.platform_dir(other_gpu.platform).exists()
    assert not cache.platform_dir(old_trt.platform).parent.exists()
    assert cache.get_or_build(KEY, builder).source == "cache"


def test_prune_of_a_missing_cache_is_a_no_op(tmp_path: Path) -> None:
    assert EngineCache(tmp_path / "absent").prune([KEY]) == []


# --------------------------------------------------------------------------------------------
# Optimisation profiles (read from the real models' ONNX inputs)


@pytest.fixture(scope="module")
def models(models_dir: Path) -> dict[str, tuple[str, bytes]]:
    names = ("dlib_resnet_v1", "dlib_mmod", "mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet")
    out = {}
    for name in names:
        manifest, data = read_verified_model(models_dir, name)
        out[name] = (manifest.sha256, data)
    return out


def test_fixed_shape_models_get_a_batch_profile(models: dict[str, tuple[str, bytes]]) -> None:
    (profile,) = trtb.plan_profiles(models["dlib_resnet_v1"][1])
    assert profile.name == "chips"
    assert profile.min == (1, 150, 150, 3)
    assert profile.opt == (trtb.PROFILE_OPT_BATCH, 150, 150, 3)
    assert profile.max == (trtb.PROFILE_MAX_BATCH, 150, 150, 3)
    for name, size in (("mtcnn_rnet", 24), ("mtcnn_onet", 48)):
        (profile,) = trtb.plan_profiles(models[name][1])
        assert profile.max == (trtb.PROFILE_MAX_BATCH, 3, size, size)


def test_mmod_gets_a_dynamic_height_and_width_profile(
    models: dict[str, tuple[str, bytes]],
) -> None:
    (profile,) = trtb.plan_profiles(models["dlib_mmod"][1])
    max_hw = (trtb.DYNAMIC_MAX_HEIGHT, trtb.DYNAMIC_MAX_WIDTH)
    assert profile.name == "image"
    # Three unpadded 5x5 stride-2 convolutions: 29 px is the smallest input with an output.
    assert profile.min == (1, 3, 29, 29)
    assert profile.opt == (1, 3, trtb.DYNAMIC_OPT_HEIGHT, trtb.DYNAMIC_OPT_WIDTH)
    assert profile.max == (1, 3, *max_hw)
    (pnet,) = trtb.plan_profiles(models["mtcnn_pnet"][1], plan=trtb.spatial_plan("mtcnn_pnet"))
    side = trtb.PNET_MAX_SIDE
    assert pnet.max == (1, 3, side, side) and pnet.min[2] == pnet.min[3] <= 12
    assert pnet.min <= pnet.opt <= pnet.max


def test_profile_covers_the_mmod_canvas_of_a_4k_frame() -> None:
    from edgeid.runtime.inference.image_pyramid import tiled_pyramid_layout

    layout = tiled_pyramid_layout(2160, 3840, 6, 10, 11)
    assert layout.height <= trtb.DYNAMIC_MAX_HEIGHT
    assert layout.width <= trtb.DYNAMIC_MAX_WIDTH


def test_unplannable_dynamic_axes_refused() -> None:
    spec = trtb.IOSpec("x", ("batch", "channels", 32, "width"))
    with pytest.raises(trtb.EngineBuildError):
        trtb._spatial_axes(spec)


def test_engine_key_includes_the_build_settings() -> None:
    platform = trtb.GpuPlatform("10.7.0", "NVIDIA L4", (8, 9), fast_fp16=True)
    key = platform.engine_key(SHA_A)
    assert key.precision == "fp16"
    assert key.build_settings == trtb.build_settings_fingerprint()
    assert dataclasses.replace(platform, fast_fp16=False).engine_key(SHA_A).precision == "fp32"
    assert trtb.has_fast_fp16((5, 3)) and trtb.has_fast_fp16((8, 6))
    assert not trtb.has_fast_fp16((6, 1)) and not trtb.has_fast_fp16((5, 2))


# --------------------------------------------------------------------------------------------
# Backend selection on this machine (no TensorRT here) and with a simulated GPU


@pytest.fixture(scope="module")
def resnet(models: dict[str, tuple[str, bytes]]) -> tuple[str, bytes]:
    return models["dlib_resnet_v1"]


def _no_tensorrt_here() -> None:
    try:
        trtb.probe()
    except trtb.TensorRTUnavailableError:
        return
    pytest.skip("this machine has TensorRT and a GPU; the CPU-only selection tests do not apply")


def _chips(count: int, seed: int = 0) -> list[np.ndarray[Any, np.dtype[np.uint8]]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (150, 150, 3), dtype=np.uint8) for _ in range(count)]


def test_probe_says_why_tensorrt_is_unavailable() -> None:
    _no_tensorrt_here()
    with pytest.raises(trtb.TensorRTUnavailableError, match="TensorRT"):
        trtb.probe()


def test_auto_selects_cpu_here_not_degraded(resnet: tuple[str, bytes], tmp_path: Path) -> None:
    _no_tensorrt_here()
    sha, data = resnet
    opened = open_session(data, sha, backend="auto", engine_cache_dir=tmp_path, threads=1)
    assert (opened.backend_used, opened.degraded) == ("cpu", False)
    assert isinstance(opened.session, ModelSession)
    assert not any(tmp_path.iterdir())  # nothing cached without TensorRT


def test_tensorrt_requested_here_degrades_to_cpu(
    resnet: tuple[str, bytes], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _no_tensorrt_here()
    sha, data = resnet
    with caplog.at_level(logging.ERROR):
        opened = open_session(data, sha, backend="tensorrt", engine_cache_dir=tmp_path, threads=1)
    assert (opened.backend_used, opened.degraded) == ("cpu", True)
    assert opened.reason is not None and "TensorRT" in opened.reason
    assert opened.reason in caplog.text


def test_cpu_session_runs_the_real_embedder(resnet: tuple[str, bytes], tmp_path: Path) -> None:
    sha, data = resnet
    opened = open_session(data, sha, backend="cpu", engine_cache_dir=tmp_path, threads=1)
    assert (opened.backend_used, opened.degraded, opened.reason) == ("cpu", False, None)
    session = opened.session
    assert isinstance(session, ModelSession)
    assert all(isinstance(t, TensorInfo) for t in (*session.get_inputs(), *session.get_outputs()))
    assert [i.name for i in session.get_inputs()] == ["chips"]
    embedder = Embedder(session, "dlib_resnet_v1")
    assert embedder.chip_size == 150
    chips = _chips(3)
    vectors = embedder.embed(chips)
    assert vectors.shape == (3, 128)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    reference = create_cpu_session(data, ORT_THREADS).run(None, {"chips": np.stack(chips)})[0]
    raw = session.run(None, {"chips": np.stack(chips)})[0]
    np.testing.assert_allclose(raw, reference, rtol=1e-5, atol=1e-6)


def test_sha_mismatch_and_unknown_backend_refused(
    resnet: tuple[str, bytes], tmp_path: Path
) -> None:
    sha, data = resnet
    with pytest.raises(ModelIntegrityError):
        open_session(data, SHA_A, backend="cpu", engine_cache_dir=tmp_path, threads=1)
    with pytest.raises(BadInputError):
        open_session(
            data,
            sha,
            backend="cuda",  # type: ignore[arg-type]
            engine_cache_dir=tmp_path,
            threads=1,
        )


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> trtb.GpuPlatform:
    platform = trtb.GpuPlatform("10.7.0", "NVIDIA RTX A4000", (8, 6), fast_fp16=True)
    monkeypatch.setattr(trtb, "probe", lambda: platform)
    return platform


@pytest.mark.parametrize("backend", ["auto", "tensorrt"])
def test_engine_failure_on_a_gpu_degrades_to_cpu(
    resnet: tuple[str, bytes],
    tmp_path: Path,
    fake_gpu: trtb.GpuPlatform,
    monkeypatch: pytest.MonkeyPatch,
    backend: Any,
) -> None:
    def failing_open(*args: object, **kwargs: object) -> trtb.TensorRTSession:
        raise trtb.EngineBuildError("parser rejected node 7")

    monkeypatch.setattr(trtb, "open_tensorrt_session", failing_open)
    sha, data = resnet
    opened = open_session(data, sha, backend=backend, engine_cache_dir=tmp_path, threads=1)
    assert (opened.backend_used, opened.degraded) == ("cpu", True)
    assert opened.reason is not None
    assert "TensorRT" in opened.reason and "parser rejected node 7" in opened.reason
    assert opened.session.run(None, {"chips": np.stack(_chips(1))})[0].shape == (1, 128)


def test_working_tensorrt_is_used(
    resnet: tuple[str, bytes],
    tmp_path: Path,
    fake_gpu: trtb.GpuPlatform,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, Path]] = []
    stand_in = create_cpu_session(resnet[1], ORT_THREADS)
    stand_in.engine_source = "cache"

    def fake_open(data: bytes, sha: str, cache_dir: Path, **kwargs: object) -> Any:
        calls.append((sha, cache_dir))
        return stand_in

    monkeypatch.setattr(trtb, "open_tensorrt_session", fake_open)
    sha, data = resnet
    opened = open_session(data, sha, backend="auto", engine_cache_dir=tmp_path, threads=1)
    assert (opened.backend_used, opened.degraded, opened.reason) == ("tensorrt", False, None)
    assert opened.session is stand_in
    assert calls == [(sha, tmp_path)]


# --------------------------------------------------------------------------------------------
# TensorRTSession's own logic (buffers, chunking, fallback, caching) against fake tensorrt and
# pycuda modules that run the model in onnxruntime. This checks our code, not TensorRT's API:
# only the gpu tests below and make gpu-check prove the real thing.

FAKE_MAGIC = b"FAKE-TRT-ENGINE\n"
# Device memory of the fake GPU, for mem_get_info.
FAKE_GPU_BYTES = 8 << 30
# What a fake engine's weights take on the device when deserialised.
FAKE_WEIGHT_BYTES = 4096
_cuda_thread = threading.local()


def _context_depth() -> int:
    """How many times this thread has pushed the CUDA context (and not popped it)."""
    return int(getattr(_cuda_thread, "depth", 0))


def _need_context(what: str) -> None:
    """Real CUDA calls fail (or act on another context) without the context current in the
    calling thread: the fakes refuse them."""
    assert _context_depth() > 0, f"{what} outside the CUDA context in this thread"


class _FakeEnum:
    def __init__(self, name: str) -> None:
        self.name = name


class _FakeDevice:
    """Device memory: buffers addressed by integers, like CUdeviceptr."""

    memory: dict[int, bytearray] = {}  # noqa: RUF012 (shared on purpose: one fake GPU)
    next_address = 0x1000

    def __init__(self, nbytes: int) -> None:
        _need_context("cuMemAlloc")
        self.address = _FakeDevice.next_address
        _FakeDevice.next_address += 0x1000 + nbytes
        _FakeDevice.memory[self.address] = bytearray(nbytes)

    def __int__(self) -> int:
        return self.address

    def free(self) -> None:
        _need_context("cuMemFree")
        del _FakeDevice.memory[self.address]

    @staticmethod
    def used() -> int:
        return sum(len(block) for block in _FakeDevice.memory.values())


class _FakeCuda:
    """The parts of pycuda.driver the backend uses."""

    class Stream:
        handle = 7

        def __init__(self) -> None:
            _need_context("cuStreamCreate")

        def synchronize(self) -> None:
            _need_context("cuStreamSynchronize")

    class Context:
        def push(self) -> None:
            _cuda_thread.depth = _context_depth() + 1

        @staticmethod
        def pop() -> None:
            assert _context_depth() > 0, "popped a context this thread never pushed"
            _cuda_thread.depth = _context_depth() - 1

    class Device:
        def __init__(self, index: int) -> None:
            assert index == 0

        @staticmethod
        def count() -> int:
            return 1

        def name(self) -> str:
            return "Fake GPU 9000"

        def compute_capability(self) -> tuple[int, int]:
            return (8, 6)

        def retain_primary_context(self) -> _FakeCuda.Context:
            return _FakeCuda.Context()

    def init(self) -> None:
        pass

    @staticmethod
    def get_version() -> tuple[int, int, int]:
        return (12, 4, 0)

    def mem_get_info(self) -> tuple[int, int]:
        _need_context("cuMemGetInfo")
        return FAKE_GPU_BYTES - _FakeDevice.used(), FAKE_GPU_BYTES

    def mem_alloc(self, nbytes: int) -> _FakeDevice:
        return _FakeDevice(nbytes)

    def pagelocked_empty(self, shape: Any, dtype: Any) -> np.ndarray[Any, Any]:
        _need_context("cuMemHostAlloc")
        return np.empty(shape, dtype)

    def memcpy_htod_async(self, dest: _FakeDevice, src: np.ndarray[Any, Any], stream: Any) -> None:
        _need_context("cuMemcpyHtoDAsync")
        _FakeDevice.memory[int(dest)][: src.nbytes] = src.tobytes()

    def memcpy_dtoh_async(self, dest: np.ndarray[Any, Any], src: _FakeDevice, stream: Any) -> None:
        _need_context("cuMemcpyDtoHAsync")
        raw = bytes(_FakeDevice.memory[int(src)][: dest.nbytes])
        dest[...] = np.frombuffer(raw, dtype=dest.dtype).reshape(dest.shape)


class _FakeSeverity:
    INTERNAL_ERROR = _FakeEnum("INTERNAL_ERROR")
    ERROR = _FakeEnum("ERROR")
    WARNING = _FakeEnum("WARNING")
    INFO = _FakeEnum("INFO")
    VERBOSE = _FakeEnum("VERBOSE")


class _FakeILogger:
    """tensorrt.ILogger: subclasses must call the base __init__ and implement log()."""

    Severity = _FakeSeverity

    def __init__(self) -> None:
        self.initialised = True

    def log(self, severity: Any, msg: str) -> None:
        raise NotImplementedError


def _checked_logger(logger: Any) -> _FakeILogger:
    assert isinstance(logger, _FakeILogger) and getattr(logger, "initialised", False), (
        "TensorRT objects take an initialised ILogger"
    )
    return logger


class _FakeAllocation:
    STATIC = _FakeEnum("STATIC")
    ON_PROFILE_CHANGE = _FakeEnum("ON_PROFILE_CHANGE")
    USER_MANAGED = _FakeEnum("USER_MANAGED")


class _FakeEngine:
    def __init__(self, trt: _FakeTrt, model: bytes, profiles: list[dict[str, Any]]) -> None:
        self.trt = trt
        self.ort = create_cpu_session(model, ORT_THREADS)
        self.profiles = {p["name"]: p for p in profiles}
        self.inputs = {i.name: i for i in self.ort.get_inputs()}
        self.outputs = {o.name: o for o in self.ort.get_outputs()}
        self.names = [*self.inputs, *self.outputs]
        self.num_io_tensors = len(self.names)
        self.weights = _FakeDevice(FAKE_WEIGHT_BYTES)

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name in self.inputs else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> _FakeEnum:
        arg = self.inputs.get(name) or self.outputs[name]
        return _FakeEnum({"tensor(float)": "FLOAT", "tensor(uint8)": "UINT8"}[arg.type])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        arg = self.inputs.get(name) or self.outputs[name]
        return tuple(d if isinstance(d, int) else -1 for d in arg.shape)

    def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple[int, ...]]:
        p = self.profiles[name]
        return [tuple(p["min"]), tuple(p["opt"]), tuple(p["max"])]

    def create_execution_context(self, strategy: Any = _FakeAllocation.STATIC) -> _FakeContext:
        _need_context("createExecutionContext")
        return _FakeContext(self, strategy)

    def __del__(self) -> None:  # the weights go with the engine, as in TensorRT
        with contextlib.suppress(KeyError):
            del _FakeDevice.memory[self.weights.address]


class _FakeContext:
    """An execution context: one call at a time, every call inside the CUDA context."""

    def __init__(self, engine: _FakeEngine, strategy: Any) -> None:
        self.engine = engine
        self.strategy = strategy
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.executions = 0
        self.device_memory: tuple[int, int] | None = None
        self.busy = False

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        _need_context("setInputShape")
        p = self.engine.profiles[name]
        if not all(lo <= d <= hi for lo, d, hi in zip(p["min"], shape, p["max"], strict=True)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def update_device_memory_size_for_shapes(self) -> int:
        """Activations grow with the input: 4 bytes per input element, as a stand-in."""
        assert self.strategy is _FakeAllocation.USER_MANAGED
        return 4 * sum(int(np.prod(self.shapes[n])) for n in self.engine.inputs)

    def set_device_memory(self, address: int, size: int) -> None:
        _need_context("setDeviceMemoryV2")
        assert len(_FakeDevice.memory[address]) >= size
        self.device_memory = (address, size)

    def _zeros(self) -> dict[str, np.ndarray[Any, Any]]:
        dtypes = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8}
        return {n: np.zeros(self.shapes[n], dtypes[i.type]) for n, i in self.engine.inputs.items()}

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.inputs:
            return self.shapes[name]
        index = list(self.engine.outputs).index(name)
        return tuple(self.engine.ort.run(None, self._zeros())[index].shape)

    def set_tensor_address(self, name: str, address: int) -> bool:
        _need_context("setTensorAddress")
        if name in self.engine.trt.refuse_address_of:
            self.engine.trt.log_error(f"setTensorAddress: refusing tensor {name}")
            return False
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        _need_context("enqueueV3")
        assert stream_handle == _FakeCuda.Stream.handle
        assert not self.busy, "one execution context used by two threads at once"
        self.busy = True
        try:
            if self.strategy is _FakeAllocation.USER_MANAGED:
                assert self.device_memory is not None, "USER_MANAGED context without memory"
                address, size = self.device_memory
                assert address in _FakeDevice.memory, "activation memory already freed"
                assert size >= self.update_device_memory_size_for_shapes()
            feeds = {}
            for name, like in self._zeros().items():
                raw = bytes(_FakeDevice.memory[self.addresses[name]][: like.nbytes])
                feeds[name] = np.frombuffer(raw, like.dtype).reshape(like.shape)
            results = self.engine.ort.run(None, feeds)
            for name, out in zip(self.engine.outputs, results, strict=True):
                out = np.ascontiguousarray(out)
                _FakeDevice.memory[self.addresses[name]][: out.nbytes] = out.tobytes()
            self.executions += 1
            return True
        finally:
            self.busy = False


class _FakeConfig:
    def __init__(self, trt: _FakeTrt) -> None:
        self.trt = trt
        self.flags: list[str] = []
        self.preview: list[str] = []
        self.profiles: list[dict[str, Any]] = []
        self.timing = b""
        self.timing_set = False

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        assert pool == "WORKSPACE" and size > 0

    def set_flag(self, flag: str) -> None:
        self.flags.append(flag)

    def set_preview_feature(self, feature: str, enabled: bool) -> None:
        assert enabled
        self.preview.append(feature)

    def add_optimization_profile(self, profile: _FakeProfile) -> int:
        if self.trt.profile_index < 0:
            self.trt.log_error("IBuilderConfig::addOptimizationProfile: invalid profile")
            return self.trt.profile_index
        self.profiles.append(profile.shapes)
        return self.trt.profile_index

    def create_timing_cache(self, data: bytes) -> bytes:
        self.trt.timing_caches_given.append(bytes(data))
        return bytes(data)

    def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> bool:
        if self.trt.refuse_timing_cache:
            return False
        self.timing = cache
        self.timing_set = True
        return True

    def get_timing_cache(self) -> Any:
        config = self

        class _Cache:
            def serialize(self) -> bytes:
                return config.timing + b"+timings"

        return _Cache() if self.timing_set else None


class _FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, Any] = {}

    def set_shape(self, name: str, low: Any, opt: Any, high: Any) -> None:
        assert all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True))
        self.shapes = {"name": name, "min": list(low), "opt": list(opt), "max": list(high)}


class _FakeNetwork:
    model = b""


class _FakeParserError:
    def __init__(self, desc: str, node: str) -> None:
        self._desc, self._node = desc, node

    def desc(self) -> str:
        return self._desc

    def node_name(self) -> str:
        return self._node


class _FakeTrt:
    """The parts of the tensorrt module the backend uses; engines are ONNX plus profiles.

    Switches make it fail the way TensorRT does: ``parser_errors`` (the parser rejects the
    model), ``profile_index`` (-1: add_optimization_profile refuses), ``refuse_timing_cache``,
    ``refuse_address_of`` (set_tensor_address returns False), ``on_demand`` (False: a release
    without the USER_MANAGED strategy). Errors are logged through the ILogger it was given.
    """

    __version__ = "10.99.0"

    ILogger = _FakeILogger
    ExecutionContextAllocationStrategy = _FakeAllocation
    IExecutionContext = _FakeContext

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class BuilderFlag:
        FP16 = "FP16"
        INT8 = "INT8"

    class PreviewFeature:
        RUNTIME_ACTIVATION_RESIZE_10_10 = "RUNTIME_ACTIVATION_RESIZE_10_10"

    class TensorIOMode:
        INPUT = "INPUT"

    def __init__(self) -> None:
        self.builds: list[_FakeConfig] = []
        self.timing_caches_given: list[bytes] = []
        self.parser_errors: list[_FakeParserError] = []
        self.profile_index = 0
        self.refuse_timing_cache = False
        self.refuse_address_of: set[str] = set()
        self.loggers: list[_FakeILogger] = []
        trt = self

        class Builder:
            platform_has_fast_fp16 = True

            def __init__(self, logger: Any) -> None:
                trt.loggers.append(_checked_logger(logger))

            def create_network(self, flags: int) -> _FakeNetwork:
                assert flags == 0
                return _FakeNetwork()

            def create_builder_config(self) -> _FakeConfig:
                return _FakeConfig(trt)

            def create_optimization_profile(self) -> _FakeProfile:
                return _FakeProfile()

            def build_serialized_network(self, network: _FakeNetwork, config: _FakeConfig) -> Any:
                _need_context("buildSerializedNetwork")
                trt.builds.append(config)
                header = json.dumps(config.profiles).encode()
                return memoryview(FAKE_MAGIC + header + b"\n" + network.model)

        class OnnxParser:
            def __init__(self, network: _FakeNetwork, logger: Any) -> None:
                _checked_logger(logger)
                self.network = network
                self.num_errors = 0

            def parse(self, model: bytes) -> bool:
                self.network.model = bytes(model)
                self.num_errors = len(trt.parser_errors)
                for error in trt.parser_errors:
                    trt.log_error(f"ModelImporter.cpp: {error.desc()}")
                return not trt.parser_errors

            def get_error(self, index: int) -> _FakeParserError:
                return trt.parser_errors[index]

        class Runtime:
            def __init__(self, logger: Any) -> None:
                _checked_logger(logger)

            def deserialize_cuda_engine(self, data: bytes) -> _FakeEngine | None:
                _need_context("deserializeCudaEngine")
                if not data.startswith(FAKE_MAGIC):
                    trt.log_error("1: [runtime.cpp::parsePlan] Magic tag does not match")
                    return None
                header, _, model = data[len(FAKE_MAGIC) :].partition(b"\n")
                return _FakeEngine(trt, model, json.loads(header))

        self.Builder = Builder
        self.OnnxParser = OnnxParser
        self.Runtime = Runtime

    def log_error(self, message: str) -> None:
        for logger in self.loggers[-1:]:
            logger.log(_FakeSeverity.ERROR, message)

    @staticmethod
    def nptype(dtype: Any) -> Any:
        raise AssertionError("every dtype is mapped by name")


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> _FakeTrt:
    """tensorrt and pycuda replaced by the fakes, for this test only."""
    trt, cuda = _FakeTrt(), _FakeCuda()
    modules = {"tensorrt": trt, "pycuda.driver": cuda}
    monkeypatch.setattr(trtb, "_import", lambda name, purpose: modules[name])
    monkeypatch.setattr(trtb, "_gpu_state", None)
    monkeypatch.setattr(trtb, "cuda_variant", lambda names=None: "cu12")
    return trt


def test_fake_gpu_probe(fake_trt: _FakeTrt) -> None:
    platform = trtb.probe()
    assert platform == trtb.GpuPlatform(
        "10.99.0",
        "Fake GPU 9000",
        (8, 6),
        fast_fp16=True,
        cuda_variant="cu12",
        on_demand_memory=True,
    )
    assert _context_depth() == 0


def test_fake_gpu_refuses_other_tensorrt_majors(
    fake_trt: _FakeTrt, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_FakeTrt, "__version__", "11.0.0")
    with pytest.raises(trtb.TensorRTUnavailableError, match=r"TensorRT 11\.0\.0"):
        trtb.probe()


def test_fake_gpu_session_builds_caches_and_runs(
    fake_trt: _FakeTrt, models: dict[str, tuple[str, bytes]], tmp_path: Path
) -> None:
    sha, data = models["mtcnn_onet"]
    session = trtb.open_tensorrt_session(data, sha, tmp_path)
    assert session.engine_source == "built"
    (config,) = fake_trt.builds
    assert config.flags == ["FP16"]
    assert config.profiles == [
        {"name": "image", "min": [1, 3, 48, 48], "opt": [8, 3, 48, 48], "max": [64, 3, 48, 48]}
    ]
    assert isinstance(session, ModelSession)
    assert [o.name for o in session.get_outputs()] == ["box_deltas", "landmarks", "probabilities"]
    assert session.get_inputs()[0].shape == ["batch", 3, 48, 48]
    reference = create_cpu_session(data, ORT_THREADS)
    rng = np.random.default_rng(3)
    for batch in (1, 5, 64, 150):  # 150: three chunks of at most 64
        crops = rng.normal(size=(batch, 3, 48, 48)).astype(np.float32)
        ours = session.run(None, {"image": crops})
        theirs = reference.run(None, {"image": crops})
        assert len(ours) == 3
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        picked = session.run(["probabilities", "box_deltas"], {"image": crops})
        np.testing.assert_allclose(picked[0], theirs[2], rtol=1e-6, atol=1e-6)
    empty = session.run(["landmarks"], {"image": np.zeros((0, 3, 48, 48), np.float32)})
    assert empty[0].shape == (0, 10)
    with pytest.raises(BadInputError, match="float64"):
        session.run(None, {"image": np.zeros((1, 3, 48, 48))})
    with pytest.raises(BadInputError):
        session.run(None, {"image": np.zeros((1, 3, 24, 24), np.float32)})
    with pytest.raises(BadInputError):
        session.run(["nope"], {"image": np.zeros((1, 3, 48, 48), np.float32)})
    session.close()
    session.close()
    with pytest.raises(ModelError, match="closed"):
        session.run(None, {"image": np.zeros((1, 3, 48, 48), np.float32)})

    again = trtb.open_tensorrt_session(data, sha, tmp_path)
    assert again.engine_source == "cache" and len(fake_trt.builds) == 1
    again.close()
    assert _context_depth() == 0


def test_fake_gpu_timing_cache_is_reused(
    fake_trt: _FakeTrt, models: dict[str, tuple[str, bytes]], tmp_path: Path
) -> None:
    for name in ("mtcnn_rnet", "mtcnn_onet"):
        sha, data = models[name]
        trtb.open_tensorrt_session(data, sha, tmp_path).close()
    # The first build starts a timing cache; the second starts from what the first stored.
    assert fake_trt.timing_caches_given == [b"", b"+timings"]


def test_fake_gpu_dynamic_model_falls_back_outside_the_profile(
    fake_trt: _FakeTrt, models: dict[str, tuple[str, bytes]], tmp_path: Path
) -> None:
    sha, data = models["mtcnn_pnet"]
    fallbacks: list[ModelSession] = []

    def fallback() -> ModelSession:
        fallbacks.append(create_cpu_session(data, ORT_THREADS))
        return fallbacks[-1]

    session = trtb.open_tensorrt_session(
        data, sha, tmp_path, fallback=fallback, model_name="mtcnn_pnet"
    )
    (config,) = fake_trt.builds
    assert config.profiles[0]["max"] == [1, 3, trtb.PNET_MAX_SIDE, trtb.PNET_MAX_SIDE]
    reference = create_cpu_session(data, ORT_THREADS)
    rng = np.random.default_rng(4)
    names = ["box_deltas", "probabilities"]
    # In the profile, a growing then shrinking level, then beyond it (too small, too tall).
    for shape in ((1, 3, 40, 60), (1, 3, 300, 200), (1, 3, 17, 13), (1, 3, 5, 5), (1, 3, 2400, 16)):
        level = rng.normal(size=shape).astype(np.float32)
        try:
            theirs = reference.run(names, {"image": level})
        except Exception:  # too small for the network: both backends refuse
            with pytest.raises(Exception):  # noqa: B017
                session.run(names, {"image": level})
            continue
        ours = session.run(names, {"image": level})
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert len(fallbacks) == 1  # created once, on first need
    two = rng.normal(size=(2, 3, 30, 30)).astype(np.float32)  # batch 2 > 1: chunked
    np.testing.assert_allclose(
        session.run(names, {"image": two})[1], reference.run(names, {"image": two})[1], atol=1e-6
    )
    session.close()


def test_fake_gpu_garbage_engine_is_rebuilt_once(
    fake_trt: _FakeTrt, models: dict[str, tuple[str, bytes]], tmp_path: Path
) -> None:
    sha, data = models["mtcnn_rnet"]
    key = trtb.probe().engine_key(sha)
    EngineCache(tmp_path).store(key, b"checksum-valid bytes that are no engine")
    session = trtb.open_tensorrt_session(data, sha, tmp_path)
    assert session.engine_source == "built" and len(fake_trt.builds) == 1
    session.close()


def test_fake_gpu_selection_uses_tensorrt(
    fake_trt: _FakeTrt, models: dict[str, tuple[str, bytes]], tmp_path: Path
) -> None:
    sha, data = models["mtcnn_rnet"]
    opened = open_session(data, sha, backend="auto", engine_cache_dir=tmp_path, threads=1)
    assert (opened.backend_used, opened.degraded, opened.reason) == ("tensorrt", False, None)
    assert isinstance(opened.session, trtb.TensorRTSession)
    opened.session.close()


# --------------------------------------------------------------------------------------------
# On a GPU with TensorRT (make gpu-check runs the full parity and throughput check)


@pytest.fixture(scope="module")
def gpu() -> trtb.GpuPlatform:
    try:
        return trtb.probe()
    except trtb.TensorRTUnavailableError as exc:
        pytest.skip(f"needs an NVIDIA GPU with TensorRT 10 and pycuda: {exc}")


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def trt_resnet(
    gpu: trtb.GpuPlatform, resnet: tuple[str, bytes], engine_dir: Path
) -> Iterator[trtb.TensorRTSession]:
    sha, data = resnet
    session = trtb.open_tensorrt_session(data, sha, engine_dir)
    yield session
    session.close()


def _lfw_chips(data_dir: Path, count: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    paths = sorted((data_dir / "lfw-dev" / "images").glob("*/*.jpg"))[:count]
    chips = []
    for path in paths:
        with Image.open(path) as image:
            chips.append(np.asarray(image.convert("RGB").crop((50, 50, 200, 200))))
    return np.stack(chips)


def _cosines(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


@pytest.mark.gpu
def test_gpu_embedder_parity_and_batching(
    trt_resnet: trtb.TensorRTSession, resnet: tuple[str, bytes], data_dir: Path
) -> None:
    chips = _lfw_chips(data_dir, trtb.PROFILE_MAX_BATCH + 6)  # one chunk more than a profile
    reference = create_cpu_session(resnet[1]).run(None, {"chips": chips})[0]
    for batch in (chips[:1], chips[:8], chips):
        ours = trt_resnet.run(None, {"chips": batch})[0]
        assert ours.shape == (len(batch), 128)
        assert _cosines(ours, reference[: len(batch)]).min() >= MIN_COSINE
    empty = trt_resnet.run(None, {"chips": chips[:0]})[0]
    assert empty.shape == (0, 128)
    with pytest.raises(BadInputError):
        trt_resnet.run(None, {"chips": chips.astype(np.float32)})


@pytest.mark.gpu
def test_gpu_engine_comes_from_the_cache_and_corruption_rebuilds(
    trt_resnet: trtb.TensorRTSession, resnet: tuple[str, bytes], engine_dir: Path, gpu: Any
) -> None:
    sha, data = resnet
    cache = EngineCache(engine_dir)
    key = gpu.engine_key(sha)
    again = trtb.open_tensorrt_session(data, sha, engine_dir)
    assert again.engine_source == "cache"
    again.close()
    _flip_bit(cache.engine_path(key), cache.engine_path(key).stat().st_size // 2)
    rebuilt = trtb.open_tensorrt_session(data, sha, engine_dir)
    assert rebuilt.engine_source == "built"
    rebuilt.close()
    # Bytes that pass the checksum but are no engine: TensorRT refuses them, one rebuild.
    cache.store(key, b"not a TensorRT engine" * 100)
    recovered = trtb.open_tensorrt_session(data, sha, engine_dir)
    assert recovered.engine_source == "built"
    recovered.close()


@pytest.mark.gpu
def test_gpu_mmod_dynamic_shapes_and_fallback(
    gpu: trtb.GpuPlatform, models: dict[str, tuple[str, bytes]], engine_dir: Path
) -> None:
    sha, data = models["dlib_mmod"]
    reference = create_cpu_session(data)
    session = trtb.open_tensorrt_session(
        data, sha, engine_dir, fallback=lambda: create_cpu_session(data)
    )
    rng = np.random.default_rng(1)
    for height, width in ((300, 200), (957, 272), (64, 1024)):
        canvas = rng.uniform(0, 255, (1, 3, height, width)).astype(np.float32)
        ours = session.run(None, {"image": canvas})[0]
        theirs = reference.run(None, {"image": canvas})[0]
        assert ours.shape == theirs.shape
        # FP16 against FP32: within 2% of the score range (make gpu-check judges the boxes).
        assert np.abs(ours - theirs).max() <= 0.02 * np.ptp(theirs) + 1e-3
    too_tall = rng.uniform(0, 255, (1, 3, trtb.DYNAMIC_MAX_HEIGHT + 8, 40)).astype(np.float32)
    np.testing.assert_array_equal(
        session.run(None, {"image": too_tall})[0], reference.run(None, {"image": too_tall})[0]
    )
    session.close()


# --------------------------------------------------------------------------------------------
# TensorRT's log, checked return values, cleanup, memory (issue 20), against the strict fakes


def test_log_relay_forwards_levels_and_keeps_errors_per_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay = trtb.TrtLogRelay()
    with caplog.at_level(logging.DEBUG, logger="edgeid.tensorrt"):
        with relay.capture() as mine:
            relay.log(_FakeSeverity.WARNING, "slow tactic")
            relay.log(_FakeSeverity.VERBOSE, "layer 7 detail")
            relay.log(_FakeSeverity.ERROR, "first\nfailure")
            other = threading.Thread(target=relay.log, args=(_FakeSeverity.ERROR, "elsewhere"))
            other.start()
            other.join()
        relay.log(_FakeSeverity.INTERNAL_ERROR, "after the block")
    assert mine == ["first failure"]  # not the other thread's, not after the block
    assert relay.last_error == "after the block"
    levels = {r.getMessage(): r.levelno for r in caplog.records}
    assert levels["TensorRT: slow tactic"] == logging.WARNING
    assert levels["TensorRT: first failure"] == logging.ERROR
    assert levels["TensorRT: after the block"] == logging.CRITICAL
    assert not any("layer 7" in m for m in levels)


def _fake_model(models: dict[str, tuple[str, bytes]], name: str) -> tuple[str, bytes]:
    return models[name]


def test_parser_errors_reach_the_reason_and_nothing_leaks(
    fake_trt: _FakeTrt, models: dict[str, tuple[str, bytes]], tmp_path: Path
) -> None:
    sha, data = models["mtcnn_rnet"]
    fake_trt.parser_errors = [_FakeParserError("Unsupported operator Foo", "node_17")]
    before = _FakeDevice.used()
    opened = open_session(data, sha, backend="tensorrt", engine_cache_dir=tmp_path, threads=1)
    assert (opened.backend_used, opened.degraded) == ("cpu", True)
    assert opened.reason is not None
    assert "Unsupported operator Foo (node node_17)" in opened.reason
    assert _FakeDevice.used() == before and _context_depth() == 0


def _qdq_model(zero_point: np.ndarray) -> bytes:
    """x -> QuantizeLinear -> DequantizeLinear -> Relu, with this zero point."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])
    constants = [
        numpy_helper.from_array(np.array(0.05, np.float32), "scale"),
        numpy_helper.from_array(zero_point, "zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], name="q_x"),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["d"]),
        helper.make_node("Relu", ["d"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "qdq", [x], [y], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def test_an_int8_twin_builds_with_int8_kernels_only_when_tensorrt_can_run_it(
    fake_trt: _FakeTrt, models: dict[str, tuple[str, bytes]], tmp_path: Path
) -> None:
    """A Q/DQ model carries its scales: TensorRT gets the INT8 flag (no calibrator). ONNX
    Runtime's CPU twins quantise activations to unsigned INT8 with offsets, which TensorRT
    cannot take: refused before any build, with the setting that fixes it."""
    assert not trtb.is_quantised(models["mtcnn_rnet"][1])
    symmetric = _qdq_model(np.array(0, np.int8))
    assert trtb.is_quantised(symmetric)
    session = trtb.open_tensorrt_session(symmetric, hashlib.sha256(symmetric).hexdigest(), tmp_path)
    assert session is not None and fake_trt.builds[-1].flags == ["FP16", "INT8"]
    float_sha, float_bytes = models["mtcnn_rnet"]
    trtb.open_tensorrt_session(float_bytes, float_sha, tmp_path)
    assert fake_trt.builds[-1].flags == ["FP16"]

    builds = len(fake_trt.builds)
    offset = _qdq_model(np.array(128, np.uint8))
    with pytest.raises(trtb.EngineBuildError, match=r"symmetric signed INT8.*inference\.precision"):
        trtb.open_tensorrt_session(offset, hashlib.sha256(offset).hexdigest(), tmp_path)
    assert len(fake_trt.builds) == builds
    # Through backend selection the box keeps working, on the CPU, and says why.
    opened = open_session(
        offset,
        hashlib.sha256(offset).hexdigest(),
        backend="tensorrt",
        engine_cache_dir=tmp_path,
        threads=1,
    )
    assert (opened.backend_used, opened.degraded) == ("cpu", True)
    assert opened.reason is not None and "symmetric signed INT8" in opened.reason


def test_a_refused_optimisation_profile_fails_the_build_with_tensorrts_words(
    fake_trt: _FakeTrt, models: dict[str, tuple[str, bytes]], tmp_path: Path
) -> None:
    sha, data = models["mtcnn_onet"]
    fake_trt.profile_index = -1
    with pytest.raises(trtb.EngineBuildError, match="addOptimizationProfile: invalid profile"):
        trtb.open_tensorrt_session(data, sha, tmp_path)
    assert not fake_trt.builds  # never asked to build with no profile


def test_a_refused_timing_cache_costs_time_not_the_build(
    fake_trt: _FakeTrt,
    models: dict[str, tuple[str, bytes]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sha, data = models["mtcnn_onet"]
    fake_trt.refuse_timing_cache = True
    with caplog.at_level(logging.WARNING):
        session = trtb.open_tensorrt_session(data, sha, tmp_path)
    assert "refused the fresh timing cache" in caplog.text
    crops = np.zeros((2, 3, 48, 48), np.float32)
    assert len(session.run(None, {"image": crops})) == 3
    session.close()
    key = trtb.probe().engine_key(sha)
    assert EngineCache(tmp_path).load_timing_cache(key.platform) is None  # nothing to keep


def test_a_refused_tensor_address_fails_the_call_not_the_session(
    fake_trt: _FakeTrt, models: dict[str, tuple[str, bytes]], tmp_path: Path
) -> None:
    sha, data = models["mtcnn_onet"]
    before = _FakeDevice.used()
    session = trtb.open_tensorrt_session(data, sha, tmp_path)
    crops = np.zeros((2, 3, 48, 48), np.float32)
    fake_trt.refuse_address_of = {"landmarks"}
    with pytest.raises(ModelError, match="refusing tensor landmarks"):
        session.run(None, {"image": crops})
    fake_trt.refuse_address_of = set()
    assert len(session.run(None, {"image": crops})) == 3
    session.close()
    assert _FakeDevice.used() == before and _context_depth() == 0


def test_an_engine_that_does_not_load_frees_what_it_took(
    fake_trt: _FakeTrt, models: dict[str, tuple[str, bytes]], tmp_path: Path
) -> None:
    sha, data = models["mtcnn_onet"]
    gpu = trtb._require_gpu()
    inputs, outputs = trtb.read_onnx_io(data)
    before = _FakeDevice.used()
    with pytest.raises(EngineLoadError, match="Magic tag does not match"):
        trtb.TensorRTSession(gpu, b"no engine at all", inputs, outputs)
    engine = trtb.open_tensorrt_session(data, sha, tmp_path)
    engine_bytes = EngineCache(tmp_path).check(trtb.probe().engine_key(sha))[0]
    engine.close()
    assert engine_bytes is not None
    with pytest.raises(EngineLoadError, match="do not match"):  # another model's engine
        trtb.TensorRTSession(gpu, engine_bytes, inputs, outputs[:1])
    assert _FakeDevice.used() == before and _context_depth() == 0


def test_activation_memory_follows_the_shapes_and_is_reported(
    fake_trt: _FakeTrt, models: dict[str, tuple[str, bytes]], tmp_path: Path
) -> None:
    sha, data = models["mtcnn_pnet"]
    session = trtb.open_tensorrt_session(data, sha, tmp_path, model_name="mtcnn_pnet")
    (config,) = fake_trt.builds
    assert config.preview == ["RUNTIME_ACTIVATION_RESIZE_10_10"]
    context = session._context
    assert context.strategy is _FakeAllocation.USER_MANAGED
    assert session.resident_bytes == FAKE_WEIGHT_BYTES
    names = ["box_deltas", "probabilities"]
    session.run(names, {"image": np.zeros((1, 3, 40, 60), np.float32)})
    small = session.gpu_memory_bytes()
    session.run(names, {"image": np.zeros((1, 3, 400, 600), np.float32)})
    large = session.gpu_memory_bytes()
    # 4 bytes of activations per input element in the fake, plus the bigger I/O buffers.
    assert large - small >= 4 * 3 * (400 * 600 - 40 * 60)
    assert session._scratch is not None and session._scratch.size == 4 * 3 * 400 * 600
    session.run(names, {"image": np.zeros((1, 3, 40, 60), np.float32)})
    assert session.gpu_memory_bytes() == large  # grown buffers are kept, not churned
    session.close()
    assert session.gpu_memory_bytes() == 0


def test_static_allocation_where_tensorrt_has_no_on_demand_memory(
    fake_trt: _FakeTrt,
    models: dict[str, tuple[str, bytes]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_FakeTrt, "IExecutionContext", object)  # TensorRT 10.0: no such calls
    sha, data = models["mtcnn_onet"]
    assert not trtb.probe().on_demand_memory
    session = trtb.open_tensorrt_session(data, sha, tmp_path)
    context = session._context
    assert context.strategy is _FakeAllocation.STATIC and session._scratch is None
    assert len(session.run(None, {"image": np.zeros((3, 3, 48, 48), np.float32)})) == 3
    session.close()


def test_eight_threads_share_a_session_each_in_its_own_cuda_context(
    fake_trt: _FakeTrt, models: dict[str, tuple[str, bytes]], tmp_path: Path
) -> None:
    """The web server calls inference from worker threads: every CUDA call must have the
    context pushed in the calling thread and one context must never run two calls at once
    (the fakes assert both)."""
    sha, data = models["mtcnn_onet"]
    session = trtb.open_tensorrt_session(data, sha, tmp_path)
    reference = create_cpu_session(data, ORT_THREADS)
    rng = np.random.default_rng(8)
    batches = [rng.normal(size=(1 + i % 5, 3, 48, 48)).astype(np.float32) for i in range(8)]
    expected = [reference.run(None, {"image": b}) for b in batches]
    failures: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for _ in range(5):
                ours = session.run(None, {"image": batches[index]})
                for a, b in zip(ours, expected[index], strict=True):
                    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert session._context.executions == 8 * 5
    session.close()


def test_cuda_variant_comes_from_the_distribution_names() -> None:
    assert trtb.cuda_variant(["numpy", "tensorrt-cu12", "tensorrt_cu12_bindings"]) == "cu12"
    assert trtb.cuda_variant(["tensorrt_cu13_libs", "tensorrt-cu13"]) == "cu13"
    assert trtb.cuda_variant(["tensorrt-cu12", "tensorrt-cu13"]) == "cu12+cu13"
    assert trtb.cuda_variant(["tensorrt", "pycuda"]) == ""  # JetPack's system TensorRT
    platform = trtb.GpuPlatform("10.7.0", "NVIDIA L4", (8, 9), True, cuda_variant="cu13")
    assert platform.engine_key(SHA_A) != dataclasses.replace(
        platform, cuda_variant="cu12"
    ).engine_key(SHA_A)


def test_pnet_and_mmod_engines_have_their_own_build_settings() -> None:
    platform = trtb.GpuPlatform("10.7.0", "NVIDIA L4", (8, 9), True, cuda_variant="cu12")
    pnet = platform.engine_key(SHA_A, "mtcnn_pnet").build_settings
    assert pnet != platform.engine_key(SHA_A, "dlib_mmod").build_settings
    assert platform.engine_key(SHA_A, "dlib_mmod") == platform.engine_key(SHA_A)


def test_pnet_profile_covers_the_largest_pyramid_level_of_a_4k_frame(
    models: dict[str, tuple[str, bytes]], models_dir: Path
) -> None:
    from edgeid.runtime.inference.mtcnn_detector import MtcnnParameters

    manifests = {
        n: read_verified_model(models_dir, n)[0] for n in ("mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet")
    }
    parameters = MtcnnParameters.from_manifest(
        manifests["mtcnn_pnet"].parameters,
        manifests["mtcnn_rnet"].parameters,
        manifests["mtcnn_onet"].parameters,
        manifests["mtcnn_pnet"].preprocessing,
    )
    first_scale = parameters.cell_size / parameters.min_face_size
    assert first_scale == trtb.PNET_FIRST_SCALE
    for height, width in ((2160, 3840), (3840, 2160)):
        level = (int(height * first_scale + 1), int(width * first_scale + 1))
        assert max(level) <= trtb.PNET_MAX_SIDE


def test_session_factory_reports_and_frees_every_engine(
    fake_trt: _FakeTrt, models: dict[str, tuple[str, bytes]], tmp_path: Path
) -> None:
    from edgeid.runtime.inference.backends.selection import SessionFactory

    before = _FakeDevice.used()
    factory = SessionFactory("tensorrt", tmp_path, threads=1)
    for name in ("mtcnn_rnet", "mtcnn_onet"):
        factory.open(name, *models[name])
    assert factory.state == "tensorrt"
    memory = factory.gpu_memory()
    assert set(memory) == {"mtcnn_rnet", "mtcnn_onet"}
    assert all(value >= FAKE_WEIGHT_BYTES for value in memory.values())
    factory.close()
    assert factory.gpu_memory() == {} and _FakeDevice.used() == before


def test_engine_memory_reaches_the_metrics_and_the_health_report() -> None:
    from edgeid.runtime.system.metrics import ServiceMetrics
    from edgeid.runtime.telemetry.schema import EngineMemory, Inference

    metrics = ServiceMetrics()
    assert metrics.snapshot().engine_memory_bytes == {}
    metrics.set_engine_memory_source(lambda: {"dlib_resnet_v1": 52_428_800})
    assert metrics.snapshot().engine_memory_bytes == {"dlib_resnet_v1": 52_428_800}

    def broken() -> dict[str, int]:
        raise RuntimeError("gauge failed")

    metrics.set_engine_memory_source(broken)
    assert metrics.snapshot().engine_memory_bytes == {}
    figures = Inference(
        backend="tensorrt",
        requests=0,
        errors=0,
        latency_p50_ms=None,
        latency_p95_ms=None,
        queue_depth=0,
        queue_depth_max=0,
        engine_memory=[EngineMemory(model="dlib_resnet_v1", bytes=52_428_800)],
    )
    assert figures.model_dump()["engine_memory"] == [
        {"model": "dlib_resnet_v1", "bytes": 52_428_800}
    ]
    with pytest.raises(ValueError):
        EngineMemory(model="Case 2024/17", bytes=1)  # a model name, never free text
