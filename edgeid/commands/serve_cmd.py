"""`edgeid serve`: start the appliance on its embedded defaults (CPU, local state dir)."""

from __future__ import annotations

import argparse

from edgeid import __version__
from edgeid.cli import EXIT_OK
from edgeid.paths import models_dir
from runtime.system.health_server import serve


def run(args: argparse.Namespace) -> int:
    serve(models_dir(args.home_dir), args.detector, args.backend, args.host, args.port, __version__)
    return EXIT_OK
