"""``<home>/edgeid.toml``: every setting has an embedded default, so a missing file is a valid
box (CPU, local state directory, local telemetry sink). Unknown keys and bad values are refused
with the key's name, so a technician's typo never silently falls back to a default.

Each domain owns one section; provisioning writes the file, the service only reads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgeid.runtime.compat import tomllib
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.storage.durable import write_file_atomically

CONFIG_FILE = "edgeid.toml"
# Device and site ids appear in MQTT topics and file names: lower-case slugs only.
Slug = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]


class ConfigError(BadInputError):
    """The configuration file is unreadable or holds a bad value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceSettings(_Section):
    device_id: Slug = "dev-box"
    site: Slug = "lab"


class KeySettings(_Section):
    # "auto": TPM2 if one answers, then systemd-creds, then a key file (see key_providers).
    provider: Literal["auto", "tpm2", "systemd-creds", "keyfile", "passphrase"] = "keyfile"
    tpm_tcti: str | None = None  # e.g. "device:/dev/tpmrm0"; None = tpm2-tools' default


class InferenceSettings(_Section):
    detector: Literal["mtcnn", "mmod"] = "mtcnn"
    backend: Literal["auto", "cpu", "tensorrt"] = "auto"
    threads: int | None = Field(default=None, ge=1, le=256)
    spinning: bool = Field(
        default=False,  # = onnx_backend.DEFAULT_SPINNING (config imports no inference)
        title="Busy-waiting inference threads",
        description=(
            "ONNX Runtime's threads spin after each run. Off by default: measured, idle "
            "sessions' spinning threads steal the CPU from the working one on a small box."
        ),
    )
    precision: Literal["fp32", "int8", "int8-embedder"] = Field(
        default="fp32",  # = precision.DEFAULT_PRECISION
        title="Model precision on the CPU",
        description=(
            "int8-embedder runs the statically quantised embedder behind the FP32 detector, "
            "int8 the quantised MTCNN nets as well (edgeid models build --precision int8); "
            "INT8 templates are a model of their own (re-embed galleries)."
        ),
    )
    # Bounds on what one photo and a burst of photos may cost (README "Speed and limits").
    max_working_pixels: int = Field(
        default=3_000_000,
        ge=250_000,
        le=50_000_000,
        title="Detection working size (pixels)",
        description=(
            "A larger photo is reduced to at most this many pixels for face detection; faces "
            "are then cut from the full-resolution photo. Higher finds smaller faces in large "
            "photos at the cost of memory and time (about 100 bytes per pixel)."
        ),
    )
    max_faces_per_image: int = Field(
        default=100,
        ge=1,
        le=1000,
        title="Faces analysed per photo",
        description=(
            "The most confident faces of a photo that are analysed; the rest are counted and "
            "reported as not analysed."
        ),
    )
    max_running_jobs: int = Field(
        default=2,
        ge=1,
        le=32,
        title="Photos analysed at once",
        description="Analyses that run in parallel; one per CPU core is enough.",
    )
    ingest_streams: int = Field(
        default=2,
        ge=1,
        le=32,
        title="Photos a case ingest analyses at once",
        description=(
            "A case ingest on this box analyses this many photos or video frames at once, each "
            "on its own thread over the one loaded pipeline (the faces are written in the order "
            "of the files); 1 analyses one at a time. Measured: two streams on two cores gain "
            '1.2-1.5x over one (README "Parallel analysis").'
        ),
    )
    max_large_running_jobs: int = Field(
        default=1,
        ge=1,
        le=32,
        title="Large photos analysed at once",
        description=(
            "Of the analyses running at once, how many may be photos over the working size "
            "(they cost the most memory); the other slots stay free for ordinary photos."
        ),
    )
    max_waiting_jobs: int = Field(
        default=6,
        ge=0,
        le=256,
        title="Photos waiting their turn",
        description=(
            "Analyses that wait for a free slot; beyond this a request is refused with HTTP 503 "
            "and Retry-After."
        ),
    )
    admission_wait_s: float = Field(
        default=20.0,
        ge=1.0,
        le=300.0,
        title="Longest wait for a slot (seconds)",
        description="A waiting analysis that gets no slot within this time is refused (503).",
    )

    @model_validator(mode="after")
    def _large_within_running(self) -> InferenceSettings:
        if self.max_large_running_jobs > self.max_running_jobs:
            raise ValueError("max_large_running_jobs must be at most max_running_jobs")
        return self


class WebSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    tls_cert: str | None = None  # PEM paths; plain HTTP is allowed on loopback only
    tls_key: str | None = None
    session_idle_s: int = Field(default=15 * 60, ge=60)
    session_max_s: int = Field(default=8 * 3600, ge=300)
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    # A case's seized media uploaded as one zip or tar: streamed to a private temp file, never
    # held in memory. 2 GiB is a phone's photo roll; bigger sets go through `edgeid case ingest`.
    max_case_upload_bytes: int = Field(default=2 * 1024 * 1024 * 1024, ge=1024)


class TelemetrySettings(_Section):
    # "local": health reports go to <home>/telemetry/ (the embedded default, no broker needed);
    # "mqtt": published to the fleet broker; "off": nothing is reported.
    sink: Literal["local", "mqtt", "off"] = "local"
    broker_host: str = "127.0.0.1"
    broker_port: int = Field(default=8883, ge=1, le=65535)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    interval_s: float = Field(default=30.0, ge=1.0, le=3600.0)
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    spool_max_bytes: int = Field(default=4 * 1024 * 1024, ge=4096)
    report_enrolled_counts: bool = False  # off by default: counts of people are sensitive
    # Each of <home>/telemetry/{health,events}.jsonl (sink "local") is rotated once past this.
    local_max_bytes: int = Field(default=1024 * 1024, ge=4096)
    # Reconnect waits double from min to max, with jitter, so a fleet does not reconnect in step.
    reconnect_min_s: float = Field(default=1.0, ge=0.1, le=600.0)
    reconnect_max_s: float = Field(default=60.0, ge=0.1, le=3600.0)

    @model_validator(mode="after")
    def _mqtt_needs_tls(self) -> TelemetrySettings:
        if self.sink == "mqtt":
            missing = [k for k in ("ca_file", "cert_file", "key_file") if not getattr(self, k)]
            if missing:
                raise ValueError(
                    f"sink mqtt needs {', '.join(missing)} (TLS with a client certificate)"
                )
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be at least reconnect_min_s")
        return self


class UpdateSettings(_Section):
    # What bundles must list in "hardware" to install here; None: generic-<arch> (amd64, arm64).
    hardware_id: Slug | None = None
    allow_downgrade: bool = False  # a bundle older than the installed version is refused
    # Run after switching slots, {slot} and {home} substituted; exit 0 = healthy.
    # None: {slot}/bin/edgeid provision selftest --home {home}.
    health_command: list[str] | None = Field(default=None, min_length=1)
    health_timeout_s: float = Field(default=300.0, ge=1.0, le=3600.0)
    # Restarts the service on the new slot; None: systemctl restart edgeid.service where
    # systemd runs the box, else nothing; [] never restarts.
    restart_command: list[str] | None = None


class SecuritySettings(_Section):
    dual_control: bool = Field(
        default=True,
        title="Two-person rule",
        description=(
            "Erasing a whole gallery, granting a user access to a gallery, making an admin and "
            "purging a case before its retention date wait for a second admin or supervisor to "
            "approve. Turn off only on a single-user lab box: the actions then run at once and "
            "each record says 'dual control off'."
        ),
    )
    # A week covers a weekend and a day off; an older proposal is stale and must be made again.
    proposal_ttl_days: int = Field(
        default=7,
        ge=1,
        le=30,
        title="Days a proposal waits",
        description="A proposal nobody approved or rejected within this many days expires.",
    )


class MaintenanceSettings(_Section):
    # Weekly: damage is found within days of happening, and a scrub of a 1M-face box (a
    # minute or so of reads, writes held off) stays a rare event.
    scrub_interval_hours: float | None = Field(
        default=168.0,
        ge=1.0,
        le=24.0 * 90,
        title="Hours between scrubs",
        description=(
            "The service reads and authenticates every sealed file this often and reports the "
            "counts in health telemetry; damaged objects are named (by id) in its log. None: "
            "never (run edgeid scrub by hand)."
        ),
    )
    scrub_first_after_minutes: float = Field(
        default=30.0,
        ge=0.0,
        le=24.0 * 60,
        title="Minutes before the first scrub",
        description="After the service starts, so a restart does not begin with a full read.",
    )


class SearchSettings(_Section):
    # A quarter: long enough to come back to a case's searches after leave or a court date,
    # short enough that a search history is not a second, unreviewed gallery of leads.
    history_days: int = Field(
        default=90,
        ge=1,
        le=3650,
        title="Days a search stays in the history",
        description=(
            "A search, its candidates and its decisions stay in the investigator's and the "
            "case's search history (sealed on the box) this many days after the search, then "
            "are erased. The audit log keeps its records for good."
        ),
    )


class ClusterSettings(_Section):
    """``[cluster]``: the Ray cluster a case ingest may hand its images to (README "Large cases
    on several boxes"). Empty ``address``: ingests run on this box only unless ``--cluster``."""

    address: str = ""  # host:port of the Ray head (the owning box runs it)
    # TLS between nodes (Ray's RAY_USE_TLS): the site CA and this node's key and certificate;
    # empty: <home>/tls/cluster-ca.crt, cluster.key and cluster.crt.
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    batch_files: int = Field(default=8, ge=1, le=256)  # images per batch sent to a node
    batches_per_node: int = Field(default=2, ge=1, le=16)  # in flight per node: back-pressure
    # at most this many MiB of images and frames in flight (they wait in the owning box's
    # object store, 512 MiB by default, which must never fill: it does not spill to disk)
    inflight_mib: int = Field(default=256, ge=16, le=65536)


class Settings(_Section):
    device: DeviceSettings = DeviceSettings()
    keys: KeySettings = KeySettings()
    inference: InferenceSettings = InferenceSettings()
    web: WebSettings = WebSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    updates: UpdateSettings = UpdateSettings()
    security: SecuritySettings = SecuritySettings()
    maintenance: MaintenanceSettings = MaintenanceSettings()
    searches: SearchSettings = SearchSettings()
    cluster: ClusterSettings = ClusterSettings()


def config_path(home: Path) -> Path:
    return home / CONFIG_FILE


def load_settings(home: Path) -> Settings:
    """The validated settings of the box at ``home``; defaults where the file is absent."""
    path = config_path(home)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Settings()
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}); fix or remove it") from exc
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"{path}: {key}: {first['msg']}; fix the value or remove it") from None


def save_settings(home: Path, settings: Settings) -> Path:
    """Write ``settings`` atomically (mode 0600); only values that differ from defaults."""
    lines: list[str] = []
    for section, values in settings.model_dump(exclude_defaults=True).items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    path = config_path(home)
    os.makedirs(home, exist_ok=True)
    write_file_atomically(path, "\n".join(lines).encode("utf-8"), action="writing the config")
    return path


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
