"""After a switch: restart the service on the new slot, then ask it whether it is healthy.

Both are commands from ``[updates]`` in edgeid.toml, with ``{slot}`` (the slot's folder) and
``{home}`` substituted; exit status 0 means yes. The defaults: restart with
``systemctl restart edgeid.service`` where systemd runs the box (it returns once the service
sent READY=1, or failed), and check with the new version's own
``edgeid provision selftest``. A command that is missing, fails or outlives its timeout
counts as unhealthy: an update is committed only on a positive answer.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeid.runtime.config.settings import UpdateSettings

SERVICE_UNIT = "edgeid.service"
SYSTEMD_RUNNING = Path("/run/systemd/system")  # sd_booted(3): systemd is PID 1
RESTART_TIMEOUT_S = 600.0  # TimeoutStartSec= of the unit is 5 min; systemctl waits for it
DETAIL_CHARS = 300  # the tail of a failing command's output kept as the reason
ARCH_NAMES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf"}  # Debian's names


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str


def detect_hardware_id() -> str:
    machine = platform.machine().lower()
    arch = ARCH_NAMES.get(machine, "".join(c if c.isalnum() else "-" for c in machine))
    return f"generic-{arch}"


@dataclass(frozen=True)
class UpdatePolicy:
    """What the box accepts and how it judges a new slot; from ``[updates]`` in edgeid.toml."""

    hardware_id: str
    allow_downgrade: bool = False
    health_command: tuple[str, ...] | None = None
    restart_command: tuple[str, ...] | None = None
    health_timeout_s: float = 300.0

    @classmethod
    def from_settings(cls, settings: UpdateSettings) -> UpdatePolicy:
        return cls(
            hardware_id=settings.hardware_id or detect_hardware_id(),
            allow_downgrade=settings.allow_downgrade,
            health_command=_tuple(settings.health_command),
            restart_command=_tuple(settings.restart_command),
            health_timeout_s=settings.health_timeout_s,
        )

    def health_argv(self, slot_dir: Path, home: Path) -> list[str] | None:
        if self.health_command is not None:
            return expand(self.health_command, slot_dir, home)
        edgeid = slot_dir / "bin" / "edgeid"
        if not edgeid.is_file():
            return None
        return [str(edgeid), "provision", "selftest", "--home", str(home)]

    def restart_argv(self, slot_dir: Path, home: Path) -> list[str]:
        if self.restart_command is not None:
            return expand(self.restart_command, slot_dir, home)
        if SYSTEMD_RUNNING.is_dir():
            return ["systemctl", "restart", SERVICE_UNIT]
        return []


def _tuple(value: list[str] | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)


def expand(argv: Sequence[str], slot_dir: Path, home: Path) -> list[str]:
    return [arg.replace("{slot}", str(slot_dir)).replace("{home}", str(home)) for arg in argv]


def run_command(argv: Sequence[str], timeout_s: float, home: Path, slot_dir: Path) -> CheckResult:
    """Run ``argv``; ok when it exits 0 within ``timeout_s``. Never raises."""
    env = os.environ | {"EDGEID_HOME": str(home), "EDGEID_SLOT": str(slot_dir)}
    env.pop("EDGEID_UPDATE_CRASH_AT", None)  # the test hook is for this process only
    try:
        done = subprocess.run(
            list(argv),
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except FileNotFoundError:
        return CheckResult(False, f"{argv[0]} not found")
    except PermissionError:
        return CheckResult(False, f"{argv[0]} is not executable")
    except subprocess.TimeoutExpired:
        return CheckResult(False, f"{argv[0]} did not finish within {timeout_s:g} s")
    output = (done.stdout + done.stderr).decode("utf-8", "replace")
    tail = " ".join(output.split())[-DETAIL_CHARS:]
    if done.returncode == 0:
        return CheckResult(True, tail or "exit 0")
    return CheckResult(False, f"{Path(argv[0]).name} exited {done.returncode}: {tail}".rstrip(": "))
