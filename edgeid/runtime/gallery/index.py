"""The search index of one gallery and one embedding model: hnswlib, with exact re-rank.

- **Space**: cosine over unit-length templates; scores are cosine similarities (1 = identical).
- **Faces** are named by the store's face ids (strings); hnswlib's integer labels stay inside.
  A live face cannot be added twice; a deleted one may be added again.
- **Graphs**: the faces are split over ``shards`` hnswlib graphs (face label L in graph L mod
  shards). One query walks one graph on one core while exact search reads every template on
  every core, so a large gallery's graphs are walked side by side, one thread each.
- **Search** asks each graph for ``max(k, rerank)`` candidates and returns the best ``k`` of
  them all by hnswlib's own cosine (float32, within 1e-6 of ``verify``'s float64 score; ties
  go to the face added first).
- **Delete** marks the element deleted (hnswlib skips it in results); once deleted elements
  reach ``DELETE_REBUILD_FRACTION`` of the index, or on ``compact()``, the index is rebuilt from
  the live vectors, so a deleted template's bytes leave memory and the next persisted index.
- **Models**: an index holds one model's templates; adding or querying with another model id
  raises ``ModelMismatchError`` (a probe and a gallery embedded by two models are incomparable).
- **Persistence**: ``seal_with(seal)`` serialises the index in memory (each graph's hnswlib
  state arrays, see ``hnsw_state``) and hands the plaintext to the store's ``seal``;
  ``load_or_rebuild`` passes the sealed bytes through the store's ``open_`` (authentication)
  **before** any byte reaches hnswlib, and rebuilds from the store's vectors when the index is
  missing, fails authentication or does not match. Indexes sealed in formats 1 (hnswlib's
  file bytes, loaded through a memfd or a 0700 private file overwritten before it is unlinked)
  and 2 (one graph's state) still open as one graph, walked with a beam as much wider as it
  holds more faces, and are split at their next compaction.

Thread-safe by one lock that serialises every call (a search holds it for about a millisecond;
the threads walking its other graphs only read them, and are waited for before it returns).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np
import numpy.typing as npt

from edgeid.runtime.errors import BadInputError
from edgeid.runtime.gallery import hnsw_state, walkers
from edgeid.runtime.gallery.errors import GalleryError
from edgeid.runtime.inference.types import FloatArray

logger = logging.getLogger(__name__)

Sealer = Callable[[bytes], bytes]
Opener = Callable[[bytes], bytes]
# The store's live faces of one model: their ids and templates (one row each).
VectorSource = Callable[[], tuple[Sequence[str], FloatArray]]
Labels = npt.NDArray[np.int64]
# A candidate as (negated cosine score, hnswlib label): sorted ascending, best score first and
# ties to the face added first.
Ranked = tuple[float, int]

SPACE = "cosine"
# Graph degree: face templates are hard for HNSW (non-mated pairs score 0.66-0.97, little
# contrast). At 100k, M=16 needed ef 500 (1.5 ms) for the recall@10 that M=32 gets at ef 300;
# M=48 and 64 gained little more for 130-260 more bytes a face.
DEFAULT_M = 32
# Graphs an index is split into. At 1M faces on 2 cores (``benchmarks/shard_ab.py``, one
# process, the same templates and probes): one graph (ef_construction 200) needed ef 450 for
# recall@10 0.992 at 1.99 ms p50; two graphs of 500k walked side by side, ef 300 each, gave
# 0.993 at 1.78 ms, and 0.994 at 1.46 ms when built with ef_construction 400.
DEFAULT_SHARDS = 2
MAX_SHARDS = 16
# Below this many live faces the graphs are walked one after another on the calling thread:
# handing a walk to another thread costs up to 0.15 ms here, more than a tiny graph's walk. At
# ef 300 (shard_ab --one-thread-too, p50 side by side / one thread): 10k 0.49 / 0.66 ms, 30k
# 0.60 / 0.65 ms, 100k 0.85 / 1.47 ms.
SIDE_BY_SIDE_MIN_FACES = 10_000
# Build-time beam: a better-linked graph needs a narrower query beam. At 1M, two graphs built
# with 400 reached recall@10 0.9941 at ef 300 where 200 reached 0.9928 (shard_ab); building
# takes about 1.75x as long (762 s against 434 s for 1M faces on 2 cores).
DEFAULT_EF_CONSTRUCTION = 400
# Query-time beam of each graph: recall falls as the gallery grows. At 1M in two graphs
# (ef_construction 400): ef 250 gave recall@10 0.9904, 300 gave 0.9941 (p99 2.4 ms), 350 gave
# 0.9953; 300 leaves margin above the 0.99 goal. (One graph needed 450 for 0.992.)
DEFAULT_EF_SEARCH = 300
# Fewest candidates asked of each graph. They are not re-scored: hnswlib keeps full float32
# vectors and scores them exactly in float32, so a float64 re-score only moved rounding ties,
# and fetching the vectors back (``get_items``) cost about 0.2 ms a search at two graphs.
DEFAULT_RERANK = 10
# Deleted elements still route graph searches; past a fifth of the graph, searches lengthen and
# erased templates linger, so the index is rebuilt without them.
DELETE_REBUILD_FRACTION = 0.2
# Smallest capacity allocated; capacity doubles when full (hnswlib resizes by copying).
MIN_CAPACITY = 1024
# Fixed level-assignment seed: the same adds in the same order build the same graph.
RANDOM_SEED = 100
# Longest face id accepted: the store's are 32 hex digits; this bounds the header's size.
MAX_FACE_ID = 128
# A template whose norm differs from 1 by more than this was not L2-normalised by the embedder.
UNIT_NORM_TOLERANCE = 1e-3
# Most candidates one search may ask for: a ranked list past this is not reviewed by anyone.
MAX_K = 1000

# Serialised form (the plaintext handed to ``seal``): magic, header length, header JSON, face-id
# section length, the face ids (UTF-8, one per line, in label order), then the graphs. Format 3
# (written): the header lists each graph's hnswlib state numbers and array lengths, and the
# graph section is their state arrays (``hnsw_state``), one graph after another, each loaded by
# one copy. Read only: format 2, one graph's state the same way; format 1, hnswlib's file bytes,
# loaded by ``load_index`` through a scratch file (at 1M faces a whole open took 4.5-7.8 s in
# format 1 and 1.6-2.2 s in format 2: ``benchmarks/index_open_steps.py``).
# The format number changes when this layout does.
_MAGIC = b"EDGEIDX\x00"
_FORMAT = 3
_ONE_STATE_FORMAT = 2
_FILE_BYTES_FORMAT = 1
_HEADER_LENGTH = struct.Struct(">I")
_IDS_LENGTH = struct.Struct(">Q")
# A header longer than this is not one of ours: its one variable part, the deleted labels, is
# bounded by DELETE_REBUILD_FRACTION (~8 bytes a deleted face).
_MAX_HEADER_BYTES = 1 << 30


class GalleryIndexError(GalleryError):
    """Base of the search index's errors."""


class ModelMismatchError(GalleryIndexError, BadInputError):
    """A template of one embedding model met an index of another."""


class IndexDamagedError(GalleryIndexError):
    """A persisted index failed authentication or its structure checks; rebuild it."""


class UnknownFaceError(GalleryIndexError, BadInputError):
    """No live face with that id in the index."""


class DuplicateFaceError(GalleryIndexError, BadInputError):
    """A face id added to the index is already live in it."""


@dataclass(frozen=True)
class IndexParams:
    """hnswlib's parameters; see the DEFAULT_* constants for why each value."""

    m: int = DEFAULT_M
    ef_construction: int = DEFAULT_EF_CONSTRUCTION
    ef_search: int = DEFAULT_EF_SEARCH
    rerank: int = DEFAULT_RERANK
    build_threads: int = -1  # -1: every core (building is the one batch job here)
    shards: int = DEFAULT_SHARDS

    def __post_init__(self) -> None:
        if self.m < 2 or self.ef_construction < 1 or self.ef_search < 1 or self.rerank < 1:
            raise ValueError(f"invalid index parameters {self}")
        if not 1 <= self.shards <= MAX_SHARDS:
            raise ValueError(f"an index is split into 1 to {MAX_SHARDS} graphs, not {self.shards}")


@dataclass(frozen=True, slots=True)
class Candidate:
    """A face of the gallery and its exact cosine similarity to the probe."""

    face_id: str
    score: float


@dataclass(frozen=True)
class LoadResult:
    index: GalleryIndex
    rebuilt: bool
    reason: str | None  # why it was rebuilt: "missing", "damaged", "model changed", ...


class GalleryIndex:
    """An HNSW index over one gallery's templates of one model (see the module docstring)."""

    def __init__(
        self,
        model_id: str,
        dim: int,
        params: IndexParams | None = None,
        *,
        capacity: int = MIN_CAPACITY,
        graphs: list[Any] | None = None,
    ) -> None:
        """``graphs``: hnswlib graphs already holding faces (an opened index), else empty
        ones with room for ``capacity`` faces."""
        if not model_id or dim < 1:
            raise ValueError("an index needs a model id and a dimension")
        self.model_id = model_id
        self.dim = dim
        self.params = params or IndexParams()
        self._lock = threading.RLock()
        # hnswlib's label of a face is its position here; a label's face id never changes
        # until compaction renumbers the live faces.
        self._ids: list[str] = []
        self._label_of: dict[str, int] | None = {}  # built on first use after a load
        self._deleted: set[int] = set()
        if graphs is None:
            graphs = self._new_graphs(capacity)
        else:
            self._set_beam(graphs)
        self._graphs = graphs

    # -- building ------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model_id: str,
        face_ids: Sequence[str],
        vectors: FloatArray,
        params: IndexParams | None = None,
    ) -> GalleryIndex:
        """A new index holding these templates (row i is the template of ``face_ids[i]``)."""
        matrix = np.asarray(vectors, dtype=np.float32)
        dim = matrix.shape[1] if matrix.ndim == 2 else 0
        index = cls(model_id, dim, params, capacity=len(matrix))
        index.add(face_ids, matrix, model_id)
        return index

    def _new_graphs(self, capacity: int) -> list[Any]:
        """``params.shards`` empty graphs with room for ``capacity`` faces between them."""
        graphs = []
        for _ in range(self.params.shards):
            hnsw = hnswlib.Index(space=SPACE, dim=self.dim)
            hnsw.init_index(
                max_elements=max(-(-capacity // self.params.shards), MIN_CAPACITY),
                M=self.params.m,
                ef_construction=self.params.ef_construction,
                random_seed=RANDOM_SEED,
            )
            graphs.append(hnsw)
        self._set_beam(graphs)
        return graphs

    def _set_beam(self, graphs: list[Any]) -> None:
        """Each graph's query beam: ``ef_search``, widened for an index opened with fewer
        graphs than ``shards`` (each then holds as many more faces)."""
        widest = max(self.params.ef_search, self.params.rerank)
        for graph in graphs:
            graph.set_ef(-(-widest * self.params.shards // len(graphs)))

    def _insert(
        self, graphs: list[Any], labels: Labels, matrix: FloatArray, first_new: int
    ) -> None:
        """Rows of ``matrix`` into the graphs of their labels; labels below ``first_new`` are
        deleted ones added again (they take their old slot back, hnswlib replaces the vector)."""
        for graph, rows in _rows_by_graph(labels, graphs):
            fresh = int(np.count_nonzero(labels[rows] >= first_new))
            needed = int(graph.get_current_count()) + fresh
            capacity = int(graph.get_max_elements())
            if needed > capacity:
                graph.resize_index(max(needed, 2 * capacity))
            graph.add_items(matrix[rows], labels[rows], num_threads=self.params.build_threads)

    def add(self, face_ids: Sequence[str], vectors: FloatArray, model_id: str) -> None:
        """Insert templates of ``model_id`` for new faces (or faces deleted earlier)."""
        self._check_model(model_id, "add templates of")
        ids = _face_ids(face_ids)
        matrix = self._templates(vectors, len(ids))
        if len(set(ids)) != len(ids):
            raise DuplicateFaceError("the same face id appears twice in one add")
        if not ids:
            return
        with self._lock:
            labels = np.empty(len(ids), dtype=np.int64)
            fresh: list[str] = []
            for row, face_id in enumerate(ids):
                label = self._labels_by_id().get(face_id)
                if label is None:
                    label = len(self._ids) + len(fresh)
                    fresh.append(face_id)
                elif label not in self._deleted:
                    raise DuplicateFaceError(f"face {face_id} is already in the index")
                labels[row] = label
            self._insert(self._graphs, labels, matrix, first_new=len(self._ids))
            for face_id in fresh:
                self._labels_by_id()[face_id] = len(self._ids)
                self._ids.append(face_id)
            self._deleted.difference_update(labels.tolist())

    def delete(self, face_ids: Sequence[str], *, compact_when_due: bool = True) -> bool:
        """Mark faces deleted; rebuild when deleted elements pass the threshold (returns True).

        Until the rebuild a deleted template stays in the graph's memory (never in results):
        call ``compact()`` where it must be gone now (subject erasure)."""
        ids = _face_ids(face_ids)
        with self._lock:
            labels = [self._live_label(face_id) for face_id in ids]
            for label in labels:
                self._graphs[label % len(self._graphs)].mark_deleted(label)
                self._deleted.add(label)
            due = len(self._deleted) >= DELETE_REBUILD_FRACTION * max(len(self._ids), 1)
            if compact_when_due and due:
                self.compact()
                return True
            return False

    def compact(self) -> None:
        """Rebuild the graph from the live templates only: deleted ones leave memory."""
        with self._lock:
            if not self._deleted:
                return
            live = np.asarray(
                [label for label in range(len(self._ids)) if label not in self._deleted],
                dtype=np.int64,
            )
            vectors = self._vectors(live)
            ids = [self._ids[label] for label in live.tolist()]
            dropped = len(self._deleted)
            fresh = self._new_graphs(len(ids))
            if ids:
                self._insert(fresh, np.arange(len(ids), dtype=np.int64), vectors, first_new=0)
            self._graphs = fresh
            self._ids = ids
            self._label_of = {face_id: label for label, face_id in enumerate(ids)}
            self._deleted = set()
            logger.info("index compacted: %s live faces, %s deleted dropped", len(ids), dropped)

    # -- reading -------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids) - len(self._deleted)

    def __contains__(self, face_id: object) -> bool:
        with self._lock:
            label = self._labels_by_id().get(face_id) if isinstance(face_id, str) else None
            return label is not None and label not in self._deleted

    @property
    def deleted_count(self) -> int:
        return len(self._deleted)

    def face_ids(self) -> list[str]:
        """Every live face id, in the order they were added."""
        with self._lock:
            return [f for label, f in enumerate(self._ids) if label not in self._deleted]

    def vector(self, face_id: str) -> FloatArray:
        """The stored (unit-length) template of a live face."""
        with self._lock:
            label = self._live_label(face_id)
            row: FloatArray = self._vectors(np.asarray([label], dtype=np.int64))[0]
            return row

    def search(self, probe: FloatArray, model_id: str, k: int = 10) -> list[Candidate]:
        """The ``k`` most similar live faces, best first, with their cosine scores."""
        self._check_model(model_id, "search with a probe of")
        if not 1 <= k <= MAX_K:
            raise BadInputError(f"k must be between 1 and {MAX_K}, not {k}")
        query = self._probe(probe)
        with self._lock:
            live = len(self._ids) - len(self._deleted)
            if live == 0:
                return []
            wanted = min(max(k, self.params.rerank), live)
            try:
                ranked = self._walk(query, wanted, side_by_side=live >= SIDE_BY_SIDE_MIN_FACES)
            except RuntimeError:
                # Deleted elements can cut the graph's reach below `wanted`: score all live faces.
                labels = np.asarray(
                    [label for label in range(len(self._ids)) if label not in self._deleted],
                    dtype=np.int64,
                )
                scores = self._vectors(labels).astype(np.float64) @ query.astype(np.float64)
                # Both sides are unit vectors; float32 rounding can put a self-match above 1.
                scores = np.clip(scores, -1.0, 1.0)
                ranked = list(zip((-scores).tolist(), labels.tolist(), strict=True))
            # Best score first, ties to the face added first.
            return [Candidate(self._ids[label], -negated) for negated, label in sorted(ranked)[:k]]

    def verify(self, probe: FloatArray, face_id: str, model_id: str) -> float:
        """1:1: the exact cosine similarity of the probe to one enrolled face."""
        self._check_model(model_id, "verify a probe of")
        query = self._probe(probe).astype(np.float64)
        return float(np.clip(self.vector(face_id).astype(np.float64) @ query, -1.0, 1.0))

    def set_search_params(self, *, ef_search: int, rerank: int) -> None:
        """Change the query-time beam and re-rank depth (no rebuild needed)."""
        with self._lock:
            self.params = replace(self.params, ef_search=ef_search, rerank=rerank)
            self._set_beam(self._graphs)

    # -- persistence ---------------------------------------------------------------------

    def seal_with(self, seal: Sealer) -> bytes:
        """The index serialised and sealed by ``seal``; the plaintext is built in memory and
        never written to a file."""
        with self._lock:
            states = [hnsw_state.export(graph) for graph in self._graphs]
            header = {
                "format": _FORMAT,
                "model_id": self.model_id,
                "dim": self.dim,
                "space": SPACE,
                "m": self.params.m,
                "ef_construction": self.params.ef_construction,
                "elements": self._element_count(),
                "deleted": sorted(self._deleted),
                "graphs": [
                    {"hnsw": scalars, "arrays": [array.nbytes for array in arrays]}
                    for scalars, arrays in states
                ],
            }
            ids = "\n".join(self._ids).encode("utf-8")
        head = json.dumps(header, separators=(",", ":")).encode("utf-8")
        front = [_MAGIC, _HEADER_LENGTH.pack(len(head)), head, _IDS_LENGTH.pack(len(ids)), ids]
        arrays = [array for _, graph_arrays in states for array in graph_arrays]
        graph = hnsw_state.layout(arrays, start=sum(len(part) for part in front))
        return seal(b"".join([*front, *graph]))

    @classmethod
    def open_sealed(
        cls,
        sealed: bytes,
        open_: Opener,
        *,
        model_id: str,
        dim: int,
        params: IndexParams | None = None,
        open_errors: tuple[type[Exception], ...] = (Exception,),
    ) -> GalleryIndex:
        """Authenticate with ``open_``, check the header, only then load the graph.

        Raises ``IndexDamagedError`` when ``open_`` raises one of ``open_errors`` (the store
        passes its ``DecryptionError``) or the plaintext is not a well-formed index, and
        ``ModelMismatchError`` when it is another model's index."""
        try:
            plaintext = open_(sealed)
        except open_errors as exc:
            raise IndexDamagedError("index failed authentication") from exc
        header, face_ids, graph = _parse(plaintext)
        del plaintext  # the graph view keeps the buffer; nothing else needs the name
        if header["model_id"] != model_id:
            raise ModelMismatchError(
                f"persisted index holds model {header['model_id']} templates, "
                f"gallery uses {model_id}; rebuild the index"
            )
        if header["dim"] != dim:
            raise IndexDamagedError(f"index dimension {header['dim']} is not {dim}")
        # The file's graphs keep the parameters they were built with.
        chosen = replace(
            params or IndexParams(), m=header["m"], ef_construction=header["ef_construction"]
        )
        index = cls(model_id, dim, chosen, graphs=_load_graphs(header, graph, dim))
        if index._element_count() != header["elements"]:
            raise IndexDamagedError("index element count does not match its header")
        index._ids = face_ids
        index._label_of = None
        index._deleted = set(header["deleted"])
        return index

    # -- internals -----------------------------------------------------------------------

    def _check_model(self, model_id: str, action: str) -> None:
        if model_id != self.model_id:
            raise ModelMismatchError(
                f"cannot {action} model {model_id} in an index of model {self.model_id}: "
                f"templates of different models are not comparable; embed with {self.model_id} "
                "or re-embed the gallery"
            )

    def _templates(self, vectors: FloatArray, rows: int) -> FloatArray:
        matrix = np.asarray(vectors, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape != (rows, self.dim):
            raise BadInputError(
                f"expected {rows} templates of dimension {self.dim}, got shape {matrix.shape}"
            )
        if not np.all(np.isfinite(matrix)):
            raise BadInputError("a template holds a non-finite value")
        norms = np.linalg.norm(matrix, axis=1)
        if rows and np.max(np.abs(norms - 1.0)) > UNIT_NORM_TOLERANCE:
            raise BadInputError("templates must be L2-normalised (unit length)")
        return matrix

    def _probe(self, probe: FloatArray) -> FloatArray:
        row: FloatArray = np.asarray(probe, dtype=np.float32).reshape(-1)
        # The common case checked in one dot product (a NaN or infinity fails it too); the
        # full checks run only to name what is wrong (a search's fixed cost is on its p50).
        squared = float(row @ row) if row.shape == (self.dim,) else math.nan
        if abs(math.sqrt(squared) - 1.0) <= UNIT_NORM_TOLERANCE:
            return row
        checked: FloatArray = self._templates(row.reshape(1, -1), 1)[0]
        return checked

    def _element_count(self) -> int:
        return sum(int(graph.get_current_count()) for graph in self._graphs)

    def _walk(self, query: FloatArray, wanted: int, *, side_by_side: bool) -> list[Ranked]:
        """Up to ``wanted`` candidates from each graph, unsorted; RuntimeError when deleted
        elements cut a graph's reach below what is asked of it."""
        asks = [(graph, min(wanted, int(graph.get_current_count()))) for graph in self._graphs]
        asks = [(graph, k) for graph, k in asks if k > 0]
        if not side_by_side or len(asks) < 2:
            return [pair for graph, k in asks for pair in _ranked(*walkers.knn(graph, query, k))]
        (first, first_k), *rest = asks
        others = [walkers.hand_over(graph, query, k) for graph, k in rest]
        try:
            # Readied while the other walks may still run: after them is the critical path.
            found = _ranked(*walkers.knn(first, query, first_k))
        finally:
            for walk in others:
                walk.wait()  # no walk outlives the lock that keeps its graph unchanged
        for walk in others:
            found += _ranked(*walk.result())
        return found

    def _labels_by_id(self) -> dict[str, int]:
        """Face id -> hnswlib label; built lazily so that opening an index stays fast."""
        if self._label_of is None:
            self._label_of = {face_id: label for label, face_id in enumerate(self._ids)}
        return self._label_of

    def _live_label(self, face_id: str) -> int:
        label = self._labels_by_id().get(face_id)
        if label is None or label in self._deleted:
            raise UnknownFaceError(f"face {face_id} is not in the index")
        return label

    def _vectors(self, labels: npt.NDArray[np.int64]) -> FloatArray:
        if not len(labels):
            return np.zeros((0, self.dim), dtype=np.float32)
        out = np.empty((len(labels), self.dim), dtype=np.float32)
        for graph, rows in _rows_by_graph(labels, self._graphs):
            out[rows] = graph.get_items(labels[rows])
        return out


def load_or_rebuild(
    sealed: bytes | None,
    open_: Opener,
    source: VectorSource,
    *,
    model_id: str,
    dim: int,
    params: IndexParams | None = None,
    open_errors: tuple[type[Exception], ...] = (Exception,),
) -> LoadResult:
    """The persisted index if it authenticates and matches; else one rebuilt from ``source``.

    ``sealed`` is None when the index file is missing. ``source`` returns the store's live
    face ids and templates of ``model_id`` (``Gallery.embeddings``' shape). The caller
    persists a rebuilt index."""
    reason: str | None = "missing"
    if sealed is not None:
        try:
            return LoadResult(
                GalleryIndex.open_sealed(
                    sealed,
                    open_,
                    model_id=model_id,
                    dim=dim,
                    params=params,
                    open_errors=open_errors,
                ),
                rebuilt=False,
                reason=None,
            )
        except ModelMismatchError:
            reason = "model changed"
        except IndexDamagedError as exc:
            reason = f"damaged: {exc}"
    face_ids, vectors = source()
    # A new, empty gallery has no index yet: nothing worth a warning.
    level = logging.WARNING if len(face_ids) or reason != "missing" else logging.DEBUG
    logger.log(level, "rebuilding search index of %s faces (%s)", len(face_ids), reason)
    if len(face_ids):
        index = GalleryIndex.build(model_id, face_ids, vectors, params)
    else:
        index = GalleryIndex(model_id, dim, params)
    return LoadResult(index, rebuilt=True, reason=reason)


def _face_ids(face_ids: Sequence[str]) -> list[str]:
    if isinstance(face_ids, str):
        raise BadInputError("face ids must be a sequence of strings, not one string")
    ids = list(face_ids)
    if not all(isinstance(f, str) and 0 < len(f) <= MAX_FACE_ID and f.isprintable() for f in ids):
        raise BadInputError(f"face ids must be printable strings of 1 to {MAX_FACE_ID} characters")
    return ids


def _parse(plaintext: bytes) -> tuple[dict[str, Any], list[str], memoryview]:
    """Header, face ids and graph bytes of an authenticated plaintext; IndexDamagedError when
    it is malformed."""
    view = memoryview(plaintext)
    start = len(_MAGIC) + _HEADER_LENGTH.size
    if len(view) < start or bytes(view[: len(_MAGIC)]) != _MAGIC:
        raise IndexDamagedError("not an edgeid index")
    (length,) = _HEADER_LENGTH.unpack(view[len(_MAGIC) : start])
    if length > min(_MAX_HEADER_BYTES, len(view) - start):
        raise IndexDamagedError("index header length is out of range")
    try:
        header = json.loads(bytes(view[start : start + length]))
        valid = (
            isinstance(header, dict)
            and header.get("format") in (_FORMAT, _ONE_STATE_FORMAT, _FILE_BYTES_FORMAT)
            and header.get("space") == SPACE
            and isinstance(header.get("model_id"), str)
            and all(isinstance(header.get(k), int) for k in ("dim", "m", "ef_construction"))
            and isinstance(header.get("elements"), int)
            and isinstance(header.get("deleted"), list)
            and all(isinstance(v, int) and 0 <= v < header["elements"] for v in header["deleted"])
            and (
                header["format"] == _FILE_BYTES_FORMAT
                or (header["format"] == _ONE_STATE_FORMAT and _is_state(header))
                or (
                    isinstance(header.get("graphs"), list)
                    and 1 <= len(header["graphs"]) <= MAX_SHARDS
                    and all(_is_state(state) for state in header["graphs"])
                )
            )
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise IndexDamagedError("index header is not valid JSON") from exc
    if not valid:
        raise IndexDamagedError("index header is malformed or of another format")
    ids_start = start + length + _IDS_LENGTH.size
    if len(view) < ids_start:
        raise IndexDamagedError("index is truncated")
    (ids_length,) = _IDS_LENGTH.unpack(view[start + length : ids_start])
    if ids_length > len(view) - ids_start:
        raise IndexDamagedError("index face-id section length is out of range")
    try:
        text = bytes(view[ids_start : ids_start + ids_length]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IndexDamagedError("index face ids are not UTF-8") from exc
    face_ids = text.split("\n") if text else []
    if len(face_ids) != header["elements"] or len(set(face_ids)) != len(face_ids):
        raise IndexDamagedError("index face ids do not match its elements")
    graph_start = ids_start + ids_length
    if header["format"] != _FILE_BYTES_FORMAT:
        graph_start = hnsw_state.aligned(graph_start)
    return header, face_ids, view[graph_start:]


def _is_state(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("hnsw"), dict)
        and isinstance(entry.get("arrays"), list)
    )


def _load_graphs(header: dict[str, Any], section: memoryview, dim: int) -> list[Any]:
    """hnswlib's graphs from the graph section of an authenticated plaintext."""
    if header["format"] == _FILE_BYTES_FORMAT:
        return [_hnsw_from_file_bytes(section, dim)]
    states = header["graphs"] if header["format"] == _FORMAT else [header]
    graphs = []
    offset = 0
    try:
        for state in states:
            offset = hnsw_state.aligned(offset)
            end = offset + hnsw_state.extent(state["arrays"])
            if end > len(section):
                raise hnsw_state.StateError("a graph runs past the index")
            graphs.append(
                hnsw_state.restore(
                    state["hnsw"], state["arrays"], section[offset:end], space=SPACE, dim=dim
                )
            )
            offset = end
        if offset != len(section):
            raise hnsw_state.StateError("bytes follow the last graph")
    except hnsw_state.StateError as exc:
        raise IndexDamagedError(f"index graph is inconsistent: {exc}") from exc
    return graphs


def _rows_by_graph(labels: Labels, graphs: list[Any]) -> Iterator[tuple[Any, Labels]]:
    """Each graph holding some of ``labels`` (label L lives in graph L mod the graph count)
    with the positions in ``labels`` of the faces it holds."""
    graph_of = labels % len(graphs)
    for number, graph in enumerate(graphs):
        rows = np.flatnonzero(graph_of == number)
        if len(rows):
            yield graph, rows


def _ranked(labels: Labels, distances: FloatArray) -> list[Ranked]:
    """hnswlib's candidates as (negated cosine score, label) pairs, which sort best first.

    Both sides are unit vectors, so float32 rounding can take a self-match's distance a hair
    below 0: clipped, as the exact path clips its scores. Plain Python on a few dozen
    candidates: numpy's per-call costs were most of a search's own overhead."""
    return [
        (min(max(distance, 0.0), 2.0) - 1.0, label)
        for distance, label in zip(distances.tolist(), labels.tolist(), strict=True)
    ]


def _hnsw_from_file_bytes(graph: memoryview | bytes, dim: int) -> Any:
    """hnswlib's file loader on format-1 bytes (it only reads paths: a memfd where possible)."""
    hnsw = hnswlib.Index(space=SPACE, dim=dim)
    with _scratch_file() as path:
        _write_all(path, graph)
        try:
            hnsw.load_index(str(path))
        except RuntimeError as exc:
            raise IndexDamagedError("hnswlib could not load the index") from exc
    return hnsw


@contextlib.contextmanager
def _scratch_file() -> Iterator[Path]:
    """A path for hnswlib to write or read plaintext index bytes.

    Linux: an anonymous memfd, reached as /proc/self/fd/N, freed on close (never on a disk).
    Elsewhere: a file in a fresh 0700 directory, overwritten with zeros before it is removed
    (a best effort: journalling or copy-on-write file systems may keep old blocks)."""
    if hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir():
        fd = os.memfd_create("edgeid-index", os.MFD_CLOEXEC)
        try:
            yield Path(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    folder = Path(tempfile.mkdtemp(prefix="edgeid-index-"))  # mkdtemp creates it 0700
    path = folder / "index.bin"
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            _shred(path)
        with contextlib.suppress(OSError):
            folder.rmdir()


def _shred(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as handle:
        chunk = b"\x00" * (1 << 20)
        for offset in range(0, size, len(chunk)):
            handle.write(chunk[: min(len(chunk), size - offset)])
        handle.flush()
        os.fsync(handle.fileno())
    path.unlink()


def _write_all(path: Path, data: memoryview | bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
