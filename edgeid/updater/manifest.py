"""The update manifest: what a bundle installs, for which hardware, at which version.

    {"format": "edgeid-update/1", "version": "1.4.0", "hardware": ["generic-amd64"],
     "created": "2025-01-01T00:00:00Z",
     "files": [{"path": "bin/edgeid", "size": 1234, "sha256": "…", "executable": true}, …]}

The signature covers the manifest's exact bytes and the manifest pins every payload file's size
and sha256, so one ed25519 check plus the hashes authenticate the whole bundle. Paths are
checked here, before anything is written, so a signed manifest still cannot name a file
outside its slot.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Annotated, Literal

from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgeid.updater.errors import BundleRejectedError

FORMAT: Literal["edgeid-update/1"] = "edgeid-update/1"
# Hardware ids appear in file names and logs: lower-case slugs, like device ids.
HardwareId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
MAX_PATH_CHARS = 1024  # well under PATH_MAX once joined to the slot directory
MAX_NAME_BYTES = 255  # NAME_MAX on ext4 and xfs


def check_payload_path(path: str) -> str:
    """A relative path inside the slot, in canonical form; raises ValueError otherwise."""
    if not path or len(path) > MAX_PATH_CHARS:
        raise ValueError(f"path must be 1 to {MAX_PATH_CHARS} characters")
    if any(ord(ch) < 0x20 or ch in "\\\x7f" for ch in path):
        raise ValueError(f"path {path!r} holds a control character or a backslash")
    parts = path.split("/")
    if path.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"path {path!r} is not a plain relative path (no /, ., .. or //)")
    if any(len(part.encode("utf-8")) > MAX_NAME_BYTES for part in parts):
        raise ValueError(f"path {path!r} has a name longer than {MAX_NAME_BYTES} bytes")
    return path


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PayloadFile(_Model):
    path: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    executable: bool = False

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return check_payload_path(value)


class Manifest(_Model):
    format: Literal["edgeid-update/1"] = FORMAT
    version: str
    hardware: list[HardwareId] = Field(min_length=1)
    created: str | None = None
    files: list[PayloadFile] = Field(min_length=1)

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        parse_version(value)
        return value

    @model_validator(mode="after")
    def _no_clashing_paths(self) -> Manifest:
        paths = {entry.path for entry in self.files}
        if len(paths) != len(self.files):
            raise ValueError("a path is listed twice")
        for path in paths:
            for parent in PurePosixPath(path).parents:
                if str(parent) in paths:
                    raise ValueError(f"{parent} is a file and also a folder of {path}")
        return self

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    def to_bytes(self) -> bytes:
        """The canonical serialisation that gets signed."""
        data = self.model_dump(exclude_none=True)
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(part) for part in first["loc"]) or "manifest"
            message = first["msg"].removeprefix("Value error, ")
            raise BundleRejectedError(
                f"{where}: manifest {key}: {message}; rebuild the bundle"
            ) from None


def parse_version(text: str) -> Version:
    try:
        return Version(text)
    except InvalidVersion:
        raise ValueError(f"{text!r} is not a version (expected e.g. 1.4.0)") from None


def is_newer(candidate: str, installed: str) -> bool:
    return parse_version(candidate) > parse_version(installed)
