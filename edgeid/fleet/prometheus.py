"""``/metrics``: the fleet in Prometheus text exposition format (version 0.0.4).

Labels are the device's site and id (slugs, checked on arrival), a sensor name or a GPU index:
nothing a person could be named by.
"""

from __future__ import annotations

from collections.abc import Iterable

from edgeid.fleet.devices import DEVICE_STATES, DeviceView

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = dict[str, str]

# name: (type, help). Device counters accumulate the per-report counts the fleet received.
FAMILIES: dict[str, tuple[str, str]] = {
    "edgeid_device_state": ("gauge", "1 for the device's current state, 0 for the others"),
    "edgeid_device_up": ("gauge", "1 when the device is online and reporting"),
    "edgeid_device_last_seen_timestamp_seconds": (
        "gauge",
        "Unix time the fleet manager last got a valid message from the device",
    ),
    "edgeid_device_info": ("gauge", "Software version and inference backend, value 1"),
    "edgeid_device_uptime_seconds": ("gauge", "Uptime of the device's service"),
    "edgeid_device_cpu_percent": ("gauge", "CPU busy share over the last report's period"),
    "edgeid_device_load1": ("gauge", "1-minute load average"),
    "edgeid_device_memory_available_bytes": ("gauge", "Memory available"),
    "edgeid_device_memory_total_bytes": ("gauge", "Memory installed"),
    "edgeid_device_disk_free_bytes": ("gauge", "Free space on the state volume"),
    "edgeid_device_temperature_celsius": ("gauge", "Temperature per sensor"),
    "edgeid_device_gpu_load_percent": ("gauge", "GPU load"),
    "edgeid_device_gpu_memory_used_bytes": ("gauge", "GPU memory in use"),
    "edgeid_device_inference_latency_p50_seconds": (
        "gauge",
        "Median inference latency over the last report's period",
    ),
    "edgeid_device_inference_latency_p95_seconds": (
        "gauge",
        "95th percentile inference latency over the last report's period",
    ),
    "edgeid_device_queue_depth": ("gauge", "Inference requests waiting"),
    "edgeid_device_inference_requests_total": (
        "counter",
        "Inference requests the device reported since the fleet manager started",
    ),
    "edgeid_device_inference_errors_total": (
        "counter",
        "Inference errors the device reported since the fleet manager started",
    ),
    "edgeid_device_spool_dropped_total": (
        "counter",
        "Reports the device's spool cap dropped while the broker was unreachable",
    ),
    "edgeid_fleet_messages_accepted_total": ("counter", "Valid telemetry messages received"),
    "edgeid_fleet_messages_rejected_total": (
        "counter",
        "Messages refused: unknown topic, or a payload outside the telemetry schema",
    ),
    "edgeid_fleet_messages_duplicate_total": (
        "counter",
        "Messages received again (spool redelivery), counted once",
    ),
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Samples:
    def __init__(self) -> None:
        self._by_family: dict[str, list[str]] = {name: [] for name in FAMILIES}

    def add(self, name: str, labels: Labels, value: float | None) -> None:
        if value is None:
            return
        text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        series = f"{name}{{{text}}}" if text else name
        self._by_family[name].append(f"{series} {_number(float(value))}")

    def render(self) -> str:
        lines: list[str] = []
        for name, samples in self._by_family.items():
            kind, help_text = FAMILIES[name]
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]
        return "\n".join(lines) + "\n"


def _device(out: _Samples, view: DeviceView) -> None:
    base = {"site": view.site, "device": view.device}
    for state in DEVICE_STATES:
        out.add("edgeid_device_state", base | {"state": state}, float(view.state == state))
    out.add("edgeid_device_up", base, float(view.state == "online"))
    out.add("edgeid_device_last_seen_timestamp_seconds", base, view.last_seen)
    out.add("edgeid_device_inference_requests_total", base, view.requests_total)
    out.add("edgeid_device_inference_errors_total", base, view.errors_total)
    h = view.health
    if h is None:
        return
    info = {"version": h.software.edgeid, "backend": h.inference.backend or "none"}
    out.add("edgeid_device_info", base | info, 1.0)
    out.add("edgeid_device_uptime_seconds", base, h.uptime_s)
    out.add("edgeid_device_cpu_percent", base, h.cpu.percent)
    out.add("edgeid_device_load1", base, h.cpu.load1)
    out.add("edgeid_device_memory_available_bytes", base, h.memory.available_bytes)
    out.add("edgeid_device_memory_total_bytes", base, h.memory.total_bytes)
    out.add("edgeid_device_disk_free_bytes", base, h.disk.free_bytes)
    for temp in h.temperatures:
        out.add("edgeid_device_temperature_celsius", base | {"sensor": temp.sensor}, temp.celsius)
    for gpu in h.gpus:
        labels = base | {"gpu": str(gpu.index)}
        out.add("edgeid_device_gpu_load_percent", labels, gpu.load_percent)
        out.add("edgeid_device_gpu_memory_used_bytes", labels, gpu.memory_used_bytes)
    p50, p95 = h.inference.latency_p50_ms, h.inference.latency_p95_ms
    out.add("edgeid_device_inference_latency_p50_seconds", base, None if p50 is None else p50 / 1e3)
    out.add("edgeid_device_inference_latency_p95_seconds", base, None if p95 is None else p95 / 1e3)
    out.add("edgeid_device_queue_depth", base, h.inference.queue_depth)
    out.add("edgeid_device_spool_dropped_total", base, h.spool.dropped_total)


def render(devices: Iterable[DeviceView], counters: dict[str, int]) -> str:
    out = _Samples()
    for view in devices:
        _device(out, view)
    out.add("edgeid_fleet_messages_accepted_total", {}, counters["accepted"])
    out.add("edgeid_fleet_messages_rejected_total", {}, counters["rejected"])
    out.add("edgeid_fleet_messages_duplicate_total", {}, counters["duplicates"])
    return out.render()
