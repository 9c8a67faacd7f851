"""What the web UI holds for case ingest: the planned ingests (case, reason and galleries given,
archive not yet sent), the ingest jobs running or finished, and the upload folder.

Plans live in the session's workspace (memory, expire with it). Jobs belong to the user who
started them (their browser and their API tokens see the same job) and hold counts only.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import date

from edgeid.runtime.cases.errors import CaseError
from edgeid.runtime.cases.jobs import FarmOpener, IngestJob
from edgeid.runtime.cases.service import CaseService
from edgeid.runtime.errors import OverloadedError
from edgeid.runtime.web.case_uploads import CaseUploads
from edgeid.runtime.web.workspace import Workspace

# One ingest at a time per box: it keeps the face pipeline busy on every core, so a second
# would halve both and slow the interactive searches beside them.
MAX_RUNNING_INGESTS = 1
# Finished jobs kept for their progress pages; the case itself stays in the case store.
MAX_KEPT_JOBS = 100
PLAN_NBYTES = 2048  # a plan holds a few short texts


@dataclass
class PendingIngest:
    entry_id: str
    owner: str  # the session or token, as the workspace keys it
    username: str
    case: str
    reason: str
    galleries: tuple[str, ...]
    frame_interval_s: float
    retention_until: date | None
    # "Faces may include children" (None: keep the case's setting; a new case: on).
    children: bool | None = None
    # "Analyse on the lab's cluster" (offered only when edgeid.toml names one).
    on_cluster: bool = False

    def nbytes(self) -> int:
        return PLAN_NBYTES


@dataclass
class CaseJob:
    job_id: str
    username: str
    case: str
    galleries: tuple[str, ...]
    job: IngestJob
    case_id: str | None = field(default=None)  # known once the ingest has opened the case

    @property
    def state(self) -> str:
        return self.job.state

    @property
    def running(self) -> bool:
        return self.job.state in ("pending", "running")


class CaseJobs:
    """Ingest jobs by id; at most ``MAX_RUNNING_INGESTS`` running at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, CaseJob] = OrderedDict()

    @staticmethod
    def new_id() -> str:
        return secrets.token_urlsafe(16)

    def busy(self) -> bool:
        with self._lock:
            return self._running() >= MAX_RUNNING_INGESTS

    def check_free(self) -> None:
        if self.busy():
            raise OverloadedError(
                "another case ingest is running on this box; start this one when it has ended"
            )

    def add(self, job: CaseJob) -> None:
        """Register ``job`` (not yet started), or refuse when the box is busy."""
        with self._lock:
            if self._running() >= MAX_RUNNING_INGESTS:
                raise OverloadedError(
                    "another case ingest is running on this box; start this one when it has ended"
                )
            self._jobs[job.job_id] = job
            finished = [k for k, j in self._jobs.items() if not j.running]
            for key in finished[: max(0, len(self._jobs) - MAX_KEPT_JOBS)]:
                del self._jobs[key]

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def get(self, username: str, job_id: str) -> CaseJob | None:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or not secrets.compare_digest(job.username, username):
            return None
        return job

    def of_user(self, username: str) -> list[CaseJob]:
        with self._lock:
            return [j for j in reversed(self._jobs.values()) if j.username == username]

    def stop_all(self, wait_s: float) -> None:
        """Ask every running ingest to stop, and wait for each (at shutdown)."""
        with self._lock:
            jobs = [j for j in self._jobs.values() if j.running]
        for job in jobs:
            job.job.stop()
        for job in jobs:
            job.job.wait(wait_s)

    def _running(self) -> int:
        return sum(1 for j in self._jobs.values() if j.running)


@dataclass
class CaseDesk:
    """The case service and the web UI's state around it (see the module docstring)."""

    service: CaseService
    uploads: CaseUploads
    plans: Workspace[PendingIngest]
    jobs: CaseJobs = field(default_factory=CaseJobs)
    # The lab's cluster, when ``[cluster] address`` is set: the Cases page offers it.
    farm: FarmOpener | None = None

    def case_id_of(self, job: CaseJob) -> str | None:
        """The job's case id once the case exists (a failed first run may leave none)."""
        if job.case_id is None and not job.running:
            outcome = job.job.outcome
            if outcome is not None:
                job.case_id = outcome.case.meta.case_id
            else:
                try:
                    job.case_id = self.service.store.find(job.case).meta.case_id
                except CaseError:
                    return None
        return job.case_id
