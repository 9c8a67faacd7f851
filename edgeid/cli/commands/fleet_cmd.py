"""`edgeid fleet serve`: the fleet manager's dashboard, /metrics and Home Assistant discovery."""

from __future__ import annotations

import argparse

from edgeid.cli import EXIT_OK, path_arg
from edgeid.cli.options import Subparsers

DEFAULT_LISTEN = "127.0.0.1:8090"


def listen_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT such as {DEFAULT_LISTEN}, got {value!r}"
        )
    return host.strip("[]"), int(port)


def run_serve(args: argparse.Namespace) -> int:
    from edgeid.fleet.server import FleetOptions, serve

    host, port = args.listen
    serve(
        FleetOptions(
            broker_host=args.broker_host,
            broker_port=args.broker_port,
            ca=args.ca,
            cert=args.cert,
            key=args.key,
            listen_host=host,
            listen_port=port,
            stale_after_s=args.stale_after,
            homeassistant_prefix=args.homeassistant_prefix if args.homeassistant else None,
            token_file=args.token_file,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            homeassistant_support_url=args.homeassistant_support_url,
        )
    )
    return EXIT_OK


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    fleet = sub.add_parser("fleet", help="the fleet manager (runs on the admins' machine)")
    actions = fleet.add_subparsers(dest="action", required=True, metavar="ACTION")
    serve = actions.add_parser(
        "serve",
        parents=[common],
        help="subscribe to every device's telemetry; serve the dashboard and /metrics",
    )
    serve.add_argument("--broker-host", default="127.0.0.1")
    serve.add_argument("--broker-port", type=int, default=8883)
    serve.add_argument("--ca", type=path_arg, required=True, help="the fleet CA (PEM)")
    serve.add_argument("--cert", type=path_arg, required=True, help="this manager's certificate")
    serve.add_argument("--key", type=path_arg, required=True, help="its private key (PEM)")
    serve.add_argument(
        "--listen",
        type=listen_address,
        default=listen_address(DEFAULT_LISTEN),
        metavar="HOST:PORT",
        help=f"dashboard address (default {DEFAULT_LISTEN}; beyond loopback needs --token-file)",
    )
    serve.add_argument(
        "--token-file",
        type=path_arg,
        metavar="FILE",
        help="bearer token every page but /healthz requires (one line, mode 600; "
        "make it with: (umask 077; openssl rand -hex 32 > FILE))",
    )
    serve.add_argument("--tls-cert", type=path_arg, metavar="PEM", help="serve HTTPS: certificate")
    serve.add_argument("--tls-key", type=path_arg, metavar="PEM", help="its private key")
    serve.add_argument(
        "--stale-after",
        type=float,
        default=90.0,
        metavar="SECONDS",
        help="an online device silent this long is shown stale (default 90)",
    )
    serve.add_argument(
        "--homeassistant", action="store_true", help="publish Home Assistant MQTT discovery"
    )
    serve.add_argument("--homeassistant-prefix", default="homeassistant", metavar="PREFIX")
    serve.add_argument(
        "--homeassistant-support-url",
        metavar="URL",
        help="where admins get help with these boxes (Home Assistant shows it as the origin)",
    )
    serve.set_defaults(handler=run_serve)
