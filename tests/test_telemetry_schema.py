"""The telemetry wire format: it accepts the health and event payloads we publish and refuses
anything that could carry personal or biometric data (test vectors under data/telemetry)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeid.runtime.telemetry.schema import (
    LATENCY_BUCKET_COUNT,
    MAX_PAYLOAD_BYTES,
    EventKind,
    EventReport,
    HealthReport,
    MessageKind,
    TelemetryPayloadError,
    check_payload,
    check_status,
    encode,
    json_schema,
)

VECTORS = Path(__file__).parent / "data" / "telemetry"
VALID = sorted((VECTORS / "valid").glob("*.json"))
INVALID = sorted((VECTORS / "invalid").glob("*.json"))
# Words planted in the invalid vectors; a refusal must not repeat them.
PLANTED = ("Jane", "Doe", "2024/117", "searched", "subject", "note", "case")


def _kind(path: Path) -> MessageKind:
    return "health" if path.name.startswith("health-") else "events"


def test_vectors_exist() -> None:
    assert len(VALID) >= 4 and len(INVALID) >= 15


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_vector_is_accepted_and_survives_a_round_trip(path: Path) -> None:
    payload = path.read_bytes().strip()
    message = check_payload(_kind(path), payload)
    assert check_payload(_kind(path), encode(message)) == message


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_vector_is_refused_without_echoing_it(path: Path) -> None:
    with pytest.raises(TelemetryPayloadError) as refused:
        check_payload(_kind(path), path.read_bytes())
    message = str(refused.value)
    assert "not published" in message or "only schema fields are published" in message
    for word in PLANTED:
        assert word not in message, f"the refusal repeats {word!r}: {message}"
    assert "\n" not in message


def test_oversized_payload_is_refused() -> None:
    big = json.loads((VECTORS / "valid" / "health-full.json").read_text())
    big["software"]["models"] = [f"model_{i:03d}@{i:012x}" for i in range(400)]
    with pytest.raises(TelemetryPayloadError, match="over 8192"):
        check_payload("health", json.dumps(big).encode())
    assert len(json.dumps(big)) > MAX_PAYLOAD_BYTES


def test_the_publisher_refuses_a_report_it_cannot_validate() -> None:
    """Building a report with a forbidden value fails before any bytes exist."""
    good = check_payload("health", (VECTORS / "valid" / "health-full.json").read_bytes())
    assert isinstance(good, HealthReport)
    data = good.model_dump()
    data["software"]["edgeid"] = "Jane Doe"
    with pytest.raises(ValueError):
        HealthReport.model_validate(data)


def test_every_string_field_is_an_enum_or_a_strict_pattern() -> None:
    """The schema itself: no string without a pattern or a fixed set of values."""

    def strings(node: object, where: str) -> list[str]:
        found: list[str] = []
        if isinstance(node, dict):
            if node.get("type") == "string" and not {"pattern", "enum", "const"} & node.keys():
                found.append(where)
            for key, value in node.items():
                found += strings(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                found += strings(value, f"{where}[{i}]")
        return found

    for kind in ("health", "events"):
        schema = json_schema(kind)  # type: ignore[arg-type]
        assert strings(schema, kind) == [], "a free-text string field crept into the schema"


def test_event_kinds_are_coarse() -> None:
    assert {k.value for k in EventKind} == {
        "started",
        "stopped",
        "degraded",
        "recovered",
        "update_applied",
        "update_rolled_back",
    }
    event = EventReport(seq=1, at=2.5, kind=EventKind.UPDATE_APPLIED, software="0.1.0")
    assert json.loads(encode(event))["kind"] == "update_applied"


def test_the_latency_histogram_is_optional_whole_and_bounded_by_the_requests() -> None:
    old = check_payload("health", (VECTORS / "valid" / "health-full.json").read_bytes())
    assert isinstance(old, HealthReport) and old.inference.latency_buckets is None  # older boxes
    new = check_payload(
        "health", (VECTORS / "valid" / "health-latency-histogram.json").read_bytes()
    )
    assert isinstance(new, HealthReport) and new.inference.latency_buckets is not None
    assert len(new.inference.latency_buckets) == LATENCY_BUCKET_COUNT
    data = new.model_dump()
    refused = {
        "buckets without their sum": {"latency_sum_s": None},
        "a sum without buckets": {"latency_buckets": None},
        "more timed than succeeded": {"latency_buckets": [0] * 14 + [new.inference.requests]},
        "a bucket count too few": {"latency_buckets": [0] * (LATENCY_BUCKET_COUNT - 1)},
        "a negative count": {"latency_buckets": [-1] + [0] * 14},
        "a float count": {"latency_buckets": [0.5] + [0] * 14},
    }
    for why, change in refused.items():
        inference = {**data["inference"], **change}
        with pytest.raises(ValueError):
            HealthReport.model_validate({**data, "inference": inference}, strict=True)
            raise AssertionError(f"accepted {why}")


def test_status_is_online_or_offline_only() -> None:
    assert check_status(b"online") == "online"
    assert check_status(b"offline") == "offline"
    for bad in (b"Online", b"online ", b"Jane Doe", b""):
        with pytest.raises(TelemetryPayloadError):
            check_status(bad)
