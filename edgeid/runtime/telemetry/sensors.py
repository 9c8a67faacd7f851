"""Temperatures and GPU figures, from whatever the box has: Linux thermal zones, a Jetson's GPU
load in sysfs, an NVIDIA GPU through NVML (``pynvml``, when importable).

None of these exists on every box (a VM has no thermal zone, a CPU box no GPU); an absent
source contributes nothing and is not an error. A source that fails after working is logged
once and then skipped quietly, so a flaky sensor never floods the journal.
"""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path
from types import ModuleType
from typing import Any

from edgeid.runtime.telemetry.schema import SENSOR_PATTERN, Gpu, Temperature, coarse

logger = logging.getLogger(__name__)

SYS = Path("/sys")
# Jetson GPU load (per mille) across L4T releases: TX2/Xavier, Nano, Orin.
JETSON_GPU_LOAD_GLOBS = (
    "devices/gpu.0/load",
    "devices/platform/gpu.0/load",
    "devices/platform/*.gpu/load",
    "devices/platform/*.ga10b/load",
    "devices/platform/bus@0/*.gpu/load",
)
MAX_ZONES = 64
_SENSOR = re.compile(SENSOR_PATTERN)
_UNSAFE = re.compile(r"[^a-z0-9_.-]")
# Kernels report -273.2 or 0 for an unplugged probe; outside the schema's range means no reading.
MIN_CELSIUS, MAX_CELSIUS = -100.0, 250.0


def sensor_name(raw: str, fallback: str) -> str:
    """A schema-safe sensor name from a kernel-supplied type ("CPU-therm" -> "cpu-therm")."""
    name = _UNSAFE.sub("_", raw.strip().lower())[:32]
    return name if _SENSOR.match(name) else fallback


def read_thermal_zones(sys_root: Path = SYS) -> list[Temperature]:
    zones = sorted(
        (p for p in (sys_root / "class" / "thermal").glob("thermal_zone*") if _zone_number(p)),
        key=lambda p: int(_zone_number(p)),
    )
    readings: list[Temperature] = []
    seen: set[str] = set()
    for zone in zones[:MAX_ZONES]:
        number = _zone_number(zone)
        try:
            millidegrees = int((zone / "temp").read_text().strip())
            raw_type = (zone / "type").read_text()
        except (OSError, ValueError):
            continue  # a zone without a readable sensor (disabled, or needs a driver)
        celsius = millidegrees / 1000.0
        if not MIN_CELSIUS <= celsius <= MAX_CELSIUS:
            continue
        name = sensor_name(raw_type, f"zone{number}")
        if name in seen:
            name = sensor_name(f"{name[:24]}.{number}", f"zone{number}")
        seen.add(name)
        readings.append(Temperature(sensor=name, celsius=coarse(celsius)))
    return readings


def _zone_number(zone: Path) -> str:
    number = zone.name.removeprefix("thermal_zone")
    return number if number.isdigit() else ""


def read_jetson_gpu(sys_root: Path = SYS) -> list[Gpu]:
    for pattern in JETSON_GPU_LOAD_GLOBS:
        for path in sorted(sys_root.glob(pattern)):
            try:
                per_mille = int(path.read_text().strip())
            except (OSError, ValueError):
                continue
            # Jetson memory is shared with the CPU and already in the memory figures.
            return [Gpu(index=0, source="jetson", load_percent=coarse(min(1000, per_mille) / 10))]
    return []


class NvmlReader:
    """GPU load, memory and temperature per NVIDIA GPU, through NVML."""

    def __init__(self, module: ModuleType | Any | None = None) -> None:
        # Typed Any: pynvml ships no type information, and tests pass a stand-in module.
        self._nvml: Any = module if module is not None else _import_pynvml()
        self._ready = False
        self._failed = False

    @property
    def available(self) -> bool:
        return self._nvml is not None and not self._failed

    def read(self) -> tuple[list[Gpu], list[Temperature]]:
        if not self.available:
            return [], []
        nvml = self._nvml
        try:
            if not self._ready:
                nvml.nvmlInit()
                self._ready = True
            gpus: list[Gpu] = []
            temps: list[Temperature] = []
            for index in range(min(16, int(nvml.nvmlDeviceGetCount()))):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                util = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                gpus.append(
                    Gpu(
                        index=index,
                        source="nvml",
                        load_percent=coarse(min(100.0, float(util.gpu))),
                        memory_used_bytes=int(memory.used),
                        memory_total_bytes=int(memory.total),
                    )
                )
                celsius = float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
                if MIN_CELSIUS <= celsius <= MAX_CELSIUS:
                    temps.append(Temperature(sensor=f"gpu{index}", celsius=coarse(celsius)))
            return gpus, temps
        except Exception as exc:  # NVMLError and driver faults: report without the GPU
            self._failed = True
            logger.warning("NVML stopped answering (%s); GPU figures left out", type(exc).__name__)
            return [], []


def _import_pynvml() -> ModuleType | None:
    try:
        return importlib.import_module("pynvml")
    except Exception:  # absent, or present without a driver to load
        return None


class SensorReader:
    """Every temperature and GPU source of the box, read in one call."""

    def __init__(self, sys_root: Path = SYS, nvml: NvmlReader | None = None) -> None:
        self._sys = sys_root
        self._nvml = nvml or NvmlReader()

    def read(self) -> tuple[list[Temperature], list[Gpu]]:
        temperatures = read_thermal_zones(self._sys)
        nvml_gpus, nvml_temps = self._nvml.read()
        gpus = nvml_gpus or read_jetson_gpu(self._sys)
        return (temperatures + nvml_temps)[:MAX_ZONES], gpus
