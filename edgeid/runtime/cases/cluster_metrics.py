"""How good a clustering is against known identities: pairwise and BCubed precision/recall.

- **Pairwise**: over every unordered pair of faces, precision is the share of pairs put in
  one cluster that are the same person; recall the share of same-person pairs put together.
  Dominated by large clusters (a cluster of n faces holds n(n-1)/2 pairs).
- **BCubed** (Bagga and Baldwin 1998; Amigó et al. 2009): per face, precision is the share of
  its cluster that is its person, recall the share of its person that is in its cluster,
  averaged over faces. Every face counts once, so singletons matter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edgeid.runtime.errors import BadInputError


@dataclass(frozen=True)
class ClusterScores:
    faces: int
    people: int
    clusters: int
    pairwise_precision: float
    pairwise_recall: float
    pairwise_f1: float
    bcubed_precision: float
    bcubed_recall: float
    bcubed_f1: float

    def to_json(self) -> dict[str, object]:
        return {
            "faces": self.faces,
            "people": self.people,
            "clusters": self.clusters,
            **{
                name: round(float(getattr(self, name)), 4)
                for name in (
                    "pairwise_precision",
                    "pairwise_recall",
                    "pairwise_f1",
                    "bcubed_precision",
                    "bcubed_recall",
                    "bcubed_f1",
                )
            },
        }


def _f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def score_clusters(predicted: npt.ArrayLike, truth: npt.ArrayLike) -> ClusterScores:
    """Scores of ``predicted`` cluster labels against ``truth`` identity labels (any hashable
    values, one per face)."""
    pred = np.unique(np.asarray(predicted), return_inverse=True)[1].ravel()
    true = np.unique(np.asarray(truth), return_inverse=True)[1].ravel()
    if len(pred) != len(true):
        raise BadInputError(f"{len(pred)} predicted labels for {len(true)} true labels")
    if not len(pred):
        raise BadInputError("no faces to score")
    # Contingency counts: faces per (cluster, person) cell, per cluster, per person.
    cells = np.unique(pred * (true.max() + 1) + true, return_counts=True)[1].astype(np.float64)
    per_cluster = np.bincount(pred).astype(np.float64)
    per_person = np.bincount(true).astype(np.float64)
    together = float((cells * (cells - 1) / 2).sum())
    clustered_pairs = float((per_cluster * (per_cluster - 1) / 2).sum())
    mated_pairs = float((per_person * (per_person - 1) / 2).sum())
    pair_p = together / clustered_pairs if clustered_pairs else 1.0
    pair_r = together / mated_pairs if mated_pairs else 1.0
    # BCubed: a face in cell (c, p) has precision n_cp / n_c and recall n_cp / n_p.
    cell_of = pred * (true.max() + 1) + true
    _, inverse, counts = np.unique(cell_of, return_inverse=True, return_counts=True)
    n_cp = counts[inverse.ravel()].astype(np.float64)
    b_p = float(np.mean(n_cp / per_cluster[pred]))
    b_r = float(np.mean(n_cp / per_person[true]))
    return ClusterScores(
        faces=len(pred),
        people=len(per_person),
        clusters=len(per_cluster),
        pairwise_precision=pair_p,
        pairwise_recall=pair_r,
        pairwise_f1=_f1(pair_p, pair_r),
        bcubed_precision=b_p,
        bcubed_recall=b_r,
        bcubed_f1=_f1(b_p, b_r),
    )
