"""The accounts folder: ``<home>/accounts`` (0700) holding small JSON files (0600).

Both the service and the ``edgeid users`` command change these files, so every change is a
read-modify-write under an exclusive ``flock`` on ``.lock``, and every write is atomic.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from runtime.errors import EdgeidError
from runtime.storage.durable import PRIVATE_FILE_MODE, make_private_dir, write_file_atomically

ACCOUNTS_DIR = "accounts"
LOCK_FILE = ".lock"


class AccountsFileError(EdgeidError):
    """An accounts file is unreadable or malformed."""


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


def read_json(path: Path, key: str) -> list[dict[str, Any]]:
    """The list stored under ``key`` in ``path``; empty when the file does not exist."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AccountsFileError(
            f"{path} is unreadable ({type(exc).__name__}); restore it from a backup"
        ) from exc
    items = data.get(key) if isinstance(data, dict) else None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise AccountsFileError(f"{path} has no list {key!r}; restore it from a backup")
    return items


def write_json(path: Path, key: str, items: list[dict[str, Any]]) -> None:
    body = json.dumps({"version": 1, key: items}, indent=1, sort_keys=True).encode("utf-8")
    write_file_atomically(path, body, action=f"writing {path.name}")


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
