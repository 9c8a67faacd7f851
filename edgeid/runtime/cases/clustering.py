"""Clustering a case's faces: the same person across many files.

Faces are linked when their templates' cosine similarity reaches the calibrated threshold
(``edgeid/runtime/gallery/thresholds.py``) at a stated false-match rate; only each face's nearest
neighbours are looked at, so memory grows with the number of faces, not its square.

Three methods, compared on LFW beside dlib's ``chinese_whispers_clustering`` in
``benchmarks/cluster_bench.py``:

- **Average linkage** (the default, chosen by that measurement): clusters merge, best pair
  first, while their mean pairwise similarity reaches the threshold. Two people joined by a
  few look-alike pairs stay apart because the mean over all their pairs stays low.
- **Chinese whispers** (Biemann 2006; dlib's ``chinese_whispers``): each face repeatedly takes
  the label carrying the most edge weight among its neighbours. At lenient thresholds a chain
  of false links pulls people together.
- **Connected components** of the graph (single linkage at the threshold): one false link
  merges two people. The baseline.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Literal

import hnswlib
import numpy as np
import numpy.typing as npt

from edgeid.runtime.errors import BadInputError

Method = Literal["average_linkage", "chinese_whispers", "connected_components"]
METHODS: tuple[Method, ...] = ("average_linkage", "chinese_whispers", "connected_components")
# On LFW dev (1,549 faces, 963 people) average linkage at the FMR 1e-4 threshold had the best
# pairwise F1 (0.89) and BCubed F1 (0.96) of the three and of dlib's Chinese whispers.
DEFAULT_METHOD: Method = "average_linkage"
Labels = npt.NDArray[np.int64]
Vectors = npt.NDArray[np.float32]

# Nearest neighbours kept per face. A person seen in hundreds of files is still one connected
# cluster through 30 links each, and 30 bounds the graph at 30 edges per face.
MAX_NEIGHBOURS = 30
# Up to this many faces the neighbours are found exactly (blocked matrix products: 20,000
# faces take a few seconds on 2 cores); above it hnswlib finds them approximately.
EXACT_NEIGHBOURS_LIMIT = 20_000
# Rows per block of the exact similarity matrix: 512 x 20,000 float32 is 40 MB.
EXACT_BLOCK_ROWS = 512
# hnswlib parameters for the approximate neighbour graph: recall of true neighbours above the
# threshold stays near 1 at these values (tests/test_cluster.py checks it against exact).
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 200
# Chinese whispers passes over every face; it stops earlier once a pass changes nothing
# (dlib uses 100 passes; LFW converges within 10).
WHISPER_PASSES = 100
# Fixed seed: the same faces give the same clusters on every run and every box.
WHISPER_SEED = 0
# The dense check of average linkage holds an n x n float32 matrix: small sets only.
AVERAGE_LINKAGE_LIMIT = 8_000


@dataclass(frozen=True)
class NeighbourGraph:
    """Symmetric weighted graph in CSR form: node i's neighbours are
    ``indices[indptr[i]:indptr[i + 1]]`` with cosine similarities ``weights[...]``, all at or
    above the threshold; no self-loops."""

    size: int
    indptr: npt.NDArray[np.int64]
    indices: npt.NDArray[np.int64]
    weights: npt.NDArray[np.float32]

    @property
    def edges(self) -> int:
        return int(len(self.indices) // 2)


def _check(embeddings: Vectors) -> Vectors:
    vectors = np.asarray(embeddings, dtype=np.float32)
    if vectors.ndim != 2:
        raise BadInputError("embeddings must be a matrix: one template per row")
    if len(vectors) and not np.all(np.isfinite(vectors)):
        raise BadInputError("embeddings hold a non-finite value")
    return vectors


def _exact_pairs(
    vectors: Vectors, threshold: float, k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    rows: list[npt.NDArray[np.int64]] = []
    cols: list[npt.NDArray[np.int64]] = []
    sims: list[npt.NDArray[np.float32]] = []
    n = len(vectors)
    for start in range(0, n, EXACT_BLOCK_ROWS):
        block = vectors[start : start + EXACT_BLOCK_ROWS] @ vectors.T
        local = np.arange(len(block))
        block[local, start + local] = -np.inf  # no self-loops
        if n - 1 > k:
            top = np.argpartition(-block, k, axis=1)[:, :k]
        else:
            top = np.broadcast_to(np.arange(n), (len(block), n))
        values = np.take_along_axis(block, top, axis=1)
        keep = values >= threshold
        rows.append((start + np.nonzero(keep)[0]).astype(np.int64))
        cols.append(top[keep].astype(np.int64))
        sims.append(values[keep].astype(np.float32))
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(sims)


def _approximate_pairs(
    vectors: Vectors, threshold: float, k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    n, dim = vectors.shape
    index = hnswlib.Index(space="ip", dim=dim)
    index.init_index(max_elements=n, M=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION, random_seed=1)
    index.add_items(vectors, np.arange(n))
    index.set_ef(max(HNSW_EF_SEARCH, k + 1))
    labels, distances = index.knn_query(vectors, k=min(k + 1, n))
    sims = (1.0 - distances).astype(np.float32)  # hnswlib's "ip" distance is 1 - dot
    rows = np.repeat(np.arange(n, dtype=np.int64), labels.shape[1]).reshape(labels.shape)
    keep = (sims >= threshold) & (labels != rows)
    return rows[keep], labels[keep].astype(np.int64), sims[keep]


def neighbour_graph(
    embeddings: Vectors,
    threshold: float,
    *,
    max_neighbours: int = MAX_NEIGHBOURS,
    exact_limit: int = EXACT_NEIGHBOURS_LIMIT,
) -> NeighbourGraph:
    """Each face linked to its nearest ``max_neighbours`` faces at or above ``threshold``
    (made symmetric: a link found from either end is kept)."""
    vectors = _check(embeddings)
    n = len(vectors)
    if n < 2:
        return NeighbourGraph(
            n, np.zeros(n + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        )
    k = max(1, min(max_neighbours, n - 1))
    find = _exact_pairs if n <= exact_limit else _approximate_pairs
    rows, cols, sims = find(vectors, threshold, k)
    both_rows = np.concatenate([rows, cols])
    both_cols = np.concatenate([cols, rows])
    both_sims = np.concatenate([sims, sims])
    keys, first = np.unique(both_rows * n + both_cols, return_index=True)
    src, dst = keys // n, keys % n
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.add.at(indptr, src + 1, 1)
    return NeighbourGraph(n, np.cumsum(indptr), dst.astype(np.int64), both_sims[first])


def chinese_whispers(
    graph: NeighbourGraph,
    *,
    passes: int = WHISPER_PASSES,
    seed: int = WHISPER_SEED,
    weighted: bool = True,
    self_loops: bool = False,
) -> Labels:
    """Labels by Chinese whispers: faces in random order take the label with the most edge
    weight among their neighbours (``weighted=False``: the most neighbours). ``self_loops``
    counts a face's own label with weight 1, as dlib's ``chinese_whispers_clustering`` does."""
    n = graph.size
    labels = list(range(n))
    neighbours = [graph.indices[graph.indptr[i] : graph.indptr[i + 1]].tolist() for i in range(n)]
    if weighted:
        weights = [graph.weights[graph.indptr[i] : graph.indptr[i + 1]].tolist() for i in range(n)]
    else:
        weights = [[1.0] * len(nbrs) for nbrs in neighbours]
    rng = np.random.default_rng(seed)
    for _ in range(passes):
        changed = False
        for node in rng.permutation(n).tolist():
            nbrs = neighbours[node]
            if not nbrs:
                continue
            mine = labels[node]
            totals: dict[int, float] = {}
            for other, weight in zip(nbrs, weights[node], strict=True):
                label = labels[other]
                totals[label] = totals.get(label, 0.0) + weight
            if self_loops:
                totals[mine] = totals.get(mine, 0.0) + 1.0
            # Ties go to the smallest label, as in dlib: deterministic, and it lets a pair of
            # faces agree on one label instead of swapping forever.
            best = min(totals, key=lambda label: (-totals[label], label))
            if best != mine:
                labels[node] = best
                changed = True
        if not changed:
            break
    return _renumber(np.asarray(labels, dtype=np.int64))


def connected_components(graph: NeighbourGraph) -> Labels:
    """Labels of the graph's connected components (union-find with path halving)."""
    parent = list(range(graph.size))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for node in range(graph.size):
        for other in graph.indices[graph.indptr[node] : graph.indptr[node + 1]].tolist():
            a, b = root(node), root(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return _renumber(np.asarray([root(i) for i in range(graph.size)], dtype=np.int64))


def average_linkage(
    embeddings: Vectors, threshold: float, *, max_neighbours: int = MAX_NEIGHBOURS
) -> Labels:
    """Agglomerative clustering with average linkage, stopped when no two clusters' mean
    pairwise cosine similarity reaches ``threshold``; memory linear in the number of faces.

    Two facts make it cheap. For unit vectors the mean similarity over every pair across
    clusters A and B is the dot product of their mean vectors, so a cluster is its vector sum
    and size, never a row of a matrix. And a mean at or above the threshold needs at least one
    pair at or above it, so only clusters linked in the neighbour graph are ever compared.
    ``average_linkage_dense`` is the textbook version; tests check the two agree.
    """
    vectors = _check(embeddings)
    graph = neighbour_graph(vectors, threshold, max_neighbours=max_neighbours)
    n = graph.size
    sums = vectors.astype(np.float64).copy()
    sizes = np.ones(n, dtype=np.float64)
    version = [0] * n
    parent = list(range(n))
    links: list[set[int]] = [
        set(graph.indices[graph.indptr[i] : graph.indptr[i + 1]].tolist()) for i in range(n)
    ]
    heap: list[tuple[float, int, int, int, int]] = []

    def offer(a: int, others: list[int]) -> None:
        if not others:
            return
        means = sums[others] / sizes[others, None]
        scores = means @ (sums[a] / sizes[a])
        for other, score in zip(others, scores.tolist(), strict=True):
            if score >= threshold:
                x, y = min(a, other), max(a, other)
                heapq.heappush(heap, (-score, x, y, version[x], version[y]))

    for node in range(n):
        offer(node, [other for other in links[node] if other > node])
    while heap:
        _, a, b, va, vb = heapq.heappop(heap)
        if parent[a] != a or parent[b] != b or version[a] != va or version[b] != vb:
            continue  # one side has merged since this pair was scored
        keep, gone = (a, b) if len(links[a]) >= len(links[b]) else (b, a)
        parent[gone] = keep
        sums[keep] += sums[gone]
        sizes[keep] += sizes[gone]
        version[keep] += 1
        for other in links[gone]:
            links[other].discard(gone)
            if other != keep:
                links[other].add(keep)
                links[keep].add(other)
        links[keep].discard(gone)
        links[gone] = set()
        offer(keep, sorted(links[keep]))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    return _renumber(np.asarray([root(i) for i in range(n)], dtype=np.int64))


def average_linkage_dense(embeddings: Vectors, threshold: float) -> Labels:
    """Textbook average linkage over the full similarity matrix: O(n^2) memory. For checking
    ``average_linkage`` on small sets only."""
    vectors = _check(embeddings)
    n = len(vectors)
    if n > AVERAGE_LINKAGE_LIMIT:
        raise BadInputError(
            f"dense average linkage holds an n x n matrix; {n} faces is over its "
            f"{AVERAGE_LINKAGE_LIMIT}-face limit"
        )
    if n < 2:
        return np.zeros(n, dtype=np.int64)
    sims = (vectors.astype(np.float64) @ vectors.T.astype(np.float64)).astype(np.float32)
    np.fill_diagonal(sims, -np.inf)
    sizes = np.ones(n, dtype=np.float64)
    labels = np.arange(n, dtype=np.int64)
    best_col = np.argmax(sims, axis=1)
    best = sims[np.arange(n), best_col]
    while True:
        a = int(np.argmax(best))
        if not best[a] >= threshold:
            break
        b = int(best_col[a])
        merged = (sizes[a] * sims[a] + sizes[b] * sims[b]) / (sizes[a] + sizes[b])
        sims[a], sims[:, a] = merged, merged
        sims[b], sims[:, b] = -np.inf, -np.inf
        sims[a, a] = -np.inf
        sizes[a] += sizes[b]
        labels[labels == b] = a
        best[b] = -np.inf
        # Only columns a and b changed: rows whose best was there are looked at again; any
        # other row's best can only have been overtaken by the merged column a.
        stale = (best_col == a) | (best_col == b)
        stale[a], stale[b] = True, False
        rows = np.nonzero(stale)[0]
        best_col[rows] = np.argmax(sims[rows], axis=1)
        best[rows] = sims[rows, best_col[rows]]
        rose = ~stale & (sims[:, a] > best)
        rose[b] = False
        best_col[rose], best[rose] = a, sims[rose, a]
    return _renumber(labels)


def cluster(
    embeddings: Vectors,
    threshold: float,
    method: Method = DEFAULT_METHOD,
    *,
    max_neighbours: int = MAX_NEIGHBOURS,
) -> Labels:
    """One label per face (0, 1, 2, ... in order of first appearance)."""
    if method == "average_linkage":
        return average_linkage(embeddings, threshold, max_neighbours=max_neighbours)
    graph = neighbour_graph(embeddings, threshold, max_neighbours=max_neighbours)
    if method == "connected_components":
        return connected_components(graph)
    if method == "chinese_whispers":
        return chinese_whispers(graph)
    raise BadInputError(f"unknown clustering method {method!r}; use one of {', '.join(METHODS)}")


def groups(labels: Labels) -> list[list[int]]:
    """Member indices per cluster, largest cluster first (ties: earliest member first)."""
    by_label: dict[int, list[int]] = {}
    for index, label in enumerate(labels.tolist()):
        by_label.setdefault(label, []).append(index)
    return sorted(by_label.values(), key=lambda members: (-len(members), members[0]))


def _renumber(labels: Labels) -> Labels:
    """Labels 0, 1, 2, ... in order of first appearance (stable across equivalent runs)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inverse].astype(np.int64)
