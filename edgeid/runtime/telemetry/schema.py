"""The telemetry wire format, version 1: what a box may tell the fleet, and nothing else.

Every field is a bounded number, an enum, or an identifier matching a strict pattern (version
strings, model ids, sensor names); there is no free-text field, so a name, a case number, an
image or an embedding has nowhere to go. Floats carry at most three decimals, which also keeps
an embedding from being smuggled out as a run of precise numbers. Models are strict (no type
coercion) and forbid unknown keys; ``check_payload`` re-validates the exact bytes before they
are published, so the publisher refuses anything that did not come from these models.

Fields added within version 1 are optional (``Inference.latency_buckets`` and
``latency_sum_s``): a fleet manager reads reports of older boxes as before, while an older fleet
manager refuses the new fields, so the fleet manager is upgraded before the boxes.

Topics: ``edgeid/<site>/<device>/status`` (retained ``online``/``offline``), ``.../health``
(a ``HealthReport``), ``.../events`` (an ``EventReport``).
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from edgeid.runtime.compat import StrEnum
from edgeid.runtime.errors import EdgeidError
from edgeid.runtime.system.metrics import LATENCY_BUCKET_COUNT

SCHEMA_VERSION: Literal[1] = 1
TOPIC_ROOT = "edgeid"
# A health report is about 1.5 KB; the cap bounds what even a bug could push out in one message.
MAX_PAYLOAD_BYTES = 8192
FLOAT_DECIMALS = 3

# PEP 440 release, optional pre/post/dev parts and a short local label ("0.1.0", "0.0.0+source").
VERSION_PATTERN = (
    r"^[0-9]{1,4}(\.[0-9]{1,4}){1,3}((a|b|rc)[0-9]{1,4})?(\.post[0-9]{1,4})?(\.dev[0-9]{1,6})?"
    r"(\+[a-z0-9]{1,16}(\.[a-z0-9]{1,16}){0,3})?$"
)
# A model manifest's name and the first 12 hex digits of the model file's sha256.
MODEL_ID_PATTERN = r"^[a-z0-9][a-z0-9_]{1,63}@[0-9a-f]{12}$"
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_]{1,63}$"
# Thermal zone types and GPU sensors, lower-cased by the collectors ("cpu-therm", "gpu0").
SENSOR_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,31}$"
SLUG_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"

Status = Literal["online", "offline"]
MessageKind = Literal["health", "events"]
Backend = Literal["cpu", "tensorrt", "degraded"]


class EventKind(StrEnum):
    """Coarse operational events; none carries a user, a case or a search."""

    STARTED = "started"
    STOPPED = "stopped"
    DEGRADED = "degraded"
    RECOVERED = "recovered"
    UPDATE_APPLIED = "update_applied"
    UPDATE_ROLLED_BACK = "update_rolled_back"


class TelemetryPayloadError(EdgeidError):
    """A message does not match the telemetry schema; it was not published."""


def _coarse(value: float) -> float:
    if not math.isfinite(value) or round(value, FLOAT_DECIMALS) != value:
        raise ValueError(f"must be finite with at most {FLOAT_DECIMALS} decimals")
    return value


def coarse(value: float) -> float:
    """``value`` rounded to what the schema carries."""
    return round(value, FLOAT_DECIMALS)


Percent = Annotated[float, Field(ge=0.0, le=100.0), AfterValidator(_coarse)]
Load = Annotated[float, Field(ge=0.0, le=100_000.0), AfterValidator(_coarse)]
Seconds = Annotated[float, Field(ge=0.0, le=1e10), AfterValidator(_coarse)]
Millis = Annotated[float, Field(ge=0.0, le=3.6e6), AfterValidator(_coarse)]
Celsius = Annotated[float, Field(ge=-100.0, le=250.0), AfterValidator(_coarse)]
Bytes = Annotated[int, Field(ge=0, le=1 << 60)]
Count = Annotated[int, Field(ge=0, le=1 << 53)]
Version = Annotated[str, Field(pattern=VERSION_PATTERN, max_length=64)]
ModelId = Annotated[str, Field(pattern=MODEL_ID_PATTERN)]
SensorName = Annotated[str, Field(pattern=SENSOR_PATTERN)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Cpu(_Strict):
    percent: Percent  # busy share of all cores since the previous report
    cores: int = Field(ge=1, le=4096)
    load1: Load
    load5: Load
    load15: Load


class Memory(_Strict):
    total_bytes: Bytes
    available_bytes: Bytes
    used_percent: Percent


class Disk(_Strict):
    """The volume holding the state directory (galleries, models, audit)."""

    free_bytes: Bytes
    total_bytes: Bytes


class Temperature(_Strict):
    sensor: SensorName
    celsius: Celsius


class Gpu(_Strict):
    index: int = Field(ge=0, le=63)
    source: Literal["nvml", "jetson"]
    load_percent: Percent | None = None
    memory_used_bytes: Bytes | None = None
    memory_total_bytes: Bytes | None = None


class EngineMemory(_Strict):
    """GPU memory one model's TensorRT engine holds (weights, activations, I/O buffers)."""

    model: str = Field(pattern=MODEL_NAME_PATTERN)
    bytes: Bytes


class Inference(_Strict):
    """Figures since the previous report; ``backend`` is None where no pipeline runs."""

    backend: Backend | None
    requests: Count
    errors: Count
    latency_p50_ms: Millis | None
    latency_p95_ms: Millis | None
    queue_depth: Count
    queue_depth_max: Count
    # One entry per model running on TensorRT; empty on the CPU.
    engine_memory: list[EngineMemory] = Field(default_factory=list, max_length=32)
    # The period's successful requests per latency bucket (bounds LATENCY_BUCKETS_S, not
    # cumulative, the last for slower ones) and their summed latency; None from older boxes.
    latency_buckets: list[Count] | None = Field(
        default=None, min_length=LATENCY_BUCKET_COUNT, max_length=LATENCY_BUCKET_COUNT
    )
    latency_sum_s: Seconds | None = None

    @model_validator(mode="after")
    def _histogram_whole(self) -> Inference:
        if (self.latency_buckets is None) != (self.latency_sum_s is None):
            raise ValueError("latency_buckets and latency_sum_s come together")
        timed = self.requests - self.errors  # a failed request adds no latency
        if self.latency_buckets is not None and sum(self.latency_buckets) > timed:
            raise ValueError("more latencies counted than requests")
        return self


class Software(_Strict):
    edgeid: Version
    models: list[ModelId] = Field(max_length=32)
    # The embedding model searches run with (edgeid models use); None: not readable.
    embedder: ModelId | None = None


class SpoolState(_Strict):
    pending: Count  # reports waiting on disk for the broker
    dropped_total: Count  # reports the size cap pushed out, since the box was set up


class Integrity(_Strict):
    """The last scrub of the box's sealed files: counts only, never which or what."""

    objects_checked: Count
    damaged: Count
    finished_at: Seconds  # Unix time on the box


class HealthReport(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    seq: Count  # per device, shared with events; the fleet uses it to drop duplicates
    measured_at: Seconds  # Unix time on the box
    uptime_s: Seconds  # of the reporting service
    host_uptime_s: Seconds
    cpu: Cpu
    memory: Memory
    disk: Disk
    temperatures: list[Temperature] = Field(max_length=64)
    gpus: list[Gpu] = Field(max_length=16)
    inference: Inference
    software: Software
    spool: SpoolState
    enrolled_faces: Count | None = None  # only with telemetry.report_enrolled_counts
    integrity: Integrity | None = None  # None until the service's first scrub


class EventReport(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    seq: Count
    at: Seconds
    kind: EventKind
    software: Version


Message = HealthReport | EventReport


def encode(message: Message) -> bytes:
    """Compact JSON bytes of a message, checked against the schema as they will be sent."""
    payload = message.model_dump_json().encode("ascii")
    kind: MessageKind = "health" if isinstance(message, HealthReport) else "events"
    check_payload(kind, payload)
    return payload


def check_payload(kind: MessageKind, payload: bytes) -> Message:
    """The message ``payload`` holds, or TelemetryPayloadError; never echoes the payload."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise TelemetryPayloadError(
            f"{kind} payload is {len(payload)} bytes, over {MAX_PAYLOAD_BYTES}; not published"
        )
    model: type[Message] = HealthReport if kind == "health" else EventReport
    try:
        return model.model_validate_json(payload, strict=True)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        # Only our own field names are echoed: an unknown key could itself be personal data.
        where = ".".join(_safe_part(part) for part in first["loc"]) or "(message)"
        reason = _REASONS.get(first["type"], first["msg"])
        raise TelemetryPayloadError(
            f"{kind} payload refused at {where}: {reason}; only schema fields are published"
        ) from None


def _field_names(model: type[BaseModel]) -> set[str]:
    names = set(model.model_fields)
    for field in model.model_fields.values():
        for arg in _types_in(field.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                names |= _field_names(arg)
    return names


def _types_in(annotation: object) -> list[object]:
    args = getattr(annotation, "__args__", None)
    if not args:
        return [annotation]
    return [t for arg in args for t in _types_in(arg)]


_KNOWN_FIELDS = frozenset(_field_names(HealthReport) | _field_names(EventReport))


_REASONS = {
    "extra_forbidden": "unknown field",
    "string_pattern_mismatch": "not an allowed value (strict pattern)",
}


def _safe_part(part: str | int) -> str:
    return str(part) if isinstance(part, int) or part in _KNOWN_FIELDS else "?"


def check_status(payload: bytes) -> Status:
    text = payload.decode("ascii", errors="replace")
    if text not in ("online", "offline"):
        raise TelemetryPayloadError("status payload must be online or offline; not published")
    return "online" if text == "online" else "offline"


def json_schema(kind: MessageKind) -> dict[str, object]:
    """The JSON Schema of a message kind, for fleet tooling outside Python."""
    model: type[Message] = HealthReport if kind == "health" else EventReport
    schema: dict[str, object] = model.model_json_schema()
    return schema


def parse_json_object(payload: bytes) -> dict[str, object]:
    """The payload as a JSON object, for printing exactly what is published."""
    value = json.loads(payload)
    if not isinstance(value, dict):
        raise TelemetryPayloadError("payload is not a JSON object")
    return value
