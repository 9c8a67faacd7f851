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


# Each module under edgeid/commands adds its own sub-commands with ``register(sub, common)``.
# Command -> module: only the module of the command being run is imported, so one command's
# heavy dependencies (the web stack, ONNX Runtime) do not slow down every other command.
COMMAND_MODULES = {
    "models": "models_cmd",
    "detect": "faces_cmd",
    "embed": "faces_cmd",
    "eval": "eval_cmd",
    "bench": "bench_cmd",
    "serve": "serve_cmd",
    "init": "init_cmd",
    "users": "users_cmd",
    "approvals": "approvals_cmd",
    "gallery": "gallery_cmd",
    "audit": "audit_cmd",
    "case": "case_cmd",
    "scrub": "scrub_cmd",
    "telemetry": "telemetry_cmd",
    "fleet": "fleet_cmd",
    "provision": "provision_cmd",
    "update": "update_cmd",
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: just its command's module when it names one, else all."""
    common = common_options()
    parser = argparse.ArgumentParser(
        prog="edgeid", description="On-premise face identification appliance."
    )
    parser.add_argument("--version", action="version", version=f"edgeid {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    words = list(sys.argv[1:] if argv is None else argv)
    named = COMMAND_MODULES.get(words[0]) if words else None
    for module in dict.fromkeys([named] if named else COMMAND_MODULES.values()):
        importlib.import_module(f"edgeid.commands.{module}").register(sub, common)
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
    parser = build_parser(argv)
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
