"""Clustering case faces: the linear-memory average linkage against the textbook one on real
LFW templates, the neighbour graph (exact and hnswlib), and the failure each method guards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from edgeid.runtime.cases.cluster_metrics import score_clusters
from edgeid.runtime.cases.clustering import (
    NeighbourGraph,
    average_linkage,
    average_linkage_dense,
    chinese_whispers,
    cluster,
    connected_components,
    groups,
    neighbour_graph,
)
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.gallery.thresholds import load_calibration
from edgeid.runtime.inference.pipeline import EMBEDDER_MODEL

Vectors = npt.NDArray[np.float32]
PEOPLE = 24  # LFW dev people with at least two photos, two or three photos each


@pytest.fixture(scope="module")
def lfw_templates(lfw_dir: Path, models_dir: Path) -> tuple[Vectors, list[str]]:
    """Central-face templates of the first PEOPLE people (sorted) with 2+ photos."""
    from edgeid.runtime.evaluation.lfw import central_face_embedder
    from edgeid.runtime.inference.pipeline import FacePipeline

    embed = central_face_embedder(FacePipeline.load(models_dir))
    vectors, people = [], []
    folders = [f for f in sorted((lfw_dir / "images").iterdir()) if len(list(f.glob("*"))) >= 2]
    for folder in folders[:PEOPLE]:
        for photo in sorted(folder.glob("*.jpg"))[:3]:
            vector = embed(photo)
            assert vector is not None, photo
            vectors.append(vector)
            people.append(folder.name)
    return np.stack(vectors).astype(np.float32), people


def threshold(fmr: float) -> float:
    return load_calibration(EMBEDDER_MODEL).band("adult").threshold(fmr)  # LFW: adults


def around(centre: Vectors, count: int, cosine: float, seed: int) -> Vectors:
    """``count`` unit vectors at ``cosine`` to ``centre`` in random directions: one person's
    templates (pairwise cosine about cosine**2)."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(count, centre.shape[0]))
    noise -= np.outer(noise @ centre, centre)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return (cosine * centre + np.sqrt(1 - cosine**2) * noise).astype(np.float32)


def edges(graph: NeighbourGraph) -> set[tuple[int, int]]:
    return {
        (i, int(j))
        for i in range(graph.size)
        for j in graph.indices[graph.indptr[i] : graph.indptr[i + 1]]
    }


def partition(labels: npt.NDArray[np.int64]) -> set[frozenset[int]]:
    return {frozenset(members) for members in groups(labels)}


@pytest.mark.parametrize("fmr", [1e-2, 1e-3, 1e-4])
def test_average_linkage_equals_the_dense_textbook_version_on_lfw(
    lfw_templates: tuple[Vectors, list[str]], fmr: float
) -> None:
    vectors, _ = lfw_templates
    sparse = average_linkage(vectors, threshold(fmr))
    dense = average_linkage_dense(vectors, threshold(fmr))
    assert partition(sparse) == partition(dense)


def test_average_linkage_does_not_depend_on_the_order_of_faces(
    lfw_templates: tuple[Vectors, list[str]],
) -> None:
    vectors, _ = lfw_templates
    order = np.random.default_rng(7).permutation(len(vectors))
    shuffled = average_linkage(vectors[order], threshold(1e-4))
    back = np.empty_like(shuffled)
    back[order] = shuffled
    assert partition(back) == partition(average_linkage(vectors, threshold(1e-4)))


def test_clusters_of_real_lfw_faces_are_people(lfw_templates: tuple[Vectors, list[str]]) -> None:
    """At the FMR 1e-4 threshold no cluster of these 24 people mixes two of them, and most
    photos of a person are together (LFW photos span years, so some split)."""
    vectors, people = lfw_templates
    scores = score_clusters(cluster(vectors, threshold(1e-4)), people)
    assert scores.pairwise_precision == 1.0
    assert scores.bcubed_recall > 0.7


def test_hnswlib_graph_finds_the_exact_graph(lfw_templates: tuple[Vectors, list[str]]) -> None:
    vectors, _ = lfw_templates
    exact = neighbour_graph(vectors, threshold(1e-2))
    approximate = neighbour_graph(vectors, threshold(1e-2), exact_limit=0)

    found = edges(exact)
    assert found, "the graph should link some photos of the same person"
    assert len(edges(approximate) & found) >= 0.99 * len(found)
    assert float(approximate.weights.min()) >= threshold(1e-2)


def test_graph_is_symmetric_without_self_loops(lfw_templates: tuple[Vectors, list[str]]) -> None:
    vectors, _ = lfw_templates
    pairs = edges(neighbour_graph(vectors, threshold(1e-2), max_neighbours=3))
    assert all((j, i) in pairs for i, j in pairs)
    assert all(i != j for i, j in pairs)


def test_a_person_seen_hundreds_of_times_stays_one_cluster(
    lfw_templates: tuple[Vectors, list[str]],
) -> None:
    """Each face knows only its 30 nearest neighbours, yet 400 faces of one person (pairwise
    cosine ~0.95) form one cluster: the mean over all pairs comes from the cluster sums, not
    from the few pairs in the graph."""
    vectors, people = lfw_templates
    person = around(vectors[0], 400, 0.975, seed=1)
    labels = average_linkage(np.vstack([vectors, person]), threshold(1e-4))
    assert len(set(labels[-400:].tolist())) == 1
    joined = {people[i] for i in range(len(vectors)) if labels[i] == labels[-1]}
    assert joined <= {people[0]}  # nobody else joined the centre's person


def test_one_look_alike_face_does_not_merge_two_people() -> None:
    """A face midway between two people links to both: single linkage merges them, average
    linkage keeps them apart (the reason it is the default)."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=128)
    a /= np.linalg.norm(a)
    b = 0.85 * a + np.sqrt(1 - 0.85**2) * around(a, 1, 0.0, seed=4)[0]  # cos(a, b) = 0.85
    b /= np.linalg.norm(b)
    between = (a + b) / np.linalg.norm(a + b)  # cosine 0.96 to both
    faces = np.vstack([around(a, 20, 0.985, 5), around(b, 20, 0.985, 6), between[None]])
    t = threshold(1e-4)
    single = connected_components(neighbour_graph(faces, t))
    mean = average_linkage(faces, t)
    assert len(set(single.tolist())) == 1
    assert len(set(mean[:40].tolist())) == 2
    assert set(mean[:20].tolist()).isdisjoint(mean[20:40].tolist())


def test_chinese_whispers_separates_two_clean_people() -> None:
    rng = np.random.default_rng(8)
    a, b = (v / np.linalg.norm(v) for v in rng.normal(size=(2, 128)))
    faces = np.vstack([around(a, 15, 0.985, 9), around(b, 15, 0.985, 10)])
    labels = chinese_whispers(neighbour_graph(faces, threshold(1e-4)))
    assert partition(labels) == {frozenset(range(15)), frozenset(range(15, 30))}


def test_groups_are_largest_first_and_small_inputs_work() -> None:
    assert groups(np.array([2, 1, 1, 0, 1, 2])) == [[1, 2, 4], [0, 5], [3]]
    empty = np.zeros((0, 128), np.float32)
    for method in ("average_linkage", "chinese_whispers", "connected_components"):
        assert cluster(empty, 0.9, method).tolist() == []  # type: ignore[arg-type]
        assert cluster(np.ones((1, 128), np.float32) / np.sqrt(128), 0.9, method).tolist() == [0]  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="non-finite"):
        cluster(np.full((2, 128), np.nan, np.float32), 0.9)
    with pytest.raises(BadInputError, match="unknown clustering method"):
        cluster(np.ones((2, 128), np.float32), 0.9, "kmeans")  # type: ignore[arg-type]


def test_cluster_scores_on_a_worked_example() -> None:
    scores = score_clusters([0, 0, 1, 1], ["a", "a", "a", "b"])
    assert scores.pairwise_precision == pytest.approx(1 / 2)
    assert scores.pairwise_recall == pytest.approx(1 / 3)
    assert scores.bcubed_precision == pytest.approx(3 / 4)
    assert scores.bcubed_recall == pytest.approx(2 / 3)
    assert scores.bcubed_f1 == pytest.approx(2 * 0.75 * (2 / 3) / (0.75 + 2 / 3))
    perfect = score_clusters([5, 5, 9], ["x", "x", "y"])
    assert (perfect.pairwise_f1, perfect.bcubed_f1) == (1.0, 1.0)
    with pytest.raises(BadInputError):
        score_clusters([0, 1], ["a"])
