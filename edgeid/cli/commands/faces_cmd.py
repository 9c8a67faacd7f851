"""`edgeid detect` and `edgeid embed`: a technician's view of what the pipeline sees."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from edgeid.cli import EXIT_BAD_INPUT, EXIT_OK, emit, safe_text
from edgeid.cli.options import chosen_precision, detector_options
from edgeid.cli.paths import models_dir
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.inference.image_decode import MAX_IMAGE_BYTES, decode_image
from edgeid.runtime.inference.pipeline import FacePipeline
from edgeid.runtime.storage.safe_read import read_user_file


def _run(args: argparse.Namespace, with_embedding: bool) -> int:
    pipeline = FacePipeline.load(
        models_dir(args.home_dir),
        args.detector,
        threads=args.threads,
        upsample=args.upsample,
        with_embedder=with_embedding,
        backend=args.backend,
        precision=chosen_precision(args),
    )
    results: list[dict[str, Any]] = []
    lines: list[str] = []
    bad = 0
    for name in args.images:
        entry: dict[str, Any] = {"image": name, "faces": []}
        try:
            # Only a regular file, its size checked before reading (a FIFO or /dev/zero is
            # refused instead of blocking or filling memory).
            data = read_user_file(Path(name), max_bytes=MAX_IMAGE_BYTES, what="image file")
            image = decode_image(data, name=name)
            faces = pipeline.embed(image) if with_embedding else pipeline.detect(image)
            entry["faces"] = [face.to_json() for face in faces]
            if not faces:
                raise BadInputError(f"{name}: no face found")
            lines.append(f"{safe_text(name)}: {len(faces)} face(s)")
            for face in faces:
                box = ", ".join(f"{v:.0f}" for v in face.box.as_list())
                lines.append(f"  box [{box}] score {face.score:.3f}")
        except BadInputError as exc:
            bad += 1
            entry["error"] = str(exc)
            print(f"edgeid: error: {safe_text(exc)}", file=sys.stderr)
        results.append(entry)
    emit(args, results, "\n".join(lines))
    return EXIT_BAD_INPUT if bad else EXIT_OK


def detect(args: argparse.Namespace) -> int:
    return _run(args, with_embedding=False)


def embed(args: argparse.Namespace) -> int:
    return _run(args, with_embedding=True)


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    detect_cmd = sub.add_parser("detect", parents=[common], help="find faces in images")
    detect_cmd.add_argument("images", nargs="+", metavar="IMAGE")
    detector_options(detect_cmd)
    detect_cmd.set_defaults(handler=detect)

    embed_cmd = sub.add_parser("embed", parents=[common], help="detect, align and embed faces")
    embed_cmd.add_argument("images", nargs="+", metavar="IMAGE")
    detector_options(embed_cmd)
    embed_cmd.set_defaults(handler=embed)
