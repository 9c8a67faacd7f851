"""Virtual boxes for ``fleet_bench``: many MQTT 5 clients in one process, one selector loop.

Each virtual box behaves as a box's telemetry link does on the wire (``mqtt_link.py``): its own
TLS client certificate (CN ``<site>/<device>``), client id ``edgeid-<site>-<device>``, a
retained ``offline`` last will, a retained ``online`` birth, then a health report every
interval with QoS 1 and a sequence number. Reports come from one real ``HealthCollector``
report of this host (built by the parent), with the seq, times and CPU figure changed per box
and every payload re-checked by the schema's ``encode``.

paho is driven without its threads: ``loop_read``/``loop_write`` when the selector says a
socket is ready (paho's socket callbacks register write interest), ``loop_misc`` once a second
for keepalives. Publishes are spread evenly over the interval, as independent boxes would be.
"""

from __future__ import annotations

import contextlib
import heapq
import random
import selectors
import ssl
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edgeid.runtime.telemetry.schema import HealthReport, coarse, encode
from edgeid.runtime.telemetry.topics import Topics

KEEPALIVE_S = 30  # the box's default (telemetry.keepalive_s)
CONNECT_TIMEOUT_S = 10.0
DRAIN_S = 30.0  # after the last publish, how long to wait for the broker's PUBACKs
MISC_EVERY_S = 1.0


@dataclass(frozen=True)
class SimConfig:
    host: str
    port: int
    ca: str
    interval_s: float
    template: bytes  # one encoded HealthReport


@dataclass
class Box:
    site: str
    device: str
    pem: str
    phase_s: float  # when in each interval this box reports
    topics: Topics = field(init=False)
    client: mqtt.Client | None = None
    connected: bool = False
    seq: int = 0
    sent: int = 0
    acked: int = 0
    refused: int = 0
    disconnects: int = 0
    sent_by_window: list[int] = field(default_factory=lambda: [0, 0])
    health_mids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.topics = Topics(site=self.site, device=self.device)


class Fleet:
    """Many virtual boxes on one selector."""

    def __init__(self, config: SimConfig, boxes: list[Box]) -> None:
        self.config = config
        self.boxes = boxes
        self.selector = selectors.DefaultSelector()
        self.template = HealthReport.model_validate_json(config.template, strict=True)
        self.started = time.time()
        self.lateness_ms: list[float] = []
        self.connect_failures = 0
        self._rng = random.Random(7)

    # -- paho callbacks ------------------------------------------------------------------------

    def _socket_open(self, client: mqtt.Client, box: Box, sock: Any) -> None:
        self.selector.register(sock, selectors.EVENT_READ, client)

    def _socket_close(self, _client: mqtt.Client, _box: Box, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)

    def _register_write(self, client: mqtt.Client, _box: Box, sock: Any) -> None:
        self.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def _unregister_write(self, client: mqtt.Client, _box: Box, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.modify(sock, selectors.EVENT_READ, client)

    def _on_connect(
        self, client: mqtt.Client, box: Box, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if reason.is_failure:
            self.connect_failures += 1
            return
        box.connected = True
        client.publish(box.topics.status, b"online", qos=1, retain=True)

    def _on_disconnect(self, _c: mqtt.Client, box: Box, *_: Any) -> None:
        if box.connected:
            box.disconnects += 1
        box.connected = False

    def _on_publish(
        self, _c: mqtt.Client, box: Box, mid: int, reason: ReasonCode, _props: Any
    ) -> None:
        if mid in box.health_mids:
            box.health_mids.discard(mid)
            if reason.is_failure:
                box.refused += 1
            else:
                box.acked += 1

    # -- connecting ----------------------------------------------------------------------------

    def connect_all(self) -> None:
        for box in self.boxes:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.config.ca)
            context.load_cert_chain(box.pem)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=box.topics.client_id,
                protocol=mqtt.MQTTv5,
                userdata=box,
                reconnect_on_failure=False,
            )
            client.connect_timeout = CONNECT_TIMEOUT_S
            client.tls_set_context(context)
            client.will_set(box.topics.status, b"offline", qos=1, retain=True)
            client.on_connect = self._on_connect
            client.on_disconnect = self._on_disconnect
            client.on_publish = self._on_publish
            client.on_socket_open = self._socket_open
            client.on_socket_close = self._socket_close
            client.on_socket_register_write = self._register_write
            client.on_socket_unregister_write = self._unregister_write
            box.client = client
            try:
                client.connect(self.config.host, self.config.port, KEEPALIVE_S)
            except (OSError, ssl.SSLError):
                self.connect_failures += 1
                continue
            self.poll(0.0)  # read what has arrived so far (CONNACKs) between handshakes
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while time.monotonic() < deadline and not all(b.connected for b in self.boxes):
            self.poll(0.1)

    # -- the loop ------------------------------------------------------------------------------

    def poll(self, timeout: float) -> None:
        for key, mask in self.selector.select(timeout):
            client: mqtt.Client = key.data
            if mask & selectors.EVENT_READ:
                client.loop_read()
                sock = client.socket()
                # TLS may hold decrypted bytes the selector cannot see.
                while sock is not None and getattr(sock, "pending", lambda: 0)() > 0:
                    client.loop_read()
                    sock = client.socket()
            if mask & selectors.EVENT_WRITE and client.socket() is not None:
                client.loop_write()

    def misc(self) -> None:
        for box in self.boxes:
            if box.client is not None:
                box.client.loop_misc()

    def report(self, box: Box) -> bytes:
        now = time.time()
        cpu = self.template.cpu.model_copy(update={"percent": coarse(self._rng.uniform(2, 60))})
        report = self.template.model_copy(
            update={
                "seq": box.seq,
                "measured_at": coarse(now),
                "uptime_s": coarse(now - self.started),
                "cpu": cpu,
            }
        )
        return encode(report)  # validated against the schema, as a box does before publishing

    def publish(self, box: Box, window: int) -> None:
        if box.client is None or not box.connected:
            return
        box.seq += 1
        info = box.client.publish(box.topics.of_kind("health"), self.report(box), qos=1)
        box.sent += 1
        box.sent_by_window[window] += 1
        box.health_mids.add(info.mid)

    def run(self, start: float, middle: float, end: float) -> None:
        """Publish from ``start`` to ``end`` (monotonic); window 0 before ``middle``, 1 after."""
        interval = self.config.interval_s
        due = [(start + box.phase_s, i) for i, box in enumerate(self.boxes)]
        heapq.heapify(due)
        next_misc = time.monotonic() + MISC_EVERY_S
        while due:
            now = time.monotonic()
            while due and due[0][0] <= now:
                at, index = heapq.heappop(due)
                if at >= end:
                    continue
                self.lateness_ms.append((now - at) * 1000.0)
                self.publish(self.boxes[index], 0 if at < middle else 1)
                heapq.heappush(due, (at + interval, index))
            if now >= next_misc:
                self.misc()
                next_misc = now + MISC_EVERY_S
            wait = min(next_misc, due[0][0] if due else next_misc) - time.monotonic()
            self.poll(max(0.0, wait))
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline and any(b.health_mids for b in self.boxes):
            self.poll(0.1)

    def close(self) -> None:
        """As a box stops: a retained ``offline``, then DISCONNECT."""
        for box in self.boxes:
            if box.client is not None and box.connected:
                box.client.publish(box.topics.status, b"offline", qos=1, retain=True)
        self.poll(0.5)
        for box in self.boxes:
            if box.client is not None and box.client.socket() is not None:
                box.client.disconnect()
        self.poll(0.2)


def worker(conn: Connection, config: SimConfig, boxes: list[tuple[str, str, str, float]]) -> None:
    """A simulator process: connect, tell the parent, publish on its word, report, close.

    Messages with the parent: -> ("connected", n, failures), <- ("run", start, middle, end),
    -> ("done", stats), <- ("close",), -> ("closed",).
    """
    fleet = Fleet(config, [Box(site, dev, pem, phase) for site, dev, pem, phase in boxes])
    cpu0 = time.process_time()
    fleet.connect_all()
    connected = sum(b.connected for b in fleet.boxes)
    conn.send(("connected", connected, fleet.connect_failures))
    message = conn.recv()
    assert message[0] == "run"
    cpu1 = time.process_time()
    fleet.run(*message[1:])
    stats = {
        "boxes": {
            f"{b.site}/{b.device}": {
                "sent": b.sent,
                "acked": b.acked,
                "refused": b.refused,
                "last_seq": b.seq,
                "disconnects": b.disconnects,
                "sent_by_window": b.sent_by_window,
            }
            for b in fleet.boxes
        },
        "lateness_ms": fleet.lateness_ms,
        "cpu_connect_s": cpu1 - cpu0,
        "cpu_run_s": time.process_time() - cpu1,
    }
    conn.send(("done", stats))
    conn.recv()
    fleet.close()
    conn.send(("closed",))
