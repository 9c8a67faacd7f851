"""A/B slots: where versions are installed and which one runs.

``SlotBackend`` is what the update state machine needs from the platform. A bootloader
integration fills the same five operations; for a Jetson with ``nvbootctrl``: ``write`` flashes
the inactive rootfs partition, ``activate`` is ``set-active-boot-slot``, ``mark_good`` is
``mark-boot-successful``, ``active`` is ``get-current-slot`` (with the bootloader's retry count
as a second safety net under this one).

``DirectorySlots`` keeps both versions as folders under ``<home>/slots``::

    a/  b/            each version's files, exactly as its manifest lists them
    a.json  b.json    the slot record: the signed manifest of what the slot holds; written last
                      and removed first, so a slot without one is empty or incomplete
    current -> a      what runs (the unit's ExecStart goes through it)
    good -> a         the last committed version, what rollback and recovery fall back to

``current`` and ``good`` are symlinks replaced by rename: after a crash each names one slot or
the other, never neither.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from edgeid.runtime.compat import UTC
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.storage.durable import fsync_directory, write_error, write_file_atomically
from edgeid.updater.bundle import VerifiedBundle
from edgeid.updater.errors import UpdateError
from edgeid.updater.manifest import Manifest, PayloadFile

logger = logging.getLogger(__name__)

SLOT_NAMES = ("a", "b")
SLOTS_DIR = "slots"
CURRENT_LINK = "current"
GOOD_LINK = "good"
CODE_DIR_MODE = 0o755  # code is not secret, and the service user must read what root wrote
CODE_FILE_MODE = 0o644
CODE_EXEC_MODE = 0o755
HASH_CHUNK = 1 << 20

CrashPoint = Callable[[str], None]


def _no_crash(_name: str) -> None:
    return None


@dataclass(frozen=True)
class SlotRecord:
    """What a complete slot holds: its signed manifest, as installed."""

    manifest_bytes: bytes
    signature: bytes
    signer: str  # fingerprint of the key that signed it
    written_at: str

    @property
    def manifest(self) -> Manifest:
        return Manifest.from_bytes(self.manifest_bytes, "slot record")

    def to_bytes(self) -> bytes:
        data = {
            "manifest": base64.b64encode(self.manifest_bytes).decode("ascii"),
            "signature": self.signature.hex(),
            "signer": self.signer,
            "written_at": self.written_at,
        }
        return (json.dumps(data, indent=2) + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> SlotRecord:
        raw = json.loads(data)
        return cls(
            base64.b64decode(raw["manifest"], validate=True),
            bytes.fromhex(raw["signature"]),
            str(raw["signer"]),
            str(raw["written_at"]),
        )


class SlotBackend(Protocol):
    def active(self) -> str | None:
        """The slot that runs (or will, after the next restart); None before the first install."""

    def inactive(self) -> str:
        """The slot an update writes: the one that is not active."""

    def good(self) -> str | None:
        """The last slot marked good (committed)."""

    def record(self, slot: str) -> SlotRecord | None:
        """What a complete slot holds; None when it is empty or was left incomplete."""

    def path(self, slot: str) -> Path:
        """Where the slot's files are visible (for a partition: its mount point)."""

    def write(self, slot: str, bundle: VerifiedBundle) -> None:
        """Replace the slot's contents with the bundle's payload; record it last."""

    def discard(self, slot: str) -> None:
        """Mark a slot incomplete (an interrupted write); never the active one."""

    def activate(self, slot: str | None) -> None:
        """Make ``slot`` the one that runs from the next restart (None: none)."""

    def mark_good(self, slot: str) -> None:
        """Record ``slot`` as committed: the fallback from now on."""

    def check(self, slot: str) -> list[str]:
        """Problems with the slot's contents against its record (empty: intact)."""


class DirectorySlots:
    def __init__(self, home: Path, crash: CrashPoint = _no_crash) -> None:
        self.root = home / SLOTS_DIR
        self._crash = crash

    # Reading.

    def _link(self, name: str) -> str | None:
        try:
            target = os.readlink(self.root / name)
        except (FileNotFoundError, OSError):
            return None
        if target not in SLOT_NAMES:
            logger.warning("%s points at %r, not a slot; treating it as unset", name, target)
            return None
        return target

    def active(self) -> str | None:
        return self._link(CURRENT_LINK)

    def good(self) -> str | None:
        return self._link(GOOD_LINK)

    def inactive(self) -> str:
        return "b" if self.active() == "a" else "a"

    def path(self, slot: str) -> Path:
        _check_name(slot)
        return self.root / slot

    def _record_path(self, slot: str) -> Path:
        _check_name(slot)
        return self.root / f"{slot}.json"

    def record(self, slot: str) -> SlotRecord | None:
        try:
            return SlotRecord.from_bytes(self._record_path(slot).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("slot %s record is unreadable (%s); slot counts as empty", slot, exc)
            return None

    def check(self, slot: str) -> list[str]:
        record = self.record(slot)
        if record is None:
            return [f"slot {slot} holds no complete version"]
        expected = {entry.path: entry for entry in record.manifest.files}
        problems: list[str] = []
        found: set[str] = set()
        base = self.path(slot)
        for folder, dirs, files in os.walk(base):
            for name in [*files, *(d for d in dirs if (Path(folder) / d).is_symlink())]:
                rel = (Path(folder) / name).relative_to(base).as_posix()
                found.add(rel)
                entry = expected.get(rel)
                if entry is None:
                    problems.append(f"{rel} is not in the manifest")
                elif not _file_matches(base / rel, entry):
                    problems.append(f"{rel} does not match its manifest hash")
        problems += [f"{path} is missing" for path in sorted(expected.keys() - found)]
        return problems

    # Writing.

    def _ensure_root(self) -> None:
        if not self.root.is_dir():
            self.root.mkdir(mode=CODE_DIR_MODE, parents=True, exist_ok=True)
            self.root.chmod(CODE_DIR_MODE)
            fsync_directory(self.root.parent)

    def discard(self, slot: str) -> None:
        if slot == self.active():
            raise UpdateError(f"refusing to discard slot {slot}: it is the active slot")
        try:
            self._record_path(slot).unlink(missing_ok=True)
            fsync_directory(self.root)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise write_error(f"discarding slot {slot}", str(self.root), exc) from exc

    def write(self, slot: str, bundle: VerifiedBundle) -> None:
        if slot == self.active():
            raise UpdateError(f"refusing to write slot {slot}: it is the active slot")
        self._ensure_root()
        self.discard(slot)  # from here on the slot counts as empty until its record is back
        self._crash("slot: record removed")
        target = self.path(slot)
        try:
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.exists():
                shutil.rmtree(target)
            target.mkdir(mode=CODE_DIR_MODE)
            target.chmod(CODE_DIR_MODE)
            self._crash("slot: cleared")
            folders = {target}
            for entry, chunks in bundle.payload():
                folders |= _make_parents(target, entry.path)
                _write_payload_file(target / entry.path, entry, chunks)
                self._crash("slot: file written")
            for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
                fsync_directory(folder)
            fsync_directory(self.root)
        except OSError as exc:
            raise write_error(f"writing slot {slot}", str(target), exc) from exc
        self._crash("slot: files synced")
        record = SlotRecord(
            bundle.manifest_bytes,
            bundle.signature,
            bundle.signer.fingerprint,
            datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        record_path = self._record_path(slot)
        write_file_atomically(record_path, record.to_bytes(), action=f"recording slot {slot}")
        record_path.chmod(CODE_FILE_MODE)
        self._crash("slot: record written")

    def _switch(self, link: str, slot: str | None) -> None:
        self._ensure_root()
        staged = self.root / f".{link}.tmp"
        try:
            staged.unlink(missing_ok=True)
            if slot is None:
                (self.root / link).unlink(missing_ok=True)
            else:
                _check_name(slot)
                os.symlink(slot, staged)
                self._crash(f"{link}: staged")
                os.replace(staged, self.root / link)
            fsync_directory(self.root)
        except OSError as exc:
            raise write_error(f"switching {link} to slot {slot}", str(self.root), exc) from exc
        self._crash(f"{link}: switched")

    def activate(self, slot: str | None) -> None:
        self._switch(CURRENT_LINK, slot)

    def mark_good(self, slot: str) -> None:
        self._switch(GOOD_LINK, slot)


def _check_name(slot: str) -> None:
    if slot not in SLOT_NAMES:
        raise BadInputError(f"unknown slot {slot!r}; slots are {', '.join(SLOT_NAMES)}")


def _make_parents(base: Path, rel: str) -> set[Path]:
    """Create the folders above ``rel`` (mode 0755); the ones created, to fsync later."""
    created: set[Path] = set()
    folder = base
    for part in Path(rel).parts[:-1]:
        folder = folder / part
        if not folder.is_dir():
            folder.mkdir(mode=CODE_DIR_MODE)
            folder.chmod(CODE_DIR_MODE)
        created.add(folder)
    return created


def _write_payload_file(path: Path, entry: PayloadFile, chunks: Iterator[bytes]) -> None:
    mode = CODE_EXEC_MODE if entry.executable else CODE_FILE_MODE
    # O_EXCL and O_NOFOLLOW: the slot is freshly emptied, so anything already there is wrong.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, mode)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)  # the umask may have narrowed it
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_matches(path: Path, entry: PayloadFile) -> bool:
    try:
        info = path.lstat()
        executable = bool(info.st_mode & stat.S_IXUSR)
        if not stat.S_ISREG(info.st_mode) or (info.st_size, executable) != (
            entry.size,
            entry.executable,
        ):
            return False
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
    except OSError:
        return False
    return digest.hexdigest() == entry.sha256
