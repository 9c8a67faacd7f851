"""The one `edgeid` command. Exit codes: 0 success, 1 operation failed, 2 bad usage or input."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgeid import __version__
from edgeid.options import common_options
from edgeid.paths import resolve_home
from runtime.errors import BadInputError, EdgeidError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2

Handler = Callable[[argparse.Namespace], int]


# Each module under edgeid/commands adds its own sub-commands with
# ``register(sub, common)``; a new command group is one more name here.
COMMAND_MODULES = (
    "models_cmd",
    "faces_cmd",
    "eval_cmd",
    "bench_cmd",
    "serve_cmd",
    "audit_cmd",
    "gallery_cmd",
    "case_cmd",
    "telemetry_cmd",
    "fleet_cmd",
    "update_cmd",
    "init_cmd",
    "users_cmd",
    "provision_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = argparse.ArgumentParser(
        prog="edgeid", description="On-premise face identification appliance."
    )
    parser.add_argument("--version", action="version", version=f"edgeid {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"edgeid.commands.{name}").register(sub, common)
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
