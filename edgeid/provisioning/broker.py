"""Can this box reach its fleet broker? One MQTT 5 connection over TLS with the box's client
certificate, up to the broker's CONNACK, then a clean disconnect. Nothing is published."""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edgeid.runtime.config.settings import TelemetrySettings
from edgeid.runtime.telemetry.mqtt_link import tls_context

# A broker on the site network answers a TLS handshake and CONNECT in well under a second;
# this bounds a check against a host that drops packets instead of refusing.
CONNECT_TIMEOUT_S = 10.0
KEEPALIVE_S = 10
_POLL_S = 0.1


@dataclass(frozen=True)
class BrokerCheck:
    reachable: bool
    detail: str


def check_broker(telemetry: TelemetrySettings, client_id: str) -> BrokerCheck:
    """Connect as this device and wait for the CONNACK; say why when there is none."""
    where = f"{telemetry.broker_host}:{telemetry.broker_port}"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.connect_timeout = CONNECT_TIMEOUT_S
    outcome: list[str | None] = []  # None: accepted; a string: why not

    def on_connect(
        _client: mqtt.Client, _data: object, _flags: object, code: ReasonCode, _props: object
    ) -> None:
        outcome.append(None if not code.is_failure else f"broker refused the connection: {code}")

    def on_disconnect(
        _client: mqtt.Client, _data: object, _flags: object, code: ReasonCode, _props: object
    ) -> None:
        if not outcome:
            outcome.append(f"the broker closed the connection before accepting it ({code})")

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.tls_set_context(tls_context(telemetry))  # exactly as the telemetry agent does
        client.connect(telemetry.broker_host, telemetry.broker_port, keepalive=KEEPALIVE_S)
    except ssl.SSLError as exc:
        return BrokerCheck(False, f"{where}: TLS failed ({exc.reason or exc}); check the CA file")
    except OSError as exc:
        return BrokerCheck(False, f"{where} unreachable ({exc.strerror or exc})")
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    try:
        while not outcome and time.monotonic() < deadline:
            client.loop(timeout=_POLL_S)
    except (OSError, ssl.SSLError) as exc:
        outcome.append(f"the connection failed ({exc})")
    finally:
        _close(client)
    if not outcome:
        return BrokerCheck(False, f"{where}: no answer to CONNECT in {CONNECT_TIMEOUT_S:.0f} s")
    if outcome[0] is not None:
        return BrokerCheck(False, f"{where}: {outcome[0]}")
    return BrokerCheck(True, f"{where}: connected over TLS with the device certificate")


def _close(client: mqtt.Client) -> None:
    """A clean DISCONNECT where the session is up; paho closes the socket either way."""
    try:
        client.disconnect()
        client.loop(timeout=_POLL_S)
    except (OSError, ssl.SSLError):
        pass
    sock = client.socket()
    if sock is not None:
        sock.close()
