"""Telemetry against a real Mosquitto broker with TLS, client certificates and per-device ACLs.

The agent runs as `edgeid telemetry run` in its own process, so it can be killed (-9), frozen
(SIGSTOP) and restarted like the service on a box. Waits are generous and bounded; the only
duration asserted is the issue's: `offline` within 1.5x the keepalive after the agent dies.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from mqtt_broker import (
    KEEPALIVE_S,
    SITE,
    WAIT_S,
    Agent,
    Broker,
    Identity,
    Pki,
    Received,
    Recorder,
    client_for,
    device_home,
    issue,
)

from edgeid.runtime.telemetry.schema import EventReport, HealthReport, check_payload


@pytest.fixture
def agents() -> Iterator[Callable[[Path], Agent]]:
    started: list[Agent] = []

    def start(home: Path) -> Agent:
        agent = Agent(home)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.close()


@pytest.fixture
def recorder(broker: Broker, pki: Pki) -> Iterator[Recorder]:
    observer = Recorder(broker, pki.observer, topics=("edgeid/#",))
    yield observer
    observer.close()


def topic(device: str, kind: str) -> str:
    return f"edgeid/{SITE}/{device}/{kind}"


def statuses(messages: list[Received], device: str = "box-1") -> list[bytes]:
    return [m.payload for m in messages if m.topic == topic(device, "status")]


def seqs(messages: list[Received], device: str = "box-1") -> list[int]:
    return [
        json.loads(m.payload)["seq"]
        for m in messages
        if m.topic in (topic(device, "health"), topic(device, "events"))
    ]


def spooled(home: Path) -> dict[int, bytes]:
    folder = home / "telemetry" / "spool"
    return {int(p.name[:16]): p.read_bytes() for p in sorted(folder.glob("*.json"))}


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- the broker's rules ------------------------------------------------------------------------


class Connection:
    """A raw paho client: did the broker accept us, and what did it say to each publish."""

    def __init__(self, broker: Broker, identity: Identity | None, ca: Path | None = None) -> None:
        self.accepted = threading.Event()
        self.ended = threading.Event()
        self.acks: dict[int, mqtt.ReasonCode] = {}
        self._cond = threading.Condition()
        self.client = client_for(broker, identity, client_id=f"probe-{id(self)}", ca=ca)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_: self.ended.set()
        self.client.on_publish = self._on_publish
        self.client.on_connect_fail = lambda *_: self.ended.set()
        try:
            self.client.connect("127.0.0.1", broker.port, keepalive=10)
        except OSError:  # the TLS handshake itself was refused
            self.ended.set()
            return
        self.client.loop_start()

    def _on_connect(self, _c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        if not getattr(reason, "is_failure", True):
            self.accepted.set()
        else:
            self.ended.set()

    def _on_publish(self, _c: object, _u: object, mid: int, reason: object, _p: object) -> None:
        with self._cond:
            self.acks[mid] = reason  # type: ignore[assignment]
            self._cond.notify_all()

    def outcome(self) -> bool:
        """True once accepted, False once refused or cut off (bounded wait for either)."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.accepted.is_set():
                return True
            if self.ended.is_set():
                return False
            time.sleep(0.02)
        raise AssertionError("neither accepted nor refused")

    def publish(self, topic: str, payload: bytes) -> mqtt.ReasonCode:
        info = self.client.publish(topic, payload, qos=1)
        with self._cond:
            assert self._cond.wait_for(lambda: info.mid in self.acks, WAIT_S)
            return self.acks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_device_cannot_publish_under_another_devices_topic(
    broker: Broker,
    pki: Pki,
    recorder: Recorder,
) -> None:
    box1 = Connection(broker, pki.device(SITE, "box-1"))
    try:
        assert box1.outcome()
        refused = box1.publish(topic("box-2", "health"), b"forged")
        assert refused.is_failure and refused.getName() == "Not authorized"
        across_site = box1.publish("edgeid/other-site/box-1/health", b"forged")
        assert across_site.is_failure
        own = box1.publish(topic("box-1", "events"), b"marker")
        assert not own.is_failure
    finally:
        box1.close()
    # The marker came after the forgeries on the same connection: had a forgery been
    # delivered, it would be here before the marker.
    got = recorder.wait_for(lambda ms: any(m.payload == b"marker" for m in ms), "the marker")
    assert [m.payload for m in got] == [b"marker"]


def test_a_certificate_whose_name_holds_a_wildcard_gains_nothing(
    broker: Broker, pki: Pki, recorder: Recorder
) -> None:
    """The ACL pattern substitutes the CN into edgeid/%u/#: a CN of "lab/+" must not become a
    wildcard over every device of the site (Mosquitto refuses such user names in patterns)."""
    for cn in ("lab/+", "lab/#", "+/+"):
        wildcard = Connection(broker, issue(pki.ca, pki.folder, cn))
        try:
            assert wildcard.outcome()
            assert wildcard.publish(topic("box-1", "health"), b"forged").is_failure, cn
        finally:
            wildcard.close()
    box1 = Connection(broker, pki.device(SITE, "box-1"))
    try:
        assert box1.outcome()
        assert not box1.publish(topic("box-1", "events"), b"marker").is_failure
    finally:
        box1.close()
    got = recorder.wait_for(lambda ms: any(m.payload == b"marker" for m in ms), "the marker")
    assert [m.payload for m in got] == [b"marker"]


def test_a_client_without_a_certificate_is_refused(
    broker: Broker,
) -> None:
    anonymous = Connection(broker, None)
    try:
        assert anonymous.outcome() is False
    finally:
        anonymous.close()
    wait_until(lambda: "peer did not return a certificate" in broker.log, "the broker's refusal")


def test_a_certificate_from_another_ca_is_refused(
    broker: Broker,
    pki: Pki,
) -> None:
    # Same CN as a real device, signed by a CA the broker does not trust.
    impostor = Connection(broker, pki.foreign_device(SITE, "box-1"))
    try:
        assert impostor.outcome() is False
    finally:
        impostor.close()
    wait_until(lambda: "certificate verify failed" in broker.log, "the broker's refusal")


# -- the agent -------------------------------------------------------------------------------


def test_agent_publishes_birth_health_and_events_then_offline_on_a_clean_stop(
    tmp_path: Path,
    broker: Broker,
    pki: Pki,
    recorder: Recorder,
    agents: Callable[[Path], Agent],
) -> None:
    home = device_home(tmp_path, pki, broker)
    agent = agents(home)
    recorder.wait_for(
        lambda ms: len([m for m in ms if m.topic == topic("box-1", "health")]) >= 2,
        "two health reports",
    )
    assert agent.terminate() == 0, agent.output
    got = recorder.wait_for(lambda ms: statuses(ms)[-1:] == [b"offline"], "offline")
    assert statuses(got) == [b"online", b"offline"]
    health = [check_payload("health", m.payload) for m in recorder.on(topic("box-1", "health"))]
    events = [check_payload("events", m.payload) for m in recorder.on(topic("box-1", "events"))]
    assert all(isinstance(h, HealthReport) for h in health)
    kinds = [e.kind.value for e in events if isinstance(e, EventReport)]
    assert kinds == ["started", "stopped"]
    assert sorted(seqs(got)) == list(range(len(seqs(got))))
    assert spooled(home) == {}, "every acknowledged message leaves the spool"
    # A newcomer gets the retained status: the box is known to be offline.
    late = Recorder(broker, pki.observer, topics=(topic("box-1", "status"),))
    try:
        retained = late.wait_for(lambda ms: len(ms) >= 1, "the retained status")
        assert (retained[0].payload, retained[0].retain) == (b"offline", True)
    finally:
        late.close()


def test_killing_the_agent_makes_offline_appear_within_one_and_a_half_keepalives(
    tmp_path: Path,
    broker: Broker,
    pki: Pki,
    recorder: Recorder,
    agents: Callable[[Path], Agent],
) -> None:
    agent = agents(device_home(tmp_path, pki, broker))
    recorder.wait_for(lambda ms: b"online" in statuses(ms), "online")
    recorder.wait_for(lambda ms: len(seqs(ms)) >= 2, "the first reports")
    killed = time.monotonic()
    agent.process.kill()
    recorder.wait_for(
        lambda ms: statuses(ms)[-1:] == [b"offline"], "offline", timeout=1.5 * KEEPALIVE_S
    )
    assert time.monotonic() - killed <= 1.5 * KEEPALIVE_S
    assert statuses(recorder.messages) == [b"online", b"offline"]


def test_a_frozen_agent_is_declared_offline_by_its_keepalive(
    tmp_path: Path,
    broker: Broker,
    pki: Pki,
    recorder: Recorder,
    agents: Callable[[Path], Agent],
) -> None:
    """SIGSTOP keeps the TCP connection open but silent, like a hung box or a cut cable: only
    the broker's keepalive check can notice. (Mosquitto 2.0 runs that check every few seconds,
    so the will can come a little after 1.5x the keepalive; only its arrival is asserted.)"""
    agent = agents(device_home(tmp_path, pki, broker))
    recorder.wait_for(lambda ms: len(seqs(ms)) >= 2, "the first reports")
    agent.process.send_signal(signal.SIGSTOP)
    recorder.wait_for(lambda ms: statuses(ms)[-1:] == [b"offline"], "offline by keepalive")
    assert "exceeded timeout" in broker.log


def test_reports_made_while_the_broker_is_down_arrive_when_it_returns(
    tmp_path: Path,
    broker: Broker,
    pki: Pki,
    recorder: Recorder,
    agents: Callable[[Path], Agent],
) -> None:
    """The agent keeps running through the outage and reconnects on its own (backoff)."""
    home = device_home(tmp_path, pki, broker)
    agent = agents(home)
    recorder.wait_for(lambda ms: len(seqs(ms)) >= 2, "the first reports")
    broker.stop()
    wait_until(lambda: len(spooled(home)) >= 3, "three reports spooled during the outage")
    # Hold the agent while the broker comes back and the observer re-subscribes: the restarted
    # broker has no session for the observer, and would deliver to nobody until it is back.
    agent.process.send_signal(signal.SIGSTOP)
    waiting = set(spooled(home))
    subscribed = recorder.subscriptions
    broker.start()
    recorder.wait_subscribed(subscribed + 1)
    agent.process.send_signal(signal.SIGCONT)
    recorder.wait_for(lambda ms: waiting <= set(seqs(ms)), "every spooled report")
    got = seqs(recorder.messages)
    assert set(range(max(got) + 1)) <= set(got), "no message lost across the outage"
    assert statuses(recorder.messages).count(b"online") >= 2, "a new birth after reconnecting"


def test_spooled_reports_are_delivered_after_restarting_broker_and_agent_up_to_the_cap(
    tmp_path: Path,
    broker: Broker,
    pki: Pki,
    recorder: Recorder,
    agents: Callable[[Path], Agent],
) -> None:
    cap = 4096  # the smallest cap the settings accept: about three reports
    home = device_home(tmp_path, pki, broker, spool_max_bytes=cap)
    first = agents(home)
    recorder.wait_for(lambda ms: len(seqs(ms)) >= 2, "reports before the outage")
    broker.stop()
    delivered_before = set(seqs(recorder.messages))

    def dropped() -> int:
        state = home / "telemetry" / "state.json"
        return int(json.loads(state.read_text())["dropped_total"]) if state.exists() else 0

    wait_until(lambda: dropped() >= 2, "the cap to drop old reports")
    assert first.terminate() == 0, first.output  # stops with the broker still away
    waiting = spooled(home)
    assert 0 < sum(len(p) for p in waiting.values()) <= cap
    made = json.loads((home / "telemetry" / "state.json").read_text())
    lost = set(range(made["next_seq"])) - delivered_before - set(waiting)
    assert len(lost) == made["dropped_total"] >= 2, "every dropped report is counted"

    subscribed = recorder.subscriptions
    broker.start()
    recorder.wait_subscribed(subscribed + 1)
    agents(home)

    def health_from_restart(ms: list[Received]) -> list[dict[str, Any]]:
        reports = [json.loads(m.payload) for m in ms if m.topic == topic("box-1", "health")]
        return [r for r in reports if r["seq"] >= made["next_seq"]]

    # Spooled messages go out in order on one connection, so a third report from the restarted
    # agent arrives after everything it found in the spool; by then it reconnected long ago.
    final = health_from_restart(
        recorder.wait_for(lambda ms: len(health_from_restart(ms)) >= 3, "the restarted agent")
    )[-1]
    by_seq = {
        json.loads(m.payload)["seq"]: m.payload
        for m in recorder.messages
        if m.topic in (topic("box-1", "health"), topic("box-1", "events"))
    }
    for seq in set(waiting) & set(by_seq):
        assert by_seq[seq] == waiting[seq], "delivered byte for byte as spooled"
    # The restarted agent's own first messages joined a full spool before it connected, so
    # they may have pushed out its oldest entries: only those, and each one counted.
    undelivered = sorted(set(waiting) - set(by_seq))
    assert undelivered == sorted(waiting)[: len(undelivered)]
    assert max(waiting) in by_seq, "the spool was delivered after the restart"
    assert final["spool"]["dropped_total"] == made["dropped_total"] + len(undelivered)
    assert not lost & set(by_seq), "dropped reports never reappear"
