"""The case report: one self-contained HTML file for the investigator's file, printable to PDF.

Thumbnails are embedded as ``data:`` URIs, the styles are inline (with print rules: a cluster
never splits across pages), and nothing is fetched from anywhere. Every text that came from
the media or the user (file names, reasons, subject names) is escaped. The file is written
only where the investigator asks, mode 0600, and never over an existing file unless asked.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable
from datetime import datetime
from html import escape
from pathlib import Path

from edgeid.runtime.cases.records import ClusterSearch, SourceFile
from edgeid.runtime.cases.views import CaseView, ClusterView, clustering_note, search_note
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
.notice { border: 2px solid #a00; padding: 0.5em 0.8em; margin: 1em 0; }
.cluster { border: 1px solid #888; padding: 0.5em 0.8em; margin: 0.8em 0; }
.faces { display: flex; flex-wrap: wrap; gap: 6px; }
.faces figure { margin: 0; text-align: center; font-size: 8pt; }
.faces img { width: 110px; height: 110px; display: block; border: 1px solid #666; }
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


def _e(value: object) -> str:
    # Direction marks shown, not obeyed: "ok/\u202egpj.exe" must not read as "ok/exe.jpg".
    return escape(visible_bidi(str(value)), quote=True)


def _time(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z").strip() if moment else "–"


def _seconds(value: float) -> str:
    minutes, seconds = divmod(value, 60)
    return f"{int(minutes)}:{seconds:04.1f}"


def _table(headers: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _leads(search: ClusterSearch | None) -> str:
    if search is None:
        return '<p class="muted">Not searched (no gallery to search).</p>'
    if search.error:
        return f'<p class="muted">Search failed: {_e(search.error)}</p>'
    answer = (
        f"{len(search.matches)} candidate(s) above the threshold"
        if search.matches
        else "No match: no candidate above the threshold"
    )
    parts = [
        f"<p><b>{_e(answer)}</b> (galleries: {_e(', '.join(search.galleries))}; age band "
        f"{_e(search.age_band)}; searched {_e(_time(search.searched_at))}).</p>",
        f'<p class="muted">{_e(search_note(search))}</p>',
    ]
    if search.leads:
        rows = [
            [
                str(lead.rank),
                _e(lead.gallery),
                f'{_e(lead.display_name)}<br><span class="mono">{_e(lead.subject_id)}</span>',
                f'<span class="{"above" if lead.above_threshold else ""}">{lead.score:.4f}</span>',
                _e(lead.band),
                "yes" if lead.above_threshold else "no",
            ]
            for lead in search.leads
        ]
        parts.append(_table(["Rank", "Gallery", "Subject", "Score", "Band", "Above"], rows))
    parts.append(f'<p class="muted">{_e(search.reliability_note)}</p>')
    return "".join(parts)


def _cluster(cluster: ClusterView, thumbnail: Thumbnail) -> str:
    figures = []
    for face in cluster.best:
        data = base64.b64encode(thumbnail(face.face_id)).decode("ascii")
        when = f" at {_seconds(face.time_s)}" if face.time_s is not None else ""
        figures.append(
            f'<figure><img alt="face" src="data:image/jpeg;base64,{data}">'
            f"<figcaption>quality {face.quality:.2f}{_e(when)}</figcaption></figure>"
        )
    rows = [
        [
            "<br>".join(_e(n) for n in a.file.names),
            str(a.faces),
            _e(", ".join(_seconds(t) for t in a.times_s)) or "–",
        ]
        for a in cluster.appearances
    ]
    return (
        f'<section class="cluster" id="cluster-{cluster.number}">'
        f"<h3>Cluster {cluster.number}: {len(cluster.faces)} face(s) in "
        f"{len(cluster.appearances)} file(s)</h3>"
        f'<div class="faces">{"".join(figures)}</div>'
        f"{_table(['File', 'Faces', 'Video times (m:s)'], rows)}"
        f"{_leads(cluster.search)}</section>"
    )


def _file_row(file: SourceFile) -> list[str]:
    what = file.media + (f", {file.frames} frames" if file.media == "video" else "")
    return [
        "<br>".join(_e(n) for n in file.names),
        f'<span class="mono">{_e(file.sha256 or "–")}</span>',
        _e(what),
        _e(file.status),
        str(file.faces),
        _e(file.reason or ""),
    ]


def render_report(view: CaseView, thumbnail: Thumbnail, *, generated_at: datetime) -> str:
    """The report of ``view`` as one HTML document."""
    meta = view.meta
    results = view.results
    runs = [
        [
            str(r.number),
            _e(_time(r.started_at)),
            _e(_time(r.finished_at)),
            _e(r.status + (f" ({r.note})" if r.note else "")),
            _e(r.user),
            _e(r.reason),
            _e(r.source),
            f"{r.frame_interval_s:g} s",
            _e(", ".join(r.galleries) or "none"),
            _e(
                {True: "yes", False: "no (adults only)", None: "not asked (adult thresholds)"}[
                    r.children
                ]
            ),
        ]
        for r in meta.runs
    ]
    method = (
        f"{results.method.replace('_', ' ')} over {results.faces} faces, computed "
        f"{_time(results.computed_at)}. "
        f"{clustering_note(results)}"
        if results
        else "not computed yet."
    )
    stale = (
        '<p class="notice">Faces were added after these clusters were computed: run the '
        "ingest again to update them.</p>"
        if view.stale and results
        else ""
    )
    clusters = "".join(_cluster(c, thumbnail) for c in view.clusters)
    problems = view.failed + view.partial
    file_headers = ["File", "SHA-256", "Type", "Status", "Faces", "Reason"]
    summary = _table(
        ["Files", "Failed", "Partial", "Faces", "Clusters"],
        [
            [
                str(len(view.files)),
                str(len(view.failed)),
                str(len(view.partial)),
                str(view.faces),
                str(len(view.clusters)),
            ]
        ],
    )
    run_table = _table(
        ["Run", "Started", "Finished", "Status", "User", "Reason", "Source", "Frames every",
         "Galleries", "May include children"],
        runs,
    )  # fmt: skip
    problem_table = _table(file_headers, map(_file_row, problems)) if problems else "<p>None.</p>"
    file_table = _table(file_headers, map(_file_row, view.files))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Case {_e(meta.number)}: faces and leads</title>
<style>{_STYLE}</style></head><body>
<h1>Case {_e(meta.number)}: faces and leads</h1>
<p class="muted">Generated {_e(_time(generated_at))} by edgeid on this box. Embedding model
{_e(meta.model_id)}. Case created {_e(_time(meta.created_at))} by {_e(meta.created_by)};
retention until {_e(meta.retention_until.isoformat() if meta.retention_until else "not set")}.
</p>
<p class="notice"><b>Leads, not identifications.</b> Every candidate below is an
investigative lead for a trained person to confirm against the source material. A score above
the threshold is not proof of identity; a missing candidate proves nothing. Clusters group
faces the model finds alike: check them before relying on them.</p>
<h2>Summary</h2>
{summary}
<p>Clustering: {_e(method)}</p>{stale}
<h2>Ingest runs</h2>
{run_table}
<h2>Clusters</h2>
{clusters or "<p>No faces were found.</p>"}
<h2>Files not read, or read in part</h2>
{problem_table}
<h2>Source files</h2>
{file_table}
</body></html>
"""


def write_report(html: str, out: Path, *, overwrite: bool = False) -> Path:
    """Write the report to ``out`` (mode 0600, atomically: a temporary file renamed over it);
    refuse an existing file unless ``overwrite``, and anything but a regular file always (a
    device node, FIFO or symlink is never replaced by a file of case data)."""
    if out.is_dir() and not out.is_symlink():
        raise BadInputError(f"{out} is a folder; give a file name such as report.html")
    write_user_file(out, html.encode("utf-8"), force=overwrite, action="writing the report")
    return out
