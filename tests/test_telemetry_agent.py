"""The telemetry agent with the local sink, and `edgeid telemetry once|run`.

The agent runs for real (its thread, files, locks); only its monotonic clock is sped up so that
a report is due at every round instead of every second.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgeid.cli import main
from edgeid.runtime.config.settings import (
    ConfigError,
    DeviceSettings,
    Settings,
    TelemetrySettings,
    save_settings,
)
from edgeid.runtime.system.metrics import BackendState, ServiceMetrics
from edgeid.runtime.telemetry.agent import TelemetryAgent, TelemetryAgentBusyError
from edgeid.runtime.telemetry.report import HealthCollector
from edgeid.runtime.telemetry.schema import (
    EventReport,
    HealthReport,
    SpoolState,
    TelemetryPayloadError,
    check_payload,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 30.0


class FastClock:
    """A monotonic clock that moves 10 s per read: every agent round finds a report due."""

    def __init__(self) -> None:
        self._ticks = itertools.count(step=10.0)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return float(next(self._ticks))


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines() if path.exists() else []


def settings(**telemetry: object) -> Settings:
    return Settings(
        device=DeviceSettings(site="north", device_id="box-7"),
        telemetry=TelemetrySettings(**telemetry),  # type: ignore[arg-type]
    )


@pytest.fixture
def running() -> Iterator[list[TelemetryAgent]]:
    """Agents a test starts; stopped at the end even when the test fails."""
    agents: list[TelemetryAgent] = []
    yield agents
    for agent in agents:
        agent.stop()


def test_local_sink_writes_valid_reports_and_events_in_seq_order(
    tmp_path: Path, running: list[TelemetryAgent]
) -> None:
    metrics = ServiceMetrics()
    metrics.record_request(0.040)
    metrics.record_request(0.060)
    metrics.record_error()
    agent = TelemetryAgent(tmp_path, settings(), "1.2.3", metrics=metrics, monotonic=FastClock())
    running.append(agent)
    agent.start()
    agent.event("update_applied")
    folder = tmp_path / "telemetry"
    wait_until(lambda: len(lines(folder / "health.jsonl")) >= 3, "three health reports")
    agent.stop()
    health = [check_payload("health", line) for line in lines(folder / "health.jsonl")]
    events = [check_payload("events", line) for line in lines(folder / "events.jsonl")]
    assert all(isinstance(h, HealthReport) for h in health)
    assert all(isinstance(e, EventReport) for e in events)
    kinds = [e.kind.value for e in events if isinstance(e, EventReport)]
    assert kinds[0] == "started" and kinds[-1] == "stopped" and "update_applied" in kinds
    seqs = sorted(m.seq for m in [*health, *events])
    assert seqs == list(range(len(seqs))), "one seq per message, no gaps"
    first = health[0]
    assert isinstance(first, HealthReport)
    assert (first.inference.requests, first.inference.errors) == (3, 1)
    assert first.inference.latency_p50_ms == 40.0
    assert first.software.edgeid == "1.2.3"
    later = health[1]
    assert isinstance(later, HealthReport)
    assert later.inference.requests == 0, "each report counts since the previous one"
    state = json.loads((folder / "state.json").read_text())
    assert state["next_seq"] == len(seqs)


def test_backend_changes_become_degraded_and_recovered_events(
    tmp_path: Path, running: list[TelemetryAgent]
) -> None:
    states: list[BackendState] = ["tensorrt", "degraded", "degraded", "cpu"]
    calls = itertools.count()

    def backend() -> BackendState:
        return states[min(next(calls), len(states) - 1)]

    agent = TelemetryAgent(
        tmp_path, settings(), "1.2.3", backend_state=backend, monotonic=FastClock()
    )
    running.append(agent)
    agent.start()
    events = tmp_path / "telemetry" / "events.jsonl"

    def kinds() -> list[str]:
        return [json.loads(line)["kind"] for line in lines(events)]

    wait_until(lambda: "recovered" in kinds(), "a recovered event")
    agent.stop()
    assert kinds().count("degraded") == 1
    assert kinds().index("degraded") < kinds().index("recovered")


def test_a_failing_source_leaves_a_gap_and_the_agent_carries_on(
    tmp_path: Path, running: list[TelemetryAgent], caplog: pytest.LogCaptureFixture
) -> None:
    def broken_backend() -> BackendState:
        raise RuntimeError("pipeline gone")

    agent = TelemetryAgent(
        tmp_path,
        settings(),
        "1.2.3",
        backend_state=broken_backend,
        model_ids=lambda: ["dlib_resnet_v1@0475723f0c37", "Jane Doe"],
        monotonic=FastClock(),
    )
    running.append(agent)
    agent.start()
    health = tmp_path / "telemetry" / "health.jsonl"
    wait_until(lambda: len(lines(health)) >= 2, "two health reports")
    agent.stop()
    report = check_payload("health", lines(health)[0])
    assert isinstance(report, HealthReport)
    assert report.inference.backend is None
    assert report.software.models == ["dlib_resnet_v1@0475723f0c37"]
    assert "reading the backend state failed" in caplog.text
    assert "do not match the telemetry pattern" in caplog.text
    assert "Jane Doe" not in caplog.text


def test_a_backend_outside_the_enum_is_reported_unknown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    collector = HealthCollector(
        tmp_path,
        "1.2.3",
        metrics=ServiceMetrics(),
        backend_state=lambda: "cuda",  # type: ignore[arg-type, return-value]
        model_ids=list,
    )
    report = collector.collect(0, SpoolState(pending=0, dropped_total=0), reset_metrics=False)
    assert report.inference.backend is None
    assert "backend state is not one of" in caplog.text


def test_enrolled_counts_only_when_switched_on(
    tmp_path: Path, running: list[TelemetryAgent]
) -> None:
    for home, enabled in ((tmp_path / "off", False), (tmp_path / "on", True)):
        agent = TelemetryAgent(
            home,
            settings(report_enrolled_counts=enabled),
            "1.2.3",
            enrolled_faces=lambda: 1520,
            monotonic=FastClock(),
        )
        running.append(agent)
        agent.start()
        health = home / "telemetry" / "health.jsonl"
        wait_until(lambda h=health: len(lines(h)) >= 1, "a health report")
        agent.stop()
        report = json.loads(lines(health)[0])
        assert report["enrolled_faces"] == (1520 if enabled else None)


def test_one_agent_per_state_directory(tmp_path: Path, running: list[TelemetryAgent]) -> None:
    first = TelemetryAgent(tmp_path, settings(), "1.2.3")
    running.append(first)
    first.start()
    with pytest.raises(TelemetryAgentBusyError, match="another telemetry agent"):
        TelemetryAgent(tmp_path, settings(), "1.2.3").start()
    first.stop()
    second = TelemetryAgent(tmp_path, settings(), "1.2.3")
    running.append(second)
    second.start()  # the lock went with the first agent


def test_sink_off_writes_nothing(tmp_path: Path) -> None:
    agent = TelemetryAgent(tmp_path, settings(sink="off"), "1.2.3")
    agent.start()
    agent.event("started")
    agent.stop()
    assert not (tmp_path / "telemetry").exists()


def test_unknown_event_kind_is_refused(tmp_path: Path) -> None:
    agent = TelemetryAgent(tmp_path, settings(), "1.2.3")
    with pytest.raises(TelemetryPayloadError, match="unknown telemetry event"):
        agent.event("searched Jane Doe")


def test_mqtt_sink_without_certificates_fails_at_start_up_naming_the_key(
    tmp_path: Path,
) -> None:
    missing = str(tmp_path / "absent.pem")
    with pytest.raises(ConfigError, match=r"telemetry\.ca_file"):
        TelemetryAgent(
            tmp_path,
            settings(sink="mqtt", ca_file=missing, cert_file=missing, key_file=missing),
            "1.2.3",
        )


def test_mqtt_sink_needs_tls_files_in_the_settings() -> None:
    with pytest.raises(ValueError, match="sink mqtt needs ca_file, cert_file, key_file"):
        TelemetrySettings(sink="mqtt")
    with pytest.raises(ValueError, match="reconnect_max_s"):
        TelemetrySettings(reconnect_min_s=10.0, reconnect_max_s=1.0)


# -- the command line ----------------------------------------------------------------------------


def test_once_prints_exactly_the_next_report_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_settings(tmp_path, settings())
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["telemetry", "once", "--home", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["topic"] == "edgeid/north/box-7/health"
    assert out["sink"] == "local"
    compact = json.dumps(out["payload"], separators=(",", ":")).encode()
    report = check_payload("health", compact)
    assert isinstance(report, HealthReport)
    assert report.seq == 0 and report.spool.pending == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "once must not write state"

    assert main(["telemetry", "once", "--home", str(tmp_path)]) == 0
    topic, payload = capsys.readouterr().out.rstrip("\n").split("\n")
    assert topic == "edgeid/north/box-7/health"
    assert isinstance(check_payload("health", payload.encode()), HealthReport)


def test_once_with_a_bad_config_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "edgeid.toml").write_text('[telemetry]\nsink = "mqtt"\n')
    assert main(["telemetry", "once", "--home", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sink mqtt needs ca_file" in err


def test_run_in_the_foreground_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    save_settings(tmp_path, settings(interval_s=1.0))
    agent = subprocess.Popen(
        [sys.executable, "-m", "edgeid", "telemetry", "run", "--home", str(tmp_path)],
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        health = tmp_path / "telemetry" / "health.jsonl"
        wait_until(lambda: len(lines(health)) >= 1, "the first report")
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=WAIT_S)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == 0, err.decode()
    assert b"sink local" in err
    kinds = [json.loads(line)["kind"] for line in lines(tmp_path / "telemetry" / "events.jsonl")]
    assert kinds == ["started", "stopped"]


def test_run_with_telemetry_off_exits_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_settings(tmp_path, settings(sink="off"))
    assert main(["telemetry", "run", "--home", str(tmp_path)]) == 0
    assert "nothing to run" in capsys.readouterr().err
    assert not (tmp_path / "telemetry").exists()
