"""What provisioning steps and self-test checks report, and the tables technicians read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgeid.runtime.compat import StrEnum


class StepStatus(StrEnum):
    DONE = "done"  # this run changed something
    ALREADY = "already done"  # everything was right; nothing was written
    SKIPPED = "skipped"  # not applicable on this machine (e.g. TensorRT without a GPU)
    FAILED = "failed"
    NOT_RUN = "not run"  # an earlier step failed


class Outcome(StrEnum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True)
class StepResult:
    name: str
    status: StepStatus
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"step": self.name, "status": self.status.value, "detail": self.detail}


@dataclass(frozen=True)
class CheckResult:
    name: str
    outcome: Outcome
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"check": self.name, "result": self.outcome.value, "detail": self.detail}


def table(rows: Sequence[tuple[str, str, str]], header: tuple[str, str, str]) -> str:
    """Three left-aligned columns; the last one is free text."""
    first = max(len(r[0]) for r in [header, *rows])
    second = max(len(r[1]) for r in [header, *rows])
    lines = [f"{a:<{first}}  {b:<{second}}  {c}".rstrip() for a, b, c in [header, *rows]]
    lines.insert(1, f"{'-' * first}  {'-' * second}  {'-' * len(header[2])}")
    return "\n".join(lines)


def steps_table(steps: Sequence[StepResult]) -> str:
    return table([(s.name, s.status.value, s.detail) for s in steps], ("step", "status", "detail"))


def checks_table(checks: Sequence[CheckResult]) -> str:
    rows = [(c.name, c.outcome.value, c.detail) for c in checks]
    return table(rows, ("check", "result", "detail"))


def passed(checks: Sequence[CheckResult]) -> bool:
    return all(c.outcome is not Outcome.FAIL for c in checks)


def first_clause(exc: Exception) -> str:
    """The reason without its advice, for a table cell (the advice follows in the docs)."""
    return str(exc).split("; ")[0]
