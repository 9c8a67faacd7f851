"""The accounts folder: ``<home>/accounts`` (0700) holding small sealed JSON files (0600).

Both the service and the ``edgeid users`` command change these files, so every change is a
read-modify-write under an exclusive ``flock`` on ``.lock``, and every write is atomic. What
the files hold is sealed (see ``sealing.py``); a file left in clear by the previous version
is sealed the first time it is opened, and its plaintext bytes are overwritten.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from edgeid.runtime.accounts.sealing import (
    AccountsFileError,
    AccountsKey,
    is_legacy,
    legacy_items,
    open_entry,
    open_file,
    parse,
    seal_file,
)
from edgeid.runtime.storage.durable import (
    PRIVATE_FILE_MODE,
    fsync_directory,
    make_private_dir,
    shred_and_unlink,
    write_file_atomically,
)
from edgeid.runtime.vault.crypto import RandomSource, system_random

__all__ = ["AccountsFileError", "FileStamp", "SealedFile", "accounts_dir", "locked"]

ACCOUNTS_DIR = "accounts"
LOCK_FILE = ".lock"
LEGACY_SUFFIX = ".plaintext"  # a second name for a plaintext file until its bytes are zeroed


def accounts_dir(home: Path) -> Path:
    return home / ACCOUNTS_DIR


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold the accounts folder's write lock (other processes wait, briefly)."""
    make_private_dir(directory)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class FileStamp:
    """Tells whether a file changed since it was last read (another process wrote it)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._seen: tuple[int, int, int] | None = None

    def current(self) -> tuple[int, int, int] | None:
        try:
            st = self._path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def changed(self) -> bool:
        return self.current() != self._seen

    def mark(self) -> None:
        self._seen = self.current()

    def forget(self) -> None:
        self._seen = None


class SealedFile:
    """One accounts file: entries found by name, each opened only when first asked for.

    ``kind`` names the file inside its seal (``users``, ``tokens``); ``name_field`` is the
    entry field that names it (``username``, ``token_id``). Safe to share between threads;
    ``write`` must be called under ``locked``.
    """

    def __init__(
        self,
        path: Path,
        kind: str,
        name_field: str,
        key: AccountsKey,
        *,
        random: RandomSource = system_random,
    ) -> None:
        self.path = path
        self._kind = kind
        self._name_field = name_field
        self._key = key
        self._random = random
        self._mutex = threading.Lock()
        self._stamp = FileStamp(path)
        self._sealed: dict[str, bytes] = {}  # lookup hash -> sealed entry, as read
        self._opened: dict[str, dict[str, Any]] = {}  # lookup hash -> entry, once opened
        self._legacy = False
        self._migrate()

    # -- reading -------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Re-read the file if another process (or ``forget``) changed it. Holds the mutex."""
        if not self._stamp.changed():
            return
        stamp = self._stamp.current()
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = None
        except OSError as exc:
            raise AccountsFileError(
                f"{self.path} is unreadable ({exc.strerror}); check its owner and mode"
            ) from None
        self._sealed, self._opened, self._legacy = {}, {}, False
        if data is not None:
            document = parse(data, self.path)
            if is_legacy(document):
                # Read in clear until the next write (or the next open) seals it.
                self._legacy = True
                for item in legacy_items(document, self._kind, self.path):
                    name = self._name_of(item)
                    self._opened[self._key.lookup(self._kind, name)] = item
            else:
                self._sealed = open_file(self._key, self._kind, document, self.path)
        if stamp == self._stamp.current():
            self._stamp.mark()
        else:
            self._stamp.forget()  # written while we read: read again next time

    def _name_of(self, item: Mapping[str, Any]) -> str:
        name = item.get(self._name_field)
        if not isinstance(name, str):
            raise AccountsFileError(
                f"{self.path} holds an entry without a {self._name_field}; restore it from a backup"
            )
        return name

    def _open(self, lookup: str) -> dict[str, Any]:
        item = self._opened.get(lookup)
        if item is None:
            item = open_entry(self._key, self._kind, lookup, self._sealed[lookup], self.path)
            if self._key.lookup(self._kind, self._name_of(item)) != lookup:
                raise AccountsFileError(
                    f"{self.path} holds an entry filed under another name; restore it from a backup"
                )
            self._opened[lookup] = item
        return item

    def find(self, name: str) -> dict[str, Any] | None:
        """The entry named ``name``, opening no other."""
        lookup = self._key.lookup(self._kind, name)
        with self._mutex:
            self._refresh()
            if lookup not in self._sealed and lookup not in self._opened:
                return None
            return dict(self._open(lookup))

    def items(self) -> list[dict[str, Any]]:
        """Every entry, opened."""
        with self._mutex:
            self._refresh()
            lookups = set(self._sealed) | set(self._opened)
            return [dict(self._open(lookup)) for lookup in sorted(lookups)]

    def reread(self) -> None:
        """Forget what was read, so that the next read sees the file as it is now."""
        with self._mutex:
            self._stamp.forget()

    # -- writing -------------------------------------------------------------------------

    def write(self, items: Mapping[str, Mapping[str, Any]]) -> None:
        """Replace the file with ``items`` (name -> entry), all sealed afresh. Hold ``locked``.

        A plaintext file being replaced keeps a second name until the sealed file is in
        place; then its bytes are zero-filled and it is unlinked.
        """
        for name, item in items.items():
            if item.get(self._name_field) != name:
                raise AccountsFileError(f"an entry of {self.path.name} is filed under another name")
        data = seal_file(self._key, self._kind, items, random=self._random)
        plaintext = self._hold_plaintext()
        write_file_atomically(self.path, data, action=f"writing {self.path.name}")
        if plaintext is not None:
            shred_and_unlink(plaintext)
        with self._mutex:
            self._sealed = open_file(self._key, self._kind, parse(data, self.path), self.path)
            self._opened = {self._key.lookup(self._kind, n): dict(i) for n, i in items.items()}
            self._legacy = False
            self._stamp.mark()

    def _hold_plaintext(self) -> Path | None:
        """A second name for the file on disk if it is in clear (so its bytes can be zeroed
        once the sealed file replaces it); leftovers of an interrupted migration go first."""
        held = self.path.with_name(self.path.name + LEGACY_SUFFIX)
        self._tidy(held)
        try:
            document = parse(self.path.read_bytes(), self.path)
        except FileNotFoundError:
            return None
        if not is_legacy(document):
            return None
        os.link(self.path, held)
        fsync_directory(self.path.parent)
        return held

    def _tidy(self, held: Path) -> None:
        if not held.exists():
            return
        if self.path.exists() and os.path.samefile(held, self.path):
            held.unlink()  # cut short before the sealed file replaced it: only a second name
            fsync_directory(held.parent)
        else:
            shred_and_unlink(held)  # cut short after: the old plaintext, still to be zeroed

    def _migrate(self) -> None:
        """Seal a file the previous version left in clear, now (and finish a migration that
        a crash cut short)."""
        held = self.path.with_name(self.path.name + LEGACY_SUFFIX)
        if not held.exists():
            with self._mutex:
                self._refresh()
                if not self._legacy:
                    return
        with locked(self.path.parent):
            self.reread()
            with self._mutex:
                self._refresh()
                legacy = self._legacy
                entries = {self._name_of(i): i for i in self._opened.values()} if legacy else {}
            if legacy:
                self.write(entries)
            else:
                self._tidy(held)
