"""`edgeid bench search --size N`: the gallery index beside exact search, on realistic templates.

**Templates.** N unit vectors drawn from a model of real ones, fitted to the LFW dev templates of
the product pipeline (``benchmarks.calibrate_thresholds.embed_lfw_dev``): each synthetic person
has a centre drawn from the between-person Gaussian (mean and full covariance of the people's
mean templates, less the within-person share), and each of their images adds within-person
Gaussian variation (the pooled covariance of the deviations of 361 people with several images);
images per person follow LFW dev's distribution. The output's ``generator_check`` sets the mated
and non-mated cosine scores of the synthetic set beside the real ones: i.i.d. noise would score
around 0 for both, real templates do not.

**Figures.** ``build_s`` (hnswlib on every core); ``recall_at_10`` of the index against exact
search over the same vectors (numpy brute force), on probes that are new images of enrolled
people (mated) and images of people not enrolled (non-mated), half each; single-query
``p50_ms``/``p99_ms`` and ``queries_per_s`` (one probe at a time through
``GalleryIndex.search``, which walks its graphs side by side from 10k faces);
``top1_agreement`` (the index's first candidate is exact search's; for a mated
probe that is nearly always an image of the same person); the exact search's
single-query time (numpy's BLAS on every core) and ``ratio_vs_baseline`` = exact p50 / index
p50; ``bytes_per_face`` of the serialised index and of its sealed form; ``open_s``: read the
sealed index file, authenticate and decrypt it (AES-256-GCM), load it into hnswlib (median of
three). With ``store=True`` the same templates are also enrolled into a real encrypted gallery
store, compacted and opened (``benchmarks.gallery_open_bench``): ``store_open_s``, and
``open_total_s`` = store plus index, what a service restart costs before its first search.
``goals`` says which of issue 17's four 1M-face goals the run meets.

Caveat: Gaussian identity clusters fill all 128 dimensions evenly around their covariance;
real templates likely have more structure, which HNSW exploits, so recall here is probably a
lower bound. The synthetic mated scores are narrower than the real ones (see generator_check).

    python -m benchmarks.search_bench --size 100000 --data ../shared/data --models var/models
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgeid.runtime.errors import BadInputError
from edgeid.runtime.gallery.index import GalleryIndex, IndexParams
from edgeid.runtime.inference.manifest import load_manifest, manifest_path
from edgeid.runtime.inference.pipeline import EMBEDDER_MODEL

logger = logging.getLogger(__name__)

K = 10
# Probes scored against exact search for recall; 1,000 resolves recall@10 to 1e-4 (10,000 hits).
RECALL_QUERIES = 1000
# Probes timed one by one; 2,000 puts about 20 samples beyond the p99.
LATENCY_QUERIES = 2000
# Exact searches timed one by one: each reads the whole matrix (0.5 GB at 1M), so fewer.
EXACT_QUERIES = 50
# Searches run untimed first: the first ones fault in pages and warm the caches.
WARMUP_QUERIES = 50
# Probes per block of the batched exact search: bounds its score matrix to 256 MB at 1M faces.
EXACT_BLOCK = 64
GCM_NONCE = 12
GENERATOR_CACHE = "search_bench_generator.npz"
# Synthetic templates whose pair scores are set beside LFW dev's: the same count (1,549).
GENERATOR_CHECK_SIZE = 1549
# Issue 17's goals for a 1M-face gallery, all in one run.
GOALS = {
    "recall_at_10 >= 0.99": ("recall_at_10", 0.99, 1),
    "p99_ms <= 5": ("p99_ms", 5.0, -1),
    "ratio_vs_baseline >= 20": ("ratio_vs_baseline", 20.0, 1),
    "open_total_s <= 5": ("open_total_s", 5.0, -1),
}
OPEN_REPEAT = 3


@dataclass(frozen=True)
class TemplateModel:
    """Gaussian identity model of unit templates (see the module docstring)."""

    mean: npt.NDArray[np.float64]
    between: npt.NDArray[np.float64]  # factor B with B @ B.T = between-person covariance
    within: npt.NDArray[np.float64]  # factor W with W @ W.T = within-person covariance
    images_per_person: npt.NDArray[np.float64]  # probability of 1, 2, ... images
    source_sha256: str  # the embedder's ONNX sha256 the model was fitted with
    real_scores: dict[str, float]  # mated / non-mated score statistics of the fitted templates

    @classmethod
    def fit(
        cls,
        vectors: npt.NDArray[np.float32],
        people: Sequence[str],
        source_sha256: str,
        *,
        shrinkage: float = 0.0,
    ) -> TemplateModel:
        """Fit to real templates. ``shrinkage`` blends each covariance with the isotropic one
        of the same trace: for fits to a few hundred templates, whose covariances are
        rank-deficient (the full LFW dev set needs none)."""
        data = vectors.astype(np.float64)
        ids, counts = np.unique(np.asarray(people), return_inverse=True, return_counts=True)[1:]
        means = np.stack([data[ids == p].mean(axis=0) for p in range(len(counts))])
        deviations = data - means[ids]
        dof = int(np.sum(counts - 1))
        within = deviations.T @ deviations / dof
        # Cov(person means) = between + within / n on average over people.
        spread = np.cov(means, rowvar=False) - within * float(np.mean(1.0 / counts))
        histogram = np.bincount(counts)[1:].astype(np.float64)
        return cls(
            mean=data.mean(axis=0),
            between=_factor(_shrink(spread, shrinkage)),
            within=_factor(_shrink(within, shrinkage)),
            images_per_person=histogram / histogram.sum(),
            source_sha256=source_sha256,
            real_scores=pair_stats(vectors, ids.astype(np.int64)),
        )

    def sample(
        self, size: int, rng: np.random.Generator
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """``size`` unit templates, the synthetic person of each (persons in order), and the
        persons' centres (to draw more images of them)."""
        dim = len(self.mean)
        per_person = rng.choice(
            np.arange(1, len(self.images_per_person) + 1),
            size=size,
            p=self.images_per_person,
        )
        people = np.repeat(np.arange(size), per_person)[:size]
        centres = self.centres(int(people[-1]) + 1, rng)
        out = np.empty((size, dim), dtype=np.float32)
        for start in range(0, size, 65536):
            rows = people[start : start + 65536]
            out[start : start + len(rows)] = self.images(centres[rows], rng)
        return out, people.astype(np.int64), centres.astype(np.float32)

    def centres(self, count: int, rng: np.random.Generator) -> npt.NDArray[np.float64]:
        z = rng.standard_normal((count, self.between.shape[1]))
        return self.mean + z @ self.between.T

    def images(
        self, centres: npt.NDArray[np.float64] | npt.NDArray[np.float32], rng: np.random.Generator
    ) -> npt.NDArray[np.float32]:
        z = rng.standard_normal((len(centres), self.within.shape[1]))
        raw = centres.astype(np.float64) + z @ self.within.T
        unit: npt.NDArray[np.float32] = (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(
            np.float32
        )
        return unit

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            np.savez(
                handle,
                mean=self.mean,
                between=self.between,
                within=self.within,
                images_per_person=self.images_per_person,
                source_sha256=np.array(self.source_sha256),
                real_scores=np.array(json.dumps(self.real_scores)),
            )

    @classmethod
    def load(cls, path: Path) -> TemplateModel:
        with np.load(path, allow_pickle=False) as saved:
            return cls(
                mean=saved["mean"],
                between=saved["between"],
                within=saved["within"],
                images_per_person=saved["images_per_person"],
                source_sha256=str(saved["source_sha256"]),
                real_scores=json.loads(str(saved["real_scores"])),
            )


def _shrink(covariance: npt.NDArray[np.float64], amount: float) -> npt.NDArray[np.float64]:
    dim = len(covariance)
    isotropic = np.eye(dim) * float(np.trace(covariance)) / dim
    result: npt.NDArray[np.float64] = (1 - amount) * covariance + amount * isotropic
    return result


def _factor(covariance: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """A square-root factor of a symmetric matrix, negative eigenvalues (noise) clipped to 0."""
    values, vectors = np.linalg.eigh((covariance + covariance.T) / 2)
    result: npt.NDArray[np.float64] = vectors * np.sqrt(np.clip(values, 0, None))
    return result


def embedder_sha256(models: Path) -> str:
    return load_manifest(manifest_path(models, EMBEDDER_MODEL)).sha256


def template_model(data: Path | None, models: Path, cache: Path | None) -> TemplateModel:
    """The fitted model: from ``cache`` when it was fitted with this embedder, else from the
    LFW dev templates (embedding 1,549 images: minutes), then cached. The cache holds only
    aggregate statistics (means, covariance factors), no template of anyone."""
    sha = embedder_sha256(models)
    if cache is not None and cache.is_file():
        model = TemplateModel.load(cache)
        if model.source_sha256 == sha:
            return model
    if data is None or not (data / "lfw-dev" / "images").is_dir():
        raise BadInputError(
            "the search bench fits its templates to real LFW dev templates: pass --data with "
            "lfw-dev/images (e.g. ../shared/data)"
        )
    from benchmarks.calibrate_thresholds import embed_lfw_dev

    embedded = embed_lfw_dev(data, models)
    model = TemplateModel.fit(embedded.vectors, embedded.people, sha)
    if cache is not None:
        model.save(cache)
    return model


def pair_stats(vectors: npt.NDArray[np.float32], people: npt.NDArray[np.int64]) -> dict[str, float]:
    unit = vectors.astype(np.float64)
    upper = np.triu_indices(len(unit), k=1)
    scores = (unit @ unit.T)[upper]
    same = people[upper[0]] == people[upper[1]]
    return {
        "mated_mean": round(float(scores[same].mean()), 4),
        "mated_std": round(float(scores[same].std()), 4),
        "non_mated_mean": round(float(scores[~same].mean()), 4),
        "non_mated_std": round(float(scores[~same].std()), 4),
        "non_mated_p99_9": round(float(np.percentile(scores[~same], 99.9)), 4),
    }


def generator_check(model: TemplateModel, seed: int) -> dict[str, object]:
    """Score statistics of as many synthetic templates as LFW dev has, beside the real ones."""
    vectors, people, _ = model.sample(GENERATOR_CHECK_SIZE, np.random.default_rng(seed + 1))
    return {"synthetic": pair_stats(vectors, people), "real_lfw_dev": model.real_scores}


def draw_probes(
    model: TemplateModel,
    centres: npt.NDArray[np.float32],
    count: int,
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """``count`` probes in random order: new images of enrolled people (``centres``, the
    gallery's) and images of people not enrolled, half each; and which are mated."""
    enrolled = rng.choice(len(centres), size=count // 2)
    probe_centres = np.concatenate(
        [centres[enrolled], model.centres(count - count // 2, rng).astype(np.float32)]
    )
    probes = model.images(probe_centres, rng)
    shuffle = rng.permutation(len(probes))
    return probes[shuffle], shuffle < count // 2


def exact_top(
    gallery: npt.NDArray[np.float32], probes: npt.NDArray[np.float32], k: int
) -> npt.NDArray[np.int64]:
    """Row numbers of the exact top ``k`` of every probe (brute force, blocked)."""
    out = np.empty((len(probes), k), dtype=np.int64)
    for start in range(0, len(probes), EXACT_BLOCK):
        scores = probes[start : start + EXACT_BLOCK] @ gallery.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[start : start + len(top)] = np.take_along_axis(top, order, axis=1)
    return out


def exact_one(gallery: npt.NDArray[np.float32], probe: npt.NDArray[np.float32], k: int) -> None:
    """One exact single-probe search, as a service without an index would run it."""
    scores = gallery @ probe
    top = np.argpartition(-scores, k)[:k]
    top[np.argsort(-scores[top])]


def _percentile_ms(seconds: list[float], q: float) -> float:
    return round(1000 * float(np.percentile(seconds, q)), 3)


def _aes_gcm(key: bytes, aad: bytes) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    aead = AESGCM(key)

    def seal(plaintext: bytes) -> bytes:
        nonce = os.urandom(GCM_NONCE)
        return nonce + aead.encrypt(nonce, plaintext, aad)

    def open_(sealed: bytes) -> bytes:
        view = memoryview(sealed)  # a view, as the store's open_blob takes it: no copy
        return aead.decrypt(bytes(view[:GCM_NONCE]), view[GCM_NONCE:], aad)

    return seal, open_


def run(
    size: int,
    *,
    data: Path | None = None,
    models: Path | None = None,
    params: IndexParams | None = None,
    ef_sweep: Sequence[int] = (),
    recall_queries: int = RECALL_QUERIES,
    latency_queries: int = LATENCY_QUERIES,
    seed: int = 0,
    model: TemplateModel | None = None,
    cache: Path | None = None,
    store: bool = False,
) -> dict[str, object]:
    """Build an index of ``size`` synthetic templates and measure it (see the module docstring).

    ``model``: a fitted TemplateModel (else one is loaded from ``cache`` or fitted from the
    LFW dev images under ``data`` with the models in ``models``)."""
    if size < 2 * K:
        raise BadInputError(f"--size must be at least {2 * K}")
    home = Path(os.environ.get("EDGEID_HOME", "var"))
    models = models or home / "models"
    if model is None:
        model = template_model(data, models, cache or home / "cache" / GENERATOR_CACHE)
    params = params or IndexParams()
    rng = np.random.default_rng(seed)

    started = time.perf_counter()
    gallery, _, centres = model.sample(size, rng)
    generate_s = time.perf_counter() - started
    # Face ids shaped like the store's (32 hex digits): their map is part of the index's cost.
    face_ids = [f"{row:032x}" for row in range(size)]

    started = time.perf_counter()
    index = GalleryIndex.build(EMBEDDER_MODEL, face_ids, gallery, params)
    build_s = time.perf_counter() - started

    count = max(recall_queries, latency_queries, WARMUP_QUERIES)
    probes, mated_all = draw_probes(model, centres, count, rng)
    del centres
    mated = mated_all[:recall_queries]

    recall_probes = probes[:recall_queries]
    started = time.perf_counter()
    truth = exact_top(gallery, recall_probes, K)
    exact_batch_s = time.perf_counter() - started

    def measure(ef: int) -> tuple[dict[str, object], list[float]]:
        index.set_search_params(ef_search=ef, rerank=params.rerank)
        for probe in probes[:WARMUP_QUERIES]:
            index.search(probe, EMBEDDER_MODEL, K)
        hits = np.zeros(len(recall_probes))
        top1 = np.zeros(len(recall_probes), dtype=bool)
        for row, (probe, expected) in enumerate(zip(recall_probes, truth, strict=True)):
            found = [int(c.face_id, 16) for c in index.search(probe, EMBEDDER_MODEL, K)]
            hits[row] = len(set(found) & set(expected.tolist()))
            top1[row] = found[0] == expected[0]
        latencies = []
        for probe in probes[:latency_queries]:
            tick = time.perf_counter()
            index.search(probe, EMBEDDER_MODEL, K)
            latencies.append(time.perf_counter() - tick)
        figures: dict[str, object] = {
            "ef_search": ef,
            "recall_at_10": round(float(hits.mean()) / K, 4),
            "recall_at_10_mated_probes": round(float(hits[mated].mean()) / K, 4),
            "recall_at_10_non_mated_probes": round(float(hits[~mated].mean()) / K, 4),
            "top1_agreement": round(float(top1.mean()), 4),
            "top1_agreement_mated_probes": round(float(top1[mated].mean()), 4),
            "p50_ms": _percentile_ms(latencies, 50),
            "p99_ms": _percentile_ms(latencies, 99),
            "queries_per_s": round(len(latencies) / sum(latencies), 1),
        }
        return figures, latencies

    sweep = [measure(ef)[0] for ef in ef_sweep]
    main, main_latencies = measure(params.ef_search)

    for probe in probes[:3]:
        exact_one(gallery, probe, K)
    exact_latencies = []
    for probe in probes[:EXACT_QUERIES]:
        tick = time.perf_counter()
        exact_one(gallery, probe, K)
        exact_latencies.append(time.perf_counter() - tick)

    key = AESGCM.generate_key(bit_length=256)
    seal, open_ = _aes_gcm(key, b"edgeid-bench/index")
    sealed = index.seal_with(seal)
    plain_bytes = len(sealed) - GCM_NONCE - 16
    with tempfile.TemporaryDirectory(prefix="edgeid-bench-") as folder:
        path = Path(folder) / "index.sealed"
        path.write_bytes(sealed)
        del sealed
        opens = []
        reopened: GalleryIndex | None = None
        for _ in range(OPEN_REPEAT):
            # Free the previous open first: its teardown is not part of the next open.
            reopened = None
            started = time.perf_counter()
            reopened = GalleryIndex.open_sealed(
                path.read_bytes(),
                open_,
                model_id=EMBEDDER_MODEL,
                dim=gallery.shape[1],
                params=params,
            )
            opens.append(time.perf_counter() - started)
        open_s = float(np.median(opens))
    assert reopened is not None
    same = [c.face_id for c in reopened.search(probes[0], EMBEDDER_MODEL, K)] == [
        c.face_id for c in index.search(probes[0], EMBEDDER_MODEL, K)
    ]

    exact_p50 = float(np.percentile(exact_latencies, 50))
    main_p50 = float(np.percentile(main_latencies, 50))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    report: dict[str, object] = {
        "size": size,
        "dim": int(gallery.shape[1]),
        "k": K,
        "params": {
            "m": params.m,
            "ef_construction": params.ef_construction,
            "ef_search": params.ef_search,
            "rerank": params.rerank,
        },
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(load, 2) if load is not None else None,
        "generate_s": round(generate_s, 2),
        "build_s": round(build_s, 2),
        "recall_queries": len(recall_probes),
        "latency_queries": latency_queries,
        **{key: value for key, value in main.items() if key != "ef_search"},
        "exact_p50_ms": round(1000 * exact_p50, 3),
        "exact_batched_ms_per_query": round(1000 * exact_batch_s / len(recall_probes), 3),
        "ratio_vs_baseline": round(exact_p50 / main_p50, 1),
        "baseline": "exact search: numpy float32 matrix-vector product + argpartition, "
        "one probe at a time",
        "bytes_per_face": round(plain_bytes / size, 1),
        "sealed_bytes_per_face": round((plain_bytes + GCM_NONCE + 16) / size, 1),
        "open_s": round(open_s, 3),
        "open_s_all": [round(s, 3) for s in opens],
        "reopened_same_results": same,
        "ef_sweep": sweep,
        "generator": "identity-cluster Gaussian fitted to LFW dev templates "
        f"(embedder sha256 {model.source_sha256[:12]}…)",
        "generator_check": generator_check(model, seed),
    }
    report["goals"] = goals(report)
    if store:
        # The same generator and seed draw the same templates into a real gallery store.
        from benchmarks import gallery_open_bench

        opened = gallery_open_bench.run(
            size, baseline=False, repeat=OPEN_REPEAT, cold=False, seed=seed, model=model
        )
        add_store(report, opened)
    return report


def add_store(report: dict[str, object], opened: dict[str, object]) -> None:
    """Puts a ``gallery_open_bench`` run of the same faces (same size and seed) beside the
    index: the store's open, the open goal's total, and the goals judged again."""
    batched = opened["batched"]
    assert isinstance(batched, dict) and opened["size"] == report["size"]
    report["store_open_s"] = batched["open_s"]
    report["store_bytes_per_face"] = batched["bytes_per_face"]
    open_s = report["open_s"]
    assert isinstance(open_s, float)
    report["open_total_s"] = round(float(batched["open_s"]) + open_s, 3)
    report["goals"] = goals(report)


def goals(report: dict[str, object]) -> dict[str, bool | None]:
    """Each of issue 17's 1M-face goals: met, missed, or None where the run has no figure."""
    met: dict[str, bool | None] = {}
    for goal, (key, bound, sense) in GOALS.items():
        value = report.get(key)
        met[goal] = sense * value >= sense * bound if isinstance(value, int | float) else None
    return met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument("--m", type=int, default=IndexParams().m)
    parser.add_argument("--ef-construction", type=int, default=IndexParams().ef_construction)
    parser.add_argument("--ef-search", type=int, default=IndexParams().ef_search)
    parser.add_argument("--rerank", type=int, default=IndexParams().rerank)
    parser.add_argument("--ef-sweep", type=int, nargs="*", default=[])
    parser.add_argument("--recall-queries", type=int, default=RECALL_QUERIES)
    parser.add_argument(
        "--store", action="store_true", help="also open a real gallery store of the same faces"
    )
    parser.add_argument(
        "--check-generator",
        action="store_true",
        help="also embed LFW dev and set synthetic scores beside real ones",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = IndexParams(
        m=args.m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
        rerank=args.rerank,
    )
    result = run(
        args.size,
        data=args.data,
        models=args.models,
        params=params,
        ef_sweep=args.ef_sweep,
        recall_queries=args.recall_queries,
        store=args.store,
    )
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
