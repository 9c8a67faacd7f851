"""Home Assistant discovery payloads against the fields Home Assistant's MQTT sensor accepts.

The field sets below are written down from Home Assistant's documentation
(https://www.home-assistant.io/integrations/sensor.mqtt/ and
https://www.home-assistant.io/integrations/mqtt/#discovery-messages) and the schemas of its
MQTT integration (``homeassistant/components/mqtt``: ``MQTT_RO_SCHEMA`` in config.py,
``MQTT_ENTITY_COMMON_SCHEMA``, ``MQTT_ENTITY_DEVICE_INFO_SCHEMA`` and ``MQTT_ORIGIN_INFO_SCHEMA``
in schemas.py, ``_PLATFORM_SCHEMA_BASE`` and ``validate_sensor_state_and_device_class_config``
in sensor.py). Discovery drops unknown keys silently (``vol.REMOVE_EXTRA``), so a misspelt key
would simply do nothing: every key must be one of these.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

import edgeid
from edgeid.fleet.homeassistant import BACKENDS, SENSORS, check_support_url, discovery_messages
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.telemetry.schema import check_status
from edgeid.runtime.telemetry.topics import Topics

REPO_ROOT = Path(__file__).resolve().parent.parent
VECTORS = REPO_ROOT / "tests" / "data" / "telemetry" / "valid"

# MQTT_RO_SCHEMA
READ_ONLY = {"state_topic", "value_template", "qos", "encoding"}
# the sensor platform's own options
SENSOR = {
    "device_class", "expire_after", "force_update", "last_reset_value_template", "name",
    "options", "suggested_display_precision", "state_class", "unit_of_measurement",
}  # fmt: skip
# MQTT_ENTITY_COMMON_SCHEMA (with the availability schema it extends)
COMMON = {
    "availability_topic", "availability_template", "payload_available",
    "payload_not_available", "availability_mode", "availability", "device", "origin",
    "enabled_by_default", "entity_category", "icon", "json_attributes_topic",
    "json_attributes_template", "object_id", "default_entity_id", "unique_id",
}  # fmt: skip
SENSOR_KEYS = READ_ONLY | SENSOR | COMMON
REQUIRED = {"state_topic"}
AVAILABILITY_KEYS = {"topic", "payload_available", "payload_not_available", "value_template"}
AVAILABILITY_MODES = {"all", "any", "latest"}
DEVICE_KEYS = {
    "identifiers", "connections", "manufacturer", "model", "model_id", "name", "hw_version",
    "serial_number", "sw_version", "via_device", "suggested_area", "configuration_url",
}  # fmt: skip
ORIGIN_KEYS = {"name", "sw_version", "support_url"}  # name required; support_url a URL
ENTITY_CATEGORIES = {"config", "diagnostic"}
STATE_CLASSES = {"measurement", "measurement_angle", "total", "total_increasing"}
# The device classes used here, with the units Home Assistant accepts for them.
DEVICE_CLASS_UNITS: dict[str, set[str] | None] = {
    "temperature": {"°C", "°F", "K"},
    "data_size": {"bit", "kbit", "Mbit", "Gbit", "B", "kB", "MB", "GB", "TB", "KiB", "MiB", "GiB"},
    "enum": None,  # no unit, no state class, options required
}
# Home Assistant's discovery topic (homeassistant/components/mqtt/discovery.py).
DISCOVERY_TOPIC = re.compile(
    r"(?P<prefix>[^/]+)/(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?"
    r"(?P<object_id>[a-zA-Z0-9_-]+)/config"
)
URL = re.compile(r"^https?://[^/\s]+")


def problems(config: dict[str, Any]) -> list[str]:
    """What Home Assistant's MQTT sensor discovery schema would refuse or silently drop."""
    found = [f"unknown key {k}" for k in sorted(set(config) - SENSOR_KEYS)]
    found += [f"missing {k}" for k in sorted(REQUIRED - set(config))]
    if "availability" in config and "availability_topic" in config:
        found.append("availability and availability_topic are exclusive")
    for entry in config.get("availability", []):
        found += [f"availability: unknown key {k}" for k in sorted(set(entry) - AVAILABILITY_KEYS)]
        if "topic" not in entry:
            found.append("availability entry without topic")
    if config.get("availability_mode", "latest") not in AVAILABILITY_MODES:
        found.append("availability_mode")
    device = config.get("device", {})
    found += [f"device: unknown key {k}" for k in sorted(set(device) - DEVICE_KEYS)]
    if device and not (device.get("identifiers") or device.get("connections")):
        found.append("device without identifiers or connections")
    origin = config.get("origin")
    if origin is not None:
        found += [f"origin: unknown key {k}" for k in sorted(set(origin) - ORIGIN_KEYS)]
        if not origin.get("name"):
            found.append("origin without name")
        if "support_url" in origin and not URL.match(origin["support_url"]):
            found.append("origin.support_url is not a URL")
    if config.get("entity_category", "diagnostic") not in ENTITY_CATEGORIES:
        found.append("entity_category")
    if config.get("state_class", "measurement") not in STATE_CLASSES:
        found.append("state_class")
    if config.get("qos", 0) not in (0, 1, 2):
        found.append("qos")
    device_class = config.get("device_class")
    if device_class is not None:
        if device_class not in DEVICE_CLASS_UNITS:
            found.append(f"device_class {device_class} not checked here")
        elif (units := DEVICE_CLASS_UNITS[device_class]) is not None and (
            config.get("unit_of_measurement") not in units
        ):
            found.append(f"unit not valid for {device_class}")
    if "options" in config:
        if not config["options"]:
            found.append("empty options")
        if "state_class" in config or "unit_of_measurement" in config:
            found.append("options with state_class or unit_of_measurement")
        if device_class != "enum":
            found.append("options without device_class enum")
    return found


def test_the_checker_refuses_what_home_assistant_refuses() -> None:
    good = {"state_topic": "a/b", "origin": {"name": "x"}, "device": {"identifiers": ["d"]}}
    assert problems(good) == []
    assert problems({**good, "entity_categroy": "diagnostic"}) == ["unknown key entity_categroy"]
    assert problems({**good, "origin": {"sw_version": "1"}}) == ["origin without name"]
    assert problems({**good, "device": {"name": "d"}}) == [
        "device without identifiers or connections"
    ]
    enum_with_unit = {**good, "device_class": "enum", "options": ["a"], "unit_of_measurement": "%"}
    assert problems(enum_with_unit) == ["options with state_class or unit_of_measurement"]
    assert problems({**good, "device_class": "temperature", "unit_of_measurement": "C"})


def _configs(**kwargs: Any) -> list[tuple[str, dict[str, Any]]]:
    return [
        (topic, json.loads(payload))
        for site, device in (("lab", "box-1"), ("site-b", "box-7"))
        for topic, payload in discovery_messages(site, device, "homeassistant", **kwargs)
    ]


def test_every_discovery_payload_fits_home_assistants_sensor_schema() -> None:
    configs = _configs(support_url="https://support.example.org/edgeid")
    assert len(configs) == 2 * len(SENSORS)
    for topic, config in configs:
        assert problems(config) == [], topic
        match = DISCOVERY_TOPIC.fullmatch(topic)
        assert match and match["component"] == "sensor" and match["prefix"] == "homeassistant"
    unique_ids = [config["unique_id"] for _, config in configs]
    assert len(set(unique_ids)) == len(unique_ids), "a unique_id is shared"
    topics = [topic for topic, _ in configs]
    assert len(set(topics)) == len(topics)


def test_origin_category_availability_and_device_of_each_box() -> None:
    url = "https://support.example.org/edgeid"
    for topic, config in _configs(support_url=url):
        site, device = ("lab", "box-1") if "edgeid_lab_box-1" in topic else ("site-b", "box-7")
        box = Topics(site=site, device=device)
        assert config["origin"] == {
            "name": "edgeid fleet manager",
            "sw_version": edgeid.__version__,
            "support_url": url,
        }
        assert config["entity_category"] == "diagnostic"
        assert config["state_topic"] == box.of_kind("health")
        # The box's own retained birth/last-will topic, with the words the box publishes there.
        [availability] = config["availability"]
        assert availability["topic"] == box.status
        assert check_status(availability["payload_available"].encode()) == "online"
        assert check_status(availability["payload_not_available"].encode()) == "offline"
        assert config["device"]["identifiers"] == [f"edgeid_{site}_{device}"]
        assert config["device"]["serial_number"] == device
        assert config["unique_id"].startswith(f"edgeid_{site}_{device}_")
    # Without a support URL the origin still names the publisher and its version.
    _, config = _configs()[0]
    assert config["origin"] == {"name": "edgeid fleet manager", "sw_version": edgeid.__version__}


@pytest.mark.parametrize(
    "vector", ["health-full.json", "health-minimal-cpu-box.json", "health-after-a-scrub.json"]
)
def test_value_templates_read_real_health_reports(vector: str) -> None:
    """Each template, rendered as Home Assistant does (Jinja2, ``value_json``), gives a number
    for a measurement, one of the options for the enum, and "None" (no value) only where the
    report has nothing."""
    value_json = json.loads((VECTORS / vector).read_text())
    env = ImmutableSandboxedEnvironment()
    configs = {c["unique_id"].rsplit("_box-1_", 1)[1]: c for _, c in _configs()[: len(SENSORS)]}
    rendered = {
        key: env.from_string(c["value_template"]).render(value_json=value_json)
        for key, c in configs.items()
    }
    for key, config in configs.items():
        text = rendered[key]
        if config.get("state_class") == "measurement":
            assert text == "None" or float(text) >= 0, key
        if "options" in config:
            assert text in config["options"] or text == "None", key
    assert float(rendered["cpu"]) == value_json["cpu"]["percent"]
    assert int(rendered["disk_free"]) == value_json["disk"]["free_bytes"]
    temperatures = [t["celsius"] for t in value_json["temperatures"]]
    assert rendered["temperature"] == (str(max(temperatures)) if temperatures else "None")
    backend = value_json["inference"]["backend"]
    assert rendered["backend"] == str(backend) and (backend is None or backend in BACKENDS)
    assert rendered["version"] == value_json["software"]["edgeid"]


def test_a_support_url_must_be_http_or_https() -> None:
    assert check_support_url("http://intranet/help") == "http://intranet/help"
    for bad in ("ftp://x/y", "support.example.org", "javascript:alert(1)"):
        with pytest.raises(BadInputError):
            check_support_url(bad)
    result = subprocess.run(
        [
            sys.executable, "-m", "edgeid", "fleet", "serve", "--ca", "ca.pem", "--cert",
            "c.pem", "--key", "k.pem", "--homeassistant", "--homeassistant-support-url", "ftp://x",
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--homeassistant-support-url" in result.stderr
