"""One device's connection to the fleet broker: MQTT 5 over TLS with the device's client
certificate, a retained ``online`` birth and ``offline`` last will, QoS 1 publishes confirmed
by PUBACK, and reconnection with exponential backoff and jitter.

Driven by one thread (the agent's) through ``step``; paho's callbacks run inside that call, so
no state here is shared between threads. Each connection uses a fresh paho client, so nothing
unacknowledged hides in a client's memory: the spool is the only queue.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from edgeid.runtime.config.settings import ConfigError, TelemetrySettings
from edgeid.runtime.telemetry.backoff import Backoff
from edgeid.runtime.telemetry.schema import check_status
from edgeid.runtime.telemetry.topics import Topics

logger = logging.getLogger(__name__)

# How long a graceful stop waits for the broker to acknowledge the retained "offline".
OFFLINE_ACK_WAIT_S = 3.0
# TCP connect and TLS handshake limit, so an unreachable broker never blocks a stop for long.
CONNECT_TIMEOUT_S = 5.0
WILL_DISCONNECT = "Disconnect with will message"  # MQTT 5 reason code 0x04

Delivered = Callable[[int, bool], None]  # (message id, accepted by the broker)
Lost = Callable[[], None]  # the connection is gone: message ids start again on the next one


def tls_context(settings: TelemetrySettings) -> ssl.SSLContext:
    """The TLS context for the broker, loaded once; a bad file fails with its settings key."""
    files = {"ca_file": settings.ca_file, "cert_file": settings.cert_file}
    files["key_file"] = settings.key_file
    for key, value in files.items():
        if not value or not Path(value).is_file():
            raise ConfigError(
                f"telemetry.{key}: {value or '(unset)'} is not a readable file; provision the "
                "device certificate or set telemetry.sink"
            )
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.ca_file)
        context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"telemetry.ca_file/cert_file/key_file cannot be loaded ({exc}); provision the device "
            "certificate again"
        ) from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class MqttLink:
    def __init__(
        self,
        settings: TelemetrySettings,
        topics: Topics,
        context: ssl.SSLContext,
        *,
        on_delivered: Delivered,
        on_lost: Lost,
        backoff: Backoff,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._topics = topics
        self._context = context
        self._on_delivered = on_delivered
        self._on_lost = on_lost
        self._backoff = backoff
        self._monotonic = monotonic
        self._client: mqtt.Client | None = None
        self._connected = False
        self._retry_at = 0.0
        self._acked: set[int] = set()  # ids of our own status publishes that were acknowledged

    @property
    def connected(self) -> bool:
        return self._connected

    def step(self, timeout: float) -> bool:
        """Connect when due, then run the network loop for up to ``timeout`` seconds.

        Returns False when there is no connection to wait on (the caller waits instead).
        """
        if self._client is None and self._monotonic() >= self._retry_at:
            self._connect()
        client = self._client
        if client is None:
            return False
        rc = client.loop(timeout)
        if rc != mqtt.MQTT_ERR_SUCCESS and self._client is client:
            self._drop(f"connection lost ({mqtt.error_string(rc)})")
        return True

    def publish(self, topic: str, payload: bytes) -> int | None:
        """Publish with QoS 1; the message id, or None when not connected (retry later)."""
        if not self._connected or self._client is None:
            return None
        info = self._client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self._drop(f"publish failed ({mqtt.error_string(info.rc)})")
            return None
        return info.mid

    def close(self) -> None:
        """Graceful stop: a retained ``offline`` the broker acknowledged, then DISCONNECT."""
        client = self._client
        if client is None:
            return
        if self._connected:
            info = client.publish(self._topics.status, _status("offline"), qos=1, retain=True)
            deadline = self._monotonic() + OFFLINE_ACK_WAIT_S
            while info.mid not in self._acked and self._monotonic() < deadline:
                if client.loop(0.1) != mqtt.MQTT_ERR_SUCCESS:
                    break
            if info.mid in self._acked:
                client.disconnect()
            else:  # MQTT 5: ask the broker to publish our last will ("offline") instead
                logger.warning("the broker did not acknowledge offline; leaving it our last will")
                client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, WILL_DISCONNECT))
            client.loop(0.1)
        self._forget_client()

    # -- connection ----------------------------------------------------------------------------

    def _connect(self) -> None:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._topics.client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        client.connect_timeout = CONNECT_TIMEOUT_S
        client.tls_set_context(self._context)
        client.will_set(self._topics.status, _status("offline"), qos=1, retain=True)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_publish = self._handle_publish
        settings = self._settings
        try:
            client.connect(settings.broker_host, settings.broker_port, settings.keepalive_s)
        except (OSError, ssl.SSLError) as exc:  # refused, unreachable, TLS handshake refused
            self._schedule_retry(f"cannot reach the broker ({_reason(exc)})")
            return
        self._client = client

    def _handle_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if reason.is_failure:
            self._drop(f"the broker refused the connection ({reason})")
            return
        self._connected = True
        self._backoff.reset()
        client.publish(self._topics.status, _status("online"), qos=1, retain=True)
        logger.info("telemetry connected to %s", self._settings.broker_host)

    def _handle_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if self._client is not None and self._connected:
            self._drop(f"disconnected ({reason})")

    def _handle_publish(
        self, _client: mqtt.Client, _userdata: Any, mid: int, reason: ReasonCode, _props: Any
    ) -> None:
        self._acked.add(mid)
        if reason.is_failure:
            # Refused (e.g. by the ACL): it would be refused again now, so back off; the
            # message stays spooled and the cap bounds what waits.
            logger.warning("the broker refused a telemetry message (%s)", reason)
        self._on_delivered(mid, not reason.is_failure)
        if reason.is_failure:
            self._drop("a message was refused")

    def _drop(self, why: str) -> None:
        client = self._client
        self._forget_client()
        if client is not None:
            try:
                client.disconnect()
            except Exception:  # already closed; nothing to tell the broker
                logger.debug("disconnect after failure failed", exc_info=True)
        self._schedule_retry(why)

    def _forget_client(self) -> None:
        had_client = self._client is not None
        self._client = None
        self._connected = False
        self._acked.clear()
        if had_client:
            self._on_lost()

    def _schedule_retry(self, why: str) -> None:
        delay = self._backoff.next_delay()
        self._retry_at = self._monotonic() + delay
        logger.warning("telemetry: %s; retrying in %.1f s", why, delay)


def _status(value: str) -> bytes:
    payload = value.encode("ascii")
    check_status(payload)
    return payload


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or type(exc).__name__}"
    return getattr(exc, "strerror", None) or type(exc).__name__
