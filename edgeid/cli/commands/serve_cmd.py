"""`edgeid serve`: the appliance. Web UI and API over the galleries and the audit log, health
telemetry, and the systemd conversation (READY, watchdog pings while inference is alive)."""

from __future__ import annotations

import argparse
import logging
import sys

from edgeid import __version__
from edgeid.cli import EXIT_OK
from edgeid.cli.options import Subparsers
from edgeid.cli.paths import models_dir

logger = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    # Imported here: the web stack is heavy and no other command needs it.
    from edgeid.runtime.config.settings import load_settings
    from edgeid.runtime.inference.activity import InferenceActivity, InferenceLimits
    from edgeid.runtime.inference.pipeline import FacePipeline
    from edgeid.runtime.system.journal import configure_logging
    from edgeid.runtime.system.lifecycle import service_lifecycle
    from edgeid.runtime.system.metrics import SERVICE_METRICS
    from edgeid.runtime.telemetry.agent import TelemetryAgent
    from edgeid.runtime.web.bootstrap import open_web_app
    from edgeid.runtime.web.server import run_web, web_url
    from edgeid.updater.events import deliver_events

    home = args.home_dir
    settings = load_settings(home)
    configure_logging(logging.INFO)
    with service_lifecycle() as life:
        life.status("loading models")
        inference = settings.inference
        pipeline = FacePipeline.load(
            models_dir(home),
            inference.detector,
            threads=inference.threads,
            backend=inference.backend,
            spinning=inference.spinning,
            precision=inference.precision,
        )
        SERVICE_METRICS.set_backend_state(pipeline.backend_state)
        SERVICE_METRICS.set_engine_memory_source(pipeline.gpu_memory)
        activity = InferenceActivity(
            life.heartbeat("inference").beat, limits=InferenceLimits.of(inference)
        )
        agent = TelemetryAgent(
            home, settings, __version__, backend_state=lambda: pipeline.backend_state
        )
        with open_web_app(
            home, settings, version=__version__, pipeline=pipeline, activity=activity
        ) as app:
            agent.start()
            activity.start()
            try:
                delivered = deliver_events(
                    home / "updates",
                    lambda kind, _fields: agent.event(kind),
                    home / "telemetry" / "update-events.cursor",
                )
                if delivered:
                    logger.info("reported %d update event(s)", delivered)
                url = web_url(settings, host=args.host, port=args.port)
                life.ready(f"ready on {url}: models on {pipeline.backend_state}")
                print(f"edgeid serve: ready on {url}", file=sys.stderr, flush=True)
                run_web(app, settings, host=args.host, port=args.port)
            finally:
                activity.stop()
                agent.stop()
                SERVICE_METRICS.set_engine_memory_source(None)
                pipeline.close()  # free the engines while the CUDA context is alive
    return EXIT_OK


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    serve_cmd = sub.add_parser(
        "serve",
        parents=[common],
        help="run the appliance (detector and backend from edgeid.toml)",
    )
    serve_cmd.add_argument("--host", default=None, help="address to bind (default: edgeid.toml)")
    serve_cmd.add_argument("--port", type=int, default=None, help="port (default: edgeid.toml)")
    serve_cmd.set_defaults(handler=run)
