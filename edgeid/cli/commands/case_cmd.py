"""`edgeid case ...`: ingest a folder or archive of seized media into a case, list cases, show
a case's clusters and leads, write its report, purge it.

Like the gallery commands these open the box's data for one process: stop `edgeid serve`
first. They go through the accountable service layer as ``os:<login>``: an ingest is recorded
before it starts (and each cluster search as it runs), showing a case, writing its report and
purging it are recorded with their reason. ``list`` shows numbers and counts only.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import date
from pathlib import Path
from types import FrameType

from edgeid.cli import EXIT_FAILED, EXIT_OK, emit, path_arg, safe_text
from edgeid.cli.commands import accountable
from edgeid.cli.commands.approvals_cmd import administration, outcome_json, outcome_text
from edgeid.cli.options import Subparsers
from edgeid.runtime.audit.justification import Justification, check_reason
from edgeid.runtime.cases.farmed import ImageFarm
from edgeid.runtime.cases.ingest import IngestOutcome, IngestProgress
from edgeid.runtime.cases.records import CaseMeta
from edgeid.runtime.cases.store import CaseStore
from edgeid.runtime.cases.video import DEFAULT_FRAME_INTERVAL_S, MIN_FRAME_INTERVAL_S
from edgeid.runtime.cases.views import CaseView, file_json, meta_json, run_json, view_json
from edgeid.runtime.cluster.opening import open_farm
from edgeid.runtime.config.settings import load_settings
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.gallery.service import GalleryService
from edgeid.runtime.gallery.store import GalleryStore
from edgeid.runtime.services.caller import LocalOperator
from edgeid.runtime.storage.safe_read import check_output_path
from edgeid.runtime.vault.key_choice import provider_for

PROGRESS_REFRESH_S = 0.2  # terminal progress bar redraws at most this often
PROGRESS_LINE_S = 5.0  # without a terminal (logs, pipes): one progress line this often
BAR_WIDTH = 24
EXPIRED_REASON = "past its retention date"  # the reason recorded for `case purge --expired`


# -- opening -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _case_store(args: argparse.Namespace) -> Iterator[CaseStore]:
    """The cases without the face pipeline or the audit log: for ``list`` (numbers and counts,
    nothing personal, so nothing to record)."""
    settings = load_settings(args.home_dir)
    with (
        GalleryStore(args.home_dir, provider_for(args.home_dir, settings.keys)) as galleries,
        CaseStore(args.home_dir, galleries.keyring) as store,
    ):
        yield store


# -- progress (counts only: no names, no faces) -----------------------------------------------


class ProgressBar:
    """Draws the ingest's counts on stderr: a bar on a terminal, a line now and then elsewhere."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._last = 0.0
        self._drawn = False

    def __call__(self, p: IngestProgress) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        final = p.phase in ("done", "stopped")
        if not final and now - self._last < (PROGRESS_REFRESH_S if self.tty else PROGRESS_LINE_S):
            return
        self._last = now
        done = p.files_seen / p.files_total if p.files_total else 1.0
        filled = round(BAR_WIDTH * done)
        text = (
            f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] files {p.files_seen}/{p.files_total}"
            f"  new {p.files_new}  duplicate {p.files_duplicate}  done before "
            f"{p.files_already_done}  failed {p.files_failed}  faces {p.faces_new}"
            f"  video frames {p.video_frames}  {p.phase}"
        )
        if p.phase == "searching":
            text += f" {p.clusters_searched}/{p.clusters}"
        if p.nodes:
            live = [n for n in p.nodes if n["alive"]]
            rate = sum(float(str(n["files_per_s"])) for n in live)
            text += f"  nodes {len(live)} ({rate:.1f} images and frames/s)"
        if self.tty:
            print(f"\r{text}\x1b[K", end="", file=sys.stderr, flush=True)
            self._drawn = True
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._drawn:
            print(file=sys.stderr)
            self._drawn = False


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the run like Ctrl-C: the file in hand is dropped, the run marked stopped."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- handlers ----------------------------------------------------------------------------------


def _outcome_json(outcome: IngestOutcome) -> dict[str, object]:
    results = outcome.results
    clusters = results.clusters if results else ()
    return {
        "case": outcome.case.meta.number,
        "run": run_json(outcome.run),
        "progress": outcome.progress.to_json(),
        "faces": len(outcome.case.faces()),
        "clusters": len(clusters),
        "clusters_with_leads_above_threshold": sum(
            1 for c in clusters if c.search and c.search.matches
        ),
        "failed_files": [file_json(f) for f in outcome.failed],
    }


WHERE = "edgeid case"


def ingest(args: argparse.Namespace) -> int:
    why = Justification.of(args.case, args.reason)
    if not (args.path.exists() or args.path.is_symlink()):  # refused before it is recorded
        raise BadInputError(
            f"{args.path}: no such file or folder; give the media folder or archive"
        )
    bar = ProgressBar(enabled=not args.no_progress)
    try:
        with _terminate_as_interrupt(), accountable.cases(args.home_dir, inference=True) as door:
            known = [g.name for g in door.galleries.list_galleries()]
            galleries = tuple(dict.fromkeys(args.galleries)) if args.galleries else None
            for name in galleries or ():
                if name not in known:  # refused before anything is recorded
                    raise BadInputError(
                        f"no gallery named {name!r}; list them with edgeid gallery list"
                    )
            # Recorded before the ingest starts; its cluster searches are recorded one by one.
            door.cases.record_ingest(
                door.caller,
                why,
                galleries if galleries is not None else known,
                source_sha256=None,
                detail=(
                    f"source {args.path}; frame interval {args.frame_interval:g} s; may include "
                    f"children {'as the case is set' if args.children is None else args.children}"
                ),
                where=f"{WHERE} ingest",
            )
            request = door.cases.ingest_request(
                door.caller,
                why,
                args.path,
                galleries=galleries,
                frame_interval_s=args.frame_interval,
                retention_until=args.retain_until,
                children=args.children,
            )
            with _farm(args, door.cases.cases.galleries) as farm:
                outcome = door.cases.cases.ingest(request, progress=bar, farm=farm)
    finally:
        bar.close()
    p = outcome.progress
    payload = _outcome_json(outcome)
    lines = [
        f"case {outcome.case.meta.number}: run {outcome.run.number} {outcome.run.status}",
        f"files: {p.files_seen} of {p.files_total} seen, {p.files_new} read, "
        f"{p.files_duplicate} duplicates, {p.files_already_done} done before, "
        f"{p.files_failed} failed",
        f"faces: {p.faces_new} new, {payload['faces']} in the case; clusters: "
        f"{payload['clusters']} ({payload['clusters_with_leads_above_threshold']} with a lead "
        "above threshold)",
    ]
    if outcome.failed:
        lines.append("files not read (name: reason):")
        lines += [f"  {_names(f.names)}: {safe_text(f.reason)}" for f in outcome.failed]
    lines.append(f"see the clusters with: edgeid case show {outcome.case.meta.number!r}")
    emit(args, payload, "\n".join(lines))
    return EXIT_OK if outcome.run.status == "complete" else EXIT_FAILED


@contextlib.contextmanager
def _farm(args: argparse.Namespace, galleries: GalleryService) -> Iterator[ImageFarm | None]:
    """The cluster the images go to with ``--cluster``; None (this box) without."""
    if args.cluster is None:
        yield None
        return
    with open_farm(args.home_dir, load_settings(args.home_dir), galleries, args.cluster) as farm:
        yield farm


def _names(names: Iterable[str]) -> str:
    # File names come from seized media: a newline or an escape sequence in one must not
    # forge an output line or clear the operator's screen.
    return ", ".join(safe_text(n) for n in names)


def _meta_line(meta: CaseMeta) -> str:
    last = meta.last_run
    s = meta.summary
    retention = meta.retention_until.isoformat() if meta.retention_until else "-"
    return (
        f"{safe_text(meta.number):20} {meta.created_at:%Y-%m-%d}  {s.files:>6} files "
        f"{s.faces:>7} faces "
        f"{s.clusters:>6} clusters {s.leads_above_threshold:>5} with leads  retain until "
        f"{retention}  last run: {last.status if last else 'none'}"
    )


def list_cases(args: argparse.Namespace) -> int:
    with _case_store(args) as store:
        metas = store.list_cases()
        expired = {m.case_id for m in store.expired()}
        damaged = store.damaged_cases()
    payload = [{**meta_json(m), "expired": m.case_id in expired} for m in metas]
    payload += [{"id": cid, "damaged": problem} for cid, problem in damaged.items()]
    lines = [_meta_line(m) + ("  EXPIRED" if m.case_id in expired else "") for m in metas]
    lines += [f"{cid:20} DAMAGED: {problem}" for cid, problem in damaged.items()]
    emit(args, payload, "\n".join(lines) or "no cases")
    return EXIT_OK


def _show_text(view: CaseView) -> str:
    meta = view.meta
    lines = [
        f"case {safe_text(meta.number)}: {len(view.files)} files, {view.faces} faces, "
        f"{len(view.clusters)} clusters",
    ]
    if view.results and view.stale:
        lines.append("faces were added after the clusters were computed: run the ingest again")
    if view.results:
        lines.append(f"clustered as age band {view.results.age_band}: {view.clustering_note}")
    for c in view.clusters:
        top = ""
        if c.search and c.search.error:
            top = f"; search failed: {safe_text(c.search.error)}"
        elif c.search and c.search.leads:
            lead = c.search.leads[0]
            top = (
                f"; top lead {safe_text(lead.gallery)}/{lead.subject_id} "
                f"{safe_text(lead.display_name)} "
                f"{lead.score:.4f} ({lead.band})"
            )
        elif c.search:
            top = "; no candidates"
        lines.append(
            f"cluster {c.number:>4}: {len(c.faces):>4} faces in {len(c.appearances):>4} files{top}"
        )
    for f in view.failed + view.partial:
        lines.append(f"{f.status}: {_names(f.names)}: {safe_text(f.reason)}")
    return "\n".join(lines)


def show(args: argparse.Namespace) -> int:
    with accountable.cases(args.home_dir) as door:
        view = door.cases.view(door.caller, args.case, args.reason, where=f"{WHERE} show")
    emit(args, view_json(view), _show_text(view))
    return EXIT_OK


def report(args: argparse.Namespace) -> int:
    out: Path = args.out
    # Refused before the report is made and recorded: only a new file, or with --force a
    # regular file (never a device, FIFO or symlink).
    check_output_path(out, force=args.force)
    with accountable.cases(args.home_dir) as door:
        written = door.cases.write_report(
            door.caller, args.case, args.reason, out, overwrite=args.force, where=f"{WHERE} report"
        )
    text = f"report written to {written} (mode 0600)"
    emit(args, {"case": args.case, "report": str(written)}, text)
    return EXIT_OK


def purge(args: argparse.Namespace) -> int:
    if not args.yes:
        raise BadInputError("purging erases the case's files, faces and leads for good; add --yes")
    if bool(args.case) == bool(args.expired):
        raise BadInputError("give a case number, or --expired for every case past its retention")
    caller, where = LocalOperator.current(), "cli case purge"
    reason = check_reason(args.reason or (EXPIRED_REASON if args.expired else None))
    with administration(args.home_dir, galleries=True) as approvals:
        if not args.expired:
            # Past its retention date: at once; before it, the two-person rule.
            outcome = approvals.purge_case(caller, args.case, reason=reason, where=where)
            if not outcome.done:
                waiting = outcome_json(outcome, approvals.ttl)["proposal"]
                emit(args, {"purged": [], "proposal": waiting}, outcome_text(outcome))
                return EXIT_OK
            purged = [outcome.case] if outcome.case else []
        else:
            cases = approvals.cases
            assert cases is not None  # opened with the galleries
            purged = [cases.purge(caller, m.case_id, reason, where=where) for m in cases.expired()]
    text = "\n".join(f"purged case {m.number}" for m in purged)
    emit(args, {"purged": [m.number for m in purged]}, text or "no case is past its retention date")
    return EXIT_OK


def repair(args: argparse.Namespace) -> int:
    from edgeid.runtime.services.repair import AccountableRepair

    reason = check_reason(args.reason)
    with accountable.cases(args.home_dir) as door:
        repairs = AccountableRepair(door.galleries, door.cases.recorder, door.cases.cases.store)
        salvaged = repairs.repair_case(
            door.caller, args.case, reason=reason, where=f"{WHERE} repair"
        )
    payload = {
        "case_id": salvaged.case_id,
        "files": len(salvaged.files),
        "faces": len(salvaged.faces),
        "lost_records": salvaged.lost_records,
        "faces_of_lost_files": salvaged.orphaned_faces,
        "faces_without_thumbnail": salvaged.lost_thumbnails,
        "damaged_spans": salvaged.damaged_spans,
        "results_lost": salvaged.results_lost,
    }
    lines = [f"repaired case {salvaged.case_id}: {salvaged.summary()}"]
    lines += [f"lost record {rid}" for rid in salvaged.lost_records]
    emit(args, payload, "\n".join(lines))
    return EXIT_OK


# -- arguments ---------------------------------------------------------------------------------


def _date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {value!r}") from None


def _retain_until(value: str) -> date:
    """A retention date not yet past: a past one would let the next ``purge --expired`` erase
    the case just ingested."""
    day = _date(value)
    if day < date.today():
        raise argparse.ArgumentTypeError(
            f"{value} is in the past; give the date until which the case must be kept"
        )
    return day


# Longer than any video a seized device holds: beyond it one frame per video is sampled anyway.
MAX_FRAME_INTERVAL_S = 24 * 3600.0


def _interval(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not MIN_FRAME_INTERVAL_S <= seconds <= MAX_FRAME_INTERVAL_S:  # also refuses nan, inf
        raise argparse.ArgumentTypeError(
            f"expected seconds between sampled video frames, from {MIN_FRAME_INTERVAL_S:g} to "
            f"{MAX_FRAME_INTERVAL_S:g}, got {value!r}"
        )
    return seconds


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    case = sub.add_parser(
        "case", help="case ingest: seized media in, clustered faces and leads out"
    )
    actions = case.add_subparsers(dest="case_command", required=True, metavar="ACTION")

    p = actions.add_parser(
        "ingest",
        parents=[common],
        help="add a folder, zip or tar of images and videos to a case (resumes a stopped run)",
    )
    p.add_argument("path", type=path_arg, metavar="PATH", help="folder, .zip, .tar[.gz|.bz2|.xz]")
    p.add_argument("--case", help="case number (required; created on first ingest)")
    accountable.reason_option(p, "why this media is searched")
    p.add_argument(
        "--galleries",
        nargs="+",
        metavar="G",
        help="galleries to search each cluster in (default: every gallery on the box)",
    )
    p.add_argument(
        "--frame-interval",
        type=_interval,
        default=DEFAULT_FRAME_INTERVAL_S,
        metavar="S",
        help=f"seconds between sampled video frames (default {DEFAULT_FRAME_INTERVAL_S:g})",
    )
    p.add_argument(
        "--retain-until", type=_retain_until, help="the case's retention date, YYYY-MM-DD"
    )
    p.add_argument(
        "--children",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether the case's faces may include children (default: on for a new case, "
        "else the case's setting): clustered with the child threshold, which keeps different "
        "children apart at a cost of more, smaller clusters; --no-children: adults only",
    )
    p.add_argument(
        "--cluster",
        nargs="?",
        const="",
        default=None,
        metavar="HOST:PORT",
        help="analyse the images on the lab's cluster whose head is HOST:PORT (default: "
        "[cluster] address in edgeid.toml); this box still reads, deduplicates, clusters, "
        "searches and records",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    p.set_defaults(handler=ingest)

    p = actions.add_parser("list", parents=[common], help="cases on this box, with their counts")
    p.set_defaults(handler=list_cases)

    p = actions.add_parser("show", parents=[common], help="a case's clusters, leads and files")
    p.add_argument("case", metavar="N", help="case number")
    accountable.reason_option(p, "why you open this case")
    p.set_defaults(handler=show)

    p = actions.add_parser(
        "report", parents=[common], help="the case report: one HTML file, printable to PDF"
    )
    p.add_argument("case", metavar="N", help="case number")
    p.add_argument("--out", required=True, type=path_arg, metavar="FILE.html")
    accountable.reason_option(p, "why the report is made")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(handler=report)

    p = actions.add_parser("purge", parents=[common], help="erase a case as a unit")
    p.add_argument("case", metavar="N", nargs="?", help="case number")
    p.add_argument("--expired", action="store_true", help="every case past its retention date")
    accountable.reason_option(p, "why it is erased")
    p.add_argument("--yes", action="store_true", help="confirm the erasure")
    p.set_defaults(handler=purge)

    p = actions.add_parser(
        "repair", parents=[common], help="rewrite a damaged case from what still reads"
    )
    p.add_argument("case", metavar="N", help="case number, or its id when the number is lost")
    accountable.reason_option(p, "why it is repaired")
    p.set_defaults(handler=repair)
