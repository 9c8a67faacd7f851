"""Does splitting the graph into one shard per core, searched side by side, search faster?

Exact search (the ratio's baseline) reads the gallery with numpy's BLAS on every core; one
hnswlib query walks one graph on one core. hnswlib's ``knn_query`` releases the GIL, so S graphs
of N/S faces each can be walked at once on S threads. Each shard is S times smaller, so a
narrower beam finds its share of the top 10; the merged top 10 is re-scored exactly (float64),
as the product's index does.

Over the same N templates (the search bench's generator, seed 0, the same probes), for every
combination of ``--m``, ``--ef-construction`` and ``--shards`` this builds the graphs (face i
in shard i mod S, every core) and, for each ef in ``--ef``, measures recall@10 against exact search
on 1,000 probes and single-probe p50/p99 over 2,000 (shard 0 on the calling thread, the others
on a persistent pool), one configuration after another in this process, with exact search's
p50 (numpy float32, all cores) as the baseline. One JSON line per figure. ``--one-thread-too``
also walks the shards one after another on the calling thread, as the product does below
``SIDE_BY_SIDE_MIN_FACES``.

    python -m benchmarks.shard_ab --size 1000000 --shards 1,2 --ef 200,250,300,350,450
    python -m benchmarks.shard_ab --size 1000000 --shards 2 --m 16,32 --ef 250,300,400,500
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hnswlib
import numpy as np

from benchmarks.graph_ab import Bench, Floats, Labels, Search, build_shards, emit
from benchmarks.search_bench import K
from edgeid.runtime.gallery.index import DEFAULT_EF_CONSTRUCTION, DEFAULT_M


def searcher(bench: Bench, graphs: list[hnswlib.Index], pool: ThreadPoolExecutor | None) -> Search:
    """One probe's exactly re-scored top K over every shard, the shards walked side by side
    (on ``pool``) or one after another on the calling thread (no pool)."""

    def walk(graph: hnswlib.Index, probe: Floats) -> Labels:
        found: Labels = graph.knn_query(probe, k=K, num_threads=1)[0][0].astype(np.int64)
        return found

    def search(probe: Floats) -> Labels:
        if pool is None:
            return bench.rescored(np.concatenate([walk(graph, probe) for graph in graphs]), probe)
        others = [pool.submit(walk, graph, probe) for graph in graphs[1:]]
        labels = np.concatenate([walk(graphs[0], probe), *(f.result() for f in others)])
        return bench.rescored(labels, probe)

    return search


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--shards", default="1,2", help="shard counts, comma-separated")
    parser.add_argument("--ef", default="250,350,450")
    parser.add_argument("--ef-construction", default=str(DEFAULT_EF_CONSTRUCTION))
    parser.add_argument("--m", default=str(DEFAULT_M), help="hnswlib M values, comma-separated")
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument(
        "--one-thread-too",
        action="store_true",
        help="also walk the shards one after another on the calling thread",
    )
    args = parser.parse_args()
    bench = Bench.drawn(args.size, args.models)
    shard_counts = [int(v) for v in args.shards.split(",")]
    emit({"size": args.size, "exact_p50_ms": bench.exact_p50_ms()})
    with ThreadPoolExecutor(max(shard_counts)) as pool:
        for m, ef_construction, shards in itertools.product(
            [int(v) for v in args.m.split(",")],
            [int(v) for v in args.ef_construction.split(",")],
            shard_counts,
        ):
            started = time.perf_counter()
            graphs = build_shards(bench.gallery, shards, ef_construction, m)
            build_s = round(time.perf_counter() - started, 1)
            walks: dict[str, ThreadPoolExecutor | None] = {"side_by_side": pool}
            if args.one_thread_too and shards > 1:
                walks["one_thread"] = None
            for ef in [int(v) for v in args.ef.split(",")]:
                for graph in graphs:
                    graph.set_ef(ef)
                for walk, walkers in walks.items():
                    figures = bench.measure(searcher(bench, graphs, walkers))
                    emit(
                        {
                            "shards": shards,
                            "walk": walk if shards > 1 else "one_thread",
                            "m": m,
                            "ef_construction": ef_construction,
                            "ef": ef,
                            "build_s": build_s,
                            **figures,
                        }
                    )
            del graphs
    emit({"exact_p50_ms_after": bench.exact_p50_ms()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
