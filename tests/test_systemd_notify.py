"""sd_notify and the watchdog against a real AF_UNIX datagram socket standing for systemd."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import types
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeid.runtime.system.lifecycle import ServiceLifecycle
from edgeid.runtime.system.notify import Notifier, notify_ready
from edgeid.runtime.system.watchdog import Watchdog

STUB = Path(__file__).resolve().parent / "notify_service_stub.py"
REPO_ROOT = STUB.parent.parent
# Safety net only: a message that does not come within this long fails the test rather than
# hanging it. Nothing is asserted about how long anything takes.
RECV_TIMEOUT_S = 30.0
WATCHDOG_USEC = 100_000  # pings every 50 ms: many ticks in a short test
WORKER_MAX_AGE_S = 2.0  # generous against a loaded machine: the idle worker beats every 0.2 s
MAX_MESSAGES = 400  # bounds each "read until" loop (about 40 pings come before a hang shows)


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: a bound datagram socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.sock.settimeout(RECV_TIMEOUT_S)

    def recv(self) -> list[str]:
        return self.sock.recv(4096).decode().split("\n")

    def until(self, wanted: str) -> list[list[str]]:
        """Messages up to and including the first with a line starting ``wanted``."""
        seen = []
        for _ in range(MAX_MESSAGES):
            message = self.recv()
            seen.append(message)
            if any(line.startswith(wanted) for line in message):
                return seen
        raise AssertionError(f"no {wanted!r} in {MAX_MESSAGES} messages")


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(str(tmp_path / "notify.sock"))
    yield fake
    fake.sock.close()


def test_ready_and_status_reach_the_socket(systemd: FakeSystemd) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": systemd.address})
    assert notifier.ready("ready: 4 models\non cpu")
    assert systemd.recv() == ["READY=1", "STATUS=ready: 4 models on cpu"]  # one line, always
    assert notifier.extend_timeout(90)
    assert systemd.recv() == ["EXTEND_TIMEOUT_USEC=90000000"]


def test_abstract_socket_address() -> None:
    address = f"@edgeid-test-{uuid.uuid4().hex}"
    fake = FakeSystemd(address)
    try:
        assert Notifier({"NOTIFY_SOCKET": address}).watchdog()
        assert fake.recv() == ["WATCHDOG=1"]
    finally:
        fake.sock.close()


def test_outside_systemd_every_call_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify_ready("ready") is False
    assert Watchdog(Notifier({})).enabled is False


def test_vanished_socket_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).ready() is False
    assert "could not notify systemd" in caplog.text


def test_systemd_python_is_preferred_when_installed(
    monkeypatch: pytest.MonkeyPatch, systemd: FakeSystemd
) -> None:
    """With the `systemd` extra, systemd.daemon.notify carries the message (stand-in module:
    systemd-python is not installed here)."""
    sent: list[str] = []
    daemon = types.ModuleType("systemd.daemon")
    daemon.notify = lambda message: sent.append(message) or True  # type: ignore[attr-defined]
    package = types.ModuleType("systemd")
    package.daemon = daemon  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "systemd", package)
    monkeypatch.setitem(sys.modules, "systemd.daemon", daemon)
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.address)
    assert notify_ready("up")
    assert sent == ["READY=1\nSTATUS=up"]


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000"}
    assert Watchdog(Notifier(env)).interval_s == 15.0
    other_process = env | {"WATCHDOG_PID": str(os.getpid() + 1)}
    assert Watchdog(Notifier(other_process)).enabled is False  # armed for someone else
    assert Watchdog(Notifier(env | {"WATCHDOG_USEC": "soon"})).enabled is False


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_pings_only_while_every_heartbeat_is_fresh(systemd: FakeSystemd) -> None:
    clock = Clock()
    life = ServiceLifecycle(Notifier({"NOTIFY_SOCKET": systemd.address}), clock=clock)
    worker = life.heartbeat("inference worker", max_age_s=30)
    life.heartbeat("mqtt", max_age_s=120)
    life.watchdog.healthy_status = "ready"
    assert life.watchdog.tick() and systemd.recv() == ["WATCHDOG=1"]
    clock.now += 31  # the worker is silent past its limit; mqtt is within its own
    assert not life.watchdog.tick()
    assert systemd.recv() == ["STATUS=watchdog withheld: inference worker silent for 31.0 s"]
    worker.beat()
    assert life.watchdog.tick()
    assert systemd.recv() == ["STATUS=ready"]  # the normal status is back
    assert systemd.recv() == ["WATCHDOG=1"]


def test_hung_inference_worker_stops_the_pings(systemd: FakeSystemd) -> None:
    """A service process with a real watchdog thread and worker: READY, pings while the
    worker is alive, none while it hangs, pings again once it returns, STOPPING at the end."""
    env = os.environ | {"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    env.pop("WATCHDOG_PID", None)
    service = subprocess.Popen(
        [sys.executable, str(STUB), str(WORKER_MAX_AGE_S)],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.PIPE,
        text=True,
    )
    assert service.stdin is not None

    def send(command: str) -> None:
        assert service.stdin is not None
        service.stdin.write(command + "\n")
        service.stdin.flush()

    try:
        assert systemd.recv() == ["STATUS=loading models"]
        assert systemd.recv() == ["READY=1", "STATUS=ready: stub service"]
        for _ in range(3):
            systemd.until("WATCHDOG=1")
        send("job")
        systemd.until("WATCHDOG=1")

        send("hang")
        systemd.until("STATUS=watchdog withheld: inference worker silent")
        # From here on, while the worker hangs, every tick withholds the ping.
        for _ in range(5):
            message = systemd.recv()
            assert "WATCHDOG=1" not in message
            assert message[0].startswith("STATUS=watchdog withheld: inference worker silent")

        send("release")
        resumed = systemd.until("WATCHDOG=1")
        assert ["STATUS=ready: stub service"] in resumed
        send("quit")
        assert systemd.until("STOPPING=1")[-1] == ["STOPPING=1", "STATUS=stopping"]
        assert service.wait(timeout=RECV_TIMEOUT_S) == 0
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
