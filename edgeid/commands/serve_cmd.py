"""`edgeid serve`: start the appliance on its embedded defaults (CPU, local state dir)."""

from __future__ import annotations

import argparse

from edgeid import __version__
from edgeid.cli import EXIT_OK
from edgeid.options import detector_options
from edgeid.paths import models_dir
from runtime.system.health_server import serve


def run(args: argparse.Namespace) -> int:
    serve(models_dir(args.home_dir), args.detector, args.backend, args.host, args.port, __version__)
    return EXIT_OK


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    serve_cmd = sub.add_parser("serve", parents=[common], help="run the appliance service")
    serve_cmd.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    serve_cmd.add_argument("--port", type=int, default=8080)
    detector_options(serve_cmd)
    serve_cmd.set_defaults(handler=run)
