"""CPU, load, memory, uptime and disk figures of the host, read from /proc and statvfs.

The roots are injectable so that tests can read a prepared tree; on a box they are the real
``/proc``. A figure the kernel does not offer is reported as zero rather than failing the
report: a health message with one gap is worth more than none.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from edgeid.runtime.telemetry.schema import Cpu, Disk, Memory, coarse

logger = logging.getLogger(__name__)

PROC = Path("/proc")
KIB = 1024


@dataclass(frozen=True)
class CpuTimes:
    busy: int
    total: int


def read_cpu_times(proc: Path = PROC) -> CpuTimes:
    """Aggregate jiffies from the first line of /proc/stat; idle and iowait count as idle."""
    try:
        first = (proc / "stat").read_text().splitlines()[0].split()
        values = [int(v) for v in first[1:]]
    except (OSError, IndexError, ValueError):
        return CpuTimes(0, 0)
    # user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    fields = values[:8]
    idle = sum(fields[3:5])
    total = sum(fields)
    return CpuTimes(busy=total - idle, total=total)


class CpuSampler:
    """CPU busy percentage between two reads: the first read measures since the sampler began."""

    def __init__(self, proc: Path = PROC) -> None:
        self._proc = proc
        self._last = read_cpu_times(proc)

    def percent(self) -> float:
        now = read_cpu_times(self._proc)
        busy, total = now.busy - self._last.busy, now.total - self._last.total
        self._last = now
        if total <= 0:
            return 0.0
        return coarse(min(100.0, max(0.0, 100.0 * busy / total)))


def read_cpu(sampler: CpuSampler, proc: Path = PROC) -> Cpu:
    try:
        load = [float(v) for v in (proc / "loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        load = [0.0, 0.0, 0.0]
    return Cpu(
        percent=sampler.percent(),
        cores=os.cpu_count() or 1,
        load1=coarse(load[0]),
        load5=coarse(load[1]),
        load15=coarse(load[2]),
    )


def read_memory(proc: Path = PROC) -> Memory:
    fields: dict[str, int] = {}
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[key] = int(parts[0]) * KIB
    except OSError as exc:
        logger.warning("cannot read meminfo: %s", exc.strerror)
    total = fields.get("MemTotal", 0)
    available = min(total, fields.get("MemAvailable", fields.get("MemFree", 0)))
    used = 100.0 * (total - available) / total if total else 0.0
    return Memory(total_bytes=total, available_bytes=available, used_percent=coarse(used))


def read_host_uptime(proc: Path = PROC) -> float:
    try:
        return coarse(float((proc / "uptime").read_text().split()[0]))
    except (OSError, IndexError, ValueError):
        return 0.0


def read_disk(path: Path) -> Disk:
    """Free and total bytes of the volume holding ``path`` (the state directory)."""
    try:
        stat = os.statvfs(path)
    except OSError as exc:
        logger.warning("cannot stat the state volume: %s", exc.strerror)
        return Disk(free_bytes=0, total_bytes=0)
    # f_bavail: what an unprivileged service may still write, not the root reserve.
    return Disk(free_bytes=stat.f_bavail * stat.f_frsize, total_bytes=stat.f_blocks * stat.f_frsize)
