"""The fleet manager's MQTT client: subscribes to every device's topics over TLS with its own
client certificate and feeds ``FleetState``; optionally announces Home Assistant discovery."""

from __future__ import annotations

import logging
import ssl
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edgeid.fleet.devices import SUBSCRIPTION, FleetState
from edgeid.fleet.homeassistant import discovery_messages
from edgeid.runtime.errors import BadInputError

logger = logging.getLogger(__name__)

CLIENT_ID = "edgeid-fleet"
KEEPALIVE_S = 30
# paho's own reconnect: doubling from 1 s to 60 s. The fleet is one client, so no jitter needed.
RECONNECT_MIN_S, RECONNECT_MAX_S = 1, 60


def client_tls(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    for flag, path in (("--ca", ca), ("--cert", cert), ("--key", key)):
        if not path.is_file():
            raise BadInputError(f"{flag} {path}: no such file; give the PEM file's path")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise BadInputError(
            f"--ca/--cert/--key cannot be loaded ({exc}); give PEM files of the fleet CA and "
            "the fleet manager's certificate and key"
        ) from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class FleetSubscriber:
    def __init__(
        self,
        state: FleetState,
        host: str,
        port: int,
        context: ssl.SSLContext,
        *,
        client_id: str = CLIENT_ID,
        homeassistant_prefix: str | None = None,
        homeassistant_support_url: str | None = None,
    ) -> None:
        self._state = state
        self._host, self._port = host, port
        self._ha_prefix = homeassistant_prefix
        self._ha_support_url = homeassistant_support_url
        self._connected = threading.Event()
        self._announced: set[tuple[str, str]] = set()
        self._announce_lock = threading.Lock()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        client.tls_set_context(context)
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        self._client.connect_async(self._host, self._port, KEEPALIVE_S)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def announce(self, site: str, device: str) -> None:
        """Home Assistant discovery for one device (retained), when enabled."""
        if self._ha_prefix is None:
            return
        with self._announce_lock:
            self._announced.add((site, device))
        messages = discovery_messages(
            site, device, self._ha_prefix, support_url=self._ha_support_url
        )
        for topic, payload in messages:
            self._client.publish(topic, payload, qos=1, retain=True)

    def _on_connect(
        self, client: mqtt.Client, _u: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if reason.is_failure:
            logger.warning("the broker refused the fleet manager (%s)", reason)
            return
        client.subscribe(SUBSCRIPTION, qos=1)
        self._connected.set()
        logger.info("fleet manager subscribed to %s", SUBSCRIPTION)
        with self._announce_lock:
            known = sorted(self._announced)
        for site, device in known:  # the broker may have restarted without its retained configs
            self.announce(site, device)

    def _on_disconnect(self, *_: Any) -> None:
        self._connected.clear()
        logger.warning("fleet manager lost the broker; paho reconnects")

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self._state.ingest(message.topic, bytes(message.payload))
        except Exception:  # one bad message must never stop the loop
            logger.exception("handling a message failed")
