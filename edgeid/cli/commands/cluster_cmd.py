"""`edgeid cluster head|worker`: start this box's Ray node for case ingests across a lab's
boxes (README "Large cases on several boxes").

Only a provisioned box starts a node: it must hold the cluster certificate the site CA signed
(with its key) and the CA certificate, which Ray's TLS then uses both ways, so a machine
without them can neither join nor read the traffic. The node's object store is in RAM
(/dev/shm) and never spills to disk. The command runs `ray start --block` in its place; stop it
with Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from cryptography import x509

from edgeid.cli.options import Subparsers
from edgeid.runtime.cluster.launch import (
    DEFAULT_OBJECT_STORE_BYTES,
    DEFAULT_PORT,
    SHM,
    head_command,
    node_env,
    worker_command,
)
from edgeid.runtime.cluster.tls import ClusterSetupError, ClusterTls
from edgeid.runtime.config.settings import load_settings
from edgeid.runtime.errors import BadInputError


def provisioned(home: Path) -> ClusterTls:
    """The box's cluster TLS files, refused unless the certificate is the site CA's and the
    box has its verified models (a node that cannot embed is given no work anyway)."""
    tls = ClusterTls.of(home, load_settings(home).cluster)
    try:
        ca = x509.load_pem_x509_certificate(tls.ca.read_bytes())
        cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as exc:
        raise ClusterSetupError(
            f"{tls.cert} is not signed by the site CA in {tls.ca} ({exc}); have the CA sign "
            "this box's cluster certificate"
        ) from None
    except Exception as exc:  # InvalidSignature carries no message
        raise ClusterSetupError(
            f"{tls.cert} is not signed by the site CA in {tls.ca} ({type(exc).__name__}); "
            "have the CA sign this box's cluster certificate"
        ) from None
    if not (home / "models").is_dir():
        raise ClusterSetupError(f"{home / 'models'}: no models; provision this box first")
    if not SHM.is_dir():
        raise ClusterSetupError(f"{SHM} is missing: the object store must be in RAM")
    return tls


def _run(args: argparse.Namespace, command: list[str]) -> int:
    tls = provisioned(args.home_dir)
    env = node_env(dict(os.environ), tls, args.home_dir)
    os.execve(command[0], command, env)  # ray start --block in this process's place


def _ip(value: str | None) -> str:
    return value or socket.gethostbyname(socket.gethostname())


def head(args: argparse.Namespace) -> int:
    command = head_command(
        _ip(args.ip),
        args.port,
        work=args.work,
        object_store_bytes=args.object_store_bytes,
        cpus=args.cpus,
    )
    return _run(args, command)


def worker(args: argparse.Namespace) -> int:
    if ":" not in args.head:
        raise BadInputError(f"--head {args.head!r}: give HOST:PORT of the owning box's head")
    command = worker_command(
        args.head, ip=args.ip, object_store_bytes=args.object_store_bytes, cpus=args.cpus
    )
    return _run(args, command)


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    cluster = sub.add_parser("cluster", help="this box's node for case ingests across boxes")
    actions = cluster.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, handler, what in (
        ("head", head, "the owning box's head node (run before `case ingest --cluster`)"),
        ("worker", worker, "a worker node that analyses images for the head"),
    ):
        p = actions.add_parser(name, parents=[common], help=what)
        if name == "worker":
            p.add_argument("--head", required=True, metavar="HOST:PORT", help="the head node")
        else:
            p.add_argument("--port", type=int, default=DEFAULT_PORT, help="the head's port")
            p.add_argument("--work", action="store_true", help="analyse images on the head box too")
        p.add_argument("--ip", help="this node's address on the lab network")
        p.add_argument("--cpus", type=int, help="CPUs Ray may schedule here (default: all)")
        p.add_argument(
            "--object-store-bytes",
            type=int,
            default=DEFAULT_OBJECT_STORE_BYTES,
            help="RAM for the object store (in /dev/shm)",
        )
        p.set_defaults(handler=handler)
