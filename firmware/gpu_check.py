"""`make gpu-check`: proves on an NVIDIA GPU that the TensorRT engines do what the service needs.

Every model is opened as the service opens it (``open_session`` with its name, so P-Net gets
its own profile) into a fresh engine cache (unless ``--cache-dir`` names one), then reopened to
prove it loads from the cache. Against ONNX Runtime on the CPU, on ``--data``:

* parity, first from one thread, then from 8 threads sharing the same sessions (the web server
  runs inference from worker threads): the embedder's cosine >= 0.999 for every face; every box
  of MMOD (upsample 0 and 1) and MTCNN matched by one with IoU >= 0.95 (boxes within a hair of
  the detector's threshold may flip under FP16 and are reported, not failed);
* throughput of the embedder at batch 1, 8 and 32 on both backends in this same run; the best
  TensorRT figure must be at least 5x the best CPU one;
* GPU memory: each engine's figure and the device's use once every engine is open (the bar:
  all engines together within ``MAX_ENGINES_BYTES``), and again after the runs;
* cached engines that TensorRT itself must refuse or that belong to another model: a bit flip
  (caught by the checksum), bytes that pass the checksum but are no engine (refused by
  TensorRT's deserialiser), truncated engine bytes, and R-Net's engine filed under O-Net's key
  (loads, but its tensors do not match): each is rebuilt and the model runs on TensorRT.

Prints one PASS/FAIL line per check and writes everything to ``--report`` as JSON. Exit status:
0 only when every check passes, 1 when any fails, 2 when this machine has no usable NVIDIA GPU
with TensorRT 10 and pycuda (nothing was checked; ``firmware/gpu_preflight.py`` says why).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform as host_platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeid.runtime.evaluation.detection import iou
from edgeid.runtime.inference.backends import ModelSession, open_session
from edgeid.runtime.inference.backends import tensorrt_backend as trtb
from edgeid.runtime.inference.backends.engine_cache import EngineCache, atomic_write_bytes
from edgeid.runtime.inference.embedder import Embedder
from edgeid.runtime.inference.image_decode import load_image
from edgeid.runtime.inference.manifest import read_verified_model
from edgeid.runtime.inference.mmod_detector import MmodDetector
from edgeid.runtime.inference.mtcnn_detector import MODEL_NAMES as MTCNN_MODELS
from edgeid.runtime.inference.mtcnn_detector import MtcnnDetector, MtcnnParameters
from edgeid.runtime.inference.onnx_backend import create_cpu_session
from edgeid.runtime.inference.pipeline import EMBEDDER_MODEL, FacePipeline
from edgeid.runtime.inference.types import Detection, RGBImage

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NO_GPU = 2
MODELS = (EMBEDDER_MODEL, "dlib_mmod", *MTCNN_MODELS)
# FP16 engines against the FP32 reference: the bars of issue 20.
MIN_COSINE = 0.999
MIN_BOX_IOU = 0.95
# The embedder on any CUDA GPU against this machine's CPU, best batch against best batch.
MIN_SPEEDUP = 5.0
# Every engine open, before any call: fits beside the service on an 8 GB Jetson.
MAX_ENGINES_BYTES = 2 << 30
# A detection this close to its detector's threshold may flip under FP16 rounding: unmatched
# ones are reported, not failed. MMOD scores are raw margins around 0 (faces score ~0.3-1.5);
# MTCNN's are O-Net probabilities against its last threshold.
MMOD_BORDERLINE = 0.05
MTCNN_BORDERLINE = 0.01
# LFW images used (evenly spread over the 1,549): enough faces for a per-face bar, a few minutes.
DEFAULT_LFW_IMAGES = 200
THREADS = 8
THROUGHPUT_BATCHES = (1, 8, 32)
# Timed runs per batch size after the warm-up runs (results are a mean, not a single run).
THROUGHPUT_RUNS = 30
WARMUP_RUNS = 3


@dataclass
class Report:
    """PASS/FAIL lines on stdout, and the same plus figures for the JSON report."""

    checks: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str) -> bool:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})
        return ok

    @staticmethod
    def info(message: str) -> None:
        print(f"     {message}", flush=True)

    @property
    def failures(self) -> list[str]:
        return [c["check"] for c in self.checks if not c["ok"]]

    def write(self, path: Path | None, status: str, platform: dict[str, Any] | None) -> None:
        if path is None:
            return
        document = {
            "status": status,
            "platform": platform,
            "host": {"machine": host_platform.machine(), "python": host_platform.python_version()},
            "checks": self.checks,
            "figures": self.figures,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(document, indent=2) + "\n").encode("utf-8"))


@dataclass(frozen=True)
class Images:
    lfw: list[Path]
    scenes: list[Path]

    @property
    def all(self) -> list[Path]:
        return [*self.lfw, *self.scenes]


def find_images(data: Path, lfw_count: int) -> Images:
    lfw = sorted((data / "lfw-dev" / "images").glob("*/*.jpg"))
    step = max(1, len(lfw) // max(1, lfw_count))
    scenes = sorted((data / "scenes").glob("*/*.jpg"))
    return Images(lfw[::step][:lfw_count], scenes)


# --------------------------------------------------------------------------------------------
# Opening, memory


def open_models(
    models_dir: Path, cache_dir: Path, gpu: dict[str, ModelSession], report: Report
) -> dict[str, ModelSession]:
    """CPU sessions, and TensorRT ones into ``gpu`` as they open (so a failure part-way still
    closes what opened); each engine built, then reloaded from the cache."""
    cpu: dict[str, ModelSession] = {}
    opening: dict[str, Any] = {}
    for name in MODELS:
        manifest, data = read_verified_model(models_dir, name)
        cpu[name] = create_cpu_session(data)
        started = time.monotonic()
        opened = open_session(
            data,
            manifest.sha256,
            backend="tensorrt",
            engine_cache_dir=cache_dir,
            threads=None,
            model_name=name,
        )
        seconds = time.monotonic() - started
        gpu[name] = opened.session
        source = getattr(opened.session, "engine_source", "?")
        opening[name] = {"seconds": round(seconds, 2), "source": source, "reason": opened.reason}
        report.check(
            f"{name} engine",
            opened.backend_used == "tensorrt" and not opened.degraded,
            f"ready in {seconds:.1f} s (from {source})"
            + (f": {opened.reason}" if opened.reason else ""),
        )
        if opened.backend_used != "tensorrt":
            continue
        again = trtb.open_tensorrt_session(data, manifest.sha256, cache_dir, model_name=name)
        try:
            report.check(f"{name} cache", again.engine_source == "cache", "engine reloads")
        finally:
            again.close()
    report.figures["engines"] = opening
    return cpu


def memory_figures(gpu: dict[str, ModelSession]) -> dict[str, Any]:
    engines = {
        name: session.gpu_memory_bytes()
        for name, session in gpu.items()
        if isinstance(session, trtb.TensorRTSession)
    }
    device = trtb.device_memory()
    figures: dict[str, Any] = {
        "engines_bytes": engines,
        "engines_total_bytes": sum(engines.values()),
    }
    if device is not None:
        free, total = device
        figures |= {"device_used_bytes": total - free, "device_total_bytes": total}
    return figures


def check_memory_after_open(gpu: dict[str, ModelSession], report: Report) -> None:
    figures = memory_figures(gpu)
    report.figures["memory_after_open"] = figures
    for name, size in figures["engines_bytes"].items():
        report.info(f"{name}: {size / 2**20:.1f} MiB on the GPU")
    total = figures["engines_total_bytes"]
    device = (
        f"; device {figures['device_used_bytes'] / 2**30:.2f} of "
        f"{figures['device_total_bytes'] / 2**30:.2f} GiB in use"
        if "device_used_bytes" in figures
        else ""
    )
    report.check(
        "GPU memory",
        0 < total <= MAX_ENGINES_BYTES,
        f"all engines open: {total / 2**20:.1f} MiB (bar {MAX_ENGINES_BYTES / 2**30:.0f} GiB)"
        + device,
    )


# --------------------------------------------------------------------------------------------
# Parity


@dataclass
class Detectors:
    embed: Callable[[list[RGBImage]], np.ndarray[Any, Any]]
    mmod0: Callable[[RGBImage], list[Detection]]
    mmod1: Callable[[RGBImage], list[Detection]]
    mtcnn: Callable[[RGBImage], list[Detection]]


def mtcnn_parameters(models_dir: Path) -> MtcnnParameters:
    pnet, rnet, onet = (read_verified_model(models_dir, name)[0] for name in MTCNN_MODELS)
    return MtcnnParameters.from_manifest(
        pnet.parameters, rnet.parameters, onet.parameters, pnet.preprocessing
    )


def detectors(models_dir: Path, sessions: dict[str, ModelSession]) -> Detectors:
    parameters = read_verified_model(models_dir, "dlib_mmod")[0].parameters
    mmod = MmodDetector(sessions["dlib_mmod"], parameters)
    pnet, rnet, onet = MTCNN_MODELS
    mtcnn = MtcnnDetector(
        sessions[pnet], sessions[rnet], sessions[onet], mtcnn_parameters(models_dir)
    )
    return Detectors(
        Embedder(sessions[EMBEDDER_MODEL], EMBEDDER_MODEL).embed,
        functools.partial(mmod.detect, upsample=0),
        functools.partial(mmod.detect, upsample=1),
        mtcnn.detect,
    )


@dataclass
class Outputs:
    """One image through one backend."""

    embeddings: np.ndarray[Any, Any] | None
    mmod0: list[Detection]
    mmod1: list[Detection] | None  # scenes only (upsampling LFW's 250 px faces adds nothing)
    mtcnn: list[Detection]


def run_image(models: Detectors, image: RGBImage, chips: list[RGBImage], upsample: bool) -> Outputs:
    return Outputs(
        models.embed(chips) if chips else None,
        models.mmod0(image),
        models.mmod1(image) if upsample else None,
        models.mtcnn(image),
    )


def match_detections(
    reference: Sequence[Detection], candidate: Sequence[Detection]
) -> tuple[list[float], list[Detection], list[Detection]]:
    """Greedy one-to-one matching by IoU: matched IoUs, unmatched reference and candidate."""
    pairs = sorted(
        (
            (iou(a.box, b.box), i, j)
            for i, a in enumerate(reference)
            for j, b in enumerate(candidate)
        ),
        reverse=True,
    )
    used_a: set[int] = set()
    used_b: set[int] = set()
    ious = []
    for value, i, j in pairs:
        if value < MIN_BOX_IOU or i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        ious.append(value)
    lost = [d for i, d in enumerate(reference) if i not in used_a]
    extra = [d for j, d in enumerate(candidate) if j not in used_b]
    return ious, lost, extra


@dataclass
class BoxTally:
    matched: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    borderline: int = 0

    def add(
        self,
        name: str,
        reference: Sequence[Detection],
        candidate: Sequence[Detection],
        is_borderline: Callable[[Detection], bool],
    ) -> None:
        ious, lost, extra = match_detections(reference, candidate)
        self.matched.extend(ious)
        for kind, dets in (("missed", lost), ("extra", extra)):
            for det in dets:
                if is_borderline(det):
                    self.borderline += 1
                else:
                    self.failures.append(f"{name}: {kind} box {det.box.as_list()} {det.score:.3f}")


def compare(
    label: str,
    names: Sequence[str],
    reference: Sequence[Outputs],
    candidate: Sequence[Outputs],
    mtcnn_threshold: float,
    report: Report,
) -> None:
    cosines: list[float] = []
    worst = ("-", 1.0)
    tallies = {
        "MMOD (upsample 0)": BoxTally(),
        "MMOD (upsample 1)": BoxTally(),
        "MTCNN": BoxTally(),
    }
    for name, ref, got in zip(names, reference, candidate, strict=True):
        if ref.embeddings is not None and got.embeddings is not None:
            sims = np.sum(ref.embeddings * got.embeddings, axis=1)
            cosines.extend(float(s) for s in sims)
            if float(sims.min()) < worst[1]:
                worst = (name, float(sims.min()))
        mmod_edge = lambda det: abs(det.score) < MMOD_BORDERLINE  # noqa: E731
        tallies["MMOD (upsample 0)"].add(name, ref.mmod0, got.mmod0, mmod_edge)
        if ref.mmod1 is not None and got.mmod1 is not None:
            tallies["MMOD (upsample 1)"].add(name, ref.mmod1, got.mmod1, mmod_edge)
        tallies["MTCNN"].add(
            name,
            ref.mtcnn,
            got.mtcnn,
            lambda det: abs(det.score - mtcnn_threshold) < MTCNN_BORDERLINE,
        )
    figures = report.figures.setdefault("parity", {}).setdefault(label, {})
    figures["embedder"] = {
        "faces": len(cosines),
        "min_cosine": min(cosines, default=None),
        "mean_cosine": float(np.mean(cosines)) if cosines else None,
    }
    report.check(
        f"embedder parity, {label}",
        bool(cosines) and min(cosines) >= MIN_COSINE,
        f"{len(cosines)} faces, min cosine {min(cosines, default=0):.6f} (worst {worst[0]}), "
        f"mean {np.mean(cosines) if cosines else 0:.6f}; bar {MIN_COSINE}",
    )
    for detector, tally in tallies.items():
        figures[detector] = {
            "boxes_matched": len(tally.matched),
            "min_iou": min(tally.matched, default=None),
            "borderline": tally.borderline,
            "unmatched": tally.failures[:20],
        }
        report.check(
            f"{detector} parity, {label}",
            not tally.failures and bool(tally.matched),
            f"{len(tally.matched)} boxes matched (min IoU {min(tally.matched, default=0):.4f}, "
            f"bar {MIN_BOX_IOU}), {tally.borderline} borderline"
            + (
                f"; {len(tally.failures)} unmatched: {'; '.join(tally.failures[:5])}"
                if tally.failures
                else ""
            ),
        )


def check_parity(
    images: Images,
    models_dir: Path,
    cpu: dict[str, ModelSession],
    gpu: dict[str, ModelSession],
    report: Report,
) -> list[RGBImage]:
    """Both backends on every image, TensorRT from 1 then 8 threads; returns the chips."""
    chipper = FacePipeline.load(models_dir, "mmod", with_embedder=False, backend="cpu")
    scenes = set(images.scenes)
    loaded = []
    for path in images.all:
        image = load_image(path)
        loaded.append((path, image, chipper.chips(image, chipper.detect(image)), path in scenes))
    names = [path.name for path, *_ in loaded]
    reference_models, gpu_models = detectors(models_dir, cpu), detectors(models_dir, gpu)
    reference = [run_image(reference_models, img, c, up) for _, img, c, up in loaded]
    mtcnn_threshold = mtcnn_parameters(models_dir).thresholds[2]

    single = [run_image(gpu_models, img, c, up) for _, img, c, up in loaded]
    compare("1 thread", names, reference, single, mtcnn_threshold, report)
    with ThreadPoolExecutor(THREADS, thread_name_prefix="gpu-check") as pool:
        shared = list(pool.map(lambda item: run_image(gpu_models, *item[1:]), loaded))
    compare(f"{THREADS} threads", names, reference, shared, mtcnn_threshold, report)
    return [chip for *_, chips, _ in loaded for chip in chips]


# --------------------------------------------------------------------------------------------
# Throughput


def faces_per_second(embed: Callable[[list[RGBImage]], Any], batch: list[RGBImage]) -> float:
    for _ in range(WARMUP_RUNS):
        embed(batch)
    started = time.perf_counter()
    for _ in range(THROUGHPUT_RUNS):
        embed(batch)
    return len(batch) * THROUGHPUT_RUNS / (time.perf_counter() - started)


def check_throughput(
    cpu: ModelSession, gpu: ModelSession, chips: list[RGBImage], report: Report
) -> None:
    pool = chips or [np.zeros((150, 150, 3), dtype=np.uint8)]
    backends = {
        "onnxruntime_cpu": Embedder(cpu, EMBEDDER_MODEL).embed,
        "tensorrt": Embedder(gpu, EMBEDDER_MODEL).embed,
    }
    figures: dict[str, dict[str, float]] = {name: {} for name in backends}
    for size in THROUGHPUT_BATCHES:
        batch = [pool[i % len(pool)] for i in range(size)]
        for name, embed in backends.items():
            figures[name][str(size)] = round(faces_per_second(embed, batch), 1)
        report.info(
            f"embedder, batch {size:>2}: TensorRT {figures['tensorrt'][str(size)]:8.1f} faces/s, "
            f"ONNX Runtime (CPU) {figures['onnxruntime_cpu'][str(size)]:8.1f} faces/s "
            "(host copies and preprocessing included)"
        )
    best_gpu, best_cpu = max(figures["tensorrt"].values()), max(figures["onnxruntime_cpu"].values())
    speedup = best_gpu / best_cpu if best_cpu > 0 else float("inf")
    report.figures["throughput_faces_per_s"] = figures | {"speedup": round(speedup, 2)}
    report.check(
        "embedder throughput",
        speedup >= MIN_SPEEDUP,
        f"best TensorRT {best_gpu:.1f} faces/s is {speedup:.1f}x the best CPU {best_cpu:.1f} "
        f"(bar {MIN_SPEEDUP:.0f}x; {os.cpu_count()} CPU cores)",
    )


# --------------------------------------------------------------------------------------------
# Broken and foreign engines, against TensorRT itself


def check_bad_engines(models_dir: Path, cache_dir: Path, report: Report) -> None:
    onet_manifest, onet = read_verified_model(models_dir, "mtcnn_onet")
    rnet_manifest, _ = read_verified_model(models_dir, "mtcnn_rnet")
    platform = trtb.probe()
    cache = EngineCache(cache_dir)
    key = platform.engine_key(onet_manifest.sha256, "mtcnn_onet")
    rnet_key = platform.engine_key(rnet_manifest.sha256, "mtcnn_rnet")
    good = cache.check(key)[0]
    foreign = cache.check(rnet_key)[0]
    if good is None or foreign is None:
        report.check("bad engines", False, "the O-Net and R-Net engines are not in the cache")
        return

    def flip(path: Path) -> None:
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        path.write_bytes(bytes(raw))

    def garbage() -> None:
        cache.store(key, b"not a TensorRT engine" * 64)

    def truncated() -> None:
        cache.store(key, good[: len(good) // 3])

    def rnet_engine() -> None:
        cache.store(key, foreign)

    cases: dict[str, Callable[[], None]] = {
        "bit-flipped engine (checksum)": lambda: flip(cache.engine_path(key)),
        "bytes that are no engine (TensorRT's deserialiser)": garbage,
        "truncated engine (TensorRT's deserialiser)": truncated,
        "R-Net's engine under O-Net's key (tensors differ)": rnet_engine,
    }
    crops = np.zeros((3, 3, 48, 48), dtype=np.float32)
    outcomes = {}
    for label, damage in cases.items():
        cache.store(key, good)
        damage()
        said_before = trtb.last_trt_error()
        opened = open_session(
            onet,
            onet_manifest.sha256,
            backend="tensorrt",
            engine_cache_dir=cache_dir,
            threads=None,
            model_name="mtcnn_onet",
        )
        try:
            source = getattr(opened.session, "engine_source", "?")
            runs = len(opened.session.run(None, {"image": crops})) == 3
        finally:
            if isinstance(opened.session, trtb.TensorRTSession):
                opened.session.close()
        said = trtb.last_trt_error()
        outcomes[label] = {
            "backend": opened.backend_used,
            "source": source,
            "tensorrt_said": said if said != said_before else None,
        }
        report.check(
            f"bad engine: {label}",
            opened.backend_used == "tensorrt" and source == "built" and runs,
            f"rebuilt and running on {opened.backend_used} (engine from {source})"
            + (f"; TensorRT said: {said}" if said and said != said_before else ""),
        )
    report.figures["bad_engines"] = outcomes


# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the shared test images")
    parser.add_argument(
        "--home", type=Path, default=Path(os.environ.get("EDGEID_HOME", "var")), help="state dir"
    )
    parser.add_argument(
        "--cache-dir", type=Path, help="engine cache to use (default: a fresh temporary one)"
    )
    parser.add_argument("--report", type=Path, help="write the JSON report here")
    parser.add_argument("--lfw-images", type=int, default=DEFAULT_LFW_IMAGES)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report = Report()

    try:
        platform = trtb.probe()
    except trtb.TensorRTUnavailableError as exc:
        print(
            f"gpu-check: needs an NVIDIA GPU with TensorRT {trtb.SUPPORTED_TRT_MAJOR}.x and "
            f"pycuda (make gpu-check installs them; firmware/gpu_preflight.py says what is "
            f"missing); nothing was checked: {exc}",
            file=sys.stderr,
        )
        report.figures["unavailable"] = str(exc)
        report.write(args.report, "no-gpu", None)
        return EXIT_NO_GPU
    described = {
        "gpu": platform.gpu_name,
        "compute_capability": list(platform.compute_capability),
        "tensorrt": platform.trt_version,
        "cuda_variant": platform.cuda_variant,
        "precision": platform.precision,
        "on_demand_memory": platform.on_demand_memory,
    }
    print(
        f"gpu-check on {platform.gpu_name} (sm_{''.join(map(str, platform.compute_capability))})"
        f", TensorRT {platform.trt_version} {platform.cuda_variant or ''}, {platform.precision} "
        f"engines, {'on-demand' if platform.on_demand_memory else 'static'} activation memory",
        flush=True,
    )
    images = find_images(args.data, args.lfw_images)
    if not images.lfw or not images.scenes:
        print(f"gpu-check: test images not found under {args.data}", file=sys.stderr)
        report.check("test images", False, f"none under {args.data}")
        report.write(args.report, "failed", described)
        return EXIT_FAILED

    models_dir = args.home / "models"
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="edgeid-gpu-check-"))
    gpu: dict[str, ModelSession] = {}
    try:
        cpu = open_models(models_dir, cache_dir, gpu, report)
        if not report.failures:
            check_memory_after_open(gpu, report)
            chips = check_parity(images, models_dir, cpu, gpu, report)
            check_throughput(cpu[EMBEDDER_MODEL], gpu[EMBEDDER_MODEL], chips, report)
            report.figures["memory_after_runs"] = memory_figures(gpu)
            check_bad_engines(models_dir, cache_dir, report)
    except Exception as exc:  # report any crash as a failed check, with its type
        report.check("gpu-check", False, f"crashed: {type(exc).__name__}: {exc}")
        logging.getLogger(__name__).exception("gpu-check crashed")
    finally:
        _close_all(gpu.values())  # free GPU memory while the CUDA context is certainly alive
        if args.cache_dir is None:
            shutil.rmtree(cache_dir, ignore_errors=True)
    status = "failed" if report.failures else "passed"
    report.write(args.report, status, described)
    if report.failures:
        print(f"gpu-check: {len(report.failures)} check(s) failed", file=sys.stderr)
        return EXIT_FAILED
    print("gpu-check: all checks passed" + (f"; report in {args.report}" if args.report else ""))
    return EXIT_OK


def _close_all(sessions: Iterable[ModelSession]) -> None:
    for session in sessions:
        if isinstance(session, trtb.TensorRTSession):
            session.close()


if __name__ == "__main__":
    sys.exit(main())
