"""The update state machine's persistent record: ``<home>/updates/journal.jsonl``.

Every transition is appended and fsynced before the step it announces is taken, so after a
kill at any point the last record says what was under way and ``resume`` can finish or undo
it. Phases, in the order an install goes through them::

    idle ─▶ writing ─▶ switching ─▶ trial ─▶ committing ─▶ idle (committed)
               │           │          └────▶ rolling_back ─▶ idle (rolled_back)
               └───────────┴─▶ idle (aborted: never switched, the old slot still runs)

After a rollback or an abort the slot that was written is discarded (its record removed), so
it is never offered as a rollback target.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeid.runtime.compat import StrEnum
from edgeid.updater.errors import UpdateError
from edgeid.updater.jsonlog import JsonLog

JOURNAL_FILE = "journal.jsonl"
# Updates are rare; past this many lines the journal keeps only its recent history.
COMPACT_AFTER_RECORDS = 500
KEEP_RECORDS = 100


class Phase(StrEnum):
    IDLE = "idle"
    WRITING = "writing"
    SWITCHING = "switching"
    TRIAL = "trial"
    COMMITTING = "committing"
    ROLLING_BACK = "rolling_back"


class Kind(StrEnum):
    INSTALL = "install"  # a new bundle into the inactive slot
    ROLLBACK = "rollback"  # back to the version the inactive slot still holds


class Outcome(StrEnum):
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


@dataclass(frozen=True)
class UpdateState:
    phase: Phase = Phase.IDLE
    kind: Kind = Kind.INSTALL
    update_id: str | None = None
    from_slot: str | None = None
    to_slot: str | None = None
    from_version: str | None = None
    to_version: str | None = None
    attempts: int = 0  # health checks started in this trial
    restarted: bool = False  # the service was restarted onto to_slot
    outcome: Outcome | None = None  # how the last operation ended (phase idle only)
    reason: str | None = None
    at: str | None = None  # UTC time of the transition

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UpdateState:
        known = {field.name for field in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        try:
            values["phase"] = Phase(values.get("phase", Phase.IDLE))
            values["kind"] = Kind(values.get("kind", Kind.INSTALL))
            if values.get("outcome") is not None:
                values["outcome"] = Outcome(values["outcome"])
            return cls(**values)
        except (ValueError, TypeError) as exc:
            raise UpdateError(
                f"update journal record is not understood ({exc}); was it written by a newer "
                "edgeid? run edgeid update resume from that version"
            ) from None

    @property
    def pending(self) -> bool:
        return self.phase is not Phase.IDLE


class StateJournal:
    def __init__(self, updates_dir: Path) -> None:
        self._log = JsonLog(updates_dir / JOURNAL_FILE)

    def load(self) -> UpdateState:
        last = self._log.last()
        return UpdateState() if last is None else UpdateState.from_dict(last)

    def history(self) -> list[UpdateState]:
        return [UpdateState.from_dict(record) for record in self._log.records()]

    def append(self, state: UpdateState) -> None:
        self._log.append(state.to_dict())
        if state.phase is Phase.IDLE and len(self._log.records()) > COMPACT_AFTER_RECORDS:
            self._log.compact(KEEP_RECORDS)
