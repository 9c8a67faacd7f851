"""What does a search cost beyond walking its graphs? (issue 17 item 3)

Builds the product's index (``GalleryIndex.build``, default parameters: two graphs) over N
templates from the search bench's generator, then times, in one process over the same probes,
in alternating blocks so that load moves all of them alike:

- ``walks_future``: the index's two graphs walked side by side, the second on a
  ``ThreadPoolExecutor`` and waited for through its ``Future`` (the hand-over before this
  script), nothing else;
- ``walks``: the same walks, the second handed over as the product hands it
  (``walkers.hand_over``: a ``SimpleQueue`` and a plain lock);
- ``search``: ``GalleryIndex.search`` (probe checks, lock, both walks, merge by score, result
  objects).

It prints p50/p99 of each and ``search``'s p50 over ``walks``'s: the product's own overhead.

    python -m benchmarks.search_overhead --size 100000
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from benchmarks.graph_ab import Bench, Floats, emit
from benchmarks.search_bench import WARMUP_QUERIES, K
from edgeid.runtime.gallery import walkers
from edgeid.runtime.gallery.index import GalleryIndex
from edgeid.runtime.inference.pipeline import EMBEDDER_MODEL

BLOCK = 200  # probes per block; the variants take turns block by block


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=100_000, help="faces in the gallery")
    parser.add_argument("--rounds", type=int, default=10, help="blocks per variant")
    args = parser.parse_args()

    bench = Bench.drawn(args.size)
    face_ids = [f"{row:032x}" for row in range(args.size)]
    started = time.perf_counter()
    index = GalleryIndex.build(EMBEDDER_MODEL, face_ids, bench.gallery)
    build_s = time.perf_counter() - started
    first, second = index._graphs  # the default two graphs
    pool = ThreadPoolExecutor(1)

    def walks_future(probe: Floats) -> None:
        other = pool.submit(walkers.knn, second, probe, K)
        walkers.knn(first, probe, K)
        other.result()

    def walks(probe: Floats) -> None:
        other = walkers.hand_over(second, probe, K)
        walkers.knn(first, probe, K)
        other.result()

    def search(probe: Floats) -> None:
        index.search(probe, EMBEDDER_MODEL, K)

    variants: dict[str, Callable[[Floats], None]] = {
        "walks_future": walks_future,
        "walks": walks,
        "search": search,
    }
    for variant in variants.values():
        for probe in bench.probes[:WARMUP_QUERIES]:
            variant(probe)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for turn in range(args.rounds):
        block = bench.probes[(turn * BLOCK) % len(bench.probes) :][:BLOCK]
        for name, variant in variants.items():
            for probe in block:
                tick = time.perf_counter()
                variant(probe)
                seconds[name].append(time.perf_counter() - tick)
    p50 = {name: 1000 * float(np.percentile(s, 50)) for name, s in seconds.items()}
    emit(
        {
            "size": args.size,
            "build_s": round(build_s, 1),
            "probes_per_variant": len(seconds["search"]),
            **{f"{name}_p50_ms": round(value, 3) for name, value in p50.items()},
            **{
                f"{name}_p99_ms": round(1000 * float(np.percentile(s, 99)), 3)
                for name, s in seconds.items()
            },
            "future_over_walks_p50": round(p50["walks_future"] / p50["walks"], 3),
            "search_over_walks_p50": round(p50["search"] / p50["walks"], 3),
            "search_minus_walks_p50_ms": round(p50["search"] - p50["walks"], 3),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
