"""Proposals under the two-person rule, kept sealed in ``<home>/approvals/proposals.sealed``.

The file is one AES-256-GCM envelope under a data key of the device keyring's own scope
``approvals``, bound by its associated data to that key, so it opens on this box only and an
edited byte makes it unreadable. It holds the pending proposals and, for a while, the decided
ones; the audit log keeps the history for good. Every change replaces the file atomically.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from edgeid.runtime.compat import StrEnum
from edgeid.runtime.errors import BadInputError, EdgeidError
from edgeid.runtime.services.consent import ChangeKind
from edgeid.runtime.vault.crypto import (
    Clock,
    RandomSource,
    system_random,
    utc_now,
)
from edgeid.runtime.vault.sealed_json import (
    SealedFileAltered,
    SealedFileMalformed,
    SealedFileUnreadable,
    read_sealed_json,
    write_sealed_json,
)

APPROVALS_DIR = "approvals"
PROPOSALS_FILE = "proposals.sealed"
APPROVALS_KEY_SCOPE = "approvals"  # the device keyring's scope for this file's data key
FILE_FORMAT = "edgeid-proposals"
FILE_VERSION = 1
# Decided and expired proposals stay listed this long (the audit log keeps them for good).
KEEP_DECIDED = timedelta(days=30)
# A bound on the file and on the approvals page: far more than an office ever has waiting.
MAX_PENDING = 200


class ProposalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"  # and carried out
    REJECTED = "rejected"
    EXPIRED = "expired"
    FAILED = "failed"  # approved, but carrying it out failed (an operation_failed record says why)


class ProposalNotFoundError(BadInputError):
    """No proposal with that id (HTTP 404)."""


class ProposalsFileError(EdgeidError):
    """The proposals file does not open or is malformed."""


def describe(
    kind: ChangeKind, target: str, galleries: tuple[str, ...], case_number: str | None
) -> str:
    if kind is ChangeKind.ERASE_GALLERY:
        return f"erase gallery {target}"
    if kind is ChangeKind.GRANT_GALLERIES:
        return f"give {target} access to {', '.join(galleries)}"
    if kind is ChangeKind.CREATE_ADMIN:
        return f"create admin {target}"
    if kind is ChangeKind.PROMOTE_ADMIN:
        return f"make {target} an admin"
    if kind is ChangeKind.USE_MODEL:
        return f"put embedding model {target} in use"
    return f"purge case {case_number or target} before its retention date"


@dataclass(frozen=True)
class Proposal:
    """A change someone asked for, waiting for (or decided by) a second person."""

    proposal_id: str
    kind: ChangeKind
    target: str  # the gallery's name, the user's name or the case's id
    galleries: tuple[str, ...]  # galleries to grant (GRANT_GALLERIES)
    case_number: str | None  # the case's number (PURGE_CASE), to show the approver
    proposer: str  # the actor's user: a user name or os:<login>
    proposer_role: str
    reason: str
    created_at: datetime
    status: ProposalStatus = ProposalStatus.PENDING
    decided_by: str | None = None
    decided_at: datetime | None = None

    def summary(self) -> str:
        """One line for pages, the CLI and audit details."""
        return describe(self.kind, self.target, self.galleries, self.case_number)

    def expires_at(self, ttl: timedelta) -> datetime:
        return self.created_at + ttl

    def to_json(self) -> dict[str, Any]:
        return {
            "proposal_id": self.proposal_id,
            "kind": self.kind.value,
            "target": self.target,
            "galleries": list(self.galleries),
            "case_number": self.case_number,
            "proposer": self.proposer,
            "proposer_role": self.proposer_role,
            "reason": self.reason,
            "created_at": self.created_at.isoformat(),
            "status": self.status.value,
            "decided_by": self.decided_by,
            "decided_at": self.decided_at.isoformat() if self.decided_at else None,
        }

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> Proposal:
        decided = item.get("decided_at")
        return cls(
            proposal_id=str(item["proposal_id"]),
            kind=ChangeKind(item["kind"]),
            target=str(item["target"]),
            galleries=tuple(str(g) for g in item["galleries"]),
            case_number=None if item.get("case_number") is None else str(item["case_number"]),
            proposer=str(item["proposer"]),
            proposer_role=str(item["proposer_role"]),
            reason=str(item["reason"]),
            created_at=datetime.fromisoformat(item["created_at"]),
            status=ProposalStatus(item["status"]),
            decided_by=None if item.get("decided_by") is None else str(item["decided_by"]),
            decided_at=datetime.fromisoformat(decided) if decided else None,
        )

    def decided(self, status: ProposalStatus, by: str, at: datetime) -> Proposal:
        return replace(self, status=status, decided_by=by, decided_at=at)

    def reopened(self) -> Proposal:
        """Pending again: its decision could not be recorded."""
        return replace(self, status=ProposalStatus.PENDING, decided_by=None, decided_at=None)


def new_proposal_id() -> str:
    return secrets.token_hex(8)


class ScopedKeys(Protocol):
    """The part of ``edgeid.runtime.vault.keys.Keyring`` this store uses."""

    def key_ids(self, gallery_id: str) -> list[str]: ...

    def data_key(self, gallery_id: str, key_id: str) -> bytes: ...

    def new_data_key(self, gallery_id: str) -> tuple[str, bytes]: ...


def _aad(key_id: str) -> bytes:
    return f"edgeid/approvals/v{FILE_VERSION}/{key_id}".encode()


class ProposalStore:
    """Every proposal on the box. One process opens the box at a time (the galleries' lock);
    within it, ``change`` runs under a lock, so two approvals of one proposal cannot both
    find it pending."""

    def __init__(
        self,
        home: Path,
        keyring: ScopedKeys,
        *,
        clock: Clock = utc_now,
        random: RandomSource = system_random,
    ) -> None:
        self.path = Path(home) / APPROVALS_DIR / PROPOSALS_FILE
        self._keyring = keyring
        self._clock = clock
        self._random = random
        self._lock = threading.RLock()
        # Made now, at start-up, rather than on the first proposal from a request thread.
        if not keyring.key_ids(APPROVALS_KEY_SCOPE):
            keyring.new_data_key(APPROVALS_KEY_SCOPE)

    def all(self) -> dict[str, Proposal]:
        with self._lock:
            return self._read()

    def get(self, proposal_id: str) -> Proposal:
        found = self.all().get(proposal_id)
        if found is None:
            raise ProposalNotFoundError(
                f"no proposal with id {proposal_id!r}; list them with edgeid approvals list"
            )
        return found

    def change(self, edit: Callable[[dict[str, Proposal]], Proposal]) -> Proposal:
        """Apply ``edit`` to the current proposals and write them back, all under the lock."""
        with self._lock:
            proposals = self._read()
            result = edit(proposals)
            proposals[result.proposal_id] = result
            self._write(proposals)
            return result

    def remove(self, proposal_id: str) -> None:
        """Undo an ``add`` whose audit record could not be written."""
        with self._lock:
            proposals = self._read()
            if proposals.pop(proposal_id, None) is not None:
                self._write(proposals)

    # -- the sealed file ---------------------------------------------------------------------

    def _read(self) -> dict[str, Proposal]:
        try:
            document = read_sealed_json(self.path, **self._sealing())
            if document is None:
                return {}
            items = document["proposals"]
            return {p.proposal_id: p for p in (Proposal.from_json(i) for i in items)}
        except SealedFileUnreadable as exc:
            raise ProposalsFileError(
                f"{self.path} is unreadable ({exc}); restore it from a backup"
            ) from exc
        except SealedFileAltered:
            raise ProposalsFileError(
                f"{self.path} does not open: it was altered or belongs to another box; restore "
                "it from a backup or remove it (pending proposals are then lost)"
            ) from None
        except (SealedFileMalformed, AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ProposalsFileError(
                f"{self.path} is malformed; restore it from a backup or remove it"
            ) from exc

    def _write(self, proposals: dict[str, Proposal]) -> None:
        now = self._clock()
        kept = [
            p
            for p in proposals.values()
            if p.status is ProposalStatus.PENDING or (p.decided_at or now) > now - KEEP_DECIDED
        ]
        kept.sort(key=lambda p: p.created_at)
        write_sealed_json(
            self.path,
            {"proposals": [p.to_json() for p in kept]},
            **self._sealing(),
            action="writing the proposals",
            random=self._random,
        )

    def _sealing(self) -> dict[str, Any]:
        return {
            "keys": self._keyring,
            "scope": APPROVALS_KEY_SCOPE,
            "file_format": FILE_FORMAT,
            "version": FILE_VERSION,
            "aad": _aad,
        }
