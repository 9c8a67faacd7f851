"""`edgeid models build|list|verify`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeid.cli import EXIT_FAILED, EXIT_OK, emit
from edgeid.cli.paths import built_models_dir, models_dir, wheelhouse_dir
from edgeid.runtime.errors import ModelError
from edgeid.runtime.inference.manifest import list_manifests, read_verified_model


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
    )
    rows = [{"name": m.name, "file": m.file, "sha256": m.sha256} for m in manifests]
    text = "\n".join(f"{m.name:16} {m.sha256}  {m.file}" for m in manifests)
    emit(args, rows, text)
    return EXIT_OK


def list_models(args: argparse.Namespace) -> int:
    manifests = list_manifests(models_dir(args.home_dir))
    rows = [m.model_dump(mode="json", exclude={"parameters"}) for m in manifests]
    text = (
        "\n".join(
            f"{m.name:16} {m.task:15} {m.source.package} {m.source.version} ({m.source.licence})"
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


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    models = sub.add_parser("models", help="build and check the ONNX models")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    build_cmd = models_sub.add_parser("build", parents=[common], help="convert the shipped weights")
    build_cmd.add_argument("--wheelhouse", help="folder holding the facenet-pytorch wheel")
    build_cmd.add_argument("--force", action="store_true", help="rebuild even when up to date")
    build_cmd.add_argument("--record-checksums", action="store_true", help=argparse.SUPPRESS)
    build_cmd.set_defaults(handler=build)
    listing = models_sub.add_parser("list", parents=[common], help="list built models")
    listing.set_defaults(handler=list_models)
    verify_cmd = models_sub.add_parser("verify", parents=[common], help="check model checksums")
    verify_cmd.set_defaults(handler=verify)
