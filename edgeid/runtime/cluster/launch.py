"""`ray start` command lines for the owning box (head) and for worker boxes, with what keeps
evidence on the lab's nodes and off their disks: TLS with the site CA, the object store in
shared memory (``/dev/shm``, RAM) with spilling to disk turned off, no dashboard, no usage
statistics sent anywhere."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edgeid.runtime.cluster.node import NODE_RESOURCE
from edgeid.runtime.cluster.tls import ClusterTls

SHM = Path("/dev/shm")
DEFAULT_PORT = 6380
DEFAULT_OBJECT_STORE_BYTES = 512 * 1024 * 1024
# Spilled objects would be image bytes written to a node's disk: never.
SYSTEM_CONFIG = {"automatic_object_spilling_enabled": False}


def _common(pipelines: int, object_store_bytes: int, cpus: int | None) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        f"--resources={json.dumps({NODE_RESOURCE: pipelines})}",
        f"--plasma-directory={SHM}",
        f"--object-store-memory={object_store_bytes}",
        "--disable-usage-stats",
        "--block",
    ]
    if cpus is not None:
        args.append(f"--num-cpus={cpus}")
    return args


def head_command(
    ip: str,
    port: int = DEFAULT_PORT,
    *,
    work: bool = False,
    object_store_bytes: int = DEFAULT_OBJECT_STORE_BYTES,
    cpus: int | None = None,
) -> list[str]:
    """The owning box's head; ``work``: it analyses images too (one pipeline)."""
    return [
        *_common(1 if work else 0, object_store_bytes, cpus),
        "--head",
        "--include-dashboard=false",
        f"--node-ip-address={ip}",
        f"--port={port}",
        f"--system-config={json.dumps(SYSTEM_CONFIG)}",
    ]


def worker_command(
    head: str,
    *,
    ip: str | None = None,
    object_store_bytes: int = DEFAULT_OBJECT_STORE_BYTES,
    cpus: int | None = None,
) -> list[str]:
    args = [*_common(1, object_store_bytes, cpus), f"--address={head}"]
    if ip:
        args.append(f"--node-ip-address={ip}")
    return args


def node_env(base: dict[str, str], tls: ClusterTls, home: Path) -> dict[str, str]:
    """The environment a node's Ray processes run with (its workers inherit it)."""
    return {**base, **tls.env(), "EDGEID_HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
