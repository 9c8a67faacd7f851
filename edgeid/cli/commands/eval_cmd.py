"""`edgeid eval lfw`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeid.cli import EXIT_OK, emit
from edgeid.cli.options import chosen_precision, detector_options
from edgeid.cli.paths import models_dir
from edgeid.runtime.errors import BadInputError
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
