"""What the search A/B benchmarks share: one set of templates, probes and exact answers, one
way to split them over graphs, and one way to measure a search function against them
(``projection_ab``, ``shard_ab``).

Templates and probes come from the search bench's generator (seed 0); recall@10 is measured
against exact search on 1,000 probes and single-probe p50/p99 over 2,000, after 50 untimed
searches; exact search's p50 (numpy float32, all cores) is the baseline.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hnswlib
import numpy as np
import numpy.typing as npt

from benchmarks.search_bench import (
    GENERATOR_CACHE,
    LATENCY_QUERIES,
    RECALL_QUERIES,
    WARMUP_QUERIES,
    K,
    draw_probes,
    exact_top,
    template_model,
)
from edgeid.runtime.gallery.index import DEFAULT_M, RANDOM_SEED

Floats = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]
# One probe's best K labels, best first.
Search = Callable[[Floats], Labels]
EXACT_PROBES = 50


@dataclass(frozen=True)
class Bench:
    gallery: Floats
    probes: Floats
    truth: Labels  # exact search's top K of the first RECALL_QUERIES probes

    @classmethod
    def drawn(cls, size: int, models: Path | None = None) -> Bench:
        home = Path(os.environ.get("EDGEID_HOME", "var"))
        model = template_model(None, models or home / "models", home / "cache" / GENERATOR_CACHE)
        rng = np.random.default_rng(0)
        gallery, _, centres = model.sample(size, rng)
        probes = draw_probes(model, centres, LATENCY_QUERIES, rng)[0]
        return cls(gallery, probes, exact_top(gallery, probes[:RECALL_QUERIES], K))

    def exact_p50_ms(self) -> float:
        seconds = []
        for probe in self.probes[:EXACT_PROBES]:
            started = time.perf_counter()
            scores = self.gallery @ probe
            np.argpartition(-scores, K)[:K]
            seconds.append(time.perf_counter() - started)
        return round(1000 * float(np.percentile(seconds, 50)), 3)

    def rescored(self, labels: Labels, probe: Floats, keep: int = K) -> Labels:
        """``labels`` re-scored exactly (float64) on the full templates, best ``keep`` first."""
        scores = self.gallery[labels].astype(np.float64) @ probe.astype(np.float64)
        best: Labels = labels[np.argsort(-scores)[:keep]]
        return best

    def measure(self, search: Search) -> dict[str, float]:
        """recall@10 against exact search and single-probe p50/p99 of ``search``."""
        for probe in self.probes[:WARMUP_QUERIES]:
            search(probe)
        hits = sum(
            len(set(search(p).tolist()) & set(t.tolist()))
            for p, t in zip(self.probes[:RECALL_QUERIES], self.truth, strict=True)
        )
        seconds = []
        for probe in self.probes[:LATENCY_QUERIES]:
            started = time.perf_counter()
            search(probe)
            seconds.append(time.perf_counter() - started)
        return {
            "recall_at_10": round(hits / (K * len(self.truth)), 4),
            "p50_ms": round(1000 * float(np.percentile(seconds, 50)), 3),
            "p99_ms": round(1000 * float(np.percentile(seconds, 99)), 3),
        }


def build_shards(
    rows: Floats, shards: int, ef_construction: int, m: int = DEFAULT_M, space: str = "cosine"
) -> list[hnswlib.Index]:
    """``shards`` graphs over ``rows``, as the product splits them: row i, labelled i, in graph
    i mod ``shards`` (built on every core)."""
    graphs = []
    for shard in range(shards):
        labels = np.arange(shard, len(rows), shards, dtype=np.int64)
        graph = hnswlib.Index(space=space, dim=rows.shape[1])
        graph.init_index(len(labels), M=m, ef_construction=ef_construction, random_seed=RANDOM_SEED)
        graph.add_items(rows[labels], labels, num_threads=-1)
        graphs.append(graph)
    return graphs


def emit(record: dict[str, object]) -> None:
    """One JSON line of figures, with the load it was measured under."""
    print(json.dumps({**record, "load_average_1m": round(os.getloadavg()[0], 2)}), flush=True)
