"""Home Assistant MQTT discovery: retained sensor configs that point Home Assistant at each
device's own ``health`` and ``status`` topics, so admins can use dashboards they already have.

The fleet manager publishes only these configs; Home Assistant then reads the devices' topics
itself (its broker user needs read access to ``edgeid/#``). Nothing is republished.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from edgeid.runtime.telemetry.topics import Topics

DEFAULT_PREFIX = "homeassistant"


@dataclass(frozen=True)
class Sensor:
    key: str
    name: str
    template: str
    unit: str | None = None
    device_class: str | None = None


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
    Sensor("backend", "Inference backend", "{{ value_json.inference.backend }}"),
    Sensor("version", "Software version", "{{ value_json.software.edgeid }}"),
)


def node_id(site: str, device: str) -> str:
    return f"edgeid_{site}_{device}"


def discovery_messages(
    site: str, device: str, prefix: str = DEFAULT_PREFIX
) -> list[tuple[str, bytes]]:
    """(topic, retained payload) of every sensor of one device."""
    topics = Topics(site=site, device=device)
    node = node_id(site, device)
    messages = []
    for sensor in SENSORS:
        config: dict[str, object] = {
            "name": sensor.name,
            "unique_id": f"{node}_{sensor.key}",
            "state_topic": topics.of_kind("health"),
            "value_template": sensor.template,
            "availability_topic": topics.status,
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": {
                "identifiers": [node],
                "name": f"edgeid {site}/{device}",
                "manufacturer": "edgeid",
                "model": "edgeid appliance",
            },
        }
        if sensor.unit:
            config["unit_of_measurement"] = sensor.unit
            config["state_class"] = "measurement"
        if sensor.device_class:
            config["device_class"] = sensor.device_class
        topic = f"{prefix}/sensor/{node}/{sensor.key}/config"
        messages.append((topic, json.dumps(config, ensure_ascii=False).encode("utf-8")))
    return messages
