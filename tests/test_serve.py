"""`edgeid serve` (what `make run` starts): models verified, health answered, clean stop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from edgeid.runtime.inference.pipeline import FacePipeline

START_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=5) as response:
        data: dict[str, object] = json.load(response)
        return data


def test_serve_answers_health_reports_telemetry_pings_systemd_and_stops_on_sigterm(
    models_dir: Path, tmp_path: Path
) -> None:
    """The whole service as systemd runs it: READY and watchdog pings on a real notify socket,
    /healthz, a local health report, and a clean stop that flushes and checkpoints."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(models_dir)
    (home / "edgeid.toml").write_text("[telemetry]\ninterval_s = 1.0\n")
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(1.0)
    port = _free_port()
    env = os.environ | {
        "EDGEID_HOME": str(home),
        "NOTIFY_SOCKET": str(notify_path),
        "WATCHDOG_USEC": "2000000",  # pings every second
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeid", "serve", "--port", str(port)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    messages: list[str] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        health = None
        while health is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                health = _get(f"http://127.0.0.1:{port}/healthz")
            except OSError:
                time.sleep(0.2)  # not listening yet: models still loading
        assert health is not None, "serve did not answer /healthz"
        assert health["state"] == "ready"
        assert health["backend"] == "cpu"  # no GPU here: `auto` picks ONNX Runtime
        assert "dlib_resnet_v1" in health["models"]  # type: ignore[operator]
        while time.monotonic() < deadline and (
            sum("WATCHDOG=1" in m for m in messages) < 2
            or not (home / "telemetry" / "health.jsonl").exists()
        ):
            with contextlib.suppress(TimeoutError):
                messages.append(notify.recv(4096).decode())
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        notify.close()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert any("READY=1" in m for m in messages)
    assert sum("WATCHDOG=1" in m for m in messages) >= 2
    report = json.loads((home / "telemetry" / "health.jsonl").read_text().splitlines()[0])
    assert report["inference"]["backend"] == "cpu"


def test_serve_refuses_to_start_without_models(tmp_path: Path) -> None:
    env = os.environ | {"EDGEID_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "edgeid", "serve", "--port", str(_free_port())],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "edgeid models build" in proc.stderr and "Traceback" not in proc.stderr


def test_tensorrt_requested_without_gpu_runs_degraded_on_cpu(models_dir: Path) -> None:
    """Asking for TensorRT where it cannot run never crashes: CPU, reported as degraded."""
    pipeline = FacePipeline.load(models_dir, "mmod", backend="tensorrt", with_embedder=True)
    assert pipeline.backend_state == "degraded"
    assert FacePipeline.load(models_dir, "mmod", backend="auto").backend_state == "cpu"
