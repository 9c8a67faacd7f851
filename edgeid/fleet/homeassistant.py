"""Home Assistant MQTT discovery: retained sensor configs that point Home Assistant at each
device's own ``health`` and ``status`` topics, so admins can use dashboards they already have.

The fleet manager publishes only these configs; Home Assistant then reads the devices' topics
itself (its broker user needs read access to ``edgeid/#``). Nothing is republished.

Each config names its ``origin`` (this fleet manager and its version), a ``device`` block per
box, ``unique_id`` per sensor, and the box's own retained ``online``/``offline`` status (its
birth message and last will) as ``availability``: a box that stops, crashes or loses its link
shows as unavailable in Home Assistant without the fleet manager's help. All sensors are
``diagnostic``: they describe the appliance's health, not what it is for. The field names are
those Home Assistant's MQTT sensor accepts (checked in tests/test_fleet_homeassistant.py);
Home Assistant silently drops keys it does not know, so a misspelt one would go unnoticed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import urlsplit

import edgeid
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.telemetry.topics import Topics

DEFAULT_PREFIX = "homeassistant"
ORIGIN_NAME = "edgeid fleet manager"
HEALTH_CATEGORY = "diagnostic"
# The schema's backends; None (no pipeline) renders as "None", which Home Assistant reads as
# "no value" before checking the options.
BACKENDS = ("cpu", "tensorrt", "degraded")


@dataclass(frozen=True)
class Sensor:
    key: str
    name: str
    template: str
    unit: str | None = None
    device_class: str | None = None
    options: tuple[str, ...] | None = None  # an enum sensor's states
    measurement: bool = True  # a number worth a long-term statistic


SENSORS = (
    Sensor("cpu", "CPU", "{{ value_json.cpu.percent }}", "%"),
    Sensor("load1", "Load (1 min)", "{{ value_json.cpu.load1 }}"),
    Sensor("memory", "Memory used", "{{ value_json.memory.used_percent }}", "%"),
    Sensor("disk_free", "Disk free", "{{ value_json.disk.free_bytes }}", "B", "data_size"),
    Sensor(
        "temperature",
        "Temperature (max)",
        "{{ value_json.temperatures | map(attribute='celsius') | max | default(none) }}",
        "°C",
        "temperature",
    ),
    Sensor("latency_p95", "Latency p95", "{{ value_json.inference.latency_p95_ms }}", "ms"),
    Sensor("requests", "Requests per report", "{{ value_json.inference.requests }}"),
    Sensor("errors", "Errors per report", "{{ value_json.inference.errors }}"),
    Sensor(
        "backend",
        "Inference backend",
        "{{ value_json.inference.backend }}",
        device_class="enum",
        options=BACKENDS,
        measurement=False,
    ),
    Sensor("version", "Software version", "{{ value_json.software.edgeid }}", measurement=False),
)


def node_id(site: str, device: str) -> str:
    return f"edgeid_{site}_{device}"


def check_support_url(url: str) -> str:
    """An http(s) URL, as Home Assistant requires of ``origin.support_url``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadInputError(f"--homeassistant-support-url {url!r}: give an http:// or https:// URL")
    return url


def origin(support_url: str | None = None) -> dict[str, str]:
    """Who published the config: Home Assistant logs it with every discovered entity."""
    block = {"name": ORIGIN_NAME, "sw_version": edgeid.__version__}
    if support_url is not None:
        block["support_url"] = check_support_url(support_url)
    return block


def discovery_messages(
    site: str, device: str, prefix: str = DEFAULT_PREFIX, *, support_url: str | None = None
) -> list[tuple[str, bytes]]:
    """(topic, retained payload) of every sensor of one device."""
    topics = Topics(site=site, device=device)
    node = node_id(site, device)
    source = origin(support_url)
    messages = []
    for sensor in SENSORS:
        config: dict[str, object] = {
            "name": sensor.name,
            "unique_id": f"{node}_{sensor.key}",
            "state_topic": topics.of_kind("health"),
            "value_template": sensor.template,
            "qos": 1,  # as the box publishes
            "entity_category": HEALTH_CATEGORY,
            "availability": [
                {
                    "topic": topics.status,
                    "payload_available": "online",
                    "payload_not_available": "offline",
                }
            ],
            "availability_mode": "latest",
            "device": {
                "identifiers": [node],
                "name": f"edgeid {site}/{device}",
                "manufacturer": "edgeid",
                "model": "edgeid appliance",
                "serial_number": device,
            },
            "origin": source,
        }
        if sensor.unit:
            config["unit_of_measurement"] = sensor.unit
        if sensor.measurement:
            config["state_class"] = "measurement"
        if sensor.device_class:
            config["device_class"] = sensor.device_class
        if sensor.options:
            config["options"] = list(sensor.options)
        topic = f"{prefix}/sensor/{node}/{sensor.key}/config"
        messages.append((topic, json.dumps(config, ensure_ascii=False).encode("utf-8")))
    return messages
