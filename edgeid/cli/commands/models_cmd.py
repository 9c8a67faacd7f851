"""`edgeid models build|list|verify|add|calibrate|use`.

``add``, ``calibrate`` and ``use`` bring an agency's own licensed embedder into service:
``add`` checks the ONNX file against what the operator declares and writes its manifest,
``calibrate`` measures its thresholds on the agency's labelled images, ``use`` puts it in use
(audited, two-person rule; refused without a calibration) and re-embeds every gallery.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from edgeid.cli import EXIT_FAILED, EXIT_OK, emit
from edgeid.cli.commands.accountable import reason_option
from edgeid.cli.options import chosen_precision, detector_options
from edgeid.cli.paths import built_models_dir, models_dir, wheelhouse_dir
from edgeid.runtime.errors import BadInputError, ModelError
from edgeid.runtime.inference.manifest import list_manifests, read_verified_model
from edgeid.runtime.inference.model_home import adopt_installed_models
from edgeid.runtime.services.caller import LocalOperator

if TYPE_CHECKING:
    from edgeid.runtime.evaluation.identification import IdentFigures, TemplateCache
    from edgeid.runtime.evaluation.operator_calibration import LabelledImage
    from edgeid.runtime.gallery.age_bands import MeasuredBand
    from edgeid.runtime.inference.pipeline import FacePipeline


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build(args: argparse.Namespace) -> int:
    from edgeid.models.build import build_models

    wheelhouse = Path(args.wheelhouse) if args.wheelhouse else wheelhouse_dir(args.home_dir)
    manifests = build_models(
        built_models_dir(args.home_dir),
        wheelhouse,
        force=args.force,
        record_checksums=args.record_checksums,
        progress=_progress,
        precision=args.precision,
        data_dir=Path(args.data) if args.data else None,
    )
    rows = [{"name": m.name, "file": m.file, "sha256": m.sha256} for m in manifests]
    text = "\n".join(f"{m.name:16} {m.sha256}  {m.file}" for m in manifests)
    emit(args, rows, text)
    return EXIT_OK


def list_models(args: argparse.Namespace) -> int:
    from edgeid.runtime.inference.embedders import in_use_embedder

    folder = models_dir(args.home_dir)
    manifests = list_manifests(folder)
    in_use = in_use_embedder(folder)
    rows = [
        m.model_dump(mode="json", exclude={"parameters"}) | {"in_use": m.name == in_use}
        for m in manifests
    ]
    text = (
        "\n".join(
            f"{m.name:16} {m.task:15} {m.source.package} {m.source.version} ({m.source.licence})"
            + ("  [in use]" if m.name == in_use else "")
            for m in manifests
        )
        or "no models built; run `edgeid models build`"
    )
    emit(args, rows, text)
    return EXIT_OK


def verify(args: argparse.Namespace) -> int:
    folder = models_dir(args.home_dir)
    results: list[dict[str, str]] = []
    failed = False
    for manifest in list_manifests(folder):
        try:
            read_verified_model(folder, manifest.name)
            results.append({"name": manifest.name, "status": "ok"})
        except ModelError as exc:
            failed = True
            results.append({"name": manifest.name, "status": "failed", "error": str(exc)})
    if not results:
        raise ModelError(f"no models in {folder}; run `edgeid models build`")
    emit(args, results, "\n".join(f"{r['name']:16} {r['status']}" for r in results))
    return EXIT_FAILED if failed else EXIT_OK


def add(args: argparse.Namespace) -> int:
    from edgeid.runtime.inference.embedders import Declared, operator_manifest, write_model

    source = Path(args.file)
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise BadInputError(f"{source}: cannot read the model ({exc.strerror})") from exc
    folder = adopt_installed_models(args.home_dir)
    declared = Declared(
        name=args.name,
        input_size=_size(args.input),
        align=args.align,
        mean=_numbers(args.mean, "--mean"),
        std=_numbers(args.std, "--std"),
        licence=args.licence,
        channel_order=args.channels,
    )
    declared.check()
    if (folder / f"{args.name}.manifest.json").exists() and not args.replace:
        raise BadInputError(f"model {args.name} exists already; choose another --name")
    manifest = operator_manifest(data, declared, source.name)
    write_model(folder, manifest, data)
    emit(
        args,
        manifest.model_dump(mode="json"),
        f"added {manifest.name} ({manifest.sha256[:12]}, {manifest.outputs[0].shape[-1]}-d "
        f"templates); calibrate it next: edgeid models calibrate {manifest.name} --images DIR",
    )
    return EXIT_OK


def calibrate(args: argparse.Namespace) -> int:
    from edgeid.runtime.evaluation.identification import TemplateCache
    from edgeid.runtime.evaluation.lfw import central_face_embedder
    from edgeid.runtime.evaluation.operator_calibration import calibrate_model, labelled_images
    from edgeid.runtime.gallery.thresholds import calibration_path, operator_calibration_path
    from edgeid.runtime.inference.pipeline import FacePipeline
    from edgeid.runtime.storage.durable import write_file_atomically

    if calibration_path(args.name).exists():
        raise BadInputError(f"model {args.name} ships with its calibration; it is not recalibrated")
    images_dir = Path(args.images)
    images = labelled_images(images_dir, Path(args.ages) if args.ages else None)
    folder = models_dir(args.home_dir)
    pipeline = FacePipeline.load(
        folder,
        args.detector,
        threads=args.threads,
        backend=args.backend,
        embedder_model=args.name,
        precision=chosen_precision(args),
    )
    cache = TemplateCache(central_face_embedder(pipeline))
    cache.fill([item.path for item in images], progress=_counting)
    run = calibrate_model(
        args.name,
        images,
        cache.__getitem__,
        data_set=args.data_set or f"the operator's labelled set {images_dir.name}",
        unaged=args.band,
        details={"detector": args.detector},
        identification=_identification(pipeline, images_dir, images, cache, args.band),
    )
    out = operator_calibration_path(folder, args.name)
    text = json.dumps(run.data.model_dump(mode="json", exclude_none=True), indent=2) + "\n"
    write_file_atomically(out, text.encode("utf-8"), action="writing the calibration")
    lines = [f"calibrated {args.name} on {run.images} images ({run.no_face} without a face)"]
    for band, data in run.data.bands.items():
        edges = ", ".join(f"{t.fmr:g}: {t.score:.4f}" for t in data.thresholds)
        lines.append(f"  {band}: {data.provenance.non_mated_pairs} non-mated pairs; {edges}")
    lines.append(f"written to {out}")
    emit(args, run.data.model_dump(mode="json", exclude_none=True), "\n".join(lines))
    return EXIT_OK


def _identification(
    pipeline: FacePipeline,
    root: Path,
    images: list[LabelledImage],
    cache: TemplateCache,
    unaged: MeasuredBand,
) -> dict[str, dict[str, object]] | None:
    """``edgeid eval ident``'s figures on the same images (every photo but the probe enrolled,
    half the people left out as non-mated searches), per age band where ages were given."""
    from edgeid.runtime.evaluation.identification import IdentProtocol, evaluate_identification
    from edgeid.runtime.evaluation.labelled_set import LabelledSet, Person

    by_person: dict[str, list[LabelledImage]] = {}
    for item in images:
        by_person.setdefault(item.person, []).append(item)
    several = [Person(name, tuple(i.path for i in items))
               for name, items in by_person.items() if len(items) > 1]  # fmt: skip
    if len(several) < 2:
        return None
    labelled = LabelledSet(root, tuple(several))
    ages = {item.path: item.age for item in images if item.age is not None}
    try:
        report = evaluate_identification(
            pipeline, labelled, IdentProtocol("all-but-one"), ages=ages or None, templates=cache
        )
    except BadInputError as exc:  # too few people for a 1:N split: the 1:1 figures stand alone
        print(f"no 1:N figures: {exc}", file=sys.stderr)
        return None

    def kept(figures: IdentFigures) -> dict[str, object]:  # the full CMC curve stays in eval ident
        return {k: v for k, v in figures.to_json().items() if k != "cmc"}

    if ages:
        return {band: kept(figures) for band, figures in report.by_age_band.items()}
    return {unaged: kept(report.overall)}


def use(args: argparse.Namespace) -> int:
    from edgeid.cli.commands.approvals_cmd import administration, outcome_json, outcome_text

    with administration(args.home_dir) as approvals:
        outcome = approvals.use_model(
            LocalOperator.current(), args.name, reason=args.reason, where="cli models use"
        )
        ttl = approvals.ttl
    payload = outcome_json(outcome, ttl)
    text = outcome_text(outcome)
    if outcome.model_changed:
        counts = re_embed_all(args.home_dir, quiet=args.json)
        payload["re_embedded"] = counts
        text += f"; re-embedded {sum(counts.values())} faces in {len(counts)} galleries"
    emit(args, payload, text)
    return EXIT_OK


def re_embed_all(home: Path, *, quiet: bool) -> dict[str, int]:
    """Every gallery re-embedded with the model now in use (each one recorded)."""
    from edgeid.cli.commands import accountable

    counts: dict[str, int] = {}
    with accountable.galleries(home, inference=True) as door:
        for info in door.galleries.galleries.list_galleries():
            counts[info.gallery_id] = door.galleries.re_embed(
                door.caller, info.name, where="cli models use"
            )
            if not quiet:
                _progress(f"gallery {info.gallery_id}: {counts[info.gallery_id]} faces re-embedded")
    return counts


def _counting(done: int, total: int) -> None:
    if done % 50 == 0 or done == total:
        print(f"\rembedding images: {done}/{total}", end="", file=sys.stderr, flush=True)
        if done == total:
            print(file=sys.stderr)


def _size(value: str) -> tuple[int, int]:
    try:
        width, _, height = value.lower().partition("x")
        return int(width), int(height or width)
    except ValueError:
        raise BadInputError(
            f"--input {value!r}: give the chip size as WIDTHxHEIGHT, e.g. 112x112"
        ) from None


def _numbers(value: str, option: str) -> tuple[float, float, float]:
    try:
        items = [float(v) for v in value.split(",")]
    except ValueError:
        raise BadInputError(f"{option} {value!r}: give 1 or 3 numbers, comma-separated") from None
    if len(items) == 1:
        items *= 3
    if len(items) != 3:
        raise BadInputError(f"{option} {value!r}: give 1 or 3 numbers, comma-separated")
    return items[0], items[1], items[2]


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    models = sub.add_parser("models", help="build and check the ONNX models")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    build_cmd = models_sub.add_parser("build", parents=[common], help="convert the shipped weights")
    build_cmd.add_argument("--wheelhouse", help="folder holding the facenet-pytorch wheel")
    build_cmd.add_argument("--force", action="store_true", help="rebuild even when up to date")
    build_cmd.add_argument("--record-checksums", action="store_true", help=argparse.SUPPRESS)
    build_cmd.add_argument(
        "--precision",
        choices=["fp32", "int8"],
        default="fp32",
        help="int8: also the INT8 twins of the MTCNN nets and the embedder, which "
        "inference.precision int8 and int8-embedder run (needs --data)",
    )
    build_cmd.add_argument(
        "--data",
        default=os.environ.get("EDGEID_TEST_DATA"),
        help="the shared data folder (lfw-dev/images, scenes/) the INT8 ranges are calibrated on "
        "(default: $EDGEID_TEST_DATA)",
    )
    build_cmd.set_defaults(handler=build)
    listing = models_sub.add_parser("list", parents=[common], help="list built models")
    listing.set_defaults(handler=list_models)
    verify_cmd = models_sub.add_parser("verify", parents=[common], help="check model checksums")
    verify_cmd.set_defaults(handler=verify)

    add_cmd = models_sub.add_parser(
        "add", parents=[common], help="bring your own licensed ONNX embedder (checked first)"
    )
    add_cmd.add_argument("file", help="the ONNX model file")
    add_cmd.add_argument("--name", required=True, help="its name on this box (a-z, 0-9, _)")
    add_cmd.add_argument("--task", required=True, choices=["embedding"], help="what it does")
    add_cmd.add_argument("--input", required=True, help="its input chip size, e.g. 112x112")
    add_cmd.add_argument(
        "--align", required=True, choices=["arcface", "dlib"], help="its training alignment"
    )
    add_cmd.add_argument("--mean", default="0", help="per-channel mean subtracted (1 or 3 values)")
    add_cmd.add_argument("--std", default="1", help="per-channel divisor (1 or 3 values)")
    add_cmd.add_argument("--channels", choices=["RGB", "BGR"], default="RGB")
    add_cmd.add_argument("--licence", required=True, help="the licence terms it is used under")
    add_cmd.add_argument("--replace", action="store_true", help=argparse.SUPPRESS)
    add_cmd.set_defaults(handler=add)

    cal_cmd = models_sub.add_parser(
        "calibrate", parents=[common], help="measure a model's thresholds on your labelled images"
    )
    cal_cmd.add_argument("name", help="the model (edgeid models list)")
    cal_cmd.add_argument("--images", required=True, help="one folder of images per person")
    cal_cmd.add_argument("--ages", help="CSV of image,age (age at the photo) for per-band figures")
    cal_cmd.add_argument(
        "--band",
        default="adult",
        choices=["adult", "teen", "child", "child_6_12", "child_0_5"],
        help="the age band a set without --ages shows (default adult)",
    )
    cal_cmd.add_argument("--data-set", help="how the calibration file names the set")
    detector_options(cal_cmd)
    cal_cmd.set_defaults(handler=calibrate)

    use_cmd = models_sub.add_parser(
        "use", parents=[common], help="put a calibrated embedder in use and re-embed galleries"
    )
    use_cmd.add_argument("name", help="the model (edgeid models list)")
    reason_option(use_cmd, "why the box changes its model")
    use_cmd.set_defaults(handler=use)
