"""`make gpu-check`: TensorRT engines against ONNX Runtime on real images, on an NVIDIA GPU.

For every model this builds the TensorRT engine into a fresh cache (unless ``--cache-dir`` names
one), opens it a second time to prove it loads from the cache, then checks on ``--data``:

* embedder: the same aligned chips through both backends, cosine >= 0.999 for every face;
* MMOD: every box found by one backend has a box from the other with IoU >= 0.95;
* MTCNN (three engines): the same bar;
* corrupt engines: a bit-flipped cached engine is rebuilt and the model still runs on TensorRT;

and prints the embedder's TensorRT throughput at batch 1, 8 and 32.

Exit status: 0 when every check passes, 1 when any fails, 2 when this machine has no usable
NVIDIA GPU with TensorRT 10 and pycuda (nothing was checked).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeid.runtime.evaluation.detection import iou
from edgeid.runtime.inference.backends import ModelSession, open_session
from edgeid.runtime.inference.backends import tensorrt_backend as trtb
from edgeid.runtime.inference.backends.engine_cache import EngineCache
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
# FP16 engines against the FP32 reference: the bars of the issue.
MIN_COSINE = 0.999
MIN_BOX_IOU = 0.95
# A detection this close to its detector's threshold may flip under FP16 rounding: unmatched
# ones are reported, not failed. MMOD scores are raw margins around 0 (faces score ~0.3-1.5);
# MTCNN's are O-Net probabilities against its last threshold.
MMOD_BORDERLINE = 0.05
MTCNN_BORDERLINE = 0.01
# LFW images used (evenly spread over the 1,549): enough faces for a per-face bar, a few minutes.
DEFAULT_LFW_IMAGES = 200
THROUGHPUT_BATCHES = (1, 8, 32)
# Timed runs per batch size after the warm-up runs (results are a mean, not a single run).
THROUGHPUT_RUNS = 50
WARMUP_RUNS = 5


@dataclass
class Report:
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, message: str) -> None:
        print(f"{'PASS' if ok else 'FAIL'} {message}", flush=True)
        if not ok:
            self.failures.append(message)

    @staticmethod
    def info(message: str) -> None:
        print(f"     {message}", flush=True)


@dataclass(frozen=True)
class Images:
    lfw: list[Path]
    scenes: list[Path]


def find_images(data: Path, lfw_count: int) -> Images:
    lfw = sorted((data / "lfw-dev" / "images").glob("*/*.jpg"))
    step = max(1, len(lfw) // max(1, lfw_count))
    scenes = sorted((data / "scenes").glob("*/*.jpg"))
    return Images(lfw[::step][:lfw_count], scenes)


def open_models(
    models_dir: Path, cache_dir: Path, report: Report
) -> tuple[dict[str, ModelSession], dict[str, ModelSession]]:
    """CPU and TensorRT sessions for every model; engines built, then reloaded from the cache."""
    cpu: dict[str, ModelSession] = {}
    gpu: dict[str, ModelSession] = {}
    for name in MODELS:
        manifest, data = read_verified_model(models_dir, name)
        cpu[name] = create_cpu_session(data)
        started = time.monotonic()
        opened = open_session(
            data, manifest.sha256, backend="tensorrt", engine_cache_dir=cache_dir, threads=None
        )
        seconds = time.monotonic() - started
        source = getattr(opened.session, "engine_source", "?")
        report.check(
            opened.backend_used == "tensorrt" and not opened.degraded,
            f"{name}: TensorRT engine ready in {seconds:.1f} s (from {source})"
            + (f": {opened.reason}" if opened.reason else ""),
        )
        gpu[name] = opened.session
        again = trtb.open_tensorrt_session(data, manifest.sha256, cache_dir)
        report.check(again.engine_source == "cache", f"{name}: engine reloads from the cache")
        again.close()
    return cpu, gpu


def check_corrupt_engine(models_dir: Path, cache_dir: Path, report: Report) -> None:
    """A bit flip in a cached engine: detected, rebuilt, and the model runs on TensorRT."""
    manifest, data = read_verified_model(models_dir, "mtcnn_onet")
    key = trtb.probe().engine_key(manifest.sha256)
    path = EngineCache(cache_dir).engine_path(key)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    opened = open_session(
        data, manifest.sha256, backend="tensorrt", engine_cache_dir=cache_dir, threads=None
    )
    source = getattr(opened.session, "engine_source", "?")
    crops = np.zeros((3, 3, 48, 48), dtype=np.float32)
    runs = len(opened.session.run(None, {"image": crops})) == 3
    report.check(
        opened.backend_used == "tensorrt" and source == "built" and runs,
        f"corrupt cached engine detected and rebuilt (engine from {source})",
    )


def check_embedder(
    images: Images, models_dir: Path, cpu: ModelSession, gpu: ModelSession, report: Report
) -> list[RGBImage]:
    """Same chips through both backends; returns the chips for the throughput test."""
    pipeline = FacePipeline.load(models_dir, "mmod", with_embedder=False)
    cpu_embedder, gpu_embedder = Embedder(cpu, EMBEDDER_MODEL), Embedder(gpu, EMBEDDER_MODEL)
    cosines: list[float] = []
    worst = ("", 1.0)
    all_chips: list[RGBImage] = []
    for path in [*images.lfw, *images.scenes]:
        image = load_image(path)
        chips = pipeline.chips(image, pipeline.detect(image))
        if not chips:
            continue
        all_chips.extend(chips)
        for start in range(0, len(chips), max(THROUGHPUT_BATCHES)):
            batch = chips[start : start + max(THROUGHPUT_BATCHES)]
            sims = np.sum(cpu_embedder.embed(batch) * gpu_embedder.embed(batch), axis=1)
            cosines.extend(float(s) for s in sims)
            if float(sims.min()) < worst[1]:
                worst = (path.name, float(sims.min()))
    ok = bool(cosines) and min(cosines) >= MIN_COSINE
    report.check(
        ok,
        f"embedder parity: {len(cosines)} faces, min cosine {min(cosines, default=0):.6f} "
        f"(worst {worst[0] or '-'}), mean {np.mean(cosines) if cosines else 0:.6f}; "
        f"bar {MIN_COSINE}",
    )
    return all_chips


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


def check_detector(
    label: str,
    paths: Sequence[Path],
    cpu_detect: Callable[[RGBImage], list[Detection]],
    gpu_detect: Callable[[RGBImage], list[Detection]],
    borderline: Callable[[Detection], bool],
    report: Report,
) -> None:
    matched: list[float] = []
    failures: list[str] = []
    tolerated = 0
    for path in paths:
        image = load_image(path)
        ious, lost, extra = match_detections(cpu_detect(image), gpu_detect(image))
        matched.extend(ious)
        for kind, dets in (("missed", lost), ("extra", extra)):
            for det in dets:
                if borderline(det):
                    tolerated += 1
                    report.info(
                        f"{label}: {path.name}: borderline {kind} box, score {det.score:.4f}"
                    )
                else:
                    failures.append(f"{path.name}: {kind} box {det.box.as_list()} {det.score:.3f}")
    report.check(
        not failures and bool(matched),
        f"{label} parity: {len(matched)} boxes matched (min IoU "
        f"{min(matched, default=0):.4f}, bar {MIN_BOX_IOU}) on {len(paths)} images, "
        f"{tolerated} borderline"
        + (f"; {len(failures)} unmatched: {'; '.join(failures[:5])}" if failures else ""),
    )


def check_mmod(
    images: Images, models_dir: Path, cpu: ModelSession, gpu: ModelSession, report: Report
) -> None:
    parameters = read_verified_model(models_dir, "dlib_mmod")[0].parameters
    cpu_mmod, gpu_mmod = MmodDetector(cpu, parameters), MmodDetector(gpu, parameters)
    for upsample, paths in ((0, [*images.lfw, *images.scenes]), (1, images.scenes)):
        check_detector(
            f"MMOD (upsample {upsample})",
            paths,
            functools.partial(cpu_mmod.detect, upsample=upsample),
            functools.partial(gpu_mmod.detect, upsample=upsample),
            lambda det: abs(det.score) < MMOD_BORDERLINE,
            report,
        )


def check_mtcnn(
    images: Images,
    models_dir: Path,
    cpu: dict[str, ModelSession],
    gpu: dict[str, ModelSession],
    report: Report,
) -> None:
    pnet, rnet, onet = MTCNN_MODELS
    manifests = {name: read_verified_model(models_dir, name)[0] for name in MTCNN_MODELS}
    parameters = MtcnnParameters.from_manifest(
        manifests[pnet].parameters,
        manifests[rnet].parameters,
        manifests[onet].parameters,
        manifests[pnet].preprocessing,
    )
    cpu_mtcnn = MtcnnDetector(cpu[pnet], cpu[rnet], cpu[onet], parameters)
    gpu_mtcnn = MtcnnDetector(gpu[pnet], gpu[rnet], gpu[onet], parameters)
    last_threshold = parameters.thresholds[2]
    check_detector(
        "MTCNN",
        [*images.lfw, *images.scenes],
        cpu_mtcnn.detect,
        gpu_mtcnn.detect,
        lambda det: abs(det.score - last_threshold) < MTCNN_BORDERLINE,
        report,
    )


def measure_throughput(gpu: ModelSession, chips: list[RGBImage]) -> None:
    embedder = Embedder(gpu, EMBEDDER_MODEL)
    pool = chips or [np.zeros((150, 150, 3), dtype=np.uint8)]
    for batch_size in THROUGHPUT_BATCHES:
        batch = [pool[i % len(pool)] for i in range(batch_size)]
        for _ in range(WARMUP_RUNS):
            embedder.embed(batch)
        started = time.perf_counter()
        for _ in range(THROUGHPUT_RUNS):
            embedder.embed(batch)
        seconds = (time.perf_counter() - started) / THROUGHPUT_RUNS
        Report.info(
            f"embedder throughput, batch {batch_size:>2}: {batch_size / seconds:8.1f} faces/s "
            f"({1000 * seconds:.2f} ms per batch, host copies included)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the shared test images")
    parser.add_argument(
        "--home", type=Path, default=Path(os.environ.get("EDGEID_HOME", "var")), help="state dir"
    )
    parser.add_argument(
        "--cache-dir", type=Path, help="engine cache to use (default: a fresh temporary one)"
    )
    parser.add_argument("--lfw-images", type=int, default=DEFAULT_LFW_IMAGES)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        platform = trtb.probe()
    except trtb.TensorRTUnavailableError as exc:
        print(
            f"gpu-check: needs an NVIDIA GPU with TensorRT {trtb.SUPPORTED_TRT_MAJOR}.x and "
            f"pycuda (pip install -e '.[tensorrt]'); nothing was checked: {exc}",
            file=sys.stderr,
        )
        return EXIT_NO_GPU
    print(
        f"gpu-check on {platform.gpu_name} (sm_{''.join(map(str, platform.compute_capability))})"
        f", TensorRT {platform.trt_version}, {platform.precision} engines",
        flush=True,
    )
    images = find_images(args.data, args.lfw_images)
    if not images.lfw or not images.scenes:
        print(f"gpu-check: test images not found under {args.data}", file=sys.stderr)
        return EXIT_FAILED

    models_dir = args.home / "models"
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="edgeid-gpu-check-"))
    report = Report()
    gpu: dict[str, ModelSession] = {}
    try:
        cpu, gpu = open_models(models_dir, cache_dir, report)
        if not report.failures:
            chips = check_embedder(
                images, models_dir, cpu[EMBEDDER_MODEL], gpu[EMBEDDER_MODEL], report
            )
            check_mmod(images, models_dir, cpu["dlib_mmod"], gpu["dlib_mmod"], report)
            check_mtcnn(images, models_dir, cpu, gpu, report)
            check_corrupt_engine(models_dir, cache_dir, report)
            measure_throughput(gpu[EMBEDDER_MODEL], chips)
    except Exception as exc:  # report any crash as a failed check, with its type
        report.check(False, f"gpu-check crashed: {type(exc).__name__}: {exc}")
        logging.getLogger(__name__).exception("gpu-check crashed")
    finally:
        for session in gpu.values():
            if isinstance(session, trtb.TensorRTSession):
                session.close()  # free GPU memory while the CUDA context is certainly alive
        if args.cache_dir is None:
            shutil.rmtree(cache_dir, ignore_errors=True)
    if report.failures:
        print(f"gpu-check: {len(report.failures)} check(s) failed", file=sys.stderr)
        return EXIT_FAILED
    print("gpu-check: all checks passed")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
