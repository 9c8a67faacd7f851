"""Erasures in progress: a durable, sealed note of every subject erasure until it has reached
every place that holds the subject (its gallery, every case's leads, the web's workspaces).

An erasure is decided (and recorded in the audit log) before it starts; the note makes it
roll forward: a process killed half-way, or a step that failed (a full disk, a damaged case),
leaves the note, and the next open (or the next erasure) finishes the job. The note holds
random ids only (gallery id and name, subject id, the gallery's data key before the erasure),
sealed under its own key in the device keyring; once empty, the file is zero-filled and
unlinked and the key dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edgeid.runtime.gallery.errors import GalleryError
from edgeid.runtime.storage.durable import FileWriter, shred_and_unlink, write_file_atomically
from edgeid.runtime.vault.crypto import NONCE_BYTES, RecordCipher, RecordKind
from edgeid.runtime.vault.errors import DecryptionError, VaultError
from edgeid.runtime.vault.keys import Keyring

JOURNAL_FILE = "erasures.sealed"
KEY_SCOPE = "erasures"  # a named scope: the galleries' recovery leaves it alone
_ID = b"erasures"
_KIND = RecordKind.INDEX
_KEY_ID_BYTES = 16


class ErasureParticipant(Protocol):
    """Something outside the gallery that may hold a subject (a case's leads, a web
    workspace). ``erase_subjects`` removes them for good and is idempotent: a repeat after a
    crash finds nothing left to do. It raises when it cannot, and the erasure stays pending."""

    def erase_subjects(self, gallery: str, subject_ids: frozenset[str]) -> int:
        """Remove these subjects of ``gallery``; return how many places held them."""
        ...


class ErasureJournalError(GalleryError):
    """The journal of erasures in progress cannot be read (damaged, or its key is gone)."""


@dataclass(frozen=True)
class Intent:
    """One subject's erasure, decided and not yet everywhere."""

    gallery_id: str
    gallery: str
    subject_id: str
    key_before: str  # the gallery's data key when the erasure started (compaction changes it)

    def to_json(self) -> dict[str, str]:
        return {
            "gallery_id": self.gallery_id,
            "gallery": self.gallery,
            "subject_id": self.subject_id,
            "key_before": self.key_before,
        }


class ErasureJournal:
    """The note of erasures in progress, ``<galleries>/erasures.sealed``."""

    def __init__(
        self, root: Path, keyring: Callable[[], Keyring], *, writer: FileWriter | None = None
    ) -> None:
        self.path = root / JOURNAL_FILE
        self._keyring_of = keyring  # fetched when needed: a box with no note needs no keyring
        self._writer = writer

    @property
    def _keyring(self) -> Keyring:
        return self._keyring_of()

    def pending(self) -> list[Intent]:
        if not self.path.exists():
            return []
        blob = self.path.read_bytes()
        key_id = blob[:_KEY_ID_BYTES].hex()
        rest = blob[_KEY_ID_BYTES:]
        try:
            key = self._keyring.data_key(KEY_SCOPE, key_id)
            plain = RecordCipher(key, _ID).open(
                _KIND, _ID, 1, rest[:NONCE_BYTES], rest[NONCE_BYTES:]
            )
            rows = json.loads(plain.decode("utf-8"))
            return [Intent(**row) for row in rows]
        except (GalleryError, VaultError, DecryptionError, ValueError, TypeError):
            raise ErasureJournalError(
                f"the note of erasures in progress ({self.path}) cannot be read; restore the "
                "keyring from the box's backup, or remove the file and erase the subjects again"
            ) from None

    def add(self, *intents: Intent) -> None:
        if intents:
            self._save([*[i for i in self.pending() if i not in intents], *intents])

    def done(self, *intents: Intent) -> None:
        self._save([i for i in self.pending() if i not in intents])

    def _save(self, intents: list[Intent]) -> None:
        if not intents:
            shred_and_unlink(self.path)
            self._keyring.retain_only(KEY_SCOPE, [])
            return
        keys = self._keyring.key_ids(KEY_SCOPE)
        if keys:
            key_id = keys[0]
            key = self._keyring.data_key(KEY_SCOPE, key_id)
        else:
            key_id, key = self._keyring.new_data_key(KEY_SCOPE)
        plain = json.dumps([i.to_json() for i in intents]).encode("utf-8")
        sealed = RecordCipher(key, _ID).seal(_KIND, _ID, 1, plain)
        write_file_atomically(
            self.path,
            bytes.fromhex(key_id) + sealed.nonce + sealed.ciphertext,
            writer=self._writer,
            action="noting an erasure",
        )
