"""`edgeid eval lfw` (1:1 pairs) and `edgeid eval ident` (open-set 1:N search)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeid.cli import EXIT_OK, emit
from edgeid.cli.options import chosen_precision, detector_options, positive_int
from edgeid.cli.paths import models_dir
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.evaluation.cmc_plot import write_cmc_png
from edgeid.runtime.evaluation.identification import (
    DEFAULT_LEFT_OUT,
    ENROL_MODES,
    MIN_IMAGES,
    EnrolMode,
    IdentFigures,
    IdentProtocol,
    IdentReport,
    TemplateCache,
    evaluate_identification,
    left_out_count,
    plan_identification,
)
from edgeid.runtime.evaluation.labelled_set import read_ages, read_labelled_set
from edgeid.runtime.evaluation.lfw import central_face_embedder, evaluate, parse_pairs, roc_points
from edgeid.runtime.evaluation.roc_plot import write_roc_png
from edgeid.runtime.inference.pipeline import FacePipeline


def _progress(done: int, total: int) -> None:
    if done % 100 == 0 or done == total:
        print(f"\rembedding images: {done}/{total}", end="", file=sys.stderr, flush=True)
        if done == total:
            print(file=sys.stderr)


def lfw(args: argparse.Namespace) -> int:
    try:
        pairs = parse_pairs(Path(args.pairs))
    except UnicodeDecodeError:
        raise BadInputError(f"{args.pairs}: is not UTF-8 text; give an LFW pairs file") from None
    images_dir = Path(args.images)
    if not images_dir.is_dir():
        raise BadInputError(f"{images_dir}: not a folder of LFW images")
    pipeline = FacePipeline.load(
        models_dir(args.home_dir),
        args.detector,
        threads=args.threads,
        upsample=args.upsample,
        backend=args.backend,
        precision=chosen_precision(args),
    )

    report = evaluate(pairs, images_dir, central_face_embedder(pipeline), progress=_progress)
    payload = report.to_json() | {
        "detector": args.detector,
        "upsample": args.upsample,
        "precision": chosen_precision(args),
    }
    if args.roc:
        write_roc_png(roc_points(report), Path(args.roc), f"LFW pairs: {Path(args.pairs).name}")
        payload["roc_png"] = args.roc
    text = (
        f"accuracy {report.accuracy:.4f} ± {report.accuracy_std:.4f} over {report.pairs} pairs "
        f"({report.mated_pairs} mated, {report.non_mated_pairs} non-mated; thresholds held out "
        f"over {report.splits} splits)\n"
        f"TAR@FAR=1e-3 {report.tar_at_far_1e_3:.4f}; no face in {report.no_face} of "
        f"{report.images} images; {report.ms_per_image:.1f} ms/image"
    )
    emit(args, payload, text)
    return EXIT_OK


def ident(args: argparse.Namespace) -> int:
    """Validate every input before the models load, then one evaluation per --enrol."""
    modes: list[EnrolMode] = list(dict.fromkeys(args.enrol or ["1"]))
    skip_fewer = args.min_images is not None
    # A mated person needs a probe and an image to enrol: two images at least.
    min_images = max(args.min_images or MIN_IMAGES, MIN_IMAGES)
    images = read_labelled_set(Path(args.images), min_images=min_images, skip_fewer=skip_fewer)
    distractors = (
        read_labelled_set(Path(args.distractors), option="--distractors", skip_fewer=True)
        if args.distractors
        else None
    )
    ages = read_ages(Path(args.ages), images) if args.ages else None
    protocols = [IdentProtocol(mode, args.left_out, args.seed) for mode in modes]
    for protocol in protocols:
        plan_identification(images, protocol, distractors)  # refuses a bad split now
    pipeline = FacePipeline.load(
        models_dir(args.home_dir),
        args.detector,
        threads=args.threads,
        upsample=args.upsample,
        backend=args.backend,
    )
    cache = TemplateCache(central_face_embedder(pipeline))
    reports = [
        evaluate_identification(
            pipeline,
            images,
            protocol,
            distractors=distractors,
            ages=ages,
            templates=cache,
            progress=_progress,
        )
        for protocol in protocols
    ]
    payload: dict[str, object] = {
        "images_dir": str(images.root),
        "persons": len(images.persons),
        "persons_skipped_min_images": images.skipped,
        "left_out": args.left_out,
        "seed": args.seed,
        "detector": args.detector,
        "enrolments": {r.protocol.enrol: r.to_json() for r in reports},
    }
    if args.cmc:
        curves = {f"enrol {r.protocol.enrol}": r.overall.cmc for r in reports}
        write_cmc_png(curves, Path(args.cmc), f"CMC: {images.root.name}")
        payload["cmc_png"] = args.cmc
    emit(args, payload, "\n".join(_ident_text(r) for r in reports))
    return EXIT_OK


def _ident_text(report: IdentReport) -> str:
    plan = report.plan
    lines = [
        f"enrol {report.protocol.enrol}: gallery of {report.gallery_subjects} subjects "
        f"({report.gallery_faces} faces; {plan.mated_persons} mated persons, "
        f"{plan.distractor_persons} distractors); {plan.left_out_persons} persons left out",
        *_figures_text("all probes", report.overall),
    ]
    for band, figures in report.by_age_band.items():
        lines += _figures_text(f"age band {band}", figures)
    if report.no_face_images:
        found = f"{report.no_face_images} of {report.images_embedded}"
        lines.append(f"  no face found in {found} images")
    return "\n".join(lines)


def _figures_text(label: str, figures: IdentFigures) -> list[str]:
    hits = ", ".join(
        f"rank {rank} {'-' if rate is None else f'{rate:.3f}'}"
        for rank, rate in figures.hit_rates.items()
    )
    lines = [
        f"  {label}: {figures.mated_searches} mated, {figures.non_mated_searches} non-mated "
        f"searches; hit rate {hits}"
    ]
    for point in figures.fnir_at_fpir:
        if point.fnir is None:
            kind = "mated" if not figures.mated_searches else "non-mated"
            lines.append(
                f"    FNIR at FPIR {point.target_fpir:g}: not measured (no {kind} searches)"
            )
            continue
        note = (
            ""
            if point.resolved
            else f" (below the resolution 1/{figures.non_mated_searches}: FPIR "
            f"{point.measured_fpir:g} measured)"
        )
        lines.append(
            f"    FNIR {point.fnir:.3f} at FPIR {point.target_fpir:g}{note}, threshold "
            f"{point.threshold:.4f}"
        )
    if figures.ranks_unresolved:
        lines.append(
            f"    {figures.ranks_unresolved} mate(s) beyond the longest list the search returns "
            "(counted as misses)"
        )
    return lines


def _left_out(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count of persons or a share below 1, got {value!r}"
        ) from None
    try:
        left_out_count(number, 1_000_000)
    except BadInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return number


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    evaluate = sub.add_parser("eval", help="measure accuracy")
    eval_sub = evaluate.add_subparsers(dest="eval_command", required=True, metavar="BENCHMARK")
    lfw_cmd = eval_sub.add_parser("lfw", parents=[common], help="LFW-style verification accuracy")
    lfw_cmd.add_argument("--pairs", required=True, help="pairs file (LFW pairs.txt format)")
    lfw_cmd.add_argument("--images", required=True, help="folder of <Name>/<Name>_NNNN.jpg")
    lfw_cmd.add_argument("--roc", help="also write a ROC curve PNG here")
    detector_options(lfw_cmd)
    lfw_cmd.set_defaults(handler=lfw)

    ident_cmd = eval_sub.add_parser(
        "ident",
        parents=[common],
        help="open-set 1:N search accuracy (CMC, FNIR at FPIR) through the gallery search",
    )
    ident_cmd.add_argument(
        "--images", required=True, help="labelled set: one folder of images per person"
    )
    ident_cmd.add_argument(
        "--enrol",
        action="append",
        choices=ENROL_MODES,
        help="photos enrolled per mated person: 1, or all but the probe; give twice to "
        "measure both on the same probes (default: 1)",
    )
    ident_cmd.add_argument(
        "--left-out",
        type=_left_out,
        default=DEFAULT_LEFT_OUT,
        metavar="N|SHARE",
        help="persons left out of the gallery, their photos searched as non-mated probes: "
        f"a count or a share below 1 (default {DEFAULT_LEFT_OUT})",
    )
    ident_cmd.add_argument(
        "--distractors", help="more people (one folder each) enrolled only to enlarge the gallery"
    )
    ident_cmd.add_argument(
        "--min-images",
        type=positive_int,
        help="skip person folders of --images with fewer images (default: refuse them)",
    )
    ident_cmd.add_argument("--ages", help="CSV of image,age rows: every figure per age band")
    ident_cmd.add_argument(
        "--seed", type=int, default=0, help="seed of the draws of probes and left-out persons"
    )
    ident_cmd.add_argument("--cmc", help="also write the CMC curve(s) as a PNG here")
    detector_options(ident_cmd)
    ident_cmd.set_defaults(handler=ident)
