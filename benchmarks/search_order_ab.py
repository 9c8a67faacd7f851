"""A/B of the index's insertion order (issue 17 item 3): the graph's memory locality.

hnswlib stores element i of the graph (its links and its vector, ~780 bytes at M=32, dim 128)
at offset i * size, i being the insertion rank. Inserted in arrival order, a query's hops land
on random pages across the whole graph. Inserted in a locality-preserving order (each template
assigned to the nearest of ~sqrt(N) k-means centroids, the cells visited along a greedy tour of
their centroids, each cell sorted along the residuals' top principal direction), graph
neighbours tend to sit on nearby pages. Both indexes are built here from the same templates
and face ids, through ``GalleryIndex.build`` (the ordered one is handed the rows permuted), and
searched in the same process at the same ef, in alternating blocks of probes. Run it a second
time with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` to put hnswlib's arrays on transparent huge
pages (where the kernel's THP mode is ``madvise``), the other way to cut the TLB misses.

    python -m benchmarks.search_order_ab --size 100000 --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from benchmarks.search_bench import GENERATOR_CACHE, K, TemplateModel, draw_probes, exact_top
from edgeid.runtime.gallery.index import GalleryIndex, IndexParams
from edgeid.runtime.inference.pipeline import EMBEDDER_MODEL
from edgeid.runtime.inference.types import FloatArray

BLOCK = 200  # probes per timed block; the two indexes alternate blocks
# The order's k-means: a fixed seed, templates sampled per cell, Lloyd rounds over the sample.
ORDER_SEED = 100
ORDER_SAMPLE_PER_CELL = 32
ORDER_KMEANS_ROUNDS = 8
# Rows scored against the centroids at a time (bounds the score matrix).
ORDER_BLOCK = 65_536


def locality_order(vectors: FloatArray, *, seed: int = ORDER_SEED) -> npt.NDArray[np.int64]:
    """An insertion order of these templates (row numbers) that keeps similar ones together.

    hnswlib lays element i (links and vector) at offset i times its size, i being the insertion
    rank, and a search's hops go from a face to similar faces: inserted in this order they sit
    on nearby pages. Each template goes to the nearest of ~sqrt(N) k-means centroids (trained on
    a seeded sample), the cells follow a greedy nearest-centroid tour, and each cell is sorted
    along the top principal direction of the templates' offsets from their centroids."""
    matrix = np.asarray(vectors, dtype=np.float32)
    count = len(matrix)
    cells = max(1, round(math.sqrt(count)))
    if count <= 2:
        return np.arange(count, dtype=np.int64)
    rng = np.random.default_rng(seed)
    drawn = min(count, ORDER_SAMPLE_PER_CELL * cells)
    picked = np.sort(rng.choice(count, size=drawn, replace=False))
    sample = matrix[picked]
    centroids = sample[np.sort(rng.choice(len(sample), size=cells, replace=False))].copy()
    for _ in range(ORDER_KMEANS_ROUNDS):
        assigned = _nearest(sample, centroids)
        counts = np.bincount(assigned, minlength=cells)
        sums = np.zeros_like(centroids, dtype=np.float64)
        np.add.at(sums, assigned, sample)
        filled = counts > 0
        centroids[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
    cell = _nearest(matrix, centroids)
    offsets = (sample - centroids[_nearest(sample, centroids)]).astype(np.float64)
    direction = np.linalg.eigh(offsets.T @ offsets)[1][:, -1].astype(np.float32)
    along = matrix @ direction - (centroids @ direction)[cell]
    rank = np.empty(cells, dtype=np.int64)
    rank[_tour(centroids)] = np.arange(cells)
    return np.lexsort((along, rank[cell])).astype(np.int64)


def _nearest(rows: FloatArray, centroids: FloatArray) -> npt.NDArray[np.int64]:
    """The nearest centroid (Euclidean) of each row."""
    half_norms = 0.5 * np.einsum("ij,ij->i", centroids, centroids)
    out = np.empty(len(rows), dtype=np.int64)
    for start in range(0, len(rows), ORDER_BLOCK):
        scores = rows[start : start + ORDER_BLOCK] @ centroids.T - half_norms
        out[start : start + len(scores)] = np.argmax(scores, axis=1)
    return out


def _tour(centroids: FloatArray) -> list[int]:
    """A greedy nearest-neighbour tour of the centroids from the first one."""
    left = np.ones(len(centroids), dtype=bool)
    tour = [0]
    left[0] = False
    half_norms = 0.5 * np.einsum("ij,ij->i", centroids, centroids)
    for _ in range(len(centroids) - 1):
        scores = centroids @ centroids[tour[-1]] - half_norms
        scores[~left] = -np.inf
        nxt = int(np.argmax(scores))
        tour.append(nxt)
        left[nxt] = False
    return tour


def build(
    face_ids: list[str], gallery: FloatArray, params: IndexParams, order: npt.NDArray[np.int64]
) -> tuple[GalleryIndex, float]:
    """The index with the templates inserted in ``order`` (face ids follow their rows)."""
    started = time.perf_counter()
    ids = [face_ids[row] for row in order.tolist()]
    index = GalleryIndex.build(EMBEDDER_MODEL, ids, gallery[order], params)
    return index, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--ef", type=int, nargs="*", default=[200, 400])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    home = Path(os.environ.get("EDGEID_HOME", "var"))
    model = TemplateModel.load(home / "cache" / GENERATOR_CACHE)
    rng = np.random.default_rng(args.seed)
    gallery, _, centres = model.sample(args.size, rng)
    face_ids = [f"{row:032x}" for row in range(args.size)]
    params = IndexParams()

    started = time.perf_counter()
    order = locality_order(gallery)
    order_s = time.perf_counter() - started
    indexes = {}
    builds = {}
    arrival = np.arange(args.size, dtype=np.int64)
    for name, rows in (("arrival", arrival), ("locality", order)):
        indexes[name], builds[name] = build(face_ids, gallery, params, rows)

    count = 2000
    probes = draw_probes(model, centres, count, rng)[0]
    truth = exact_top(gallery, probes[:1000], K)

    results: dict[str, object] = {
        "size": args.size,
        "order_s": round(order_s, 2),
        "build_s": {k: round(v, 1) for k, v in builds.items()},
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "load_average_1m_start": round(os.getloadavg()[0], 2),
    }
    for ef in args.ef:
        row: dict[str, object] = {}
        for name, index in indexes.items():
            index.set_search_params(ef_search=ef, rerank=params.rerank)
            hits = 0
            for probe, expected in zip(probes[:1000], truth, strict=True):
                found = {int(c.face_id, 16) for c in index.search(probe, EMBEDDER_MODEL, K)}
                hits += len(found & set(expected.tolist()))
            row[f"{name}_recall_at_10"] = round(hits / (K * 1000), 4)
        latencies: dict[str, list[float]] = {name: [] for name in indexes}
        for index in indexes.values():  # warm both
            for probe in probes[:100]:
                index.search(probe, EMBEDDER_MODEL, K)
        for round_ in range(args.rounds):
            names = list(indexes) if round_ % 2 == 0 else list(reversed(indexes))
            start = (round_ * BLOCK) % count
            for name in names:
                index = indexes[name]
                for probe in probes[start : start + BLOCK]:
                    tick = time.perf_counter()
                    index.search(probe, EMBEDDER_MODEL, K)
                    latencies[name].append(time.perf_counter() - tick)
        for name, values in latencies.items():
            row[f"{name}_p50_ms"] = round(1000 * float(np.percentile(values, 50)), 3)
            row[f"{name}_p99_ms"] = round(1000 * float(np.percentile(values, 99)), 3)
        row["p50_speedup"] = round(
            float(np.percentile(latencies["arrival"], 50))
            / float(np.percentile(latencies["locality"], 50)),
            3,
        )
        results[f"ef_{ef}"] = row
    results["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    json.dump(results, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
