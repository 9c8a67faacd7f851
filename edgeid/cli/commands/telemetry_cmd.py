"""`edgeid telemetry once|run`: show the next health report; run the agent in the foreground."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType

from edgeid import __version__
from edgeid.cli import EXIT_OK, emit
from edgeid.cli.options import Subparsers
from edgeid.runtime.config.settings import load_settings
from edgeid.runtime.telemetry.agent import TelemetryAgent
from edgeid.runtime.telemetry.schema import parse_json_object


def run_once(args: argparse.Namespace) -> int:
    settings = load_settings(args.home_dir)
    agent = TelemetryAgent(args.home_dir, settings, __version__)
    topic, payload = agent.preview()
    emit(
        args,
        {"sink": settings.telemetry.sink, "topic": topic, "payload": parse_json_object(payload)},
        f"{topic}\n{payload.decode('ascii')}",
    )
    return EXIT_OK


def run_agent(args: argparse.Namespace) -> int:
    settings = load_settings(args.home_dir)
    if settings.telemetry.sink == "off":
        print("edgeid telemetry: off (telemetry.sink = off); nothing to run", file=sys.stderr)
        return EXIT_OK
    agent = TelemetryAgent(args.home_dir, settings, __version__)
    stop = threading.Event()

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    agent.start()
    target = (
        f"{settings.telemetry.broker_host}:{settings.telemetry.broker_port}"
        if settings.telemetry.sink == "mqtt"
        else str(agent.directory)
    )
    print(
        f"edgeid telemetry: sink {settings.telemetry.sink} -> {target} as {agent.topics.base}",
        file=sys.stderr,
        flush=True,
    )
    stop.wait()
    agent.stop()
    return EXIT_OK


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    telemetry = sub.add_parser("telemetry", help="health-only telemetry of this box")
    actions = telemetry.add_subparsers(dest="action", required=True, metavar="ACTION")
    once = actions.add_parser(
        "once",
        parents=[common],
        help="print the topic and exact payload of the next health report; publishes nothing",
    )
    once.set_defaults(handler=run_once)
    agent = actions.add_parser(
        "run",
        parents=[common],
        help="run the telemetry agent alone in the foreground until SIGTERM or Ctrl-C",
    )
    agent.set_defaults(handler=run_agent)
