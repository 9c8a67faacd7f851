"""What the audit log records: who did what, when, for which case and why.

``AuditEvent`` is what a caller hands to ``AuditLog.append``; ``check_event`` normalises it
(trims text, coerces the action) or refuses it with ``AuditInputError`` before anything is
written. A search must carry a case number, a reason and the probe image's sha256 (never the
image). ``AuditRecord`` is an event as stored: its sequence number, the log's clock reading and
the chain hash of its frame.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from edgeid.runtime.audit.errors import AuditError, AuditInputError
from edgeid.runtime.audit.justification import (
    MAX_CASE_CHARS,
    MAX_REASON_CHARS,
    JustificationError,
    check_case,
    check_reason,
)
from edgeid.runtime.compat import UTC, StrEnum


class AuditAction(StrEnum):
    """Every kind of action the appliance accounts for."""

    # Sign-in and accounts
    LOGIN = "login"
    LOGIN_FAILED = "login_failed"
    LOGOUT = "logout"
    PASSWORD_CHANGED = "password_changed"
    USER_CREATED = "user_created"
    USER_DISABLED = "user_disabled"
    USER_ENABLED = "user_enabled"
    ROLE_CHANGED = "role_changed"
    GALLERY_ACCESS_CHANGED = "gallery_access_changed"  # galleries granted to or taken from a user
    TOKEN_CREATED = "token_created"
    TOKEN_REVOKED = "token_revoked"
    LOCK_CLEARED = "lock_cleared"  # an admin cleared the sign-in delays of an account
    ACCESS_DENIED = "access_denied"  # a refused attempt: role, scope, gallery, another's data
    # What reveals personal or biometric data
    WORK_CONTEXT_SET = "work_context_set"  # "working on case X because Y", stated once a session
    SEARCH = "search"
    VERIFY = "verify"
    DECISION = "decision"
    DUPLICATE_FOUND = "duplicate_found"  # enrolment refused: the subjects it matches are shown
    SUBJECTS_LISTED = "subjects_listed"  # a gallery's subject list shown
    SUBJECT_VIEWED = "subject_viewed"  # a subject's record: name, notes, legal basis, photos
    FACE_VIEWED = "face_viewed"  # an enrolled photo fetched on its own (not on a recorded page)
    CASE_VIEWED = "case_viewed"  # a case's clusters, leads, files or faces
    CASE_REPORT = "case_report"  # a case's report made or downloaded
    GALLERY_EXPORTED = "gallery_exported"  # an encrypted backup of a whole gallery
    AUDIT_VIEWED = "audit_viewed"
    AUDIT_EXPORTED = "audit_exported"
    # What changes it
    ENROLL = "enroll"
    FACE_ADDED = "face_added"  # another photo for an enrolled subject
    SUBJECT_EDITED = "subject_edited"  # name, notes, legal basis or retention changed
    DELETE_SUBJECT = "delete_subject"
    GALLERY_CREATED = "gallery_created"
    GALLERY_DELETED = "gallery_deleted"  # a whole gallery erased, with its counts
    GALLERY_IMPORTED = "gallery_imported"
    GALLERY_RE_EMBEDDED = "gallery_re_embedded"
    KEYS_ROTATED = "keys_rotated"
    CASE_INGESTED = "case_ingested"  # a case ingest started (its cluster searches follow)
    CASE_PURGED = "case_purged"
    STORE_REPAIRED = "store_repaired"  # a damaged gallery or case rewritten from what survived
    MODEL_CHANGED = "model_changed"  # another embedding model put in use (galleries re-embedded)
    # Two-person rule
    CHANGE_PROPOSED = "change_proposed"
    CHANGE_APPROVED = "change_approved"
    CHANGE_REJECTED = "change_rejected"
    # Written by the appliance itself
    OPERATION_FAILED = "operation_failed"  # a recorded change that then failed
    LOG_RECOVERED = "log_recovered"  # written by the log itself after a crash
    # Kept so that logs written by earlier versions still read; never written any more.
    EXPORT = "export"
    USER_DELETED = "user_deleted"
    SETTINGS_CHANGED = "settings_changed"


LEGACY_ACTIONS = frozenset(
    {AuditAction.EXPORT, AuditAction.USER_DELETED, AuditAction.SETTINGS_CHANGED}
)

# A search without these cannot be accounted for (the regulator's finding): everything that
# shows a person's name, face or case evidence names its case and gives its reason; so does
# every erasure and every export of a whole gallery.
CASE_REQUIRED = frozenset(
    {
        AuditAction.SEARCH,
        AuditAction.VERIFY,
        AuditAction.DECISION,
        AuditAction.WORK_CONTEXT_SET,
        AuditAction.SUBJECTS_LISTED,
        AuditAction.SUBJECT_VIEWED,
        AuditAction.FACE_VIEWED,
        AuditAction.CASE_VIEWED,
        AuditAction.CASE_INGESTED,
        AuditAction.CASE_REPORT,
        AuditAction.GALLERY_EXPORTED,
        AuditAction.SUBJECT_EDITED,  # the name is personal data: shown, then changed
    }
)
REASON_REQUIRED = CASE_REQUIRED - {AuditAction.DECISION, AuditAction.CASE_REPORT} | {
    AuditAction.DELETE_SUBJECT,
    AuditAction.GALLERY_DELETED,
    AuditAction.GALLERY_IMPORTED,
    AuditAction.CASE_PURGED,
    AuditAction.CHANGE_PROPOSED,
    AuditAction.STORE_REPAIRED,
    AuditAction.MODEL_CHANGED,
}
PROBE_REQUIRED = frozenset({AuditAction.SEARCH, AuditAction.VERIFY})

SYSTEM_USER = "system"  # the user and role of records the appliance writes itself

# Bounds: generous for real use, small enough that one record stays one small frame.
MAX_USER_CHARS = 128
MAX_SHORT_CHARS = 200  # gallery, decision, band
MAX_DETAIL_CHARS = 4000
MAX_CANDIDATES = 1000

_ROLE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MULTILINE_OK = frozenset("\n\t")


@dataclass(frozen=True)
class Candidate:
    """One candidate a search returned: random ids only, never a name."""

    subject_id: str
    face_id: str
    score: float
    band: str
    rank: int


@dataclass(frozen=True)
class AuditEvent:
    """What happened. ``user`` and ``role`` say who; the log adds when."""

    user: str
    role: str
    action: AuditAction
    case: str | None = None
    reason: str | None = None
    gallery: str | None = None
    probe_sha256: str | None = None
    candidates: Sequence[Candidate] = field(default_factory=tuple)
    decision: str | None = None
    subject_id: str | None = None
    detail: str | None = None
    age_band: str | None = None  # the probe's stated age band, which chose the threshold


@dataclass(frozen=True)
class AuditRecord:
    """An event as the log holds it."""

    seq: int
    time: datetime
    event: AuditEvent
    chain_hash: str  # hex sha256 of the record's sealed frame, which holds the previous hash

    def to_json(self) -> dict[str, object]:
        return {"seq": self.seq, "time": self.time.isoformat(), **event_to_json(self.event)}


# -- checking ------------------------------------------------------------------------------


def _text(
    value: object, name: str, limit: int, *, required: bool = False, multiline: bool = False
) -> str | None:
    if value is None:
        if required:
            raise AuditInputError(f"{name} is missing; give a {name}")
        return None
    if not isinstance(value, str):
        raise AuditInputError(f"{name} must be text, got {type(value).__name__}")
    text = value.strip()
    if not text:
        if required:
            raise AuditInputError(f"{name} is blank; give a {name}")
        return None
    if len(text) > limit:
        raise AuditInputError(f"{name} is {len(text)} characters; at most {limit} are kept")
    allowed = _MULTILINE_OK if multiline else frozenset()
    if any(unicodedata.category(ch) == "Cc" and ch not in allowed for ch in text):
        raise AuditInputError(f"{name} contains control characters; remove them")
    return text


def _pattern(value: object, name: str, pattern: re.Pattern[str], what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise AuditInputError(f"{name} must be {what}")
    return value


def _candidate(item: object, index: int) -> Candidate:
    if not isinstance(item, Candidate):
        raise AuditInputError(f"candidate {index} is not a Candidate")
    where = f"candidate {index}"
    _pattern(item.subject_id, f"{where} subject_id", _ID, "an id of 1-64 letters, digits, - or _")
    _pattern(item.face_id, f"{where} face_id", _ID, "an id of 1-64 letters, digits, - or _")
    score = item.score
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise AuditInputError(f"{where} score must be a finite number")
    band = _text(item.band, f"{where} band", MAX_SHORT_CHARS, required=True)
    if isinstance(item.rank, bool) or not isinstance(item.rank, int) or item.rank < 1:
        raise AuditInputError(f"{where} rank must be a whole number of 1 or more")
    return replace(item, score=float(score), band=band or "")


def check_event(event: AuditEvent) -> AuditEvent:
    """The event with its text trimmed, or ``AuditInputError`` naming the first problem."""
    if not isinstance(event, AuditEvent):
        raise AuditInputError("append takes an AuditEvent")
    try:
        action = AuditAction(event.action)
    except ValueError:
        raise AuditInputError(
            f"unknown audit action; use one of: {', '.join(a.value for a in AuditAction)}"
        ) from None
    user = _text(event.user, "user", MAX_USER_CHARS, required=True)
    role = _pattern(event.role, "role", _ROLE, "a lower-case role name such as investigator")
    if role is None:
        raise AuditInputError("role is missing; give the user's role")
    case = _text(event.case, "case number", MAX_CASE_CHARS, required=action in CASE_REQUIRED)
    reason = _text(
        event.reason, "reason", MAX_REASON_CHARS, required=action in REASON_REQUIRED, multiline=True
    )
    try:  # the same rules as every door's ``Justification``
        if case is not None:
            case = check_case(case)
        if reason is not None and action in REASON_REQUIRED:
            reason = check_reason(reason)
    except JustificationError as exc:
        raise AuditInputError(str(exc)) from None
    probe = _pattern(event.probe_sha256, "probe_sha256", _SHA256, "64 lower-case hex digits")
    if probe is None and action in PROBE_REQUIRED:
        raise AuditInputError("a search must carry the probe image's sha256 (never the image)")
    if isinstance(event.candidates, str | bytes) or not isinstance(event.candidates, Sequence):
        raise AuditInputError("candidates must be a list of Candidate")
    if len(event.candidates) > MAX_CANDIDATES:
        raise AuditInputError(f"{len(event.candidates)} candidates; at most {MAX_CANDIDATES}")
    return AuditEvent(
        user=user or "",
        role=role,
        action=action,
        case=case,
        reason=reason,
        gallery=_text(event.gallery, "gallery", MAX_SHORT_CHARS),
        probe_sha256=probe,
        candidates=tuple(_candidate(c, i) for i, c in enumerate(event.candidates, 1)),
        decision=_text(event.decision, "decision", MAX_SHORT_CHARS),
        subject_id=_pattern(event.subject_id, "subject_id", _ID, "an id of 1-64 characters"),
        detail=_text(event.detail, "detail", MAX_DETAIL_CHARS, multiline=True),
        age_band=_text(event.age_band, "age band", MAX_SHORT_CHARS),
    )


# -- the stored form -----------------------------------------------------------------------


def event_to_json(event: AuditEvent) -> dict[str, object]:
    return {
        "user": event.user,
        "role": event.role,
        "action": str(event.action),
        "case": event.case,
        "reason": event.reason,
        "gallery": event.gallery,
        "probe_sha256": event.probe_sha256,
        "candidates": [
            {
                "subject_id": c.subject_id,
                "face_id": c.face_id,
                "score": c.score,
                "band": c.band,
                "rank": c.rank,
            }
            for c in event.candidates
        ],
        "decision": event.decision,
        "subject_id": event.subject_id,
        "detail": event.detail,
        **({"age_band": event.age_band} if event.age_band is not None else {}),
    }


def _opt_str(data: Mapping[str, object], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{key} is not text")
    return value


def event_from_json(data: Mapping[str, object]) -> AuditEvent:
    """Rebuild an event from an authenticated record; a mismatch is a bug, not bad input."""
    try:
        raw = data.get("candidates", [])
        if not isinstance(raw, list):
            raise TypeError("candidates is not a list")
        candidates = tuple(
            Candidate(
                str(c["subject_id"]),
                str(c["face_id"]),
                float(c["score"]),
                str(c["band"]),
                int(c["rank"]),
            )
            for c in raw
        )
        return AuditEvent(
            user=str(data["user"]),
            role=str(data["role"]),
            action=AuditAction(str(data["action"])),
            case=_opt_str(data, "case"),
            reason=_opt_str(data, "reason"),
            gallery=_opt_str(data, "gallery"),
            probe_sha256=_opt_str(data, "probe_sha256"),
            candidates=candidates,
            decision=_opt_str(data, "decision"),
            subject_id=_opt_str(data, "subject_id"),
            detail=_opt_str(data, "detail"),
            age_band=_opt_str(data, "age_band"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise AuditError(
            f"an audit record has an unexpected layout ({exc}); update edgeid"
        ) from None


def as_utc(moment: datetime) -> datetime:
    """Aware UTC; a naive time is taken to be UTC already (the log's clock is UTC)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
