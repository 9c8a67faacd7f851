"""A case page that scales: clusters with a lead above the threshold first, leads filtered
(above or below the threshold, one gallery) and the clusters paged.

A case of 30 photos can hold dozens of clusters and hundreds of leads, nearly all of them below
the threshold. Shown all at once they bury the few that matter, so the page shows the leads above
the threshold by default and says how many weaker ones it holds back; the investigator asks for
them explicitly. Pure functions over a ``CaseView``: the web page and tests share them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from edgeid.runtime.cases.records import Lead
from edgeid.runtime.cases.views import CaseView, ClusterView

LeadShow = Literal["above", "below", "all"]
LEAD_SHOWS: tuple[LeadShow, ...] = get_args(LeadShow)
PAGE_CLUSTERS = 10  # clusters per page: a screenful or two each, a short page to print


@dataclass(frozen=True)
class CaseFilter:
    """What the investigator asked to see. ``parse`` never refuses: an unknown value falls
    back to the default (a hand-edited address still shows the case)."""

    leads: LeadShow = "above"
    gallery: str | None = None
    matched_only: bool = False  # only clusters with a lead above the threshold
    page: int = 1

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> CaseFilter:
        leads = params.get("leads", "above")
        page = params.get("page", "1")
        return cls(
            leads=leads if leads in LEAD_SHOWS else "above",
            gallery=params.get("gallery", "").strip() or None,
            matched_only=params.get("matched") == "yes",
            page=int(page) if page.isdigit() and int(page) > 0 else 1,
        )

    def query(self, **changes: object) -> dict[str, str]:
        """The filter as query parameters (for links to other pages of the same view)."""
        values: dict[str, object] = {
            "leads": self.leads,
            "gallery": self.gallery or "",
            "matched": "yes" if self.matched_only else "",
            "page": self.page,
            **changes,
        }
        return {k: str(v) for k, v in values.items() if v not in ("", None)}


@dataclass(frozen=True)
class ClusterRow:
    """One cluster as shown: the leads the filter lets through, and what it held back."""

    cluster: ClusterView
    leads: tuple[Lead, ...]  # above the threshold first, then by score
    matches: int  # leads above the threshold (in the chosen gallery)
    hidden_below: int  # leads below the threshold the filter held back
    hidden_above: int  # leads above the threshold the filter held back
    best_match: float  # the highest score above the threshold (0 without one)


@dataclass(frozen=True)
class CasePage:
    rows: tuple[ClusterRow, ...]
    wanted: CaseFilter
    page: int  # the page shown (the last one when asked for one past it)
    pages: int
    clusters: int  # clusters the filter lets through, on every page
    matched_clusters: int  # clusters with a lead above the threshold
    above: int  # leads above the threshold, every cluster (in the chosen gallery)
    below: int
    galleries: tuple[str, ...]  # galleries holding a lead, for the gallery menu
    # The threshold and reliability notes when every searched cluster shares them (shown once
    # above the clusters instead of once per cluster); empty when they differ.
    common_notes: tuple[str, ...]


def _leads(cluster: ClusterView, gallery: str | None) -> tuple[Lead, ...]:
    search = cluster.search
    if search is None or search.error:
        return ()
    leads = [lead for lead in search.leads if gallery is None or lead.gallery == gallery]
    return tuple(sorted(leads, key=lambda lead: (not lead.above_threshold, -lead.score, lead.rank)))


def _row(cluster: ClusterView, wanted: CaseFilter) -> ClusterRow:
    leads = _leads(cluster, wanted.gallery)
    above = tuple(lead for lead in leads if lead.above_threshold)
    below = tuple(lead for lead in leads if not lead.above_threshold)
    shown = {"above": above, "below": below, "all": leads}[wanted.leads]
    return ClusterRow(
        cluster=cluster,
        leads=shown,
        matches=len(above),
        hidden_below=0 if wanted.leads != "above" else len(below),
        hidden_above=len(above) if wanted.leads == "below" else 0,
        best_match=max((lead.score for lead in above), default=0.0),
    )


def _order(row: ClusterRow) -> tuple[int, float, int, int]:
    """Clusters with a lead above the threshold first (strongest first), then the largest."""
    return (0 if row.matches else 1, -row.best_match, -len(row.cluster.faces), row.cluster.number)


def browse(view: CaseView, wanted: CaseFilter, *, per_page: int | None = None) -> CasePage:
    """One page of ``view`` as ``wanted`` filters it (``PAGE_CLUSTERS`` clusters a page
    unless ``per_page``); see the module docstring."""
    per_page = per_page or PAGE_CLUSTERS
    rows = sorted((_row(c, wanted) for c in view.clusters), key=_order)
    matched = sum(1 for r in rows if r.matches)
    above = sum(r.matches for r in rows)
    below = sum(len(_leads(r.cluster, wanted.gallery)) - r.matches for r in rows)
    if wanted.matched_only:
        rows = [r for r in rows if r.matches]
    pages = max(1, math.ceil(len(rows) / per_page))
    page = min(wanted.page, pages)
    notes = {
        (c.search_note, c.search.reliability_note)
        for c in view.clusters
        if c.search is not None and not c.search.error
    }
    galleries = sorted({lead.gallery for c in view.clusters if c.search for lead in c.search.leads})
    return CasePage(
        rows=tuple(rows[(page - 1) * per_page : page * per_page]),
        wanted=wanted,
        page=page,
        pages=pages,
        clusters=len(rows),
        matched_clusters=matched,
        above=above,
        below=below,
        galleries=tuple(galleries),
        common_notes=tuple(n for n in next(iter(notes)) if n) if len(notes) == 1 else (),
    )
