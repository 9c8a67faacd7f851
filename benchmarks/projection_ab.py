"""Does an HNSW graph over fewer dimensions search faster? (issue 17 item 3; not adopted)

dlib_resnet_v1's last layer is a 256 -> 128 matrix with no bias whose numerical rank is 80, so
every template lies in one 80-dimensional subspace. This script prints that matrix's singular
values and the variance the LFW-fitted synthetic templates keep in their leading principal
axes, then builds, over the same N templates (the search bench's generator, seed 0):

- ``base``: the product's index as hnswlib builds it (128-d cosine, M=32, ef_construction 200);
- ``pcaD`` for each D in ``--axes``: hnswlib over the templates' first D principal
  coordinates (Euclidean: on unit templates it ranks as cosine does), asking for R candidates
  and re-scoring them exactly on the full templates.

For each ef in ``--ef`` (and R in ``--rerank`` for the projected graphs) it measures recall@10
against exact search on 1,000 probes and single-probe p50/p99 over 2,000, one after another in
this process, and exact search's p50 (numpy float32, all cores) as the baseline.

    python -m benchmarks.projection_ab --size 1000000 --axes 48,64,80 --ef 250,350,450
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hnswlib
import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

from benchmarks.search_bench import GENERATOR_CACHE, K, draw_probes, exact_top, template_model
from edgeid.runtime.gallery.index import DEFAULT_EF_CONSTRUCTION, DEFAULT_M, RANDOM_SEED
from edgeid.runtime.inference.pipeline import EMBEDDER_MODEL

Floats = npt.NDArray[np.float32]
Query = Callable[[Floats, int], npt.NDArray[np.int64]]
RECALL_PROBES = 1000
LATENCY_PROBES = 2000
WARMUP = 50
FIT_SAMPLE = 50_000


def last_layer_spectrum(models: Path) -> list[float]:
    """Singular values of the embedder's final fully connected matrix, over the largest."""
    graph = onnx.load(str(models / f"{EMBEDDER_MODEL}.onnx")).graph
    matrices = [numpy_helper.to_array(i) for i in graph.initializer if len(i.dims) == 2]
    values = np.linalg.svd(matrices[-1].astype(np.float64), compute_uv=False)
    return [float(v) for v in values / values[0]]


def measure(
    name: str, query: Query, index: hnswlib.Index, probes: Floats, truth: npt.NDArray[np.int64]
) -> Callable[[int, int], dict[str, object]]:
    def at(ef: int, rerank: int) -> dict[str, object]:
        index.set_ef(max(ef, rerank))
        for probe in probes[:WARMUP]:
            query(probe, rerank)
        hits = sum(
            len(set(query(p, rerank).tolist()) & set(t.tolist()))
            for p, t in zip(probes[:RECALL_PROBES], truth, strict=True)
        )
        seconds = []
        for probe in probes[:LATENCY_PROBES]:
            started = time.perf_counter()
            query(probe, rerank)
            seconds.append(time.perf_counter() - started)
        return {
            "graph": name,
            "ef": ef,
            "rerank": rerank,
            "recall_at_10": round(hits / (K * len(truth)), 4),
            "p50_ms": round(1000 * float(np.percentile(seconds, 50)), 3),
            "p99_ms": round(1000 * float(np.percentile(seconds, 99)), 3),
        }

    return at


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--axes", default="64,80", help="projected dimensions, comma-separated")
    parser.add_argument("--ef", default="250,350,450")
    parser.add_argument("--rerank", default="10,40", help="candidates re-scored (projected)")
    parser.add_argument("--models", type=Path, default=None)
    args = parser.parse_args()
    home = Path(os.environ.get("EDGEID_HOME", "var"))
    models = args.models or home / "models"
    efs = [int(v) for v in args.ef.split(",")]
    reranks = [int(v) for v in args.rerank.split(",")]

    def emit(record: dict[str, object]) -> None:
        print(json.dumps(record), flush=True)

    model = template_model(None, models, home / "cache" / GENERATOR_CACHE)
    rng = np.random.default_rng(0)
    gallery, _, centres = model.sample(args.size, rng)
    probes = draw_probes(model, centres, LATENCY_PROBES, rng)[0]
    truth = exact_top(gallery, probes[:RECALL_PROBES], K)
    spectrum = last_layer_spectrum(models)
    sample = gallery[np.random.default_rng(1).choice(args.size, min(args.size, FIT_SAMPLE))]
    mean = sample.astype(np.float64).mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(sample.astype(np.float64) - mean, rowvar=False))
    order = np.argsort(-values)
    kept = np.cumsum(values[order]) / values.sum()
    emit(
        {
            "size": args.size,
            "last_layer_singular_values": {i + 1: round(spectrum[i], 7) for i in (63, 79, 80, 95)},
            "synthetic_variance_kept": {d: float(kept[d - 1]) for d in (48, 64, 80, 96)},
        }
    )

    exact = []
    for probe in probes[:50]:
        started = time.perf_counter()
        scores = gallery @ probe
        np.argpartition(-scores, K)[:K]
        exact.append(time.perf_counter() - started)
    emit({"exact_p50_ms": round(1000 * float(np.percentile(exact, 50)), 3)})

    base = hnswlib.Index(space="cosine", dim=gallery.shape[1])
    base.init_index(
        args.size, M=DEFAULT_M, ef_construction=DEFAULT_EF_CONSTRUCTION, random_seed=RANDOM_SEED
    )
    started = time.perf_counter()
    base.add_items(gallery, np.arange(args.size), num_threads=-1)
    emit({"graph": "base", "build_s": round(time.perf_counter() - started, 1)})

    def query_base(probe: Floats, rerank: int, base: hnswlib.Index = base) -> npt.NDArray[np.int64]:
        labels = base.knn_query(probe, k=K, num_threads=1)[0][0].astype(np.int64)
        scores = gallery[labels].astype(np.float64) @ probe.astype(np.float64)
        best: npt.NDArray[np.int64] = labels[np.argsort(-scores)]
        return best

    at = measure("base", query_base, base, probes, truth)
    for ef in efs:
        emit(at(ef, K))

    for axes in [int(v) for v in args.axes.split(",")]:
        basis = vectors[:, order[:axes]].astype(np.float32)
        centre = mean.astype(np.float32)
        graph = hnswlib.Index(space="l2", dim=axes)
        graph.init_index(
            args.size, M=DEFAULT_M, ef_construction=DEFAULT_EF_CONSTRUCTION, random_seed=RANDOM_SEED
        )
        started = time.perf_counter()
        graph.add_items((gallery - centre) @ basis, np.arange(args.size), num_threads=-1)
        emit({"graph": f"pca{axes}", "build_s": round(time.perf_counter() - started, 1)})

        def query_projected(
            probe: Floats,
            rerank: int,
            graph: hnswlib.Index = graph,
            basis: Floats = basis,
            centre: Floats = centre,
        ) -> npt.NDArray[np.int64]:
            found = graph.knn_query((probe - centre) @ basis, k=max(K, rerank), num_threads=1)
            labels = found[0][0].astype(np.int64)
            scores = gallery[labels].astype(np.float64) @ probe.astype(np.float64)
            best: npt.NDArray[np.int64] = labels[np.argsort(-scores)[:K]]
            return best

        at = measure(f"pca{axes}", query_projected, graph, probes, truth)
        for ef in efs:
            for rerank in reranks:
                emit(at(ef, rerank))
        del graph
    return 0


if __name__ == "__main__":
    sys.exit(main())
