"""``edgeid.toml`` as provisioning leaves it: validated (every file it names must exist) before
it is written, written only when a value changes, and read back after."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydantic import ValidationError

from edgeid.runtime.config.settings import (
    ConfigError,
    Settings,
    config_path,
    load_settings,
    save_settings,
)
from edgeid.runtime.errors import EdgeidError

Changes = Mapping[str, Mapping[str, object]]


def updated(current: Settings, changes: Changes) -> Settings:
    """``current`` with ``changes`` applied, validated like the file itself would be."""
    data = current.model_dump()
    for section, values in changes.items():
        data[section] = {**data[section], **values}
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"edgeid.toml would be invalid: {key}: {first['msg']}") from None


def named_files(settings: Settings) -> dict[str, str]:
    """Every file path the settings name, by key."""
    candidates = {
        "web.tls_cert": settings.web.tls_cert,
        "web.tls_key": settings.web.tls_key,
        "telemetry.ca_file": settings.telemetry.ca_file,
        "telemetry.cert_file": settings.telemetry.cert_file,
        "telemetry.key_file": settings.telemetry.key_file,
    }
    return {key: value for key, value in candidates.items() if value}


def write_settings(home: Path, desired: Settings) -> bool:
    """Save ``desired`` unless the file already says exactly that; then read it back."""
    path = config_path(home)
    missing = [f"{key} ({value})" for key, value in named_files(desired).items()
               if not Path(value).is_file()]  # fmt: skip
    if missing:
        raise ConfigError(f"{path} would name missing files: {', '.join(missing)}")
    changed = not path.exists() or load_settings(home).model_dump() != desired.model_dump()
    if changed:
        save_settings(home, desired)
    if load_settings(home).model_dump() != desired.model_dump():
        raise EdgeidError(f"{path} does not read back as written; check the disk")
    return changed
