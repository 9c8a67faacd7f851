"""Does an HNSW graph over fewer dimensions search faster? (issue 17 item 3; not adopted)

dlib_resnet_v1's last layer is a 256 -> 128 matrix with no bias whose numerical rank is 80, so
every template lies in one 80-dimensional subspace. This script prints that matrix's singular
values and the variance the LFW-fitted synthetic templates keep in their leading principal
axes, then builds, over the same N templates (the search bench's generator, seed 0):

- ``base``: graphs as the product builds them (128-d cosine, M=32, ``--ef-construction``,
  the product's 400 unless given; the first runs used 200);
- ``pcaD`` for each D in ``--axes``: hnswlib over the templates' first D principal
  coordinates (Euclidean: on unit templates it ranks as cosine does), asking for R candidates
  and re-scoring them exactly on the full templates.

Each layout is split over ``--shards`` graphs (face i in graph i mod shards; the product's
default is 2), the first walked on the calling thread and the others handed to the product's
walker threads, their candidates re-scored together.

For each ef in ``--ef`` (and R in ``--rerank`` for the projected graphs) it measures recall@10
against exact search on 1,000 probes and single-probe p50/p99 over 2,000, one after another in
this process, and exact search's p50 (numpy float32, all cores) as the baseline.

    python -m benchmarks.projection_ab --size 1000000 --axes 48,64,80 --ef 250,350,450
    python -m benchmarks.projection_ab --size 1000000 --shards 2 --axes 64 --ef 200,250,300
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hnswlib
import numpy as np
import onnx
from onnx import numpy_helper

from benchmarks.graph_ab import Bench, Floats, Labels, Search, build_shards, emit
from benchmarks.search_bench import K
from edgeid.runtime.gallery import walkers
from edgeid.runtime.gallery.index import DEFAULT_EF_CONSTRUCTION
from edgeid.runtime.inference.pipeline import EMBEDDER_MODEL

FIT_SAMPLE = 50_000
Graphs = list[hnswlib.Index]


def last_layer_spectrum(models: Path) -> list[float]:
    """Singular values of the embedder's final fully connected matrix, over the largest."""
    graph = onnx.load(str(models / f"{EMBEDDER_MODEL}.onnx")).graph
    matrices = [numpy_helper.to_array(i) for i in graph.initializer if len(i.dims) == 2]
    values = np.linalg.svd(matrices[-1].astype(np.float64), compute_uv=False)
    return [float(v) for v in values / values[0]]


def built(space: str, rows: Floats, name: str, shards: int, ef_construction: int) -> Graphs:
    """``shards`` graphs over ``rows`` (``graph_ab.build_shards``), their build time printed."""
    started = time.perf_counter()
    graphs = build_shards(rows, shards, ef_construction, space=space)
    emit({"graph": name, "shards": shards, "build_s": round(time.perf_counter() - started, 1)})
    return graphs


def graph_search(
    bench: Bench,
    graphs: Graphs,
    *,
    rerank: int = K,
    project: Callable[[Floats], Floats] | None = None,
) -> Search:
    """``rerank`` candidates from each graph (walked on the projected probe; the other graphs
    handed to the product's walker threads), re-scored exactly on the full templates."""
    first, *others = graphs
    wanted = max(K, rerank)

    def search(probe: Floats) -> Labels:
        query = probe if project is None else project(probe)
        walks = [walkers.hand_over(graph, query, wanted) for graph in others]
        found = [walkers.knn(first, query, wanted)[0], *(w.result()[0] for w in walks)]
        return bench.rescored(np.concatenate(found).astype(np.int64), probe)

    return search


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--axes", default="64,80", help="projected dimensions, comma-separated")
    parser.add_argument("--ef", default="250,350,450")
    parser.add_argument("--rerank", default="10,40", help="candidates re-scored (projected)")
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument(
        "--shards", type=int, default=1, help="graphs per layout, walked side by side"
    )
    parser.add_argument("--ef-construction", type=int, default=DEFAULT_EF_CONSTRUCTION)
    args = parser.parse_args()
    graph_options = {"shards": args.shards, "ef_construction": args.ef_construction}
    models = args.models or Path(os.environ.get("EDGEID_HOME", "var")) / "models"
    efs = [int(v) for v in args.ef.split(",")]
    reranks = [int(v) for v in args.rerank.split(",")]

    bench = Bench.drawn(args.size, models)
    gallery = bench.gallery
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
    emit({"exact_p50_ms": bench.exact_p50_ms()})

    base = built("cosine", gallery, "base", **graph_options)

    for ef in efs:
        for graph in base:
            graph.set_ef(ef)
        emit({"graph": "base", "ef": ef, "rerank": K, **bench.measure(graph_search(bench, base))})

    for axes in [int(v) for v in args.axes.split(",")]:
        basis = vectors[:, order[:axes]].astype(np.float32)
        centre = mean.astype(np.float32)
        graphs = built("l2", (gallery - centre) @ basis, f"pca{axes}", **graph_options)

        def project(probe: Floats, basis: Floats = basis, centre: Floats = centre) -> Floats:
            return np.asarray((probe - centre) @ basis, dtype=np.float32)

        for ef in efs:
            for rerank in reranks:
                for graph in graphs:
                    graph.set_ef(max(ef, rerank))
                search = graph_search(bench, graphs, rerank=rerank, project=project)
                figures = bench.measure(search)
                emit({"graph": f"pca{axes}", "ef": ef, "rerank": rerank, **figures})
        del graphs
    return 0


if __name__ == "__main__":
    sys.exit(main())
