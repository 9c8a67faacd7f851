"""Host figures, sensors, the service metrics registry and the reconnect backoff.

/proc and /sys are read for real where they exist; thermal zones, Jetson sysfs and NVML are
absent on this machine, so those readers run on prepared trees and a stand-in NVML module.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgeid.runtime.system.metrics import LATENCY_BUCKETS_S, ServiceMetrics, percentile
from edgeid.runtime.telemetry.backoff import Backoff
from edgeid.runtime.telemetry.host import (
    CpuSampler,
    read_cpu,
    read_disk,
    read_host_uptime,
    read_memory,
)
from edgeid.runtime.telemetry.sensors import (
    NvmlReader,
    SensorReader,
    read_jetson_gpu,
    read_thermal_zones,
    sensor_name,
)

# -- host ------------------------------------------------------------------------------------


def test_real_proc_figures_are_plausible(tmp_path: Path) -> None:
    sampler = CpuSampler()
    cpu = read_cpu(sampler)
    assert 0.0 <= cpu.percent <= 100.0
    assert cpu.cores == os.cpu_count()
    # The kernel refreshes the load every 5 s: the two reads may straddle one refresh.
    assert cpu.load1 == pytest.approx(os.getloadavg()[0], abs=0.5)
    memory = read_memory()
    assert 0 < memory.available_bytes <= memory.total_bytes
    assert read_host_uptime() > 0
    disk = read_disk(tmp_path)
    statvfs = os.statvfs(tmp_path)
    assert disk.total_bytes == statvfs.f_blocks * statvfs.f_frsize
    assert 0 < disk.free_bytes <= disk.total_bytes


def _proc(root: Path, stat: str, meminfo: str, loadavg: str = "0.50 0.25 0.125 1/99 42") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "stat").write_text(stat)
    (root / "meminfo").write_text(meminfo)
    (root / "loadavg").write_text(loadavg)
    (root / "uptime").write_text("12345.678 999.0\n")
    return root


def test_cpu_percent_is_busy_share_between_reads(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "cpu  100 0 100 800 0 0 0 0 0 0\n", "MemTotal: 1000 kB\n")
    sampler = CpuSampler(proc)
    # +300 busy (user+system), +100 idle, +100 iowait: 300 of 500 jiffies busy.
    (proc / "stat").write_text("cpu  300 0 200 900 100 0 0 0 0 0\n")
    cpu = read_cpu(sampler, proc)
    assert cpu.percent == 60.0
    assert (cpu.load1, cpu.load5, cpu.load15) == (0.5, 0.25, 0.125)
    assert read_cpu(sampler, proc).percent == 0.0  # nothing moved since


def test_memory_prefers_memavailable(tmp_path: Path) -> None:
    proc = _proc(
        tmp_path, "cpu 1 1 1 1\n", "MemTotal: 2000 kB\nMemFree: 100 kB\nMemAvailable: 500 kB\n"
    )
    memory = read_memory(proc)
    assert (memory.total_bytes, memory.available_bytes) == (2000 * 1024, 500 * 1024)
    assert memory.used_percent == 75.0
    assert read_host_uptime(proc) == 12345.678


def test_missing_proc_files_leave_gaps_not_errors(tmp_path: Path) -> None:
    empty = tmp_path / "proc"
    empty.mkdir()
    assert read_cpu(CpuSampler(empty), empty).percent == 0.0
    assert read_memory(empty).total_bytes == 0
    assert read_host_uptime(empty) == 0.0
    assert read_disk(tmp_path / "absent").total_bytes == 0


# -- sensors -----------------------------------------------------------------------------------


def _zone(sys_root: Path, number: int, kind: str, millidegrees: str) -> None:
    zone = sys_root / "class" / "thermal" / f"thermal_zone{number}"
    zone.mkdir(parents=True)
    (zone / "type").write_text(kind + "\n")
    (zone / "temp").write_text(millidegrees + "\n")


def test_thermal_zones_as_a_jetson_reports_them(tmp_path: Path) -> None:
    _zone(tmp_path, 0, "CPU-therm", "48500")
    _zone(tmp_path, 1, "GPU-therm", "46000")
    _zone(tmp_path, 2, "PMIC-Die", "100000")
    _zone(tmp_path, 10, "acpitz", "27800")
    _zone(tmp_path, 11, "acpitz", "29800")  # two zones with one type keep apart
    _zone(tmp_path, 3, "Tboard tegra", "-273200")  # an unplugged probe: no reading
    _zone(tmp_path, 4, "thermal sensor for Jane Doe's room!", "30000")
    readings = {t.sensor: t.celsius for t in read_thermal_zones(tmp_path)}
    assert readings == {
        "cpu-therm": 48.5,
        "gpu-therm": 46.0,
        "pmic-die": 100.0,
        "thermal_sensor_for_jane_doe_s_ro": 30.0,
        "acpitz": 27.8,
        "acpitz.11": 29.8,
    }


def test_sensor_names_are_sanitised_or_replaced() -> None:
    assert sensor_name("CPU-therm\n", "zone0") == "cpu-therm"
    assert sensor_name("  ", "zone7") == "zone7"
    assert sensor_name("_leading", "zone1") == "zone1"


def test_jetson_gpu_load_from_sysfs(tmp_path: Path) -> None:
    assert read_jetson_gpu(tmp_path) == []
    load = tmp_path / "devices" / "platform" / "17000000.ga10b" / "load"
    load.parent.mkdir(parents=True)
    load.write_text("637\n")
    gpus = read_jetson_gpu(tmp_path)
    assert [(g.source, g.load_percent, g.memory_total_bytes) for g in gpus] == [
        ("jetson", 63.7, None)
    ]


class _FakeNvml:
    """Stand-in for pynvml (no NVIDIA GPU here): two GPUs, then a driver failure."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self) -> None:
        self.fail = False
        self.initialised = 0

    def nvmlInit(self) -> None:
        self.initialised += 1

    def nvmlDeviceGetCount(self) -> int:
        if self.fail:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=[35, 80][handle], memory=5)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=(handle + 1) * 2**30, total=8 * 2**30, free=0)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return [51, 66][handle]


def test_nvml_figures_and_a_gpu_that_stops_answering(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = _FakeNvml()
    reader = SensorReader(tmp_path, NvmlReader(fake))
    temps, gpus = reader.read()
    assert [(g.index, g.source, g.load_percent, g.memory_used_bytes) for g in gpus] == [
        (0, "nvml", 35.0, 2**30),
        (1, "nvml", 80.0, 2 * 2**30),
    ]
    assert [(t.sensor, t.celsius) for t in temps] == [("gpu0", 51.0), ("gpu1", 66.0)]
    fake.fail = True
    assert reader.read() == ([], [])
    assert "NVML stopped answering" in caplog.text
    assert reader.read() == ([], [])  # skipped quietly afterwards
    assert caplog.text.count("NVML stopped answering") == 1
    assert fake.initialised == 1


def test_without_pynvml_the_reader_is_unavailable() -> None:
    reader = NvmlReader()
    if reader.available:
        pytest.skip("pynvml is installed here; the absent case cannot be shown")
    assert reader.read() == ([], [])


# -- the service metrics registry --------------------------------------------------------------


def test_percentiles_counts_and_reset() -> None:
    metrics = ServiceMetrics()
    for ms in range(1, 101):  # 1..100 ms
        metrics.record_request(ms / 1000)
    metrics.record_request(5.0, error=True)  # an error adds no latency sample
    metrics.record_error()
    metrics.set_queue_depth(7)
    metrics.set_queue_depth(2)
    metrics.set_backend_state("tensorrt")
    snap = metrics.snapshot_and_reset()
    assert (snap.requests, snap.errors) == (102, 2)
    assert snap.latency_p50_s == pytest.approx(0.050)
    assert snap.latency_p95_s == pytest.approx(0.095)
    assert (snap.queue_depth, snap.queue_depth_max) == (2, 7)
    assert snap.backend_state == "tensorrt"
    after = metrics.snapshot()
    assert (after.requests, after.errors, after.latency_p50_s) == (0, 0, None)
    assert (after.queue_depth, after.queue_depth_max, after.backend_state) == (2, 2, "tensorrt")


def test_latency_buckets_per_period_and_totals_since_start() -> None:
    metrics = ServiceMetrics()
    assert len(LATENCY_BUCKETS_S) == 14 and list(LATENCY_BUCKETS_S) == sorted(LATENCY_BUCKETS_S)
    for seconds in (0.001, 0.005, 0.0051, 0.3, 0.3, 11.0):  # a bound belongs to its bucket (le)
        metrics.record_request(seconds)
    metrics.record_request(0.2, error=True)  # counted as a request, not timed
    metrics.record_request(float("nan"))  # not a duration: no bucket
    first = metrics.snapshot_and_reset()
    expected = [0] * (len(LATENCY_BUCKETS_S) + 1)
    expected[0], expected[1], expected[7], expected[-1] = 2, 1, 2, 1
    assert list(first.latency_buckets) == expected
    assert first.latency_sum_s == pytest.approx(11.6111)
    metrics.record_request(0.05)
    second = metrics.snapshot_and_reset()
    assert sum(second.latency_buckets) == 1 and second.latency_buckets[3] == 1
    assert second.latency_sum_s == pytest.approx(0.05)
    totals = metrics.totals()  # the box's /metrics: never reset
    assert (totals.requests, totals.errors) == (9, 1)
    assert [a + b for a, b in zip(first.latency_buckets, second.latency_buckets, strict=True)] == (
        list(totals.latency_buckets)
    )
    assert totals.latency_sum_s == pytest.approx(11.6611)


def test_snapshot_without_reset_leaves_the_period_open() -> None:
    metrics = ServiceMetrics()
    metrics.record_request(0.01)
    assert metrics.snapshot().requests == 1
    assert metrics.snapshot_and_reset().requests == 1


def test_latency_memory_is_bounded_and_the_sample_stays_unbiased() -> None:
    metrics = ServiceMetrics(max_samples=256, rng=random.Random(7))
    values = list(range(1, 20_001))  # 1..20000 ms in random order
    random.Random(3).shuffle(values)
    for ms in values:
        metrics.record_request(ms / 1000)
    assert len(metrics._samples) == 256
    snap = metrics.snapshot_and_reset()
    assert snap.requests == 20_000
    # A 256-value uniform sample: p50 within a few percent of 10 s, p95 of 19 s.
    assert snap.latency_p50_s == pytest.approx(10.0, rel=0.12)
    assert snap.latency_p95_s == pytest.approx(19.0, rel=0.05)


def test_queue_depth_source_is_read_at_snapshot_and_its_failure_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = ServiceMetrics()
    depth = [4]
    metrics.set_queue_depth_source(lambda: depth[0])
    assert metrics.snapshot().queue_depth == 4

    def broken() -> int:
        raise RuntimeError("batcher gone")

    metrics.set_queue_depth_source(broken)
    assert metrics.snapshot().queue_depth == 4
    assert "reading the queue depth failed" in caplog.text


def test_metrics_are_thread_safe() -> None:
    metrics = ServiceMetrics(max_samples=64)
    per_thread = 5000

    def work() -> None:
        for i in range(per_thread):
            metrics.record_request(0.001, error=i % 10 == 0)

    threads = [threading.Thread(target=work) for _ in range(4)]
    totals = [0, 0]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        snap = metrics.snapshot_and_reset()
        totals[0] += snap.requests
        totals[1] += snap.errors
    snap = metrics.snapshot_and_reset()
    assert totals[0] + snap.requests == 4 * per_thread
    assert totals[1] + snap.errors == 4 * per_thread // 10


def test_percentile_nearest_rank() -> None:
    assert percentile([1.0], 0.95) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(1, 21)], 0.95) == 19.0


# -- backoff -------------------------------------------------------------------------------------


def test_backoff_doubles_to_the_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(1.0, 8.0, random.Random(1))
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [1, 2, 4, 8, 8, 8, 8, 8]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len({round(d, 6) for d in delays[3:]}) > 1, "capped delays must still be jittered"
    backoff.reset()
    assert 0.5 <= backoff.next_delay() <= 1.0


def test_jitter_spreads_a_fleet_that_lost_its_broker_together() -> None:
    first = [Backoff(1.0, 60.0, random.Random(seed)) for seed in range(50)]
    for b in first:
        for _ in range(5):
            b.next_delay()
    sixth = sorted(b.next_delay() for b in first)
    assert sixth[0] >= 16.0 and sixth[-1] <= 32.0
    assert sixth[-1] - sixth[0] > 8.0


def test_backoff_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)
