"""Reading and writing a file a user named: only regular files, bounded, never blocking.

A path on the command line may be a FIFO (``open`` blocks forever), a device (``/dev/zero``
reads until memory runs out), a sparse file far over a size limit, a folder or a symlink into
somewhere unexpected. ``read_user_file`` opens without blocking, checks with ``fstat`` that it
holds a regular file no larger than the limit, and only then reads, at most limit + 1 bytes
(a file growing while read is refused too). ``write_user_file`` writes only a new regular file
or replaces a regular file atomically (temporary file + rename in the same folder), so an
``--out`` naming a device node, FIFO or symlink is refused instead of replaced.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from edgeid.runtime.errors import BadInputError
from edgeid.runtime.storage.durable import fsync_directory, write_error

# Text files a user names (passphrases, public keys): small by nature.
MAX_TEXT_BYTES = 64 * 1024
READ_CHUNK_BYTES = 1 << 20  # read in 1 MiB pieces: bounded memory however the file lies
PRIVATE_OUTPUT_MODE = 0o600  # reports and exports hold personal data


def file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"


def _open_error(path: Path, exc: OSError) -> BadInputError:
    if exc.errno == errno.ENOENT:
        return BadInputError(f"{path}: no such file")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return BadInputError(f"{path}: permission denied")
    if exc.errno == errno.ELOOP:
        return BadInputError(f"{path}: is a symbolic link; give the file it points to")
    if exc.errno == errno.EISDIR:
        return BadInputError(f"{path}: is a folder, not a file")
    return BadInputError(f"{path}: cannot read ({exc.strerror or exc})")


def read_user_file(
    path: Path, *, max_bytes: int, what: str = "file", follow_symlinks: bool = True
) -> bytes:
    """The bytes of the regular file at ``path``, refused (BadInputError) if it is anything
    else or larger than ``max_bytes``. Never blocks on a FIFO, never reads a device."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _open_error(path, exc) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadInputError(f"{path}: is {file_kind(info.st_mode)}; give a regular {what}")
        if info.st_size > max_bytes:
            raise BadInputError(
                f"{path}: {info.st_size} bytes is over the {max_bytes}-byte limit for this {what}"
            )
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, min(READ_CHUNK_BYTES, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise BadInputError(f"{path}: grew over the {max_bytes}-byte limit while read")
        return b"".join(chunks)
    except OSError as exc:
        raise _open_error(path, exc) from None
    finally:
        os.close(fd)


def check_regular_file(path: Path, *, what: str = "file") -> int:
    """Refuse (BadInputError) anything at ``path`` but a readable regular file, without
    blocking on a FIFO; its size. For a reader that opens the path itself later."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise _open_error(path, exc) from None
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(info.st_mode):
        raise BadInputError(f"{path}: is {file_kind(info.st_mode)}; give a regular {what}")
    return info.st_size


def read_user_text(path: Path, *, max_bytes: int = MAX_TEXT_BYTES, what: str = "file") -> str:
    """``read_user_file`` decoded as UTF-8; a file that is not UTF-8 is refused by name."""
    data = read_user_file(path, max_bytes=max_bytes, what=what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInputError(f"{path}: is not UTF-8 text; give a UTF-8 {what}") from None


def check_output_path(path: Path, *, force: bool = True) -> None:
    """Refuse an output path that is not a new file or (with ``force``) a regular file."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        parent = path.parent
        if not parent.is_dir():
            raise BadInputError(
                f"{parent} does not exist; create it or choose another place"
            ) from None
        return
    except OSError as exc:
        raise BadInputError(f"{path}: cannot use as output ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise BadInputError(
            f"{path}: is {file_kind(info.st_mode)}; the output must be a new or a regular file"
        )
    if not force:
        raise BadInputError(f"{path} exists; choose a new file name or add --force")


def write_user_file(
    path: Path,
    data: bytes,
    *,
    force: bool = True,
    mode: int = PRIVATE_OUTPUT_MODE,
    action: str = "writing the file",
) -> None:
    """Write ``data`` as the regular file ``path``: a new file, or (with ``force``) a regular
    file replaced atomically. Anything else at ``path`` (device, FIFO, symlink, folder) is
    refused; the temporary file lives in the same folder so the rename is atomic."""
    check_output_path(path, force=force)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise BadInputError(f"{path}: cannot write here ({exc.strerror})") from None
        raise write_error(action, str(path.parent), exc) from exc
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        # Checked again just before the rename: something swapped in since is not replaced.
        check_output_path(path, force=force)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(action, str(path.parent), exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
