"""The service's own scrub: on a schedule, writes held off while it reads, counts to health
telemetry (counts only), damaged objects named by id in the log."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_damage_contained import CANARY, _fill, _flip, _frames, _gallery_dir, _home

from edgeid.runtime.config.settings import load_settings
from edgeid.runtime.gallery.service import GalleryService
from edgeid.runtime.inference.pipeline import FacePipeline
from edgeid.runtime.services.scrub_schedule import ScrubSchedule
from edgeid.runtime.system.integrity import IntegrityStatus, ScrubFigures
from edgeid.runtime.system.metrics import ServiceMetrics
from edgeid.runtime.telemetry.report import HealthCollector
from edgeid.runtime.telemetry.schema import SpoolState, check_payload, encode

POLL_S = 0.05
WAIT_S = 60.0  # bounds a hung thread; the scrub itself takes well under a second here


@pytest.fixture
def box(tmp_path: Path, models_dir: Path) -> Iterator[tuple[Path, GalleryService]]:
    home = _home(tmp_path, models_dir)
    pipeline = FacePipeline.load(models_dir)
    with GalleryService.open(home, load_settings(home), pipeline=pipeline) as service:
        _fill(service.store, "good", 3)
        _fill(service.store, "bad", 3, seed=1)
        yield home, service


def test_a_scrub_counts_what_it_checked_and_names_the_damage_by_id(
    box: tuple[Path, GalleryService], caplog: pytest.LogCaptureFixture
) -> None:
    home, service = box
    status = IntegrityStatus()
    schedule = ScrubSchedule(home, service, status, interval_s=3600, first_after_s=3600)
    schedule.run_once()
    clean = status.last()
    assert clean is not None and clean.objects_checked >= 2 and clean.damaged == 0  # both galleries
    bad = _gallery_dir(service.store, "bad")
    frame = _frames(bad / "records.log")[-1]
    _flip(bad / "records.log", frame.offset + frame.size - 3)  # inside its tag
    with caplog.at_level(logging.INFO):
        schedule.run_once()
    found = status.last()
    assert found is not None and found.damaged >= 1
    assert found.objects_checked == clean.objects_checked
    warned = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert warned and all(bad.name in w for w in warned)  # by id
    assert all(CANARY not in r.getMessage() for r in caplog.records)


def test_the_counts_reach_the_health_report_and_pass_the_wire_schema(
    box: tuple[Path, GalleryService],
) -> None:
    home, service = box
    status = IntegrityStatus()
    collector = HealthCollector(
        home,
        "0.1.0",
        metrics=ServiceMetrics(),
        backend_state=lambda: "cpu",
        model_ids=lambda: [],
        scrub=status,
    )
    spool = SpoolState(pending=0, dropped_total=0)
    assert collector.collect(1, spool, reset_metrics=False).integrity is None  # none run yet
    ScrubSchedule(home, service, status, interval_s=3600, first_after_s=0).run_once()
    report = collector.collect(2, spool, reset_metrics=False)
    assert report.integrity is not None and report.integrity.damaged == 0
    assert report.integrity.objects_checked == status.last().objects_checked  # type: ignore[union-attr]
    sent = check_payload("health", encode(report))
    assert sent.integrity == report.integrity  # type: ignore[union-attr]


def test_the_schedule_runs_by_itself_and_stops(box: tuple[Path, GalleryService]) -> None:
    home, service = box
    status = IntegrityStatus()
    schedule = ScrubSchedule(home, service, status, interval_s=3600, first_after_s=0)
    schedule.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while status.last() is None and time.monotonic() < deadline:
            time.sleep(POLL_S)
    finally:
        schedule.stop()
    assert isinstance(status.last(), ScrubFigures)
    assert schedule._thread is not None and not schedule._thread.is_alive()
