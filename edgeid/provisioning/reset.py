"""`edgeid provision factory-reset`: crypto-erase, then remove the box's state.

Order matters: the key-encryption key goes first (through its provider: the key file or the
TPM/systemd-creds blob is zero-filled and unlinked), then the keyring with every wrapped data
key, then every other file of the state directory, each zero-filled before it is unlinked.
After the first step nothing encrypted on this disk can be opened any more, even where a
copy-on-write filesystem or flash wear levelling keeps old blocks of the later files.

Kept by default: ``models/``, ``engines/`` and ``wheelhouse/``, which are built from public
sources and hold nothing of the box, so the box can be provisioned again without a network.
``everything=True`` removes them too. Symbolic links are unlinked, never followed.

Caveat for a TPM2 KEK: the sealed blob can only be unsealed by this TPM, but a copy of the blob
left in old flash blocks could still be; clearing the TPM's owner hierarchy (``tpm2_clear``,
which also voids every other key sealed to it) is left to the technician.
"""

from __future__ import annotations

import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from edgeid.provisioning.kek import destroy_kek
from edgeid.runtime.config.settings import KeySettings, config_path, load_settings
from edgeid.runtime.errors import BadInputError, EdgeidError
from edgeid.runtime.gallery.errors import GalleryBusyError
from edgeid.runtime.gallery.store import LOCK_FILE
from edgeid.runtime.identity.device_key import IDENTITY_DIR
from edgeid.runtime.inference.pipeline import ENGINES_DIR
from edgeid.runtime.storage.durable import fsync_directory, shred_and_unlink
from edgeid.runtime.vault.key_choice import GALLERIES_DIR, keyring_path

KEPT_DIRS = ("models", ENGINES_DIR, "wheelhouse")
# What makes a folder an edgeid state directory: a reset refuses any other (a mistyped --home).
MARKERS = (config_path(Path()).name, GALLERIES_DIR, IDENTITY_DIR, "keys", "tls", "models")


@dataclass(frozen=True)
class ResetReport:
    kek: str
    files_erased: int
    bytes_erased: int
    kept: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "kek": self.kek,
            "files_erased": self.files_erased,
            "bytes_erased": self.bytes_erased,
            "kept": list(self.kept),
        }


def _lock_galleries(home: Path) -> int | None:
    """Hold the galleries' writer lock so a running service cannot write during the reset."""
    folder = home / GALLERIES_DIR
    if not folder.is_dir():
        return None
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise GalleryBusyError(
            f"the galleries under {home} are open (edgeid serve?); stop the service, then reset"
        ) from None
    return fd


def _keys_settings(home: Path) -> KeySettings:
    try:
        return load_settings(home).keys
    except EdgeidError:
        return KeySettings()  # a broken config must not stop an erase; only the TCTI is read


def factory_reset(home: Path, *, everything: bool = False) -> ResetReport:
    if not home.is_dir():
        raise BadInputError(f"{home} is not a directory; give the box's state directory")
    if not any((home / marker).exists() for marker in MARKERS):
        raise BadInputError(
            f"{home} does not look like an edgeid state directory (no {', '.join(MARKERS)}); "
            "check --home"
        )
    kept = () if everything else tuple(d for d in KEPT_DIRS if (home / d).is_dir())
    lock = _lock_galleries(home)
    try:
        kek = destroy_kek(home, _keys_settings(home))
        shred_and_unlink(keyring_path(home))
        files, size = _erase_tree(home, kept)
    finally:
        if lock is not None:
            os.close(lock)
    left = [p for p in _files(home) if not any(_under(p, home / d) for d in kept)]
    if left:
        raise EdgeidError(
            f"{len(left)} file(s) could not be erased under {home} (first: {left[0]}); check "
            "their permissions and run factory-reset again"
        )
    return ResetReport(kek, files, size, kept)


def _under(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _files(home: Path) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(home, followlinks=False):
        found += [Path(root) / n for n in names]
        found += [Path(root) / d for d in dirs if (Path(root) / d).is_symlink()]
    return found


def _erase_tree(home: Path, kept: tuple[str, ...]) -> tuple[int, int]:
    """Zero-fill and unlink every file outside ``kept``, then remove the emptied folders."""
    files = size = 0
    keep = [home / d for d in kept]
    for root, dirs, names in os.walk(home, topdown=False, followlinks=False):
        folder = Path(root)
        if any(_under(folder, k) for k in keep):
            continue
        for name in [*names, *(d for d in dirs if (folder / d).is_symlink())]:
            path = folder / name
            if any(_under(path, k) for k in keep):
                continue  # a kept folder that is a link: kept, not followed
            info = path.lstat()
            if not stat.S_ISREG(info.st_mode):
                path.unlink()  # a link is never followed out of the state directory
                continue
            size += info.st_size
            shred_and_unlink(path)
            files += 1
        if folder != home:
            folder.rmdir()
    fsync_directory(home)
    return files, size
