"""The units under firmware/systemd: `systemd-analyze verify`, hardening as systemd reads it,
and the service user from sysusers.d.

systemd-analyze checks that ExecStart= binaries exist, and the appliance's live in the update
slots, so each check runs against a scratch root (--root): the host's own unit files (for
sysinit.target and friends), our units in /etc/systemd/system, and an executable stub at
every path our units execute. Nothing on the host is touched and no systemd needs to run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
UNITS_DIR = REPO_ROOT / "firmware" / "systemd"
SYSUSERS = UNITS_DIR / "sysusers.d" / "edgeid.conf"
UNIT_SUFFIXES = {".service", ".socket", ".timer", ".path", ".target", ".mount"}
HOST_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
EXEC_KEYS = ("ExecStart", "ExecStartPre", "ExecStartPost", "ExecReload", "ExecStop")
EXEC_PREFIXES = "-+@:!"
# systemd-analyze security's exposure score of edgeid.service, x10 (0 best, 100 worst); 2.0
# is what the unit scores today, so any loosening of the sandbox fails this test.
MAX_EXPOSURE_X10 = 20
TOOL_TIMEOUT_S = 120


def _need(tool: str) -> str:
    """The tool's path; skipped when absent, but a failure under CI, which must have it."""
    path = shutil.which(tool)
    if path:
        return path
    message = f"{tool} not found (Debian package systemd); the unit checks need it"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _units() -> list[Path]:
    return sorted(p for p in UNITS_DIR.rglob("*") if p.suffix in UNIT_SUFFIXES)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file: each key with all its values, in order (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _scratch_root(tmp_path: Path, units: list[Path]) -> Path:
    root = tmp_path / "root"
    host = next((d for d in HOST_UNIT_DIRS if d.is_dir()), None)
    if host is None:
        pytest.skip("no host unit directory to take sysinit.target and friends from")
    shutil.copytree(host, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    target = root / "etc" / "systemd" / "system"
    target.mkdir(parents=True)
    for unit in units:
        shutil.copy(unit, target / unit.name)
        service = parse_unit(unit.read_text()).get("Service", {})
        for key in EXEC_KEYS:
            for command in service.get(key, []):
                binary = root / command.lstrip(EXEC_PREFIXES).split()[0].lstrip("/")
                binary.parent.mkdir(parents=True, exist_ok=True)
                binary.write_text("#!/bin/sh\n")
                binary.chmod(0o755)
    return root


def _verify(tmp_path: Path, units: list[Path]) -> subprocess.CompletedProcess[str]:
    tool = _need("systemd-analyze")
    root = _scratch_root(tmp_path, units)
    return subprocess.run(
        [tool, "verify", f"--root={root}", *(unit.name for unit in units)],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
    )


def test_every_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    units = _units()
    assert [u.name for u in units] == ["edgeid.service"]
    result = _verify(tmp_path, units)
    # verify exits 0 on some findings (an unknown key, a bad value: "ignoring"); any output
    # at all is a finding.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_finds_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: the same unit with a typo in a value and in a key."""
    broken = tmp_path / "units" / "edgeid.service"
    broken.parent.mkdir()
    text = (UNITS_DIR / "edgeid.service").read_text()
    broken.write_text(
        text.replace("Type=notify", "Type=notifyy").replace("WatchdogSec", "WatchSec")
    )
    result = _verify(tmp_path, [broken])
    output = result.stdout + result.stderr
    assert "notifyy" in output and "WatchSec" in output


def test_service_speaks_notify_and_runs_the_active_slot() -> None:
    unit = parse_unit((UNITS_DIR / "edgeid.service").read_text())
    service = unit["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]  # children cannot claim READY or pings
    assert service["WatchdogSec"] == ["60s"]
    assert service["ExecStart"] == [
        "/bin/sh -c 'if [ -x /var/lib/edgeid/slots/current/bin/edgeid ]; then exec "
        "/var/lib/edgeid/slots/current/bin/edgeid serve --home /var/lib/edgeid; fi; "
        "exec /opt/edgeid/bin/edgeid serve --home /var/lib/edgeid'"
    ]
    # Recovery of an interrupted update, privileged, from the last committed slot.
    assert service["ExecStartPre"] == [
        "-+/var/lib/edgeid/slots/good/bin/edgeid update resume --at-start --home /var/lib/edgeid"
    ]
    assert service["ReadWritePaths"] == ["/var/lib/edgeid"]
    assert service["ReadOnlyPaths"] == ["-/var/lib/edgeid/slots"]  # the service never writes code
    assert service["StandardError"] == ["journal"]
    assert service["Restart"] == ["on-failure"]
    assert service["LimitCORE"] == ["0"]  # no gallery keys in core dumps


def test_hardening_as_systemd_reads_it(tmp_path: Path) -> None:
    tool = _need("systemd-analyze")
    root = _scratch_root(tmp_path, [UNITS_DIR / "edgeid.service"])
    base = [tool, "security", "--offline=yes", f"--root={root}"]
    report = subprocess.run(
        [*base, "--json=short", "edgeid.service"],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=True,
    )
    checks = {item["name"]: item for item in json.loads(report.stdout)}
    required = [
        "NoNewPrivileges=",
        "PrivateTmp=",
        "ProtectSystem=",
        "ProtectHome=",
        "SystemCallFilter=~@privileged",
        "SystemCallFilter=~@mount",
        "SystemCallArchitectures=",
        "RestrictNamespaces=~user",
        "User=/DynamicUser=",
    ]
    assert [name for name in required if not checks[name]["set"]] == []
    assert "strict" in checks["ProtectSystem="]["description"]
    capabilities = [name for name in checks if name.startswith("CapabilityBoundingSet=")]
    assert len(capabilities) > 20
    assert [name for name in capabilities if not checks[name]["set"]] == []  # the empty set
    score = subprocess.run(
        [*base, f"--threshold={MAX_EXPOSURE_X10}", "edgeid.service"],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
    )
    assert score.returncode == 0, score.stdout[-300:]


def test_sysusers_creates_the_service_user(tmp_path: Path) -> None:
    tool = _need("systemd-sysusers")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run(
        [tool, f"--root={root}", "-"],
        stdin=SYSUSERS.open("rb"),
        capture_output=True,
        timeout=TOOL_TIMEOUT_S,
        check=True,
    )
    users = _entries(root / "etc" / "passwd")
    assert users["edgeid"][4:] == ["edgeid appliance", "/var/lib/edgeid", "/usr/sbin/nologin"]
    assert _entries(root / "etc" / "group")["video"][3] == "edgeid"


def _entries(path: Path) -> dict[str, list[str]]:
    return {line.split(":")[0]: line.split(":") for line in path.read_text().splitlines()}
