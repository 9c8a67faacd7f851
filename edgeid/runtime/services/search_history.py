"""Searches and their decisions, kept sealed in ``<home>/searches/<id>.sealed``.

A search belongs to the user who ran it (not to a browser session or a token), so it survives
signing out and in; it is listed for its user and for its case, and erased
``searches.history_days`` after it was run (edgeid.toml), whoever is signed in. The audit log
keeps the records of the search and its decisions for good.

Each file is one AES-256-GCM envelope under a data key of the device keyring's scope
``searches``, bound by its associated data to that key and to the search's id, so a file opens
on this box only, under its own name only, and an edited byte makes it unreadable. Nothing in
it is readable without the key: not the case, the reason, the probe's face, the candidates'
ids or the decisions' notes. Candidates' names are never stored; they are read from the
gallery when shown.
"""

from __future__ import annotations

import base64
import logging
import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from edgeid.runtime.errors import BadInputError, EdgeidError
from edgeid.runtime.gallery.records import among
from edgeid.runtime.services.proposals import ScopedKeys
from edgeid.runtime.storage.durable import (
    shred_and_unlink,
)
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

logger = logging.getLogger(__name__)

SEARCHES_DIR = "searches"
SEARCHES_KEY_SCOPE = "searches"  # the device keyring's scope for these files' data key
FILE_FORMAT = "edgeid-search"
FILE_VERSION = 1
SUFFIX = ".sealed"
_ID = re.compile(r"[0-9a-f]{24}")

IDENTIFICATION = "identification"
INVESTIGATION = "investigation"
MODES = (IDENTIFICATION, INVESTIGATION)
CONFIRMED = "lead confirmed"
REJECTED = "rejected"


class SearchHistoryError(EdgeidError):
    """A search file does not open or is malformed."""


class SearchNotFoundError(BadInputError):
    """No search by that id among the caller's (HTTP 404)."""


@dataclass(frozen=True)
class StoredCandidate:
    rank: int
    gallery: str
    subject_id: str
    face_id: str
    score: float
    band: str  # the score band's words ("strong", ..., "below threshold")
    above_threshold: bool
    strength: str  # how often a stranger scores this high, in the calibration's words
    # Which of the subject's photos matched best (1-based, of ``photos``) and its age then.
    photo_number: int = 1
    photos: int = 1
    age_at_capture: int | None = None

    @property
    def matched_photo(self) -> str:
        """'matched photo 2 of 3 (age 9)', or '' where there is nothing to say."""
        if self.photos < 2 and self.age_at_capture is None:
            return ""
        age = f" (age {self.age_at_capture})" if self.age_at_capture is not None else ""
        return f"matched photo {self.photo_number} of {self.photos}{age}"

    def to_json(self) -> dict[str, Any]:
        return {
            "photo_number": self.photo_number,
            "photos": self.photos,
            "age_at_capture": self.age_at_capture,
            "rank": self.rank,
            "gallery": self.gallery,
            "subject_id": self.subject_id,
            "face_id": self.face_id,
            "score": self.score,
            "band": self.band,
            "above_threshold": self.above_threshold,
            "strength": self.strength,
        }

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> StoredCandidate:
        return cls(
            rank=int(item["rank"]),
            gallery=str(item["gallery"]),
            subject_id=str(item["subject_id"]),
            face_id=str(item["face_id"]),
            score=float(item["score"]),
            band=str(item["band"]),
            above_threshold=bool(item["above_threshold"]),
            strength=str(item["strength"]),
            photo_number=int(item.get("photo_number", 1)),
            photos=int(item.get("photos", 1)),
            age_at_capture=(
                int(item["age_at_capture"]) if item.get("age_at_capture") is not None else None
            ),
        )


@dataclass(frozen=True)
class StoredDecision:
    face_id: str
    decision: str  # CONFIRMED or REJECTED
    note: str
    by: str
    at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "face_id": self.face_id,
            "decision": self.decision,
            "note": self.note,
            "by": self.by,
            "at": self.at.isoformat(),
        }

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> StoredDecision:
        return cls(
            face_id=str(item["face_id"]),
            decision=str(item["decision"]),
            note=str(item["note"]),
            by=str(item["by"]),
            at=datetime.fromisoformat(str(item["at"])),
        )


@dataclass(frozen=True)
class StoredSearch:
    """One search of one face, as its investigator saw it, and what they decided."""

    search_id: str
    user: str  # the actor's user: who may open it again
    case: str
    reason: str
    mode: str  # IDENTIFICATION or INVESTIGATION
    age_band: str  # as stated
    band_used: str  # whose thresholds applied
    galleries: tuple[str, ...]
    created_at: datetime
    probe_sha256: str
    face_index: int
    model_id: str
    threshold: float
    searched_faces: int
    threshold_sentence: str
    reliability_note: str
    candidates: tuple[StoredCandidate, ...]  # identification: only those above threshold
    probe_chip: bytes  # the aligned probe face (JPEG), for the comparison view
    workspace_id: str = ""  # the session's search it came from, while that is held
    strength_legend: tuple[str, ...] = ()  # what each score band means for the age band
    # Where it came from when it was not a search: a case lead reviewed ("case <id> cluster
    # <n> lead <face id>"), so the same review is found again.
    origin: str = ""
    decisions: tuple[StoredDecision, ...] = ()
    opened: tuple[str, ...] = ()  # face ids whose subject was opened (name revealed)

    @property
    def no_match(self) -> bool:
        return not any(c.above_threshold for c in self.candidates)

    def candidate(self, face_id: str) -> StoredCandidate | None:
        return next((c for c in self.candidates if c.face_id == face_id), None)

    def decision(self, face_id: str) -> StoredDecision | None:
        """The latest decision on ``face_id``; earlier ones stay in the list and the audit."""
        found = [d for d in self.decisions if d.face_id == face_id]
        return found[-1] if found else None

    def expires_at(self, keep: timedelta) -> datetime:
        return self.created_at + keep

    def to_json(self) -> dict[str, Any]:
        return {
            "search_id": self.search_id,
            "user": self.user,
            "case": self.case,
            "reason": self.reason,
            "mode": self.mode,
            "age_band": self.age_band,
            "band_used": self.band_used,
            "galleries": list(self.galleries),
            "created_at": self.created_at.isoformat(),
            "probe_sha256": self.probe_sha256,
            "face_index": self.face_index,
            "model_id": self.model_id,
            "threshold": self.threshold,
            "searched_faces": self.searched_faces,
            "threshold_sentence": self.threshold_sentence,
            "reliability_note": self.reliability_note,
            "candidates": [c.to_json() for c in self.candidates],
            "probe_chip": base64.b64encode(self.probe_chip).decode(),
            "workspace_id": self.workspace_id,
            "strength_legend": list(self.strength_legend),
            "origin": self.origin,
            "decisions": [d.to_json() for d in self.decisions],
            "opened": list(self.opened),
        }

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> StoredSearch:
        mode = str(item["mode"])
        if mode not in MODES:
            raise ValueError("mode")
        return cls(
            search_id=str(item["search_id"]),
            user=str(item["user"]),
            case=str(item["case"]),
            reason=str(item["reason"]),
            mode=mode,
            age_band=str(item["age_band"]),
            band_used=str(item["band_used"]),
            galleries=tuple(str(g) for g in item["galleries"]),
            created_at=datetime.fromisoformat(str(item["created_at"])),
            probe_sha256=str(item["probe_sha256"]),
            face_index=int(item["face_index"]),
            model_id=str(item["model_id"]),
            threshold=float(item["threshold"]),
            searched_faces=int(item["searched_faces"]),
            threshold_sentence=str(item["threshold_sentence"]),
            reliability_note=str(item["reliability_note"]),
            candidates=tuple(StoredCandidate.from_json(c) for c in item["candidates"]),
            probe_chip=base64.b64decode(str(item["probe_chip"])),
            workspace_id=str(item.get("workspace_id", "")),
            strength_legend=tuple(str(t) for t in item.get("strength_legend", ())),
            origin=str(item.get("origin", "")),
            decisions=tuple(StoredDecision.from_json(d) for d in item["decisions"]),
            opened=tuple(str(f) for f in item["opened"]),
        )


def new_search_id() -> str:
    return secrets.token_hex(12)


def _aad(key_id: str, search_id: str) -> bytes:
    return f"edgeid/searches/v{FILE_VERSION}/{key_id}/{search_id}".encode()


class SearchHistory:
    """Every search kept on the box (see the module docstring). Reads drop what has expired."""

    def __init__(
        self,
        home: Path,
        keyring: ScopedKeys,
        *,
        keep: timedelta,
        clock: Clock = utc_now,
        random: RandomSource = system_random,
    ) -> None:
        self.root = Path(home) / SEARCHES_DIR
        self.keep = keep
        self._keyring = keyring
        self._clock = clock
        self._random = random
        self._lock = threading.RLock()
        # Made now, at start-up, rather than on the first search from a request thread.
        if not keyring.key_ids(SEARCHES_KEY_SCOPE):
            keyring.new_data_key(SEARCHES_KEY_SCOPE)

    def now(self) -> datetime:
        return self._clock()

    def put(self, search: StoredSearch) -> None:
        with self._lock:
            self._write(search)

    def get(self, search_id: str) -> StoredSearch | None:
        """The search, or None when there is none by that id or it has expired (then erased)."""
        if not _ID.fullmatch(search_id):
            return None
        with self._lock:
            found = self._read(self._path(search_id))
            if found is not None and self._expired(found):
                self._erase(found.search_id)
                return None
            return found

    def all(self) -> list[StoredSearch]:
        """Every unexpired search, newest first (the expired ones are erased on the way)."""
        with self._lock:
            kept = list(self._live())
        return sorted(kept, key=lambda s: s.created_at, reverse=True)

    def of_user(self, user: str) -> list[StoredSearch]:
        return [s for s in self.all() if secrets.compare_digest(s.user, user)]

    def of_case(self, case: str) -> list[StoredSearch]:
        return [s for s in self.all() if s.case == case]

    def purge_expired(self) -> int:
        """Erase every search past the retention; how many went."""
        with self._lock:
            before = len(list(self.root.glob(f"*{SUFFIX}"))) if self.root.exists() else 0
            after = len(list(self._live()))
        return before - after

    def erase_subjects(self, gallery: str, subject_ids: frozenset[str]) -> int:
        """An erased subject leaves every search: its candidates and decisions go (an
        ``ErasureParticipant``). Returns how many searches changed."""
        changed = 0
        with self._lock:
            for search in list(self._live()):
                gone = {
                    c.face_id
                    for c in search.candidates
                    if c.gallery == gallery and among(c.subject_id, subject_ids)
                }
                if not gone:
                    continue
                self._write(
                    replace(
                        search,
                        candidates=tuple(c for c in search.candidates if c.face_id not in gone),
                        decisions=tuple(d for d in search.decisions if d.face_id not in gone),
                        opened=tuple(f for f in search.opened if f not in gone),
                    )
                )
                changed += 1
        return changed

    def check(self) -> list[tuple[str, str | None]]:
        """Every search file read and authenticated, nothing erased or written (for scrub):
        (file name, the problem or None)."""
        found: list[tuple[str, str | None]] = []
        if not self.root.exists():
            return found
        with self._lock:
            for path in sorted(self.root.glob(f"*{SUFFIX}")):
                try:
                    self._read(path)
                    found.append((path.name, None))
                except SearchHistoryError as exc:
                    found.append((path.name, str(exc)))
        return found

    def forget_case(self, case_id: str) -> int:
        """A purged case's lead reviews go with it (they hold its faces); how many went.
        Searches that only name its number stay until their retention."""
        gone = 0
        with self._lock:
            for search in list(self._live()):
                if search.origin.startswith(f"case {case_id} "):
                    shred_and_unlink(self._path(search.search_id))
                    gone += 1
        return gone

    # -- the sealed files --------------------------------------------------------------------

    def _path(self, search_id: str) -> Path:
        return self.root / f"{search_id}{SUFFIX}"

    def _expired(self, search: StoredSearch) -> bool:
        return search.expires_at(self.keep) <= self._clock()

    def _live(self) -> Iterator[StoredSearch]:
        if not self.root.exists():
            return
        for path in sorted(self.root.glob(f"*{SUFFIX}")):
            found = self._read(path)
            if found is None:
                continue
            if self._expired(found):
                self._erase(found.search_id)
                continue
            yield found

    def _erase(self, search_id: str) -> None:
        shred_and_unlink(self._path(search_id))
        logger.info("search %s erased: past the history's retention", search_id)

    def _read(self, path: Path) -> StoredSearch | None:
        search_id = path.name.removesuffix(SUFFIX)
        try:
            document = read_sealed_json(path, **self._sealing(search_id))
            if document is None:
                return None
            found = StoredSearch.from_json(document)
        except SealedFileUnreadable as exc:
            raise SearchHistoryError(
                f"{path} is unreadable ({exc}); restore it from a backup"
            ) from exc
        except SealedFileAltered:
            raise SearchHistoryError(
                f"{path} does not open: it was altered, renamed or belongs to another box; "
                "restore it from a backup or remove it"
            ) from None
        except (SealedFileMalformed, AttributeError, KeyError, TypeError, ValueError) as exc:
            raise SearchHistoryError(
                f"{path} is malformed; restore it from a backup or remove it"
            ) from exc
        if found.search_id != search_id:
            raise SearchHistoryError(f"{path} holds another search; remove it")
        return found

    def _write(self, search: StoredSearch) -> None:
        write_sealed_json(
            self._path(search.search_id),
            search.to_json(),
            **self._sealing(search.search_id),
            action="writing a search to the history",
            random=self._random,
        )

    def _sealing(self, search_id: str) -> dict[str, Any]:
        return {
            "keys": self._keyring,
            "scope": SEARCHES_KEY_SCOPE,
            "file_format": FILE_FORMAT,
            "version": FILE_VERSION,
            "aad": lambda key_id: _aad(key_id, search_id),
        }
