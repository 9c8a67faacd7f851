"""Model manifests: what a model file is, where it came from, and the checksum it must match.

The runtime never loads a model file it has not hashed against its manifest: the verified bytes
are the bytes handed to the inference engine, so nothing can swap the file in between.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeid.runtime.errors import ModelError, ModelIntegrityError, first_line

MANIFEST_SUFFIX = ".manifest.json"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_]{1,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    name: str
    dtype: str
    shape: list[int | str]
    meaning: str = ""


class ModelSource(_Strict):
    """The published package and file the model was converted from."""

    package: str
    version: str
    file: str
    sha256: str = Field(pattern=SHA256_PATTERN)
    licence: str


class ModelManifest(_Strict):
    schema_version: Literal[1] = 1
    name: str = Field(pattern=MODEL_NAME_PATTERN)
    task: Literal["face-detection", "face-landmarks", "face-embedding"]
    format: Literal["onnx", "edgeid-ertree"]
    file: str
    sha256: str = Field(pattern=SHA256_PATTERN)
    size_bytes: int = Field(ge=1)
    source: ModelSource
    converter: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocessing: dict[str, Any]
    parameters: dict[str, Any] = Field(default_factory=dict)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_path(models_dir: Path, name: str) -> Path:
    return models_dir / f"{name}{MANIFEST_SUFFIX}"


def load_manifest(path: Path) -> ModelManifest:
    try:
        return ModelManifest.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError as exc:
        raise ModelError(f"model manifest {path} is missing; run `edgeid models build`") from exc
    except (OSError, ValueError, ValidationError) as exc:
        # pydantic's ValidationError is a ValueError; both mean the manifest is unusable.
        raise ModelError(
            f"model manifest {path} is unreadable ({first_line(exc)}); rebuild with "
            "`edgeid models build --force`"
        ) from exc


def read_verified_model(models_dir: Path, name: str) -> tuple[ModelManifest, bytes]:
    """The manifest and the model bytes, after checking the bytes against the manifest."""
    manifest = load_manifest(manifest_path(models_dir, name))
    model_file = models_dir / manifest.file
    try:
        data = model_file.read_bytes()
    except OSError as exc:
        raise ModelError(
            f"model file {model_file} cannot be read ({exc.strerror}); run `edgeid models build`"
        ) from exc
    actual = sha256_bytes(data)
    if actual != manifest.sha256:
        raise ModelIntegrityError(
            f"model file {model_file} does not match its manifest (sha256 {actual[:12]}…, "
            f"expected {manifest.sha256[:12]}…); rebuild with `edgeid models build --force`"
        )
    return manifest, data


def list_manifests(models_dir: Path) -> list[ModelManifest]:
    return [load_manifest(p) for p in sorted(models_dir.glob(f"*{MANIFEST_SUFFIX}"))]
