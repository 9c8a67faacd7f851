"""Clustering quality on LFW dev beside dlib's ``chinese_whispers_clustering``, same templates,
same run; and clustering time at case scale on synthetic templates.

Quality: the central face of each of LFW dev's 1,549 images (963 people, 602 of them with one
image) is embedded by our default pipeline; every method then clusters the same templates at
the calibrated threshold of each false-match rate, and is scored against the people by
pairwise precision/recall/F1 and BCubed precision/recall/F1
(``edgeid/runtime/cases/cluster_metrics``).
dlib's ``chinese_whispers_clustering`` (dlib-bin, the reference) gets the same threshold as a
Euclidean distance: for unit templates ``d = sqrt(2 - 2 cos)``. Caveat: the thresholds were
calibrated on these same LFW dev images, so these are in-sample figures; LFW dev has at most 7
images of a person, far fewer than a case may hold of one victim.

Scale: ``--scale N`` synthetic templates drawn from a Gaussian identity model fitted to the
same LFW templates (``benchmarks/search_bench.TemplateModel``), clustered by the default
method and by dlib; seconds and quality on the known synthetic identities.

    python -m benchmarks.cluster_bench --data ../shared/data --models var/models
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeid.runtime.cases.cluster_metrics import score_clusters
from edgeid.runtime.cases.clustering import DEFAULT_METHOD, METHODS, cluster
from edgeid.runtime.cases.ingest import CLUSTER_FMR
from edgeid.runtime.gallery.thresholds import CALIBRATED_FMRS, load_calibration
from edgeid.runtime.inference.pipeline import EMBEDDER_MODEL

logger = logging.getLogger(__name__)

DEFAULT_SCALE = 20_000  # faces: a large case; dlib's all-pairs clustering still finishes
DLIB = "dlib_chinese_whispers"
Vectors = npt.NDArray[np.float32]


def _dlib() -> Any | None:
    try:
        import dlib
    except ImportError:
        return None
    return dlib


def dlib_clusters(dlib: Any, vectors: Vectors, cosine: float) -> npt.NDArray[np.int64]:
    """dlib's ``chinese_whispers_clustering`` at the Euclidean equivalent of ``cosine``."""
    distance = float(np.sqrt(max(0.0, 2.0 - 2.0 * cosine)))
    descriptors = [dlib.vector(row.astype(np.float64).tolist()) for row in vectors]
    return np.asarray(dlib.chinese_whispers_clustering(descriptors, distance), dtype=np.int64)


def _timed(
    make: Callable[..., npt.NDArray[np.int64]], *args: object, truth: npt.ArrayLike
) -> dict[str, Any]:
    started = time.perf_counter()
    labels = make(*args)
    seconds = time.perf_counter() - started
    return {**score_clusters(labels, truth).to_json(), "seconds": round(seconds, 3)}


def lfw_quality(vectors: Vectors, people: list[str]) -> dict[str, object]:
    calibration = load_calibration(EMBEDDER_MODEL).band("adult")  # LFW: adults
    dlib = _dlib()
    by_fmr: dict[str, dict[str, Any]] = {}
    for fmr in sorted(CALIBRATED_FMRS, reverse=True):
        threshold = calibration.threshold(fmr)
        methods: dict[str, dict[str, Any]] = {
            m: _timed(cluster, vectors, threshold, m, truth=people) for m in METHODS
        }
        if dlib is not None:
            methods[DLIB] = _timed(dlib_clusters, dlib, vectors, threshold, truth=people)
        by_fmr[f"{fmr:g}"] = {"threshold": round(threshold, 6), "methods": methods}
    chosen = by_fmr[f"{CLUSTER_FMR:g}"]["methods"]
    ours, base = chosen[DEFAULT_METHOD], chosen.get(DLIB)
    summary: dict[str, object] = {
        "method": DEFAULT_METHOD,
        "fmr": CLUSTER_FMR,
        "ours": ours,
        "baseline": base,
        "baseline_note": "dlib chinese_whispers_clustering, same templates, same threshold",
    }
    if base:
        summary["ratio_vs_baseline"] = {
            key: round(ours[key] / base[key], 3) if base[key] else None
            for key in ("pairwise_f1", "bcubed_f1")
        }
    return {
        "faces": len(vectors),
        "people": len(set(people)),
        "in_sample_note": "thresholds were calibrated on these LFW dev images",
        "chosen": summary,
        "by_fmr": by_fmr,
    }


def scale(vectors: Vectors, people: list[str], size: int, models: Path) -> dict[str, object]:
    from benchmarks.search_bench import TemplateModel, embedder_sha256

    model = TemplateModel.fit(vectors, people, embedder_sha256(models))
    synthetic, identities, _ = model.sample(size, np.random.default_rng(0))
    threshold = load_calibration(EMBEDDER_MODEL).band("adult").threshold(CLUSTER_FMR)
    result: dict[str, object] = {
        "faces": size,
        "people": int(identities.max()) + 1,
        "fmr": CLUSTER_FMR,
        "note": "synthetic templates from a Gaussian identity model fitted to LFW dev",
    }
    ours = _timed(cluster, synthetic, threshold, truth=identities)
    result[DEFAULT_METHOD] = ours
    dlib = _dlib()
    if dlib is not None:
        base = _timed(dlib_clusters, dlib, synthetic, threshold, truth=identities)
        result[DLIB] = base
        result["speed_ratio_vs_baseline"] = round(base["seconds"] / ours["seconds"], 2)
    return result


def embed(data: Path, models: Path, cache: Path | None) -> tuple[Vectors, list[str], float]:
    """LFW dev central-face templates (cached as an .npz when ``cache`` is given)."""
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as saved:
            return saved["vectors"], [str(p) for p in saved["people"]], float(saved["seconds"])
    from benchmarks.calibrate_thresholds import embed_lfw_dev

    embedded = embed_lfw_dev(data, models)
    if cache is not None:
        np.savez(cache, vectors=embedded.vectors, people=np.array(embedded.people),
                 seconds=np.array(embedded.seconds))  # fmt: skip
    return embedded.vectors, list(embedded.people), float(embedded.seconds)


def run(
    data: Path, models: Path, *, size: int = DEFAULT_SCALE, cache: Path | None = None
) -> dict[str, object]:
    vectors, people, seconds = embed(data, models, cache)
    return {
        "lfw_dev": {**lfw_quality(vectors, people), "embedding_s": round(seconds, 1)},
        "scale": scale(vectors, people, size, models) if size else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", type=Path, default=Path("var/models"))
    parser.add_argument("--scale", type=int, default=DEFAULT_SCALE, help="synthetic faces; 0: skip")
    parser.add_argument("--cache", type=Path, help="reuse LFW templates from this .npz")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    json.dump(run(args.data, args.models, size=args.scale, cache=args.cache), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
