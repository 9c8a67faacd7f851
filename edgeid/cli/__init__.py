"""The one `edgeid` command. Exit codes: 0 success, 1 operation failed, 2 bad usage or input,
130 interrupted, 141 the reader of our output went away (``edgeid ... | head -1``: quiet, as
a command killed by SIGPIPE).

No command prints a traceback: errors are one line naming the problem and the fix. The state
folder (``--home``, else ``$EDGEID_HOME``, else ~/.local/share/edgeid) must exist, so a
mistyped ``--home`` is refused instead of silently starting an empty state; only the commands
in ``CREATES_HOME`` make it, and only its last part (its parent folder must exist).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import os
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgeid import __version__
from edgeid.cli.options import common_options
from edgeid.cli.paths import HOME_ENV, resolve_home
from edgeid.runtime.display import terminal_safe
from edgeid.runtime.errors import BadInputError, EdgeidError
from edgeid.runtime.storage.safe_read import file_kind

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141  # 128 + SIGINT, 128 + SIGPIPE
DEBUG_ENV = "EDGEID_DEBUG"  # set to 1: an unexpected error shows its traceback

# These make the state folder; every other command needs it to exist already.
CREATES_HOME = frozenset({"init", "provision init", "models build"})
# The vendor's tools: they never read or write a box's state.
NEEDS_NO_HOME = frozenset({"update keygen", "update build", "update sign", "fleet serve"})

Handler = Callable[[argparse.Namespace], int]


# Each module under edgeid/cli/commands adds its own sub-commands with ``register(sub, common)``.
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
    "cluster": "cluster_cmd",
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
        importlib.import_module(f"edgeid.cli.commands.{module}").register(sub, common)
    _name_leaves(parser)
    return parser


def _name_leaves(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> None:
    """Give every leaf command its full name (``args.command_path``, e.g. "gallery list")."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs and prefix:
        parser.set_defaults(command_path=" ".join(prefix))
    for action in subs:
        for name, child in action.choices.items():
            _name_leaves(child, (*prefix, name))


def safe_text(text: object) -> str:
    """``text`` fit for one terminal line: control and direction characters shown as escapes
    (a newline as ``\\x0a``, ESC as ``\\x1b``, U+202E as ``\\u202e``). Put every name, file
    name or message from outside through it before it joins the text ``emit`` prints."""
    return terminal_safe(str(text))


def _safe_lines(text: str) -> str:
    # Our own line breaks and tab separators (users list, approvals list) stay.
    return "\n".join(
        "\t".join(terminal_safe(part) for part in line.split("\t")) for line in text.split("\n")
    )


def emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    """Print JSON under --json, otherwise the human-readable text."""
    if getattr(args, "json", False):
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        # Our own line breaks stay; every other control character (from a name or a file
        # name inside the text) is shown escaped.
        print(_safe_lines(text))


def check_home(args: argparse.Namespace) -> None:
    """Refuse a state folder that is missing (a typo would start an empty state) or is not a
    folder; the commands that create it may make its last part only."""
    command = getattr(args, "command_path", args.command)
    home: Path = args.home_dir
    if command in NEEDS_NO_HOME:
        return
    if command == "audit export" and getattr(args, "verify_file", None) is not None:
        return  # checking an export off the box: oversight has no state folder
    if home.is_dir():
        return
    if home.exists():
        raise BadInputError(f"--home {home} is not a folder; give the edgeid state folder")
    if command in CREATES_HOME:
        if not home.parent.is_dir():
            raise BadInputError(
                f"--home {home}: its parent folder {home.parent} does not exist; create it "
                "first (edgeid makes only the last part of the path)"
            )
        return
    raise BadInputError(
        f"no edgeid state folder at {home}; check --home (or ${HOME_ENV}), or make one with "
        "edgeid init"
    )


# Options holding a path kept as a string (the others are typed ``path_arg``, a Path).
_STRING_PATH_OPTIONS = frozenset(
    {"image", "images", "file", "passphrase_file", "new_passphrase_file", "out", "pairs"}
)


def refuse_special_files(args: argparse.Namespace) -> None:
    """No edgeid command reads or writes a FIFO, device or socket: refuse one named on the
    command line before anything opens it (opening a FIFO blocks; /dev/zero never ends).
    ``stat`` neither opens nor blocks; a symlink to such a thing is refused too."""
    for name, value in vars(args).items():
        if name == "home_dir":
            continue
        values = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, Path) or (name in _STRING_PATH_OPTIONS and isinstance(item, str)):
                _refuse_special(Path(item))


def _refuse_special(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError):
        return  # missing or unreadable: the command's own reader says so
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode):
        raise BadInputError(f"{path}: is {file_kind(mode)}; give a regular file or folder")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        status = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at exit as a traceback
    except BrokenPipeError:
        _quiet_broken_pipe()
        return EXIT_BROKEN_PIPE
    return status


def _quiet_broken_pipe() -> None:
    # Python would try to flush stdout again at exit and complain: point it at /dev/null.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        args.home_dir = resolve_home(getattr(args, "home", None))
        check_home(args)
        refuse_special_files(args)
        handler: Handler = args.handler
        return handler(args)
    except BadInputError as exc:
        return _error(exc, EXIT_BAD_INPUT)
    except EdgeidError as exc:
        return _error(exc, EXIT_FAILED)
    except KeyboardInterrupt:
        print("edgeid: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        raise
    except OSError as exc:
        # A file or folder the command could not use (a path given to it, or the state
        # folder): one line naming it, no traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        status = EXIT_BAD_INPUT if exc.errno in _BAD_PATH_ERRNOS else EXIT_FAILED
        return _error(f"{where}{exc.strerror or exc}", status)
    except MemoryError:
        return _error("out of memory; the input is too large for this box", EXIT_FAILED)
    except Exception as exc:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        # A bug, not the user's fault: still one line, and how to get the details.
        return _error(
            f"unexpected {type(exc).__name__}: {exc} (run with {DEBUG_ENV}=1 for the traceback "
            "and report it)",
            EXIT_FAILED,
        )


# Errors that mean "the path you gave is wrong", not "the operation failed".
_BAD_PATH_ERRNOS = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.ELOOP}
)


def _error(message: object, status: int) -> int:
    print(f"edgeid: error: {safe_text(message)}", file=sys.stderr)
    return status


def path_arg(value: str) -> Path:
    return Path(value).expanduser()


if __name__ == "__main__":
    sys.exit(main())
