"""Whether an address is this machine: the one test behind every "loopback only" rule (the
box's plain-HTTP refusal, its /metrics, the fleet manager's token requirement)."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP (IPv4 127/8, IPv6 ::1); a name is never trusted."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
