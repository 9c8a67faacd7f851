"""The gallery key-encryption key (KEK): chosen, sealed, checked, rotated and destroyed.

Provisioning's order of preference: a TPM2 if one answers, then systemd-creds, then a
passphrase (``--passphrase-file`` or ``$EDGEID_GALLERY_PASSPHRASE``). A key file is used only
when asked for (``--key-provider keyfile``: a lab box or a developer's machine), because it
lies beside the data it protects. The keyring itself, its providers and the rotation are
``edgeid.runtime.gallery``'s; this module only chooses and drives them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgeid.runtime.audit import AuditLog, audit_dir
from edgeid.runtime.audit.recorder import Recorder
from edgeid.runtime.config.settings import KeySettings
from edgeid.runtime.errors import BadInputError, EdgeidError
from edgeid.runtime.gallery.store import GalleryStore
from edgeid.runtime.services.caller import LocalOperator
from edgeid.runtime.services.keys import rotate_kek
from edgeid.runtime.storage.durable import shred_and_unlink
from edgeid.runtime.vault.key_choice import keyring_path, keys_dir, make_provider, provider_for
from edgeid.runtime.vault.keys import (
    KekProvider,
    KeyFileProvider,
    Keyring,
    SystemdCredsProvider,
    Tpm2Provider,
    is_gallery_scope,
    read_keyring,
)

PROVIDER_CHOICES = ("auto", "tpm2", "systemd-creds", "passphrase", "keyfile")
PASSPHRASE_ENV = "EDGEID_GALLERY_PASSPHRASE"
NEW_PASSPHRASE_ENV = "EDGEID_NEW_GALLERY_PASSPHRASE"
# scrypt stretches the passphrase, but a short one is still guessed offline from a stolen disk.
MIN_PASSPHRASE_CHARS = 12


@dataclass(frozen=True)
class KeyringInfo:
    """What the keyring says about itself, read without opening any key."""

    provider: str
    kek_id: str
    created_at: str
    galleries: int
    other_scopes: tuple[str, ...]  # keys of other services (the audit log's ``audit``)


def read_passphrase(file: Path | None, env: str) -> str | None:
    """A passphrase from a file (first line) or the environment; None when neither is given."""
    if file is not None:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInputError(f"cannot read the passphrase file {file}: {exc}") from None
        return lines[0] if lines else ""
    return os.environ.get(env) or None


def check_new_passphrase(secret: str | None, where: str) -> str:
    if not secret:
        raise BadInputError(f"the passphrase provider needs a passphrase; give it with {where}")
    if len(secret) < MIN_PASSPHRASE_CHARS:
        raise BadInputError(
            f"the gallery passphrase must have at least {MIN_PASSPHRASE_CHARS} characters"
        )
    return secret


def keyring_info(home: Path) -> KeyringInfo | None:
    path = keyring_path(home)
    if not path.exists():
        return None
    info, wrapped = read_keyring(path)
    return KeyringInfo(
        provider=str(info.get("provider")),
        kek_id=str(info.get("kek_id")),
        created_at=str(info.get("created_at", "")),
        galleries=sum(1 for scope in wrapped if is_gallery_scope(scope)),
        other_scopes=tuple(sorted(s for s in wrapped if not is_gallery_scope(s))),
    )


def _unavailable(kind: str, keys: KeySettings) -> str | None:
    """Why a sealing provider cannot work here, or None when it can."""
    if kind == "tpm2" and not Tpm2Provider(Path(), tcti=keys.tpm_tcti).available():
        where = keys.tpm_tcti or "tpm2-tools' default TCTI"
        return f"no TPM answers at {where} (or tpm2-tools are missing); check it or --tpm-tcti"
    if kind == "systemd-creds" and not SystemdCredsProvider(Path()).available():
        return "systemd-creds is missing or cannot encrypt on this machine"
    return None


def best_sealer(keys: KeySettings) -> str | None:
    """The strongest provider that seals the KEK to this machine: TPM2, then systemd-creds."""
    return next((k for k in ("tpm2", "systemd-creds") if _unavailable(k, keys) is None), None)


def choose_provider(keys: KeySettings, requested: str, passphrase: str | None) -> str:
    """The provider a new keyring gets: the one asked for, or the strongest present."""
    if requested not in PROVIDER_CHOICES:
        raise BadInputError(f"unknown key provider {requested!r}; use one of {PROVIDER_CHOICES}")
    if requested == "auto":
        sealer = best_sealer(keys)
        if sealer is not None:
            return sealer
        if not passphrase:
            raise BadInputError(
                "no TPM answers and systemd-creds cannot encrypt here: give a gallery passphrase "
                f"with --passphrase-file or ${PASSPHRASE_ENV}, or --key-provider keyfile on a "
                "lab box"
            )
        requested = "passphrase"
    problem = _unavailable(requested, keys)
    if problem:
        raise BadInputError(
            f"key provider {requested}: {problem}; or choose another --key-provider"
        )
    if requested == "passphrase":
        check_new_passphrase(passphrase, f"--passphrase-file or ${PASSPHRASE_ENV}")
    return requested


def ensure_keyring(
    home: Path, keys: KeySettings, kind: str, passphrase: str | None
) -> tuple[bool, str]:
    """Create the keyring under a new ``kind`` KEK, or check that the existing one opens."""
    existing = keyring_info(home)
    if existing is None:
        provider = make_provider(kind, home, keys, passphrase=passphrase)
        with GalleryStore(home, provider) as store:
            kek_id = store.keyring.kek_id
        return True, f"new {kind} key-encryption key {kek_id[:8]}"
    if existing.provider == "passphrase" and not passphrase:
        return False, "passphrase-protected keyring present (not opened: no passphrase given)"
    ring = Keyring.open(
        keyring_path(home), make_provider(existing.provider, home, keys, passphrase=passphrase)
    )
    return False, f"{ring.provider_kind} key-encryption key {ring.kek_id[:8]} opens the keyring"


def check_data_keys(home: Path, keys: KeySettings, passphrase: str | None) -> tuple[str, int]:
    """Open the keyring (its check value proves the KEK) and unwrap every data key in it."""
    path = keyring_path(home)
    if not path.exists():
        raise EdgeidError(f"no keyring at {path}; run edgeid provision init")
    info = keyring_info(home)
    assert info is not None
    ring = Keyring.open(path, make_provider(info.provider, home, keys, passphrase=passphrase))
    count = 0
    for scope, key_ids in ring.wrapped_keys().items():
        for key_id in key_ids:
            ring.data_key(scope, key_id)
            count += 1
    return ring.provider_kind, count


@dataclass(frozen=True)
class Rotation:
    old_provider: str
    old_kek_id: str
    new_provider: str
    new_kek_id: str
    data_keys: int  # re-wrapped, galleries and other scopes alike


def rotate(
    home: Path,
    keys: KeySettings,
    new_kind: str,
    *,
    passphrase: str | None,
    new_passphrase: str | None,
    new_keys: KeySettings | None = None,
) -> Rotation:
    """A new KEK of ``new_kind``; every data key in the keyring is re-wrapped under it at once.

    This is ``GalleryStore.rotate_kek`` (the same operation as ``edgeid gallery rotate-key``);
    the keyring re-wraps every scope it holds, the audit log's included, and the provider
    destroys the old KEK's stored material. ``new_keys`` (default ``keys``) configures the new
    provider, e.g. another TPM's TCTI.
    """
    before = keyring_info(home)
    if before is None:
        raise EdgeidError(
            f"no keyring at {keyring_path(home)} to rotate; run edgeid provision init"
        )
    problem = _unavailable(new_kind, new_keys or keys)
    if problem:
        raise BadInputError(f"key provider {new_kind}: {problem}")
    new_provider = make_provider(new_kind, home, new_keys or keys, passphrase=new_passphrase)
    with GalleryStore(home, provider_for(home, keys, passphrase=passphrase)) as store:
        if audit_dir(home).is_dir():  # accounted for like every other door (os:<login>)
            with AuditLog.open(home, store.keyring) as log:
                rotate_kek(store, Recorder(log), LocalOperator.current(), new_provider)
        else:  # before any audit log exists there is nothing to account to
            store.rotate_kek(new_provider)
        ring = store.keyring
        count = sum(len(k) for k in ring.wrapped_keys().values())
        return Rotation(before.provider, before.kek_id, ring.provider_kind, ring.kek_id, count)


def destroy_kek(home: Path, keys: KeySettings) -> str:
    """Erase the KEK's stored material through its provider, then any stray KEK file.

    A passphrase KEK stores nothing: erasing the keyring (its salt and wrapped keys) is enough.
    """
    folder = keys_dir(home)
    info: KeyringInfo | None
    try:
        info = keyring_info(home)
    except EdgeidError:
        info = None  # an unreadable keyring: its KEK files are shredded below all the same
    detail = "no keyring"
    if info is not None:
        providers: dict[str, KekProvider] = {
            "keyfile": KeyFileProvider(folder),
            "tpm2": Tpm2Provider(folder, tcti=keys.tpm_tcti),
            "systemd-creds": SystemdCredsProvider(folder),
        }
        provider = providers.get(info.provider)
        if provider is not None:
            provider.destroy(info.kek_id)
        detail = f"{info.provider} key-encryption key {info.kek_id[:8]} destroyed"
    if folder.is_dir():
        for leftover in sorted(folder.rglob("*"), reverse=True):
            if leftover.is_file() or leftover.is_symlink():
                shred_and_unlink(leftover)
    return detail
