"""What an investigator is working on, held in memory only: the current search (its case,
reason, photo and results) and a pending enrolment (its photo, while a face is chosen).

Photos are never written to disk. Every entry belongs to one owner (a browser session or an
API token), expires ``ttl_s`` after its last use, and the whole workspace is bounded in
entries and in bytes: when full, the least recently used entry goes first.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Generic, Protocol, TypeVar

from edgeid.runtime.gallery.records import among
from edgeid.runtime.gallery.service import AgeBand, Probe, SearchResult

# A few photos per person at once; 256 MiB of photos is what a 4 GB box can spare.
MAX_ENTRIES = 64
MAX_PER_OWNER = 4
MAX_TOTAL_BYTES = 256 * 1024 * 1024
DEFAULT_TTL_S = 30 * 60.0
# A decoded probe's chips and templates beside its photo: a few small arrays per face.
PER_FACE_BYTES = 150 * 150 * 3 + 4096


class Owned(Protocol):
    owner: str
    entry_id: str

    def nbytes(self) -> int: ...


@dataclass
class SearchContext:
    entry_id: str
    owner: str
    username: str
    case: str
    reason: str
    age_band: AgeBand
    galleries: tuple[str, ...]
    mode: str = "identification"  # or "investigation": chosen at the start, recorded
    image: bytes | None = None
    probe: Probe | None = None
    results: dict[int, SearchResult] = field(default_factory=dict)
    # face index -> the id of its search in the user's sealed history (services.searches)
    records: dict[int, str] = field(default_factory=dict)

    def nbytes(self) -> int:
        faces = len(self.probe.faces) if self.probe else 0
        return len(self.image or b"") + faces * PER_FACE_BYTES


@dataclass
class PendingEnrolment:
    entry_id: str
    owner: str
    gallery: str
    display_name: str
    legal_basis: str
    notes: str
    retention_until: date | None
    image: bytes
    probe: Probe
    age_at_capture: int | None = None  # the photo's, as given with it
    # Set when the photo is another one for this enrolled subject ("Add a photo"), not a
    # new subject: the face picker then adds the chosen face to it.
    subject_id: str | None = None

    def nbytes(self) -> int:
        return len(self.image) + len(self.probe.faces) * PER_FACE_BYTES


T = TypeVar("T", bound=Owned)


@dataclass
class _Slot(Generic[T]):
    item: T
    last_used: float


class Workspace(Generic[T]):
    def __init__(
        self,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        max_entries: int = MAX_ENTRIES,
        max_per_owner: int = MAX_PER_OWNER,
        max_bytes: int = MAX_TOTAL_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self._max_entries = max_entries
        self._max_per_owner = max_per_owner
        self._max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._slots: OrderedDict[str, _Slot[T]] = OrderedDict()

    @staticmethod
    def new_id() -> str:
        return secrets.token_urlsafe(16)

    def put(self, item: T) -> None:
        """Add or replace ``item``, evicting the owner's oldest and then anyone's oldest."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            self._slots.pop(item.entry_id, None)
            mine = [k for k, s in self._slots.items() if s.item.owner == item.owner]
            for key in mine[: max(0, len(mine) - self._max_per_owner + 1)]:
                del self._slots[key]
            self._slots[item.entry_id] = _Slot(item, now)
            while len(self._slots) > 1 and (
                len(self._slots) > self._max_entries or self._total() > self._max_bytes
            ):
                self._slots.popitem(last=False)

    def exists(self, entry_id: str) -> bool:
        """Whether an unexpired entry has this id, whoever owns it (to record a refusal)."""
        with self._lock:
            self._expire(self._clock())
            return entry_id in self._slots

    def get(self, owner: str, entry_id: str) -> T | None:
        """The owner's entry, its expiry restarted; None when absent, expired or not theirs."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            slot = self._slots.get(entry_id)
            if slot is None or not secrets.compare_digest(slot.item.owner, owner):
                return None
            slot.last_used = now
            self._slots.move_to_end(entry_id)
            return slot.item

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self._max_bytes

    def remove(self, entry_id: str) -> None:
        with self._lock:
            self._slots.pop(entry_id, None)

    def drop_owner(self, owner: str) -> None:
        with self._lock:
            for key in [k for k, s in self._slots.items() if s.item.owner == owner]:
                del self._slots[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)

    def items(self) -> list[T]:
        """Every entry held now, whoever owns it (for an erasure)."""
        with self._lock:
            return [s.item for s in self._slots.values()]

    def _total(self) -> int:
        return sum(s.item.nbytes() for s in self._slots.values())

    def _expire(self, now: float) -> None:
        for key in [k for k, s in self._slots.items() if now - s.last_used > self.ttl_s]:
            del self._slots[key]


class HeldSearches:
    """The search results held for investigators, as an erasure participant
    (``edgeid.runtime.services.erasures``): an erased subject leaves every held result at once."""

    def __init__(self, searches: Workspace[SearchContext]) -> None:
        self.searches = searches

    def erase_subjects(self, gallery: str, subject_ids: frozenset[str]) -> int:
        changed = 0
        for context in self.searches.items():
            for face_index, result in list(context.results.items()):
                gone = {
                    c.face_id
                    for c in result.candidates
                    if c.gallery == gallery and among(c.subject_id, subject_ids)
                }
                if not gone:
                    continue
                kept = tuple(
                    c
                    for c in result.candidates
                    if not (c.gallery == gallery and among(c.subject_id, subject_ids))
                )
                context.results[face_index] = replace(result, candidates=kept)
                changed += 1
        return changed
