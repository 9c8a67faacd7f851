"""The fleet manager under a fleet: N virtual boxes against a real Mosquitto and a real
``edgeid fleet serve``.

    python -m benchmarks.fleet_bench --devices 2000 --interval 10 --duration 120 [--json]

What runs: a throwaway PKI (``fleet_pki``; one client certificate per box, cached), Mosquitto
with TLS, client certificates required, the CN as user name and the product's ACL (``pattern
write edgeid/%u/#``; the fleet manager reads ``edgeid/#``), ``edgeid fleet serve`` as a child
process, and the virtual boxes (``fleet_sim``) in one or more processes, each box with its own
certificate and connection, reporting every interval with QoS 1 and a sequence number.

The publishing window is split in two halves. First half: ingest only; the fleet manager's and
the broker's CPU seconds per message are measured there. Second half: the same ingest while
``GET /`` and ``GET /metrics`` are fetched in turn, one request every ``--probe-every`` seconds
(each page once a second by default: far more than a Prometheus scrape and a few open
dashboards), for their p50/p99 latency. One request to each page comes first and is reported
apart: it makes the window stand for a scraper that has been watching all along (a large
fleet's pages are rendered in the background while requested: ``edgeid/fleet/live_page.py``).
Then the boxes' PUBACKs are counted against what the fleet manager lists: per box,
``requests_total`` counts the distinct reports it took (every simulated report carries one
request, and the fleet manager skips a seq it has seen) and ``health.seq`` is the newest.

Exit status: 0 when every box is listed and no report is missing, else 1 (figures printed
either way). The latency target (p99 <= 200 ms) is reported, not enforced: the machine is
shared.
"""

from __future__ import annotations

import argparse
import getpass
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import edgeid
from benchmarks.fleet_pki import FLEET_CN, BenchPki, bench_pki
from benchmarks.fleet_sim import SimConfig, worker
from edgeid.runtime.inference.model_home import models_dir
from edgeid.runtime.system.metrics import ServiceMetrics
from edgeid.runtime.telemetry.report import HealthCollector
from edgeid.runtime.telemetry.schema import SpoolState, encode
from edgeid.runtime.telemetry.software import model_ids

REPO_ROOT = Path(__file__).resolve().parent.parent
BOXES_PER_SITE = 50
LATENCY_TARGET_MS = 200.0
START_WAIT_S = 60.0
SETTLE_S = 30.0  # after the run, how long the fleet manager may take to list the last reports
HTTP_TIMEOUT_S = 30.0
FD_MARGIN = 100  # the broker's own files, the fleet manager's connection, logs

ACL = f"""\
# The product's pattern: CN "<site>/<device>" writes under edgeid/<site>/<device>/ only.
pattern write edgeid/%u/#

user {FLEET_CN}
topic read edgeid/#
topic write homeassistant/#
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if os.access(p, os.X_OK)), None
    )
    if not found:
        raise SystemExit("mosquitto not found (apt-get install mosquitto)")
    return found


def box_names(devices: int) -> list[tuple[str, str]]:
    return [(f"site-{i // BOXES_PER_SITE:03d}", f"box-{i:05d}") for i in range(devices)]


# -- /proc ------------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def memory_kib(pid: int) -> dict[str, int]:
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


# -- the broker and the fleet manager ---------------------------------------------------------


def start_broker(pki: BenchPki, folder: Path, port: int, devices: int) -> subprocess.Popen[bytes]:
    (folder / "acl").write_text(ACL)
    (folder / "mosquitto.conf").write_text(
        f"""\
per_listener_settings false
user {getpass.getuser()}
allow_anonymous false
persistence false
log_dest stderr
log_type error
log_type warning
log_type notice
connection_messages false
acl_file {folder / "acl"}
# The fleet manager is one subscriber receiving every box's reports: let a burst queue for it
# instead of being dropped (the default is 1000 messages per client).
max_queued_messages {max(1000, 10 * devices)}
listener {port} 127.0.0.1
max_connections -1
cafile {pki.ca_cert}
certfile {pki.server_pem}
keyfile {pki.server_pem}
require_certificate true
use_identity_as_username true
"""
    )
    log = (folder / "mosquitto.log").open("ab")
    process = subprocess.Popen(
        [mosquitto_binary(), "-c", str(folder / "mosquitto.conf")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    _wait_for(lambda: _listening(port), process, "mosquitto", folder / "mosquitto.log")
    return process


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _wait_for(
    ready: Callable[[], bool], process: subprocess.Popen[bytes], what: str, log: Path
) -> None:
    deadline = time.monotonic() + START_WAIT_S
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise SystemExit(f"{what} did not start:\n{text}")
        time.sleep(0.1)


def start_fleet(
    pki: BenchPki, folder: Path, broker_port: int, http_port: int, extra: list[str]
) -> subprocess.Popen[bytes]:
    log = (folder / "fleet.log").open("ab")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "edgeid", "fleet", "serve",
            "--broker-port", str(broker_port), "--ca", str(pki.ca_cert),
            "--cert", str(pki.fleet_cert), "--key", str(pki.fleet_key),
            "--listen", f"127.0.0.1:{http_port}", *extra,
        ],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    log.close()
    base = f"http://127.0.0.1:{http_port}"

    def subscribed() -> bool:
        try:
            return bool(get_json(base, "/healthz").get("broker_connected"))
        except OSError:
            return False

    _wait_for(subscribed, process, "edgeid fleet serve", folder / "fleet.log")
    return process


def get_json(base: str, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(base + path, timeout=HTTP_TIMEOUT_S) as response:
        value: dict[str, Any] = json.loads(response.read())
        return value


def listed(base: str) -> dict[str, dict[str, Any]]:
    return {f"{d['site']}/{d['device']}": d for d in get_json(base, "/api/devices")["devices"]}


# -- the report template ------------------------------------------------------------------------


def template_report(home: Path) -> bytes:
    """One real health report of this host, with one request recorded (see the module doc)."""
    metrics = ServiceMetrics()
    metrics.record_request(0.042)
    collector = HealthCollector(
        home,
        edgeid.__version__,
        metrics=metrics,
        backend_state=lambda: "cpu",
        model_ids=lambda: model_ids(models_dir(home)),
    )
    report = collector.collect(0, SpoolState(pending=0, dropped_total=0), reset_metrics=False)
    return encode(report)


# -- HTTP probes ------------------------------------------------------------------------------


@dataclass
class Probe:
    path: str
    ms: list[float]
    failures: int = 0
    bytes: int = 0
    first_ms: float | None = None  # the first request of the run, not in ms

    def fetch(self, base: str) -> float | None:
        """Milliseconds to fetch the whole page, or None (counted) when it failed."""
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(base + self.path, timeout=HTTP_TIMEOUT_S) as response:
                self.bytes = len(response.read())
        except OSError:
            self.failures += 1
            return None
        return (time.perf_counter() - started) * 1000.0


def probe_loop(base: str, probes: list[Probe], every_s: float, stop: threading.Event) -> None:
    for probe in probes:  # as a scraper that has been watching all along, not a first visit
        probe.first_ms = probe.fetch(base)
    turn = 0
    next_at = time.monotonic()
    while not stop.is_set():
        probe = probes[turn % len(probes)]
        turn += 1
        ms = probe.fetch(base)
        if ms is not None:
            probe.ms.append(ms)
        next_at += every_s
        stop.wait(max(0.0, next_at - time.monotonic()))


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation: p99 of 60 samples is the largest)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100.0 * len(ordered)) - 1))]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# -- the run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchArgs:
    devices: int
    interval_s: float
    duration_s: float
    procs: int
    probe_every_s: float
    work: Path
    fleet_args: list[str]


def raise_fd_limit(devices: int) -> None:
    """A descriptor per box, in Mosquitto and in the simulator: the soft limit goes up to what
    is needed (children inherit it), or the run stops here when the hard limit is too low."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = devices + FD_MARGIN
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(
            f"the open-files hard limit is {hard}, under {devices} boxes + {FD_MARGIN}; "
            "raise it (ulimit -Hn, or LimitNOFILE= for a service) or use fewer --devices"
        )
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def run(args: BenchArgs) -> dict[str, Any]:
    raise_fd_limit(args.devices)
    names = box_names(args.devices)
    t0 = time.monotonic()
    pki = bench_pki(args.work / "pki", names)
    pki_s = time.monotonic() - t0
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=args.work))
    broker_port, http_port = free_port(), free_port()
    base = f"http://127.0.0.1:{http_port}"
    home = Path(os.environ.get("EDGEID_HOME") or run_dir)
    config = SimConfig(
        host="127.0.0.1",
        port=broker_port,
        ca=str(pki.ca_cert),
        interval_s=args.interval_s,
        template=template_report(home),
    )
    broker = start_broker(pki, run_dir, broker_port, args.devices)
    fleet: subprocess.Popen[bytes] | None = None
    workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    try:
        fleet = start_fleet(pki, run_dir, broker_port, http_port, args.fleet_args)
        context = multiprocessing.get_context("spawn")
        for w in range(args.procs):
            mine = [
                (site, dev, str(pki.device_pem(site, dev)), i * args.interval_s / args.devices)
                for i, (site, dev) in enumerate(names)
                if i % args.procs == w
            ]
            parent_end, child_end = context.Pipe()
            process = context.Process(target=worker, args=(child_end, config, mine), daemon=True)
            process.start()
            workers.append((process, parent_end))
        t1 = time.monotonic()
        connected = sum(_expect(conn, "connected")[1] for _, conn in workers)
        connect_s = time.monotonic() - t1
        deadline = time.monotonic() + START_WAIT_S
        while len(listed(base)) < connected and time.monotonic() < deadline:
            time.sleep(0.5)

        start = time.monotonic() + 1.0
        middle = start + args.duration_s / 2
        end = start + args.duration_s
        for _, conn in workers:
            conn.send(("run", start, middle, end))
        time.sleep(max(0.0, start - time.monotonic()))
        fleet_cpu0, broker_cpu0 = cpu_seconds(fleet.pid), cpu_seconds(broker.pid)
        time.sleep(max(0.0, middle - time.monotonic()))
        fleet_cpu1, broker_cpu1 = cpu_seconds(fleet.pid), cpu_seconds(broker.pid)
        probes = [Probe("/", []), Probe("/metrics", [])]
        stop = threading.Event()
        prober = threading.Thread(target=probe_loop, args=(base, probes, args.probe_every_s, stop))
        prober.start()
        time.sleep(max(0.0, end - time.monotonic()))
        stop.set()
        prober.join()
        fleet_cpu2, broker_cpu2 = cpu_seconds(fleet.pid), cpu_seconds(broker.pid)
        memory, broker_memory = memory_kib(fleet.pid), memory_kib(broker.pid)
        stats = [_expect(conn, "done")[1] for _, conn in workers]

        boxes: dict[str, dict[str, Any]] = {}
        for part in stats:
            boxes.update(part["boxes"])
        seen = _settle(base, boxes)
        for _, conn in workers:
            conn.send(("close",))
        for _, conn in workers:
            _expect(conn, "closed")
    finally:
        for child_process, _ in workers:
            child_process.join(timeout=10)
            if child_process.is_alive():
                child_process.kill()
        for child in (fleet, broker):
            if child is not None and child.poll() is None:
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()

    window1 = sum(b["sent_by_window"][0] for b in boxes.values())
    window2 = sum(b["sent_by_window"][1] for b in boxes.values())
    lateness = [v for part in stats for v in part["lateness_ms"]]
    lost = {
        key: {"acked": b["acked"], "listed": seen.get(key, {}).get("received", 0)}
        for key, b in boxes.items()
        if seen.get(key, {}).get("received") != b["acked"]
        or seen.get(key, {}).get("last_seq") != b["last_seq"]
    }
    received = [seen.get(k, {}).get("received", 0) for k in boxes]
    sent = [b["sent"] for b in boxes.values()]
    latency = {
        p.path: {
            "requests": len(p.ms),
            "failures": p.failures,
            "p50_ms": _ms(percentile(p.ms, 50)),
            "p99_ms": _ms(percentile(p.ms, 99)),
            "max_ms": _ms(max(p.ms) if p.ms else None),
            "mean_ms": _ms(statistics.fmean(p.ms) if p.ms else None),
            "body_bytes": p.bytes,
            "first_request_ms": _ms(p.first_ms),
        }
        for p in probes
    }
    fleet_ingest_cpu = fleet_cpu1 - fleet_cpu0
    fleet_probe_cpu = fleet_cpu2 - fleet_cpu1
    return {
        "command": "python -m benchmarks.fleet_bench " + " ".join(sys.argv[1:]),
        "devices": args.devices,
        "interval_s": args.interval_s,
        "duration_s": args.duration_s,
        "messages_per_s": round(args.devices / args.interval_s, 1),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "pki_s": round(pki_s, 1),
        "connected": connected,
        "connect_s": round(connect_s, 1),
        "sent": sum(sent),
        "acked": sum(b["acked"] for b in boxes.values()),
        "refused": sum(b["refused"] for b in boxes.values()),
        "disconnects": sum(b["disconnects"] for b in boxes.values()),
        "received": sum(received),
        "sent_per_device": {"min": min(sent, default=0), "max": max(sent, default=0)},
        "received_per_device": {"min": min(received, default=0), "max": max(received, default=0)},
        "devices_listed": len(seen),
        "devices_with_loss": len(lost),
        "loss_examples": dict(list(lost.items())[:5]),
        "latency": latency,
        "latency_target_ms": LATENCY_TARGET_MS,
        "latency_target_met": all(
            v["p99_ms"] is not None and v["p99_ms"] <= LATENCY_TARGET_MS and not v["failures"]
            for v in latency.values()
        ),
        "fleet_manager": {
            "ingest_window_messages": window1,
            "ingest_window_cpu_s": round(fleet_ingest_cpu, 2),
            "cpu_ms_per_message": _ms3(fleet_ingest_cpu, window1),
            "cpu_share_of_one_core_ingest": round(fleet_ingest_cpu / (middle - start), 3),
            "probe_window_messages": window2,
            "probe_window_cpu_s": round(fleet_probe_cpu, 2),
            "cpu_share_of_one_core_with_probes": round(fleet_probe_cpu / (end - middle), 3),
            "rss_mib": round(memory.get("VmRSS", 0) / 1024, 1),
            "peak_rss_mib": round(memory.get("VmHWM", 0) / 1024, 1),
        },
        "broker": {
            "cpu_ms_per_message": _ms3(broker_cpu1 - broker_cpu0, window1),
            "cpu_share_of_one_core": round((broker_cpu2 - broker_cpu0) / (end - start), 3),
            "rss_mib": round(broker_memory.get("VmRSS", 0) / 1024, 1),
        },
        "simulator": {
            "processes": args.procs,
            "cpu_run_s": round(sum(part["cpu_run_s"] for part in stats), 2),
            "publish_lateness_p99_ms": _ms(percentile(lateness, 99)),
        },
        "work": str(run_dir),
    }


def _ms3(cpu_s: float, messages: int) -> float | None:
    return round(cpu_s * 1000.0 / messages, 3) if messages else None


def _expect(conn: Connection, what: str) -> tuple[Any, ...]:
    try:
        if not conn.poll(START_WAIT_S * 10):
            raise SystemExit(f"a simulator process did not answer ({what})")
        message: tuple[Any, ...] = conn.recv()
    except EOFError:
        raise SystemExit(f"a simulator process ended before {what!r}; its error is above") from None
    if message[0] != what:
        raise SystemExit(f"a simulator process said {message[0]!r}, expected {what!r}")
    return message


def _settle(base: str, boxes: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    """What the fleet manager lists per box, once it has caught up (or SETTLE_S passed)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        seen = {
            key: {
                "received": int(d["requests_total"]),
                "last_seq": int(d["health"]["seq"]) if d.get("health") else 0,
            }
            for key, d in listed(base).items()
        }
        caught_up = all(
            seen.get(k, {}).get("received") == b["acked"]
            and seen.get(k, {}).get("last_seq") == b["last_seq"]
            for k, b in boxes.items()
        )
        if caught_up or time.monotonic() > deadline:
            return seen
        time.sleep(1.0)


def summary(result: dict[str, Any]) -> str:
    fm, br, lat = result["fleet_manager"], result["broker"], result["latency"]
    lines = [
        f"{result['devices']} boxes every {result['interval_s']:g} s "
        f"({result['messages_per_s']:g} msg/s) for {result['duration_s']:g} s on "
        f"{result['cpu_count']} CPUs; connected {result['connected']} in "
        f"{result['connect_s']:g} s",
        f"reports: sent {result['sent']}, acknowledged {result['acked']}, listed by the fleet "
        f"manager {result['received']} ({result['devices_listed']} devices listed; "
        f"{result['devices_with_loss']} with a missing report)",
        f"per device: sent {result['sent_per_device']['min']}-{result['sent_per_device']['max']}, "
        f"received {result['received_per_device']['min']}-{result['received_per_device']['max']}",
    ]
    for path, v in lat.items():
        lines.append(
            f"GET {path}: p50 {v['p50_ms']} ms, p99 {v['p99_ms']} ms, max {v['max_ms']} ms "
            f"({v['requests']} requests, {v['failures']} failed, {v['body_bytes']} bytes; "
            f"first request {v['first_request_ms']} ms)"
        )
    lines += [
        f"fleet manager: {fm['cpu_ms_per_message']} ms CPU per message "
        f"({fm['cpu_share_of_one_core_ingest']:.1%} of a core ingesting, "
        f"{fm['cpu_share_of_one_core_with_probes']:.1%} with the page fetches), RSS "
        f"{fm['rss_mib']} MiB (peak {fm['peak_rss_mib']} MiB)",
        f"broker: {br['cpu_ms_per_message']} ms CPU per message, "
        f"{br['cpu_share_of_one_core']:.1%} of a core, RSS {br['rss_mib']} MiB",
        f"simulator: {result['simulator']['cpu_run_s']} CPU s in "
        f"{result['simulator']['processes']} process(es), publish lateness p99 "
        f"{result['simulator']['publish_lateness_p99_ms']} ms",
        f"p99 target {result['latency_target_ms']:g} ms: "
        f"{'met' if result['latency_target_met'] else 'NOT met'}; "
        f"loss: {'none' if not result['devices_with_loss'] else 'YES'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between reports")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of publishing")
    parser.add_argument("--procs", type=int, default=0, help="simulator processes (0: auto)")
    parser.add_argument(
        "--probe-every", type=float, default=0.5, help="seconds between page fetches"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "edgeid-fleet-bench",
        help="certificate cache and run folders",
    )
    parser.add_argument(
        "--fleet-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra argument for `edgeid fleet serve` (repeat)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    options = parser.parse_args(argv)
    if options.devices < 1 or options.interval <= 0 or options.duration < 2 * options.interval:
        parser.error("need --devices >= 1, --interval > 0 and --duration >= 2 intervals")
    procs = options.procs or (1 if options.devices <= 500 else 2)
    result = run(
        BenchArgs(
            devices=options.devices,
            interval_s=options.interval,
            duration_s=options.duration,
            procs=min(procs, options.devices),
            probe_every_s=options.probe_every,
            work=options.work,
            fleet_args=options.fleet_arg,
        )
    )
    print(json.dumps(result, indent=2) if options.json else summary(result))
    ok = result["devices_listed"] >= options.devices and not result["devices_with_loss"]
    return 0 if ok and result["connected"] == options.devices else 1


if __name__ == "__main__":
    sys.exit(main())
