"""The web Cases page's choice of the lab's cluster (README "Large cases on several boxes"):
offered only when edgeid.toml names a cluster; chosen, the upload's images go to the farm the
CLI's ``--cluster`` opens (``edgeid.runtime.cluster.opening``), the audit record says so, and
the progress page lists the farm's nodes. The farm here analyses in this process with the
node's own code (``FaceNode.analyse``) over the box's loaded pipeline: a real Ray cluster
is what tests/test_cluster_ingest.py proves, and it cannot start in a web test's time."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_web_cases import (
    CASE,
    JOB,
    REASON,
    investigator,
    job_of,
    plan,
    sign_in_as,
    upload,
    uploads,
)
from web_support import OFFICE, PEOPLE, Box, build_box, lfw_image, tls_settings

from edgeid.runtime.accounts.roles import Role
from edgeid.runtime.audit import AuditAction
from edgeid.runtime.cases.farmed import ImageFarm, ImageResult, Job
from edgeid.runtime.cluster.node import FaceNode
from edgeid.runtime.config.settings import ClusterSettings
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.web.app import create_app

CHOICE = re.compile(r'<input type="checkbox" id="cluster" name="cluster"')


class InProcessFarm:
    """An ``ImageFarm`` of one node in this process: each image analysed when submitted."""

    def __init__(self, node: FaceNode) -> None:
        self.node = node
        self.files = 0
        self.opened = 0
        self.closed = 0

    def submit(self, job: Job) -> list[ImageResult]:
        self.files += 1
        return self.node.analyse([job])

    def forget(self) -> None:
        pass

    def drain(self) -> list[ImageResult]:
        return []

    def nodes(self) -> list[dict[str, object]]:
        return [
            {
                "node": "0123456789ab",
                "address": "10.20.0.7",
                "backend": "tensorrt",
                "alive": True,
                "head": False,
                "pid": 4242,
                "in_flight": 0,
                "files": self.files,
                "frames": 0,
                "files_per_s": 1.5,
                "batches_lost": 1,
            }
        ]

    @contextlib.contextmanager
    def open(self) -> Iterator[ImageFarm]:
        self.opened += 1
        try:
            yield self
        finally:
            self.closed += 1


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory, lfw_dir: Path, models_dir: Path) -> Iterator[Box]:
    home = tmp_path_factory.mktemp("box")
    built = build_box(home, lfw_dir, models_dir, tls_settings(home))
    yield built
    built.close()


def test_the_choice_is_offered_only_when_a_cluster_is_configured(box: Box) -> None:
    user = box.users[Role.INVESTIGATOR]
    browser, csrf = investigator(box, user, (OFFICE,))
    assert box.app.state.web.cases.farm is None  # no [cluster] address
    page = browser.get("/cases")
    assert page.status_code == 200 and 'name="reason"' in page.text
    assert not CHOICE.search(page.text) and "lab's cluster" not in page.text
    # Posted anyway (a forged or stale form): refused, nothing planned.
    refused = browser.post(
        "/cases", data={"case": CASE, "reason": REASON, "csrf_token": csrf, "cluster": "on"}
    )
    assert refused.status_code == 400 and "no cluster set up" in refused.text

    # The same box with [cluster] address set: the app holds a farm opener (nothing connects
    # until an ingest runs) and the page offers the choice, unticked.
    settings = box.settings.model_copy(
        update={"cluster": ClusterSettings(address="127.0.0.1:6379")}
    )
    app = create_app(
        box.home,
        settings,
        galleries=box.service,
        audit=box.audit,
        version="test",
        cases=box.cases,
        clock=box.clock,
    )
    assert app.state.web.cases.farm is not None
    other, _ = sign_in_as(dataclasses.replace(box, app=app), user)
    offered = other.get("/cases")
    assert offered.status_code == 200
    assert CHOICE.search(offered.text) and "Analyse on the lab's cluster" in offered.text
    assert not re.search(r'name="cluster"[^>]* checked', offered.text)  # this box by default


def test_a_cluster_ingest_from_the_page_reaches_the_farm_and_the_audit(
    box: Box, lfw_dir: Path
) -> None:
    farm = InProcessFarm(FaceNode.__new__(FaceNode))
    farm.node.pipeline = box.service.pipeline  # the node's code over the box's loaded models
    farm.node.limits = box.service.activity.limits
    box.app.state.web.cases.farm = farm.open  # as create_app sets it for [cluster] address
    try:
        user = box.users[Role.INVESTIGATOR]
        browser, csrf = investigator(box, user, (OFFICE,))
        page = browser.get("/cases")
        assert CHOICE.search(page.text)

        entry = plan(browser, csrf, case="CLU-1", cluster="on")
        planned = browser.get(f"/cases/new/{entry}").text
        assert "<dt>Images analysed</dt><dd>on the lab&#39;s cluster</dd>" in planned

        first, _, probe = PEOPLE[0]
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.write(lfw_image(lfw_dir, first, probe), "a.jpg")
            archive.write(lfw_image(lfw_dir, first, 5), "b.jpg")
        reply = upload(browser, csrf, entry, buffer.getvalue())
        assert reply.status_code == 303, reply.text
        match = JOB.search(reply.headers["location"])
        assert match
        job = job_of(box, user, match.group(1))
        assert job.job.wait(timeout=300), "the ingest did not end"
        assert job.state == "complete", job.job.error
        assert farm.files == 2, "both images go to the farm"
        assert (farm.opened, farm.closed) == (1, 1), "the farm is left when the ingest ends"
        assert job.job.progress().faces_new >= 2  # the node's faces were written into the case
        assert uploads(box) == []

        progress = browser.get(f"/cases/jobs/{match.group(1)}")
        assert progress.status_code == 200
        text = progress.text
        assert "<h2>Boxes of the lab's cluster</h2>" in text
        row = re.search(r"<tr><td>0123456789ab</td>.*?</tr>", text)
        assert row, "one row per node"
        cells = re.findall(r"<td>(.*?)</td>", row.group(0))
        assert cells == [
            "0123456789ab",
            "10.20.0.7",
            "GPU (TensorRT)",
            "2",
            "0",
            "1.50",
            "1",
            "working",
        ]

        ingested = box.audit.query(case="CLU-1", action=AuditAction.CASE_INGESTED, limit=5)
        assert len(ingested) == 1
        assert "images analysed on the lab's cluster" in (ingested[0].event.detail or "")

        # Without the choice, the same page ingests on this box: no farm, no node table.
        local = plan(browser, csrf, case="CLU-2")
        assert "<dd>on this box</dd>" in browser.get(f"/cases/new/{local}").text
        reply = upload(browser, csrf, local, buffer.getvalue())
        match = JOB.search(reply.headers["location"])
        assert match
        job = job_of(box, user, match.group(1))
        assert job.job.wait(timeout=300) and job.state == "complete", job.job.error
        assert farm.opened == 1, "an ingest on this box opens no farm"
        assert "Boxes of the lab's cluster" not in browser.get(f"/cases/jobs/{match.group(1)}").text
        local_audit = box.audit.query(case="CLU-2", action=AuditAction.CASE_INGESTED, limit=5)
        assert "images analysed on this box" in (local_audit[0].event.detail or "")
    finally:
        box.app.state.web.cases.farm = None


def test_a_cluster_that_cannot_be_joined_fails_the_job_in_words_and_shreds_the_archive(
    box: Box, lfw_dir: Path
) -> None:
    @contextlib.contextmanager
    def unreachable() -> Iterator[ImageFarm]:
        raise BadInputError(
            "Ray is not installed: pip install 'edgeid[cluster]', or ingest without --cluster"
        )
        yield  # pragma: no cover

    box.app.state.web.cases.farm = unreachable
    try:
        user = box.users[Role.INVESTIGATOR]
        browser, csrf = investigator(box, user, (OFFICE,))
        entry = plan(browser, csrf, case="CLU-3", cluster="on")
        first, _, probe = PEOPLE[0]
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.write(lfw_image(lfw_dir, first, probe), "a.jpg")
        reply = upload(browser, csrf, entry, buffer.getvalue())
        match = JOB.search(reply.headers["location"])
        assert match
        job = job_of(box, user, match.group(1))
        assert job.job.wait(timeout=60) and job.state == "failed"
        page = browser.get(f"/cases/jobs/{match.group(1)}").text
        assert "The ingest failed:" in page and "Ray is not installed" in page
        assert uploads(box) == []
    finally:
        box.app.state.web.cases.farm = None
