"""Prometheus metric families for a box's health, named once for both places that expose them:
the fleet manager (every device, from their reports) and the box's own ``/metrics``.

Conventions: base units (``_seconds``, ``_bytes``, ``_celsius``), shares as ``_ratio`` (0-1),
counters end in ``_total``, latency is a histogram (buckets add up across boxes, percentiles do
not). Labels are the device's site and id (slugs), a sensor name, a GPU index or a model name:
nothing a person could be named by.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from edgeid.runtime.system.metrics import (
    LATENCY_BUCKET_COUNT,
    LATENCY_BUCKETS_S,
    InferenceTotals,
)
from edgeid.runtime.telemetry.schema import HealthReport

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
DEVICE = ("site", "device")
DeviceLabels = tuple[str, str]
LATENCY = "edgeid_device_inference_latency_seconds"


class Families:
    """The families of one exposition, filled device by device; ``collect`` yields those that
    have samples."""

    def __init__(self) -> None:
        self._all: list[Metric] = []
        g, c = self._gauge, self._counter
        self.info = g("edgeid_device_info", "Software version and inference backend, value 1",
                      ("version", "backend"))  # fmt: skip
        self.uptime = g("edgeid_device_uptime_seconds", "Uptime of the device's service")
        self.host_uptime = g("edgeid_device_host_uptime_seconds", "Uptime of the device's host")
        self.cpu = g(
            "edgeid_device_cpu_usage_ratio", "CPU busy share of all cores (0-1) over the period"
        )
        self.cores = g("edgeid_device_cpu_cores", "CPU cores")
        self.load1 = g("edgeid_device_load1", "1-minute load average")
        self.load5 = g("edgeid_device_load5", "5-minute load average")
        self.load15 = g("edgeid_device_load15", "15-minute load average")
        self.mem_available = g("edgeid_device_memory_available_bytes", "Memory available")
        self.mem_total = g("edgeid_device_memory_total_bytes", "Memory installed")
        self.disk_free = g("edgeid_device_disk_free_bytes", "Free space on the state volume")
        self.disk_total = g("edgeid_device_disk_total_bytes", "Size of the state volume")
        self.temperature = g(
            "edgeid_device_temperature_celsius", "Temperature per sensor", ("sensor",)
        )
        self.gpu_load = g("edgeid_device_gpu_load_ratio", "GPU load (0-1)", ("gpu",))
        self.gpu_used = g("edgeid_device_gpu_memory_used_bytes", "GPU memory in use", ("gpu",))
        self.gpu_total = g("edgeid_device_gpu_memory_total_bytes", "GPU memory", ("gpu",))
        self.engine_memory = g(
            "edgeid_device_engine_memory_bytes",
            "GPU memory a model's TensorRT engine holds",
            ("model",),
        )
        self.queue = g("edgeid_device_queue_depth", "Inference requests waiting")
        self.degraded = g(
            "edgeid_device_backend_degraded",
            "1 when the inference backend runs degraded (TensorRT failed, CPU fallback)",
        )
        self.damaged = g(
            "edgeid_device_integrity_damaged_objects", "Damaged sealed files at the last scrub"
        )
        self.scrubbed = g(
            "edgeid_device_integrity_scrub_timestamp_seconds",
            "Unix time (device clock) the last integrity scrub finished",
        )
        self.requests = c(
            "edgeid_device_inference_requests", "Requests the device served (errors included)"
        )
        self.errors = c("edgeid_device_inference_errors", "Requests that failed")
        self.latency = HistogramMetricFamily(
            LATENCY, "Latency of the device's successful requests", labels=DEVICE
        )
        self._all.append(self.latency)

    def _gauge(self, name: str, doc: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=(*DEVICE, *extra))
        self._all.append(family)
        return family

    def _counter(self, name: str, doc: str, extra: tuple[str, ...] = ()) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=(*DEVICE, *extra))
        self._all.append(family)
        return family

    def gauge(self, name: str, doc: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
        """Another gauge family, for figures only one side has (the fleet's device state)."""
        return self._gauge(name, doc, extra)

    def counter(self, name: str, doc: str, extra: tuple[str, ...] = ()) -> CounterMetricFamily:
        return self._counter(name, doc, extra)

    def health(self, device: DeviceLabels, report: HealthReport) -> None:
        """The gauges of one health report."""
        d = list(device)
        info = [report.software.edgeid, report.inference.backend or "none"]
        self.info.add_metric([*d, *info], 1.0)
        self.uptime.add_metric(d, report.uptime_s)
        self.host_uptime.add_metric(d, report.host_uptime_s)
        self.cpu.add_metric(d, report.cpu.percent / 100.0)
        self.cores.add_metric(d, report.cpu.cores)
        self.load1.add_metric(d, report.cpu.load1)
        self.load5.add_metric(d, report.cpu.load5)
        self.load15.add_metric(d, report.cpu.load15)
        self.mem_available.add_metric(d, report.memory.available_bytes)
        self.mem_total.add_metric(d, report.memory.total_bytes)
        self.disk_free.add_metric(d, report.disk.free_bytes)
        self.disk_total.add_metric(d, report.disk.total_bytes)
        for temp in report.temperatures:
            self.temperature.add_metric([*d, temp.sensor], temp.celsius)
        for gpu in report.gpus:
            index = [*d, str(gpu.index)]
            if gpu.load_percent is not None:
                self.gpu_load.add_metric(index, gpu.load_percent / 100.0)
            if gpu.memory_used_bytes is not None:
                self.gpu_used.add_metric(index, gpu.memory_used_bytes)
            if gpu.memory_total_bytes is not None:
                self.gpu_total.add_metric(index, gpu.memory_total_bytes)
        for engine in report.inference.engine_memory:
            self.engine_memory.add_metric([*d, engine.model], engine.bytes)
        self.queue.add_metric(d, report.inference.queue_depth)
        self.degraded.add_metric(d, float(report.inference.backend == "degraded"))
        if report.integrity is not None:
            self.damaged.add_metric(d, report.integrity.damaged)
            self.scrubbed.add_metric(d, report.integrity.finished_at)

    def inference(self, device: DeviceLabels, totals: InferenceTotals) -> None:
        """The request counters and the latency histogram."""
        d = list(device)
        self.requests.add_metric(d, totals.requests)
        self.errors.add_metric(d, totals.errors)
        if totals.latency_buckets is not None:
            self.latency.add_metric(
                d, histogram_buckets(totals.latency_buckets), totals.latency_sum_s
            )

    def collect(self) -> Iterator[Metric]:
        return (family for family in self._all if family.samples)

    def every_family(self) -> list[Metric]:
        """All families in the order ``collect`` yields them, with samples or not."""
        return list(self._all)


def histogram_buckets(counts: Sequence[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (``LATENCY_BUCKETS_S`` and one slower) as Prometheus' cumulative
    ``le`` buckets ending in ``+Inf``."""
    if len(counts) != LATENCY_BUCKET_COUNT:
        raise ValueError(f"expected {LATENCY_BUCKET_COUNT} bucket counts")
    out, running = [], 0
    for bound, count in zip((*(repr(b) for b in LATENCY_BUCKETS_S), "+Inf"), counts, strict=True):
        running += count
        out.append((bound, float(running)))
    return out


class FamiliesCollector(Collector):
    """A registry collector over a function that fills ``Families`` at each scrape."""

    def __init__(self, fill: Callable[[Families], None]) -> None:
        self._fill = fill

    def collect(self) -> Iterator[Metric]:
        families = Families()
        self._fill(families)
        yield from families.collect()


WRITTEN_TYPES = frozenset({"counter", "gauge", "histogram"})
# Go's float formatting as Prometheus writes it ("+Inf", "1e+06"); the library leaves it untyped.
_go_float: Callable[[float], str] = floatToGoString


def _label_value(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


def family_header(family: Metric) -> str:
    """The ``# HELP`` and ``# TYPE`` lines of a family."""
    if family.type not in WRITTEN_TYPES:
        raise ValueError(f"{family.name}: {family.type} families are not written here")
    name = f"{family.name}_total" if family.type == "counter" else family.name
    doc = family.documentation.replace("\\", "\\\\").replace("\n", "\\n")
    return f"# HELP {name} {doc}\n# TYPE {name} {family.type}\n"


def sample_line(sample: Sample) -> str:
    if sample.timestamp is not None or sample.exemplar is not None:
        raise ValueError(f"{sample.name}: timestamps and exemplars are not written here")
    value = _go_float(sample.value)
    if not sample.labels:
        return f"{sample.name} {value}\n"
    labels = ",".join(f'{k}="{_label_value(v)}"' for k, v in sorted(sample.labels.items()))
    return f"{sample.name}{{{labels}}} {value}\n"


def render(collector: Collector) -> bytes:
    """The text exposition (format 0.0.4) of ``collector``'s families, byte for byte what
    ``prometheus_client.generate_latest`` writes for them (tests compare the two) in about
    half its time, which counts with thousands of devices: only the family types used here,
    without timestamps or exemplars."""
    out: list[str] = []
    for family in collector.collect():
        out.append(family_header(family))
        out.extend(sample_line(sample) for sample in family.samples)
    return "".join(out).encode("utf-8")


def render_reference(collector: Collector) -> bytes:
    """``prometheus_client``'s own writer, the reference ``render`` is checked against."""
    return generate_latest(collector)
