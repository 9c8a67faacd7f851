"""`python -m benchmarks.mtcnn_path_bench --images DIR --models DIR`: where MTCNN's time goes.

Two detectors in one process, each image through both in turn (the order alternating), so the load
of other jobs on a shared machine falls on both alike: the current path (PRelu rewritten by
``edgeid.runtime.inference.prelu_split`` in every CPU session, R-/O-Net crops in cache-sized runs,
large P-Net levels in tiles) and the path as it was before issue 17 item 2 (PRelu as converted, up
to 256 crops per run, P-Net on whole levels). Per image, in ms of wall time (mean over the images):
the integral image, each cascade stage as a whole (P-Net over the pyramid with its resizes and NMS,
R-Net, O-Net), inside each stage the network's ``run`` (the rest is numpy: resizing, crops, NMS,
box arithmetic), P-Net's run per pyramid level, and all of ``detect``; also the CPU ms of
``detect``, the pyramid levels, the crops reaching R- and O-Net, and whether the two paths found
the same faces (they must: every change is exact). Ratios are as built over current.

    python -m benchmarks.mtcnn_path_bench --images ../shared/data/lfw-dev/images \\
        --models var/models --limit 100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np

from edgeid.runtime.inference import mtcnn_detector as mtcnn
from edgeid.runtime.inference.image_decode import load_image
from edgeid.runtime.inference.manifest import read_verified_model
from edgeid.runtime.inference.mtcnn_detector import MODEL_NAMES, MtcnnDetector
from edgeid.runtime.inference.onnx_backend import create_cpu_session

PATHS = ("as_built", "current")
AS_BUILT_CROP_BATCHES = (256, 256)
Totals = dict[str, float]


class _TimedSession:
    """A session that adds its run time to ``totals`` (P-Net also per pyramid level)."""

    def __init__(self, inner: Any, totals: Callable[[], Totals], stage: str) -> None:
        self._inner, self._totals, self._stage = inner, totals, stage
        self.level = 0

    def run(self, names: list[str], feeds: dict[str, Any]) -> Any:
        started = time.perf_counter()
        try:
            return self._inner.run(names, feeds)
        finally:
            seconds = time.perf_counter() - started
            totals = self._totals()
            totals[f"{self._stage}_run"] += seconds
            if self._stage == "pnet":
                totals[f"pnet_run_level_{self.level}"] += seconds
                self.level += 1
            else:
                totals[f"{self._stage}_crops"] += len(feeds[mtcnn._INPUT])

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._inner, attr)


def _detector(
    models: Path, threads: int | None, rewrite: bool, totals: Callable[[], Totals]
) -> Any:
    sessions = [
        _TimedSession(
            create_cpu_session(
                read_verified_model(models, name)[1], threads, rewrite_prelu=rewrite
            ),
            totals,
            name.removeprefix("mtcnn_"),
        )
        for name in MODEL_NAMES
    ]
    pnet, rnet, onet = cast(list[Any], sessions)  # timed stand-ins for ModelSession
    parameters = MtcnnDetector.load(models).parameters
    if rewrite:
        detector = MtcnnDetector(pnet, rnet, onet, parameters)
    else:  # as before issue 17 item 2: 256 crops per run, P-Net on whole levels
        detector = MtcnnDetector(
            pnet, rnet, onet, parameters, crop_batches=AS_BUILT_CROP_BATCHES, pnet_tile=None
        )
    for stage in ("_stage_pnet", "_stage_rnet", "_stage_onet"):
        method = getattr(detector, stage)

        def timed(*args: Any, _method: Any = method, _name: str = stage[len("_stage_") :]) -> Any:
            started = time.perf_counter()
            try:
                return _method(*args)
            finally:
                totals()[_name] += time.perf_counter() - started

        setattr(detector, stage, timed)
    return detector


def run(images: Path, models: Path, limit: int, threads: int | None) -> dict[str, object]:
    current: dict[str, Totals] = {}
    per_image: dict[str, Totals] = {}

    def totals_of(path: str) -> Callable[[], Totals]:
        return lambda: per_image[path]

    detectors = {p: _detector(models, threads, p == "current", totals_of(p)) for p in PATHS}
    files = sorted(f for f in images.rglob("*") if f.suffix.lower() in {".jpg", ".jpeg", ".png"})
    pixels = [load_image(f) for f in files[:limit]]
    sums: dict[str, Totals] = {p: defaultdict(float) for p in PATHS}
    same = 0
    for path in PATHS:  # warm-up, untimed
        per_image[path] = defaultdict(float)
        for image in pixels[:3]:
            detectors[path].detect(image)
    load_before = os.getloadavg()[0]
    for index, image in enumerate(pixels):
        found = {}
        for path in PATHS if index % 2 else PATHS[::-1]:
            per_image[path] = defaultdict(float)
            detectors[path]._pnet.level = 0  # P-Net's runs count levels from the top
            sampler_started = time.perf_counter()
            mtcnn._AreaSampler(image)
            per_image[path]["integral"] = time.perf_counter() - sampler_started
            started, cpu_started = time.perf_counter(), time.process_time()
            found[path] = detectors[path].detect(image)
            per_image[path]["detect"] = time.perf_counter() - started
            per_image[path]["detect_cpu"] = time.process_time() - cpu_started
            for key, value in per_image[path].items():
                sums[path][key] += value
            sums[path]["levels"] += len(detectors[path].scales(*image.shape[:2]))
            sums[path]["faces"] += len(found[path])
        same += found["as_built"] == found["current"]
    count = max(len(pixels), 1)
    for path in PATHS:
        current[path] = {
            k: round(
                v / count if k in ("levels", "faces") or k.endswith("_crops") else 1000 * v / count,
                3,
            )
            for k, v in sorted(sums[path].items())
        }
    ratios = {
        key: round(current["as_built"][key] / current["current"][key], 3)
        for key in (
            "detect",
            "detect_cpu",
            "pnet",
            "pnet_run",
            "rnet",
            "rnet_run",
            "onet",
            "onet_run",
        )
        if current["current"].get(key)
    }
    numpy_ms = {
        p: round(
            current[p]["detect"]
            - sum(current[p].get(f"{s}_run", 0.0) for s in ("pnet", "rnet", "onet")),
            3,
        )
        for p in PATHS
    }
    return {
        "benchmark": "MTCNN detect, per stage, as built vs current, interleaved per image",
        "images": len(pixels),
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "unit": "ms per image (wall, mean) except levels, faces and *_crops (count per image)",
        "as_built": current["as_built"],
        "current": current["current"],
        "outside_networks_ms": numpy_ms,
        "speedup_as_built_over_current": ratios,
        "same_detections": f"{same}/{len(pixels)}",
        "mean_image_side": float(np.mean([min(p.shape[:2]) for p in pixels])) if pixels else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    json.dump(run(args.images, args.models, args.limit, args.threads), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
