"""Argument helpers shared by the command modules."""

from __future__ import annotations

import argparse
from typing import Literal, TypeAlias

# What `register(sub, common)` in each command module receives.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def common_options() -> argparse.ArgumentParser:
    """``--home`` and ``--json``, taken by every command (the command-line contract)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", help="state directory (default: $EDGEID_HOME)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    return common


def detector_options(parser: argparse.ArgumentParser) -> None:
    from edgeid.runtime.inference.backends.selection import BACKEND_CHOICES
    from edgeid.runtime.inference.pipeline import DEFAULT_DETECTOR, DETECTOR_NAMES
    from edgeid.runtime.inference.precision import PRECISIONS

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
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="fp32, int8-embedder (INT8 embedder, FP32 detector) or int8 (INT8 MTCNN too); "
        "INT8 models: edgeid models build --precision int8; "
        "default: inference.precision in edgeid.toml",
    )


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {value!r}")
    return number


def chosen_precision(args: argparse.Namespace) -> Literal["fp32", "int8", "int8-embedder"]:
    """``--precision``, else the box's ``inference.precision`` (edgeid.toml)."""
    if args.precision is not None:
        chosen: Literal["fp32", "int8", "int8-embedder"] = args.precision
        return chosen
    from edgeid.runtime.config.settings import load_settings

    return load_settings(args.home_dir).inference.precision
