"""Durable file operations: every write is flushed and fsynced, file and directory, before it
counts, and a failed write is rolled back.

All writes go through a ``FileWriter`` so that tests can inject a full disk.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from edgeid.runtime.errors import DiskFullError, StorageWriteError

logger = logging.getLogger(__name__)

SHRED_CHUNK_BYTES = 1 << 20  # overwrite in 1 MiB pieces: bounded memory for large logs
PRIVATE_FILE_MODE = 0o600  # gallery files and keys: readable by the service user only
PRIVATE_DIR_MODE = 0o700  # and so are the folders that hold them


class FileWriter(Protocol):
    """The system calls a durable write makes; tests substitute one that fails."""

    def write(self, fd: int, data: bytes) -> int: ...

    def fsync(self, fd: int) -> None: ...


class OsFileWriter:
    """The real thing."""

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)


def write_error(action: str, where: str, exc: OSError) -> StorageWriteError:
    """A one-line error for a failed write; ENOSPC gets its own type and fix."""
    if exc.errno == errno.ENOSPC:
        return DiskFullError(
            f"{action} failed: disk full under {where}; nothing was written, free space and retry"
        )
    return StorageWriteError(f"{action} failed under {where}: {exc.strerror or exc}")


def write_all(writer: FileWriter, fd: int, data: bytes) -> None:
    """Write every byte, looping over short writes."""
    view = memoryview(data)
    while view:
        written = writer.write(fd, view.tobytes())
        if written <= 0:
            raise OSError(errno.EIO, "write returned no progress")
        view = view[written:]


def fsync_directory(directory: Path) -> None:
    """Make a directory's entries (a new, renamed or removed file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dir(directory: Path) -> None:
    """Create a folder (and parents) readable only by this user, and make it durable."""
    if directory.is_dir():
        return
    directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    fsync_directory(directory.parent)


def write_file_atomically(
    path: Path, data: bytes, *, writer: FileWriter | None = None, action: str = "write"
) -> None:
    """Replace ``path`` with ``data`` all at once: temp file, fsync, rename, fsync folder.

    After a crash the file holds either the old or the new bytes, never a mix.
    """
    writer = writer or OsFileWriter()
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
        try:
            write_all(writer, fd, data)
            writer.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(action, str(path.parent), exc) from exc


def shred_and_unlink(path: Path) -> None:
    """Overwrite a file's bytes with zeros, fsync, then unlink it.

    On a filesystem that writes in place (ext4, xfs) this removes the old bytes from the
    blocks; on copy-on-write filesystems or flash with wear levelling the old blocks may
    survive, which is why erased data is also encrypted under a retired key.
    """
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        zeros = bytes(SHRED_CHUNK_BYTES)
        done = 0
        while done < size:
            step = min(SHRED_CHUNK_BYTES, size - done)
            done += os.pwrite(fd, zeros[:step], done)
        os.fsync(fd)
    except OSError as exc:
        logger.warning("could not overwrite %s before unlinking it: %s", path, exc.strerror)
    finally:
        os.close(fd)
    path.unlink(missing_ok=True)
    fsync_directory(path.parent)


def lock_exclusively(path: Path, busy: Callable[[], Exception]) -> int:
    """Hold an exclusive, non-blocking ``flock`` on ``path`` (created 0600) for this process's
    life or until the returned descriptor is closed; raise ``busy()`` when another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise busy() from None
    return fd


def shred_tree(directory: Path) -> None:
    """Zero-fill and unlink every file under ``directory``, then remove the folders."""
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            shred_and_unlink(path)
    directory.rmdir()
    fsync_directory(directory.parent)
