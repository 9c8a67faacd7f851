"""Which software and models a box runs, in the forms the telemetry schema accepts."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from edgeid.runtime.errors import ModelError
from edgeid.runtime.inference.embedders import in_use_embedder
from edgeid.runtime.inference.manifest import list_manifests, load_manifest, manifest_path
from edgeid.runtime.telemetry.schema import MODEL_ID_PATTERN, VERSION_PATTERN

logger = logging.getLogger(__name__)

MODEL_HASH_CHARS = 12
UNKNOWN_VERSION = "0.0.0+unknown"
_MODEL_ID = re.compile(MODEL_ID_PATTERN)


def model_ids(models_dir: Path) -> list[str]:
    """``<name>@<sha256 prefix>`` of every model manifest: which build of each model runs."""
    try:
        manifests = list_manifests(models_dir)
    except ModelError as exc:
        logger.warning("model manifests unreadable, reporting none: %s", exc)
        return []
    ids = [f"{m.name}@{m.sha256[:MODEL_HASH_CHARS]}" for m in manifests]
    return [i for i in ids if _MODEL_ID.match(i)][:32]


def embedder_id(models_dir: Path) -> str | None:
    """``<name>@<sha256 prefix>`` of the embedding model in use, None if it cannot be read."""
    try:
        name = in_use_embedder(models_dir)
        manifest = load_manifest(manifest_path(models_dir, name))
    except ModelError as exc:
        logger.info("the embedder in use is unreadable, reporting none: %s", exc)
        return None
    model_id = f"{manifest.name}@{manifest.sha256[:MODEL_HASH_CHARS]}"
    return model_id if _MODEL_ID.match(model_id) else None


def schema_version(version: str) -> str:
    """``version`` if the schema accepts it; otherwise a placeholder, logged, never sent raw."""
    if re.match(VERSION_PATTERN, version) and len(version) <= 64:
        return version
    logger.warning("software version does not match the telemetry pattern; reporting unknown")
    return UNKNOWN_VERSION
