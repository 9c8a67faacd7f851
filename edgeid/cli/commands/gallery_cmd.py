"""`edgeid gallery ...`: create, list, subjects, enroll, add-photo, edit, search, verify,
delete, export, import, repair, rotate-key, re-embed.

The galleries are opened by one process at a time: stop `edgeid serve` before using these on
the same state directory. Every command but ``list`` goes through the accountable service
layer as ``os:<login>`` and is recorded in the audit log; what reveals names or faces (search,
verify, subjects, export) needs a case number and a reason, erasures and imports a reason.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

from edgeid.cli import EXIT_OK, emit, safe_text
from edgeid.cli.commands import accountable
from edgeid.cli.commands.approvals_cmd import administration, outcome_json, outcome_text
from edgeid.cli.options import Subparsers, positive_int
from edgeid.runtime.audit.justification import Justification, check_reason
from edgeid.runtime.config.settings import load_settings
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.gallery.errors import BackupError
from edgeid.runtime.gallery.records import GalleryInfo
from edgeid.runtime.gallery.service import (
    AGE_BANDS,
    DEFAULT_TOP_K,
    Candidate,
    DuplicateSubjectError,
)
from edgeid.runtime.gallery.store import GalleryStore
from edgeid.runtime.gallery.thresholds import CALIBRATED_FMRS, DEFAULT_OPERATING_FMR
from edgeid.runtime.inference.image_decode import MAX_IMAGE_BYTES
from edgeid.runtime.services.caller import LocalOperator
from edgeid.runtime.services.keys import rotate_kek
from edgeid.runtime.storage.safe_read import (
    check_output_path,
    check_regular_file,
    read_user_file,
    read_user_text,
)
from edgeid.runtime.vault.errors import DecryptionError
from edgeid.runtime.vault.key_choice import best_available, make_provider, provider_for

BACKUP_PASSPHRASE_ENV = "EDGEID_BACKUP_PASSPHRASE"
MIN_BACKUP_PASSPHRASE = 12


@contextmanager
def _store(args: argparse.Namespace) -> Iterator[GalleryStore]:
    settings = load_settings(args.home_dir)
    with GalleryStore(args.home_dir, provider_for(args.home_dir, settings.keys)) as store:
        yield store


def _read_image(path: str) -> bytes:
    # Only a regular file, its size checked before reading: a FIFO, /dev/zero or a huge
    # sparse file is refused instead of blocking or filling memory.
    return read_user_file(Path(path), max_bytes=MAX_IMAGE_BYTES, what="image file")


@contextmanager
def _name_the_flag() -> Iterator[None]:
    """The duplicate refusal names the flag that overrides it at this door."""
    try:
        yield
    except DuplicateSubjectError as exc:
        raise BadInputError(
            f"{exc} (to enrol anyway, run the command again with --allow-duplicate)"
        ) from None


def _info_json(info: GalleryInfo) -> dict[str, object]:
    return {
        "name": info.name,
        "gallery_id": info.gallery_id,
        "description": info.description,
        "created_at": info.created_at.isoformat(),
        "subjects": info.subjects,
        "faces": info.faces,
    }


def _backup_passphrase(args: argparse.Namespace) -> str:
    if args.passphrase_file:
        secret = read_user_text(Path(args.passphrase_file), what="passphrase file").strip()
    elif os.environ.get(BACKUP_PASSPHRASE_ENV):
        secret = os.environ[BACKUP_PASSPHRASE_ENV]
    elif sys.stdin.isatty():
        secret = getpass.getpass("backup passphrase: ")
    else:
        raise BadInputError(
            f"give the backup passphrase with --passphrase-file or ${BACKUP_PASSPHRASE_ENV}"
        )
    if len(secret) < MIN_BACKUP_PASSPHRASE:
        raise BadInputError(
            f"the backup passphrase must have at least {MIN_BACKUP_PASSPHRASE} characters"
        )
    return secret


# -- handlers ----------------------------------------------------------------------------------
# Each handler is a thin translation to ``AccountableGalleries``: the service checks the
# justification, records, and only then reveals or acknowledges.

WHERE = "edgeid gallery"


def create(args: argparse.Namespace) -> int:
    with accountable.galleries(args.home_dir) as door:
        info = door.galleries.create_gallery(
            door.caller, args.name, args.description, where=f"{WHERE} create"
        )
    emit(args, _info_json(info), f"created gallery {info.name!r}")
    return EXIT_OK


def list_galleries(args: argparse.Namespace) -> int:
    # Names and counts only (not personal data): no record, and no audit lock needed.
    with _store(args) as store:
        infos = store.list_galleries()
        damaged = store.damaged_galleries()
    lines = [f"{safe_text(i.name):24} {i.subjects:>8} subjects {i.faces:>9} faces" for i in infos]
    # A damaged gallery is listed, marked, with what is wrong (ids only) and the repair.
    lines += [f"{safe_text(d.name or d.gallery_id):24} DAMAGED: {d.problem}" for d in damaged]
    payload = [_info_json(i) for i in infos] + [
        {"id": d.gallery_id, "name": d.name or None, "damaged": d.problem} for d in damaged
    ]
    emit(args, payload, "\n".join(lines) or "no galleries")
    return EXIT_OK


def subjects(args: argparse.Namespace) -> int:
    why = Justification.of(args.case, args.reason)
    with accountable.galleries(args.home_dir) as door:
        listed = door.galleries.subjects(door.caller, why, args.gallery, where=f"{WHERE} subjects")
        service = door.galleries.galleries
        rows = [
            {
                "subject_id": s.subject_id,
                "display_name": s.display_name,
                "legal_basis": s.legal_basis,
                "enrolled_by": s.enrolled_by,
                "enrolled_at": s.enrolled_at.isoformat(),
                "retention_until": s.retention_until.isoformat() if s.retention_until else None,
                "faces": len(service.faces(args.gallery, s.subject_id)),
            }
            for s in listed
        ]
    text = "\n".join(f"{r['subject_id']}  {safe_text(r['display_name'])}" for r in rows)
    emit(args, rows, text or "no subjects")
    return EXIT_OK


def enroll(args: argparse.Namespace) -> int:
    if args.by is not None:
        raise BadInputError(
            "--by was removed: the enroller recorded is who runs the command (os:<login>); "
            "put anything else in --notes"
        )
    image = _read_image(args.image)
    with accountable.galleries(args.home_dir, inference=True) as door, _name_the_flag():
        done = door.galleries.enroll(
            door.caller,
            args.gallery,
            display_name=args.name,
            legal_basis=args.legal_basis,
            image_bytes=image,
            face_index=args.face,
            notes=args.notes,
            retention_until=args.retain_until,
            allow_duplicate=args.allow_duplicate,
            where=f"{WHERE} enroll",
        )
    payload = {
        "gallery": done.gallery,
        "subject_id": done.subject.subject_id,
        "face_ids": [f.face_id for f in done.faces],
        "quality": [round(f.quality, 4) for f in done.faces],
        "model_id": done.faces[0].model_id if done.faces else None,
    }
    emit(args, payload, f"enrolled subject {done.subject.subject_id} in {done.gallery!r}")
    return EXIT_OK


def add_photo(args: argparse.Namespace) -> int:
    image = _read_image(args.image)
    with accountable.galleries(args.home_dir, inference=True) as door, _name_the_flag():
        face = door.galleries.add_face(
            door.caller,
            args.gallery,
            args.subject,
            image,
            face_index=args.face,
            age_at_capture=args.age,
            where=f"{WHERE} add-photo",
        )
    payload = {
        "gallery": args.gallery,
        "subject_id": face.subject_id,
        "face_id": face.face_id,
        "quality": round(face.quality, 4),
        "age_at_capture": face.age_at_capture,
    }
    emit(args, payload, f"added photo {face.face_id} to subject {face.subject_id}")
    return EXIT_OK


def edit(args: argparse.Namespace) -> int:
    """Change what is given; what is not given stays as it is."""
    why = Justification.of(args.case, args.reason)
    if args.retain_until is not None and args.no_retention:
        raise BadInputError("give --retain-until or --no-retention, not both")
    with accountable.galleries(args.home_dir) as door:
        old = door.galleries.galleries.subject(args.gallery, args.subject)
        retention = old.retention_until
        if args.no_retention:
            retention = None
        elif args.retain_until is not None:
            retention = args.retain_until
        new = door.galleries.edit_subject(
            door.caller,
            why,
            args.gallery,
            args.subject,
            display_name=old.display_name if args.name is None else args.name,
            notes=old.notes if args.notes is None else args.notes,
            legal_basis=old.legal_basis if args.legal_basis is None else args.legal_basis,
            retention_until=retention,
            where=f"{WHERE} edit",
        )
    payload = {
        "gallery": args.gallery,
        "subject_id": new.subject_id,
        "version": new.version,
        "retention_until": new.retention_until.isoformat() if new.retention_until else None,
    }
    emit(args, payload, f"changed subject {new.subject_id}")
    return EXIT_OK


def _age(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("give the age in whole years") from None


def search(args: argparse.Namespace) -> int:
    why = Justification.of(args.case, args.reason)
    image = _read_image(args.image)
    with accountable.galleries(args.home_dir, inference=True) as door:
        probe = door.galleries.analyse(image, name=args.image)
        face = _probe_face(args, len(probe.faces))
        result = door.galleries.search(
            door.caller,
            why,
            probe,
            face,
            args.gallery,
            k=args.top,
            fmr=args.fmr,
            age_band=args.age_band,
            where=f"{WHERE} search",
        )
    payload = {"case": why.case, "face": face, **result.to_json()}
    lines = [
        f"{c.rank:>3}. {c.score:.4f} {c.band.value:16} {safe_text(c.gallery)}/{c.subject_id} "
        f"{safe_text(c.display_name)}{_matched(c)}"
        for c in result.candidates
    ]
    answer = "no match" if result.no_match else f"{len(result.matches)} above threshold"
    lines.append(f"{answer} (age band {result.age_band}). {result.threshold_sentence}")
    lines.append(result.reliability.note)
    emit(args, payload, "\n".join(lines))
    return EXIT_OK


def _matched(candidate: Candidate) -> str:
    """Which of a subject's photos matched, where it has several or the age is known."""
    if candidate.photos < 2 and candidate.face_age_at_capture is None:
        return ""
    age = candidate.face_age_at_capture
    return f" (photo {candidate.photo_number} of {candidate.photos}" + (
        f", age {age})" if age is not None else ")"
    )


def verify(args: argparse.Namespace) -> int:
    why = Justification.of(args.case, args.reason)
    image = _read_image(args.image)
    with accountable.galleries(args.home_dir, inference=True) as door:
        probe = door.galleries.analyse(image, name=args.image)
        face = _probe_face(args, len(probe.faces))
        result = door.galleries.verify(
            door.caller,
            why,
            probe,
            face,
            args.gallery,
            args.subject,
            fmr=args.fmr,
            age_band=args.age_band,
            where=f"{WHERE} verify",
        )
    payload = {"case": why.case, **result.to_json()}
    verdict = "same person" if result.same_person else "not shown to be the same person"
    emit(
        args,
        payload,
        f"{result.score:.4f} ({result.band.value}): {verdict}\n{result.threshold_note}",
    )
    return EXIT_OK


def delete(args: argparse.Namespace) -> int:
    reason = check_reason(args.reason)
    if args.subject:
        with accountable.galleries(args.home_dir) as door:
            door.galleries.delete_subject(
                door.caller, args.gallery, args.subject, reason=reason, where=f"{WHERE} delete"
            )
        emit(args, {"deleted_subject": args.subject}, f"erased subject {args.subject}")
        return EXIT_OK
    if not args.yes:
        raise BadInputError(
            f"deleting gallery {args.gallery!r} erases every subject in it; add --yes"
        )
    # The two-person rule: a proposal for another person to approve, unless dual control is off.
    with administration(args.home_dir, galleries=True) as approvals:
        outcome = approvals.erase_gallery(
            LocalOperator.current(), args.gallery, reason=args.reason, where="cli gallery delete"
        )
        payload = {
            **outcome_json(outcome, approvals.ttl),
            "deleted_gallery": args.gallery if outcome.done else None,
        }
    emit(args, payload, outcome_text(outcome))
    return EXIT_OK


def export(args: argparse.Namespace) -> int:
    why = Justification.of(args.case, args.reason)
    out = Path(args.out)
    if out.exists():
        raise BadInputError(f"{out} exists; choose a new file name")
    check_output_path(out, force=False)  # also a dangling symlink: never written through
    passphrase = _backup_passphrase(args)
    with accountable.galleries(args.home_dir) as door:
        door.galleries.export(door.caller, why, args.gallery, out, passphrase)
    emit(args, {"gallery": args.gallery, "file": str(out)}, f"exported to {out}")
    return EXIT_OK


def import_(args: argparse.Namespace) -> int:
    reason = check_reason(args.reason)
    passphrase = _backup_passphrase(args)
    source = Path(args.file)
    check_regular_file(source, what="gallery export")  # a FIFO would block the import
    with accountable.galleries(args.home_dir) as door:
        try:
            info = door.galleries.import_gallery(
                door.caller, source, passphrase, name=args.name, reason=reason
            )
        except DecryptionError:
            # The export's own passphrase, not the box's keys: the key provider is not it.
            raise BadInputError(
                f"{source}: wrong backup passphrase, or the export was altered; give the "
                "passphrase it was made with"
            ) from None
        except BackupError as exc:  # not an export, damaged or truncated: the input is bad
            raise BadInputError(str(exc)) from None
    emit(args, _info_json(info), f"imported gallery {info.name!r} ({info.faces} faces)")
    return EXIT_OK


def repair(args: argparse.Namespace) -> int:
    from edgeid.runtime.services.repair import AccountableRepair

    reason = check_reason(args.reason)
    with accountable.galleries(args.home_dir) as door:
        repairs = AccountableRepair(door.galleries.galleries, door.recorder)
        report = repairs.repair_gallery(
            door.caller, args.gallery, reason=reason, where=f"{WHERE} repair"
        )
    payload = {
        "gallery_id": report.gallery_id,
        "subjects": report.subjects,
        "faces": report.faces,
        "lost_records": list(report.lost_records),
        "lost_subjects": report.lost_subjects,
        "faces_without_thumbnail": list(report.lost_thumbnails),
        "damaged_spans": report.damaged_spans,
    }
    lines = [f"repaired gallery {report.gallery_id}: {report.summary()}"]
    if report.lost_subjects:
        lines.append(f"subjects lost with damaged batches: {report.lost_subjects}")
    lines += [f"lost record {rid}" for rid in report.lost_records]
    lines += [f"face {fid} kept without its thumbnail" for fid in report.lost_thumbnails]
    emit(args, payload, "\n".join(lines))
    return EXIT_OK


def rotate_key(args: argparse.Namespace) -> int:
    settings = load_settings(args.home_dir)
    kind = args.provider or settings.keys.provider
    if kind == "auto":
        kind = best_available(args.home_dir, settings.keys)
    new_provider = make_provider(kind, args.home_dir, settings.keys)
    with accountable.galleries(args.home_dir) as door:
        kek_id = rotate_kek(
            door.galleries.galleries.store, door.recorder, door.caller, new_provider
        )
    emit(
        args,
        {"provider": kind, "kek_id": kek_id},
        f"data keys re-wrapped under a new {kind} key; the old key opens nothing",
    )
    return EXIT_OK


def re_embed(args: argparse.Namespace) -> int:
    def progress(done: int, total: int) -> None:
        if not args.json:
            print(f"\rre-embedded {done}/{total}", end="", file=sys.stderr, flush=True)

    with accountable.galleries(args.home_dir, inference=True) as door:
        count = door.galleries.re_embed(
            door.caller, args.gallery, progress=progress, where=f"{WHERE} re-embed"
        )
        model = door.galleries.galleries.model_id
    if count and not args.json:
        print(file=sys.stderr)
    emit(args, {"re_embedded": count, "model_id": model}, f"{count} faces now use {model}")
    return EXIT_OK


# -- arguments ---------------------------------------------------------------------------------


def _probe_face(args: argparse.Namespace, faces: int) -> int:
    if faces == 0:
        raise BadInputError(f"{args.image}: no face found; use a clearer, frontal photo")
    if args.face is None:
        if faces > 1:
            raise BadInputError(
                f"{args.image} has {faces} faces; choose one with --face N (see edgeid detect)"
            )
        return 0
    if not 0 <= args.face < faces:
        raise BadInputError(f"{args.image} has {faces} face(s); --face {args.face} is not one")
    return int(args.face)


def _date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {value!r}") from None


def _fmr(value: str) -> float:
    try:
        fmr = float(value)
    except ValueError:
        fmr = -1.0
    if fmr not in CALIBRATED_FMRS:
        choices = ", ".join(f"{f:g}" for f in sorted(CALIBRATED_FMRS))
        raise argparse.ArgumentTypeError(f"calibrated false-match rates: {choices}")
    return fmr


def _passphrase_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--passphrase-file", help=f"file holding the passphrase (or ${BACKUP_PASSPHRASE_ENV})"
    )


def _search_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE")
    accountable.justification_options(parser, "this search")
    parser.add_argument("--face", type=int, help="which face of the photo (default: the only)")
    parser.add_argument(
        "--fmr",
        type=_fmr,
        default=DEFAULT_OPERATING_FMR,
        help="false-match rate of the threshold within the age band "
        f"(default {DEFAULT_OPERATING_FMR:g})",
    )


def _age_band_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--age-band",
        choices=AGE_BANDS,
        default="unknown",
        help="the probe's apparent age: it chooses the thresholds, score bands and wording "
        "(unknown: the strictest band this box holds, and the result says so)",
    )


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    gallery = sub.add_parser("gallery", help="encrypted galleries: enrol, search, erase")
    actions = gallery.add_subparsers(dest="gallery_command", required=True, metavar="ACTION")

    p = actions.add_parser("create", parents=[common], help="a new, empty gallery")
    p.add_argument("name")
    p.add_argument("--description", default="")
    p.set_defaults(handler=create)

    p = actions.add_parser("list", parents=[common], help="galleries and their sizes")
    p.set_defaults(handler=list_galleries)

    p = actions.add_parser(
        "subjects", parents=[common], help="the subjects of a gallery (names: recorded)"
    )
    p.add_argument("gallery")
    accountable.justification_options(p, "this listing")
    p.set_defaults(handler=subjects)

    p = actions.add_parser(
        "enroll",
        parents=[common],
        help="enrol a subject from a photo",
        description="Enrol a subject; recorded with its legal basis. The enroller recorded is "
        "the person running the command (os:<login>); the former --by option is refused.",
    )
    p.add_argument("gallery")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--name", required=True, help="the subject's display name")
    p.add_argument(
        "--legal-basis", required=True, help="the law, warrant or case that allows holding it"
    )
    p.add_argument("--by", help=argparse.SUPPRESS)  # removed: refused with a message
    p.add_argument("--notes", default="")
    p.add_argument("--retain-until", type=_date, help="retention date, YYYY-MM-DD")
    p.add_argument("--face", type=int, help="which face of the photo (default: the only)")
    p.add_argument(
        "--allow-duplicate",
        action="store_true",
        help="enrol even when the face matches an enrolled subject",
    )
    p.set_defaults(handler=enroll)

    p = actions.add_parser(
        "add-photo",
        parents=[common],
        help="another photo of an enrolled subject",
        description="Add a photo to an enrolled subject (recorded). Photos across ages help "
        "most for children: a search ranks a subject by its closest photo.",
    )
    p.add_argument("gallery")
    p.add_argument("subject", help="subject id")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--age", type=_age, help="age when the photo was taken, in whole years")
    p.add_argument("--face", type=int, help="which face of the photo (default: the only)")
    p.set_defaults(handler=add_photo)

    p = actions.add_parser(
        "edit",
        parents=[common],
        help="change a subject's name, notes, legal basis or retention (recorded)",
        description="Change what is given; the rest stays. Recorded with the case and reason.",
    )
    p.add_argument("gallery")
    p.add_argument("subject", help="subject id")
    p.add_argument("--name", help="the new display name")
    p.add_argument("--notes", help="the new notes (replace the old)")
    p.add_argument("--legal-basis", help="the new legal basis")
    p.add_argument("--retain-until", type=_date, help="new retention date, YYYY-MM-DD")
    p.add_argument("--no-retention", action="store_true", help="remove the retention date")
    accountable.justification_options(p, "this change")
    p.set_defaults(handler=edit)

    p = actions.add_parser("search", parents=[common], help="1:N search of a probe photo")
    _search_options(p)
    p.add_argument(
        "--gallery", action="append", required=True, help="gallery to search (repeatable)"
    )
    p.add_argument("--top", type=positive_int, default=DEFAULT_TOP_K, help="candidates (k)")
    _age_band_option(p)
    p.set_defaults(handler=search)

    p = actions.add_parser("verify", parents=[common], help="1:1: probe photo vs a subject")
    _search_options(p)
    p.add_argument("--gallery", required=True)
    p.add_argument("--subject", required=True, help="subject id")
    _age_band_option(p)
    p.set_defaults(handler=verify)

    p = actions.add_parser("delete", parents=[common], help="erase a subject or a gallery")
    p.add_argument("gallery")
    p.add_argument("--subject", help="erase only this subject")
    accountable.reason_option(p, "why it is erased")
    p.add_argument("--yes", action="store_true", help="confirm erasing the whole gallery")
    p.set_defaults(handler=delete)

    p = actions.add_parser("export", parents=[common], help="encrypted backup of a gallery")
    p.add_argument("gallery")
    p.add_argument("--out", required=True, help="backup file to write")
    accountable.justification_options(p, "this backup")
    _passphrase_option(p)
    p.set_defaults(handler=export)

    p = actions.add_parser("import", parents=[common], help="restore a gallery from a backup")
    p.add_argument("file")
    p.add_argument("--name", help="a new name for the gallery")
    accountable.reason_option(p, "why it is restored")
    _passphrase_option(p)
    p.set_defaults(handler=import_)

    p = actions.add_parser(
        "repair", parents=[common], help="rewrite a damaged gallery from what still reads"
    )
    p.add_argument("gallery", help="its name, or its id when the name is unreadable")
    accountable.reason_option(p, "why it is repaired")
    p.set_defaults(handler=repair)

    p = actions.add_parser(
        "rotate-key", parents=[common], help="new key-encryption key; data keys re-wrapped"
    )
    p.add_argument(
        "--provider",
        choices=("auto", "tpm2", "systemd-creds", "keyfile", "passphrase"),
        help="provider of the new key (default: from edgeid.toml)",
    )
    p.set_defaults(handler=rotate_key)

    p = actions.add_parser(
        "re-embed", parents=[common], help="re-embed a gallery with this box's model"
    )
    p.add_argument("gallery")
    p.set_defaults(handler=re_embed)
