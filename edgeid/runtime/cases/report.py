"""The case report: one self-contained HTML file for the investigator's file, printable to PDF.

Thumbnails are embedded as ``data:`` URIs, the styles are inline (with print rules: a cluster
never splits across pages), and nothing is fetched from anywhere. Every text that came from
the media or the user (file names, reasons, subject names) is escaped. The file is written
only where the investigator asks, mode 0600, and never over an existing file unless asked.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
import markupsafe

from edgeid.runtime.cases.records import CaseFace, ClusterSearch, Lead
from edgeid.runtime.cases.report_template import REPORT_TEMPLATE
from edgeid.runtime.cases.views import (
    BEST_MIN_QUALITY,
    CaseView,
    ClusterView,
    clustering_note,
    search_note,
)
from edgeid.runtime.display import visible_bidi
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.storage.safe_read import write_user_file

Thumbnail = Callable[[str], bytes]  # face id -> JPEG

_STYLE = """
body { font: 11pt/1.35 system-ui, sans-serif; margin: 2em; color: #111; }
h1 { font-size: 18pt; margin-bottom: 0.2em; }
h2 { font-size: 14pt; border-bottom: 1px solid #999; margin-top: 1.6em; }
h3 { font-size: 12pt; margin: 0.4em 0; }
table { border-collapse: collapse; width: 100%; margin: 0.4em 0 0.8em; }
th, td { border: 1px solid #bbb; padding: 2px 5px; text-align: left; vertical-align: top; }
th { background: #eee; }
@media (max-width: 900px) { body { margin: .6em; } td, th { overflow-wrap: anywhere; }
  .pair { flex-direction: column; } }
.notice { border: 2px solid #a00; padding: 0.5em 0.8em; margin: 1em 0; }
.cluster { border: 1px solid #888; padding: 0.5em 0.8em; margin: 0.8em 0; }
.faces { display: flex; flex-wrap: wrap; gap: 6px; }
.faces figure { margin: 0; text-align: center; font-size: 8pt; }
.faces img { width: 110px; height: 110px; display: block; border: 1px solid #666; }
.pair { display: flex; gap: 4px; }
.pair figure { margin: 0; text-align: center; font-size: 8pt; }
.pair img { width: 90px; height: 90px; display: block; border: 1px solid #666; }
.gone { width: 90px; height: 90px; border: 1px dashed #999; font-size: 8pt; display: flex;
  align-items: center; justify-content: center; text-align: center; }
tr.below { color: #444; }
.mono { font-family: ui-monospace, monospace; font-size: 8.5pt; word-break: break-all; }
.above { font-weight: bold; }
.muted { color: #555; }
@media (max-width: 900px) { body { margin: 1em; } td { overflow-wrap: anywhere; } }
@media print {
  body { margin: 0; font-size: 9.5pt; }
  .cluster, tr, figure { page-break-inside: avoid; break-inside: avoid; }
  h2 { page-break-after: avoid; break-after: avoid; }
  a { color: inherit; text-decoration: none; }
}
"""


Enrolled = Callable[[str, str], bytes | None]  # (gallery, face id) -> JPEG, None if gone


def _shown(value: object) -> object:
    # Direction marks shown, not obeyed: "ok/\u202egpj.exe" must not read as "ok/exe.jpg".
    if isinstance(value, str) and not isinstance(value, markupsafe.Markup):
        return visible_bidi(value)
    return value


def _time(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z").strip() if moment else "–"


def _seconds(value: float) -> str:
    minutes, seconds = divmod(value, 60)
    return f"{int(minutes)}:{seconds:04.1f}"


def _data_uri(jpeg: bytes | None) -> str:
    if not jpeg:
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


_ENV = jinja2.Environment(
    loader=jinja2.DictLoader({"report.html": REPORT_TEMPLATE}),
    autoescape=True,  # every file name, reason and subject name is escaped
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    finalize=_shown,
)
_ENV.filters["time"] = _time
_ENV.filters["seconds"] = _seconds


@dataclass(frozen=True)
class _LeadRow:
    lead: Lead
    probe: str  # data URI of the case face that scored it
    enrolled: str  # data URI of the enrolled face it scored against ("" if erased since)


@dataclass(frozen=True)
class _ClusterRow:
    cluster: ClusterView
    faces: tuple[tuple[CaseFace, str], ...]  # best faces with their data URIs
    clearest: tuple[CaseFace, str] | None
    search: ClusterSearch | None
    note: str
    leads: tuple[_LeadRow, ...]


def _cluster(cluster: ClusterView, thumbnail: Thumbnail, enrolled: Enrolled) -> _ClusterRow:
    search = cluster.search
    leads: tuple[_LeadRow, ...] = ()
    if search is not None and not search.error:
        ordered = sorted(search.leads, key=lambda lead: (not lead.above_threshold, -lead.score))
        leads = tuple(
            _LeadRow(
                lead,
                _data_uri(thumbnail(lead.probe_face_id)),
                _data_uri(enrolled(lead.gallery, lead.face_id)),
            )
            for lead in ordered
        )
    clearest = cluster.clearest
    return _ClusterRow(
        cluster=cluster,
        faces=tuple((f, _data_uri(thumbnail(f.face_id))) for f in cluster.best),
        clearest=(clearest, _data_uri(thumbnail(clearest.face_id))) if clearest else None,
        search=search,
        note=search_note(search) if search else "",
        leads=leads,
    )


def _no_enrolled(gallery: str, face_id: str) -> bytes | None:
    return None


def render_report(
    view: CaseView,
    thumbnail: Thumbnail,
    *,
    generated_at: datetime,
    enrolled: Enrolled = _no_enrolled,
) -> str:
    """The report of ``view`` as one HTML document; ``enrolled`` gives each lead's enrolled
    photo, shown beside the case face that scored it."""
    results = view.results
    method = (
        f"{results.method.replace('_', ' ')} over {results.faces} faces, computed "
        f"{_time(results.computed_at)}. {clustering_note(results)}"
        if results
        else "not computed yet."
    )
    return _ENV.get_template("report.html").render(
        view=view,
        meta=view.meta,
        method=method,
        stale=view.stale and results is not None,
        clusters=[_cluster(c, thumbnail, enrolled) for c in view.clusters],
        problems=view.failed + view.partial,
        generated_at=generated_at,
        style=markupsafe.Markup(_STYLE),  # a constant of this module, never user text
        min_quality=BEST_MIN_QUALITY,
        children={True: "yes", False: "no (adults only)", None: "not asked (adult thresholds)"},
    )


def write_report(html: str, out: Path, *, overwrite: bool = False) -> Path:
    """Write the report to ``out`` (mode 0600, atomically: a temporary file renamed over it);
    refuse an existing file unless ``overwrite``, and anything but a regular file always (a
    device node, FIFO or symlink is never replaced by a file of case data)."""
    if out.is_dir() and not out.is_symlink():
        raise BadInputError(f"{out} is a folder; give a file name such as report.html")
    write_user_file(out, html.encode("utf-8"), force=overwrite, action="writing the report")
    return out
