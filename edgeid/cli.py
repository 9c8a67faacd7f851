"""The one `edgeid` command. Exit codes: 0 success, 1 operation failed, 2 bad usage or input."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgeid import __version__
from edgeid.paths import resolve_home
from runtime.errors import BadInputError, EdgeidError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2

Handler = Callable[[argparse.Namespace], int]


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", help="state directory (default: $EDGEID_HOME)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    return common


def _detector_options(parser: argparse.ArgumentParser) -> None:
    from runtime.inference.backends.selection import BACKEND_CHOICES
    from runtime.inference.pipeline import DEFAULT_DETECTOR, DETECTOR_NAMES

    parser.add_argument("--detector", choices=DETECTOR_NAMES, default=DEFAULT_DETECTOR)
    parser.add_argument(
        "--upsample",
        type=int,
        default=0,
        choices=range(0, 3),
        metavar="{0,1,2}",
        help="MMOD only: upsample the image N times to find smaller faces (slower)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default="auto",
        help="auto: TensorRT where a GPU answers, else ONNX Runtime on the CPU",
    )


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {value!r}")
    return number


def build_parser() -> argparse.ArgumentParser:
    from edgeid.commands import bench_cmd, eval_cmd, faces_cmd, models_cmd, serve_cmd

    common = _common()
    parser = argparse.ArgumentParser(
        prog="edgeid", description="On-premise face identification appliance."
    )
    parser.add_argument("--version", action="version", version=f"edgeid {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = sub.add_parser("models", help="build and check the ONNX models")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    build = models_sub.add_parser("build", parents=[common], help="convert the shipped weights")
    build.add_argument("--wheelhouse", help="folder holding the facenet-pytorch wheel")
    build.add_argument("--force", action="store_true", help="rebuild even when up to date")
    build.add_argument("--record-checksums", action="store_true", help=argparse.SUPPRESS)
    build.set_defaults(handler=models_cmd.build)
    listing = models_sub.add_parser("list", parents=[common], help="list built models")
    listing.set_defaults(handler=models_cmd.list_models)
    verify = models_sub.add_parser("verify", parents=[common], help="check model checksums")
    verify.set_defaults(handler=models_cmd.verify)

    detect = sub.add_parser("detect", parents=[common], help="find faces in images")
    detect.add_argument("images", nargs="+", metavar="IMAGE")
    _detector_options(detect)
    detect.set_defaults(handler=faces_cmd.detect)

    embed = sub.add_parser("embed", parents=[common], help="detect, align and embed faces")
    embed.add_argument("images", nargs="+", metavar="IMAGE")
    _detector_options(embed)
    embed.set_defaults(handler=faces_cmd.embed)

    evaluate = sub.add_parser("eval", help="measure accuracy")
    eval_sub = evaluate.add_subparsers(dest="eval_command", required=True, metavar="BENCHMARK")
    lfw = eval_sub.add_parser("lfw", parents=[common], help="LFW-style verification accuracy")
    lfw.add_argument("--pairs", required=True, help="pairs file (LFW pairs.txt format)")
    lfw.add_argument("--images", required=True, help="folder of <Name>/<Name>_NNNN.jpg")
    lfw.add_argument("--roc", help="also write a ROC curve PNG here")
    _detector_options(lfw)
    lfw.set_defaults(handler=eval_cmd.lfw)

    bench = sub.add_parser("bench", help="measure speed beside a baseline")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    bench_pipeline = bench_sub.add_parser(
        "pipeline", parents=[common], help="images/s of decode, detect, align, embed vs dlib"
    )
    bench_pipeline.add_argument("--images", required=True, help="folder of .jpg/.png images")
    bench_pipeline.add_argument(
        "--limit", type=_positive_int, default=None, help="only the first N images (by path)"
    )
    _detector_options(bench_pipeline)
    bench_pipeline.add_argument(
        "--flip-tta", action="store_true", help="also measure flip test-time augmentation"
    )
    bench_pipeline.add_argument(
        "--no-baseline", action="store_true", help="skip dlib's pipeline (ours only)"
    )
    bench_pipeline.set_defaults(handler=bench_cmd.pipeline)

    serve = sub.add_parser("serve", parents=[common], help="run the appliance service")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    serve.add_argument("--port", type=int, default=8080)
    _detector_options(serve)
    serve.set_defaults(handler=serve_cmd.run)
    return parser


def emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    """Print JSON under --json, otherwise the human-readable text."""
    if getattr(args, "json", False):
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(text)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.home_dir = resolve_home(getattr(args, "home", None))
    handler: Handler = args.handler
    try:
        return handler(args)
    except BadInputError as exc:
        print(f"edgeid: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except EdgeidError as exc:
        print(f"edgeid: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("edgeid: interrupted", file=sys.stderr)
        return 130


def path_arg(value: str) -> Path:
    return Path(value).expanduser()


if __name__ == "__main__":
    sys.exit(main())
