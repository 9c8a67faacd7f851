"""The case page's selection (edgeid/runtime/cases/browse.py) and a cluster's best faces
(views.ClusterView.best) on case views built in memory: clusters with a lead above the
threshold first, lead filters by threshold and gallery, paging, and no face under the quality
gate among a cluster's best. No models needed."""

from __future__ import annotations

from datetime import datetime

import numpy as np

from edgeid.runtime.cases.browse import CaseFilter, browse
from edgeid.runtime.cases.records import CaseFace, CaseMeta, ClusterSearch, Lead
from edgeid.runtime.cases.views import BEST_FACES, BEST_MIN_QUALITY, CaseView, ClusterView
from edgeid.runtime.compat import UTC

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
THRESHOLD = 0.925


def face(face_id: str, quality: float) -> CaseFace:
    return CaseFace(
        face_id=face_id,
        file_record="r1",
        file_sha256="0" * 64,
        box=(0, 0, 10, 10),
        score=0.99,
        quality=quality,
        quality_limiting="blur",
        embedding=np.zeros(128, dtype=np.float32),
        thumb=(0, 0),
    )


def lead(rank: int, score: float, gallery: str = "office") -> Lead:
    return Lead(
        rank=rank,
        gallery=gallery,
        subject_id=f"s{rank}-{gallery}",
        display_name=f"Subject {rank}",
        face_id=f"f{rank}",
        probe_face_id="p",
        score=score,
        band="strong" if score >= THRESHOLD else "below threshold",
        above_threshold=score >= THRESHOLD,
    )


def cluster(number: int, scores: list[tuple[float, str]], faces: int = 2) -> ClusterView:
    search = ClusterSearch(
        galleries=("office", "other"),
        operating_fmr=1e-4,
        threshold=THRESHOLD,
        probe_faces=("p",),
        leads=tuple(lead(i, s, g) for i, (s, g) in enumerate(scores, start=1)),
        reliability_note="same note",
        searched_at=NOW,
        threshold_note="same threshold",
    )
    members = tuple(face(f"c{number}-{i}", 0.9) for i in range(faces))
    return ClusterView(number, members, (), search)


def case(*clusters: ClusterView) -> CaseView:
    meta = CaseMeta("id", "VID-1", NOW, "investigator", "model")
    return CaseView(meta, (), sum(len(c.faces) for c in clusters), None, clusters)


def test_clusters_with_a_lead_above_the_threshold_come_first_strongest_first() -> None:
    view = case(
        cluster(1, [(0.80, "office"), (0.79, "office")], faces=9),  # big, nothing above
        cluster(2, [(0.93, "office"), (0.85, "other")]),
        cluster(3, [(0.97, "other"), (0.95, "office"), (0.70, "office")]),
        cluster(4, [(0.81, "office")], faces=3),
    )
    page = browse(view, CaseFilter())
    assert [r.cluster.number for r in page.rows] == [3, 2, 1, 4]
    assert (page.matched_clusters, page.above, page.below) == (2, 3, 5)
    # Only leads above the threshold by default; what is held back is counted, not lost.
    assert [lead.score for lead in page.rows[0].leads] == [0.97, 0.95]
    assert page.rows[0].hidden_below == 1
    assert page.rows[2].leads == () and page.rows[2].hidden_below == 2
    assert page.common_notes == ("same threshold", "same note")


def test_the_filters_show_below_the_threshold_all_above_first_and_one_gallery() -> None:
    view = case(
        cluster(1, [(0.80, "office")]),
        cluster(2, [(0.96, "office"), (0.90, "other"), (0.85, "office")]),
    )
    below = browse(view, CaseFilter(leads="below"))
    assert [lead.score for lead in below.rows[0].leads] == [0.90, 0.85]
    assert below.rows[0].hidden_above == 1
    every = browse(view, CaseFilter(leads="all"))
    assert [lead.above_threshold for lead in every.rows[0].leads] == [True, False, False]
    other = browse(view, CaseFilter(leads="all", gallery="other"))
    assert [lead.gallery for r in other.rows for lead in r.leads] == ["other"]
    assert other.above == 0 and other.matched_clusters == 0
    only = browse(view, CaseFilter(matched_only=True))
    assert [r.cluster.number for r in only.rows] == [2] and only.clusters == 1
    assert sorted(browse(view, CaseFilter()).galleries) == ["office", "other"]


def test_clusters_are_paged_and_the_filter_survives_the_page_links() -> None:
    view = case(*(cluster(n, [(0.5 + n / 100, "office")]) for n in range(1, 8)))
    first = browse(view, CaseFilter(leads="all"), per_page=3)
    assert (first.page, first.pages, first.clusters, len(first.rows)) == (1, 3, 7, 3)
    last = browse(view, CaseFilter(leads="all", page=3), per_page=3)
    assert [r.cluster.number for r in last.rows] == [7]  # no match, equal sizes: by number
    past = browse(view, CaseFilter(page=99), per_page=3)
    assert past.page == 3  # a page past the end shows the last one
    wanted = CaseFilter.parse({"leads": "all", "gallery": "office", "page": "2"})
    assert wanted.query(page=3) == {"leads": "all", "gallery": "office", "page": "3"}
    assert CaseFilter.parse({"leads": "everything", "page": "-1"}) == CaseFilter()


def test_a_cluster_s_best_faces_pass_the_quality_gate_clearest_first() -> None:
    qualities = [0.0, 0.93, 0.2, 0.97, BEST_MIN_QUALITY, 0.49, 0.6, 0.7, 0.8, 0.9]
    members = tuple(face(f"q{i}", q) for i, q in enumerate(qualities))
    view = ClusterView(1, members, (), None)
    best = [f.quality for f in view.best]
    assert best == [0.97, 0.93, 0.9, 0.8, 0.7, 0.6][:BEST_FACES]
    assert all(q >= BEST_MIN_QUALITY for q in best) and 0.0 not in best
    assert view.below_gate == 3 and view.clearest is None
    blurred = ClusterView(2, (face("a", 0.0), face("b", 0.3)), (), None)
    assert blurred.best == ()
    assert blurred.clearest is not None and blurred.clearest.face_id == "b"
